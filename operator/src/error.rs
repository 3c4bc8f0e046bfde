//! The reconcilers' errors. Each says what failed on which object; `class`
//! names the kind for the failure metric and for the requeue policy.

use twinvol_csi_driver::arbiter::MappingError;
use twinvol_engine::arbiter::Rejected;

/// Why a reconcile (or a step of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}")]
    Kube {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "{object} changed while the operator acted on it (resourceVersion conflict); it is read again"
    )]
    Conflict { object: String },
    #[error("the arbiter record of MirroredVolume {volume} is unreadable")]
    Mapping {
        volume: String,
        #[source]
        source: MappingError,
    },
    #[error("the record rules refused to {change} MirroredVolume {volume}")]
    Refused {
        volume: String,
        change: &'static str,
        #[source]
        source: Rejected,
    },
    #[error(
        "the frontend lease of MirroredVolume {volume} changed since the operator last saw it: it is alive, not fencing it"
    )]
    LeaseChanged { volume: String },
    #[error("{object} is invalid: {reason}")]
    Invalid { object: String, reason: String },
}

impl Error {
    /// The failure class, a metric label.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Kube { source, .. } => match source {
                kube::Error::Api(status) if status.code == 409 => "conflict",
                kube::Error::Api(status) if status.code == 404 => "not-found",
                kube::Error::Api(status) if status.code == 429 => "throttled",
                kube::Error::Api(status) if status.code >= 500 => "api-server",
                kube::Error::Api(_) => "refused",
                _ => "unreachable",
            },
            Self::Conflict { .. } => "conflict",
            Self::Mapping { .. } => "record",
            Self::Refused { .. } => "refused",
            Self::LeaseChanged { .. } => "lease-alive",
            Self::Invalid { .. } => "invalid",
        }
    }

    pub(crate) fn kube(
        action: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> Self {
        let object = object.into();
        move |source| match &source {
            kube::Error::Api(status) if status.code == 409 => Self::Conflict { object },
            _ => Self::Kube {
                action,
                object,
                source,
            },
        }
    }
}

/// The result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error and its sources on one line, for logs and Events.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
