//! Test harness: a real controller on `127.0.0.1:0` (embedded store, TLS) and agents running
//! the real control client in this process, all over real gRPC on loopback.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod controller;
pub mod etcd;
pub mod hosted;
pub mod lock;
pub mod nat;
pub mod netns;
pub mod overlay;
pub mod sites;
pub mod wg;

/// The access policy the policy tests start from: web may open tcp/5432 on db, nothing else
/// (rule 1 starts on line 3).
pub const WEB_DB_POLICY: &str = r#"tags = ["web", "db"]

[[rule]]
name = "web reaches the database"
from = ["tag:web"]
to = ["tag:db"]
proto = "tcp"
ports = ["5432"]
"#;

use std::sync::Arc;
use std::time::Duration;

use canopy_agent::control::{self, ControlClient, ControlError, NoDataPlane};
use canopy_agent::keys::PrivateKey;
use canopy_controller::clock::Clock;
use canopy_controller::console::{self, Client};
use canopy_controller::server::{self, Running, ServeConfig};
use canopy_proto::join::JoinString;
use canopy_proto::transport::Trust;
use canopy_proto::v1::*;
use tokio::sync::{oneshot, watch};

pub struct TestController {
    pub dir: tempfile::TempDir,
    pub server: Running,
    rate: u32,
    /// The controller's clock: the system's, or manual ([`TestController::with_manual_clock`]).
    pub clock: Clock,
}

fn config(dir: &std::path::Path, port: u16) -> ServeConfig {
    config_with_rate(
        dir,
        port,
        canopy_controller::service::DEFAULT_SESSION_STARTS,
    )
}

fn config_with_rate(dir: &std::path::Path, port: u16, rate: u32) -> ServeConfig {
    ServeConfig {
        session_starts_per_sec: rate,
        // Tests compare store revisions: no lease renewals in the middle of them.
        background: canopy_controller::leader::BackgroundConfig {
            lease: std::time::Duration::from_secs(7200),
            tick: std::time::Duration::from_secs(3600),
            ..Default::default()
        },
        ..ServeConfig::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            dir.to_path_buf(),
        )
    }
}

impl TestController {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = server::spawn(&config(dir.path(), 0)).await.unwrap();
        Self {
            dir,
            server,
            rate: canopy_controller::service::DEFAULT_SESSION_STARTS,
            clock: Clock::system(),
        }
    }

    /// A controller whose time moves only with `clock.advance`: expiry without sleeping.
    pub async fn with_manual_clock() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual();
        let server = server::spawn(&ServeConfig {
            clock: clock.clone(),
            ..config(dir.path(), 0)
        })
        .await
        .unwrap();
        Self {
            dir,
            server,
            rate: canopy_controller::service::DEFAULT_SESSION_STARTS,
            clock,
        }
    }

    /// A controller that admits only `rate` new agent sessions per second.
    pub async fn start_paced(rate: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = server::spawn(&config_with_rate(dir.path(), 0, rate))
            .await
            .unwrap();
        Self {
            dir,
            server,
            rate,
            clock: Clock::system(),
        }
    }

    /// Stops the controller and starts it again on the same data dir and port.
    pub async fn restart(self) -> Self {
        let port = self.server.local_addr.port();
        let rate = self.rate;
        self.server.stop().await.unwrap();
        let server = server::spawn(&ServeConfig {
            clock: self.clock.clone(),
            ..config_with_rate(self.dir.path(), port, rate)
        })
        .await
        .unwrap();
        Self {
            dir: self.dir,
            server,
            rate,
            clock: self.clock,
        }
    }

    /// A console client with the admin token.
    pub async fn console(&self) -> Client {
        self.console_with(&self.server.admin_token).await
    }

    pub async fn console_with(&self, token: &str) -> Client {
        let trust = Trust::CaPem(self.server.ca_pem.clone().into_bytes());
        console::connect(&self.server.url, &trust, token)
            .await
            .unwrap()
    }

    /// The store's current revision: unchanged means nothing was written.
    pub async fn store_revision(&self) -> i64 {
        self.server
            .controller
            .store
            .range(b"/")
            .await
            .unwrap()
            .revision
    }

    /// The peers of network `network`, as the console lists them.
    pub async fn peers(&self, network: &str) -> Vec<Peer> {
        let req = ListPeersRequest {
            network: network.into(),
            paths: false,
        };
        let list = self.console().await.list_peers(req).await.unwrap();
        list.into_inner().peers
    }

    /// Creates a network and returns its id.
    pub async fn network(&self, name: &str, cidrs: &[&str]) -> String {
        let req = CreateNetworkRequest {
            name: name.into(),
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        };
        self.console()
            .await
            .create_network(req)
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// Creates a join token and returns the join string.
    pub async fn token(&self, network: &str, max_uses: u32) -> String {
        let req = CreateJoinTokenRequest {
            network: network.into(),
            max_uses,
            ttl_seconds: 3600,
            tags: vec![],
        };
        self.console()
            .await
            .create_join_token(req)
            .await
            .unwrap()
            .into_inner()
            .join_string
    }

    /// A peer enrolled in `network` (key [5; 32], hostname "h") and a raw agent client, for
    /// tests that speak the Sync protocol by hand.
    pub async fn raw_agent(
        &self,
        network: &str,
    ) -> (
        canopy_agent::state::Enrollment,
        agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    ) {
        let join = JoinString::parse(&self.token(network, 1).await).unwrap();
        let (enrollment, _) = control::enroll(&join, [5; 32], "h").await.unwrap();
        let ch =
            canopy_proto::transport::connect(&self.server.url, &Trust::Pin(self.server.ca_sha256))
                .await
                .unwrap();
        (
            enrollment,
            agent_service_client::AgentServiceClient::new(ch),
        )
    }
}

/// An in-process agent: enrolled, running the real control client.
pub struct TestAgent {
    pub key: PrivateKey,
    pub peer_id: String,
    pub client: Arc<ControlClient>,
    pub maps: watch::Receiver<Option<NetworkMap>>,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ControlError>>,
}

impl TestAgent {
    /// Enrolls with a fresh key and starts following the controller.
    pub async fn join(join: &str, hostname: &str) -> Result<Self, ControlError> {
        Self::join_with(join, hostname, &[]).await
    }

    /// Like [`join`](Self::join), with more controller replicas to fail over to.
    pub async fn join_with(
        join: &str,
        hostname: &str,
        more_controllers: &[String],
    ) -> Result<Self, ControlError> {
        let key = PrivateKey::generate();
        let join = JoinString::parse(join).unwrap();
        let (enrollment, map) = control::enroll(&join, key.public_key(), hostname).await?;
        let mut client = ControlClient::new(enrollment, Some(map), None);
        client.controllers.extend(more_controllers.iter().cloned());
        Ok(Self::run(key, client))
    }

    /// Like [`join`](Self::join), offering to route `routes` (`--advertise-routes`).
    pub async fn join_advertising(
        join: &str,
        hostname: &str,
        routes: &[&str],
    ) -> Result<Self, ControlError> {
        let routes: Vec<String> = routes.iter().map(ToString::to_string).collect();
        Self::join_configured(join, hostname, |c| c.advertised_routes = routes).await
    }

    /// Like [`join`](Self::join), with the client set up by `configure` first (its
    /// advertised routes, exit node, …).
    pub async fn join_configured(
        join: &str,
        hostname: &str,
        configure: impl FnOnce(&mut ControlClient),
    ) -> Result<Self, ControlError> {
        let key = PrivateKey::generate();
        let join = JoinString::parse(join).unwrap();
        let (enrollment, map) = control::enroll(&join, key.public_key(), hostname).await?;
        let mut client = ControlClient::new(enrollment, Some(map), None);
        configure(&mut client);
        Ok(Self::run(key, client))
    }

    /// Like [`join`](Self::join), as a node behind a NAT that a STUN server saw at `outside`
    /// (its own address is 10.9.0.2:51820).
    pub async fn join_behind_nat(
        join: &str,
        hostname: &str,
        outside: &str,
    ) -> Result<Self, ControlError> {
        let reported = control::Reported {
            local: vec!["10.9.0.2:51820".into()],
            outside: vec![outside.into()],
        };
        Self::join_configured(join, hostname, |c| {
            c.endpoints = watch::channel(reported).1;
        })
        .await
    }

    /// The next hole punch the controller tells this agent of, within `within`.
    pub async fn next_punch(
        rx: &mut tokio::sync::broadcast::Receiver<canopy_proto::v1::Punch>,
        within: Duration,
    ) -> Option<canopy_proto::v1::Punch> {
        tokio::time::timeout(within, rx.recv()).await.ok()?.ok()
    }

    /// The same agent (key, credential, map) again, advertising `routes` now: what a restart
    /// with other `--advertise-routes` does.
    pub async fn restart_advertising(self, routes: &[&str]) -> Self {
        let key = PrivateKey::from_base64(&self.key.to_base64()).unwrap();
        let mut client =
            ControlClient::new(self.client.enrollment().clone(), Some(self.map()), None);
        client.advertised_routes = routes.iter().map(ToString::to_string).collect();
        self.stop().await;
        Self::run(key, client)
    }

    /// Starts following the controller with `client`.
    fn run(key: PrivateKey, mut client: ControlClient) -> Self {
        let peer_id = client.enrollment().peer_id.clone();
        client.backoff =
            control::Backoff::equal(Duration::from_millis(50), Duration::from_millis(500));
        let client = Arc::new(client);
        let maps = client.maps();
        let (stop, rx) = oneshot::channel::<()>();
        let c = client.clone();
        let task = tokio::spawn(async move {
            c.run(&mut NoDataPlane, async move {
                let _ = rx.await;
            })
            .await
        });
        Self {
            key,
            peer_id,
            client,
            maps,
            stop: Some(stop),
            task,
        }
    }

    /// Asks for a hole punch with `peer` as the agent's planner does, once its session is up
    /// (the session takes asks only while it runs; until then a send has no receiver).
    pub async fn ask_punch(&self, peer: &str) {
        let t = std::time::Instant::now();
        while self.client.punch_asks().send(peer.to_string()).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "no session took the ask"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn map(&self) -> NetworkMap {
        self.maps.borrow().clone().unwrap_or_default()
    }

    /// Waits up to `within` for the applied map to satisfy `pred`.
    pub async fn wait_map(&mut self, within: Duration, pred: impl Fn(&NetworkMap) -> bool) -> bool {
        let r = tokio::time::timeout(
            within,
            self.maps.wait_for(|m| m.as_ref().is_some_and(&pred)),
        )
        .await;
        matches!(r, Ok(Ok(_)))
    }

    pub fn peer_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map().peers.into_iter().map(|p| p.peer_id).collect();
        v.sort();
        v
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}
