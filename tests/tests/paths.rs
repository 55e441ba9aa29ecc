//! Agents report how they reach their peers; `ListPeers` with `paths` shows the latest report
//! of each (the console's `peer list --paths`). Reports are checked and bounded.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::v1::{ListPeersRequest, PairPath, Peer};
use canopy_tests::{TestAgent, TestController};

async fn with_paths(c: &TestController) -> Vec<Peer> {
    let req = ListPeersRequest {
        network: "n".into(),
        paths: true,
    };
    let list = c.console().await.list_peers(req).await.unwrap();
    list.into_inner().peers
}

fn pair(peer: &str, path: &str, why: &str) -> PairPath {
    PairPath {
        peer_id: peer.into(),
        path: path.into(),
        via: String::new(),
        why: why.into(),
        last_handshake_secs: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_path_report_of_each_peer_is_listed_and_bad_ones_are_refused() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let a = TestAgent::join(&join, "a").await.unwrap();
    let b = TestAgent::join(&join, "b").await.unwrap();
    let reported = |peers: &[Peer], id: &str| {
        let p = peers.iter().find(|p| p.id == id).unwrap();
        (p.paths.clone(), p.paths_at_unix)
    };
    assert_eq!(reported(&with_paths(&c).await, &a.peer_id).1, 0, "none yet");
    let why = "punched 1 time(s), last 0 s ago: no answer";
    a.client
        .path_reports()
        .send_replace(vec![pair(&b.peer_id, "relayed", why)]);
    let t = std::time::Instant::now();
    while reported(&with_paths(&c).await, &a.peer_id).1 == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the report is listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (paths, _) = reported(&with_paths(&c).await, &a.peer_id);
    assert_eq!(paths, [pair(&b.peer_id, "relayed", why)]);
    // Without `paths` the listing carries none (no extra read).
    assert!(c.peers("n").await.iter().all(|p| p.paths.is_empty()));
    // A report the controller cannot take ends the session; the stored one stays.
    b.client
        .path_reports()
        .send_replace(vec![pair(&a.peer_id, "teleported", "")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reported(&with_paths(&c).await, &b.peer_id).1, 0);
    b.client
        .path_reports()
        .send_replace(vec![pair(&a.peer_id, "direct", &"x".repeat(10_000))]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reported(&with_paths(&c).await, &b.peer_id).1, 0);
    // A removed peer's report goes with it.
    let mut con = c.console().await;
    let rm = canopy_proto::v1::RemovePeerRequest {
        peer_id: a.peer_id.clone(),
    };
    con.remove_peer(rm).await.unwrap();
    let left = c
        .server
        .controller
        .store
        .range(b"/canopy/v1/paths/")
        .await
        .unwrap();
    assert!(left.kvs.is_empty(), "{:?}", left.kvs.len());
}
