//! Background work on one elected replica, with fenced writes.
//!
//! Election is a lease record at [`LEADER_KEY`] (holder, expiry), taken and renewed by
//! compare-and-swap, so it works the same on every store backend. The record's mod revision
//! after this replica's last renewal is its *fence*: every background write is a transaction
//! conditioned on the record being unchanged, so a replica that was deposed while it paused (its
//! lease ran out and another took it) cannot write. Expiry uses wall-clock time: replicas' clocks
//! must agree to well within the lease (NTP).
//!
//! Jobs: delete join tokens that expired longer ago than the retention, and clean up what removed
//! peers can leave behind when a removal races an enrollment (credential index entries that
//! point at no peer).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_proto::v1::{IndexRecord, JoinTokenRecord, LeaderRecord};
use prost::Message as _;

use crate::keys;
use crate::store::{Compare, Op, Revision, Store, StoreError, Txn};

pub const LEADER_KEY: &str = "/canopy/v1/leader";

#[derive(Clone, Debug)]
pub struct BackgroundConfig {
    /// How long a leader's lease lasts without renewal.
    pub lease: Duration,
    /// How often to renew (or try to take) the lease and run the jobs.
    pub tick: Duration,
    /// How long an expired join token stays listed before it is deleted.
    pub expired_token_retention: Duration,
    /// How long a removed peer's credential entry is kept: within it, its agent is told it was
    /// removed; after it, the agent is only refused (and keeps retrying with backoff).
    pub removed_credential_retention: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            tick: Duration::from_secs(5),
            expired_token_retention: Duration::from_secs(3600),
            removed_credential_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What this replica should do about the lease next (not to be confused with a tenant's
/// subscription plan, `plans::Plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// Take the lease: the record is absent (0) or expired (at this revision).
    Acquire(Revision),
    /// Renew our own lease (at this revision).
    Renew(Revision),
    /// Someone else holds a live lease.
    Follow,
}

pub fn lease_step(me: &str, current: Option<(&LeaderRecord, Revision)>, now_ms: i64) -> LeaseStep {
    match current {
        None => LeaseStep::Acquire(0),
        Some((r, rev)) if r.holder == me => LeaseStep::Renew(rev),
        Some((r, rev)) if r.expires_at_unix_ms <= now_ms => LeaseStep::Acquire(rev),
        Some(_) => LeaseStep::Follow,
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Elector {
    store: Arc<dyn Store>,
    pub me: String,
    lease: Duration,
}

impl Elector {
    pub fn new(store: Arc<dyn Store>, me: String, lease: Duration) -> Self {
        Self { store, me, lease }
    }

    /// One round of election at `now_ms`: `Some(fence)` while this replica leads.
    pub async fn round(&self, now_ms: i64) -> Result<Option<Revision>, StoreError> {
        let kv = self.store.get(LEADER_KEY.as_bytes()).await?;
        let current = kv.as_ref().map(|kv| {
            (
                LeaderRecord::decode(kv.value.as_slice()).unwrap_or_default(),
                kv.mod_revision,
            )
        });
        let expected =
            match lease_step(&self.me, current.as_ref().map(|(r, rev)| (r, *rev)), now_ms) {
                LeaseStep::Acquire(rev) | LeaseStep::Renew(rev) => rev,
                LeaseStep::Follow => return Ok(None),
            };
        let rec = LeaderRecord {
            holder: self.me.clone(),
            expires_at_unix_ms: now_ms + self.lease.as_millis() as i64,
        };
        let r = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::unchanged(LEADER_KEY, expected))
                    .then(Op::put(LEADER_KEY, rec.encode_to_vec())),
            )
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Gives the lease up (on shutdown), if it is still ours at `fence`.
    pub async fn release(&self, fence: Revision) {
        let _ = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::unchanged(LEADER_KEY, fence))
                    .then(Op::delete(LEADER_KEY)),
            )
            .await;
    }
}

/// What one run of the jobs did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobReport {
    pub tokens_deleted: usize,
    pub credentials_deleted: usize,
}

/// Runs the background jobs as the leader holding `fence`. Each write is fenced.
pub async fn run_jobs(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
    cfg: &BackgroundConfig,
) -> Result<JobReport, StoreError> {
    let mut report = JobReport::default();
    let retention_s = cfg.expired_token_retention.as_secs() as i64;
    let tokens = store
        .range(format!("{}tokens/", keys::ROOT).as_bytes())
        .await?;
    for kv in &tokens.kvs {
        let Ok(t) = JoinTokenRecord::decode(kv.value.as_slice()) else {
            continue;
        };
        if t.expires_at_unix == 0 || t.expires_at_unix + retention_s > now_ms / 1000 {
            continue;
        }
        let mut txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if let Ok(h) = <[u8; 32]>::try_from(t.secret_hash.as_slice()) {
            txn = txn.then(Op::delete(keys::tokenhash(&h)));
        }
        if !store.txn(txn).await?.succeeded {
            return Ok(report); // deposed (or the token changed): stop here
        }
        report.tokens_deleted += 1;
    }
    // Credentials first, peers after: an enrollment writes both at once, so a credential read
    // here whose peer existed then is in the later peer list (unless the peer was removed
    // since). Each deletion is also conditioned on the peer being absent *now*: a peer that
    // enrolled in between keeps its credential (this race once cut fresh agents off).
    let creds = store
        .range(format!("{}credentials/", keys::ROOT).as_bytes())
        .await?;
    let peers: HashSet<String> = store
        .range(keys::ALL_PEERS.as_bytes())
        .await?
        .kvs
        .iter()
        .filter_map(|kv| keys::parse_peer(&kv.key).map(|(n, p)| format!("{n}/{p}")))
        .collect();
    let keep_s = cfg.removed_credential_retention.as_secs() as i64;
    for kv in &creds.kvs {
        let Ok(idx) = IndexRecord::decode(kv.value.as_slice()) else {
            continue;
        };
        let mut txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if idx.removed_at_unix != 0 {
            // A removed peer's entry: kept to tell its agent so, until the retention passes.
            if idx.removed_at_unix + keep_s > now_ms / 1000 {
                continue;
            }
        } else {
            if peers.contains(&idx.id) {
                continue;
            }
            let Some((net, peer)) = idx.id.split_once('/') else {
                continue;
            };
            txn = txn.when(Compare::absent(keys::peer(net, peer)));
        }
        if store.txn(txn).await?.succeeded {
            report.credentials_deleted += 1;
        }
    }
    Ok(report)
}

/// How often the leader prunes audit logs: retention is counted in days, and each pass costs
/// one small read per tenant, so not every tick.
const AUDIT_PRUNE_EVERY_MS: i64 = 3_600_000;

/// Deletes each tenant's audit entries older than its plan keeps them: one ranged delete per
/// tenant, from its first entry to the cutoff's key (keys sort by time), so the cost is the
/// entries deleted, never a read of the log. The self-managed default tenant has no record.
pub async fn prune_audit(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let tenants = store
        .range(format!("{}tenants/", keys::ROOT).as_bytes())
        .await?;
    let mut plans: Vec<(String, crate::plans::Plan)> = tenants
        .kvs
        .iter()
        .filter_map(|kv| canopy_proto::v1::TenantRecord::decode(kv.value.as_slice()).ok())
        .map(|t| {
            let plan = crate::plans::Plan::parse(&t.plan).unwrap_or(crate::plans::Plan::Free);
            (t.id, plan)
        })
        .collect();
    plans.push((
        crate::service::DEFAULT_TENANT.to_string(),
        crate::plans::Plan::SelfManaged,
    ));
    let mut pruned = 0;
    for (tenant, plan) in plans {
        let keep_ms = i64::from(plan.audit_retention_days()) * 86_400_000;
        let cutoff = now_ms - keep_ms;
        if cutoff <= 0 {
            continue;
        }
        let first = format!("{}audit/{tenant}/", keys::ROOT);
        let end = format!("{first}{cutoff:020}");
        // Only write when there is something to delete: an idle log costs one small read.
        let oldest = store.first_key(first.as_bytes()).await?;
        if oldest.is_none_or(|k| k.as_slice() >= end.as_bytes()) {
            continue;
        }
        let txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .then(Op::delete_range(first, end));
        if !store.txn(txn).await?.succeeded {
            break; // deposed
        }
        pruned += 1;
    }
    Ok(pruned)
}

/// Elects and runs the jobs every tick until `shutdown`; releases the lease on the way out.
pub async fn run(
    store: Arc<dyn Store>,
    me: String,
    cfg: BackgroundConfig,
    clock: crate::clock::Clock,
    leading: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let elector = Elector::new(store.clone(), me, cfg.lease);
    let mut tick = tokio::time::interval(cfg.tick);
    let mut fence = None;
    let mut next_audit_prune = 0i64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => break,
        }
        let now = clock.now_ms();
        match elector.round(now).await {
            Ok(Some(f)) => {
                if !leading.swap(true, Ordering::SeqCst) {
                    tracing::info!(replica = %elector.me, "this replica now runs background work");
                }
                fence = Some(f);
                match run_jobs(store.as_ref(), f, now, &cfg).await {
                    Ok(r) if r != JobReport::default() => tracing::info!(
                        tokens = r.tokens_deleted,
                        credentials = r.credentials_deleted,
                        "background cleanup"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "background jobs failed"),
                }
                if now >= next_audit_prune {
                    match prune_audit(store.as_ref(), f, now).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(tenants = n, "audit logs pruned"),
                        Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
                    }
                    next_audit_prune = now + AUDIT_PRUNE_EVERY_MS;
                }
            }
            Ok(None) => {
                if leading.swap(false, Ordering::SeqCst) {
                    tracing::info!(replica = %elector.me, "another replica runs background work now");
                }
                fence = None;
            }
            Err(e) => {
                // Cannot confirm the lease: stop acting as leader until we can.
                leading.store(false, Ordering::SeqCst);
                fence = None;
                tracing::warn!(error = %e, "leader election failed");
            }
        }
    }
    if let Some(f) = fence {
        elector.release(f).await;
    }
    leading.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use futures::future::BoxFuture;

    fn rec(holder: &str, exp: i64) -> LeaderRecord {
        LeaderRecord {
            holder: holder.into(),
            expires_at_unix_ms: exp,
        }
    }

    #[test]
    fn the_lease_is_taken_when_free_or_expired_and_renewed_by_its_holder() {
        assert_eq!(lease_step("a", None, 100), LeaseStep::Acquire(0));
        assert_eq!(
            lease_step("a", Some((&rec("a", 50), 7)), 100),
            LeaseStep::Renew(7)
        );
        assert_eq!(
            lease_step("a", Some((&rec("b", 200), 7)), 100),
            LeaseStep::Follow
        );
        assert_eq!(
            lease_step("a", Some((&rec("b", 100), 7)), 100),
            LeaseStep::Acquire(7)
        );
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_a_deposed_leader_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let lease = Duration::from_secs(10);
        let (a, b) = (
            Elector::new(store.clone(), "a".into(), lease),
            Elector::new(store.clone(), "b".into(), lease),
        );
        let t0 = 1_000_000;
        let fa = a.round(t0).await.unwrap().expect("a takes the free lease");
        assert_eq!(
            b.round(t0 + 1000).await.unwrap(),
            None,
            "b follows a live lease"
        );
        // a pauses past its lease; b takes over.
        let fb = b
            .round(t0 + 10_001)
            .await
            .unwrap()
            .expect("b takes the expired lease");
        assert_ne!(fa, fb);
        // A token that expired long ago: a's fenced cleanup must not touch it; b's does.
        let tok = JoinTokenRecord {
            id: "tok_1".into(),
            expires_at_unix: 1,
            secret_hash: vec![1; 32],
            ..Default::default()
        };
        store
            .txn(Txn::new().then(Op::put(keys::token("t", "tok_1"), tok.encode_to_vec())))
            .await
            .unwrap();
        let cfg = BackgroundConfig {
            expired_token_retention: Duration::ZERO,
            ..Default::default()
        };
        let ra = run_jobs(store.as_ref(), fa, t0 + 20_000, &cfg)
            .await
            .unwrap();
        assert_eq!(
            ra.tokens_deleted, 0,
            "the deposed leader's write was fenced off"
        );
        assert!(
            store
                .get(keys::token("t", "tok_1").as_bytes())
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            a.round(t0 + 11_000).await.unwrap(),
            None,
            "a learns it lost the lease"
        );
        let fb = b.round(t0 + 11_000).await.unwrap().unwrap();
        let rb = run_jobs(store.as_ref(), fb, t0 + 20_000, &cfg)
            .await
            .unwrap();
        assert_eq!(rb.tokens_deleted, 1);
        assert!(
            store
                .get(keys::token("t", "tok_1").as_bytes())
                .await
                .unwrap()
                .is_none()
        );
    }

    /// The real store, except that reading the peer list first lets an enrollment commit
    /// (peer and credential together) and then answers with the list from before it: the
    /// interleaving that made the cleanup delete a fresh agent's credential.
    struct EnrollDuringPeerRead {
        inner: EmbeddedStore,
        done: std::sync::atomic::AtomicBool,
    }

    impl Store for EnrollDuringPeerRead {
        fn get<'a>(
            &'a self,
            key: &'a [u8],
        ) -> BoxFuture<'a, Result<Option<crate::store::KeyValue>, StoreError>> {
            self.inner.get(key)
        }
        fn range<'a>(
            &'a self,
            prefix: &'a [u8],
        ) -> BoxFuture<'a, Result<crate::store::RangeResult, StoreError>> {
            Box::pin(async move {
                let before = self.inner.range(prefix).await?;
                if prefix == keys::ALL_PEERS.as_bytes()
                    && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    let idx = IndexRecord {
                        id: "net_1/peer_new".into(),
                        ..Default::default()
                    }
                    .encode_to_vec();
                    self.inner
                        .txn(
                            Txn::new()
                                .then(Op::put(keys::peer("net_1", "peer_new"), vec![]))
                                .then(Op::put(keys::credential(&[3; 32]), idx)),
                        )
                        .await?;
                }
                Ok(before)
            })
        }
        fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<crate::store::TxnResult, StoreError>> {
            self.inner.txn(txn)
        }
        fn watch<'a>(
            &'a self,
            prefix: &'a [u8],
            start: Revision,
        ) -> BoxFuture<'a, Result<crate::store::WatchStream, StoreError>> {
            self.inner.watch(prefix, start)
        }
        fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.compact(revision)
        }
    }

    #[tokio::test]
    async fn a_peer_that_enrolls_while_the_cleanup_runs_keeps_its_credential() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EnrollDuringPeerRead {
            inner: EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
            done: false.into(),
        });
        let e = Elector::new(store.clone(), "a".into(), Duration::from_secs(10));
        let f = e.round(now_ms()).await.unwrap().unwrap();
        let r = run_jobs(store.as_ref(), f, now_ms(), &BackgroundConfig::default())
            .await
            .unwrap();
        assert_eq!(r.credentials_deleted, 0);
        assert!(
            store
                .get(keys::credential(&[3; 32]).as_bytes())
                .await
                .unwrap()
                .is_some(),
            "the new peer's credential survived the cleanup"
        );
    }

    #[tokio::test]
    async fn credentials_pointing_at_no_peer_are_cleaned_up_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let idx = |id: &str| {
            IndexRecord {
                id: id.into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        // Removed peers' entries: one a minute old (kept, its agent is told), one past the
        // 30-day retention (deleted).
        let removed = |at: i64| {
            IndexRecord {
                id: "net_1/peer_removed".into(),
                removed_at_unix: at,
            }
            .encode_to_vec()
        };
        store
            .txn(
                Txn::new()
                    .then(Op::put(keys::peer("net_1", "peer_live"), vec![]))
                    .then(Op::put(keys::credential(&[1; 32]), idx("net_1/peer_live")))
                    .then(Op::put(keys::credential(&[2; 32]), idx("net_1/peer_gone")))
                    .then(Op::put(
                        keys::credential(&[4; 32]),
                        removed(now_ms() / 1000 - 60),
                    ))
                    .then(Op::put(
                        keys::credential(&[5; 32]),
                        removed(now_ms() / 1000 - 31 * 24 * 3600),
                    )),
            )
            .await
            .unwrap();
        let e = Elector::new(store.clone(), "a".into(), Duration::from_secs(10));
        let f = e.round(now_ms()).await.unwrap().unwrap();
        let r = run_jobs(store.as_ref(), f, now_ms(), &BackgroundConfig::default())
            .await
            .unwrap();
        assert_eq!(r.credentials_deleted, 2);
        let exists = |h: [u8; 32]| {
            let store = store.clone();
            async move {
                store
                    .get(keys::credential(&h).as_bytes())
                    .await
                    .unwrap()
                    .is_some()
            }
        };
        assert!(exists([4; 32]).await, "a recent removal is kept");
        assert!(!exists([5; 32]).await, "an old removal is pruned");
        assert!(
            store
                .get(keys::credential(&[1; 32]).as_bytes())
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .get(keys::credential(&[2; 32]).as_bytes())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn audit_entries_past_their_plans_retention_are_pruned_and_newer_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let now = 400 * 86_400_000i64;
        let day = 86_400_000i64;
        let free = canopy_proto::v1::TenantRecord {
            id: "t_free".into(),
            plan: "free".into(),
            ..Default::default()
        };
        let mut txn = Txn::new().then(Op::put(keys::tenant("t_free"), free.encode_to_vec()));
        // (tenant, age in days): free keeps 30 days, self-managed (default) 365.
        for (tenant, age) in [
            ("t_free", 31),
            ("t_free", 29),
            ("default", 366),
            ("default", 300),
        ] {
            let at = now - age * day;
            txn = txn.then(Op::put(
                format!("{}audit/{tenant}/{at:020}-x", keys::ROOT),
                "e",
            ));
        }
        store.txn(txn).await.unwrap();
        let e = Elector::new(store.clone(), "a".into(), Duration::from_secs(10));
        let f = e.round(now).await.unwrap().unwrap();
        assert_eq!(prune_audit(store.as_ref(), f, now).await.unwrap(), 2);
        let left: Vec<i64> = store
            .range(format!("{}audit/", keys::ROOT).as_bytes())
            .await
            .unwrap()
            .kvs
            .iter()
            .map(|kv| {
                let k = String::from_utf8(kv.key.clone()).unwrap();
                let at: i64 = k.rsplit('/').next().unwrap()[..20].parse().unwrap();
                (now - at) / day
            })
            .collect();
        assert_eq!(
            left,
            vec![300, 29],
            "default's 300-day entry, free's 29-day one"
        );
        // Nothing left to prune: no write at all.
        let before = store.range(b"/").await.unwrap().revision;
        assert_eq!(prune_audit(store.as_ref(), f, now).await.unwrap(), 0);
        assert_eq!(store.range(b"/").await.unwrap().revision, before);
    }
}
