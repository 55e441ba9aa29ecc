//! Relay use counted against a hosted plan: the relay on the controller's UDP port counts what
//! it forwards per tenant and month, `GetUsage` shows it, and a tenant past its plan's relay
//! quota is refused by the relay until the month ends.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_agent::control;
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_proto::join::JoinString;
use canopy_proto::relay::{self, Ticket};
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::hosted_service_client::HostedServiceClient;
use canopy_proto::v1::{GetUsageRequest, RelayUseRecord};
use canopy_tests::hosted::{Cluster, OPERATOR, console_as, network_and_join, signup};
use prost::Message as _;
use tokio::net::UdpSocket;

async fn usage(r: &Running, token: &str) -> canopy_proto::v1::Usage {
    let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut h = HostedServiceClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    h.get_usage(GetUsageRequest {}).await.unwrap().into_inner()
}

/// Datagrams that arrive at `sock` within `within`.
async fn arrivals(sock: &UdpSocket, within: Duration) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while tokio::time::timeout(within, sock.recv_from(&mut buf))
        .await
        .is_ok()
    {
        n += 1;
    }
    n
}

/// A tenant on the free plan with two peers bound at the controller's relay: its id and API
/// token, the peers' sockets, and the Unix time their tickets were made at.
async fn tenant_with_bound_pair(r: &Running) -> (String, String, UdpSocket, UdpSocket, u64) {
    let (tenant, token) = signup(r, "acme", "free").await;
    let mut con = console_as(r, &token).await;
    let join = JoinString::parse(&network_and_join(&mut con, "n", "100.64.0.0/24").await).unwrap();
    let (a_peer, _) = control::enroll(&join, [1; 32], "a").await.unwrap();
    control::enroll(&join, [2; 32], "b").await.unwrap();
    let secret = r.controller.relay_secret.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ticket = |key: u8| {
        let t = Ticket {
            network_id: a_peer.network_id.clone(),
            public_key: [key; 32],
            expires_unix: now + 600,
        };
        t.mint(&secret)
    };
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let relay_at = r.local_addr;
    for (s, key) in [(&a, 1), (&b, 2)] {
        s.send_to(&relay::bind(&ticket(key)), relay_at)
            .await
            .unwrap();
        assert_eq!(arrivals(s, Duration::from_millis(300)).await, 1, "BOUND");
    }
    (tenant, token, a, b, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_bytes_count_against_the_plan_and_a_tenant_past_its_quota_is_refused() {
    let cluster = Cluster::new();
    let r = server::spawn(&ServeConfig {
        store: Some(StoreSpec::Etcd(vec![cluster.etcd.endpoint.clone()])),
        hosted: true,
        operator_token: Some(OPERATOR.into()),
        relay_flush: Duration::from_millis(200),
        ..ServeConfig::new("127.0.0.1:0".parse().unwrap(), cluster.dir.path().into())
    })
    .await
    .unwrap();
    let (tenant, token, a, b, now) = tenant_with_bound_pair(&r).await;
    let relay_at = r.local_addr;
    let send = relay::wrap(true, &[2; 32], &[7u8; 1000]);
    // In rounds of ten: a burst of a hundred would overflow b's receive buffer.
    let mut arrived = 0;
    for _ in 0..10 {
        for _ in 0..10 {
            a.send_to(&send, relay_at).await.unwrap();
        }
        arrived += arrivals(&b, Duration::from_millis(100)).await;
    }
    assert_eq!(arrived, 100);
    let t = std::time::Instant::now();
    while usage(&r, &token).await.relay_bytes_this_month != 100_000 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the relayed bytes are counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let u = usage(&r, &token).await;
    assert_eq!(
        u.quotas.unwrap().relay_mib_per_month,
        1024,
        "the free plan's relay quota"
    );

    // A busy month: the tenant is a kilobyte short of its quota. One more batch crosses it;
    // after the next count the relay refuses the tenant's datagrams.
    let month = canopy_controller::service::relayuse::month_of(now as i64);
    let key = format!("/canopy/v1/relayuse/{tenant}/{month}");
    let near = RelayUseRecord {
        bytes: (1 << 30) - 1000,
    };
    let put = canopy_controller::store::Txn::new()
        .then(canopy_controller::store::Op::put(key, near.encode_to_vec()));
    r.controller.store.txn(put).await.unwrap();
    for _ in 0..10 {
        a.send_to(&send, relay_at).await.unwrap();
    }
    assert_eq!(
        arrivals(&b, Duration::from_millis(300)).await,
        10,
        "still under"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..10 {
        a.send_to(&send, relay_at).await.unwrap();
    }
    assert_eq!(
        arrivals(&b, Duration::from_millis(500)).await,
        0,
        "past the quota"
    );
    assert!(usage(&r, &token).await.relay_bytes_this_month >= 1 << 30);
    r.stop().await.unwrap();
}
