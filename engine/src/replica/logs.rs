//! The two logs a replica volume keeps for resync (design invariant 5): the
//! activity log (extents with writes in flight, in the metadata file at
//! [`meta::ACTIVITY_LOG_OFFSET`]) and the dirty bitmap (regions the
//! out-of-sync peer misses, in the volume's `bitmap` file).
//!
//! [`VolumeLogs`] owns both for one open volume and is the only place that
//! decides what they mean together:
//!
//! - at startup ([`VolumeLogs::open`]): activity-log extents recovered while
//!   the bitmap tracks a peer are marked dirty (so resync copies them), then
//!   released; while in sync they are kept pinned and reported as possibly
//!   divergent (a new frontend must reconcile them); a lost log while
//!   tracking, or an untrusted bitmap, means a full copy — said in the log
//!   and in [`FullCopy`];
//! - on the write path ([`VolumeLogs::before_write`]): the activity log entry,
//!   then (peer out of sync) the bitmap mark, both durable before the data
//!   write starts; the guards are dropped after the data write;
//! - on `PeerState` ([`VolumeLogs::peer_left`], [`VolumeLogs::peer_rejoined`]):
//!   tracking is started durably before the answer, so that no write acked
//!   without the peer goes unrecorded. Writes that completed here just
//!   before the frontend gave up on the peer are re-sent by that frontend
//!   after the answer (it held them), so they mark their regions then; only
//!   the extents recovered at startup while in sync (a crash of this
//!   replica) are marked here. A *new* frontend cannot know what its
//!   predecessor left unsent: it asks both replicas for their activity-log
//!   extents ([`VolumeLogs::active_ranges`]) and marks them on the source
//!   ([`VolumeLogs::mark_dirty`]) before it lets the peer rejoin, then
//!   tells both to forget them ([`VolumeLogs::forget_activity`]).
//!
//! What a crash or power cut may have taken from this copy — the extents
//! recovered at startup while the peer counted as in sync (the whole volume
//! if the log was unreadable): the activity log keeps an extent until its
//! writes are durable, so they cover every write that was only in the page
//! cache — is reported to a frontend bringing this replica back
//! ([`VolumeLogs::recovered_ranges`], `Op::RecoveredExtents`), which marks
//! them dirty on the in-sync peer and then forgets exactly those
//! ([`VolumeLogs::forget_extents`]).
//!
//! Why recovered activity-log extents are marked even while tracking,
//! although every tracked write marks its regions before it writes: a copy
//! may read a write from this replica's page cache that a power loss then
//! takes back, while its cleared bit reached the disk. Re-copying the
//! extents that had recent writes closes that gap (the notes of the
//! activity log ask for it); the cost is bounded by the log's size.
//!
//! Who may push data to whom is decided by the arbiter's record as the
//! replica knows it (`replica::direction`), not by the `Tracking` header
//! alone: a header can outlive its reason (its source died before it heard
//! that the peer rejoined; a successor frontend never said so). At startup
//! ([`VolumeLogs::open_as`]) a header that the stored record contradicts
//! (both in sync, or this replica out) is dropped and its recovered
//! activity-log extents are kept as unreconciled instead of marked for a
//! copy; a newer record saying this replica is out of sync drops it too
//! ([`VolumeLogs::not_a_source`]). An untrusted bitmap starts no copy by
//! itself — the replica might be the stale one — it waits for the frontend
//! to say again that the peer is out (idempotent), and then copies
//! everything.
//!
//! A failed activity-log update poisons the log: every later write of the
//! volume fails until the replica restarts (which runs recovery). That is
//! the "fatal for the volume" the activity log asks for. A request larger
//! than the log holds at once is that request's refusal only (`TooLarge`);
//! the volume splits trims and write-zeroes into [`VolumeLogs::pieces`]
//! so that they never are.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::activity_log::{
    ActivityLog, AlConfig, AlError, DEFAULT_EXTENT_SIZE, DEFAULT_MAX_ACTIVE, Recovery, WriteGuard,
};
use crate::bitmap::{
    self, Bitmap, BitmapError, BitmapState, DEFAULT_GRANULARITY, Geometry, GeometryError,
    Granularity, MarkGuard,
};
use crate::data_sync::DataSync;
use crate::protocol::{ByteRange, Epoch, ReplicaId, WireError};
use crate::storage::Storage;

use super::direction::SyncRole;
use super::meta;

/// Why the logs of a volume could not be opened or updated.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("volume of {size} bytes cannot have a dirty bitmap")]
    Geometry {
        size: u64,
        #[source]
        source: GeometryError,
    },
    #[error(transparent)]
    ActivityLog(#[from] AlError),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// Why the next resync must copy the whole volume (shown in logs and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullCopy(pub String);

/// The geometry of the dirty bitmap of a volume of `size` bytes.
pub fn geometry(size: u64) -> Result<Geometry, LogsError> {
    let g = Granularity::new(DEFAULT_GRANULARITY)
        .map_err(|source| LogsError::Geometry { size, source })?;
    Geometry::new(size, g).map_err(|source| LogsError::Geometry { size, source })
}

/// Where the activity log of a volume of `size` bytes lives: in the meta
/// file's reserved area.
pub fn al_config(size: u64) -> Result<AlConfig, LogsError> {
    Ok(AlConfig::new(
        size,
        DEFAULT_EXTENT_SIZE,
        DEFAULT_MAX_ACTIVE,
        meta::ACTIVITY_LOG_OFFSET,
    )?)
}

/// Held from before a data write until it is done.
pub struct WriteGuards {
    _mark: Option<MarkGuard>,
    _al: Option<WriteGuard>,
}

/// The activity log and dirty bitmap of one open volume.
pub struct VolumeLogs {
    al: ActivityLog,
    /// The volume's size in bytes (it grows, [`VolumeLogs::grow`]).
    size: AtomicU64,
    bitmap: Bitmap,
    /// Mirrors "the bitmap tracks a peer" for the hot path (no lock).
    tracking: AtomicBool,
    /// The frontend said the peer is back in the in-sync set.
    peer_in_sync: AtomicBool,
    runtime: tokio::runtime::Handle,
    full_copy: std::sync::Mutex<Option<FullCopy>>,
    /// Extents recovered while in sync: possibly divergent, pinned until a
    /// new frontend reconciles them.
    unreconciled: std::sync::Mutex<Vec<std::ops::Range<u64>>>,
    /// Serialises the changes of the peer's state (start, stop, rejoin):
    /// a stop decided on "in sync and clean" must not complete after the
    /// peer left again.
    peer_change: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VolumeLogs {
    /// Opens both logs and runs startup recovery, for a replica that knows
    /// no record (see [`VolumeLogs::open_as`]). `volume` names it in logs;
    /// `data` tracks the syncs of its data file (the activity log keeps an
    /// extent until its writes are durable).
    pub async fn open(
        volume: &str,
        size: u64,
        meta_storage: Arc<dyn Storage>,
        bitmap_storage: Arc<dyn Storage>,
        data: Arc<DataSync>,
    ) -> Result<Arc<Self>, LogsError> {
        Self::open_as(
            volume,
            size,
            meta_storage,
            bitmap_storage,
            data,
            SyncRole::Unknown,
        )
        .await
    }

    /// Opens both logs and runs startup recovery for a replica whose stored
    /// view of the arbiter's record gives it `role`.
    pub async fn open_as(
        volume: &str,
        size: u64,
        meta_storage: Arc<dyn Storage>,
        bitmap_storage: Arc<dyn Storage>,
        data: Arc<DataSync>,
        role: SyncRole,
    ) -> Result<Arc<Self>, LogsError> {
        let (al, recovery) =
            ActivityLog::open_tracking(meta_storage, al_config(size)?, data).await?;
        let bitmap = Bitmap::open(bitmap_storage, geometry(size)?).await?;
        let logs = Arc::new(Self {
            tracking: AtomicBool::new(false),
            peer_in_sync: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            full_copy: std::sync::Mutex::new(None),
            unreconciled: std::sync::Mutex::new(Vec::new()),
            peer_change: tokio::sync::Mutex::new(()),
            al,
            size: AtomicU64::new(size),
            bitmap,
        });
        logs.recover(volume, recovery, role).await?;
        logs.peer_in_sync
            .store(role == SyncRole::BothInSync, Ordering::SeqCst);
        Ok(logs)
    }

    async fn recover(
        &self,
        volume: &str,
        recovery: Recovery,
        role: SyncRole,
    ) -> Result<(), LogsError> {
        let cfg = self.al.config();
        match (self.bitmap.state(), recovery) {
            (BitmapState::Tracking { peer, .. }, recovery)
                if matches!(role, SyncRole::BothInSync | SyncRole::OutOfSync) =>
            {
                // The header outlived its reason: the record this replica
                // knows says it is no source. Its recovered extents had
                // writes in flight that may be on one replica only: kept,
                // pinned, for the next frontend to reconcile.
                tracing::warn!(
                    volume, peer = %peer, ?role,
                    "dirty-tracking header outlived its reason (the arbiter's record lists this replica out of sync, or its peer in sync): tracking dropped"
                );
                self.bitmap.stop_tracking().await?;
                match recovery {
                    Recovery::Extents(ext) => {
                        *lock(&self.unreconciled) =
                            ext.iter().map(|e| cfg.byte_range(*e)).collect();
                    }
                    Recovery::Lost { slot0, slot1 } => {
                        tracing::warn!(
                            volume, %slot0, %slot1,
                            "activity log unreadable: this copy may have lost writes anywhere; the whole volume counts as possibly lost"
                        );
                        if role == SyncRole::BothInSync {
                            *lock(&self.full_copy) = Some(FullCopy(
                                "the activity log was unreadable at startup".to_owned(),
                            ));
                        }
                        *lock(&self.unreconciled) =
                            std::iter::once(0..self.size.load(Ordering::SeqCst)).collect();
                    }
                }
            }
            (BitmapState::Tracking { peer, since }, Recovery::Extents(ext)) => {
                for e in &ext {
                    let r = cfg.byte_range(*e);
                    if r.end > r.start {
                        drop(self.bitmap.mark(r.start, r.end - r.start).await?);
                    }
                }
                self.bitmap.persist().await?;
                self.al.release_recovered();
                tracing::info!(
                    volume, peer = %peer, since = since.0,
                    recovered_extents = ext.len(),
                    dirty_bytes = self.bitmap.dirty_bytes(),
                    "dirty bitmap loaded; activity-log extents marked dirty for resync"
                );
                self.tracking.store(true, Ordering::SeqCst);
            }
            (BitmapState::Tracking { peer, since }, Recovery::Lost { slot0, slot1 }) => {
                let why = format!(
                    "the activity log is unreadable (slot 0: {slot0}; slot 1: {slot1}), so writes in flight at the crash are unknown"
                );
                tracing::warn!(volume, peer = %peer, reason = %why, "full resync needed");
                self.bitmap.reset_all_dirty(peer, since).await?;
                *lock(&self.full_copy) = Some(FullCopy(why));
                self.tracking.store(true, Ordering::SeqCst);
            }
            (BitmapState::Clean, Recovery::Extents(ext)) => {
                if !ext.is_empty() {
                    tracing::warn!(
                        volume,
                        extents = ext.len(),
                        bytes = ext.len() as u64 * cfg.extent_size(),
                        "activity-log extents had writes in flight at the last stop: possibly divergent until the next frontend reconciles them"
                    );
                }
                *lock(&self.unreconciled) = ext.iter().map(|e| cfg.byte_range(*e)).collect();
            }
            (BitmapState::Clean, Recovery::Lost { slot0, slot1 }) => {
                tracing::warn!(
                    volume, %slot0, %slot1,
                    "activity log unreadable while in sync: the replicas may differ anywhere written last; the whole volume counts as possibly lost"
                );
                *lock(&self.full_copy) = Some(FullCopy(
                    "the activity log was unreadable at startup".to_owned(),
                ));
                *lock(&self.unreconciled) =
                    std::iter::once(0..self.size.load(Ordering::SeqCst)).collect();
            }
            (BitmapState::Untrusted(reason), recovery) => {
                *lock(&self.unreconciled) = match &recovery {
                    Recovery::Extents(ext) => ext.iter().map(|e| cfg.byte_range(*e)).collect(),
                    Recovery::Lost { .. } => {
                        std::iter::once(0..self.size.load(Ordering::SeqCst)).collect()
                    }
                };
                tracing::warn!(
                    volume, %reason,
                    "dirty bitmap cannot be trusted: the next resync copies the whole volume"
                );
                *lock(&self.full_copy) =
                    Some(FullCopy(format!("dirty bitmap untrusted: {reason}")));
            }
        }
        Ok(())
    }

    /// The volume grows to `size` bytes: the dirty bitmap durably (file,
    /// then header), the activity log's bounds in memory. Called before
    /// the new size is committed in the metadata: a crash in between
    /// leaves logs that load at the old size as well as at the new one.
    /// Serialised with the changes of the peer's state (no tracking start
    /// or stop writes the bitmap header meanwhile).
    pub async fn grow(&self, size: u64) -> Result<(), LogsError> {
        let _change = self.peer_change.lock().await;
        self.bitmap.grow(geometry(size)?).await?;
        self.al.grow(size);
        self.size.fetch_max(size, Ordering::SeqCst);
        Ok(())
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// Why the resync must be (or is) a full copy, if it must.
    pub fn full_copy(&self) -> Option<FullCopy> {
        lock(&self.full_copy).clone()
    }

    /// Whether the peer is out of sync and tracked.
    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Whether the frontend told us the peer is back in the in-sync set.
    pub fn peer_in_sync(&self) -> bool {
        self.peer_in_sync.load(Ordering::SeqCst)
    }

    /// Activity-log extents recovered while in sync, not yet reconciled.
    pub fn unreconciled(&self) -> Vec<std::ops::Range<u64>> {
        lock(&self.unreconciled).clone()
    }

    /// The largest range one request may cover in the activity log: half
    /// its extents (whole, aligned), so that one request never waits for
    /// the whole log. Larger trims and write-zeroes go in [`Self::pieces`].
    pub fn max_piece_bytes(&self) -> u64 {
        let c = self.al.config();
        (c.max_active() as u64 / 2).max(1) * c.extent_size()
    }

    /// `[offset, offset + len)` cut at multiples of [`Self::max_piece_bytes`]:
    /// pieces that each fit the activity log, to be logged and applied one
    /// after the other.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + use<> {
        let piece = self.max_piece_bytes();
        let end = offset.saturating_add(len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let next = ((at / piece) + 1).saturating_mul(piece).min(end);
            let r = (at, next - at);
            at = next;
            Some(r)
        })
    }

    /// Records the write of `len` bytes at `offset` before it starts: the
    /// activity log, then the bitmap when the peer is out of sync — a mark,
    /// or with `mirrored` (the frontend sends the write to the peer too)
    /// only a registration that makes an overlapping resync copy
    /// go again. Blocking (call it on the blocking pool); no I/O in the
    /// common case.
    pub fn before_write(
        &self,
        offset: u64,
        len: u64,
        mirrored: bool,
    ) -> Result<WriteGuards, WireError> {
        if len == 0 {
            return Ok(WriteGuards {
                _mark: None,
                _al: None,
            });
        }
        self.runtime.block_on(async {
            let al = self.al.begin_write(offset, len).await.map_err(|e| match &e {
                // This request only: the log is fine and later writes pass.
                AlError::TooLarge { .. } => {
                    tracing::warn!(error = %crate::error_chain(&e), "request refused: larger than the activity log holds at once");
                    WireError::TooLarge {
                        len,
                        max: self.max_piece_bytes(),
                    }
                }
                AlError::Failed { .. } => {
                    tracing::error!(error = %crate::error_chain(&e), "activity log failed: the volume refuses writes until the replica restarts (recovery runs then)");
                    WireError::Io { message: crate::error_chain(&e) }
                }
                _ => {
                    tracing::warn!(error = %crate::error_chain(&e), "request refused by the activity log");
                    WireError::Io { message: crate::error_chain(&e) }
                }
            })?;
            let mark = if self.is_tracking() {
                let marked = if mirrored {
                    self.bitmap.note_write(offset, len)
                } else {
                    self.bitmap.mark(offset, len).await
                };
                match marked {
                    Ok(m) => Some(m),
                    // Tracking stopped meanwhile: the peer gets every write.
                    Err(BitmapError::NotTracking { .. }) => None,
                    Err(e) => {
                        tracing::error!(error = %crate::error_chain(&e), "dirty bitmap mark failed");
                        return Err(WireError::Io { message: crate::error_chain(&e) });
                    }
                }
            } else {
                None
            };
            Ok(WriteGuards { _mark: mark, _al: Some(al) })
        })
    }

    /// The peer left the in-sync set at `epoch`: durably start tracking it
    /// (a full copy if no trustworthy bitmap exists for it) before answering.
    pub async fn peer_left(
        &self,
        volume: &str,
        peer: ReplicaId,
        epoch: Epoch,
    ) -> Result<(), LogsError> {
        let _serial = self.peer_change.lock().await;
        self.peer_in_sync.store(false, Ordering::SeqCst);
        let full = match self.bitmap.state() {
            BitmapState::Clean => self.full_copy(),
            BitmapState::Tracking { peer: p, .. } if p == peer => {
                self.tracking.store(true, Ordering::SeqCst);
                return Ok(());
            }
            BitmapState::Tracking { peer: p, .. } => Some(FullCopy(format!(
                "the bitmap tracked replica {p}, not {peer} (a replaced replica)"
            ))),
            BitmapState::Untrusted(reason) => {
                Some(FullCopy(format!("dirty bitmap untrusted: {reason}")))
            }
        };
        match full {
            None => {
                self.bitmap.start_tracking(peer.clone(), epoch).await?;
                // Writes this replica completed just before the frontend
                // gave up on the peer are held by that frontend and re-sent
                // after this answer: they mark their regions then. What a
                // crash of this replica left possibly divergent (extents
                // recovered while in sync) is marked now, durably.
                let recovered = std::mem::take(&mut *lock(&self.unreconciled));
                for r in &recovered {
                    if r.end > r.start {
                        drop(self.bitmap.mark(r.start, r.end - r.start).await?);
                    }
                }
                // Now durably dirty, they may leave the log.
                self.al.release_recovered();
            }
            Some(FullCopy(why)) => {
                tracing::warn!(volume, peer = %peer, reason = %why, "full resync: every region marked dirty");
                self.bitmap.reset_all_dirty(peer.clone(), epoch).await?;
                *lock(&self.full_copy) = Some(FullCopy(why));
                // Everything is dirty: nothing recovered is left to mark.
                lock(&self.unreconciled).clear();
                self.al.release_recovered();
            }
        }
        self.tracking.store(true, Ordering::SeqCst);
        tracing::info!(volume, peer = %peer, epoch = epoch.0, "tracking dirty regions for the out-of-sync peer");
        Ok(())
    }

    /// The arbiter's record lists this replica out of sync (`why`): it is
    /// no resync source, so a tracking header it holds means nothing (its
    /// peer holds every acknowledged write and tracks what this one
    /// misses): dropped, durably.
    pub async fn not_a_source(&self, volume: &str, why: &str) -> Result<(), LogsError> {
        let _serial = self.peer_change.lock().await;
        self.peer_in_sync.store(false, Ordering::SeqCst);
        if matches!(self.bitmap.state(), BitmapState::Clean) {
            return Ok(());
        }
        self.bitmap.stop_tracking().await?;
        self.tracking.store(false, Ordering::SeqCst);
        *lock(&self.full_copy) = None;
        tracing::warn!(
            volume,
            reason = why,
            "this replica is out of sync at the arbiter: it is no resync source; its dirty tracking is dropped"
        );
        Ok(())
    }

    /// The byte ranges of every extent in the activity log (recovered ones
    /// included): where writes may have been in flight.
    pub fn active_ranges(&self) -> Vec<ByteRange> {
        let cfg = self.al.config();
        self.al
            .active()
            .into_iter()
            .map(|e| cfg.byte_range(e))
            .filter(|r| r.end > r.start)
            .map(|r| ByteRange {
                offset: r.start,
                len: r.end - r.start,
            })
            .collect()
    }

    /// The byte ranges recovered at startup while the peer counted as in
    /// sync and not reconciled since: what a crash or power cut may have
    /// taken from this copy (the whole volume if the activity log was
    /// unreadable).
    pub fn recovered_ranges(&self) -> Vec<ByteRange> {
        lock(&self.unreconciled)
            .iter()
            .filter(|r| r.end > r.start)
            .map(|r| ByteRange {
                offset: r.start,
                len: r.end - r.start,
            })
            .collect()
    }

    /// `ranges` were reconciled (marked dirty on the peer): they leave the
    /// recovered set, and their extents the activity log once durable and
    /// idle (see [`ActivityLog::forget_extents`]).
    pub async fn forget_extents(
        &self,
        volume: &str,
        ranges: &[ByteRange],
    ) -> Result<(), WireError> {
        let byte_ranges: Vec<std::ops::Range<u64>> = ranges
            .iter()
            .map(|r| r.offset..r.offset.saturating_add(r.len))
            .collect();
        match self.al.forget_extents(&byte_ranges).await {
            Ok(dropped) => {
                let mut left = lock(&self.unreconciled);
                *left = subtract(&left, &byte_ranges);
                tracing::info!(
                    volume,
                    dropped,
                    ranges = ranges.len(),
                    still_recovered = left.len(),
                    "reconciled activity-log extents forgotten"
                );
                Ok(())
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                tracing::error!(volume, error = %message, "cannot forget activity-log extents");
                Err(WireError::Io { message })
            }
        }
    }

    /// Durably marks `ranges` dirty for the tracked peer (a new frontend's
    /// reconciliation of activity-log extents). Refused when no peer is
    /// tracked.
    pub async fn mark_dirty(&self, volume: &str, ranges: &[ByteRange]) -> Result<(), WireError> {
        if !self.is_tracking() {
            return Err(WireError::NotTracking);
        }
        for r in ranges.iter().filter(|r| r.len > 0) {
            match self.bitmap.mark(r.offset, r.len).await {
                Ok(m) => drop(m),
                Err(BitmapError::NotTracking { .. }) => return Err(WireError::NotTracking),
                Err(e) => {
                    let message = crate::error_chain(&e);
                    tracing::error!(volume, error = %message, "cannot mark regions dirty");
                    return Err(WireError::Io { message });
                }
            }
        }
        let bytes: u64 = ranges.iter().map(|r| r.len).sum();
        tracing::info!(
            volume,
            ranges = ranges.len(),
            bytes,
            dirty_bytes = self.bitmap.dirty_bytes(),
            "activity-log extents marked dirty for reconciliation"
        );
        Ok(())
    }

    /// Drops every activity-log extent with no write in flight, durably
    /// (see [`ActivityLog::forget_idle`]); the extents recovered at startup
    /// are no longer possibly divergent.
    pub async fn forget_activity(&self, volume: &str) -> Result<(), WireError> {
        match self.al.forget_idle().await {
            Ok(dropped) => {
                lock(&self.unreconciled).clear();
                tracing::info!(volume, dropped, "activity log cleared by the frontend");
                Ok(())
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                tracing::error!(volume, error = %message, "cannot clear the activity log");
                Err(WireError::Io { message })
            }
        }
    }

    /// The tracked peer answered as another copy of the volume (it was
    /// recreated): every region is dirty for it, durably, and the resync
    /// says why it copies everything.
    pub async fn peer_replaced(
        &self,
        volume: &str,
        peer: ReplicaId,
        why: String,
    ) -> Result<(), BitmapError> {
        let _serial = self.peer_change.lock().await;
        let since = match self.bitmap.state() {
            BitmapState::Tracking { since, .. } => since,
            _ => Epoch(0),
        };
        tracing::warn!(volume, peer = %peer, reason = %why, "full resync: every region marked dirty");
        self.bitmap.reset_all_dirty(peer, since).await?;
        *lock(&self.full_copy) = Some(FullCopy(why));
        self.tracking.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The peer is back in the in-sync set: stop tracking once nothing is
    /// dirty (at once if the resync is done, else when it finishes).
    pub async fn peer_rejoined(&self, volume: &str) -> Result<(), LogsError> {
        let _serial = self.peer_change.lock().await;
        self.peer_in_sync.store(true, Ordering::SeqCst);
        self.stop_if_clean_locked(volume).await
    }

    /// Stops tracking if the peer is in sync and no region is dirty.
    pub async fn stop_if_clean(&self, volume: &str) -> Result<(), LogsError> {
        let _serial = self.peer_change.lock().await;
        self.stop_if_clean_locked(volume).await
    }

    async fn stop_if_clean_locked(&self, volume: &str) -> Result<(), LogsError> {
        if self.peer_in_sync() && self.is_tracking() && self.bitmap.dirty_count() == 0 {
            self.bitmap.stop_tracking().await?;
            self.tracking.store(false, Ordering::SeqCst);
            *lock(&self.full_copy) = None;
            tracing::info!(volume, "peer in sync again: dirty tracking stopped");
        }
        Ok(())
    }
}

/// `from` without the bytes of `minus` (both lists of byte ranges).
fn subtract(
    from: &[std::ops::Range<u64>],
    minus: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let mut out = from.to_vec();
    for m in minus.iter().filter(|m| m.end > m.start) {
        out = out
            .into_iter()
            .flat_map(|r| {
                let left = (r.start < m.start).then(|| r.start..r.end.min(m.start));
                let right = (r.end > m.end).then(|| r.start.max(m.end)..r.end);
                left.into_iter().chain(right)
            })
            .filter(|r| r.end > r.start)
            .collect();
    }
    out
}

/// Creates the bitmap file of a new volume (blocking).
pub fn create_bitmap(storage: &dyn Storage, size: u64) -> Result<(), super::PoolError> {
    let g = geometry(size).map_err(|e| super::PoolError::BadSize {
        size,
        reason: match e {
            LogsError::Geometry { .. } => "too large for a dirty bitmap",
            _ => "invalid",
        },
    })?;
    bitmap::create(storage, g)?;
    Ok(())
}

/// Creates the empty activity log of a new volume in its meta file
/// (blocking).
pub fn create_activity_log(storage: &dyn Storage, size: u64) -> Result<(), super::PoolError> {
    let cfg = al_config(size).map_err(|_| super::PoolError::BadSize {
        size,
        reason: "invalid for an activity log",
    })?;
    ActivityLog::create(storage, cfg)?;
    storage.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::VolumeId;
    use crate::replica::Pool;

    const SIZE: u64 = 16 << 20;

    async fn open(pool: &Pool, id: &VolumeId) -> Arc<VolumeLogs> {
        let v = pool.open_volume(id).expect("open volume");
        VolumeLogs::open(
            id.as_str(),
            v.meta.size,
            Arc::new(v.meta_storage),
            Arc::new(v.bitmap_storage),
            DataSync::new(id.as_str(), Arc::new(v.data)),
        )
        .await
        .expect("open logs")
    }

    fn peer() -> ReplicaId {
        ReplicaId::new("a").expect("valid")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_range_of_any_length_is_cut_into_pieces_the_activity_log_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        let piece = logs.max_piece_bytes();
        let c = logs.al.config();
        assert_eq!(piece, c.max_active() as u64 / 2 * c.extent_size());
        for (offset, len) in [
            (0, 1),
            (4096, 3 * piece),
            (piece - 1, 2),
            (7, u64::from(u32::MAX)),
        ] {
            let pieces: Vec<_> = logs.pieces(offset, len).collect();
            let mut at = offset;
            for &(o, l) in &pieces {
                assert_eq!(o, at, "contiguous");
                assert!(l > 0 && l <= piece, "{l} bytes at {o}");
                // Within one aligned window: at most max_active / 2 extents.
                assert_eq!(o / piece, (o + l - 1) / piece, "{l} bytes at {o}");
                at += l;
            }
            assert_eq!(at, offset + len, "covers the range");
        }
        // A piece inside the volume is logged like any write.
        let (o, l) = logs.pieces(0, SIZE).next().expect("a piece");
        let l2 = logs.clone();
        tokio::task::spawn_blocking(move || drop(l2.before_write(o, l, false).expect("logged")))
            .await
            .expect("join");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn writes_while_the_peer_is_out_are_dirty_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        assert!(!logs.is_tracking());
        logs.peer_left("v1", peer(), Epoch(2)).await.expect("left");
        assert!(logs.is_tracking());
        let l = logs.clone();
        tokio::task::spawn_blocking(move || {
            drop(l.before_write(5 << 20, 4096, false).expect("logged"));
        })
        .await
        .expect("join");
        assert_eq!(logs.bitmap().dirty_count(), 1);
        drop(logs);
        // A crash: reopened, the region is dirty, plus the activity log's
        // extent of the write (4 MiB), and tracking goes on.
        let logs = open(&pool, &id).await;
        assert!(logs.is_tracking());
        assert_eq!(
            logs.bitmap().state(),
            BitmapState::Tracking {
                peer: peer(),
                since: Epoch(2)
            }
        );
        assert_eq!(logs.bitmap().dirty_bytes(), 4 << 20);
        assert_eq!(logs.full_copy(), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_extents_recovered_after_a_crash_are_marked_when_the_peer_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        let l = logs.clone();
        tokio::task::spawn_blocking(move || drop(l.before_write(0, 4096, false).expect("logged")))
            .await
            .expect("join");
        assert_eq!(logs.bitmap().dirty_count(), 0, "in sync: nothing marked");
        assert_eq!(
            logs.active_ranges(),
            vec![ByteRange {
                offset: 0,
                len: 4 << 20
            }]
        );
        // A live frontend re-sends what it held: nothing extra is marked.
        logs.peer_left("v1", peer(), Epoch(1)).await.expect("left");
        assert_eq!(logs.bitmap().dirty_bytes(), 0);
        // A new frontend marks what it found in the activity logs.
        logs.mark_dirty("v1", &logs.active_ranges())
            .await
            .expect("marked");
        assert_eq!(logs.bitmap().dirty_bytes(), 4 << 20);
        logs.forget_activity("v1").await.expect("forgot");
        assert!(logs.active_ranges().is_empty());
        drop(logs);

        // After a crash while in sync, the recovered extents are marked
        // when the peer leaves.
        let id2 = VolumeId::new("v2").expect("valid");
        pool.create_volume(&id2, SIZE).expect("create");
        let logs = open(&pool, &id2).await;
        let l = logs.clone();
        tokio::task::spawn_blocking(move || {
            drop(l.before_write(8 << 20, 4096, false).expect("logged"))
        })
        .await
        .expect("join");
        drop(logs);
        let logs = open(&pool, &id2).await;
        assert_eq!(logs.unreconciled(), vec![(8 << 20)..(12 << 20)]);
        logs.peer_left("v2", peer(), Epoch(1)).await.expect("left");
        assert_eq!(logs.bitmap().dirty_bytes(), 4 << 20);
        assert!(logs.unreconciled().is_empty());
    }

    async fn open_as(pool: &Pool, id: &VolumeId, role: SyncRole) -> Arc<VolumeLogs> {
        let v = pool.open_volume(id).expect("open volume");
        VolumeLogs::open_as(
            id.as_str(),
            v.meta.size,
            Arc::new(v.meta_storage),
            Arc::new(v.bitmap_storage),
            DataSync::new(id.as_str(), Arc::new(v.data)),
            role,
        )
        .await
        .expect("open logs")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_tracking_header_the_record_contradicts_is_dropped_at_startup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        for (name, role) in [("v1", SyncRole::BothInSync), ("v2", SyncRole::OutOfSync)] {
            let id = VolumeId::new(name).expect("valid");
            pool.create_volume(&id, SIZE).expect("create");
            let logs = open(&pool, &id).await;
            logs.peer_left(name, peer(), Epoch(1)).await.expect("left");
            let l = logs.clone();
            tokio::task::spawn_blocking(move || {
                drop(l.before_write(4 << 20, 4096, false).expect("logged"))
            })
            .await
            .expect("join");
            assert_eq!(logs.bitmap().dirty_count(), 1);
            drop(logs);
            // Restarted knowing a record that makes it no source: the header
            // (the source of a stale copy) is gone, nothing is dirty, and
            // the extent with a write in flight waits for reconciliation.
            let logs = open_as(&pool, &id, role).await;
            assert!(!logs.is_tracking(), "{role:?}");
            assert_eq!(logs.bitmap().state(), BitmapState::Clean, "{role:?}");
            assert_eq!(logs.bitmap().dirty_count(), 0);
            assert_eq!(logs.unreconciled(), vec![(4 << 20)..(8 << 20)]);
            assert_eq!(logs.peer_in_sync(), role == SyncRole::BothInSync);
        }
        // A source keeps it, and its recovered extent is dirty.
        let id = VolumeId::new("v3").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        logs.peer_left("v3", peer(), Epoch(1)).await.expect("left");
        drop(logs);
        let logs = open_as(&pool, &id, SyncRole::Source).await;
        assert!(logs.is_tracking());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_replica_out_of_sync_at_the_arbiter_drops_its_tracking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        logs.peer_left("v1", peer(), Epoch(1)).await.expect("left");
        let l = logs.clone();
        tokio::task::spawn_blocking(move || drop(l.before_write(0, 4096, false).expect("logged")))
            .await
            .expect("join");
        logs.not_a_source("v1", "test").await.expect("dropped");
        assert!(!logs.is_tracking());
        assert_eq!(logs.bitmap().dirty_count(), 0);
        drop(logs);
        let logs = open(&pool, &id).await;
        assert_eq!(logs.bitmap().state(), BitmapState::Clean, "durably");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn marking_needs_a_tracked_peer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        let r = logs
            .mark_dirty("v1", &[ByteRange { offset: 0, len: 1 }])
            .await;
        assert_eq!(r, Err(WireError::NotTracking));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_replaced_peer_gets_a_full_copy_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        logs.peer_left("v1", peer(), Epoch(1)).await.expect("left");
        let other = ReplicaId::new("c").expect("valid");
        logs.peer_left("v1", other, Epoch(2)).await.expect("left");
        assert_eq!(logs.bitmap().dirty_bytes(), SIZE);
        let why = logs.full_copy().expect("full copy").0;
        assert!(why.contains("replaced"), "{why}");
        // Back in sync only once nothing is dirty.
        logs.peer_rejoined("v1").await.expect("rejoined");
        assert!(logs.is_tracking());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn what_a_crash_may_have_taken_is_reported_until_exactly_it_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, SIZE).expect("create");
        let logs = open(&pool, &id).await;
        assert!(logs.recovered_ranges().is_empty(), "nothing before a crash");
        let l = logs.clone();
        tokio::task::spawn_blocking(move || {
            drop(l.before_write(0, 4096, false).expect("logged"));
            drop(l.before_write(8 << 20, 4096, false).expect("logged"));
        })
        .await
        .expect("join");
        assert!(
            logs.recovered_ranges().is_empty(),
            "live extents are not lost"
        );
        drop(logs);
        // The crash (or power cut): both extents may hold lost writes.
        let logs = open(&pool, &id).await;
        let four = 4 << 20;
        assert_eq!(
            logs.recovered_ranges(),
            vec![
                ByteRange {
                    offset: 0,
                    len: four
                },
                ByteRange {
                    offset: 8 << 20,
                    len: four
                }
            ]
        );
        // The frontend marked the first one: only it is forgotten.
        logs.forget_extents(
            "v1",
            &[ByteRange {
                offset: 0,
                len: four,
            }],
        )
        .await
        .expect("forget");
        assert_eq!(
            logs.recovered_ranges(),
            vec![ByteRange {
                offset: 8 << 20,
                len: four
            }]
        );
        assert_eq!(
            logs.active_ranges(),
            vec![ByteRange {
                offset: 8 << 20,
                len: four
            }],
            "the other stays pinned in the log"
        );
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of ranges, not ranges
    fn subtracting_ranges_keeps_what_is_outside() {
        assert_eq!(subtract(&[0..10, 20..30], &[5..25]), vec![0..5, 25..30]);
        assert_eq!(
            subtract(&[0..10], &[0..10]),
            Vec::<std::ops::Range<u64>>::new()
        );
        assert_eq!(subtract(&[0..10], &[3..4, 12..13]), vec![0..3, 4..10]);
    }
}
