//! Peers reached through the relay on the controller's UDP port. The engine knows a relayed
//! peer by a stand-in endpoint in the discard-only prefix 100::/64 (RFC 6666), one per peer key,
//! so nothing in the engine changes: a handshake sent there goes to the relay, wrapped for that
//! key; an answer from the relay comes to the engine from that address, and roaming makes it
//! the endpoint when the relay path answers first. Pure: the sending is the caller's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use canopy_proto::relay::{self, Message};

/// A ticket older than this without a BOUND is not trusted to work.
const BOUND_FRESH: Duration = Duration::from_secs(60);
/// A relay sent to but not heard from this long is asked again (BINDs to every relay): if it
/// died, another's BOUND moves the datagrams there.
const QUIET: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct Relayed {
    /// The relays' addresses (the controllers' and `canopy relay`s); datagrams go to the one
    /// heard from last (another takes over when one goes away).
    servers: Vec<SocketAddr>,
    ticket: Option<Vec<u8>>,
    /// When each server last sent BOUND or a relayed datagram.
    bound: HashMap<SocketAddr, Instant>,
    /// Stand-in endpoint → peer key.
    keys: HashMap<SocketAddr, [u8; 32]>,
    /// Whether every peer was given the relay as a candidate since it became ready.
    spread: bool,
    /// When a datagram first went out through the relay since one was last heard from.
    waiting: Option<Instant>,
    /// When BINDs last went out because the relay went quiet.
    rebound: Option<Instant>,
}

/// The stand-in endpoint of peer `key`: `[100::k0k1:k2k3:k4k5:k6k7]:1`.
pub fn stand_in(key: &[u8; 32]) -> SocketAddr {
    let mut o = [0u8; 16];
    o[0] = 0x01;
    o[8..].copy_from_slice(&key[..8]);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), 1)
}

/// Whether `a` is a stand-in endpoint (in 100::/64).
pub fn is_stand_in(a: &SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V6(v6) => v6.segments()[..4] == [0x100, 0, 0, 0],
        IpAddr::V4(_) => false,
    }
}

impl Relayed {
    pub fn set_servers(&mut self, servers: Vec<SocketAddr>) {
        self.servers = servers;
    }

    /// Takes a new ticket; returns the BINDs to send (one per server).
    pub fn set_ticket(&mut self, ticket: Vec<u8>) -> Vec<(SocketAddr, Vec<u8>)> {
        self.ticket = Some(ticket);
        self.binds()
    }

    /// The BINDs to send now (the caller sends them every 20 s: they keep the bindings and
    /// the NAT mappings to the relay alive).
    pub fn binds(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        let Some(t) = &self.ticket else {
            return Vec::new();
        };
        self.servers.iter().map(|s| (*s, relay::bind(t))).collect()
    }

    /// Whether the relay can carry datagrams: a ticket, and a server that took it lately.
    pub fn ready(&self, now: Instant) -> bool {
        self.server(now).is_some()
    }

    /// The server heard from last (a BOUND or a relayed datagram), if lately.
    fn server(&self, now: Instant) -> Option<SocketAddr> {
        let fresh = self
            .bound
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < BOUND_FRESH);
        fresh.max_by_key(|(_, at)| **at).map(|(s, _)| *s)
    }

    /// Whether the relay just became ready (or ready again): then every peer gets it as a
    /// candidate, once.
    pub fn newly_ready(&mut self, now: Instant) -> bool {
        let ready = self.ready(now);
        let newly = ready && !self.spread;
        self.spread = ready;
        newly
    }

    /// Registers peer `key` and returns its stand-in endpoint.
    pub fn stand_in_for(&mut self, key: &[u8; 32]) -> SocketAddr {
        let a = stand_in(key);
        self.keys.insert(a, *key);
        a
    }

    /// A datagram for stand-in endpoint `to`, wrapped for the relay: where to send it.
    pub fn wrap(
        &mut self,
        to: &SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let key = self.keys.get(to)?;
        let out = (self.server(now)?, relay::wrap(true, key, data));
        self.waiting.get_or_insert(now);
        Some(out)
    }

    /// BINDs to send because the relay in use went quiet (sent to for [`QUIET`], nothing
    /// heard), at most once per [`QUIET`]; none otherwise.
    pub fn quiet_binds(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let quiet = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) >= QUIET);
        if !quiet(self.waiting) || !(self.rebound.is_none() || quiet(self.rebound)) {
            return Vec::new();
        }
        self.rebound = Some(now);
        self.binds()
    }

    /// A datagram from `from`: `None` if it is not the relay's; else what WireGuard should see
    /// of it (a RECV's data, from the sender's stand-in endpoint), if anything.
    pub fn unwrap<'d>(
        &mut self,
        from: SocketAddr,
        d: &'d [u8],
        now: Instant,
    ) -> Option<Option<(SocketAddr, &'d [u8])>> {
        if !relay::is_relay(d) || !self.servers.contains(&from) {
            return None;
        }
        Some(match relay::parse(d) {
            Some(Message::Bound) => {
                self.bound.insert(from, now);
                self.waiting = None;
                None
            }
            Some(Message::Recv { from: key, data }) => {
                // A relay that just forwarded to us works: answers go back through it (when
                // another relay dies, the first datagram through the survivor moves us there).
                self.bound.insert(from, now);
                self.waiting = None;
                Some((self.stand_in_for(&key), data))
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_peer_is_a_stand_in_endpoint_both_ways() {
        let server: SocketAddr = "192.0.2.254:7443".parse().unwrap();
        let mut r = Relayed::default();
        r.set_servers(vec![server]);
        assert!(r.set_ticket(b"tkt".to_vec()) == vec![(server, relay::bind(b"tkt"))]);
        let now = Instant::now();
        assert!(!r.ready(now));
        assert_eq!(r.unwrap(server, &relay::bound(), now), Some(None));
        assert!(r.ready(now));
        let b = r.stand_in_for(&[2; 32]);
        assert!(is_stand_in(&b) && !is_stand_in(&server));
        let (to, wrapped) = r.wrap(&b, b"init", now).unwrap();
        assert_eq!(
            (to, relay::parse(&wrapped)),
            (
                server,
                Some(Message::Send {
                    to: [2; 32],
                    data: b"init"
                })
            )
        );
        let from_b = relay::wrap(false, &[2; 32], b"answer");
        assert_eq!(
            r.unwrap(server, &from_b, now),
            Some(Some((b, &b"answer"[..])))
        );
        let stranger: SocketAddr = "203.0.113.1:7443".parse().unwrap();
        assert_eq!(
            r.unwrap(stranger, &from_b, now),
            None,
            "not the relay: WireGuard's to judge"
        );
        assert_eq!(
            r.unwrap(server, &[4; 32], now),
            None,
            "WireGuard from the server's address"
        );
    }

    #[test]
    fn a_relay_that_goes_quiet_is_left_for_one_that_answers() {
        let (x, y): (SocketAddr, SocketAddr) = (
            "192.0.2.254:7443".parse().unwrap(),
            "192.0.2.254:3478".parse().unwrap(),
        );
        let mut r = Relayed::default();
        r.set_servers(vec![x, y]);
        r.set_ticket(b"tkt".to_vec());
        let t = Instant::now();
        r.unwrap(y, &relay::bound(), t);
        r.unwrap(x, &relay::bound(), t + Duration::from_millis(1));
        let b = r.stand_in_for(&[2; 32]);
        let later = t + Duration::from_secs(1);
        assert_eq!(r.wrap(&b, b"d", later).unwrap().0, x, "heard from last");
        assert!(r.quiet_binds(later).is_empty(), "not quiet yet");
        // x died: nothing back for QUIET; BINDs go to both, y answers, datagrams move to y.
        let quiet = later + QUIET;
        assert_eq!(r.quiet_binds(quiet).len(), 2);
        assert!(r.quiet_binds(quiet).is_empty(), "once per QUIET");
        r.unwrap(y, &relay::bound(), quiet);
        assert_eq!(r.wrap(&b, b"d", quiet).unwrap().0, y);
        // A datagram relayed to us by x counts as hearing from it.
        let from_peer = relay::wrap(false, &[2; 32], b"x lives");
        r.unwrap(x, &from_peer, quiet + Duration::from_millis(1));
        assert_eq!(
            r.wrap(&b, b"d", quiet + Duration::from_millis(1))
                .unwrap()
                .0,
            x
        );
    }
}
