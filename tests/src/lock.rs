//! The network lock in tests: what the tenant's console does (sign, set keys) with
//! `canopy_proto::lock`, what a compromised operator does (write records straight into the
//! store), and controllers on each store.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use canopy_controller::console::Client;
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_controller::store::{Op, Store, Txn};
use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::transport::Trust;
use canopy_proto::v1::*;

use crate::TestAgent;
use crate::etcd::Etcd;

pub const SECOND: Duration = Duration::from_secs(1);

pub async fn console(r: &Running) -> Client {
    let trust = Trust::CaPem(r.ca_pem.clone().into_bytes());
    canopy_controller::console::connect(&r.url, &trust, &r.admin_token)
        .await
        .unwrap()
}

pub fn statement(p: &Peer) -> LockedPeer {
    LockedPeer {
        network_id: p.network_id.clone(),
        public_key: p.public_key.clone(),
        addresses: p.addresses.clone(),
        tags: p.tags.clone(),
        expires_at_unix: 0,
        peer_id: p.id.clone(),
    }
}

pub fn key_set(net: &str, keys: &[&SigningKey], serial: u64, revoked: Vec<Vec<u8>>) -> LockKeySet {
    LockKeySet {
        network_id: net.into(),
        keys: keys
            .iter()
            .map(|k| k.verifying_key().to_bytes().to_vec())
            .collect(),
        serial,
        revoked,
    }
}

/// What the tenant's console does: sign peers `ids` as they are now.
pub async fn sign_peers(c: &mut Client, net: &str, ids: &[&str], k: &SigningKey) {
    let mut peers = Vec::new();
    for id in ids {
        let p = c
            .get_peer(GetPeerRequest {
                peer_id: (*id).into(),
            })
            .await
            .unwrap()
            .into_inner();
        peers.push(PeerSignature {
            peer_id: p.id.clone(),
            signed: Some(lock::sign(Kind::Peer, &statement(&p), k)),
        });
    }
    let req = SignLockRequest {
        network: net.into(),
        peers,
        ..Default::default()
    };
    c.sign_lock(req).await.unwrap();
}

pub async fn set_keys(c: &mut Client, net: &str, set: &LockKeySet, k: &SigningKey) {
    let req = SetLockKeysRequest {
        network: net.into(),
        key_set: Some(lock::sign(Kind::KeySet, set, k)),
    };
    c.set_lock_keys(req).await.unwrap();
}

pub async fn token(c: &mut Client, net: &str) -> String {
    tagged_token(c, net, "web").await
}

pub async fn tagged_token(c: &mut Client, net: &str, tag: &str) -> String {
    let req = CreateJoinTokenRequest {
        network: net.into(),
        max_uses: 0,
        ttl_seconds: 600,
        tags: vec![tag.into()],
    };
    c.create_join_token(req)
        .await
        .unwrap()
        .into_inner()
        .join_string
}

/// Writes `(key, record)`s straight into the store, as an operator with database access.
/// Returns the store revision it made.
pub async fn tamper(store: &Arc<dyn Store>, writes: Vec<(String, Vec<u8>)>) -> i64 {
    let mut txn = Txn::new();
    for (k, v) in writes {
        txn = txn.then(Op::put(k, v));
    }
    let r = store.txn(txn).await.unwrap();
    assert!(r.succeeded);
    r.revision
}

/// Waits until agent `a` has refused at least `n` statements in the map it holds: the
/// tampered map reached it (so what it does not show, it refused).
pub async fn wait_refused(a: &TestAgent, n: u64) {
    let stats = a.client.lock_stats();
    let t = Instant::now();
    while stats.refused_now.load(Relaxed) < n {
        assert!(t.elapsed() < 5 * SECOND, "the agent never refused {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn record<M: prost::Message + Default>(store: &Arc<dyn Store>, key: &str) -> M {
    let kv = store.get(key.as_bytes()).await.unwrap().unwrap();
    M::decode(kv.value.as_slice()).unwrap()
}

/// A controller on the embedded store, or (`Some`) on that etcd.
pub async fn controller_on(dir: &std::path::Path, etcd: Option<&Etcd>) -> Running {
    let store = etcd.map(|e| StoreSpec::Etcd(vec![e.endpoint.clone()]));
    server::spawn(&ServeConfig {
        store,
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf())
    })
    .await
    .unwrap()
}
