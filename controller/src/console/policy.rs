//! `canopy policy`: a network's access policy, kept as a file (in git) and set whole; and
//! `canopy route`: prefixes behind gateway peers.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use canopy_proto::v1::*;
use clap::Subcommand;
use serde_json::json;

use super::{ConnOpts, client, output, reply};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Print a network's policy document (nothing when it has none: every peer reaches every
    /// other).
    Get { network: String },
    /// Set a network's policy from a TOML file (`-`: standard input). From then on nothing is
    /// allowed but what its rules allow, and replies.
    Set {
        network: String,
        file: PathBuf,
        /// Refuse if the policy changed since this revision (`canopy policy get --json`); 0:
        /// only if the network has none yet.
        #[arg(long)]
        if_revision: Option<i64>,
        /// In a locked network: the lock key that signs the document (default:
        /// ~/.config/canopy/lock/NETWORK_ID.key).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Remove a network's policy: every peer reaches every other again.
    Remove {
        network: String,
        #[arg(long)]
        if_revision: Option<i64>,
    },
    /// Whether one peer may open a port on another, and which rule allows it or why none
    /// does. Exits 1 when it may not.
    Test {
        network: String,
        /// Peer id or hostname.
        #[arg(long)]
        from: String,
        /// Peer id or hostname, or an address (a peer's, or one in a site behind a gateway).
        #[arg(long)]
        to: String,
        /// tcp, udp or icmp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(long, default_value_t = 0)]
        port: u32,
    },
}

fn policy_json(p: &Policy) -> serde_json::Value {
    json!({
        "network_id": p.network_id,
        "revision": p.revision,
        "updated_at": p.updated_at_unix,
        "updated_by": p.updated_by,
        "text": p.text,
    })
}

fn read_document(file: &PathBuf) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

pub async fn policy(conn: &ConnOpts, json: bool, c: PolicyCmd) -> anyhow::Result<()> {
    let mut cl = client(conn).await?;
    match c {
        PolicyCmd::Get { network } => {
            let p = reply(cl.get_policy(GetPolicyRequest { network }).await)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&policy_json(&p))?);
            } else if p.revision == 0 {
                eprintln!("no policy: every peer reaches every other");
            } else {
                // Checked TOML: no control characters but tabs and line ends.
                print!("{}", p.text);
            }
            Ok(())
        }
        PolicyCmd::Set {
            network,
            file,
            if_revision,
            key,
        } => {
            let text = read_document(&file)?;
            let lock = super::lock::sign_policy(&mut cl, &network, &text, key).await?;
            let req = SetPolicyRequest {
                network,
                text,
                if_revision,
                lock,
                ..Default::default()
            };
            let p = reply(cl.set_policy(req).await)?;
            let msg = format!("policy of {} set (revision {})", p.network_id, p.revision);
            output::done(json, &msg, policy_json(&p))
        }
        PolicyCmd::Remove {
            network,
            if_revision,
        } => {
            let req = SetPolicyRequest {
                network,
                remove: true,
                if_revision,
                ..Default::default()
            };
            let p = reply(cl.set_policy(req).await)?;
            let msg = format!(
                "policy of {} removed: every peer reaches every other",
                p.network_id
            );
            output::done(json, &msg, policy_json(&p))
        }
        PolicyCmd::Test {
            network,
            from,
            to,
            proto,
            port,
        } => {
            let req = TestPolicyRequest {
                network,
                from,
                to,
                proto,
                port,
            };
            let r = reply(cl.test_policy(req).await)?;
            print_test(json, &r)
        }
    }
}

/// `canopy policy test`'s answer; an error (exit 1) when not allowed.
fn print_test(json: bool, r: &TestPolicyResponse) -> anyhow::Result<()> {
    if json {
        let v = json!({"allowed": r.allowed, "rule": r.rule, "line": r.line, "explanation": r.explanation});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", if r.allowed { "allowed" } else { "denied" });
        for line in &r.explanation {
            println!("  {}", canopy_proto::text::escape(line));
        }
    }
    if !r.allowed {
        bail!("not allowed");
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// Route PREFIX (a site's subnet) through peer --peer, its gateway: every peer of the
    /// network sends it there. A second gateway for the same prefix stands by.
    Advertise {
        #[arg(long)]
        peer: String,
        prefix: String,
    },
    List {
        #[arg(long)]
        network: String,
    },
    /// Withdraw a route: peers stop sending its prefix through that gateway at once.
    Remove { route_id: String },
    /// Put a route a gateway's agent advertised (`--advertise-routes`) into force.
    Approve { route_id: String },
    /// In a locked network: sign a route (so agents take it), approving it if pending.
    Sign {
        route_id: String,
        #[arg(long)]
        network: String,
        #[arg(long)]
        key: Option<std::path::PathBuf>,
    },
}

fn route_json(r: &Route) -> serde_json::Value {
    json!({"id": r.id, "network_id": r.network_id, "peer_id": r.peer_id, "prefix": r.prefix,
        "primary": r.primary, "state": r.state, "from_agent": r.from_agent,
        "gateway_live": r.gateway_live})
}

fn print_routes(json: bool, routes: &[Route]) -> anyhow::Result<()> {
    if json {
        let v: Vec<serde_json::Value> = routes.iter().map(route_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for r in routes {
        let role = match (r.state.as_str(), r.primary) {
            ("pending", _) => "pending approval",
            _ if r.prefix.ends_with("/0") => "exit node",
            (_, true) => "primary",
            (_, false) => "standby",
        };
        let by = if r.from_agent {
            ", advertised by its agent"
        } else {
            ""
        };
        let live = if r.gateway_live {
            ""
        } else {
            ", gateway offline"
        };
        let state = canopy_proto::text::escape(&r.state);
        println!(
            "{}  {}  via {}  {role} ({state}{by}{live})",
            r.id, r.prefix, r.peer_id
        );
    }
    Ok(())
}

pub async fn route(conn: &ConnOpts, json: bool, c: RouteCmd) -> anyhow::Result<()> {
    let mut cl = client(conn).await?;
    match c {
        RouteCmd::Advertise { peer, prefix } => {
            let req = AdvertiseRouteRequest {
                peer_id: peer,
                prefix,
            };
            let r = reply(cl.advertise_route(req).await)?;
            print_routes(json, &[r])
        }
        RouteCmd::List { network } => {
            let r = reply(cl.list_routes(ListRoutesRequest { network }).await)?;
            print_routes(json, &r.routes)
        }
        RouteCmd::Remove { route_id } => {
            let r = reply(cl.remove_route(RemoveRouteRequest { route_id }).await)?;
            let msg = format!("removed route {} ({} via {})", r.id, r.prefix, r.peer_id);
            output::done(json, &msg, route_json(&r))
        }
        RouteCmd::Approve { route_id } => {
            let r = reply(cl.approve_route(ApproveRouteRequest { route_id }).await)?;
            let msg = format!("approved route {} ({} via {})", r.id, r.prefix, r.peer_id);
            output::done(json, &msg, route_json(&r))
        }
        RouteCmd::Sign {
            route_id,
            network,
            key,
        } => super::lock::sign_route(conn, json, &network, &route_id, key).await,
    }
}
