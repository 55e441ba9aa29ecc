//! The `canopy` console: every command but `serve` (which is the server's, `server::cli`) is a
//! client of `ConsoleService` over gRPC + TLS. It depends on the API (`canopy_proto`) and its
//! own config only, never on the server, the store or the leader.
//!
//! Server, API token and trust come from flags, the environment (`CANOPY_SERVER`, `CANOPY_TOKEN`,
//! `CANOPY_CA`) or the config file that `canopy login` writes (`~/.config/canopy/console.toml`,
//! mode 0600, holding the CA's SHA-256 pin rather than trusting the network blindly).

mod account;
mod config;
mod lock;
mod output;
mod policy;

pub use account::{ApiTokenCmd, OperatorCmd, PlanCmd, TenantCmd};
pub use policy::{PolicyCmd, RouteCmd};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::console_service_client::ConsoleServiceClient;
use canopy_proto::v1::*;
use clap::{Args, Subcommand};
use tonic::service::Interceptor;
use tonic::transport::Channel;

pub use config::ConsoleConfig;

/// Options every console command takes.
#[derive(Args, Debug, Clone)]
pub struct Globals {
    #[command(flatten)]
    conn: ConnOpts,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ConnOpts {
    /// Controller URL, https://HOST:PORT.
    #[arg(long, global = true, env = "CANOPY_SERVER")]
    server: Option<String>,
    /// API token (cat_...).
    #[arg(long, global = true, env = "CANOPY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The controller's CA certificate (PEM), e.g. DATA/ca.pem.
    #[arg(long, global = true, env = "CANOPY_CA")]
    ca: Option<PathBuf>,
    /// Console config file.
    #[arg(long, global = true, env = "CANOPY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the server and token, then save them (and the CA pin) to the console config.
    Login {
        /// Read the API token from this file (e.g. DATA/admin-token).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Peers (enrolled nodes).
    #[command(subcommand)]
    Peer(PeerCmd),
    /// A network's access policy: who may open what on whom.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Routes to sites behind gateway peers.
    #[command(subcommand)]
    Route(RouteCmd),
    /// API tokens of your tenant (admin or read scope).
    #[command(subcommand)]
    Apitoken(ApiTokenCmd),
    /// Hosted: sign up for an account (a tenant) on a plan.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Hosted: show your plan and its quotas, or change it (`canopy plan set team`).
    Plan {
        #[command(subcommand)]
        set: Option<PlanCmd>,
    },
    /// Hosted: networks, peers, agents online and join tokens against your plan's quotas.
    Usage,
    /// Your tenant's audit log: who (token id) did what to which object, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only actions starting with this, e.g. peer. or network.create
        #[arg(long, default_value = "")]
        action: String,
        /// Only entries about this object id.
        #[arg(long, default_value = "")]
        object: String,
    },
    /// Hosted, for the provider: tenants (needs the operator credential).
    #[command(subcommand)]
    Operator(OperatorCmd),
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network: --cidr takes one IPv4 and/or one IPv6 CIDR.
    Create {
        name: String,
        #[arg(long = "cidr", required = true)]
        cidrs: Vec<String>,
    },
    List,
    /// Show one network (by id or name).
    Get {
        network: String,
    },
    /// Delete a network with all its peers and join tokens.
    Delete {
        network: String,
    },
    /// Put the network's peer names under another DNS zone: peers resolve each other as
    /// NAME.ZONE (default: NETWORK.canopy).
    SetDns {
        network: String,
        /// The zone, e.g. corp.canopy; "" goes back to NETWORK.canopy.
        #[arg(long)]
        domain: String,
    },
    /// Tenant-signed membership: agents take only peers and routes your key signed.
    #[command(subcommand)]
    Lock(lock::LockCmd),
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token and print its join string (shown once).
    Create {
        #[arg(long)]
        network: String,
        /// How many enrollments it allows (0: unlimited).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Time to live, e.g. 30m, 24h, 7d (0: never expires).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Tags given to peers that join with it.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Locked network: the join string carries a delegation signed with the lock key, so a
        /// node joining with it is signed at once (with these tags only), for --signed-for.
        #[arg(long)]
        presigned: bool,
        /// The lock key (default: ~/.config/canopy/lock/NETWORK_ID.key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// How long a presigned membership lasts (then it needs `canopy peer sign`).
        #[arg(long, default_value = "365d")]
        signed_for: String,
    },
    List {
        #[arg(long, default_value = "")]
        network: String,
    },
    Revoke {
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    List {
        #[arg(long)]
        network: String,
        /// Also how each peer reaches the others (direct, or relayed and why), as its agent
        /// last reported.
        #[arg(long)]
        paths: bool,
    },
    /// Show one peer: its names and addresses, and how it reaches each of its peers (path,
    /// last handshake, bytes) as its agent last reported.
    #[command(visible_alias = "show")]
    Get { peer_id: String },
    /// Remove a peer: its address is freed and its credential stops working at once. In a
    /// locked network its key is revoked first if the lock key is at hand.
    Remove {
        peer_id: String,
        /// The network lock key (default: ~/.config/canopy/lock/NETWORK_ID.key).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Sign a pending peer of a locked network as it is now (key, addresses, tags).
    Sign {
        peer_id: String,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Refuse unless the peer's WireGuard key is this one (from `canopy-agent status`).
        #[arg(long)]
        public_key: Option<String>,
        /// The signature's lifetime, e.g. 30d (default: until removed).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Add and remove tags: `canopy peer tag PEER +db -web` (what access policies name).
    Tag {
        peer_id: String,
        /// +TAG adds, -TAG removes.
        #[arg(required = true, allow_hyphen_values = true)]
        changes: Vec<String>,
    },
    /// Send a peer's internet traffic through an exit node (a peer with an exit route
    /// 0.0.0.0/0 or ::/0 in force): `canopy peer set-exit-node PEER EXIT`, or `none`.
    SetExitNode {
        peer_id: String,
        /// The exit node's peer id or hostname, or `none`.
        exit_node: String,
    },
}

/// Runs a console command. The binary prints an error as one line and exits non-zero.
pub async fn run(cli: Globals, command: Command) -> anyhow::Result<()> {
    let json = cli.json;
    match command {
        Command::Login { token_file } => login(cli.conn, token_file).await,
        Command::Network(c) => network(&cli.conn, json, c).await,
        Command::Token(c) => token(&cli.conn, json, c).await,
        Command::Peer(c) => peer(&cli.conn, json, c).await,
        Command::Policy(c) => policy::policy(&cli.conn, json, c).await,
        Command::Route(c) => policy::route(&cli.conn, json, c).await,
        Command::Apitoken(c) => account::apitoken(&cli.conn, json, c).await,
        Command::Tenant(c) => account::tenant(&cli.conn, json, c).await,
        Command::Plan { set } => account::plan(&cli.conn, json, set).await,
        Command::Usage => account::usage(&cli.conn, json).await,
        Command::Operator(c) => account::operator(&cli.conn, json, c).await,
        Command::Audit {
            limit,
            action,
            object,
        } => {
            let mut cl = client(&cli.conn).await?;
            let r = reply(
                cl.list_audit(ListAuditRequest {
                    limit,
                    action,
                    object,
                })
                .await,
            )?;
            output::audit(json, &r.entries)
        }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client =
    ConsoleServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

struct Resolved {
    server: String,
    token: String,
    trust: Trust,
}

fn config_file(conn: &ConnOpts) -> anyhow::Result<ConsoleConfig> {
    Ok(match conn.config.clone().or_else(config::default_path) {
        Some(p) => ConsoleConfig::load(&p)?.unwrap_or_default(),
        None => ConsoleConfig::default(),
    })
}

fn server_of(conn: &ConnOpts, file: &ConsoleConfig) -> anyhow::Result<String> {
    conn.server.clone().or(file.server.clone()).ok_or_else(|| {
        anyhow!("no server: pass --server, set CANOPY_SERVER, or run `canopy login`")
    })
}

fn trust_of(conn: &ConnOpts, file: &ConsoleConfig) -> anyhow::Result<Trust> {
    Ok(match (&conn.ca, &file.ca_sha256) {
        (Some(ca), _) => Trust::CaPem(
            std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?,
        ),
        (None, Some(pin)) => Trust::Pin(config::parse_pin(pin)?),
        (None, None) => {
            bail!("no CA to trust: pass --ca DATA/ca.pem, set CANOPY_CA, or run `canopy login`")
        }
    })
}

fn resolve(conn: &ConnOpts) -> anyhow::Result<Resolved> {
    let file = config_file(conn)?;
    let server = server_of(conn, &file)?;
    let token = conn.token.clone().or(file.token.clone()).ok_or_else(|| {
        anyhow!("no API token: pass --token, set CANOPY_TOKEN, or run `canopy login`")
    })?;
    let trust = trust_of(conn, &file)?;
    Ok(Resolved {
        server,
        token,
        trust,
    })
}

/// A console client for `server`, trusting `trust`, sending `token` on every call.
pub async fn connect(server: &str, trust: &Trust, token: &str) -> anyhow::Result<Client> {
    let channel = transport::connect(server, trust).await?;
    let bearer = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow!("API token contains characters that cannot be sent"))?;
    // A network's largest answer (its peer list) is bounded by the peer quota and the per-peer
    // caps (tags, hostname, endpoints); this leaves room for it.
    Ok(
        ConsoleServiceClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size(canopy_proto::MAX_ANSWER_BYTES),
    )
}

/// A call's answer, or its status as one readable line (the message escaped and clipped: it
/// comes from the network).
fn reply<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner).map_err(|s| {
        let m = canopy_proto::text::clip(s.message(), 1024);
        anyhow!("{} ({:?})", canopy_proto::text::escape(&m), s.code())
    })
}

async fn login(mut conn: ConnOpts, token_file: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(f) = token_file {
        let t = std::fs::read_to_string(&f)
            .with_context(|| format!("reading token file {}", f.display()))?;
        conn.token = Some(t.trim().to_string());
    }
    let r = resolve(&conn)?;
    // Save the CA as a pin, and check that the pin is what lets us in.
    let pin = match &r.trust {
        Trust::Pin(p) => *p,
        Trust::CaPem(pem) => config::pem_pin(pem)?,
    };
    let mut client = connect(&r.server, &Trust::Pin(pin), &r.token).await?;
    reply(client.list_networks(ListNetworksRequest {}).await)?;
    let path = conn
        .config
        .clone()
        .or_else(config::default_path)
        .ok_or_else(|| anyhow!("no config path: set HOME or pass --config"))?;
    ConsoleConfig {
        server: Some(r.server.clone()),
        token: Some(r.token.clone()),
        ca_sha256: Some(hex::encode(pin)),
    }
    .save(&path)?;
    println!("logged in to {}; saved to {}", r.server, path.display());
    Ok(())
}

async fn client(conn: &ConnOpts) -> anyhow::Result<Client> {
    let r = resolve(conn)?;
    connect(&r.server, &r.trust, &r.token).await
}

async fn network(conn: &ConnOpts, json: bool, c: NetworkCmd) -> anyhow::Result<()> {
    if let NetworkCmd::Lock(c) = c {
        return lock::run(conn, json, c).await;
    }
    let mut cl = client(conn).await?;
    match c {
        NetworkCmd::Create { name, cidrs } => {
            let n = reply(
                cl.create_network(CreateNetworkRequest { name, cidrs })
                    .await,
            )?;
            output::networks(json, &[n], true)
        }
        NetworkCmd::List => {
            let r = reply(cl.list_networks(ListNetworksRequest {}).await)?;
            output::networks(json, &r.networks, false)
        }
        NetworkCmd::Get { network } => {
            let n = reply(cl.get_network(GetNetworkRequest { network }).await)?;
            output::networks(json, &[n], true)
        }
        NetworkCmd::Delete { network } => {
            let r = reply(
                cl.delete_network(DeleteNetworkRequest {
                    network: network.clone(),
                })
                .await,
            )?;
            output::done(
                json,
                &format!(
                    "deleted network {network} ({} peers removed)",
                    r.peers_removed
                ),
                serde_json::json!({"deleted": network, "peers_removed": r.peers_removed}),
            )
        }
        NetworkCmd::SetDns { network, domain } => {
            let req = SetNetworkDnsRequest { network, domain };
            let n = reply(cl.set_network_dns(req).await)?;
            output::networks(json, &[n], true)
        }
        NetworkCmd::Lock(_) => unreachable!("handled above"),
    }
}

async fn token(conn: &ConnOpts, json: bool, c: TokenCmd) -> anyhow::Result<()> {
    let mut cl = client(conn).await?;
    match c {
        TokenCmd::Create {
            network,
            uses,
            ttl,
            tags,
            presigned,
            key,
            signed_for,
        } => {
            let ttl_seconds = parse_duration(&ttl)?.as_secs();
            let signed_for = parse_duration(&signed_for)?;
            let r = reply(
                cl.create_join_token(CreateJoinTokenRequest {
                    network,
                    max_uses: uses,
                    ttl_seconds,
                    tags,
                })
                .await,
            )?;
            if let Some(t) = &r.token {
                lock::check_pin(&t.network_id, &r.join_string, key.clone())?;
            }
            let join = match (presigned, &r.token) {
                (true, Some(t)) => {
                    lock::presign_join(&mut cl, t, &r.join_string, key, signed_for).await?
                }
                _ => r.join_string,
            };
            output::join_string(json, r.token.as_ref(), &join)
        }
        TokenCmd::List { network } => {
            let r = reply(cl.list_join_tokens(ListJoinTokensRequest { network }).await)?;
            output::tokens(json, &r.tokens)
        }
        TokenCmd::Revoke { token_id } => {
            let t = reply(
                cl.revoke_join_token(RevokeJoinTokenRequest { token_id })
                    .await,
            )?;
            output::tokens(json, &[t])
        }
    }
}

async fn peer(conn: &ConnOpts, json: bool, c: PeerCmd) -> anyhow::Result<()> {
    if let PeerCmd::Sign {
        peer_id,
        key,
        public_key,
        expires,
    } = c
    {
        let expires = expires.as_deref().map(parse_duration).transpose()?;
        return lock::sign_peer(conn, json, peer_id, key, public_key, expires).await;
    }
    let mut cl = client(conn).await?;
    match c {
        PeerCmd::List { network, paths } => {
            let r = reply(cl.list_peers(ListPeersRequest { network, paths }).await)?;
            output::peers(json, &r.peers)?;
            if paths && !json {
                output::paths(&r.peers);
            }
            Ok(())
        }
        PeerCmd::Get { peer_id } => {
            let p = reply(cl.get_peer(GetPeerRequest { peer_id }).await)?;
            // The other peers' hostnames, for its paths.
            let list = ListPeersRequest {
                network: p.network_id.clone(),
                paths: false,
            };
            let names = match cl.list_peers(list).await {
                Ok(r) => r
                    .into_inner()
                    .peers
                    .into_iter()
                    .map(|q| (q.id, q.hostname))
                    .collect(),
                Err(_) => Default::default(),
            };
            output::peer_detail(json, &p, &names)
        }
        PeerCmd::Tag { peer_id, changes } => {
            let (add, remove) = tag_changes(changes)?;
            let req = TagPeerRequest {
                peer_id,
                add,
                remove,
            };
            let p = reply(cl.tag_peer(req).await)?;
            output::peers(json, &[p])
        }
        PeerCmd::SetExitNode { peer_id, exit_node } => {
            let exit_node = if exit_node == "none" {
                String::new()
            } else {
                exit_node
            };
            let req = SetExitNodeRequest { peer_id, exit_node };
            let p = reply(cl.set_exit_node(req).await)?;
            output::peers(json, &[p])
        }
        PeerCmd::Sign { .. } => unreachable!("handled above"),
        PeerCmd::Remove { peer_id, key } => {
            let revoked = lock::revoke_peer(&mut cl, &peer_id, key).await?;
            reply(
                cl.remove_peer(RemovePeerRequest {
                    peer_id: peer_id.clone(),
                })
                .await,
            )?;
            let how = if revoked { " (its key revoked)" } else { "" };
            output::done(
                json,
                &format!("removed peer {peer_id}{how}"),
                serde_json::json!({"removed": peer_id, "revoked": revoked}),
            )
        }
    }
}

/// `+TAG -TAG …` as the tags to add and those to remove.
fn tag_changes(changes: Vec<String>) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for c in changes {
        match (c.strip_prefix('+'), c.strip_prefix('-')) {
            (Some(t), _) => add.push(t.to_string()),
            (_, Some(t)) => remove.push(t.to_string()),
            _ => bail!("tag change {c:?}: write +TAG to add or -TAG to remove"),
        }
    }
    Ok((add, remove))
}

/// Parses a duration: a number of seconds (`90`), or humantime's units (`90s`, `30m`, `24h`,
/// `7d`, `2w`, `1h 30m`).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| anyhow!("duration {s:?}: {e} (e.g. 30m, 24h, 7d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 604_800);
        assert_eq!(parse_duration("1h 30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("2w").unwrap().as_secs(), 1_209_600);
        assert!(parse_duration("7x").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }
}
