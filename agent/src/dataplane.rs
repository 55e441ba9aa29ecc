//! The I/O shell around the [`Engine`]: a TUN device and a UDP socket on tokio, a timer tick,
//! the UAPI socket, and the interface's addresses and routes.
//!
//! Each direction runs as its own task: read a batch (one blocking read, then whatever else is
//! ready), take the engine lock once for the batch, then write what came out. Addresses and
//! routes are set with `ip` (iproute2), as wg-quick does; the interface and its routes vanish
//! when the agent stops, because the TUN device is not persistent.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use canopy_proto::v1::{NetworkDelta, NetworkMap, RemotePeer};
use ipnetwork::IpNetwork;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::control::MapSink;
use crate::engine::{Engine, Outbox, PeerConfig};
use crate::uapi;

/// Packets taken per batch from the TUN device or the socket.
const BATCH: usize = 64;
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
    #[error("ip {cmd}: {reason}")]
    Ip { cmd: String, reason: String },
    #[error("UAPI socket: {0}")]
    Uapi(std::io::Error),
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
}

impl std::fmt::Debug for InterfaceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterfaceSpec")
            .field("name", &self.name)
            .field("addresses", &self.addresses)
            .finish()
    }
}

struct Shared {
    engine: Mutex<Engine>,
    name: String,
    listen_port: u16,
    addresses: Vec<IpNetwork>,
    /// Routes this agent added through the interface.
    routes: Mutex<BTreeSet<IpNetwork>>,
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut cmds = Vec::new();
        for r in want.difference(&have) {
            cmds.push(format!("route replace {r} dev {}", self.name));
        }
        for r in have.difference(&want) {
            cmds.push(format!("route del {r} dev {}", self.name));
        }
        if !cmds.is_empty() {
            ip_batch(&cmds)?;
            tracing::info!(iface = %self.name, routes = want.len(), "routes updated");
        }
        *have = want;
        Ok(())
    }
}

impl uapi::Device for Shared {
    fn get(&self) -> String {
        uapi::format_get(&self.engine(), self.listen_port)
    }
    fn set(&self, req: uapi::SetRequest) -> Result<(), String> {
        req.apply(&mut self.engine(), self.listen_port)?;
        self.sync_routes().map_err(|e| e.to_string())
    }
}

/// Runs `ip -batch -` with the given commands.
fn ip_batch(cmds: &[String]) -> Result<(), DataplaneError> {
    let fail = |reason: String| DataplaneError::Ip {
        cmd: cmds.join("; "),
        reason,
    };
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(cmds.join("\n").as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A running interface.
pub struct Dataplane {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    uapi_path: PathBuf,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("name", &self.shared.name)
            .finish()
    }
}

fn v6_mapped(to: SocketAddr, v6_socket: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        other => other,
    }
}

fn canonical(from: SocketAddr) -> SocketAddr {
    SocketAddr::new(from.ip().to_canonical(), from.port())
}

impl Dataplane {
    /// Creates the interface, assigns its addresses, binds the socket and starts forwarding.
    pub async fn start(
        spec: InterfaceSpec,
        peers: Vec<PeerConfig>,
    ) -> Result<Self, DataplaneError> {
        let tun = DeviceBuilder::new()
            .name(&spec.name)
            .mtu(spec.mtu)
            .build_async()
            .map_err(|source| DataplaneError::Tun {
                name: spec.name.clone(),
                source,
            })?;
        let mut cmds: Vec<String> = spec
            .addresses
            .iter()
            .map(|a| match a {
                IpNetwork::V4(_) => format!("addr add {a} dev {}", spec.name),
                IpNetwork::V6(_) => format!("addr add {a} dev {} nodad", spec.name),
            })
            .collect();
        cmds.push(format!("link set {} up", spec.name));
        ip_batch(&cmds)?;

        // One dual-stack socket where IPv6 exists, else IPv4 only.
        let (udp, v6) = match UdpSocket::bind(("::", spec.listen_port)).await {
            Ok(s) => (s, true),
            Err(_) => (
                UdpSocket::bind(("0.0.0.0", spec.listen_port))
                    .await
                    .map_err(|source| DataplaneError::Udp {
                        port: spec.listen_port,
                        source,
                    })?,
                false,
            ),
        };
        let listen_port = udp
            .local_addr()
            .map_err(|source| DataplaneError::Udp {
                port: spec.listen_port,
                source,
            })?
            .port();
        let mut engine = Engine::new(spec.private_key);
        for p in peers {
            engine.set_peer(p);
        }
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            name: spec.name.clone(),
            listen_port,
            addresses: spec.addresses.clone(),
            routes: Mutex::new(BTreeSet::new()),
        });
        shared.sync_routes()?;
        let (listener, uapi_path) = uapi::bind(&spec.name).map_err(DataplaneError::Uapi)?;

        let tun = Arc::new(tun);
        let udp = Arc::new(udp);
        let buf_len = usize::from(spec.mtu) + 128;
        let tasks = vec![
            tokio::spawn(tun_to_net(
                shared.clone(),
                tun.clone(),
                udp.clone(),
                v6,
                buf_len,
            )),
            tokio::spawn(net_to_tun(
                shared.clone(),
                tun.clone(),
                udp.clone(),
                v6,
                buf_len,
            )),
            tokio::spawn(timers(shared.clone(), udp.clone(), v6)),
            tokio::spawn(uapi::serve(
                listener,
                shared.clone() as Arc<dyn uapi::Device>,
            )),
        ];
        tracing::info!(iface = %spec.name, port = listen_port, addresses = ?spec.addresses, "interface up");
        Ok(Self {
            shared,
            tasks,
            uapi_path,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port
    }

    /// Adds or updates `set` and removes `remove`, then syncs routes. Other peers' sessions
    /// are untouched.
    pub fn update_peers(
        &self,
        set: Vec<PeerConfig>,
        remove: &[[u8; 32]],
    ) -> Result<(), DataplaneError> {
        {
            let mut e = self.shared.engine();
            for k in remove {
                e.remove_peer(k);
            }
            for p in set {
                e.set_peer(p);
            }
        }
        self.shared.sync_routes()
    }

    pub fn peer_keys(&self) -> Vec<[u8; 32]> {
        self.shared.engine().peer_keys()
    }

    /// Stops forwarding; the interface disappears with the TUN device.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.uapi_path);
        tracing::info!(iface = %self.shared.name, "interface down");
    }
}

async fn send_all(udp: &UdpSocket, out: &Outbox, v6: bool) {
    for (to, d) in out.net_packets() {
        if let Err(e) = udp.send_to(d, v6_mapped(to, v6)).await {
            tracing::debug!(%to, error = %e, "send failed");
        }
    }
}

async fn tun_to_net(
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    udp: Arc<UdpSocket>,
    v6: bool,
    buf_len: usize,
) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; buf_len]).collect();
    let mut lens = [0usize; BATCH];
    let mut out = Outbox::default();
    loop {
        let n = match tun.recv(&mut bufs[0]).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "TUN read failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        lens[0] = n;
        let mut count = 1;
        while count < BATCH {
            match tun.try_recv(&mut bufs[count]) {
                Ok(n) => {
                    lens[count] = n;
                    count += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        shared
            .engine()
            .handle_tun((0..count).map(|i| &bufs[i][..lens[i]]), &mut out);
        send_all(&udp, &out, v6).await;
    }
}

async fn net_to_tun(
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    udp: Arc<UdpSocket>,
    v6: bool,
    buf_len: usize,
) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; buf_len.max(2048)]).collect();
    let mut meta = [(0usize, SocketAddr::from(([0, 0, 0, 0], 0))); BATCH];
    let mut out = Outbox::default();
    loop {
        let (n, from) = match udp.recv_from(&mut bufs[0]).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        meta[0] = (n, canonical(from));
        let mut count = 1;
        while count < BATCH {
            match udp.try_recv_from(&mut bufs[count]) {
                Ok((n, from)) => {
                    meta[count] = (n, canonical(from));
                    count += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        shared.engine().handle_network(
            (0..count).map(|i| (meta[i].1, &bufs[i][..meta[i].0])),
            &mut out,
        );
        for p in out.tun_packets() {
            if let Err(e) = tun.send(p).await {
                tracing::debug!(error = %e, "TUN write failed");
            }
        }
        send_all(&udp, &out, v6).await;
    }
}

async fn timers(shared: Arc<Shared>, udp: Arc<UdpSocket>, v6: bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Outbox::default();
    loop {
        tick.tick().await;
        out.clear();
        shared.engine().tick(Instant::now(), &mut out);
        send_all(&udp, &out, v6).await;
    }
}

/// This host's global addresses (not on `exclude`), as `ip:port` endpoints to report.
pub fn local_endpoints(exclude: &str, port: u16) -> Vec<String> {
    let Ok(out) = Command::new("ip")
        .args(["-o", "addr", "show", "scope", "global"])
        .output()
    else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut eps = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[1] == exclude {
            continue;
        }
        if let Some(Ok(ip)) = f[3].split('/').next().map(str::parse::<IpAddr>) {
            eps.push(SocketAddr::new(ip, port).to_string());
        }
    }
    eps
}

/// Applies the controller's network maps to a [`Dataplane`].
pub struct ControllerSink {
    dp: Arc<Dataplane>,
    /// peer id → public key, to turn a delta's removed ids into keys.
    keys: HashMap<String, [u8; 32]>,
    /// Endpoints last taken from the map per peer: a roamed endpoint is kept until the
    /// controller reports different ones.
    endpoints: HashMap<[u8; 32], Vec<String>>,
}

impl ControllerSink {
    pub fn new(dp: Arc<Dataplane>) -> Self {
        Self {
            dp,
            keys: HashMap::new(),
            endpoints: HashMap::new(),
        }
    }

    fn config(&mut self, p: &RemotePeer) -> Option<PeerConfig> {
        let key: [u8; 32] = p.public_key.as_slice().try_into().ok()?;
        let allowed_ips = p
            .allowed_ips
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let changed = self.endpoints.get(&key) != Some(&p.endpoints);
        let endpoint = if changed {
            p.endpoints.iter().find_map(|e| e.parse().ok())
        } else {
            None
        };
        self.endpoints.insert(key, p.endpoints.clone());
        self.keys.insert(p.peer_id.clone(), key);
        Some(PeerConfig {
            public_key: key,
            preshared_key: None,
            endpoint,
            allowed_ips,
            persistent_keepalive: Some(MANAGED_KEEPALIVE),
        })
    }
}

impl MapSink for ControllerSink {
    fn apply(&mut self, map: &NetworkMap, delta: Option<&NetworkDelta>) -> Result<(), String> {
        let (set, remove): (Vec<PeerConfig>, Vec<[u8; 32]>) = match delta {
            Some(d) => {
                let remove = d
                    .removed
                    .iter()
                    .filter_map(|id| self.keys.remove(id))
                    .collect();
                (
                    d.upserted.iter().filter_map(|p| self.config(p)).collect(),
                    remove,
                )
            }
            None => {
                let set: Vec<PeerConfig> =
                    map.peers.iter().filter_map(|p| self.config(p)).collect();
                let keep: BTreeSet<[u8; 32]> = set.iter().map(|p| p.public_key).collect();
                let remove = self
                    .dp
                    .peer_keys()
                    .into_iter()
                    .filter(|k| !keep.contains(k))
                    .collect();
                self.keys.retain(|_, k| keep.contains(k));
                (set, remove)
            }
        };
        for k in &remove {
            self.endpoints.remove(k);
        }
        self.dp
            .update_peers(set, &remove)
            .map_err(|e| e.to_string())
    }
}

/// The interface addresses for a controller map: each own address with its network's prefix.
pub fn map_addresses(map: &NetworkMap) -> Vec<IpNetwork> {
    let cidrs: Vec<IpNetwork> = map.cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    map.addresses
        .iter()
        .filter_map(|a| a.parse::<IpNetwork>().ok())
        .filter_map(|a| {
            let prefix = cidrs
                .iter()
                .find(|c| c.contains(a.ip()))
                .map_or(a.prefix(), |c| c.prefix());
            IpNetwork::new(a.ip(), prefix).ok()
        })
        .collect()
}
