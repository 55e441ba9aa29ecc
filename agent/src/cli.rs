//! The `canopy-agent` command line.

use ipnetwork::IpNetwork;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use canopy_proto::join::JoinString;
use clap::{Parser, Subcommand};

use std::sync::Arc;

use crate::config;
use crate::control::{self, ControlClient, ControlError, MapSink as _};
use crate::dataplane::{self, ControllerSink, DEFAULT_MTU, Dataplane, InterfaceSpec};
use crate::keys::{self, PrivateKey};
use crate::state::StateDir;

/// Prints one line for a person. Names and hostnames come from the controller and the other
/// peers: control characters are escaped, so they cannot forge lines or rewrite the terminal.
macro_rules! say {
    ($($t:tt)*) => {
        println!("{}", canopy_proto::text::escape(&format!($($t)*)))
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "canopy-agent",
    version,
    about = "Canopy overlay agent",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The userspace-implementation convention of wireguard-go: `canopy-agent IFACE` creates
    /// interface IFACE with its UAPI socket and nothing else configured, then runs in the
    /// background (so `WG_QUICK_USERSPACE_IMPLEMENTATION=canopy-agent wg-quick up` works).
    #[arg(value_name = "IFACE", required = true)]
    interface: Option<String>,
    /// With IFACE: stay in the foreground.
    #[arg(short = 'f', long = "foreground", requires = "interface")]
    foreground: bool,
}

#[derive(clap::Args, Debug)]
struct StateOpts {
    /// Where the agent keeps its key, enrollment and last map.
    #[arg(long, env = "CANOPY_STATE_DIR", default_value = "/var/lib/canopy")]
    state_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
struct IfaceOpts {
    /// Interface name.
    #[arg(long, default_value = "canopy0", env = "CANOPY_INTERFACE")]
    interface: String,
    /// WireGuard UDP port. Default: the port this node used last (kept in the state dir), or
    /// on first start a random free one, as the kernel picks, so several overlays run on one
    /// host with no flags. The controller is told of the port, and of any later change
    /// (`wg set IFACE listen-port N`).
    #[arg(long)]
    listen_port: Option<u16>,
    #[arg(long, default_value_t = crate::dataplane::DEFAULT_MTU)]
    mtu: u16,
    /// Endpoints (IP:PORT) to report to the controller; default: this host's global addresses.
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// More controller replicas (https://HOST:PORT) to fail over to, after the join string's.
    #[arg(long = "controller")]
    controllers: Vec<String>,
    /// As a site gateway, do not masquerade overlay sources: the site's router then needs a
    /// route to the overlay's CIDRs via this host.
    #[arg(long)]
    no_masquerade: bool,
    /// Offer to route these prefixes (comma-separated CIDRs: the sites behind this host) for
    /// the network. Each waits for `canopy route approve` unless the policy auto-approves it.
    #[arg(long, value_delimiter = ',', value_parser = advertised_prefix)]
    advertise_routes: Vec<IpNetwork>,
}

/// A prefix this node may offer to route: a network address (no host bits) of a routable
/// range, not a default route (exit nodes are advertised by an admin for now).
fn advertised_prefix(s: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = s.parse().map_err(|e| format!("{s:?} is not a CIDR: {e}"))?;
    if net.network() != net.ip() {
        return Err(format!(
            "{s} has host bits set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        ));
    }
    let ip = net.ip();
    if net.prefix() == 0 || ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() {
        return Err(format!("{s} is not a site's subnet"));
    }
    Ok(net)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up an interface from a wg-quick style file; it takes the file's name
    /// (/etc/canopy/wg0.conf → wg0). Runs until stopped.
    Up { config: PathBuf },
    /// Enroll with a controller (once), bring up the interface and follow the controller's
    /// network map until stopped. Running it again resumes with the same key and address.
    Join {
        /// The join string from `canopy token create` (canopy1:...).
        join_string: String,
        #[command(flatten)]
        state: StateOpts,
        /// Name this node reports (defaults to the system hostname).
        #[arg(long)]
        hostname: Option<String>,
        #[command(flatten)]
        iface: IfaceOpts,
    },
    /// Show this node's enrollment, address and peers.
    Status {
        #[command(flatten)]
        state: StateOpts,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
}

/// Runs the CLI; the binary maps an error to one line on stderr and exit code 1.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        let iface = cli.interface.unwrap_or_default();
        return if cli.foreground {
            bare_interface(&iface).await
        } else {
            detach(&iface).await
        };
    };
    match command {
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            let k = PrivateKey::from_base64(&s).context("private key on stdin")?;
            println!("{}", keys::encode(&k.public_key()));
            Ok(())
        }
        Command::Status { state, json } => status(&state.state_dir, json),
        Command::Up { config } => up(&config).await,
        Command::Join {
            join_string,
            state,
            hostname,
            iface,
        } => join(&join_string, &state.state_dir, hostname, iface).await,
    }
}

/// `canopy-agent status --json`: the enrollment, the map as last applied, the node's inbound
/// rules and what the running agent last counted (packets dropped, by reason and by peer).
fn status_json(
    e: &crate::state::Enrollment,
    public_key: &[u8; 32],
    map: &canopy_proto::v1::NetworkMap,
    counters: &serde_json::Value,
) -> serde_json::Value {
    let denied = |p: &canopy_proto::v1::RemotePeer| {
        counters["policy_by_peer"][keys::encode(&p.public_key)]
            .as_u64()
            .unwrap_or(0)
    };
    serde_json::json!({
        "peer_id": e.peer_id,
        "network_id": e.network_id,
        "network": map.network_name,
        "controller": e.controller_url,
        "public_key": keys::encode(public_key),
        "addresses": map.addresses,
        "revision": map.revision,
        "peers": map.peers.iter().map(|p| serde_json::json!({
            "peer_id": p.peer_id,
            "hostname": p.hostname,
            "public_key": keys::encode(&p.public_key),
            "allowed_ips": p.allowed_ips,
            "endpoints": p.endpoints,
            "denied_by_policy": denied(p),
        })).collect::<Vec<_>>(),
        "dropped": {
            "policy": counters["policy"].as_u64().unwrap_or(0),
            "spoofed": counters["spoofed"].as_u64().unwrap_or(0),
            "no_route": counters["no_route"].as_u64().unwrap_or(0),
            "invalid": counters["invalid"].as_u64().unwrap_or(0),
        },
        "policy": map.policy.as_ref().map(|part| part.inbound.iter().map(|r| serde_json::json!({
            "from_any": r.from_any,
            "from_tags": r.from_tags,
            "from_peers": r.from_peers,
            "proto": canopy_proto::v1::Protocol::try_from(r.proto).map_or("unknown", |p| p.as_str_name()),
            "ports": r.ports.iter().map(|p| format!("{}-{}", p.first, p.last)).collect::<Vec<_>>(),
            "dst": r.dst,
        })).collect::<Vec<_>>()),
    })
}

fn status(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let state = StateDir::open(dir)?;
    let Some(e) = state.enrollment()? else {
        bail!(
            "not enrolled (no enrollment in {}): run `canopy-agent join`",
            dir.display()
        );
    };
    let key = state.private_key()?;
    let map = state.map()?.unwrap_or_default();
    let counters = state.counters().ok().flatten().unwrap_or_default();
    let denied = |p: &canopy_proto::v1::RemotePeer| {
        counters["policy_by_peer"][keys::encode(&p.public_key)]
            .as_u64()
            .unwrap_or(0)
    };
    if json {
        let v = status_json(&e, &key.public_key(), &map, &counters);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    say!("peer:       {}", e.peer_id);
    say!("network:    {} ({})", map.network_name, e.network_id);
    say!("controller: {}", e.controller_url);
    say!("public key: {}", keys::encode(&key.public_key()));
    say!("addresses:  {}", map.addresses.join(", "));
    say!("revision:   {}", map.revision);
    say!("peers:      {}", map.peers.len());
    for p in &map.peers {
        say!(
            "  {:<22} {:<16} {:<34} {}{}",
            p.peer_id,
            p.hostname,
            p.allowed_ips.join(","),
            if p.endpoints.is_empty() {
                "-".to_string()
            } else {
                p.endpoints.join(",")
            },
            match denied(p) {
                0 => String::new(),
                n => format!("  ({n} packets denied by policy)"),
            }
        );
    }
    if let Some(part) = &map.policy {
        say!(
            "policy:     {} inbound rules; dropped by policy {}",
            part.inbound.len(),
            counters["policy"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}

async fn up(path: &std::path::Path) -> anyhow::Result<()> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.len() <= 15)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the file name must be an interface name of 1-15 characters (wg0.conf)",
                path.display()
            )
        })?
        .to_string();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let spec = InterfaceSpec {
        name,
        private_key: cfg.interface.private_key,
        addresses: cfg.interface.addresses,
        listen_port: cfg.interface.listen_port.unwrap_or(0),
        mtu: cfg.interface.mtu.unwrap_or(DEFAULT_MTU),
        offload: dataplane::offload_from_env(),
    };
    let dp = Dataplane::start(spec, cfg.peers).await?;
    println!(
        "{} is up, listening on UDP port {}",
        dp.name(),
        dp.listen_port()
    );
    let deleted = tokio::select! {
        _ = shutdown_signal() => false,
        _ = dp.deleted() => true,
    };
    let name = dp.name().to_string();
    dp.stop().await;
    if deleted {
        bail!("interface {name} was deleted");
    }
    Ok(())
}

/// `canopy-agent IFACE -f`: the interface with its UAPI socket and nothing else (no key, no
/// address, a random port), for `wg`/`wg-quick` to configure. Runs until stopped or until the
/// interface is deleted (`wg-quick down`, `ip link del`).
async fn bare_interface(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        anyhow::bail!("{name:?} is not an interface name (1-15 characters)");
    }
    let spec = InterfaceSpec {
        name: name.to_string(),
        private_key: [0; 32],
        addresses: Vec::new(),
        listen_port: 0,
        mtu: DEFAULT_MTU,
        offload: dataplane::offload_from_env(),
    };
    let dp = Dataplane::start(spec, Vec::new()).await?;
    let gone = async {
        let path = std::path::Path::new("/sys/class/net").join(name);
        while path.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        tracing::info!(iface = %name, "interface deleted; stopping");
    };
    let deleted = tokio::select! {
        _ = shutdown_signal() => false,
        _ = gone => true,
        _ = dp.deleted() => true,
    };
    if deleted {
        // Nothing left to tear down: exit now, which closes the socket at once, so a
        // `wg-quick down; wg-quick up` can bind the same port right after (joining the
        // forwarding threads first would hold it for up to their stop-check interval).
        drop(dp);
        return Ok(());
    }
    dp.stop().await;
    Ok(())
}

/// `canopy-agent IFACE`: runs `canopy-agent IFACE -f` in the background and returns once its
/// UAPI socket answers, as wireguard-go does, so the next `wg setconf` finds the interface.
/// Like a daemon, the background process keeps none of the caller's output open (a caller
/// that waits for its output to end, as wg-quick's callers do, would wait forever); its log
/// goes to `CANOPY_LOG_FILE` if that is set.
async fn detach(name: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let stderr = match std::env::var_os("CANOPY_LOG_FILE") {
        Some(f) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&f)
                .with_context(|| format!("opening {}", std::path::Path::new(&f).display()))?,
        ),
        None => std::process::Stdio::null(),
    };
    let mut child = std::process::Command::new(exe)
        .args([name, "-f"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting the interface process")?;
    let sock = crate::uapi::socket_path(name);
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the interface process exited ({status})");
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok(());
        }
        if t.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            anyhow::bail!("{} did not appear within 10 s", sock.display());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn join(
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
    // The last map takes effect at once: the overlay works even while the controller is away.
    sink.apply(&map, None)
        .map_err(|e| anyhow::anyhow!("applying the saved map: {e}"))?;
    let mut client = ControlClient::new(enrollment, Some(map), Some(state.clone()));
    client.controllers.extend(iface.controllers.iter().cloned());
    client.advertised_routes = iface
        .advertise_routes
        .iter()
        .map(ToString::to_string)
        .collect();
    let watcher = if iface.endpoints.is_empty() {
        let initial = dataplane::local_endpoints(&iface.interface, dp.listen_port());
        let (tx, rx) = tokio::sync::watch::channel(initial);
        client.endpoints = rx;
        let follow = follow_endpoints(dp.clone(), iface.interface.clone(), state, tx);
        Some(tokio::spawn(follow))
    } else {
        client.endpoints = tokio::sync::watch::channel(iface.endpoints).1;
        None
    };
    let stop = async {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = dp.deleted() => {}
        }
    };
    let result = client.run(&mut sink, stop).await;
    if let Some(w) = watcher {
        w.abort();
        let _ = w.await;
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

/// Keeps the endpoints reported to the controller current: the listen port (checked every
/// second, `wg set IFACE listen-port N` moves it) and this host's addresses (every 10 s).
/// A new port is also saved, so a restart keeps it.
async fn follow_endpoints(
    dp: Arc<Dataplane>,
    iface: String,
    state: StateDir,
    tx: tokio::sync::watch::Sender<Vec<String>>,
) {
    let mut port = dp.listen_port();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u32;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        if n.is_multiple_of(5) {
            save_counters(&dp, &state);
        }
        let now = dp.listen_port();
        if now == port && !n.is_multiple_of(10) {
            continue;
        }
        if now != port {
            port = now;
            if let Err(e) = state.save_listen_port(port) {
                tracing::warn!(error = %e, "could not save the listen port");
            }
        }
        let name = iface.clone();
        let Ok(eps) =
            tokio::task::spawn_blocking(move || dataplane::local_endpoints(&name, now)).await
        else {
            continue;
        };
        tx.send_if_modified(|held| {
            let changed = *held != eps;
            if changed {
                *held = eps;
            }
            changed
        });
    }
}

/// Writes the engine's drop counters to the state dir (every few seconds), where
/// `canopy-agent status` reads them.
fn save_counters(dp: &Dataplane, state: &StateDir) {
    let (drops, peers) = dp.counters();
    let per_peer: serde_json::Map<String, serde_json::Value> = peers
        .iter()
        .map(|(k, n)| (keys::encode(k), serde_json::json!(n)))
        .collect();
    let v = serde_json::json!({
        "policy": drops.policy,
        "spoofed": drops.spoofed,
        "no_route": drops.no_route,
        "invalid": drops.invalid,
        "policy_by_peer": per_peer,
    });
    if let Err(e) = state.save_counters(&v) {
        tracing::debug!(error = %e, "could not save the counters");
    }
}

/// This host's name as the controller accepts it: letters, digits, '.', '-', '_' (anything
/// else becomes '-'), at most 253 bytes. A name given with --hostname is sent as it is.
fn system_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    sanitize_hostname(raw.trim())
}

fn sanitize_hostname(raw: &str) -> String {
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

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_system_hostname_is_made_acceptable() {
        assert_eq!(super::sanitize_hostname("web-1.example"), "web-1.example");
        assert_eq!(super::sanitize_hostname("Bob's Mac\x1b"), "Bob-s-Mac-");
        assert_eq!(super::sanitize_hostname(&"h".repeat(300)).len(), 253);
    }
}
