//! Hole punching, coordinated: an agent with no direct path to a peer asks on its Sync stream;
//! the request is written to the store (`punch/<network>`, overwritten by the next), and every
//! replica's watcher tells whichever of the two peers it holds a session of to probe the other's
//! outside addresses now. Both hear it at about the same moment, wherever their sessions are, so
//! each NAT sees its own node's probe leave before (or while) the other's arrives; a probe that
//! arrives first would leave a conntrack entry that makes a Linux NAT remap its node's port.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use canopy_proto::v1::{Punch, PunchRecord};
use prost::Message;

use super::{AgentIdentity, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::store::{EventKind, Op, Txn};

/// One pair is punched at most this often with the same outside addresses (either side may
/// ask; both usually do); new addresses on either side may be punched at once.
const PAIR_GAP: Duration = Duration::from_secs(10);
/// Pairs remembered for [`PAIR_GAP`], at most (more: the oldest are forgotten).
const MAX_RECENT: usize = 10_000;

/// What this replica remembers of recent punches, and its budget for writing them.
pub struct PunchState {
    /// (network, lower peer id, higher peer id, both sides' outside addresses) → when.
    recent: HashMap<(String, String, String, Vec<String>), Instant>,
    budget: crate::pacing::TokenBucket,
}

impl Default for PunchState {
    fn default() -> Self {
        Self {
            recent: HashMap::new(),
            // Punch writes per second this replica makes for all its agents.
            budget: crate::pacing::TokenBucket::new(200, 400),
        }
    }
}

impl PunchState {
    /// Whether the pair may be punched now (not within [`PAIR_GAP`], and within the budget);
    /// if so it counts as punched.
    fn admit(&mut self, network: &str, ab: [(&str, &[String]); 2], now: Instant) -> bool {
        let [(a, oa), (b, ob)] = ab;
        let ((x, ox), (y, oy)) = if a < b {
            ((a, oa), (b, ob))
        } else {
            ((b, ob), (a, oa))
        };
        let outside = ox.iter().chain(oy).cloned().collect();
        let key = (network.to_string(), x.to_string(), y.to_string(), outside);
        if self
            .recent
            .get(&key)
            .is_some_and(|t| now.saturating_duration_since(*t) < PAIR_GAP)
        {
            return false;
        }
        if self.recent.len() >= MAX_RECENT {
            self.recent
                .retain(|_, t| now.saturating_duration_since(*t) < PAIR_GAP);
        }
        if self.recent.len() >= MAX_RECENT || self.budget.admit(now).is_err() {
            return false;
        }
        self.recent.insert(key, now);
        true
    }
}

impl Controller {
    /// Agent `id` asks for a hole punch with peer `target`: granted only for a peer in its
    /// map (same network, the policy lets them talk) when either side has an outside address,
    /// and at most once per pair per [`PAIR_GAP`]; otherwise ignored (`Ok(false)`).
    pub async fn request_punch(&self, id: &AgentIdentity, target: &str) -> Result<bool> {
        if target.len() > 64 {
            return Err(Error::InvalidArgument("peer id is too long".into()));
        }
        let net = &id.network_id;
        let (Some(me), Some(other)) = (
            self.cache.peer(net, &id.peer_id),
            self.cache.peer(net, target),
        ) else {
            return Ok(false);
        };
        let useful = !me.outside.is_empty() || !other.outside.is_empty();
        if !useful || !self.cache.sees(net, &id.peer_id, target) {
            return Ok(false);
        }
        let now = self.clock.instant();
        let pair = [
            (id.peer_id.as_str(), &me.outside[..]),
            (target, &other.outside[..]),
        ];
        if !self.lock_punches().admit(net, pair, now) {
            return Ok(false);
        }
        let record = PunchRecord {
            a: id.peer_id.clone(),
            b: target.to_string(),
            at_unix_ms: self.clock.now_unix() * 1000,
        };
        let put = Op::put(keys::punch(net), record.encode_to_vec());
        self.store.txn(Txn::new().then(put)).await?;
        self.metrics.punches.inc();
        Ok(true)
    }

    /// Tells the sessions on this replica of a punch written to the store.
    fn deliver_punch(&self, network: &str, r: &PunchRecord) {
        for (me, other) in [(&r.a, &r.b), (&r.b, &r.a)] {
            if !self.sessions.has(me) {
                continue;
            }
            let Some(p) = self.cache.peer(network, other) else {
                continue;
            };
            let punch = Punch {
                peer_id: p.id,
                public_key: p.public_key,
                outside: p.outside,
            };
            if !self.sessions.punch(me, punch) {
                tracing::debug!(peer = %me, "punch not delivered: the session's box is full");
            }
        }
    }

    fn lock_punches(&self) -> std::sync::MutexGuard<'_, PunchState> {
        self.punches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Follows `punch/` in the store and hands each punch to the sessions on this replica. Best
/// effort: a broken watch is opened again from the next revision (a punch missed is asked
/// again by the agent later).
pub async fn follow(ctl: Controller) {
    loop {
        let mut w = match ctl.store.watch(keys::ALL_PUNCH.as_bytes(), 0).await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "punch watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(Ok(batch)) = w.recv().await {
            for e in batch.events.iter().filter(|e| e.kind == EventKind::Put) {
                let network = std::str::from_utf8(&e.kv.key)
                    .ok()
                    .and_then(|k| k.strip_prefix(keys::ALL_PUNCH));
                match (network, decode::<PunchRecord>(&e.kv)) {
                    (Some(n), Ok(r)) => ctl.deliver_punch(n, &r),
                    _ => tracing::warn!("undecodable punch record"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair<'a>(a: &'a str, b: &'a str, outside: &'a [String]) -> [(&'a str, &'a [String]); 2] {
        [(a, outside), (b, &[])]
    }

    #[test]
    fn a_pair_is_punched_once_per_gap_whichever_side_asks_unless_its_addresses_change() {
        let mut s = PunchState::default();
        let t = Instant::now();
        let o = vec!["198.51.100.1:1".to_string()];
        assert!(s.admit("n", pair("a", "b", &o), t));
        let b_asks = [("b", &[][..]), ("a", &o[..])];
        let later = t + Duration::from_secs(1);
        assert!(!s.admit("n", b_asks, later), "the other side asked too");
        assert!(s.admit("n", pair("a", "c", &o), t), "another pair");
        assert!(s.admit("m", pair("a", "b", &o), t), "another network");
        let moved = vec!["198.51.100.1:2".to_string()];
        assert!(
            s.admit("n", pair("a", "b", &moved), t),
            "a new outside address"
        );
        assert!(s.admit("n", pair("a", "b", &o), t + PAIR_GAP));
    }

    #[test]
    fn a_replica_writes_at_most_its_budget_of_punches() {
        let mut s = PunchState::default();
        let t = Instant::now();
        let granted = (0..1000)
            .filter(|i| s.admit("n", pair("a", &format!("p{i}"), &[]), t))
            .count();
        assert_eq!(granted, 400, "the burst, then nothing in the same instant");
    }
}
