//! Routes an agent advertises (`--advertise-routes`): pending until an admin approves them or
//! the policy's `auto_approve` takes them, withdrawn when the agent stops advertising them.
//! In-process controller on the embedded store, agents running the real control client, real
//! gRPC and TLS on loopback.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

async fn routes(c: &TestController, network: &str) -> Vec<Route> {
    let req = ListRoutesRequest {
        network: network.into(),
    };
    c.console()
        .await
        .list_routes(req)
        .await
        .unwrap()
        .into_inner()
        .routes
}

/// The network's routes once there are `n` of them (within 2.5 s).
async fn wait_routes(c: &TestController, network: &str, n: usize) -> Vec<Route> {
    let mut listed = Vec::new();
    for _ in 0..50 {
        listed = routes(c, network).await;
        if listed.len() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listed
}

/// The network's routes as "PREFIX STATE".
async fn states(c: &TestController, network: &str) -> Vec<String> {
    let r = routes(c, network).await.into_iter();
    r.map(|r| format!("{} {}", r.prefix, r.state)).collect()
}

/// Whether a map routes `prefix` through peer `gw`.
fn carries(gw: &str, prefix: &str) -> impl Fn(&NetworkMap) -> bool + Clone + use<> {
    let (gw, prefix) = (gw.to_string(), prefix.to_string());
    move |m: &NetworkMap| {
        m.peers
            .iter()
            .any(|p| p.peer_id == gw && p.allowed_ips.contains(&prefix))
    }
}

/// The allowed IPs `agent`'s map gives peer `id`.
fn allowed(agent: &TestAgent, id: &str) -> Vec<String> {
    let m = agent.map();
    let p = m.peers.iter().find(|p| p.peer_id == id);
    p.map(|p| p.allowed_ips.clone()).unwrap_or_default()
}

async fn token_with_tags(c: &TestController, network: &str, tags: &[&str]) -> String {
    let req = CreateJoinTokenRequest {
        network: network.into(),
        max_uses: 0,
        ttl_seconds: 3600,
        tags: tags.iter().map(ToString::to_string).collect(),
    };
    let r = c.console().await.create_join_token(req).await.unwrap();
    r.into_inner().join_string
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advertised_route_waits_for_approval_and_goes_when_no_longer_advertised() {
    let c = TestController::start().await;
    c.network("sites", &["100.64.0.0/24"]).await;
    let join = c.token("sites", 0).await;
    let mut client = TestAgent::join(&join, "client").await.unwrap();
    let offered = ["10.20.0.0/24", "100.64.0.128/25", "10.30.0.0/16"];
    let mut gw = TestAgent::join_advertising(&join, "gw", &offered)
        .await
        .unwrap();
    let listed = wait_routes(&c, "sites", 2).await;
    let prefixes: Vec<&str> = listed.iter().map(|r| r.prefix.as_str()).collect();
    assert_eq!(
        prefixes,
        ["10.20.0.0/24", "10.30.0.0/16"],
        "one inside the network's own CIDR is not taken"
    );
    assert!(
        listed
            .iter()
            .all(|r| r.state == "pending" && r.from_agent && !r.primary)
    );
    assert!(client.wait_map(SECOND, |m| m.peers.len() == 1).await);
    assert_eq!(
        allowed(&client, &gw.peer_id),
        ["100.64.0.2/32"],
        "not in force"
    );

    // Approval: in force within a second, on the client and the gateway.
    let mut con = c.console().await;
    let id = listed[0].id.clone();
    let r = con
        .approve_route(ApproveRouteRequest {
            route_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "approved");
    let gw_id = gw.peer_id.clone();
    assert!(
        client
            .wait_map(SECOND, carries(&gw_id, "10.20.0.0/24"))
            .await
    );
    assert!(gw.wait_map(SECOND, |m| m.routes == ["10.20.0.0/24"]).await);
    // An admin's route of the same gateway is the admin's: a restart does not touch it.
    con.advertise_route(AdvertiseRouteRequest {
        peer_id: gw_id.clone(),
        prefix: "10.40.0.0/16".into(),
    })
    .await
    .unwrap();

    // The agent restarts advertising 10.30.0.0/16 only: 10.20.0.0/24 is withdrawn.
    let gw = gw.restart_advertising(&["10.30.0.0/16"]).await;
    let (old, admins) = (
        carries(&gw_id, "10.20.0.0/24"),
        carries(&gw_id, "10.40.0.0/16"),
    );
    let withdrawn = move |m: &NetworkMap| !old(m) && admins(m);
    assert!(
        client.wait_map(2 * SECOND, withdrawn).await,
        "{:?}",
        allowed(&client, &gw_id)
    );
    assert_eq!(
        states(&c, "sites").await,
        ["10.30.0.0/16 pending", "10.40.0.0/16 approved"]
    );
    let e = con
        .approve_route(ApproveRouteRequest { route_id: id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    gw.stop().await;
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_auto_approves_routes_advertised_by_the_peers_it_names() {
    let c = TestController::start().await;
    c.network("sites", &["100.64.0.0/24"]).await;
    let policy = "tags = [\"site-gw\"]\n[[rule]]\nfrom = [\"*\"]\nto = [\"*\", \"10.0.0.0/8\"]\n\n[auto_approve]\n\"10.20.0.0/16\" = [\"tag:site-gw\"]\n";
    let mut con = c.console().await;
    con.set_policy(SetPolicyRequest {
        network: "sites".into(),
        text: policy.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = TestAgent::join(&c.token("sites", 0).await, "client")
        .await
        .unwrap();
    let gw_join = token_with_tags(&c, "sites", &["site-gw"]).await;
    let gw = TestAgent::join_advertising(&gw_join, "gw", &["10.20.1.0/24", "10.50.0.0/24"])
        .await
        .unwrap();
    let gw_id = gw.peer_id.clone();
    let carries = |p: &'static str| {
        let gw_id = gw_id.clone();
        move |m: &NetworkMap| {
            m.peers
                .iter()
                .any(|x| x.peer_id == gw_id && x.allowed_ips.contains(&p.to_string()))
        }
    };
    assert!(client.wait_map(2 * SECOND, carries("10.20.1.0/24")).await);
    assert!(
        !carries("10.50.0.0/24")(&client.map()),
        "outside the auto-approved prefix"
    );
    assert_eq!(
        states(&c, "sites").await,
        ["10.20.1.0/24 auto-approved", "10.50.0.0/24 pending"]
    );
    // The gateway loses its tag: its route is out of force at once.
    con.tag_peer(TagPeerRequest {
        peer_id: gw_id.clone(),
        add: vec![],
        remove: vec!["site-gw".into()],
    })
    .await
    .unwrap();
    let gone = carries("10.20.1.0/24");
    assert!(client.wait_map(SECOND, move |m| !gone(m)).await);
    gw.stop().await;
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_peer_that_chose_an_exit_node_routes_the_internet_through_it() {
    let c = TestController::start().await;
    c.network("exits", &["100.64.0.0/24"]).await;
    let join = c.token("exits", 0).await;
    let gw = TestAgent::join_advertising(&join, "exit1", &["0.0.0.0/0"])
        .await
        .unwrap();
    let mut other = TestAgent::join(&join, "other").await.unwrap();
    let listed = wait_routes(&c, "exits", 1).await;
    let mut con = c.console().await;
    con.approve_route(ApproveRouteRequest {
        route_id: listed[0].id.clone(),
    })
    .await
    .unwrap();
    // A client that asks for it at start (`--exit-node exit1`).
    let mut client = TestAgent::join_configured(&join, "laptop", |c| c.exit_node = "exit1".into())
        .await
        .unwrap();
    let gw_id = gw.peer_id.clone();
    let exit_via_gw = move |m: &NetworkMap| {
        m.peers
            .iter()
            .any(|p| p.peer_id == gw_id && p.allowed_ips.contains(&"0.0.0.0/0".to_string()))
    };
    assert!(client.wait_map(2 * SECOND, exit_via_gw.clone()).await);
    assert!(other.wait_map(SECOND, |m| m.peers.len() == 2).await);
    assert!(!exit_via_gw(&other.map()), "the others route nothing there");
    let peers = c.peers("exits").await;
    let laptop = peers.iter().find(|p| p.hostname == "laptop").unwrap();
    assert_eq!(laptop.exit_node, gw.peer_id);
    // Not an exit node: refused with a reason.
    let e = con
        .set_exit_node(SetExitNodeRequest {
            peer_id: other.peer_id.clone(),
            exit_node: "laptop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // Cleared from the console: the client's map loses it.
    con.set_exit_node(SetExitNodeRequest {
        peer_id: laptop.id.clone(),
        exit_node: String::new(),
    })
    .await
    .unwrap();
    assert!(client.wait_map(SECOND, move |m| !exit_via_gw(m)).await);
    for a in [gw, other, client] {
        a.stop().await;
    }
}

/// A Hello offering more than 64 routes is refused whole (InvalidArgument) and writes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_offering_too_many_routes_is_refused_and_writes_none() {
    use futures::StreamExt as _;
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let (enrollment, mut agent) = c.raw_agent("prod").await;
    let hello = SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello {
            advertised_routes: (0..65).map(|i| format!("10.{i}.0.0/16")).collect(),
            ..Default::default()
        })),
    };
    let mut r =
        tonic::Request::new(futures::stream::iter([hello]).chain(futures::stream::pending()));
    let bearer = format!("Bearer {}", enrollment.credential);
    r.metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let mut stream = agent.sync(r).await.unwrap().into_inner();
    let s = stream.message().await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("at most 64 advertised routes"),
        "{}",
        s.message()
    );
    assert!(routes(&c, "prod").await.is_empty());
}
