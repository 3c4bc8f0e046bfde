//! The metadata area of a replica volume: a separate file `<pool>/<id>/meta`
//! next to the data file.
//!
//! Why a separate file: the data file must hold exactly the volume's bytes
//! (tests and operators compare it with an image, and it can be attached
//! read-only with `losetup` for `fsck`), and metadata writes must never share
//! a block with data.
//!
//! # Layout (all integers little-endian)
//!
//! ```text
//! offset     length   content
//! 0          4096     slot 0   (holds even generations)
//! 4096       4096     slot 1   (holds odd generations)
//! 8192       57344    reserved (header of the activity log, next issue)
//! 65536      983040   activity log area (ACTIVITY_LOG_OFFSET, ACTIVITY_LOG_LEN)
//! 1048576    ...      dirty bitmap area (BITMAP_OFFSET; its length is in the slot)
//! ```
//!
//! A slot:
//!
//! ```text
//! 0    8   magic "TWVLMETA"
//! 8    4   format version (FORMAT_VERSION)
//! 12   4   reserved, zero
//! 16   8   generation: +1 on every update; the valid slot with the highest wins
//! 24   1   volume id length, then 63 bytes of volume id (zero padded)
//! 88   8   volume size in bytes (the data file's exact length)
//! 96   8   epoch: the highest epoch any frontend opened the volume with
//! 104  8   flags (reserved, zero)
//! 112  4   dirty-bitmap region size in bytes (0: no bitmap yet)
//! 116  4   reserved, zero
//! 120  8   bitmap offset  | 128  8   bitmap length
//! 136  8   activity log offset | 144 8 activity log length
//! 152  1   peer replica id length, then 63 bytes (for the per-peer bitmap)
//! 216  8   incarnation: random, fixed at creation (0: created before
//!          incarnations existed); a replica recreated under the same name
//!          has another, so its peer knows to copy everything to it
//! 224  8   the peer's incarnation when this replica started tracking it
//!          (0: unknown)
//! 232  ..  zero up to 4092
//! 4092 4   CRC32C of bytes 0..4092
//! ```
//!
//! # Crash safety: A/B slots
//!
//! An update writes generation `g + 1` into slot `(g + 1) % 2` — never the
//! slot holding the current generation — then fdatasyncs. A crash during the
//! write leaves a slot that fails its checksum (or an older generation), and
//! reading picks the other, still valid slot: the previous state. The update
//! is reported done only after the sync, so whoever waits for it (an `Open`
//! raising the epoch) is acknowledged only once the new state is durable.
//! The slots are one 4 KiB block each so that a sector-atomic device never
//! mixes two slots in one write.

use crate::protocol::{Epoch, VolumeId};
pub use crate::slot::SlotError;
use crate::slot::{u32_at, u64_at};
use crate::storage::{Storage, StorageError};

pub const MAGIC: [u8; 8] = *b"TWVLMETA";
pub const FORMAT_VERSION: u32 = 1;
pub const SLOT_LEN: usize = 4096;
pub const ACTIVITY_LOG_OFFSET: u64 = 64 * 1024;
pub const ACTIVITY_LOG_LEN: u64 = 1024 * 1024 - ACTIVITY_LOG_OFFSET;
pub const BITMAP_OFFSET: u64 = 1024 * 1024;
/// Length of a freshly created metadata file: slots and reserved areas; the
/// bitmap extends it when the next issue adds one.
pub const META_FILE_LEN: u64 = BITMAP_OFFSET;

const CRC_AT: usize = SLOT_LEN - 4;

/// The decoded content of the current slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub generation: u64,
    pub volume: VolumeId,
    pub size: u64,
    pub epoch: Epoch,
    pub region_size: u32,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub activity_log_offset: u64,
    pub activity_log_len: u64,
    pub peer: Option<String>,
    /// Fixed at creation; tells this copy from a recreated one.
    pub incarnation: u64,
    /// The peer's incarnation when it left the in-sync set (0: unknown).
    pub peer_incarnation: u64,
}

impl Metadata {
    /// Metadata of a new volume, before its first write (generation 0, so
    /// that the first write lands in slot 1 with generation 1).
    pub fn new(volume: VolumeId, size: u64) -> Self {
        Self {
            generation: 0,
            volume,
            size,
            epoch: Epoch(0),
            region_size: 0,
            bitmap_offset: BITMAP_OFFSET,
            bitmap_len: 0,
            activity_log_offset: ACTIVITY_LOG_OFFSET,
            activity_log_len: ACTIVITY_LOG_LEN,
            peer: None,
            incarnation: 0,
            peer_incarnation: 0,
        }
    }
}

/// A random non-zero incarnation for a new volume.
pub fn new_incarnation() -> u64 {
    loop {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_ok() {
            let v = u64::from_le_bytes(b);
            if v != 0 {
                return v;
            }
        }
    }
}

/// Why the metadata area could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "metadata in {target} is unreadable: neither slot has a valid magic and checksum ({slot0}; {slot1})"
    )]
    NoValidSlot {
        target: String,
        slot0: SlotError,
        slot1: SlotError,
    },
    #[error(
        "metadata in {target} has format version {found}; this build reads version {FORMAT_VERSION}: upgrade twinvol"
    )]
    UnsupportedVersion { target: String, found: u32 },
}

fn put_id(buf: &mut [u8], at: usize, id: &str) {
    let b = id.as_bytes();
    let n = b.len().min(63);
    buf[at] = n as u8;
    buf[at + 1..at + 1 + n].copy_from_slice(&b[..n]);
}

fn get_id(buf: &[u8], at: usize) -> Option<String> {
    let n = buf[at] as usize;
    if n > 63 {
        return None;
    }
    String::from_utf8(buf[at + 1..at + 1 + n].to_vec()).ok()
}

/// Encodes `m` as one slot.
pub fn encode_slot(m: &Metadata) -> Box<[u8; SLOT_LEN]> {
    let mut b = Box::new([0u8; SLOT_LEN]);
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&m.generation.to_le_bytes());
    put_id(&mut b[..], 24, m.volume.as_str());
    b[88..96].copy_from_slice(&m.size.to_le_bytes());
    b[96..104].copy_from_slice(&m.epoch.0.to_le_bytes());
    b[112..116].copy_from_slice(&m.region_size.to_le_bytes());
    b[120..128].copy_from_slice(&m.bitmap_offset.to_le_bytes());
    b[128..136].copy_from_slice(&m.bitmap_len.to_le_bytes());
    b[136..144].copy_from_slice(&m.activity_log_offset.to_le_bytes());
    b[144..152].copy_from_slice(&m.activity_log_len.to_le_bytes());
    if let Some(peer) = &m.peer {
        put_id(&mut b[..], 152, peer);
    }
    b[216..224].copy_from_slice(&m.incarnation.to_le_bytes());
    b[224..232].copy_from_slice(&m.peer_incarnation.to_le_bytes());
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one slot.
pub fn decode_slot(b: &[u8; SLOT_LEN]) -> Result<Metadata, SlotError> {
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
    let volume = get_id(b, 24)
        .and_then(|s| VolumeId::new(s).ok())
        .ok_or(SlotError::BadField("volume id"))?;
    let peer = match b[152] {
        0 => None,
        _ => Some(get_id(b, 152).ok_or(SlotError::BadField("peer id"))?),
    };
    Ok(Metadata {
        generation: u64_at(b, 16),
        volume,
        size: u64_at(b, 88),
        epoch: crate::protocol::Epoch(u64_at(b, 96)),
        region_size: u32_at(b, 112),
        bitmap_offset: u64_at(b, 120),
        bitmap_len: u64_at(b, 128),
        activity_log_offset: u64_at(b, 136),
        activity_log_len: u64_at(b, 144),
        peer,
        incarnation: u64_at(b, 216),
        peer_incarnation: u64_at(b, 224),
    })
}

/// Reads both slots and returns the valid one with the highest generation.
pub fn read(storage: &dyn Storage) -> Result<Metadata, MetaError> {
    let mut slots = [SlotError::BadMagic, SlotError::BadMagic];
    let mut best: Option<Metadata> = None;
    for (i, slot_err) in slots.iter_mut().enumerate() {
        let mut buf = Box::new([0u8; SLOT_LEN]);
        storage.read_at(&mut buf[..], (i * SLOT_LEN) as u64)?;
        match decode_slot(&buf) {
            Ok(m) if best.as_ref().is_none_or(|b| m.generation > b.generation) => best = Some(m),
            Ok(_) => {}
            Err(e) => *slot_err = e,
        }
    }
    if let Some(m) = best {
        return Ok(m);
    }
    let [slot0, slot1] = slots;
    for e in [&slot0, &slot1] {
        if let SlotError::Version(found) = e {
            return Err(MetaError::UnsupportedVersion {
                target: storage.target().to_owned(),
                found: *found,
            });
        }
    }
    Err(MetaError::NoValidSlot {
        target: storage.target().to_owned(),
        slot0,
        slot1,
    })
}

/// Durably replaces `current` with `next` (whose generation is ignored and
/// set to `current.generation + 1`), returning what was written. On error
/// the previous state is still the valid one on disk; the caller keeps
/// `current`.
pub fn write(
    storage: &dyn Storage,
    current: &Metadata,
    next: &Metadata,
) -> Result<Metadata, MetaError> {
    let mut next = next.clone();
    next.generation = current.generation + 1;
    let slot = (next.generation % 2) as usize;
    storage.write_at(&encode_slot(&next)[..], (slot * SLOT_LEN) as u64)?;
    storage.sync()?;
    Ok(next)
}

/// Initialises the metadata area of a new volume in empty `storage`.
pub fn create(storage: &dyn Storage, volume: VolumeId, size: u64) -> Result<Metadata, MetaError> {
    storage.set_len(META_FILE_LEN)?;
    let mut m = Metadata::new(volume, size);
    m.incarnation = new_incarnation();
    write(storage, &m, &m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;

    fn vol() -> VolumeId {
        VolumeId::new("v1").expect("valid")
    }

    #[test]
    fn slot_round_trips() {
        let mut m = Metadata::new(vol(), 1 << 30);
        m.generation = 7;
        m.epoch = Epoch(42);
        m.peer = Some("site-b".into());
        assert_eq!(decode_slot(&encode_slot(&m)), Ok(m));
    }

    #[test]
    fn newest_valid_slot_wins_and_a_torn_update_falls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStorage::create_new(&dir.path().join("meta")).expect("create");
        let m1 = create(&s, vol(), 4096).expect("create");
        assert_eq!(m1.generation, 1);
        let mut n = m1.clone();
        n.epoch = Epoch(5);
        let m2 = write(&s, &m1, &n).expect("write");
        assert_eq!(read(&s).expect("read"), m2);
        // Tear the next update: half of slot 1 (generation 3) overwritten.
        n.epoch = Epoch(9);
        let mut torn = encode_slot(&Metadata {
            generation: 3,
            ..n.clone()
        });
        torn[2048..].fill(0xee);
        s.write_at(&torn[..], SLOT_LEN as u64).expect("torn write");
        let back = read(&s).expect("read falls back");
        assert_eq!(back.epoch, Epoch(5));
        assert_eq!(back.generation, 2);
    }

    #[test]
    fn no_valid_slot_is_an_error_naming_the_file_and_both_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("meta");
        let s = FileStorage::create_new(&p).expect("create");
        s.set_len(META_FILE_LEN).expect("set_len");
        let e = read(&s).expect_err("empty");
        let t = e.to_string();
        assert!(
            t.contains(&p.display().to_string()) && t.contains("bad magic"),
            "{t}"
        );
    }

    #[test]
    fn newer_format_version_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStorage::create_new(&dir.path().join("meta")).expect("create");
        create(&s, vol(), 4096).expect("create");
        for slot in 0..2u64 {
            let mut b = Box::new([0u8; SLOT_LEN]);
            s.read_at(&mut b[..], slot * SLOT_LEN as u64).expect("read");
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            b[0..8].copy_from_slice(&MAGIC);
            s.write_at(&b[..], slot * SLOT_LEN as u64).expect("write");
        }
        assert!(matches!(
            read(&s),
            Err(MetaError::UnsupportedVersion { found: 2, .. })
        ));
    }
}

/// Crash tests: an update torn or dropped at any of its storage operations
/// leaves either the old or the new metadata, never neither.
#[cfg(all(test, feature = "failpoints"))]
mod crash_tests {
    use super::*;
    use crate::storage::{FaultAction, FaultPlan, FaultyStorage, FileStorage};

    #[test]
    fn epoch_update_survives_a_fault_at_every_write_and_sync() {
        for point in ["meta::write_at", "meta::sync"] {
            for action in [
                FaultAction::Fail,
                FaultAction::Drop,
                FaultAction::Tear { keep: 0 },
                FaultAction::Tear { keep: 512 },
                FaultAction::Tear { keep: 4000 },
            ] {
                let dir = tempfile::tempdir().expect("tempdir");
                let plan = FaultPlan::new();
                let s = FaultyStorage::new(
                    FileStorage::create_new(&dir.path().join("meta")).expect("create"),
                    "meta",
                    plan.clone(),
                );
                let vol = VolumeId::new("v1").expect("valid");
                let m1 = create(&s, vol, 1 << 20).expect("create");
                let mut n = m1.clone();
                n.epoch = Epoch(7);
                plan.inject(point, 0, Some(1), action);
                let r = write(&s, &m1, &n);
                let back = read(&s).expect("metadata still readable");
                assert!(
                    back.epoch == Epoch(0) || back.epoch == Epoch(7),
                    "{point} {action:?}: epoch {:?}",
                    back.epoch
                );
                if r.is_err() {
                    // A failed update never reports the new state, and the
                    // next attempt succeeds from the state on disk.
                    let again = write(&s, &back, &n).expect("retry");
                    assert_eq!(read(&s).expect("read"), again);
                }
            }
        }
    }
}
