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
//! 104  8   flags: bit 0 a record view is stored (232..761), bit 1 a
//!          peer fence is stored (768..784); other bits zero
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
//! 232  8   record view: epoch of the frontend that published it
//! 240  8   record view: that frontend's sequence number of the record
//! 248  64  this replica's name in the record (length, then 63 bytes)
//! 312  64  the peer's name in the record
//! 376  1   number of in-sync replicas (0..=2), then 2 × 64 bytes of names
//! 505  256 the record's arbiter version (length, then 255 bytes)
//! 761  7   zero
//! 768  8   peer fence: the epoch at which ...
//! 776  8   ... the frontend gave up its sessions to the peer below this
//!          generation (applied on the peer by the resync before it copies)
//! 784  ..  zero up to 4092
//! 4092 4   CRC32C of bytes 0..4092
//! ```
//!
//! Format version 2 added the record view and the peer fence (in bytes
//! that version 1 kept zero, with their flags); a version 1 slot reads as
//! one without them.
//!
//! # Why the record view is here
//!
//! Which way a resync may go comes from the arbiter's record, not from a
//! dirty-tracking header that may outlive its reason (see
//! `replica::direction`): the replica keeps the newest view of the record
//! it learned (from the frontend, or from its peer's resync claim), across
//! restarts, and acts on it at startup.
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

use crate::protocol::{ArbiterVersion, Epoch, ReplicaId, SessionGen, SyncView, VolumeId};
pub use crate::slot::SlotError;
use crate::slot::{u32_at, u64_at};
use crate::storage::{Storage, StorageError};

pub const MAGIC: [u8; 8] = *b"TWVLMETA";
pub const FORMAT_VERSION: u32 = 2;
/// The previous format (no record view, no peer fence), still read.
const FORMAT_VERSION_1: u32 = 1;
const FLAG_VIEW: u64 = 1;
const FLAG_PEER_FENCE: u64 = 2;
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
    /// The newest view of the arbiter's record this replica learned.
    pub view: Option<StoredView>,
    /// The frontend's sessions to the peer it gave up on.
    pub peer_fence: Option<PeerFence>,
}

/// A view of the arbiter's record as one replica knows it: who it is in
/// the record, who its peer is, and the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredView {
    pub me: ReplicaId,
    pub peer: ReplicaId,
    pub view: SyncView,
}

impl StoredView {
    /// Whether the view lists this replica in sync.
    pub fn me_in_sync(&self) -> bool {
        self.view.lists(&self.me)
    }

    /// Whether the view lists the peer in sync.
    pub fn peer_in_sync(&self) -> bool {
        self.view.lists(&self.peer)
    }
}

/// The frontend of `epoch` gave up its sessions to the peer below `below`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFence {
    pub epoch: Epoch,
    pub below: SessionGen,
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
            view: None,
            peer_fence: None,
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
    let mut flags = 0;
    if let Some(v) = &m.view {
        flags |= FLAG_VIEW;
        b[232..240].copy_from_slice(&v.view.epoch.0.to_le_bytes());
        b[240..248].copy_from_slice(&v.view.seq.to_le_bytes());
        put_id(&mut b[..], 248, v.me.as_str());
        put_id(&mut b[..], 312, v.peer.as_str());
        let n = v.view.in_sync.len().min(2);
        b[376] = n as u8;
        for (i, id) in v.view.in_sync.iter().take(n).enumerate() {
            put_id(&mut b[..], 377 + 64 * i, id.as_str());
        }
        let ver = v.view.arbiter_version.as_str().as_bytes();
        b[505] = ver.len() as u8; // at most 255 (checked by its constructor)
        b[506..506 + ver.len()].copy_from_slice(ver);
    }
    if let Some(f) = &m.peer_fence {
        flags |= FLAG_PEER_FENCE;
        b[768..776].copy_from_slice(&f.epoch.0.to_le_bytes());
        b[776..784].copy_from_slice(&f.below.0.to_le_bytes());
    }
    b[104..112].copy_from_slice(&flags.to_le_bytes());
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
    if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
        return Err(SlotError::Version(version));
    }
    let flags = if version == FORMAT_VERSION_1 {
        0
    } else {
        u64_at(b, 104)
    };
    let replica = |at: usize, what: &'static str| {
        get_id(b, at)
            .and_then(|s| ReplicaId::new(s).ok())
            .ok_or(SlotError::BadField(what))
    };
    let view = if flags & FLAG_VIEW != 0 {
        let n = b[376] as usize;
        if n > 2 {
            return Err(SlotError::BadField("in-sync count"));
        }
        let in_sync = (0..n)
            .map(|i| replica(377 + 64 * i, "in-sync replica"))
            .collect::<Result<Vec<_>, _>>()?;
        let len = b[505] as usize;
        let arbiter_version = std::str::from_utf8(&b[506..506 + len])
            .ok()
            .and_then(|s| ArbiterVersion::new(s).ok())
            .ok_or(SlotError::BadField("arbiter version"))?;
        Some(StoredView {
            me: replica(248, "own replica id")?,
            peer: replica(312, "peer replica id")?,
            view: SyncView {
                epoch: Epoch(u64_at(b, 232)),
                seq: u64_at(b, 240),
                arbiter_version,
                in_sync,
            },
        })
    } else {
        None
    };
    let peer_fence = (flags & FLAG_PEER_FENCE != 0).then(|| PeerFence {
        epoch: Epoch(u64_at(b, 768)),
        below: SessionGen(u64_at(b, 776)),
    });
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
        view,
        peer_fence,
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
    fn the_record_view_and_the_peer_fence_round_trip() {
        let id = |s: &str| ReplicaId::new(s).expect("valid");
        let mut m = Metadata::new(vol(), 1 << 30);
        m.view = Some(StoredView {
            me: id("site-a"),
            peer: id("site-b"),
            view: SyncView {
                epoch: Epoch(7),
                seq: 3,
                arbiter_version: ArbiterVersion::new("v".repeat(255)).expect("valid"),
                in_sync: vec![id("site-a"), id("site-b")],
            },
        });
        m.peer_fence = Some(PeerFence {
            epoch: Epoch(7),
            below: SessionGen(12),
        });
        assert_eq!(decode_slot(&encode_slot(&m)), Ok(m.clone()));
        m.view = None;
        assert_eq!(decode_slot(&encode_slot(&m)), Ok(m));
    }

    #[test]
    fn a_version_1_slot_reads_without_view_or_fence() {
        let mut m = Metadata::new(vol(), 4096);
        m.epoch = Epoch(4);
        let mut b = encode_slot(&m);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        // Version 1 wrote zero there; garbage must not be read as flags.
        b[104] = 0xff;
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        let back = decode_slot(&b).expect("version 1 reads");
        assert_eq!(
            (back.epoch, back.view, back.peer_fence),
            (Epoch(4), None, None)
        );
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
            b[8..12].copy_from_slice(&3u32.to_le_bytes());
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            b[0..8].copy_from_slice(&MAGIC);
            s.write_at(&b[..], slot * SLOT_LEN as u64).expect("write");
        }
        assert!(matches!(
            read(&s),
            Err(MetaError::UnsupportedVersion { found: 3, .. })
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
