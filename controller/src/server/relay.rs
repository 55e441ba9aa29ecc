//! The relay on the controller's UDP port: it forwards WireGuard datagrams between peers of one
//! network that cannot reach each other directly (both behind NATs that will not be punched).
//! It sees ciphertext and public keys only.
//!
//! A peer binds its address with a ticket its Sync session gave it (signed with the relay key
//! in the store, so every replica takes every replica's tickets); a SEND from a bound address
//! to a key bound in the same network goes out as a RECV naming the sender's key. Unbound
//! senders, other networks, expired tickets, and more than [`PER_SOURCE`] datagrams a second
//! from one address are dropped; bindings are bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use canopy_proto::relay::{self, Message, Ticket};

use crate::pacing::KeyedLimiter;
use crate::store::{Compare, Op, Store, StoreError, Txn};

/// Datagrams a second one address may have relayed (a busy tunnel at ~100 Mbit/s), and the
/// burst.
const PER_SOURCE: f64 = 10_000.0;
const BURST: u32 = 20_000;
/// Bindings held at once, at most.
const MAX_BINDINGS: usize = 100_000;
/// How long a ticket lives.
pub const TICKET_SECONDS: u64 = 15 * 60;

type PeerKey = (String, [u8; 32]);

/// What the relay has done, for tests and (later) metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub binds: u64,
    pub forwarded: u64,
    pub bytes: u64,
    pub dropped: u64,
}

pub struct Relay {
    secret: Vec<u8>,
    by_peer: HashMap<PeerKey, (SocketAddr, u64)>,
    by_addr: HashMap<SocketAddr, (PeerKey, u64)>,
    limiter: KeyedLimiter,
    pub stats: RelayStats,
}

impl Relay {
    pub fn new(secret: Vec<u8>) -> Self {
        Self {
            secret,
            by_peer: HashMap::new(),
            by_addr: HashMap::new(),
            limiter: KeyedLimiter::new(PER_SOURCE, BURST, MAX_BINDINGS),
            stats: RelayStats::default(),
        }
    }

    /// What to send for datagram `d` from `from` (a relay message): the answer or the
    /// forwarded datagram and where to, if anything.
    pub fn handle(
        &mut self,
        from: SocketAddr,
        d: &[u8],
        now_unix: u64,
        now: Instant,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let out = match relay::parse(d) {
            Some(Message::Bind(t)) => self.bind(from, t, now_unix, now),
            Some(Message::Send { to, data }) => self.forward(from, &to, data, now_unix, now),
            _ => None,
        };
        if out.is_none() {
            self.stats.dropped += 1;
        }
        out
    }

    fn bind(
        &mut self,
        from: SocketAddr,
        ticket: &[u8],
        now_unix: u64,
        now: Instant,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        self.limiter.admit(&from.ip().to_string(), now).ok()?;
        let t = Ticket::verify(ticket, &self.secret, now_unix)?;
        if self.by_addr.len() >= MAX_BINDINGS {
            self.by_peer.retain(|_, (_, exp)| *exp > now_unix);
            self.by_addr.retain(|_, (_, exp)| *exp > now_unix);
            if self.by_addr.len() >= MAX_BINDINGS && !self.by_addr.contains_key(&from) {
                return None;
            }
        }
        let key = (t.network_id, t.public_key);
        // The peer's older address (it moved) no longer speaks for it.
        if let Some((old, _)) = self.by_peer.insert(key.clone(), (from, t.expires_unix))
            && old != from
        {
            self.by_addr.remove(&old);
        }
        self.by_addr.insert(from, (key, t.expires_unix));
        self.stats.binds += 1;
        Some((from, relay::bound()))
    }

    fn forward(
        &mut self,
        from: SocketAddr,
        to: &[u8; 32],
        data: &[u8],
        now_unix: u64,
        now: Instant,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let ((network, src), exp) = self.by_addr.get(&from)?;
        if *exp <= now_unix {
            return None;
        }
        let (dst, dexp) = self.by_peer.get(&(network.clone(), *to))?;
        if *dexp <= now_unix {
            return None;
        }
        let (dst, src) = (*dst, *src);
        self.limiter.admit(&from.ip().to_string(), now).ok()?;
        self.stats.forwarded += 1;
        self.stats.bytes += data.len() as u64;
        Some((dst, relay::wrap(false, &src, data)))
    }
}

const SECRET_KEY: &str = "/canopy/v1/relaysecret";

/// The relay key every replica shares: read from the store, or made (create-if-absent) on the
/// first start.
pub async fn secret(store: &dyn Store) -> Result<Vec<u8>, StoreError> {
    if let Some(kv) = store.get(SECRET_KEY.as_bytes()).await? {
        return Ok(kv.value);
    }
    let fresh: [u8; 32] = rand::random();
    let txn = Txn::new()
        .when(Compare::absent(SECRET_KEY))
        .then(Op::put(SECRET_KEY, fresh.to_vec()));
    store.txn(txn).await?;
    let kv = store.get(SECRET_KEY.as_bytes()).await?;
    Ok(kv.map(|kv| kv.value).unwrap_or_else(|| fresh.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(net: &str, key: u8, exp: u64) -> Vec<u8> {
        let t = Ticket {
            network_id: net.into(),
            public_key: [key; 32],
            expires_unix: exp,
        };
        t.mint(b"k")
    }

    #[test]
    fn bound_peers_of_one_network_reach_each_other_and_nobody_else_does() {
        let mut r = Relay::new(b"k".to_vec());
        let now = Instant::now();
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "198.51.100.1:1".parse().unwrap(),
            "198.51.100.2:2".parse().unwrap(),
            "198.51.100.3:3".parse().unwrap(),
        );
        assert_eq!(
            r.handle(a, &relay::bind(&ticket("n1", 1, 100)), 10, now),
            Some((a, relay::bound()))
        );
        r.handle(b, &relay::bind(&ticket("n1", 2, 100)), 10, now)
            .unwrap();
        r.handle(c, &relay::bind(&ticket("n2", 3, 100)), 10, now)
            .unwrap();
        let (to, d) = r
            .handle(a, &relay::wrap(true, &[2; 32], b"wg"), 10, now)
            .unwrap();
        assert_eq!(
            (to, relay::parse(&d)),
            (
                b,
                Some(Message::Recv {
                    from: [1; 32],
                    data: b"wg"
                })
            )
        );
        assert_eq!(
            r.handle(a, &relay::wrap(true, &[3; 32], b"wg"), 10, now),
            None,
            "another network"
        );
        let stranger: SocketAddr = "203.0.113.9:9".parse().unwrap();
        assert_eq!(
            r.handle(stranger, &relay::wrap(true, &[2; 32], b"wg"), 10, now),
            None,
            "not bound"
        );
        assert_eq!(
            r.handle(a, &relay::wrap(true, &[2; 32], b"wg"), 100, now),
            None,
            "expired"
        );
        let mut forged = ticket("n1", 2, 100);
        forged[5] ^= 1;
        assert_eq!(
            r.handle(stranger, &relay::bind(&forged), 10, now),
            None,
            "a forged ticket"
        );
        // b moves: its new address takes over, the old one speaks for nobody.
        let b2: SocketAddr = "198.51.100.2:22".parse().unwrap();
        r.handle(b2, &relay::bind(&ticket("n1", 2, 100)), 10, now)
            .unwrap();
        assert_eq!(
            r.handle(a, &relay::wrap(true, &[2; 32], b"x"), 10, now)
                .unwrap()
                .0,
            b2
        );
        assert_eq!(
            r.handle(b, &relay::wrap(true, &[1; 32], b"x"), 10, now),
            None
        );
        assert_eq!(r.stats.forwarded, 2);
    }
}
