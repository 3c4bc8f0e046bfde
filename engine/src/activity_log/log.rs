//! The live activity log: which extents may have writes in flight, made
//! durable before those writes start.
//!
//! # How a write passes
//!
//! [`ActivityLog::begin_write`] maps the range onto extents. If all of them
//! are already in the persisted log, it takes a reference on each and returns
//! at once: no I/O, the common case (writes cluster in few hot extents). If
//! some are being added by the round in flight, it joins that round. Else it
//! queues; a single flusher task admits queued requests in order, evicting
//! least-recently-used extents that have no write in flight (never one with
//! a reference, never one recovered and not yet released), writes the new
//! set in one slot write and one sync, and wakes every request it admitted:
//! concurrent begins share one write. A request that does not fit waits
//! until guards drop; admission is first-come-first-served and a request
//! holds references only once admitted whole, so no two requests can wait
//! on each other's extents.
//!
//! The [`WriteGuard`] drops its references when the data write is done;
//! the extent stays in the log until a later update evicts it. The log thus
//! never holds more than `max_active` extents, and after a crash every extent
//! that had a write in flight is in the recovered set.
//!
//! # Power loss: only durable extents leave
//!
//! A completed write is only in the page cache until the data file is
//! synced; a power cut takes it back. So, with the data file's
//! [`DataSync`] ([`ActivityLog::open_tracking`]), an extent leaves the log —
//! evicted, or dropped by [`ActivityLog::forget_idle`] — only once every
//! write to it is durable: each extent remembers the sync tag of its last
//! completed write. When a request needs room and every idle extent still
//! has writes only in the page cache, the flusher syncs the data file first
//! (as DRBD flushes the backing device before an activity-log transaction),
//! then evicts. After a power cut the recovered set therefore holds every
//! extent this copy may have lost, which is what its peer must copy back.
//!
//! # Failures
//!
//! A failed update leaves the previous slot valid on disk, but the log can no
//! longer promise anything about the writes that were waiting for it: it is
//! poisoned — every waiting and later `begin_write` fails with the cause —
//! and the replica reopens the volume, which runs recovery.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::data_sync::{DataSync, SyncFailed};
use crate::storage::{Storage, StorageError, blocking};

use super::format::{self, MAX_ACTIVE, Read, ReadError, Slot, SlotError};

/// Smallest extent: a bitmap region can't be bigger than an extent usefully.
pub const MIN_EXTENT_SIZE: u64 = 64 * 1024;
/// Extent size used when nothing else is configured.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Active extents used when nothing else is configured: 1 GiB at 4 MiB.
pub const DEFAULT_MAX_ACTIVE: usize = 256;

/// Why an activity log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AlError {
    #[error("extent size {0} is invalid: use a power of two of at least {MIN_EXTENT_SIZE} bytes")]
    BadExtentSize(u64),
    #[error("at most {max} active extents fit in the log, {requested} asked (minimum 1)")]
    BadMaxActive { requested: usize, max: usize },
    #[error(
        "range of {len} bytes at offset {offset} is empty or outside the volume of {volume_size} bytes"
    )]
    OutOfRange {
        offset: u64,
        len: u64,
        volume_size: u64,
    },
    #[error(
        "a write of {len} bytes spans {extents} extents, more than the log's {max_active}: raise max_active or the extent size"
    )]
    TooLarge {
        len: u64,
        extents: u64,
        max_active: usize,
    },
    #[error("activity log {target}: an update failed; reopen the volume to recover")]
    Failed {
        target: String,
        #[source]
        source: Arc<StorageError>,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The index of one extent (extent `i` covers `[i * size, (i + 1) * size)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentIndex(pub u64);

/// How the log is laid out and how big it may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlConfig {
    volume_size: u64,
    extent_size: u64,
    max_active: usize,
    base: u64,
}

impl AlConfig {
    /// `base` is where the log's `format::AREA_LEN` bytes start in its
    /// storage (0 for a file of its own).
    pub fn new(
        volume_size: u64,
        extent_size: u64,
        max_active: usize,
        base: u64,
    ) -> Result<Self, AlError> {
        if !extent_size.is_power_of_two() || extent_size < MIN_EXTENT_SIZE {
            return Err(AlError::BadExtentSize(extent_size));
        }
        if max_active == 0 || max_active > MAX_ACTIVE {
            return Err(AlError::BadMaxActive {
                requested: max_active,
                max: MAX_ACTIVE,
            });
        }
        Ok(Self {
            volume_size,
            extent_size,
            max_active,
            base,
        })
    }

    /// 4 MiB extents, 256 of them, in a file of its own.
    pub fn with_defaults(volume_size: u64) -> Self {
        Self {
            volume_size,
            extent_size: DEFAULT_EXTENT_SIZE,
            max_active: DEFAULT_MAX_ACTIVE,
            base: 0,
        }
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    pub fn max_active(&self) -> usize {
        self.max_active
    }

    /// The most bytes a crash can leave divergent.
    pub fn bound_bytes(&self) -> u64 {
        self.extent_size * self.max_active as u64
    }

    /// The bytes of `e`, clipped to the volume.
    pub fn byte_range(&self, e: ExtentIndex) -> Range<u64> {
        let start = e.0.saturating_mul(self.extent_size).min(self.volume_size);
        start..start.saturating_add(self.extent_size).min(self.volume_size)
    }

    fn extents(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.volume_size {
            return None;
        }
        Some(offset / self.extent_size..(end - 1) / self.extent_size + 1)
    }
}

/// What recovery found at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// These extents may differ between the replicas (writes were in flight
    /// when the process stopped). They stay pinned in the log until
    /// [`ActivityLog::release_recovered`].
    Extents(Vec<ExtentIndex>),
    /// Neither slot is valid: which regions may differ is unknown, so the
    /// whole volume must be resynchronised.
    Lost { slot0: SlotError, slot1: SlotError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the persisted set.
    Logged,
    /// In the set the round in flight is writing.
    Adding,
}

#[derive(Debug)]
struct Ext {
    refs: u32,
    phase: Phase,
    last_used: u64,
    pinned: bool,
    /// The data sync tag of its last completed write (0: none since open).
    written: u64,
}

/// What the flusher tells a waiting request.
enum Outcome {
    /// Its extents are durably in the log.
    Logged,
    /// The update failed; `holds_refs` says whether the request had been
    /// admitted (and so holds references to give back).
    Failed {
        source: Arc<StorageError>,
        holds_refs: bool,
    },
}

type Reply = oneshot::Sender<Outcome>;

struct Request {
    id: u64,
    extents: Range<u64>,
    reply: Reply,
}

struct State {
    extents: HashMap<u64, Ext>,
    queue: VecDeque<Request>,
    /// Requests waiting for the round in flight.
    round: Vec<Reply>,
    flushing: bool,
    generation: u64,
    tick: u64,
    next_request: u64,
    failed: Option<Arc<StorageError>>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    /// The data file's syncs: extents leave only once durable (none: the
    /// caller does not track durability; every idle extent may leave).
    data: Option<Arc<DataSync>>,
    /// The layout; its volume size is `volume_size`'s (the volume grows).
    config: AlConfig,
    volume_size: AtomicU64,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
}

/// The activity log of one replica volume. Cheap to clone (shared).
#[derive(Clone)]
pub struct ActivityLog {
    inner: Arc<Inner>,
}

/// Held while a write is in flight; dropping it marks the write done.
pub struct WriteGuard {
    inner: Arc<Inner>,
    extents: Range<u64>,
}

/// How a `begin_write` that could not return at once waits.
enum Wait {
    Joined(WriteGuard),
    Queued(Queued),
}

/// A queued request; if the caller goes away, this gives back its place or
/// its references.
struct Queued {
    inner: Arc<Inner>,
    id: u64,
    extents: Range<u64>,
    armed: bool,
}

impl Inner {
    /// The layout at the volume's current size.
    fn config(&self) -> AlConfig {
        AlConfig {
            volume_size: self.volume_size.load(Ordering::SeqCst),
            ..self.config
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state completes before anything that could
        // panic, so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, source: Arc<StorageError>) -> AlError {
        AlError::Failed {
            target: self.storage.target().to_owned(),
            source,
        }
    }

    fn kick(self: &Arc<Self>, st: &mut State) {
        if !st.flushing && !st.queue.is_empty() && st.failed.is_none() {
            st.flushing = true;
            self.runtime.spawn(flush_loop(self.clone()));
        }
    }

    fn release(self: &Arc<Self>, extents: Range<u64>) {
        // Read after the data write completed: see `DataSync`.
        let tag = self.write_tag();
        let mut st = self.lock();
        for e in extents {
            if let Some(x) = st.extents.get_mut(&e) {
                x.refs = x.refs.saturating_sub(1);
                x.written = x.written.max(tag);
            }
        }
        self.kick(&mut st);
    }

    fn write_tag(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.tag())
    }

    /// Whether every write to `x` is on stable storage.
    fn durable(&self, x: &Ext) -> bool {
        self.data.as_ref().is_none_or(|d| d.is_durable(x.written))
    }

    /// Admits queued requests in order while they fit; returns the set to
    /// write, or what else to do.
    fn take_round(&self, st: &mut State) -> Take {
        let max = self.config.max_active;
        let idle = |x: &Ext| x.refs == 0 && !x.pinned && x.phase == Phase::Logged;
        let mut lru: Vec<(u64, u64)> = st
            .extents
            .iter()
            .filter(|(_, x)| idle(x) && self.durable(x))
            .map(|(e, x)| (x.last_used, *e))
            .collect();
        lru.sort_unstable();
        let mut lru = lru.into_iter();
        let mut admitted = false;
        while let Some(req) = st.queue.front() {
            let needed = req
                .extents
                .clone()
                .filter(|e| !st.extents.contains_key(e))
                .count();
            let mut free = max.saturating_sub(st.extents.len());
            let mut victims = Vec::new();
            while free < needed {
                let Some((_, v)) = lru.next() else { break };
                let evictable = st
                    .extents
                    .get(&v)
                    .is_some_and(|x| x.refs == 0 && !req.extents.contains(&v));
                if evictable {
                    victims.push(v);
                    free += 1;
                }
            }
            if free < needed {
                // Room would be made by extents whose writes are still only
                // in the page cache: make them durable, then try again.
                let waiting_for_sync = st
                    .extents
                    .iter()
                    .any(|(e, x)| idle(x) && !self.durable(x) && !req.extents.contains(e));
                if !admitted && waiting_for_sync {
                    return Take::SyncData;
                }
                break;
            }
            for v in victims {
                st.extents.remove(&v);
            }
            let Some(req) = st.queue.pop_front() else {
                break;
            };
            st.tick += 1;
            let tick = st.tick;
            for e in req.extents.clone() {
                let x = st.extents.entry(e).or_insert(Ext {
                    refs: 0,
                    phase: Phase::Adding,
                    last_used: tick,
                    pinned: false,
                    written: 0,
                });
                x.refs += 1;
                x.last_used = tick;
            }
            st.round.push(req.reply);
            admitted = true;
        }
        if !admitted {
            return Take::Nothing;
        }
        let mut extents: Vec<u64> = st.extents.keys().copied().collect();
        extents.sort_unstable();
        Take::Write(Slot {
            generation: st.generation + 1,
            volume_size: self.volume_size.load(Ordering::SeqCst),
            extent_size: self.config.extent_size,
            extents,
        })
    }

    /// Syncs the data file (blocking pool), as a storage error if it fails.
    async fn sync_data(&self) -> Result<(), StorageError> {
        let Some(data) = self.data.clone() else {
            return Ok(());
        };
        blocking(move || data.sync().map_err(sync_error)).await
    }
}

/// What the flusher does next.
enum Take {
    /// Write this set.
    Write(Slot),
    /// Sync the data file first: only extents with writes not yet durable
    /// could make room.
    SyncData,
    /// Nothing can be admitted now.
    Nothing,
}

fn sync_error(f: SyncFailed) -> StorageError {
    StorageError {
        op: "fdatasync of the data file",
        target: f.target.clone(),
        offset: 0,
        source: std::io::Error::other(f.to_string()),
    }
}

async fn flush_loop(inner: Arc<Inner>) {
    loop {
        let take = {
            let mut st = inner.lock();
            let take = inner.take_round(&mut st);
            if matches!(take, Take::Nothing) {
                st.flushing = false;
            }
            take
        };
        let slot = match take {
            Take::Write(slot) => slot,
            Take::Nothing => return,
            Take::SyncData => {
                if let Err(e) = inner.sync_data().await {
                    // The writes waiting for room can be told nothing good:
                    // the log fails as on a failed update of its own.
                    let (e, queued) = poison(&mut inner.lock(), e);
                    fail_queued(queued, &e);
                    return;
                }
                continue;
            }
        };
        let storage = inner.storage.clone();
        let base = inner.config.base;
        let generation = slot.generation;
        let r = blocking(move || format::write(&*storage, base, &slot)).await;
        let (round, queued, failed) = {
            let mut st = inner.lock();
            let round = std::mem::take(&mut st.round);
            match r {
                Ok(()) => {
                    st.generation = generation;
                    for x in st.extents.values_mut() {
                        x.phase = Phase::Logged;
                    }
                    (round, Vec::new(), None)
                }
                Err(e) => {
                    let (e, queued) = poison(&mut st, e);
                    (round, queued, Some(e))
                }
            }
        };
        // A requester that went away has nothing to be told.
        for reply in round {
            let _ = reply.send(match &failed {
                None => Outcome::Logged,
                Some(e) => Outcome::Failed {
                    source: e.clone(),
                    holds_refs: true,
                },
            });
        }
        if let Some(e) = failed {
            fail_queued(queued, &e);
            return;
        }
    }
}

/// Marks the log failed (every later `begin_write` fails with `e`) and
/// takes the replies of the requests still queued, which were never
/// admitted.
fn poison(st: &mut State, e: StorageError) -> (Arc<StorageError>, Vec<Reply>) {
    let e = Arc::new(e);
    st.failed = Some(e.clone());
    st.flushing = false;
    let queued = st.queue.drain(..).map(|q| q.reply).collect();
    (e, queued)
}

/// Tells the requests taken by [`poison`] that the log failed.
fn fail_queued(queued: Vec<Reply>, e: &Arc<StorageError>) {
    for reply in queued {
        let _ = reply.send(Outcome::Failed {
            source: e.clone(),
            holds_refs: false,
        });
    }
}

impl ActivityLog {
    /// Writes an empty log (generation 1) into `storage` at the config's
    /// base, extending the storage if it is shorter, and syncs.
    pub fn create(storage: &dyn Storage, config: AlConfig) -> Result<(), StorageError> {
        let end = config.base + format::AREA_LEN;
        if storage.size()? < end {
            storage.set_len(end)?;
        }
        format::write(
            storage,
            config.base,
            &Slot {
                generation: 1,
                volume_size: config.volume_size,
                extent_size: config.extent_size,
                extents: Vec::new(),
            },
        )
    }

    /// Reads the log and returns what a crash may have left divergent. The
    /// recovered extents stay in the log (pinned) until released, so that a
    /// second crash before they are reconciled still finds them.
    pub async fn open(
        storage: Arc<dyn Storage>,
        config: AlConfig,
    ) -> Result<(Self, Recovery), AlError> {
        Self::open_inner(storage, config, None).await
    }

    /// Like [`ActivityLog::open`], for a volume whose data file syncs
    /// through `data`: an extent then leaves the log only once its writes
    /// are durable (see the module doc). The recovered extents count as
    /// not durable until the first sync of this process (a killed
    /// predecessor's writes may still be in the page cache).
    pub async fn open_tracking(
        storage: Arc<dyn Storage>,
        config: AlConfig,
        data: Arc<DataSync>,
    ) -> Result<(Self, Recovery), AlError> {
        Self::open_inner(storage, config, Some(data)).await
    }

    async fn open_inner(
        storage: Arc<dyn Storage>,
        config: AlConfig,
        data: Option<Arc<DataSync>>,
    ) -> Result<(Self, Recovery), AlError> {
        let written = data.as_ref().map_or(0, |d| d.tag());
        let s = storage.clone();
        let base = config.base;
        let read = match tokio::task::spawn_blocking(move || format::read(&*s, base)).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(AlError::Storage(StorageError {
                    op: "blocking task",
                    target: storage.target().to_owned(),
                    offset: base,
                    source: std::io::Error::other(e.to_string()),
                }));
            }
        };
        let mut st = State {
            extents: HashMap::new(),
            queue: VecDeque::new(),
            round: Vec::new(),
            flushing: false,
            generation: 0,
            tick: 0,
            next_request: 0,
            failed: None,
        };
        let recovery = match read {
            Read::Invalid { slot0, slot1 } => Recovery::Lost { slot0, slot1 },
            Read::Valid(slot) => {
                st.generation = slot.generation;
                // Re-expressed in this configuration's extents, in case the
                // extent size changed since the log was written.
                let mut found = Vec::new();
                for e in slot.extents {
                    let start = e.saturating_mul(slot.extent_size).min(config.volume_size);
                    let end = start
                        .saturating_add(slot.extent_size)
                        .min(config.volume_size);
                    if let Some(r) = config.extents(start, end - start) {
                        found.extend(r);
                    }
                }
                found.sort_unstable();
                found.dedup();
                for &e in &found {
                    st.extents.insert(
                        e,
                        Ext {
                            refs: 0,
                            phase: Phase::Logged,
                            last_used: 0,
                            pinned: true,
                            written,
                        },
                    );
                }
                Recovery::Extents(found.into_iter().map(ExtentIndex).collect())
            }
        };
        let log = Self {
            inner: Arc::new(Inner {
                storage,
                data,
                volume_size: AtomicU64::new(config.volume_size),
                config,
                runtime: tokio::runtime::Handle::current(),
                state: Mutex::new(st),
            }),
        };
        Ok((log, recovery))
    }

    pub fn config(&self) -> AlConfig {
        self.inner.config()
    }

    /// The volume grew to `volume_size` bytes (never smaller): writes up to
    /// the new end may enter the log. Nothing on disk changes (each slot
    /// records the size it was written at, and recovery clips to the
    /// size the volume opens with).
    pub fn grow(&self, volume_size: u64) {
        self.inner
            .volume_size
            .fetch_max(volume_size, Ordering::SeqCst);
    }

    /// Returns once every extent of the range is durably in the log. Keep
    /// the guard until the data write is done (durably, if it must be).
    pub async fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuard, AlError> {
        let inner = &self.inner;
        let config = inner.config();
        let extents = config.extents(offset, len).ok_or(AlError::OutOfRange {
            offset,
            len,
            volume_size: config.volume_size,
        })?;
        let count = extents.end - extents.start;
        if count > config.max_active as u64 {
            return Err(AlError::TooLarge {
                len,
                extents: count,
                max_active: config.max_active,
            });
        }
        let (rx, wait) = {
            let mut st = inner.lock();
            if let Some(e) = &st.failed {
                return Err(inner.failed(e.clone()));
            }
            st.tick += 1;
            let tick = st.tick;
            if extents.clone().all(|e| st.extents.contains_key(&e)) {
                let mut adding = false;
                for e in extents.clone() {
                    if let Some(x) = st.extents.get_mut(&e) {
                        x.refs += 1;
                        x.last_used = tick;
                        adding |= x.phase == Phase::Adding;
                    }
                }
                let guard = WriteGuard {
                    inner: inner.clone(),
                    extents: extents.clone(),
                };
                if !adding {
                    return Ok(guard);
                }
                let (tx, rx) = oneshot::channel();
                st.round.push(tx);
                (rx, Wait::Joined(guard))
            } else {
                let (tx, rx) = oneshot::channel();
                let id = st.next_request;
                st.next_request += 1;
                st.queue.push_back(Request {
                    id,
                    extents: extents.clone(),
                    reply: tx,
                });
                inner.kick(&mut st);
                let queued = Queued {
                    inner: inner.clone(),
                    id,
                    extents: extents.clone(),
                    armed: true,
                };
                (rx, Wait::Queued(queued))
            }
        };
        let r = rx.await;
        let mut queued = match wait {
            // Joined the round in flight: the guard already holds references.
            Wait::Joined(guard) => {
                return match r {
                    Ok(Outcome::Logged) => Ok(guard),
                    Ok(Outcome::Failed { source, .. }) => Err(inner.failed(source)),
                    Err(_) => Err(inner.failed(Arc::new(gone(inner)))),
                };
            }
            Wait::Queued(q) => q,
        };
        queued.armed = false;
        match r {
            // Admitted: the references taken for it now live in the guard.
            Ok(Outcome::Logged) => Ok(WriteGuard {
                inner: inner.clone(),
                extents,
            }),
            Ok(Outcome::Failed { source, holds_refs }) => {
                if holds_refs {
                    inner.release(extents);
                }
                Err(inner.failed(source))
            }
            Err(_) => Err(inner.failed(Arc::new(gone(inner)))),
        }
    }

    /// The recovered extents are reconciled (copied to the peer, or
    /// recorded durably in the dirty bitmap): they may now leave the log.
    pub fn release_recovered(&self) {
        let mut st = self.inner.lock();
        for x in st.extents.values_mut() {
            x.pinned = false;
        }
        self.inner.kick(&mut st);
    }

    /// Drops every extent with no write in flight (recovered ones too) and
    /// makes the smaller log durable: the caller knows those extents hold
    /// the same data on both replicas (a frontend's final flush on both, or
    /// the extents recorded as dirty on the resync source). Extents with a
    /// write in flight stay. Returns how many extents were dropped.
    pub async fn forget_idle(&self) -> Result<usize, AlError> {
        self.forget_where(|_| true).await
    }

    /// Like [`ActivityLog::forget_idle`], for the extents that overlap
    /// `ranges` only (byte ranges of the volume): the caller reconciled
    /// exactly those.
    pub async fn forget_extents(&self, ranges: &[Range<u64>]) -> Result<usize, AlError> {
        let config = self.inner.config();
        let chosen: std::collections::BTreeSet<u64> = ranges
            .iter()
            .filter_map(|r| config.extents(r.start, r.end.saturating_sub(r.start)))
            .flatten()
            .collect();
        self.forget_where(|e| chosen.contains(&e)).await
    }

    async fn forget_where(&self, chosen: impl Fn(u64) -> bool) -> Result<usize, AlError> {
        let inner = &self.inner;
        // Whatever the caller knows of the peer, this copy's own writes must
        // be durable before their extents leave (a power cut would take
        // back what is only in the page cache). Extents written after this
        // sync stay.
        inner
            .sync_data()
            .await
            .map_err(|e| inner.failed(Arc::new(e)))?;
        // Take the flusher's place, so that no round writes meanwhile.
        let (slot, dropped) = loop {
            {
                let mut st = inner.lock();
                if let Some(e) = &st.failed {
                    return Err(inner.failed(e.clone()));
                }
                if !st.flushing {
                    let before = st.extents.len();
                    st.extents.retain(|&e, x| {
                        !chosen(e) || x.refs > 0 || x.phase == Phase::Adding || !inner.durable(x)
                    });
                    let dropped = before - st.extents.len();
                    let mut extents: Vec<u64> = st.extents.keys().copied().collect();
                    extents.sort_unstable();
                    st.flushing = true;
                    break (
                        Slot {
                            generation: st.generation + 1,
                            volume_size: inner.volume_size.load(Ordering::SeqCst),
                            extent_size: inner.config.extent_size,
                            extents,
                        },
                        dropped,
                    );
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        };
        let storage = inner.storage.clone();
        let base = inner.config.base;
        let generation = slot.generation;
        // The log on disk keeps a superset of the extents in memory at every
        // point: dropping from memory first is safe.
        let r = blocking(move || format::write(&*storage, base, &slot)).await;
        let mut st = inner.lock();
        st.flushing = false;
        match r {
            Ok(()) => {
                st.generation = generation;
                inner.kick(&mut st);
                Ok(dropped)
            }
            Err(e) => {
                let (e, queued) = poison(&mut st, e);
                drop(st);
                fail_queued(queued, &e);
                Err(inner.failed(e))
            }
        }
    }

    /// The extents in the log now (persisted or being added), ascending.
    pub fn active(&self) -> Vec<ExtentIndex> {
        let st = self.inner.lock();
        let mut v: Vec<ExtentIndex> = st.extents.keys().map(|&e| ExtentIndex(e)).collect();
        v.sort_unstable();
        v
    }
}

fn gone(inner: &Inner) -> StorageError {
    StorageError {
        op: "activity log update",
        target: inner.storage.target().to_owned(),
        offset: inner.config.base,
        source: std::io::Error::other("the log's flusher went away"),
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.inner.release(self.extents.clone());
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.inner.lock();
        if let Some(i) = st.queue.iter().position(|q| q.id == self.id) {
            st.queue.remove(i);
            return;
        }
        drop(st);
        // Admitted, but nobody will hold the guard.
        self.inner.release(self.extents.clone());
    }
}
