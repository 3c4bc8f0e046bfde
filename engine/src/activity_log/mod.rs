//! The activity log: extents with writes in flight, recorded durably before
//! the data write starts, so that a crash of the frontend or of a replica
//! leaves a known, bounded set of possibly divergent extents (design
//! invariant 5) instead of "anything may differ".
//!
//! `format` owns the two-slot on-disk layout, `log` the live set (group
//! commit of additions, lazy LRU eviction of extents whose writes are
//! durable, recovery pins). Split so that the
//! format can be checked without the concurrency and the other way round.

mod format;
mod log;

pub use format::{AREA_LEN, FORMAT_VERSION, MAX_ACTIVE, ReadError, SlotError};
pub use log::{
    ActivityLog, AlConfig, AlError, DEFAULT_EXTENT_SIZE, DEFAULT_MAX_ACTIVE, ExtentIndex,
    MIN_EXTENT_SIZE, Recovery, WriteGuard,
};

/// File name of the activity log inside a volume directory of a pool, when
/// it has a file of its own.
pub const FILE_NAME: &str = "activity-log";

#[cfg(all(test, feature = "failpoints"))]
mod crash_tests;
#[cfg(all(test, feature = "failpoints"))]
mod durable_tests;
#[cfg(test)]
mod tests;
