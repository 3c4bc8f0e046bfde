//! The live dirty bitmap: which regions the out-of-sync peer misses, kept
//! durable with group commit, and the copy protocol the resync uses.
//!
//! # Durability and batching
//!
//! [`Bitmap::mark`] returns only when every region of its range is durably
//! set. Three sets of bits make that cheap:
//!
//! - `words`: what the bitmap should be (set by marks, cleared by finished
//!   copies);
//! - `stable`: bits that are set on disk *and* stay set whatever the write
//!   in flight does — the hot path only reads this: a range whose bits are
//!   all stable returns at once, with no I/O and no wait;
//! - `dirty_blocks`: blocks whose `words` differ from disk.
//!
//! One flusher task at a time owns the bitmap file's I/O (header changes and
//! block writes, never both at once): it snapshots the dirty blocks under the
//! lock, releases it, writes each to its non-current copy, syncs once, then
//! publishes. Every marker that set bits meanwhile waits for the next round,
//! so N concurrent 0→1 transitions cost one write per touched block and one
//! sync, not N. No lock is held across a storage call or an `.await`.
//!
//! # Copy protocol (resync)
//!
//! Clearing a bit before the region is copied would let a flush persist the
//! clear while the copy is still running; a crash then loses the region. So
//! a copy is *snapshot, copy, clear-unless-overlapped*:
//!
//! 1. [`Bitmap::begin_copy`] registers the copy; the bit stays set.
//! 2. The resync reads the region locally and writes it to the peer,
//!    durably.
//! 3. [`CopyGuard::finish`] clears the bit in memory (persisted lazily, by
//!    the next flush or [`Bitmap::persist`]) — unless a write overlapped the
//!    copy: one marked after `begin_copy`, or one still in flight when it
//!    was called (its [`MarkGuard`] alive: its data may land after the
//!    copy's read). Then the bit stays set and the region is copied again.
//!
//! A crash anywhere in this sequence leaves the bit set on disk: the region
//! is copied again after restart (copying is idempotent).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::protocol::{Epoch, ReplicaId};
use crate::storage::{Storage, StorageError, blocking};

use super::format::{
    self, BlockState, Fill, Header, LoadError, LoadedState, REGIONS_PER_BLOCK, Tracking,
    UntrustedReason, WORDS_PER_BLOCK, block_mask, block_offset, encode_block, encode_header,
    header_offset, regions_in_block,
};
use super::geometry::{Geometry, RegionIndex};

/// Why a bitmap operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap {target}: write failed")]
    Storage {
        target: String,
        #[source]
        source: Arc<StorageError>,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "range of {len} bytes at offset {offset} is empty or outside the volume of {volume_size} bytes"
    )]
    OutOfRange {
        offset: u64,
        len: u64,
        volume_size: u64,
    },
    #[error(
        "bitmap {target} is not tracking a peer: call start_tracking before writing without it"
    )]
    NotTracking { target: String },
    #[error("bitmap {target} cannot be trusted ({reason}): reset it for a full resync")]
    Untrusted {
        target: String,
        reason: UntrustedReason,
    },
    #[error(
        "bitmap {target} tracks peer {tracking}, not {requested}: reset it for a full resync of the new peer"
    )]
    OtherPeer {
        target: String,
        tracking: ReplicaId,
        requested: ReplicaId,
    },
    #[error("bitmap {target}: another tracking change is in progress")]
    Busy { target: String },
    #[error("bitmap {target} cannot go from {from} to {to}: {why}")]
    BadResize {
        target: String,
        from: Geometry,
        to: Geometry,
        why: &'static str,
    },
    #[error("{region} is already being copied")]
    AlreadyCopying { region: RegionIndex },
}

/// What the bitmap says about the peer, as a caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapState {
    /// The peer is in sync: nothing is tracked.
    Clean,
    /// The peer has been out of sync since `since`; the dirty regions say
    /// what it misses.
    Tracking { peer: ReplicaId, since: Epoch },
    /// What is on disk cannot be trusted: a full resync is needed, for this
    /// reason.
    Untrusted(UntrustedReason),
}

#[derive(Debug, Clone)]
enum Mode {
    Clean,
    Tracking { tracking: Tracking, session: u64 },
    Untrusted(UntrustedReason),
}

/// A header change waiting for the flusher.
#[derive(Debug)]
struct HeaderChange {
    session: u64,
    tracking: Option<Tracking>,
    /// A resize ([`Bitmap::grow`]): the header records the new size, the
    /// mode and the bits stay as they are.
    keep_bits: bool,
}

#[derive(Debug)]
struct State {
    /// The volume's size and region size (the size grows with the volume,
    /// [`Bitmap::grow`]).
    geometry: Geometry,
    mode: Mode,
    words: Vec<u64>,
    stable: Vec<u64>,
    blocks: Vec<BlockState>,
    dirty_blocks: BTreeSet<u64>,
    dirty_count: u64,
    header_generation: u64,
    max_session: u64,
    pending_header: Option<HeaderChange>,
    flushing: bool,
    /// Sequence number of the next flush round to start.
    next_flush: u64,
    /// Last round that completed (successfully or not).
    done: u64,
    error: Option<(u64, Arc<StorageError>)>,
    /// Writes between `mark` and the drop of their guard: id → regions.
    writes: HashMap<u64, Range<u64>>,
    next_write: u64,
    /// Regions being copied → whether a write overlapped the copy.
    copies: HashMap<u64, bool>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    state: Mutex<State>,
    rounds: watch::Sender<u64>,
}

/// The dirty-region bitmap of one volume. Cheap to clone (shared).
#[derive(Clone)]
pub struct Bitmap {
    inner: Arc<Inner>,
}

/// Keeps a marked write registered until its data is written; drop it
/// then (see the copy protocol in the module docs).
pub struct MarkGuard {
    inner: Arc<Inner>,
    id: u64,
}

/// One region being copied by the resync; [`CopyGuard::finish`] once the
/// peer has it durably, or drop to abandon (the bit stays set).
pub struct CopyGuard {
    inner: Arc<Inner>,
    region: RegionIndex,
    session: u64,
    finished: bool,
}

fn bit(words: &[u64], r: u64) -> bool {
    words[(r / 64) as usize] & (1 << (r % 64)) != 0
}

impl State {
    fn session(&self) -> Option<u64> {
        match &self.mode {
            Mode::Tracking { session, .. } => Some(*session),
            _ => None,
        }
    }

    fn all_stable(&self, regions: &Range<u64>) -> bool {
        regions.clone().all(|r| bit(&self.stable, r))
    }

    /// Sets the bits of `regions`; returns whether any was not stable.
    fn set_bits(&mut self, regions: &Range<u64>) -> bool {
        let mut unstable = false;
        for r in regions.clone() {
            let (w, m) = ((r / 64) as usize, 1u64 << (r % 64));
            if self.words[w] & m == 0 {
                self.words[w] |= m;
                self.dirty_count += 1;
                // Not on disk (or a pending clear): the block must be written.
                self.dirty_blocks.insert(r / REGIONS_PER_BLOCK);
            }
            unstable |= self.stable[w] & m == 0;
        }
        unstable
    }

    fn reset_bits(&mut self, geometry: Geometry, fill: Fill) {
        let nblocks = format::block_count(geometry);
        self.words.clear();
        for b in 0..nblocks {
            match fill {
                Fill::Clean => self.words.extend(std::iter::repeat_n(0, WORDS_PER_BLOCK)),
                Fill::AllDirty => self.words.extend(block_mask(regions_in_block(geometry, b))),
            }
        }
        self.stable = self.words.clone();
        self.blocks = vec![BlockState::default(); nblocks as usize];
        self.dirty_blocks.clear();
        self.dirty_count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.copies.clear();
    }
}

/// One round of the flusher.
enum Job {
    Header {
        seq: u64,
        header: Header,
        keep_bits: bool,
    },
    Blocks {
        seq: u64,
        /// (block, copy written, its sequence, the words written)
        blocks: Vec<(u64, u8, u64, Vec<u64>)>,
        writes: Vec<(u64, Vec<u8>)>,
    },
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind, whose
        // every update is complete before any call that could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self) -> String {
        self.storage.target().to_owned()
    }

    fn require_tracking(&self, st: &State) -> Result<u64, BitmapError> {
        match &st.mode {
            Mode::Tracking { session, .. } => Ok(*session),
            Mode::Clean => Err(BitmapError::NotTracking {
                target: self.target(),
            }),
            Mode::Untrusted(reason) => Err(BitmapError::Untrusted {
                target: self.target(),
                reason: reason.clone(),
            }),
        }
    }

    fn storage_error(&self, source: Arc<StorageError>) -> BitmapError {
        BitmapError::Storage {
            target: self.target(),
            source,
        }
    }

    /// Starts the flusher if there is work and none runs.
    fn kick(self: &Arc<Self>, st: &mut State) {
        if !st.flushing && (st.pending_header.is_some() || !st.dirty_blocks.is_empty()) {
            st.flushing = true;
            tokio::spawn(flush_loop(self.clone()));
        }
    }

    fn take_job(&self, st: &mut State) -> Option<Job> {
        if let Some(change) = st.pending_header.take() {
            let seq = st.next_flush;
            st.next_flush += 1;
            let header = Header {
                generation: st.header_generation + 1,
                volume_size: st.geometry.volume_size(),
                granularity: st.geometry.granularity().bytes(),
                session: change.session,
                tracking: change.tracking,
            };
            return Some(Job::Header {
                seq,
                header,
                keep_bits: change.keep_bits,
            });
        }
        let session = match st.session() {
            Some(s) => s,
            None => {
                // Clears left over from a session that ended: nothing reads them.
                st.dirty_blocks.clear();
                return None;
            }
        };
        if st.dirty_blocks.is_empty() {
            return None;
        }
        let seq = st.next_flush;
        st.next_flush += 1;
        let mut blocks = Vec::new();
        let mut writes = Vec::new();
        for b in std::mem::take(&mut st.dirty_blocks) {
            let range = b as usize * WORDS_PER_BLOCK..(b as usize + 1) * WORDS_PER_BLOCK;
            let snap = st.words[range.clone()].to_vec();
            for (s, w) in st.stable[range].iter_mut().zip(&snap) {
                *s &= w;
            }
            let bs = st.blocks[b as usize];
            let copy = bs.current.map_or(0, |c| 1 - c);
            let bseq = bs.seq + 1;
            writes.push((block_offset(b, copy), encode_block(b, session, bseq, &snap)));
            blocks.push((b, copy, bseq, snap));
        }
        Some(Job::Blocks {
            seq,
            blocks,
            writes,
        })
    }
}

async fn flush_loop(inner: Arc<Inner>) {
    loop {
        let job = {
            let mut st = inner.lock();
            match inner.take_job(&mut st) {
                Some(job) => job,
                None => {
                    st.flushing = false;
                    return;
                }
            }
        };
        let failed = match job {
            Job::Header {
                seq,
                header,
                keep_bits,
            } => {
                let storage = inner.storage.clone();
                let buf = encode_header(&header);
                let slot = header.generation % 2;
                let r = blocking(move || {
                    storage.write_at(&buf, header_offset(slot))?;
                    storage.sync()
                })
                .await;
                let mut st = inner.lock();
                st.done = seq;
                st.max_session = st.max_session.max(header.session);
                let failed = match r {
                    Ok(()) if keep_bits => {
                        st.header_generation = header.generation;
                        false
                    }
                    Ok(()) => {
                        st.header_generation = header.generation;
                        match header.tracking {
                            Some(tracking) => {
                                let g = st.geometry;
                                st.reset_bits(g, tracking.fill);
                                st.mode = Mode::Tracking {
                                    tracking,
                                    session: header.session,
                                };
                            }
                            None => {
                                let g = st.geometry;
                                st.reset_bits(g, Fill::Clean);
                                st.mode = Mode::Clean;
                            }
                        }
                        false
                    }
                    Err(e) => {
                        st.error = Some((seq, Arc::new(e)));
                        true
                    }
                };
                if failed {
                    st.flushing = false;
                }
                failed
            }
            Job::Blocks {
                seq,
                blocks,
                writes,
            } => {
                let storage = inner.storage.clone();
                let r = blocking(move || {
                    for (off, buf) in &writes {
                        storage.write_at(buf, *off)?;
                    }
                    storage.sync()
                })
                .await;
                let mut st = inner.lock();
                st.done = seq;
                let failed = match r {
                    Ok(()) => {
                        for (b, copy, bseq, snap) in blocks {
                            let at = b as usize * WORDS_PER_BLOCK;
                            // Bits set since the snapshot are not on disk yet.
                            for (i, w) in snap.iter().enumerate() {
                                st.stable[at + i] = *w & st.words[at + i];
                            }
                            st.blocks[b as usize] = BlockState {
                                current: Some(copy),
                                seq: bseq,
                            };
                        }
                        false
                    }
                    Err(e) => {
                        // Whatever landed, the current copy of each block is
                        // intact; the next round writes the other one again.
                        st.dirty_blocks.extend(blocks.iter().map(|b| b.0));
                        st.error = Some((seq, Arc::new(e)));
                        true
                    }
                };
                if failed {
                    st.flushing = false;
                }
                failed
            }
        };
        inner.rounds.send_replace(inner.lock().done);
        if failed {
            return;
        }
    }
}

impl Bitmap {
    /// Opens the bitmap file in `storage` for a volume of `geometry`. What
    /// it finds is in [`Bitmap::state`]: `Untrusted` means the caller must
    /// [`Bitmap::reset_all_dirty`] (a full resync) and say why.
    pub async fn open(storage: Arc<dyn Storage>, geometry: Geometry) -> Result<Self, BitmapError> {
        let s = storage.clone();
        let loaded = match tokio::task::spawn_blocking(move || format::load(&*s, geometry)).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(LoadError::Storage(StorageError {
                    op: "blocking task",
                    target: storage.target().to_owned(),
                    offset: 0,
                    source: std::io::Error::other(e.to_string()),
                })
                .into());
            }
        };
        let nblocks = format::block_count(geometry) as usize;
        let mut st = State {
            geometry,
            mode: Mode::Clean,
            words: Vec::new(),
            stable: Vec::new(),
            blocks: vec![BlockState::default(); nblocks],
            dirty_blocks: BTreeSet::new(),
            dirty_count: 0,
            header_generation: loaded.generation,
            max_session: loaded.max_session,
            pending_header: None,
            flushing: false,
            next_flush: 1,
            done: 0,
            error: None,
            writes: HashMap::new(),
            next_write: 0,
            copies: HashMap::new(),
        };
        st.reset_bits(geometry, Fill::Clean);
        match loaded.state {
            LoadedState::Clean => {}
            LoadedState::Untrusted(reason) => st.mode = Mode::Untrusted(reason),
            LoadedState::Tracking {
                tracking,
                session,
                words,
                blocks,
            } => {
                st.dirty_count = words.iter().map(|w| u64::from(w.count_ones())).sum();
                st.stable = words.clone();
                st.words = words;
                st.blocks = blocks;
                st.mode = Mode::Tracking { tracking, session };
            }
        }
        let (rounds, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                storage,
                state: Mutex::new(st),
                rounds,
            }),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.inner.lock().geometry
    }

    pub fn state(&self) -> BitmapState {
        match &self.inner.lock().mode {
            Mode::Clean => BitmapState::Clean,
            Mode::Tracking { tracking, .. } => BitmapState::Tracking {
                peer: tracking.peer.clone(),
                since: tracking.since,
            },
            Mode::Untrusted(r) => BitmapState::Untrusted(r.clone()),
        }
    }

    /// Returns once every region of `len` bytes at `offset` is durably
    /// marked dirty. Ranges already durably dirty return at once without
    /// I/O; 0→1 transitions of concurrent callers share one write per
    /// touched block and one sync. Keep the guard until the data write of
    /// this range is done.
    pub async fn mark(&self, offset: u64, len: u64) -> Result<MarkGuard, BitmapError> {
        let inner = &self.inner;
        let regions = self.regions(offset, len)?;
        let (guard, start) = {
            let mut st = inner.lock();
            let session = inner.require_tracking(&st)?;
            let guard = self.register_write(&mut st, &regions);
            if !st.set_bits(&regions) {
                return Ok(guard);
            }
            inner.kick(&mut st);
            (guard, (st.next_flush, session))
        };
        self.wait_stable(&regions, start).await?;
        Ok(guard)
    }

    /// The regions of `len` bytes at `offset`.
    fn regions(&self, offset: u64, len: u64) -> Result<Range<u64>, BitmapError> {
        let g = self.geometry();
        g.regions(offset, len).ok_or(BitmapError::OutOfRange {
            offset,
            len,
            volume_size: g.volume_size(),
        })
    }

    /// Registers a write of `regions` until its guard drops: a copy of one
    /// of them in progress, or begun meanwhile, goes again.
    fn register_write(&self, st: &mut State, regions: &Range<u64>) -> MarkGuard {
        let id = st.next_write;
        st.next_write += 1;
        st.writes.insert(id, regions.clone());
        if !st.copies.is_empty() {
            for r in regions.clone() {
                if let Some(raced) = st.copies.get_mut(&r) {
                    *raced = true;
                }
            }
        }
        MarkGuard {
            inner: self.inner.clone(),
            id,
        }
    }

    /// Registers a write of `len` bytes at `offset` that the peer receives
    /// too (it is catching up), without marking it: a copy of an
    /// overlapping region in progress, or begun while the guard lives, is
    /// not cleared by its `finish` (the copy may carry older data than the
    /// write the peer got directly), so the region is copied again. No I/O.
    pub fn note_write(&self, offset: u64, len: u64) -> Result<MarkGuard, BitmapError> {
        let regions = self.regions(offset, len)?;
        let mut st = self.inner.lock();
        self.inner.require_tracking(&st)?;
        Ok(self.register_write(&mut st, &regions))
    }

    /// Waits until `regions` are stable, a round since `start.0` failed, or
    /// the session `start.1` ended.
    async fn wait_stable(
        &self,
        regions: &Range<u64>,
        start: (u64, u64),
    ) -> Result<(), BitmapError> {
        let inner = &self.inner;
        loop {
            let mut rounds = inner.rounds.subscribe();
            {
                let mut st = inner.lock();
                if st.session() != Some(start.1) {
                    inner.require_tracking(&st)?;
                }
                if st.all_stable(regions) {
                    return Ok(());
                }
                if let Some((seq, e)) = &st.error
                    && *seq >= start.0
                {
                    return Err(inner.storage_error(e.clone()));
                }
                // A clear may have come between (impossible while a write is
                // registered, but cheap to make certain) and a failed round
                // stops the flusher: set again and restart.
                st.set_bits(regions);
                if !st.flushing {
                    let st = &mut *st;
                    for r in regions.clone().filter(|&r| !bit(&st.stable, r)) {
                        st.dirty_blocks.insert(r / REGIONS_PER_BLOCK);
                    }
                }
                inner.kick(&mut st);
            }
            if rounds.changed().await.is_err() {
                return Err(inner.storage_error(Arc::new(StorageError {
                    op: "flush",
                    target: inner.target(),
                    offset: 0,
                    source: std::io::Error::other("bitmap flusher went away"),
                })));
            }
        }
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.inner.lock().dirty_count
    }

    /// Bytes of the volume in dirty regions (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        let st = self.inner.lock();
        let g = st.geometry;
        let mut bytes = st.dirty_count * g.granularity().bytes();
        let last = g.region_count() - 1;
        if bit(&st.words, last) {
            let r = g.byte_range(RegionIndex(last));
            bytes -= g.granularity().bytes() - (r.end - r.start);
        }
        bytes
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: RegionIndex) -> Option<RegionIndex> {
        let st = self.inner.lock();
        let count = st.geometry.region_count();
        let mut r = from.0;
        while r < count {
            let w = st.words[(r / 64) as usize] >> (r % 64);
            if w != 0 {
                let found = r + u64::from(w.trailing_zeros());
                return (found < count).then_some(RegionIndex(found));
            }
            r = (r / 64 + 1) * 64;
        }
        None
    }

    /// The dirty regions as of now (a snapshot).
    pub fn dirty_regions(&self) -> impl Iterator<Item = RegionIndex> + use<> {
        let words = self.inner.lock().words.clone();
        words.into_iter().enumerate().flat_map(|(i, mut w)| {
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros();
                    w &= w - 1;
                    RegionIndex(i as u64 * 64 + u64::from(b))
                })
            })
        })
    }

    /// Starts a copy of `region` for the resync; `None` if it is clean.
    pub fn begin_copy(&self, region: RegionIndex) -> Result<Option<CopyGuard>, BitmapError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        let session = inner.require_tracking(&st)?;
        if region.0 >= st.geometry.region_count() || !bit(&st.words, region.0) {
            return Ok(None);
        }
        if st.copies.contains_key(&region.0) {
            return Err(BitmapError::AlreadyCopying { region });
        }
        let in_flight = st.writes.values().any(|w| w.contains(&region.0));
        st.copies.insert(region.0, in_flight);
        Ok(Some(CopyGuard {
            inner: inner.clone(),
            region,
            session,
            finished: false,
        }))
    }

    /// Makes every change so far durable, clears included.
    pub async fn persist(&self) -> Result<(), BitmapError> {
        let inner = &self.inner;
        let target = {
            let mut st = inner.lock();
            if st.dirty_blocks.is_empty() && st.pending_header.is_none() && !st.flushing {
                return Ok(());
            }
            inner.kick(&mut st);
            if st.dirty_blocks.is_empty() && st.pending_header.is_none() {
                st.next_flush - 1
            } else {
                st.next_flush
            }
        };
        self.wait_round(target).await
    }

    /// Waits until round `target` is done (or everything is on disk).
    async fn wait_round(&self, target: u64) -> Result<(), BitmapError> {
        let inner = &self.inner;
        loop {
            let mut rounds = inner.rounds.subscribe();
            {
                let mut st = inner.lock();
                if let Some((seq, e)) = &st.error
                    && *seq >= target
                {
                    return Err(inner.storage_error(e.clone()));
                }
                let idle =
                    !st.flushing && st.dirty_blocks.is_empty() && st.pending_header.is_none();
                if st.done >= target || idle {
                    return Ok(());
                }
                inner.kick(&mut st);
            }
            if rounds.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    async fn change_header(
        &self,
        tracking: Option<Tracking>,
        new_session: bool,
    ) -> Result<(), BitmapError> {
        let inner = &self.inner;
        let target = {
            let mut st = inner.lock();
            if st.pending_header.is_some() {
                return Err(BitmapError::Busy {
                    target: inner.target(),
                });
            }
            let session = match st.session() {
                Some(s) if !new_session => s,
                _ => st.max_session + 1,
            };
            st.max_session = st.max_session.max(session);
            st.pending_header = Some(HeaderChange {
                session,
                tracking,
                keep_bits: false,
            });
            inner.kick(&mut st);
            st.next_flush
        };
        self.wait_round(target).await
    }

    /// Starts tracking `peer`, out of sync since `since`, with every region
    /// clean: one header write. Already tracking `peer`: nothing changes
    /// (the bits and the older `since` stay). Call it, and wait for it,
    /// before acknowledging any write the peer does not have.
    pub async fn start_tracking(&self, peer: ReplicaId, since: Epoch) -> Result<(), BitmapError> {
        {
            let st = self.inner.lock();
            match &st.mode {
                Mode::Clean => {}
                Mode::Tracking { tracking, .. } if tracking.peer == peer => return Ok(()),
                Mode::Tracking { tracking, .. } => {
                    return Err(BitmapError::OtherPeer {
                        target: self.inner.target(),
                        tracking: tracking.peer.clone(),
                        requested: peer,
                    });
                }
                Mode::Untrusted(reason) => {
                    return Err(BitmapError::Untrusted {
                        target: self.inner.target(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        let tracking = Tracking {
            peer,
            since,
            fill: Fill::Clean,
        };
        self.change_header(Some(tracking), true).await
    }

    /// Starts a new session for `peer` with every region dirty: the full
    /// resync when no trustworthy bitmap exists (untrusted, a new or
    /// replaced peer). One header write whatever the volume size; the
    /// copy then clears regions as it goes and resumes after a crash.
    pub async fn reset_all_dirty(&self, peer: ReplicaId, since: Epoch) -> Result<(), BitmapError> {
        let tracking = Tracking {
            peer,
            since,
            fill: Fill::AllDirty,
        };
        self.change_header(Some(tracking), true).await
    }

    /// Grows the bitmap with its volume, to `geometry` (same region size,
    /// a larger volume), durably: the file is extended first (a crash
    /// leaves a longer file, which a load ignores), then the header records
    /// the new size (the load accepts a header of either size: no region
    /// beyond the old end was written before the volume's new size was
    /// committed). The new regions are clean — they hold zeros on both
    /// replicas, each grown by preallocation — and the bits and mode of
    /// the regions before stay. An untrusted bitmap only grows in memory
    /// (its header stays as it was: still untrusted at the next load). The
    /// same size again: nothing to do.
    pub async fn grow(&self, geometry: Geometry) -> Result<(), BitmapError> {
        let inner = &self.inner;
        let current = self.geometry();
        let refuse = |why| BitmapError::BadResize {
            target: inner.target(),
            from: current,
            to: geometry,
            why,
        };
        if geometry.granularity() != current.granularity() {
            return Err(refuse("the region size cannot change"));
        }
        if geometry.volume_size() < current.volume_size() {
            return Err(refuse("a bitmap never shrinks"));
        }
        if geometry.volume_size() == current.volume_size() {
            return Ok(());
        }
        let need = format::file_len(geometry);
        let storage = inner.storage.clone();
        blocking(move || {
            if storage.size()? < need {
                storage.set_len(need)?;
                storage.sync()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| inner.storage_error(Arc::new(e)))?;
        let target = {
            let mut st = inner.lock();
            if st.pending_header.is_some() {
                return Err(BitmapError::Busy {
                    target: inner.target(),
                });
            }
            let nblocks = format::block_count(geometry) as usize;
            st.words.resize(nblocks * WORDS_PER_BLOCK, 0);
            st.stable.resize(nblocks * WORDS_PER_BLOCK, 0);
            st.blocks.resize(nblocks, BlockState::default());
            st.geometry = geometry;
            let (session, tracking) = match &st.mode {
                Mode::Untrusted(_) => return Ok(()),
                Mode::Tracking { tracking, session } => (*session, Some(tracking.clone())),
                Mode::Clean => (st.max_session + 1, None),
            };
            st.max_session = st.max_session.max(session);
            st.pending_header = Some(HeaderChange {
                session,
                tracking,
                keep_bits: true,
            });
            inner.kick(&mut st);
            st.next_flush
        };
        self.wait_round(target).await
    }

    /// Stops tracking: the peer is back in the in-sync set (new writes
    /// reach it), so the bits no longer mean anything. Marks racing with
    /// this fail with `NotTracking` once it is done.
    pub async fn stop_tracking(&self) -> Result<(), BitmapError> {
        if matches!(self.inner.lock().mode, Mode::Clean) {
            return Ok(());
        }
        self.change_header(None, false).await
    }
}

impl Drop for MarkGuard {
    fn drop(&mut self) {
        self.inner.lock().writes.remove(&self.id);
    }
}

impl CopyGuard {
    pub fn region(&self) -> RegionIndex {
        self.region
    }

    /// The peer has the region durably: clear its bit unless a write
    /// overlapped the copy. Returns whether the bit was cleared (`false`:
    /// copy it again). The clear reaches the disk with the next flush.
    pub fn finish(mut self) -> bool {
        self.finished = true;
        let mut st = self.inner.lock();
        if st.session() != Some(self.session) {
            return false;
        }
        match st.copies.remove(&self.region.0) {
            Some(false) => {
                let r = self.region.0;
                let (w, m) = ((r / 64) as usize, 1u64 << (r % 64));
                if st.words[w] & m != 0 {
                    st.words[w] &= !m;
                    st.dirty_count -= 1;
                    st.dirty_blocks.insert(r / REGIONS_PER_BLOCK);
                }
                true
            }
            _ => false,
        }
    }
}

impl Drop for CopyGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = self.inner.lock();
            if st.session() == Some(self.session) {
                st.copies.remove(&self.region.0);
            }
        }
    }
}
