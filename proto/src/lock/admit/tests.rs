use super::*;
use crate::lock::{Kind, sign, signing_key};
use ed25519_dalek::SigningKey;

const NET: &str = "net_1";

fn set(keys: &[&SigningKey], serial: u64, revoked: Vec<Vec<u8>>) -> LockKeySet {
    LockKeySet {
        network_id: NET.into(),
        keys: keys
            .iter()
            .map(|k| k.verifying_key().to_bytes().to_vec())
            .collect(),
        serial,
        revoked,
    }
}

fn member(id: &str, key: u8) -> v1::LockedPeer {
    v1::LockedPeer {
        network_id: NET.into(),
        public_key: vec![key; 32],
        addresses: vec![format!("100.64.0.{key}/32")],
        tags: vec!["web".into()],
        expires_at_unix: 0,
        peer_id: id.into(),
    }
}

fn remote(m: &v1::LockedPeer, signer: Option<&SigningKey>) -> RemotePeer {
    RemotePeer {
        peer_id: m.peer_id.clone(),
        public_key: m.public_key.clone(),
        allowed_ips: m.addresses.clone(),
        tags: m.tags.clone(),
        lock: signer.map(|k| sign(Kind::Peer, m, k)),
        ..Default::default()
    }
}

fn route(gw: &[u8], prefix: &str, k: &SigningKey) -> v1::Signed {
    let r = v1::LockedRoute {
        network_id: NET.into(),
        gateway_public_key: gw.to_vec(),
        prefix: prefix.into(),
    };
    sign(Kind::Route, &r, k)
}

#[test]
fn a_signed_peer_is_taken_with_its_signed_tags_and_an_unsigned_one_is_not() {
    let (k, evil) = (signing_key([1; 32]), signing_key([9; 32]));
    let t = Trust::new(set(&[&k], 1, vec![]));
    let mut ok = remote(&member("p1", 1), Some(&k));
    // The controller adds a tag the tenant never signed.
    ok.tags.push("admin".into());
    assert_eq!(t.admit(NET, &mut ok, 0), Admit::Taken { stripped: 0 });
    assert_eq!(ok.tags, vec!["web".to_string()]);
    let mut unsigned = remote(&member("p2", 2), None);
    assert!(matches!(t.admit(NET, &mut unsigned, 0), Admit::Refused(_)));
    let mut forged = remote(&member("p3", 3), Some(&evil));
    let a = t.admit(NET, &mut forged, 0);
    assert_eq!(a, Admit::Refused(LockError::UntrustedKey));
    // A good signature moved onto the controller's own key, or another peer id.
    let mut swapped = remote(&member("p1", 1), Some(&k));
    swapped.public_key = vec![66; 32];
    assert!(matches!(t.admit(NET, &mut swapped, 0), Admit::Refused(_)));
    let mut renamed = remote(&member("p1", 1), Some(&k));
    renamed.peer_id = "p9".into();
    assert!(matches!(t.admit(NET, &mut renamed, 0), Admit::Refused(_)));
    // Another network's signature.
    let mut other = remote(&member("p1", 1), Some(&k));
    assert!(matches!(t.admit("net_2", &mut other, 0), Admit::Refused(_)));
}

#[test]
fn revoked_and_expired_members_are_refused() {
    let k = signing_key([1; 32]);
    let t = Trust::new(set(&[&k], 2, vec![vec![1; 32]]));
    let mut revoked = remote(&member("p1", 1), Some(&k));
    assert!(matches!(t.admit(NET, &mut revoked, 0), Admit::Refused(_)));
    let mut m = member("p2", 2);
    m.expires_at_unix = 1_000;
    let mut p = remote(&m, Some(&k));
    assert_eq!(
        t.admit(NET, &mut p.clone(), 999),
        Admit::Taken { stripped: 0 }
    );
    assert!(matches!(t.admit(NET, &mut p, 1_000), Admit::Refused(_)));
}

#[test]
fn only_signed_routes_of_that_gateway_stay_in_its_allowed_ips() {
    let k = signing_key([1; 32]);
    let t = Trust::new(set(&[&k], 1, vec![]));
    let mut gw = remote(&member("gw", 5), Some(&k));
    gw.allowed_ips.extend([
        "10.1.0.0/16".to_string(),
        "0.0.0.0/0".to_string(),
        "10.9.0.0/16".into(),
    ]);
    gw.route_locks = vec![
        route(&[5; 32], "10.1.0.0/16", &k),
        // Signed, but for another gateway.
        route(&[6; 32], "10.9.0.0/16", &k),
    ];
    assert_eq!(t.admit(NET, &mut gw, 0), Admit::Taken { stripped: 2 });
    assert_eq!(gw.allowed_ips, vec!["100.64.0.5/32", "10.1.0.0/16"]);
}

#[test]
fn the_trusted_set_moves_only_along_signed_links_and_never_back() {
    let (k1, k2, evil) = (
        signing_key([1; 32]),
        signing_key([2; 32]),
        signing_key([9; 32]),
    );
    let s1 = sign(Kind::KeySet, &set(&[&k1], 1, vec![]), &k1);
    let s2 = sign(Kind::KeySet, &set(&[&k2], 2, vec![]), &k1);
    let chain = LockChain {
        key_sets: vec![s1.clone(), s2.clone()],
    };
    let mut t = Trust::pinned(NET, &chain, &crate::lock::body_sha256(&s1)).unwrap();
    assert_eq!(t.advance(&chain), Ok(true));
    assert_eq!(t.key_set().serial, 2);
    // Shown the old chain again: nothing changes.
    let old = LockChain {
        key_sets: vec![s1.clone()],
    };
    assert_eq!(t.advance(&old), Ok(false));
    // The controller appends a set of its own.
    let stolen = sign(Kind::KeySet, &set(&[&evil], 3, vec![]), &evil);
    let forged = LockChain {
        key_sets: vec![s1.clone(), s2, stolen],
    };
    assert_eq!(t.advance(&forged), Err(LockError::UntrustedKey));
    assert_eq!(t.key_set().serial, 2);
    // Or replaces the whole chain: the pin is not in it.
    let replaced = LockChain {
        key_sets: vec![sign(Kind::KeySet, &set(&[&evil], 1, vec![]), &evil)],
    };
    assert!(Trust::pinned(NET, &replaced, &crate::lock::body_sha256(&s1)).is_err());
    assert!(Trust::first_use(NET, &replaced).is_ok());
}

#[test]
fn a_refused_upsert_becomes_a_removal() {
    let k = signing_key([1; 32]);
    let t = Trust::new(set(&[&k], 1, vec![]));
    let mut d = NetworkDelta {
        upserted: vec![
            remote(&member("a", 1), Some(&k)),
            remote(&member("b", 2), None),
        ],
        ..Default::default()
    };
    let counts: Vec<(String, u32)> = t
        .admit_delta(NET, &mut d, 0)
        .into_iter()
        .map(|(id, a)| (id, a.refused()))
        .collect();
    assert_eq!(counts, vec![("a".to_string(), 0), ("b".to_string(), 1)]);
    assert_eq!(d.upserted.len(), 1);
    assert_eq!(d.removed, vec!["b".to_string()]);
}

fn delegation(k: &SigningKey, d: &SigningKey, tags: &[&str], expires: i64) -> v1::Signed {
    let del = v1::LockDelegation {
        network_id: NET.into(),
        key: d.verifying_key().to_bytes().to_vec(),
        tags: tags.iter().map(ToString::to_string).collect(),
        max_uses: 10,
        expires_at_unix: expires,
    };
    sign(Kind::Delegation, &del, k)
}

#[test]
fn a_delegate_signs_members_within_its_tags_and_lifetime_only() {
    let (k, d, evil) = (
        signing_key([1; 32]),
        signing_key([4; 32]),
        signing_key([9; 32]),
    );
    let t = Trust::new(set(&[&k], 1, vec![]));
    let mut m = member("p1", 1);
    m.expires_at_unix = 500;
    let by = |m: &v1::LockedPeer, del: v1::Signed| RemotePeer {
        lock_delegation: Some(del),
        ..remote(m, Some(&d))
    };
    let mut ok = by(&m, delegation(&k, &d, &["web", "ci"], 1_000));
    assert_eq!(t.admit(NET, &mut ok, 0), Admit::Taken { stripped: 0 });
    // No delegation, or one the tenant did not sign.
    let mut bare = remote(&m, Some(&d));
    assert_eq!(
        t.admit(NET, &mut bare, 0),
        Admit::Refused(LockError::UntrustedKey)
    );
    let mut forged = by(&m, delegation(&evil, &d, &["web"], 1_000));
    assert_eq!(
        t.admit(NET, &mut forged, 0),
        Admit::Refused(LockError::UntrustedKey)
    );
    // Tags beyond it; a membership without an end, or outliving it.
    let mut wide = by(&m, delegation(&k, &d, &["ci"], 1_000));
    assert!(matches!(t.admit(NET, &mut wide, 0), Admit::Refused(_)));
    let mut forever = member("p1", 1);
    forever.expires_at_unix = 0;
    let mut f = by(&forever, delegation(&k, &d, &["web"], 1_000));
    assert!(matches!(t.admit(NET, &mut f, 0), Admit::Refused(_)));
    let mut long = by(&m, delegation(&k, &d, &["web"], 400));
    assert!(matches!(t.admit(NET, &mut long, 0), Admit::Refused(_)));
    // The delegate key revoked: what it signed is void.
    let revoked = Trust::new(set(&[&k], 2, vec![d.verifying_key().to_bytes().to_vec()]));
    let mut p = by(&m, delegation(&k, &d, &["web"], 1_000));
    assert!(matches!(revoked.admit(NET, &mut p, 0), Admit::Refused(_)));
}
