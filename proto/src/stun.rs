//! STUN Binding (RFC 8489), as little of it as finding one's address from outside needs: an
//! agent sends a Binding request from its WireGuard socket to the controller's UDP port, and
//! the answer's XOR-MAPPED-ADDRESS is where the world sees that socket (its server-reflexive
//! candidate). Both ends share this codec; it reads hostile bytes and never panics (fuzzed).
//!
//! A STUN message cannot be taken for a WireGuard one: WireGuard's first byte is its type (1
//! to 4) followed by three zero bytes, while a Binding message's second byte is 1 (request
//! type 0x0001, success 0x0101); and bytes 4..8 carry the magic cookie.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie every STUN message carries at bytes 4..8.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// The largest message either side reads (RFC 8489 keeps them under 548 bytes over IPv4).
pub const MAX_MESSAGE: usize = 548;
/// Attributes read from one message, at most.
const MAX_ATTRIBUTES: usize = 16;

/// A transaction id: 96 random bits chosen by the requester, echoed in the answer.
pub type TransactionId = [u8; 12];

/// Whether `buf` is a STUN message (header shape and magic cookie), not WireGuard.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER
        && buf.len() <= MAX_MESSAGE
        && buf[0] & 0xC0 == 0
        && buf[1] != 0
        && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([buf[2], buf[3]])) == buf.len() - HEADER
}

fn header(kind: u16, len: u16, id: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + usize::from(len));
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(id);
    out
}

/// A Binding request with no attributes.
pub fn binding_request(id: &TransactionId) -> Vec<u8> {
    header(BINDING_REQUEST, 0, id)
}

/// The transaction id of a Binding request (attributes, if any, are ignored); `None` for
/// anything else.
pub fn parse_request(buf: &[u8]) -> Option<TransactionId> {
    if !is_stun(buf) || u16::from_be_bytes([buf[0], buf[1]]) != BINDING_REQUEST {
        return None;
    }
    buf[8..20].try_into().ok()
}

/// The answer to request `id` from `from`: a Binding success with XOR-MAPPED-ADDRESS.
pub fn binding_response(id: &TransactionId, from: SocketAddr) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match from.ip() {
        IpAddr::V4(v4) => (1, xor(&v4.octets(), id)),
        IpAddr::V6(v6) => (2, xor(&v6.octets(), id)),
    };
    let value_len = 4 + addr.len();
    let mut out = header(BINDING_SUCCESS, (4 + value_len) as u16, id);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&(from.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    out.extend_from_slice(&addr);
    out
}

/// XORs an address with the magic cookie (and, past its 4 bytes, the transaction id).
fn xor(addr: &[u8], id: &TransactionId) -> Vec<u8> {
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(id);
    addr.iter().zip(key).map(|(a, k)| a ^ k).collect()
}

/// A Binding success: its transaction id and the address it reports (XOR-MAPPED-ADDRESS, or
/// the older MAPPED-ADDRESS); `None` for anything else.
pub fn parse_response(buf: &[u8]) -> Option<(TransactionId, SocketAddr)> {
    if !is_stun(buf) || u16::from_be_bytes([buf[0], buf[1]]) != BINDING_SUCCESS {
        return None;
    }
    let id: TransactionId = buf[8..20].try_into().ok()?;
    let mut at = HEADER;
    let mut plain = None;
    for _ in 0..MAX_ATTRIBUTES {
        let head = buf.get(at..at + 4)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = buf.get(at + 4..at + 4 + len)?;
        match kind {
            XOR_MAPPED_ADDRESS => return Some((id, address(value, Some(&id))?)),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        at += 4 + len.div_ceil(4) * 4;
        if at >= buf.len() {
            break;
        }
    }
    plain.map(|a| (id, a))
}

/// An address attribute's value; XORed when `id` is given.
fn address(v: &[u8], id: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let unxor = |bytes: &[u8]| match id {
        Some(id) => xor(bytes, id),
        None => bytes.to_vec(),
    };
    let port = if id.is_some() {
        port ^ (MAGIC_COOKIE >> 16) as u16
    } else {
        port
    };
    let ip = match (family, v.len()) {
        (1, 8) => {
            let o: [u8; 4] = unxor(&v[4..8]).try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 20) => {
            let o: [u8; 16] = unxor(&v[4..20]).try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: TransactionId = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

    #[test]
    fn a_request_is_answered_with_the_address_it_came_from_both_families() {
        let req = binding_request(&ID);
        assert!(is_stun(&req));
        assert_eq!(parse_request(&req), Some(ID));
        for from in ["203.0.113.9:40001", "[2001:db8::7]:51820"] {
            let from: SocketAddr = from.parse().unwrap();
            let resp = binding_response(&ID, from);
            assert_eq!(parse_response(&resp), Some((ID, from)));
            assert_eq!(parse_request(&resp), None, "an answer is not a request");
        }
    }

    #[test]
    fn the_rfc_5769_ipv4_response_vector_parses() {
        // RFC 5769 2.2 (software and fingerprint attributes kept, integrity skipped).
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b\
                   7465737420766563746f7220002000080001a147e112a643\
                   000800146e4c89f7a2b3e7cd5dc5b8a58e21ec3e1ea6e7b4\
                   80280004c07d4c96";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let (_, addr) = parse_response(&bytes).unwrap();
        assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn wireguard_messages_and_garbage_are_not_stun() {
        let mut init = vec![1u8, 0, 0, 0];
        init.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        init.resize(148, 0);
        assert!(
            !is_stun(&init),
            "a handshake whose sender index is the cookie"
        );
        let keepalive = [4u8; 32];
        assert!(!is_stun(&keepalive));
        let mut req = binding_request(&ID);
        req.push(0);
        assert!(!is_stun(&req), "length field disagrees");
        let mut resp = binding_response(&ID, "192.0.2.1:1".parse().unwrap());
        resp.truncate(26);
        resp[3] = 6;
        assert_eq!(parse_response(&resp), None, "a cut attribute");
    }
}
