//! The relay's wire format: UDP on the controller's port (beside STUN), for peers that cannot
//! reach each other directly. The relay forwards WireGuard datagrams between two peers of one
//! network by their public keys; it never holds a key that opens them.
//!
//! ```text
//! [0xCA, 1] ticket            BIND   agent → relay   (every 20 s; the ticket from its Sync)
//! [0xCA, 2]                   BOUND  relay → agent
//! [0xCA, 3] dst key (32) data SEND   agent → relay
//! [0xCA, 4] src key (32) data RECV   relay → agent
//! ```
//!
//! A ticket is `[network id length][network id][public key (32)][expires, Unix s, u64 BE]
//! [HMAC-SHA256 (32)]`, minted by the controller over the agent's Sync stream (TLS) and checked
//! by the relay with the key they share. The first byte 0xCA is neither WireGuard (types 1-4)
//! nor STUN (top bits 00).

use hmac::{Hmac, Mac as _};

pub const MAGIC: u8 = 0xCA;
const BIND: u8 = 1;
const BOUND: u8 = 2;
const SEND: u8 = 3;
const RECV: u8 = 4;
/// The largest datagram the relay carries (a WireGuard message at a 1500-byte MTU is 1452
/// bytes of IP payload plus 32 of overhead; jumbo MTUs are not relayed).
pub const MAX_PAYLOAD: usize = 1600;
const KEY: usize = 32;
const MAC: usize = 32;

/// A relay message, borrowed from the datagram it came in.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Bind(&'a [u8]),
    Bound,
    Send { to: [u8; 32], data: &'a [u8] },
    Recv { from: [u8; 32], data: &'a [u8] },
}

/// Whether `d` is a relay message (not WireGuard, not STUN).
pub fn is_relay(d: &[u8]) -> bool {
    d.len() >= 2 && d[0] == MAGIC
}

/// Reads a relay message; `None` for anything malformed.
pub fn parse(d: &[u8]) -> Option<Message<'_>> {
    if !is_relay(d) {
        return None;
    }
    match d[1] {
        BIND if d.len() > 2 && d.len() <= 2 + 256 + KEY + 8 + MAC => Some(Message::Bind(&d[2..])),
        BOUND if d.len() == 2 => Some(Message::Bound),
        SEND => keyed(d).map(|(to, data)| Message::Send { to, data }),
        RECV => keyed(d).map(|(from, data)| Message::Recv { from, data }),
        _ => None,
    }
}

/// A SEND's or RECV's key and data.
fn keyed(d: &[u8]) -> Option<([u8; 32], &[u8])> {
    let key: [u8; 32] = d.get(2..2 + KEY)?.try_into().ok()?;
    let data = &d[2 + KEY..];
    (!data.is_empty() && data.len() <= MAX_PAYLOAD).then_some((key, data))
}

pub fn bind(ticket: &[u8]) -> Vec<u8> {
    [&[MAGIC, BIND][..], ticket].concat()
}

pub fn bound() -> Vec<u8> {
    vec![MAGIC, BOUND]
}

/// A SEND (to the relay) or RECV (from it) of `data` for or from peer `key`.
pub fn wrap(send: bool, key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    let kind = if send { SEND } else { RECV };
    [&[MAGIC, kind][..], key, data].concat()
}

/// What a ticket says: the peer's network, its WireGuard key, and until when (Unix s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub network_id: String,
    pub public_key: [u8; 32],
    pub expires_unix: u64,
}

fn mac(secret: &[u8], body: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(body);
    m.finalize().into_bytes().into()
}

impl Ticket {
    /// The ticket's bytes, signed with `secret`.
    pub fn mint(&self, secret: &[u8]) -> Vec<u8> {
        let net = self.network_id.as_bytes();
        let net = &net[..net.len().min(255)];
        let mut body = vec![net.len() as u8];
        body.extend_from_slice(net);
        body.extend_from_slice(&self.public_key);
        body.extend_from_slice(&self.expires_unix.to_be_bytes());
        let tag = mac(secret, &body);
        body.extend_from_slice(&tag);
        body
    }

    /// The ticket in `b` if `secret` signed it and it has not expired at `now_unix`.
    pub fn verify(b: &[u8], secret: &[u8], now_unix: u64) -> Option<Ticket> {
        let n = usize::from(*b.first()?);
        if b.len() != 1 + n + KEY + 8 + MAC {
            return None;
        }
        let (body, tag) = b.split_at(b.len() - MAC);
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).ok()?;
        m.update(body);
        m.verify_slice(tag).ok()?;
        let network_id = String::from_utf8(body[1..1 + n].to_vec()).ok()?;
        let public_key = body[1 + n..1 + n + KEY].try_into().ok()?;
        let expires_unix = u64::from_be_bytes(body[1 + n + KEY..].try_into().ok()?);
        (expires_unix > now_unix).then_some(Ticket {
            network_id,
            public_key,
            expires_unix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_verifies_with_its_secret_until_it_expires_and_not_altered() {
        let t = Ticket {
            network_id: "net_1".into(),
            public_key: [9; 32],
            expires_unix: 1000,
        };
        let b = t.mint(b"secret");
        assert_eq!(Ticket::verify(&b, b"secret", 999), Some(t));
        assert_eq!(Ticket::verify(&b, b"secret", 1000), None, "expired");
        assert_eq!(Ticket::verify(&b, b"other", 999), None, "another relay's");
        let mut forged = b.clone();
        forged[10] ^= 1;
        assert_eq!(Ticket::verify(&forged, b"secret", 999), None, "altered");
        assert_eq!(Ticket::verify(&b[..b.len() - 1], b"secret", 999), None);
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let d = wrap(true, &[7; 32], b"wg");
        assert_eq!(
            parse(&d),
            Some(Message::Send {
                to: [7; 32],
                data: b"wg"
            })
        );
        let r = wrap(false, &[8; 32], b"x");
        assert!(matches!(parse(&r), Some(Message::Recv { .. })));
        assert_eq!(parse(&bind(b"tkt")), Some(Message::Bind(b"tkt")));
        assert_eq!(parse(&bound()), Some(Message::Bound));
        assert_eq!(parse(&[MAGIC, 3, 1, 2]), None, "a cut key");
        assert_eq!(parse(&wrap(true, &[7; 32], b"")), None, "nothing to carry");
        assert_eq!(parse(&wrap(true, &[7; 32], &[0; 1601])), None, "too big");
        assert_eq!(parse(&[1, 0, 0, 0]), None, "WireGuard");
        assert_eq!(parse(&[MAGIC, 9]), None);
    }
}
