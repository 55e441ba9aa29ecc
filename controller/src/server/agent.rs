//! `AgentService`: enrollment by join token, and the Sync stream by peer credential.
//!
//! A Sync session sends the agent a full map (or a delta from the revision it says it holds),
//! then a delta each time its network changes; it records the revisions the agent acknowledges
//! and the endpoints it reports. When the store says the peer was removed (its credential entry
//! is marked removed), the stream ends with the typed PermissionDenied of
//! [`canopy_proto::removal`]; a cache that has not caught up yet is never taken for a removal.

use std::pin::Pin;
use std::time::Duration;

use canopy_proto::v1::agent_service_server::AgentService;
use canopy_proto::v1::{
    EnrollRequest, EnrollResponse, Hello, SyncRequest, SyncResponse, sync_request, sync_response,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::netmap::Update;
use crate::service::{AgentIdentity, Controller};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentApi {
    ctl: Controller,
}

impl AgentApi {
    pub fn new(ctl: Controller) -> Self {
        Self { ctl }
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let r = req.into_inner();
        let resp = self.ctl.enroll_request(&r).await?;
        self.ctl.metrics.enrollments.inc();
        Ok(Response::new(resp))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<SyncStream>, Status> {
        // Authenticate first, cheaply (format check, then one indexed read): unauthenticated
        // calls never spend the admission budget that real agents reconnect with.
        let credential = super::bearer(&req)?;
        let id = self.ctl.authenticate_agent(&credential).await?;
        // Pace one peer's reconnect loop on its own, then the replica's admission.
        if let Err(wait) = self.ctl.admit_peer_session(&id.peer_id) {
            self.ctl.metrics.sessions_paced.inc();
            return Err(paced("this peer is reconnecting too often", wait));
        }
        if let Err(wait) = self.ctl.admit_session() {
            self.ctl.metrics.sessions_paced.inc();
            return Err(paced("controller is pacing reconnects", wait));
        }
        let inbound = req.into_inner();
        // A slow reader holds at most this many updates here (and HTTP/2's window).
        let (tx, rx) = mpsc::channel(2);
        let ctl = self.ctl.clone();
        // Everything the session logs carries its network and peer.
        let span = tracing::info_span!("sync", network = %id.network_id, peer = %id.peer_id);
        tokio::spawn(
            async move {
                if let Err(status) = session(&ctl, &id, inbound, &tx).await {
                    tracing::debug!(status = %status.message(), "sync ended");
                    // Best effort: a client that reads nothing does not keep this task alive.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), tx.send(Err(status))).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Tx = mpsc::Sender<Result<SyncResponse, Status>>;

/// How long a session waits for a lagging cache to catch up with the store before it tells
/// the agent to come back.
const CACHE_CATCH_UP: Duration = Duration::from_secs(5);

/// Unavailable with a jittered `retry-after-ms` that agents honour.
fn paced(what: &str, wait: Duration) -> Status {
    let mut s = Status::unavailable(format!("{what}; retry later"));
    if let Ok(v) = wait.as_millis().to_string().parse() {
        s.metadata_mut().insert("retry-after-ms", v);
    }
    s
}

/// The cache has no such peer: decide from the store whether it is gone (its credential entry
/// is marked removed) or not there yet (the cache lags: wait for it, bounded, or send the agent away to come
/// back). Never "removed" because a cache lags.
async fn not_in_cache(ctl: &Controller, id: &AgentIdentity) -> Result<(), Status> {
    if let Some(rev) = ctl.peer_revision(id).await? {
        if ctl.cache.wait_for(rev, CACHE_CATCH_UP).await {
            return Ok(());
        }
        tracing::warn!(peer = %id.peer_id, revision = rev, applied = ctl.cache.applied(), "cache lags the store; sending the agent away");
        return Err(paced(
            "this replica has not caught up with the store yet",
            Duration::from_millis(500 + rand::random_range(0..1000)),
        ));
    }
    if ctl.was_removed(id).await? {
        return Err(canopy_proto::removal::status(&id.network_id, &id.peer_id));
    }
    Err(paced(
        "this peer is not known to this replica",
        Duration::from_secs(2),
    ))
}

/// What a Hello says besides the revision: endpoints, advertised routes, the exit node.
async fn take_hello(ctl: &Controller, id: &AgentIdentity, hello: &Hello) -> Result<(), Status> {
    if !hello.endpoints.is_empty() || !hello.outside.is_empty() {
        ctl.report_endpoints(id, &hello.endpoints, &hello.outside)
            .await?;
    }
    // What its agent routes to: read and written only when it differs from what it said last.
    let mut advertised: Vec<String> = hello
        .advertised_routes
        .iter()
        .map(|p| {
            p.parse::<ipnetwork::IpNetwork>()
                .map_or(p.clone(), |n| n.to_string())
        })
        .collect();
    advertised.sort();
    advertised.dedup();
    if advertised != ctl.cache.agent_prefixes(&id.network_id, &id.peer_id) {
        ctl.take_advertised(id, &advertised).await?;
    }
    if !hello.exit_node.is_empty() {
        ctl.take_exit_node(id, &hello.exit_node).await;
    }
    if let Some(signed) = &hello.self_lock {
        let delegation = hello.self_delegation.as_ref();
        if let Err(e) = ctl.take_self_lock(id, signed, delegation).await {
            tracing::warn!(peer = %id.peer_id, error = %e, "a presigned membership was not taken");
        }
    }
    Ok(())
}

async fn session(
    ctl: &Controller,
    id: &AgentIdentity,
    mut inbound: Streaming<SyncRequest>,
    tx: &Tx,
) -> Result<(), Status> {
    let Some(hello) = read_hello(&mut inbound).await? else {
        return Ok(());
    };
    take_hello(ctl, id, &hello).await?;
    let changes = ctl.cache.subscribe(&id.network_id);
    // An agent may hold a revision the cache has not reached yet (it enrolled through the store).
    if hello.known_revision > ctl.cache.applied() {
        ctl.cache
            .wait_for(hello.known_revision, Duration::from_secs(2))
            .await;
    }
    let opened = ctl
        .sessions
        .open(&id.network_id, &id.peer_id, ctl.now_unix());
    let number = opened.number;
    let _close = CloseOnDrop(ctl, id, number);
    let understands = |c: &str| hello.capabilities.iter().any(|h| h == c);
    tracing::info!(known = hello.known_revision, "agent connected");
    let renew = crate::service::gateways::LIVE_RENEW;
    let mut live = Live {
        ctl,
        id,
        number,
        replaced: opened.replaced,
        punches: understands("punch").then_some(opened.punches),
        punch_asks: crate::pacing::TokenBucket::new(2, 10),
        path_writes: crate::pacing::TokenBucket::with_rate(0.1, 3),
        paths: Default::default(),
        paths_dirty: false,
        changes,
        sent: hello.known_revision,
        acked: 0,
        quiet_through: 0,
        gateway: None,
        renew: tokio::time::interval_at(tokio::time::Instant::now() + renew, renew),
        ticket_due: tokio::time::Instant::now(),
        tickets: understands("relay"),
    };
    let mut first = true;
    loop {
        if let Some(m) = live.next_update(first).await? {
            // A reader that does not read blocks this send: it must not block being replaced
            // or the server's shutdown.
            tokio::select! {
                r = tx.send(Ok(SyncResponse { msg: Some(m) })) => if r.is_err() { return Ok(()) },
                _ = live.replaced.notified() => return Err(replaced_status()),
                _ = ctl.closing() => return Err(Status::unavailable("controller is shutting down")),
            }
        }
        first = false;
        if !live.wait(&mut inbound, tx).await? {
            return Ok(());
        }
    }
}

/// The first message of a stream, which must be a Hello, within [`HELLO_TIMEOUT`]; `None`:
/// the stream ended first.
async fn read_hello(inbound: &mut Streaming<SyncRequest>) -> Result<Option<Hello>, Status> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        Ok(Err(s)) => return Err(super::client_fault(s)),
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(SyncRequest {
            msg: Some(sync_request::Msg::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            return Err(Status::invalid_argument(
                "the first Sync message must be Hello",
            ));
        }
    };
    if hello.known_revision < 0 {
        return Err(Status::invalid_argument("known_revision is negative"));
    }
    Ok(Some(hello))
}

/// A live session: what it has sent, and what tells it to move.
struct Live<'a> {
    ctl: &'a Controller,
    id: &'a AgentIdentity,
    number: u64,
    replaced: std::sync::Arc<tokio::sync::Notify>,
    /// Hole punches for this agent, if it understands them.
    punches: Option<tokio::sync::mpsc::Receiver<canopy_proto::v1::Punch>>,
    /// Punch requests this agent may make (2 a second, 10 at once; more are ignored).
    punch_asks: crate::pacing::TokenBucket,
    /// Path reports this agent may have written (one per 10 s, 3 at once).
    path_writes: crate::pacing::TokenBucket,
    /// How it reaches its peers, merged from its reports; `paths_dirty`: not written yet.
    paths: std::collections::BTreeMap<String, canopy_proto::v1::PairPath>,
    paths_dirty: bool,
    changes: tokio::sync::watch::Receiver<crate::store::Revision>,
    /// The agent's map is at `sent` once it applies what was sent; it may not ack beyond it.
    sent: crate::store::Revision,
    /// The last revision the agent acknowledged.
    acked: crate::store::Revision,
    /// The newest revision whose delta had nothing for this agent (not sent).
    quiet_through: crate::store::Revision,
    /// As a gateway: the holder id of the live record this session keeps.
    gateway: Option<String>,
    renew: tokio::time::Interval,
    /// When to send the next relay ticket (well before the last one expires).
    ticket_due: tokio::time::Instant,
    /// Whether the agent understands relay tickets.
    tickets: bool,
}

/// How often a session sends a fresh relay ticket.
const TICKET_EVERY: Duration = Duration::from_secs(5 * 60);

impl Live<'_> {
    /// A path report: merged at once (what `peer list` flags comes from it), written to the
    /// store at most once per 10 s (the rest at the next renewal tick).
    async fn take_paths(&mut self, report: canopy_proto::v1::Paths) -> Result<(), Status> {
        use crate::service::health;
        health::check(&report)?;
        health::merge(&mut self.paths, report, self.ctl.now_unix())?;
        let summary = health::summarize(self.paths.values());
        (self.ctl.sessions).set_health(&self.id.peer_id, self.number, summary);
        self.paths_dirty = true;
        self.write_paths().await
    }

    async fn write_paths(&mut self) -> Result<(), Status> {
        if !self.paths_dirty || self.path_writes.admit(self.ctl.clock.instant()).is_err() {
            return Ok(());
        }
        self.paths_dirty = false;
        let pairs = crate::service::health::aged(&self.paths, self.ctl.now_unix());
        self.ctl.report_paths(self.id, pairs).await?;
        self.ctl.metrics.path_reports.inc();
        Ok(())
    }

    /// A gateway's agent that has applied everything sent to it is live: record it (once, then
    /// renew it every tick). Best effort: a store error is logged and retried at the next tick.
    async fn keep_live(&mut self, caught_up: bool) {
        let gateway = self
            .ctl
            .cache
            .is_gateway(&self.id.network_id, &self.id.peer_id);
        if !gateway || (self.gateway.is_none() && !caught_up) {
            return;
        }
        let holder = self
            .gateway
            .get_or_insert_with(|| crate::secret::new_id("sess_"))
            .clone();
        if let Err(e) = self.ctl.gateway_live(self.id, &holder).await {
            tracing::warn!(error = %e, "could not record this gateway as live");
        }
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        if let Some(holder) = self.gateway.take() {
            self.ctl.gateway_gone(self.id, holder);
        }
    }
}

impl Live<'_> {
    /// What to send next (`None`: nothing new). Empty deltas are not sent (except the first,
    /// to confirm a resume), and `sent` stays where the agent is, so the next delta's base
    /// always matches the agent's map.
    async fn next_update(&mut self, first: bool) -> Result<Option<sync_response::Msg>, Status> {
        let mut catch_ups = 0;
        loop {
            self.changes.borrow_and_update();
            return Ok(match self.ctl.update_for(self.id, self.sent) {
                None => {
                    catch_ups += 1;
                    if catch_ups > 3 {
                        return Err(paced(
                            "this replica has not caught up with the store yet",
                            Duration::from_secs(1),
                        ));
                    }
                    not_in_cache(self.ctl, self.id).await?;
                    self.changes = self.ctl.cache.subscribe(&self.id.network_id);
                    continue;
                }
                Some(Update::Full(map)) => {
                    self.sent = map.revision;
                    Some(sync_response::Msg::Full(*map))
                }
                Some(Update::Delta(d))
                    if first
                        || !d.upserted.is_empty()
                        || !d.removed.is_empty()
                        || d.policy_changed =>
                {
                    self.sent = d.revision;
                    Some(sync_response::Msg::Delta(d))
                }
                Some(Update::Delta(d)) => {
                    // Nothing in it for this agent: once it holds what was sent, it is current
                    // through this revision too.
                    self.quiet_through = d.revision;
                    if self.acked == self.sent {
                        let (peer, n) = (&self.id.peer_id, self.number);
                        self.ctl.sessions.ack(peer, n, d.revision, None);
                    }
                    None
                }
            });
        }
    }

    /// Takes the agent's acks and endpoint reports until its network changes (`true`) or the
    /// session should end quietly (`false`).
    async fn wait(
        &mut self,
        inbound: &mut Streaming<SyncRequest>,
        tx: &Tx,
    ) -> Result<bool, Status> {
        let (ctl, id) = (self.ctl, self.id);
        loop {
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // The network is gone from the cache: the store decides what that means.
                        not_in_cache(ctl, id).await?;
                        self.changes = ctl.cache.subscribe(&id.network_id);
                    }
                    return Ok(true);
                }
                m = inbound.message() => match m {
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Ack(a)) })) => {
                        if a.revision > self.sent || a.revision < 0 {
                            return Err(Status::invalid_argument(format!(
                                "Ack for revision {} but this session sent revision {}",
                                a.revision, self.sent
                            )));
                        }
                        self.acked = a.revision;
                        // Current through the changes that had nothing for it, too.
                        let through = match a.revision == self.sent {
                            true => a.revision.max(self.quiet_through),
                            false => a.revision,
                        };
                        let refused = Some(a.lock_refused);
                        ctl.sessions.ack(&id.peer_id, self.number, through, refused);
                        if self.gateway.is_none() && a.revision == self.sent {
                            self.keep_live(true).await;
                        }
                    }
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Endpoints(e)) })) => ctl.report_endpoints(id, &e.endpoints, &e.outside).await?,
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Paths(p)) })) => self.take_paths(p).await?,
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Punch(p)) })) => {
                        if self.punch_asks.admit(ctl.clock.instant()).is_ok() {
                            ctl.request_punch(id, &p.peer_id).await?;
                        }
                    }
                    Ok(Some(_)) => return Err(Status::invalid_argument("unexpected Sync message")),
                    Ok(None) => return Ok(false),
                    Err(s) => return Err(super::client_fault(s)),
                },
                _ = self.renew.tick() => {
                    self.keep_live(false).await;
                    self.write_paths().await?;
                }
                Some(p) = recv_punch(&mut self.punches) => {
                    // A reader that does not read misses it; the agent asks again later.
                    let _ = tx.try_send(Ok(SyncResponse { msg: Some(sync_response::Msg::Punch(p)) }));
                }
                _ = tokio::time::sleep_until(self.ticket_due), if self.tickets => {
                    self.ticket_due = tokio::time::Instant::now() + TICKET_EVERY;
                    if let Some(t) = ctl.relay_ticket(id) {
                        // A reader that does not read misses this one; the next comes later.
                        let _ = tx.try_send(Ok(SyncResponse { msg: Some(sync_response::Msg::Relay(t)) }));
                    }
                }
                _ = self.replaced.notified() => return Err(replaced_status()),
                _ = tx.closed() => return Ok(false),
                _ = ctl.closing() => return Err(Status::unavailable("controller is shutting down")),
            }
        }
    }
}

/// The next punch for a session that takes them; never, for one that does not.
async fn recv_punch(
    punches: &mut Option<tokio::sync::mpsc::Receiver<canopy_proto::v1::Punch>>,
) -> Option<canopy_proto::v1::Punch> {
    match punches {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn replaced_status() -> Status {
    Status::aborted("a newer Sync session of this peer replaced this one")
}

struct CloseOnDrop<'a>(&'a Controller, &'a AgentIdentity, u64);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.sessions.close(&self.1.peer_id, self.2);
        tracing::info!(network = %self.1.network_id, peer = %self.1.peer_id, "agent disconnected");
    }
}
