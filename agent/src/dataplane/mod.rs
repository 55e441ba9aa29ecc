//! The I/O shell around the [`Engine`]: a TUN device and a UDP socket driven by threads of
//! their own (`pump`), a timer thread, the UAPI socket (on tokio), and the interface's
//! addresses and routes.
//!
//! The TUN device runs with offloads (virtio-net headers: TSO/GRO, USO where the kernel has
//! it) unless the kernel refuses or `CANOPY_TUN_OFFLOAD=0`; the socket batches and segments
//! (`net`). The forwarding loops (`pump`) run on threads of their own. Addresses, link state
//! and routes are set through rtnetlink (`netlink`), the requests wg-quick makes with `ip`; the
//! interface and its routes vanish when the agent stops, because the TUN device is not
//! persistent.

mod exit;
pub use exit::{EXIT_TABLE, ExitSpec};
mod gateway;
mod net;
mod netlink;
mod paths;
mod pump;
mod reflex;
mod relayed;
pub use relayed::is_stand_in as is_relayed;
mod sink;

pub use sink::{ControllerSink, MapPeers, map_addresses, policy_rules};

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnetwork::IpNetwork;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinHandle;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::engine::{Engine, PeerConfig};
use crate::uapi;
use net::NetSocket;

pub const DEFAULT_MTU: u16 = 1420;
/// Keepalive for controller-managed peers, so NAT mappings and roaming keep working.
const MANAGED_KEEPALIVE: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("creating TUN device {name}: {source} (needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("binding UDP port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("{op}: {source}")]
    Netlink { op: String, source: std::io::Error },
    #[error("UAPI socket: {0}")]
    Uapi(std::io::Error),
    #[error("starting the forwarding threads: {0}")]
    Thread(std::io::Error),
}

/// What the interface looks like.
#[derive(Clone)]
pub struct InterfaceSpec {
    pub name: String,
    pub private_key: [u8; 32],
    /// Interface addresses with the prefix of their subnet (10.0.0.1/24).
    pub addresses: Vec<IpNetwork>,
    /// 0: let the system choose.
    pub listen_port: u16,
    pub mtu: u16,
    /// Use TUN offloads (segmentation and coalescing) when the kernel has them.
    pub offload: bool,
}

/// Whether TUN offloads are wanted: yes unless `CANOPY_TUN_OFFLOAD` is `0`, `off` or `false`.
pub fn offload_from_env() -> bool {
    !matches!(
        std::env::var("CANOPY_TUN_OFFLOAD").as_deref(),
        Ok("0" | "off" | "false")
    )
}

impl std::fmt::Debug for InterfaceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterfaceSpec")
            .field("name", &self.name)
            .field("addresses", &self.addresses)
            .field("offload", &self.offload)
            .finish()
    }
}

struct Shared {
    engine: Mutex<Engine>,
    name: String,
    /// The interface's index, for netlink requests.
    index: u32,
    /// The UDP socket. A `listen_port` change binds a new one and swaps it in here; each
    /// forwarding thread takes the current one per batch (a thread waiting on the old one
    /// moves over within its stop-check interval).
    sock: std::sync::RwLock<Arc<NetSocket>>,
    listen_port: std::sync::atomic::AtomicU16,
    /// SO_MARK currently on the socket (0: none).
    fwmark: std::sync::atomic::AtomicU32,
    addresses: Vec<IpNetwork>,
    /// Routes this agent added through the interface.
    routes: Mutex<BTreeSet<IpNetwork>>,
    /// Set to end the forwarding threads.
    stop: AtomicBool,
    /// Becomes true when the interface is deleted under us (`ip link del`, `wg-quick down`).
    gone: tokio::sync::watch::Sender<bool>,
    /// What this node set up to forward routed prefixes into its site.
    gateway: Mutex<gateway::Gateway>,
    /// What this node set up to send its internet traffic through an exit node.
    exit: Mutex<exit::Exit>,
    /// Its STUN requests and the outside address they found.
    reflex: Mutex<reflex::Reflex>,
    /// Peers reached through the relay.
    relayed: Mutex<relayed::Relayed>,
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current UDP socket.
    fn socket(&self) -> Arc<NetSocket> {
        self.sock.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn port(&self) -> u16 {
        self.listen_port.load(Ordering::Relaxed)
    }

    /// Takes back what this node set up as a gateway or an exit node's client.
    fn undo_routing(&self) {
        self.gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .undo();
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).undo();
    }

    /// Makes the kernel routes match the peers' allowed IPs. Prefixes inside an interface
    /// subnet are already routed there; default routes are not taken over (that needs policy
    /// routing, as wg-quick's fwmark tables do).
    fn sync_routes(&self) -> Result<(), DataplaneError> {
        let want: BTreeSet<IpNetwork> = self
            .engine()
            .peers()
            .into_iter()
            .flat_map(|p| p.config.allowed_ips)
            .filter(|n| n.prefix() != 0)
            .filter(|n| {
                !self.addresses.iter().any(|a| {
                    a.is_ipv4() == n.is_ipv4()
                        && a.prefix() <= n.prefix()
                        && a.contains(n.network())
                })
            })
            .collect();
        let mut have = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let (add, del): (Vec<IpNetwork>, Vec<IpNetwork>) = (
            want.difference(&have).copied().collect(),
            have.difference(&want).copied().collect(),
        );
        for r in &add {
            netlink::replace_route(self.index, *r).map_err(|source| DataplaneError::Netlink {
                op: format!("route replace {r} dev {}", self.name),
                source,
            })?;
        }
        for r in &del {
            match netlink::delete_route(self.index, *r) {
                // Already gone (an address removed with its subnet route): what we wanted.
                Err(e) if e.raw_os_error() == Some(libc_esrch()) => {}
                r2 => r2.map_err(|source| DataplaneError::Netlink {
                    op: format!("route del {r} dev {}", self.name),
                    source,
                })?,
            }
        }
        if !add.is_empty() || !del.is_empty() {
            tracing::info!(iface = %self.name, routes = want.len(), "routes updated");
        }
        *have = want;
        Ok(())
    }
}

fn mark_error(e: std::io::Error) -> uapi::SetError {
    uapi::SetError {
        errno: uapi::SetError::EIO,
        message: format!("fwmark: {e}"),
    }
}

impl uapi::Device for Shared {
    fn get(&self) -> String {
        uapi::format_get(
            &self.engine(),
            self.port(),
            self.fwmark.load(Ordering::Relaxed),
            std::time::SystemTime::now(),
        )
    }
    fn set(&self, mut req: uapi::SetRequest) -> Result<(), uapi::SetError> {
        // What can fail on the socket side comes first and changes nothing yet: a new socket
        // for a new port (bound, marked), or the mark on the current one. Then the engine,
        // which validates before it changes anything. Only then is the new socket swapped in.
        let (old_mark, new_mark) = (self.fwmark.load(Ordering::Relaxed), req.fwmark);
        let mark = new_mark.unwrap_or(old_mark);
        let current = self.socket();
        let rebound = match req.listen_port.take() {
            Some(p) if p != self.port() || p == 0 => {
                let s = NetSocket::bind(p).map_err(|e| uapi::SetError {
                    errno: uapi::SetError::EADDRINUSE,
                    message: format!("listen_port {p}: {e}"),
                })?;
                if mark != 0 {
                    s.set_mark(mark).map_err(mark_error)?;
                }
                Some(Arc::new(s))
            }
            _ => None,
        };
        if rebound.is_none()
            && let Some(m) = new_mark
        {
            current.set_mark(m).map_err(mark_error)?;
        }
        if let Err(e) = req.apply(&mut self.engine()) {
            if rebound.is_none() && new_mark.is_some() {
                let _ = current.set_mark(old_mark);
            }
            return Err(uapi::SetError::invalid(e));
        }
        if let Some(s) = rebound {
            let port = s.port();
            let old = std::mem::replace(
                &mut *self.sock.write().unwrap_or_else(|e| e.into_inner()),
                s,
            );
            old.retire();
            self.listen_port.store(port, Ordering::Relaxed);
            tracing::info!(iface = %self.name, port, "listening on a new port");
        }
        self.fwmark.store(mark, Ordering::Relaxed);
        self.sync_routes().map_err(|e| uapi::SetError {
            errno: uapi::SetError::EIO,
            message: e.to_string(),
        })
    }
}

/// "No such process": the kernel's answer to deleting a route that is not there.
fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

/// A running interface.
pub struct Dataplane {
    shared: Arc<Shared>,
    /// The forwarding threads.
    threads: Vec<std::thread::JoinHandle<()>>,
    uapi: JoinHandle<()>,
    uapi_path: PathBuf,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("name", &self.shared.name)
            .finish()
    }
}

/// Creates the TUN device, with offloads if wanted and the kernel has them.
fn build_tun(spec: &InterfaceSpec) -> Result<SyncDevice, DataplaneError> {
    let build = |offload: bool| {
        let tun = DeviceBuilder::new()
            .name(&spec.name)
            .mtu(spec.mtu)
            .offload(offload)
            .build_sync()?;
        tun.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(tun)
    };
    let tun = if spec.offload {
        build(true).or_else(|e| {
            tracing::warn!(iface = %spec.name, error = %e, "TUN offloads unavailable; reading one packet at a time");
            build(false)
        })
    } else {
        build(false)
    };
    tun.map_err(|source| DataplaneError::Tun {
        name: spec.name.clone(),
        source,
    })
}

impl Dataplane {
    /// Creates the interface, assigns its addresses, binds the socket and starts forwarding.
    /// Call from within a tokio runtime (the UAPI socket is served there).
    pub async fn start(
        spec: InterfaceSpec,
        peers: Vec<PeerConfig>,
    ) -> Result<Self, DataplaneError> {
        let tun = build_tun(&spec)?;
        let sock = NetSocket::bind(spec.listen_port).map_err(|source| DataplaneError::Udp {
            port: spec.listen_port,
            source,
        })?;
        let index = configure_link(&spec)?;

        let listen_port = sock.port();
        let mut engine = Engine::new(spec.private_key);
        for p in peers {
            engine.set_peer(p);
        }
        let sock = Arc::new(sock);
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            name: spec.name.clone(),
            index,
            listen_port: listen_port.into(),
            sock: std::sync::RwLock::new(sock.clone()),
            fwmark: std::sync::atomic::AtomicU32::new(0),
            addresses: spec.addresses.clone(),
            routes: Mutex::new(BTreeSet::new()),
            stop: AtomicBool::new(false),
            gone: tokio::sync::watch::Sender::new(false),
            gateway: Mutex::new(gateway::Gateway::default()),
            exit: Mutex::new(exit::Exit::default()),
            reflex: Mutex::new(reflex::Reflex::default()),
            relayed: Mutex::new(relayed::Relayed::default()),
        });
        shared.sync_routes()?;
        let (listener, uapi_path) = uapi::bind(&spec.name).map_err(DataplaneError::Uapi)?;

        let (offloaded, udp_offloaded) = (tun.tcp_gso(), tun.udp_gso());
        let tun = Arc::new(tun);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("canopy-{name}"))
                .spawn(f)
                .map_err(|e| {
                    // Threads already started end at the flag.
                    shared.stop.store(true, Ordering::Relaxed);
                    DataplaneError::Thread(e)
                })
        };
        let threads = vec![
            spawn("tun2net", {
                let (shared, tun) = (shared.clone(), tun.clone());
                Box::new(move || pump::tun_to_net(shared, tun))
            })?,
            spawn("net2tun", {
                let shared = shared.clone();
                Box::new(move || pump::net_to_tun(shared, tun))
            })?,
            spawn("timers", {
                let shared = shared.clone();
                Box::new(move || pump::timers(shared))
            })?,
        ];
        let uapi = tokio::spawn(uapi::serve(
            listener,
            shared.clone() as Arc<dyn uapi::Device>,
        ));
        tracing::info!(iface = %spec.name, port = listen_port, addresses = ?spec.addresses, offload = offloaded, udp_offload = udp_offloaded, socket = ?sock, "interface up");
        Ok(Self {
            shared,
            threads,
            uapi,
            uapi_path,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.port()
    }

    /// Adds or updates `set` and removes `remove`, then syncs routes. Other peers' sessions
    /// are untouched.
    /// Each peer of `set` with the other addresses it may be reached at (its handshakes go to
    /// each; the first to answer becomes its endpoint).
    pub fn update_peers(
        &self,
        set: Vec<(PeerConfig, sink::Candidates)>,
        remove: &[[u8; 32]],
    ) -> Result<(), DataplaneError> {
        {
            let mut e = self.shared.engine();
            for k in remove {
                e.remove_peer(k);
            }
            for (p, c) in set {
                let key = p.public_key;
                e.set_peer(p);
                // The relay last: a direct path that answers wins the handshake.
                let relay = self.shared.relay_candidate(&key);
                let all = c.direct.iter().chain(&c.quiet).copied().chain(relay);
                e.set_candidates(&key, all.collect());
                e.set_quiet(&key, c.quiet);
            }
        }
        self.shared.sync_routes()
    }

    pub fn peer_keys(&self) -> Vec<[u8; 32]> {
        self.shared.engine().peer_keys()
    }

    /// Packets the engine refused, by reason, and per peer (by key) those the policy refused.
    pub fn counters(&self) -> (crate::engine::Drops, Vec<crate::engine::PeerStatus>) {
        let e = self.shared.engine();
        (e.drops, e.peers())
    }

    /// Forwards `prefixes` into this node's site (none: stop), masquerading overlay sources
    /// unless `masquerade` is false.
    pub fn set_gateway(&self, prefixes: &[IpNetwork], masquerade: bool) -> std::io::Result<()> {
        let mut g = self
            .shared
            .gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.set(&self.shared.name, prefixes, masquerade)
    }

    /// Sends this node's internet traffic (the families of `spec`) through the tunnel, to the
    /// peer whose allowed IPs hold the default route; `spec.direct` stays outside. The socket
    /// is marked so the tunnel's own packets stay outside too.
    pub fn set_exit(&self, spec: ExitSpec) -> std::io::Result<()> {
        let on = spec.v4 || spec.v6;
        let sh = &self.shared;
        let mark = sh.fwmark.load(Ordering::Relaxed);
        if on && mark == 0 {
            sh.socket().set_mark(EXIT_TABLE)?;
            sh.fwmark.store(EXIT_TABLE, Ordering::Relaxed);
        }
        let r = sh
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(sh.index, spec);
        if !on && mark == EXIT_TABLE {
            sh.socket().set_mark(0)?;
            sh.fwmark.store(0, Ordering::Relaxed);
        }
        r
    }

    /// Puts the access policy's per-peer rules in force (`None`: no policy).
    pub fn set_policy(&self, rules: Option<HashMap<[u8; 32], Vec<crate::engine::filter::Allow>>>) {
        self.shared.engine().set_policy(rules);
    }

    /// Stops forwarding; the interface disappears with the TUN device.
    /// Resolves when the interface has been deleted by someone else (`ip link del`,
    /// `wg-quick down`): the forwarding has stopped and the caller should [`stop`](Self::stop).
    pub async fn deleted(&self) {
        let mut rx = self.shared.gone.subscribe();
        let _ = rx.wait_for(|gone| *gone).await;
    }

    pub fn is_deleted(&self) -> bool {
        *self.shared.gone.borrow()
    }

    pub async fn stop(mut self) {
        self.uapi.abort();
        self.shared.undo_routing();
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wakes the thread waiting on the socket now rather than at its next stop check, so
        // the port is free as soon as this returns (`wg-quick down; wg-quick up` rebinds it).
        self.shared.socket().retire();
        let threads = std::mem::take(&mut self.threads);
        for t in &threads {
            t.thread().unpark();
        }
        // The threads see the flag within their poll interval and drop the device and socket.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!(iface = %self.shared.name, "interface down");
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.uapi.abort();
        self.shared.undo_routing();
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.uapi_path);
    }
}

/// Puts the interface's addresses on it and sets it up; returns its index.
fn configure_link(spec: &InterfaceSpec) -> Result<u32, DataplaneError> {
    let fail = |op: String| move |source| DataplaneError::Netlink { op, source };
    let index = netlink::link_index(&spec.name).map_err(fail(format!("finding {}", spec.name)))?;
    for a in &spec.addresses {
        netlink::add_address(index, *a).map_err(fail(format!("addr add {a} dev {}", spec.name)))?;
    }
    netlink::set_up(index).map_err(fail(format!("link set {} up", spec.name)))?;
    Ok(index)
}

/// This host's global addresses, as `ip:port` endpoints to report: not those of `exclude`,
/// nor of any tunnel interface (TUN devices, WireGuard's, another overlay's): a peer that
/// took one would send this overlay's datagrams through that tunnel, or nowhere.
pub fn local_endpoints(exclude: &str, port: u16) -> Vec<String> {
    let (Ok(links), Ok(addresses)) = (netlink::links(), netlink::global_addresses()) else {
        return Vec::new();
    };
    let mut eps: Vec<String> = addresses
        .into_iter()
        .filter(|(index, _)| {
            links
                .iter()
                .find(|l| l.index == *index)
                .is_some_and(|l| l.name != exclude && !l.tunnel)
        })
        .map(|(_, ip)| SocketAddr::new(ip, port).to_string())
        .collect();
    // The controller takes at most this many (a host with many bridges and addresses has
    // more): the first ones, in the order the kernel lists them.
    if eps.len() > canopy_proto::MAX_ENDPOINTS {
        tracing::debug!(
            found = eps.len(),
            kept = canopy_proto::MAX_ENDPOINTS,
            "more local addresses than endpoints a peer may report"
        );
        eps.truncate(canopy_proto::MAX_ENDPOINTS);
    }
    eps
}
