//! Fixtures of the hosted-mode tests: a replica of `canopy serve --hosted` on a shared etcd,
//! a sign-up, console and operator clients, and request builders.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::Path;

use canopy_controller::console::{self, Client};
use canopy_controller::server::{self, Running, ServeConfig, StoreSpec};
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::hosted_service_client::HostedServiceClient;
use canopy_proto::v1::*;
use tonic::Code;

use crate::etcd::Etcd;

/// A real etcd and a data dir that hosted replicas share (each test makes its own).
pub struct Cluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Self {
        Self {
            etcd: Etcd::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A new `canopy serve --hosted` replica on the cluster.
    pub async fn replica(&self) -> Running {
        replica(self.dir.path(), &self.etcd.endpoint, true).await
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

pub const OPERATOR: &str = "op-secret-for-tests";

pub async fn replica(data: &Path, etcd: &str, hosted: bool) -> Running {
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

pub async fn hosted_client(r: &Running) -> HostedServiceClient<tonic::transport::Channel> {
    let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
        .await
        .unwrap();
    HostedServiceClient::new(ch)
}

pub async fn signup(r: &Running, org: &str, plan: &str) -> (String, String) {
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

pub async fn console_as(r: &Running, token: &str) -> Client {
    console::connect(&r.url, &Trust::CaPem(r.ca_pem.clone().into_bytes()), token)
        .await
        .unwrap()
}

pub fn net(name: &str, cidr: &str) -> CreateNetworkRequest {
    CreateNetworkRequest {
        name: name.into(),
        cidrs: vec![cidr.into()],
    }
}

/// Creates network `name` on `cidr` and an unlimited join token for it: the join string.
pub async fn network_and_join(c: &mut Client, name: &str, cidr: &str) -> String {
    c.create_network(net(name, cidr)).await.unwrap();
    let token = c.create_join_token(tok(name)).await.unwrap();
    token.into_inner().join_string
}

pub fn tok(network: &str) -> CreateJoinTokenRequest {
    CreateJoinTokenRequest {
        network: network.into(),
        max_uses: 0,
        ttl_seconds: 600,
        tags: vec![],
    }
}

/// The status a genuinely missing object gets, for comparison.
pub fn missing<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
) -> String {
    let s = r.expect_err(what);
    assert_eq!(s.code(), Code::NotFound, "{what}: {}", s.message());
    s.message().to_string()
}

pub type Operator = canopy_proto::v1::operator_service_client::OperatorServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, console::Bearer>,
>;

pub async fn operator(r: &Running, token: &str) -> Operator {
    let ch = transport::connect(&r.url, &Trust::Pin(r.ca_sha256))
        .await
        .unwrap();
    canopy_proto::v1::operator_service_client::OperatorServiceClient::with_interceptor(
        ch,
        console::Bearer(format!("Bearer {token}").parse().unwrap()),
    )
}
