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
use canopy_controller::server::Running;
use canopy_controller::store::Store;
use canopy_proto::join::JoinString;
use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::etcd::Etcd;
use canopy_tests::lock::*;
use prost::Message as _;

/// A locked network: the tenant's console and key, its network, two signed agents and a
/// third one signed after it waited.
struct Locked {
    store: Arc<dyn Store>,
    c: Client,
    net: String,
    k: SigningKey,
    a: TestAgent,
    b: TestAgent,
    newcomer: TestAgent,
}

/// Two agents join, the tenant locks the network; a third, with a join string made then, is
/// in no map until signed, and in a's within a second of its signature.
async fn lock_a_network(r: &Running) -> Locked {
    let mut c = console(r).await;
    let net = c
        .create_network(CreateNetworkRequest {
            name: "locked".into(),
            cidrs: vec!["100.64.0.0/24".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let k = lock::signing_key([1; 32]);
    let join = token(&mut c, &net).await;
    let mut a = TestAgent::join(&join, "a").await.unwrap();
    let b = TestAgent::join(&join, "b").await.unwrap();
    assert!(a.wait_map(5 * SECOND, |m| m.peers.len() == 1).await);
    // The peers signed first, then the key set.
    sign_peers(&mut c, &net, &[&a.peer_id, &b.peer_id], &k).await;
    set_keys(&mut c, &net, &key_set(&net, &[&k], 1, vec![]), &k).await;
    assert!(
        a.wait_map(5 * SECOND, |m| m.lock.is_some() && m.peers.len() == 1)
            .await
    );
    assert_eq!(a.client.lock_stats().serial.load(Relaxed), 1);
    let pinned = token(&mut c, &net).await;
    let first = lock::sign(Kind::KeySet, &key_set(&net, &[&k], 1, vec![]), &k);
    let pin = JoinString::parse(&pinned).unwrap().lock_sha256;
    assert_eq!(
        pin,
        Some(lock::body_sha256(&first)),
        "the join string pins it"
    );
    let newcomer = TestAgent::join(&pinned, "c").await.unwrap();
    let req = GetPeerRequest {
        peer_id: newcomer.peer_id.clone(),
    };
    let pending = c.get_peer(req).await.unwrap().into_inner();
    assert_eq!(pending.lock_state, "pending");
    let shown = a.wait_map(SECOND, |m| m.peers.len() == 2).await;
    assert!(!shown, "a pending peer is in no map");
    let t = Instant::now();
    sign_peers(&mut c, &net, &[&newcomer.peer_id], &k).await;
    let shown = a.wait_map(SECOND, |m| m.peers.len() == 2).await;
    assert!(shown, "signed: in maps within 1 s");
    eprintln!("a signed peer reached another agent in {:?}", t.elapsed());
    assert_eq!(a.client.lock_stats().refused_now.load(Relaxed), 0);
    Locked {
        store: r.controller.store.clone(),
        c,
        net,
        k,
        a,
        b,
        newcomer,
    }
}

/// A record signed with `evil`'s key: the operator's own peer.
fn operator_peer(l: &Locked, tenant: &str, evil: &SigningKey) -> PeerRecord {
    let member = LockedPeer {
        network_id: l.net.clone(),
        public_key: vec![99; 32],
        addresses: vec!["100.64.0.99/32".into()],
        tags: vec!["web".into()],
        expires_at_unix: 0,
        peer_id: "peer_evil".into(),
    };
    PeerRecord {
        id: "peer_evil".into(),
        tenant_id: tenant.into(),
        network_id: l.net.clone(),
        public_key: member.public_key.clone(),
        addresses: member.addresses.clone(),
        hostname: "evil".into(),
        tags: member.tags.clone(),
        endpoints: vec!["192.0.2.99:51820".into()],
        lock: Some(lock::sign(Kind::Peer, &member, evil)),
        ..Default::default()
    }
}

/// A route of `prefix` through b, signed with `evil`'s key.
fn operator_route(l: &Locked, b_key: &[u8], id: &str, prefix: &str, evil: &SigningKey) -> Vec<u8> {
    let signed = LockedRoute {
        network_id: l.net.clone(),
        gateway_public_key: b_key.to_vec(),
        prefix: prefix.into(),
    };
    RouteRecord {
        id: id.into(),
        network_id: l.net.clone(),
        peer_id: l.b.peer_id.clone(),
        prefix: prefix.into(),
        lock: Some(lock::sign(Kind::Route, &signed, evil)),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The operator adds a peer of its own (signed with its own key, so the controller passes it
/// on), routes 10.99.0.0/16 and the internet through member b, and sends a through b: a takes
/// none of it, and the controller shows what agents refused.
async fn operator_adds_a_peer_and_routes(l: &mut Locked) {
    let evil = lock::signing_key([66; 32]);
    let mut a_rec: PeerRecord = record(&l.store, &keys::peer(&l.net, &l.a.peer_id)).await;
    let b_rec: PeerRecord = record(&l.store, &keys::peer(&l.net, &l.b.peer_id)).await;
    a_rec.exit_node.clone_from(&l.b.peer_id);
    let peer = operator_peer(l, &a_rec.tenant_id, &evil);
    let writes = vec![
        (keys::peer(&l.net, "peer_evil"), peer.encode_to_vec()),
        (
            keys::route(&l.net, "route_site"),
            operator_route(l, &b_rec.public_key, "route_site", "10.99.0.0/16", &evil),
        ),
        (
            keys::route(&l.net, "route_exit"),
            operator_route(l, &b_rec.public_key, "route_exit", "0.0.0.0/0", &evil),
        ),
        (keys::peer(&l.net, &l.a.peer_id), a_rec.encode_to_vec()),
    ];
    tamper(&l.store, writes).await;
    // The peer and both routes reached a, and were refused.
    wait_refused(&l.a, 3).await;
    let m = l.a.map();
    assert_eq!(
        m.peers.len(),
        2,
        "no peer of the operator's: {:?}",
        l.a.peer_ids()
    );
    let b_now = m.peers.iter().find(|p| p.peer_id == l.b.peer_id).unwrap();
    assert_eq!(b_now.allowed_ips, b_rec.addresses, "no route through b");
    let t = Instant::now();
    loop {
        let req = GetNetworkLockRequest {
            network: l.net.clone(),
        };
        let lock = l.c.get_network_lock(req).await.unwrap().into_inner();
        if lock.refused >= 3 {
            break;
        }
        assert!(t.elapsed() < 5 * SECOND, "no refusal reported: {lock:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tenant removes c with a signed revocation; the operator puts c's record back with its
/// old (valid) signature: a does not take it.
async fn a_revoked_peer_does_not_come_back(l: &mut Locked) -> PeerRecord {
    let c_rec: PeerRecord = record(&l.store, &keys::peer(&l.net, &l.newcomer.peer_id)).await;
    let revoked = vec![c_rec.public_key.clone()];
    set_keys(
        &mut l.c,
        &l.net,
        &key_set(&l.net, &[&l.k], 2, revoked),
        &l.k,
    )
    .await;
    let req = RemovePeerRequest {
        peer_id: l.newcomer.peer_id.clone(),
    };
    l.c.remove_peer(req).await.unwrap();
    assert!(
        l.a.wait_map(SECOND, |m| m.peers.len() == 1).await,
        "removed at once"
    );
    // Refused now: the operator's peer and routes (c, revoked, then removed, is not counted).
    let stats = l.a.client.lock_stats();
    let t = Instant::now();
    while stats.refused_now.load(Relaxed) != 3 {
        assert!(t.elapsed() < 5 * SECOND, "c's removal never reached a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = 3;
    let replay = (keys::peer(&l.net, &c_rec.id), c_rec.encode_to_vec());
    tamper(&l.store, vec![replay]).await;
    wait_refused(&l.a, before + 1).await;
    assert_eq!(l.a.peer_ids(), vec![l.b.peer_id.clone()]);
    c_rec
}

/// The operator replaces the tenant's key set with one of its own (a first set, then one that
/// claims to follow the tenant's): a keeps trusting the tenant's, and the operator's peer
/// (which its key signed) stays out.
async fn operator_replaces_the_keys(l: &mut Locked, tenant: &str) {
    let evil = lock::signing_key([66; 32]);
    let key = keys::network(tenant, &l.net);
    let mut n: NetworkRecord = record(&l.store, &key).await;
    let own = lock::sign(Kind::KeySet, &key_set(&l.net, &[&evil], 1, vec![]), &evil);
    n.lock = Some(LockChain {
        key_sets: vec![own],
    });
    tamper(&l.store, vec![(key.clone(), n.encode_to_vec())]).await;
    let chain_of =
        |len: usize| move |m: &NetworkMap| m.lock.as_ref().is_some_and(|l| l.key_sets.len() == len);
    assert!(l.a.wait_map(5 * SECOND, chain_of(1)).await);
    n.lock = Some(LockChain {
        key_sets: vec![
            lock::sign(Kind::KeySet, &key_set(&l.net, &[&l.k], 1, vec![]), &l.k),
            lock::sign(Kind::KeySet, &key_set(&l.net, &[&evil], 3, vec![]), &evil),
        ],
    });
    tamper(&l.store, vec![(key, n.encode_to_vec())]).await;
    assert!(l.a.wait_map(5 * SECOND, chain_of(2)).await);
    let serial = l.a.client.lock_stats().serial.load(Relaxed);
    assert_eq!(serial, 2, "still the tenant's key set");
    assert_eq!(l.a.peer_ids(), vec![l.b.peer_id.clone()]);
}

async fn a_compromised_store_cannot_change_a_locked_network(r: &Running) {
    let mut l = lock_a_network(r).await;
    operator_adds_a_peer_and_routes(&mut l).await;
    let c_rec = a_revoked_peer_does_not_come_back(&mut l).await;
    operator_replaces_the_keys(&mut l, &c_rec.tenant_id).await;
    for agent in [l.a, l.b, l.newcomer] {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store_agents_refuse_what_the_tenant_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let r = controller_on(dir.path(), None).await;
    a_compromised_store_cannot_change_a_locked_network(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_agents_refuse_what_the_tenant_did_not_sign() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = controller_on(dir.path(), Some(&etcd)).await;
    a_compromised_store_cannot_change_a_locked_network(&r).await;
}

/// An agent that presents a membership signed by a delegation the tenant never made, or one
/// beyond the tenant's delegation (a tag it does not grant), stays pending: in nobody's map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_presigned_membership_leaves_the_peer_pending() {
    use canopy_agent::control::{self, ControlClient, NoDataPlane};
    use canopy_agent::lock::encode_signed;
    let dir = tempfile::tempdir().unwrap();
    let r = controller_on(dir.path(), None).await;
    let mut l = lock_a_network(&r).await;
    let (evil, d) = (lock::signing_key([66; 32]), lock::signing_key([5; 32]));
    let join = JoinString::parse(&tagged_token(&mut l.c, &l.net, "ci").await).unwrap();
    let cases = [("the operator", &evil, "ci"), ("the tenant", &l.k, "web")];
    for (who, signer, granted) in cases {
        let claimed = "ci";
        let (mut e, map) = control::enroll(&join, [77; 32], "forger").await.unwrap();
        let delegation = LockDelegation {
            network_id: l.net.clone(),
            key: d.verifying_key().to_bytes().to_vec(),
            tags: vec![granted.into()],
            max_uses: 1,
            expires_at_unix: i64::MAX,
        };
        let me = LockedPeer {
            network_id: l.net.clone(),
            public_key: vec![77; 32],
            addresses: map.addresses.clone(),
            tags: vec![claimed.into()],
            expires_at_unix: i64::MAX - 1,
            peer_id: e.peer_id.clone(),
        };
        e.lock_self = Some(encode_signed(&lock::sign(Kind::Peer, &me, &d)));
        let del = lock::sign(Kind::Delegation, &delegation, signer);
        e.lock_delegation = Some(encode_signed(&del));
        let client = ControlClient::new(e.clone(), Some(map), None);
        let mut maps = client.maps();
        let run = tokio::spawn(async move {
            let stop = tokio::time::sleep(SECOND);
            client.run(&mut NoDataPlane, stop).await
        });
        // Its session opened (its Hello was read) and it got a map.
        tokio::time::timeout(SECOND, maps.changed()).await.ok();
        let req = GetPeerRequest {
            peer_id: e.peer_id.clone(),
        };
        let p = l.c.get_peer(req).await.unwrap().into_inner();
        assert_eq!(p.lock_state, "pending", "{who} granting {granted}");
        assert!(!l.a.peer_ids().contains(&e.peer_id));
        run.await.unwrap().unwrap();
        let req = RemovePeerRequest {
            peer_id: e.peer_id.clone(),
        };
        l.c.remove_peer(req).await.unwrap();
    }
}
