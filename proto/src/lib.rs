//! The canopy.v1 API contract, shared by the controller, the console and the agent.
//!
//! # Layout
//! - [`v1`]: the protobuf messages and tonic client/server code generated from `proto/canopy/v1`.
//! - [`netmap`]: what applying a `NetworkDelta` to a `NetworkMap` means.
//! - [`join`]: the join string (`canopy1:…`) that carries controller URL, token secret and CA pin.
//! - [`text`]: escaping and clipping of untrusted text before it is printed or echoed.
//! - [`transport`]: the client side of TLS: a gRPC channel that trusts a CA file or a CA pin.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod join;
pub mod netmap;
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

/// SHA-256 of a byte string, as used for CA pins and stored secret hashes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
