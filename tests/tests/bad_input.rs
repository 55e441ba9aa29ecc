//! Bad input gets the right gRPC status, a message that says what was wrong, and leaves the
//! store as it was (its revision does not move).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_agent::keys::PrivateKey;
use canopy_proto::join::JoinString;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::agent_service_client::AgentServiceClient;
use canopy_proto::v1::*;
use canopy_tests::{TestAgent, TestController};
use futures::StreamExt as _;
use tonic::Code;

fn check<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    says: &str,
) {
    let s = r.expect_err(what);
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    assert!(
        s.message().contains(says),
        "{what}: message {:?} should mention {says:?}",
        s.message()
    );
}

fn net(name: &str, cidrs: &[&str]) -> CreateNetworkRequest {
    CreateNetworkRequest {
        name: name.into(),
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
    }
}

/// Bad CIDRs, names and overlaps, with a network "prod" on 100.64.0.0/16 already there.
async fn refuses_bad_networks(con: &mut canopy_controller::console::Client) {
    check(
        "bad cidr",
        con.create_network(net("a", &["100.64.0.0/33"])).await,
        Code::InvalidArgument,
        "not a CIDR",
    );
    check(
        "host bits",
        con.create_network(net("a", &["10.0.0.1/24"])).await,
        Code::InvalidArgument,
        "did you mean 10.0.0.0/24",
    );
    check(
        "no cidr",
        con.create_network(net("a", &[])).await,
        Code::InvalidArgument,
        "one IPv4 CIDR",
    );
    check(
        "two v4",
        con.create_network(net("a", &["10.0.0.0/24", "10.1.0.0/24"]))
            .await,
        Code::InvalidArgument,
        "at most one IPv4",
    );
    check(
        "overlap",
        con.create_network(net("a", &["100.64.5.0/24"])).await,
        Code::FailedPrecondition,
        "overlaps 100.64.0.0/16",
    );
    check(
        "name",
        con.create_network(net("Bad Name", &["10.0.0.0/24"])).await,
        Code::InvalidArgument,
        "network name",
    );
    check(
        "duplicate",
        con.create_network(net("prod", &["10.9.0.0/24"])).await,
        Code::AlreadyExists,
        "already exists",
    );
}

/// Unknown networks, tokens and peers, and bad tags.
async fn refuses_unknown_ids_and_bad_tokens(con: &mut canopy_controller::console::Client) {
    check(
        "unknown net",
        con.get_network(GetNetworkRequest {
            network: "nope".into(),
        })
        .await,
        Code::NotFound,
        "\"nope\" not found",
    );
    check(
        "unknown id",
        con.delete_network(DeleteNetworkRequest {
            network: "net_0000".into(),
        })
        .await,
        Code::NotFound,
        "not found",
    );
    check(
        "peers of unknown",
        con.list_peers(ListPeersRequest {
            network: "nope".into(),
            paths: false,
        })
        .await,
        Code::NotFound,
        "not found",
    );
    let tok = |network: &str, tags: &[&str]| CreateJoinTokenRequest {
        network: network.into(),
        max_uses: 1,
        ttl_seconds: 60,
        tags: tags.iter().map(|s| s.to_string()).collect(),
    };
    check(
        "token unknown net",
        con.create_join_token(tok("nope", &[])).await,
        Code::NotFound,
        "not found",
    );
    check(
        "token bad tag",
        con.create_join_token(tok("prod", &["has space"])).await,
        Code::InvalidArgument,
        "tag",
    );
    check(
        "revoke unknown",
        con.revoke_join_token(RevokeJoinTokenRequest {
            token_id: "tok_00".into(),
        })
        .await,
        Code::NotFound,
        "not found",
    );
    check(
        "remove unknown",
        con.remove_peer(RemovePeerRequest {
            peer_id: "peer_00".into(),
        })
        .await,
        Code::NotFound,
        "not found",
    );
    check(
        "empty peer id",
        con.get_peer(GetPeerRequest {
            peer_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "required",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_rejects_bad_networks_tokens_and_ids_without_writing() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/16"]).await;
    let mut con = c.console().await;
    let rev = c.store_revision().await;

    refuses_bad_networks(&mut con).await;
    refuses_unknown_ids_and_bad_tokens(&mut con).await;
    assert_eq!(c.store_revision().await, rev, "no rejected call may write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_calls_need_a_valid_api_token() {
    let c = TestController::start().await;
    let mut wrong = c.console_with("cat_not-a-real-token").await;
    check(
        "wrong token",
        wrong.list_networks(ListNetworksRequest {}).await,
        Code::Unauthenticated,
        "not valid",
    );
    let mut join_token = c.console_with("cjt_abc").await;
    check(
        "join token as api token",
        join_token.list_networks(ListNetworksRequest {}).await,
        Code::Unauthenticated,
        "not an API token",
    );
    let trust = Trust::CaPem(c.server.ca_pem.clone().into_bytes());
    let ch = transport::connect(&c.server.url, &trust).await.unwrap();
    let mut bare = canopy_proto::v1::console_service_client::ConsoleServiceClient::new(ch);
    check(
        "no token",
        bare.list_networks(ListNetworksRequest {}).await,
        Code::Unauthenticated,
        "missing authorization",
    );
}

/// With a valid token `token` (a key [1; 32] already enrolled): short keys, a key that is
/// already a peer, oversized requests.
async fn refuses_bad_keys_and_sizes(
    agent: &mut AgentServiceClient<tonic::transport::Channel>,
    token: String,
) {
    let req = |key: Vec<u8>| enroll_request(token.clone(), key);
    let short = agent.enroll(req(vec![2; 31])).await;
    check(
        "short key",
        short,
        Code::InvalidArgument,
        "32 bytes, got 31",
    );
    let again = agent.enroll(req(vec![1; 32])).await;
    check(
        "same key again",
        again,
        Code::AlreadyExists,
        "already a peer",
    );
    let huge = EnrollRequest {
        hostname: "x".repeat(2 << 20),
        ..req(vec![3; 32])
    };
    check(
        "oversized",
        agent.enroll(huge).await,
        Code::ResourceExhausted,
        "limit",
    );
}

async fn agent_client(c: &TestController) -> AgentServiceClient<tonic::transport::Channel> {
    let trust = Trust::Pin(c.server.ca_sha256);
    AgentServiceClient::new(transport::connect(&c.server.url, &trust).await.unwrap())
}

fn enroll_request(token: String, key: Vec<u8>) -> EnrollRequest {
    EnrollRequest {
        join_token: token,
        public_key: key,
        hostname: "h".into(),
        listen_port: 0,
        credential: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_refuses_bad_tokens_and_keys_without_writing() {
    let c = TestController::with_manual_clock().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let mut con = c.console().await;
    let mk = |max_uses, ttl_seconds| CreateJoinTokenRequest {
        network: "prod".into(),
        max_uses,
        ttl_seconds,
        tags: vec![],
    };
    let good = con.create_join_token(mk(1, 3600)).await.unwrap();
    let expiring = con.create_join_token(mk(1, 1)).await.unwrap();
    let revoked = con.create_join_token(mk(1, 3600)).await.unwrap();
    let [good, expiring, revoked] = [good, expiring, revoked].map(|r| r.into_inner());
    con.revoke_join_token(RevokeJoinTokenRequest {
        token_id: revoked.token.clone().unwrap().id,
    })
    .await
    .unwrap();
    let secret = |j: &str| JoinString::parse(j).unwrap().token;

    let mut agent = agent_client(&c).await;
    let req = enroll_request;
    // Spend the good token once so it is used up.
    agent
        .enroll(req(secret(&good.join_string), vec![1; 32]))
        .await
        .unwrap();
    c.clock.advance(Duration::from_secs(2)); // the 1 s token expires, without sleeping
    let rev = c.store_revision().await;

    let (used, old, gone) = [good, expiring, revoked]
        .map(|t| secret(&t.join_string))
        .into();
    let cases = [
        (
            "used up",
            used,
            Code::PermissionDenied,
            "used up (1 of 1 uses)",
        ),
        ("expired", old, Code::PermissionDenied, "expired"),
        ("revoked", gone, Code::PermissionDenied, "revoked"),
        (
            "unknown",
            "cjt_unknown".into(),
            Code::Unauthenticated,
            "not valid",
        ),
        (
            "not a token",
            "hello".into(),
            Code::Unauthenticated,
            "not a join token",
        ),
    ];
    for (what, token, code, msg) in cases {
        check(what, agent.enroll(req(token, vec![2; 32])).await, code, msg);
    }
    let fresh = con
        .create_join_token(mk(0, 3600))
        .await
        .unwrap()
        .into_inner();
    let rev2 = c.store_revision().await;
    refuses_bad_keys_and_sizes(&mut agent, secret(&fresh.join_string)).await;

    assert_eq!(
        rev2 - rev,
        2,
        "only the token creation (and its audit entry) wrote"
    );
    assert_eq!(
        c.store_revision().await,
        rev2,
        "no rejected enrollment may write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_string_whose_ca_hash_does_not_match_is_refused_before_sending_the_token() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let mut join = JoinString::parse(&c.token("prod", 1).await).unwrap();
    join.ca_sha256[0] ^= 0xff;
    let rev = c.store_revision().await;
    let err = canopy_agent::control::enroll(&join, [9; 32], "h")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match the pinned CA hash"), "{err}");
    assert_eq!(c.store_revision().await, rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_needs_a_valid_credential_and_starts_with_hello() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let (enrollment, mut agent) = c.raw_agent("prod").await;

    let sync = |cred: &str, first: SyncRequest| {
        let mut r =
            tonic::Request::new(futures::stream::iter([first]).chain(futures::stream::pending()));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {cred}").parse().unwrap());
        r
    };
    use futures::StreamExt as _;
    let hello = SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello::default())),
    };
    check(
        "bad credential",
        agent.sync(sync("cpc_wrong", hello.clone())).await,
        Code::Unauthenticated,
        "credential is not valid",
    );

    let ack = SyncRequest {
        msg: Some(sync_request::Msg::Ack(Ack {
            revision: 1,
            lock_refused: 0,
        })),
    };
    let mut stream = agent
        .sync(sync(&enrollment.credential, ack))
        .await
        .unwrap()
        .into_inner();
    let s = stream.message().await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("must be Hello"), "{}", s.message());

    let bad_endpoint = SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello {
            known_revision: 0,
            endpoints: vec!["not-an-endpoint".into()],
            ..Default::default()
        })),
    };
    let mut stream = agent
        .sync(sync(&enrollment.credential, bad_endpoint))
        .await
        .unwrap()
        .into_inner();
    let s = stream.message().await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("is not IP:PORT"), "{}", s.message());
}

/// Python's grpcio (Debian's python3-grpcio, run by Debian's python3) against the controller:
/// reflection v1alpha, garbage bytes answered InvalidArgument, a 20 KB name refused with a
/// message under 1 KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_gets_reflection_and_clean_errors() {
    let c = TestController::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/grpcio_client.py");
    let target = c.server.local_addr.to_string();
    let ca = c.dir.path().join("ca.pem");
    let token = c.server.admin_token.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/python3")
            .args([script, &target, ca.to_str().unwrap(), &token])
            .output()
            .expect("/usr/bin/python3 with python3-grpcio (deploy/install-deps.sh)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_ranges_and_oversized_names_are_refused_by_the_console() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let mut con = c.console().await;
    let rev = c.store_revision().await;
    for cidr in [
        "::/0",
        "127.0.0.0/8",
        "224.0.0.0/4",
        "fe80::/64",
        "::ffff:0:0/96",
    ] {
        check(
            cidr,
            con.create_network(net("special", &[cidr])).await,
            Code::InvalidArgument,
            "not a unicast range that can route",
        );
    }
    let long = "n".repeat(20_000);
    let s = con
        .create_network(net(&long, &["10.0.0.0/24"]))
        .await
        .unwrap_err();
    assert!(s.message().len() < 1024, "{} bytes", s.message().len());
    check(
        "nine tags",
        con.create_join_token(CreateJoinTokenRequest {
            network: "x".into(),
            max_uses: 1,
            ttl_seconds: 60,
            tags: (0..9).map(|i| format!("t{i}")).collect(),
        })
        .await,
        Code::InvalidArgument,
        "at most 8 tags",
    );
    assert_eq!(c.store_revision().await, rev, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_keys_and_control_characters_are_refused_at_enrollment() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let join = c.token("prod", 0).await;
    let secret = JoinString::parse(&join).unwrap().token;
    let mut agent = agent_client(&c).await;
    let enroll = |key: Vec<u8>, hostname: &str| EnrollRequest {
        join_token: secret.clone(),
        public_key: key,
        hostname: hostname.into(),
        listen_port: 0,
        credential: String::new(),
    };
    let mut non_canonical = [0xffu8; 32];
    non_canonical[0] = 0xed;
    non_canonical[31] = 0x7f;
    let rev = c.store_revision().await;
    for (what, key, says) in [
        ("all-zero key", vec![0u8; 32], "all zero"),
        (
            "low-order key",
            {
                let mut k = vec![0u8; 32];
                k[0] = 1;
                k
            },
            "small order",
        ),
        ("non-canonical key", non_canonical.to_vec(), "not canonical"),
    ] {
        check(
            what,
            agent.enroll(enroll(key, "h")).await,
            Code::InvalidArgument,
            says,
        );
    }
    let good = PrivateKey::generate().public_key().to_vec();
    for hostname in ["evil\x1b[2J", "two\r\nlines", "bell\x07"] {
        let s = agent
            .enroll(enroll(good.clone(), hostname))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{hostname:?}");
        assert!(
            s.message().is_ascii() && !s.message().chars().any(|c| c.is_control()),
            "the message echoes no control character: {:?}",
            s.message()
        );
    }
    assert_eq!(c.store_revision().await, rev, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_endpoints_are_refused_on_sync() {
    let c = TestController::start().await;
    c.network("prod", &["100.64.0.0/24"]).await;
    let join = c.token("prod", 0).await;
    let mut agent = agent_client(&c).await;
    let sync = |cred: &str, first: SyncRequest| {
        let mut r =
            tonic::Request::new(futures::stream::iter([first]).chain(futures::stream::pending()));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {cred}").parse().unwrap());
        r
    };
    let joined = TestAgent::join(&join, "ok").await.unwrap();
    let credential = joined.client.enrollment().credential.clone();
    joined.stop().await;
    for endpoint in [
        "255.255.255.255:51820",
        "0.0.0.0:0",
        "[::]:1",
        "224.0.0.1:5",
    ] {
        let hello = SyncRequest {
            msg: Some(sync_request::Msg::Hello(Hello {
                known_revision: 0,
                endpoints: vec![endpoint.into()],
                ..Default::default()
            })),
        };
        let mut stream = agent
            .sync(sync(&credential, hello))
            .await
            .unwrap()
            .into_inner();
        let s = stream.message().await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{endpoint}");
        assert!(
            s.message().contains(endpoint),
            "{endpoint}: {}",
            s.message()
        );
    }
}
