//! The agent's controller session: enroll with a join token, then follow the Sync stream.
//!
//! [`ControlClient::run`] connects, says Hello with the revision it holds, applies each full map
//! or delta through a [`MapSink`] (the data plane), persists it, and acknowledges the revision.
//! When the controller is away it keeps the last map and retries with jittered exponential
//! backoff; it resumes from its revision, so a reconnect usually costs one small delta.
//! Everything here is a library, so a benchmark can run many agents in one process.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use canopy_proto::join::JoinString;
use canopy_proto::netmap::apply_delta;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::agent_service_client::AgentServiceClient;
use canopy_proto::v1::{
    Ack, Endpoints, EnrollRequest, Hello, NetworkDelta, NetworkMap, PunchRequest, SyncRequest,
    sync_request, sync_response,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::state::{Enrollment, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("controller refused: {}", .0.message())]
    Refused(tonic::Status),
    #[error(
        "this node was removed from its network by the controller; join again with a new token"
    )]
    Removed,
    #[error("controller is pacing reconnects; retrying in {0:?}")]
    Paced(Duration),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("controller sent an unusable update: {0}")]
    Protocol(String),
    /// This host could not apply a good map (a route, an address): not the controller's fault.
    #[error("applying the network map on this host: {0}")]
    Apply(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where applied maps go: the data plane (or nothing, for a control-only agent).
/// Why a [`MapSink`] could not apply a map: whatever its layer's error is.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

pub trait MapSink: Send {
    /// Makes `map` take effect. With `delta`, only the peers it names changed since the
    /// previously applied map; without, `map` is a full map to reconcile against.
    fn apply(&mut self, map: &NetworkMap, delta: Option<&NetworkDelta>) -> Result<(), SinkError>;
}

/// A sink that applies nothing (control plane only).
#[derive(Debug, Default)]
pub struct NoDataPlane;

impl MapSink for NoDataPlane {
    fn apply(&mut self, _: &NetworkMap, _: Option<&NetworkDelta>) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Enrolls this node with the controller named in the join string, pinning its CA, with a
/// fresh Sync credential.
pub async fn enroll(
    join: &JoinString,
    public_key: [u8; 32],
    hostname: &str,
) -> Result<(Enrollment, NetworkMap), ControlError> {
    enroll_with(join, public_key, hostname, &new_credential()).await
}

/// A new Sync credential: `cpc_` and 32 random bytes, base64url.
pub fn new_credential() -> String {
    use base64::Engine as _;
    let b: [u8; 32] = rand::random();
    format!(
        "cpc_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

/// Enrolls with `credential`, which the caller kept first: asking again with the same key and
/// credential after a lost answer gets the same enrollment back.
pub async fn enroll_with(
    join: &JoinString,
    public_key: [u8; 32],
    hostname: &str,
    credential: &str,
) -> Result<(Enrollment, NetworkMap), ControlError> {
    let channel = transport::connect(&join.controller_url, &Trust::Pin(join.ca_sha256)).await?;
    let mut client =
        AgentServiceClient::new(channel).max_decoding_message_size(canopy_proto::MAX_ANSWER_BYTES);
    let resp = client
        .enroll(EnrollRequest {
            join_token: join.token.clone(),
            public_key: public_key.to_vec(),
            hostname: hostname.to_string(),
            listen_port: 0,
            credential: credential.to_string(),
        })
        .await
        .map_err(ControlError::Refused)?
        .into_inner();
    let map = resp
        .map
        .ok_or_else(|| ControlError::Protocol("enrollment carried no map".into()))?;
    if let Some(pin) = &join.lock_sha256 {
        // The controller must show the key set the join string pins (or one after it).
        let chain = map.lock.clone().unwrap_or_default();
        canopy_proto::lock::Trust::pinned(&resp.network_id, &chain, pin).map_err(|e| {
            ControlError::Protocol(format!(
                "the network's lock does not match the join string ({e}): refusing this controller's map"
            ))
        })?;
    }
    let presigned = crate::lock::presign(join, &resp.network_id, &resp.peer_id, public_key, &map)
        .map_err(ControlError::Protocol)?;
    Ok((
        Enrollment {
            controller_url: join.controller_url.clone(),
            ca_sha256: hex::encode(join.ca_sha256),
            peer_id: resp.peer_id,
            network_id: resp.network_id,
            credential: resp.credential,
            lock_sha256: join.lock_sha256.map(hex::encode),
            lock_self: presigned.as_ref().map(|(s, _)| s.clone()),
            lock_delegation: presigned.map(|(_, d)| d),
        },
        map,
    ))
}

/// Reconnect pacing: [`canopy_proto::backoff`], equal jitter, 250 ms doubling to 30 s.
pub use canopy_proto::backoff::Backoff;

/// Whether a delta changes what the node does (peers, or its policy part), beyond the revision.
fn changes_anything(d: &NetworkDelta) -> bool {
    !(d.upserted.is_empty() && d.removed.is_empty()) || d.policy_changed
}

/// What a client has received, for status output and benchmarks.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub full_maps: AtomicU64,
    pub deltas: AtomicU64,
    pub connects: AtomicU64,
    /// Protobuf bytes of the maps and deltas received.
    pub bytes: AtomicU64,
    /// Times the controller asked this client to come back later.
    pub paced: AtomicU64,
    /// Sessions that failed (refused, unreachable, a map this host could not apply); each is
    /// retried after a backoff.
    pub failures: AtomicU64,
}

pub struct ControlClient {
    enrollment: Enrollment,
    /// Controller replicas to use, in order; a failure moves on to the next. Defaults to the
    /// URL from the join string.
    pub controllers: Vec<String>,
    /// Underlay endpoints (`ip:port`) reported to the controller: in Hello, and again on the
    /// open session whenever they change (a new listen port, a new address, a NAT's mapping).
    pub endpoints: watch::Receiver<Reported>,
    /// Prefixes this node offers to route (told in every Hello).
    pub advertised_routes: Vec<String>,
    /// The exit node this node asks for (hostname, peer id or "none"; empty: the
    /// controller's choice), told in every Hello.
    pub exit_node: String,
    pub stats: SyncStats,
    state: Option<StateDir>,
    map: watch::Sender<Option<NetworkMap>>,
    connected: watch::Sender<bool>,
    /// The latest relay ticket the controller gave.
    relay: watch::Sender<Option<canopy_proto::v1::RelayTicket>>,
    /// Hole punches the controller asks for.
    punches: broadcast::Sender<canopy_proto::v1::Punch>,
    /// Peer ids this node asks the controller to punch a hole to.
    asks: broadcast::Sender<String>,
    /// How this node reaches its peers, reported when it changes.
    paths: std::sync::Arc<watch::Sender<Vec<canopy_proto::v1::PairPath>>>,
    pub backoff: Backoff,
    /// The network lock: what every map passes before it is applied.
    lock: std::sync::Mutex<crate::lock::Guard>,
}

/// What this node says about where it can be reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Its own addresses with the listen port.
    pub local: Vec<String>,
    /// Where it is seen from outside its NAT (none without a NAT).
    pub outside: Vec<String>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("enrollment", &self.enrollment)
            .finish()
    }
}

/// How one connected session ended.
enum SessionEnd {
    /// The stream dropped after working: reconnect promptly.
    Lost(String),
    Shutdown,
}

impl ControlClient {
    /// `state`: where to persist maps (`None` keeps them in memory only, as a benchmark does).
    pub fn new(
        enrollment: Enrollment,
        mut initial: Option<NetworkMap>,
        state: Option<StateDir>,
    ) -> Self {
        let pin = enrollment.lock_sha256.as_deref().and_then(|h| {
            let b = hex::decode(h).ok()?;
            <[u8; 32]>::try_from(b.as_slice()).ok()
        });
        let mut lock = crate::lock::Guard::new(&enrollment.network_id, pin, state.clone());
        if let Some(m) = &mut initial {
            lock.full(m, crate::report::unix_now());
        }
        Self {
            lock: std::sync::Mutex::new(lock),
            controllers: vec![enrollment.controller_url.clone()],
            enrollment,
            endpoints: watch::channel(Reported::default()).1,
            advertised_routes: Vec::new(),
            exit_node: String::new(),
            stats: SyncStats::default(),
            state,
            map: watch::channel(initial).0,
            connected: watch::channel(false).0,
            relay: watch::channel(None).0,
            punches: broadcast::channel(16).0,
            asks: broadcast::channel(64).0,
            paths: std::sync::Arc::new(watch::channel(Vec::new()).0),
            backoff: Backoff::default(),
        }
    }

    /// The network lock's gauges (metrics).
    pub fn lock_stats(&self) -> std::sync::Arc<crate::lock::LockStats> {
        self.guard().stats.clone()
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, crate::lock::Guard> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The acknowledgement of `revision`, with what the lock refused of it.
    fn ack(&self, revision: i64) -> SyncRequest {
        let lock_refused = self.guard().refused();
        let ack = Ack {
            revision,
            lock_refused,
        };
        SyncRequest {
            msg: Some(sync_request::Msg::Ack(ack)),
        }
    }

    /// Relay tickets as they come from the controller.
    pub fn relay_tickets(&self) -> watch::Receiver<Option<canopy_proto::v1::RelayTicket>> {
        self.relay.subscribe()
    }

    /// Hole punches as the controller asks for them.
    pub fn punches(&self) -> broadcast::Receiver<canopy_proto::v1::Punch> {
        self.punches.subscribe()
    }

    /// Where to send the ids of peers to ask the controller to punch a hole to (dropped while
    /// no session is up).
    pub fn punch_asks(&self) -> broadcast::Sender<String> {
        self.asks.clone()
    }

    /// Where to report how this node reaches its peers (sent on the open session when it
    /// changes, and at the start of each one).
    pub fn path_reports(&self) -> std::sync::Arc<watch::Sender<Vec<canopy_proto::v1::PairPath>>> {
        self.paths.clone()
    }

    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }

    /// The current applied map, updated after each revision is applied.
    pub fn maps(&self) -> watch::Receiver<Option<NetworkMap>> {
        self.map.subscribe()
    }

    /// Whether a Sync stream is up.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Follows the controller until `shutdown` resolves. Returns `Err(Removed)` if the controller
    /// says this peer no longer exists (its state is then cleared); other failures are retried.
    pub async fn run(
        &self,
        sink: &mut dyn MapSink,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ControlError> {
        tokio::pin!(shutdown);
        let pin = self.enrollment.ca_pin()?;
        let trust = Trust::Pin(pin);
        let mut failures = 0u32;
        let mut next = 0usize;
        loop {
            let url = self
                .controllers
                .get(next % self.controllers.len().max(1))
                .cloned()
                .unwrap_or_else(|| self.enrollment.controller_url.clone());
            let attempt = async {
                let channel = transport::connect(&url, &trust).await?;
                self.session(channel, sink).await
            };
            let outcome = tokio::select! {
                r = attempt => r,
                _ = &mut shutdown => Ok(SessionEnd::Shutdown),
            };
            self.connected.send_replace(false);
            match outcome {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Lost(why)) => {
                    tracing::warn!(%url, reason = %why, "controller stream lost; reconnecting");
                    failures = 0;
                    next += 1;
                }
                Err(ControlError::Removed) => {
                    if let Some(s) = &self.state {
                        s.clear_enrollment()?;
                    }
                    self.map.send_replace(None);
                    return Err(ControlError::Removed);
                }
                Err(ControlError::State(e)) => return Err(ControlError::State(e)),
                Err(ControlError::Paced(wait)) => {
                    // The controller said when: wait that long (it is jittered), same replica.
                    self.stats.paced.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%url, ?wait, "controller is pacing reconnects");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut shutdown => return Ok(()),
                    }
                    continue;
                }
                Err(e @ ControlError::Apply(_)) => {
                    // The map is fine; this host is not (a route it refuses): try again later
                    // with the next map, the interface keeps what it had.
                    tracing::warn!(error = %e, attempt = failures + 1, "could not apply the network map; retrying");
                    failures = failures.saturating_add(1);
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, attempt = failures + 1, "controller session failed; keeping the last map");
                    failures = failures.saturating_add(1);
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    next += 1;
                }
            }
            let delay = self.backoff.delay(failures);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    /// What a session opens with: the revision held, the endpoints (marked seen), the
    /// routes offered and the exit node asked for.
    fn hello(&self, endpoints: &mut watch::Receiver<Reported>) -> SyncRequest {
        let reported = endpoints.borrow_and_update().clone();
        SyncRequest {
            msg: Some(sync_request::Msg::Hello(Hello {
                known_revision: self.map.borrow().as_ref().map_or(0, |m| m.revision),
                endpoints: reported.local,
                outside: reported.outside,
                advertised_routes: self.advertised_routes.clone(),
                exit_node: self.exit_node.clone(),
                capabilities: vec!["relay".into(), "punch".into()],
                self_lock: crate::lock::decode_signed(self.enrollment.lock_self.as_deref()),
                self_delegation: crate::lock::decode_signed(
                    self.enrollment.lock_delegation.as_deref(),
                ),
            })),
        }
    }

    /// Opens a Sync stream that starts with Hello: where to send, and what comes back.
    async fn open(
        &self,
        channel: tonic::transport::Channel,
        endpoints: &mut watch::Receiver<Reported>,
    ) -> Result<(Outbound, tonic::Streaming<canopy_proto::v1::SyncResponse>), ControlError> {
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(canopy_proto::MAX_ANSWER_BYTES);
        let (tx, rx) = mpsc::channel(8);
        tx.send(self.hello(endpoints))
            .await
            .map_err(|_| ControlError::Protocol("outbound closed".into()))?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let auth = format!("Bearer {}", self.enrollment.credential)
            .parse()
            .map_err(|_| ControlError::Protocol("credential is not valid metadata".into()))?;
        req.metadata_mut().insert("authorization", auth);
        // Who we say we are, so a removed peer can be told so after its credential is gone.
        if let Ok(v) = format!("{}/{}", self.enrollment.network_id, self.enrollment.peer_id).parse()
        {
            req.metadata_mut().insert("canopy-peer", v);
        }
        let me = &self.enrollment;
        let inbound = client
            .sync(req)
            .await
            .map_err(|s| classify(s, me))?
            .into_inner();
        Ok((tx, inbound))
    }

    async fn session(
        &self,
        channel: tonic::transport::Channel,
        sink: &mut dyn MapSink,
    ) -> Result<SessionEnd, ControlError> {
        let mut endpoints = self.endpoints.clone();
        let (tx, mut inbound) = self.open(channel, &mut endpoints).await?;
        let me = &self.enrollment;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        // Whether anyone can still change the endpoints (a fixed list has no sender).
        let mut endpoints_live = true;
        let mut asks = self.asks.subscribe();
        let mut paths = self.paths.subscribe();
        paths.mark_changed();
        // What this session's controller holds of the paths (the first report is full).
        let mut held = None;
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                Ok(()) = paths.changed() => {
                    let pairs = paths.borrow_and_update().clone();
                    let Some((report, now_held)) = crate::report::paths_delta(held.as_ref(), &pairs, crate::report::unix_now()) else {
                        continue;
                    };
                    if !push(&tx, sync_request::Msg::Paths(report)).await {
                        return Ok(closed());
                    }
                    held = Some(now_held);
                    continue;
                }
                Ok(peer_id) = asks.recv() => {
                    if !push(&tx, sync_request::Msg::Punch(PunchRequest { peer_id })).await {
                        return Ok(closed());
                    }
                    continue;
                }
                changed = endpoints.changed(), if endpoints_live => {
                    if changed.is_err() {
                        endpoints_live = false;
                        continue;
                    }
                    let now = endpoints.borrow_and_update().clone();
                    tracing::info!(endpoints = ?now.local, outside = ?now.outside, "reporting new endpoints");
                    let report = sync_request::Msg::Endpoints(Endpoints {
                        endpoints: now.local,
                        outside: now.outside,
                    });
                    if !push(&tx, report).await {
                        return Ok(closed());
                    }
                    continue;
                }
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(SessionEnd::Lost("controller closed the stream".into())),
                Err(s) => {
                    return match classify(s, me) {
                        ControlError::Refused(s) => Ok(SessionEnd::Lost(s.message().to_string())),
                        other => Err(other),
                    };
                }
            };
            self.stats
                .bytes
                .fetch_add(prost::Message::encoded_len(&msg) as u64, Ordering::Relaxed);
            let Some(update) = self.take_side(msg.msg) else {
                continue;
            };
            let revision = self.apply(update, sink)?;
            self.connected.send_replace(true);
            if tx.send(self.ack(revision)).await.is_err() {
                return Ok(SessionEnd::Lost("outbound stream closed".into()));
            }
        }
    }

    /// Keeps what is no map change (a relay ticket, a hole punch: not acknowledged); returns
    /// the rest (`None`: taken).
    fn take_side(&self, m: Option<sync_response::Msg>) -> Option<Option<sync_response::Msg>> {
        match m {
            Some(sync_response::Msg::Relay(t)) => {
                self.relay.send_replace(Some(t));
                None
            }
            Some(sync_response::Msg::Punch(p)) => {
                let _ = self.punches.send(p);
                None
            }
            other => Some(other),
        }
    }

    /// Applies one update; returns the revision now held. A delta is applied to the held map
    /// in place (no copy of the whole map per change).
    fn apply(
        &self,
        msg: Option<sync_response::Msg>,
        sink: &mut dyn MapSink,
    ) -> Result<i64, ControlError> {
        let delta = match msg {
            Some(sync_response::Msg::Full(mut m)) => {
                self.stats.full_maps.fetch_add(1, Ordering::Relaxed);
                canopy_proto::netmap::canonicalize(&mut m);
                self.guard().full(&mut m, crate::report::unix_now());
                sink.apply(&m, None).map_err(ControlError::Apply)?;
                if let Some(s) = &self.state {
                    s.save_map(&m)?;
                }
                tracing::info!(
                    revision = m.revision,
                    peers = m.peers.len(),
                    "network map applied"
                );
                let rev = m.revision;
                self.map.send_replace(Some(m));
                return Ok(rev);
            }
            Some(sync_response::Msg::Delta(mut d)) => {
                self.guard().delta(&mut d, crate::report::unix_now());
                d
            }
            Some(sync_response::Msg::Relay(_) | sync_response::Msg::Punch(_)) | None => {
                return Err(ControlError::Protocol("empty Sync message".into()));
            }
        };
        self.stats.deltas.fetch_add(1, Ordering::Relaxed);
        let mut result = Ok(());
        self.map.send_if_modified(|held| {
            let Some(m) = held else {
                result = Err(ControlError::Protocol("delta before any map".into()));
                return false;
            };
            if let Err(e) = apply_delta(m, &delta) {
                result = Err(ControlError::Protocol(e.to_string()));
                return false;
            }
            changes_anything(&delta)
        });
        result?;
        if !changes_anything(&delta) {
            return Ok(delta.revision);
        }
        let map = self.map.borrow();
        let Some(m) = map.as_ref() else {
            return Err(ControlError::Protocol("map vanished".into()));
        };
        sink.apply(m, Some(&delta)).map_err(ControlError::Apply)?;
        if let Some(s) = &self.state {
            s.save_map(m)?;
        }
        tracing::info!(
            revision = m.revision,
            added_or_changed = delta.upserted.len(),
            removed = delta.removed.len(),
            "network delta applied"
        );
        Ok(m.revision)
    }
}

type Outbound = mpsc::Sender<SyncRequest>;

/// Sends `m` on the stream (a path report saying nothing is not sent); `false`: the stream is
/// closed.
async fn push(tx: &Outbound, m: sync_request::Msg) -> bool {
    if matches!(&m, sync_request::Msg::Paths(p) if p.pairs.is_empty() && p.removed.is_empty()) {
        return true;
    }
    tx.send(SyncRequest { msg: Some(m) }).await.is_ok()
}

fn closed() -> SessionEnd {
    SessionEnd::Lost("outbound stream closed".into())
}

/// Only the controller's typed "this peer was removed" answer, naming this very peer, is
/// `Removed` (the agent then forgets its enrollment). Every other refusal, PermissionDenied and
/// Unauthenticated included (a misrouted or misconfigured replica), is retried with backoff
/// and the last map kept.
fn classify(s: tonic::Status, me: &Enrollment) -> ControlError {
    if s.code() == Code::Unavailable
        && let Some(ms) = s
            .metadata()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        return ControlError::Paced(Duration::from_millis(ms.min(60_000)));
    }
    match canopy_proto::removal::of(&s) {
        Some(r) if r.peer_id == me.peer_id && r.network_id == me.network_id => {
            ControlError::Removed
        }
        _ => ControlError::Refused(s),
    }
}
