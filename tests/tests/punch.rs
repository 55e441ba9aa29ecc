//! Coordinated hole punching through the controller, with the real agent control client over
//! real gRPC: one side asks, both sides are told at the same moment, once per pair, and only
//! for a peer the asker may reach.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_tests::{TestAgent, TestController};

const SECOND: Duration = Duration::from_secs(1);

/// Waits until `a`'s map carries `b` with its outside address.
async fn sees_outside(a: &mut TestAgent, b: &str) {
    let b = b.to_string();
    assert!(
        a.wait_map(5 * SECOND, |m| m
            .peers
            .iter()
            .any(|p| p.peer_id == b && !p.outside.is_empty()))
            .await,
        "the map shows {b}'s outside address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_punch_asked_by_one_side_reaches_both_sides_once_per_pair() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    c.network("other", &["100.65.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let mut a = TestAgent::join_behind_nat(&join, "a", "198.51.100.1:4000")
        .await
        .unwrap();
    let b = TestAgent::join_behind_nat(&join, "b", "198.51.100.2:5000")
        .await
        .unwrap();
    let stranger = TestAgent::join_behind_nat(&c.token("other", 0).await, "x", "198.51.100.3:1")
        .await
        .unwrap();
    sees_outside(&mut a, &b.peer_id).await;
    let (mut at_a, mut at_b) = (a.client.punches(), b.client.punches());
    let mut at_stranger = stranger.client.punches();
    // Asking for a peer of another network (or no peer at all) punches nothing.
    a.ask_punch(&stranger.peer_id).await;
    a.ask_punch("peer_nobody").await;
    a.ask_punch(&b.peer_id).await;
    let to_a = TestAgent::next_punch(&mut at_a, 5 * SECOND).await.unwrap();
    let to_b = TestAgent::next_punch(&mut at_b, 5 * SECOND).await.unwrap();
    assert_eq!(to_a.peer_id, b.peer_id, "A probes B");
    assert_eq!(to_a.public_key, b.key.public_key().to_vec());
    assert_eq!(to_a.outside, ["198.51.100.2:5000"]);
    assert_eq!(to_b.peer_id, a.peer_id, "and B probes A at the same moment");
    assert_eq!(to_b.outside, ["198.51.100.1:4000"]);
    // B asks too (both sides usually do): the pair was punched just now.
    b.ask_punch(&a.peer_id).await;
    assert!(TestAgent::next_punch(&mut at_a, SECOND).await.is_none());
    assert!(TestAgent::next_punch(&mut at_b, SECOND).await.is_none());
    assert!(
        TestAgent::next_punch(&mut at_stranger, SECOND)
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_punch_without_an_outside_address_or_between_peers_the_policy_keeps_apart() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let web = TestAgent::join_behind_nat(&join, "web", "198.51.100.1:4000")
        .await
        .unwrap();
    let db = TestAgent::join_behind_nat(&join, "db", "198.51.100.2:5000")
        .await
        .unwrap();
    let plain = TestAgent::join(&join, "plain").await.unwrap();
    let plain2 = TestAgent::join(&join, "plain2").await.unwrap();
    let (mut at_db, mut at_plain2) = (db.client.punches(), plain2.client.punches());
    // Neither side behind a NAT: nothing to punch.
    plain.ask_punch(&plain2.peer_id).await;
    assert!(
        TestAgent::next_punch(&mut at_plain2, 2 * SECOND)
            .await
            .is_none()
    );
    // web and db have no tags: the policy keeps them apart.
    let mut con = c.console().await;
    con.set_policy(canopy_proto::v1::SetPolicyRequest {
        network: "n".into(),
        text: canopy_tests::WEB_DB_POLICY.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(SECOND / 2).await;
    web.ask_punch(&db.peer_id).await;
    assert!(
        TestAgent::next_punch(&mut at_db, 2 * SECOND)
            .await
            .is_none()
    );
}
