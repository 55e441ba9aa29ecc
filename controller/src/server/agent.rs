//! `AgentService`: enrollment by join token, and the Sync stream by peer credential.
//!
//! A Sync session sends the agent a full map (or a delta from the revision it says it holds),
//! then a delta each time its network changes; it records the revisions the agent acknowledges
//! and the endpoints it reports. When the peer is removed, the stream ends with PermissionDenied.

use std::pin::Pin;
use std::time::Duration;

use canopy_proto::v1::agent_service_server::AgentService;
use canopy_proto::v1::{
    EnrollRequest, EnrollResponse, SyncRequest, SyncResponse, sync_request, sync_response,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
        let resp = self
            .ctl
            .enroll(&r.join_token, &r.public_key, &r.hostname, r.listen_port)
            .await?;
        Ok(Response::new(resp))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<SyncStream>, Status> {
        // Shed a reconnect storm before doing any work for it.
        if let Err(wait) = self.ctl.admit_session() {
            let mut s = Status::unavailable("controller is pacing reconnects; retry later");
            if let Ok(v) = wait.as_millis().to_string().parse() {
                s.metadata_mut().insert("retry-after-ms", v);
            }
            return Err(s);
        }
        let credential = super::bearer(&req)?;
        let id = self.ctl.authenticate_agent(&credential).await?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let ctl = self.ctl.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("sync", network = %id.network_id, peer = %id.peer_id);
            let _enter = span.enter();
            drop(_enter);
            if let Err(status) = session(&ctl, &id, inbound, &tx).await {
                tracing::debug!(network = %id.network_id, peer = %id.peer_id, status = %status.message(), "sync ended");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Tx = mpsc::Sender<Result<SyncResponse, Status>>;

fn removed() -> Status {
    Status::permission_denied("this peer was removed from the network")
}

async fn session(
    ctl: &Controller,
    id: &AgentIdentity,
    mut inbound: Streaming<SyncRequest>,
    tx: &Tx,
) -> Result<(), Status> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        Ok(Err(s)) => return Err(s),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(SyncRequest {
            msg: Some(sync_request::Msg::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            return Err(Status::invalid_argument(
                "the first Sync message must be Hello",
            ));
        }
    };
    if !hello.endpoints.is_empty() {
        ctl.report_endpoints(id, &hello.endpoints).await?;
    }
    let mut changes = ctl.cache.subscribe(&id.network_id);
    // An agent may hold a revision the cache has not reached yet (it enrolled through the store).
    if hello.known_revision > ctl.cache.applied() {
        ctl.cache
            .wait_for(hello.known_revision, Duration::from_secs(2))
            .await;
    }
    let session = ctl.sessions.open(&id.peer_id);
    let _close = CloseOnDrop(ctl, id, session);
    tracing::info!(network = %id.network_id, peer = %id.peer_id, known = hello.known_revision, "agent connected");
    let mut sent = hello.known_revision;
    let mut first = true;
    loop {
        changes.borrow_and_update();
        let msg = match ctl.update_for(id, sent) {
            None => return Err(removed()),
            Some(Update::Full(map)) => {
                sent = map.revision;
                Some(sync_response::Msg::Full(map))
            }
            // Empty deltas are not sent (except to confirm a resume), and `sent` stays where the
            // agent is, so the next delta's base always matches the agent's map.
            Some(Update::Delta(d)) if first || !d.upserted.is_empty() || !d.removed.is_empty() => {
                sent = d.revision;
                Some(sync_response::Msg::Delta(d))
            }
            Some(Update::Delta(_)) => None,
        };
        first = false;
        if let Some(m) = msg
            && tx.send(Ok(SyncResponse { msg: Some(m) })).await.is_err()
        {
            return Ok(());
        }
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() { return Err(removed()); }
                    break;
                }
                m = inbound.message() => match m {
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Ack(a)) })) => ctl.sessions.ack(&id.peer_id, a.revision),
                    Ok(Some(SyncRequest { msg: Some(sync_request::Msg::Endpoints(e)) })) => ctl.report_endpoints(id, &e.endpoints).await?,
                    Ok(Some(_)) => return Err(Status::invalid_argument("unexpected Sync message")),
                    Ok(None) | Err(_) => return Ok(()),
                },
                _ = tx.closed() => return Ok(()),
                _ = ctl.closing() => return Err(Status::unavailable("controller is shutting down")),
            }
        }
    }
}

struct CloseOnDrop<'a>(&'a Controller, &'a AgentIdentity, u64);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.sessions.close(&self.1.peer_id, self.2);
        tracing::info!(network = %self.1.network_id, peer = %self.1.peer_id, "agent disconnected");
    }
}
