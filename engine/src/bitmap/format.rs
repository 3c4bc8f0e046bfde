//! The on-disk format of the dirty bitmap (`<pool>/<volume>/bitmap`), and
//! the load that decides whether what is on disk can be trusted.
//!
//! # Layout (all integers little-endian, every page 4096 bytes)
//!
//! ```text
//! offset            length  content
//! 0                 4096    header slot 0 (even generations)
//! 4096              4096    header slot 1 (odd generations)
//! 8192 + 8192*b     4096    block b, copy 0
//! 12288 + 8192*b    4096    block b, copy 1
//! ```
//!
//! A header slot:
//!
//! ```text
//! 0    8   magic "TWVLBMAP"
//! 8    4   format version (FORMAT_VERSION)
//! 12   4   reserved, zero
//! 16   8   generation: +1 on every header update; the valid slot with the highest wins
//! 24   8   volume size in bytes
//! 32   8   region size (granularity) in bytes
//! 40   8   session: +1 every time tracking (re)starts; blocks carry it
//! 48   1   state: 0 clean (no peer out of sync), 1 tracking
//! 49   1   initial fill of the session: 0 all clean, 1 all dirty
//! 50   6   reserved, zero
//! 56   8   epoch since which the peer is out of sync
//! 64   1   peer replica id length, then 63 bytes of id (zero padded)
//! 128  ..  zero up to 4092
//! 4092 4   CRC32C of bytes 0..4092
//! ```
//!
//! A block copy covers `REGIONS_PER_BLOCK` (32448) regions, 2 GiB of volume
//! at the default 64 KiB regions:
//!
//! ```text
//! 0    8   magic "TWVLBMBK"
//! 8    8   block index (a copy written to the wrong place is caught)
//! 16   8   session the copy belongs to
//! 24   8   sequence: +1 on every write of this block; the higher valid copy wins
//! 32   4056 bits: 507 u64 words, region r of the block is bit r%64 of word r/64
//! 4088 4   reserved, zero
//! 4092 4   CRC32C of bytes 0..4092
//! ```
//!
//! # Why this shape
//!
//! - **Header in A/B slots**, exactly like the replica metadata: a torn
//!   header write leaves the previous header. Header updates are rare (start
//!   and stop of tracking), so two syncs' worth of care costs nothing.
//! - **Bits in blocks, each block in A/B copies.** The hot structure is
//!   written on every 0→1 transition batch; writing only the touched blocks
//!   keeps those writes at 4 KiB. Each block write goes to the copy that is
//!   *not* the current one, so a torn write leaves the previous version of
//!   that block intact: a crash in the middle of a mark loses only bits that
//!   were not acknowledged yet, instead of making the whole bitmap
//!   untrustworthy (a full copy of the volume).
//! - **Sessions** make starting to track O(1): a new session is one header
//!   write, and every block copy of an older session simply reads as the
//!   session's initial fill (all clean, or all dirty for a full resync). No
//!   volume-sized zeroing while writes are held at a fail-over.
//! - **What cannot be trusted is said, not guessed.** A block with no valid
//!   copy of the current session but a damaged copy that claims this session
//!   (or a later one), a block copy newer than the header, an unreadable
//!   header, a size or region size different from the volume's: the load
//!   reports [`UntrustedReason`] and the caller copies the whole volume. A
//!   damaged copy claiming an *older* session is the remains of a write torn
//!   before this session began and is ignored; that distinction is what lets
//!   a crash during the first write of a block in a session fall back to the
//!   initial fill when the torn write did not reach the block's first sector.

use crate::protocol::{Epoch, ReplicaId};
pub use crate::slot::SlotError;
use crate::slot::{u32_at, u64_at};
use crate::storage::{Storage, StorageError};

use super::geometry::Geometry;

pub const MAGIC: [u8; 8] = *b"TWVLBMAP";
pub const BLOCK_MAGIC: [u8; 8] = *b"TWVLBMBK";
pub const FORMAT_VERSION: u32 = 1;
pub const PAGE: usize = 4096;
/// Where the first block copy starts (after the two header slots).
pub const BLOCKS_OFFSET: u64 = 2 * PAGE as u64;
/// u64 words of bits in one block.
pub const WORDS_PER_BLOCK: usize = 507;
/// Regions covered by one block.
pub const REGIONS_PER_BLOCK: u64 = WORDS_PER_BLOCK as u64 * 64;

const BITS_AT: usize = 32;
const CRC_AT: usize = PAGE - 4;

/// Why the bitmap on disk cannot be trusted: the caller must resync the
/// whole volume, and should say this reason when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UntrustedReason {
    #[error("no valid header (slot 0: {slot0}; slot 1: {slot1})")]
    HeaderUnreadable { slot0: String, slot1: String },
    #[error(
        "it was written for a volume of {found_size} bytes with {found_granularity}-byte regions, the volume has {size} bytes and {granularity}-byte regions"
    )]
    GeometryChanged {
        found_size: u64,
        found_granularity: u64,
        size: u64,
        granularity: u64,
    },
    #[error("the file has {len} bytes, the bitmap needs {needed}")]
    Truncated { len: u64, needed: u64 },
    #[error(
        "block {block} has no valid copy of the current session (a damaged write or media error)"
    )]
    BlockUnreadable { block: u64 },
    #[error("block {block} belongs to session {found}, newer than the header's {session}")]
    BlockAheadOfHeader {
        block: u64,
        found: u64,
        session: u64,
    },
    #[error("a write of the bitmap failed earlier, so what is on disk is unknown")]
    WriteFailed,
}

/// Whether a tracking session starts with every region clean or dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Nothing differs yet: the normal start when the peer just left.
    Clean,
    /// Everything may differ: a full copy, tracked so that it can resume.
    AllDirty,
}

/// Who the bitmap tracks and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracking {
    pub peer: ReplicaId,
    pub since: Epoch,
    pub fill: Fill,
}

/// A decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub volume_size: u64,
    pub granularity: u64,
    pub session: u64,
    pub tracking: Option<Tracking>,
}

fn seal(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(b: &[u8]) -> bool {
    crc32c::crc32c(&b[..CRC_AT]) == u32_at(b, CRC_AT)
}

/// Byte offset of header slot `slot`.
pub fn header_offset(slot: u64) -> u64 {
    slot * PAGE as u64
}

/// Byte offset of copy `copy` (0 or 1) of block `block`.
pub fn block_offset(block: u64, copy: u8) -> u64 {
    BLOCKS_OFFSET + (2 * block + u64::from(copy)) * PAGE as u64
}

/// How many blocks a geometry needs.
pub fn block_count(geometry: Geometry) -> u64 {
    geometry.region_count().div_ceil(REGIONS_PER_BLOCK)
}

/// Length of the bitmap file for a geometry.
pub fn file_len(geometry: Geometry) -> u64 {
    block_offset(block_count(geometry), 0)
}

pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&h.generation.to_le_bytes());
    b[24..32].copy_from_slice(&h.volume_size.to_le_bytes());
    b[32..40].copy_from_slice(&h.granularity.to_le_bytes());
    b[40..48].copy_from_slice(&h.session.to_le_bytes());
    if let Some(t) = &h.tracking {
        b[48] = 1;
        b[49] = match t.fill {
            Fill::Clean => 0,
            Fill::AllDirty => 1,
        };
        b[56..64].copy_from_slice(&t.since.0.to_le_bytes());
        let id = t.peer.as_str().as_bytes();
        let n = id.len().min(63);
        b[64] = n as u8;
        b[65..65 + n].copy_from_slice(&id[..n]);
    }
    seal(&mut b);
    b
}

pub fn decode_header(b: &[u8]) -> Result<Header, SlotError> {
    if b[0..8] != MAGIC {
        return Err(SlotError::BadMagic);
    }
    if !sealed(b) {
        return Err(SlotError::BadChecksum);
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(SlotError::Version(version));
    }
    let tracking = match b[48] {
        0 => None,
        1 => {
            let fill = match b[49] {
                0 => Fill::Clean,
                1 => Fill::AllDirty,
                _ => return Err(SlotError::BadField("initial fill")),
            };
            let n = usize::from(b[64]);
            let peer = (n <= 63)
                .then(|| std::str::from_utf8(&b[65..65 + n]).ok())
                .flatten()
                .and_then(|s| ReplicaId::new(s).ok())
                .ok_or(SlotError::BadField("peer id"))?;
            Some(Tracking {
                peer,
                since: Epoch(u64_at(b, 56)),
                fill,
            })
        }
        _ => return Err(SlotError::BadField("state")),
    };
    Ok(Header {
        generation: u64_at(b, 16),
        volume_size: u64_at(b, 24),
        granularity: u64_at(b, 32),
        session: u64_at(b, 40),
        tracking,
    })
}

/// Encodes one copy of block `block` holding `words` (at most
/// `WORDS_PER_BLOCK`; the rest of the block is zero).
pub fn encode_block(block: u64, session: u64, seq: u64, words: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    b[0..8].copy_from_slice(&BLOCK_MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&session.to_le_bytes());
    b[24..32].copy_from_slice(&seq.to_le_bytes());
    for (i, w) in words.iter().take(WORDS_PER_BLOCK).enumerate() {
        let at = BITS_AT + 8 * i;
        b[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    seal(&mut b);
    b
}

/// What one block copy on disk turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockCopy {
    /// Never written (all zero).
    Empty,
    Valid {
        session: u64,
        seq: u64,
        words: Vec<u64>,
    },
    /// Damaged; `claimed_session` is what its session field says, which
    /// may be garbage.
    Damaged { claimed_session: u64 },
}

/// Decodes a block copy; `regions_in_block` bounds which bits may be set.
pub fn decode_block(b: &[u8], block: u64, regions_in_block: u64) -> BlockCopy {
    if b.iter().all(|&x| x == 0) {
        return BlockCopy::Empty;
    }
    let claimed_session = u64_at(b, 16);
    let damaged = BlockCopy::Damaged { claimed_session };
    if b[0..8] != BLOCK_MAGIC || !sealed(b) || u64_at(b, 8) != block {
        return damaged;
    }
    let words: Vec<u64> = (0..WORDS_PER_BLOCK)
        .map(|i| u64_at(b, BITS_AT + 8 * i))
        .collect();
    let mask = block_mask(regions_in_block);
    if words.iter().zip(&mask).any(|(w, m)| w & !m != 0) {
        return damaged;
    }
    BlockCopy::Valid {
        session: claimed_session,
        seq: u64_at(b, 24),
        words,
    }
}

/// The words of a block with every one of its `regions_in_block` bits set.
pub fn block_mask(regions_in_block: u64) -> Vec<u64> {
    (0..WORDS_PER_BLOCK as u64)
        .map(|i| {
            let first = i * 64;
            if regions_in_block >= first + 64 {
                u64::MAX
            } else if regions_in_block > first {
                (1u64 << (regions_in_block - first)) - 1
            } else {
                0
            }
        })
        .collect()
}

/// The regions covered by block `block` of a geometry.
pub fn regions_in_block(geometry: Geometry, block: u64) -> u64 {
    let first = block * REGIONS_PER_BLOCK;
    geometry
        .region_count()
        .saturating_sub(first)
        .min(REGIONS_PER_BLOCK)
}

/// Per block: which copy holds the current version and its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockState {
    pub current: Option<u8>,
    pub seq: u64,
}

/// The bitmap as loaded from disk.
#[derive(Debug)]
pub struct Loaded {
    /// Generation of the valid header (0 when there is none).
    pub generation: u64,
    /// Highest session seen anywhere; a new session must be above it.
    pub max_session: u64,
    pub state: LoadedState,
}

#[derive(Debug)]
pub enum LoadedState {
    Clean,
    Tracking {
        tracking: Tracking,
        session: u64,
        /// One entry per region-word, `block_count * WORDS_PER_BLOCK` long.
        words: Vec<u64>,
        blocks: Vec<BlockState>,
    },
    Untrusted(UntrustedReason),
}

/// Errors of the load that are not "untrusted" but "cannot even decide".
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "bitmap {target} has format version {found}; this build reads version {FORMAT_VERSION}: upgrade twinvol"
    )]
    UnsupportedVersion { target: String, found: u32 },
}

/// Reads the header slots and every block, and decides.
pub fn load(storage: &dyn Storage, geometry: Geometry) -> Result<Loaded, LoadError> {
    let len = storage.size()?;
    let mut header: Option<Header> = None;
    let mut errs = [String::from("missing"), String::from("missing")];
    for slot in 0..2u64 {
        if len < header_offset(slot) + PAGE as u64 {
            continue;
        }
        let mut b = vec![0u8; PAGE];
        storage.read_at(&mut b, header_offset(slot))?;
        match decode_header(&b) {
            Ok(h) if header.as_ref().is_none_or(|c| h.generation > c.generation) => {
                header = Some(h)
            }
            Ok(_) => {}
            Err(SlotError::Version(found)) => {
                return Err(LoadError::UnsupportedVersion {
                    target: storage.target().to_owned(),
                    found,
                });
            }
            Err(e) => errs[slot as usize] = e.to_string(),
        }
    }

    let nblocks = block_count(geometry);
    let mut copies = Vec::with_capacity(nblocks as usize);
    let mut max_session = header.as_ref().map_or(0, |h| h.session);
    for block in 0..nblocks {
        let mut pair = [BlockCopy::Empty, BlockCopy::Empty];
        for (copy, slot) in pair.iter_mut().enumerate() {
            let off = block_offset(block, copy as u8);
            if len < off + PAGE as u64 {
                continue;
            }
            let mut b = vec![0u8; PAGE];
            storage.read_at(&mut b, off)?;
            *slot = decode_block(&b, block, regions_in_block(geometry, block));
            match slot {
                BlockCopy::Valid { session, .. } => max_session = max_session.max(*session),
                // A damaged copy's session may be garbage; only a plausible
                // one raises the bar (a higher bar is always safe).
                BlockCopy::Damaged { claimed_session } if *claimed_session < 1 << 62 => {
                    max_session = max_session.max(*claimed_session)
                }
                _ => {}
            }
        }
        copies.push(pair);
    }

    let generation = header.as_ref().map_or(0, |h| h.generation);
    let untrusted = |reason| {
        Ok(Loaded {
            generation,
            max_session,
            state: LoadedState::Untrusted(reason),
        })
    };
    let Some(header) = header else {
        let [slot0, slot1] = errs;
        return untrusted(UntrustedReason::HeaderUnreadable { slot0, slot1 });
    };
    // Only the region size must match: the volume grows online
    // (`Bitmap::grow` extends the file, then records the new size in the
    // header, and no region past the old end is written before the new
    // size is committed in the volume's metadata), so a crash between the
    // two leaves a header of the old or the new size, both valid for the
    // regions below the old end. The next header written records the
    // volume's size.
    if header.granularity != geometry.granularity().bytes() {
        return untrusted(UntrustedReason::GeometryChanged {
            found_size: header.volume_size,
            found_granularity: header.granularity,
            size: geometry.volume_size(),
            granularity: geometry.granularity().bytes(),
        });
    }
    let Some(tracking) = header.tracking else {
        return Ok(Loaded {
            generation,
            max_session,
            state: LoadedState::Clean,
        });
    };
    let needed = file_len(geometry);
    if len < needed {
        return untrusted(UntrustedReason::Truncated { len, needed });
    }
    let session = header.session;
    let mut words = Vec::with_capacity(nblocks as usize * WORDS_PER_BLOCK);
    let mut blocks = Vec::with_capacity(nblocks as usize);
    for (block, pair) in copies.into_iter().enumerate() {
        let block = block as u64;
        let mut best: Option<(u8, u64, Vec<u64>)> = None;
        let mut damaged_in_session = false;
        for (copy, c) in pair.into_iter().enumerate() {
            match c {
                BlockCopy::Valid {
                    session: s,
                    seq,
                    words,
                } => {
                    if s > session {
                        return untrusted(UntrustedReason::BlockAheadOfHeader {
                            block,
                            found: s,
                            session,
                        });
                    }
                    if s == session && best.as_ref().is_none_or(|b| seq > b.1) {
                        best = Some((copy as u8, seq, words));
                    }
                }
                BlockCopy::Damaged { claimed_session } => {
                    damaged_in_session |= claimed_session >= session;
                }
                BlockCopy::Empty => {}
            }
        }
        match best {
            Some((copy, seq, w)) => {
                words.extend_from_slice(&w);
                blocks.push(BlockState {
                    current: Some(copy),
                    seq,
                });
            }
            None if damaged_in_session => {
                return untrusted(UntrustedReason::BlockUnreadable { block });
            }
            None => {
                match tracking.fill {
                    Fill::Clean => words.extend(std::iter::repeat_n(0, WORDS_PER_BLOCK)),
                    Fill::AllDirty => words.extend(block_mask(regions_in_block(geometry, block))),
                }
                blocks.push(BlockState::default());
            }
        }
    }
    Ok(Loaded {
        generation,
        max_session,
        state: LoadedState::Tracking {
            tracking,
            session,
            words,
            blocks,
        },
    })
}

/// Initialises an empty bitmap file for `geometry`: the file length, a
/// clean header (generation 1 in slot 1, session 0), synced. Synchronous so
/// that the replica can call it while it builds a new volume directory.
pub fn create(storage: &dyn Storage, geometry: Geometry) -> Result<(), StorageError> {
    storage.set_len(file_len(geometry))?;
    let h = Header {
        generation: 1,
        volume_size: geometry.volume_size(),
        granularity: geometry.granularity().bytes(),
        session: 0,
        tracking: None,
    };
    storage.write_at(&encode_header(&h), header_offset(1))?;
    storage.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            generation: 9,
            volume_size: 1 << 30,
            granularity: 65536,
            session: 4,
            tracking: Some(Tracking {
                peer: ReplicaId::new("site-a").expect("id"),
                since: Epoch(12),
                fill: Fill::AllDirty,
            }),
        };
        assert_eq!(decode_header(&encode_header(&h)), Ok(h.clone()));
        let clean = Header {
            tracking: None,
            ..h
        };
        assert_eq!(decode_header(&encode_header(&clean)), Ok(clean));
    }

    #[test]
    fn block_round_trips_and_damage_keeps_the_claimed_session() {
        let mut words = vec![0u64; WORDS_PER_BLOCK];
        words[0] = 0b1011;
        words[506] = 1 << 63;
        let b = encode_block(3, 7, 2, &words);
        assert_eq!(
            decode_block(&b, 3, REGIONS_PER_BLOCK),
            BlockCopy::Valid {
                session: 7,
                seq: 2,
                words: words.clone()
            }
        );
        assert_eq!(
            decode_block(&b, 4, REGIONS_PER_BLOCK),
            BlockCopy::Damaged { claimed_session: 7 },
            "a copy of another block"
        );
        assert_eq!(
            decode_block(&b, 3, 100),
            BlockCopy::Damaged { claimed_session: 7 },
            "bits past the end of the volume"
        );
        let mut torn = b.clone();
        torn[2000..].fill(0);
        assert_eq!(
            decode_block(&torn, 3, REGIONS_PER_BLOCK),
            BlockCopy::Damaged { claimed_session: 7 }
        );
        assert_eq!(decode_block(&[0u8; PAGE], 3, 10), BlockCopy::Empty);
    }

    #[test]
    fn masks_cover_exactly_the_regions_of_a_block() {
        let m = block_mask(130);
        assert_eq!(m[0], u64::MAX);
        assert_eq!(m[1], u64::MAX);
        assert_eq!(m[2], 0b11);
        assert!(m[3..].iter().all(|&w| w == 0));
        assert!(block_mask(REGIONS_PER_BLOCK).iter().all(|&w| w == u64::MAX));
    }
}
