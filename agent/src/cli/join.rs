//! `canopy-agent join`: enroll once, bring the interface up, follow the controller's maps
//! (as a gateway, an exit node's client, or a plain node) until stopped.

use std::sync::Arc;

use anyhow::bail;
use canopy_proto::join::JoinString;
use ipnetwork::IpNetwork;

use super::{IfaceOpts, shutdown_signal};
use crate::control::{self, ControlClient, ControlError, MapSink as _, Reported};
use crate::dataplane::{self, ControllerSink, Dataplane, InterfaceSpec};
use crate::keys::{self, PrivateKey};
use crate::punch;
use crate::state::StateDir;

/// The addresses of the controllers at `urls` (https://HOST:PORT), resolved now: they stay
/// outside the tunnel when an exit node takes the internet traffic, and their STUN ports
/// (UDP, the same address and port) tell this node its outside address.
async fn controller_addresses(urls: &[String]) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for url in urls {
        let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
            continue;
        };
        let (Some(host), port) = (uri.host(), uri.port_u16().unwrap_or(443)) else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => tracing::warn!(%url, error = %e, "cannot resolve a controller's address"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A prefix this node may offer to route: a network address (no host bits) of a routable
/// range, not a default route (that is `--advertise-exit-node`).
pub(super) fn advertised_prefix(s: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = s.parse().map_err(|e| format!("{s:?} is not a CIDR: {e}"))?;
    if net.network() != net.ip() {
        return Err(format!(
            "{s} has host bits set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        ));
    }
    if net.prefix() == 0 {
        return Err(format!(
            "{s} is the default route: offer it with --advertise-exit-node"
        ));
    }
    let ip = net.ip();
    if ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() {
        return Err(format!("{s} is not a site's subnet"));
    }
    Ok(net)
}

pub(super) async fn join(
    join_string: &str,
    dir: &std::path::Path,
    hostname: Option<String>,
    iface: IfaceOpts,
) -> anyhow::Result<()> {
    if iface.endpoints.len() > canopy_proto::MAX_ENDPOINTS {
        bail!(
            "at most {} --endpoint values (the controller keeps that many per peer)",
            canopy_proto::MAX_ENDPOINTS
        );
    }
    let state = StateDir::open(dir)?;
    let key = state.private_key()?;
    let (enrollment, map) = enrolled(&state, &key, join_string, hostname).await?;
    let spec = InterfaceSpec {
        name: iface.interface.clone(),
        private_key: key.secret().to_bytes(),
        addresses: dataplane::map_addresses(&map),
        listen_port: 0,
        mtu: iface.mtu,
        offload: dataplane::offload_from_env(),
    };
    let dp = Arc::new(start_on_port(spec, iface.listen_port, state.listen_port()?).await?);
    state.save_listen_port(dp.listen_port())?;
    let mut sink = ControllerSink::new(dp.clone(), !iface.no_masquerade);
    let urls: Vec<String> = std::iter::once(enrollment.controller_url.clone())
        .chain(iface.controllers.iter().cloned())
        .collect();
    let controllers = controller_addresses(&urls).await;
    // The relay is on the controllers' UDP port, like STUN.
    dp.set_relay_servers(controllers.clone());
    sink.direct = controllers.iter().map(|a| a.ip()).collect();
    sink.direct.dedup();
    // The last map takes effect at once: the overlay works even while the controller is away.
    sink.apply(&map, None)
        .map_err(|e| anyhow::anyhow!("applying the saved map: {e}"))?;
    let mut client = ControlClient::new(enrollment, Some(map), Some(state.clone()));
    client.controllers.extend(iface.controllers.iter().cloned());
    client.advertised_routes = offered_routes(&iface);
    client.exit_node = iface.exit_node.clone().unwrap_or_default();
    let tasks = background(&iface, &dp, state, &controllers, &mut client).await?;
    let stop = async {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = dp.deleted() => {}
        }
    };
    let result = client.run(&mut sink, stop).await;
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    drop(sink);
    let deleted = dp.is_deleted();
    if let Ok(dp) = Arc::try_unwrap(dp) {
        dp.stop().await;
    }
    match result {
        Ok(()) if deleted => bail!("interface {} was deleted", iface.interface),
        Ok(()) => Ok(()),
        Err(ControlError::Removed) => bail!("{}", ControlError::Removed),
        Err(e) => Err(e.into()),
    }
}

/// What runs beside the control stream: following this node's endpoints (unless fixed by
/// `--endpoint`), relay tickets, hole punches, and `/metrics` if asked for.
async fn background(
    iface: &IfaceOpts,
    dp: &Arc<Dataplane>,
    state: StateDir,
    controllers: &[std::net::SocketAddr],
    client: &mut ControlClient,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if iface.endpoints.is_empty() {
        let local = dataplane::local_endpoints(&iface.interface, dp.listen_port());
        let (tx, rx) = tokio::sync::watch::channel(Reported {
            local,
            outside: Vec::new(),
        });
        client.endpoints = rx;
        let follow = follow_endpoints(Follow {
            dp: dp.clone(),
            iface: iface.interface.clone(),
            state,
            tx,
            stun: controllers.to_vec(),
            maps: client.maps(),
            asks: client.punch_asks(),
            paths: client.path_reports(),
        });
        tasks.push(tokio::spawn(follow));
    } else {
        let fixed = Reported {
            local: iface.endpoints.clone(),
            outside: Vec::new(),
        };
        client.endpoints = tokio::sync::watch::channel(fixed).1;
    }
    tasks.push(tokio::spawn(take_relay_tickets(
        dp.clone(),
        client.relay_tickets(),
        controllers.to_vec(),
    )));
    tasks.push(tokio::spawn(take_punches(dp.clone(), client.punches())));
    if let Some(addr) = iface.metrics {
        tasks.push(serve_metrics_for(addr, dp, Some(client)).await?);
    }
    if !iface.no_dns {
        let dns = crate::dns::serve::run(iface.interface.clone(), client.maps());
        tasks.push(tokio::spawn(dns));
    }
    Ok(tasks)
}

/// The saved enrollment and map, or a new enrollment with the join string (once: a lost
/// answer is recovered with the credential kept before asking).
async fn enrolled(
    state: &StateDir,
    key: &PrivateKey,
    join_string: &str,
    hostname: Option<String>,
) -> anyhow::Result<(crate::state::Enrollment, canopy_proto::v1::NetworkMap)> {
    if let (Some(e), Some(map)) = (state.enrollment()?, state.map()?) {
        tracing::info!(peer = %e.peer_id, revision = map.revision, "already enrolled; resuming from the saved state");
        return Ok((e, map));
    }
    let join = JoinString::parse(join_string)?;
    let hostname = hostname.unwrap_or_else(system_hostname);
    let credential = state.pending_credential(join_string, control::new_credential)?;
    let (e, map) = control::enroll_with(&join, key.public_key(), &hostname, &credential).await?;
    state.complete_enrollment(&e, &map)?;
    say!(
        "enrolled as {} in network {} with address {}",
        e.peer_id,
        map.network_name,
        map.addresses.join(", ")
    );
    Ok((e, map))
}

/// Starts the interface on the port asked for, else on the one used last (a random one if
/// that is taken now), else on a random free one.
async fn start_on_port(
    spec: InterfaceSpec,
    asked: Option<u16>,
    last: Option<u16>,
) -> anyhow::Result<Dataplane> {
    let on = |port| InterfaceSpec {
        listen_port: port,
        ..spec.clone()
    };
    Ok(match (asked, last) {
        (Some(port), _) => Dataplane::start(on(port), vec![]).await?,
        (None, Some(last)) => match Dataplane::start(on(last), vec![]).await {
            Ok(dp) => dp,
            Err(e @ dataplane::DataplaneError::Udp { .. }) => {
                tracing::warn!(port = last, error = %e, "the last listen port is taken; using a random one");
                Dataplane::start(on(0), vec![]).await?
            }
            Err(e) => return Err(e.into()),
        },
        (None, None) => Dataplane::start(on(0), vec![]).await?,
    })
}

/// What runs once a second beside the control stream: the endpoints reported to the
/// controller (the listen port, this host's addresses, the NAT's outside address), STUN, the
/// relay's binding, hole punches to ask for, and the counters `status` reads.
struct Follow {
    dp: Arc<Dataplane>,
    iface: String,
    state: StateDir,
    tx: tokio::sync::watch::Sender<Reported>,
    /// The controllers' UDP ports (STUN and relay).
    stun: Vec<std::net::SocketAddr>,
    maps: tokio::sync::watch::Receiver<Option<canopy_proto::v1::NetworkMap>>,
    asks: tokio::sync::broadcast::Sender<String>,
    paths: Arc<tokio::sync::watch::Sender<Vec<canopy_proto::v1::PairPath>>>,
}

/// Keeps the endpoints reported to the controller current: the listen port (checked every
/// second, `wg set IFACE listen-port N` moves it), this host's addresses (every 10 s) and
/// where a STUN server sees it (every 20 s). A new port is also saved, so a restart keeps it.
async fn follow_endpoints(f: Follow) {
    let dp = &f.dp;
    let mut port = dp.listen_port();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut n, mut local, mut outside) = (0u32, Vec::new(), None);
    let mut planner = punch::Planner::default();
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        let now = dp.listen_port();
        let moved = now != port;
        // Ask the controllers where they see this socket: at start, on a new port, then
        // every STUN_EVERY seconds (NAT mappings of idle UDP live 30 s or more).
        if moved || n % STUN_EVERY == 1 {
            for s in &f.stun {
                if let Err(e) = dp.stun_probe(*s) {
                    tracing::debug!(server = %s, error = %e, "STUN request not sent");
                }
            }
            dp.relay_bind();
        }
        dp.relay_spread();
        let seen = dp.reflexive(STUN_FRESH);
        plan_punches(&f, &mut planner, &punch::outside_of(&local, outside, port));
        if n.is_multiple_of(5) {
            save_counters(&f, &planner);
            report_paths(&f, &planner, n.is_multiple_of(60));
        }
        let look = moved || n == 1 || n.is_multiple_of(10);
        if !look && seen == outside {
            continue;
        }
        if moved {
            port = now;
            if let Err(e) = f.state.save_listen_port(port) {
                tracing::warn!(error = %e, "could not save the listen port");
            }
        }
        if look || local.is_empty() {
            let name = f.iface.clone();
            match tokio::task::spawn_blocking(move || dataplane::local_endpoints(&name, now)).await
            {
                Ok(eps) => local = eps,
                Err(_) => continue,
            }
        }
        outside = seen;
        let eps = Reported {
            outside: punch::outside_of(&local, outside, port),
            local: local.clone(),
        };
        f.tx.send_if_modified(|held| {
            let changed = *held != eps;
            if changed {
                *held = eps;
            }
            changed
        });
    }
}

/// Asks the controller to punch a hole to each relayed peer the planner says is due.
fn plan_punches(f: &Follow, planner: &mut punch::Planner, mine: &[String]) {
    let (_, status) = f.dp.counters();
    let relayed: std::collections::HashSet<[u8; 32]> = status
        .iter()
        .filter(|p| p.config.endpoint.is_some_and(|e| dataplane::is_relayed(&e)))
        .map(|p| p.config.public_key)
        .collect();
    let map = f.maps.borrow();
    let peers: Vec<punch::PeerPath<'_>> = map
        .iter()
        .flat_map(|m| &m.peers)
        .filter_map(|p| {
            let key: [u8; 32] = p.public_key.as_slice().try_into().ok()?;
            Some(punch::PeerPath {
                key,
                peer_id: &p.peer_id,
                relayed: relayed.contains(&key),
                outside: &p.outside,
            })
        })
        .collect();
    for id in planner.due(std::time::Instant::now(), mine, &peers) {
        tracing::debug!(peer = %id, "asking for a hole punch");
        // No session up: dropped; asked again at the next try.
        let _ = f.asks.send(id);
    }
}

/// Reports this node's paths to the controller when one changed (direct, relayed, where), or
/// with `anyway` (every minute: handshakes and bytes; the session sends what changed).
fn report_paths(f: &Follow, planner: &punch::Planner, anyway: bool) {
    let (_, peers) = f.dp.counters();
    let map = f.maps.borrow();
    let Some(m) = map.as_ref() else {
        return;
    };
    let now = std::time::Instant::now();
    let mut pairs: Vec<canopy_proto::v1::PairPath> = m
        .peers
        .iter()
        .filter_map(|r| {
            let p = peers
                .iter()
                .find(|p| p.config.public_key == r.public_key.as_slice())?;
            let v = path_json(p, planner.why(&p.config.public_key, &r.outside, now));
            let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
            Some(canopy_proto::v1::PairPath {
                peer_id: r.peer_id.clone(),
                path: text("path"),
                via: if text("path") == "relayed" {
                    String::new()
                } else {
                    text("via")
                },
                why: text("why"),
                last_handshake_secs: v["last_handshake_secs"].as_i64().unwrap_or(-1),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                last_handshake_unix: p
                    .since_handshake
                    .map_or(0, |d| crate::report::unix_now() - d.as_secs() as i64),
            })
        })
        .collect();
    pairs.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    let kinds = |ps: &[canopy_proto::v1::PairPath]| -> Vec<(String, String, String)> {
        let k = |p: &canopy_proto::v1::PairPath| (p.peer_id.clone(), p.path.clone(), p.via.clone());
        ps.iter().map(k).collect()
    };
    f.paths.send_if_modified(|held| {
        let changed = anyway || kinds(held) != kinds(&pairs);
        if changed {
            *held = pairs;
        }
        changed
    });
}

/// Starts `GET /metrics` on `addr`; without a control client (`up`), no map and no controller.
pub(super) async fn serve_metrics_for(
    addr: std::net::SocketAddr,
    dp: &Arc<Dataplane>,
    client: Option<&ControlClient>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let live = crate::metrics::AgentLive {
        dp: dp.clone(),
        maps: client.map_or_else(|| tokio::sync::watch::channel(None).1, |c| c.maps()),
        connected: client.map_or_else(|| tokio::sync::watch::channel(false).1, |c| c.connected()),
        lock: client.map(ControlClient::lock_stats).unwrap_or_default(),
    };
    let registry = Arc::new(live.registry());
    Ok(tokio::spawn(async move {
        let serve = canopy_proto::metrics::serve(l, registry, std::future::pending());
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    }))
}

/// Hands each hole punch the controller asks for to the data plane.
async fn take_punches(
    dp: Arc<Dataplane>,
    mut punches: tokio::sync::broadcast::Receiver<canopy_proto::v1::Punch>,
) {
    loop {
        match punches.recv().await {
            Ok(p) => {
                if let Ok(key) = <[u8; 32]>::try_from(p.public_key.as_slice()) {
                    tracing::debug!(peer = %p.peer_id, "punching a hole");
                    dp.punch(&key);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Hands each relay ticket the controller sends to the data plane (which binds with it at
/// the controllers' UDP ports and at the relays the ticket names).
async fn take_relay_tickets(
    dp: Arc<Dataplane>,
    mut tickets: tokio::sync::watch::Receiver<Option<canopy_proto::v1::RelayTicket>>,
    controllers: Vec<std::net::SocketAddr>,
) {
    while tickets.changed().await.is_ok() {
        let t = tickets.borrow_and_update().clone();
        if let Some(t) = t {
            let mut servers = controllers.clone();
            let more = t
                .relays
                .iter()
                .filter_map(|r| r.parse::<std::net::SocketAddr>().ok())
                .take(8);
            servers.extend(more);
            servers.sort();
            servers.dedup();
            dp.set_relay_servers(servers);
            dp.set_relay_ticket(t.ticket);
        }
    }
}

/// The routes this node offers: `--advertise-routes`, and both default routes as an exit node.
fn offered_routes(iface: &IfaceOpts) -> Vec<String> {
    let mut out: Vec<String> = iface
        .advertise_routes
        .iter()
        .map(ToString::to_string)
        .collect();
    if iface.advertise_exit_node {
        out.extend(["0.0.0.0/0".into(), "::/0".into()]);
    }
    out
}

/// Seconds between STUN requests, and how long an answer stays this node's outside address.
const STUN_EVERY: u32 = 20;
const STUN_FRESH: std::time::Duration = std::time::Duration::from_secs(65);

/// Writes the engine's drop counters and paths to the state dir (every few seconds), where
/// `canopy-agent status` reads them.
fn save_counters(f: &Follow, planner: &punch::Planner) {
    let (drops, peers) = f.dp.counters();
    let per_peer: serde_json::Map<String, serde_json::Value> = peers
        .iter()
        .map(|p| {
            (
                keys::encode(&p.config.public_key),
                serde_json::json!(p.policy_drops),
            )
        })
        .collect();
    let map = f.maps.borrow();
    let outside = |key: &[u8; 32]| {
        map.iter()
            .flat_map(|m| &m.peers)
            .find(|p| p.public_key == key)
            .map_or(&[][..], |p| p.outside.as_slice())
    };
    let now = std::time::Instant::now();
    let paths: serde_json::Map<String, serde_json::Value> = peers
        .iter()
        .map(|p| {
            let key = &p.config.public_key;
            let why = planner.why(key, outside(key), now);
            (keys::encode(key), path_json(p, why))
        })
        .collect();
    let v = serde_json::json!({
        "policy": drops.policy,
        "spoofed": drops.spoofed,
        "no_route": drops.no_route,
        "invalid": drops.invalid,
        "policy_by_peer": per_peer,
        "paths": paths,
    });
    if let Err(e) = f.state.save_counters(&v) {
        tracing::debug!(error = %e, "could not save the counters");
    }
}

/// How this node reaches a peer now: direct (at which address) or through the relay, the last
/// handshake's age and the bytes each way.
/// Why a relayed peer is relayed (`why`, from the punch planner).
fn path_json(p: &crate::engine::PeerStatus, why: String) -> serde_json::Value {
    let (path, via, why) = match p.config.endpoint {
        Some(e) if dataplane::is_relayed(&e) => ("relayed", "the controller's relay".into(), why),
        Some(e) => ("direct", e.to_string(), String::new()),
        None => ("none", String::new(), String::new()),
    };
    serde_json::json!({
        "path": path,
        "via": via,
        "why": why,
        "last_handshake_secs": p.since_handshake.map(|d| d.as_secs()),
        "rx_bytes": p.rx_bytes,
        "tx_bytes": p.tx_bytes,
    })
}

/// This host's name as the controller accepts it: letters, digits, '.', '-', '_' (anything
/// else becomes '-'), at most 253 bytes. A name given with --hostname is sent as it is.
fn system_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    sanitize_hostname(raw.trim())
}

pub(super) fn sanitize_hostname(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect()
}
