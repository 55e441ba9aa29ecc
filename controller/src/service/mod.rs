//! The controller's operations: what the console and agents can do, with every rule enforced.
//! Handlers in `server/` only authenticate, call these, and map [`Error`] to a gRPC status.
//!
//! Writes are store transactions guarded by the revisions they read, retried on conflict:
//! addresses are claimed create-if-absent and join-token uses are counted compare-and-swap, so
//! concurrent enrollments never share an address or overuse a token.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use canopy_proto::v1::{ApiTokenRecord, IndexRecord};
use prost::Message;

mod agents;
mod apitokens;
mod audit;
mod enroll;
pub mod exits;
pub mod gateways;
pub mod health;
pub mod lock;
mod networks;
mod peers;
mod policy;
pub mod punch;
pub mod relayuse;
mod routes;
mod sessions;
mod tenants;
mod tokens;
pub mod websessions;

pub use sessions::Sessions;
pub use tenants::TenantGuard;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::keys;
use crate::plans::{Plan, Scope};
use crate::secret::{self, Secret};
use crate::store::{KeyValue, Store};

/// The tenant of a single-organisation (non-hosted) controller.
pub const DEFAULT_TENANT: &str = "default";
/// Attempts at a conflicting transaction before giving up with `Unavailable`.
/// Console requests per second per API token, by default.
pub const DEFAULT_API_RATE: u32 = 50;
/// New Sync sessions per second (and burst) a replica accepts by default.
pub const DEFAULT_SESSION_STARTS: u32 = 1000;
/// New Sync sessions one peer may open: a burst, then one a second.
const PEER_SESSION_STARTS_PER_SEC: f64 = 1.0;
const PEER_SESSION_BURST: u32 = 5;
/// Sign-ups from one source address an hour, by default (a quarter of it, at least 5, at once).
pub const DEFAULT_SIGNUPS_PER_HOUR: u32 = 20;

fn signup_limiter(per_hour: u32) -> crate::pacing::KeyedLimiter {
    let per_hour = per_hour.max(1);
    crate::pacing::KeyedLimiter::new(f64::from(per_hour) / 3600.0, (per_hour / 4).max(5), 100_000)
}

fn api_limiter(per_second: u32) -> crate::pacing::KeyedLimiter {
    let rate = per_second.max(1);
    crate::pacing::KeyedLimiter::new(f64::from(rate), rate.saturating_mul(2), 100_000)
}

/// Who is calling the console API.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: String,
    pub token_id: String,
    pub scope: Scope,
    pub plan: Plan,
}

impl Caller {
    /// Changes need an admin-scope token.
    pub fn require_admin(&self) -> Result<()> {
        match self.scope {
            Scope::Admin => Ok(()),
            Scope::Read => Err(Error::PermissionDenied(
                "this API token is read-only".into(),
            )),
        }
    }
}

/// An authenticated agent.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    pub network_id: String,
    pub peer_id: String,
    /// SHA-256 of the credential it presented (its entry says whether the peer was removed).
    pub credential_hash: [u8; 32],
}

#[derive(Clone)]
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub cache: Cache,
    pub sessions: Sessions,
    /// The URL agents use to reach this controller (goes into join strings).
    pub public_url: String,
    pub ca_sha256: [u8; 32],
    /// Set when the server begins shutting down: Sync sessions end so the drain can finish.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Paces new Sync sessions.
    admission: Arc<Mutex<crate::pacing::TokenBucket>>,
    /// Whether this replica currently holds the background-work lease.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// A hosted (multi-tenant) controller: sign-up is open.
    pub hosted: bool,
    /// SHA-256 of the operator credential, if one is configured.
    pub operator_token_hash: Option<[u8; 32]>,
    /// Console requests per tenant on this replica: a tenant's many API tokens share one budget.
    api_rate: Arc<Mutex<crate::pacing::KeyedLimiter>>,
    /// The configured per-tenant rate, for messages.
    api_rate_per_sec: u32,
    /// New Sync sessions per peer on this replica.
    peer_starts: Arc<Mutex<crate::pacing::KeyedLimiter>>,
    /// Sign-ups per source address (IPv4 address or IPv6 /64) on this replica.
    signup_rate: Arc<Mutex<crate::pacing::KeyedLimiter>>,
    /// What "now" is for expiry and timestamps.
    pub clock: crate::clock::Clock,
    /// The key relay tickets are signed with (shared by all replicas through the store);
    /// empty: no relay.
    pub relay_secret: Arc<Vec<u8>>,
    /// Relays besides this controller's UDP port (`canopy relay`), told to agents with their
    /// tickets.
    pub relays: Arc<Vec<std::net::SocketAddr>>,
    /// Recent hole punches and the budget for more.
    punches: Arc<Mutex<punch::PunchState>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// What a removed peer's credential entry becomes: still found by its hash, marked removed.
fn removed_credential(network: &str, peer: &str, at_unix: i64) -> Vec<u8> {
    IndexRecord {
        id: format!("{network}/{peer}"),
        removed_at_unix: at_unix,
    }
    .encode_to_vec()
}

impl Controller {
    /// Seconds since the Unix epoch, by this controller's clock.
    pub(crate) fn now_unix(&self) -> i64 {
        self.clock.now_unix()
    }

    /// The revision `key` was last written at; 0 when it does not exist (what
    /// `Compare::unchanged(key, 0)` expects of an absent key).
    pub(crate) async fn revision_of(&self, key: &str) -> Result<crate::store::Revision> {
        Ok(self
            .store
            .get(key.as_bytes())
            .await?
            .map_or(0, |kv| kv.mod_revision))
    }
}

pub(crate) fn decode<M: Message + Default>(kv: &KeyValue) -> Result<M> {
    Ok(M::decode(kv.value.as_slice())?)
}

impl Controller {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Cache,
        public_url: String,
        ca_sha256: [u8; 32],
    ) -> Self {
        let closing = Arc::new(tokio::sync::watch::channel(false).0);
        Self {
            store,
            cache,
            sessions: Sessions::default(),
            punches: Arc::default(),
            metrics: Arc::default(),
            public_url,
            ca_sha256,
            closing,
            leading: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            hosted: false,
            operator_token_hash: None,
            api_rate: Arc::new(Mutex::new(api_limiter(DEFAULT_API_RATE))),
            api_rate_per_sec: DEFAULT_API_RATE,
            peer_starts: Arc::new(Mutex::new(crate::pacing::KeyedLimiter::new(
                PEER_SESSION_STARTS_PER_SEC,
                PEER_SESSION_BURST,
                1_000_000,
            ))),
            signup_rate: Arc::new(Mutex::new(signup_limiter(DEFAULT_SIGNUPS_PER_HOUR))),
            clock: crate::clock::Clock::system(),
            relay_secret: Arc::new(Vec::new()),
            relays: Arc::default(),
            admission: Arc::new(Mutex::new(crate::pacing::TokenBucket::new(
                DEFAULT_SESSION_STARTS,
                DEFAULT_SESSION_STARTS,
            ))),
        }
    }

    /// Sets the per-tenant request rate (per second; bursts of twice that).
    pub fn set_api_rate(&mut self, per_second: u32) {
        self.api_rate = Arc::new(Mutex::new(api_limiter(per_second)));
        self.api_rate_per_sec = per_second.max(1);
    }

    /// Sets how many sign-ups one source address may make an hour.
    pub fn set_signup_rate(&mut self, per_hour: u32) {
        self.signup_rate = Arc::new(Mutex::new(signup_limiter(per_hour)));
    }

    /// Counts one request against the caller's tenant's rate limit: all of a tenant's API
    /// tokens share it, so minting tokens buys no extra rate.
    pub fn check_rate(&self, c: &Caller) -> Result<()> {
        let mut g = self.api_rate.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.api_rate_per_sec;
        g.admit(&c.tenant, self.clock.instant()).map_err(|_| {
            Error::ResourceExhausted(format!(
                "rate limit: {rate} requests per second per tenant; retry shortly"
            ))
        })
    }

    /// Counts one sign-up from `source` (an IPv4 address or an IPv6 /64: one host's share).
    pub fn check_signup_rate(&self, source: Option<std::net::IpAddr>) -> Result<()> {
        let key = match source {
            Some(IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            Some(v4) => v4.to_string(),
            None => "unknown".into(),
        };
        let mut g = self.signup_rate.lock().unwrap_or_else(|e| e.into_inner());
        g.admit(&key, self.clock.instant()).map_err(|wait| {
            Error::ResourceExhausted(format!(
                "too many sign-ups from this address; retry in {} s",
                wait.as_secs().max(1)
            ))
        })
    }

    /// Whether this replica runs background work now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets how many new Sync sessions per second (and at once) this replica accepts.
    pub fn set_session_start_rate(&mut self, per_second: u32) {
        self.admission = Arc::new(Mutex::new(crate::pacing::TokenBucket::new(
            per_second, per_second,
        )));
    }

    /// Admits a new Sync session now, or says when to come back (jittered).
    pub fn admit_session(&self) -> Result<(), std::time::Duration> {
        use rand::Rng as _;
        let mut b = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        b.admit(self.clock.instant())
            .map_err(|due| b.retry_after(due, rand::rng().random_range(0.0..1.0)))
    }

    /// Tells long-lived Sync sessions to end (the server is draining).
    pub fn begin_shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`begin_shutdown`](Self::begin_shutdown) has been called.
    pub async fn closing(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    // ----- API tokens -----

    pub async fn authenticate_console(&self, bearer: &str) -> Result<Caller> {
        if !bearer.starts_with(secret::API_TOKEN) {
            return Err(Error::Unauthenticated(
                "that is not an API token (API tokens start with 'cat_')".into(),
            ));
        }
        let hash = Secret::from_string(bearer.to_string()).hash();
        self.authenticate_token_hash(&hash).await
    }

    /// The caller an API token (by its hash) stands for, if it is still valid.
    pub(crate) async fn authenticate_token_hash(&self, hash: &[u8; 32]) -> Result<Caller> {
        let unknown = || Error::Unauthenticated("API token is not valid".into());
        let kv = self
            .store
            .get(keys::apitoken(hash).as_bytes())
            .await?
            .ok_or_else(unknown)?;
        let rec: ApiTokenRecord = decode(&kv)?;
        // A deleted tenant's tokens are gone; one caught mid-deletion is not valid either.
        let plan = match self.tenant_guard(&rec.tenant_id).await {
            Ok(g) => g.plan,
            Err(Error::PermissionDenied(m)) if m.contains("deleted") => return Err(unknown()),
            Err(e) => return Err(e),
        };
        Ok(Caller {
            tenant: rec.tenant_id,
            token_id: rec.id,
            scope: Scope::parse(&rec.scope).unwrap_or(Scope::Read),
            plan,
        })
    }
}
