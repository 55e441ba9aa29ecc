//! The canopy.v1 API contract, shared by the controller, the console and the agent.
//!
//! # Layout
//! - [`v1`]: the protobuf messages and tonic client/server code generated from `proto/canopy/v1`.
//! - [`netmap`]: what applying a `NetworkDelta` to a `NetworkMap` means.
//! - [`join`]: the join string (`canopy1:…`) that carries controller URL, token secret and CA pin.
//! - [`lock`]: tenant-signed membership: signing and verifying lock statements (Ed25519).
//! - [`text`]: escaping and clipping of untrusted text before it is printed or echoed.
//! - [`transport`]: the client side of TLS: a gRPC channel that trusts a CA file or a CA pin.
//! - [`backoff`]: exponential backoff with jitter, for every retry loop.
//! - [`files`]: atomic file writes (the agent's state, the controller's keys and tokens).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backoff;
pub mod files;
pub mod join;
pub mod lock;
pub mod metrics;
pub use prometheus_client;
pub mod netmap;
pub mod relay;
pub mod stun;
pub mod text;
pub mod transport;

/// Generated code for the `canopy.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("canopy.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("canopy_v1_descriptor");
}

/// The largest answer a client of the controller accepts (a network map, a peer list): the
/// controller bounds a network's size (peers per network × the per-peer caps on tags,
/// hostname and endpoints) well below it.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The most underlay endpoints an agent reports (and the controller accepts) for one peer.
pub const MAX_ENDPOINTS: usize = 8;
/// Outside addresses (seen past a NAT) an agent may report.
pub const MAX_OUTSIDE: usize = 4;

/// SHA-256 of a byte string, as used for CA pins and stored secret hashes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The typed "this peer was removed" answer: a PermissionDenied whose details carry
/// [`v1::PeerRemoved`]. Agents forget their enrollment on this answer only.
pub mod removal {
    use prost::Message as _;

    use crate::v1::{PeerRemoved, RpcStatus};

    pub const TYPE_URL: &str = "type.googleapis.com/canopy.v1.PeerRemoved";

    /// The status the controller ends a removed peer's Sync with.
    pub fn status(network_id: &str, peer_id: &str) -> tonic::Status {
        let message = "this peer was removed from the network";
        let detail = PeerRemoved {
            network_id: network_id.to_string(),
            peer_id: peer_id.to_string(),
        };
        let rpc = RpcStatus {
            code: tonic::Code::PermissionDenied as i32,
            message: message.to_string(),
            details: vec![prost_types::Any {
                type_url: TYPE_URL.to_string(),
                value: detail.encode_to_vec(),
            }],
        };
        tonic::Status::with_details(
            tonic::Code::PermissionDenied,
            message,
            rpc.encode_to_vec().into(),
        )
    }

    /// The removal a status states, if it is one.
    pub fn of(s: &tonic::Status) -> Option<PeerRemoved> {
        if s.code() != tonic::Code::PermissionDenied {
            return None;
        }
        let rpc = RpcStatus::decode(s.details()).ok()?;
        rpc.details
            .iter()
            .find(|a| a.type_url == TYPE_URL)
            .and_then(|a| PeerRemoved::decode(a.value.as_slice()).ok())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn only_a_permission_denied_with_the_detail_is_a_removal() {
            let s = super::status("net_a", "peer_b");
            let r = super::of(&s).unwrap();
            assert_eq!(
                (r.network_id.as_str(), r.peer_id.as_str()),
                ("net_a", "peer_b")
            );
            assert!(super::of(&tonic::Status::permission_denied("removed")).is_none());
            assert!(super::of(&tonic::Status::unauthenticated("x")).is_none());
            let wrong_code = tonic::Status::with_details(
                tonic::Code::Unavailable,
                "x",
                s.details().to_vec().into(),
            );
            assert!(super::of(&wrong_code).is_none());
        }
    }
}
