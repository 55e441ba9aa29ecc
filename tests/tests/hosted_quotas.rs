//! Hosted mode, plans and quotas: sign-up, plans and usage, and quotas that hold when creates,
//! enrollments and plan changes race through two replicas.
//! Two replicas of `canopy serve --hosted` over a real etcd. Needs etcd (deploy/install-deps.sh).
#![allow(clippy::unwrap_used)]

use canopy_controller::console::Client;
use canopy_proto::join::JoinString;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::hosted_service_client::HostedServiceClient;
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::hosted::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_plans_and_usage() {
    let c = Cluster::new();
    let r = c.replica().await;
    let mut h = hosted_client(&r).await;
    let bad = |org: &str, email: &str, plan: &str| SignUpRequest {
        org: org.into(),
        email: email.into(),
        plan: plan.into(),
    };
    for (req, says) in [
        (bad("x", "not-an-email", "free"), "not an email"),
        (bad("x", "a@b.c", "gold"), "unknown plan"),
        (bad("", "a@b.c", "free"), "organisation name"),
    ] {
        let s = h.sign_up(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains(says), "{}", s.message());
    }
    let (_, t) = signup(&r, "grow", "team").await;
    let mut c = console_as(&r, &t).await;
    for i in 0..4 {
        c.create_network(net(&format!("n{i}"), &format!("10.{i}.0.0/24")))
            .await
            .unwrap();
    }
    let mut h = {
        let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
            .await
            .unwrap();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        HostedServiceClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        })
    };
    let u = h.get_usage(GetUsageRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (u.plan.as_str(), u.networks, u.quotas.unwrap().networks),
        ("team", 4, 25)
    );
    let s = h
        .change_plan(ChangePlanRequest {
            plan: "free".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("free plan allows 3 networks") && s.message().contains("you have 4"),
        "{}",
        s.message()
    );
    let sub = h
        .change_plan(ChangePlanRequest {
            plan: "business".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (sub.plan.as_str(), sub.quotas.unwrap().networks),
        ("business", 250)
    );

    // A self-managed controller has no sign-up.
    // (Its etcd lives to the end of the test, not only to the end of the statement.)
    let other = Cluster::new();
    let plain = replica(other.dir.path(), &other.etcd.endpoint, false).await;
    let s = hosted_client(&plain)
        .await
        .sign_up(bad("x", "a@b.c", "free"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    plain.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_when_creates_race_through_two_replicas() {
    let c = Cluster::new();
    let (r1, r2) = (c.replica().await, c.replica().await);
    let (_, t) = signup(&r1, "small", "free").await;
    let (c1, c2) = (console_as(&r1, &t).await, console_as(&r2, &t).await);

    networks_race(&c1, &c2).await;
    let joins = join_tokens_race(&c1, &c2).await;
    peers_race(&joins[0], &r2.url).await;
}

/// Free: 3 networks. Eight race for them through both replicas.
async fn networks_race(c1: &Client, c2: &Client) {
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = if i % 2 == 0 { c1.clone() } else { c2.clone() };
            tokio::spawn(async move {
                c.create_network(net(&format!("n{i}"), &format!("10.{i}.0.0/24")))
                    .await
            })
        })
        .collect();
    let (mut ok, mut over) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message().contains("free plan allows 3 networks"),
                    "{}",
                    s.message()
                );
                over += 1;
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, over), (3, 5));
}

/// Free: 5 active join tokens; eight race for them. The join strings made.
async fn join_tokens_race(c1: &Client, c2: &Client) -> Vec<String> {
    let first = c1
        .clone()
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks[0]
        .id
        .clone();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = if i % 2 == 0 { c1.clone() } else { c2.clone() };
            let n = first.clone();
            tokio::spawn(async move { c.create_join_token(tok(&n)).await })
        })
        .collect();
    let mut joins = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => joins.push(r.into_inner().join_string),
            Err(s) if s.code() == Code::ResourceExhausted => assert!(
                s.message().contains("5 active join tokens"),
                "{}",
                s.message()
            ),
            Err(s) if s.code() == Code::Unavailable => {} // lost the race: "try again"
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(
        joins.len() <= 5 && !joins.is_empty(),
        "{} tokens",
        joins.len()
    );

    joins
}

/// Free: 25 peers per network. Thirty race for them through both replicas.
async fn peers_race(join: &str, second_url: &str) {
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let mut j = canopy_proto::join::JoinString::parse(join).unwrap();
            if i % 2 == 1 {
                j.controller_url = second_url.to_string();
            }
            let j = j.encode();
            tokio::spawn(async move { TestAgent::join(&j, &format!("p{i}")).await })
        })
        .collect();
    let (mut agents, mut full) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => agents.push(a),
            Err(canopy_agent::control::ControlError::Refused(s))
                if s.code() == Code::ResourceExhausted =>
            {
                assert!(
                    s.message().contains("allows 25 peers per network"),
                    "{}",
                    s.message()
                );
                full += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((agents.len(), full), (25, 5));
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_racing_network_creates_never_leaves_more_than_the_plan_allows() {
    let c = Cluster::new();
    let (r1, r2) = (c.replica().await, c.replica().await);
    let (mut downgraded, mut refused) = (0, 0);
    for trial in 0..12 {
        let (_, t) = signup(&r1, &format!("race{trial}"), "team").await;
        let mut c1 = console_as(&r1, &t).await;
        for i in 0..2 {
            c1.create_network(net(&format!("n{i}"), &format!("10.{i}.0.0/24")))
                .await
                .unwrap();
        }
        let mut h = hosted_client(&r1).await;
        let mut creates = Vec::new();
        for i in 2..8 {
            let mut c = console_as(&r2, &t).await;
            creates.push(tokio::spawn(async move {
                c.create_network(net(&format!("n{i}"), &format!("10.{i}.0.0/24")))
                    .await
                    .is_ok()
            }));
        }
        let mut req = tonic::Request::new(ChangePlanRequest {
            plan: "free".into(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        let change = h.change_plan(req).await;
        for c in creates {
            c.await.unwrap();
        }
        let mut c = console_as(&r1, &t).await;
        let nets = c
            .list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .len();
        match change {
            Ok(s) => {
                downgraded += 1;
                assert_eq!(s.into_inner().plan, "free");
                assert!(
                    nets <= 3,
                    "trial {trial}: on the free plan with {nets} networks"
                );
            }
            Err(s) => {
                refused += 1;
                assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            }
        }
    }
    assert!(downgraded + refused == 12, "{downgraded} {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_quota_counts_removals_and_concurrent_enrollments() {
    let c = Cluster::new();
    let r = c.replica().await;
    let (_, t) = signup(&r, "counted", "free").await;
    let mut c = console_as(&r, &t).await;
    c.create_network(net("n", "100.64.0.0/24")).await.unwrap();
    let join = JoinString::parse(
        &c.create_join_token(tok("n"))
            .await
            .unwrap()
            .into_inner()
            .join_string,
    )
    .unwrap();
    // 30 enroll at once into a plan that allows 25.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let join = join.clone();
        tasks.push(tokio::spawn(async move {
            canopy_agent::control::enroll(
                &join,
                canopy_agent::keys::PrivateKey::generate().public_key(),
                &format!("h{i}"),
            )
            .await
        }));
    }
    let mut enrolled = Vec::new();
    for t in tasks {
        if let Ok((e, _)) = t.await.unwrap() {
            enrolled.push(e.peer_id);
        }
    }
    assert_eq!(enrolled.len(), 25, "exactly the quota enrolled");
    // A removal frees one place, and only one.
    c.remove_peer(RemovePeerRequest {
        peer_id: enrolled[0].clone(),
    })
    .await
    .unwrap();
    let key = || canopy_agent::keys::PrivateKey::generate().public_key();
    canopy_agent::control::enroll(&join, key(), "again")
        .await
        .expect("the freed place is taken");
    let e = canopy_agent::control::enroll(&join, key(), "over")
        .await
        .unwrap_err();
    assert!(format!("{e}").contains("allows 25 peers"), "{e}");
}
