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
//! from the resync. For the same reason [`ReplicaHandle::reset`] aborts the
//! connection (RST: the socket's queue is dropped) and fails what waits. A replica that answers with a newer epoch
//! fences this frontend for good (`Fenced`). Degraded operation — dropping
//! the replica from the in-sync set through the arbiter — is the mirror's
//! (`frontend::failover`): it times calls out and reports the loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

use crate::metrics::{IoOp, OpHandles};
use crate::protocol::{
    Epoch, FrameError, FrameReader, FrameWriter, HandshakeError, Message, Op, ProtocolVersion,
    ReplicaId, Reply, Request, RequestId, Response, Role, Secret, VolumeId, WireError, handshake,
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

/// What every connection of a frontend needs to open its volume.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub secret: Secret,
    pub protocol_version: ProtocolVersion,
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

struct Command {
    op: Op,
    reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// A live connection to one replica, as the mirror holds it.
pub struct ReplicaHandle {
    spec: ReplicaSpec,
    size: u64,
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<ReplicaState>,
    reset: Arc<Notify>,
    /// The incarnation of the copy last connected to (0: none yet).
    incarnation: Arc<AtomicU64>,
    /// Refuse to reconnect to another copy (set while in sync).
    pinned: Arc<AtomicBool>,
}

/// An established, authenticated session with the volume open.
struct Session {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    size: u64,
    incarnation: u64,
}

/// Connects, authenticates and opens the volume. `expected_size` is the
/// size seen at the first open, so that a reconnect to a replaced volume of
/// another size is refused.
async fn establish(
    spec: &ReplicaSpec,
    params: &SessionParams,
    expected_size: Option<u64>,
) -> Result<Session, ConnectError> {
    let timeout = CONNECT_TIMEOUT;
    match tokio::time::timeout(timeout, establish_inner(spec, params, expected_size)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            replica: spec.id.clone(),
            addr: spec.addr.clone(),
            timeout,
        }),
    }
}

async fn establish_inner(
    spec: &ReplicaSpec,
    params: &SessionParams,
    expected_size: Option<u64>,
) -> Result<Session, ConnectError> {
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
            expected_size,
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
    Ok(Session {
        reader,
        writer,
        size,
        incarnation,
    })
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
        session: Option<Session>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT * 4);
        let first = if session.is_some() {
            ReplicaState::InSync
        } else {
            ReplicaState::Connecting
        };
        let (state_tx, state) = watch::channel(first);
        let reset = Arc::new(Notify::new());
        let incarnation = Arc::new(AtomicU64::new(incarnation));
        let pinned = Arc::new(AtomicBool::new(session.is_some()));
        let span = tracing::info_span!("replica", volume = %params.volume, replica = %spec.id);
        let owner = Owner {
            reset: reset.clone(),
            incarnation: incarnation.clone(),
            pinned: pinned.clone(),
            size,
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
            reset,
            incarnation,
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

    /// Aborts the current connection (its queued requests are dropped, not
    /// sent) and reconnects. The mirror calls it when the replica leaves
    /// the set of replicas that get writes, so that a request it gave up on
    /// cannot land there later (after a cut link comes back) over a newer
    /// copy.
    pub fn reset(&self) {
        self.reset.notify_one();
    }

    pub fn addr(&self) -> &str {
        &self.spec.addr
    }

    /// Size of the volume as this replica reported it at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn state(&self) -> ReplicaState {
        *self.state.borrow()
    }

    /// A receiver of state changes (for metrics and, next issue, the
    /// arbiter).
    pub fn watch_state(&self) -> watch::Receiver<ReplicaState> {
        self.state.clone()
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
    reset: Arc<Notify>,
    incarnation: Arc<AtomicU64>,
    pinned: Arc<AtomicBool>,
    size: u64,
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
        | Op::ForgetExtents { .. } => (IoOp::Open, 0),
        Op::Read { len, .. } => (IoOp::Read, u64::from(*len)),
        Op::Write { data, .. } => (IoOp::Write, data.len() as u64),
        Op::Flush => (IoOp::Flush, 0),
        Op::Trim { len, .. } => (IoOp::Trim, u64::from(*len)),
        Op::WriteZeroes { len, .. } => (IoOp::WriteZeroes, u64::from(*len)),
    }
}

impl Owner {
    async fn run(mut self, first: Option<Session>) {
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

    async fn reconnect(&mut self) -> Option<Session> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.rx.is_closed() {
                return None;
            }
            match establish(&self.spec, &self.params, Some(self.size)).await {
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
    async fn serve(&mut self, session: Session) -> (Ended, usize) {
        let Session {
            reader, mut writer, ..
        } = session;
        let (reg_tx, reg_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let completer = Completer {
            replica: self.spec.id.clone(),
            metrics: self.metrics.clone(),
            reg_rx,
            pending: HashMap::with_capacity(MAX_IN_FLIGHT),
        };
        let mut completer = tokio::spawn(completer.run(reader, stop_rx));
        let local_end = loop {
            tokio::select! {
                biased;
                done = &mut completer => {
                    return done.unwrap_or_else(|e| (Ended::Lost(e.to_string()), 0));
                }
                () = self.reset.notified() => {
                    // Abort (RST): whatever is still queued in the socket is
                    // dropped here, so that no request given up on can reach
                    // the replica later, after a link comes back; the
                    // requests not sent yet are failed, not kept for the
                    // next session.
                    let _ = writer.get_ref().as_ref().set_zero_linger();
                    self.fail_queued();
                    break Ended::Lost("reset by the mirror: the replica left the write set; requests still queued for it are dropped".to_owned());
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break Ended::Closed };
                    if let Err(e) = self.send(&mut writer, &reg_tx, cmd).await {
                        break Ended::Lost(e.to_string());
                    }
                    // Batch what else is queued into the same flush.
                    let mut failed = None;
                    while let Ok(cmd) = self.rx.try_recv() {
                        if let Err(e) = self.send(&mut writer, &reg_tx, cmd).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break Ended::Lost(e.to_string());
                    }
                    if let Err(e) = writer.flush().await {
                        break Ended::Lost(e.to_string());
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

/// Reads a session's responses and completes their requests.
struct Completer {
    replica: ReplicaId,
    metrics: OpHandles,
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
                Ok(Some(Message::Response(r))) => r,
                Ok(Some(_)) => break Ended::Lost("replica sent a non-response".to_owned()),
                Ok(None) => break Ended::Lost("replica closed the connection".to_owned()),
                Err(e) => break Ended::Lost(crate::error_chain(&e)),
            };
            if let Some(e) = self.complete(r) {
                break Ended::Fenced(e);
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

    /// Completes the request `r` answers; returns the error if it says
    /// that we are fenced.
    fn complete(&mut self, r: Response) -> Option<WireError> {
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
                        return None;
                    }
                }
            }
        };
        let ok = r.result.is_ok();
        self.metrics
            .record(p.op, p.started, if ok { p.bytes } else { 0 }, ok);
        let fenced = match &r.result {
            Err(e @ WireError::StaleEpoch { .. }) => Some(e.clone()),
            _ => None,
        };
        let result = r.result.map_err(|source| CallError::Refused {
            replica: self.replica.clone(),
            source,
        });
        let _ = p.reply.send(result);
        fenced
    }
}
