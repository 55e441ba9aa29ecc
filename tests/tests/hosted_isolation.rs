//! Hosted mode, isolation: another tenant's objects answer exactly as missing ones, on every call,
//! and no private key is anywhere in the store.
//! Two replicas of `canopy serve --hosted` over a real etcd. Needs etcd (deploy/install-deps.sh).
#![allow(clippy::unwrap_used)]

use canopy_controller::console::Client;
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
    let route = b
        .advertise_route(AdvertiseRouteRequest {
            peer_id: peer.peer_id.clone(),
            prefix: "10.20.0.0/24".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // A, through replica 1, with B's ids: every call answers like a missing object would.
    let mut a = console_as(&r1, &tok_a).await;
    let cases = cases(&nb.id, &tid, &aid, &peer.peer_id, &route.id);
    for (what, theirs, absent) in cases {
        let (theirs, absent) = (
            call(&mut a, what, &theirs).await,
            call(&mut a, what, absent).await,
        );
        assert_eq!(
            shape(&theirs),
            shape(&absent),
            "{what:?}: {theirs:?} vs {absent:?}"
        );
    }
    lists_show_nothing_of_theirs(&mut a, &aid).await;
    // And nothing of B's was touched.
    assert_eq!(
        b.list_peers(ListPeersRequest {
            network: nb.id.clone(),
            paths: false,
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

/// Every call that takes an id, with B's object and an id nobody has.
fn cases(
    net: &str,
    tid: &str,
    aid: &str,
    peer: &str,
    route: &str,
) -> Vec<(Call, String, &'static str)> {
    vec![
        (Call::GetNetwork, net.to_string(), "net_0000000000000000"),
        (Call::GetNetwork, "shared-name".to_string(), "no-such-name"),
        (Call::DeleteNetwork, net.to_string(), "net_0000000000000000"),
        (Call::SetNetworkDns, net.to_string(), "net_0000000000000000"),
        (
            Call::CreateJoinToken,
            net.to_string(),
            "net_0000000000000000",
        ),
        (
            Call::ListJoinTokens,
            net.to_string(),
            "net_0000000000000000",
        ),
        (
            Call::RevokeJoinToken,
            tid.to_string(),
            "tok_0000000000000000",
        ),
        (Call::ListPeers, net.to_string(), "net_0000000000000000"),
        (Call::GetPeer, peer.to_string(), "peer_0000000000000000"),
        (Call::RemovePeer, peer.to_string(), "peer_0000000000000000"),
        (
            Call::RevokeApiToken,
            aid.to_string(),
            "api_0000000000000000",
        ),
        (Call::TagPeer, peer.to_string(), "peer_0000000000000000"),
        (Call::SetExitNode, peer.to_string(), "peer_0000000000000000"),
        (Call::GetPolicy, net.to_string(), "net_0000000000000000"),
        (Call::SetPolicy, net.to_string(), "net_0000000000000000"),
        (Call::TestPolicy, net.to_string(), "net_0000000000000000"),
        (
            Call::AdvertiseRoute,
            peer.to_string(),
            "peer_0000000000000000",
        ),
        (Call::ListRoutes, net.to_string(), "net_0000000000000000"),
        (
            Call::ApproveRoute,
            route.to_string(),
            "route_0000000000000000",
        ),
        (
            Call::RemoveRoute,
            route.to_string(),
            "route_0000000000000000",
        ),
        (
            Call::GetNetworkLock,
            net.to_string(),
            "net_0000000000000000",
        ),
        (Call::SetLockKeys, net.to_string(), "net_0000000000000000"),
        (Call::SignLock, net.to_string(), "net_0000000000000000"),
    ]
}

/// The console calls that take an object id (or name).
#[derive(Clone, Copy, Debug)]
enum Call {
    GetNetwork,
    DeleteNetwork,
    SetNetworkDns,
    CreateJoinToken,
    ListJoinTokens,
    RevokeJoinToken,
    ListPeers,
    GetPeer,
    RemovePeer,
    RevokeApiToken,
    TagPeer,
    SetExitNode,
    GetPolicy,
    SetPolicy,
    TestPolicy,
    AdvertiseRoute,
    ListRoutes,
    ApproveRoute,
    RemoveRoute,
    GetNetworkLock,
    SetLockKeys,
    SignLock,
}

/// The error message `call` gets for object `id` (which must not exist for this caller).
async fn call(a: &mut Client, call: Call, id: &str) -> String {
    let (what, id) = (format!("{call:?}"), id.to_string());
    match call {
        Call::GetNetwork => missing(
            &what,
            a.get_network(GetNetworkRequest { network: id }).await,
        ),
        Call::DeleteNetwork => missing(
            &what,
            a.delete_network(DeleteNetworkRequest { network: id }).await,
        ),
        Call::CreateJoinToken => missing(&what, a.create_join_token(tok(&id)).await),
        Call::ListJoinTokens => missing(
            &what,
            a.list_join_tokens(ListJoinTokensRequest { network: id })
                .await,
        ),
        Call::RevokeJoinToken => missing(
            &what,
            a.revoke_join_token(RevokeJoinTokenRequest { token_id: id })
                .await,
        ),
        Call::ListPeers => missing(
            &what,
            a.list_peers(ListPeersRequest {
                network: id,
                paths: false,
            })
            .await,
        ),
        Call::GetPeer => missing(&what, a.get_peer(GetPeerRequest { peer_id: id }).await),
        Call::RemovePeer => missing(
            &what,
            a.remove_peer(RemovePeerRequest { peer_id: id }).await,
        ),
        Call::RevokeApiToken => missing(
            &what,
            a.revoke_api_token(RevokeApiTokenRequest { token_id: id })
                .await,
        ),
        _ => call_more(a, call, id).await,
    }
}

/// [`call`] for the calls about peers' tags and exit nodes, policies and routes.
async fn call_more(a: &mut Client, call: Call, id: String) -> String {
    let what = format!("{call:?}");
    match call {
        Call::TagPeer => {
            let req = TagPeerRequest {
                peer_id: id,
                add: vec!["x".into()],
                remove: vec![],
            };
            missing(&what, a.tag_peer(req).await)
        }
        Call::SetExitNode => {
            let req = SetExitNodeRequest {
                peer_id: id,
                exit_node: String::new(),
            };
            missing(&what, a.set_exit_node(req).await)
        }
        Call::SetNetworkDns => {
            let req = SetNetworkDnsRequest {
                network: id,
                domain: "stolen.example".into(),
            };
            missing(&what, a.set_network_dns(req).await)
        }
        Call::GetPolicy => missing(&what, a.get_policy(GetPolicyRequest { network: id }).await),
        Call::SetPolicy => {
            let req = SetPolicyRequest {
                network: id,
                text: "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\n".into(),
                ..Default::default()
            };
            missing(&what, a.set_policy(req).await)
        }
        Call::TestPolicy => {
            let req = TestPolicyRequest {
                network: id,
                from: "a".into(),
                to: "b".into(),
                proto: "tcp".into(),
                port: 22,
            };
            missing(&what, a.test_policy(req).await)
        }
        Call::AdvertiseRoute => {
            let req = AdvertiseRouteRequest {
                peer_id: id,
                prefix: "10.30.0.0/24".into(),
            };
            missing(&what, a.advertise_route(req).await)
        }
        Call::ListRoutes => missing(
            &what,
            a.list_routes(ListRoutesRequest { network: id }).await,
        ),
        Call::ApproveRoute => missing(
            &what,
            a.approve_route(ApproveRouteRequest { route_id: id }).await,
        ),
        Call::RemoveRoute => missing(
            &what,
            a.remove_route(RemoveRouteRequest { route_id: id }).await,
        ),
        _ => call_lock(a, call, id).await,
    }
}

/// The network lock's calls.
async fn call_lock(a: &mut Client, call: Call, id: String) -> String {
    let what = format!("{call:?}");
    match call {
        Call::GetNetworkLock => missing(
            &what,
            a.get_network_lock(GetNetworkLockRequest { network: id })
                .await,
        ),
        Call::SetLockKeys => {
            // A first key set for their network, signed by a key of its own.
            let k = canopy_proto::lock::signing_key([7; 32]);
            let set = LockKeySet {
                network_id: id.clone(),
                keys: vec![k.verifying_key().to_bytes().to_vec()],
                serial: 1,
                revoked: vec![],
            };
            let key_set = Some(canopy_proto::lock::sign(
                canopy_proto::lock::Kind::KeySet,
                &set,
                &k,
            ));
            let req = SetLockKeysRequest {
                network: id,
                key_set,
            };
            missing(&what, a.set_lock_keys(req).await)
        }
        Call::SignLock => {
            let req = SignLockRequest {
                network: id,
                ..Default::default()
            };
            missing(&what, a.sign_lock(req).await)
        }
        other => unreachable!("{other:?} is handled by call"),
    }
}

/// A message without its quoted parts (the ids), to compare two answers' shape.
fn shape(m: &str) -> Vec<String> {
    m.split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, p)| p.to_string())
        .collect()
}

/// A's lists hold none of B's networks, join tokens or API token `their_api_token`.
async fn lists_show_nothing_of_theirs(a: &mut Client, their_api_token: &str) {
    let networks = a.list_networks(ListNetworksRequest {}).await.unwrap();
    assert!(networks.into_inner().networks.is_empty());
    let all = ListJoinTokensRequest {
        network: String::new(),
    };
    assert!(
        a.list_join_tokens(all)
            .await
            .unwrap()
            .into_inner()
            .tokens
            .is_empty()
    );
    let tokens = a.list_api_tokens(ListApiTokensRequest {}).await.unwrap();
    assert!(
        tokens
            .into_inner()
            .tokens
            .iter()
            .all(|t| t.id != their_api_token)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_private_key_is_anywhere_in_the_store_after_enrollments() {
    use base64::Engine as _;
    let c = Cluster::new();
    let r = c.replica().await;
    let (_, t) = signup(&r, "keys", "team").await;
    let mut c = console_as(&r, &t).await;
    let join = network_and_join(&mut c, "n", "100.64.0.0/24").await;
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
