//! The controller's view of networks and peers, fed by list + watch on the store, from which
//! Sync streams are served. One task follows the store; each network has a `watch` channel that
//! wakes the Sync streams of that network's agents when its membership changes, so a change
//! touches only the affected network.
//!
//! After a compaction the follower re-lists at one revision and watches from revision + 1.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use canopy_proto::v1::{GatewayLiveRecord, NetworkRecord, PeerRecord, PolicyRecord, RouteRecord};
use prost::Message;
use tokio::sync::watch;

use crate::keys;
use crate::netmap::{NetState, Update};
use crate::store::{EventKind, Revision, Store, StoreError};

#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    follower: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The store revision the cache reflects.
    applied: watch::Sender<Revision>,
    /// Network and peer records that did not decode (each also logged): a record written by a
    /// newer or broken writer is visible here, not silently missing from maps.
    undecodable: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct State {
    networks: HashMap<String, NetState>,
    notify: HashMap<String, watch::Sender<Revision>>,
}

impl State {
    fn notifier(&mut self, network: &str) -> watch::Sender<Revision> {
        self.notify
            .entry(network.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }
}

fn network_id_of(key: &[u8]) -> Option<&str> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(keys::ROOT)?
        .strip_prefix("networks/")?;
    rest.split_once('/').map(|(_, id)| id)
}

impl Cache {
    /// Lists the store and starts following it. Returns once the initial list is loaded.
    pub async fn start(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let cache = Cache {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                follower: std::sync::Mutex::new(None),
                applied: watch::channel(0).0,
                undecodable: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        let rev = cache.relist(store.as_ref()).await?;
        let follower = cache.clone();
        let task = tokio::spawn(async move { follower.follow(store, rev).await });
        *cache
            .inner
            .follower
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(cache)
    }

    /// Stops following the store and waits until the follower has let go of it.
    pub async fn stop(&self) {
        let task = self
            .inner
            .follower
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// How many network and peer records failed to decode since start.
    pub fn undecodable(&self) -> u64 {
        self.inner
            .undecodable
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decodes a record the cache holds, counting and logging one that does not decode.
    fn decode<M: Message + Default>(&self, key: &[u8], value: &[u8]) -> Option<M> {
        match M::decode(value) {
            Ok(m) => Some(m),
            Err(e) => {
                self.inner
                    .undecodable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = String::from_utf8_lossy(key);
                tracing::warn!(key = %canopy_proto::text::escape(&key), error = %e, "a store record does not decode; left out of the maps");
                None
            }
        }
    }

    /// A stored policy as the maps use it. One that does not parse (written by a newer
    /// version, or damaged) is counted and logged, and allows nothing: a policy fails closed.
    fn policy(&self, key: &[u8], value: &[u8]) -> crate::policy::Policy {
        let deny_all = crate::policy::Policy::deny_all;
        let Some(rec) = self.decode::<PolicyRecord>(key, value) else {
            return deny_all();
        };
        crate::policy::parse(&rec.text).unwrap_or_else(|e| {
            let undecodable = &self.inner.undecodable;
            undecodable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(network = %rec.network_id, error = %e, "a stored policy does not parse; it allows nothing");
            deny_all()
        })
    }

    /// Loads the networks, peers, policies, routes, live gateways and peer-deletion markers at
    /// one revision (not the audit log, credentials or tokens); returns that revision.
    async fn relist(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let prefixes = [
            format!("{}networks/", keys::ROOT).into_bytes(),
            keys::ALL_PEERS.as_bytes().to_vec(),
            keys::ALL_POLICIES.as_bytes().to_vec(),
            keys::ALL_ROUTES.as_bytes().to_vec(),
            keys::ALL_GWLIVE.as_bytes().to_vec(),
            format!("{}netdel/", keys::ROOT).into_bytes(),
        ];
        let nets = store.range_many(&prefixes).await?;
        let rev = nets.revision;
        // A network's deltas are exact from its last peer deletion on: deletions before the
        // re-list left no tombstones, but none happened after that revision.
        let floors: HashMap<&str, Revision> = nets
            .kvs
            .iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(&kv.key).ok()?;
                Some((
                    k.strip_prefix(keys::ROOT)?.strip_prefix("netdel/")?,
                    kv.mod_revision,
                ))
            })
            .collect();
        let mut fresh: HashMap<String, NetState> = HashMap::new();
        for kv in &nets.kvs {
            if network_id_of(&kv.key).is_some()
                && let Some(n) = self.decode::<NetworkRecord>(&kv.key, &kv.value)
            {
                let floor = floors.get(n.id.as_str()).copied().unwrap_or(0);
                fresh.insert(n.id.clone(), NetState::new(n, floor));
            }
        }
        for kv in &nets.kvs {
            if let Some((net, _)) = keys::parse_peer(&kv.key)
                && let Some(s) = fresh.get_mut(net)
                && let Some(p) = self.decode::<PeerRecord>(&kv.key, &kv.value)
            {
                s.put_peer(p, kv.mod_revision);
            }
            if let Some(net) = keys::parse_policy(&kv.key)
                && let Some(s) = fresh.get_mut(net)
            {
                s.set_policy(Some(self.policy(&kv.key, &kv.value)), kv.mod_revision);
                s.set_policy_lock(crate::netmap::policy_lock(&kv.value));
            }
            if let Some((net, _)) = keys::parse_route(&kv.key)
                && let Some(s) = fresh.get_mut(net)
                && let Some(r) = self.decode::<RouteRecord>(&kv.key, &kv.value)
            {
                s.put_route(r, kv.mod_revision);
            }
            if let Some((net, peer)) = keys::parse_gwlive(&kv.key)
                && let Some(s) = fresh.get_mut(net)
                && let Some(r) = self.decode::<GatewayLiveRecord>(&kv.key, &kv.value)
            {
                s.set_live(peer, Some(r.online_since_unix_ms), kv.mod_revision);
            }
        }
        let mut st = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        // Every network, old or new, may have changed: wake all its streams.
        let ids: Vec<String> = st.networks.keys().chain(fresh.keys()).cloned().collect();
        st.networks = fresh;
        for id in ids {
            st.notifier(&id).send_replace(rev);
        }
        // Set under the lock, so a reader never sees state newer than `applied`.
        self.inner.applied.send_replace(rev);
        drop(st);
        Ok(rev)
    }

    async fn follow(&self, store: Arc<dyn Store>, mut rev: Revision) {
        loop {
            let mut w = match store.watch(keys::ROOT.as_bytes(), rev + 1).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cache watch failed; re-listing");
                    rev = self.relist_until_ok(store.as_ref()).await;
                    continue;
                }
            };
            while let Some(batch) = w.recv().await {
                match batch {
                    Ok(b) => {
                        self.apply(&b);
                        rev = b.revision;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache watch broke; re-listing");
                        rev = self.relist_until_ok(store.as_ref()).await;
                        break;
                    }
                }
            }
        }
    }

    async fn relist_until_ok(&self, store: &dyn Store) -> Revision {
        let backoff = canopy_proto::backoff::Backoff::equal(
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        let mut failures = 0;
        loop {
            match self.relist(store).await {
                Ok(rev) => return rev,
                Err(e) => {
                    tracing::warn!(error = %e, "re-list failed");
                    tokio::time::sleep(backoff.delay(failures)).await;
                    failures += 1;
                }
            }
        }
    }

    fn apply(&self, batch: &crate::store::WatchBatch) {
        let rev = batch.revision;
        let mut st = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        let mut touched: Vec<String> = Vec::new();
        for e in &batch.events {
            if let Some(id) = network_id_of(&e.kv.key) {
                match e.kind {
                    EventKind::Put => {
                        if let Some(n) = self.decode::<NetworkRecord>(&e.kv.key, &e.kv.value) {
                            st.networks
                                .entry(id.to_string())
                                .and_modify(|s| s.set_network(n.clone(), rev))
                                .or_insert_with(|| NetState::new(n, rev));
                        }
                    }
                    EventKind::Delete => {
                        st.networks.remove(id);
                    }
                }
                touched.push(id.to_string());
            } else if let Some((net, peer)) = keys::parse_peer(&e.kv.key) {
                if let Some(s) = st.networks.get_mut(net) {
                    match e.kind {
                        EventKind::Put => {
                            if let Some(p) = self.decode::<PeerRecord>(&e.kv.key, &e.kv.value) {
                                s.put_peer(p, rev);
                            }
                        }
                        EventKind::Delete => s.delete_peer(peer, rev),
                    }
                }
                touched.push(net.to_string());
            } else if let Some((net, id)) = keys::parse_route(&e.kv.key) {
                if let Some(s) = st.networks.get_mut(net) {
                    match e.kind {
                        EventKind::Put => {
                            if let Some(r) = self.decode::<RouteRecord>(&e.kv.key, &e.kv.value) {
                                s.put_route(r, rev);
                            }
                        }
                        EventKind::Delete => s.delete_route(id, rev),
                    }
                }
                touched.push(net.to_string());
            } else if let Some((net, peer)) = keys::parse_gwlive(&e.kv.key) {
                // A renewal changes nothing; only a gateway coming or going may move a prefix.
                let since = match e.kind {
                    EventKind::Put => self
                        .decode::<GatewayLiveRecord>(&e.kv.key, &e.kv.value)
                        .map(|r| r.online_since_unix_ms),
                    EventKind::Delete => None,
                };
                if let Some(s) = st.networks.get_mut(net)
                    && s.set_live(peer, since, rev)
                {
                    touched.push(net.to_string());
                }
            } else if let Some(net) = keys::parse_policy(&e.kv.key) {
                if let Some(s) = st.networks.get_mut(net) {
                    let policy = match e.kind {
                        EventKind::Put => Some(self.policy(&e.kv.key, &e.kv.value)),
                        EventKind::Delete => None,
                    };
                    s.set_policy(policy, rev);
                    s.set_policy_lock(crate::netmap::policy_lock(&e.kv.value));
                }
                touched.push(net.to_string());
            }
        }
        touched.sort();
        touched.dedup();
        for id in &touched {
            st.notifier(id).send_replace(rev);
        }
        // Drop notifiers of deleted networks once their streams are gone.
        st.notify
            .retain(|id, tx| tx.receiver_count() > 0 || touched.contains(id));
        self.inner.applied.send_replace(rev);
        drop(st);
    }

    /// Whether `peer` of `network` advertises a route (its liveness is recorded).
    pub fn is_gateway(&self, network: &str, peer: &str) -> bool {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).is_some_and(|s| s.is_gateway(peer))
    }

    /// The prefixes `peer`'s agent advertised, as the routes it made (sorted).
    pub fn agent_prefixes(&self, network: &str, peer: &str) -> Vec<String> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks
            .get(network)
            .map(|s| s.agent_prefixes(peer))
            .unwrap_or_default()
    }

    /// Whether gateway `peer` of `network` is live.
    pub fn gateway_live(&self, network: &str, peer: &str) -> bool {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).is_some_and(|s| s.is_live(peer))
    }

    /// The record of `network`.
    pub fn network(&self, network: &str) -> Option<NetworkRecord> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).map(|s| s.network.clone())
    }

    /// Whether route `id` of `network` carries its prefix now.
    pub fn route_is_primary(&self, network: &str, id: &str) -> bool {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).is_some_and(|s| s.is_primary(id))
    }

    /// Whether route `id` of `network` is in force: "approved", "auto-approved" or "pending"
    /// (also for a route the cache does not hold yet).
    pub fn route_state(&self, network: &str, id: &str) -> &'static str {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks
            .get(network)
            .map_or("pending", |s| s.route_state(id))
    }

    /// The store revision the cache reflects.
    pub fn applied(&self) -> Revision {
        *self.inner.applied.borrow()
    }

    /// Waits (up to `timeout`) until the cache reflects `rev`; returns whether it does.
    pub async fn wait_for(&self, rev: Revision, timeout: Duration) -> bool {
        let mut rx = self.inner.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Subscribes to changes of one network.
    pub fn subscribe(&self, network: &str) -> watch::Receiver<Revision> {
        let mut st = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        st.notifier(network).subscribe()
    }

    /// What the agent of `peer` at `base` needs next (stamped with the applied revision).
    /// `None` when the peer or its network is gone.
    pub fn update_for(&self, network: &str, peer: &str, base: Revision) -> Option<Update> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        let at = self.applied();
        st.networks.get(network)?.update_since(peer, base, at)
    }

    /// The network's last membership change.
    pub fn network_revision(&self, network: &str) -> Option<Revision> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).map(|s| s.revision)
    }

    /// Per network (by id): its tenant and how many peers it has.
    pub fn census(&self) -> HashMap<String, (String, usize)> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        let nets = st.networks.iter();
        nets.map(|(id, s)| (id.clone(), (s.network.tenant_id.clone(), s.peer_count())))
            .collect()
    }

    /// Whether `b` is in `a`'s map.
    pub fn sees(&self, network: &str, a: &str, b: &str) -> bool {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network).is_some_and(|s| s.sees(a, b))
    }

    pub fn peer(&self, network: &str, peer: &str) -> Option<PeerRecord> {
        let st = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        st.networks.get(network)?.peer(peer).cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use canopy_proto::v1::{NetworkRecord, PeerRecord};
    use futures::FutureExt as _;
    use futures::future::BoxFuture;

    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Op, RangeResult, Txn, TxnResult, WatchStream};

    /// The real embedded store, except that its first watch reports `Compacted` once the test
    /// says so: what a follower sees when it fell behind an etcd compaction.
    struct CompactingOnce {
        inner: EmbeddedStore,
        break_now: Arc<AtomicBool>,
        broken: AtomicBool,
    }

    impl Store for CompactingOnce {
        fn get<'a>(
            &'a self,
            key: &'a [u8],
        ) -> BoxFuture<'a, Result<Option<crate::store::KeyValue>, StoreError>> {
            self.inner.get(key)
        }
        fn range<'a>(&'a self, prefix: &'a [u8]) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
            self.inner.range(prefix)
        }
        fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
            self.inner.txn(txn)
        }
        fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.compact(revision)
        }
        fn watch<'a>(
            &'a self,
            prefix: &'a [u8],
            start: Revision,
        ) -> BoxFuture<'a, Result<WatchStream, StoreError>> {
            async move {
                if self.broken.swap(true, Ordering::SeqCst) {
                    return self.inner.watch(prefix, start).await;
                }
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let flag = self.break_now.clone();
                tokio::spawn(async move {
                    while !flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: start,
                            compacted: start + 100,
                        }))
                        .await;
                });
                Ok(rx)
            }
            .boxed()
        }
    }

    fn put(key: String, msg: impl prost::Message) -> Txn {
        Txn::new().then(Op::put(key, msg.encode_to_vec()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_that_fell_behind_a_compaction_re_lists_and_misses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let break_now = Arc::new(AtomicBool::new(false));
        let store = Arc::new(CompactingOnce {
            inner: inner.clone(),
            break_now: break_now.clone(),
            broken: AtomicBool::new(false),
        });
        let net = NetworkRecord {
            id: "net_1".into(),
            name: "n".into(),
            ..Default::default()
        };
        inner
            .txn(put(crate::keys::network("t", "net_1"), net))
            .await
            .unwrap();
        let cache = Cache::start(store).await.unwrap();
        let mut changes = cache.subscribe("net_1");

        // Changes made while the follower's watch is dead, which it never sees as events.
        let peer = |id: &str| PeerRecord {
            id: id.into(),
            network_id: "net_1".into(),
            ..Default::default()
        };
        inner
            .txn(put(crate::keys::peer("net_1", "peer_a"), peer("peer_a")))
            .await
            .unwrap();
        let r = inner
            .txn(put(crate::keys::peer("net_1", "peer_b"), peer("peer_b")))
            .await
            .unwrap();
        break_now.store(true, Ordering::SeqCst);

        assert!(
            cache.wait_for(r.revision, Duration::from_secs(5)).await,
            "the cache caught up"
        );
        assert!(cache.peer("net_1", "peer_a").is_some() && cache.peer("net_1", "peer_b").is_some());
        tokio::time::timeout(Duration::from_secs(1), changes.changed())
            .await
            .unwrap()
            .unwrap();
        // And it follows live changes again from there.
        let r = inner
            .txn(Txn::new().then(Op::delete(crate::keys::peer("net_1", "peer_a"))))
            .await
            .unwrap();
        assert!(cache.wait_for(r.revision, Duration::from_secs(5)).await);
        assert!(cache.peer("net_1", "peer_a").is_none());
        cache.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_that_does_not_decode_is_counted_and_the_rest_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let net = NetworkRecord {
            id: "net_1".into(),
            name: "n".into(),
            ..Default::default()
        };
        store
            .txn(put(crate::keys::network("t", "net_1"), net))
            .await
            .unwrap();
        let good = PeerRecord {
            id: "peer_a".into(),
            network_id: "net_1".into(),
            ..Default::default()
        };
        store
            .txn(put(crate::keys::peer("net_1", "peer_a"), good))
            .await
            .unwrap();
        store
            .txn(Txn::new().then(Op::put(crate::keys::peer("net_1", "peer_b"), vec![0xff; 7])))
            .await
            .unwrap();
        // An audit entry is none of the cache's business, garbage or not.
        store
            .txn(Txn::new().then(Op::put(
                format!("{}audit/t/1-x", crate::keys::ROOT),
                vec![0xff; 7],
            )))
            .await
            .unwrap();
        let cache = Cache::start(store.clone()).await.unwrap();
        assert_eq!(
            cache.undecodable(),
            1,
            "the broken peer, not the audit entry"
        );
        assert!(cache.peer("net_1", "peer_a").is_some());
        assert!(cache.peer("net_1", "peer_b").is_none());
        let r = store
            .txn(Txn::new().then(Op::put(crate::keys::peer("net_1", "peer_c"), vec![0xff; 3])))
            .await
            .unwrap();
        assert!(cache.wait_for(r.revision, Duration::from_secs(5)).await);
        assert_eq!(cache.undecodable(), 2, "one arriving by the watch too");
        cache.stop().await;
    }
}
