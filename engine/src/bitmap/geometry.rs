//! Regions: how a volume's bytes map onto the bits of the dirty bitmap.
//!
//! A region is the unit of resync: one bit says "this `granularity`-sized,
//! aligned piece of the volume may differ on the peer". The granularity is a
//! power of two so that offset → region is a shift, and at least 4 KiB
//! because no export writes less than a block; 64 KiB by default, the usual
//! compromise between bitmap size (2 MiB of bits per TiB of volume) and
//! resync amplification (a 4 KiB write dirties 64 KiB).

use std::fmt;
use std::ops::Range;

/// Smallest region size: one block of every export.
pub const MIN_GRANULARITY: u64 = 4096;
/// Largest region size we accept (1 GiB): a bigger one makes resync copy
/// far more than was written.
pub const MAX_GRANULARITY: u64 = 1 << 30;
/// Region size used when nothing else is configured.
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;

/// Why a bitmap geometry is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error(
        "region size {0} is invalid: use a power of two between {MIN_GRANULARITY} and {MAX_GRANULARITY} bytes"
    )]
    BadGranularity(u64),
    #[error("volume size {0} is invalid: it must be a positive multiple of 4096")]
    BadVolumeSize(u64),
}

/// The size of one region in bytes: a power of two in
/// `[MIN_GRANULARITY, MAX_GRANULARITY]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Granularity(u64);

impl Granularity {
    pub fn new(bytes: u64) -> Result<Self, GeometryError> {
        if bytes.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&bytes) {
            Ok(Self(bytes))
        } else {
            Err(GeometryError::BadGranularity(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for Granularity {
    fn default() -> Self {
        Self(DEFAULT_GRANULARITY)
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// The index of one region of a volume (region `i` covers bytes
/// `[i * granularity, (i + 1) * granularity)`, clipped to the volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionIndex(pub u64);

impl fmt::Display for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// A volume size and a region size: everything needed to map bytes to bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    volume_size: u64,
    granularity: Granularity,
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in regions of {}",
            self.volume_size, self.granularity
        )
    }
}

impl Geometry {
    pub fn new(volume_size: u64, granularity: Granularity) -> Result<Self, GeometryError> {
        if volume_size == 0 || !volume_size.is_multiple_of(4096) {
            return Err(GeometryError::BadVolumeSize(volume_size));
        }
        Ok(Self {
            volume_size,
            granularity,
        })
    }

    pub fn volume_size(self) -> u64 {
        self.volume_size
    }

    pub fn granularity(self) -> Granularity {
        self.granularity
    }

    /// How many regions cover the volume (the last one may be short).
    pub fn region_count(self) -> u64 {
        self.volume_size.div_ceil(self.granularity.bytes())
    }

    /// The regions touched by `len` bytes at `offset`, or `None` when the
    /// range is empty or reaches past the end of the volume.
    pub fn regions(self, offset: u64, len: u64) -> Option<Range<u64>> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.volume_size {
            return None;
        }
        let shift = self.granularity.shift();
        Some((offset >> shift)..((end - 1) >> shift) + 1)
    }

    /// The bytes of `region`, clipped to the volume.
    pub fn byte_range(self, region: RegionIndex) -> Range<u64> {
        let start = region.0.saturating_mul(self.granularity.bytes());
        let end = start.saturating_add(self.granularity.bytes());
        start.min(self.volume_size)..end.min(self.volume_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_must_be_a_power_of_two_of_at_least_4k() {
        assert!(Granularity::new(4096).is_ok());
        assert!(Granularity::new(65536).is_ok());
        assert_eq!(
            Granularity::new(3 * 4096),
            Err(GeometryError::BadGranularity(3 * 4096))
        );
        assert!(Granularity::new(2048).is_err());
        assert!(Granularity::new(2 << 30).is_err());
        assert_eq!(Granularity::default().bytes(), 64 * 1024);
    }

    #[test]
    fn ranges_map_to_the_regions_they_touch() {
        let g = Geometry::new(10 * 65536 + 4096, Granularity::default()).expect("geometry");
        assert_eq!(g.region_count(), 11);
        assert_eq!(g.regions(0, 1), Some(0..1));
        assert_eq!(g.regions(65535, 2), Some(0..2));
        assert_eq!(g.regions(65536, 65536), Some(1..2));
        assert_eq!(g.regions(10 * 65536, 4096), Some(10..11));
        assert_eq!(g.regions(10 * 65536, 4097), None, "past the end");
        assert_eq!(g.regions(0, 0), None, "empty");
        assert_eq!(g.regions(u64::MAX, 2), None, "overflow");
        assert_eq!(g.byte_range(RegionIndex(10)), 10 * 65536..10 * 65536 + 4096);
        assert!(Geometry::new(0, Granularity::default()).is_err());
        assert!(Geometry::new(4095, Granularity::default()).is_err());
    }
}
