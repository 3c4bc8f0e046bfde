//! An open volume on a replica server: the data file, the epoch gate, and
//! the task that owns the metadata area.
//!
//! Many connections may use one volume (the old and the new frontend during
//! a hand-over), so the volume is shared (`Arc`). Its mutable state is
//! split so that nothing needs a lock on the hot path:
//! - the highest persisted epoch is an atomic, read by every request;
//! - the metadata area belongs to one task (`MetaOwner`); raising the epoch
//!   is a message to it, answered only after the new metadata is durable;
//! - data I/O is positional and goes straight to storage on the blocking
//!   pool; a write first records itself in the activity log and, while the
//!   peer is out of sync, in the dirty bitmap ([`super::logs`]), both
//!   durable before the data write starts (no I/O in the common case);
//! - `PeerState` is handled by the metadata owner, which durably stores the
//!   view of the arbiter's record it carries (and the frontend's fence of
//!   its sessions to the peer), then starts or stops dirty tracking, before
//!   answering; the view is mirrored in memory ([`Known`]) for the resync
//!   and for the check of resync sessions (`super::direction`);
//! - every connection is a session ([`super::sessions`]): a request runs
//!   only while its session is not fenced, so nothing a client gave up on
//!   lands later;
//! - every fdatasync of the data file goes through [`DataSync`]: the
//!   activity log learns which writes are durable, and a failed sync stops
//!   the volume for good — every later request (`Open` included) is refused
//!   with `VolumeFailed`, so that no flush is acknowledged for pages the
//!   kernel dropped, and the frontend takes the replica out.
//!
//! Fencing is exact: a data request counts itself in flight *before* it
//! checks the epoch (and its session), and raising the epoch sets the new
//! value *before* it waits for the in-flight count to drain (both
//! sequentially consistent). So every request either sees the new epoch
//! and is refused, or is waited for: when a newer frontend's `Open` is
//! answered, no request of an older epoch can land any more. A write is
//! counted only once its activity-log and bitmap registrations are done
//! (they may wait for room in the log, which must not hold a fence up);
//! registering a write that is then refused only makes the logs more
//! conservative.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::data_sync::{DataSync, SyncFailed};
use crate::metrics::{IoOp, OpHandles};
use crate::protocol::{
    Epoch, MAX_IO_BYTES, Op, ReplicaId, Reply, ResyncReport, Session, SessionGen, SessionKind,
    SyncClaim, SyncView, VolumeId, WireError,
};
use crate::storage::{Storage, StorageError, blocking};

use super::direction::{SyncRole, Verdict, judge_copy};
use super::logs::VolumeLogs;
use super::meta::{self, Metadata, PeerFence, StoredView};
use super::sessions::{SessionGate, SessionInFlight, Sessions};

/// The epoch and the data requests in flight, shared by the volume and its
/// metadata owner.
#[derive(Default)]
struct EpochGate {
    epoch: AtomicU64,
    in_flight: AtomicU64,
    drained: Notify,
}

impl EpochGate {
    /// Checks `epoch` without counting a request (an early refusal before
    /// waiting for anything; the counted check follows).
    fn check(&self, epoch: Epoch) -> Result<(), WireError> {
        self.compare(epoch)
    }

    /// Counts a request in flight, then checks its epoch.
    fn enter(&self, epoch: Epoch) -> Result<InFlight<'_>, WireError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        self.compare(epoch).map(|()| guard)
    }

    fn compare(&self, epoch: Epoch) -> Result<(), WireError> {
        let current = Epoch(self.epoch.load(Ordering::SeqCst));
        if epoch < current {
            Err(WireError::StaleEpoch {
                seen: epoch,
                current,
            })
        } else if epoch > current {
            Err(WireError::EpochNotOpened {
                seen: epoch,
                current,
            })
        } else {
            Ok(())
        }
    }

    /// Raises the epoch, then waits until no request that could have seen
    /// the old one is still in flight.
    async fn raise_and_drain(&self, epoch: Epoch) {
        self.epoch.fetch_max(epoch.0, Ordering::SeqCst);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A request in flight; leaving wakes a drain waiting for the last one.
struct InFlight<'a>(&'a EpochGate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// A volume served by this replica.
pub struct Volume {
    id: VolumeId,
    /// The committed size in bytes; only the metadata owner raises it
    /// ([`Volume::resize`]), once the metadata says so durably.
    size: Arc<AtomicU64>,
    data: Arc<dyn Storage>,
    /// The data file's syncs (shared with the activity log).
    sync: Arc<DataSync>,
    gate: Arc<EpochGate>,
    meta_tx: mpsc::Sender<MetaCommand>,
    metrics: OpHandles,
    logs: Arc<VolumeLogs>,
    /// Smoothed latency of foreground writes in µs (for resync back-off).
    write_latency_us: AtomicU64,
    /// Foreground writes done (for resync back-off).
    writes_done: AtomicU64,
    /// Bytes this replica's resync copied to its peer (all attempts).
    resync_copied: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// This copy's incarnation (fixed at creation).
    incarnation: u64,
    /// The peer's, as last known (see `MetaOwner::peer_state`).
    peer_incarnation: Arc<AtomicU64>,
    /// The sessions of the connections that opened the volume.
    sessions: Sessions,
    /// The stored view of the record and the peer fence, as in memory.
    known: Arc<Known>,
}

/// What the metadata owner last made durable of the arbiter's record and
/// the frontend's fence, mirrored for readers (the resync, the check of
/// resync sessions) with change counters.
#[derive(Default)]
pub struct Known {
    state: Mutex<(Option<StoredView>, Option<PeerFence>)>,
    /// Bumped whenever the view changes.
    view_changes: AtomicU64,
    /// Bumped whenever the peer fence changes.
    fence_changes: AtomicU64,
}

impl Known {
    fn set(&self, view: Option<StoredView>, fence: Option<PeerFence>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 != view {
            self.view_changes.fetch_add(1, Ordering::SeqCst);
        }
        if st.1 != fence {
            self.fence_changes.fetch_add(1, Ordering::SeqCst);
        }
        *st = (view, fence);
    }

    pub fn view(&self) -> Option<StoredView> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    pub fn peer_fence(&self) -> Option<PeerFence> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    pub fn view_changes(&self) -> u64 {
        self.view_changes.load(Ordering::SeqCst)
    }

    pub fn fence_changes(&self) -> u64 {
        self.fence_changes.load(Ordering::SeqCst)
    }
}

enum MetaCommand {
    RaiseEpoch {
        epoch: Epoch,
        reply: oneshot::Sender<Result<Epoch, WireError>>,
    },
    PeerState {
        epoch: Epoch,
        change: PeerChange,
        reply: oneshot::Sender<Result<Reply, WireError>>,
    },
    /// A view learned from the peer (its resync claim, or a refusal of
    /// ours): stored and acted on if newer than the one known.
    LearnView {
        view: StoredView,
        reply: oneshot::Sender<Result<Option<StoredView>, WireError>>,
    },
    /// The resync found the peer recreated: remember its new incarnation.
    SetPeerIncarnation {
        incarnation: u64,
        reply: oneshot::Sender<Result<(), WireError>>,
    },
    /// `Resize`: grow the volume durably (data, logs, then the metadata).
    Resize {
        epoch: Epoch,
        size: u64,
        reply: oneshot::Sender<Result<Reply, WireError>>,
    },
}

/// What the frontend said (`Op::PeerState`): the record as it stands, who
/// this replica and its peer are in it, and the sessions to the peer it
/// gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub you: ReplicaId,
    pub peer: ReplicaId,
    pub view: SyncView,
    /// The peer's incarnation as the frontend knows it (0: unknown).
    pub peer_incarnation: u64,
    pub fence: Option<SessionGen>,
}

/// Owns the metadata area of one volume; the only writer of it.
struct MetaOwner {
    id: VolumeId,
    storage: Arc<dyn Storage>,
    current: Metadata,
    gate: Arc<EpochGate>,
    logs: Arc<VolumeLogs>,
    /// Mirrors `current.peer_incarnation` for the resync.
    peer_incarnation: Arc<AtomicU64>,
    /// Mirrors `current.view` and `current.peer_fence`.
    known: Arc<Known>,
    /// The data file and its syncs, and the volume's size as the requests
    /// see it (raised once the metadata committed a resize).
    data: Arc<dyn Storage>,
    sync: Arc<DataSync>,
    size: Arc<AtomicU64>,
}

impl MetaOwner {
    async fn run(mut self, mut rx: mpsc::Receiver<MetaCommand>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                MetaCommand::RaiseEpoch { epoch, reply } => {
                    let r = self.raise_epoch(epoch).await;
                    let _ = reply.send(r);
                }
                MetaCommand::PeerState {
                    epoch,
                    change,
                    reply,
                } => {
                    let _ = reply.send(self.peer_state(epoch, change).await);
                }
                MetaCommand::LearnView { view, reply } => {
                    let _ = reply.send(self.learn_view(view).await);
                }
                MetaCommand::SetPeerIncarnation { incarnation, reply } => {
                    let _ = reply.send(self.set_peer_incarnation(incarnation).await);
                }
                MetaCommand::Resize { epoch, size, reply } => {
                    let _ = reply.send(self.resize(epoch, size).await);
                }
            }
        }
    }

    /// Records the record's view the frontend sent and acts on it. The
    /// epoch is checked here, where epoch raises are serialised, so a stale
    /// frontend cannot change it.
    async fn peer_state(&mut self, epoch: Epoch, change: PeerChange) -> Result<Reply, WireError> {
        let current = self.current.epoch;
        if epoch < current {
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current,
            });
        }
        if epoch > current {
            return Err(WireError::EpochNotOpened {
                seen: epoch,
                current,
            });
        }
        if change.view.epoch != epoch {
            return Err(WireError::Io {
                message: format!(
                    "peer state carries a record of epoch {} at epoch {epoch}",
                    change.view.epoch
                ),
            });
        }
        if let Some(k) = &self.current.view
            && k.view.stamp() > change.view.stamp()
        {
            return Err(WireError::StaleView {
                seen: change.view.stamp(),
                current: k.view.stamp(),
            });
        }
        let stored = StoredView {
            me: change.you,
            peer: change.peer.clone(),
            view: change.view,
        };
        let was_tracking = matches!(
            self.logs.bitmap().state(),
            crate::bitmap::BitmapState::Tracking { ref peer, .. } if *peer == change.peer
        );
        let mut next = self.current.clone();
        next.view = Some(stored.clone());
        if let Some(below) = change.fence {
            next.peer_fence = Some(match self.current.peer_fence {
                Some(f) if f.epoch == epoch => PeerFence {
                    epoch,
                    below: f.below.max(below),
                },
                _ => PeerFence { epoch, below },
            });
        }
        if next != self.current {
            self.write_meta(next).await?;
        }
        // Durable before the answer: no write is acknowledged without the
        // peer before its regions are tracked.
        self.act_on(&stored, epoch).await?;
        let peer_in_sync = stored.peer_in_sync();
        tracing::info!(
            volume = %self.id,
            me = %stored.me,
            peer = %change.peer,
            in_sync = ?stored.view.in_sync.iter().map(ReplicaId::as_str).collect::<Vec<_>>(),
            record = %stored.view.stamp(),
            arbiter_version = %stored.view.arbiter_version,
            fence = ?change.fence.map(|g| g.0),
            epoch = epoch.0,
            "peer state changed"
        );
        // Remember which copy of the peer was in sync, so that the resync
        // can tell a recreated one (and copy everything to it). Kept while
        // tracking: a later frontend may only know a recreated copy.
        let known = self.current.peer_incarnation;
        let learn = change.peer_incarnation != 0
            && known != change.peer_incarnation
            && (peer_in_sync || !was_tracking || known == 0);
        if learn {
            self.set_peer_incarnation(change.peer_incarnation).await?;
        }
        Ok(Reply::Done)
    }

    /// What the view means for the dirty tracking, made durable.
    async fn act_on(&mut self, view: &StoredView, epoch: Epoch) -> Result<(), WireError> {
        let volume = self.id.as_str();
        let done = match SyncRole::of(Some(view)) {
            SyncRole::Source => self.logs.peer_left(volume, view.peer.clone(), epoch).await,
            SyncRole::BothInSync => self.logs.peer_rejoined(volume).await,
            SyncRole::OutOfSync | SyncRole::Unknown => {
                let why = format!(
                    "the record (version {}, as of {}) lists {} out of sync",
                    view.view.arbiter_version,
                    view.view.stamp(),
                    view.me
                );
                self.logs.not_a_source(volume, &why).await
            }
        };
        done.map_err(|e| {
            let message = crate::error_chain(&e);
            tracing::error!(volume = %self.id, error = %message, "cannot record the peer's state");
            WireError::Io { message }
        })
    }

    /// Stores `view` if it is newer than the one known, and acts on it;
    /// returns the view known afterwards.
    async fn learn_view(&mut self, view: StoredView) -> Result<Option<StoredView>, WireError> {
        let newer = self
            .current
            .view
            .as_ref()
            .is_none_or(|k| view.view.stamp() > k.view.stamp());
        if newer {
            let mut next = self.current.clone();
            next.view = Some(view.clone());
            self.write_meta(next).await?;
            tracing::info!(
                volume = %self.id,
                record = %view.view.stamp(),
                arbiter_version = %view.view.arbiter_version,
                in_sync = ?view.view.in_sync.iter().map(ReplicaId::as_str).collect::<Vec<_>>(),
                "learned a newer view of the arbiter's record from the peer"
            );
            let epoch = self.current.epoch;
            self.act_on(&view, epoch).await?;
        }
        Ok(self.current.view.clone())
    }

    /// Grows the volume to `size` bytes, in an order that a crash at any
    /// point leaves it opening at the old size or the new one, never
    /// between: the data file is preallocated to the new size and synced
    /// (a longer data file than the metadata says is an unfinished grow,
    /// cut back when the volume opens), the dirty bitmap grows (it loads
    /// at either size), and only then does the metadata commit the new
    /// size (an A/B slot update). Requests see the new size after that.
    async fn resize(&mut self, epoch: Epoch, size: u64) -> Result<Reply, WireError> {
        self.gate.compare(epoch)?;
        let current = self.current.size;
        let refuse = |reason: &str| WireError::ResizeRefused {
            current,
            requested: size,
            reason: reason.to_owned(),
        };
        if size == current {
            return Ok(Reply::Done);
        }
        if size < current {
            return Err(refuse(
                "shrinking a volume is not supported (only growing is)",
            ));
        }
        if !size.is_multiple_of(4096) {
            return Err(refuse("the size must be a multiple of 4096 bytes"));
        }
        let data = self.data.clone();
        blocking(move || data.preallocate(size))
            .await
            .map_err(|e| io_error(&e))?;
        let sync = self.sync.clone();
        match tokio::task::spawn_blocking(move || sync.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(f)) => return Err(failed(&f)),
            Err(e) => {
                return Err(WireError::Io {
                    message: format!("blocking task: {e}"),
                });
            }
        }
        self.logs.grow(size).await.map_err(|e| WireError::Io {
            message: crate::error_chain(&e),
        })?;
        let mut next = self.current.clone();
        next.size = size;
        self.write_meta(next).await?;
        self.size.store(size, Ordering::SeqCst);
        tracing::info!(volume = %self.id, from = current, to = size, "volume grown");
        Ok(Reply::Done)
    }

    async fn set_peer_incarnation(&mut self, incarnation: u64) -> Result<(), WireError> {
        let mut next = self.current.clone();
        next.peer_incarnation = incarnation;
        self.write_meta(next).await?;
        self.peer_incarnation.store(incarnation, Ordering::SeqCst);
        Ok(())
    }

    /// Writes `next` as the new metadata (durably) and makes it current.
    async fn write_meta(&mut self, next: Metadata) -> Result<(), WireError> {
        let storage = self.storage.clone();
        let current = self.current.clone();
        let written = blocking(move || {
            meta::write(storage.as_ref(), &current, &next).map_err(|e| StorageError {
                op: "metadata update",
                target: storage.target().to_owned(),
                offset: 0,
                source: std::io::Error::other(crate::error_chain(&e)),
            })
        })
        .await
        .map_err(|e| io_error(&e))?;
        self.known.set(written.view.clone(), written.peer_fence);
        self.current = written;
        Ok(())
    }

    async fn raise_epoch(&mut self, epoch: Epoch) -> Result<Epoch, WireError> {
        if epoch <= self.current.epoch {
            return Ok(self.current.epoch);
        }
        let mut next = self.current.clone();
        next.epoch = epoch;
        self.write_meta(next).await?;
        tracing::info!(volume = %self.id, epoch = epoch.0, "persisted new epoch");
        self.gate.raise_and_drain(epoch).await;
        Ok(epoch)
    }
}

fn failed(f: &SyncFailed) -> WireError {
    WireError::VolumeFailed {
        reason: f.to_string(),
    }
}

fn io_error(e: &StorageError) -> WireError {
    tracing::error!(error = %crate::error_chain(e), "storage error");
    WireError::Io {
        message: crate::error_chain(e),
    }
}

impl Volume {
    /// Wraps opened files; spawns the metadata owner on the current runtime.
    /// `sync` tracks the syncs of `data` (the one `logs` was opened with).
    pub fn start(
        data: Arc<dyn Storage>,
        sync: Arc<DataSync>,
        meta_storage: Arc<dyn Storage>,
        current: Metadata,
        logs: Arc<VolumeLogs>,
        metrics: OpHandles,
    ) -> Arc<Self> {
        let gate = Arc::new(EpochGate::default());
        gate.epoch.store(current.epoch.0, Ordering::SeqCst);
        let (meta_tx, rx) = mpsc::channel(16);
        let id = current.volume.clone();
        let size = Arc::new(AtomicU64::new(current.size));
        let incarnation = current.incarnation;
        let peer_incarnation = Arc::new(AtomicU64::new(current.peer_incarnation));
        let known = Arc::new(Known::default());
        known.set(current.view.clone(), current.peer_fence);
        let owner = MetaOwner {
            peer_incarnation: peer_incarnation.clone(),
            id: id.clone(),
            storage: meta_storage,
            current,
            gate: gate.clone(),
            logs: logs.clone(),
            known: known.clone(),
            data: data.clone(),
            sync: sync.clone(),
            size: size.clone(),
        };
        tokio::spawn(owner.run(rx));
        Arc::new(Self {
            id,
            size,
            data,
            sync,
            gate,
            meta_tx,
            metrics,
            logs,
            write_latency_us: AtomicU64::new(0),
            writes_done: AtomicU64::new(0),
            resync_copied: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
            incarnation,
            peer_incarnation,
            sessions: Sessions::new(),
            known,
        })
    }

    /// The view of the arbiter's record this replica knows, and the
    /// frontend's fence of its sessions to the peer (with change counters).
    pub fn known(&self) -> &Arc<Known> {
        &self.known
    }

    /// Stores (durably) and acts on a view learned from the peer, if it is
    /// newer than the one known; returns the view known afterwards.
    pub async fn learn_view(&self, view: StoredView) -> Result<Option<StoredView>, WireError> {
        let (reply, rx) = oneshot::channel();
        self.meta_tx
            .send(MetaCommand::LearnView { view, reply })
            .await
            .map_err(|_| self.meta_gone())?;
        rx.await.map_err(|_| self.meta_gone())?
    }

    fn meta_gone(&self) -> WireError {
        WireError::Io {
            message: format!("metadata task of volume {} is gone", self.id),
        }
    }

    /// The volume's activity log and dirty bitmap.
    pub fn logs(&self) -> &Arc<VolumeLogs> {
        &self.logs
    }

    /// Foreground writes done so far.
    pub fn writes_done(&self) -> u64 {
        self.writes_done.load(Ordering::Relaxed)
    }

    /// This copy's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The incarnation of the peer as it was when it was last known in
    /// sync (0: unknown).
    pub fn peer_incarnation(&self) -> u64 {
        self.peer_incarnation.load(Ordering::SeqCst)
    }

    /// Records (durably) that the peer now has `incarnation` (after the
    /// resync found it recreated and reset its bitmap to a full copy).
    pub async fn set_peer_incarnation(&self, incarnation: u64) -> Result<(), WireError> {
        let (reply, rx) = oneshot::channel();
        let closed = || WireError::Io {
            message: format!("metadata task of volume {} is gone", self.id),
        };
        self.meta_tx
            .send(MetaCommand::SetPeerIncarnation { incarnation, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// The resync copied `bytes` more to the peer (reported by
    /// `ResyncStatus`).
    pub fn note_resync_copied(&self, bytes: u64) {
        self.resync_copied.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Smoothed latency of foreground writes, in µs (0: none yet).
    pub fn write_latency_us(&self) -> u64 {
        self.write_latency_us.load(Ordering::Relaxed)
    }

    /// Reads `buf.len()` bytes at `offset` for the resync, outside the
    /// epoch gate (the resync is this replica's own work, not a request).
    /// Blocking.
    pub fn read_local(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        if let Some(f) = self.sync.failure() {
            return Err(StorageError {
                op: "read for the resync",
                target: f.target.clone(),
                offset,
                source: std::io::Error::other(f.to_string()),
            });
        }
        self.data.read_at(buf, offset)
    }

    /// Why this copy stopped serving, if it did (a failed fdatasync).
    pub fn failure(&self) -> Option<&SyncFailed> {
        self.sync.failure()
    }

    pub fn id(&self) -> &VolumeId {
        &self.id
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Handles `Resize`: the metadata owner grows the volume at exactly
    /// the current epoch (see `MetaOwner::resize` for the order that makes
    /// it crash-safe); answered once the new size is durable.
    pub async fn resize(
        &self,
        epoch: Epoch,
        via: &SessionGate,
        size: u64,
    ) -> Result<Reply, WireError> {
        via.check()?;
        self.sync.check().map_err(|f| failed(&f))?;
        let (reply, rx) = oneshot::channel();
        self.meta_tx
            .send(MetaCommand::Resize { epoch, size, reply })
            .await
            .map_err(|_| self.meta_gone())?;
        rx.await.map_err(|_| self.meta_gone())?
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.gate.epoch.load(Ordering::SeqCst))
    }

    /// Handles `Open` on a connection: checks the size, raises the epoch if
    /// `epoch` is newer (durably, before answering) and refuses an older
    /// one; judges a resync source's `claim` (learning a newer view it
    /// carries); then opens `session`, fencing the older sessions of its
    /// kind. Returns the answer and the session's gate.
    pub async fn open(
        &self,
        epoch: Epoch,
        expected_size: Option<u64>,
        session: Session,
        claim: Option<SyncClaim>,
    ) -> Result<(Reply, Arc<SessionGate>), WireError> {
        let started = Instant::now();
        let r = self.open_inner(epoch, expected_size, session, claim).await;
        self.metrics.record(IoOp::Open, started, 0, r.is_ok());
        r
    }

    async fn open_inner(
        &self,
        epoch: Epoch,
        expected_size: Option<u64>,
        session: Session,
        claim: Option<SyncClaim>,
    ) -> Result<(Reply, Arc<SessionGate>), WireError> {
        self.sync.check().map_err(|f| failed(&f))?;
        if let Some(expected) = expected_size
            && expected != self.size()
        {
            return Err(WireError::SizeMismatch {
                expected,
                actual: self.size(),
            });
        }
        let current = self.epoch();
        if epoch < current {
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current,
            });
        }
        match (session.kind, &claim) {
            (SessionKind::Resync, None) | (SessionKind::Frontend, Some(_)) => {
                return Err(WireError::Io {
                    message: format!(
                        "a {} session {} a resync claim",
                        session.kind,
                        if claim.is_some() { "carries" } else { "lacks" }
                    ),
                });
            }
            _ => {}
        }
        let (reply, rx) = oneshot::channel();
        self.meta_tx
            .send(MetaCommand::RaiseEpoch { epoch, reply })
            .await
            .map_err(|_| self.meta_gone())?;
        let now = rx.await.map_err(|_| self.meta_gone())??;
        if now > epoch {
            // A newer frontend raced us.
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current: now,
            });
        }
        if let Some(c) = &claim {
            self.judge_claim(c).await?;
        }
        let checked = self.known.view_changes();
        let gate = self.sessions.open(epoch, session, claim, checked).await?;
        Ok((
            Reply::Opened {
                size: self.size(),
                epoch: now,
                incarnation: self.incarnation,
            },
            gate,
        ))
    }

    /// Whether a resync source's claim may copy onto this replica, learning
    /// its view if newer (see `super::direction`).
    async fn judge_claim(&self, claim: &SyncClaim) -> Result<(), WireError> {
        let mut known = self.known.view();
        loop {
            match judge_copy(known.as_ref(), claim) {
                Verdict::Accept { learn: None } => return Ok(()),
                Verdict::Accept { learn: Some(v) } => {
                    // Stored before any copy lands; judged again against
                    // what is known then (a newer view may have come).
                    let after = self.learn_view(v).await?;
                    if after.as_ref().map(|k| k.view.stamp())
                        == known.as_ref().map(|k| k.view.stamp())
                    {
                        // Not stored as newer (should not happen): refuse.
                        return Err(WireError::Io {
                            message: "the resync claim's view could not be stored".to_owned(),
                        });
                    }
                    known = after;
                }
                Verdict::Refuse { newest, reason } => {
                    tracing::warn!(
                        volume = %self.id, source = %claim.source, claim = %claim.view.stamp(),
                        record = %newest.stamp(), reason = %reason,
                        "resync from the peer refused: the arbiter's record says it is no source"
                    );
                    return Err(WireError::NotSource {
                        known: newest,
                        reason,
                    });
                }
            }
        }
    }

    /// Re-judges a resync session's claim when this replica learned a
    /// newer view since (its peer may have been dropped meanwhile).
    fn recheck_source(&self, session: &SessionGate) -> Result<(), WireError> {
        let Some(claim) = session.claim() else {
            return Ok(());
        };
        let now = self.known.view_changes();
        if now == session.checked_at() {
            return Ok(());
        }
        match judge_copy(self.known.view().as_ref(), claim) {
            Verdict::Accept { .. } => {
                session.set_checked_at(now);
                Ok(())
            }
            Verdict::Refuse { newest, reason } => Err(WireError::NotSource {
                known: newest,
                reason,
            }),
        }
    }

    /// Handles `PeerState`: the metadata owner stores the record's view
    /// and acts on it, at exactly the current epoch.
    pub async fn peer_state(
        &self,
        epoch: Epoch,
        via: &SessionGate,
        change: PeerChange,
    ) -> Result<Reply, WireError> {
        via.check()?;
        self.sync.check().map_err(|f| failed(&f))?;
        let (reply, rx) = oneshot::channel();
        self.meta_tx
            .send(MetaCommand::PeerState {
                epoch,
                change,
                reply,
            })
            .await
            .map_err(|_| self.meta_gone())?;
        rx.await.map_err(|_| self.meta_gone())?
    }

    /// Handles `FenceSessions`: the sessions of `kind` below `below` at
    /// the current epoch are fenced; answered once none of their requests
    /// runs any more.
    pub async fn fence_sessions(
        &self,
        epoch: Epoch,
        via: &SessionGate,
        kind: SessionKind,
        below: SessionGen,
    ) -> Result<Reply, WireError> {
        via.check()?;
        let current = self.epoch();
        if epoch != current {
            return Err(if epoch < current {
                WireError::StaleEpoch {
                    seen: epoch,
                    current,
                }
            } else {
                WireError::EpochNotOpened {
                    seen: epoch,
                    current,
                }
            });
        }
        self.sessions.fence(epoch, kind, below).await?;
        tracing::info!(volume = %self.id, %kind, below = below.0, epoch = epoch.0, "sessions fenced");
        Ok(Reply::Done)
    }

    /// The floor of `kind`'s sessions (for tests and logs).
    pub fn session_floor(&self, kind: SessionKind) -> SessionGen {
        self.sessions.floor(kind)
    }

    /// Checks bounds; `carries_data` requests (read, write) are also held
    /// to the protocol's maximum I/O size.
    fn check_range(&self, offset: u64, len: u64, carries_data: bool) -> Result<(), WireError> {
        if carries_data && len > u64::from(MAX_IO_BYTES) {
            return Err(WireError::TooLarge {
                len,
                max: u64::from(MAX_IO_BYTES),
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(WireError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Executes a data request (anything but `Open`) at `epoch`. Blocking:
    /// call it on the blocking pool (the server runs each request there in
    /// one hop, without an extra async task).
    pub fn execute_blocking(
        &self,
        epoch: Epoch,
        session: &SessionGate,
        op: Op,
    ) -> Result<Reply, WireError> {
        let started = Instant::now();
        let (io_op, bytes) = match &op {
            Op::Open { .. }
            | Op::PeerState { .. }
            | Op::ResyncStatus
            | Op::ActiveExtents
            | Op::MarkDirty { .. }
            | Op::ForgetActivity
            | Op::RecoveredExtents
            | Op::ForgetExtents { .. }
            | Op::FenceSessions { .. }
            | Op::Resize { .. } => (IoOp::Open, 0),
            Op::Read { len, .. } => (IoOp::Read, u64::from(*len)),
            Op::Write { data, .. } => (IoOp::Write, data.len() as u64),
            Op::Flush => (IoOp::Flush, 0),
            Op::Trim { len, .. } => (IoOp::Trim, u64::from(*len)),
            Op::WriteZeroes { len, .. } => (IoOp::WriteZeroes, u64::from(*len)),
        };
        let r = self.execute_inner(epoch, session, op);
        self.metrics.record(io_op, started, bytes, r.is_ok());
        if matches!(io_op, IoOp::Write | IoOp::WriteZeroes | IoOp::Trim) {
            let us = started.elapsed().as_micros() as u64;
            let old = self.write_latency_us.load(Ordering::Relaxed);
            // EWMA, 1/8 weight: cheap, racy updates are harmless.
            let new = if old == 0 { us } else { old - old / 8 + us / 8 };
            self.write_latency_us.store(new, Ordering::Relaxed);
            self.writes_done.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Applies a range operation (trim, write-zeroes) in pieces that each
    /// fit the activity log, each logged (and marked, while tracking)
    /// before it is applied: a range of any length a request can carry.
    /// Each piece is admitted (epoch, session) after its registrations,
    /// as a write is.
    fn in_pieces(
        &self,
        epoch: Epoch,
        session: &SessionGate,
        offset: u64,
        len: u64,
        mirrored: bool,
        apply: impl Fn(u64, u64) -> Result<(), StorageError>,
    ) -> Result<(), WireError> {
        for (o, l) in self.logs.pieces(offset, len) {
            let _logged = self.logs.before_write(o, l, mirrored)?;
            let _admitted = self.admit(epoch, session)?;
            apply(o, l).map_err(|e| io_error(&e))?;
        }
        Ok(())
    }

    /// Admits a request of `session` at `epoch`: counted in flight, then
    /// checked (epoch, session, a resync source's claim), so that a raise
    /// of the epoch or a fence waits for it. A write is admitted only once
    /// its activity-log and bitmap registrations are done — those may wait
    /// for room in the log, which must not hold up a fence (the frontend's
    /// `ForgetActivity`, which makes room, may be waiting behind one).
    fn admit<'a>(
        &'a self,
        epoch: Epoch,
        session: &'a SessionGate,
    ) -> Result<(InFlight<'a>, SessionInFlight<'a>), WireError> {
        let in_flight = self.gate.enter(epoch)?;
        let in_session = session.enter()?;
        self.recheck_source(session)?;
        Ok((in_flight, in_session))
    }

    fn execute_inner(
        &self,
        epoch: Epoch,
        session: &SessionGate,
        op: Op,
    ) -> Result<Reply, WireError> {
        // Early refusal; the exact check is `admit`.
        self.gate.check(epoch)?;
        session.check()?;
        // After a failed sync nothing this copy says can be trusted: no
        // read (it may return what the kernel dropped), no write, no flush.
        self.sync.check().map_err(|f| failed(&f))?;
        let writes = matches!(
            op,
            Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
        );
        let _admitted = if writes {
            None
        } else {
            Some(self.admit(epoch, session)?)
        };
        let data = &self.data;
        let sync = || self.sync.sync().map_err(|f| failed(&f));
        let r = match op {
            Op::Open { .. } => return Err(WireError::AlreadyOpen),
            // Handled by the connection (`peer_state`, `fence_sessions`),
            // never here.
            Op::PeerState { .. } | Op::FenceSessions { .. } | Op::Resize { .. } => {
                return Err(WireError::Io {
                    message: "peer state is not a data request".to_owned(),
                });
            }
            Op::Read { offset, len } => {
                self.check_range(offset, u64::from(len), true)?;
                let mut buf = BytesMut::zeroed(len as usize);
                data.read_at(&mut buf, offset)
                    .map(|()| Reply::Data(buf.freeze()))
            }
            Op::Write {
                offset,
                fua,
                mirrored,
                data: bytes,
            } => {
                self.check_range(offset, bytes.len() as u64, true)?;
                let _logged = self
                    .logs
                    .before_write(offset, bytes.len() as u64, mirrored)?;
                let _admitted = self.admit(epoch, session)?;
                data.write_at(&bytes, offset).map_err(|e| io_error(&e))?;
                if fua {
                    sync()?;
                }
                return Ok(Reply::Done);
            }
            Op::Flush => return sync().map(|()| Reply::Done),
            Op::Trim {
                offset,
                len,
                mirrored,
            } => {
                self.check_range(offset, u64::from(len), false)?;
                self.in_pieces(epoch, session, offset, u64::from(len), mirrored, |o, l| {
                    data.punch(o, l)
                })?;
                Ok(Reply::Done)
            }
            Op::WriteZeroes {
                offset,
                len,
                fua,
                mirrored,
            } => {
                self.check_range(offset, u64::from(len), false)?;
                self.in_pieces(epoch, session, offset, u64::from(len), mirrored, |o, l| {
                    data.zero(o, l)
                })?;
                if fua {
                    let _admitted = self.admit(epoch, session)?;
                    sync()?;
                }
                return Ok(Reply::Done);
            }
            Op::ResyncStatus => {
                let bitmap = self.logs.bitmap();
                let tracking = match bitmap.state() {
                    crate::bitmap::BitmapState::Tracking { peer, .. } => Some(peer),
                    _ => None,
                };
                return Ok(Reply::Resync(ResyncReport {
                    tracking,
                    dirty_bytes: bitmap.dirty_bytes(),
                    copied_bytes: self.resync_copied.load(Ordering::Relaxed),
                }));
            }
            Op::ActiveExtents => return Ok(Reply::Extents(self.logs.active_ranges())),
            Op::MarkDirty { ranges } => {
                for r in &ranges {
                    self.check_range(r.offset, r.len, false)?;
                }
                let id = self.id.as_str();
                return self
                    .runtime
                    .block_on(self.logs.mark_dirty(id, &ranges))
                    .map(|()| Reply::Done);
            }
            Op::ForgetActivity => {
                return self
                    .runtime
                    .block_on(self.logs.forget_activity(self.id.as_str()))
                    .map(|()| Reply::Done);
            }
            Op::RecoveredExtents => return Ok(Reply::Extents(self.logs.recovered_ranges())),
            Op::ForgetExtents { ranges } => {
                for r in &ranges {
                    self.check_range(r.offset, r.len, false)?;
                }
                return self
                    .runtime
                    .block_on(self.logs.forget_extents(self.id.as_str(), &ranges))
                    .map(|()| Reply::Done);
            }
        };
        r.map_err(|e| io_error(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn raising_the_epoch_waits_for_requests_of_the_old_one() {
        let gate = Arc::new(EpochGate::default());
        gate.epoch.store(1, Ordering::SeqCst);
        let old = gate.enter(Epoch(1)).expect("current epoch passes");
        let g = gate.clone();
        let mut raise = tokio::spawn(async move { g.raise_and_drain(Epoch(2)).await });
        // The raise is not done while an old request is in flight...
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut raise)
                .await
                .is_err()
        );
        // ...but new requests of the old epoch are already refused.
        assert!(matches!(
            gate.enter(Epoch(1)),
            Err(WireError::StaleEpoch { .. })
        ));
        drop(old);
        tokio::time::timeout(Duration::from_secs(5), raise)
            .await
            .expect("drained")
            .expect("join");
        assert!(gate.enter(Epoch(2)).is_ok());
        assert!(matches!(
            gate.enter(Epoch(3)),
            Err(WireError::EpochNotOpened { .. })
        ));
    }

    async fn start_volume(dir: &std::path::Path) -> Arc<Volume> {
        let pool = super::super::Pool::open(dir).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        if pool.open_volume(&id).is_err() {
            pool.create_volume(&id, 1 << 20).expect("create");
        }
        let opened = pool.open_volume(&id).expect("open");
        let metrics = crate::metrics::Metrics::new("test");
        let meta_storage: Arc<dyn Storage> = Arc::new(opened.meta_storage);
        let data: Arc<dyn Storage> = Arc::new(opened.data);
        let sync = DataSync::new("v1", data.clone());
        let logs = VolumeLogs::open_as(
            "v1",
            opened.meta.size,
            meta_storage.clone(),
            Arc::new(opened.bitmap_storage),
            sync.clone(),
            SyncRole::of(opened.meta.view.as_ref()),
        )
        .await
        .expect("logs");
        Volume::start(
            data,
            sync,
            meta_storage,
            opened.meta,
            logs,
            metrics.handles("v1", ""),
        )
    }

    fn id(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("valid")
    }

    fn view(epoch: u64, seq: u64, in_sync: &[&str]) -> SyncView {
        SyncView {
            epoch: Epoch(epoch),
            seq,
            arbiter_version: crate::protocol::ArbiterVersion::new(format!("{seq}")).expect("valid"),
            in_sync: in_sync.iter().map(|s| id(s)).collect(),
        }
    }

    fn frontend(g: u64) -> Session {
        Session {
            kind: SessionKind::Frontend,
            generation: SessionGen(g),
        }
    }

    /// `PeerState` telling replica `you` the record `view`.
    fn told(you: &str, view: SyncView, fence: Option<u64>) -> PeerChange {
        PeerChange {
            you: id(you),
            peer: id(if you == "a" { "b" } else { "a" }),
            view,
            peer_incarnation: 0,
            fence: fence.map(SessionGen),
        }
    }

    async fn write(
        volume: &Arc<Volume>,
        session: &Arc<SessionGate>,
        epoch: u64,
    ) -> Result<Reply, WireError> {
        let (v, s) = (volume.clone(), session.clone());
        tokio::task::spawn_blocking(move || {
            v.execute_blocking(
                Epoch(epoch),
                &s,
                Op::Write {
                    offset: 0,
                    fua: false,
                    mirrored: false,
                    data: bytes::Bytes::from_static(&[7; 4096]),
                },
            )
        })
        .await
        .expect("join")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn peer_state_is_recorded_only_at_the_current_epoch_and_never_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = start_volume(dir.path()).await;
        let (_, fe) = volume
            .open(Epoch(3), None, frontend(1), None)
            .await
            .expect("open at 3");
        let change = told("b", view(3, 2, &["b"]), Some(4));
        assert_eq!(
            volume.peer_state(Epoch(2), &fe, change.clone()).await,
            Err(WireError::StaleEpoch {
                seen: Epoch(2),
                current: Epoch(3)
            })
        );
        assert_eq!(
            volume.peer_state(Epoch(4), &fe, change.clone()).await,
            Err(WireError::EpochNotOpened {
                seen: Epoch(4),
                current: Epoch(3)
            })
        );
        assert_eq!(
            volume.peer_state(Epoch(3), &fe, change.clone()).await,
            Ok(Reply::Done)
        );
        assert!(volume.logs().is_tracking(), "b tracks a, which is out");
        // Idempotent; an older record is refused.
        assert_eq!(
            volume.peer_state(Epoch(3), &fe, change).await,
            Ok(Reply::Done)
        );
        assert!(matches!(
            volume
                .peer_state(Epoch(3), &fe, told("b", view(3, 1, &["a", "b"]), None))
                .await,
            Err(WireError::StaleView { .. })
        ));
        let known = volume.known().view().expect("a view");
        assert_eq!((known.me.as_str(), known.view.seq), ("b", 2));
        assert_eq!(
            volume.known().peer_fence(),
            Some(PeerFence {
                epoch: Epoch(3),
                below: SessionGen(4)
            })
        );
        // Persisted: a restarted replica knows both.
        drop(fe);
        drop(volume);
        let volume = start_volume(dir.path()).await;
        assert_eq!(volume.known().view().map(|k| k.view.seq), Some(2));
        assert_eq!(
            volume.known().peer_fence().map(|f| f.below),
            Some(SessionGen(4))
        );
        assert!(volume.logs().is_tracking());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_on_a_session_its_client_replaced_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = start_volume(dir.path()).await;
        let (_, old) = volume
            .open(Epoch(1), None, frontend(1), None)
            .await
            .expect("open 1");
        assert_eq!(write(&volume, &old, 1).await, Ok(Reply::Done));
        let (_, new) = volume
            .open(Epoch(1), None, frontend(2), None)
            .await
            .expect("open 2");
        assert!(matches!(
            write(&volume, &old, 1).await,
            Err(WireError::StaleSession { .. })
        ));
        assert_eq!(write(&volume, &new, 1).await, Ok(Reply::Done));
        // Fenced from elsewhere (a resync applying the frontend's fence).
        let (_, resync_gate) = volume
            .open(
                Epoch(1),
                None,
                Session {
                    kind: SessionKind::Resync,
                    generation: SessionGen(1),
                },
                Some(SyncClaim {
                    source: id("b"),
                    target: id("a"),
                    view: view(1, 1, &["b"]),
                }),
            )
            .await
            .expect("resync opens: nothing known yet, the claim is learned");
        volume
            .fence_sessions(Epoch(1), &resync_gate, SessionKind::Frontend, SessionGen(3))
            .await
            .expect("fenced");
        assert!(matches!(
            write(&volume, &new, 1).await,
            Err(WireError::StaleSession { .. })
        ));
        // The claim was learned: this replica knows it is out of sync.
        assert!(!volume.known().view().expect("view").me_in_sync());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn copies_from_a_source_the_newest_record_lists_out_of_sync_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = start_volume(dir.path()).await;
        let (_, fe) = volume
            .open(Epoch(1), None, frontend(1), None)
            .await
            .expect("open");
        // This replica is a, alone in sync at 1.4.
        volume
            .peer_state(Epoch(1), &fe, told("a", view(1, 4, &["a"]), None))
            .await
            .expect("told");
        let resync = |g: u64, v: SyncView| {
            let volume = volume.clone();
            async move {
                volume
                    .open(
                        Epoch(1),
                        None,
                        Session {
                            kind: SessionKind::Resync,
                            generation: SessionGen(g),
                        },
                        Some(SyncClaim {
                            source: id("b"),
                            target: id("a"),
                            view: v,
                        }),
                    )
                    .await
            }
        };
        // b's stale claim (1.2: b alone in sync) is refused, with a's view.
        match resync(1, view(1, 2, &["b"])).await {
            Err(WireError::NotSource { known, .. }) => assert_eq!(known, view(1, 4, &["a"])),
            other => panic!("{:?}", other.map(|(r, _)| r)),
        }
        // A newer one (1.5: a dropped since) is accepted, and learned.
        let (_, gate) = resync(2, view(1, 5, &["b"])).await.expect("accepted");
        assert_eq!(write(&volume, &gate, 1).await, Ok(Reply::Done));
        assert_eq!(volume.known().view().map(|k| k.view.seq), Some(5));
        // Once a learns a newer record without b, b's session copies no more.
        volume
            .peer_state(Epoch(1), &fe, told("a", view(1, 6, &["a"]), None))
            .await
            .expect("told");
        assert!(matches!(
            write(&volume, &gate, 1).await,
            Err(WireError::NotSource { .. })
        ));
    }

    /// A volume of `pool` whose data file fails as `plan` says, through a
    /// volatile cache (a failed sync drops the cached pages, as Linux does).
    #[cfg(feature = "failpoints")]
    async fn faulty_volume(
        dir: &std::path::Path,
        plan: Arc<crate::storage::FaultPlan>,
    ) -> Arc<Volume> {
        let pool = super::super::Pool::open(dir).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, 1 << 20).expect("create");
        let opened = pool.open_volume(&id).expect("open");
        let meta_storage: Arc<dyn Storage> = Arc::new(opened.meta_storage);
        let data: Arc<dyn Storage> = Arc::new(crate::storage::FaultyStorage::volatile(
            opened.data,
            "data",
            plan,
            crate::storage::DEFAULT_CACHE_LIMIT,
        ));
        let sync = DataSync::new("v1", data.clone());
        let logs = VolumeLogs::open(
            "v1",
            opened.meta.size,
            meta_storage.clone(),
            Arc::new(opened.bitmap_storage),
            sync.clone(),
        )
        .await
        .expect("logs");
        let metrics = crate::metrics::Metrics::new("test");
        Volume::start(
            data,
            sync,
            meta_storage,
            opened.meta,
            logs,
            metrics.handles("v1", ""),
        )
    }

    #[cfg(feature = "failpoints")]
    #[tokio::test(flavor = "multi_thread")]
    async fn after_a_failed_fdatasync_the_volume_refuses_everything_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = crate::storage::FaultPlan::new();
        let v = faulty_volume(dir.path(), plan.clone()).await;
        let (_, gate) = v
            .open(Epoch(1), None, frontend(1), None)
            .await
            .expect("open");
        let run = |op: Op| {
            let (v, gate) = (v.clone(), gate.clone());
            async move {
                tokio::task::spawn_blocking(move || v.execute_blocking(Epoch(1), &gate, op))
                    .await
                    .expect("join")
            }
        };
        let write = || Op::Write {
            offset: 0,
            fua: false,
            mirrored: false,
            data: bytes::Bytes::from_static(&[9; 4096]),
        };
        assert_eq!(run(write()).await, Ok(Reply::Done));
        assert_eq!(run(Op::Flush).await, Ok(Reply::Done));
        assert_eq!(run(write()).await, Ok(Reply::Done));
        plan.inject("data::sync", 0, Some(1), crate::storage::FaultAction::Fail);
        let refused = |r: Result<Reply, WireError>| matches!(r, Err(WireError::VolumeFailed { ref reason }) if reason.contains("fdatasync failed"));
        assert!(refused(run(Op::Flush).await), "the failed flush");
        // The storage would now sync fine (the pages are gone): a later
        // flush must not be acknowledged as if they were durable.
        assert!(refused(run(Op::Flush).await), "a later flush");
        assert!(refused(run(write()).await), "a later write");
        assert!(
            refused(
                run(Op::Read {
                    offset: 0,
                    len: 4096
                })
                .await
            ),
            "a read"
        );
        assert!(
            refused(
                v.open(Epoch(2), None, frontend(2), None)
                    .await
                    .map(|(r, _)| r)
            ),
            "an open"
        );
        assert_eq!(
            plan.hits("data::sync"),
            2,
            "one good sync, one failed, no more"
        );
        assert!(v.failure().is_some());
        let mut buf = [0u8; 16];
        assert!(v.read_local(&mut buf, 0).is_err(), "no resync from it");
    }
}
