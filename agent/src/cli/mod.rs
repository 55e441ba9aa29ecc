//! The `canopy-agent` command line.

use ipnetwork::IpNetwork;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::config;
use crate::dataplane::{self, DEFAULT_MTU, Dataplane, InterfaceSpec};
use crate::keys::{self, PrivateKey};
use crate::state::StateDir;

/// Prints one line for a person. Names and hostnames come from the controller and the other
/// peers: control characters are escaped, so they cannot forge lines or rewrite the terminal.
macro_rules! say {
    ($($t:tt)*) => {
        println!("{}", canopy_proto::text::escape(&format!($($t)*)))
    };
}

mod join;

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
    #[arg(long, value_delimiter = ',', value_parser = join::advertised_prefix)]
    advertise_routes: Vec<IpNetwork>,
    /// Offer this node as an exit node (routes 0.0.0.0/0 and ::/0, for the peers that choose
    /// it); waits for approval like --advertise-routes.
    #[arg(long)]
    advertise_exit_node: bool,
    /// Send this node's internet traffic through that peer (hostname or peer id; `none`
    /// clears it). The controller connection and WireGuard's own traffic stay direct.
    #[arg(long)]
    exit_node: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9465; off by default).
    #[arg(long, env = "CANOPY_AGENT_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Do not answer the network's names (NAME.NETWORK.canopy) on this node's overlay
    /// addresses, port 53, nor register them with systemd-resolved.
    #[arg(long)]
    no_dns: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up an interface from a wg-quick style file; it takes the file's name
    /// (/etc/canopy/wg0.conf → wg0). Runs until stopped.
    Up {
        config: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics (peers labelled by public key).
        #[arg(long, env = "CANOPY_AGENT_METRICS")]
        metrics: Option<std::net::SocketAddr>,
    },
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
        iface: Box<IfaceOpts>,
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
        Command::Up { config, metrics } => up(&config, metrics).await,
        Command::Join {
            join_string,
            state,
            hostname,
            iface,
        } => join::join(&join_string, &state.state_dir, hostname, *iface).await,
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
        "dns_name": map.dns_name,
        "dns_domain": map.dns_domain,
        "peers": map.peers.iter().map(|p| serde_json::json!({
            "peer_id": p.peer_id,
            "hostname": p.hostname,
            "dns_name": p.dns_name,
            "public_key": keys::encode(&p.public_key),
            "allowed_ips": p.allowed_ips,
            "endpoints": p.endpoints,
            "denied_by_policy": denied(p),
            "path": counters["paths"][keys::encode(&p.public_key)],
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

/// A peer's path as `status` prints it: "direct 192.0.2.7:51820, handshake 12 s ago, rx 1234
/// B, tx 567 B", "relayed … (not direct: why)", or "-" before the agent wrote any.
fn path_text(p: &serde_json::Value) -> String {
    let Some(path) = p["path"].as_str() else {
        return "-".into();
    };
    let hs = p["last_handshake_secs"]
        .as_u64()
        .map_or("no handshake".into(), |s| format!("handshake {s} s ago"));
    let via = p["via"].as_str().unwrap_or("");
    let (rx, tx) = (
        p["rx_bytes"].as_u64().unwrap_or(0),
        p["tx_bytes"].as_u64().unwrap_or(0),
    );
    let why = p["why"].as_str().filter(|w| !w.is_empty());
    let why = why.map_or(String::new(), |w| format!(" (not direct: {w})"));
    format!("{path} {via}, {hs}, rx {rx} B, tx {tx} B{why}")
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
    let lock = state.lock_status().ok().flatten().unwrap_or_default();
    if json {
        let mut v = status_json(&e, &key.public_key(), &map, &counters);
        v["lock"] = lock;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    say!("peer:       {}", e.peer_id);
    say!("network:    {} ({})", map.network_name, e.network_id);
    say!("controller: {}", e.controller_url);
    say!("public key: {}", keys::encode(&key.public_key()));
    say!("addresses:  {}", map.addresses.join(", "));
    say!("revision:   {}", map.revision);
    if !map.dns_domain.is_empty() {
        let at = map
            .addresses
            .first()
            .and_then(|a| a.split('/').next())
            .unwrap_or("");
        say!(
            "dns name:   {}.{} (names under {} answered at {at}:53)",
            map.dns_name,
            map.dns_domain,
            map.dns_domain
        );
    }
    say!("peers:      {}", map.peers.len());
    for p in &map.peers {
        say!(
            "  {:<22} {:<16} {:<34} {}{}",
            p.peer_id,
            p.hostname,
            p.allowed_ips.join(","),
            path_text(&counters["paths"][keys::encode(&p.public_key)]),
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
    lock_status(&lock);
    Ok(())
}

/// The network lock's lines of `status`: the key set trusted, and what was refused.
fn lock_status(lock: &serde_json::Value) {
    if lock["locked"].as_bool() != Some(true) {
        return;
    }
    let refused = lock["refused"].as_array().cloned().unwrap_or_default();
    say!(
        "lock:       key set {} ({} keys); refused {} (not signed by a trusted key)",
        lock["serial"],
        lock["keys"].as_array().map_or(0, Vec::len),
        refused.len()
    );
    for r in refused {
        say!(
            "  refused {}: {}",
            r["peer_id"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("?")
        );
    }
    if let Some(e) = lock["chain_error"].as_str() {
        say!("  key set change refused: {e}");
    }
}

async fn up(path: &std::path::Path, metrics: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
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
    let (dns, search) = (cfg.interface.dns.clone(), cfg.interface.dns_search.clone());
    let spec = InterfaceSpec {
        name,
        private_key: cfg.interface.private_key,
        addresses: cfg.interface.addresses,
        listen_port: cfg.interface.listen_port.unwrap_or(0),
        mtu: cfg.interface.mtu.unwrap_or(DEFAULT_MTU),
        offload: dataplane::offload_from_env(),
    };
    let dp = std::sync::Arc::new(Dataplane::start(spec, cfg.peers).await?);
    let metrics = match metrics {
        // No controller here: no map revision, and peers go by their keys.
        Some(addr) => Some(join::serve_metrics_for(addr, &dp, None).await?),
        None => None,
    };
    println!(
        "{} is up, listening on UDP port {}",
        dp.name(),
        dp.listen_port()
    );
    let with_dns = !dns.is_empty() || !search.is_empty();
    if with_dns {
        // As wg-quick: the servers take every query while the interface is up.
        match crate::dns::system::register_all(dp.name(), &dns, &search) {
            Ok(done) => println!("DNS: {done}"),
            Err(todo) => eprintln!("warning: DNS: {todo}"),
        }
    }
    let deleted = tokio::select! {
        _ = shutdown_signal() => false,
        _ = dp.deleted() => true,
    };
    let name = dp.name().to_string();
    if with_dns {
        crate::dns::system::unregister_all(&name);
    }
    if let Some(t) = metrics {
        t.abort();
        let _ = t.await;
    }
    if let Ok(dp) = std::sync::Arc::try_unwrap(dp) {
        dp.stop().await;
    }
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
        assert_eq!(
            super::join::sanitize_hostname("web-1.example"),
            "web-1.example"
        );
        assert_eq!(
            super::join::sanitize_hostname("Bob's Mac\x1b"),
            "Bob-s-Mac-"
        );
        assert_eq!(super::join::sanitize_hostname(&"h".repeat(300)).len(), 253);
    }
}
