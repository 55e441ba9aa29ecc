//! The controller's operations: what the console and agents can do, with every rule enforced.
//! Handlers in `server/` only authenticate, call these, and map [`Error`] to a gRPC status.
//!
//! Writes are store transactions guarded by the revisions they read, retried on conflict:
//! addresses are claimed create-if-absent and join-token uses are counted compare-and-swap, so
//! concurrent enrollments never share an address or overuse a token.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use canopy_proto::join::JoinString;
use canopy_proto::v1::{
    ApiTokenRecord, EnrollResponse, IndexRecord, JoinToken, JoinTokenRecord, Network,
    NetworkRecord, Peer, PeerRecord,
};
use ipnetwork::IpNetwork;
use prost::Message;
use rand::seq::IndexedRandom as _;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::model;
use crate::netmap::Update;
use crate::plans::{Plan, Scope};
use crate::secret::{self, Secret};
use crate::store::{Compare, KeyValue, Op, Revision, Store, Txn};
use crate::{ipam, keys};

/// The tenant of a single-organisation (non-hosted) controller.
pub const DEFAULT_TENANT: &str = "default";
/// Attempts at a conflicting transaction before giving up with `Unavailable`.
/// Console requests per second per API token, by default.
pub const DEFAULT_API_RATE: u32 = 50;
/// New Sync sessions per second (and burst) a replica accepts by default.
pub const DEFAULT_SESSION_STARTS: u32 = 1000;
/// Endpoints an agent may report.
const MAX_ENDPOINTS: usize = 8;
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

/// Live Sync sessions on this replica: one per peer. Opening a session for a peer that has
/// one tells the old one to end (a credential cannot hold many streams, each with a map); the
/// session number makes the old one's close leave the new one alone.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<SessionTable>>);

struct SessionEntry {
    number: u64,
    acked: Revision,
    /// Notified when a newer session of the same peer replaces this one.
    replaced: Arc<tokio::sync::Notify>,
}

/// (last session number, peer id → its live session).
type SessionTable = (u64, HashMap<String, SessionEntry>);

impl Sessions {
    /// Registers a new session of `peer`, ending the one it had: returns the session number
    /// and what the session is told through when it is replaced in turn.
    pub fn open(&self, peer: &str) -> (u64, Arc<tokio::sync::Notify>) {
        let mut g = self.lock();
        g.0 += 1;
        let number = g.0;
        let replaced = Arc::new(tokio::sync::Notify::new());
        let entry = SessionEntry {
            number,
            acked: 0,
            replaced: replaced.clone(),
        };
        if let Some(old) = g.1.insert(peer.to_string(), entry) {
            old.replaced.notify_one();
        }
        (number, replaced)
    }
    pub fn ack(&self, peer: &str, session: u64, rev: Revision) {
        if let Some(e) = self.lock().1.get_mut(peer)
            && e.number == session
        {
            e.acked = e.acked.max(rev);
        }
    }
    pub fn close(&self, peer: &str, session: u64) {
        let mut g = self.lock();
        if g.1.get(peer).is_some_and(|e| e.number == session) {
            g.1.remove(peer);
        }
    }
    /// The revision the peer's live session acknowledged, if it has one.
    pub fn get(&self, peer: &str) -> Option<Revision> {
        self.lock().1.get(peer).map(|e| e.acked)
    }
    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a removed peer's credential entry becomes: still found by its hash, marked removed.
fn removed_credential(network: &str, peer: &str) -> Vec<u8> {
    IndexRecord {
        id: format!("{network}/{peer}"),
        removed_at_unix: now_unix(),
    }
    .encode_to_vec()
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
        g.admit(&c.tenant, std::time::Instant::now()).map_err(|_| {
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
        g.admit(&key, std::time::Instant::now()).map_err(|wait| {
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
        b.admit(std::time::Instant::now())
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
        let unknown = || Error::Unauthenticated("API token is not valid".into());
        if !bearer.starts_with(secret::API_TOKEN) {
            return Err(Error::Unauthenticated(
                "that is not an API token (API tokens start with 'cat_')".into(),
            ));
        }
        let hash = Secret::from_string(bearer.to_string()).hash();
        let kv = self
            .store
            .get(keys::apitoken(&hash).as_bytes())
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

    // ----- networks -----

    pub async fn create_network(
        &self,
        c: &Caller,
        name: &str,
        cidrs: &[String],
    ) -> Result<Network> {
        c.require_admin()?;
        model::validate_network_name(name)?;
        let nets = &model::parse_cidrs(cidrs)?;
        crate::txn::retry("create network", |_| async move {
            // The plan as of now, and the version key the count is read under: the create is
            // conditioned on both, so a plan change or another create that commits first makes
            // this attempt re-read.
            let tenant = self.tenant_guard(&c.tenant).await?;
            let ver = self.store.get(keys::netsver(&c.tenant).as_bytes()).await?;
            let ver_rev = ver.as_ref().map_or(0, |kv| kv.mod_revision);
            let existing_networks = self.network_records(&c.tenant).await?;
            let limit = tenant.plan.quotas().networks;
            if existing_networks.len() as u64 >= u64::from(limit) {
                return Err(Error::ResourceExhausted(format!(
                    "the {} plan allows {limit} networks",
                    tenant.plan.name()
                )));
            }
            for existing in existing_networks {
                if existing.name == name {
                    return Err(Error::AlreadyExists(format!(
                        "network {} already exists",
                        canopy_proto::text::quoted(name)
                    )));
                }
                for theirs in existing
                    .cidrs
                    .iter()
                    .filter_map(|s| model::parse_cidr(s).ok())
                {
                    if let Some(mine) = nets.iter().find(|n| model::overlaps(n, &theirs)) {
                        return Err(Error::FailedPrecondition(format!(
                            "{mine} overlaps {theirs} of network {}",
                            canopy_proto::text::quoted(&existing.name)
                        )));
                    }
                }
            }
            let rec = NetworkRecord {
                id: secret::new_id("net_"),
                tenant_id: c.tenant.clone(),
                name: name.to_string(),
                cidrs: nets.iter().map(|n| n.to_string()).collect(),
                created_at_unix: now_unix(),
            };
            let name_key = keys::netname(&c.tenant, name);
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(tenant.compare)
                        .when(Compare::unchanged(keys::netsver(&c.tenant), ver_rev))
                        .when(Compare::absent(name_key.clone()))
                        .then(Op::put(
                            keys::network(&c.tenant, &rec.id),
                            rec.encode_to_vec(),
                        ))
                        .then(Op::put(
                            name_key,
                            IndexRecord {
                                id: rec.id.clone(),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        ))
                        .then(Op::put(keys::netsver(&c.tenant), rec.id.clone())),
                )
                .await?;
            if r.succeeded {
                tracing::info!(network = %rec.id, name, tenant = %c.tenant, "network created");
                return Ok(Some(network_view(&rec, r.revision)));
            }
            Ok(None)
        })
        .await
    }

    pub(crate) async fn network_records(&self, tenant: &str) -> Result<Vec<NetworkRecord>> {
        let r = self.store.range(keys::networks(tenant).as_bytes()).await?;
        r.kvs.iter().map(decode).collect()
    }

    pub async fn list_networks(&self, c: &Caller) -> Result<Vec<Network>> {
        let mut out: Vec<Network> = self
            .network_records(&c.tenant)
            .await?
            .iter()
            .map(|n| network_view(n, self.cache.network_revision(&n.id).unwrap_or(0)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Finds a tenant's network by id or name. Another tenant's network is NotFound, exactly
    /// like a missing one.
    pub async fn resolve_network(
        &self,
        c: &Caller,
        reference: &str,
    ) -> Result<(NetworkRecord, Revision)> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument(
                "network id or name is required".into(),
            ));
        }
        let not_found = || {
            Error::NotFound(format!(
                "network {} not found",
                canopy_proto::text::quoted(reference)
            ))
        };
        let id = if reference.starts_with("net_") {
            reference.to_string()
        } else {
            let kv = self
                .store
                .get(keys::netname(&c.tenant, reference).as_bytes())
                .await?
                .ok_or_else(not_found)?;
            decode::<IndexRecord>(&kv)?.id
        };
        let kv = self
            .store
            .get(keys::network(&c.tenant, &id).as_bytes())
            .await?
            .ok_or_else(not_found)?;
        Ok((decode(&kv)?, kv.mod_revision))
    }

    pub async fn get_network(&self, c: &Caller, reference: &str) -> Result<Network> {
        let (n, _) = self.resolve_network(c, reference).await?;
        Ok(network_view(
            &n,
            self.cache.network_revision(&n.id).unwrap_or(0),
        ))
    }

    /// Deletes a network with its peers, addresses and join tokens, in one transaction.
    pub async fn delete_network(&self, c: &Caller, reference: &str) -> Result<u32> {
        c.require_admin()?;
        crate::txn::retry("delete network", |_| async move {
            let (net, net_rev) = self.resolve_network(c, reference).await?;
            let peers = self.store.range(keys::peers(&net.id).as_bytes()).await?;
            let tokens = self.token_records(&c.tenant).await?;
            let mut txn = Txn::new()
                .when(Compare::unchanged(
                    keys::network(&c.tenant, &net.id),
                    net_rev,
                ))
                .then(Op::delete(keys::network(&c.tenant, &net.id)))
                .then(Op::delete(keys::netname(&c.tenant, &net.name)))
                .then(Op::put(keys::netsver(&c.tenant), net.id.clone()))
                .then(Op::delete_prefix(keys::peers(&net.id)))
                .then(Op::delete_prefix(keys::ipams(&net.id)))
                .then(Op::delete_prefix(keys::pubkeys(&net.id)))
                .then(Op::delete(keys::netdel(&net.id)))
                .then(Op::delete(keys::netpeers(&net.id)));
            for kv in &peers.kvs {
                let p: PeerRecord = decode(kv)?;
                if let Ok(h) = <[u8; 32]>::try_from(p.credential_hash.as_slice()) {
                    txn = txn.then(Op::put(
                        keys::credential(&h),
                        removed_credential(&net.id, &p.id),
                    ));
                }
            }
            for (t, _) in tokens.iter().filter(|(t, _)| t.network_id == net.id) {
                txn = txn.then(Op::delete(keys::token(&c.tenant, &t.id)));
                if let Ok(h) = <[u8; 32]>::try_from(t.secret_hash.as_slice()) {
                    txn = txn.then(Op::delete(keys::tokenhash(&h)));
                }
            }
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(network = %net.id, peers = peers.kvs.len(), "network deleted");
                return Ok(Some(peers.kvs.len() as u32));
            }
            Ok(None)
        })
        .await
    }

    // ----- join tokens -----

    pub async fn create_join_token(
        &self,
        c: &Caller,
        network: &str,
        max_uses: u32,
        ttl_seconds: u64,
        tags: &[String],
    ) -> Result<(JoinToken, String)> {
        c.require_admin()?;
        model::validate_tags(tags)?;
        if ttl_seconds > 10 * 365 * 24 * 3600 {
            return Err(Error::InvalidArgument(
                "ttl is longer than ten years".into(),
            ));
        }
        let (net, _) = self.resolve_network(c, network).await?;
        let (net, tags) = (&net, &tags);
        let (rec, secret) = crate::txn::retry("create join token", |_| async move {
            let tenant = self.tenant_guard(&c.tenant).await?;
            let secret = Secret::generate(secret::JOIN_TOKEN);
            let now = now_unix();
            let rec = JoinTokenRecord {
                id: secret::new_id("tok_"),
                tenant_id: c.tenant.clone(),
                network_id: net.id.clone(),
                secret_hash: secret.hash().to_vec(),
                max_uses,
                uses: 0,
                expires_at_unix: if ttl_seconds == 0 {
                    0
                } else {
                    now + ttl_seconds as i64
                },
                revoked: false,
                tags: tags.to_vec(),
                created_at_unix: now,
            };
            let hash_key = keys::tokenhash(&secret.hash());
            // Active tokens are counted under a per-tenant version key the create is
            // conditioned on; the network must still exist when it commits.
            let ver_key = keys::tokensver(&c.tenant);
            let ver_rev = self
                .store
                .get(ver_key.as_bytes())
                .await?
                .map_or(0, |kv| kv.mod_revision);
            let net_rev = self
                .store
                .get(keys::network(&c.tenant, &net.id).as_bytes())
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "network {} not found",
                        canopy_proto::text::quoted(&net.name)
                    ))
                })?
                .mod_revision;
            let limit = tenant.plan.quotas().active_join_tokens;
            let active = self.active_join_tokens(&c.tenant, now).await?;
            if active as u64 >= u64::from(limit) {
                return Err(Error::ResourceExhausted(format!(
                    "the {} plan allows {limit} active join tokens",
                    tenant.plan.name()
                )));
            }
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(tenant.compare)
                        .when(Compare::unchanged(
                            keys::network(&c.tenant, &net.id),
                            net_rev,
                        ))
                        .when(Compare::unchanged(ver_key.clone(), ver_rev))
                        .then(Op::put(ver_key, rec.id.clone()))
                        .when(Compare::absent(hash_key.clone()))
                        .then(Op::put(
                            keys::token(&c.tenant, &rec.id),
                            rec.encode_to_vec(),
                        ))
                        .then(Op::put(
                            hash_key,
                            IndexRecord {
                                id: format!("{}/{}", c.tenant, rec.id),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        )),
                )
                .await?;
            Ok(r.succeeded.then_some((rec, secret)))
        })
        .await?;
        let join = JoinString {
            controller_url: self.public_url.clone(),
            token: secret.expose().to_string(),
            ca_sha256: self.ca_sha256,
        };
        tracing::info!(token = %rec.id, network = %net.id, max_uses, "join token created");
        Ok((token_view(&rec), join.encode()))
    }

    /// Join tokens of the tenant that can still be used at `now`.
    pub(crate) async fn active_join_tokens(&self, tenant: &str, now: i64) -> Result<usize> {
        Ok(self
            .token_records(tenant)
            .await?
            .iter()
            .filter(|(t, _)| check_token_usable(t, now).is_ok())
            .count())
    }

    pub(crate) async fn token_records(
        &self,
        tenant: &str,
    ) -> Result<Vec<(JoinTokenRecord, Revision)>> {
        let r = self.store.range(keys::tokens(tenant).as_bytes()).await?;
        r.kvs
            .iter()
            .map(|kv| Ok((decode(kv)?, kv.mod_revision)))
            .collect()
    }

    pub async fn list_join_tokens(&self, c: &Caller, network: &str) -> Result<Vec<JoinToken>> {
        let filter = if network.is_empty() {
            None
        } else {
            Some(self.resolve_network(c, network).await?.0.id)
        };
        let mut out: Vec<JoinToken> = self
            .token_records(&c.tenant)
            .await?
            .iter()
            .filter(|(t, _)| filter.as_ref().is_none_or(|n| &t.network_id == n))
            .map(|(t, _)| token_view(t))
            .collect();
        out.sort_by_key(|t| t.created_at_unix);
        Ok(out)
    }

    pub async fn revoke_join_token(&self, c: &Caller, token_id: &str) -> Result<JoinToken> {
        c.require_admin()?;
        if token_id.is_empty() {
            return Err(Error::InvalidArgument("token id is required".into()));
        }
        let key = &keys::token(&c.tenant, token_id);
        crate::txn::retry("revoke join token", |_| async move {
            let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "join token {} not found",
                    canopy_proto::text::quoted(token_id)
                ))
            })?;
            let mut rec: JoinTokenRecord = decode(&kv)?;
            rec.revoked = true;
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), kv.mod_revision))
                        .then(Op::put(key.clone(), rec.encode_to_vec())),
                )
                .await?;
            Ok(r.succeeded.then(|| token_view(&rec)))
        })
        .await
    }

    // ----- peers -----

    pub async fn list_peers(&self, c: &Caller, network: &str) -> Result<Vec<Peer>> {
        let (net, _) = self.resolve_network(c, network).await?;
        let r = self.store.range(keys::peers(&net.id).as_bytes()).await?;
        let mut out = Vec::with_capacity(r.kvs.len());
        for kv in &r.kvs {
            out.push(self.peer_view(&decode(kv)?));
        }
        out.sort_by_key(|p| ip_sort_key(&p.addresses));
        Ok(out)
    }

    async fn find_peer(&self, c: &Caller, peer_id: &str) -> Result<(PeerRecord, Revision)> {
        if peer_id.is_empty() {
            return Err(Error::InvalidArgument("peer id is required".into()));
        }
        for net in self.network_records(&c.tenant).await? {
            if let Some(kv) = self
                .store
                .get(keys::peer(&net.id, peer_id).as_bytes())
                .await?
            {
                return Ok((decode(&kv)?, kv.mod_revision));
            }
        }
        Err(Error::NotFound(format!(
            "peer {} not found",
            canopy_proto::text::quoted(peer_id)
        )))
    }

    pub async fn get_peer(&self, c: &Caller, peer_id: &str) -> Result<Peer> {
        Ok(self.peer_view(&self.find_peer(c, peer_id).await?.0))
    }

    /// Removes a peer: frees its addresses and invalidates its credential in one transaction.
    /// Its Sync stream is closed by the cache update that follows.
    pub async fn remove_peer(&self, c: &Caller, peer_id: &str) -> Result<()> {
        c.require_admin()?;
        crate::txn::retry("remove peer", |_| async move {
            let (p, rev) = self.find_peer(c, peer_id).await?;
            let mut txn = Txn::new()
                .when(Compare::unchanged(keys::peer(&p.network_id, &p.id), rev))
                .then(Op::delete(keys::peer(&p.network_id, &p.id)))
                .then(Op::delete(keys::pubkey(&p.network_id, &p.public_key)))
                .then(Op::put(keys::netdel(&p.network_id), p.id.clone()))
                .then(Op::put(keys::netpeers(&p.network_id), "recount"));
            for a in &p.addresses {
                if let Ok(net) = a.parse::<IpNetwork>() {
                    txn = txn.then(Op::delete(keys::ipam(&p.network_id, &net.ip())));
                }
            }
            if let Ok(h) = <[u8; 32]>::try_from(p.credential_hash.as_slice()) {
                txn = txn.then(Op::put(
                    keys::credential(&h),
                    removed_credential(&p.network_id, &p.id),
                ));
            }
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(peer = %p.id, network = %p.network_id, "peer removed");
                return Ok(Some(()));
            }
            Ok(None)
        })
        .await
    }

    fn peer_view(&self, p: &PeerRecord) -> Peer {
        let acked = self.sessions.get(&p.id);
        Peer {
            id: p.id.clone(),
            network_id: p.network_id.clone(),
            public_key: p.public_key.clone(),
            addresses: p.addresses.clone(),
            hostname: p.hostname.clone(),
            tags: p.tags.clone(),
            endpoints: p.endpoints.clone(),
            created_at_unix: p.created_at_unix,
            online: acked.is_some(),
            acked_revision: acked.unwrap_or(0),
        }
    }

    // ----- agents -----

    /// Enrolls a node: checks the join token, claims one address per network CIDR, counts the
    /// token use and creates the peer, all in one transaction (retried on conflict).
    pub async fn enroll(
        &self,
        token: &str,
        public_key: &[u8],
        hostname: &str,
        listen_port: u32,
        proposed_credential: &str,
    ) -> Result<EnrollResponse> {
        let key = model::validate_public_key(public_key)?;
        model::validate_hostname(hostname)?;
        if listen_port > u32::from(u16::MAX) {
            return Err(Error::InvalidArgument(format!(
                "listen port {listen_port} is out of range"
            )));
        }
        if !token.starts_with(secret::JOIN_TOKEN) {
            return Err(Error::Unauthenticated(
                "that is not a join token (join tokens start with 'cjt_')".into(),
            ));
        }
        let token_hash = &Secret::from_string(token.to_string()).hash();
        let credential = &if proposed_credential.is_empty() {
            Secret::generate(secret::CREDENTIAL)
        } else if secret::well_formed(proposed_credential, secret::CREDENTIAL) {
            Secret::from_string(proposed_credential.to_string())
        } else {
            return Err(Error::InvalidArgument(
                "credential must be 'cpc_' and 43 base64url characters".into(),
            ));
        };
        crate::txn::retry("enroll", |attempt| async move {
            let idx = self
                .store
                .get(keys::tokenhash(token_hash).as_bytes())
                .await?
                .ok_or_else(|| Error::Unauthenticated("join token is not valid".into()))?;
            let index = decode::<IndexRecord>(&idx)?.id;
            let (tenant, token_id) = index
                .split_once('/')
                .ok_or_else(|| Error::Internal("malformed join token index".into()))?;
            let tok_key = keys::token(tenant, token_id);
            let tok_kv = self
                .store
                .get(tok_key.as_bytes())
                .await?
                .ok_or_else(|| Error::Unauthenticated("join token is not valid".into()))?;
            let (tok, tok_rev): (JoinTokenRecord, Revision) =
                (decode(&tok_kv)?, tok_kv.mod_revision);
            let net_key = keys::network(&tok.tenant_id, &tok.network_id);
            let net_kv =
                self.store.get(net_key.as_bytes()).await?.ok_or_else(|| {
                    Error::NotFound("the token's network has been deleted".into())
                })?;
            let net: NetworkRecord = decode(&net_kv)?;
            let pubkey_key = keys::pubkey(&net.id, &key);
            if let Some(kv) = self.store.get(pubkey_key.as_bytes()).await? {
                // The same key and credential again: an enrollment whose answer was lost.
                // Give it back (nothing is written, no token use is spent).
                let peer_id = decode::<IndexRecord>(&kv)?.id;
                if !proposed_credential.is_empty()
                    && let Some(p) = self.store.get(keys::peer(&net.id, &peer_id).as_bytes()).await?
                    && decode::<PeerRecord>(&p)?.credential_hash == credential.hash()
                {
                    tracing::info!(peer = %peer_id, network = %net.id, "enrollment retried; answering it again");
                    let map = self.map_from_store(&net, &peer_id).await?;
                    return Ok(Some(EnrollResponse {
                        peer_id,
                        network_id: net.id,
                        credential: credential.expose().to_string(),
                        map: Some(map),
                    }));
                }
                return Err(Error::AlreadyExists(format!(
                    "this public key is already a peer of network {}",
                    canopy_proto::text::quoted(&net.name)
                )));
            }
            check_token_usable(&tok, now_unix())?;
            // A credential the agent proposed must be new (a removed peer's, too).
            let cred_key = keys::credential(&credential.hash());
            if self.store.get(cred_key.as_bytes()).await?.is_some() {
                return Err(Error::AlreadyExists(
                    "this credential is already in use; make a new one".into(),
                ));
            }
            let used: HashSet<IpAddr> = self
                .store
                .range(keys::ipams(&net.id).as_bytes())
                .await?
                .kvs
                .iter()
                .filter_map(|kv| kv.key.rsplit(|b| *b == b'/').next())
                .filter_map(|k| std::str::from_utf8(k).ok()?.parse().ok())
                .collect();
            let mut addresses = Vec::new();
            // The plan's peer quota, counted under a per-network version key the enrollment is
            // conditioned on (only when the plan has a quota: no extra contention otherwise),
            // and the tenant as it is now (suspension, plan change, deletion).
            let tenant = self.tenant_guard(&tok.tenant_id).await?;
            let plan = tenant.plan;
            let mut txn = Txn::new()
                .when(tenant.compare)
                .when(Compare::unchanged(tok_key.clone(), tok_rev))
                .when(Compare::unchanged(net_key.clone(), net_kv.mod_revision))
                .when(Compare::absent(pubkey_key.clone()));
            let limit = plan.quotas().peers_per_network;
            if limit != u32::MAX {
                // netpeers/<net> holds the peer count an enrollment left; a removal writes
                // "recount" there, and then (or for a key from before counts) the peers are
                // counted once. Either way the write is conditioned on the key's revision.
                let ver_key = keys::netpeers(&net.id);
                let ver = self.store.get(ver_key.as_bytes()).await?;
                let ver_rev = ver.as_ref().map_or(0, |kv| kv.mod_revision);
                let counted = ver
                    .as_ref()
                    .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok());
                let count = match counted {
                    Some(n) => n,
                    None => self
                        .store
                        .range(keys::peers(&net.id).as_bytes())
                        .await?
                        .kvs
                        .len() as u64,
                };
                if count >= u64::from(limit) {
                    return Err(Error::ResourceExhausted(format!(
                        "the {} plan allows {limit} peers per network",
                        plan.name()
                    )));
                }
                txn = txn
                    .when(Compare::unchanged(ver_key.clone(), ver_rev))
                    .then(Op::put(ver_key, (count + 1).to_string()));
            }
            let peer_id = secret::new_id("peer_");
            for cidr in net.cidrs.iter().filter_map(|c| model::parse_cidr(c).ok()) {
                // The lowest free address: a lost race re-reads and takes the next one (a failed
                // transaction costs no fsync). Only under heavy contention spread over a few.
                let want = if attempt < 8 { 1 } else { 16 };
                let free = ipam::free_hosts(&cidr, &used, want);
                let ip = *free.choose(&mut rand::rng()).ok_or_else(|| {
                    Error::ResourceExhausted(format!(
                        "network {} has no free address left in {cidr}",
                        canopy_proto::text::quoted(&net.name)
                    ))
                })?;
                let k = keys::ipam(&net.id, &ip);
                txn = txn.when(Compare::absent(k.clone())).then(Op::put(
                    k,
                    IndexRecord {
                        id: peer_id.clone(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
                addresses.push(model::host_prefix(ip));
            }
            let mut tok2 = tok.clone();
            tok2.uses += 1;
            let peer = PeerRecord {
                id: peer_id.clone(),
                tenant_id: tok.tenant_id.clone(),
                network_id: net.id.clone(),
                public_key: key.to_vec(),
                addresses,
                hostname: hostname.to_string(),
                tags: tok.tags.clone(),
                endpoints: Vec::new(),
                created_at_unix: now_unix(),
                credential_hash: credential.hash().to_vec(),
                join_token_id: tok.id.clone(),
            };
            txn = txn
                .then(Op::put(tok_key, tok2.encode_to_vec()))
                .then(Op::put(keys::peer(&net.id, &peer_id), peer.encode_to_vec()))
                .then(Op::put(
                    pubkey_key,
                    IndexRecord {
                        id: peer_id.clone(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ))
                .when(Compare::absent(cred_key.clone()))
                .then(Op::put(
                    cred_key,
                    IndexRecord {
                        id: format!("{}/{}", net.id, peer_id),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
            let r = self.store.txn(txn).await?;
            if !r.succeeded {
                return Ok(None);
            }
            tracing::info!(peer = %peer_id, network = %net.id, addresses = ?peer.addresses, "peer enrolled");
            self.audit(
                &tok.tenant_id,
                &tok.id,
                "peer.enroll",
                &peer_id,
                &format!("{} {}", hostname, peer.addresses.join(",")),
            )
            .await;
            // The map as of the enrollment's revision, read from the store (the cache may lag).
            let map = self.map_from_store(&net, &peer_id).await?;
            Ok(Some(EnrollResponse {
                peer_id,
                network_id: net.id,
                credential: credential.expose().to_string(),
                map: Some(map),
            }))
        })
        .await
    }

    async fn map_from_store(
        &self,
        net: &NetworkRecord,
        peer_id: &str,
    ) -> Result<canopy_proto::v1::NetworkMap> {
        let r = self.store.range(keys::peers(&net.id).as_bytes()).await?;
        let mut state = crate::netmap::NetState::new(net.clone(), r.revision);
        for kv in &r.kvs {
            state.put_peer(decode(kv)?, kv.mod_revision);
        }
        state
            .full_map(peer_id, r.revision)
            .ok_or_else(|| Error::NotFound("peer was removed".into()))
    }

    /// Checks an agent's Sync credential. A credential whose peer was removed answers
    /// [`Error::PeerRemoved`]: possession of the credential is what entitles the caller to
    /// learn it, and it costs the same one read as any other check.
    pub async fn authenticate_agent(&self, bearer: &str) -> Result<AgentIdentity> {
        let invalid = || Error::Unauthenticated("peer credential is not valid".into());
        // Cheap checks first: a flood of garbage costs no store read.
        if !bearer.starts_with(secret::CREDENTIAL) || bearer.len() > 128 {
            return Err(invalid());
        }
        let hash = Secret::from_string(bearer.to_string()).hash();
        let kv = self
            .store
            .get(keys::credential(&hash).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        let idx = decode::<IndexRecord>(&kv)?;
        let (network_id, peer_id) = idx.id.split_once('/').ok_or_else(invalid)?;
        if idx.removed_at_unix != 0 {
            return Err(Error::PeerRemoved {
                network_id: network_id.to_string(),
                peer_id: peer_id.to_string(),
            });
        }
        let peer = self
            .store
            .get(keys::peer(network_id, peer_id).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        if decode::<PeerRecord>(&peer)?.credential_hash != hash {
            return Err(invalid());
        }
        Ok(AgentIdentity {
            network_id: network_id.to_string(),
            peer_id: peer_id.to_string(),
            credential_hash: hash,
        })
    }

    /// Records the endpoints an agent reports, if they changed.
    pub async fn report_endpoints(&self, id: &AgentIdentity, endpoints: &[String]) -> Result<()> {
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_ENDPOINTS} endpoints"
            )));
        }
        for e in endpoints {
            model::parse_endpoint(e)?;
        }
        let key = &keys::peer(&id.network_id, &id.peer_id);
        crate::txn::retry("record endpoints", |_| async move {
            let Some(kv) = self.store.get(key.as_bytes()).await? else {
                return Err(Error::NotFound("peer was removed".into()));
            };
            let mut p: PeerRecord = decode(&kv)?;
            if p.endpoints == endpoints {
                return Ok(Some(()));
            }
            p.endpoints = endpoints.to_vec();
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), kv.mod_revision))
                        .then(Op::put(key.clone(), p.encode_to_vec())),
                )
                .await?;
            Ok(r.succeeded.then_some(()))
        })
        .await
    }

    /// Whether the store says this agent's peer was removed (its credential entry is marked).
    /// Only this, never a lagging cache or a missing record, tells an agent it was removed.
    pub async fn was_removed(&self, id: &AgentIdentity) -> Result<bool> {
        Ok(
            match self
                .store
                .get(keys::credential(&id.credential_hash).as_bytes())
                .await?
            {
                Some(kv) => decode::<IndexRecord>(&kv)?.removed_at_unix != 0,
                None => false,
            },
        )
    }

    /// The store revision of the peer's record, if it exists.
    pub async fn peer_revision(&self, id: &AgentIdentity) -> Result<Option<Revision>> {
        Ok(self
            .store
            .get(keys::peer(&id.network_id, &id.peer_id).as_bytes())
            .await?
            .map(|kv| kv.mod_revision))
    }

    /// Admits a new Sync session of one peer: a peer (or a stolen credential) reconnecting in
    /// a loop is paced on its own, without spending other agents' admission budget.
    pub fn admit_peer_session(&self, peer: &str) -> Result<(), std::time::Duration> {
        let mut g = self.peer_starts.lock().unwrap_or_else(|e| e.into_inner());
        g.admit(peer, std::time::Instant::now())
    }

    /// The next update for an agent at `base`, or `None` if the cache has no such peer.
    pub fn update_for(&self, id: &AgentIdentity, base: Revision) -> Option<Update> {
        self.cache.update_for(&id.network_id, &id.peer_id, base)
    }
}

pub(crate) fn check_token_usable(t: &JoinTokenRecord, now: i64) -> Result<()> {
    if t.revoked {
        return Err(Error::PermissionDenied("join token was revoked".into()));
    }
    if t.expires_at_unix != 0 && now >= t.expires_at_unix {
        return Err(Error::PermissionDenied("join token has expired".into()));
    }
    if t.max_uses != 0 && t.uses >= t.max_uses {
        return Err(Error::PermissionDenied(format!(
            "join token has been used up ({} of {} uses)",
            t.uses, t.max_uses
        )));
    }
    Ok(())
}

fn network_view(n: &NetworkRecord, revision: Revision) -> Network {
    Network {
        id: n.id.clone(),
        name: n.name.clone(),
        cidrs: n.cidrs.clone(),
        created_at_unix: n.created_at_unix,
        revision,
    }
}

fn token_view(t: &JoinTokenRecord) -> JoinToken {
    JoinToken {
        id: t.id.clone(),
        network_id: t.network_id.clone(),
        max_uses: t.max_uses,
        uses: t.uses,
        expires_at_unix: t.expires_at_unix,
        revoked: t.revoked,
        tags: t.tags.clone(),
        created_at_unix: t.created_at_unix,
    }
}

fn ip_sort_key(addrs: &[String]) -> Vec<IpAddr> {
    addrs
        .iter()
        .filter_map(|a| a.parse::<IpNetwork>().ok().map(|n| n.ip()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(max_uses: u32, uses: u32, expires: i64, revoked: bool) -> JoinTokenRecord {
        JoinTokenRecord {
            max_uses,
            uses,
            expires_at_unix: expires,
            revoked,
            ..Default::default()
        }
    }

    #[test]
    fn token_usability_rules() {
        assert!(check_token_usable(&token(0, 1000, 0, false), 10).is_ok());
        assert!(check_token_usable(&token(1, 0, 11, false), 10).is_ok());
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(
            msg(check_token_usable(&token(1, 1, 0, false), 10)),
            "join token has been used up (1 of 1 uses)"
        );
        assert_eq!(
            msg(check_token_usable(&token(0, 0, 10, false), 10)),
            "join token has expired"
        );
        assert_eq!(
            msg(check_token_usable(&token(0, 0, 0, true), 10)),
            "join token was revoked"
        );
    }
}
