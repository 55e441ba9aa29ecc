//! This node's server-reflexive candidate: where the world sees its WireGuard socket. The
//! agent sends STUN Binding requests from that socket to its controllers' STUN ports; the
//! forwarding thread hands answers (told apart from WireGuard by [`canopy_proto::stun`]) to
//! [`Reflex::answer`], which takes only an answer to a request it sent, from the server it sent
//! it to. Pure: the I/O is the caller's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use canopy_proto::stun::{self, TransactionId};

/// Requests waiting for an answer, at most (older ones are forgotten).
const MAX_PENDING: usize = 16;
/// An answer later than this after its request is ignored.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Reflex {
    pending: HashMap<TransactionId, (SocketAddr, Instant)>,
    /// The last address a server reported, and when.
    seen: Option<(SocketAddr, Instant)>,
}

impl Reflex {
    /// A request to send to `server` now, remembered until answered.
    pub fn request(&mut self, server: SocketAddr, id: TransactionId, now: Instant) -> Vec<u8> {
        self.pending
            .retain(|_, (_, at)| now.duration_since(*at) < ANSWER_WITHIN);
        if self.pending.len() >= MAX_PENDING {
            self.pending.clear();
        }
        self.pending.insert(id, (server, now));
        stun::binding_request(&id)
    }

    /// Takes datagram `d` from `from` if it is STUN (an answer it expects is recorded); returns
    /// whether it was STUN, so the caller keeps it from WireGuard either way.
    pub fn answer(&mut self, from: SocketAddr, d: &[u8], now: Instant) -> bool {
        if !stun::is_stun(d) {
            return false;
        }
        if let Some((id, addr)) = stun::parse_response(d)
            && let Some((server, at)) = self.pending.get(&id).copied()
            && server == from
            && now.duration_since(at) < ANSWER_WITHIN
        {
            self.pending.remove(&id);
            self.seen = Some((canonical(addr), now));
        }
        true
    }

    /// The server-reflexive address, if a server answered within `fresh`.
    pub fn address(&self, now: Instant, fresh: Duration) -> Option<SocketAddr> {
        self.seen
            .filter(|(_, at)| now.duration_since(*at) < fresh)
            .map(|(a, _)| a)
    }
}

/// An IPv4-mapped IPv6 address as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => a,
        },
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_answer_to_a_request_from_the_server_asked_is_taken() {
        let mut r = Reflex::default();
        let t0 = Instant::now();
        let server: SocketAddr = "192.0.2.254:7443".parse().unwrap();
        let outside: SocketAddr = "198.51.100.7:40001".parse().unwrap();
        let req = r.request(server, [1; 12], t0);
        assert_eq!(stun::parse_request(&req), Some([1; 12]));
        let answer = stun::binding_response(&[1; 12], outside);
        let stranger: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        assert!(r.answer(stranger, &answer, t0), "STUN, kept from WireGuard");
        assert_eq!(
            r.address(t0, Duration::from_secs(60)),
            None,
            "not from the server asked"
        );
        let forged = stun::binding_response(&[2; 12], outside);
        r.answer(server, &forged, t0);
        assert_eq!(
            r.address(t0, Duration::from_secs(60)),
            None,
            "not a request it sent"
        );
        assert!(r.answer(server, &answer, t0 + Duration::from_millis(30)));
        assert_eq!(r.address(t0, Duration::from_secs(60)), Some(outside));
        assert_eq!(
            r.address(t0 + Duration::from_secs(61), Duration::from_secs(60)),
            None,
            "stale"
        );
        assert!(
            !r.answer(server, &[4; 32], t0),
            "a WireGuard keepalive is not STUN"
        );
    }
}
