//! The paths to peers beyond plain UDP: this node's outside address (STUN answers, taken out
//! of the receive path before WireGuard sees them) and the relay (datagrams to a relayed
//! peer's stand-in endpoint wrapped for the relay on the way out, RECVs unwrapped on the way
//! in).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::{Dataplane, Shared, relayed};
use crate::engine::Outbox;

impl Shared {
    /// What WireGuard should see of datagram `d` from `from`: itself; nothing (a STUN answer,
    /// a relay acknowledgement); or a relayed datagram, from its sender's stand-in endpoint.
    pub(super) fn demux<'d>(
        &self,
        from: SocketAddr,
        d: &'d [u8],
    ) -> Option<(SocketAddr, &'d [u8])> {
        // WireGuard's second byte is always 0: the common case costs one comparison.
        if d.get(1).is_none_or(|b| *b == 0) {
            return Some((from, d));
        }
        let now = Instant::now();
        if let Some(inner) = lock(&self.relayed).unwrap(from, d, now) {
            return inner;
        }
        if lock(&self.reflex).answer(from, d, now) {
            return None;
        }
        Some((from, d))
    }

    /// Sends the outbox: datagrams to stand-in endpoints through the relay, the rest as they
    /// are.
    pub(super) fn send(&self, out: &mut Outbox, stop: &AtomicBool) {
        let sock = self.socket();
        if out.net.iter().any(|(to, _)| relayed::is_stand_in(to)) {
            {
                let mut r = lock(&self.relayed);
                let now = Instant::now();
                for (to, range) in out.net.iter().filter(|(to, _)| relayed::is_stand_in(to)) {
                    if let Some((server, bytes)) = r.wrap(to, out.net_bytes(range.clone()), now) {
                        let _ = sock.send_to(&bytes, server);
                    }
                }
                for (server, bind) in r.quiet_binds(now) {
                    let _ = sock.send_to(&bind, server);
                }
            }
            out.net.retain(|(to, _)| !relayed::is_stand_in(to));
        }
        sock.send(out, stop);
    }

    /// Peer `key`'s stand-in endpoint if the relay is ready.
    pub(super) fn relay_candidate(&self, key: &[u8; 32]) -> Option<SocketAddr> {
        let mut r = lock(&self.relayed);
        r.ready(Instant::now()).then(|| r.stand_in_for(key))
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dataplane {
    /// Sends a STUN Binding request from the WireGuard socket to `server` (a controller's STUN
    /// port); the answer, if one comes, sets [`reflexive`](Self::reflexive).
    pub fn stun_probe(&self, server: SocketAddr) -> std::io::Result<()> {
        let req = lock(&self.shared.reflex).request(server, rand::random(), Instant::now());
        self.shared.socket().send_to(&req, server)
    }

    /// Where the world saw this node's WireGuard socket, if a STUN server answered within
    /// `fresh`.
    pub fn reflexive(&self, fresh: Duration) -> Option<SocketAddr> {
        lock(&self.shared.reflex).address(Instant::now(), fresh)
    }

    /// Punches a hole to peer `key` (the controller told both sides to, now): its NAT's
    /// addresses are probed at once and through the punch window.
    pub fn punch(&self, key: &[u8; 32]) {
        let mut out = Outbox::default();
        self.shared.engine().punch(key, Instant::now(), &mut out);
        self.shared.send(&mut out, &self.shared.stop);
    }

    /// The relay's addresses (the controllers').
    pub fn set_relay_servers(&self, servers: Vec<SocketAddr>) {
        lock(&self.shared.relayed).set_servers(servers);
    }

    /// Takes a relay ticket and binds with it at once.
    pub fn set_relay_ticket(&self, ticket: Vec<u8>) {
        let binds = lock(&self.shared.relayed).set_ticket(ticket);
        self.send_binds(binds);
    }

    /// Binds again (every 20 s): keeps the relay's binding and the NAT's mapping alive.
    pub fn relay_bind(&self) {
        let binds = lock(&self.shared.relayed).binds();
        self.send_binds(binds);
    }

    /// When the relay has just answered a BIND (checked every second), every peer gets it as
    /// its last candidate; peers set later get it with their other candidates.
    pub fn relay_spread(&self) {
        if !lock(&self.shared.relayed).newly_ready(Instant::now()) {
            return;
        }
        let keys = self.peer_keys();
        let mut out = Outbox::default();
        {
            let mut e = self.shared.engine();
            for k in keys {
                if let Some(a) = self.shared.relay_candidate(&k) {
                    e.add_candidate(&k, a, &mut out);
                }
            }
        }
        self.shared.send(&mut out, &self.shared.stop);
        tracing::info!("the relay is ready: peers that cannot be reached directly go through it");
    }

    fn send_binds(&self, binds: Vec<(SocketAddr, Vec<u8>)>) {
        let sock = self.shared.socket();
        for (server, b) in binds {
            if let Err(e) = sock.send_to(&b, server) {
                tracing::debug!(%server, error = %e, "relay BIND not sent");
            }
        }
    }
}
