//! Peer names in DNS, on the controller: unique per network under races, freed with their peer,
//! carried in every map with the network's zone, and a new zone pushed to every agent.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_hostnames_racing_to_enroll_get_distinct_names_and_a_freed_name_is_reused() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24", "fd7a:1::/64"]).await;
    let join = c.token("prod", 0).await;
    // Eight nodes called "web" (spelt differently) enroll at once.
    let hosts = [
        "web",
        "WEB",
        "web.eu-west",
        "Web",
        "web",
        "web_",
        "web",
        "web",
    ];
    let joins = hosts.iter().map(|h| TestAgent::join(&join, h));
    let agents: Vec<TestAgent> = futures::future::join_all(joins)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let peers = c.peers("prod").await;
    let names: HashSet<String> = peers.iter().map(|p| p.dns_name.clone()).collect();
    let want: HashSet<String> = std::iter::once("web".to_string())
        .chain((2..=8).map(|n| format!("web-{n}")))
        .map(|l| format!("{l}.prod.canopy"))
        .collect();
    assert_eq!(names, want, "one plain name, then the lowest free suffixes");

    // Every map names every peer the way the console does, in the network's zone.
    let by_id: BTreeMap<String, String> = peers
        .iter()
        .map(|p| (p.id.clone(), p.dns_name.clone()))
        .collect();
    for a in &agents {
        let m = a.map();
        assert_eq!(m.dns_domain, "prod.canopy");
        assert_eq!(format!("{}.prod.canopy", m.dns_name), by_id[&a.peer_id]);
        for p in &m.peers {
            assert_eq!(format!("{}.prod.canopy", p.dns_name), by_id[&p.peer_id]);
        }
    }

    // The peer called plain "web" leaves: the next "web" gets its name back.
    let plain = peers
        .iter()
        .find(|p| p.dns_name == "web.prod.canopy")
        .unwrap();
    let req = RemovePeerRequest {
        peer_id: plain.id.clone(),
    };
    c.console().await.remove_peer(req).await.unwrap();
    let again = TestAgent::join(&join, "web").await.unwrap();
    assert_eq!(again.map().dns_name, "web");
    again.stop().await;
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_zone_reaches_every_agent_within_a_second_and_bad_zones_are_refused() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let join = c.token("prod", 0).await;
    let mut a = TestAgent::join(&join, "a").await.unwrap();
    let mut b = TestAgent::join(&join, "b").await.unwrap();
    assert!(b.wait_map(SECOND, |m| m.peers.len() == 1).await);
    let mut console = c.console().await;
    let set = |domain: &str| SetNetworkDnsRequest {
        network: "prod".into(),
        domain: domain.into(),
    };
    let n = console.set_network_dns(set("Corp.Canopy.")).await.unwrap();
    assert_eq!(n.into_inner().dns_domain, "corp.canopy");
    for agent in [&mut a, &mut b] {
        assert!(
            agent
                .wait_map(SECOND, |m| m.dns_domain == "corp.canopy")
                .await,
            "the zone must reach the agent"
        );
        assert_eq!(agent.map().peers.len(), 1, "a full map, peers kept");
    }
    let p = c.peers("prod").await;
    assert!(p.iter().any(|p| p.dns_name == "a.corp.canopy"), "{p:?}");

    for bad in ["a..b", "x.local", "has space.example", "-x.example"] {
        let e = console.set_network_dns(set(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(e.message().contains("DNS domain"), "{}", e.message());
    }
    // Back to the default.
    console.set_network_dns(set("")).await.unwrap();
    assert!(a.wait_map(SECOND, |m| m.dns_domain == "prod.canopy").await);
    a.stop().await;
    b.stop().await;
}
