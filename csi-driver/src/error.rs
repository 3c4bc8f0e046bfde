//! The errors of the CSI services and the one place they become gRPC codes.
//!
//! Every service method returns `Result<_, CsiError>` internally; the
//! `tonic` trait impls convert with `?` through [`From<CsiError> for
//! tonic::Status`], so the mapping to the codes the CSI spec and the
//! Kubernetes sidecars expect (NotFound, AlreadyExists, InvalidArgument,
//! FailedPrecondition, ResourceExhausted, Aborted, OutOfRange, Unavailable,
//! DeadlineExceeded) lives here and nowhere else. The message is the
//! error's chain, written for the user who reads it in `kubectl describe
//! pvc` or a pod's events: what was wrong and what to do.

use std::path::PathBuf;
use std::time::Duration;

/// What a CSI call failed on.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required request field is empty.
    #[error("{field} is required")]
    MissingField { field: &'static str },
    /// A request field has a value the driver cannot use.
    #[error("{field} {value:?} is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A StorageClass parameter is missing or wrong.
    #[error("StorageClass parameter {key:?}: {reason}")]
    BadParameter { key: String, reason: String },
    /// A volume capability the driver does not support.
    #[error("unsupported volume capability: {reason}")]
    UnsupportedCapability { reason: String },
    /// The capacity range cannot be satisfied.
    #[error("capacity range cannot be satisfied: {reason}")]
    CapacityOutOfRange { reason: String },
    #[error("volume {volume} does not exist")]
    VolumeNotFound { volume: String },
    #[error("node {node} does not exist")]
    NodeNotFound { node: String },
    /// A volume of that name exists with different, incompatible settings.
    #[error("volume {volume} already exists with other settings: {detail}")]
    VolumeConflict { volume: String, detail: String },
    /// The volume is already staged or published differently.
    #[error("volume {volume} is already {what}")]
    AlreadyInUse { volume: String, what: String },
    /// The volume is not in a state that allows the call.
    #[error("volume {volume}: {detail}")]
    Precondition { volume: String, detail: String },
    /// No room on a site.
    #[error("not enough capacity: {detail}")]
    NoCapacity { detail: String },
    /// Another call on the same volume is running.
    #[error("an operation on volume {volume} is already in progress; retry once it finished")]
    OperationInProgress { volume: String },
    /// A ListVolumes token this driver did not give (or the list shrank).
    #[error("starting_token {token:?} is not one this listing gave; list again from the start")]
    BadToken { token: String },
    /// Something needed is not there yet (placement, an address, the API):
    /// the caller should retry.
    #[error("volume {volume} is not ready: {detail}")]
    NotReady { volume: String, detail: String },
    /// The Kubernetes API could not be reached or refused the request.
    #[error("Kubernetes API: {action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{action} {path} failed")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A system tool (mount, losetup, mkfs, ...) failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what} did not happen within {waited:?}: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("{what} is not supported by this driver")]
    Unsupported { what: &'static str },
    #[error("{detail}")]
    Internal { detail: String },
}

impl CsiError {
    /// A Kubernetes API error, with what was being done.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            action: action.into(),
            source,
        }
    }

    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn invalid(
        field: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidField {
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::MissingField { .. }
            | Self::InvalidField { .. }
            | Self::BadParameter { .. }
            | Self::UnsupportedCapability { .. } => Code::InvalidArgument,
            Self::CapacityOutOfRange { .. } => Code::OutOfRange,
            Self::VolumeNotFound { .. } | Self::NodeNotFound { .. } => Code::NotFound,
            Self::VolumeConflict { .. } | Self::AlreadyInUse { .. } => Code::AlreadyExists,
            Self::Precondition { .. } => Code::FailedPrecondition,
            Self::NoCapacity { .. } => Code::ResourceExhausted,
            Self::OperationInProgress { .. } | Self::BadToken { .. } => Code::Aborted,
            Self::NotReady { .. } => Code::Unavailable,
            Self::Kube { source, .. } => kube_code(source),
            Self::Timeout { .. } => Code::DeadlineExceeded,
            Self::Unsupported { .. } => Code::Unimplemented,
            Self::Io { .. } | Self::Command { .. } | Self::Internal { .. } => Code::Internal,
        }
    }
}

/// A failed API call the caller did not handle itself: a conflict means
/// someone else changed the object (retry: Aborted); throttling, server
/// errors and no connection pass (Unavailable, which the sidecars retry).
fn kube_code(error: &kube::Error) -> tonic::Code {
    use tonic::Code;
    match error {
        kube::Error::Api(status) => match status.code {
            404 => Code::NotFound,
            409 => Code::Aborted,
            400 | 422 => Code::InvalidArgument,
            403 => Code::PermissionDenied,
            401 => Code::Unauthenticated,
            _ => Code::Unavailable,
        },
        _ => Code::Unavailable,
    }
}

impl From<CsiError> for tonic::Status {
    fn from(error: CsiError) -> Self {
        let code = error.code();
        let message = twinvol_engine::error_chain(&error);
        if code == tonic::Code::Internal {
            tracing::error!(error = %message, "CSI call failed");
        } else {
            tracing::info!(code = ?code, error = %message, "CSI call refused");
        }
        tonic::Status::new(code, message)
    }
}

/// A service method's result.
pub type CsiResult<T> = Result<T, CsiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn status(e: CsiError) -> tonic::Status {
        e.into()
    }

    #[test]
    fn each_kind_of_error_has_the_code_csi_expects() {
        let cases = [
            (
                CsiError::MissingField { field: "name" },
                Code::InvalidArgument,
            ),
            (
                CsiError::BadParameter {
                    key: "sites".into(),
                    reason: "missing".into(),
                },
                Code::InvalidArgument,
            ),
            (
                CsiError::VolumeNotFound { volume: "v".into() },
                Code::NotFound,
            ),
            (
                CsiError::VolumeConflict {
                    volume: "v".into(),
                    detail: "size".into(),
                },
                Code::AlreadyExists,
            ),
            (
                CsiError::Precondition {
                    volume: "v".into(),
                    detail: "published".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                CsiError::NoCapacity {
                    detail: "room-a".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                CsiError::OperationInProgress { volume: "v".into() },
                Code::Aborted,
            ),
            (
                CsiError::CapacityOutOfRange { reason: "x".into() },
                Code::OutOfRange,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(status(error).code(), code);
        }
    }

    #[test]
    fn a_message_names_what_was_wrong() {
        let s = status(CsiError::BadParameter {
            key: "sites".into(),
            reason: "must name two Sites".into(),
        });
        assert!(s.message().contains("\"sites\""), "{}", s.message());
        assert!(s.message().contains("must name two Sites"));
    }
}
