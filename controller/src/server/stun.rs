//! The controller's STUN port: UDP on the same address and port as its gRPC listener. An
//! agent sends a Binding request from its WireGuard socket and learns where the world sees
//! that socket (its server-reflexive candidate, the address a NAT maps it to).
//!
//! Hostile input: anything but a well-formed Binding request is dropped unanswered; answers
//! are rate-limited per source address (a spoofed source cannot turn the port into a flood:
//! an answer is 32 or 44 bytes for a 20-byte request, at most [`PER_SOURCE`] a second), and
//! the limiter's memory is bounded.

use std::net::SocketAddr;
use tokio::net::UdpSocket;

use crate::pacing::KeyedLimiter;

/// Answers per second per source address, and the burst.
pub const PER_SOURCE: f64 = 20.0;
pub const BURST: u32 = 40;
/// Source addresses the limiter remembers at once.
pub const MAX_SOURCES: usize = 100_000;

/// Binds the STUN port next to the gRPC listener at `addr` (same port, UDP). A port that is
/// taken is logged and the controller serves without STUN.
pub async fn bind(addr: SocketAddr) -> Option<UdpSocket> {
    match UdpSocket::bind(addr).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "STUN port not available: agents behind NAT will not learn their outside address from this controller");
            None
        }
    }
}

/// What the port does with one datagram from `from`: the answer to send, if any.
pub fn answer(
    datagram: &[u8],
    from: SocketAddr,
    limiter: &mut KeyedLimiter,
    now: std::time::Instant,
) -> Option<Vec<u8>> {
    let id = canopy_proto::stun::parse_request(datagram)?;
    limiter.admit(&from.ip().to_string(), now).ok()?;
    Some(canopy_proto::stun::binding_response(&id, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_proto::stun;

    #[test]
    fn a_request_is_answered_with_its_source_and_a_flood_from_one_source_is_cut() {
        let mut limiter = KeyedLimiter::new(PER_SOURCE, BURST, MAX_SOURCES);
        let now = std::time::Instant::now();
        let from: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let req = stun::binding_request(&[5; 12]);
        let resp = answer(&req, from, &mut limiter, now).unwrap();
        assert_eq!(stun::parse_response(&resp), Some(([5; 12], from)));
        assert_eq!(answer(b"garbage", from, &mut limiter, now), None);
        assert_eq!(
            answer(&resp, from, &mut limiter, now),
            None,
            "an answer is not asked"
        );
        let answered = (0..100)
            .filter(|_| answer(&req, from, &mut limiter, now).is_some())
            .count();
        assert!(answered < BURST as usize, "{answered} answers at once");
        let other: SocketAddr = "198.51.100.1:1".parse().unwrap();
        assert!(
            answer(&req, other, &mut limiter, now).is_some(),
            "another source"
        );
    }
}
