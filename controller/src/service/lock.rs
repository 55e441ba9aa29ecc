//! The network lock (tenant-signed membership). The controller holds no signing key: it
//! stores the key sets and signatures the tenant's console made, checks them so a mistake is
//! a clear error, and keeps unsigned peers and routes out of maps. Agents check everything
//! again against the keys they pinned; nothing here is trusted by them.

use canopy_proto::lock::{self, Kind, LockError};
use canopy_proto::v1::{
    LockChain, LockKeySet, LockedPeer, LockedPolicy, LockedRoute, NetworkLock, NetworkRecord,
    PeerRecord, PeerSignature, PolicyRecord, RouteRecord, RouteSignature, SignLockResponse, Signed,
};
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::store::{Compare, Op, Txn};

/// Signatures stored by one SignLock call, at most (one transaction).
pub const MAX_SIGNATURES: usize = 100;

fn invalid(what: &str, e: LockError) -> Error {
    Error::InvalidArgument(format!("{what}: {e}"))
}

/// The key set a network's lock is at now (its chain checked link by link).
fn current_set(net: &NetworkRecord) -> Result<Option<LockKeySet>> {
    net.lock
        .as_ref()
        .map(|chain| {
            lock::check_chain(&net.id, chain)
                .map_err(|e| Error::Internal(format!("the stored lock chain: {e}")))
        })
        .transpose()
}

/// Whether `s` signs exactly what `p` is now (its key, addresses and tags).
pub fn signs_peer(s: &LockedPeer, p: &PeerRecord) -> bool {
    s.network_id == p.network_id
        && s.peer_id == p.id
        && s.public_key == p.public_key
        && s.addresses == p.addresses
        && s.tags == p.tags
}

/// A peer's signature checked against the network's keys (or, before the network is locked,
/// against the key it names) and against the peer as it is.
fn check_peer_signature(
    trusted: Option<&LockKeySet>,
    signed: &Signed,
    p: &PeerRecord,
) -> Result<()> {
    let keys = trusted.map_or_else(|| vec![signed.key.clone()], |t| t.keys.clone());
    let s: LockedPeer = lock::verify(Kind::Peer, signed, &keys)
        .map_err(|e| invalid(&format!("peer {}", p.id), e))?;
    if !signs_peer(&s, p) {
        return Err(Error::InvalidArgument(format!(
            "the signature of peer {} does not sign it as it is (key, addresses and tags): fetch it again",
            p.id
        )));
    }
    if trusted.is_some_and(|t| t.revoked.contains(&p.public_key)) {
        return Err(Error::FailedPrecondition(format!(
            "peer {}'s key was revoked by the network lock",
            p.id
        )));
    }
    Ok(())
}

fn check_route_signature(
    trusted: Option<&LockKeySet>,
    signed: &Signed,
    r: &RouteRecord,
    gateway_key: &[u8],
) -> Result<()> {
    let keys = trusted.map_or_else(|| vec![signed.key.clone()], |t| t.keys.clone());
    let s: LockedRoute = lock::verify(Kind::Route, signed, &keys)
        .map_err(|e| invalid(&format!("route {}", r.id), e))?;
    if s.network_id != r.network_id || s.prefix != r.prefix || s.gateway_public_key != gateway_key {
        return Err(Error::InvalidArgument(format!(
            "the signature of route {} does not sign it as it is",
            r.id
        )));
    }
    Ok(())
}

/// The serial of a stored policy's signature (0: none).
fn policy_serial(p: Option<&PolicyRecord>) -> u64 {
    p.and_then(|p| p.lock.as_ref())
        .and_then(|s| LockedPolicy::decode(s.body.as_slice()).ok())
        .map_or(0, |s| s.serial)
}

/// A policy signature checked against the network's keys (or, not locked yet, the key it
/// names), the text and the serial of the one before.
fn check_policy_signature(
    net: &NetworkRecord,
    trusted: Option<&LockKeySet>,
    old: Option<&PolicyRecord>,
    text: &str,
    signed: &Signed,
) -> Result<()> {
    let keys = trusted.map_or_else(|| vec![signed.key.clone()], |t| t.keys.clone());
    let s: LockedPolicy =
        lock::verify(Kind::Policy, signed, &keys).map_err(|e| invalid("the policy", e))?;
    if s.network_id != net.id || s.text_sha256 != canopy_proto::sha256(text.as_bytes()) {
        return Err(Error::InvalidArgument(
            "the policy's signature does not sign this document".into(),
        ));
    }
    if trusted.is_some() && s.serial <= policy_serial(old) {
        return Err(Error::InvalidArgument(format!(
            "the policy's signature has serial {}, not above the current {}",
            s.serial,
            policy_serial(old)
        )));
    }
    Ok(())
}

/// What a policy write in `net` stores as its signature: none unless locked; in a locked
/// network a signature is required and checked, and the policy cannot be removed (agents would
/// keep the last one they verified).
pub(super) fn check_policy(
    net: &NetworkRecord,
    old: Option<&PolicyRecord>,
    text: Option<&str>,
    lock: Option<&Signed>,
) -> Result<Option<Signed>> {
    let Some(trusted) = current_set(net)? else {
        return Ok(None);
    };
    let Some(text) = text else {
        return Err(Error::FailedPrecondition(
            "a locked network's policy can be replaced, not removed (set one that allows everything)".into(),
        ));
    };
    let signed = lock.ok_or_else(|| {
        Error::FailedPrecondition(
            "the network is locked: its policy must be signed with its lock key (canopy policy set … --key FILE)".into(),
        )
    })?;
    check_policy_signature(net, Some(&trusted), old, text, signed)?;
    Ok(Some(signed.clone()))
}

impl Controller {
    /// "" (not locked), "pending" (no signature), "signed", or "stale" (signed before its
    /// tags or addresses changed: agents keep the signed ones until it is signed again).
    pub(super) fn lock_state(&self, p: &PeerRecord) -> &'static str {
        let locked = self
            .cache
            .network(&p.network_id)
            .is_some_and(|n| n.lock.is_some());
        match (&p.lock, locked) {
            (_, false) => "",
            (None, true) => "pending",
            (Some(s), true) => match LockedPeer::decode(s.body.as_slice()) {
                Ok(s) if signs_peer(&s, p) => "signed",
                _ => "stale",
            },
        }
    }

    /// A network's lock: its key sets, what waits for a signature, what agents refused.
    pub async fn get_network_lock(&self, c: &Caller, network: &str) -> Result<NetworkLock> {
        let (net, _) = self.resolve_network(c, network).await?;
        let set = current_set(&net)?.unwrap_or_default();
        let mut out = NetworkLock {
            network_id: net.id.clone(),
            chain: net.lock.clone(),
            keys: set.keys,
            serial: set.serial,
            revoked: set.revoked,
            ..Default::default()
        };
        let peers = self.store.range(keys::peers(&net.id).as_bytes()).await?;
        for kv in &peers.kvs {
            let p: PeerRecord = decode(kv)?;
            out.pending_peers += u32::from(net.lock.is_some() && p.lock.is_none());
            if let Some(n) = self.sessions.lock_refused(&p.id).filter(|n| *n > 0) {
                out.refused += n;
                out.refusing_agents += 1;
            }
        }
        for (r, _) in self.route_records(&net.id).await? {
            out.unsigned_routes += u32::from(net.lock.is_some() && r.lock.is_none());
        }
        Ok(out)
    }

    /// Locks `network` with its first key set, or moves it to the next (signed by a key of the
    /// current one).
    pub async fn set_lock_keys(
        &self,
        c: &Caller,
        network: &str,
        signed: &Signed,
    ) -> Result<NetworkLock> {
        c.require_admin()?;
        let id = crate::txn::retry("set lock keys", |_| async move {
            let (mut net, net_rev) = self.resolve_network(c, network).await?;
            let chain = match current_set(&net)? {
                None => {
                    lock::first_key_set(&net.id, signed)
                        .map_err(|e| invalid("the first key set", e))?;
                    LockChain {
                        key_sets: vec![signed.clone()],
                    }
                }
                Some(current) => {
                    lock::next_key_set(&current, signed).map_err(|e| invalid("the key set", e))?;
                    let mut chain = net.lock.clone().unwrap_or_default();
                    if chain.key_sets.len() >= lock::MAX_CHAIN {
                        return Err(Error::ResourceExhausted(format!(
                            "the network's lock holds {} key sets, the most it can",
                            lock::MAX_CHAIN
                        )));
                    }
                    chain.key_sets.push(signed.clone());
                    chain
                }
            };
            net.lock = Some(chain);
            let key = keys::network(&c.tenant, &net.id);
            let txn = Txn::new()
                .when(Compare::unchanged(key.clone(), net_rev))
                .then(Op::put(key, net.encode_to_vec()));
            Ok(self.store.txn(txn).await?.succeeded.then_some(net.id))
        })
        .await?;
        tracing::info!(network = %id, "network lock key set changed");
        self.get_network_lock(c, &id).await
    }

    /// Stores the tenant's signatures of peers and routes (each checked against the network's
    /// keys and the record as it is); a signed pending route is approved.
    pub async fn sign_lock(
        &self,
        c: &Caller,
        network: &str,
        peers: &[PeerSignature],
        routes: &[RouteSignature],
        policy: Option<&Signed>,
    ) -> Result<SignLockResponse> {
        c.require_admin()?;
        if peers.len() + routes.len() > MAX_SIGNATURES {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_SIGNATURES} signatures in one call"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let ids = peers
            .iter()
            .map(|p| &p.peer_id)
            .chain(routes.iter().map(|r| &r.route_id));
        if let Some(dup) = ids.into_iter().find(|id| !seen.insert(*id)) {
            return Err(Error::InvalidArgument(format!(
                "{} is signed twice in one call",
                canopy_proto::text::quoted(dup)
            )));
        }
        crate::txn::retry("sign lock", |_| async move {
            let (net, net_rev) = self.resolve_network(c, network).await?;
            let trusted = current_set(&net)?;
            let mut txn = Txn::new().when(Compare::unchanged(
                keys::network(&c.tenant, &net.id),
                net_rev,
            ));
            for ps in peers {
                let (key, mut p, rev) = self.peer_in(&net.id, &ps.peer_id).await?;
                let signed = ps.signed.clone().unwrap_or_default();
                check_peer_signature(trusted.as_ref(), &signed, &p)?;
                p.lock = Some(signed);
                txn = txn
                    .when(Compare::unchanged(key.clone(), rev))
                    .then(Op::put(key, p.encode_to_vec()));
            }
            for rs in routes {
                let key = keys::route(&net.id, &rs.route_id);
                let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "route {} not found",
                        canopy_proto::text::quoted(&rs.route_id)
                    ))
                })?;
                let mut r: RouteRecord = decode(&kv)?;
                let (_, gw, _) = self.peer_in(&net.id, &r.peer_id).await?;
                let signed = rs.signed.clone().unwrap_or_default();
                check_route_signature(trusted.as_ref(), &signed, &r, &gw.public_key)?;
                r.lock = Some(signed);
                r.pending = false;
                txn = txn
                    .when(Compare::unchanged(key.clone(), kv.mod_revision))
                    .then(Op::put(key, r.encode_to_vec()));
            }
            if let Some(signed) = policy {
                let key = keys::policy(&net.id);
                let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                    Error::FailedPrecondition("the network has no policy to sign".into())
                })?;
                let mut p: PolicyRecord = decode(&kv)?;
                check_policy_signature(&net, trusted.as_ref(), Some(&p), &p.text, signed)?;
                p.lock = Some(signed.clone());
                txn = txn
                    .when(Compare::unchanged(key.clone(), kv.mod_revision))
                    .then(Op::put(key, p.encode_to_vec()));
            }
            Ok(self.store.txn(txn).await?.succeeded.then_some(()))
        })
        .await?;
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Ok(SignLockResponse {
            peers: n(peers.len()),
            routes: n(routes.len()),
        })
    }

    /// A presigned enrollment: agent `id`'s membership as its join string's delegate key
    /// signed it (Hello.self_lock), checked as agents check it and against its record, then
    /// stored, so the peer is in maps without waiting for the tenant.
    pub async fn take_self_lock(
        &self,
        id: &super::AgentIdentity,
        signed: &Signed,
        delegation: Option<&Signed>,
    ) -> Result<()> {
        // Every Hello of a presigned agent carries it: once taken, the cache says so, and a
        // reconnect costs no store read.
        let held = self.cache.peer(&id.network_id, &id.peer_id);
        if held.is_some_and(|p| p.lock.as_ref() == Some(signed)) {
            return Ok(());
        }
        let Some(net) = self.cache.network(&id.network_id) else {
            return Ok(());
        };
        let Some(set) = current_set(&net)? else {
            return Ok(());
        };
        let trust = lock::Trust::new(set);
        let now = self.now_unix();
        crate::txn::retry("take a presigned membership", |_| async {
            let (key, mut p, rev) = self.peer_in(&net.id, &id.peer_id).await?;
            if p.lock.as_ref() == Some(signed) {
                return Ok(Some(()));
            }
            let m = trust
                .membership(&net.id, signed, delegation, now)
                .map_err(|e| invalid("the presigned membership", e))?;
            if !signs_peer(&m, &p) {
                return Err(Error::InvalidArgument(
                    "the presigned membership does not sign this peer as it is".into(),
                ));
            }
            p.lock = Some(signed.clone());
            p.lock_delegation = delegation.cloned();
            let txn = Txn::new()
                .when(Compare::unchanged(key.clone(), rev))
                .then(Op::put(key, p.encode_to_vec()));
            Ok(self.store.txn(txn).await?.succeeded.then_some(()))
        })
        .await?;
        tracing::info!(peer = %id.peer_id, "presigned membership taken");
        Ok(())
    }

    /// Peer `id` of network `net`: its key, record and revision.
    async fn peer_in(&self, net: &str, id: &str) -> Result<(String, PeerRecord, i64)> {
        let key = keys::peer(net, id);
        let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "peer {} not found in the network",
                canopy_proto::text::quoted(id)
            ))
        })?;
        Ok((key, decode(&kv)?, kv.mod_revision))
    }
}
