//! Hosted mode, API tokens and rates: scopes, revocation, the last admin token, per-tenant rate
//! limits and sign-up throttling.
//! Two replicas of `canopy serve --hosted` over a real etcd. Needs etcd (deploy/install-deps.sh).
#![allow(clippy::unwrap_used)]

use canopy_controller::server::{self, ServeConfig, StoreSpec};
use canopy_proto::v1::*;
use canopy_tests::hosted::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_tokens_cannot_change_anything_and_revoked_tokens_stop_working() {
    let c = Cluster::new();
    let r = c.replica().await;
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

/// A hosted replica allowing 5 requests a second per tenant, on a clock that moves only when
/// told (so the rate limit's budget is exact).
async fn rate_limited(c: &Cluster) -> (server::Running, canopy_controller::clock::Clock) {
    let clock = canopy_controller::clock::Clock::manual();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![c.etcd.endpoint.clone()])),
        hosted: true,
        api_requests_per_sec: 5,
        signups_per_hour: 3600,
        clock: clock.clone(),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), c.dir.path().to_path_buf())
    })
    .await
    .unwrap();
    (r, clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_per_token_rate_are_refused_without_affecting_other_tokens() {
    let c = Cluster::new();
    let (r, clock) = rate_limited(&c).await;
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
    assert_eq!(
        (ok, limited),
        (10, 30),
        "a burst of twice the rate, then nothing"
    );
    clock.advance(std::time::Duration::from_secs(1));
    busy.list_networks(ListNetworksRequest {})
        .await
        .expect("a second later the bucket has refilled");
    console_as(&r, &t2)
        .await
        .list_networks(ListNetworksRequest {})
        .await
        .expect("another token has its own budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_tokens_share_one_rate_limit_and_api_tokens_are_capped_by_plan() {
    let c = Cluster::new();
    let (r, clock) = rate_limited(&c).await;
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
    clock.advance(std::time::Duration::from_secs(3)); // the bucket is full again
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
    // 50 requests at one instant: one burst of 10 for the tenant, not 5 × that.
    assert_eq!((ok, limited), (10, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sign_up_is_throttled_per_source_and_checks_email_addresses() {
    let c = Cluster::new();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![c.etcd.endpoint.clone()])),
        hosted: true,
        operator_token: Some(OPERATOR.into()),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), c.dir.path().to_path_buf())
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
async fn the_last_admin_token_cannot_be_revoked_and_the_operator_can_reset_a_locked_out_tenant() {
    let c = Cluster::new();
    let r = c.replica().await;
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
