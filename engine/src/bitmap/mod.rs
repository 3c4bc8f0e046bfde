//! The persistent dirty-region bitmap (design invariant 5): while its peer
//! is out of sync, the in-sync replica records here which regions the peer
//! misses, durably before it acknowledges the write, so that resync copies
//! those regions and not the volume.
//!
//! `geometry` maps bytes to regions, `format` owns the file layout and the
//! trust decision at load, `tracker` the live bitmap (group commit, the copy
//! protocol of the resync). Split this way so the on-disk format can be read
//! and tested without the concurrency, and the other way round.

mod format;
mod geometry;
mod tracker;

pub use format::{FORMAT_VERSION, LoadError, UntrustedReason, create, file_len};
pub use geometry::{
    DEFAULT_GRANULARITY, Geometry, GeometryError, Granularity, MAX_GRANULARITY, MIN_GRANULARITY,
    RegionIndex,
};
pub use tracker::{Bitmap, BitmapError, BitmapState, CopyGuard, MarkGuard};

/// File name of the bitmap inside a volume directory of a pool.
pub const FILE_NAME: &str = "bitmap";

#[cfg(test)]
mod crash_model_tests;
#[cfg(all(test, feature = "failpoints"))]
mod crash_tests;
#[cfg(test)]
pub(crate) mod tests;
