//! What `canopy serve` is configured with.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{StoreSpec, listener};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Defaults to `embedded:<data_dir>/store.redb`.
    pub store: Option<StoreSpec>,
    /// The URL agents and consoles use to reach this controller (`https://HOST:PORT`).
    /// Defaults to the listen address (127.0.0.1 when listening on all addresses).
    pub advertise: Option<String>,
    /// Extra names/addresses for the server certificate.
    pub tls_sans: Vec<String>,
    /// New agent sessions accepted per second (and at once); more are paced.
    pub session_starts_per_sec: u32,
    /// Leader election and background jobs.
    pub background: crate::leader::BackgroundConfig,
    /// Multi-tenant hosted mode: sign-up open, plans and quotas.
    pub hosted: bool,
    /// The operator credential (for OperatorService); none disables it.
    pub operator_token: Option<String>,
    /// Console requests per second per tenant (bursts of twice that).
    pub api_requests_per_sec: u32,
    /// Make a new admin token for the self-managed tenant even if `DATA/admin-token` exists.
    pub reset_admin_token: bool,
    /// Hosted sign-ups one source address (IPv4, or IPv6 /64) may make an hour.
    pub signups_per_hour: u32,
    /// TLS handshake deadline and how many may be in progress at once.
    pub listener: listener::ListenerLimits,
    /// What "now" is (token expiry, leases, timestamps): the system's, or a test's.
    pub clock: crate::clock::Clock,
    /// Answer STUN Binding requests on UDP at the listen address (agents behind NAT learn
    /// their outside address).
    pub stun: bool,
    /// More relays to tell agents of (`canopy relay` instances, "HOST:PORT"), besides this
    /// controller's own UDP port.
    pub relays: Vec<SocketAddr>,
    /// Datagrams a second one address may have relayed here (and twice that at once).
    pub relay_rate: u32,
    /// How often the relay's use is counted into the store (against hosted plans).
    pub relay_flush: std::time::Duration,
    /// Serve Prometheus metrics (`GET /metrics`) here; never on the gRPC port.
    pub metrics: Option<SocketAddr>,
    /// Serve the web console here (HTTPS with the controller's certificate).
    pub web: Option<SocketAddr>,
}

impl ServeConfig {
    /// The defaults for everything but where to listen and where the data dir is.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            store: None,
            advertise: None,
            tls_sans: Vec::new(),
            session_starts_per_sec: crate::service::DEFAULT_SESSION_STARTS,
            background: crate::leader::BackgroundConfig::default(),
            hosted: false,
            operator_token: None,
            api_requests_per_sec: crate::service::DEFAULT_API_RATE,
            reset_admin_token: false,
            signups_per_hour: crate::service::DEFAULT_SIGNUPS_PER_HOUR,
            listener: listener::ListenerLimits::default(),
            clock: crate::clock::Clock::system(),
            stun: true,
            relays: Vec::new(),
            relay_rate: super::relay::PER_SOURCE,
            relay_flush: crate::service::relayuse::FLUSH,
            metrics: None,
            web: None,
        }
    }
}
