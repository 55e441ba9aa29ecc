//! Access policy through the API: set whole and versioned, explained by `TestPolicy`, and
//! compiled into each agent's map (only the peers it may talk to, and its inbound rules).
//! In-process controller on the embedded store, real gRPC and TLS on loopback.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

use canopy_tests::WEB_DB_POLICY as POLICY;

async fn tagged_token(c: &TestController, network: &str, tag: &str) -> String {
    let req = CreateJoinTokenRequest {
        network: network.into(),
        max_uses: 0,
        ttl_seconds: 3600,
        tags: vec![tag.into()],
    };
    let r = c.console().await.create_join_token(req).await.unwrap();
    r.into_inner().join_string
}

fn set(network: &str, text: &str, if_revision: Option<i64>) -> SetPolicyRequest {
    SetPolicyRequest {
        network: network.into(),
        text: text.into(),
        remove: false,
        if_revision,
        lock: None,
    }
}

/// The hostnames in a map, sorted.
fn ids(m: &NetworkMap) -> Vec<String> {
    let mut names: Vec<String> = m.peers.iter().map(|p| p.hostname.clone()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_is_checked_whole_versioned_and_audited() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let mut con = c.console().await;
    let rev = c.store_revision().await;
    let bad = "tags = [\"web\"]\n\n[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\n";
    let s = con.set_policy(set("prod", bad, None)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message()
            .contains("line 5, rule 1: to: tag \"db\" is not declared"),
        "{}",
        s.message()
    );
    assert_eq!(
        c.store_revision().await,
        rev,
        "a refused policy writes nothing"
    );

    let none = con
        .get_policy(GetPolicyRequest {
            network: "prod".into(),
        })
        .await;
    assert_eq!(none.unwrap().into_inner().revision, 0, "no policy yet");
    let p = con
        .set_policy(set("prod", POLICY, Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert!(p.revision > 0);
    let got = con
        .get_policy(GetPolicyRequest {
            network: "prod".into(),
        })
        .await;
    let got = got.unwrap().into_inner();
    assert_eq!((got.text.as_str(), got.revision), (POLICY, p.revision));
    // A writer that read an older version is refused; the current one goes through.
    let stale = con
        .set_policy(set("prod", POLICY, Some(0)))
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        Code::FailedPrecondition,
        "{}",
        stale.message()
    );
    let edited = POLICY.replace("5432", "5432\", \"5433");
    let p2 = con
        .set_policy(set("prod", &edited, Some(p.revision)))
        .await
        .unwrap();
    assert!(p2.into_inner().revision > p.revision);
    let audit = con.list_audit(ListAuditRequest {
        action: "policy.".into(),
        ..Default::default()
    });
    let entries = audit.await.unwrap().into_inner().entries;
    assert_eq!(entries.len(), 2);
    assert!(
        entries[0]
            .detail
            .contains("-ports = [\"5432\"]\n+ports = [\"5432\", \"5433\"]"),
        "{:?}",
        entries[0].detail
    );
}

/// A controller with network "prod" and three agents: web and db (tagged so) and lone (no
/// tags), all seeing each other (no policy yet).
async fn three() -> (TestController, [TestAgent; 3]) {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let (web_join, db_join) = (
        tagged_token(&c, "prod", "web").await,
        tagged_token(&c, "prod", "db").await,
    );
    let web = TestAgent::join(&web_join, "web").await.unwrap();
    let db = TestAgent::join(&db_join, "db").await.unwrap();
    let mut lone = TestAgent::join(&c.token("prod", 0).await, "lone")
        .await
        .unwrap();
    assert!(
        lone.wait_map(SECOND, |m| m.peers.len() == 2).await,
        "no policy: all see all"
    );
    assert!(lone.map().policy.is_none());

    (c, [web, db, lone])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_gets_only_the_peers_it_may_talk_to_and_the_rules_about_it() {
    let (c, [mut web, mut db, mut lone]) = three().await;
    let mut con = c.console().await;
    con.set_policy(set("prod", POLICY, None)).await.unwrap();
    assert!(
        lone.wait_map(SECOND, |m| m.peers.is_empty() && m.policy.is_some())
            .await
    );
    assert!(
        web.wait_map(SECOND, |m| ids(m) == ["db"]).await,
        "{:?}",
        ids(&web.map())
    );
    assert!(db.wait_map(SECOND, |m| ids(m) == ["web"]).await);
    let rules = db.map().policy.unwrap().inbound;
    assert_eq!(rules.len(), 1);
    assert_eq!(
        (rules[0].from_tags.clone(), rules[0].proto),
        (vec!["web".to_string()], Protocol::Tcp as i32)
    );
    assert_eq!(
        (rules[0].ports[0].first, rules[0].ports[0].last),
        (5432, 5432)
    );
    assert!(
        web.map().policy.unwrap().inbound.is_empty(),
        "nobody may open anything on web"
    );
    // Those changes reached the agents as deltas (no map was resent whole).
    let full = |a: &TestAgent| {
        a.client
            .stats
            .full_maps
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!((full(&web), full(&db), full(&lone)), (0, 0, 0));

    // Removing the policy: everyone sees everyone again, without a policy part.
    let remove = SetPolicyRequest {
        network: "prod".into(),
        remove: true,
        ..Default::default()
    };
    con.set_policy(remove).await.unwrap();
    assert!(
        lone.wait_map(SECOND, |m| m.peers.len() == 2 && m.policy.is_none())
            .await
    );
    for a in [web, db, lone] {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_policy_says_which_rule_allows_or_why_none_does() {
    let (c, agents) = three().await;
    let mut con = c.console().await;
    con.set_policy(set("prod", POLICY, None)).await.unwrap();
    let why = con.test_policy(TestPolicyRequest {
        network: "prod".into(),
        from: "web".into(),
        to: "db".into(),
        proto: "tcp".into(),
        port: 5432,
    });
    let why = why.await.unwrap().into_inner();
    assert!(
        why.allowed && why.rule == "web reaches the database" && why.line == 3,
        "{why:?}"
    );
    let no = con.test_policy(TestPolicyRequest {
        network: "prod".into(),
        from: "db".into(),
        to: "web".into(),
        proto: "tcp".into(),
        port: 22,
    });
    let no = no.await.unwrap().into_inner();
    assert!(
        !no.allowed && no.explanation[0].starts_with("no rule has `from` matching"),
        "{no:?}"
    );

    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_change_or_a_ports_only_change_reaches_the_agents_it_concerns() {
    let (c, [web, mut db, mut lone]) = three().await;
    let mut con = c.console().await;
    con.set_policy(set("prod", POLICY, None)).await.unwrap();
    assert!(db.wait_map(SECOND, |m| ids(m) == ["web"]).await);
    // An admin tags lone as web: it now reaches db (and db sees it); agents cannot do this.
    let tag = TagPeerRequest {
        peer_id: lone.peer_id.clone(),
        add: vec!["web".into()],
        remove: vec![],
    };
    let p = con.tag_peer(tag).await.unwrap().into_inner();
    assert_eq!(p.tags, ["web"]);
    assert!(
        lone.wait_map(SECOND, |m| ids(m) == ["db"]).await,
        "{:?}",
        ids(&lone.map())
    );
    assert!(
        db.wait_map(SECOND, |m| ids(m) == ["lone", "web"]).await,
        "{:?}",
        ids(&db.map())
    );
    let untag = TagPeerRequest {
        peer_id: lone.peer_id.clone(),
        add: vec![],
        remove: vec!["web".into()],
    };
    con.tag_peer(untag).await.unwrap();
    assert!(lone.wait_map(SECOND, |m| m.peers.is_empty()).await);
    assert!(db.wait_map(SECOND, |m| ids(m) == ["web"]).await);

    // A change of ports only (no peer gains or loses another) still reaches db at once.
    con.set_policy(set("prod", &POLICY.replace("5432", "5433"), None))
        .await
        .unwrap();
    let port_is = |m: &NetworkMap, p: u32| {
        m.policy
            .as_ref()
            .is_some_and(|x| x.inbound[0].ports[0].first == p)
    };
    assert!(
        db.wait_map(SECOND, |m| port_is(m, 5433)).await,
        "a policy-only delta"
    );

    for a in [web, db, lone] {
        a.stop().await;
    }
}
