//! The network lock on this node: the key set it trusts (pinned by the join string, or on
//! first use for a node enrolled before its network was locked), kept in the state directory,
//! and what it refused of the maps the controller sent. Every map and delta passes through
//! [`Guard`] before anything applies it; a node that trusts a key set never applies a peer or
//! route that key set did not sign, whatever the controller sends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use canopy_proto::lock::Trust;
use canopy_proto::v1::{NetworkDelta, NetworkMap, PolicyLock};

use crate::state::StateDir;

mod policy;

/// Gauges for metrics: statements refused in the map held now, refusals since start, and the
/// serial of the trusted key set (0: none).
#[derive(Debug, Default)]
pub struct LockStats {
    pub refused_now: AtomicU64,
    pub refused_total: AtomicU64,
    pub serial: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Guard {
    network_id: String,
    pin: Option<[u8; 32]>,
    trust: Option<Trust>,
    /// Peers of the map held now with something refused: how many statements, and why.
    refused: BTreeMap<String, (u32, String)>,
    /// Why the last key set change shown was not taken, if it was not.
    chain_error: Option<String>,
    /// The signed policy in force here (the newest verified), and its serial.
    policy: Option<(PolicyLock, u64)>,
    state: Option<StateDir>,
    /// What lock.json says now: written again only when it changes (not on every delta).
    published: Option<serde_json::Value>,
    pub stats: std::sync::Arc<LockStats>,
}

impl Guard {
    /// The guard of an enrolled node: its pin, and the key set it trusts already.
    pub fn new(network_id: &str, pin: Option<[u8; 32]>, state: Option<StateDir>) -> Self {
        let trust = state
            .as_ref()
            .and_then(|s| s.lock_trust().ok().flatten())
            .map(Trust::new);
        let mut g = Self {
            network_id: network_id.to_string(),
            pin,
            trust,
            state,
            ..Default::default()
        };
        let held = g
            .state
            .as_ref()
            .and_then(|s| s.lock_policy().ok().flatten());
        if let (Some(t), Some(pl)) = (&g.trust, held)
            && let Ok(st) = policy::verify(t, network_id, &pl)
        {
            g.policy = Some((pl, st.serial));
        }
        g.publish();
        g
    }

    /// The key set this node trusts, if any.
    pub fn trusted(&self) -> Option<&canopy_proto::v1::LockKeySet> {
        self.trust.as_ref().map(Trust::key_set)
    }

    /// Whether this node trusts a key set (and so verifies everything).
    pub fn locked(&self) -> bool {
        self.trust.is_some()
    }

    /// Statements refused in the map held now.
    pub fn refused(&self) -> u32 {
        self.refused.values().map(|(n, _)| *n).sum()
    }

    /// Takes what the key set it trusts allows of a full map (moving to a newer key set the
    /// map's chain shows first).
    pub fn full(&mut self, map: &mut NetworkMap, now: i64) {
        self.follow_chain(map);
        self.refused.clear();
        if let Some(t) = &self.trust {
            for (id, a) in t.admit_map(map, now) {
                self.refused.insert(id, (a.refused(), reason(&a)));
            }
        } else if self.pin.is_some() {
            // Pinned, but the pinned key set never showed: nothing can be checked, so nothing
            // is taken (fails closed).
            for p in map.peers.drain(..) {
                self.refused
                    .insert(p.peer_id, (1, "no trusted key set".into()));
            }
        }
        self.follow_policy(map, now);
        self.after();
    }

    /// Takes the map's signed policy if it verifies and is not older than the one held, then
    /// puts this node's part of the held one in the map. Without a signed policy held, the
    /// controller's part stays (it can allow at most what no policy allows).
    fn follow_policy(&mut self, map: &mut NetworkMap, now: i64) {
        let Some(t) = &self.trust else {
            return;
        };
        if let Some(pl) = &map.policy_lock {
            let held = self.policy.as_ref().map_or(0, |(_, s)| *s);
            match policy::verify(t, &self.network_id, pl) {
                Ok(st) if st.serial >= held => {
                    if st.serial > held
                        && let Some(s) = &self.state
                        && let Err(e) = s.save_lock_policy(pl)
                    {
                        tracing::error!(error = %e, "could not keep the signed policy");
                    }
                    self.policy = Some((pl.clone(), st.serial));
                }
                Ok(st) => {
                    let why = format!("policy serial {} is older than {held}", st.serial);
                    self.refused.insert("policy".into(), (1, why));
                }
                Err(why) => {
                    self.refused.insert("policy".into(), (1, why));
                }
            }
        }
        if let Some((pl, _)) = &self.policy {
            map.policy = Some(policy::own_part(t, &pl.text, map, now));
        }
    }

    /// Takes what the key set allows of a delta: a refused upsert becomes a removal.
    pub fn delta(&mut self, delta: &mut NetworkDelta, now: i64) {
        for id in &delta.removed {
            self.refused.remove(id);
        }
        if self.trust.is_some() && self.policy.is_some() {
            // This node's part comes from the signed policy only (a policy change is a full map).
            delta.policy_changed = false;
            delta.policy = None;
        }
        if let Some(t) = &self.trust {
            for (id, a) in t.admit_delta(&self.network_id, delta, now) {
                match a.refused() {
                    0 => self.refused.remove(&id),
                    n => self.refused.insert(id, (n, reason(&a))),
                };
            }
        } else if self.pin.is_some() {
            for p in delta.upserted.drain(..) {
                self.refused
                    .insert(p.peer_id.clone(), (1, "no trusted key set".into()));
                delta.removed.push(p.peer_id);
            }
        }
        self.after();
    }

    /// Establishes trust (the pin, else first use) and follows the map's chain.
    fn follow_chain(&mut self, map: &NetworkMap) {
        let Some(chain) = &map.lock else {
            return;
        };
        let before = self.trust.as_ref().map(|t| t.key_set().clone());
        if self.trust.is_none() {
            let first = match &self.pin {
                Some(pin) => Trust::pinned(&self.network_id, chain, pin),
                None => {
                    tracing::warn!(
                        "the network is locked: trusting its first key set (this node enrolled before the lock)"
                    );
                    Trust::first_use(&self.network_id, chain)
                }
            };
            match first {
                Ok(t) => self.trust = Some(t),
                Err(e) => {
                    // With a pin, nothing is taken until the pinned set shows up.
                    tracing::error!(error = %e, "refusing the network's lock key sets");
                    self.chain_error = Some(e.to_string());
                    if self.pin.is_some() {
                        self.trust = None;
                    }
                    return;
                }
            }
        }
        if let Some(t) = &mut self.trust {
            self.chain_error = match t.advance(chain) {
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, serial = t.key_set().serial, "refused a key set change");
                    Some(e.to_string())
                }
            };
        }
        let after = self.trust.as_ref().map(|t| t.key_set());
        if after != before.as_ref()
            && let (Some(s), Some(set)) = (&self.state, after)
        {
            if let Err(e) = s.save_lock_trust(set) {
                tracing::error!(error = %e, "could not keep the trusted key set");
            }
            tracing::info!(
                serial = set.serial,
                keys = set.keys.len(),
                "trusting the network's lock key set"
            );
        }
    }

    fn after(&mut self) {
        let n = u64::from(self.refused());
        let before = self.stats.refused_now.swap(n, Ordering::Relaxed);
        if n > before {
            self.stats
                .refused_total
                .fetch_add(n - before, Ordering::Relaxed);
        }
        if n > 0 && n != before {
            tracing::warn!(
                refused = n,
                "refused peers or routes not signed by a trusted key"
            );
        }
        self.publish();
    }

    fn publish(&mut self) {
        let serial = self.trust.as_ref().map_or(0, |t| t.key_set().serial);
        self.stats.serial.store(serial, Ordering::Relaxed);
        let Some(s) = &self.state else {
            return;
        };
        let v = serde_json::json!({
            "locked": self.trust.is_some(),
            "serial": serial,
            "keys": self.trust.as_ref().map(|t| t.key_set().keys.iter().map(hex::encode).collect::<Vec<_>>()),
            "refused": self.refused.iter().map(|(id, (n, why))| serde_json::json!({"peer_id": id, "count": n, "reason": why})).collect::<Vec<_>>(),
            "chain_error": self.chain_error,
            "policy_serial": self.policy.as_ref().map(|(_, s)| s),
        });
        if self.published.as_ref() == Some(&v) {
            return;
        }
        if let Err(e) = s.save_lock_status(&v) {
            tracing::debug!(error = %e, "could not write lock.json");
        }
        self.published = Some(v);
    }
}

/// A `Signed` kept in the enrollment (base64 of its encoding).
pub fn decode_signed(b64: Option<&str>) -> Option<canopy_proto::v1::Signed> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64?)
        .ok()?;
    prost::Message::decode(bytes.as_slice()).ok()
}

pub fn encode_signed(s: &canopy_proto::v1::Signed) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(s))
}

/// A presigned join string: this node's membership signed with its delegate key (which is
/// then forgotten), and the delegation, both encoded for the enrollment; `None` without one.
/// The delegation must be the pinned key set's for this network.
pub fn presign(
    join: &canopy_proto::join::JoinString,
    network_id: &str,
    peer_id: &str,
    public_key: [u8; 32],
    map: &NetworkMap,
) -> Result<Option<(String, String)>, String> {
    use canopy_proto::lock::{self, Kind};
    let Some((delegation, seed)) = &join.lock_delegate else {
        return Ok(None);
    };
    let (Some(pin), Some(chain)) = (&join.lock_sha256, &map.lock) else {
        return Err("a presigned join string for a network that is not locked".into());
    };
    let trust = Trust::pinned(network_id, chain, pin).map_err(|e| e.to_string())?;
    let d: canopy_proto::v1::LockDelegation =
        lock::verify(Kind::Delegation, delegation, &trust.key_set().keys)
            .map_err(|e| format!("the join string's delegation: {e}"))?;
    let key = lock::signing_key(*seed);
    if d.key != key.verifying_key().to_bytes() || d.network_id != network_id {
        return Err("the join string's delegation is not for its key and network".into());
    }
    let me = canopy_proto::v1::LockedPeer {
        network_id: network_id.to_string(),
        public_key: public_key.to_vec(),
        addresses: map.addresses.clone(),
        tags: d.tags.clone(),
        expires_at_unix: d.expires_at_unix,
        peer_id: peer_id.to_string(),
    };
    let signed = lock::sign(Kind::Peer, &me, &key);
    Ok(Some((encode_signed(&signed), encode_signed(delegation))))
}

fn reason(a: &canopy_proto::lock::Admit) -> String {
    match a {
        canopy_proto::lock::Admit::Refused(e) => e.to_string(),
        canopy_proto::lock::Admit::Taken { stripped } => {
            format!("{stripped} route(s) not signed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_proto::lock::{Kind, sign, signing_key};
    use canopy_proto::v1::{LockChain, LockKeySet, LockedPeer, RemotePeer};

    fn map(k: &canopy_proto::lock::SigningKey) -> NetworkMap {
        let set = LockKeySet {
            network_id: "net_1".into(),
            keys: vec![k.verifying_key().to_bytes().to_vec()],
            serial: 1,
            revoked: vec![],
        };
        let m = LockedPeer {
            network_id: "net_1".into(),
            public_key: vec![2; 32],
            addresses: vec!["100.64.0.2/32".into()],
            peer_id: "p2".into(),
            ..Default::default()
        };
        NetworkMap {
            network_id: "net_1".into(),
            peers: vec![RemotePeer {
                peer_id: "p2".into(),
                public_key: vec![2; 32],
                allowed_ips: m.addresses.clone(),
                lock: Some(sign(Kind::Peer, &m, k)),
                ..Default::default()
            }],
            lock: Some(LockChain {
                key_sets: vec![sign(Kind::KeySet, &set, k)],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn lock_json_is_written_when_what_it_says_changes_not_on_every_delta() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let file = dir.path().join("lock.json");
        let k = signing_key([1; 32]);
        let mut g = Guard::new("net_1", None, Some(state));
        assert!(file.exists());
        std::fs::remove_file(&file).unwrap();
        g.delta(&mut NetworkDelta::default(), 0);
        g.full(&mut NetworkMap::default(), 0);
        assert!(!file.exists(), "nothing changed: not written again");
        g.full(&mut map(&k), 0);
        assert!(file.exists(), "now locked: written");
    }

    #[test]
    fn a_pinned_node_takes_nothing_until_its_pinned_key_set_shows() {
        // The controller shows a key set of its own: not the pinned one.
        let evil = signing_key([9; 32]);
        let mut g = Guard::new("net_1", Some([7; 32]), None);
        let mut m = map(&evil);
        g.full(&mut m, 0);
        assert!(m.peers.is_empty(), "nothing taken");
        assert_eq!(g.refused(), 1);
        let mut d = NetworkDelta {
            upserted: map(&evil).peers,
            ..Default::default()
        };
        g.delta(&mut d, 0);
        assert!(d.upserted.is_empty());
        assert_eq!(d.removed, vec!["p2".to_string()]);
        // The pinned set.
        let k = signing_key([1; 32]);
        let good = map(&k);
        let pin = canopy_proto::lock::pin(good.lock.as_ref().unwrap()).unwrap();
        let mut g = Guard::new("net_1", Some(pin), None);
        let mut m = good.clone();
        g.full(&mut m, 0);
        assert_eq!(m.peers.len(), 1);
        assert_eq!(g.refused(), 0);
    }
}
