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

/// Datagrams a second one address may have relayed by default (a busy tunnel at ~100 Mbit/s;
/// `--relay-rate`); bursts of twice that.
pub const PER_SOURCE: u32 = 10_000;
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
    /// Bytes forwarded per network since [`Relay::take_usage`] (bounded: a network is here only
    /// through a verified binding).
    usage: HashMap<String, u64>,
    /// Networks whose tenant used up its plan's relay quota: their datagrams are dropped.
    blocked: std::collections::HashSet<String>,
}

impl Relay {
    /// A relay that checks tickets with `secret` and relays at most `per_source` datagrams
    /// a second from one address.
    pub fn new(secret: Vec<u8>, per_source: u32) -> Self {
        Self {
            secret,
            by_peer: HashMap::new(),
            by_addr: HashMap::new(),
            limiter: KeyedLimiter::new(
                f64::from(per_source),
                per_source.saturating_mul(2),
                MAX_BINDINGS,
            ),
            stats: RelayStats::default(),
            usage: HashMap::new(),
            blocked: std::collections::HashSet::new(),
        }
    }

    /// Peers bound now.
    pub fn bindings(&self) -> usize {
        self.by_peer.len()
    }

    /// Bytes forwarded per network since the last call.
    pub fn take_usage(&mut self) -> HashMap<String, u64> {
        std::mem::take(&mut self.usage)
    }

    /// Puts counts that could not be stored back, to be taken again.
    pub fn restore_usage(&mut self, usage: HashMap<String, u64>) {
        for (n, b) in usage {
            *self.usage.entry(n).or_default() += b;
        }
    }

    /// Refuses datagrams of these networks from now on (and no others).
    pub fn set_blocked(&mut self, networks: std::collections::HashSet<String>) {
        self.blocked = networks;
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
        if self.blocked.contains(network) {
            return None;
        }
        let (dst, src) = (*dst, *src);
        let network = network.clone();
        self.limiter.admit(&from.ip().to_string(), now).ok()?;
        self.stats.forwarded += 1;
        self.stats.bytes += data.len() as u64;
        *self.usage.entry(network).or_default() += data.len() as u64;
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

/// The file `canopy relay --secret-file` reads: the relay key, base64, mode 0600.
pub const SECRET_FILE: &str = "relay-secret";

/// Writes the relay key to `DATA/relay-secret` (0600), for `canopy relay` instances.
pub fn write_secret_file(data_dir: &std::path::Path, secret: &[u8]) -> std::io::Result<()> {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(secret);
    crate::files::write_private(&data_dir.join(SECRET_FILE), text.as_bytes())
}

/// Reads a relay key written by [`write_secret_file`].
pub fn read_secret_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let text = crate::files::read_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("{}: not a relay key: {e}", path.display()))?;
    if key.len() < 16 {
        return Err(format!("{}: the relay key is too short", path.display()));
    }
    Ok(key)
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
        let mut r = Relay::new(b"k".to_vec(), PER_SOURCE);
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

    #[test]
    fn bytes_are_counted_per_network_and_a_blocked_network_is_not_relayed() {
        let mut r = Relay::new(b"k".to_vec(), PER_SOURCE);
        let now = Instant::now();
        let (a, b): (SocketAddr, SocketAddr) = (
            "198.51.100.1:1".parse().unwrap(),
            "198.51.100.2:2".parse().unwrap(),
        );
        r.handle(a, &relay::bind(&ticket("n1", 1, 100)), 10, now)
            .unwrap();
        r.handle(b, &relay::bind(&ticket("n1", 2, 100)), 10, now)
            .unwrap();
        let send = relay::wrap(true, &[2; 32], &[0u8; 100]);
        assert!(r.handle(a, &send, 10, now).is_some());
        assert!(r.handle(a, &send, 10, now).is_some());
        assert_eq!(r.take_usage(), HashMap::from([("n1".to_string(), 200)]));
        assert!(r.take_usage().is_empty(), "taken");
        r.set_blocked(["n1".to_string()].into());
        assert_eq!(r.handle(a, &send, 10, now), None, "over its tenant's quota");
        assert!(r.take_usage().is_empty());
        r.set_blocked(Default::default());
        assert!(r.handle(a, &send, 10, now).is_some(), "a new month");
    }
}
