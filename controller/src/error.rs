//! The controller's one error type. Domain operations return it; the gRPC edge maps it to a
//! `tonic::Status` in exactly one place ([`From<Error> for Status`]).

use crate::model::ModelError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The agent's peer was removed: the one answer on which an agent forgets its enrollment.
    #[error("this peer was removed from the network")]
    PeerRemoved { network_id: String, peer_id: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Error::Unavailable(format!("store unavailable: {m}")),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Internal(format!("undecodable store record: {e}"))
    }
}

/// The longest status message sent: well under HTTP/2's and gRPC clients' header limits.
pub const MAX_STATUS_MESSAGE: usize = 1000;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let clip = |m: String| canopy_proto::text::clip(&m, MAX_STATUS_MESSAGE).into_owned();
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(clip(m)),
            Error::NotFound(m) => Status::not_found(clip(m)),
            Error::AlreadyExists(m) => Status::already_exists(clip(m)),
            Error::FailedPrecondition(m) => Status::failed_precondition(clip(m)),
            Error::PermissionDenied(m) => Status::permission_denied(clip(m)),
            Error::Unauthenticated(m) => Status::unauthenticated(clip(m)),
            Error::ResourceExhausted(m) => Status::resource_exhausted(clip(m)),
            Error::Unavailable(m) => Status::unavailable(clip(m)),
            Error::PeerRemoved {
                network_id,
                peer_id,
            } => canopy_proto::removal::status(&network_id, &peer_id),
            // What went wrong inside stays inside: the log has it under an id the client gets.
            Error::Internal(m) => {
                let id = crate::secret::new_id("err_");
                tracing::error!(error = %m, %id, "internal error");
                Status::internal(format!("internal error; the controller logged it as {id}"))
            }
        }
    }
}
