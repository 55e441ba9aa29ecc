//! The store contract as executable checks. Every backend runs all of them through
//! [`store_conformance_tests!`](crate::store_conformance_tests), each as its own test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use super::{Compare, EventKind, Op, Store, StoreError, Txn, WatchStream};

async fn next(w: &mut WatchStream) -> super::WatchBatch {
    tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .expect("watch delivered nothing within 5 s")
        .expect("watch closed")
        .expect("watch error")
}

pub async fn put_get_and_revisions(s: Arc<dyn Store>) {
    assert_eq!(s.get(b"/t/a").await.unwrap(), None);
    let r1 = s.txn(Txn::new().then(Op::put("/t/a", "1"))).await.unwrap();
    let r2 = s.txn(Txn::new().then(Op::put("/t/a", "2"))).await.unwrap();
    assert!(r1.succeeded && r2.succeeded);
    assert_eq!(
        r2.revision,
        r1.revision + 1,
        "each write bumps the revision by one"
    );
    let kv = s.get(b"/t/a").await.unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.create_revision, r1.revision);
    assert_eq!(kv.mod_revision, r2.revision);
    assert_eq!(kv.version, 2);
}

pub async fn range_returns_exactly_the_prefix_in_key_order(s: Arc<dyn Store>) {
    for k in ["/p/b", "/p/a", "/pz", "/o", "/p/c/d"] {
        s.txn(Txn::new().then(Op::put(k, k))).await.unwrap();
    }
    let r = s.range(b"/p/").await.unwrap();
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c/d"]);
    assert!(r.revision >= 5);
}

pub async fn compare_absent_is_create_if_absent(s: Arc<dyn Store>) {
    let t = || {
        Txn::new()
            .when(Compare::absent("/ipam/1"))
            .then(Op::put("/ipam/1", "x"))
    };
    assert!(s.txn(t()).await.unwrap().succeeded);
    let before = s.range(b"/").await.unwrap();
    let again = s.txn(t()).await.unwrap();
    assert!(!again.succeeded, "second create-if-absent must fail");
    assert_eq!(
        again.revision, before.revision,
        "a failed txn writes nothing"
    );
}

pub async fn compare_mod_revision_guards_read_modify_write(s: Arc<dyn Store>) {
    let r = s.txn(Txn::new().then(Op::put("/c", "0"))).await.unwrap();
    let ok = Txn::new()
        .when(Compare::unchanged("/c", r.revision))
        .then(Op::put("/c", "1"));
    assert!(s.txn(ok.clone()).await.unwrap().succeeded);
    assert!(
        !s.txn(ok).await.unwrap().succeeded,
        "stale revision must fail"
    );
    assert_eq!(s.get(b"/c").await.unwrap().unwrap().value, b"1");
}

pub async fn failed_compare_applies_no_op_of_the_txn(s: Arc<dyn Store>) {
    s.txn(Txn::new().then(Op::put("/x", "1"))).await.unwrap();
    let t = Txn::new()
        .when(Compare::absent("/new"))
        .when(Compare::absent("/x"))
        .then(Op::put("/new", "1"))
        .then(Op::delete("/x"));
    assert!(!s.txn(t).await.unwrap().succeeded);
    assert_eq!(s.get(b"/new").await.unwrap(), None);
    assert!(s.get(b"/x").await.unwrap().is_some());
}

pub async fn concurrent_create_if_absent_has_exactly_one_winner(s: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let t = Txn::new()
                .when(Compare::absent("/race"))
                .then(Op::put("/race", format!("{i}")));
            s.txn(t).await.unwrap().succeeded
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

pub async fn delete_prefix_removes_all_and_only_the_prefix(s: Arc<dyn Store>) {
    for k in ["/n/1/a", "/n/1/b", "/n/10", "/n/2/a"] {
        s.txn(Txn::new().then(Op::put(k, "v"))).await.unwrap();
    }
    let r = s
        .txn(Txn::new().then(Op::delete_prefix("/n/1/")))
        .await
        .unwrap();
    assert!(r.succeeded);
    let left: Vec<_> = s
        .range(b"/n/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, [b"/n/10".to_vec(), b"/n/2/a".to_vec()]);
}

pub async fn watch_streams_changes_in_revision_order(s: Arc<dyn Store>) {
    let mut w = s.watch(b"/w/", 0).await.unwrap();
    let r1 = s.txn(Txn::new().then(Op::put("/w/a", "1"))).await.unwrap();
    s.txn(Txn::new().then(Op::put("/other", "x")))
        .await
        .unwrap();
    let r3 = s.txn(Txn::new().then(Op::delete("/w/a"))).await.unwrap();
    let b1 = next(&mut w).await;
    assert_eq!(
        (b1.revision, b1.events[0].kind),
        (r1.revision, EventKind::Put)
    );
    assert_eq!(b1.events[0].kv.value, b"1");
    let b2 = next(&mut w).await;
    assert_eq!(
        b2.revision, r3.revision,
        "changes outside the prefix are not delivered"
    );
    assert_eq!(b2.events[0].kind, EventKind::Delete);
    assert_eq!(b2.events[0].kv.key, b"/w/a");
}

pub async fn watch_from_past_revision_replays_history(s: Arc<dyn Store>) {
    let r1 = s.txn(Txn::new().then(Op::put("/h/a", "1"))).await.unwrap();
    let r2 = s.txn(Txn::new().then(Op::put("/h/b", "2"))).await.unwrap();
    let mut w = s.watch(b"/h/", r1.revision).await.unwrap();
    assert_eq!(next(&mut w).await.revision, r1.revision);
    assert_eq!(next(&mut w).await.revision, r2.revision);
    let r3 = s.txn(Txn::new().then(Op::put("/h/c", "3"))).await.unwrap();
    assert_eq!(
        next(&mut w).await.revision,
        r3.revision,
        "then it follows live changes"
    );
}

pub async fn one_txn_is_one_watch_batch(s: Arc<dyn Store>) {
    let mut w = s.watch(b"/b/", 0).await.unwrap();
    let r = s
        .txn(
            Txn::new()
                .then(Op::put("/b/1", "a"))
                .then(Op::put("/b/2", "b")),
        )
        .await
        .unwrap();
    let b = next(&mut w).await;
    assert_eq!(b.revision, r.revision);
    assert_eq!(b.events.len(), 2);
}

pub async fn watch_from_compacted_revision_is_an_error(s: Arc<dyn Store>) {
    let r1 = s.txn(Txn::new().then(Op::put("/k/a", "1"))).await.unwrap();
    let r2 = s.txn(Txn::new().then(Op::put("/k/a", "2"))).await.unwrap();
    s.compact(r2.revision).await.unwrap();
    match s.watch(b"/k/", r1.revision).await {
        Err(StoreError::Compacted { .. }) => {}
        Ok(mut w) => match w.recv().await {
            Some(Err(StoreError::Compacted { .. })) => {}
            other => panic!("expected Compacted, got {other:?}"),
        },
        Err(e) => panic!("expected Compacted, got {e}"),
    }
    // Re-list, then watch from the listed revision + 1: nothing is missed.
    let listed = s.range(b"/k/").await.unwrap();
    let mut w = s.watch(b"/k/", listed.revision + 1).await.unwrap();
    let r3 = s.txn(Txn::new().then(Op::put("/k/a", "3"))).await.unwrap();
    assert_eq!(next(&mut w).await.revision, r3.revision);
}

/// A range of more keys than one etcd page (and of values past a few MB in all) comes back
/// whole, in key order, at one revision.
pub async fn a_large_range_comes_back_whole_in_key_order(s: Arc<dyn Store>) {
    let value = vec![b'v'; 2048];
    let mut last = 0;
    for batch in 0..25 {
        let mut txn = Txn::new();
        for i in 0..100 {
            txn = txn.then(Op::put(
                format!("/big/{:05}", batch * 100 + i),
                value.clone(),
            ));
        }
        last = s.txn(txn).await.unwrap().revision;
    }
    s.txn(Txn::new().then(Op::put("/bigger", "not in the range")))
        .await
        .unwrap();
    let r = s.range(b"/big/").await.unwrap();
    assert_eq!(r.kvs.len(), 2500);
    assert!(r.kvs.windows(2).all(|w| w[0].key < w[1].key), "key order");
    assert!(r.revision > last);
}

/// Several prefixes read at one revision, and nothing outside them.
pub async fn range_many_reads_only_its_prefixes_at_one_revision(s: Arc<dyn Store>) {
    for k in ["/m/a/1", "/m/b/1", "/m/b/2", "/m/c/1", "/m/a/2"] {
        s.txn(Txn::new().then(Op::put(k, k))).await.unwrap();
    }
    let r = s
        .range_many(&[b"/m/b/".to_vec(), b"/m/a/".to_vec()])
        .await
        .unwrap();
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, ["/m/b/1", "/m/b/2", "/m/a/1", "/m/a/2"]);
    let head = s.txn(Txn::new().then(Op::put("/m/z", "z"))).await.unwrap();
    assert_eq!(r.revision, head.revision - 1, "the revision it read at");
}

/// A ranged delete removes exactly the keys from its start up to (not including) its end.
pub async fn delete_range_removes_from_start_up_to_end(s: Arc<dyn Store>) {
    for k in ["/r/a", "/r/b", "/r/c", "/r/d", "/r0"] {
        s.txn(Txn::new().then(Op::put(k, k))).await.unwrap();
    }
    let r = s
        .txn(Txn::new().then(Op::delete_range("/r/b", "/r/d")))
        .await
        .unwrap();
    assert!(r.succeeded);
    let left: Vec<_> = s
        .range(b"/r")
        .await
        .unwrap()
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(left, ["/r/a", "/r/d", "/r0"]);
    assert_eq!(s.first_key(b"/r/").await.unwrap(), Some(b"/r/a".to_vec()));
    assert_eq!(s.first_key(b"/nothing/").await.unwrap(), None);
}

/// Generates one `#[tokio::test]` per conformance check for a backend.
/// `$make` is an async closure from a fresh temp dir to `(Arc<dyn Store>, guard)`; the guard
/// (e.g. a store process) lives until the test ends.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@each $make;
            put_get_and_revisions,
            range_returns_exactly_the_prefix_in_key_order,
            compare_absent_is_create_if_absent,
            compare_mod_revision_guards_read_modify_write,
            failed_compare_applies_no_op_of_the_txn,
            concurrent_create_if_absent_has_exactly_one_winner,
            delete_prefix_removes_all_and_only_the_prefix,
            watch_streams_changes_in_revision_order,
            watch_from_past_revision_replays_history,
            one_txn_is_one_watch_batch,
            watch_from_compacted_revision_is_an_error,
            a_large_range_comes_back_whole_in_key_order,
            range_many_reads_only_its_prefixes_at_one_revision,
            delete_range_removes_from_start_up_to_end,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let make = $make;
                    let (store, _guard) = make(dir.path().to_path_buf()).await;
                    let store: std::sync::Arc<dyn $crate::store::Store> = store;
                    $crate::store::conformance::$name(store).await;
                }
            )*
        }
    };
}
