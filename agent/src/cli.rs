//! The `canopy-agent` command line.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use canopy_proto::join::JoinString;
use clap::{Parser, Subcommand};

use crate::control::{self, ControlClient, ControlError, NoDataPlane};
use crate::keys::{self, PrivateKey};
use crate::state::StateDir;

#[derive(Parser, Debug)]
#[command(name = "canopy-agent", version, about = "Canopy overlay agent")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct StateOpts {
    /// Where the agent keeps its key, enrollment and last map.
    #[arg(long, env = "CANOPY_STATE_DIR", default_value = "/var/lib/canopy")]
    state_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll with a controller (once) and follow its network map until stopped.
    Join {
        /// The join string from `canopy token create` (canopy1:...).
        join_string: String,
        #[command(flatten)]
        state: StateOpts,
        /// Name this node reports (defaults to the system hostname).
        #[arg(long)]
        hostname: Option<String>,
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
    match cli.command {
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
        Command::Join {
            join_string,
            state,
            hostname,
        } => join(&join_string, &state.state_dir, hostname).await,
    }
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
    if json {
        let v = serde_json::json!({
            "peer_id": e.peer_id,
            "network_id": e.network_id,
            "network": map.network_name,
            "controller": e.controller_url,
            "public_key": keys::encode(&key.public_key()),
            "addresses": map.addresses,
            "revision": map.revision,
            "peers": map.peers.iter().map(|p| serde_json::json!({
                "peer_id": p.peer_id,
                "hostname": p.hostname,
                "public_key": keys::encode(&p.public_key),
                "allowed_ips": p.allowed_ips,
                "endpoints": p.endpoints,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("peer:       {}", e.peer_id);
    println!("network:    {} ({})", map.network_name, e.network_id);
    println!("controller: {}", e.controller_url);
    println!("public key: {}", keys::encode(&key.public_key()));
    println!("addresses:  {}", map.addresses.join(", "));
    println!("revision:   {}", map.revision);
    println!("peers:      {}", map.peers.len());
    for p in &map.peers {
        println!(
            "  {:<22} {:<16} {:<34} {}",
            p.peer_id,
            p.hostname,
            p.allowed_ips.join(","),
            if p.endpoints.is_empty() {
                "-".to_string()
            } else {
                p.endpoints.join(",")
            }
        );
    }
    Ok(())
}

async fn join(
    join_string: &str,
    dir: &std::path::Path,
    hostname: Option<String>,
) -> anyhow::Result<()> {
    let state = StateDir::open(dir)?;
    let key = state.private_key()?;
    let (enrollment, map) = match state.enrollment()? {
        Some(e) => {
            tracing::info!(peer = %e.peer_id, "already enrolled; resuming from the saved state");
            let map = state.map()?;
            (e, map)
        }
        None => {
            let join = JoinString::parse(join_string)?;
            let hostname = hostname.unwrap_or_else(system_hostname);
            let (e, map) = control::enroll(&join, key.public_key(), &hostname).await?;
            state.save_enrollment(&e)?;
            state.save_map(&map)?;
            println!(
                "enrolled as {} in network {} with address {}",
                e.peer_id,
                map.network_name,
                map.addresses.join(", ")
            );
            (e, Some(map))
        }
    };
    let client = ControlClient::new(enrollment, map, Some(state));
    match client.run(&mut NoDataPlane, shutdown_signal()).await {
        Ok(()) => Ok(()),
        Err(ControlError::Removed) => bail!("{}", ControlError::Removed),
        Err(e) => Err(e.into()),
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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
