//! Agents report how they reach their peers; `ListPeers` with `paths` shows the latest report
//! of each (the console's `peer list --paths`). Reports are checked and bounded; after the first
//! they are deltas; `peer list` flags an online peer with no handshake with anyone.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::v1::{GetPeerRequest, ListPeersRequest, PairPath, Peer};
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
        last_handshake_unix: canopy_agent::report::unix_now() - 3,
        ..Default::default()
    }
}

/// `p` without its handshake time (the controller moves it into its own clock and ages it).
fn without_handshake(mut p: PairPath) -> PairPath {
    (p.last_handshake_secs, p.last_handshake_unix) = (0, 0);
    p
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
    assert_eq!(
        paths.into_iter().map(without_handshake).collect::<Vec<_>>(),
        [without_handshake(pair(&b.peer_id, "relayed", why))]
    );
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

/// A pair with a handshake at `at` (the agent's clock) and bytes.
fn live(peer: &str, at: i64, rx: u64, tx: u64) -> PairPath {
    PairPath {
        peer_id: peer.into(),
        path: "direct".into(),
        via: "192.0.2.9:51820".into(),
        last_handshake_unix: at,
        rx_bytes: rx,
        tx_bytes: tx,
        ..Default::default()
    }
}

/// Polls the console's peer list until `pred` holds for peer `id` (5 s).
async fn until(c: &TestController, id: &str, what: &str, pred: impl Fn(&Peer) -> bool) -> Peer {
    let t = std::time::Instant::now();
    loop {
        let peers = c.peers("n").await;
        if let Some(p) = peers.into_iter().find(|p| p.id == id && pred(p)) {
            return p;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_peer_without_any_handshake_for_three_minutes_is_flagged_and_deltas_merge() {
    let c = TestController::with_manual_clock().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let a = TestAgent::join(&join, "a").await.unwrap();
    let b = TestAgent::join(&join, "b").await.unwrap();
    let now = canopy_agent::report::unix_now();
    a.client
        .path_reports()
        .send_replace(vec![live(&b.peer_id, now - 10, 500, 700)]);
    let mut none = live(&a.peer_id, 0, 0, 0);
    none.path = "none".into();
    b.client.path_reports().send_replace(vec![none]);
    let p = until(&c, &a.peer_id, "a's report", |p| p.rx_bytes == 500).await;
    assert_eq!((p.tx_bytes, p.quiet_secs), (700, 0));
    assert_eq!(
        (p.paths_direct, p.paths_relayed),
        (1, 0),
        "the summary without paths read"
    );
    assert!(p.last_handshake_unix > 0);
    until(&c, &b.peer_id, "b is fine at first", |p| {
        p.online && p.quiet_secs == 0
    })
    .await;

    // 200 s on the controller's clock: neither has had a handshake for three minutes.
    c.clock.advance(Duration::from_secs(200));
    let a_now = until(&c, &a.peer_id, "a flagged", |p| p.quiet_secs >= 180).await;
    assert!(a_now.quiet_secs >= 200, "{}", a_now.quiet_secs);
    until(&c, &b.peer_id, "b flagged", |p| p.quiet_secs >= 180).await;

    // a handshakes again: its agent sends only that pair; the flag goes, the bytes add up.
    let now = canopy_agent::report::unix_now();
    a.client
        .path_reports()
        .send_replace(vec![live(&b.peer_id, now, 900, 1000)]);
    let p = until(&c, &a.peer_id, "a back", |p| p.quiet_secs == 0).await;
    assert_eq!((p.rx_bytes, p.tx_bytes), (900, 1000));
    // `peer show` reads the record its session writes (just after it took the report).
    let t = std::time::Instant::now();
    let shown = loop {
        let req = GetPeerRequest {
            peer_id: a.peer_id.clone(),
        };
        let p = c.console().await.get_peer(req).await.unwrap().into_inner();
        if p.paths.first().is_some_and(|x| x.rx_bytes == 900) {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", p.paths);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shown.paths.len(), 1);
    assert!(
        (0..=2).contains(&shown.paths[0].last_handshake_secs),
        "{:?}",
        shown.paths
    );
    a.stop().await;
    b.stop().await;
}
