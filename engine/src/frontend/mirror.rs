//! The mirror: the frontend's core. It holds a connection to each of the
//! two replicas of a volume, sends every write to both in parallel and
//! acknowledges it only when both have it (design invariant 1); a flush
//! (or a FUA write) completes only when both made it durable. Reads go to
//! the replica marked local, else to the first in-sync one.
//!
//! With an arbiter ([`Mirror::enable_failover`]) every replica call has a
//! timeout; a replica that fails or times out is reported to the fail-over
//! task (`frontend::failover`) and the write is held until the replica is
//! out of the in-sync set, then re-sent to the survivor alone (so that the
//! survivor, told first that its peer left, records it as dirty). Nothing is
//! acknowledged while the lease is not valid. Without an arbiter nothing is
//! ever dropped: I/O waits for both replicas.
//!
//! Exports (NBD, FUSE) see the mirror only through [`BlockBackend`].
//! Writes larger than the protocol's [`MAX_IO_BYTES`] are split, trims and
//! write-zeroes into [`DISCARD_CHUNK`] pieces (so that each fits a
//! replica's activity log and answers well within the replica timeout).
//!
//! # A write is never abandoned half-way
//!
//! Once a write (or trim, or write-zeroes) has been handed to the mirror it
//! runs to its end, whatever happens to its caller — driven by the caller
//! while it waits, run again from the start by a task of its own once the
//! caller stopped waiting (`Unended`: they are idempotent): an
//! NBD client that resets its connection drops the export's futures, a
//! shutdown stops the exports, a failed chunk of a large write ends the
//! caller's wait — none of that may leave the write on one in-sync replica
//! only, which reads of the same block would then answer differently
//! depending on the replica. So every such request either reaches every
//! replica that gets writes, or (in degraded operation) the replica it
//! failed on leaves the in-sync set through the arbiter and the request is
//! re-sent to the survivor, which records the region as dirty for the
//! resync — also when the failure is a refusal (an I/O error) while the
//! other in-sync replica has it. [`Mirror::drain`] waits for them (the
//! frontend's stop does, before its final flush), and
//! [`Mirror::forget_activity`] refuses while any is in flight or after one
//! ended in an error with the copies possibly different (without an
//! arbiter there is nothing else to record that in): the replicas'
//! activity logs then stay for the next frontend to reconcile.
//!
//! # Overlapping writes keep one order on both replicas
//!
//! Two writes in flight at once over the same bytes have no order for
//! the client, but they must land in the same order on both replicas, or
//! the two copies differ while both count as in sync. A write that
//! overlaps one handed to the mirror before it and not ended yet is sent
//! to no replica until that one ended on every replica
//! (`frontend::conflicts`, as DRBD's conflict detection); writes that
//! overlap nothing in flight go at once, in parallel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::{join_all, try_join_all};
use tokio::sync::{Notify, mpsc, watch};

use crate::metrics::{IoOp, Metrics, OpHandles};
use crate::protocol::{
    Epoch, MAX_IO_BYTES, Op, ProtocolVersion, ReplicaId, Reply, Secret, SessionGen, VolumeId,
    WireError,
};

use super::backend::{BackendError, BlockBackend, check_range};
use super::conflicts::{Admitted, Conflicts, Range};
use super::connection::{
    CallError, ConnectError, ReplicaHandle, ReplicaSpec, ReplicaState, SessionParams,
};
use super::failover::{Failover, Membership, Suspect};
use super::lease::{LeaseGuard, LeaseState};
use crate::arbiter::{Arbiter, FrontendId};

/// How often a request held on the last in-sync replica is sent again.
const HELD_RETRY: Duration = Duration::from_millis(500);
/// Trims and write-zeroes are sent in pieces of at most this: 16 extents
/// of a replica's activity log at its defaults (it holds 256), and quick
/// enough for a replica to answer well within the replica timeout.
pub const DISCARD_CHUNK: u32 = 64 << 20;
/// Pieces of one trim or write-zeroes in flight at once.
const DISCARD_PARALLEL: usize = 4;

/// How a mirror is set up.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub volume: VolumeId,
    /// Exactly two replicas.
    pub replicas: Vec<ReplicaSpec>,
    /// The replica on this site, preferred for reads.
    pub local: ReplicaId,
    pub epoch: Epoch,
    pub secret: Secret,
    /// Normally [`crate::protocol::PROTOCOL_VERSION`].
    pub protocol_version: ProtocolVersion,
}

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("a mirror needs exactly two replicas, got {0}")]
    ReplicaCount(usize),
    #[error("the local replica {local} is not one of the replicas ({a}, {b})")]
    UnknownLocal {
        local: ReplicaId,
        a: ReplicaId,
        b: ReplicaId,
    },
    #[error("both replicas are named {0}")]
    DuplicateReplica(ReplicaId),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(
        "replica sizes differ: replica {a} has {a_size} bytes but replica {b} has {b_size} bytes; recreate one of them with the other's size"
    )]
    SizeMismatch {
        a: ReplicaId,
        a_size: u64,
        b: ReplicaId,
        b_size: u64,
    },
    #[error(transparent)]
    Resize(#[from] resize::ResizeError),
}

/// A volume mirrored on two replicas. Cheap to share: the state lives in
/// an [`Arc`] that the tasks running writes hold too.
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    volume: VolumeId,
    /// The volume's size; grows online (`mirror/resize.rs`).
    size: AtomicU64,
    /// Held by a resize, one at a time.
    resizing: tokio::sync::Mutex<()>,
    replicas: [Arc<ReplicaHandle>; 2],
    local: usize,
    metrics: OpHandles,
    epoch: Epoch,
    membership: watch::Sender<Membership>,
    /// Per replica, the requests in flight that it does not get (it is out
    /// of sync): a rejoin waits for them to drain after it started sending
    /// it every write, so that the in-sync replica has marked them all.
    skipping: Arc<[AtomicU64; 2]>,
    /// Per replica, while it catches up: bytes its source still has dirty
    /// (published by the fail-over task, for status).
    progress: watch::Sender<[Option<u64>; 2]>,
    /// Set by [`Mirror::enable_failover`].
    degrade: OnceLock<Degrade>,
    /// Writes (and trims, write-zeroes) not ended yet, waited for or not.
    writes: WritesInFlight,
    /// The same by range: one that overlaps an earlier one still in flight
    /// waits for it to end on every replica (see the module doc).
    conflicts: Arc<Conflicts>,
    /// Set when a write ended in an error after it may have reached one
    /// replica and not the other, with nothing recording the region (see
    /// the module doc): the activity logs must then not be forgotten.
    unsettled: AtomicBool,
}

/// Counts the writes in flight; [`Mirror::drain`] waits for none.
#[derive(Default)]
struct WritesInFlight {
    count: AtomicU64,
    idle: Notify,
}

/// A write (trim, write-zeroes) handed to the mirror and not ended yet:
/// its request, its place among the overlapping writes in flight and its
/// count in [`WritesInFlight`]. Its caller drives it (no task, no
/// allocation on the hot path) and [`Unended::end`]s it. A caller that
/// drops it before that (wherever the request was: waiting its turn, sent
/// to one replica, held for a fail-over) leaves it to a task of its own,
/// which runs the request again from the start: writes, trims and
/// write-zeroes are idempotent, and the request sent again lands on each
/// replica after what was sent of it before (one connection keeps the
/// order of its overlapping writes; a given-up one is fenced), while the
/// overlapping writes after it still wait for its place. So it never stops
/// half-way.
struct Unended {
    armed: Option<Armed>,
}

struct Armed {
    op: Op,
    turn: Option<Admitted>,
    ticket: WriteTicket,
}

impl Unended {
    /// Counts `op` in flight and takes its place among the overlapping
    /// writes, now: the order in which they reach the replicas.
    fn new(inner: &Arc<Inner>, op: &Op) -> Self {
        let ticket = WriteTicket::new(inner);
        let turn = modified_range(op).map(|r| inner.conflicts.admit(r));
        Self {
            armed: Some(Armed {
                op: op.clone(),
                turn,
                ticket,
            }),
        }
    }

    /// Waits until the overlapping writes before it ended.
    async fn wait_turn(&self) {
        if let Some(Armed {
            turn: Some(turn), ..
        }) = &self.armed
        {
            turn.wait_turn().await;
        }
    }

    /// Ended with `r` on every replica that gets writes: the overlapping
    /// writes after it may go.
    fn end(mut self, r: &Result<(), BackendError>) {
        if let Some(armed) = self.armed.take() {
            armed.end(r);
        }
    }
}

impl Armed {
    fn end(self, r: &Result<(), BackendError>) {
        drop(self.turn);
        if let Err(e) = r
            && !matches!(
                e,
                BackendError::OutOfRange { .. } | BackendError::Fenced { .. }
            )
        {
            self.ticket.0.unsettled.store(true, Ordering::SeqCst);
        }
        drop(self.ticket);
    }
}

impl Drop for Unended {
    fn drop(&mut self) {
        let Some(armed) = self.armed.take() else {
            return;
        };
        // Outside a runtime (the process is going down) there is nothing
        // left to run it on.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn(async move {
                if let Some(turn) = &armed.turn {
                    turn.wait_turn().await;
                }
                let inner = armed.ticket.0.clone();
                let r = inner.both(armed.op.clone()).await;
                armed.end(&r);
            }));
        }
    }
}

/// One write counted in flight until dropped.
struct WriteTicket(Arc<Inner>);

impl WriteTicket {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.writes.count.fetch_add(1, Ordering::SeqCst);
        Self(inner.clone())
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if self.0.writes.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.writes.idle.notify_waiters();
        }
    }
}

/// How long a request to a replica that is alive (it answers probes) but
/// slow is waited for before the replica counts as lost anyway (a disk
/// that hangs): like DRBD's `ko-count` × `timeout` (7 × 6 s).
pub const SLOW_REPLICA_LIMIT: Duration = Duration::from_secs(30);

/// How a call waits for a slow (answering) replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// Up to [`SLOW_REPLICA_LIMIT`].
    Wait,
    /// Up to the replica timeout, then [`Waited::Slow`] (the caller has
    /// another replica to try).
    Hedge,
}

/// What a call gave.
enum Waited {
    Reply(Result<Reply, CallError>),
    /// No reply within the replica timeout from a replica that answers.
    Slow,
}

/// The mirror's side of degraded operation.
struct Degrade {
    suspects: mpsc::UnboundedSender<Suspect>,
    /// Asks the fail-over task to tell the in-sync replica the floor of
    /// the sessions given up to this one.
    fences: mpsc::UnboundedSender<usize>,
    lease: Arc<LeaseGuard>,
    timeout: Duration,
}

impl Mirror {
    /// Connects to both replicas (in parallel), opens the volume at the
    /// configured epoch on each and checks that their sizes agree.
    pub async fn connect(config: MirrorConfig, metrics: Arc<Metrics>) -> Result<Self, MirrorError> {
        Self::connect_with(config, metrics, false).await
    }

    /// Like [`Mirror::connect`]; with `one_may_be_down` (degraded operation
    /// will be on), a replica that cannot be reached (not one that refuses)
    /// is connected to in the background instead: the volume's other site
    /// may be gone, and the arbiter decides what that means.
    pub async fn connect_with(
        config: MirrorConfig,
        metrics: Arc<Metrics>,
        one_may_be_down: bool,
    ) -> Result<Self, MirrorError> {
        Self::connect_growing(config, metrics, one_may_be_down, None, &[]).await
    }

    /// Like [`Mirror::connect_with`]; with `grow_to`, the size the volume
    /// was asked to have (a resize that may not have completed), replicas
    /// of different sizes, or smaller than that, are grown to it first
    /// (`mirror/resize.rs`) instead of refused.
    ///
    /// `out_of_sync` names the replicas the arbiter's record (read with the
    /// lease) lists as out of sync. With `one_may_be_down`, such a replica
    /// is not waited for: it gets no writes until its resync returns it, so
    /// the frontend connects to the in-sync one and serves while it
    /// connects to the other in the background. That is the fail-over's
    /// case — the operator took the lost site's replica out when it fenced
    /// it — and a lost site drops packets: waiting would cost the whole
    /// connect timeout before the first I/O on the surviving site.
    pub async fn connect_growing(
        config: MirrorConfig,
        metrics: Arc<Metrics>,
        one_may_be_down: bool,
        grow_to: Option<u64>,
        out_of_sync: &[ReplicaId],
    ) -> Result<Self, MirrorError> {
        let [a, b]: [ReplicaSpec; 2] = config
            .replicas
            .clone()
            .try_into()
            .map_err(|v: Vec<_>| MirrorError::ReplicaCount(v.len()))?;
        if a.id == b.id {
            return Err(MirrorError::DuplicateReplica(a.id));
        }
        let local = if config.local == a.id {
            0
        } else if config.local == b.id {
            1
        } else {
            return Err(MirrorError::UnknownLocal {
                local: config.local,
                a: a.id,
                b: b.id,
            });
        };
        // One session counter per replica: giving up the sessions to one
        // must not touch the other's.
        let params = || {
            SessionParams::frontend(
                config.volume.clone(),
                config.epoch,
                config.secret.clone(),
                config.protocol_version,
            )
        };
        let (params_a, params_b) = (params(), params());
        let vol = config.volume.as_str();
        let connect = |spec: &ReplicaSpec, params: &SessionParams| {
            ReplicaHandle::connect(
                spec.clone(),
                params.clone(),
                metrics.handles(vol, spec.id.as_str()),
            )
        };
        // Not waited for: a replica the record has out of sync, when the
        // other one is not (both out is no valid record; then wait as usual).
        let skip = match (out_of_sync.contains(&a.id), out_of_sync.contains(&b.id)) {
            (true, false) if one_may_be_down => Some(((&a, &params_a), (&b, &params_b))),
            (false, true) if one_may_be_down => Some(((&b, &params_b), (&a, &params_a))),
            _ => None,
        };
        let (ra, rb) = match skip {
            None => tokio::join!(connect(&a, &params_a), connect(&b, &params_b)),
            Some(((spec, params), (kept_spec, kept_params))) => {
                let (kept, other) = match connect(kept_spec, kept_params).await {
                    Ok(kept) => {
                        tracing::info!(replica = %spec.id, "out of sync at the arbiter: not waiting for it, connecting in the background");
                        let later = ReplicaHandle::unreachable(
                            spec.clone(),
                            params.clone(),
                            metrics.handles(vol, spec.id.as_str()),
                            kept.size(),
                        );
                        (Ok(kept), Ok(later))
                    }
                    // The in-sync one did not answer: the other is connected
                    // to as usual (the reconcile then waits for the in-sync
                    // one), and the failed attempt stands as it is.
                    Err(e) => (Err(e), connect(spec, params).await),
                };
                if spec.id == a.id {
                    (other, kept)
                } else {
                    (kept, other)
                }
            }
        };
        let later = |spec: &ReplicaSpec, params: SessionParams, e: &ConnectError, size: u64| {
            tracing::warn!(replica = %spec.id, error = %crate::error_chain(e), "replica unreachable at startup: connecting in the background");
            ReplicaHandle::unreachable(
                spec.clone(),
                params,
                metrics.handles(vol, spec.id.as_str()),
                size,
            )
        };
        let (ra, rb) = match (ra, rb) {
            (Ok(ra), Err(e)) if one_may_be_down && !e.is_permanent() => {
                let size = ra.size();
                (ra, later(&b, params_b, &e, size))
            }
            (Err(e), Ok(rb)) if one_may_be_down && !e.is_permanent() => {
                let size = rb.size();
                (later(&a, params_a, &e, size), rb)
            }
            (ra, rb) => (ra?, rb?),
        };
        if let Some(target) = grow_to.filter(|&t| t >= ra.size().max(rb.size()))
            && (ra.size() != rb.size() || ra.size() < target)
        {
            resize::grow_both(&ra, &rb, target).await?;
        }
        if ra.size() != rb.size() {
            return Err(MirrorError::SizeMismatch {
                a: a.id,
                a_size: ra.size(),
                b: b.id,
                b_size: rb.size(),
            });
        }
        let (membership, _) = watch::channel(Membership {
            in_sync: [true, true],
            catch_up: [false, false],
            fenced: None,
            fence_told: [SessionGen(0); 2],
        });
        for (i, r) in [&ra, &rb].into_iter().enumerate() {
            spawn_state_gauge(
                r,
                i,
                membership.subscribe(),
                metrics.clone(),
                config.volume.clone(),
            );
        }
        tracing::info!(volume = %config.volume, size = ra.size(), epoch = config.epoch.0, local = %config.local, "mirror connected to both replicas");
        Ok(Self {
            inner: Arc::new(Inner {
                size: AtomicU64::new(ra.size()),
                resizing: tokio::sync::Mutex::new(()),
                metrics: metrics.handles(vol, ""),
                volume: config.volume,
                replicas: [Arc::new(ra), Arc::new(rb)],
                local,
                epoch: config.epoch,
                membership,
                skipping: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
                progress: watch::channel([None, None]).0,
                degrade: OnceLock::new(),
                writes: WritesInFlight::default(),
                conflicts: Conflicts::new(),
                unsettled: AtomicBool::new(false),
            }),
        })
    }

    /// Turns on degraded operation: replica calls time out after `timeout`,
    /// lost replicas leave the in-sync set through `arbiter`, returning
    /// ones come back through it, and nothing is acknowledged unless
    /// `lease` is valid. First applies the arbiter's in-sync set and
    /// reconciles what a previous frontend may have left half-written
    /// (`failover::FailoverTask`); returns once that is done. Call it once,
    /// before serving anything.
    pub async fn enable_failover<A: Arbiter>(
        &mut self,
        arbiter: Arc<A>,
        me: FrontendId,
        lease: Arc<LeaseGuard>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (fences, fences_rx) = mpsc::unbounded_channel();
        let inner = &self.inner;
        if inner
            .degrade
            .set(Degrade {
                suspects: tx,
                fences,
                lease: lease.clone(),
                timeout,
            })
            .is_err()
        {
            tracing::error!(volume = %inner.volume, "degraded operation was already on; ignoring a second enable_failover");
            return;
        }
        let failover = Failover {
            arbiter,
            me,
            epoch: inner.epoch,
            lease,
            replicas: inner.replicas.clone(),
            local: inner.local,
            membership: inner.membership.clone(),
            skipping: inner.skipping.clone(),
            progress: inner.progress.clone(),
            metrics,
            volume: inner.volume.clone(),
        };
        let task = failover.reconcile_at_start().await;
        tokio::spawn(task.run(rx, fences_rx));
    }

    /// The in-sync set as this frontend applies it (for status).
    pub fn membership(&self) -> watch::Receiver<Membership> {
        self.inner.membership.subscribe()
    }

    /// Bytes still to copy to each catching-up replica (for status).
    pub fn catch_up_progress(&self) -> watch::Receiver<[Option<u64>; 2]> {
        self.inner.progress.subscribe()
    }

    /// Each replica connection's state, indexed like the replicas.
    pub fn watch_replica_connections(&self) -> [watch::Receiver<ReplicaState>; 2] {
        [
            self.inner.replicas[0].watch_state(),
            self.inner.replicas[1].watch_state(),
        ]
    }

    /// The epoch this frontend runs at.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// Writes (trims, write-zeroes) still running, whether or not anybody
    /// waits for them.
    pub fn writes_in_flight(&self) -> u64 {
        self.inner.writes.count.load(Ordering::SeqCst)
    }

    /// Waits up to `deadline` until no write is in flight; whether none is.
    /// Writes held for a lost replica stay in flight until the fail-over
    /// (or the replica's return) releases them.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let writes = &self.inner.writes;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let idle = writes.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if writes.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                return writes.count.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// After a successful final flush with nothing in flight: tells every
    /// replica that gets writes to forget its activity-log extents, so that
    /// the next frontend has nothing to reconcile. Nothing is on one of
    /// them only: every write reached both, or the in-sync one marked what
    /// the other misses in its dirty bitmap. Refused while writes are in
    /// flight, or once a write ended with the copies possibly different
    /// and nothing recording it (see the module doc): the extents then stay
    /// for the next frontend.
    pub async fn forget_activity(&self) -> Result<(), BackendError> {
        let inner = &self.inner;
        let m = inner.membership.borrow().clone();
        if m.fenced.is_some() {
            return Ok(());
        }
        let in_flight = self.writes_in_flight();
        if in_flight > 0 {
            return Err(BackendError::Io(format!(
                "{in_flight} writes are still in flight; the activity logs are kept for the next frontend"
            )));
        }
        if inner.unsettled.load(Ordering::SeqCst) {
            return Err(BackendError::Io(
                "a write failed after it may have reached one replica only; the activity logs are kept for the next frontend to reconcile".to_owned(),
            ));
        }
        let sends = [m.gets_writes(0), m.gets_writes(1)];
        let one = |i: usize| async move {
            if sends[i] {
                inner.call(i, Op::ForgetActivity).await.map(|_| ())
            } else {
                Ok(())
            }
        };
        let (a, b) = tokio::join!(one(0), one(1));
        a.and(b).map_err(backend_error)
    }

    pub fn volume(&self) -> &VolumeId {
        &self.inner.volume
    }

    /// The state of each replica, local first.
    pub fn replica_states(&self) -> Vec<(ReplicaId, ReplicaState)> {
        self.replica_states_indexed()
            .into_iter()
            .map(|(_, id, state)| (id, state))
            .collect()
    }

    /// The state of each replica with its index, local first.
    pub fn replica_states_indexed(&self) -> Vec<(usize, ReplicaId, ReplicaState)> {
        let inner = &self.inner;
        [inner.local, 1 - inner.local]
            .into_iter()
            .map(|i| (i, inner.replicas[i].id().clone(), inner.state_of(i)))
            .collect()
    }

    /// Runs `op` (a write, trim or write-zeroes) to its end, whatever
    /// happens to its caller (see the module doc and [`Unended`]); its
    /// result, if the caller still waits.
    async fn detached(&self, op: Op) -> Result<(), BackendError> {
        let unended = Unended::new(&self.inner, &op);
        unended.wait_turn().await;
        let r = self.inner.both(op).await;
        unended.end(&r);
        r
    }

    /// Splits a trim or write-zeroes of `len` bytes at `offset` into
    /// [`DISCARD_CHUNK`] pieces built by `op`, a few in flight at once, each
    /// run to its end; the first error, once all are done.
    async fn discard(
        &self,
        offset: u64,
        len: u32,
        op: impl Fn(u64, u32) -> Op,
    ) -> Result<(), BackendError> {
        let pieces = discard_chunks(offset, u64::from(len)).map(|(o, l)| self.detached(op(o, l)));
        let results: Vec<_> = futures::stream::iter(pieces)
            .buffer_unordered(DISCARD_PARALLEL)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn measure<T>(&self, op: IoOp, started: Instant, bytes: u64, r: &Result<T, BackendError>) {
        self.inner.metrics.record(op, started, bytes, r.is_ok());
    }
}

impl Inner {
    fn state_of(&self, i: usize) -> ReplicaState {
        self.membership
            .borrow()
            .replica_state(i, self.replicas[i].state())
    }

    /// Sends `op` to replica `i`; with degraded operation on, see
    /// [`Inner::call_patient`] (a read may give up on a slow replica).
    async fn call(&self, i: usize, op: Op) -> Result<Reply, CallError> {
        match self.call_patient(i, op, Patience::Wait).await {
            Waited::Reply(r) => r,
            Waited::Slow => unreachable!("only Patience::Hedge gives up on a live replica"),
        }
    }

    /// Sends `op` to replica `i`. With degraded operation on, the request
    /// fails (`TimedOut`, a loss) once the replica has been *silent* — no
    /// answer to anything since the request was sent — for the replica
    /// timeout T; while it waits, a probe goes out every T/4 of silence.
    /// A replica that answers (other requests, or the probe) is slow, not
    /// lost: a disk stalled for seconds by load is no site loss, and
    /// dropping the replica for it would cost a resync. It is waited for
    /// up to [`SLOW_REPLICA_LIMIT`] — except by a catching-up replica's
    /// call (a returning replica that is slow only ends its catch-up, as
    /// before, after T) and with `Patience::Hedge` (a read that has
    /// another in-sync replica to try: `Slow` after T). A silent replica
    /// (power lost, link cut, process stopped) fails the request T to
    /// 1.25 T after its last answer or the request, whichever is later.
    async fn call_patient(&self, i: usize, op: Op, patience: Patience) -> Waited {
        let replica = &self.replicas[i];
        let Some(d) = self.degrade.get() else {
            return Waited::Reply(replica.call(op).await);
        };
        let started = Instant::now();
        let timed_out = || {
            Waited::Reply(Err(CallError::TimedOut {
                replica: replica.id().clone(),
                after: started.elapsed(),
            }))
        };
        let step = d.timeout / 4;
        let call = replica.call(op);
        tokio::pin!(call);
        let mut slow_logged = false;
        loop {
            if let Ok(r) = tokio::time::timeout(step, &mut call).await {
                if slow_logged {
                    tracing::info!(replica = %replica.id(), after_ms = started.elapsed().as_millis() as u64, "the slow replica answered");
                }
                return Waited::Reply(r);
            }
            let waited = started.elapsed();
            let silent = replica.silent_for(started);
            if silent >= d.timeout || waited >= SLOW_REPLICA_LIMIT {
                return timed_out();
            }
            if waited >= d.timeout {
                // A catching-up replica (not in the in-sync set) that is
                // slow only ends its catch-up.
                if !self.membership.borrow().in_sync[i] {
                    return timed_out();
                }
                if patience == Patience::Hedge {
                    return Waited::Slow;
                }
                if !slow_logged {
                    slow_logged = true;
                    tracing::info!(replica = %replica.id(), waited_ms = waited.as_millis() as u64, limit_s = SLOW_REPLICA_LIMIT.as_secs(), "a request is slow but the replica answers: still waiting");
                }
            }
            if silent >= step {
                replica.probe(step, d.timeout);
            }
        }
    }

    /// Whether `e` means the replica is gone (rather than refusing this
    /// request) and degraded operation may drop it. A replica whose copy
    /// failed (an fdatasync error: it may have lost acknowledged writes)
    /// counts as gone.
    fn is_loss(&self, e: &CallError) -> bool {
        self.degrade.get().is_some()
            && matches!(
                e,
                CallError::ConnectionLost { .. }
                    | CallError::TimedOut { .. }
                    | CallError::Stopped { .. }
                    | CallError::Refused {
                        source: WireError::VolumeFailed { .. },
                        ..
                    }
            )
    }

    /// Whether replica `i` failing with `e` while the other in-sync replica
    /// has the request makes the copies differ unless `i` leaves the
    /// in-sync set (degraded operation): any failure but being fenced.
    fn is_one_sided(&self, e: &CallError) -> bool {
        self.degrade.get().is_some()
            && !matches!(
                e,
                CallError::Fenced { .. }
                    | CallError::Refused {
                        source: WireError::StaleEpoch { .. } | WireError::OutOfRange { .. },
                        ..
                    }
            )
    }

    /// The last check before an acknowledgement: the lease. While it is
    /// out (not renewed in time) the answer is held — no acknowledgement,
    /// no error (design invariants 2 and 4) — until a renewal succeeds
    /// (which proves nobody else took it: nothing happened to the volume
    /// meanwhile, so the answer is still true) or the frontend is fenced
    /// for good (then the error).
    async fn may_ack(&self) -> Result<(), BackendError> {
        let Some(d) = self.degrade.get() else {
            return Ok(());
        };
        if d.lease.valid() {
            return Ok(());
        }
        let fenced = || BackendError::Fenced {
            reason: "the lease was taken over: fenced for good".to_owned(),
        };
        let mut membership = self.membership.subscribe();
        loop {
            if membership.borrow_and_update().fenced.is_some() {
                return Err(fenced());
            }
            tokio::select! {
                state = d.lease.settled() => return match state {
                    LeaseState::Held => Ok(()),
                    _ => Err(fenced()),
                },
                r = membership.changed() => if r.is_err() {
                    return Err(BackendError::Io("the mirror is shutting down".to_owned()));
                },
            }
        }
    }

    /// The replicas reads may go to, best first: in-sync ones only, the
    /// local one first unless its connection is down and the other's is up.
    fn read_order(&self) -> Vec<usize> {
        let m = self.membership.borrow().in_sync;
        let (l, o) = (self.local, 1 - self.local);
        let up = |i: usize| self.replicas[i].state() == ReplicaState::InSync;
        let mut order = if !up(l) && up(o) {
            vec![o, l]
        } else {
            vec![l, o]
        };
        order.retain(|&i| m[i]);
        order
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let mut last = None;
        let order = self.read_order();
        for (n, &i) in order.iter().enumerate() {
            let started = Instant::now();
            // A slow replica is not waited for while another may answer.
            let patience = if n + 1 < order.len() {
                Patience::Hedge
            } else {
                Patience::Wait
            };
            let r = match self
                .call_patient(i, Op::Read { offset, len }, patience)
                .await
            {
                Waited::Reply(r) => r,
                Waited::Slow => {
                    tracing::debug!(replica = %self.replicas[i].id(), offset, len, "read: the replica is slow; trying the other");
                    continue;
                }
            };
            match r {
                Ok(Reply::Data(d)) if d.len() == len as usize => {
                    self.may_ack().await?;
                    return Ok(d);
                }
                Ok(_) => {
                    return Err(BackendError::Io(format!(
                        "replica returned a malformed reply to a read of {len} bytes at {offset}"
                    )));
                }
                Err(e) if self.is_loss(&e) => {
                    self.suspect(i, started);
                    last = Some(e);
                }
                Err(e) => return Err(backend_error(e)),
            }
        }
        Err(last.map_or_else(
            || BackendError::Fenced {
                reason: "no in-sync replica".to_owned(),
            },
            backend_error,
        ))
    }

    fn suspect(&self, index: usize, since: Instant) {
        if let Some(d) = self.degrade.get() {
            let _ = d.suspects.send(Suspect { index, since });
        }
    }

    /// Sends `op` to every replica that gets writes (the in-sync ones and a
    /// catching-up one) at once; done when all are. A lost in-sync replica
    /// holds the request until it left the in-sync set, then the request is
    /// sent again to the new set. A catching-up replica that fails stops
    /// catching up and the request is sent again to the in-sync one alone,
    /// unflagged, so that it records the region for the resync before the
    /// acknowledgement.
    async fn both(&self, mut op: Op) -> Result<(), BackendError> {
        let mut rx = self.membership.subscribe();
        loop {
            let m = rx.borrow_and_update().clone();
            if let Some(reason) = m.fenced {
                return Err(BackendError::Fenced { reason });
            }
            let sends = [m.gets_writes(0), m.gets_writes(1)];
            // A write a replica does not get waits until the in-sync one
            // holds the floor of the sessions given up to it: its resync
            // then fences them there before copying this write's region,
            // so nothing queued on them lands over it later.
            if self.fence_pending(&m, sends).is_some() {
                if rx.changed().await.is_err() {
                    return Err(BackendError::Io("the mirror is shutting down".to_owned()));
                }
                continue;
            }
            // Writes that reach both replicas carry the flag: a replica that
            // tracks its peer does not mark them dirty.
            set_mirrored(&mut op, sends[0] && sends[1]);
            let _skipped = Skipping::new(&self.skipping, sends);
            let started = Instant::now();
            let one = |i: usize| {
                let op = op.clone();
                async move {
                    if sends[i] {
                        Some(self.call(i, op).await)
                    } else {
                        None
                    }
                }
            };
            // To a catching-up replica only after the in-sync one has it:
            // a resync copy of the same region then either started after
            // the write (and carries it) or is seen as overlapped by it
            // there (and goes again) — never a copy older than the write
            // landing on the catching-up replica after it.
            let catching_up = (0..2).find(|&i| sends[i] && !m.in_sync[i]);
            let (a, b) = match catching_up {
                None => tokio::join!(one(0), one(1)),
                Some(c) => {
                    let first = one(1 - c).await;
                    let second = match &first {
                        Some(Ok(_)) | None => one(c).await,
                        // Held or failed on the in-sync replica: decided
                        // below; the catching-up one gets it when re-sent.
                        Some(Err(_)) => None,
                    };
                    if c == 0 {
                        (second, first)
                    } else {
                        (first, second)
                    }
                }
            };
            let mut lost = false;
            // The lost replica is the last in sync: nobody can take it
            // out, so only its return releases the request.
            let mut last_lost = false;
            let mut again = false;
            // Which replicas have the request now.
            let got = [matches!(a, Some(Ok(_))), matches!(b, Some(Ok(_)))];
            // Replicas this write may go on without (the other one is in
            // sync), whose sessions are given up.
            let mut give_up = [false; 2];
            for (i, r) in [a, b].into_iter().enumerate() {
                match r {
                    None | Some(Ok(_)) => {}
                    Some(Err(e)) if !m.in_sync[i] => {
                        // A catching-up replica failed. Decided atomically
                        // against a rejoin that may have just made it in
                        // sync: then it is the loss of an in-sync replica.
                        let mut now_in_sync = false;
                        let demoted = self.membership.send_if_modified(|mm| {
                            if mm.in_sync[i] {
                                now_in_sync = true;
                                false
                            } else if mm.catch_up[i] {
                                mm.catch_up[i] = false;
                                true
                            } else {
                                false
                            }
                        });
                        if !now_in_sync {
                            // What it did not answer must not land later:
                            // every session to it so far is given up; the
                            // re-send to the in-sync replica alone waits
                            // until that one holds the floor
                            // (`fence_pending`).
                            self.replicas[i].give_up();
                            if demoted {
                                tracing::warn!(volume = %self.volume, replica = %self.replicas[i].id(), error = %e, "catching-up replica failed a request: it stops catching up; the in-sync replica records the region for the resync");
                            }
                            again = true;
                        } else if self.is_loss(&e) || (got[1 - i] && self.is_one_sided(&e)) {
                            self.suspect(i, started);
                            lost = true;
                            give_up[i] = true;
                        } else {
                            tracing::warn!(volume = %self.volume, error = %e, "mirrored request failed");
                            return Err(backend_error(e));
                        }
                    }
                    Some(Err(e)) if self.is_loss(&e) => {
                        self.suspect(i, started);
                        lost = true;
                        last_lost |= !m.in_sync[1 - i];
                        give_up[i] = m.in_sync[1 - i];
                    }
                    Some(Err(e)) if got[1 - i] && m.in_sync[1 - i] && self.is_one_sided(&e) => {
                        // The other in-sync replica applied it: answering
                        // with this error would leave the copies different
                        // while both count as in sync. This one leaves the
                        // set instead, and the survivor, told first, gets
                        // the request again and records it for the resync.
                        tracing::warn!(volume = %self.volume, replica = %self.replicas[i].id(), error = %e, "a replica failed a request the other in-sync replica applied: it leaves the in-sync set");
                        self.suspect(i, started);
                        lost = true;
                        give_up[i] = true;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(volume = %self.volume, error = %e, "mirrored request failed");
                        return Err(backend_error(e));
                    }
                }
            }
            if modifies(&op) {
                // A write that timed out there may still land there later
                // (its session may even be a new one, opened after the
                // fail-over gave up the old ones): given up too, before the
                // write is acknowledged without that replica.
                for (i, g) in give_up.into_iter().enumerate() {
                    if g {
                        self.replicas[i].give_up();
                    }
                }
            }
            if lost {
                // Held: no acknowledgement until the in-sync set changed —
                // or, when the lost replica is the last in sync (it cannot
                // be dropped), until it answers again: tried again every
                // HELD_RETRY.
                let retry = async {
                    if last_lost {
                        tokio::time::sleep(HELD_RETRY).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = rx.changed() => if r.is_err() {
                        return Err(BackendError::Io("the mirror is shutting down".to_owned()));
                    },
                    () = retry => {}
                }
                continue;
            }
            if again {
                continue;
            }
            return self.may_ack().await;
        }
    }

    /// A replica that does not get this write and whose given-up sessions
    /// the in-sync peer does not know of yet (the fail-over task is asked
    /// to tell it), if any.
    fn fence_pending(&self, m: &Membership, sends: [bool; 2]) -> Option<usize> {
        let d = self.degrade.get()?;
        let i =
            (0..2).find(|&i| !sends[i] && m.fence_told[i] < self.replicas[i].abandoned_below())?;
        let _ = d.fences.send(i);
        Some(i)
    }
}

fn spawn_state_gauge(
    r: &ReplicaHandle,
    index: usize,
    mut membership: watch::Receiver<Membership>,
    metrics: Arc<Metrics>,
    volume: VolumeId,
) {
    let mut rx = r.watch_state();
    let id = r.id().clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let conn = *rx.borrow_and_update();
            let state = membership.borrow_and_update().replica_state(index, conn);
            if last != Some(state) {
                tracing::info!(volume = %volume, replica = %id, state = state.name(), "replica state");
                last = Some(state);
            }
            metrics.set_replica_state(
                volume.as_str(),
                id.as_str(),
                &ReplicaState::ALL,
                state.name(),
            );
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = membership.changed() => if r.is_err() { return },
            }
        }
    });
}

/// Whether `op` changes the volume's data.
fn modifies(op: &Op) -> bool {
    matches!(
        op,
        Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
    )
}

/// The bytes `op` changes, if it changes any.
fn modified_range(op: &Op) -> Option<Range> {
    match op {
        Op::Write { offset, data, .. } => Some(Range::new(*offset, data.len() as u64)),
        Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
            Some(Range::new(*offset, u64::from(*len)))
        }
        _ => None,
    }
}

/// Sets `op`'s `mirrored` flag to `v` (data requests only).
fn set_mirrored(op: &mut Op, v: bool) {
    match op {
        Op::Write { mirrored, .. }
        | Op::Trim { mirrored, .. }
        | Op::WriteZeroes { mirrored, .. } => *mirrored = v,
        _ => {}
    }
}

/// Counts a request in flight that a replica does not get (see
/// [`Mirror::skipping`]).
struct Skipping<'a> {
    counts: &'a [AtomicU64; 2],
    skipped: [bool; 2],
}

impl<'a> Skipping<'a> {
    fn new(counts: &'a [AtomicU64; 2], sends: [bool; 2]) -> Self {
        let skipped = [!sends[0], !sends[1]];
        for i in 0..2 {
            if skipped[i] {
                counts[i].fetch_add(1, Ordering::SeqCst);
            }
        }
        Self { counts, skipped }
    }
}

impl Drop for Skipping<'_> {
    fn drop(&mut self) {
        for i in 0..2 {
            if self.skipped[i] {
                self.counts[i].fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

fn backend_error(e: CallError) -> BackendError {
    match e {
        CallError::Refused {
            source: WireError::OutOfRange { offset, len, size },
            ..
        } => BackendError::OutOfRange { offset, len, size },
        CallError::Refused {
            source: e @ WireError::StaleEpoch { .. },
            ..
        } => BackendError::Fenced {
            reason: e.to_string(),
        },
        e @ CallError::Fenced { .. } => BackendError::Fenced {
            reason: e.to_string(),
        },
        e => BackendError::Io(e.to_string()),
    }
}

/// Splits `[offset, offset + len)` into protocol-sized chunks.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    split(offset, len, MAX_IO_BYTES)
}

/// Splits `[offset, offset + len)` into trim / write-zeroes pieces.
fn discard_chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    split(offset, len, DISCARD_CHUNK)
}

fn split(offset: u64, len: u64, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max);
    (0..len.div_ceil(max)).map(move |i| {
        let start = i * max;
        (offset + start, (len - start).min(max) as u32)
    })
}

impl BlockBackend for Mirror {
    fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let started = Instant::now();
        let inner = &self.inner;
        check_range(offset, u64::from(len), self.size())?;
        let r = if len <= MAX_IO_BYTES {
            inner.read_chunk(offset, len).await
        } else {
            let parts =
                try_join_all(chunks(offset, u64::from(len)).map(|(o, l)| inner.read_chunk(o, l)))
                    .await;
            parts.map(|parts| {
                let mut out = BytesMut::with_capacity(len as usize);
                for p in parts {
                    out.extend_from_slice(&p);
                }
                out.freeze()
            })
        };
        self.measure(IoOp::Read, started, u64::from(len), &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let started = Instant::now();
        let len = data.len() as u64;
        check_range(offset, len, self.size())?;
        let r = if len <= u64::from(MAX_IO_BYTES) {
            self.detached(Op::Write {
                offset,
                fua,
                mirrored: false,
                data,
            })
            .await
        } else {
            // Every chunk runs to its end, whatever the others do; the
            // first error once all are done.
            join_all(chunks(offset, len).map(|(o, l)| {
                let start = (o - offset) as usize;
                let part = data.slice(start..start + l as usize);
                self.detached(Op::Write {
                    offset: o,
                    fua,
                    mirrored: false,
                    data: part,
                })
            }))
            .await
            .into_iter()
            .collect()
        };
        self.measure(IoOp::Write, started, len, &r);
        r
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let started = Instant::now();
        let r = self.inner.both(Op::Flush).await;
        self.measure(IoOp::Flush, started, 0, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        let started = Instant::now();
        check_range(offset, u64::from(len), self.size())?;
        let r = self
            .discard(offset, len, |offset, len| Op::Trim {
                offset,
                len,
                mirrored: false,
            })
            .await;
        self.measure(IoOp::Trim, started, u64::from(len), &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), BackendError> {
        let started = Instant::now();
        check_range(offset, u64::from(len), self.size())?;
        // In pieces, FUA becomes one flush after all of them.
        let pieces = u64::from(len).div_ceil(u64::from(DISCARD_CHUNK));
        let piece_fua = fua && pieces == 1;
        let mut r = self
            .discard(offset, len, |offset, len| Op::WriteZeroes {
                offset,
                len,
                fua: piece_fua,
                mirrored: false,
            })
            .await;
        if r.is_ok() && fua && !piece_fua {
            r = self.inner.both(Op::Flush).await;
        }
        self.measure(IoOp::WriteZeroes, started, u64::from(len), &r);
        r
    }
}

mod resize;
pub use resize::ResizeError;

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
