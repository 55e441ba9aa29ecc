//! Two engines talking through memory, with a clock the test moves: shared by the engine's
//! unit tests and the simulated-clock timer tests in `engine/sim` (feature `testing`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnetwork::IpNetwork;

use crate::{Engine, Outbox, PeerConfig};

pub const A_ADDR: &str = "192.0.2.1:51820";
pub const B_ADDR: &str = "192.0.2.2:51820";

/// A clamped private key made of one repeated byte.
pub fn key(seed: u8) -> [u8; 32] {
    let mut k = [seed; 32];
    k[0] &= 248;
    k
}

pub fn pubkey(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

pub fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// A minimal IPv4 packet (20-byte header + payload).
pub fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let len = u16::try_from(20 + payload.len()).unwrap().to_be_bytes();
    let mut p = vec![0x45, 0, len[0], len[1], 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(payload);
    p
}

/// A minimal IPv6 packet (40-byte header + payload).
pub fn ipv6(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let len = u16::try_from(payload.len()).unwrap().to_be_bytes();
    let mut p = vec![0x60, 0, 0, 0, len[0], len[1], 17, 64];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(payload);
    p
}

/// A peer entry for `private`'s public key.
pub fn peer_of(private: [u8; 32], endpoint: &str, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: pubkey(private),
        preshared_key: None,
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: allowed.iter().map(|s| net(s)).collect(),
        persistent_keepalive: None,
    }
}

/// A and B configured as each other's peer (A is 10.0.0.1 and fd00::1, B .2 and ::2), the
/// addresses each is seen from, and the time both are driven with.
pub struct Pair {
    pub a: Engine,
    pub b: Engine,
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
    pub now: Instant,
}

impl Pair {
    /// B routed at A for `b_allowed_at_a`; A routed at B for everything.
    pub fn new(b_allowed_at_a: &[&str]) -> Self {
        let mut a = Engine::new(key(1));
        let mut b = Engine::new(key(2));
        a.set_peer(peer_of(key(2), B_ADDR, b_allowed_at_a));
        b.set_peer(peer_of(key(1), A_ADDR, &["0.0.0.0/0", "::/0"]));
        Self {
            a,
            b,
            a_addr: A_ADDR.parse().unwrap(),
            b_addr: B_ADDR.parse().unwrap(),
            now: Instant::now(),
        }
    }

    /// Moves the engines' clock (the test moves boringtun's alongside where it can).
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Datagrams `from` (A or B) sends for packets read from its TUN device.
    pub fn send(from: &mut Engine, now: Instant, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Outbox::default();
        from.handle_tun(now, pkts.iter().map(Vec::as_slice), &mut out);
        out.net_packets().map(|(_, d)| d.to_vec()).collect()
    }

    pub fn send_a(&mut self, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        Self::send(&mut self.a, self.now, pkts)
    }

    pub fn send_b(&mut self, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        Self::send(&mut self.b, self.now, pkts)
    }

    /// Runs both engines' timers at the current time; returns what each sent.
    pub fn timers(&mut self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut out = Outbox::default();
        self.a.handle_timeout(self.now, &mut out);
        let from_a = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        out.clear();
        self.b.handle_timeout(self.now, &mut out);
        let from_b = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        (from_a, from_b)
    }

    /// Shuttles datagrams between A and B until both are quiet; returns what each delivered
    /// to its TUN device.
    pub fn exchange(
        &mut self,
        mut to_a: Vec<Vec<u8>>,
        mut to_b: Vec<Vec<u8>>,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
        let mut out = Outbox::default();
        for _ in 0..10 {
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            out.clear();
            let from_b = self.b_addr;
            self.a.handle_network(
                self.now,
                to_a.iter().map(|d| (from_b, d.as_slice())),
                &mut out,
            );
            to_a.clear();
            at_a.extend(out.tun_packets().map(<[u8]>::to_vec));
            to_b.extend(out.net_packets().map(|(_, d)| d.to_vec()));
            out.clear();
            let from_a = self.a_addr;
            self.b.handle_network(
                self.now,
                to_b.iter().map(|d| (from_a, d.as_slice())),
                &mut out,
            );
            to_b.clear();
            at_b.extend(out.tun_packets().map(<[u8]>::to_vec));
            to_a.extend(out.net_packets().map(|(_, d)| d.to_vec()));
        }
        (at_a, at_b)
    }

    /// A handshake started by A, completed: returns the packet A sent, as B received it.
    pub fn connect(&mut self) -> Vec<Vec<u8>> {
        let init = self.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"connect")]);
        self.exchange(vec![], init).1
    }
}
