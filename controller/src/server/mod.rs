//! The gRPC edge: tonic services over TLS, plus health and reflection. Handlers authenticate,
//! call [`Controller`](crate::service::Controller) operations and map errors to statuses.

mod agent;
pub mod cli;
mod config;
mod console;
mod hosted;
pub mod listener;
mod operator;
pub mod relay;
mod side;
pub mod stun;
mod udp;
pub use config::ServeConfig;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use canopy_proto::v1::agent_service_server::AgentServiceServer;
use canopy_proto::v1::console_service_server::ConsoleServiceServer;
use canopy_proto::v1::hosted_service_server::HostedServiceServer;
use canopy_proto::v1::operator_service_server::OperatorServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::cache::Cache;
use crate::files::write_private;
use crate::service::{Controller, DEFAULT_TENANT};
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError, TlsMaterial};

/// Largest message the controller accepts; bigger ones get ResourceExhausted.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Where the controller keeps its state.
#[derive(Clone, Debug)]
pub enum StoreSpec {
    /// A redb file (the single-machine default).
    Embedded(PathBuf),
    /// An etcd cluster: `etcd://HOST:PORT[,HOST:PORT...]`, for several replicas.
    Etcd(Vec<String>),
    /// A store the embedding program opened itself (tests wrap a real one to hold it back).
    Shared(SharedStore),
}

/// A store handed in by the embedding program.
#[derive(Clone)]
pub struct SharedStore(pub Arc<dyn Store>);

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStore")
    }
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err("embedded store needs a path: embedded:PATH".into());
            }
            Ok(StoreSpec::Embedded(path.into()))
        } else if let Some(list) = s.strip_prefix("etcd://") {
            let eps: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect();
            if eps.is_empty()
                || eps.iter().any(|e| {
                    e.rsplit_once(':')
                        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                })
            {
                return Err(format!(
                    "etcd store {s:?}: expected etcd://HOST:PORT[,HOST:PORT...]"
                ));
            }
            Ok(StoreSpec::Etcd(eps))
        } else {
            Err(format!(
                "unknown store {s:?}: expected embedded:PATH or etcd://HOST:PORT[,...]"
            ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--advertise {0:?} must be https://HOST:PORT")]
    Advertise(String),
    #[error("{0}")]
    Setup(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A controller ready to serve: store opened, TLS material and admin token in place, socket bound.
pub struct Prepared {
    pub controller: Controller,
    pub tls: TlsMaterial,
    pub listener: TcpListener,
    pub local_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Set on first start (or `--reset-admin-token`): the new admin API token (also written to
    /// `DATA/admin-token`).
    pub new_admin_token: Option<String>,
    /// Whether this start created the CA.
    pub created_ca: bool,
    pub background: crate::leader::BackgroundConfig,
    pub listener_limits: listener::ListenerLimits,
    /// The STUN port (UDP, the listener's address), if bound.
    pub stun: Option<tokio::net::UdpSocket>,
    /// Datagrams a second the relay there takes from one address.
    pub relay_rate: u32,
    /// How often its use is counted into the store.
    pub relay_flush: Duration,
    /// The `/metrics` listener, if asked for.
    pub metrics: Option<TcpListener>,
    /// The web console's listener, if asked for.
    pub web: Option<TcpListener>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// The URL agents are told to use: `--advertise`, else https:// and the listen address
/// (127.0.0.1 for an unspecified one).
fn public_url(config: &ServeConfig, local_addr: SocketAddr) -> Result<String, ServeError> {
    Ok(match &config.advertise {
        Some(u) => {
            canopy_proto::transport::ControllerUrl::parse(u)
                .map_err(|_| ServeError::Advertise(u.clone()))?;
            u.trim_end_matches('/').to_string()
        }
        None => {
            let ip = if local_addr.ip().is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                local_addr.ip()
            };
            format!("https://{}", SocketAddr::new(ip, local_addr.port()))
        }
    })
}

/// The names the server certificate covers: loopback, the listen address, the advertised
/// URL's host and every `--tls-san`.
fn certificate_names(
    config: &ServeConfig,
    local_addr: SocketAddr,
    public_url: &str,
) -> Result<Vec<String>, ServeError> {
    let url_host = canopy_proto::transport::ControllerUrl::parse(public_url)
        .map_err(|_| ServeError::Advertise(public_url.to_string()))?
        .host;
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !local_addr.ip().is_unspecified() {
        names.push(local_addr.ip().to_string());
    }
    names.push(url_host);
    names.extend(config.tls_sans.iter().cloned());
    names.sort();
    names.dedup();
    Ok(names)
}

async fn open_store(config: &ServeConfig) -> Result<Arc<dyn Store>, ServeError> {
    Ok(
        match config
            .store
            .clone()
            .unwrap_or_else(|| StoreSpec::Embedded(config.data_dir.join("store.redb")))
        {
            StoreSpec::Embedded(path) => Arc::new(EmbeddedStore::open(&path)?),
            StoreSpec::Etcd(endpoints) => Arc::new(EtcdStore::connect(&endpoints).await?),
            StoreSpec::Shared(s) => s.0,
        },
    )
}

/// Opens everything `canopy serve` needs and binds the listener.
pub async fn prepare(config: &ServeConfig) -> Result<Prepared, ServeError> {
    let dd = |source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    crate::files::ensure_private_dir(&config.data_dir).map_err(dd)?;
    if let Some(n) = listener::raise_nofile_limit() {
        tracing::debug!(limit = n, "open files");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let public_url = public_url(config, local_addr)?;
    let names = certificate_names(config, local_addr, &public_url)?;
    let (stun, metrics, web) = side_listeners(config, local_addr).await?;
    // First start is race-free for replicas sharing a data dir: one creates the CA and the
    // admin token under this lock, the others wait and read them.
    let _init = crate::files::lock_exclusive(&config.data_dir.join("init.lock"))
        .await
        .map_err(dd)?;
    let tls = tls::load_or_create(&config.data_dir, &names)?;

    let store = open_store(config).await?;
    let cache = Cache::start(store.clone()).await?;
    let relay_secret = relay::secret(store.as_ref()).await?;
    let mut controller = Controller::new(store, cache, public_url, tls.ca_sha256);
    relay::write_secret_file(&config.data_dir, &relay_secret).map_err(dd)?;
    controller.relay_secret = std::sync::Arc::new(relay_secret);
    controller.relays = std::sync::Arc::new(config.relays.clone());
    controller.clock = config.clock.clone();
    controller.set_session_start_rate(config.session_starts_per_sec);
    controller.hosted = config.hosted;
    controller.set_api_rate(config.api_requests_per_sec);
    controller.set_signup_rate(config.signups_per_hour);
    controller.operator_token_hash = config
        .operator_token
        .as_ref()
        .filter(|t| !t.trim().is_empty())
        .map(|t| crate::secret::Secret::from_string(t.trim().to_string()).hash());

    let token_path = config.data_dir.join("admin-token");
    let new_admin_token = if token_path.exists() && !config.reset_admin_token {
        None
    } else {
        let (_, secret) = controller
            .reset_admin_token(DEFAULT_TENANT)
            .await
            .map_err(|e| ServeError::Setup(format!("creating the admin token: {e}")))?;
        write_private(&token_path, format!("{}\n", secret.expose()).as_bytes()).map_err(dd)?;
        Some(secret.expose().to_string())
    };
    Ok(Prepared {
        controller,
        created_ca: tls.created_ca,
        tls,
        listener_limits: config.listener,
        listener,
        local_addr,
        data_dir: config.data_dir.clone(),
        new_admin_token,
        background: config.background.clone(),
        stun,
        relay_rate: config.relay_rate,
        relay_flush: config.relay_flush,
        metrics,
        web,
    })
}

type SideListeners = (
    Option<tokio::net::UdpSocket>,
    Option<TcpListener>,
    Option<TcpListener>,
);

/// The STUN/relay port (UDP at the gRPC address, unless turned off), the `/metrics` listener
/// and the web console's (if asked for).
async fn side_listeners(
    config: &ServeConfig,
    local_addr: SocketAddr,
) -> Result<SideListeners, ServeError> {
    let stun = match config.stun {
        true => stun::bind(local_addr).await,
        false => None,
    };
    let metrics = match config.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?,
        ),
        None => None,
    };
    let web = match config.web {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?,
        ),
        None => None,
    };
    Ok((stun, metrics, web))
}

/// gRPC health, every service serving.
async fn health()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ConsoleServiceServer<console::ConsoleApi>>()
        .await;
    health
        .set_serving::<AgentServiceServer<agent::AgentApi>>()
        .await;
    health
        .set_serving::<HostedServiceServer<hosted::HostedApi>>()
        .await;
    health_service
}

type Reflection<T> = tonic_reflection::server::v1::ServerReflectionServer<T>;

/// Server reflection in both versions: v1, and v1alpha for Python's grpcio-reflection and
/// older grpcurl.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        Reflection<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(canopy_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| ServeError::Setup(format!("reflection: {e}")))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| ServeError::Setup(format!("reflection: {e}")))?;
    Ok((v1, v1alpha))
}

/// Serves until `shutdown` resolves, then drains in-flight calls and returns.
pub async fn serve(
    p: Prepared,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let health_service = health().await;
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let console = ConsoleServiceServer::new(console::ConsoleApi::new(p.controller.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let agent = AgentServiceServer::new(agent::AgentApi::new(p.controller.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let hosted = HostedServiceServer::new(hosted::HostedApi::new(p.controller.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let operator = OperatorServiceServer::new(operator::OperatorApi::new(p.controller.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let tls = listener::server_config(&p.tls.server_chain_pem, &p.tls.server_key_pem)
        .map_err(ServeError::Setup)?;
    tracing::info!(addr = %p.local_addr, url = %p.controller.public_url, "controller serving");
    let ctl = p.controller.clone();
    let (bg_stop, bg_stopped) = tokio::sync::oneshot::channel::<()>();
    let replica = crate::secret::new_id("replica_");
    let background = tokio::spawn(crate::leader::run(
        ctl.store.clone(),
        replica,
        p.background.clone(),
        ctl.clock.clone(),
        ctl.leading.clone(),
        async move {
            let _ = bg_stopped.await;
        },
    ));
    let mut side = side::spawn(&ctl, p.stun, p.metrics, p.relay_rate, p.relay_flush);
    if let Some(l) = p.web {
        let tls = crate::web::tls_config(&p.tls.server_chain_pem, &p.tls.server_key_pem)
            .map_err(ServeError::Setup)?;
        tracing::info!(addr = ?l.local_addr().ok(), "web console serving");
        side.push(tokio::spawn(crate::web::serve(
            l,
            tls,
            ctl.clone(),
            std::future::pending(),
        )));
    }
    let shutdown = async move {
        shutdown.await;
        ctl.begin_shutdown();
    };
    Server::builder()
        .timeout(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
        .layer(tower::util::MapResponseLayer::new(client_faults))
        .layer(crate::metrics::RpcLayer(p.controller.metrics.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(console)
        .add_service(agent)
        .add_service(hosted)
        .add_service(operator)
        .serve_with_incoming_shutdown(
            listener::incoming(p.listener, tls, p.listener_limits),
            shutdown,
        )
        .await?;
    for t in side {
        t.abort();
    }
    let _ = bg_stop.send(());
    let _ = background.await;
    p.controller.cache.stop().await;
    tracing::info!("controller stopped");
    Ok(())
}

/// Statuses tonic makes itself for a client's bad request, mapped to what they are: a request
/// over the size limit is OutOfRange there and ResourceExhausted by gRPC's convention (and
/// our contract); bytes that are no protobuf message are Internal there and the client's
/// fault here (InvalidArgument). Unary answers carry the status in the headers.
fn client_faults<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers();
    let Some(code) = h.get("grpc-status").and_then(|v| v.to_str().ok()) else {
        return resp;
    };
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let fixed = match code {
        "11" if msg.contains("message length too large") => Some((
            "8",
            format!("request message is larger than the {MAX_MESSAGE_BYTES}-byte limit"),
        )),
        "13" if msg.contains("failed to decode Protobuf message") => Some((
            "3",
            "request is not a valid protobuf message of its type".into(),
        )),
        _ => None,
    };
    if let Some((code, msg)) = fixed {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static(code));
        if let Ok(v) = http::HeaderValue::from_str(&msg.replace(' ', "%20")) {
            resp.headers_mut().insert("grpc-message", v);
        }
    }
    resp
}

/// The same mapping for a status read from a request stream (a streaming call's bad message).
pub(crate) fn client_fault(s: tonic::Status) -> tonic::Status {
    if s.code() == tonic::Code::Internal && s.message().contains("failed to decode Protobuf") {
        tonic::Status::invalid_argument("request is not a valid protobuf message of its type")
    } else {
        s
    }
}

/// The bearer secret from a request's `authorization` metadata.
fn bearer<T>(req: &tonic::Request<T>) -> Result<String, tonic::Status> {
    let v = req.metadata().get("authorization").ok_or_else(|| {
        tonic::Status::unauthenticated("missing authorization: send 'Bearer <token>'")
    })?;
    let s = v
        .to_str()
        .map_err(|_| tonic::Status::unauthenticated("authorization is not text"))?;
    s.strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
        .ok_or_else(|| tonic::Status::unauthenticated("authorization must be 'Bearer <token>'"))
}

/// The caller of a console-side call (console or hosted service): its API token is checked and
/// counted against the token's request rate.
async fn console_caller<T>(
    ctl: &Controller,
    req: &tonic::Request<T>,
) -> Result<crate::service::Caller, tonic::Status> {
    let c = ctl.authenticate_console(&bearer(req)?).await?;
    ctl.check_rate(&c)?;
    Ok(c)
}

/// A controller serving in the background, for embedding and in-process tests.
pub struct Running {
    pub url: String,
    pub local_addr: SocketAddr,
    pub ca_pem: String,
    pub ca_sha256: [u8; 32],
    /// The admin API token (read from `DATA/admin-token`).
    pub admin_token: String,
    pub controller: Controller,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("url", &self.url).finish()
    }
}

/// Prepares and serves `config` on a background task.
pub async fn spawn(config: &ServeConfig) -> Result<Running, ServeError> {
    let p = prepare(config).await?;
    let admin_token = std::fs::read_to_string(p.data_dir.join("admin-token"))
        .map_err(|source| ServeError::DataDir {
            path: p.data_dir.clone(),
            source,
        })?
        .trim()
        .to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (url, local_addr, controller) = (
        p.controller.public_url.clone(),
        p.local_addr,
        p.controller.clone(),
    );
    let (ca_pem, ca_sha256) = (p.tls.ca_pem.clone(), p.tls.ca_sha256);
    let task = tokio::spawn(serve(p, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        url,
        local_addr,
        ca_pem,
        ca_sha256,
        admin_token,
        controller,
        shutdown: Some(tx),
        task,
    })
}

impl Running {
    /// Stops serving (open streams are cut) and waits for the server to finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        let t = std::time::Instant::now();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Ok(r) => r.map_err(|e| ServeError::Setup(e.to_string()))?,
            Err(_) => {
                tracing::warn!("controller did not drain in 10 s; aborting it");
                self.task.abort();
                let _ = (&mut self.task).await;
                Ok(())
            }
        };
        // Wait until ours is the last handle on the store and nothing is in flight, then close
        // it here, so the same data dir can be reopened at once.
        let store = self.controller.store.clone();
        drop(self.controller);
        while Arc::strong_count(&store) > 1 {
            if t.elapsed() > Duration::from_secs(15) {
                return Err(ServeError::Setup(format!(
                    "the store is still in use {} s after stop",
                    t.elapsed().as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store.quiesce().await;
        drop(store);
        tracing::debug!(took = ?t.elapsed(), "controller stopped");
        result
    }
}
