//! Controller + agents' control clients over real gRPC on loopback (embedded store, TLS).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agents_see_each_other_and_a_removed_peer_is_pushed_out_within_a_second() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24", "fd7a:1::/64"]).await;
    let join = c.token("prod", 0).await;
    let mut a = TestAgent::join(&join, "a").await.unwrap();
    let mut b = TestAgent::join(&join, "b").await.unwrap();
    let mut d = TestAgent::join(&join, "d").await.unwrap();

    // Each agent's map lists the other two, with addresses from both CIDRs.
    for agent in [&mut a, &mut b, &mut d] {
        assert!(
            agent.wait_map(SECOND, |m| m.peers.len() == 2).await,
            "peers: {:?}",
            agent.peer_ids()
        );
        let m = agent.map();
        assert_eq!(m.addresses.len(), 2);
        assert!(m.addresses[0].starts_with("100.64.0.") && m.addresses[1].starts_with("fd7a:1::"));
        assert_eq!(m.network_name, "prod");
    }

    // Remove b: a and d drop it within a second; b's client is told it was removed.
    c.console()
        .await
        .remove_peer(RemovePeerRequest {
            peer_id: b.peer_id.clone(),
        })
        .await
        .unwrap();
    let gone = b.peer_id.clone();
    for agent in [&mut a, &mut d] {
        assert!(
            agent
                .wait_map(SECOND, |m| m.peers.iter().all(|p| p.peer_id != gone))
                .await
        );
        assert_eq!(agent.map().peers.len(), 1);
    }
    let ended = tokio::time::timeout(5 * SECOND, &mut b.task)
        .await
        .expect("removed agent's stream must close");
    assert!(matches!(
        ended.unwrap(),
        Err(canopy_agent::control::ControlError::Removed)
    ));

    // Its credential no longer opens a stream.
    let id = c
        .server
        .controller
        .authenticate_agent(&b.client.enrollment().credential)
        .await;
    assert!(id.is_err(), "a removed peer's credential must stop working");

    // The console shows the others online at the revision they acknowledged.
    let peers = c.peers("prod").await;
    assert_eq!(peers.len(), 2);
    a.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_raced_by_20_enrollments_yields_exactly_one_peer() {
    let c = TestController::start().await;
    c.network("race", &["100.64.0.0/24"]).await;
    let join = c.token("race", 1).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let join = join.clone();
            tokio::spawn(async move { TestAgent::join(&join, &format!("n{i}")).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(agent) => {
                ok += 1;
                agent.stop().await;
            }
            Err(canopy_agent::control::ControlError::Refused(s)) => {
                assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
                assert!(s.message().contains("used up"), "{}", s.message());
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1);
    let peers = c.peers("race").await;
    assert_eq!(peers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrollments_get_unique_addresses_until_the_range_is_full() {
    let c = TestController::start().await;
    // 100.64.0.0/28 has 14 hosts; 18 nodes race for them.
    c.network("small", &["100.64.0.0/28", "fd7a:2::/120"]).await;
    let join = c.token("small", 0).await;
    let tasks: Vec<_> = (0..18)
        .map(|i| {
            let join = join.clone();
            tokio::spawn(async move { TestAgent::join(&join, &format!("n{i}")).await })
        })
        .collect();
    let (mut agents, mut full) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => agents.push(a),
            Err(canopy_agent::control::ControlError::Refused(s)) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                assert!(s.message().contains("no free address"), "{}", s.message());
                full += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((agents.len(), full), (14, 4));
    let addrs: HashSet<String> = agents.iter().flat_map(|a| a.map().addresses).collect();
    assert_eq!(
        addrs.len(),
        28,
        "every address (v4 and v6) is handed out once"
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peers_address_is_freed_for_the_next_node() {
    let c = TestController::start().await;
    c.network("tiny", &["10.10.0.0/30"]).await; // two hosts
    let join = c.token("tiny", 0).await;
    let a = TestAgent::join(&join, "a").await.unwrap();
    let b = TestAgent::join(&join, "b").await.unwrap();
    let Err(canopy_agent::control::ControlError::Refused(s)) = TestAgent::join(&join, "c").await
    else {
        panic!("a full network must refuse");
    };
    assert_eq!(s.code(), Code::ResourceExhausted);
    let freed = a.map().addresses[0].clone();
    c.console()
        .await
        .remove_peer(RemovePeerRequest {
            peer_id: a.peer_id.clone(),
        })
        .await
        .unwrap();
    let c3 = TestAgent::join(&join, "c").await.unwrap();
    assert_eq!(c3.map().addresses[0], freed);
    for x in [b, c3] {
        x.stop().await;
    }
    a.stop().await;
}

/// Network "keep" (id `net`) is the only one, with its two enrollments counted and its two
/// peers.
async fn everything_is_still_there(c: &TestController, net: &str) {
    let mut con = c.console().await;
    let nets = con.list_networks(ListNetworksRequest {}).await.unwrap();
    let ids: Vec<String> = nets
        .into_inner()
        .networks
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, [net]);
    let keep = || "keep".to_string();
    let tokens = con
        .list_join_tokens(ListJoinTokensRequest { network: keep() })
        .await;
    let uses: u32 = tokens
        .unwrap()
        .into_inner()
        .tokens
        .iter()
        .map(|t| t.uses)
        .sum();
    assert_eq!(uses, 2, "both enrollments are still counted");
    let peers = con
        .list_peers(ListPeersRequest {
            network: keep(),
            paths: false,
        })
        .await;
    assert_eq!(peers.unwrap().into_inner().peers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_agents_resume_from_their_revision() {
    let c = TestController::start().await;
    let net = c.network("keep", &["100.64.1.0/24"]).await;
    let join = c.token("keep", 0).await;
    let mut a = TestAgent::join(&join, "a").await.unwrap();
    let mut b = TestAgent::join(&join, "b").await.unwrap();
    assert!(a.wait_map(SECOND, |m| m.peers.len() == 1).await);
    assert!(b.wait_map(SECOND, |m| m.peers.len() == 1).await);
    let before = a.map();

    // Unrelated writes move the store's revision past the agents' (a re-list must still be
    // able to resume them with deltas).
    c.token("keep", 0).await;
    let mut connected = a.client.connected();
    let full_before = a.client.stats.full_maps.load(Relaxed);
    let connects_before = a.client.stats.connects.load(Relaxed);
    let c = c.restart().await;
    // The agent kept its map while the controller was away.
    assert_eq!(a.map(), before);
    // It reconnects on its own and stays at the same revision (nothing changed).
    tokio::time::timeout(10 * SECOND, connected.wait_for(|up| !*up))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(10 * SECOND, connected.wait_for(|up| *up))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.map().peers, before.peers);
    assert!(a.map().revision >= before.revision);
    assert!(
        a.client.stats.connects.load(Relaxed) > connects_before,
        "it reconnected"
    );
    assert_eq!(
        a.client.stats.full_maps.load(Relaxed),
        full_before,
        "it resumed without a full map"
    );

    // Networks, tokens and peers are all still there.
    everything_is_still_there(&c, &net).await;

    // And live pushes work after the restart.
    let mut d = TestAgent::join(&join, "d").await.unwrap();
    assert!(a.wait_map(SECOND, |m| m.peers.len() == 2).await);
    assert!(d.wait_map(SECOND, |m| m.peers.len() == 2).await);
    for x in [a, b, d] {
        x.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    let c = TestController::start().await;
    let trust = canopy_proto::transport::Trust::Pin(c.server.ca_sha256);
    let ch = canopy_proto::transport::connect(&c.server.url, &trust)
        .await
        .unwrap();
    let mut h = HealthClient::new(ch.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "canopy.v1.ConsoleService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "canopy.v1.ConsoleService",
        "canopy.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(s), "{s} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_network_disconnects_its_agents_and_voids_its_tokens_only() {
    let c = TestController::start().await;
    c.network("doomed", &["100.64.0.0/24"]).await;
    c.network("other", &["100.65.0.0/24"]).await;
    let doomed_join = c.token("doomed", 0).await;
    let other_join = c.token("other", 0).await;
    let mut a = TestAgent::join(&doomed_join, "a").await.unwrap();
    let mut o = TestAgent::join(&other_join, "o").await.unwrap();
    let mut o2 = TestAgent::join(&other_join, "o2").await.unwrap();
    assert!(o.wait_map(SECOND, |m| m.peers.len() == 1).await);

    let r = c
        .console()
        .await
        .delete_network(DeleteNetworkRequest {
            network: "doomed".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().peers_removed, 1);
    let ended = tokio::time::timeout(5 * SECOND, &mut a.task)
        .await
        .expect("its agent's stream must close");
    assert!(matches!(
        ended.unwrap(),
        Err(canopy_agent::control::ControlError::Removed)
    ));
    let Err(canopy_agent::control::ControlError::Refused(s)) =
        TestAgent::join(&doomed_join, "late").await
    else {
        panic!("a deleted network's token must not enroll");
    };
    assert_eq!(s.code(), Code::Unauthenticated);

    // The other network is untouched and still live.
    assert_eq!(o.map().peers.len(), 1);
    let p = TestAgent::join(&other_join, "p").await.unwrap();
    assert!(o.wait_map(SECOND, |m| m.peers.len() == 2).await);
    assert!(o2.wait_map(SECOND, |m| m.peers.len() == 2).await);
    for x in [o, o2, p] {
        x.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_paced_and_every_agent_gets_back() {
    use std::sync::atomic::Ordering::Relaxed;
    let c = TestController::start_paced(10).await;
    c.network("storm", &["100.64.0.0/24"]).await;
    let join = c.token("storm", 0).await;
    let mut agents = Vec::new();
    for i in 0..40 {
        agents.push(TestAgent::join(&join, &format!("n{i}")).await.unwrap());
    }
    for a in &mut agents {
        let mut up = a.client.connected();
        tokio::time::timeout(15 * SECOND, up.wait_for(|u| *u))
            .await
            .unwrap()
            .unwrap();
    }
    let paced_before: u64 = agents
        .iter()
        .map(|a| a.client.stats.paced.load(Relaxed))
        .sum();
    let connects: Vec<u64> = agents
        .iter()
        .map(|a| a.client.stats.connects.load(Relaxed))
        .collect();

    // All 40 lose the controller at once and come back at once.
    let c = c.restart().await;
    let t = std::time::Instant::now();
    for (a, before) in agents.iter().zip(&connects) {
        tokio::time::timeout(20 * SECOND, async {
            while a.client.stats.connects.load(Relaxed) <= *before
                || !*a.client.connected().borrow()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every agent reconnects");
    }
    let paced: u64 = agents
        .iter()
        .map(|a| a.client.stats.paced.load(Relaxed))
        .sum::<u64>()
        - paced_before;
    assert!(paced > 0, "40 reconnects at 10/s must have been paced");
    // 40 sessions at 10 per second (burst 10) cannot all be back in much under 3 s.
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "admission was not paced: {:?}",
        t.elapsed()
    );
    drop(c);
    for a in agents {
        a.stop().await;
    }
}

/// A change that has nothing for an agent (its own endpoints, here) is not sent to it, yet the
/// agent counts as current through it: its acknowledged revision reaches the network's, which
/// is what `peer list` and the convergence metrics compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_nothing_to_apply_is_current_through_the_networks_revision() {
    let c = TestController::start().await;
    c.network("n", &["100.64.0.0/24"]).await;
    let join = c.token("n", 0).await;
    let first = canopy_agent::control::Reported {
        local: vec!["192.0.2.10:51820".into()],
        outside: vec![],
    };
    let (tx, rx) = tokio::sync::watch::channel(first);
    let _a = TestAgent::join_configured(&join, "a", |cl| cl.endpoints = rx)
        .await
        .unwrap();
    let current = || async {
        let nets = c
            .console()
            .await
            .list_networks(ListNetworksRequest {})
            .await;
        let rev = nets.unwrap().into_inner().networks[0].revision;
        (rev, c.peers("n").await[0].acked_revision)
    };
    for round in 0..3 {
        let moved = format!("192.0.2.{}:51820", 20 + round);
        tx.send_replace(canopy_agent::control::Reported {
            local: vec![moved],
            outside: vec![],
        });
        let t = std::time::Instant::now();
        loop {
            let (rev, acked) = current().await;
            if acked == rev {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "acked {acked} of {rev}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
