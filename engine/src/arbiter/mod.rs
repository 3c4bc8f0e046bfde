//! The arbiter: the one authority over a volume's in-sync set, epoch and
//! frontend lease (design invariants 2–4).
//!
//! Every change goes through a compare-and-swap on a version the caller read
//! before ([`Arbiter::update`]): a replica leaves the in-sync set only when the
//! swap succeeded, and a frontend that cannot reach the arbiter cannot swap, so
//! it holds I/O instead of guessing. Two cut-off frontends can never both
//! remove each other's replica: only one swap on a given version wins.
//!
//! The rules (which changes are allowed from which record) are pure and live
//! in [`record`], so that every implementation enforces the same ones: the
//! file-backed arbiter here ([`file::FileArbiter`], for `twinvol-engine`, the
//! tests and the first demo) and, with the CSI work, the Kubernetes one (the
//! MirroredVolume status, with a resourceVersion precondition as the version).

pub mod file;
pub mod record;
#[cfg(feature = "failpoints")]
pub mod stall;

use std::future::Future;

pub use file::FileArbiter;
pub use record::{Change, FrontendId, Lease, LeaseId, Rejected, VolumeRecord};

/// An opaque version of a volume's record: what a compare-and-swap expects.
/// A counter for the file arbiter, a resourceVersion for Kubernetes; callers
/// only compare versions for equality and pass them back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an arbiter call did not change anything.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// Someone else changed the record since the caller read it. Re-read,
    /// re-decide, and try again — or not.
    #[error("the volume record changed (expected version {expected}, now {current})", current = .current.version)]
    Conflict {
        expected: Version,
        current: Box<VolumeRecord>,
    },
    /// The change is not allowed from the current record.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The arbiter could not be reached or read, or did not answer in time.
    /// For an update the outcome is unknown (over HTTP a write that timed
    /// out may still land): callers re-read and decide again — a swap that
    /// landed shows as already done, and an acquisition that landed shows
    /// as a lease with the caller's holder, the expected epoch and the
    /// caller's `now_ms` (`frontend::lease` takes it as its own).
    #[error("arbiter unreachable at {location}: {source}")]
    Unreachable {
        location: String,
        #[source]
        source: std::io::Error,
    },
    /// The stored record is unreadable (corrupt or from another version).
    #[error("arbiter record at {location} is unreadable: {reason}")]
    Corrupt { location: String, reason: String },
}

/// The authority over one volume's record.
pub trait Arbiter: Send + Sync + 'static {
    /// Reads the current record and its version.
    fn read(&self) -> impl Future<Output = Result<VolumeRecord, ArbiterError>> + Send;

    /// Applies `change` if the record is still at `expected`, returning the
    /// new record. On [`ArbiterError::Conflict`] nothing changed and the
    /// error carries the current record.
    fn update(
        &self,
        expected: &Version,
        change: Change,
    ) -> impl Future<Output = Result<VolumeRecord, ArbiterError>> + Send;
}
