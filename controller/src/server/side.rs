//! The tasks a serving replica runs beside gRPC: the hole-punch watcher, the UDP port (STUN and
//! the relay) with the counting of relay use, and `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use super::{relay, udp};
use crate::service::Controller;

/// Starts them; the caller aborts them when the server stops.
pub fn spawn(
    ctl: &Controller,
    stun: Option<UdpSocket>,
    metrics: Option<TcpListener>,
    relay_rate: u32,
    relay_flush: Duration,
) -> Vec<JoinHandle<()>> {
    let mut side = vec![tokio::spawn(crate::service::punch::follow(ctl.clone()))];
    let mut relay = None;
    if let Some(sock) = stun {
        relay = (!ctl.relay_secret.is_empty()).then(|| {
            let r = relay::Relay::new(ctl.relay_secret.to_vec(), relay_rate);
            Arc::new(Mutex::new(r))
        });
        if let Some(r) = &relay {
            let count = crate::service::relayuse::follow(ctl.clone(), r.clone(), relay_flush);
            side.push(tokio::spawn(count));
        }
        let serve = udp::serve(Arc::new(sock), ctl.clock.clone(), relay.clone());
        side.push(tokio::spawn(serve));
    }
    if let Some(l) = metrics {
        let live = crate::metrics::Live {
            ctl: ctl.clone(),
            relay,
        };
        let registry = Arc::new(ctl.metrics.registry(live));
        let serve = canopy_proto::metrics::serve(l, registry, std::future::pending());
        side.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the metrics listener stopped");
            }
        }));
    }
    side
}
