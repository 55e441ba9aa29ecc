#![cfg_attr(test, allow(clippy::unwrap_used))]
//! Sans-IO WireGuard core: a peer table, allowed-IPs routing and one boringtun [`Tunn`] per peer.
//!
//! Packets go in (from the TUN device, from the network) in batches together with `now`;
//! [`Engine::poll_timeout`] says when timers are next due and [`Engine::handle_timeout`] runs
//! them. What to send and what to deliver comes out in an [`Outbox`] whose buffer is reused,
//! so the steady state allocates nothing per packet. No sockets, no threads, no clock of its
//! own: the I/O shell (`canopy_agent::dataplane`) drives it.
//!
//! Rules it enforces:
//! - a decrypted packet whose inner source is not routed to the peer it came from is dropped
//!   (anti-spoofing);
//! - a handshake from a static key that is not a configured peer gets no answer;
//! - a peer's endpoint follows its latest authenticated packet (roaming);
//! - one handshake rate limiter is shared by all peers and reset each second of `now`; it sees
//!   the sender's address, so cookie replies work under load.
//!
//! Where the clock is read: the engine reads none. boringtun 0.7 reads its own monotonic clock
//! inside each [`Tunn`] (handshake timestamps, session timers) and its cookie rate limiter, and
//! keeps its deadlines to itself: it must be polled, which is what [`TIMER_INTERVAL`] and
//! [`Engine::poll_timeout`] are for. That is the only clock under the engine; the timer tests
//! in `engine/sim` replace it with boringtun's `mock-instant` feature, in a cargo workspace of
//! their own so that feature never reaches a shipped binary. Ages (time since a handshake) come
//! out as durations; the caller turns them into wall-clock times.

pub mod allowed_ips;
mod candidates;
pub mod filter;
mod outbox;
mod peer;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnetwork::IpNetwork;

use allowed_ips::AllowedIps;
use filter::{Allow, Conntrack, Rules};
pub use outbox::{Outbox, TUN_HEADROOM};
use peer::Peer;
pub use peer::{Drops, MAX_CANDIDATES, PeerConfig, PeerStatus};

/// Handshake initiations per second before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often boringtun's timers (handshake retry, rekey, keepalives, session expiry) are
/// checked while the engine has peers: boringtun keeps its deadlines internal and must be
/// polled; 250 ms is what its own device uses.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);
/// How long the handshake rate limiter counts before it starts again.
const RATE_LIMIT_PERIOD: Duration = Duration::from_secs(1);
/// Room boringtun needs beyond a packet: header + tag, and handshake messages (148 bytes).
const OVERHEAD: usize = 256;

pub struct Engine {
    private: StaticSecret,
    /// False with the all-zero key, wg's "no private key": no handshake is made or answered,
    /// as on the kernel's interface before `wg set private-key`.
    has_key: bool,
    public: PublicKey,
    peers: HashMap<u32, Peer>,
    by_key: HashMap<[u8; 32], u32>,
    routes: AllowedIps<u32>,
    limiter: Arc<RateLimiter>,
    next_index: u32,
    /// When the rate limiter last started counting again.
    last_reset: Option<Instant>,
    /// When timers are next due (none run yet: at once).
    timers_due: Option<Instant>,
    /// The time of the batch being handled.
    now: Option<Instant>,
    /// The access policy's rules by peer key; `None`: no policy, every packet passes.
    policy: Option<HashMap<[u8; 32], Arc<Rules>>>,
    conntrack: Conntrack,
    pub drops: Drops,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl Engine {
    pub fn new(private: [u8; 32]) -> Self {
        let has_key = private != [0; 32];
        let private = StaticSecret::from(private);
        let public = PublicKey::from(&private);
        Self {
            has_key,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            routes: AllowedIps::new(),
            next_index: 1,
            last_reset: None,
            timers_due: None,
            now: None,
            policy: None,
            conntrack: Conntrack::default(),
            drops: Drops::default(),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The private key as used (clamped for X25519, as the kernel and wireguard-go show it);
    /// `None` without one.
    pub fn private_key(&self) -> Option<[u8; 32]> {
        if !self.has_key {
            return None;
        }
        let mut k = self.private.to_bytes();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Some(k)
    }

    /// Replaces the private key; every peer's session restarts (as `wg set private-key` does).
    /// The key already in use changes nothing (`wg syncconf` sends it with every change).
    pub fn set_private_key(&mut self, private: [u8; 32]) {
        if private == self.private.to_bytes() {
            return;
        }
        let configs: Vec<PeerConfig> = self.peers.values().map(|p| p.config.clone()).collect();
        *self = Self {
            drops: self.drops,
            timers_due: self.timers_due,
            policy: self.policy.take(),
            ..Self::new(private)
        };
        for c in configs {
            self.set_peer(c);
        }
    }

    fn alloc_index(&mut self) -> u32 {
        loop {
            let i = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if self.next_index == 0 {
                self.next_index = 1;
            }
            if !self.peers.contains_key(&i) {
                return i;
            }
        }
    }

    /// Adds a peer or updates one in place. An update that changes only the endpoint or the
    /// allowed IPs keeps the session; a new preshared key or keepalive starts a new one.
    pub fn set_peer(&mut self, config: PeerConfig) {
        let idx = match self.by_key.get(&config.public_key) {
            Some(&idx) => {
                let keep = self.peers.get(&idx).is_some_and(|p| {
                    p.config.preshared_key == config.preshared_key
                        && p.config.persistent_keepalive == config.persistent_keepalive
                });
                if !keep {
                    self.remove_peer(&config.public_key);
                    return self.set_peer(config);
                }
                idx
            }
            None => {
                let idx = self.alloc_index();
                let tunn = Tunn::new(
                    self.private.clone(),
                    PublicKey::from(config.public_key),
                    config.preshared_key,
                    config.persistent_keepalive,
                    idx,
                    Some(self.limiter.clone()),
                );
                self.by_key.insert(config.public_key, idx);
                let inbound = self.rules_of(&config.public_key);
                self.peers.insert(
                    idx,
                    Peer {
                        tunn,
                        config: config.clone(),
                        inbound,
                        policy_drops: 0,
                        handshake_attempts: 0,
                        handshake_failures: 0,
                        expiry_counted: false,
                        candidates: Vec::new(),
                        quiet: Vec::new(),
                        punch_until: None,
                        initiated: false,
                        waiting_since: None,
                        retried_early: false,
                        heard: None,
                        probed: None,
                        probe_gap: peer::PROBE_UP,
                        moved: false,
                    },
                );
                idx
            }
        };
        // The peer's routes are exactly its config's allowed IPs (an IP taken by another peer
        // leaves this one's list), so they are removed one probe each, not by a scan of every
        // route: applying a full map of N peers stays O(N).
        let old: Vec<IpNetwork> = self
            .peers
            .get(&idx)
            .map(|p| p.config.allowed_ips.clone())
            .unwrap_or_default();
        for net in &old {
            self.routes.remove_if(net, &idx);
        }
        for net in &config.allowed_ips {
            // An allowed IP belongs to one peer: taking it moves it from its previous owner.
            if let Some(prev) = self.routes.insert(net, idx)
                && prev != idx
                && let Some(p) = self.peers.get_mut(&prev)
            {
                p.config.allowed_ips.retain(|n| n != net);
            }
        }
        if let Some(p) = self.peers.get_mut(&idx) {
            let endpoint = config.endpoint.or(p.config.endpoint);
            p.config = PeerConfig { endpoint, ..config };
        }
    }

    pub fn remove_peer(&mut self, key: &[u8; 32]) -> bool {
        let Some(idx) = self.by_key.remove(key) else {
            return false;
        };
        if let Some(p) = self.peers.remove(&idx) {
            for net in &p.config.allowed_ips {
                self.routes.remove_if(net, &idx);
            }
        }
        self.conntrack.forget_peer(idx);
        true
    }

    /// Puts an access policy in force: each peer (by public key) may open only what its rules
    /// allow on this node (a peer without rules: nothing), and replies to this node's own
    /// flows always pass. `None` lifts it: every packet passes, as without a controller.
    /// Rules change at once for every packet that follows, established flows included.
    pub fn set_policy(&mut self, policy: Option<HashMap<[u8; 32], Vec<Allow>>>) {
        let compile = |(k, v): ([u8; 32], Vec<Allow>)| (k, Arc::new(Rules::new(&v)));
        self.policy = policy.map(|m| m.into_iter().map(compile).collect());
        let keys: Vec<(u32, [u8; 32])> = self.by_key.iter().map(|(k, i)| (*i, *k)).collect();
        for (idx, key) in keys {
            let rules = self.rules_of(&key);
            if let Some(p) = self.peers.get_mut(&idx) {
                p.inbound = rules;
            }
        }
    }

    fn rules_of(&self, key: &[u8; 32]) -> Arc<Rules> {
        let rules = self.policy.as_ref().and_then(|m| m.get(key));
        rules.cloned().unwrap_or_default()
    }

    pub fn peer_keys(&self) -> Vec<[u8; 32]> {
        self.by_key.keys().copied().collect()
    }

    pub fn peer(&self, key: &[u8; 32]) -> Option<PeerStatus> {
        let p = self.peers.get(self.by_key.get(key)?)?;
        let (since, tx, rx, _, _) = p.tunn.stats();
        Some(PeerStatus {
            config: p.config.clone(),
            since_handshake: since,
            policy_drops: p.policy_drops,
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            handshake_attempts: p.handshake_attempts,
            handshake_failures: p.handshake_failures,
        })
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self.by_key.keys().filter_map(|k| self.peer(k)).collect();
        v.sort_by_key(|p| p.config.public_key);
        v
    }

    /// Encrypts packets read from the TUN device at `now`. (boringtun stamps and times its
    /// sessions by its own clock; `now` moves the engine's rate-limit window.)
    pub fn handle_tun<'p>(
        &mut self,
        now: Instant,
        packets: impl IntoIterator<Item = &'p [u8]>,
        out: &mut Outbox,
    ) {
        self.advance(now);
        for pkt in packets {
            if !self.has_key {
                self.drops.no_route += 1;
                continue;
            }
            let Some(dst) = Tunn::dst_address(pkt) else {
                self.drops.invalid += 1;
                continue;
            };
            let Some(&idx) = self.routes.lookup(dst) else {
                self.drops.no_route += 1;
                continue;
            };
            let Some(peer) = self.peers.get_mut(&idx) else {
                continue;
            };
            if peer.config.endpoint.is_none() && peer.candidates.is_empty() {
                self.drops.no_route += 1;
                continue;
            }
            if self.policy.is_some()
                && let (Some(f), Some(now)) = (filter::flow(pkt), self.now)
            {
                self.conntrack.outbound(idx, &f, now);
            }
            let off = out.grow(pkt.len() + OVERHEAD);
            match peer.tunn.encapsulate(pkt, &mut out.buf[off..]) {
                TunnResult::WriteToNetwork(b) => {
                    let n = b.len();
                    peer.send(off, n, out);
                }
                _ => out.keep(off, 0),
            }
        }
    }

    /// Handles datagrams received from the network at `now`.
    pub fn handle_network<'p>(
        &mut self,
        now: Instant,
        datagrams: impl IntoIterator<Item = (SocketAddr, &'p [u8])>,
        out: &mut Outbox,
    ) {
        self.advance(now);
        for (from, d) in datagrams {
            if !self.has_key {
                self.drops.invalid += 1;
                continue;
            }
            self.handle_datagram(from, d, out);
        }
    }

    fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], out: &mut Outbox) {
        let mut cookie = [0u8; 64];
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => {
                let n = c.len();
                let off = out.grow(n);
                out.buf[off..off + n].copy_from_slice(&cookie[..n]);
                out.push_net(from, off, n);
                return;
            }
            Err(_) => {
                self.drops.invalid += 1;
                return;
            }
        };
        let idx = match packet {
            Packet::HandshakeInit(p) => parse_handshake_anon(&self.private, &self.public, &p)
                .ok()
                .and_then(|h| self.by_key.get(&h.peer_static_public).copied()),
            Packet::HandshakeResponse(p) => Some(p.receiver_idx >> 8),
            Packet::PacketCookieReply(p) => Some(p.receiver_idx >> 8),
            Packet::PacketData(p) => Some(p.receiver_idx >> 8),
        };
        let Some(idx) = idx.filter(|i| self.peers.contains_key(i)) else {
            self.drops.invalid += 1;
            return;
        };
        self.decapsulate(idx, from, datagram, out);
    }

    fn decapsulate(&mut self, idx: u32, from: SocketAddr, datagram: &[u8], out: &mut Outbox) {
        let now = self.now;
        let Some(peer) = self.peers.get_mut(&idx) else {
            return;
        };
        // A data packet decrypts into a TUN buffer; a handshake answer (and the packets queued
        // behind a handshake) into the datagram buffer.
        if datagram.len() >= 4 && datagram[0] == 4 {
            let tun = out.next_tun(datagram.len());
            match peer
                .tunn
                .decapsulate(Some(from.ip()), datagram, &mut tun[TUN_HEADROOM..])
            {
                // Authenticated: deliver if its source is routed to this peer.
                TunnResult::WriteToTunnelV4(b, src) => {
                    let n = b.len();
                    peer.roam(from, now);
                    self.deliver(idx, IpAddr::V4(src), n, out);
                    return;
                }
                TunnResult::WriteToTunnelV6(b, src) => {
                    let n = b.len();
                    peer.roam(from, now);
                    self.deliver(idx, IpAddr::V6(src), n, out);
                    return;
                }
                // A keepalive: authenticated, nothing to deliver.
                TunnResult::Done => {
                    peer.roam(from, now);
                    return;
                }
                TunnResult::Err(_) => {
                    self.drops.invalid += 1;
                    return;
                }
                // Decrypting a data packet can complete a handshake and release queued packets:
                // send what it produced, then flush the queue below.
                TunnResult::WriteToNetwork(b) => {
                    let answer = b.to_vec(); // not seen in practice: not worth a buffer
                    let off = out.grow(answer.len());
                    out.buf[off..off + answer.len()].copy_from_slice(&answer);
                    out.push_net(peer.config.endpoint.unwrap_or(from), off, answer.len());
                    peer.roam(from, now);
                    Self::flush_queued(peer, from, out);
                    return;
                }
            }
        }
        let off = out.grow(datagram.len() + OVERHEAD);
        let mut authenticated = false;
        match peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut out.buf[off..])
        {
            TunnResult::Done => {
                out.keep(off, 0);
                authenticated = true;
            }
            TunnResult::Err(_) => {
                out.keep(off, 0);
                self.drops.invalid += 1;
            }
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                authenticated = true;
                // A handshake response or cookie goes back to where the message came from.
                out.push_net(from, off, n);
            }
            // Handshake messages never decrypt to a packet.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                out.keep(off, 0);
            }
        }
        if authenticated {
            // Roaming: the endpoint follows the latest authenticated packet.
            peer.roam(from, now);
            Self::flush_queued(peer, from, out);
        }
    }

    /// Keeps the packet just decrypted from peer `idx` if its source is routed to that peer
    /// (anti-spoofing), else drops it.
    /// Then, under a policy, only if it is a reply or the peer's rules allow it.
    fn deliver(&mut self, idx: u32, src: IpAddr, n: usize, out: &mut Outbox) {
        if self.routes.lookup(src) != Some(&idx) {
            self.drops.spoofed += 1;
            return;
        }
        if self.policy.is_some() && !self.admitted(idx, out.pending_tun(n)) {
            self.drops.policy += 1;
            if let Some(p) = self.peers.get_mut(&idx) {
                p.policy_drops += 1;
            }
            return;
        }
        out.push_tun(n);
    }

    fn admitted(&mut self, idx: u32, pkt: &[u8]) -> bool {
        let (Some(f), Some(now), Some(peer)) = (filter::flow(pkt), self.now, self.peers.get(&idx))
        else {
            return false;
        };
        filter::admits(&mut self.conntrack, idx, &peer.inbound, &f, now)
    }

    /// Sends the packets boringtun queued while a handshake was pending.
    fn flush_queued(peer: &mut Peer, from: SocketAddr, out: &mut Outbox) {
        loop {
            let off = out.grow(OVERHEAD + 65535);
            match peer
                .tunn
                .decapsulate(Some(from.ip()), &[], &mut out.buf[off..])
            {
                TunnResult::WriteToNetwork(b) => {
                    let n = b.len();
                    out.push_net(peer.config.endpoint.unwrap_or(from), off, n);
                }
                _ => {
                    out.keep(off, 0);
                    return;
                }
            }
        }
    }

    /// Starts a new rate-limit window once a second of `now` has passed.
    fn advance(&mut self, now: Instant) {
        self.now = Some(now);
        self.timers_due.get_or_insert(now);
        if self
            .last_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= RATE_LIMIT_PERIOD)
        {
            self.limiter.reset_count();
            self.last_reset = Some(now);
        }
    }

    /// When [`Self::handle_timeout`] should next run: `None` while there is nothing to time (no
    /// key, no peers, or no `now` given yet). A time in the past means at once (a peer was
    /// added since the last run).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.has_key || self.peers.is_empty() {
            return None;
        }
        self.timers_due
    }

    /// Runs what is due at `now`: boringtun's timers for every peer (handshake retries,
    /// keepalives, rekeying, session expiry) and the rate limiter's window. Calls before the
    /// deadline [`Self::poll_timeout`] gave do nothing.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Outbox) {
        self.advance(now);
        if self.timers_due.is_some_and(|due| now < due) {
            return;
        }
        self.timers_due = Some(now + TIMER_INTERVAL);
        self.conntrack.maybe_sweep(now);
        if !self.has_key {
            return;
        }
        for peer in self.peers.values_mut() {
            let off = out.grow(OVERHEAD);
            match peer.tunn.update_timers(&mut out.buf[off..]) {
                TunnResult::WriteToNetwork(b) => {
                    let n = b.len();
                    peer.send(off, n, out);
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    // An initiation given up unanswered (not an idle session's keys dropped:
                    // a session clears `initiated`).
                    peer.handshake_failures += u64::from(peer.initiated && !peer.expiry_counted);
                    peer.expiry_counted = true;
                    out.keep(off, 0);
                }
                _ => out.keep(off, 0),
            }
            peer.punch_probe(now, out);
            peer.probe_up(now, out);
            peer.early_retry(now, out);
        }
    }
}

#[cfg(test)]
mod tests;
