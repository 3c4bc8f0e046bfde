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
//! - `PeerState` is handled by the metadata owner, which durably starts or
//!   stops dirty tracking before answering;
//! - every fdatasync of the data file goes through [`DataSync`]: the
//!   activity log learns which writes are durable, and a failed sync stops
//!   the volume for good — every later request (`Open` included) is refused
//!   with `VolumeFailed`, so that no flush is acknowledged for pages the
//!   kernel dropped, and the frontend takes the replica out.
//!
//! Fencing is exact: a data request counts itself in flight *before* it
//! checks the epoch, and raising the epoch sets the new value *before* it
//! waits for the in-flight count to drain (both sequentially consistent).
//! So every request either sees the new epoch and is refused, or is waited
//! for: when a newer frontend's `Open` is answered, no request of an older
//! epoch can land any more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::data_sync::{DataSync, SyncFailed};
use crate::metrics::{IoOp, OpHandles};
use crate::protocol::{
    ArbiterVersion, Epoch, MAX_IO_BYTES, Op, ReplicaId, Reply, ResyncReport, VolumeId, WireError,
};
use crate::storage::{Storage, StorageError, blocking};

use super::logs::VolumeLogs;
use super::meta::{self, Metadata};

/// The epoch and the data requests in flight, shared by the volume and its
/// metadata owner.
#[derive(Default)]
struct EpochGate {
    epoch: AtomicU64,
    in_flight: AtomicU64,
    drained: Notify,
}

impl EpochGate {
    /// Counts a request in flight, then checks its epoch.
    fn enter(&self, epoch: Epoch) -> Result<InFlight<'_>, WireError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
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
            Ok(guard)
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
    size: u64,
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
    /// The resync found the peer recreated: remember its new incarnation.
    SetPeerIncarnation {
        incarnation: u64,
        reply: oneshot::Sender<Result<(), WireError>>,
    },
}

/// What the frontend said about this replica's peer (`Op::PeerState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub peer: ReplicaId,
    pub in_sync: bool,
    pub arbiter_version: ArbiterVersion,
    /// The peer's incarnation as the frontend knows it (0: unknown).
    pub peer_incarnation: u64,
}

/// Whether this replica believes its peer gets every write. Held by the
/// metadata owner: in memory for now; the dirty bitmap makes the
/// out-of-sync state durable (the regions written while it holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTracking {
    InSync,
    OutOfSync {
        since_epoch: Epoch,
        arbiter_version: ArbiterVersion,
    },
}

/// Owns the metadata area of one volume; the only writer of it.
struct MetaOwner {
    id: VolumeId,
    storage: Arc<dyn Storage>,
    current: Metadata,
    gate: Arc<EpochGate>,
    peers: BTreeMap<ReplicaId, PeerTracking>,
    logs: Arc<VolumeLogs>,
    /// Mirrors `current.peer_incarnation` for the resync.
    peer_incarnation: Arc<AtomicU64>,
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
                MetaCommand::SetPeerIncarnation { incarnation, reply } => {
                    let _ = reply.send(self.set_peer_incarnation(incarnation).await);
                }
            }
        }
    }

    /// Records the peer's state. The epoch is checked here, where epoch
    /// raises are serialised, so a stale frontend cannot change it.
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
        let was_tracking = matches!(
            self.logs.bitmap().state(),
            crate::bitmap::BitmapState::Tracking { ref peer, .. } if *peer == change.peer
        );
        // Durable before the answer: no write is acknowledged without the
        // peer before its regions are tracked.
        let logged = if change.in_sync {
            self.logs.peer_rejoined(self.id.as_str()).await
        } else {
            self.logs
                .peer_left(self.id.as_str(), change.peer.clone(), epoch)
                .await
        };
        if let Err(e) = logged {
            let message = crate::error_chain(&e);
            tracing::error!(volume = %self.id, error = %message, "cannot record the peer's state");
            return Err(WireError::Io { message });
        }
        let tracking = if change.in_sync {
            PeerTracking::InSync
        } else {
            PeerTracking::OutOfSync {
                since_epoch: epoch,
                arbiter_version: change.arbiter_version.clone(),
            }
        };
        tracing::info!(
            volume = %self.id,
            peer = %change.peer,
            in_sync = change.in_sync,
            arbiter_version = %change.arbiter_version,
            epoch = epoch.0,
            "peer state changed"
        );
        // Remember which copy of the peer was in sync, so that the resync
        // can tell a recreated one (and copy everything to it). Kept while
        // tracking: a later frontend may only know a recreated copy.
        let known = self.current.peer_incarnation;
        let learn = change.peer_incarnation != 0
            && known != change.peer_incarnation
            && (change.in_sync || !was_tracking || known == 0);
        if learn {
            self.set_peer_incarnation(change.peer_incarnation).await?;
        }
        self.peers.insert(change.peer, tracking);
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
        let size = current.size;
        let incarnation = current.incarnation;
        let peer_incarnation = Arc::new(AtomicU64::new(current.peer_incarnation));
        let owner = MetaOwner {
            peer_incarnation: peer_incarnation.clone(),
            id: id.clone(),
            storage: meta_storage,
            current,
            gate: gate.clone(),
            peers: BTreeMap::new(),
            logs: logs.clone(),
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
        })
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
        self.size
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.gate.epoch.load(Ordering::SeqCst))
    }

    /// Handles `Open` on a connection: checks the size, raises the epoch if
    /// `epoch` is newer (durably, before answering) and refuses an older one.
    pub async fn open(&self, epoch: Epoch, expected_size: Option<u64>) -> Result<Reply, WireError> {
        let started = Instant::now();
        let r = self.open_inner(epoch, expected_size).await;
        self.metrics.record(IoOp::Open, started, 0, r.is_ok());
        r
    }

    async fn open_inner(
        &self,
        epoch: Epoch,
        expected_size: Option<u64>,
    ) -> Result<Reply, WireError> {
        self.sync.check().map_err(|f| failed(&f))?;
        if let Some(expected) = expected_size
            && expected != self.size
        {
            return Err(WireError::SizeMismatch {
                expected,
                actual: self.size,
            });
        }
        let current = self.epoch();
        if epoch < current {
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current,
            });
        }
        let (reply, rx) = oneshot::channel();
        let closed = || WireError::Io {
            message: format!("metadata task of volume {} is gone", self.id),
        };
        self.meta_tx
            .send(MetaCommand::RaiseEpoch { epoch, reply })
            .await
            .map_err(|_| closed())?;
        let now = rx.await.map_err(|_| closed())??;
        if now > epoch {
            // A newer frontend raced us.
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current: now,
            });
        }
        Ok(Reply::Opened {
            size: self.size,
            epoch: now,
            incarnation: self.incarnation,
        })
    }

    /// Handles `PeerState`: the metadata owner records whether the peer
    /// gets every write, at exactly the current epoch.
    pub async fn peer_state(&self, epoch: Epoch, change: PeerChange) -> Result<Reply, WireError> {
        self.sync.check().map_err(|f| failed(&f))?;
        let (reply, rx) = oneshot::channel();
        let closed = || WireError::Io {
            message: format!("metadata task of volume {} is gone", self.id),
        };
        self.meta_tx
            .send(MetaCommand::PeerState {
                epoch,
                change,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
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
            Some(end) if end <= self.size => Ok(()),
            _ => Err(WireError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Executes a data request (anything but `Open`) at `epoch`. Blocking:
    /// call it on the blocking pool (the server runs each request there in
    /// one hop, without an extra async task).
    pub fn execute_blocking(&self, epoch: Epoch, op: Op) -> Result<Reply, WireError> {
        let started = Instant::now();
        let (io_op, bytes) = match &op {
            Op::Open { .. }
            | Op::PeerState { .. }
            | Op::ResyncStatus
            | Op::ActiveExtents
            | Op::MarkDirty { .. }
            | Op::ForgetActivity
            | Op::RecoveredExtents
            | Op::ForgetExtents { .. } => (IoOp::Open, 0),
            Op::Read { len, .. } => (IoOp::Read, u64::from(*len)),
            Op::Write { data, .. } => (IoOp::Write, data.len() as u64),
            Op::Flush => (IoOp::Flush, 0),
            Op::Trim { len, .. } => (IoOp::Trim, u64::from(*len)),
            Op::WriteZeroes { len, .. } => (IoOp::WriteZeroes, u64::from(*len)),
        };
        let r = self.execute_inner(epoch, op);
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

    fn execute_inner(&self, epoch: Epoch, op: Op) -> Result<Reply, WireError> {
        let _in_flight = self.gate.enter(epoch)?;
        // After a failed sync nothing this copy says can be trusted: no
        // read (it may return what the kernel dropped), no write, no flush.
        self.sync.check().map_err(|f| failed(&f))?;
        let data = &self.data;
        let sync = || self.sync.sync().map_err(|f| failed(&f));
        let r = match op {
            Op::Open { .. } => return Err(WireError::AlreadyOpen),
            // Handled by the connection through `peer_state`, never here.
            Op::PeerState { .. } => {
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
                let _logged = self.logs.before_write(offset, u64::from(len), mirrored)?;
                data.punch(offset, u64::from(len)).map(|()| Reply::Done)
            }
            Op::WriteZeroes {
                offset,
                len,
                fua,
                mirrored,
            } => {
                self.check_range(offset, u64::from(len), false)?;
                let _logged = self.logs.before_write(offset, u64::from(len), mirrored)?;
                data.zero(offset, u64::from(len))
                    .map_err(|e| io_error(&e))?;
                if fua {
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

    #[tokio::test]
    async fn peer_state_is_recorded_only_at_the_current_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = super::super::Pool::open(dir.path()).expect("pool");
        let id = VolumeId::new("v1").expect("valid");
        pool.create_volume(&id, 1 << 20).expect("create");
        let opened = pool.open_volume(&id).expect("open");
        let metrics = crate::metrics::Metrics::new("test");
        let meta_storage: Arc<dyn Storage> = Arc::new(opened.meta_storage);
        let data: Arc<dyn Storage> = Arc::new(opened.data);
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
        let volume = Volume::start(
            data,
            sync,
            meta_storage,
            opened.meta,
            logs,
            metrics.handles("v1", ""),
        );
        volume.open(Epoch(3), None).await.expect("open at 3");
        let change = PeerChange {
            peer: ReplicaId::new("a").expect("valid"),
            in_sync: false,
            arbiter_version: ArbiterVersion::new("7").expect("valid"),
            peer_incarnation: 0,
        };
        assert_eq!(
            volume.peer_state(Epoch(2), change.clone()).await,
            Err(WireError::StaleEpoch {
                seen: Epoch(2),
                current: Epoch(3)
            })
        );
        assert_eq!(
            volume.peer_state(Epoch(4), change.clone()).await,
            Err(WireError::EpochNotOpened {
                seen: Epoch(4),
                current: Epoch(3)
            })
        );
        assert_eq!(volume.peer_state(Epoch(3), change).await, Ok(Reply::Done));
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
        v.open(Epoch(1), None).await.expect("open");
        let run = |op: Op| {
            let v = v.clone();
            async move {
                tokio::task::spawn_blocking(move || v.execute_blocking(Epoch(1), op))
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
        assert!(refused(v.open(Epoch(2), None).await), "an open");
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
