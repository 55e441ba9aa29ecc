//! Hosted mode: two tenants on two replicas over a real etcd. Isolation, quotas under races,
//! token scopes, plans, a suspended tenant, and no private key anywhere in the store.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use canopy_controller::console::{self, Client};
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_proto::join::JoinString;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::hosted_service_client::HostedServiceClient;
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::etcd::Etcd;
use tonic::Code;

const OPERATOR: &str = "op-secret-for-tests";

async fn replica(data: &Path, etcd: &str, hosted: bool) -> Running {
    server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.to_string()])),
        hosted,
        operator_token: Some(OPERATOR.into()),
        signups_per_hour: 3600,
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), data.to_path_buf())
    })
    .await
    .unwrap()
}

async fn hosted_client(r: &Running) -> HostedServiceClient<tonic::transport::Channel> {
    let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
        .await
        .unwrap();
    HostedServiceClient::new(ch)
}

async fn signup(r: &Running, org: &str, plan: &str) -> (String, String) {
    let req = SignUpRequest {
        org: org.into(),
        email: format!("ops@{org}.example"),
        plan: plan.into(),
    };
    let resp = hosted_client(r)
        .await
        .sign_up(req)
        .await
        .unwrap()
        .into_inner();
    (resp.tenant_id, resp.api_token)
}

async fn console_as(r: &Running, token: &str) -> Client {
    console::connect(&r.url, &Trust::CaPem(r.ca_pem.clone().into_bytes()), token)
        .await
        .unwrap()
}

fn net(name: &str, cidr: &str) -> CreateNetworkRequest {
    CreateNetworkRequest {
        name: name.into(),
        cidrs: vec![cidr.into()],
    }
}

fn tok(network: &str) -> CreateJoinTokenRequest {
    CreateJoinTokenRequest {
        network: network.into(),
        max_uses: 0,
        ttl_seconds: 600,
        tags: vec![],
    }
}

/// The status a genuinely missing object gets, for comparison.
fn missing<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> String {
    let s = r.expect_err(what);
    assert_eq!(s.code(), Code::NotFound, "{what}: {}", s.message());
    s.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_objects_answer_exactly_as_missing_ones_on_every_call() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (
        replica(dir.path(), &etcd.endpoint, true).await,
        replica(dir.path(), &etcd.endpoint, true).await,
    );
    let (_, tok_a) = signup(&r1, "alpha", "team").await;
    let (_, tok_b) = signup(&r2, "beta", "team").await;
    // B's objects, made through replica 2.
    let mut b = console_as(&r2, &tok_b).await;
    let nb = b
        .create_network(net("shared-name", "100.64.0.0/24"))
        .await
        .unwrap()
        .into_inner();
    let jt = b.create_join_token(tok(&nb.id)).await.unwrap().into_inner();
    let peer = TestAgent::join(&jt.join_string, "b1").await.unwrap();
    let api_b = b
        .create_api_token(CreateApiTokenRequest {
            name: "ci".into(),
            scope: "read".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (tid, aid) = (jt.token.unwrap().id, api_b.token.unwrap().id);

    // A, through replica 1, with B's ids: every call answers like a missing object would.
    let mut a = console_as(&r1, &tok_a).await;
    let cases: Vec<(&str, String, String)> = vec![
        (
            "get network",
            missing(
                "get",
                a.get_network(GetNetworkRequest {
                    network: nb.id.clone(),
                })
                .await,
            ),
            missing(
                "get",
                a.get_network(GetNetworkRequest {
                    network: "net_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "get network by name",
            missing(
                "name",
                a.get_network(GetNetworkRequest {
                    network: "shared-name".into(),
                })
                .await,
            ),
            missing(
                "name",
                a.get_network(GetNetworkRequest {
                    network: "no-such-name".into(),
                })
                .await,
            ),
        ),
        (
            "delete network",
            missing(
                "delete",
                a.delete_network(DeleteNetworkRequest {
                    network: nb.id.clone(),
                })
                .await,
            ),
            missing(
                "delete",
                a.delete_network(DeleteNetworkRequest {
                    network: "net_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "create join token",
            missing("token", a.create_join_token(tok(&nb.id)).await),
            missing(
                "token",
                a.create_join_token(tok("net_0000000000000000")).await,
            ),
        ),
        (
            "list join tokens",
            missing(
                "tokens",
                a.list_join_tokens(ListJoinTokensRequest {
                    network: nb.id.clone(),
                })
                .await,
            ),
            missing(
                "tokens",
                a.list_join_tokens(ListJoinTokensRequest {
                    network: "net_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "revoke join token",
            missing(
                "revoke",
                a.revoke_join_token(RevokeJoinTokenRequest {
                    token_id: tid.clone(),
                })
                .await,
            ),
            missing(
                "revoke",
                a.revoke_join_token(RevokeJoinTokenRequest {
                    token_id: "tok_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "list peers",
            missing(
                "peers",
                a.list_peers(ListPeersRequest {
                    network: nb.id.clone(),
                })
                .await,
            ),
            missing(
                "peers",
                a.list_peers(ListPeersRequest {
                    network: "net_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "get peer",
            missing(
                "peer",
                a.get_peer(GetPeerRequest {
                    peer_id: peer.peer_id.clone(),
                })
                .await,
            ),
            missing(
                "peer",
                a.get_peer(GetPeerRequest {
                    peer_id: "peer_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "remove peer",
            missing(
                "remove",
                a.remove_peer(RemovePeerRequest {
                    peer_id: peer.peer_id.clone(),
                })
                .await,
            ),
            missing(
                "remove",
                a.remove_peer(RemovePeerRequest {
                    peer_id: "peer_0000000000000000".into(),
                })
                .await,
            ),
        ),
        (
            "revoke api token",
            missing(
                "api",
                a.revoke_api_token(RevokeApiTokenRequest {
                    token_id: aid.clone(),
                })
                .await,
            ),
            missing(
                "api",
                a.revoke_api_token(RevokeApiTokenRequest {
                    token_id: "api_0000000000000000".into(),
                })
                .await,
            ),
        ),
    ];
    for (what, theirs, absent) in cases {
        let shape = |m: &str| {
            m.split('"')
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(_, p)| p.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shape(&theirs),
            shape(&absent),
            "{what}: {theirs:?} vs {absent:?}"
        );
    }
    // Lists show none of B's objects.
    assert!(
        a.list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .is_empty()
    );
    assert!(
        a.list_join_tokens(ListJoinTokensRequest {
            network: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .is_empty()
    );
    let a_tokens = a
        .list_api_tokens(ListApiTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(a_tokens.iter().all(|t| t.id != aid));
    // And nothing of B's was touched.
    assert_eq!(
        b.list_peers(ListPeersRequest {
            network: nb.id.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .peers
        .len(),
        1
    );
    let b_tokens = b
        .list_join_tokens(ListJoinTokensRequest {
            network: nb.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(!b_tokens[0].revoked);
    // Same network name in another tenant is fine.
    a.create_network(net("shared-name", "100.64.0.0/24"))
        .await
        .unwrap();
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_when_creates_race_through_two_replicas() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (
        replica(dir.path(), &etcd.endpoint, true).await,
        replica(dir.path(), &etcd.endpoint, true).await,
    );
    let (_, t) = signup(&r1, "small", "free").await;
    let (c1, c2) = (console_as(&r1, &t).await, console_as(&r2, &t).await);

    // Free: 3 networks. Eight race for them through both replicas.
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

    // Free: 5 active join tokens.
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

    // Free: 25 peers per network. Thirty race for them through both replicas.
    let join = joins[0].clone();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let mut j = canopy_proto::join::JoinString::parse(&join).unwrap();
            if i % 2 == 1 {
                j.controller_url = r2.url.clone();
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
async fn read_only_tokens_cannot_change_anything_and_revoked_tokens_stop_working() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (_, admin) = signup(&r, "scoped", "team").await;
    let mut a = console_as(&r, &admin).await;
    a.create_network(net("n", "10.0.0.0/24")).await.unwrap();
    let ro = a
        .create_api_token(CreateApiTokenRequest {
            name: "dash".into(),
            scope: "read".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut reader = console_as(&r, &ro.secret).await;
    assert_eq!(
        reader
            .list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .len(),
        1
    );
    for s in [
        reader
            .create_network(net("m", "10.1.0.0/24"))
            .await
            .unwrap_err(),
        reader
            .delete_network(DeleteNetworkRequest {
                network: "n".into(),
            })
            .await
            .unwrap_err(),
        reader.create_join_token(tok("n")).await.unwrap_err(),
        reader
            .create_api_token(CreateApiTokenRequest {
                name: "x".into(),
                scope: "admin".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("read-only"), "{}", s.message());
    }
    let bad = a
        .create_api_token(CreateApiTokenRequest {
            name: "x".into(),
            scope: "root".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    a.revoke_api_token(RevokeApiTokenRequest {
        token_id: ro.token.unwrap().id,
    })
    .await
    .unwrap();
    let s = reader
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_plans_and_usage() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
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
    let dir2 = tempfile::tempdir().unwrap();
    let plain = replica(dir2.path(), &Etcd::start().endpoint, false).await;
    let s = hosted_client(&plain)
        .await
        .sign_up(bad("x", "a@b.c", "free"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    plain.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tenant_is_refused_but_its_agents_keep_their_map() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (tid, t) = signup(&r, "late-payer", "team").await;
    let mut c = console_as(&r, &t).await;
    c.create_network(net("n", "100.64.0.0/24")).await.unwrap();
    let join = c
        .create_join_token(tok("n"))
        .await
        .unwrap()
        .into_inner()
        .join_string;
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

type Operator = canopy_proto::v1::operator_service_client::OperatorServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, console::Bearer>,
>;

async fn operator(r: &Running, token: &str) -> Operator {
    let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
        .await
        .unwrap();
    canopy_proto::v1::operator_service_client::OperatorServiceClient::with_interceptor(
        ch,
        console::Bearer(format!("Bearer {token}").parse().unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_lists_and_deletes_tenants_and_a_tenant_token_is_no_operator_credential() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (gone, tg) = signup(&r, "gone", "team").await;
    let (kept, tk) = signup(&r, "kept", "free").await;
    for (t, cidr) in [(&tg, "100.64.0.0/24"), (&tk, "100.65.0.0/24")] {
        let mut c = console_as(&r, t).await;
        c.create_network(net("n", cidr)).await.unwrap();
        let join = c
            .create_join_token(tok("n"))
            .await
            .unwrap()
            .into_inner()
            .join_string;
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
    let list = op
        .list_tenants(ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
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
    let all = r.controller.store.range(b"/").await.unwrap();
    let leftovers: Vec<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .filter(|k| k.contains(&gone))
        .collect();
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
    let list = op
        .list_tenants(ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_private_key_is_anywhere_in_the_store_after_enrollments() {
    use base64::Engine as _;
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (_, t) = signup(&r, "keys", "team").await;
    let mut c = console_as(&r, &t).await;
    c.create_network(net("n", "100.64.0.0/24")).await.unwrap();
    let join = c
        .create_join_token(tok("n"))
        .await
        .unwrap()
        .into_inner()
        .join_string;
    let mut agents = Vec::new();
    for i in 0..5 {
        agents.push(TestAgent::join(&join, &format!("k{i}")).await.unwrap());
    }
    let all = r.controller.store.range(b"/").await.unwrap();
    assert!(all.kvs.len() > 10);
    let blob: Vec<u8> = all
        .kvs
        .iter()
        .flat_map(|kv| kv.key.iter().chain(kv.value.iter()).copied())
        .collect();
    let contains = |needle: &[u8]| blob.windows(needle.len()).any(|w| w == needle);
    for a in &agents {
        let private = a.key.secret().to_bytes();
        assert!(
            !contains(&private),
            "a private key's bytes are in the store"
        );
        assert!(!contains(
            base64::engine::general_purpose::STANDARD
                .encode(private)
                .as_bytes()
        ));
        assert!(!contains(hex::encode(private).as_bytes()));
        assert!(
            contains(&a.key.public_key()),
            "the public key is stored (the scan can find keys)"
        );
    }
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_says_who_did_what_to_which_object_newest_first() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (_, t) = signup(&r, "audited", "team").await;
    let (_, other) = signup(&r, "other", "team").await;
    let mut c = console_as(&r, &t).await;
    let admin_id = c
        .list_api_tokens(ListApiTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens[0]
        .id
        .clone();
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

    let all = c
        .list_audit(ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
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
    let peers = c
        .list_audit(ListAuditRequest {
            action: "peer.".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(peers.len(), 2);
    let about = c
        .list_audit(ListAuditRequest {
            object: n.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(about.len(), 1);
    assert_eq!(
        c.list_audit(ListAuditRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .len(),
        1
    );
    // Another tenant's log is its own.
    let theirs = console_as(&r, &other)
        .await
        .list_audit(ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(theirs.is_empty());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_per_token_rate_are_refused_without_affecting_other_tokens() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.endpoint.clone()])),
        hosted: true,
        api_requests_per_sec: 5,
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    let (_, t1) = signup(&r, "busy", "team").await;
    let (_, t2) = signup(&r, "calm", "team").await;
    let mut busy = console_as(&r, &t1).await;
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..40 {
        match busy.list_networks(ListNetworksRequest {}).await {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted);
                assert!(
                    s.message()
                        .contains("rate limit: 5 requests per second per tenant"),
                    "{}",
                    s.message()
                );
                limited += 1;
            }
        }
    }
    assert!(ok >= 10 && limited > 0, "ok {ok}, limited {limited}");
    console_as(&r, &t2)
        .await
        .list_networks(ListNetworksRequest {})
        .await
        .expect("another token has its own budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_tokens_share_one_rate_limit_and_api_tokens_are_capped_by_plan() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.endpoint.clone()])),
        hosted: true,
        api_requests_per_sec: 5,
        signups_per_hour: 3600,
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    let (_, admin) = signup(&r, "spread", "free").await;
    let mut a = console_as(&r, &admin).await;
    // The free plan allows 5 API tokens: the sign-up's admin token and four more.
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(
            a.create_api_token(CreateApiTokenRequest {
                name: format!("t{i}"),
                scope: "read".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .secret,
        );
    }
    let s = a
        .create_api_token(CreateApiTokenRequest {
            name: "one-too-many".into(),
            scope: "read".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(
        s.message().contains("allows 5 API tokens"),
        "{}",
        s.message()
    );
    // Spreading requests over the tenant's five tokens buys no more than one token's budget.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut clients = vec![a];
    for t in &tokens {
        clients.push(console_as(&r, t).await);
    }
    let (mut ok, mut limited) = (0, 0);
    for round in 0..10 {
        for c in clients.iter_mut() {
            match c.list_networks(ListNetworksRequest {}).await {
                Ok(_) => ok += 1,
                Err(s) if s.code() == Code::ResourceExhausted => limited += 1,
                Err(s) => panic!("round {round}: {s:?}"),
            }
        }
    }
    // 50 requests in well under a second: a burst of 10 and a few refills, not 5 × that.
    assert!(ok <= 20 && limited >= 30, "ok {ok}, limited {limited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sign_up_is_throttled_per_source_and_checks_email_addresses() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![etcd.endpoint.clone()])),
        hosted: true,
        operator_token: Some(OPERATOR.into()),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    })
    .await
    .unwrap();
    let mut h = hosted_client(&r).await;
    for bad in ["ops@acme.example\r\nBcc: x@y.z", "a@.", "a@b", "a b@c.d"] {
        let s = h
            .sign_up(SignUpRequest {
                org: "acme".into(),
                email: bad.into(),
                plan: "free".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}: {}", s.message());
        assert!(!s.message().contains('\r'), "the message echoes no raw CR");
    }
    let (mut ok, mut throttled) = (0, 0);
    for i in 0..30 {
        match h
            .sign_up(SignUpRequest {
                org: format!("org{i}"),
                email: format!("ops@org{i}.example"),
                plan: "free".into(),
            })
            .await
        {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                throttled += 1;
            }
        }
    }
    // The four refused above spent from the same budget of 5.
    assert!(ok <= 5 && throttled >= 25, "ok {ok}, throttled {throttled}");
    assert!(
        operator(&r, OPERATOR)
            .await
            .list_tenants(ListTenantsRequest {})
            .await
            .unwrap()
            .into_inner()
            .tenants
            .len()
            <= 5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_racing_network_creates_never_leaves_more_than_the_plan_allows() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (
        replica(dir.path(), &etcd.endpoint, true).await,
        replica(dir.path(), &etcd.endpoint, true).await,
    );
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
async fn deleting_a_tenant_is_final_while_it_keeps_writing() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (
        replica(dir.path(), &etcd.endpoint, true).await,
        replica(dir.path(), &etcd.endpoint, true).await,
    );
    for trial in 0..6 {
        let (tenant, t) = signup(&r1, &format!("doomed{trial}"), "business").await;
        let mut c = console_as(&r2, &t).await;
        c.create_network(net("n0", "10.0.0.0/24")).await.unwrap();
        let join = c
            .create_join_token(tok("n0"))
            .await
            .unwrap()
            .into_inner()
            .join_string;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_token_cannot_be_revoked_and_the_operator_can_reset_a_locked_out_tenant() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
    let (tenant, admin) = signup(&r, "careless", "team").await;
    let mut c = console_as(&r, &admin).await;
    let s = c
        .create_api_token(CreateApiTokenRequest {
            name: "no-scope".into(),
            scope: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "an empty scope is no admin scope"
    );
    let tokens = c
        .list_api_tokens(ListApiTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 1, "nothing was created");
    let s = c
        .revoke_api_token(RevokeApiTokenRequest {
            token_id: tokens[0].id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    assert!(
        s.message().contains("last admin API token"),
        "{}",
        s.message()
    );

    // Two admin tokens revoked at once: one revocation wins, the tenant keeps an admin.
    let second = c
        .create_api_token(CreateApiTokenRequest {
            name: "second".into(),
            scope: "admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut c2 = console_as(&r, &second.secret).await;
    let (id1, id2) = (tokens[0].id.clone(), second.token.unwrap().id);
    let (a, b) = tokio::join!(
        c.revoke_api_token(RevokeApiTokenRequest { token_id: id2 }),
        c2.revoke_api_token(RevokeApiTokenRequest { token_id: id1 }),
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one revocation wins: {a:?} {b:?}"
    );

    // The operator gives a tenant a new admin token; it works at once.
    let reset = operator(&r, OPERATOR)
        .await
        .reset_admin_token(TenantRef {
            tenant_id: tenant.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reset.token.unwrap().scope, "admin");
    let mut c3 = console_as(&r, &reset.secret).await;
    c3.create_network(net("back", "10.9.0.0/24")).await.unwrap();
    let s = operator(&r, &admin)
        .await
        .reset_admin_token(TenantRef { tenant_id: tenant })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "only the operator resets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_quota_counts_removals_and_concurrent_enrollments() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), &etcd.endpoint, true).await;
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
