//! The network lock against a compromised controller: an operator with write access to the
//! store (embedded and etcd) adds a peer, routes everything through a member, replays a revoked
//! peer's signature and replaces the tenant's key set; real agents (the agent's control client
//! and its lock guard) apply none of it, while what the tenant signs applies within a second.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use canopy_controller::console::Client;
use canopy_controller::keys;
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_controller::store::{Op, Store, Txn};
use canopy_proto::join::JoinString;
use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::transport::Trust;
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::etcd::Etcd;
use prost::Message as _;

const SECOND: Duration = Duration::from_secs(1);

async fn console(r: &Running) -> Client {
    let trust = Trust::CaPem(r.ca_pem.clone().into_bytes());
    canopy_controller::console::connect(&r.url, &trust, &r.admin_token)
        .await
        .unwrap()
}

fn statement(p: &Peer) -> LockedPeer {
    LockedPeer {
        network_id: p.network_id.clone(),
        public_key: p.public_key.clone(),
        addresses: p.addresses.clone(),
        tags: p.tags.clone(),
        expires_at_unix: 0,
        peer_id: p.id.clone(),
    }
}

fn key_set(net: &str, keys: &[&SigningKey], serial: u64, revoked: Vec<Vec<u8>>) -> LockKeySet {
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
async fn sign_peers(c: &mut Client, net: &str, ids: &[&str], k: &SigningKey) {
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
        routes: vec![],
    };
    c.sign_lock(req).await.unwrap();
}

async fn set_keys(c: &mut Client, net: &str, set: &LockKeySet, k: &SigningKey) {
    let req = SetLockKeysRequest {
        network: net.into(),
        key_set: Some(lock::sign(Kind::KeySet, set, k)),
    };
    c.set_lock_keys(req).await.unwrap();
}

async fn token(c: &mut Client, net: &str) -> String {
    let req = CreateJoinTokenRequest {
        network: net.into(),
        max_uses: 0,
        ttl_seconds: 600,
        tags: vec!["web".into()],
    };
    c.create_join_token(req)
        .await
        .unwrap()
        .into_inner()
        .join_string
}

/// Writes `(key, record)`s straight into the store, as an operator with database access.
async fn tamper(store: &Arc<dyn Store>, writes: Vec<(String, Vec<u8>)>) {
    let mut txn = Txn::new();
    for (k, v) in writes {
        txn = txn.then(Op::put(k, v));
    }
    assert!(store.txn(txn).await.unwrap().succeeded);
}

/// Waits until agent `a` has refused at least `n` statements in the map it holds: the
/// tampered map reached it (so what it does not show, it refused).
async fn wait_refused(a: &TestAgent, n: u64) {
    let stats = a.client.lock_stats();
    let t = Instant::now();
    while stats.refused_now.load(Relaxed) < n {
        assert!(t.elapsed() < 5 * SECOND, "the agent never refused {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn record<M: prost::Message + Default>(store: &Arc<dyn Store>, key: &str) -> M {
    let kv = store.get(key.as_bytes()).await.unwrap().unwrap();
    M::decode(kv.value.as_slice()).unwrap()
}

#[allow(clippy::too_many_lines)]
async fn a_compromised_store_cannot_change_a_locked_network(r: &Running) {
    let store = r.controller.store.clone();
    let mut c = console(r).await;
    let net = c
        .create_network(CreateNetworkRequest {
            name: "locked".into(),
            cidrs: vec!["100.64.0.0/24".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let (k, evil) = (lock::signing_key([1; 32]), lock::signing_key([66; 32]));
    let join = token(&mut c, &net.id).await;
    let mut a = TestAgent::join(&join, "a").await.unwrap();
    let b = TestAgent::join(&join, "b").await.unwrap();
    assert!(a.wait_map(5 * SECOND, |m| m.peers.len() == 1).await);

    // The tenant locks the network: its peers signed, then its key set.
    sign_peers(&mut c, &net.id, &[&a.peer_id, &b.peer_id], &k).await;
    set_keys(&mut c, &net.id, &key_set(&net.id, &[&k], 1, vec![]), &k).await;
    assert!(
        a.wait_map(5 * SECOND, |m| m.lock.is_some() && m.peers.len() == 1)
            .await
    );
    assert_eq!(a.client.lock_stats().serial.load(Relaxed), 1);

    // A join string made now pins the key set; a newcomer waits for its signature.
    let pinned = token(&mut c, &net.id).await;
    let pin = JoinString::parse(&pinned).unwrap().lock_sha256;
    assert_eq!(
        pin,
        Some(lock::body_sha256(&lock::sign(
            Kind::KeySet,
            &key_set(&net.id, &[&k], 1, vec![]),
            &k
        )))
    );
    let newcomer = TestAgent::join(&pinned, "c").await.unwrap();
    let pending = c
        .get_peer(GetPeerRequest {
            peer_id: newcomer.peer_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.lock_state, "pending");
    assert!(
        !a.wait_map(SECOND, |m| m.peers.len() == 2).await,
        "a pending peer is in no map"
    );
    let t = Instant::now();
    sign_peers(&mut c, &net.id, &[&newcomer.peer_id], &k).await;
    assert!(
        a.wait_map(SECOND, |m| m.peers.len() == 2).await,
        "signed: in maps within 1 s"
    );
    eprintln!("signed peer reached another agent in {:?}", t.elapsed());
    assert_eq!(a.client.lock_stats().refused_now.load(Relaxed), 0);

    let mut a_rec: PeerRecord = record(&store, &keys::peer(&net.id, &a.peer_id)).await;
    // The operator adds a peer of its own (signed with its own key, so the controller passes
    // it on), routes 10.99.0.0/16 and the internet through member b, and sends a through b.
    let evil_peer = PeerRecord {
        id: "peer_evil".into(),
        tenant_id: a_rec.tenant_id.clone(),
        network_id: net.id.clone(),
        public_key: vec![99; 32],
        addresses: vec!["100.64.0.99/32".into()],
        hostname: "evil".into(),
        tags: vec!["web".into()],
        endpoints: vec!["192.0.2.99:51820".into()],
        lock: Some(lock::sign(
            Kind::Peer,
            &LockedPeer {
                network_id: net.id.clone(),
                public_key: vec![99; 32],
                addresses: vec!["100.64.0.99/32".into()],
                tags: vec!["web".into()],
                expires_at_unix: 0,
                peer_id: "peer_evil".into(),
            },
            &evil,
        )),
        ..Default::default()
    };
    let b_key = c
        .get_peer(GetPeerRequest {
            peer_id: b.peer_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key;
    let route = |id: &str, prefix: &str| RouteRecord {
        id: id.into(),
        network_id: net.id.clone(),
        peer_id: b.peer_id.clone(),
        prefix: prefix.into(),
        lock: Some(lock::sign(
            Kind::Route,
            &LockedRoute {
                network_id: net.id.clone(),
                gateway_public_key: b_key.clone(),
                prefix: prefix.into(),
            },
            &evil,
        )),
        ..Default::default()
    };
    a_rec.exit_node.clone_from(&b.peer_id);
    tamper(
        &store,
        vec![
            (keys::peer(&net.id, "peer_evil"), evil_peer.encode_to_vec()),
            (
                keys::route(&net.id, "route_site"),
                route("route_site", "10.99.0.0/16").encode_to_vec(),
            ),
            (
                keys::route(&net.id, "route_exit"),
                route("route_exit", "0.0.0.0/0").encode_to_vec(),
            ),
            (keys::peer(&net.id, &a.peer_id), a_rec.encode_to_vec()),
        ],
    )
    .await;
    // The peer and both routes reached a, and were refused.
    wait_refused(&a, 3).await;
    let m = a.map();
    assert_eq!(
        m.peers.len(),
        2,
        "no peer of the operator's: {:?}",
        a.peer_ids()
    );
    let b_now = m.peers.iter().find(|p| p.peer_id == b.peer_id).unwrap();
    assert_eq!(
        b_now.allowed_ips.len(),
        1,
        "no route through b: {:?}",
        b_now.allowed_ips
    );
    // The controller shows what the agents refused.
    let t = Instant::now();
    loop {
        let l = c
            .get_network_lock(GetNetworkLockRequest {
                network: net.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if l.refused >= 3 {
            break;
        }
        assert!(t.elapsed() < 5 * SECOND, "no refusal reported: {l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Revocation: the tenant removes c with a signed revocation; the operator then puts c's
    // record back with its old (valid) signature.
    let c_rec: PeerRecord = record(&store, &keys::peer(&net.id, &newcomer.peer_id)).await;
    let revoked = vec![c_rec.public_key.clone()];
    set_keys(&mut c, &net.id, &key_set(&net.id, &[&k], 2, revoked), &k).await;
    c.remove_peer(RemovePeerRequest {
        peer_id: newcomer.peer_id.clone(),
    })
    .await
    .unwrap();
    assert!(
        a.wait_map(SECOND, |m| m.peers.len() == 1).await,
        "removed at once"
    );
    let before = a.client.lock_stats().refused_now.load(Relaxed);
    tamper(
        &store,
        vec![(keys::peer(&net.id, &c_rec.id), c_rec.encode_to_vec())],
    )
    .await;
    wait_refused(&a, before + 1).await;
    assert_eq!(
        a.peer_ids(),
        vec![b.peer_id.clone()],
        "a revoked peer does not come back"
    );

    // The operator replaces the tenant's key set with one of its own (a first set, then one
    // that claims to follow the tenant's).
    let mut n: NetworkRecord = record(&store, &keys::network(&c_rec.tenant_id, &net.id)).await;
    let own = lock::sign(Kind::KeySet, &key_set(&net.id, &[&evil], 1, vec![]), &evil);
    n.lock = Some(LockChain {
        key_sets: vec![own],
    });
    tamper(
        &store,
        vec![(keys::network(&n.tenant_id, &n.id), n.encode_to_vec())],
    )
    .await;
    assert!(
        a.wait_map(5 * SECOND, |m| m
            .lock
            .as_ref()
            .is_some_and(|l| l.key_sets.len() == 1))
            .await
    );
    let mut chain: NetworkRecord = record(&store, &keys::network(&n.tenant_id, &n.id)).await;
    chain.lock = Some(LockChain {
        key_sets: vec![
            lock::sign(Kind::KeySet, &key_set(&net.id, &[&k], 1, vec![]), &k),
            lock::sign(Kind::KeySet, &key_set(&net.id, &[&evil], 3, vec![]), &evil),
        ],
    });
    tamper(
        &store,
        vec![(keys::network(&n.tenant_id, &n.id), chain.encode_to_vec())],
    )
    .await;
    assert!(
        a.wait_map(5 * SECOND, |m| m
            .lock
            .as_ref()
            .is_some_and(|l| l.key_sets.len() == 2))
            .await
    );
    assert_eq!(
        a.client.lock_stats().serial.load(Relaxed),
        2,
        "still the tenant's key set"
    );
    // With the evil key trusted, the operator's peer would be in; it is not.
    assert_eq!(a.peer_ids(), vec![b.peer_id.clone()]);
    a.stop().await;
    b.stop().await;
    newcomer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store_agents_refuse_what_the_tenant_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    ))
    .await
    .unwrap();
    a_compromised_store_cannot_change_a_locked_network(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_agents_refuse_what_the_tenant_did_not_sign() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.endpoint.clone()])),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    a_compromised_store_cannot_change_a_locked_network(&r).await;
}
