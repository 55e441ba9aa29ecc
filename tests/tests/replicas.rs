//! Active-active controller replicas on one real etcd: every replica serves the API and agent
//! streams from its own cache fed by list + watch, so a change made through one reaches agents
//! connected to another; IPAM and single-use tokens stay race-free across replicas.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use canopy_controller::console::{self, Client};
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_proto::join::JoinString;
use canopy_proto::transport::Trust;
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::etcd::Etcd;
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

/// A replica on `etcd`. Replicas share one data dir here, as they would share the CA files.
async fn replica(data: &Path, etcd: &str) -> Running {
    server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.to_string()])),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), data.to_path_buf())
    })
    .await
    .unwrap()
}

async fn console(r: &Running) -> Client {
    console::connect(
        &r.url,
        &Trust::CaPem(r.ca_pem.clone().into_bytes()),
        &r.admin_token,
    )
    .await
    .unwrap()
}

/// An etcd and a data dir (dropped last), two replicas on them, and the first one's console
/// with network `name` on `cidr`.
async fn two_replicas_with_network(
    name: &str,
    cidr: &str,
) -> ((Etcd, tempfile::TempDir), Running, Running, Client) {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), &etcd.endpoint).await;
    let b = replica(dir.path(), &etcd.endpoint).await;
    let mut ca = console(&a).await;
    let req = CreateNetworkRequest {
        name: name.into(),
        cidrs: vec![cidr.into()],
    };
    ca.create_network(req).await.unwrap();
    ((etcd, dir), a, b, ca)
}

/// The join string with its controller URL pointed at another replica.
fn via(join: &str, r: &Running) -> String {
    let mut j = JoinString::parse(join).unwrap();
    j.controller_url = r.url.clone();
    j.encode()
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < 5 * SECOND, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn token(c: &mut Client, network: &str, max_uses: u32) -> String {
    let req = CreateJoinTokenRequest {
        network: network.into(),
        max_uses,
        ttl_seconds: 600,
        tags: vec![],
    };
    c.create_join_token(req)
        .await
        .unwrap()
        .into_inner()
        .join_string
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_agents_on_another_within_a_second() {
    let (_cluster, _a, b, mut ca) = two_replicas_with_network("ha", "100.64.0.0/24").await;
    let join = token(&mut ca, "ha", 0).await;

    // One agent follows replica B; another enrolls through replica A.
    let mut on_b = TestAgent::join(&via(&join, &b), "on-b").await.unwrap();
    let newcomer = TestAgent::join(&join, "on-a").await.unwrap();
    assert!(
        on_b.wait_map(SECOND, |m| m
            .peers
            .iter()
            .any(|p| p.peer_id == newcomer.peer_id))
            .await,
        "enrollment via A reached B's agent"
    );
    ca.remove_peer(RemovePeerRequest {
        peer_id: newcomer.peer_id.clone(),
    })
    .await
    .unwrap();
    assert!(
        on_b.wait_map(SECOND, |m| m.peers.is_empty()).await,
        "removal via A reached B's agent"
    );
    // B's console sees what A wrote.
    let nets = console(&b)
        .await
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks;
    assert_eq!(nets.len(), 1);
    on_b.stop().await;
    newcomer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_racing_through_two_replicas_stay_unique_and_single_use_tokens_stay_single() {
    let (_cluster, _a, b, mut ca) = two_replicas_with_network("race", "100.64.0.0/28").await;

    let once = token(&mut ca, "race", 1).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let j = if i % 2 == 0 {
                once.clone()
            } else {
                via(&once, &b)
            };
            tokio::spawn(async move { TestAgent::join(&j, &format!("s{i}")).await })
        })
        .collect();
    let mut ok = Vec::new();
    for t in tasks {
        if let Ok(agent) = t.await.unwrap() {
            ok.push(agent);
        }
    }
    assert_eq!(
        ok.len(),
        1,
        "a single-use token raced through two replicas yields one peer"
    );

    // 13 more addresses are free in the /28 (14 hosts); 16 nodes race for them via both replicas.
    let many = token(&mut ca, "race", 0).await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let j = if i % 2 == 0 {
                many.clone()
            } else {
                via(&many, &b)
            };
            tokio::spawn(async move { TestAgent::join(&j, &format!("m{i}")).await })
        })
        .collect();
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(agent) => ok.push(agent),
            Err(canopy_agent::control::ControlError::Refused(s))
                if s.code() == Code::ResourceExhausted =>
            {
                full += 1
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((ok.len(), full), (14, 3));
    let addrs: HashSet<String> = ok.iter().flat_map(|a| a.map().addresses).collect();
    assert_eq!(
        addrs.len(),
        14,
        "no address handed out twice across replicas"
    );
    for a in ok {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_another_replica_when_its_replica_dies() {
    let (_cluster, a, b, mut ca) = two_replicas_with_network("fo", "100.64.0.0/24").await;
    let join = token(&mut ca, "fo", 0).await;
    let mut agent = TestAgent::join_with(&join, "x", std::slice::from_ref(&b.url))
        .await
        .unwrap();
    let mut up = agent.client.connected();
    tokio::time::timeout(5 * SECOND, up.wait_for(|u| *u))
        .await
        .unwrap()
        .unwrap();
    let connects = agent.client.stats.connects.load(Relaxed);
    let map_before = agent.map();

    a.stop().await.unwrap();
    // It moves to B on its own and keeps its map throughout.
    tokio::time::timeout(10 * SECOND, async {
        loop {
            if agent.client.stats.connects.load(Relaxed) > connects && *up.borrow() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(agent.map().addresses, map_before.addresses);
        }
    })
    .await
    .expect("the agent reconnected to replica B");
    let mut cb = console(&b).await;
    let other = TestAgent::join(&via(&token(&mut cb, "fo", 1).await, &b), "y")
        .await
        .unwrap();
    assert!(
        agent
            .wait_map(SECOND, |m| m
                .peers
                .iter()
                .any(|p| p.peer_id == other.peer_id))
            .await
    );
    agent.stop().await;
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_gone_the_api_answers_unavailable_and_when_it_returns_everything_resumes() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), &etcd.endpoint).await;
    let mut ca = console(&a).await;
    ca.create_network(CreateNetworkRequest {
        name: "down".into(),
        cidrs: vec!["100.64.0.0/24".into()],
    })
    .await
    .unwrap();
    let join = token(&mut ca, "down", 0).await;
    let mut x = TestAgent::join(&join, "x").await.unwrap();
    let _y = TestAgent::join(&join, "y").await.unwrap();
    assert!(x.wait_map(SECOND, |m| m.peers.len() == 1).await);
    let before = x.map();

    etcd.kill();
    let err = ca.list_networks(ListNetworksRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("etcd"),
        "a readable reason: {}",
        err.message()
    );
    let err = ca
        .create_network(CreateNetworkRequest {
            name: "n2".into(),
            cidrs: vec!["10.1.0.0/24".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    tokio::time::sleep(SECOND).await;
    assert_eq!(
        x.map(),
        before,
        "the agent keeps its last map while the store is away"
    );

    // etcd returns: acknowledged writes are all there, new writes work, pushes resume.
    etcd.restart();
    let nets = tokio::time::timeout(10 * SECOND, async {
        loop {
            if let Ok(r) = ca.list_networks(ListNetworksRequest {}).await {
                return r.into_inner().networks;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the API works again once etcd is back");
    assert_eq!(
        nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["down"]
    );
    let tokens = ca
        .list_join_tokens(ListJoinTokensRequest {
            network: "down".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens[0].uses, 2, "acknowledged enrollments were not lost");
    let z = TestAgent::join(&join, "z").await.unwrap();
    assert!(
        x.wait_map(10 * SECOND, |m| m
            .peers
            .iter()
            .any(|p| p.peer_id == z.peer_id))
            .await,
        "pushes resume"
    );
    x.stop().await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_an_etcd_compaction_still_reach_agents() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), &etcd.endpoint).await;
    let mut ca = console(&a).await;
    ca.create_network(CreateNetworkRequest {
        name: "c".into(),
        cidrs: vec!["100.64.0.0/24".into()],
    })
    .await
    .unwrap();
    let join = token(&mut ca, "c", 0).await;
    let mut x = TestAgent::join(&join, "x").await.unwrap();
    // Compact everything up to now, then keep changing. (A watch that has fallen behind a
    // compaction and must re-list is tested in the cache's own tests, by injecting the error.)
    let store = a.controller.store.clone();
    let rev = store.range(b"/").await.unwrap().revision;
    store.compact(rev).await.unwrap();
    for i in 0..3 {
        let y = TestAgent::join(&join, &format!("y{i}")).await.unwrap();
        assert!(
            x.wait_map(5 * SECOND, |m| m
                .peers
                .iter()
                .any(|p| p.peer_id == y.peer_id))
                .await,
            "change {i} after compaction"
        );
        y.stop().await;
    }
    x.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_background_work_and_another_takes_over_when_it_stops() {
    use canopy_controller::leader::BackgroundConfig;
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let bg = BackgroundConfig {
        lease: SECOND,
        tick: Duration::from_millis(100),
        expired_token_retention: Duration::ZERO,
        ..BackgroundConfig::default()
    };
    let cfg = ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.endpoint.clone()])),
        background: bg,
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    };
    let a = server::spawn(&cfg).await.unwrap();
    let b = server::spawn(&cfg).await.unwrap();
    let leaders = || {
        [a.controller.is_leader(), b.controller.is_leader()]
            .iter()
            .filter(|l| **l)
            .count()
    };
    wait_for("a leader", || leaders() == 1).await;
    tokio::time::sleep(SECOND).await;
    assert_eq!(leaders(), 1, "exactly one leader at a time");

    // The leader's job deletes a join token that has expired (retention 0 here).
    let mut ca = console(&a).await;
    ca.create_network(CreateNetworkRequest {
        name: "bg".into(),
        cidrs: vec!["100.64.0.0/24".into()],
    })
    .await
    .unwrap();
    let req = CreateJoinTokenRequest {
        network: "bg".into(),
        max_uses: 1,
        ttl_seconds: 1,
        tags: vec![],
    };
    ca.create_join_token(req).await.unwrap();
    let t = std::time::Instant::now();
    loop {
        let n = ca
            .list_join_tokens(ListJoinTokensRequest {
                network: "bg".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .tokens
            .len();
        if n == 0 {
            break;
        }
        assert!(
            t.elapsed() < 10 * SECOND,
            "the expired token was not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stop the leader: the other takes over (at once: a graceful stop releases the lease).
    let (leader, follower) = if a.controller.is_leader() {
        (a, b)
    } else {
        (b, a)
    };
    leader.stop().await.unwrap();
    wait_for("the follower to take over", || {
        follower.controller.is_leader()
    })
    .await;
}

/// Replicas that share a data dir (compose's shared volume) and start at the same moment make
/// one CA and one admin token between them: first start is serialised by a lock in the dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_one_data_dir_make_one_ca() {
    let etcd = Etcd::start();
    for trial in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::join!(
            replica(dir.path(), &etcd.endpoint),
            replica(dir.path(), &etcd.endpoint)
        );
        assert_eq!(a.ca_sha256, b.ca_sha256, "trial {trial}: two CAs");
        assert_eq!(
            a.admin_token, b.admin_token,
            "trial {trial}: two admin tokens"
        );
        let on_disk = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        assert_eq!(on_disk, a.ca_pem);
        console::connect(&b.url, &Trust::Pin(a.ca_sha256), &a.admin_token)
            .await
            .unwrap()
            .list_networks(ListNetworksRequest {})
            .await
            .expect("one replica's admin token works on the other");
        a.stop().await.unwrap();
        b.stop().await.unwrap();
    }
}

/// A hole punch asked on one replica reaches the other side's session on another (the request
/// goes through the store, which every replica watches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_punch_reaches_both_sides_when_their_sessions_are_on_different_replicas() {
    let (_keep, a, b, mut ca) = two_replicas_with_network("n", "100.64.0.0/24").await;
    let join = token(&mut ca, "n", 0).await;
    let mut x = TestAgent::join_behind_nat(&join, "x", "198.51.100.1:4000")
        .await
        .unwrap();
    let y = TestAgent::join_behind_nat(&via(&join, &b), "y", "198.51.100.2:5000")
        .await
        .unwrap();
    let y_id = y.peer_id.clone();
    assert!(
        x.wait_map(5 * SECOND, |m| m
            .peers
            .iter()
            .any(|p| p.peer_id == y_id && !p.outside.is_empty()))
            .await
    );
    wait_for("y's session on replica b", || {
        b.controller.sessions.has(&y_id) && !a.controller.sessions.has(&y_id)
    })
    .await;
    let (mut at_x, mut at_y) = (x.client.punches(), y.client.punches());
    x.ask_punch(&y_id).await;
    let to_y = TestAgent::next_punch(&mut at_y, 5 * SECOND).await;
    assert_eq!(to_y.map(|p| p.peer_id), Some(x.peer_id.clone()));
    let to_x = TestAgent::next_punch(&mut at_x, 5 * SECOND).await;
    assert_eq!(to_x.map(|p| p.peer_id), Some(y_id));
}
