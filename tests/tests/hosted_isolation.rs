//! Hosted mode, isolation: another tenant's objects answer exactly as missing ones, on every call,
//! and no private key is anywhere in the store.
//! Two replicas of `canopy serve --hosted` over a real etcd. Needs etcd (deploy/install-deps.sh).
#![allow(clippy::unwrap_used)]

use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::hosted::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_objects_answer_exactly_as_missing_ones_on_every_call() {
    let c = Cluster::new();
    let (r1, r2) = (c.replica().await, c.replica().await);
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
async fn no_private_key_is_anywhere_in_the_store_after_enrollments() {
    use base64::Engine as _;
    let c = Cluster::new();
    let r = c.replica().await;
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
