//! The controller's UDP port (the gRPC listener's address): STUN Binding answers and the relay,
//! told apart by their first bytes ([`canopy_proto::relay::is_relay`]).

use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

use super::relay::Relay;
use super::stun;
use crate::clock::Clock;
use crate::pacing::KeyedLimiter;

/// Serves STUN and the relay on `sock` until the task is dropped. `relay`: `None` without a
/// relay key (then relay messages are dropped); shared with what counts its use.
pub async fn serve(sock: Arc<UdpSocket>, clock: Clock, relay: Option<Arc<Mutex<Relay>>>) {
    let mut limiter = KeyedLimiter::new(stun::PER_SOURCE, stun::BURST, stun::MAX_SOURCES);
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let d = &buf[..n];
        let out = if canopy_proto::relay::is_relay(d) {
            let now_unix = u64::try_from(clock.now_unix()).unwrap_or(0);
            relay.as_ref().and_then(|r| {
                let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                r.handle(from, d, now_unix, clock.instant())
            })
        } else {
            stun::answer(d, from, &mut limiter, clock.instant()).map(|a| (from, a))
        };
        if let Some((to, bytes)) = out
            && let Err(e) = sock.send_to(&bytes, to).await
        {
            tracing::debug!(%to, error = %e, "UDP answer not sent");
        }
    }
}
