//! The frontend's connection to one replica: a task that owns the socket
//! and the table of requests in flight; the mirror talks to it through a
//! channel, each request carrying a oneshot for its reply.
//!
//! Shape (as crucible's upstairs: one owner, no shared locks):
//! - the owner task writes requests, batching whatever is queued into one
//!   flush; before writing a request it registers the request's reply slot
//!   with the session's completer;
//! - the completer task owns the read half and the table of requests in
//!   flight: it matches each response to its request by [`RequestId`] and
//!   answers the caller directly. Reading never waits for writing, so full
//!   socket buffers in both directions cannot deadlock;
//! - at most [`MAX_IN_FLIGHT`] requests are in flight (a semaphore whose
//!   permits travel with the requests);
//! - the explicit [`ReplicaState`] is published on a `watch` channel for the
//!   mirror and the metrics.
//!
//! When the connection breaks, requests in flight fail (the mirror reports
//! the error), the state becomes `Disconnected`, and the owner reconnects
//! with backoff, logging each failed attempt; meanwhile new requests wait
//! in the channel (I/O waits). A request whose caller gave up on it (the
//! mirror's deadline passed while it waited) is never sent: a write the
//! mirror re-sent elsewhere must not land here later, over a newer copy
//! from the resync.
//!
//! Every connection is a *session* of its client (`Open` carries its kind
//! and a generation from the client's [`SessionCounter`]); the replica
//! fences a client's older sessions when a newer one opens, and refuses
//! their requests from then on. [`ReplicaHandle::give_up`] abandons every
//! session handed out so far and returns the floor below which they lie:
//! the owner aborts the current connection at once — even while it is
//! blocked writing into a socket whose link is down (the write is raced
//! against the abandonment) — with an RST (zero linger: the kernel drops
//! the socket's queue instead of retransmitting it), fails what waits, and
//! never uses a session below the floor. Since an RST sent while a link is
//! down is lost, and a segment already in flight may still arrive, the
//! floor is what makes it safe: the mirror tells the surviving replica,
//! whose resync fences this client's sessions below it on the replica
//! before copying anything (see `replica::sessions`). A replica that
//! answers with a newer epoch fences this frontend for good (`Fenced`).
//! Degraded operation — dropping the replica from the in-sync set through
//! the arbiter — is the mirror's (`frontend::failover`): it times calls
//! out and reports the loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

use crate::metrics::{IoOp, OpHandles};
use crate::protocol::{
    Epoch, FrameError, FrameReader, FrameWriter, HandshakeError, Message, Op, ProtocolVersion,
    ReplicaId, Reply, Request, RequestId, Response, Role, Secret, Session, SessionGen, SessionKind,
    SyncClaim, VolumeId, WireError, handshake,
};

/// Requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a replica is, as this frontend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Connecting (or reconnecting) to it.
    Connecting,
    /// Connected, volume open at our epoch; receives every write.
    InSync,
    /// The connection broke; reconnecting. I/O waits.
    Disconnected,
    /// It has seen a newer epoch: another frontend owns the volume. Final.
    Fenced,
    /// Removed from the in-sync set through the arbiter: gets no writes
    /// until the resync returns it (set by the mirror, not the connection).
    OutOfSync,
    /// Out of the in-sync set, catching up: gets every write while the
    /// resync copies what it missed (set by the mirror).
    CatchingUp,
}

impl ReplicaState {
    pub const ALL: [&'static str; 6] = [
        "connecting",
        "in_sync",
        "disconnected",
        "fenced",
        "out_of_sync",
        "catching_up",
    ];
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::Connecting => "connecting",
            ReplicaState::InSync => "in_sync",
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::Fenced => "fenced",
            ReplicaState::OutOfSync => "out_of_sync",
            ReplicaState::CatchingUp => "catching_up",
        }
    }
}

/// Which replica, where.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    /// `host:port`.
    pub addr: String,
}

/// What every connection of a client needs to open its volume.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub secret: Secret,
    pub protocol_version: ProtocolVersion,
    /// Which client this is (one of each kind per replica and epoch).
    pub kind: SessionKind,
    /// Where its session generations come from: shared by every
    /// connection of the client to that replica (one per replica for a
    /// frontend; one per volume for a resync, across its attempts).
    pub generations: Arc<SessionCounter>,
    /// A resync source's claim (see `replica::direction`); `None` for a
    /// frontend.
    pub claim: Option<SyncClaim>,
}

impl SessionParams {
    /// A frontend's sessions, with a fresh counter.
    pub fn frontend(
        volume: VolumeId,
        epoch: Epoch,
        secret: Secret,
        protocol_version: ProtocolVersion,
    ) -> Self {
        Self {
            volume,
            epoch,
            secret,
            protocol_version,
            kind: SessionKind::Frontend,
            generations: SessionCounter::new(),
            claim: None,
        }
    }
}

/// The session generations of one client of one replica: each connection
/// takes the next; [`SessionCounter::give_up`] abandons all taken so far.
#[derive(Debug)]
pub struct SessionCounter {
    next: AtomicU64,
    /// Sessions below this generation are abandoned (watched by the owner
    /// task, which aborts its connection when its session is).
    abandoned: watch::Sender<u64>,
}

impl SessionCounter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU64::new(1),
            abandoned: watch::channel(0).0,
        })
    }

    fn take(&self) -> SessionGen {
        SessionGen(self.next.fetch_add(1, Ordering::SeqCst))
    }

    /// The replica has fenced this client below `floor` (a predecessor
    /// of this process used those generations): continue from there.
    fn skip_to(&self, floor: SessionGen) {
        self.next.fetch_max(floor.0, Ordering::SeqCst);
    }

    /// Abandons every session taken so far; returns the floor below which
    /// they all lie (the next session gets at least that).
    pub fn give_up(&self) -> SessionGen {
        let floor = self.next.load(Ordering::SeqCst);
        self.abandoned.send_if_modified(|v| {
            let raise = floor > *v;
            if raise {
                *v = floor;
            }
            raise
        });
        SessionGen(floor)
    }

    /// Sessions below this are abandoned (0: none).
    pub fn abandoned_below(&self) -> SessionGen {
        SessionGen(*self.abandoned.borrow())
    }
}

/// Why a connection to a replica could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach replica {replica} at {addr}")]
    Unreachable {
        replica: ReplicaId,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("replica {replica} at {addr} did not answer within {timeout:?}")]
    Timeout {
        replica: ReplicaId,
        addr: String,
        timeout: Duration,
    },
    #[error("handshake with replica {replica} at {addr} failed")]
    Handshake {
        replica: ReplicaId,
        addr: String,
        #[source]
        source: HandshakeError,
    },
    #[error("replica {replica} at {addr} refused to open volume {volume}")]
    OpenRefused {
        replica: ReplicaId,
        addr: String,
        volume: VolumeId,
        #[source]
        source: WireError,
    },
    #[error("replica {replica} at {addr} broke the protocol while opening the volume")]
    Protocol {
        replica: ReplicaId,
        addr: String,
        #[source]
        source: FrameError,
    },
}

impl ConnectError {
    /// Errors that retrying cannot fix (wrong secret, other version, newer
    /// epoch, missing volume).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake {
                source: HandshakeError::WrongSecret
                    | HandshakeError::VersionMismatch { .. }
                    | HandshakeError::RefusedByPeer { .. },
                ..
            } | ConnectError::OpenRefused { .. }
        )
    }

    pub fn is_stale_epoch(&self) -> bool {
        matches!(
            self,
            ConnectError::OpenRefused {
                source: WireError::StaleEpoch { .. },
                ..
            }
        )
    }
}

/// Why one request to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("replica {replica}: {source}")]
    Refused {
        replica: ReplicaId,
        #[source]
        source: WireError,
    },
    #[error("replica {replica}: connection lost with the request in flight")]
    ConnectionLost { replica: ReplicaId },
    #[error("replica {replica} is fenced: a newer frontend owns the volume")]
    Fenced { replica: ReplicaId },
    #[error("replica {replica} did not answer within {after:?}")]
    TimedOut { replica: ReplicaId, after: Duration },
    #[error("replica {replica}: its connection task has stopped")]
    Stopped { replica: ReplicaId },
    #[error("replica {replica}: unexpected reply to {op}")]
    UnexpectedReply {
        replica: ReplicaId,
        op: &'static str,
    },
}

/// How many times in a row a stale generation is skipped past at open.
const STALE_SESSION_RETRIES: u32 = 3;

struct Command {
    op: Op,
    reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// A live connection to one replica, as the mirror holds it.
pub struct ReplicaHandle {
    spec: ReplicaSpec,
    /// The volume's size this replica must have: as opened, raised by a
    /// resize ([`ReplicaHandle::set_size`]); a reconnection to a copy that
    /// is smaller (a resize it missed, a crash before it committed one)
    /// grows it first.
    size: Arc<AtomicU64>,
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<ReplicaState>,
    generations: Arc<SessionCounter>,
    /// The incarnation of the copy last connected to (0: none yet).
    incarnation: Arc<AtomicU64>,
    /// When the replica last answered anything ([`Answered`]).
    answered: Arc<Answered>,
    /// Refuse to reconnect to another copy (set while in sync).
    pinned: Arc<AtomicBool>,
}

/// An established, authenticated session with the volume open.
struct Established {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    size: u64,
    incarnation: u64,
    generation: SessionGen,
}

/// Connects, authenticates and opens the volume. `expected_size` is the
/// size the volume must have (as seen at the first open, or grown to
/// since): a smaller copy is grown to it (`Resize`) before the session is
/// used — it missed a resize, or crashed before committing one; a larger
/// one is used as it is (a resize that did not complete everywhere).
async fn establish(
    spec: &ReplicaSpec,
    params: &SessionParams,
    expected_size: Option<u64>,
) -> Result<Established, ConnectError> {
    let timeout = CONNECT_TIMEOUT;
    let mut skipped = 0;
    loop {
        let generation = params.generations.take();
        let attempt = establish_inner(spec, params, expected_size, generation);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Err(ConnectError::OpenRefused {
                source: WireError::StaleSession { floor, .. },
                ..
            })) if skipped < STALE_SESSION_RETRIES => {
                // A previous process of this client used newer generations.
                tracing::info!(replica = %spec.id, refused = generation.0, floor = floor.0, "session generation already passed on the replica: continuing from its floor");
                params.generations.skip_to(floor);
                skipped += 1;
            }
            Ok(r) => return r,
            Err(_) => {
                return Err(ConnectError::Timeout {
                    replica: spec.id.clone(),
                    addr: spec.addr.clone(),
                    timeout,
                });
            }
        }
    }
}

async fn establish_inner(
    spec: &ReplicaSpec,
    params: &SessionParams,
    expected_size: Option<u64>,
    generation: SessionGen,
) -> Result<Established, ConnectError> {
    let stream =
        TcpStream::connect(&spec.addr)
            .await
            .map_err(|source| ConnectError::Unreachable {
                replica: spec.id.clone(),
                addr: spec.addr.clone(),
                source,
            })?;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    handshake(
        &mut reader,
        &mut writer,
        Role::Frontend,
        params.protocol_version,
        &params.secret,
    )
    .await
    .map_err(|source| ConnectError::Handshake {
        replica: spec.id.clone(),
        addr: spec.addr.clone(),
        source,
    })?;
    let protocol = |source| ConnectError::Protocol {
        replica: spec.id.clone(),
        addr: spec.addr.clone(),
        source,
    };
    let open = Message::Request(Request {
        id: RequestId(0),
        epoch: params.epoch,
        op: Op::Open {
            volume: params.volume.clone(),
            expected_size: None,
            session: Session {
                kind: params.kind,
                generation,
            },
            claim: params.claim.clone(),
        },
    });
    writer
        .send(&open)
        .await
        .map_err(|e| protocol(FrameError::Io(e)))?;
    let (size, incarnation) = match reader.read_message().await.map_err(protocol)? {
        Some(Message::Response(Response {
            result: Ok(Reply::Opened {
                size, incarnation, ..
            }),
            ..
        })) => (size, incarnation),
        Some(Message::Response(Response { result: Err(e), .. })) => {
            return Err(ConnectError::OpenRefused {
                replica: spec.id.clone(),
                addr: spec.addr.clone(),
                volume: params.volume.clone(),
                source: e,
            });
        }
        Some(_) | None => return Err(protocol(FrameError::UnexpectedEof)),
    };
    let size = match expected_size {
        Some(expected) if size < expected => {
            grow_on_open(spec, params, &mut reader, &mut writer, size, expected).await?;
            expected
        }
        _ => size,
    };
    Ok(Established {
        reader,
        writer,
        size,
        incarnation,
        generation,
    })
}

/// Grows a copy found smaller than the volume at open, on the session
/// just opened (nothing else in flight on it yet).
async fn grow_on_open(
    spec: &ReplicaSpec,
    params: &SessionParams,
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut FrameWriter<OwnedWriteHalf>,
    found: u64,
    size: u64,
) -> Result<(), ConnectError> {
    let protocol = |source| ConnectError::Protocol {
        replica: spec.id.clone(),
        addr: spec.addr.clone(),
        source,
    };
    tracing::info!(replica = %spec.id, found, size, "replica's copy is smaller than the volume: growing it before use");
    let resize = Message::Request(Request {
        id: RequestId(1),
        epoch: params.epoch,
        op: Op::Resize { size },
    });
    writer
        .send(&resize)
        .await
        .map_err(|e| protocol(FrameError::Io(e)))?;
    match reader.read_message().await.map_err(protocol)? {
        Some(Message::Response(Response {
            result: Ok(Reply::Done),
            ..
        })) => Ok(()),
        Some(Message::Response(Response { result: Err(e), .. })) => {
            Err(ConnectError::OpenRefused {
                replica: spec.id.clone(),
                addr: spec.addr.clone(),
                volume: params.volume.clone(),
                source: e,
            })
        }
        Some(_) | None => Err(protocol(FrameError::UnexpectedEof)),
    }
}

impl ReplicaHandle {
    /// Connects, authenticates and opens the volume, then leaves a task
    /// owning the connection. Fails (without retrying) if the first attempt
    /// fails, so that a misconfiguration is reported at startup.
    pub async fn connect(
        spec: ReplicaSpec,
        params: SessionParams,
        metrics: OpHandles,
    ) -> Result<Self, ConnectError> {
        let session = establish(&spec, &params, None).await?;
        Ok(Self::spawn(
            spec,
            params,
            metrics,
            session.size,
            session.incarnation,
            Some(session),
        ))
    }

    /// A handle to a replica that could not be reached at startup: the
    /// owner keeps connecting in the background (state `Connecting`, then
    /// `InSync`), expecting a volume of `size` bytes; requests wait
    /// meanwhile (the mirror's timeout decides what that means). Any copy
    /// of the volume is accepted (nothing is known of it yet).
    pub fn unreachable(
        spec: ReplicaSpec,
        params: SessionParams,
        metrics: OpHandles,
        size: u64,
    ) -> Self {
        Self::spawn(spec, params, metrics, size, 0, None)
    }

    /// Starts the owner task, on `session` if there is one (then pinned to
    /// its incarnation), else connecting first.
    fn spawn(
        spec: ReplicaSpec,
        params: SessionParams,
        metrics: OpHandles,
        size: u64,
        incarnation: u64,
        session: Option<Established>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT * 4);
        let first = if session.is_some() {
            ReplicaState::InSync
        } else {
            ReplicaState::Connecting
        };
        let (state_tx, state) = watch::channel(first);
        let generations = params.generations.clone();
        let incarnation = Arc::new(AtomicU64::new(incarnation));
        let answered = Arc::new(Answered::default());
        let pinned = Arc::new(AtomicBool::new(session.is_some()));
        let size = Arc::new(AtomicU64::new(size));
        let span = tracing::info_span!("replica", volume = %params.volume, replica = %spec.id);
        let owner = Owner {
            generations: generations.clone(),
            incarnation: incarnation.clone(),
            answered: answered.clone(),
            pinned: pinned.clone(),
            size: size.clone(),
            spec: spec.clone(),
            params,
            rx,
            state: state_tx,
            metrics,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            next_id: 1,
        };
        tokio::spawn(owner.run(session).instrument(span));
        Self {
            spec,
            size,
            tx,
            state,
            generations,
            incarnation,
            answered,
            pinned,
        }
    }

    pub fn id(&self) -> &ReplicaId {
        &self.spec.id
    }

    /// The incarnation of the copy of the volume last connected to (0:
    /// not connected yet).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// While pinned (the replica is in sync), a reconnection to another
    /// copy (the replica was recreated) is refused: it does not hold what
    /// the in-sync one held. Unpinned (out of sync), any copy is accepted:
    /// the resync finds it recreated and copies everything.
    pub fn pin_incarnation(&self, pinned: bool) {
        self.pinned.store(pinned, Ordering::SeqCst);
    }

    /// Gives up every session opened (or being opened) so far: the current
    /// connection is aborted (its queued requests are dropped, not sent)
    /// and a new session is opened. Returns the floor below which the
    /// abandoned sessions lie: the mirror has the replica fence them
    /// (through the survivor's resync), so that a request it gave up on
    /// cannot land there later (after a cut link comes back) over a newer
    /// copy.
    pub fn give_up(&self) -> SessionGen {
        self.generations.give_up()
    }

    /// [`ReplicaHandle::give_up`], when the floor is not needed.
    pub fn reset(&self) {
        self.give_up();
    }

    /// The floor below which this client's sessions to the replica are
    /// given up (0: none).
    pub fn abandoned_below(&self) -> SessionGen {
        self.generations.abandoned_below()
    }

    pub fn addr(&self) -> &str {
        &self.spec.addr
    }

    /// Size of the volume as this replica reported it at open, or as a
    /// resize grew it since.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// The replica has grown to `size` (a resize): reconnections expect
    /// (and grow a copy to) at least that.
    pub fn set_size(&self, size: u64) {
        self.size.fetch_max(size, Ordering::SeqCst);
    }

    pub fn state(&self) -> ReplicaState {
        *self.state.borrow()
    }

    /// A receiver of state changes (for metrics and, next issue, the
    /// arbiter).
    pub fn watch_state(&self) -> watch::Receiver<ReplicaState> {
        self.state.clone()
    }

    /// How long the replica has said nothing — no answer to any request
    /// on any session — counting from `since` at the earliest (when the
    /// caller's request was sent: a replica idle before it was not silent).
    pub fn silent_for(&self, since: Instant) -> Duration {
        let now = Instant::now();
        let from = match self.answered.at() {
            Some(at) if at > since => at,
            _ => since,
        };
        now.saturating_duration_since(from)
    }

    /// Sends a probe — a request the replica's server answers beside the
    /// I/O it may be stuck on (the resync status) — unless one was sent
    /// within `every`; its answer, whenever it comes, counts as an answer
    /// ([`ReplicaHandle::silent_for`]). Does not wait for it.
    pub fn probe(&self, every: Duration, deadline: Duration) {
        if !self.answered.probe_due(every) {
            return;
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::ResyncStatus;
            if tx.send(Command { op, reply }).await.is_ok() {
                let _ = tokio::time::timeout(deadline, rx).await;
            }
        });
    }

    /// Sends `op` and waits for its reply.
    pub async fn call(&self, op: Op) -> Result<Reply, CallError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || CallError::Stopped {
            replica: self.spec.id.clone(),
        };
        self.tx
            .send(Command { op, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

struct Pending {
    reply: oneshot::Sender<Result<Reply, CallError>>,
    op: IoOp,
    bytes: u64,
    started: Instant,
    /// One of the connection's [`MAX_IN_FLIGHT`] slots, freed on completion.
    _slot: OwnedSemaphorePermit,
}

/// How a connected phase ended.
enum Ended {
    /// The mirror dropped its handle: stop.
    Closed,
    /// The socket broke: reconnect.
    Lost(String),
    /// A newer epoch exists: stop serving for good.
    Fenced(WireError),
}

struct Owner {
    generations: Arc<SessionCounter>,
    incarnation: Arc<AtomicU64>,
    answered: Arc<Answered>,
    pinned: Arc<AtomicBool>,
    size: Arc<AtomicU64>,
    spec: ReplicaSpec,
    params: SessionParams,
    rx: mpsc::Receiver<Command>,
    state: watch::Sender<ReplicaState>,
    metrics: OpHandles,
    slots: Arc<Semaphore>,
    next_id: u64,
}

fn io_op(op: &Op) -> (IoOp, u64) {
    match op {
        // Control requests (rare) share the `open` label.
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
    }
}

impl Owner {
    async fn run(mut self, first: Option<Established>) {
        let mut session = match first {
            Some(s) => s,
            None => match self.reconnect().await {
                Some(s) => {
                    self.state.send_replace(ReplicaState::InSync);
                    tracing::info!(addr = %self.spec.addr, "connected to replica");
                    s
                }
                None => return,
            },
        };
        loop {
            match self.serve(session).await {
                (Ended::Closed, _) => return,
                (Ended::Lost(why), failed) => {
                    tracing::error!(addr = %self.spec.addr, reason = %why, in_flight = failed, "connection to replica lost; failed the requests in flight, reconnecting (I/O waits meanwhile)");
                    self.state.send_replace(ReplicaState::Disconnected);
                }
                (Ended::Fenced(e), _) => {
                    tracing::error!(error = %e, "replica reports a newer epoch: this frontend is fenced and stops using it");
                    self.fenced().await;
                    return;
                }
            }
            session = match self.reconnect().await {
                Some(s) => s,
                None => return,
            };
            self.state.send_replace(ReplicaState::InSync);
            tracing::info!(addr = %self.spec.addr, "reconnected to replica");
        }
    }

    /// Fails every request from now on.
    async fn fenced(&mut self) {
        self.state.send_replace(ReplicaState::Fenced);
        while let Some(cmd) = self.rx.recv().await {
            let _ = cmd.reply.send(Err(CallError::Fenced {
                replica: self.spec.id.clone(),
            }));
        }
    }

    async fn reconnect(&mut self) -> Option<Established> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.rx.is_closed() {
                return None;
            }
            let size = self.size.load(Ordering::SeqCst);
            match establish(&self.spec, &self.params, Some(size)).await {
                Ok(s) if s.generation < self.generations.abandoned_below() => {
                    // Given up while it was being opened: never used.
                    abort(&s.writer);
                    tracing::debug!(
                        generation = s.generation.0,
                        "session given up while opening; opening another"
                    );
                }
                Ok(s) => {
                    let known = self.incarnation.load(Ordering::SeqCst);
                    if known == 0 || s.incarnation == known || !self.pinned.load(Ordering::SeqCst) {
                        self.incarnation.store(s.incarnation, Ordering::SeqCst);
                        return Some(s);
                    }
                    tracing::error!(
                        addr = %self.spec.addr, known, found = s.incarnation, retry_in = ?backoff,
                        "replica answers with another copy of the volume (it was recreated): not used until it is out of the in-sync set and copied in full"
                    );
                    drop(s);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX_BACKOFF);
                }
                Err(e) if e.is_stale_epoch() => {
                    tracing::error!(error = %crate::error_chain(&e), "replica refuses our epoch: fenced");
                    self.fenced().await;
                    return None;
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(error = %crate::error_chain(&e), retry_in = ?backoff, "replica refuses this frontend; I/O waits until that is fixed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?backoff, "replica unreachable; I/O waits");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX_BACKOFF);
                }
            }
        }
    }

    /// Serves one session: this task writes requests; a completer task
    /// reads responses and answers the callers directly (one wake-up less
    /// per request than routing responses back through this task). Returns
    /// how it ended and how many requests in flight were failed.
    async fn serve(&mut self, session: Established) -> (Ended, usize) {
        let Established {
            reader,
            mut writer,
            generation,
            ..
        } = session;
        let mut abandoned = self.generations.abandoned.subscribe();
        let (reg_tx, reg_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let completer = Completer {
            replica: self.spec.id.clone(),
            metrics: self.metrics.clone(),
            answered: self.answered.clone(),
            reg_rx,
            pending: HashMap::with_capacity(MAX_IN_FLIGHT),
        };
        let mut completer = tokio::spawn(completer.run(reader, stop_rx));
        let local_end = loop {
            if *abandoned.borrow_and_update() > generation.0 {
                // Abort (RST): whatever is still queued in the socket is
                // dropped here rather than retransmitted when a link comes
                // back; the requests not sent yet are failed, not kept for
                // the next session. (What did leave is fenced by the
                // replica: the session's generation is below the floor.)
                abort(&writer);
                self.fail_queued();
                break Ended::Lost(format!(
                    "session {generation} given up (the replica left the write set, or a request on it timed out); requests still queued for it are dropped"
                ));
            }
            tokio::select! {
                biased;
                done = &mut completer => {
                    abort(&writer);
                    return done.unwrap_or_else(|e| (Ended::Lost(e.to_string()), 0));
                }
                r = abandoned.changed() => {
                    if r.is_err() {
                        break Ended::Closed;
                    }
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break Ended::Closed };
                    // Raced against the abandonment: a write into a socket
                    // whose link is down blocks, and must not keep the
                    // session alive (and its queue retransmitting).
                    let sent = {
                        let work = self.send_batch(&mut writer, &reg_tx, cmd);
                        tokio::select! {
                            biased;
                            () = given_up(&mut abandoned, generation) => None,
                            r = work => Some(r),
                        }
                    };
                    match sent {
                        None => {}
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            abort(&writer);
                            break Ended::Lost(e.to_string());
                        }
                    }
                }
            }
        };
        // This side ended the session: the completer fails what is in flight.
        let _ = stop_tx.send(());
        let failed = match completer.await {
            Ok((_, failed)) => failed,
            Err(_) => 0,
        };
        (local_end, failed)
    }

    /// Sends `cmd` and whatever else is queued, in one flush.
    async fn send_batch(
        &mut self,
        writer: &mut FrameWriter<OwnedWriteHalf>,
        reg_tx: &mpsc::UnboundedSender<(u64, Pending)>,
        cmd: Command,
    ) -> std::io::Result<()> {
        self.send(writer, reg_tx, cmd).await?;
        while let Ok(cmd) = self.rx.try_recv() {
            self.send(writer, reg_tx, cmd).await?;
        }
        writer.flush().await
    }

    /// Fails every request waiting to be sent.
    fn fail_queued(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            let _ = cmd.reply.send(Err(CallError::ConnectionLost {
                replica: self.spec.id.clone(),
            }));
        }
    }

    async fn send(
        &mut self,
        writer: &mut FrameWriter<OwnedWriteHalf>,
        reg_tx: &mpsc::UnboundedSender<(u64, Pending)>,
        cmd: Command,
    ) -> std::io::Result<()> {
        // The caller gave up on it (its deadline passed while the request
        // waited, e.g. for a reconnection): never send it. A write the
        // mirror gave up on may since have been overwritten elsewhere, and
        // must not land here later, over a newer copy.
        if cmd.reply.is_closed() {
            return Ok(());
        }
        // Waits while MAX_IN_FLIGHT requests are in flight.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("request slots closed"))?;
        let id = self.next_id;
        self.next_id += 1;
        let (op, bytes) = io_op(&cmd.op);
        // Registered before the request is written, so always before its
        // response can arrive.
        let pending = Pending {
            reply: cmd.reply,
            op,
            bytes,
            started: Instant::now(),
            _slot: slot,
        };
        if reg_tx.send((id, pending)).is_err() {
            return Err(std::io::Error::other("completer stopped"));
        }
        let msg = Message::Request(Request {
            id: RequestId(id),
            epoch: self.params.epoch,
            op: cmd.op,
        });
        writer.write_message(&msg).await
    }
}

/// When a replica last answered (any response on any of its sessions),
/// and when it was last probed, on this process's monotonic clock.
#[derive(Debug, Default)]
struct Answered {
    /// Milliseconds since [`clock_base`] plus one (0: never).
    at_ms: AtomicU64,
    probed_ms: AtomicU64,
}

fn clock_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64 + 1
}

impl Answered {
    fn now(&self) {
        self.at_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// When the last answer came (`None`: never).
    fn at(&self) -> Option<Instant> {
        let ms = self.at_ms.load(Ordering::Relaxed).checked_sub(1)?;
        Some(clock_base() + Duration::from_millis(ms))
    }

    /// Whether no probe was sent within `every`; if so, counts one as sent.
    fn probe_due(&self, every: Duration) -> bool {
        let now = now_ms();
        let last = self.probed_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every.as_millis() as u64 {
            return false;
        }
        self.probed_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Aborts a connection: RST on close, so that the kernel drops what is
/// queued instead of retransmitting it.
fn abort(writer: &FrameWriter<OwnedWriteHalf>) {
    let _ = writer.get_ref().as_ref().set_zero_linger();
}

/// Returns once sessions up to `generation` are given up.
async fn given_up(abandoned: &mut watch::Receiver<u64>, generation: SessionGen) {
    loop {
        if *abandoned.borrow_and_update() > generation.0 {
            return;
        }
        if abandoned.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What one response means for its session.
enum Completed {
    Normal,
    /// A newer epoch exists.
    Fenced(WireError),
    /// The replica fenced this session.
    StaleSession(WireError),
}

/// Reads a session's responses and completes their requests.
struct Completer {
    replica: ReplicaId,
    metrics: OpHandles,
    answered: Arc<Answered>,
    reg_rx: mpsc::UnboundedReceiver<(u64, Pending)>,
    pending: HashMap<u64, Pending>,
}

impl Completer {
    async fn run(
        mut self,
        mut reader: FrameReader<OwnedReadHalf>,
        mut stop: oneshot::Receiver<()>,
    ) -> (Ended, usize) {
        let ended = loop {
            let msg = tokio::select! {
                biased;
                _ = &mut stop => break Ended::Closed,
                m = reader.read_message() => m,
            };
            let r = match msg {
                Ok(Some(Message::Response(r))) => {
                    self.answered.now();
                    r
                }
                Ok(Some(_)) => break Ended::Lost("replica sent a non-response".to_owned()),
                Ok(None) => break Ended::Lost("replica closed the connection".to_owned()),
                Err(e) => break Ended::Lost(crate::error_chain(&e)),
            };
            match self.complete(r) {
                Completed::Normal => {}
                Completed::Fenced(e) => break Ended::Fenced(e),
                Completed::StaleSession(e) => {
                    break Ended::Lost(format!("the replica fenced this session: {e}"));
                }
            }
        };
        let failed = match &ended {
            Ended::Fenced(_) => self.fail_all(|replica| CallError::Fenced { replica }),
            _ => self.fail_all(|replica| CallError::ConnectionLost { replica }),
        };
        (ended, failed)
    }

    fn fail_all(&mut self, err: impl Fn(ReplicaId) -> CallError) -> usize {
        self.reg_rx.close();
        while let Ok((id, p)) = self.reg_rx.try_recv() {
            self.pending.insert(id, p);
        }
        let n = self.pending.len();
        for (_, p) in self.pending.drain() {
            self.metrics.record(p.op, p.started, 0, false);
            let _ = p.reply.send(Err(err(self.replica.clone())));
        }
        n
    }

    /// Completes the request `r` answers; says whether the answer ends the
    /// session.
    fn complete(&mut self, r: Response) -> Completed {
        let p = match self.pending.remove(&r.id.0) {
            Some(p) => p,
            None => {
                while let Ok((id, p)) = self.reg_rx.try_recv() {
                    self.pending.insert(id, p);
                }
                match self.pending.remove(&r.id.0) {
                    Some(p) => p,
                    None => {
                        tracing::warn!(id = %r.id, "response to no request in flight; ignored");
                        return Completed::Normal;
                    }
                }
            }
        };
        let ok = r.result.is_ok();
        self.metrics
            .record(p.op, p.started, if ok { p.bytes } else { 0 }, ok);
        let outcome = match &r.result {
            Err(e @ WireError::StaleEpoch { .. }) => Completed::Fenced(e.clone()),
            // The session was fenced (its client opened a newer one, or gave
            // it up): for the caller, the connection is lost.
            Err(e @ WireError::StaleSession { .. }) => {
                let _ = p.reply.send(Err(CallError::ConnectionLost {
                    replica: self.replica.clone(),
                }));
                return Completed::StaleSession(e.clone());
            }
            _ => Completed::Normal,
        };
        let result = r.result.map_err(|source| CallError::Refused {
            replica: self.replica.clone(),
            source,
        });
        let _ = p.reply.send(result);
        outcome
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
