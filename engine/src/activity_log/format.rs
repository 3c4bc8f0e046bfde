//! The on-disk format of the activity log: two checksummed slots, each
//! holding the whole set of active extents.
//!
//! # Layout (all integers little-endian)
//!
//! The log occupies `AREA_LEN` (8 KiB) bytes at a base offset of its
//! storage: its own file, or the area the replica metadata reserves for it
//! (`replica::meta::ACTIVITY_LOG_OFFSET`).
//!
//! ```text
//! base + 0      4096   slot 0 (even generations)
//! base + 4096   4096   slot 1 (odd generations)
//! ```
//!
//! A slot:
//!
//! ```text
//! 0    8   magic "TWVLACTL"
//! 8    4   format version (FORMAT_VERSION)
//! 12   4   number of extents n (at most MAX_ACTIVE)
//! 16   8   generation: +1 on every update; the valid slot with the highest wins
//! 24   8   volume size in bytes
//! 32   8   extent size in bytes
//! 40   24  reserved, zero
//! 64   8*n extent indexes, ascending
//! ..   ..  zero up to 4092
//! 4092 4   CRC32C of bytes 0..4092
//! ```
//!
//! # Why this shape
//!
//! The log is small by design (its size is the bound on what a crash can
//! leave divergent), so every update can rewrite the whole set: one 4 KiB
//! write and one sync, the same cost as appending a transaction to a ring,
//! without a replay step or a ring to compact. Updates alternate between the
//! slots, so a torn write leaves the previous set intact; the set written
//! last before a crash is always one that covered every write then in
//! flight, whichever of the two survives. The extent size is recorded so a
//! log written with another configuration still recovers as byte ranges.

pub use crate::slot::SlotError;
use crate::slot::{u32_at, u64_at};
use crate::storage::{Storage, StorageError};

pub const MAGIC: [u8; 8] = *b"TWVLACTL";
pub const FORMAT_VERSION: u32 = 1;
pub const SLOT_LEN: usize = 4096;
/// Bytes the log occupies on its storage.
pub const AREA_LEN: u64 = 2 * SLOT_LEN as u64;
/// Most extents one slot can hold.
pub const MAX_ACTIVE: usize = (SLOT_LEN - ENTRIES_AT - 4) / 8;

const ENTRIES_AT: usize = 64;
const CRC_AT: usize = SLOT_LEN - 4;

/// One decoded slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub generation: u64,
    pub volume_size: u64,
    pub extent_size: u64,
    pub extents: Vec<u64>,
}

/// Encodes a slot; `extents` must be ascending and at most `MAX_ACTIVE`.
pub fn encode(s: &Slot) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_LEN];
    let n = s.extents.len().min(MAX_ACTIVE);
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(n as u32).to_le_bytes());
    b[16..24].copy_from_slice(&s.generation.to_le_bytes());
    b[24..32].copy_from_slice(&s.volume_size.to_le_bytes());
    b[32..40].copy_from_slice(&s.extent_size.to_le_bytes());
    for (i, e) in s.extents.iter().take(n).enumerate() {
        let at = ENTRIES_AT + 8 * i;
        b[at..at + 8].copy_from_slice(&e.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode(b: &[u8]) -> Result<Slot, SlotError> {
    if b.iter().all(|&x| x == 0) {
        return Err(SlotError::Empty);
    }
    if b[0..8] != MAGIC {
        return Err(SlotError::BadMagic);
    }
    if crc32c::crc32c(&b[..CRC_AT]) != u32_at(b, CRC_AT) {
        return Err(SlotError::BadChecksum);
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(SlotError::Version(version));
    }
    let n = u32_at(b, 12) as usize;
    if n > MAX_ACTIVE {
        return Err(SlotError::BadField("extent count"));
    }
    let extent_size = u64_at(b, 32);
    if !extent_size.is_power_of_two() {
        return Err(SlotError::BadField("extent size"));
    }
    Ok(Slot {
        generation: u64_at(b, 16),
        volume_size: u64_at(b, 24),
        extent_size,
        extents: (0..n).map(|i| u64_at(b, ENTRIES_AT + 8 * i)).collect(),
    })
}

/// What the two slots say.
#[derive(Debug)]
pub enum Read {
    /// The newest valid slot.
    Valid(Slot),
    /// Neither slot is valid: the set of possibly divergent extents is lost.
    Invalid { slot0: SlotError, slot1: SlotError },
}

/// Errors reading the log that are not "invalid content".
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "activity log in {target} has format version {found}; this build reads version {FORMAT_VERSION}: upgrade twinvol"
    )]
    UnsupportedVersion { target: String, found: u32 },
}

pub fn read(storage: &dyn Storage, base: u64) -> Result<Read, ReadError> {
    let mut best: Option<Slot> = None;
    let mut errs = [SlotError::Empty, SlotError::Empty];
    for (i, err) in errs.iter_mut().enumerate() {
        let mut b = vec![0u8; SLOT_LEN];
        storage.read_at(&mut b, base + (i * SLOT_LEN) as u64)?;
        match decode(&b) {
            Ok(s) if best.as_ref().is_none_or(|c| s.generation > c.generation) => best = Some(s),
            Ok(_) => {}
            Err(SlotError::Version(found)) => {
                return Err(ReadError::UnsupportedVersion {
                    target: storage.target().to_owned(),
                    found,
                });
            }
            Err(e) => *err = e,
        }
    }
    Ok(match best {
        Some(s) => Read::Valid(s),
        None => {
            let [slot0, slot1] = errs;
            Read::Invalid { slot0, slot1 }
        }
    })
}

/// Writes `slot` into the slot its generation selects and syncs.
pub fn write(storage: &dyn Storage, base: u64, slot: &Slot) -> Result<(), StorageError> {
    let at = base + (slot.generation % 2) * SLOT_LEN as u64;
    storage.write_at(&encode(slot), at)?;
    storage.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn slots_round_trip(
            generation: u64,
            volume_size: u64,
            shift in 12u32..40,
            mut extents in proptest::collection::vec(any::<u64>(), 0..MAX_ACTIVE),
        ) {
            extents.sort_unstable();
            let s = Slot { generation, volume_size, extent_size: 1 << shift, extents };
            prop_assert_eq!(decode(&encode(&s)), Ok(s));
        }

        #[test]
        fn arbitrary_bytes_never_decode_as_a_slot_by_accident(
            bytes in proptest::collection::vec(any::<u8>(), SLOT_LEN..=SLOT_LEN)
        ) {
            prop_assert!(decode(&bytes).is_err());
        }
    }

    #[test]
    fn a_torn_slot_is_invalid() {
        let s = Slot {
            generation: 3,
            volume_size: 1 << 30,
            extent_size: 4 << 20,
            extents: vec![1, 2, 9],
        };
        let mut b = encode(&s);
        b[100..].fill(0);
        assert_eq!(decode(&b), Err(SlotError::BadChecksum));
        assert_eq!(MAX_ACTIVE, 503);
    }
}
