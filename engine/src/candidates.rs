//! The addresses a peer may be reached at besides its endpoint, and hole punching.

use std::net::SocketAddr;
use std::time::Instant;

use crate::peer::{self, MAX_CANDIDATES};
use crate::{Engine, Outbox};

impl Engine {
    /// Sets the other addresses peer `key` may be reached at (at most [`MAX_CANDIDATES`], in
    /// order of preference); its handshake initiations go to each.
    pub fn set_candidates(&mut self, key: &[u8; 32], mut candidates: Vec<SocketAddr>) {
        candidates.dedup();
        candidates.truncate(MAX_CANDIDATES);
        if let Some(p) = self.by_key.get(key).and_then(|i| self.peers.get_mut(i))
            && p.candidates != candidates
        {
            p.candidates = candidates;
            p.probe_gap = peer::PROBE_UP;
        }
    }

    /// Marks which of peer `key`'s candidates are probed only during a hole punch.
    pub fn set_quiet(&mut self, key: &[u8; 32], quiet: Vec<SocketAddr>) {
        if let Some(p) = self.by_key.get(key).and_then(|i| self.peers.get_mut(i)) {
            p.quiet = quiet;
        }
    }

    /// Punches a hole to peer `key`: its quiet candidates are probed at once and for
    /// [`PUNCH_WINDOW`](peer::PUNCH_WINDOW) (the controller tells the peer the same).
    pub fn punch(&mut self, key: &[u8; 32], now: Instant, out: &mut Outbox) {
        if let Some(p) = self.by_key.get(key).and_then(|i| self.peers.get_mut(i)) {
            p.punch(now, out);
        }
    }

    /// Adds `addr` as peer `key`'s last candidate (if it has room and not already). A
    /// handshake still waiting for an answer starts again at once, to the new address too,
    /// rather than at its next retry 5 s on (the relay that just became ready gets it).
    pub fn add_candidate(&mut self, key: &[u8; 32], addr: SocketAddr, out: &mut Outbox) {
        if let Some(p) = self.by_key.get(key).and_then(|i| self.peers.get_mut(i))
            && !p.candidates.contains(&addr)
            && p.candidates.len() < MAX_CANDIDATES
        {
            p.candidates.push(addr);
            p.retry_handshake(out);
        }
    }
}
