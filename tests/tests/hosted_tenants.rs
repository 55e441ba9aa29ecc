//! Hosted mode, a tenant's life: suspension, the operator's view and deletion, and the audit log.
//! Two replicas of `canopy serve --hosted` over a real etcd. Needs etcd (deploy/install-deps.sh).
#![allow(clippy::unwrap_used)]

use canopy_controller::console::Client;
use canopy_controller::server::Running;
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::hosted::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tenant_is_refused_but_its_agents_keep_their_map() {
    let c = Cluster::new();
    let r = c.replica().await;
    let (tid, t) = signup(&r, "late-payer", "team").await;
    let mut c = console_as(&r, &t).await;
    let join = network_and_join(&mut c, "n", "100.64.0.0/24").await;
    let mut x = TestAgent::join(&join, "x").await.unwrap();
    let _y = TestAgent::join(&join, "y").await.unwrap();
    assert!(
        x.wait_map(std::time::Duration::from_secs(1), |m| m.peers.len() == 1)
            .await
    );
    let mut op = operator(&r, OPERATOR).await;
    let sub = op
        .suspend_tenant(TenantRef {
            tenant_id: tid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sub.suspended);
    let s = c.list_networks(ListNetworksRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("suspended"), "{}", s.message());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(x.map().peers.len(), 1, "agents keep their last map");
    match TestAgent::join(&join, "z").await {
        Err(canopy_agent::control::ControlError::Refused(s)) => {
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(s.message().contains("suspended"), "{}", s.message());
        }
        other => panic!(
            "a suspended tenant enrolled an agent: {:?}",
            other.map(|a| a.peer_id)
        ),
    }
    op.resume_tenant(TenantRef { tenant_id: tid })
        .await
        .unwrap();
    assert_eq!(
        c.list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .len(),
        1
    );
    x.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_lists_and_deletes_tenants_and_a_tenant_token_is_no_operator_credential() {
    let c = Cluster::new();
    let r = c.replica().await;
    let (gone, tg) = signup(&r, "gone", "team").await;
    let (kept, tk) = signup(&r, "kept", "free").await;
    for (t, cidr) in [(&tg, "100.64.0.0/24"), (&tk, "100.65.0.0/24")] {
        let mut c = console_as(&r, t).await;
        let join = network_and_join(&mut c, "n", cidr).await;
        TestAgent::join(&join, "a").await.unwrap().stop().await;
    }
    let s = operator(&r, &tk)
        .await
        .list_tenants(ListTenantsRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unauthenticated,
        "a tenant's API token is not the operator credential"
    );
    let mut op = operator(&r, OPERATOR).await;
    let list = tenants(&mut op).await;
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|t| t.networks == 1 && t.peers == 1));

    let d = op
        .delete_tenant(TenantRef {
            tenant_id: gone.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.networks_deleted, d.peers_deleted), (1, 1));
    let leftovers = keys_mentioning(&r, &gone).await;
    assert!(
        leftovers.is_empty(),
        "nothing of the deleted tenant remains: {leftovers:?}"
    );
    let s = console_as(&r, &tg)
        .await
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(
        console_as(&r, &tk)
            .await
            .list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .len(),
        1,
        "the other tenant is untouched"
    );
    let list = tenants(&mut op).await;
    assert_eq!(
        list.iter()
            .map(|t| t.subscription.clone().unwrap().tenant_id)
            .collect::<Vec<_>>(),
        [kept]
    );
    let s = op
        .delete_tenant(TenantRef { tenant_id: gone })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}

async fn tenants(op: &mut Operator) -> Vec<TenantSummary> {
    let list = op.list_tenants(ListTenantsRequest {}).await.unwrap();
    list.into_inner().tenants
}

/// Every store key that contains `text`.
async fn keys_mentioning(r: &Running, text: &str) -> Vec<String> {
    let all = r.controller.store.range(b"/").await.unwrap();
    all.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .filter(|k| k.contains(text))
        .collect()
}

async fn audit(c: &mut Client, req: ListAuditRequest) -> Vec<AuditEntry> {
    c.list_audit(req).await.unwrap().into_inner().entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_says_who_did_what_to_which_object_newest_first() {
    let c = Cluster::new();
    let r = c.replica().await;
    let (_, t) = signup(&r, "audited", "team").await;
    let (_, other) = signup(&r, "other", "team").await;
    let mut c = console_as(&r, &t).await;
    let tokens = c.list_api_tokens(ListApiTokensRequest {}).await.unwrap();
    let admin_id = tokens.into_inner().tokens[0].id.clone();
    let n = c
        .create_network(net("n", "100.64.0.0/24"))
        .await
        .unwrap()
        .into_inner();
    let jt = c.create_join_token(tok("n")).await.unwrap().into_inner();
    let a = TestAgent::join(&jt.join_string, "a").await.unwrap();
    c.remove_peer(RemovePeerRequest {
        peer_id: a.peer_id.clone(),
    })
    .await
    .unwrap();
    let _ = c
        .create_network(net("bad", "10.0.0.1/24"))
        .await
        .unwrap_err(); // refused: not audited

    let all = audit(&mut c, ListAuditRequest::default()).await;
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "peer.remove",
            "peer.enroll",
            "token.create",
            "network.create"
        ]
    );
    assert_eq!(
        (all[0].actor.as_str(), all[0].object.as_str()),
        (admin_id.as_str(), a.peer_id.as_str())
    );
    assert_eq!(
        all[1].actor,
        jt.token.unwrap().id,
        "an enrollment's actor is the join token"
    );
    assert_eq!(all[3].object, n.id);
    assert!(all.windows(2).all(|w| w[0].at_unix_ms >= w[1].at_unix_ms));
    let by_action = ListAuditRequest {
        action: "peer.".into(),
        ..Default::default()
    };
    assert_eq!(audit(&mut c, by_action).await.len(), 2);
    let by_object = ListAuditRequest {
        object: n.id.clone(),
        ..Default::default()
    };
    assert_eq!(audit(&mut c, by_object).await.len(), 1);
    let one = ListAuditRequest {
        limit: 1,
        ..Default::default()
    };
    assert_eq!(audit(&mut c, one).await.len(), 1);
    // Another tenant's log is its own.
    let mut theirs = console_as(&r, &other).await;
    assert!(
        audit(&mut theirs, ListAuditRequest::default())
            .await
            .is_empty()
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tenant_is_final_while_it_keeps_writing() {
    let c = Cluster::new();
    let (r1, r2) = (c.replica().await, c.replica().await);
    for trial in 0..6 {
        let (tenant, t) = signup(&r1, &format!("doomed{trial}"), "business").await;
        let mut c = console_as(&r2, &t).await;
        let join = network_and_join(&mut c, "n0", "10.0.0.0/24").await;
        // The tenant keeps creating networks and join tokens while the operator deletes it.
        let writer = tokio::spawn(async move {
            for i in 1..40 {
                let _ = c
                    .create_network(net(&format!("n{i}"), &format!("10.{i}.0.0/24")))
                    .await;
                let _ = c.create_join_token(tok("n0")).await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20 * trial)).await;
        operator(&r1, OPERATOR)
            .await
            .delete_tenant(TenantRef {
                tenant_id: tenant.clone(),
            })
            .await
            .unwrap();
        writer.await.unwrap();
        // Nothing of the tenant survives, on either replica's store view.
        let store = &r1.controller.store;
        for prefix in ["networks", "tokens", "apitokenlist", "tenants", "netnames"] {
            let left = store
                .range(format!("/canopy/v1/{prefix}/{tenant}").as_bytes())
                .await
                .unwrap()
                .kvs
                .len();
            assert_eq!(left, 0, "trial {trial}: {left} {prefix} records survived");
        }
        let Err(e) = TestAgent::join(&join, "late").await else {
            panic!("trial {trial}: a deleted tenant's join token still enrolls");
        };
        assert!(
            format!("{e:?}").contains("not valid"),
            "trial {trial}: {e:?}"
        );
        let s = console_as(&r2, &t)
            .await
            .list_networks(ListNetworksRequest {})
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
}
