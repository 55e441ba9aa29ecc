//! `canopy serve`: the flags, the first-start messages, then the server until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{ServeConfig, StoreSpec};

/// Flags of `canopy serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443", env = "CANOPY_LISTEN")]
    listen: std::net::SocketAddr,
    /// Where the CA, certificates, admin token and embedded store live.
    #[arg(long, default_value = "./canopy-data", env = "CANOPY_DATA_DIR")]
    data_dir: PathBuf,
    /// State store: embedded:PATH (default: embedded:DATA/store.redb) or
    /// etcd://HOST:PORT[,HOST:PORT...] for several replicas (share DATA's CA files among them).
    #[arg(long, env = "CANOPY_STORE")]
    store: Option<StoreSpec>,
    /// The URL agents use to reach this controller (default: https://<listen address>).
    #[arg(long, env = "CANOPY_ADVERTISE")]
    advertise: Option<String>,
    /// Extra DNS names or IPs for the server certificate.
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// New agent sessions accepted per second (and at once); more are told to retry later,
    /// with jitter, so a reconnect storm is spread out.
    #[arg(long, default_value_t = crate::service::DEFAULT_SESSION_STARTS)]
    max_session_starts: u32,
    /// Run as a hosted, multi-tenant service: sign-up is open, tenants get plans and quotas.
    #[arg(long, env = "CANOPY_HOSTED")]
    hosted: bool,
    /// File holding the operator credential (for `canopy operator`); or set CANOPY_OPERATOR_TOKEN.
    #[arg(long)]
    operator_token_file: Option<PathBuf>,
    /// Console requests per second per tenant (bursts of twice that).
    #[arg(long, default_value_t = crate::service::DEFAULT_API_RATE)]
    api_rate: u32,
    /// Make a new admin API token for the self-managed tenant and write it to
    /// DATA/admin-token (recovery when the old one was lost or revoked), then serve.
    #[arg(long)]
    reset_admin_token: bool,
    /// Hosted sign-ups allowed per source address (IPv4, or IPv6 /64) per hour.
    #[arg(long, default_value_t = crate::service::DEFAULT_SIGNUPS_PER_HOUR)]
    signups_per_hour: u32,
    /// Do not answer STUN on UDP at the listen address (agents behind NAT then cannot learn
    /// their outside address from this controller).
    #[arg(long)]
    no_stun: bool,
    /// A `canopy relay` to tell agents of (UDP HOST:PORT; repeatable), besides this
    /// controller's own UDP port: relayed peers fail over between them.
    #[arg(long = "relay")]
    relays: Vec<std::net::SocketAddr>,
    /// Datagrams a second one address may have relayed by this controller (bursts of twice
    /// that).
    #[arg(long, default_value_t = super::relay::PER_SOURCE)]
    relay_rate: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; off by default,
    /// never on the gRPC port).
    #[arg(long, env = "CANOPY_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Serve the web console at https://ADDR/ (e.g. 127.0.0.1:8443), with the controller's
    /// certificate; off by default, and on at the listen address, port 8443, with --hosted.
    #[arg(long, env = "CANOPY_WEB")]
    web: Option<std::net::SocketAddr>,
}

/// Flags of `canopy relay`: a relay (and STUN server) of its own for the agents of the
/// controller whose relay key it holds. It sees ciphertext and public keys only.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// UDP address to listen on (tell the controller: `canopy serve --relay HOST:PORT`).
    #[arg(long, default_value = "0.0.0.0:3478")]
    listen: std::net::SocketAddr,
    /// The controller's relay key: its DATA/relay-secret.
    #[arg(long)]
    secret_file: PathBuf,
    /// Datagrams a second one address may have relayed (bursts of twice that).
    #[arg(long, default_value_t = super::relay::PER_SOURCE)]
    rate: u32,
}

/// Runs a relay until SIGINT or SIGTERM.
pub async fn relay(a: RelayArgs) -> anyhow::Result<()> {
    let secret = super::relay::read_secret_file(&a.secret_file).map_err(anyhow::Error::msg)?;
    let sock = tokio::net::UdpSocket::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on UDP {}", a.listen))?;
    let at = sock.local_addr()?;
    println!("canopy: relay on UDP {at}; tell agents of it with `canopy serve --relay {at}`");
    let relay = std::sync::Arc::new(std::sync::Mutex::new(super::relay::Relay::new(
        secret, a.rate,
    )));
    let clock = crate::clock::Clock::system();
    let task = tokio::spawn(super::udp::serve(
        std::sync::Arc::new(sock),
        clock,
        Some(relay),
    ));
    shutdown_signal().await;
    task.abort();
    Ok(())
}

/// Runs the controller until SIGINT or SIGTERM.
pub async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig {
        listen: a.listen,
        data_dir: a.data_dir,
        store: a.store,
        advertise: a.advertise,
        tls_sans: a.tls_sans,
        session_starts_per_sec: a.max_session_starts,
        background: crate::leader::BackgroundConfig::default(),
        hosted: a.hosted,
        api_requests_per_sec: a.api_rate,
        reset_admin_token: a.reset_admin_token,
        signups_per_hour: a.signups_per_hour,
        listener: crate::server::listener::ListenerLimits::default(),
        clock: crate::clock::Clock::system(),
        stun: !a.no_stun,
        relays: a.relays,
        relay_rate: a.relay_rate,
        relay_flush: crate::service::relayuse::FLUSH,
        metrics: a.metrics,
        web: a.web.or(a
            .hosted
            .then(|| std::net::SocketAddr::new(a.listen.ip(), 8443))),
        operator_token: match &a.operator_token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading operator token file {}", f.display()))?,
            ),
            None => std::env::var("CANOPY_OPERATOR_TOKEN").ok(),
        },
    };
    let prepared = super::prepare(&config).await?;
    let dd = prepared.data_dir.display();
    if prepared.created_ca {
        println!("canopy: first start: created a CA ({dd}/ca.pem)");
    }
    if prepared.new_admin_token.is_some() {
        println!("canopy: created an admin API token ({dd}/admin-token, mode 0600)");
    }
    println!(
        "canopy: controller at {}; point the console at it with:\n  canopy login --server {} --ca {dd}/ca.pem --token-file {dd}/admin-token",
        prepared.controller.public_url, prepared.controller.public_url
    );
    super::serve(prepared, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}
