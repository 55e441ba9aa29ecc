//! Live Sync sessions on this replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::Revision;

/// Live Sync sessions on this replica: one per peer. Opening a session for a peer that has
/// one tells the old one to end (a credential cannot hold many streams, each with a map); the
/// session number makes the old one's close leave the new one alone.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<SessionTable>>);

struct SessionEntry {
    number: u64,
    network: String,
    acked: Revision,
    /// Peers and routes its agent refused in the map it acked last (a locked network).
    lock_refused: u32,
    /// When it opened (Unix seconds), and its agent's data plane as last reported.
    opened_unix: i64,
    health: Option<super::health::Health>,
    /// Notified when a newer session of the same peer replaces this one.
    replaced: Arc<tokio::sync::Notify>,
    /// Hole punches for the session to pass on (bounded: a full box drops the punch).
    punches: tokio::sync::mpsc::Sender<canopy_proto::v1::Punch>,
}

/// What a newly opened session holds: its number, what tells it it was replaced, and where
/// its punches arrive.
pub struct Opened {
    pub number: u64,
    pub replaced: Arc<tokio::sync::Notify>,
    pub punches: tokio::sync::mpsc::Receiver<canopy_proto::v1::Punch>,
}

/// (last session number, peer id → its live session).
type SessionTable = (u64, HashMap<String, SessionEntry>);

impl Sessions {
    /// Registers a new session of `peer` (of `network`), opened at `now` (Unix seconds),
    /// ending the one it had.
    pub fn open(&self, network: &str, peer: &str, now: i64) -> Opened {
        let mut g = self.lock();
        g.0 += 1;
        let number = g.0;
        let replaced = Arc::new(tokio::sync::Notify::new());
        let (tx, punches) = tokio::sync::mpsc::channel(4);
        let entry = SessionEntry {
            number,
            network: network.to_string(),
            acked: 0,
            lock_refused: 0,
            opened_unix: now,
            health: None,
            replaced: replaced.clone(),
            punches: tx,
        };
        if let Some(old) = g.1.insert(peer.to_string(), entry) {
            old.replaced.notify_one();
        }
        Opened {
            number,
            replaced,
            punches,
        }
    }
    /// Hands `punch` to `peer`'s live session on this replica; `false`: none here (or its
    /// box is full).
    pub fn punch(&self, peer: &str, punch: canopy_proto::v1::Punch) -> bool {
        self.lock()
            .1
            .get(peer)
            .is_some_and(|e| e.punches.try_send(punch).is_ok())
    }
    /// Whether `peer` has a live session on this replica.
    pub fn has(&self, peer: &str) -> bool {
        self.lock().1.contains_key(peer)
    }
    /// `peer`'s session `session` applied revision `rev`, refusing `lock_refused` statements
    /// (`None`: as many as before).
    pub fn ack(&self, peer: &str, session: u64, rev: Revision, lock_refused: Option<u32>) {
        if let Some(e) = self.lock().1.get_mut(peer)
            && e.number == session
        {
            e.acked = e.acked.max(rev);
            e.lock_refused = lock_refused.unwrap_or(e.lock_refused);
        }
    }
    /// What `peer`'s agent refused of its last acked map, if it has a session here.
    pub fn lock_refused(&self, peer: &str) -> Option<u32> {
        self.lock().1.get(peer).map(|e| e.lock_refused)
    }
    /// What `peer`'s session `session` last heard of its data plane.
    pub fn set_health(&self, peer: &str, session: u64, h: super::health::Health) {
        if let Some(e) = self.lock().1.get_mut(peer)
            && e.number == session
        {
            e.health = Some(h);
        }
    }
    /// When `peer`'s live session opened and its data plane as last reported.
    pub fn health(&self, peer: &str) -> Option<(i64, Option<super::health::Health>)> {
        self.lock().1.get(peer).map(|e| (e.opened_unix, e.health))
    }
    pub fn close(&self, peer: &str, session: u64) {
        let mut g = self.lock();
        if g.1.get(peer).is_some_and(|e| e.number == session) {
            g.1.remove(peer);
        }
    }
    /// The revision the peer's live session acknowledged, if it has one.
    pub fn get(&self, peer: &str) -> Option<Revision> {
        self.lock().1.get(peer).map(|e| e.acked)
    }
    /// Per network with live sessions here: the revision each acknowledged, lowest first.
    pub fn by_network(&self) -> HashMap<String, Vec<Revision>> {
        let mut out: HashMap<String, Vec<Revision>> = HashMap::new();
        for e in self.lock().1.values() {
            out.entry(e.network.clone()).or_default().push(e.acked);
        }
        out.values_mut().for_each(|v| v.sort_unstable());
        out
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
