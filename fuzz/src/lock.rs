//! The network lock as an agent meets it: a map from a controller it does not trust (chain,
//! signed peers and routes, a signed policy) through the agent's lock guard. Whatever comes in,
//! nothing panics and every peer kept verifies against the key set the guard trusts.

use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::v1::*;
use prost::Message as _;

const NET: &str = "net_fuzz";

pub(crate) fn lock(data: &[u8]) {
    let Ok(mut map) = NetworkMap::decode(data) else {
        return;
    };
    map.network_id = NET.into();
    let mut g = canopy_agent::lock::Guard::new(NET, None, None);
    g.full(&mut map.clone(), 0);
    let mut kept = map.clone();
    g.full(&mut kept, 0);
    if let Some(set) = g.trusted() {
        for p in &kept.peers {
            let s = p.lock.as_ref().expect("a kept peer is signed");
            let m: LockedPeer = lock::verify(Kind::Peer, s, &set.keys).expect("and verifies");
            assert_eq!(m.public_key, p.public_key, "for its own key");
        }
    }
    let mut d = NetworkDelta {
        revision: map.revision + 1,
        base_revision: map.revision,
        upserted: map.peers.clone(),
        ..Default::default()
    };
    g.delta(&mut d, 0);
}

fn key() -> SigningKey {
    lock::signing_key([1; 32])
}

fn set() -> LockKeySet {
    LockKeySet {
        network_id: NET.into(),
        keys: vec![key().verifying_key().to_bytes().to_vec()],
        serial: 1,
        revoked: vec![],
    }
}

pub(crate) fn lock_seeds() -> Vec<Vec<u8>> {
    let k = key();
    let member = |id: &str, n: u8| LockedPeer {
        network_id: NET.into(),
        public_key: vec![n; 32],
        addresses: vec![format!("100.64.0.{n}/32")],
        tags: vec!["web".into()],
        expires_at_unix: 0,
        peer_id: id.into(),
    };
    let route = LockedRoute {
        network_id: NET.into(),
        gateway_public_key: vec![3; 32],
        prefix: "10.1.0.0/16".into(),
    };
    let text = "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"22\"]\n";
    let policy = LockedPolicy {
        network_id: NET.into(),
        text_sha256: canopy_proto::sha256(text.as_bytes()).to_vec(),
        serial: 1,
    };
    let remote = |m: &LockedPeer, extra: &[&str]| RemotePeer {
        peer_id: m.peer_id.clone(),
        public_key: m.public_key.clone(),
        allowed_ips: m
            .addresses
            .iter()
            .cloned()
            .chain(extra.iter().map(ToString::to_string))
            .collect(),
        tags: vec!["admin".into()],
        lock: Some(lock::sign(Kind::Peer, m, &k)),
        route_locks: vec![lock::sign(Kind::Route, &route, &k)],
        ..Default::default()
    };
    let map = NetworkMap {
        revision: 5,
        network_id: NET.into(),
        peer_id: "peer_me".into(),
        addresses: vec!["100.64.0.1/32".into()],
        peers: vec![
            remote(&member("peer_a", 2), &[]),
            remote(&member("peer_gw", 3), &["10.1.0.0/16", "0.0.0.0/0"]),
        ],
        lock: Some(LockChain {
            key_sets: vec![lock::sign(Kind::KeySet, &set(), &k)],
        }),
        policy_lock: Some(PolicyLock {
            text: text.into(),
            signed: Some(lock::sign(Kind::Policy, &policy, &k)),
        }),
        self_lock: Some(lock::sign(Kind::Peer, &member("peer_me", 1), &k)),
        ..Default::default()
    };
    vec![map.encode_to_vec(), Vec::new()]
}
