//! Resync (design invariant 5): the in-sync replica copies to its returning
//! peer exactly the regions its dirty bitmap holds (which include the
//! activity-log extents recovered after a crash), concurrently with
//! foreground I/O, throttled, with visible progress.
//!
//! # Design
//!
//! - **Who drives it.** The replica server that holds the trustworthy copy
//!   runs the resync as a *client of its peer replica*, over the same
//!   authenticated protocol the frontends use (`Open` at its own epoch,
//!   `Write`s, a `Flush` before any bit is cleared). Data goes straight
//!   from one site to the other; no frontend is on the path, and a crash of
//!   the frontend does not stop it.
//! - **When.** One supervisor task per open volume ([`ResyncManager::watch`])
//!   starts a resync whenever the bitmap tracks a peer with dirty regions
//!   and that peer answers. The server opens every volume of its pool at
//!   startup, so a resync interrupted by a crash (even kill -9) resumes from
//!   the persisted bitmap with no one asking.
//! - **Where the peer is.** From the replica's configuration
//!   ([`ResyncConfig::peers`], `--peer NAME=HOST:PORT`), or else from
//!   [`ResyncConfig::peers_file`], re-read at every attempt: the CSI node
//!   plugin writes the peer's address there from the MirroredVolume
//!   status, so a peer that appears or moves later needs no restart. Hook wanted from the
//!   frontend/protocol owner (not needed by the tests): a
//!   `StartResync { peer, addr }` request, so that the lease holder can
//!   point a replica at a peer that moved.
//! - **Ordering against foreground writes.** Every foreground write on this
//!   replica marks the bitmap before it writes (see `replica::logs`); a copy
//!   is `begin_copy` → read locally → write to the peer → peer `Flush` →
//!   `finish`, and `finish` keeps the bit set when a write overlapped the
//!   copy (the region is copied again on the next pass). So the peer ends
//!   with the newest data whatever the interleaving; a crash at any point
//!   leaves the bit set on disk (copying is idempotent).
//! - **Bounded.** A semaphore per server ([`ResyncConfig::max_concurrent`],
//!   default 2) bounds the resyncs copying at once: no rebuild storm when a
//!   site with many volumes returns.
//! - **Throttled.** A rate limit in bytes/s; while foreground writes
//!   happen, the copy yields: after each batch it pauses 19 times as long
//!   as the batch took (about 5 % of the time), and longer while the
//!   smoothed foreground write latency is above a target — so that the
//!   foreground's p99 stays near idle (docs/benchmarks.md). An idle volume
//!   is copied at full speed. The peer is flushed once per 1024 regions or
//!   500 ms, not per batch (a region's bit is cleared only after the flush
//!   covering its copy).
//! - **Rejoin.** When no region is dirty the resync is `Done`. The lease
//!   holder drives the rest (`frontend::failover`): it sends the returning
//!   replica every write while it catches up — flagged `mirrored`, so this
//!   replica orders them against its copies (`Bitmap::note_write`) without
//!   marking them, and the copy converges under load —, polls
//!   `Op::ResyncStatus` on this replica until nothing is dirty, does the
//!   arbiter's `ReturnToInSync` and sends `PeerState { in_sync: true }`,
//!   upon which this replica stops tracking (`VolumeLogs::peer_rejoined`).
//! - **Which way.** Only a replica whose view of the arbiter's record
//!   lists it in sync and its peer out copies (`replica::direction`); the
//!   view is its claim when it opens its session on the peer, and a peer
//!   that knows a newer record refuses (and this replica learns that record
//!   from the refusal: one that lists it out of sync ends its tracking).
//!   Re-checked before every batch.
//! - **Aborted copies never land late.** Each attempt is a new session of
//!   this replica's resync on the peer (`SessionKind::Resync`), which
//!   fences the sessions of the failed attempts before anything is copied;
//!   a failed attempt also aborts its connection (RST,
//!   `ReplicaHandle::reset`) so that the kernel drops what is still queued.
//! - **The frontend's given-up connections never land late either.** The
//!   frontend tells this replica the floor of its sessions to the peer it
//!   gave up on (`PeerState`, persisted); before copying, and again before
//!   any batch once a newer floor is known, the resync has the peer fence
//!   them (`Op::FenceSessions`): a write the frontend gave up on (and
//!   acknowledged here alone) cannot land there after the copy of its
//!   region.
//! - **Reconciling after a frontend crash.** A new frontend asks both
//!   replicas for their activity-log extents (`Op::ActiveExtents`), has one
//!   leave the in-sync set, marks the extents of both dirty on the other
//!   (`Op::MarkDirty`): this resync copies them like any dirty region.
//!
//! Wanted later: `Op::StartResync { peer, addr }`, so that the lease
//! holder can point a replica at a peer that moved instead of `--peer`
//! (the node plugin fills `--peer` from the MirroredVolume status).
//!
//! # Progress
//!
//! [`ResyncStatus`] is logged every [`ResyncConfig::status_interval`]
//! (`resync v1 → a: 12.5 MiB / 40 MiB, 31%, ETA 3 s`), written as JSON to
//! `<pool>/<volume>/resync-status.json` (atomically: write, rename), and
//! exported as metrics (`twinvol_replica_resync_*`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::Semaphore;

use crate::bitmap::{BitmapError, BitmapState, RegionIndex};
use crate::frontend::connection::{
    CallError, ConnectError, ReplicaHandle, SessionCounter, SessionParams,
};
use crate::frontend::{ReplicaSpec, ReplicaState};
use crate::metrics::Metrics;
use crate::protocol::{
    MAX_IO_BYTES, Op, ProtocolVersion, ReplicaId, Reply, Secret, SessionKind, SyncClaim, SyncView,
    VolumeId, WireError,
};
use crate::replica::Volume;
use crate::replica::direction::may_copy;
use crate::replica::meta::StoredView;
use crate::storage::StorageError;

/// Resyncs copying at once on one replica server, by default.
pub const DEFAULT_MAX_CONCURRENT: usize = 2;
/// Regions copied per batch.
const BATCH_REGIONS: usize = 16;
/// The peer is flushed (and the copied regions' bits cleared) once this
/// many regions are copied, or every `FLUSH_EVERY`, or at the end of a pass.
const FLUSH_REGIONS: usize = 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How long one request to the peer may take before the resync fails.
const PEER_IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle supervisor looks at its bitmap.
const POLL: Duration = Duration::from_millis(200);
/// How often the bitmap's clears are made durable during a copy.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// See [`busy_pause`].
const BUSY_YIELD: u32 = 19;

/// How resyncs are run on one replica server.
#[derive(Debug, Clone)]
pub struct ResyncConfig {
    /// Where the peer replicas are (the replica id the bitmap tracks →
    /// address).
    pub peers: Vec<ReplicaSpec>,
    /// A file of `NAME=HOST:PORT` lines read at every attempt for a peer
    /// that `peers` does not name: where the CSI node plugin writes the
    /// peer's address from the MirroredVolume status, which may become
    /// known (or change) after this server started.
    pub peers_file: Option<PathBuf>,
    /// Bytes per second per resync; `None`: unlimited.
    pub rate_limit: Option<u64>,
    pub max_concurrent: usize,
    /// Back off while foreground writes are slower than this.
    pub latency_target: Duration,
    pub status_interval: Duration,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            peers_file: None,
            rate_limit: None,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            latency_target: Duration::from_millis(20),
            status_interval: Duration::from_secs(1),
        }
    }
}

/// The address of `peer` in a peers file (`NAME=HOST:PORT` lines); a
/// missing or unreadable file names no peer (the attempt fails and is
/// retried, as without an address).
fn peer_from_file(file: &Path, peer: &ReplicaId) -> Option<ReplicaSpec> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (name, addr) = line.trim().split_once('=')?;
        (name == peer.as_str() && !addr.is_empty()).then(|| ReplicaSpec {
            id: peer.clone(),
            addr: addr.to_owned(),
        })
    })
}

/// Why a resync stopped before it was done (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("no address for peer replica {peer}: start the replica with --peer {peer}=HOST:PORT")]
    NoPeerAddress { peer: ReplicaId },
    #[error("cannot connect to peer replica {peer}")]
    Connect {
        peer: ReplicaId,
        #[source]
        source: ConnectError,
    },
    #[error("peer replica {peer} did not answer within {timeout:?}")]
    Timeout { peer: ReplicaId, timeout: Duration },
    #[error("lost the connection to peer replica {peer} ({state})")]
    PeerLost {
        peer: ReplicaId,
        state: &'static str,
    },
    #[error("peer replica {peer} failed a resync request")]
    Peer {
        peer: ReplicaId,
        #[source]
        source: CallError,
    },
    #[error("peer replica {peer} has a volume of {peer_size} bytes, this one has {size}")]
    SizeMismatch {
        peer: ReplicaId,
        peer_size: u64,
        size: u64,
    },
    #[error("reading the local copy failed")]
    LocalRead(#[source] StorageError),
    #[error("cannot record the peer's new incarnation")]
    Meta(#[source] crate::protocol::WireError),
    #[error("not a resync source: {reason}")]
    NotSource { reason: String },
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// Where one volume's resync is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ResyncState {
    /// The peer is in sync, or nothing is dirty.
    Idle,
    /// Dirty regions exist; waiting for a free resync slot.
    Waiting,
    /// Connecting to the peer.
    Connecting,
    /// Copying dirty regions.
    Copying,
    /// Nothing dirty is left: the peer may rejoin the in-sync set.
    Done,
    /// The last attempt failed (retried with back-off).
    Failed { error: String },
}

/// What a user (and the tests) see of one volume's resync.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResyncStatus {
    pub volume: String,
    pub peer: Option<String>,
    #[serde(flatten)]
    pub state: ResyncState,
    /// Why this is a full copy, if it is.
    pub full_copy: Option<String>,
    /// Bytes dirty when the current attempt started.
    pub dirty_bytes_at_start: u64,
    /// Bytes written to the peer by this process (all attempts, recopies
    /// included).
    pub copied_bytes: u64,
    /// Bytes written to the peer in the current attempt.
    pub attempt_copied_bytes: u64,
    pub remaining_bytes: u64,
    /// Regions copied again because a write overlapped their copy.
    pub recopied_regions: u64,
    /// The current resync — its attempts since the last that completed,
    /// the one that completed included: bytes dirty when its first
    /// attempt started copying (a failed attempt's copies clear bits, so
    /// the next attempt's `dirty_bytes_at_start` is smaller).
    #[serde(default)]
    pub resync_dirty_bytes_at_start: u64,
    /// Bytes it wrote to the peer, over its attempts, recopies included:
    /// against `resync_dirty_bytes_at_start`, what it cost.
    #[serde(default)]
    pub resync_copied_bytes: u64,
    /// Its attempts that got to copying.
    #[serde(default)]
    pub resync_attempts: u64,
    /// Its regions copied again because a write overlapped their copy.
    #[serde(default)]
    pub resync_recopied_regions: u64,
    pub elapsed_ms: u64,
    pub eta_ms: Option<u64>,
    /// Attempts completed with nothing dirty left.
    pub completed: u64,
    /// Set when this replica's copy failed (an fdatasync error): it serves
    /// and copies nothing until restarted, and says why here.
    #[serde(default)]
    pub volume_failed: Option<String>,
}

impl ResyncStatus {
    /// One line for logs: `resync v1 → a: 12.5 MiB / 40 MiB, 31%, ETA 3 s`.
    pub fn line(&self) -> String {
        let total = self.attempt_copied_bytes + self.remaining_bytes;
        let pct = (self.attempt_copied_bytes * 100)
            .checked_div(total)
            .unwrap_or(100);
        let eta = match self.eta_ms {
            Some(ms) => format!("ETA {} s", ms.div_ceil(1000)),
            None => "ETA ?".to_owned(),
        };
        let full = match &self.full_copy {
            Some(why) => format!(" (full copy: {why})"),
            None => String::new(),
        };
        format!(
            "resync {} → {}: {} / {}, {pct}%, {eta}{full}",
            self.volume,
            self.peer.as_deref().unwrap_or("?"),
            mib(self.attempt_copied_bytes),
            mib(total),
        )
    }
}

impl ResyncStatus {
    /// What `twinvol-engine volume status` prints: one `key: value` per
    /// line.
    pub fn summary(&self) -> String {
        let state = match &self.state {
            ResyncState::Failed { error } => format!("failed ({error})"),
            s => resync_state_name(s).to_owned(),
        };
        let mut out = format!("volume: {}\n", self.volume);
        if let Some(why) = &self.volume_failed {
            out.push_str(&format!("volume failed: {why}\n"));
        }
        out.push_str(&format!("resync: {state}\n"));
        if let Some(peer) = &self.peer {
            out.push_str(&format!("peer: {peer}\n"));
        }
        if !matches!(self.state, ResyncState::Idle) {
            out.push_str(&format!("progress: {}\n", self.line()));
        }
        out.push_str(&format!(
            "remaining_bytes: {}\ncopied_bytes: {}\nrecopied_regions: {}\ncompleted: {}\nfull_copy: {}\n",
            self.remaining_bytes,
            self.copied_bytes,
            self.recopied_regions,
            self.completed,
            self.full_copy.as_deref().unwrap_or("no"),
        ));
        if self.resync_attempts > 0 {
            out.push_str(&format!(
                "this resync: {} attempt(s), {} dirty at its start, {} copied, {} region(s) recopied\n",
                self.resync_attempts,
                mib(self.resync_dirty_bytes_at_start),
                mib(self.resync_copied_bytes),
                self.resync_recopied_regions,
            ));
        }
        out
    }

    /// Reads the status a replica server published for `volume` in
    /// `pool` (`None`: none published yet).
    pub fn load(pool: &Path, volume: &str) -> std::io::Result<Option<Self>> {
        let path = pool.join(volume).join("resync-status.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Runs the resyncs of one replica server.
pub struct ResyncManager {
    config: ResyncConfig,
    secret: Secret,
    version: ProtocolVersion,
    pool_dir: PathBuf,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl ResyncManager {
    pub fn new(
        config: ResyncConfig,
        secret: Secret,
        version: ProtocolVersion,
        pool_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
        Arc::new(Self {
            config,
            secret,
            version,
            pool_dir: pool_dir.to_owned(),
            permits,
            metrics,
        })
    }

    /// Starts the supervisor of `volume`'s resync (once per open volume).
    pub fn watch(self: &Arc<Self>, volume: Arc<Volume>) {
        let me = self.clone();
        let span = tracing::info_span!("resync", volume = %volume.id());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut s = Supervisor::new(me, volume);
                s.run().await;
            },
            span,
        ));
    }
}

struct Supervisor {
    mgr: Arc<ResyncManager>,
    volume: Arc<Volume>,
    status: ResyncStatus,
    status_path: PathBuf,
    /// This replica's resync sessions on its peer, across attempts.
    generations: Arc<SessionCounter>,
    /// Why it last was no source (logged when it changes).
    not_source: Option<String>,
    /// A resync is under way (an attempt got to copying, none completed
    /// since): the `resync_*` figures of the status go on adding up.
    resync_open: bool,
}

impl Supervisor {
    fn new(mgr: Arc<ResyncManager>, volume: Arc<Volume>) -> Self {
        let status_path = mgr
            .pool_dir
            .join(volume.id().as_str())
            .join("resync-status.json");
        let status = ResyncStatus {
            volume: volume.id().to_string(),
            peer: None,
            state: ResyncState::Idle,
            full_copy: None,
            dirty_bytes_at_start: 0,
            copied_bytes: 0,
            attempt_copied_bytes: 0,
            remaining_bytes: volume.logs().bitmap().dirty_bytes(),
            recopied_regions: 0,
            resync_dirty_bytes_at_start: 0,
            resync_copied_bytes: 0,
            resync_attempts: 0,
            resync_recopied_regions: 0,
            elapsed_ms: 0,
            eta_ms: None,
            completed: 0,
            volume_failed: None,
        };
        Self {
            mgr,
            volume,
            status,
            status_path,
            generations: SessionCounter::new(),
            not_source: None,
            resync_open: false,
        }
    }

    fn set_state(&mut self, state: ResyncState) {
        if self.status.state != state {
            self.status.state = state;
            self.publish();
        }
    }

    /// Writes the status file and the metrics.
    fn publish(&mut self) {
        let m = &self.mgr.metrics;
        let vol = self.status.volume.as_str();
        let peer = self.status.peer.as_deref().unwrap_or("");
        m.set_resync(
            vol,
            peer,
            self.status.remaining_bytes,
            self.status.copied_bytes,
            resync_state_name(&self.status.state),
        );
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            let tmp = self.status_path.with_extension("json.tmp");
            let r =
                std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &self.status_path));
            if let Err(e) = r {
                tracing::debug!(error = %e, "cannot write the resync status file");
            }
        }
    }

    async fn run(&mut self) {
        let mut retry = Duration::from_millis(250);
        self.publish();
        loop {
            if let Some(f) = self.volume.failure() {
                // Its data may have lost acknowledged writes: it must not
                // be copied from. Until a restart.
                let why = f.to_string();
                tracing::error!(reason = %why, "resync stopped: this replica's copy failed");
                self.status.volume_failed = Some(why.clone());
                self.status.state = ResyncState::Failed { error: why };
                self.publish();
                return;
            }
            let logs = self.volume.logs().clone();
            let bitmap = logs.bitmap().clone();
            let peer = match bitmap.state() {
                BitmapState::Tracking { peer, .. } if bitmap.dirty_count() > 0 => peer,
                BitmapState::Tracking { .. } => {
                    if logs.peer_in_sync()
                        && let Err(e) = logs.stop_if_clean(self.volume.id().as_str()).await
                    {
                        tracing::error!(error = %crate::error_chain(&e), "cannot stop dirty tracking");
                    }
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                _ => {
                    self.set_state(ResyncState::Idle);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            self.status.peer = Some(peer.to_string());
            self.status.full_copy = logs.full_copy().map(|f| f.0);
            self.status.remaining_bytes = bitmap.dirty_bytes();
            // The record decides, not the tracking header alone.
            if let Err(why) = may_copy(self.volume.known().view().as_ref(), &peer) {
                if self.not_source.as_deref() != Some(why.as_str()) {
                    tracing::warn!(peer = %peer, reason = %why, dirty_bytes = bitmap.dirty_bytes(), "not a resync source: nothing is copied until the arbiter's record says so");
                    self.not_source = Some(why.clone());
                }
                self.set_state(ResyncState::Failed {
                    error: format!("not a resync source: {why}"),
                });
                tokio::time::sleep(POLL).await;
                continue;
            }
            self.not_source = None;
            self.set_state(ResyncState::Waiting);
            let Ok(_permit) = self.mgr.permits.clone().acquire_owned().await else {
                return;
            };
            match self.attempt(&peer).await {
                Ok(()) => {
                    retry = Duration::from_millis(250);
                    self.resync_open = false;
                    self.status.completed += 1;
                    self.status.eta_ms = Some(0);
                    self.set_state(ResyncState::Done);
                    tracing::info!(
                        copied_bytes = self.status.attempt_copied_bytes,
                        dirty_bytes_at_start = self.status.dirty_bytes_at_start,
                        recopied_regions = self.status.recopied_regions,
                        elapsed_ms = self.status.elapsed_ms,
                        resync_attempts = self.status.resync_attempts,
                        resync_dirty_bytes_at_start = self.status.resync_dirty_bytes_at_start,
                        resync_copied_bytes = self.status.resync_copied_bytes,
                        "{}; resync done: the peer may rejoin the in-sync set",
                        self.status.line()
                    );
                    self.publish();
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    tracing::warn!(peer = %peer, error = %error, retry_in = ?retry, "resync attempt failed");
                    self.set_state(ResyncState::Failed { error });
                    drop(_permit);
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// One attempt: connect, copy until nothing is dirty.
    async fn attempt(&mut self, peer: &ReplicaId) -> Result<(), ResyncError> {
        let spec = self
            .mgr
            .config
            .peers
            .iter()
            .find(|s| &s.id == peer)
            .cloned()
            .or_else(|| {
                let file = self.mgr.config.peers_file.as_deref()?;
                peer_from_file(file, peer)
            })
            .ok_or_else(|| ResyncError::NoPeerAddress { peer: peer.clone() })?;
        self.set_state(ResyncState::Connecting);
        let known = self
            .volume
            .known()
            .view()
            .ok_or_else(|| ResyncError::NotSource {
                reason: "no record known".to_owned(),
            })?;
        let claim = SyncClaim {
            source: known.me.clone(),
            target: peer.clone(),
            view: known.view.clone(),
        };
        let params = SessionParams {
            volume: VolumeId::clone(self.volume.id()),
            epoch: self.volume.epoch(),
            secret: self.mgr.secret.clone(),
            protocol_version: self.mgr.version,
            kind: SessionKind::Resync,
            generations: self.generations.clone(),
            claim: Some(claim),
        };
        let handles = self
            .mgr
            .metrics
            .handles(self.volume.id().as_str(), peer.as_str());
        let handle = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            ReplicaHandle::connect(spec, params, handles),
        )
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(ConnectError::OpenRefused {
                source:
                    WireError::NotSource {
                        known: theirs,
                        reason,
                    },
                ..
            })) => {
                return Err(self.refused(&known, theirs, reason).await);
            }
            Ok(Err(source)) => {
                return Err(ResyncError::Connect {
                    peer: peer.clone(),
                    source,
                });
            }
            Err(_) => {
                return Err(ResyncError::Timeout {
                    peer: peer.clone(),
                    timeout: CONNECT_TIMEOUT,
                });
            }
        };
        // A peer that missed a resize (it was out of the in-sync set, or
        // crashed before committing it) is grown before anything is copied
        // to it: the regions past its old end may be dirty here. A larger
        // peer (a resize that did not complete here) is copied to as it is.
        let size = self.volume.size();
        if handle.size() < size {
            tracing::info!(volume = %self.volume.id(), %peer, peer_size = handle.size(), size, "peer is smaller than this copy: growing it before the resync");
            match handle.call(Op::Resize { size }).await {
                Ok(_) => handle.set_size(size),
                Err(CallError::Refused {
                    source: WireError::ResizeRefused { .. },
                    ..
                }) => {
                    return Err(ResyncError::SizeMismatch {
                        peer: peer.clone(),
                        peer_size: handle.size(),
                        size,
                    });
                }
                Err(source) => {
                    return Err(ResyncError::Peer {
                        peer: peer.clone(),
                        source,
                    });
                }
            }
        }
        // A recreated peer (another copy of the volume under the same
        // name) holds none of what its predecessor held: copy everything.
        let (seen, tracked) = (handle.incarnation(), self.volume.peer_incarnation());
        if tracked != 0 && seen != 0 && seen != tracked {
            let why = format!(
                "replica {peer} was recreated (it answers as copy {seen:016x}; the copy that left the in-sync set was {tracked:016x})"
            );
            self.volume
                .logs()
                .peer_replaced(self.volume.id().as_str(), peer.clone(), why.clone())
                .await?;
            self.volume
                .set_peer_incarnation(seen)
                .await
                .map_err(ResyncError::Meta)?;
            self.status.full_copy = Some(why);
        }
        let bitmap = self.volume.logs().bitmap().clone();
        self.status.dirty_bytes_at_start = bitmap.dirty_bytes();
        if !self.resync_open {
            self.resync_open = true;
            self.status.resync_dirty_bytes_at_start = self.status.dirty_bytes_at_start;
            self.status.resync_copied_bytes = 0;
            self.status.resync_attempts = 0;
            self.status.resync_recopied_regions = 0;
        }
        self.status.resync_attempts += 1;
        self.status.attempt_copied_bytes = 0;
        self.status.remaining_bytes = self.status.dirty_bytes_at_start;
        tracing::info!(
            peer = %peer,
            epoch = self.volume.epoch().0,
            dirty_bytes = self.status.dirty_bytes_at_start,
            dirty_regions = bitmap.dirty_count(),
            full_copy = self.status.full_copy.as_deref().unwrap_or("no"),
            "resync started"
        );
        self.set_state(ResyncState::Copying);
        let mut copy = Copy {
            handle,
            peer: peer.clone(),
            fences_applied: None,
            view_seen: self.volume.known().view_changes(),
        };
        let mut r = self.copy_all(&mut copy).await;
        if let Err(ResyncError::Peer {
            source:
                CallError::Refused {
                    source:
                        WireError::NotSource {
                            known: theirs,
                            reason,
                        },
                    ..
                },
            ..
        }) = &r
        {
            let (theirs, reason) = (theirs.clone(), reason.clone());
            r = Err(self.refused(&known, theirs, reason).await);
        }
        if r.is_err() {
            // Abort the connection: a copy given up on must not land on
            // the peer later, over a newer one (the next attempt's session
            // fences this one's there anyway).
            copy.handle.reset();
        }
        r
    }

    /// The peer refused this replica as a source, knowing `theirs`: learn
    /// it (a newer record that lists this replica out ends its tracking).
    async fn refused(&self, mine: &StoredView, theirs: SyncView, reason: String) -> ResyncError {
        let learned = StoredView {
            me: mine.me.clone(),
            peer: mine.peer.clone(),
            view: theirs,
        };
        if let Err(e) = self.volume.learn_view(learned).await {
            tracing::warn!(error = %e, "cannot store the record the peer knows");
        }
        ResyncError::NotSource {
            reason: format!("the peer refused the copy: {reason}"),
        }
    }

    /// Has the peer fence the frontend's sessions to it that the frontend
    /// gave up on, if a newer floor is known than the one applied.
    async fn apply_fence(&self, copy: &mut Copy) -> Result<(), ResyncError> {
        let known = self.volume.known();
        let changes = known.fence_changes();
        if copy.fences_applied == Some(changes) {
            return Ok(());
        }
        if let Some(f) = known.peer_fence()
            && f.epoch == self.volume.epoch()
        {
            copy.call(Op::FenceSessions {
                kind: SessionKind::Frontend,
                below: f.below,
            })
            .await?;
            tracing::info!(peer = %copy.peer, below = f.below.0, "the frontend's given-up sessions fenced on the peer");
        }
        copy.fences_applied = Some(changes);
        Ok(())
    }

    /// Before a batch: still a source per the record, and the peer fenced
    /// what the frontend gave up on.
    async fn before_batch(&self, copy: &mut Copy) -> Result<(), ResyncError> {
        let changes = self.volume.known().view_changes();
        if changes != copy.view_seen {
            may_copy(self.volume.known().view().as_ref(), &copy.peer)
                .map_err(|reason| ResyncError::NotSource { reason })?;
            copy.view_seen = changes;
        }
        self.apply_fence(copy).await
    }

    async fn copy_all(&mut self, copy: &mut Copy) -> Result<(), ResyncError> {
        let bitmap = self.volume.logs().bitmap().clone();
        let geometry = bitmap.geometry();
        let started = Instant::now();
        let mut last_persist = Instant::now();
        let mut last_status = Instant::now();
        let mut cursor = RegionIndex(0);
        let mut backoff = Duration::ZERO;
        let mut writes_seen = self.volume.writes_done();
        let mut pending: Vec<crate::bitmap::CopyGuard> = Vec::new();
        let mut last_flush = Instant::now();
        loop {
            let mut batch = Vec::with_capacity(BATCH_REGIONS);
            while batch.len() < BATCH_REGIONS {
                let Some(r) = bitmap.next_dirty(cursor) else {
                    break;
                };
                cursor = RegionIndex(r.0 + 1);
                if let Some(g) = bitmap.begin_copy(r)? {
                    batch.push(g);
                }
            }
            if batch.is_empty() {
                if !pending.is_empty() {
                    // Copies not flushed yet keep their bits: flush them
                    // before looking again.
                    self.flush_pending(copy, &mut pending).await?;
                    last_flush = Instant::now();
                    continue;
                }
                if bitmap.dirty_count() == 0 {
                    bitmap.persist().await?;
                    self.progress(&bitmap, started);
                    return Ok(());
                }
                // Regions dirtied again behind the cursor: another pass.
                cursor = RegionIndex(0);
                continue;
            }
            // After the batch's copies began (so a floor learned before
            // the writes they copy is applied before they land).
            self.before_batch(copy).await?;
            let batch_started = Instant::now();
            let mut bytes = 0;
            let mut writes = Vec::new();
            for g in &batch {
                let range = geometry.byte_range(g.region());
                let mut off = range.start;
                while off < range.end {
                    let len = (range.end - off).min(u64::from(MAX_IO_BYTES));
                    let v = self.volume.clone();
                    let data = tokio::task::spawn_blocking(move || {
                        let mut buf = BytesMut::zeroed(len as usize);
                        v.read_local(&mut buf, off).map(|()| buf.freeze())
                    })
                    .await
                    .map_err(|e| {
                        ResyncError::LocalRead(StorageError {
                            op: "blocking task",
                            target: String::new(),
                            offset: off,
                            source: std::io::Error::other(e.to_string()),
                        })
                    })?
                    .map_err(ResyncError::LocalRead)?;
                    writes.push(copy.call(Op::Write {
                        offset: off,
                        fua: false,
                        mirrored: false,
                        data,
                    }));
                    bytes += len;
                    off += len;
                }
            }
            for r in futures::future::join_all(writes).await {
                r?;
            }
            // One peer flush for many batches: a bit is cleared only once
            // the flush covering its copy is done.
            pending.extend(batch);
            if pending.len() >= FLUSH_REGIONS || last_flush.elapsed() >= FLUSH_EVERY {
                self.flush_pending(copy, &mut pending).await?;
                last_flush = Instant::now();
            }
            self.status.copied_bytes += bytes;
            self.status.resync_copied_bytes += bytes;
            self.status.attempt_copied_bytes += bytes;
            self.volume.note_resync_copied(bytes);
            if last_persist.elapsed() >= PERSIST_EVERY {
                bitmap.persist().await?;
                last_persist = Instant::now();
            }
            if last_status.elapsed() >= self.mgr.config.status_interval {
                self.progress(&bitmap, started);
                tracing::info!("{}", self.status.line());
                last_status = Instant::now();
            }
            // Throttle: the rate limit...
            if let Some(rate) = self.mgr.config.rate_limit.filter(|r| *r > 0) {
                let due =
                    Duration::from_secs_f64(self.status.attempt_copied_bytes as f64 / rate as f64);
                let spent = started.elapsed();
                if due > spent {
                    tokio::time::sleep(due - spent).await;
                }
            }
            // ...and foreground writes that got slow.
            let writes_now = self.volume.writes_done();
            let busy = writes_now != writes_seen;
            writes_seen = writes_now;
            let slow = Duration::from_micros(self.volume.write_latency_us())
                > self.mgr.config.latency_target;
            backoff = next_backoff(backoff, busy, slow);
            let pause = backoff.max(busy_pause(busy, batch_started.elapsed()));
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Flushes the peer, then finishes the copies it made durable (a copy a
    /// write overlapped keeps its bit and goes again).
    async fn flush_pending(
        &mut self,
        copy: &Copy,
        pending: &mut Vec<crate::bitmap::CopyGuard>,
    ) -> Result<(), ResyncError> {
        copy.call(Op::Flush).await?;
        for g in pending.drain(..) {
            if !g.finish() {
                self.status.recopied_regions += 1;
                self.status.resync_recopied_regions += 1;
            }
        }
        Ok(())
    }

    fn progress(&mut self, bitmap: &crate::bitmap::Bitmap, started: Instant) {
        let elapsed = started.elapsed();
        self.status.remaining_bytes = bitmap.dirty_bytes();
        self.status.elapsed_ms = elapsed.as_millis() as u64;
        let done = self.status.attempt_copied_bytes;
        self.status.eta_ms = (done > 0).then(|| {
            let per_byte = elapsed.as_secs_f64() / done as f64;
            (per_byte * self.status.remaining_bytes as f64 * 1000.0) as u64
        });
        self.publish();
    }
}

/// The connection to the peer, with deadlines on every request.
struct Copy {
    handle: ReplicaHandle,
    peer: ReplicaId,
    /// The volume's fence-change count last applied on the peer.
    fences_applied: Option<u64>,
    /// The volume's view-change count last checked.
    view_seen: u64,
}

impl Copy {
    async fn call(&self, op: Op) -> Result<(), ResyncError> {
        // The client reconnects and holds requests while the peer is away;
        // the resync rather fails at once and retries from the bitmap.
        let mut state = self.handle.watch_state();
        let lost = async {
            loop {
                let s = *state.borrow_and_update();
                if matches!(s, ReplicaState::Disconnected | ReplicaState::Fenced) {
                    return s;
                }
                if state.changed().await.is_err() {
                    return ReplicaState::Disconnected;
                }
            }
        };
        let answered = tokio::select! {
            r = tokio::time::timeout(PEER_IO_TIMEOUT, self.handle.call(op)) => r,
            s = lost => {
                return Err(ResyncError::PeerLost {
                    peer: self.peer.clone(),
                    state: s.name(),
                });
            }
        };
        match answered {
            Ok(Ok(Reply::Done)) => Ok(()),
            Ok(Ok(_)) => Err(ResyncError::Peer {
                peer: self.peer.clone(),
                source: CallError::UnexpectedReply {
                    replica: self.peer.clone(),
                    op: "write",
                },
            }),
            Ok(Err(source)) => Err(ResyncError::Peer {
                peer: self.peer.clone(),
                source,
            }),
            Err(_) => Err(ResyncError::Timeout {
                peer: self.peer.clone(),
                timeout: PEER_IO_TIMEOUT,
            }),
        }
    }
}

/// While foreground writes happen, the copy yields the disk most of the
/// time: after a batch that took `took`, it pauses `BUSY_YIELD` times as
/// long (at most a second), so that it uses about a twentieth of the time
/// the volume is busy and the foreground's tail latency stays near idle (a
/// write that updates the activity log waits for a sync, which a copy's
/// disk traffic slows down). An idle volume is copied at full speed.
fn busy_pause(busy: bool, took: Duration) -> Duration {
    if busy {
        (took * BUSY_YIELD).min(MAX_BACKOFF)
    } else {
        Duration::ZERO
    }
}

/// The pause after a batch: doubling (10 ms .. 1 s) while foreground
/// writes happen and are slower than the target, none otherwise.
fn next_backoff(prev: Duration, busy: bool, slow: bool) -> Duration {
    if busy && slow {
        (prev * 2).clamp(Duration::from_millis(10), MAX_BACKOFF)
    } else {
        Duration::ZERO
    }
}

fn resync_state_name(s: &ResyncState) -> &'static str {
    match s {
        ResyncState::Idle => "idle",
        ResyncState::Waiting => "waiting",
        ResyncState::Connecting => "connecting",
        ResyncState::Copying => "copying",
        ResyncState::Done => "done",
        ResyncState::Failed { .. } => "failed",
    }
}

/// All state names, for the state gauge.
pub const STATE_NAMES: [&str; 6] = ["idle", "waiting", "connecting", "copying", "done", "failed"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_address_is_read_from_the_peers_file_at_each_lookup() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("peers");
        let b = ReplicaId::new("room-b").expect("valid id");
        assert!(peer_from_file(&file, &b).is_none(), "no file, no peer");
        std::fs::write(&file, "room-a=10.0.0.1:7000\nroom-b=10.0.0.2:7001\n").expect("write");
        assert_eq!(
            peer_from_file(&file, &b).map(|s| s.addr),
            Some("10.0.0.2:7001".to_owned())
        );
        std::fs::write(&file, "room-b=10.0.0.3:7002\n").expect("write");
        assert_eq!(
            peer_from_file(&file, &b).map(|s| s.addr),
            Some("10.0.0.3:7002".to_owned()),
            "a moved peer is found at its new address"
        );
        std::fs::write(&file, "room-b=\n").expect("write");
        assert!(
            peer_from_file(&file, &b).is_none(),
            "an empty address is none"
        );
    }

    #[test]
    fn status_line_shows_progress_eta_and_why_a_full_copy() {
        let mut s = ResyncStatus {
            volume: "v1".into(),
            peer: Some("b".into()),
            state: ResyncState::Copying,
            full_copy: None,
            dirty_bytes_at_start: 40 << 20,
            copied_bytes: 25 << 19,
            attempt_copied_bytes: 25 << 19,
            remaining_bytes: (40 << 20) - (25 << 19),
            recopied_regions: 0,
            resync_dirty_bytes_at_start: 0,
            resync_copied_bytes: 0,
            resync_attempts: 0,
            resync_recopied_regions: 0,
            elapsed_ms: 1000,
            eta_ms: Some(2200),
            completed: 0,
            volume_failed: None,
        };
        assert_eq!(s.line(), "resync v1 → b: 12.5 MiB / 40.0 MiB, 31%, ETA 3 s");
        s.full_copy = Some("dirty bitmap untrusted: a write of the bitmap failed earlier".into());
        s.eta_ms = None;
        assert!(s.line().ends_with(
            "ETA ? (full copy: dirty bitmap untrusted: a write of the bitmap failed earlier)"
        ));
    }

    #[test]
    fn the_printed_status_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("v1")).expect("dir");
        assert!(
            ResyncStatus::load(dir.path(), "v1")
                .expect("load")
                .is_none()
        );
        let s = ResyncStatus {
            volume: "v1".into(),
            peer: Some("a".into()),
            state: ResyncState::Copying,
            full_copy: Some("dirty bitmap untrusted: torn block".into()),
            dirty_bytes_at_start: 4 << 20,
            copied_bytes: 1 << 20,
            attempt_copied_bytes: 1 << 20,
            remaining_bytes: 3 << 20,
            recopied_regions: 2,
            resync_dirty_bytes_at_start: 0,
            resync_copied_bytes: 0,
            resync_attempts: 0,
            resync_recopied_regions: 0,
            elapsed_ms: 500,
            eta_ms: Some(1500),
            completed: 0,
            volume_failed: None,
        };
        std::fs::write(
            dir.path().join("v1/resync-status.json"),
            serde_json::to_vec(&s).expect("json"),
        )
        .expect("write");
        let back = ResyncStatus::load(dir.path(), "v1")
            .expect("load")
            .expect("some");
        let text = back.summary();
        for want in [
            "resync: copying\n",
            "peer: a\n",
            "progress: resync v1 → a: 1.0 MiB / 4.0 MiB, 25%, ETA 2 s",
            "remaining_bytes: 3145728\n",
            "full_copy: dirty bitmap untrusted: torn block\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }

    #[test]
    fn backs_off_only_while_foreground_writes_are_slow() {
        let ms = Duration::from_millis;
        assert_eq!(next_backoff(Duration::ZERO, true, true), ms(10));
        assert_eq!(next_backoff(ms(10), true, true), ms(20));
        assert_eq!(next_backoff(ms(800), true, true), MAX_BACKOFF);
        // Idle volume (a stale slow average) or fast writes: full speed.
        assert_eq!(next_backoff(ms(800), false, true), Duration::ZERO);
        assert_eq!(next_backoff(ms(800), true, false), Duration::ZERO);
    }

    #[test]
    fn yields_to_a_busy_volume_only() {
        let ms = Duration::from_millis;
        assert_eq!(busy_pause(false, ms(10)), Duration::ZERO);
        assert_eq!(busy_pause(true, ms(10)), ms(190));
        assert_eq!(busy_pause(true, ms(900)), MAX_BACKOFF);
    }

    #[test]
    fn status_serialises_its_state_flat() {
        let s = ResyncStatus {
            volume: "v1".into(),
            peer: None,
            state: ResyncState::Failed {
                error: "no address".into(),
            },
            full_copy: None,
            dirty_bytes_at_start: 0,
            copied_bytes: 0,
            attempt_copied_bytes: 0,
            remaining_bytes: 0,
            recopied_regions: 0,
            resync_dirty_bytes_at_start: 0,
            resync_copied_bytes: 0,
            resync_attempts: 0,
            resync_recopied_regions: 0,
            elapsed_ms: 0,
            eta_ms: None,
            completed: 0,
            volume_failed: None,
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "no address");
    }
}
