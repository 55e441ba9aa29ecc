//! Election (lease steps, fencing, hand-over) and the jobs, on the embedded store.

use super::*;
use crate::keys;
use crate::store::embedded::EmbeddedStore;
use canopy_proto::v1::{IndexRecord, JoinTokenRecord};
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
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
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
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
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
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
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

#[tokio::test]
async fn the_leader_sweeps_gateway_records_nobody_renews_and_keeps_renewed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let t0 = 1_000_000;
    let live = |peer: &str, renewed: i64| canopy_proto::v1::GatewayLiveRecord {
        peer_id: peer.into(),
        online_since_unix_ms: 1,
        renewed_unix_ms: renewed,
        holder: "sess_x".into(),
    };
    let put = |peer: &str, renewed: i64| {
        Txn::new().then(Op::put(
            keys::gwlive("net_1", peer),
            live(peer, renewed).encode_to_vec(),
        ))
    };
    // Its replica died 31 s ago; the other was renewed 10 s ago.
    store.txn(put("peer_dead", t0 - 31_000)).await.unwrap();
    store.txn(put("peer_live", t0 - 10_000)).await.unwrap();
    let f = Elector::new(store.clone(), "a".into(), Duration::from_secs(10))
        .round(t0)
        .await
        .unwrap()
        .unwrap();
    let r = run_jobs(store.as_ref(), f, t0, &BackgroundConfig::default())
        .await
        .unwrap();
    assert_eq!(r.stale_gateways, 1);
    let left = store.range(keys::ALL_GWLIVE.as_bytes()).await.unwrap();
    let ids: Vec<Option<(&str, &str)>> = left
        .kvs
        .iter()
        .map(|kv| keys::parse_gwlive(&kv.key))
        .collect();
    assert_eq!(ids, [Some(("net_1", "peer_live"))]);
}

#[tokio::test]
async fn expired_web_sessions_are_swept_and_current_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let now = now_ms();
    let session = |expires: i64| {
        canopy_proto::v1::WebSessionRecord {
            expires_at_unix: expires,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let (old, current) = (keys::websession(&[1; 32]), keys::websession(&[2; 32]));
    let put = Txn::new()
        .then(Op::put(old.clone(), session(now / 1000 - 1)))
        .then(Op::put(current.clone(), session(now / 1000 + 3600)));
    store.txn(put).await.unwrap();
    let e = Elector::new(store.clone(), "a".into(), Duration::from_secs(10));
    let f = e.round(now).await.unwrap().unwrap();
    let r = run_jobs(store.as_ref(), f, now, &BackgroundConfig::default())
        .await
        .unwrap();
    assert_eq!(r.web_sessions_deleted, 1);
    assert!(store.get(old.as_bytes()).await.unwrap().is_none());
    assert!(store.get(current.as_bytes()).await.unwrap().is_some());
}
