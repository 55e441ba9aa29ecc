//! Tenant-signed membership (pure): signing and verifying the statements of
//! `proto/canopy/v1/lock.proto` with Ed25519. What is signed is a domain string naming the
//! statement's kind and version, then the statement's encoding; the signature travels with
//! those exact bytes ([`v1::Signed`]), so nothing is ever re-encoded to be checked, and a
//! signature for one kind of statement is never valid for another.

use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::v1;

mod admit;
pub use admit::{Admit, Trust};
pub use ed25519_dalek::SigningKey;

/// At most this many key sets in a network's chain, keys in a set, revoked peers in a set.
pub const MAX_CHAIN: usize = 64;
pub const MAX_KEYS: usize = 16;
pub const MAX_REVOKED: usize = 4096;

/// What a statement is; each kind signs under its own domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    KeySet,
    Peer,
    Route,
    Policy,
    Delegation,
}

impl Kind {
    /// The largest statement of this kind taken: a key set with all its keys and revocations;
    /// anything else is a few addresses, tags and ids. A padded statement (unknown fields
    /// decode away, but would ride along in every map) is refused.
    pub fn max_body(self) -> usize {
        match self {
            Kind::KeySet => 160 * 1024,
            _ => 4 * 1024,
        }
    }

    fn domain(self) -> &'static [u8] {
        match self {
            Kind::KeySet => b"canopy lock v1 key set\0",
            Kind::Peer => b"canopy lock v1 peer\0",
            Kind::Route => b"canopy lock v1 route\0",
            Kind::Policy => b"canopy lock v1 policy\0",
            Kind::Delegation => b"canopy lock v1 delegation\0",
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LockError {
    #[error("not signed by a trusted key")]
    UntrustedKey,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the statement does not decode: {0}")]
    Malformed(String),
}

/// The bytes a signature covers.
fn message(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut m = kind.domain().to_vec();
    m.extend_from_slice(body);
    m
}

/// Signs `statement` as `kind` with `key`.
pub fn sign<M: Message>(kind: Kind, statement: &M, key: &SigningKey) -> v1::Signed {
    let body = statement.encode_to_vec();
    let signature = key.sign(&message(kind, &body));
    v1::Signed {
        body,
        key: key.verifying_key().to_bytes().to_vec(),
        signature: signature.to_bytes().to_vec(),
    }
}

/// The statement in `signed`, if it is a `kind` signed by one of `trusted` (32-byte keys).
pub fn verify<M: Message + Default>(
    kind: Kind,
    signed: &v1::Signed,
    trusted: &[Vec<u8>],
) -> Result<M, LockError> {
    if signed.body.len() > kind.max_body() {
        return Err(LockError::Malformed(format!(
            "a statement of {} bytes (at most {})",
            signed.body.len(),
            kind.max_body()
        )));
    }
    if !trusted.iter().any(|k| k == &signed.key) {
        return Err(LockError::UntrustedKey);
    }
    let key = <[u8; 32]>::try_from(signed.key.as_slice())
        .ok()
        .and_then(|k| VerifyingKey::from_bytes(&k).ok())
        .ok_or(LockError::UntrustedKey)?;
    let sig = <[u8; 64]>::try_from(signed.signature.as_slice())
        .map(|s| Signature::from_bytes(&s))
        .map_err(|_| LockError::BadSignature)?;
    // Strict: no malleable signatures, no small-order keys.
    key.verify_strict(&message(kind, &signed.body), &sig)
        .map_err(|_| LockError::BadSignature)?;
    M::decode(signed.body.as_slice()).map_err(|e| LockError::Malformed(e.to_string()))
}

/// A new key set signed by a key of the set before it: the set an agent holding `current`
/// takes, or why not (not signed by a key it trusts, another network's, or not newer).
pub fn next_key_set(
    current: &v1::LockKeySet,
    signed: &v1::Signed,
) -> Result<v1::LockKeySet, LockError> {
    let next: v1::LockKeySet = verify(Kind::KeySet, signed, &current.keys)?;
    if next.network_id != current.network_id {
        return Err(LockError::Malformed("a key set of another network".into()));
    }
    if next.serial <= current.serial {
        return Err(LockError::Malformed(format!(
            "key set {} is not newer than {}",
            next.serial, current.serial
        )));
    }
    check_set(&next)?;
    Ok(next)
}

/// A key set's own bounds: 1 to [`MAX_KEYS`] keys of 32 bytes, at most [`MAX_REVOKED`] revoked.
fn check_set(set: &v1::LockKeySet) -> Result<(), LockError> {
    if set.keys.is_empty() || set.keys.len() > MAX_KEYS || set.keys.iter().any(|k| k.len() != 32) {
        return Err(LockError::Malformed(format!(
            "a key set needs 1 to {MAX_KEYS} keys of 32 bytes"
        )));
    }
    if set.revoked.len() > MAX_REVOKED {
        return Err(LockError::Malformed(format!(
            "a key set revokes at most {MAX_REVOKED} peers"
        )));
    }
    Ok(())
}

/// A network's first key set: serial 1, signed by a key of its own.
pub fn first_key_set(network_id: &str, signed: &v1::Signed) -> Result<v1::LockKeySet, LockError> {
    let set = v1::LockKeySet::decode(signed.body.as_slice())
        .map_err(|e| LockError::Malformed(e.to_string()))?;
    check_set(&set)?;
    if set.network_id != network_id {
        return Err(LockError::Malformed("a key set of another network".into()));
    }
    if set.serial != 1 {
        return Err(LockError::Malformed("a first key set has serial 1".into()));
    }
    verify(Kind::KeySet, signed, &set.keys)
}

/// The key set at the end of `chain`, every link checked from the first: what a controller
/// takes, and (with [`Trust`]) what an agent walks along.
pub fn check_chain(network_id: &str, chain: &v1::LockChain) -> Result<v1::LockKeySet, LockError> {
    let (first, rest) = chain
        .key_sets
        .split_first()
        .ok_or_else(|| LockError::Malformed("an empty lock chain".into()))?;
    if chain.key_sets.len() > MAX_CHAIN {
        return Err(LockError::Malformed(format!(
            "a lock chain holds at most {MAX_CHAIN} key sets"
        )));
    }
    let mut set = first_key_set(network_id, first)?;
    for next in rest {
        set = next_key_set(&set, next)?;
    }
    Ok(set)
}

/// SHA-256 of a statement's body: how a join string pins a key set.
pub fn body_sha256(signed: &v1::Signed) -> [u8; 32] {
    Sha256::digest(&signed.body).into()
}

/// The pin of a chain's current key set (its last), if there is one.
pub fn pin(chain: &v1::LockChain) -> Option<[u8; 32]> {
    chain.key_sets.last().map(body_sha256)
}

/// A new signing key from 32 random bytes.
pub fn signing_key(seed: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> v1::LockedPeer {
        v1::LockedPeer {
            network_id: "net_1".into(),
            public_key: vec![7; 32],
            addresses: vec!["100.64.0.2/32".into()],
            tags: vec!["web".into()],
            expires_at_unix: 0,
            peer_id: "p1".into(),
        }
    }

    fn sign_bytes(kind: Kind, body: Vec<u8>, k: &SigningKey) -> v1::Signed {
        let signature = k.sign(&message(kind, &body)).to_bytes().to_vec();
        v1::Signed {
            body,
            key: k.verifying_key().to_bytes().to_vec(),
            signature,
        }
    }

    fn trusted(k: &SigningKey) -> Vec<Vec<u8>> {
        vec![k.verifying_key().to_bytes().to_vec()]
    }

    #[test]
    fn a_signed_peer_verifies_against_its_key_only() {
        let (k, other) = (signing_key([1; 32]), signing_key([2; 32]));
        let s = sign(Kind::Peer, &peer(), &k);
        assert_eq!(
            verify::<v1::LockedPeer>(Kind::Peer, &s, &trusted(&k)),
            Ok(peer())
        );
        assert_eq!(
            verify::<v1::LockedPeer>(Kind::Peer, &s, &trusted(&other)),
            Err(LockError::UntrustedKey)
        );
    }

    #[test]
    fn a_changed_statement_or_another_kind_does_not_verify() {
        let k = signing_key([1; 32]);
        let mut s = sign(Kind::Peer, &peer(), &k);
        // Signed as a peer, presented as a route: another domain.
        let as_route = verify::<v1::LockedRoute>(Kind::Route, &s, &trusted(&k));
        assert_eq!(as_route, Err(LockError::BadSignature));
        // One more address slipped into the body.
        let mut widened = peer();
        widened.addresses.push("0.0.0.0/0".into());
        s.body = widened.encode_to_vec();
        let r = verify::<v1::LockedPeer>(Kind::Peer, &s, &trusted(&k));
        assert_eq!(r, Err(LockError::BadSignature));
        // Padded with an unknown field: it would still decode, and ride along in every map.
        let mut padded = peer().encode_to_vec();
        padded.extend([0xfa, 0x01, 0x80, 0x28]); // field 31, length-delimited, 5120 bytes
        padded.extend(vec![0u8; 5 * 1024]);
        let p = sign_bytes(Kind::Peer, padded, &k);
        let r = verify::<v1::LockedPeer>(Kind::Peer, &p, &trusted(&k));
        assert!(matches!(r, Err(LockError::Malformed(_))), "{r:?}");
        // Garbage signatures.
        let mut g = sign(Kind::Peer, &peer(), &k);
        g.signature.truncate(10);
        let r = verify::<v1::LockedPeer>(Kind::Peer, &g, &trusted(&k));
        assert_eq!(r, Err(LockError::BadSignature));
    }

    #[test]
    fn key_sets_move_only_forward_and_only_by_a_trusted_key() {
        let (k1, k2, evil) = (
            signing_key([1; 32]),
            signing_key([2; 32]),
            signing_key([9; 32]),
        );
        let set1 = v1::LockKeySet {
            network_id: "net_1".into(),
            keys: trusted(&k1),
            serial: 1,
            revoked: vec![],
        };
        let set2 = v1::LockKeySet {
            keys: trusted(&k2),
            serial: 2,
            ..set1.clone()
        };
        let ok = next_key_set(&set1, &sign(Kind::KeySet, &set2, &k1)).unwrap();
        assert_eq!(ok, set2);
        // The controller replacing the key with its own.
        let stolen = v1::LockKeySet {
            keys: trusted(&evil),
            serial: 3,
            ..set1.clone()
        };
        let r = next_key_set(&set2, &sign(Kind::KeySet, &stolen, &evil));
        assert_eq!(r, Err(LockError::UntrustedKey));
        // Replaying the old set (signed by a key once trusted) to go back.
        let replay = next_key_set(&set2, &sign(Kind::KeySet, &set1, &k2));
        assert!(matches!(replay, Err(LockError::Malformed(_))));
    }
}
