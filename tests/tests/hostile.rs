//! Hostile and careless agents against a real controller over real gRPC: floods of garbage
//! credentials, one credential opening many streams, acks from the future, a replica whose
//! cache lags or whose store is not the right one, and enrollments whose answer was lost.
//! None of it may cost another agent anything, and no refusal but the typed "this peer was
//! removed" may make an agent forget its enrollment.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use canopy_agent::control::{self, ControlClient, NoDataPlane};
use canopy_agent::keys::PrivateKey;
use canopy_agent::state::StateDir;
use canopy_controller::server::{self, ServeConfig, SharedStore, StoreSpec};
use canopy_controller::store::embedded::EmbeddedStore;
use canopy_controller::store::{
    RangeResult, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};
use canopy_proto::join::JoinString;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::agent_service_client::AgentServiceClient;
use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn agent_client(url: &str, pin: [u8; 32]) -> AgentServiceClient<tonic::transport::Channel> {
    AgentServiceClient::new(transport::connect(url, &Trust::Pin(pin)).await.unwrap())
}

fn hello(known: i64) -> SyncRequest {
    SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello {
            known_revision: known,
            endpoints: vec![],
            ..Default::default()
        })),
    }
}

/// A Sync call with `credential`; the returned sender feeds its request stream.
async fn open_sync(
    client: &mut AgentServiceClient<tonic::transport::Channel>,
    credential: &str,
) -> (
    mpsc::Sender<SyncRequest>,
    Result<tonic::Streaming<SyncResponse>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello(0)).await.unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    let r = client.sync(req).await.map(tonic::Response::into_inner);
    (tx, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_credentials_spends_none_of_the_reconnect_budget() {
    // Five new sessions a second: before the fix, the garbage below used them all up.
    let c = TestController::start_paced(5).await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let url = c.server.url.clone();
    let pin = c.server.ca_sha256;
    let mut flood = Vec::new();
    for w in 0..4 {
        let url = url.clone();
        flood.push(tokio::spawn(async move {
            let mut cl = agent_client(&url, pin).await;
            let mut unauthenticated = 0;
            for i in 0..50 {
                let junk = if i % 2 == 0 {
                    format!("cpc_{w}{i}garbage")
                } else {
                    control::new_credential()
                };
                let (_tx, r) = open_sync(&mut cl, &junk).await;
                match r {
                    Err(s) if s.code() == Code::Unauthenticated => unauthenticated += 1,
                    other => panic!("garbage credential: {:?}", other.map(|_| ())),
                }
            }
            unauthenticated
        }));
    }
    let mut refused = 0;
    for f in flood {
        refused += f.await.unwrap();
    }
    assert_eq!(
        refused, 200,
        "every garbage Sync is refused as unauthenticated"
    );
    // Real agents right after the flood: admitted at once, never told to come back later.
    let mut agents = Vec::new();
    for i in 0..4 {
        agents.push(TestAgent::join(&join, &format!("real{i}")).await.unwrap());
    }
    for a in &mut agents {
        assert!(
            a.wait_map(Duration::from_secs(5), |m| m.peers.len() == 3)
                .await
        );
    }
    let paced: u64 = agents
        .iter()
        .map(|a| a.client.stats.paced.load(Ordering::Relaxed))
        .sum();
    assert_eq!(paced, 0, "real agents were paced after a garbage flood");
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_credential_holds_one_live_session_and_its_reconnect_loop_is_paced() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = JoinString::parse(&c.token("n", 0).await).unwrap();
    let (e, _) = control::enroll(&join, PrivateKey::generate().public_key(), "dup")
        .await
        .unwrap();
    let mut cl = agent_client(&c.server.url, c.server.ca_sha256).await;
    let mut streams = Vec::new();
    let mut paced = 0;
    for _ in 0..12 {
        let (tx, r) = open_sync(&mut cl, &e.credential).await;
        match r {
            Ok(s) => streams.push((tx, s)),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                assert!(s.metadata().get("retry-after-ms").is_some());
                paced += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        paced >= 5,
        "a peer opening 12 streams at once is paced ({paced} refused)"
    );
    // Only the newest stream is live: each earlier one was told it was replaced.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.server.controller.sessions.len(), 1);
    let last = streams.len() - 1;
    for (i, (_tx, s)) in streams.iter_mut().enumerate() {
        // Every stream got its full map first.
        let first = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .unwrap();
        assert!(matches!(first, Ok(Some(_))), "stream {i}: {first:?}");
        if i < last {
            let end = tokio::time::timeout(Duration::from_secs(5), s.message())
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(end.code(), Code::Aborted, "stream {i}: {}", end.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_a_revision_never_sent_ends_the_session_and_is_not_recorded() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = JoinString::parse(&c.token("n", 0).await).unwrap();
    let (e, _) = control::enroll(&join, PrivateKey::generate().public_key(), "liar")
        .await
        .unwrap();
    let mut cl = agent_client(&c.server.url, c.server.ca_sha256).await;
    let (tx, r) = open_sync(&mut cl, &e.credential).await;
    let mut s = r.unwrap();
    let rev = match s.message().await.unwrap().unwrap().msg {
        Some(sync_response::Msg::Full(m)) => m.revision,
        other => panic!("{other:?}"),
    };
    tx.send(SyncRequest {
        msg: Some(sync_request::Msg::Ack(Ack {
            revision: rev,
            lock_refused: 0,
        })),
    })
    .await
    .unwrap();
    tx.send(SyncRequest {
        msg: Some(sync_request::Msg::Ack(Ack {
            revision: 9_000_000_000_000,
            lock_refused: u32::MAX,
        })),
    })
    .await
    .unwrap();
    let end = s.message().await.unwrap_err();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("9000000000000"), "{}", end.message());
    let peers = c.peers("n").await;
    assert!(peers.iter().all(|p| p.acked_revision <= rev), "{peers:?}");
}

/// The real embedded store, except that while `held` is set its watches deliver nothing (the
/// changes wait, in order): a replica whose cache lags the store.
struct HeldWatch {
    inner: EmbeddedStore,
    held: Arc<AtomicBool>,
}

impl Store for HeldWatch {
    fn get<'a>(
        &'a self,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<canopy_controller::store::KeyValue>, StoreError>> {
        self.inner.get(key)
    }
    fn range<'a>(&'a self, prefix: &'a [u8]) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        self.inner.range(prefix)
    }
    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
        self.inner.txn(txn)
    }
    fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.compact(revision)
    }
    fn watch<'a>(
        &'a self,
        prefix: &'a [u8],
        start: Revision,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>> {
        async move {
            let mut inner = self.inner.watch(prefix, start).await?;
            let (tx, rx) = mpsc::channel(1024);
            let held = self.held.clone();
            tokio::spawn(async move {
                while let Some(batch) = inner.recv().await {
                    while held.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_cache_lags_never_tells_a_new_agent_it_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let held = Arc::new(AtomicBool::new(false));
    let store = HeldWatch {
        inner: EmbeddedStore::open(&dir.path().join("store.redb")).unwrap(),
        held: held.clone(),
    };
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Shared(SharedStore(Arc::new(store)))),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    let mut con = canopy_controller::console::connect(
        &r.url,
        &Trust::CaPem(r.ca_pem.clone().into_bytes()),
        &r.admin_token,
    )
    .await
    .unwrap();
    con.create_network(CreateNetworkRequest {
        name: "n".into(),
        cidrs: vec!["100.64.0.0/24".into()],
    })
    .await
    .unwrap();
    let join = con
        .create_join_token(CreateJoinTokenRequest {
            network: "n".into(),
            max_uses: 0,
            ttl_seconds: 600,
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .join_string;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The cache stops following the store; agents enroll (through the store) and sync.
    held.store(true, Ordering::SeqCst);
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(TestAgent::join(&join, &format!("early{i}")).await.unwrap());
    }
    // Longer than a session waits for the cache: the agents are sent away and come back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for a in &agents {
        assert!(
            !a.task.is_finished(),
            "an agent stopped while the cache lagged: {:?}",
            a.client.enrollment()
        );
    }
    held.store(false, Ordering::SeqCst);
    for a in &mut agents {
        assert!(
            a.wait_map(Duration::from_secs(10), |m| m.peers.len() == 2)
                .await,
            "agent did not converge after the cache caught up"
        );
    }
    let paced: u64 = agents
        .iter()
        .map(|a| a.client.stats.paced.load(Ordering::Relaxed))
        .sum();
    assert!(
        paced > 0,
        "the lagging replica sent the agents away to retry"
    );
    for a in agents {
        a.stop().await;
    }
    r.stop().await.unwrap();
}

/// A misconfigured replica: the same CA as `c` (so the pin holds) but an empty store of its
/// own, in `dir`.
async fn same_ca_empty_store(c: &TestController, dir: &std::path::Path) -> server::Running {
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(c.dir.path().join(f), dir.join(f)).unwrap();
    }
    let cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    let wrong = server::spawn(&cfg).await.unwrap();
    assert_eq!(wrong.ca_sha256, c.server.ca_sha256);
    wrong
}

/// The credential an enrollment with `join` will use: the same on a retry with the same join
/// string, another for another join string.
fn pending_credential_kept_per_join_string(state: &StateDir, join: &str) -> String {
    let pending = |j: &str| {
        state
            .pending_credential(j, control::new_credential)
            .unwrap()
    };
    let credential = pending(join);
    assert_eq!(
        pending(join),
        credential,
        "a retry with the same join string keeps it"
    );
    assert_ne!(
        pending("canopy1:another"),
        credential,
        "another join string gets a new one"
    );
    pending(join)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_the_credential_does_not_wipe_the_agent_only_a_removal_does() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = JoinString::parse(&c.token("n", 0).await).unwrap();
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = same_ca_empty_store(&c, wrong_dir.path()).await;

    let state_dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(state_dir.path()).unwrap();
    let key = state.private_key().unwrap();
    let credential = pending_credential_kept_per_join_string(&state, &join.encode());
    let (e, map) = control::enroll_with(&join, key.public_key(), "victim", &credential)
        .await
        .unwrap();
    state.complete_enrollment(&e, &map).unwrap();
    let mut client = ControlClient::new(e.clone(), Some(map), Some(state.clone()));
    client.controllers = vec![wrong.url.clone()];
    client.backoff = control::Backoff::equal(Duration::from_millis(20), Duration::from_millis(100));
    let client = Arc::new(client);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cl = client.clone();
    let task = tokio::spawn(async move {
        cl.run(&mut NoDataPlane, async move {
            let _ = stopped.await;
        })
        .await
    });
    // Refused again and again (not once): it keeps trying and keeps its state.
    let t = std::time::Instant::now();
    while client.stats.failures.load(Ordering::Relaxed) < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent stopped trying"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !task.is_finished(),
        "the agent gave up on an Unauthenticated"
    );
    assert!(state.enrollment().unwrap().is_some(), "enrollment kept");
    assert!(state.map().unwrap().is_some(), "map kept");
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // Removed for real, on the right controller: now the agent forgets its enrollment.
    let mut client = ControlClient::new(e.clone(), state.map().unwrap(), Some(state.clone()));
    client.backoff.min = Duration::from_millis(20);
    let mut con = c.console().await;
    con.remove_peer(RemovePeerRequest {
        peer_id: e.peer_id.clone(),
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        client.run(&mut NoDataPlane, std::future::pending()),
    )
    .await
    .expect("a removed peer is told so at once");
    assert!(matches!(r, Err(control::ControlError::Removed)), "{r:?}");
    assert!(
        state.enrollment().unwrap().is_none(),
        "enrollment forgotten"
    );
    wrong.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_whose_answer_was_lost_is_given_back_on_retry() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = JoinString::parse(&c.token("n", 1).await).unwrap();
    let key = PrivateKey::generate();
    let credential = control::new_credential();
    let (first, m1) = control::enroll_with(&join, key.public_key(), "h", &credential)
        .await
        .unwrap();
    // The same key and credential again (the answer above "was lost"): the same peer, although
    // the single-use token is spent now.
    let (again, m2) = control::enroll_with(&join, key.public_key(), "h", &credential)
        .await
        .unwrap();
    assert_eq!(first.peer_id, again.peer_id);
    assert_eq!(m1.addresses, m2.addresses);
    // Anyone else with the same public key but not the credential gets nothing.
    let err = control::enroll_with(&join, key.public_key(), "h", &control::new_credential())
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("already a peer"), "{err}");
    let peers = c.peers("n").await;
    assert_eq!(peers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_tls_are_closed_and_cannot_starve_real_calls() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig {
        listener: server::listener::ListenerLimits {
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 64,
        },
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    // 300 connections that say nothing: the first 64 wait for their deadline, the rest are
    // closed at once.
    let mut stuck = Vec::new();
    for _ in 0..300 {
        stuck.push(tokio::net::TcpStream::connect(r.local_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A real call gets through while they are open (once the deadline frees the permits).
    let call = async {
        loop {
            let ok = async {
                let mut con = canopy_controller::console::connect(
                    &r.url,
                    &Trust::CaPem(r.ca_pem.clone().into_bytes()),
                    &r.admin_token,
                )
                .await
                .ok()?;
                con.list_networks(ListNetworksRequest {}).await.ok()
            }
            .await;
            if ok.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("a real console call got through");
    // Every silent connection has been closed by the server by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut closed = 0;
    for s in &mut stuck {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    assert_eq!(
        closed,
        300,
        "silent connections still open: {}",
        300 - closed
    );
    r.stop().await.unwrap();
}
