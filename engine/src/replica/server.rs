//! The replica server: accepts connections, authenticates them, and serves
//! requests on the volumes of its pool.
//!
//! One task per connection owns that connection's state (`ConnState`):
//! it reads frames, handles `Open` itself (in order, before anything else on
//! the connection; the connection then belongs to the session it opened,
//! and every later request is checked against that session), and hands
//! data requests to the blocking pool — a
//! pipelined burst already in its buffer as one job, executed in order —
//! bounded by a semaphore of [`MAX_IN_FLIGHT`] permits, so that requests
//! run concurrently (pipelining) with few thread wake-ups. Responses go through a channel to a writer
//! task that owns the socket's write half and batches them into as few
//! writes as it can. Nothing holds a lock across an await or a disk write.
//!
//! Bursts run concurrently, so two writes of one connection in different
//! bursts could reach the disk in either order; a burst whose writes
//! (trims, write-zeroes) overlap those of a burst still running waits for
//! it first (`Running`): overlapping writes of one connection land in the
//! order they were sent (the mirror never sends overlapping writes at
//! once, but the protocol does not rely on it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, Semaphore, mpsc};
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::protocol::{
    Epoch, FrameReader, FrameWriter, Message, Op, ProtocolVersion, Request, RequestId, Response,
    Role, Secret, VolumeId, WireError, handshake,
};

use crate::resync::{ResyncConfig, ResyncManager};
use crate::storage::{FileStorage, Storage};

use super::direction::SyncRole;
use super::logs::VolumeLogs;
use super::pool::{Pool, PoolError};
use super::sessions::SessionGate;
use super::volume::{PeerChange, Volume};

/// Requests of one connection being executed at once.
pub const MAX_IN_FLIGHT: usize = 512;
/// Most requests of a pipelined burst executed by one blocking job, in
/// order (fewer thread wake-ups; bursts larger than this run in parallel).
const MAX_BATCH: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a replica server is set up.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub pool: PathBuf,
    pub listen: SocketAddr,
    pub secret: Secret,
    /// Normally [`crate::protocol::PROTOCOL_VERSION`].
    pub protocol_version: ProtocolVersion,
}

/// Why the replica server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting connections failed")]
    Accept(#[source] std::io::Error),
}

/// Shared by all connections of one server.
struct Shared {
    pool: Pool,
    secret: Secret,
    version: ProtocolVersion,
    metrics: Arc<Metrics>,
    resync: Arc<ResyncManager>,
    /// Volumes opened so far; never removed (a replica serves few volumes,
    /// and one `Volume` per volume is what makes its epoch gate and its
    /// logs unique). A cell per volume so that concurrent first opens
    /// open the files once, without a lock held across the open.
    volumes: Mutex<HashMap<VolumeId, Arc<OnceCell<Arc<Volume>>>>>,
    /// Storage faults applied to every volume opened (tests only).
    #[cfg(feature = "failpoints")]
    faults: Option<Arc<crate::storage::StorageFaults>>,
}

/// A bound replica server.
pub struct ReplicaServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ReplicaServer {
    /// Checks the pool and binds the listener; no peer addresses, so no
    /// resync (see [`ReplicaServer::bind_with_resync`]).
    pub async fn bind(config: ReplicaConfig, metrics: Arc<Metrics>) -> Result<Self, ReplicaError> {
        Self::bind_with_resync(config, ResyncConfig::default(), metrics).await
    }

    /// Checks the pool and binds the listener; resyncs peers as `resync`
    /// says.
    pub async fn bind_with_resync(
        config: ReplicaConfig,
        resync: ResyncConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ReplicaError> {
        let pool = Pool::open(&config.pool)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ReplicaError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ReplicaError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self {
            listener,
            addr,
            shared: Arc::new(Shared {
                resync: ResyncManager::new(
                    resync,
                    config.secret.clone(),
                    config.protocol_version,
                    pool.dir(),
                    metrics.clone(),
                ),
                pool,
                secret: config.secret,
                version: config.protocol_version,
                metrics,
                volumes: Mutex::new(HashMap::new()),
                #[cfg(feature = "failpoints")]
                faults: crate::storage::process_faults(),
            }),
        })
    }

    /// Applies `faults` to every volume this server opens (instead of the
    /// process's, [`crate::storage::install_process_faults`]). Before
    /// [`ReplicaServer::run`]; ignored once the server is shared.
    #[cfg(feature = "failpoints")]
    pub fn with_storage_faults(mut self, faults: Arc<crate::storage::StorageFaults>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.faults = Some(faults);
        }
        self
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the task is dropped.
    pub async fn run(self) -> Result<(), ReplicaError> {
        tracing::info!(pool = %self.shared.pool.dir().display(), addr = %self.addr, "replica serving");
        // Open every volume now, so that a resync interrupted by a crash
        // resumes without waiting for a frontend.
        match self.shared.pool.volumes() {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = volume_handle(&self.shared, &id).await {
                        tracing::warn!(volume = %id, error = %e, "cannot open volume at startup");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot list the pool's volumes")
            }
        }
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                // Per-connection errors (aborted handshakes, fd limits):
                // log and keep serving.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(ReplicaError::Accept(e)),
            };
            let shared = self.shared.clone();
            let span = tracing::info_span!("connection", %peer, volume = tracing::field::Empty);
            tokio::spawn(
                async move {
                    shared.metrics.connections().inc();
                    serve_connection(stream, &shared).await;
                    shared.metrics.connections().dec();
                }
                .instrument(span),
            );
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Where a connection is in its life after the handshake.
enum ConnState {
    /// Authenticated; waiting for `Open`.
    AwaitingOpen,
    /// Bound to a volume at an epoch, as a session.
    Open(Arc<Volume>, Arc<SessionGate>),
}

async fn serve_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let hs = handshake(
        &mut reader,
        &mut writer,
        Role::Replica,
        shared.version,
        &shared.secret,
    );
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await {
        Ok(Ok(())) => tracing::debug!("handshake done"),
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "refused connection");
            return;
        }
        Err(_) => {
            tracing::warn!("refused connection: handshake timed out");
            return;
        }
    }

    let (resp_tx, resp_rx) = mpsc::channel::<Response>(MAX_IN_FLIGHT * 2);
    let writer_task = tokio::spawn(write_responses(writer, resp_rx));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut state = ConnState::AwaitingOpen;

    let mut batch: Vec<(RequestId, Epoch, Op)> = Vec::new();
    let mut running = Running::default();
    'conn: loop {
        let mut next = match reader.read_message().await {
            Ok(Some(m)) => Some(m),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "closing connection");
                break;
            }
        };
        // Take every request already buffered (a pipelined burst) before
        // handing the data requests to the blocking pool together.
        while let Some(msg) = next.take() {
            let Message::Request(Request { id, epoch, op }) = msg else {
                tracing::warn!("closing connection: peer sent a non-request after the handshake");
                break 'conn;
            };
            let early = match (&state, op) {
                (
                    ConnState::AwaitingOpen,
                    Op::Open {
                        volume,
                        expected_size,
                        session,
                        claim,
                    },
                ) => {
                    tracing::Span::current().record("volume", volume.as_str());
                    let resync_from = claim.as_ref().map(|c| c.source.clone());
                    let result = match volume_handle(shared, &volume).await {
                        Ok(v) => {
                            let r = v.open(epoch, expected_size, session, claim).await;
                            match r {
                                Ok((reply, gate)) => {
                                    tracing::info!(
                                        epoch = epoch.0,
                                        session = %session.kind,
                                        generation = session.generation.0,
                                        resync_from = ?resync_from.as_ref().map(|r| r.as_str()),
                                        "volume opened"
                                    );
                                    state = ConnState::Open(v, gate);
                                    Ok(reply)
                                }
                                Err(e) => {
                                    tracing::warn!(epoch = epoch.0, session = %session.kind, generation = session.generation.0, error = %e, "open refused");
                                    Err(e)
                                }
                            }
                        }
                        Err(e) => Err(e),
                    };
                    Some(result)
                }
                (ConnState::Open(..), Op::Open { .. }) => Some(Err(WireError::AlreadyOpen)),
                // In order with the connection's requests: the frontend sends
                // it with no write in flight and waits for the answer.
                (
                    ConnState::Open(v, gate),
                    Op::PeerState {
                        you,
                        peer,
                        view,
                        peer_incarnation,
                        fence,
                    },
                ) => {
                    let change = PeerChange {
                        you,
                        peer,
                        view,
                        peer_incarnation,
                        fence,
                    };
                    Some(v.peer_state(epoch, gate, change).await)
                }
                (ConnState::Open(v, gate), Op::FenceSessions { kind, below }) => {
                    Some(v.fence_sessions(epoch, gate, kind, below).await)
                }
                // In order too: the frontend sends it with no write in
                // flight on the connection and waits for the answer.
                (ConnState::Open(v, gate), Op::Resize { size }) => {
                    Some(v.resize(epoch, gate, size).await)
                }
                (ConnState::AwaitingOpen, _) => Some(Err(WireError::NotOpen)),
                (ConnState::Open(..), op) => {
                    batch.push((id, epoch, op));
                    None
                }
            };
            if let Some(result) = early
                && resp_tx.send(Response { id, result }).await.is_err()
            {
                break 'conn;
            }
            if batch.len() < MAX_BATCH {
                next = match reader.try_buffered() {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "closing connection");
                        break 'conn;
                    }
                };
            }
        }
        if let (ConnState::Open(volume, session), false) = (&state, batch.is_empty()) {
            let jobs = std::mem::take(&mut batch);
            let writes = write_ranges(&jobs);
            running.wait_for_overlaps(&writes).await;
            let Ok(permit) = permits.clone().acquire_many_owned(jobs.len() as u32).await else {
                break;
            };
            let volume = volume.clone();
            let session = session.clone();
            let tx = resp_tx.clone();
            let span = tracing::Span::current();
            // One hop to the blocking pool per burst: the disk I/O and the
            // hand-off of each response to the writer task happen there.
            let job = tokio::task::spawn_blocking(move || {
                for (id, epoch, op) in jobs {
                    let result = volume.execute_blocking(epoch, &session, op);
                    if let Err(e) = &result {
                        span.in_scope(|| log_refusal(e));
                    }
                    let _ = tx.blocking_send(Response { id, result });
                }
                drop(permit);
            });
            running.push(writes, job);
        }
    }
    drop(resp_tx);
    // In-flight requests finish (they hold senders); then the writer ends.
    let _ = writer_task.await;
    tracing::debug!("connection closed");
}

/// The byte ranges `[start, end)` a burst's requests change.
fn write_ranges(jobs: &[(RequestId, Epoch, Op)]) -> Ranges {
    jobs.iter()
        .filter_map(|(_, _, op)| match op {
            Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                Some((*offset, u64::from(*len)))
            }
            _ => None,
        })
        .map(|(o, l)| (o, o.saturating_add(l)))
        .collect()
}

/// Byte ranges `[start, end)`.
type Ranges = Vec<(u64, u64)>;

/// The bursts of one connection that change data and may still run, with
/// the ranges they change.
#[derive(Default)]
struct Running {
    bursts: Vec<(Ranges, tokio::task::JoinHandle<()>)>,
}

impl Running {
    /// Waits for every running burst that changes bytes `writes` change.
    async fn wait_for_overlaps(&mut self, writes: &[(u64, u64)]) {
        self.bursts.retain(|(_, job)| !job.is_finished());
        if writes.is_empty() {
            return;
        }
        let overlaps = |theirs: &[(u64, u64)]| {
            theirs
                .iter()
                .any(|&(s, e)| writes.iter().any(|&(ws, we)| ws < e && s < we))
        };
        let mut i = 0;
        while i < self.bursts.len() {
            if overlaps(&self.bursts[i].0) {
                let (_, job) = self.bursts.swap_remove(i);
                // A burst that panicked has ended too.
                let _ = job.await;
            } else {
                i += 1;
            }
        }
    }

    fn push(&mut self, writes: Ranges, job: tokio::task::JoinHandle<()>) {
        if !writes.is_empty() {
            self.bursts.push((writes, job));
        }
    }
}

fn log_refusal(e: &WireError) {
    match e {
        WireError::StaleEpoch { .. }
        | WireError::EpochNotOpened { .. }
        | WireError::StaleSession { .. }
        | WireError::NotSource { .. } => {
            tracing::warn!(error = %e, "request refused");
        }
        WireError::Io { .. } => {} // logged where it happened
        _ => tracing::debug!(error = %e, "request refused"),
    }
}

async fn write_responses(
    mut writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Response>,
) {
    while let Some(resp) = rx.recv().await {
        if writer
            .write_message(&Message::Response(resp))
            .await
            .is_err()
        {
            return;
        }
        // Batch whatever else is ready into the same flush.
        while let Ok(resp) = rx.try_recv() {
            if writer
                .write_message(&Message::Response(resp))
                .await
                .is_err()
            {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// The shared `Volume` for `id`, opening its files on first use.
async fn volume_handle(shared: &Arc<Shared>, id: &VolumeId) -> Result<Arc<Volume>, WireError> {
    let cell = lock(&shared.volumes).entry(id.clone()).or_default().clone();
    cell.get_or_try_init(|| open_volume(shared, id))
        .await
        .cloned()
}

async fn open_volume(shared: &Arc<Shared>, id: &VolumeId) -> Result<Arc<Volume>, WireError> {
    let pool = shared.pool.clone();
    let vid = id.clone();
    let opened = tokio::task::spawn_blocking(move || pool.open_volume(&vid))
        .await
        .map_err(|e| WireError::Io {
            message: e.to_string(),
        })?;
    let opened = match opened {
        Ok(o) => o,
        Err(PoolError::NoSuchVolume { .. }) => {
            return Err(WireError::NoSuchVolume { volume: id.clone() });
        }
        Err(e) => {
            let message = crate::error_chain(&e);
            tracing::error!(error = %message, "cannot open volume");
            return Err(WireError::Io { message });
        }
    };
    let files = VolumeFiles::wrap(
        shared,
        opened.data,
        opened.meta_storage,
        opened.bitmap_storage,
    );
    let meta_storage = files.meta;
    let sync = crate::data_sync::DataSync::new(id.as_str(), files.data.clone());
    let role = SyncRole::of(opened.meta.view.as_ref());
    let logs = VolumeLogs::open_as(
        id.as_str(),
        opened.meta.size,
        meta_storage.clone(),
        files.bitmap,
        sync.clone(),
        role,
    )
    .await
    .map_err(|e| {
        let message = crate::error_chain(&e);
        tracing::error!(volume = %id, error = %message, "cannot open the volume's activity log or dirty bitmap");
        WireError::Io { message }
    })?;
    let volume = Volume::start(
        files.data,
        sync,
        meta_storage,
        opened.meta,
        logs,
        shared.metrics.handles(id.as_str(), ""),
    );
    shared.resync.watch(volume.clone());
    Ok(volume)
}

/// The storages of one open volume, wrapped by the server's storage faults
/// if it has any.
struct VolumeFiles {
    data: Arc<dyn Storage>,
    meta: Arc<dyn Storage>,
    bitmap: Arc<dyn Storage>,
}

impl VolumeFiles {
    #[cfg(feature = "failpoints")]
    fn wrap(shared: &Shared, data: FileStorage, meta: FileStorage, bitmap: FileStorage) -> Self {
        match &shared.faults {
            Some(f) => Self {
                data: f.wrap("data", data),
                meta: f.wrap("meta", meta),
                bitmap: f.wrap("bitmap", bitmap),
            },
            None => Self::plain(data, meta, bitmap),
        }
    }

    #[cfg(not(feature = "failpoints"))]
    fn wrap(_: &Shared, data: FileStorage, meta: FileStorage, bitmap: FileStorage) -> Self {
        Self::plain(data, meta, bitmap)
    }

    fn plain(data: FileStorage, meta: FileStorage, bitmap: FileStorage) -> Self {
        Self {
            data: Arc::new(data),
            meta: Arc::new(meta),
            bitmap: Arc::new(bitmap),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent
    // (single inserts), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
