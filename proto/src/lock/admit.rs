//! What an agent takes from a locked network's map (pure): the key set it trusts, moved
//! forward only by sets signed by a key it already trusts, and each peer and route only as
//! the tenant signed them.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prost::Message as _;

use super::{Kind, LockError, first_key_set, next_key_set, verify};
use crate::v1::{self, LockChain, LockKeySet, NetworkDelta, NetworkMap, RemotePeer};

/// The key set an agent trusts.
#[derive(Debug)]
pub struct Trust {
    set: LockKeySet,
    revoked: HashSet<Vec<u8>>,
    /// Delegations already verified under this set, by their signature: the peers one
    /// presigned join string enrolled share one, checked once.
    delegations: Mutex<HashMap<Vec<u8>, (v1::Signed, v1::LockDelegation)>>,
}

/// Verified delegations remembered, at most.
const DELEGATIONS: usize = 1024;

impl Clone for Trust {
    fn clone(&self) -> Self {
        Self::new(self.set.clone())
    }
}

impl PartialEq for Trust {
    fn eq(&self, other: &Self) -> bool {
        self.set == other.set
    }
}

/// What became of one peer of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Taken as signed; `stripped` allowed IPs (routes) were not signed and are left out.
    Taken { stripped: u32 },
    /// Not taken at all.
    Refused(LockError),
}

impl Admit {
    /// How many statements this refused (the peer, or the routes left out).
    pub fn refused(&self) -> u32 {
        match self {
            Admit::Taken { stripped } => *stripped,
            Admit::Refused(_) => 1,
        }
    }
}

impl Trust {
    /// The set a join string pinned: the chain's entry whose body hashes to `pin` (it need not
    /// be the last; later ones must follow from it).
    pub fn pinned(network_id: &str, chain: &LockChain, pin: &[u8; 32]) -> Result<Self, LockError> {
        let at = chain
            .key_sets
            .iter()
            .position(|s| &super::body_sha256(s) == pin)
            .ok_or_else(|| {
                LockError::Malformed("the network's key sets do not include the pinned one".into())
            })?;
        let set = LockKeySet::decode(chain.key_sets[at].body.as_slice())
            .map_err(|e| LockError::Malformed(e.to_string()))?;
        if set.network_id != network_id {
            return Err(LockError::Malformed("a key set of another network".into()));
        }
        super::check_set(&set)?;
        Ok(Self::new(set))
    }

    /// Trust on first use, for an agent that enrolled before its network was locked: the
    /// chain's first set, signed by a key of its own.
    pub fn first_use(network_id: &str, chain: &LockChain) -> Result<Self, LockError> {
        let first = chain
            .key_sets
            .first()
            .ok_or_else(|| LockError::Malformed("an empty lock chain".into()))?;
        Ok(Self::new(first_key_set(network_id, first)?))
    }

    pub fn new(set: LockKeySet) -> Self {
        let revoked = set.revoked.iter().cloned().collect();
        Self {
            set,
            revoked,
            delegations: Mutex::new(HashMap::new()),
        }
    }

    pub fn key_set(&self) -> &LockKeySet {
        &self.set
    }

    /// Moves to the newest set of `chain` that follows from this one, link by link; returns
    /// whether it moved. A set at or below ours is skipped (a chain shown out of date cannot
    /// take us back); the first link that does not verify stops the walk with its error, and
    /// the sets before it are kept.
    pub fn advance(&mut self, chain: &LockChain) -> Result<bool, LockError> {
        if chain.key_sets.len() > super::MAX_CHAIN {
            return Err(LockError::Malformed("a lock chain too long".into()));
        }
        let mut moved = false;
        for signed in &chain.key_sets {
            let serial = LockKeySet::decode(signed.body.as_slice())
                .map(|s| s.serial)
                .map_err(|e| LockError::Malformed(e.to_string()))?;
            if serial <= self.set.serial {
                continue;
            }
            *self = Self::new(next_key_set(&self.set, signed)?);
            moved = true;
        }
        Ok(moved)
    }

    /// Checks `peer` of `network_id`'s map at `now` (Unix seconds): its membership signed by a
    /// trusted key for this key, id and network, not revoked or expired. Its tags become the
    /// signed ones; allowed IPs other than its signed addresses stay only if a signed route of
    /// this gateway names them.
    pub fn admit(&self, network_id: &str, peer: &mut RemotePeer, now: i64) -> Admit {
        let m = match self.member(network_id, peer, now) {
            Ok(m) => m,
            Err(e) => return Admit::Refused(e),
        };
        peer.tags = m.tags;
        let routes: Vec<String> = peer
            .route_locks
            .iter()
            .filter_map(|s| verify::<v1::LockedRoute>(Kind::Route, s, &self.set.keys).ok())
            .filter(|r| r.network_id == network_id && r.gateway_public_key == peer.public_key)
            .map(|r| r.prefix)
            .collect();
        let before = peer.allowed_ips.len();
        peer.allowed_ips
            .retain(|ip| m.addresses.contains(ip) || routes.contains(ip));
        Admit::Taken {
            stripped: u32::try_from(before - peer.allowed_ips.len()).unwrap_or(u32::MAX),
        }
    }

    fn member(
        &self,
        network_id: &str,
        peer: &RemotePeer,
        now: i64,
    ) -> Result<v1::LockedPeer, LockError> {
        let signed = peer
            .lock
            .as_ref()
            .ok_or_else(|| LockError::Malformed("not signed".into()))?;
        let m = self.membership(network_id, signed, peer.lock_delegation.as_ref(), now)?;
        if m.public_key != peer.public_key || m.peer_id != peer.peer_id {
            return Err(LockError::Malformed("signed for another peer".into()));
        }
        Ok(m)
    }

    /// A membership statement of `network_id` at `now`: signed by a trusted key, or by a
    /// delegate key the tenant authorised (`delegation`) within its tags and lifetime; not
    /// revoked (neither its WireGuard key nor its delegate key), not expired.
    pub fn membership(
        &self,
        network_id: &str,
        signed: &v1::Signed,
        delegation: Option<&v1::Signed>,
        now: i64,
    ) -> Result<v1::LockedPeer, LockError> {
        let m: v1::LockedPeer = if self.set.keys.contains(&signed.key) {
            verify(Kind::Peer, signed, &self.set.keys)?
        } else {
            self.delegated(network_id, signed, delegation)?
        };
        if m.network_id != network_id {
            return Err(LockError::Malformed("signed for another network".into()));
        }
        if self.revoked.contains(&m.public_key) {
            return Err(LockError::Malformed("revoked".into()));
        }
        if m.expires_at_unix != 0 && m.expires_at_unix <= now {
            return Err(LockError::Malformed("its signature expired".into()));
        }
        Ok(m)
    }

    /// A membership a delegate key signed: the delegation signed by a trusted key for this
    /// network and key, not revoked; the member's tags among the delegation's, and expiring
    /// no later than it.
    fn delegated(
        &self,
        network_id: &str,
        signed: &v1::Signed,
        delegation: Option<&v1::Signed>,
    ) -> Result<v1::LockedPeer, LockError> {
        let delegation = delegation.ok_or(LockError::UntrustedKey)?;
        let d = self.delegation(delegation)?;
        if d.network_id != network_id || d.key != signed.key {
            return Err(LockError::Malformed("a delegation of another key".into()));
        }
        if self.revoked.contains(&d.key) {
            return Err(LockError::Malformed("its delegate key was revoked".into()));
        }
        let m: v1::LockedPeer = verify(Kind::Peer, signed, std::slice::from_ref(&d.key))?;
        if !m.tags.iter().all(|t| d.tags.contains(t)) {
            return Err(LockError::Malformed("tags beyond its delegation".into()));
        }
        if m.expires_at_unix == 0 || m.expires_at_unix > d.expires_at_unix {
            return Err(LockError::Malformed("it outlives its delegation".into()));
        }
        Ok(m)
    }

    /// A delegation signed by a trusted key, verified once per signature.
    fn delegation(&self, signed: &v1::Signed) -> Result<v1::LockDelegation, LockError> {
        let mut seen = self
            .delegations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, d)) = seen.get(&signed.signature)
            && s == signed
        {
            return Ok(d.clone());
        }
        let d: v1::LockDelegation = verify(Kind::Delegation, signed, &self.set.keys)?;
        if seen.len() >= DELEGATIONS {
            seen.clear();
        }
        seen.insert(signed.signature.clone(), (signed.clone(), d.clone()));
        Ok(d)
    }

    /// Takes from a full map only what verifies; returns the peers refused or cut, and how.
    pub fn admit_map(&self, map: &mut NetworkMap, now: i64) -> Vec<(String, Admit)> {
        let mut refused = Vec::new();
        let net = map.network_id.clone();
        map.peers.retain_mut(|p| {
            let a = self.admit(&net, p, now);
            let taken = matches!(a, Admit::Taken { .. });
            if a.refused() > 0 {
                refused.push((p.peer_id.clone(), a));
            }
            taken
        });
        refused
    }

    /// Takes from a delta only what verifies: a refused upsert becomes a removal (the agent
    /// may hold an older, signed copy of that peer). Returns every upserted peer and how it
    /// was taken.
    pub fn admit_delta(
        &self,
        network_id: &str,
        delta: &mut NetworkDelta,
        now: i64,
    ) -> Vec<(String, Admit)> {
        let mut out = Vec::with_capacity(delta.upserted.len());
        let mut removed = Vec::new();
        delta.upserted.retain_mut(|p| {
            let a = self.admit(network_id, p, now);
            let refused = matches!(a, Admit::Refused(_));
            if refused {
                removed.push(p.peer_id.clone());
            }
            out.push((p.peer_id.clone(), a));
            !refused
        });
        delta.removed.extend(removed);
        out
    }
}

#[cfg(test)]
mod tests;
