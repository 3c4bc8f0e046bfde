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
//!
//! # Two ways for a holder to stay alive
//!
//! A lease's holder proves it is alive either by renewing the lease in the
//! record (every renewal a swap: the file arbiter's way, one write per
//! volume per renewal), or by its *node's heartbeat* (the Kubernetes
//! arbiter: one write per node per period, whatever the number of
//! volumes). [`Arbiter::node_heartbeat`] says which. With a node heartbeat
//! the holder learns each successful renewal from a node-local report on
//! its own machine's `CLOCK_BOOTTIME` ([`Arbiter::last_heartbeat`], no
//! remote read), and observers watch the heartbeat change
//! ([`Arbiter::liveness`]) besides the lease itself; the record is written
//! only when something changes (an acquisition, a release, an in-sync
//! change, or a holder coming back after its lease ran out, which must
//! swap once before it acknowledges again: see `frontend::lease`).

pub mod file;
pub mod record;
#[cfg(feature = "failpoints")]
pub mod stall;

use std::future::Future;
use std::time::Duration;

use crate::clock::BootInstant;

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

/// One successful renewal of the holder's node heartbeat, as the
/// node-local renewer reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRenewal {
    /// On this machine's `CLOCK_BOOTTIME`: when the renewal was sent (taken
    /// before the request went out, so never later than when it landed).
    pub sent: BootInstant,
    /// How long the heartbeat vouches for the node after `sent`: what
    /// observers wait for at least (plus their margin) once it stops
    /// changing.
    pub duration: Duration,
}

/// What an observer watches, besides the lease itself, to tell a live
/// holder from a gone one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Liveness {
    /// Changes whenever the holder proves itself alive (for a node
    /// heartbeat: its resourceVersion). Empty when the lease's own
    /// renewals are the only proof.
    pub token: String,
    /// How long the holder may acknowledge I/O after its last proof: the
    /// observer waits this plus its margin after seeing no change.
    pub duration: Duration,
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

    /// Whether holders prove their liveness by their node's heartbeat
    /// ([`Self::last_heartbeat`]) instead of renewing the lease in the
    /// record. The default: renewals in the record.
    fn node_heartbeat(&self) -> bool {
        false
    }

    /// The last successful renewal of this holder's node heartbeat, read
    /// on this machine (never a remote call). Only asked when
    /// [`Self::node_heartbeat`] is true.
    fn last_heartbeat(
        &self,
    ) -> impl Future<Output = Result<HeartbeatRenewal, ArbiterError>> + Send {
        std::future::ready(Err(ArbiterError::Unreachable {
            location: "the node heartbeat".to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this arbiter has no node heartbeat",
            ),
        }))
    }

    /// What shows `lease`'s holder alive, for an observer waiting for it to
    /// expire. The default: nothing besides the lease's own renewals.
    fn liveness(
        &self,
        lease: &Lease,
    ) -> impl Future<Output = Result<Liveness, ArbiterError>> + Send {
        std::future::ready(Ok(Liveness {
            token: String::new(),
            duration: lease.duration,
        }))
    }
}
