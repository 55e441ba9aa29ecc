//! A peer as configured and as the engine keeps it, and what the engine reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use ipnetwork::IpNetwork;

use crate::Outbox;
use crate::filter::Rules;

/// A peer as configured (wg-quick file, UAPI or the controller's map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub persistent_keepalive: Option<u16>,
}

/// What `wg show` reports for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub config: PeerConfig,
    /// Time since the last completed handshake, by boringtun's clock.
    pub since_handshake: Option<Duration>,
    /// Packets from this peer the access policy refused.
    pub policy_drops: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Handshake initiations sent, and attempts given up unanswered (90 s of retries).
    pub handshake_attempts: u64,
    pub handshake_failures: u64,
}

/// Counters of packets the engine refused, for tests and `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// Decrypted packets whose source was not in the sending peer's allowed IPs.
    pub spoofed: u64,
    /// TUN packets with no peer routed for their destination (or no endpoint yet).
    pub no_route: u64,
    /// Datagrams that failed to parse, authenticate or decrypt, or came from unknown keys.
    pub invalid: u64,
    /// Decrypted packets the access policy refused (not a reply, no rule allows them).
    pub policy: u64,
}

pub(crate) struct Peer {
    pub(crate) tunn: Tunn,
    pub(crate) config: PeerConfig,
    /// What it may open on this node, while a policy is in force.
    pub(crate) inbound: Arc<Rules>,
    pub(crate) policy_drops: u64,
    pub(crate) handshake_attempts: u64,
    pub(crate) handshake_failures: u64,
    /// The last attempt's expiry was counted (boringtun says so at every tick after it).
    pub(crate) expiry_counted: bool,
    /// Other addresses it may be reached at (the controller's candidates): a handshake
    /// initiation goes to each of them too, and the first that answers becomes the endpoint.
    pub(crate) candidates: Vec<SocketAddr>,
    /// Candidates probed only while a hole punch is on (a NAT's outside addresses): a probe
    /// that reaches a NAT before its own node has sent out leaves a conntrack entry that makes
    /// a Linux NAT remap its node's port, so these are probed only when both sides do at once.
    pub(crate) quiet: Vec<SocketAddr>,
    /// Until when a hole punch is on.
    pub(crate) punch_until: Option<Instant>,
    /// A handshake initiation went out (it may still wait for an answer).
    pub(crate) initiated: bool,
    /// When a timer tick first saw that initiation unanswered, and whether it was sent again
    /// early (once: WireGuard's own retry comes 5 s on).
    pub(crate) waiting_since: Option<Instant>,
    pub(crate) retried_early: bool,
    /// When an authenticated packet last came from the endpoint.
    pub(crate) heard: Option<Instant>,
    /// When better candidates were last probed, and the wait before the next probe (doubling
    /// while they stay silent, from [`PROBE_UP`] to [`PROBE_MAX`]).
    pub(crate) probed: Option<Instant>,
    pub(crate) probe_gap: Duration,
    /// The endpoint moved: tell the other side at once (a keepalive on the new path), so it
    /// follows without waiting for traffic.
    pub(crate) moved: bool,
}

/// A less preferred candidate does not take the endpoint over from one heard this recently.
const ROAM_HOLD: Duration = Duration::from_secs(5);
/// How soon a peer reached by a less preferred candidate (the relay, a NAT's address) is
/// probed at the better ones, and how far apart probes get while those stay silent.
pub const PROBE_UP: Duration = Duration::from_secs(2);
pub const PROBE_MAX: Duration = Duration::from_secs(64);

/// How long a handshake waits for an answer before it is sent again early (once).
pub const EARLY_RETRY: Duration = Duration::from_secs(1);

/// How long a hole punch probes a peer's quiet candidates (every timer tick).
pub const PUNCH_WINDOW: Duration = Duration::from_secs(3);

/// The size of a handshake initiation.
const INITIATION_LEN: usize = 148;
/// Candidate addresses kept per peer, at most.
pub const MAX_CANDIDATES: usize = 8;

impl Peer {
    /// Where `a` stands among the candidates (lower: preferred); `None` if it is not one.
    fn rank(&self, a: &SocketAddr) -> Option<usize> {
        self.candidates.iter().position(|c| c == a)
    }

    /// Whether `c` may be probed now (it is not quiet, or a punch is on).
    fn probing(&self, c: &SocketAddr) -> bool {
        self.punch_until.is_some() || !self.quiet.contains(c)
    }

    /// Sends a new handshake initiation (to the endpoint and every candidate it may probe)
    /// if one went out and no session came of it yet.
    pub(crate) fn retry_handshake(&mut self, out: &mut Outbox) {
        if !self.initiated || self.tunn.time_since_last_handshake().is_some() {
            return;
        }
        let off = out.grow(INITIATION_LEN + 64);
        match self
            .tunn
            .format_handshake_initiation(&mut out.buf[off..], true)
        {
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                self.send(off, n, out);
            }
            _ => out.keep(off, 0),
        }
    }

    /// For a peer with other candidates (a managed one: the relay among them), a handshake
    /// unanswered for [`EARLY_RETRY`] is sent again once, to every candidate, before WireGuard's
    /// own retry at 5 s: the first may have gone to the relay before the other side was bound
    /// there. A peer with its endpoint only keeps WireGuard's timers exactly. A session ends
    /// the wait.
    pub(crate) fn early_retry(&mut self, now: Instant, out: &mut Outbox) {
        if self.tunn.time_since_last_handshake().is_some() {
            (self.initiated, self.waiting_since, self.retried_early) = (false, None, false);
            return;
        }
        let others = self
            .candidates
            .iter()
            .any(|c| Some(*c) != self.config.endpoint);
        if !self.initiated || self.retried_early || !others {
            return;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= EARLY_RETRY {
            self.retried_early = true;
            self.retry_handshake(out);
        }
    }

    /// Opens a hole punch of [`PUNCH_WINDOW`]: the quiet candidates are probed now and every
    /// timer tick until it closes or the peer is reached directly.
    pub(crate) fn punch(&mut self, now: Instant, out: &mut Outbox) {
        if !self.quiet.is_empty() {
            self.punch_until = Some(now + PUNCH_WINDOW);
            self.punch_probe(now, out);
        }
    }

    /// While a punch is on: a keepalive (a handshake initiation without a session) to each
    /// quiet candidate. It closes when the window ends or the endpoint is no longer behind the
    /// quiet candidates (the relay): one of them, a better one, or an address that is none of
    /// them (a NAT that remapped the port).
    pub(crate) fn punch_probe(&mut self, now: Instant, out: &mut Outbox) {
        let Some(until) = self.punch_until else {
            return;
        };
        let last_quiet = self.candidates.iter().rposition(|c| self.quiet.contains(c));
        let direct = match self.config.endpoint.map(|e| self.rank(&e)) {
            Some(Some(r)) => last_quiet.is_some_and(|q| r <= q),
            Some(None) => true,
            None => false,
        };
        if now >= until || direct {
            self.punch_until = None;
            return;
        }
        let off = out.grow(INITIATION_LEN + 64);
        match self.tunn.encapsulate(&[], &mut out.buf[off..]) {
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                for c in &self.quiet {
                    out.push_net(*c, off, n);
                }
            }
            _ => out.keep(off, 0),
        }
    }

    /// Roaming: the endpoint follows the latest authenticated packet, except that a less
    /// preferred candidate (the relay after a direct address) does not take over from an
    /// endpoint heard within [`ROAM_HOLD`]: two paths that both carry packets settle on the
    /// better one.
    pub(crate) fn roam(&mut self, from: SocketAddr, now: Option<Instant>) {
        if let Some(cur) = self.config.endpoint
            && cur != from
            && let (Some(f), Some(c)) = (self.rank(&from), self.rank(&cur))
            && f > c
            && let (Some(now), Some(heard)) = (now, self.heard)
            && now.saturating_duration_since(heard) < ROAM_HOLD
        {
            return;
        }
        if self.config.endpoint.is_some_and(|cur| cur != from) {
            self.moved = true;
            self.probe_gap = PROBE_UP;
        }
        self.config.endpoint = Some(from);
        self.heard = now;
    }

    /// Tells the other side of a move (a keepalive on the new path), and while the endpoint
    /// is a less preferred candidate, sends a keepalive to each better one every
    /// [`PROBE_UP`]: one that arrives makes the other side roam to the better path, and its
    /// keepalive back makes this side follow.
    pub(crate) fn probe_up(&mut self, now: Instant, out: &mut Outbox) {
        if std::mem::take(&mut self.moved)
            && let Some(ep) = self.config.endpoint
            && self.tunn.time_since_last_handshake().is_some()
        {
            let off = out.grow(64);
            match self.tunn.encapsulate(&[], &mut out.buf[off..]) {
                TunnResult::WriteToNetwork(b) => {
                    let n = b.len();
                    out.push_net(ep, off, n);
                }
                _ => out.keep(off, 0),
            }
        }
        let Some(k) = self.config.endpoint.and_then(|e| self.rank(&e)) else {
            return;
        };
        if k == 0
            || self
                .probed
                .is_some_and(|t| now.saturating_duration_since(t) < PROBE_UP)
            || self.tunn.time_since_last_handshake().is_none()
        {
            return;
        }
        self.probed = Some(now);
        self.probe_gap = (self.probe_gap * 2).min(PROBE_MAX);
        let off = out.grow(64);
        match self.tunn.encapsulate(&[], &mut out.buf[off..]) {
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                for c in self.candidates[..k].iter().filter(|c| self.probing(c)) {
                    out.push_net(*c, off, n);
                }
            }
            _ => out.keep(off, 0),
        }
    }

    /// Sends the datagram at `off..off + n` to the endpoint; a handshake initiation also to
    /// each other candidate, so the first address that answers becomes the endpoint (the
    /// answer's source, by roaming): a LAN path wins over a NAT's, a reachable one over a dead
    /// one. Nowhere to send: dropped.
    pub(crate) fn send(&mut self, off: usize, n: usize, out: &mut Outbox) {
        let initiation = n == INITIATION_LEN && out.buf[off] == 1;
        self.initiated |= initiation;
        if initiation {
            self.handshake_attempts += 1;
            self.expiry_counted = false;
        }
        let endpoint = self.config.endpoint;
        let others = self
            .candidates
            .iter()
            .filter(|c| Some(**c) != endpoint && self.probing(c));
        let mut sent = false;
        for to in endpoint
            .into_iter()
            .chain(others.copied().filter(|_| initiation))
        {
            out.push_net(to, off, n);
            sent = true;
        }
        if !sent {
            out.keep(off, 0);
        }
    }
}
