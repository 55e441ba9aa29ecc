//! The `controller` target: console and agent requests as protobuf bytes, run by a real
//! controller on an embedded store.

use std::sync::Arc;

use crate::public;

struct Ctl {
    rt: tokio::runtime::Runtime,
    ctl: canopy_controller::service::Controller,
    _dir: tempfile::TempDir,
}

fn caller() -> canopy_controller::service::Caller {
    canopy_controller::service::Caller {
        tenant: canopy_controller::service::DEFAULT_TENANT.into(),
        token_id: "fuzz".into(),
        scope: canopy_controller::plans::Scope::Admin,
        plan: canopy_controller::plans::Plan::SelfManaged,
    }
}

fn new_controller() -> Ctl {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = rt.block_on(async {
        let store: Arc<dyn canopy_controller::store::Store> = Arc::new(
            canopy_controller::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb"))
                .expect("store"),
        );
        let cache = canopy_controller::cache::Cache::start(store.clone())
            .await
            .expect("cache");
        let ctl = canopy_controller::service::Controller::new(
            store,
            cache,
            "https://127.0.0.1:7443".into(),
            [0; 32],
        );
        // Something to act on: a network and a join token.
        let c = caller();
        let _ = ctl
            .create_network(&c, "prod", &["100.64.0.0/16".into()])
            .await;
        ctl
    });
    Ctl { rt, ctl, _dir: dir }
}

/// Requests 0-5: networks, join tokens, enrollment, peers.
async fn call_first(
    ctl: &canopy_controller::service::Controller,
    c: &canopy_controller::service::Caller,
    op: u8,
    body: &[u8],
) {
    use canopy_proto::v1::*;
    use prost::Message as _;
    match op {
        0 => {
            if let Ok(r) = CreateNetworkRequest::decode(body) {
                let _ = ctl.create_network(c, &r.name, &r.cidrs).await;
            }
        }
        1 => {
            if let Ok(r) = CreateJoinTokenRequest::decode(body) {
                let _ = ctl
                    .create_join_token(c, &r.network, r.max_uses, r.ttl_seconds, &r.tags)
                    .await;
            }
        }
        2 => {
            if let Ok(r) = EnrollRequest::decode(body) {
                let _ = ctl.enroll_request(&r).await;
            }
        }
        3 => {
            if let Ok(r) = ListPeersRequest::decode(body) {
                let _ = ctl.list_peers(c, &r.network, r.paths).await;
            }
        }
        4 => {
            if let Ok(r) = RemovePeerRequest::decode(body) {
                let _ = ctl.remove_peer(c, &r.peer_id).await;
            }
        }
        5 => {
            if let Ok(r) = GetNetworkRequest::decode(body) {
                let _ = ctl.get_network(c, &r.network).await;
            }
        }
        _ => {}
    }
}

/// Requests 6-16: API tokens, audit, policy, tags, revocation, routes, the network lock.
async fn call_second(
    ctl: &canopy_controller::service::Controller,
    c: &canopy_controller::service::Caller,
    op: u8,
    body: &[u8],
) {
    use canopy_proto::v1::*;
    use prost::Message as _;
    match op {
        6 => {
            if let Ok(r) = CreateApiTokenRequest::decode(body) {
                let _ = ctl.create_api_token_for(c, &r.name, &r.scope).await;
            }
        }
        9 => {
            if let Ok(r) = SetPolicyRequest::decode(body) {
                let text = (!r.remove).then_some(r.text.as_str());
                let lock = r.lock.as_ref();
                let _ = ctl
                    .set_policy(c, &r.network, text, r.if_revision, lock)
                    .await;
            }
        }
        11 => {
            if let Ok(r) = TagPeerRequest::decode(body) {
                let _ = ctl.tag_peer(c, &r.peer_id, &r.add, &r.remove).await;
            }
        }
        10 => {
            if let Ok(r) = TestPolicyRequest::decode(body) {
                let _ = ctl
                    .test_policy(c, &r.network, &r.from, &r.to, &r.proto, r.port)
                    .await;
            }
        }
        7 => {
            if let Ok(r) = ListAuditRequest::decode(body) {
                let _ = ctl.list_audit(c, r.limit, &r.action, &r.object).await;
            }
        }
        12 => {
            if let Ok(r) = AdvertiseRouteRequest::decode(body) {
                let _ = ctl.advertise_route(c, &r.peer_id, &r.prefix).await;
            }
        }
        13 => {
            if let Ok(r) = RemoveRouteRequest::decode(body) {
                let _ = ctl.remove_route(c, &r.route_id).await;
            }
        }
        8 => {
            if let Ok(r) = RevokeJoinTokenRequest::decode(body) {
                let _ = ctl.revoke_join_token(c, &r.token_id).await;
            }
        }
        14 => {
            if let Ok(r) = SetLockKeysRequest::decode(body) {
                let signed = r.key_set.unwrap_or_default();
                let _ = ctl.set_lock_keys(c, &r.network, &signed).await;
            }
        }
        15 => {
            if let Ok(r) = SignLockRequest::decode(body) {
                let p = r.policy.as_ref();
                let _ = ctl.sign_lock(c, &r.network, &r.peers, &r.routes, p).await;
            }
        }
        16 => {
            if let Ok(r) = GetNetworkLockRequest::decode(body) {
                let _ = ctl.get_network_lock(c, &r.network).await;
            }
        }
        _ => {}
    }
}

/// The first byte picks the request type, the rest is that request's protobuf bytes; a
/// message that does not decode is what tonic answers InvalidArgument for.
pub(crate) fn controller(data: &[u8]) {
    thread_local! {
        static CTL: Ctl = new_controller();
    }
    let Some((&op, body)) = data.split_first() else {
        return;
    };
    CTL.with(|h| {
        let ctl = &h.ctl;
        let c = caller();
        h.rt.block_on(async {
            let op = op % 17;
            if op < 6 {
                call_first(ctl, &c, op, body).await;
            } else {
                call_second(ctl, &c, op, body).await;
            }
            // Every answer becomes a status the same way tonic would send it.
            let _ = tonic_status_of(ctl.get_network(&c, "prod").await.err());
        });
    });
}

fn tonic_status_of(e: Option<canopy_controller::error::Error>) -> Option<usize> {
    e.map(|e| {
        let s: tonic::Status = e.into();
        assert!(s.message().len() <= 1100, "status message over 1 KB");
        s.message().len()
    })
}

pub(crate) fn controller_seeds() -> Vec<Vec<u8>> {
    use canopy_proto::v1::*;
    use prost::Message as _;
    let with = |op: u8, m: Vec<u8>| {
        let mut v = vec![op];
        v.extend(m);
        v
    };
    vec![
        with(
            0,
            CreateNetworkRequest {
                name: "lab".into(),
                cidrs: vec!["10.9.0.0/24".into(), "fd7a:9::/64".into()],
            }
            .encode_to_vec(),
        ),
        with(
            1,
            CreateJoinTokenRequest {
                network: "prod".into(),
                max_uses: 2,
                ttl_seconds: 60,
                tags: vec!["web".into()],
            }
            .encode_to_vec(),
        ),
        with(
            2,
            EnrollRequest {
                join_token: "cjt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
                public_key: public(9).to_vec(),
                hostname: "h".into(),
                listen_port: 51820,
                credential: String::new(),
            }
            .encode_to_vec(),
        ),
        with(
            3,
            ListPeersRequest {
                network: "prod".into(),
                paths: false,
            }
            .encode_to_vec(),
        ),
        with(
            6,
            CreateApiTokenRequest {
                name: "ci".into(),
                scope: "read".into(),
            }
            .encode_to_vec(),
        ),
    ]
}
