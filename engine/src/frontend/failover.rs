//! Degraded operation: taking a lost replica out of the in-sync set through
//! the arbiter before any write is acknowledged without it (design
//! invariant 2).
//!
//! One task (the [`FailoverTask::run`] loop) owns the procedure, so that concurrent
//! writers that all saw the same replica fail trigger one swap. Writers
//! report a suspect and wait on the [`Membership`] watch; the task reads the
//! record, decides with the pure [`decide`], swaps (compare-and-swap on the
//! version it read; a conflict is re-read and re-decided), tells the
//! survivor that its peer left (`PeerState`, answered once the survivor
//! tracks the regions its peer misses), and only then publishes the new
//! membership, which releases the held writes to complete on the survivor.
//!
//! A frontend that can reach neither the arbiter nor its peer keeps trying,
//! logging at most once a second, and never guesses: the held writes stay
//! held and its lease runs out (self-fence).
//!
//! The same task brings a replica back (the rejoin, design invariant 5),
//! one step per tick so that a loss is never kept waiting behind it:
//! 1. the replica answers again: the task re-reads the record, tells the
//!    in-sync replica again that its peer is out (`PeerState`, idempotent;
//!    it starts a full copy if its bitmap was lost), and marks dirty on the
//!    in-sync one whatever the returning replica may have lost: the
//!    activity-log extents it recovered at a restart (`RecoveredExtents`:
//!    writes both acknowledged but not yet flushed when its site lost
//!    power — the activity log keeps an extent until its writes are
//!    durable — which the in-sync one's bitmap does not have, being
//!    written while both were in sync), and, the first time after this
//!    frontend found it out at its start, all its extents (what a crashed
//!    predecessor left on it alone); then it forgets exactly those
//!    (`ForgetExtents`);
//! 2. the in-sync replica's resync copies what the replica missed while
//!    writes still go to the in-sync replica alone (at full speed), until
//!    less than `CATCH_UP_BELOW` is left (or `CATCH_UP_WAIT` passed);
//! 3. *catch-up*: every write now goes to the returning replica too — once
//!    the in-sync one has it, so that no resync copy older than the write
//!    can land after it — and must succeed there (if it fails there, the
//!    replica stops catching up and the write is re-sent to the in-sync one
//!    alone, which records it);
//!    such writes carry the `mirrored` flag, so the in-sync replica does
//!    not mark them dirty and its resync converges under load;
//! 4. once the requests sent without it have drained, the task polls the
//!    in-sync replica's resync (`ResyncStatus`) until nothing is dirty;
//! 5. it makes the replica in sync locally (writes to it are then required
//!    and its loss is a fail-over), swaps it back in at the arbiter
//!    (`ReturnToInSync`, compare-and-swap) and tells the in-sync replica,
//!    which stops tracking.
//!
//! An arbiter update that fails without an answer (a timeout, an
//! unreachable API server) may still have landed, so its outcome is
//! *unknown*, and nothing that depends on it is decided before the record
//! is read again. For the return that means: the replica stays in sync
//! locally (a write it fails is a fail-over, which takes it out through a
//! compare-and-swap on a fresh read — never a catch-up failure that would
//! acknowledge on the in-sync replica alone while the record may list both),
//! and every tick re-reads the record and swaps again until it knows. A
//! fail-over of the *other* replica first settles that return (the record
//! must list the survivor in sync before anything is acknowledged on it
//! alone). The fail-over's own swap re-reads after an unknown outcome
//! (`swap_out` reads, decides `AlreadyOut` if it landed), and so does the
//! startup reconciliation (retried whole from a fresh read).
//!
//! A replica whose connection breaks may have restarted — its site may
//! have lost power, and with it what it had not flushed — and answers after
//! its restart as if nothing happened. So a broken connection of an in-sync
//! replica is a loss (it is taken out, and its return marks what it
//! recovered), and one of a returning replica starts its return again.
//!
//! Every record this frontend learns is published to the replicas as a
//! view (`PeerState`, numbered by [`Views`]) before anything relies on it:
//! the survivor learns the record that drops its peer before any write is
//! acknowledged without that peer, a returning replica learns that it is
//! out (then back in), and at startup both learn the record as it stands.
//! That is what lets a replica judge which way a resync may go
//! (`replica::direction`). With a view goes the floor of this frontend's
//! given-up sessions to the peer (`fence`): whenever this frontend gives up
//! a connection to a replica (a loss, a catch-up that failed), the in-sync
//! replica learns the floor — durably, before any write that the given-up
//! replica does not get — and its resync fences those sessions on the
//! replica before it copies anything more (`replica::sessions`).
//!
//! At startup ([`Failover::reconcile_at_start`]), before anything is
//! served, the new frontend reconciles what its predecessor may have left
//! half-written: the activity-log extents of the replicas. If any exist, one
//! replica (the local one if it can) becomes the source: the other leaves
//! the in-sync set through the arbiter, the extents of both are marked dirty
//! on the source, both forget them, and the rejoin above copies them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::arbiter::{Arbiter, ArbiterError, Change, FrontendId, VolumeRecord};
use crate::metrics::Metrics;
use crate::protocol::{
    ByteRange, Epoch, MAX_RANGES, Op, ReplicaId, Reply, ResyncReport, SessionGen, SyncView,
    VolumeId,
};

use super::connection::{CallError, ReplicaHandle, ReplicaState};
use super::lease::{LeaseGuard, RateLimit};
use super::record_view::Views;

/// How often the rejoin takes a step.
const REJOIN_TICK: Duration = Duration::from_millis(100);
/// Longest wait for one control request of the rejoin or the startup.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// The catch-up (writes sent to the returning replica too, after the
/// in-sync one) starts once the resync has less than this left to copy, or
/// after `CATCH_UP_WAIT` whatever is left: during the bulk of the copy the
/// foreground writes to one replica only.
const CATCH_UP_BELOW: u64 = 64 << 20;
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// How long a returning replica has to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the rejoin waits before retrying after a failed step, at most.
const REJOIN_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Which replicas get writes, as this frontend last agreed with the arbiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Indexed like the mirror's replicas.
    pub in_sync: [bool; 2],
    /// Out of the in-sync set but catching up: gets every write, required
    /// while this holds (a failure there ends the catch-up).
    pub catch_up: [bool; 2],
    /// Set when this frontend must not acknowledge anything any more.
    pub fenced: Option<String>,
    /// Per replica, the floor of this frontend's given-up sessions to it
    /// that the in-sync peer holds durably: a write that replica does not
    /// get waits until this reaches its handle's floor
    /// ([`ReplicaHandle::abandoned_below`]).
    pub fence_told: [SessionGen; 2],
}

impl Membership {
    /// Whether replica `i` is sent writes.
    pub fn gets_writes(&self, i: usize) -> bool {
        self.in_sync[i] || self.catch_up[i]
    }

    /// What to show for replica `i` whose connection is in `conn`.
    pub fn replica_state(&self, i: usize, conn: ReplicaState) -> ReplicaState {
        if self.in_sync[i] {
            conn
        } else if self.catch_up[i] {
            ReplicaState::CatchingUp
        } else {
            ReplicaState::OutOfSync
        }
    }
}

/// A writer's report that a replica failed or timed out.
#[derive(Debug, Clone)]
pub struct Suspect {
    pub index: usize,
    /// When the failed call started: the I/O pause is measured from here.
    pub since: Instant,
}

/// What to do about a lost replica, given the arbiter's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Remove it with a swap on this version.
    Swap,
    /// The record already has it out (an earlier swap of ours): go on.
    AlreadyOut,
    /// The survivor was removed instead, or another frontend owns the
    /// volume: this frontend lost and must fence.
    Fence(String),
}

/// What to do about returning a caught-up replica, given the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnDecision {
    /// Return it with a swap on this version.
    Swap,
    /// The record already has it in sync.
    AlreadyIn,
    /// This frontend does not own the volume (or the record contradicts
    /// it): fence.
    Fence(String),
}

/// The pure rule for a return to the in-sync set.
pub fn decide_return(
    record: &VolumeRecord,
    me: &FrontendId,
    epoch: Epoch,
    returning: &ReplicaId,
    source: &ReplicaId,
) -> ReturnDecision {
    if let Err(why) = owns(record, me, epoch) {
        return ReturnDecision::Fence(why);
    }
    if !record.in_sync.contains(source) {
        return ReturnDecision::Fence(format!(
            "replica {source}, which this frontend copies from, is out of the in-sync set at the arbiter"
        ));
    }
    if record.in_sync.contains(returning) {
        ReturnDecision::AlreadyIn
    } else {
        ReturnDecision::Swap
    }
}

/// Whether `me` at `epoch` is the frontend the record names.
fn owns(record: &VolumeRecord, me: &FrontendId, epoch: Epoch) -> Result<(), String> {
    if record.epoch != epoch {
        return Err(format!(
            "the volume's epoch is {} but this frontend runs at {epoch}",
            record.epoch
        ));
    }
    match &record.lease {
        Some(l) if l.holder == *me => Ok(()),
        other => Err(format!(
            "the lease is held by {}",
            other
                .as_ref()
                .map_or_else(|| "nobody".to_owned(), |l| l.holder.to_string())
        )),
    }
}

/// The pure fail-over rule.
pub fn decide(
    record: &VolumeRecord,
    me: &FrontendId,
    epoch: Epoch,
    lost: &ReplicaId,
    survivor: &ReplicaId,
) -> Decision {
    if let Err(why) = owns(record, me, epoch) {
        return Decision::Fence(why);
    }
    if !record.in_sync.contains(survivor) {
        return Decision::Fence(format!(
            "replica {survivor} was removed from the in-sync set instead of {lost}"
        ));
    }
    if record.in_sync.contains(lost) {
        Decision::Swap
    } else {
        Decision::AlreadyOut
    }
}

/// What the fail-over task needs.
pub struct Failover<A> {
    pub arbiter: Arc<A>,
    pub me: FrontendId,
    pub epoch: Epoch,
    pub lease: Arc<LeaseGuard>,
    pub replicas: [Arc<ReplicaHandle>; 2],
    /// The replica on this frontend's site (the preferred source).
    pub local: usize,
    pub membership: watch::Sender<Membership>,
    /// The mirror's count of requests in flight each replica does not get.
    pub skipping: Arc<[AtomicU64; 2]>,
    /// Where the catch-up progress is published (for status).
    pub progress: watch::Sender<[Option<u64>; 2]>,
    pub metrics: Arc<Metrics>,
    pub volume: VolumeId,
}

/// Where the return of one out-of-sync replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not catching up; started when the replica answers.
    Idle,
    /// The in-sync replica's resync copies the bulk of what it missed;
    /// writes still go to the in-sync replica alone (at full speed), until
    /// little is left (`CATCH_UP_BELOW`).
    Copying,
    /// Gets every write; waiting for requests sent without it to finish.
    Draining,
    /// Waiting for the in-sync replica's resync to have nothing dirty.
    Polling,
}

struct Rejoin {
    phase: Phase,
    /// Not before this (after a failed step).
    retry_at: Instant,
    backoff: Duration,
    /// Its activity-log extents must be marked on the source before it
    /// catches up (it was out, or unreachable, when this frontend started).
    reconcile: bool,
    /// Its return to the in-sync set was sent to the arbiter without an
    /// answer: in sync locally, the record must be read again.
    unconfirmed: bool,
    /// Not before this is it told the current view again (after it did not
    /// take it).
    tell_at: Instant,
    tell_backoff: Duration,
    started: Instant,
    log: RateLimit,
    /// The incarnation of the copy that left the in-sync set, as this
    /// frontend knew it then (0: unknown). A return under another one is a
    /// recreated copy, which holds none of it: the whole volume is marked
    /// on the source before it catches up (the source's bitmap may be
    /// empty, and its resync, which would notice, runs only on dirty bits).
    left_as: u64,
}

impl Rejoin {
    fn new() -> Self {
        Self {
            phase: Phase::Idle,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(200),
            reconcile: false,
            unconfirmed: false,
            tell_at: Instant::now(),
            tell_backoff: Duration::from_millis(200),
            started: Instant::now(),
            log: RateLimit::new(Duration::from_secs(5)),
            left_as: 0,
        }
    }
}

/// The running task: the configuration plus the rejoin state.
pub struct FailoverTask<A> {
    f: Failover<A>,
    rejoin: [Rejoin; 2],
    views: Views,
}

impl<A: Arbiter> Failover<A> {
    /// Before anything is served: applies the record's in-sync set and
    /// reconciles the activity-log extents a predecessor may have left
    /// (see the module doc). Retries (logging) until it can decide; fences
    /// if this frontend turns out not to own the volume.
    pub async fn reconcile_at_start(self) -> FailoverTask<A> {
        let views = Views::new(self.epoch);
        let mut task = FailoverTask {
            f: self,
            rejoin: [Rejoin::new(), Rejoin::new()],
            views,
        };
        let mut log = RateLimit::new(Duration::from_secs(1));
        loop {
            match task.try_reconcile_at_start().await {
                Ok(()) => return task,
                Err(Step::Fence(why)) => {
                    task.fence(why);
                    return task;
                }
                Err(Step::Retry(why)) => {
                    if let Some(n) = log.allow() {
                        tracing::warn!(reason = %why, suppressed = n, "cannot reconcile the replicas' activity logs yet; nothing is served until then");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

impl<A: Arbiter> FailoverTask<A> {
    /// Handles suspects, fences to tell and returning replicas until the
    /// mirror goes away. `fences` names a replica whose given-up sessions
    /// the in-sync peer must learn before a write goes on without it.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Suspect>,
        mut fences: mpsc::UnboundedReceiver<usize>,
    ) {
        let mut tick = tokio::time::interval(REJOIN_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conns = [
            self.f.replicas[0].watch_state(),
            self.f.replicas[1].watch_state(),
        ];
        for c in conns.iter_mut() {
            c.borrow_and_update();
        }
        let mut watching = [true, true];
        loop {
            tokio::select! {
                biased;
                (i, state) = connection_changed(&mut conns, &mut watching) => {
                    self.connection_changed(i, state).await;
                }
                s = rx.recv() => {
                    let Some(s) = s else { return };
                    let current = self.f.membership.borrow().clone();
                    if current.fenced.is_some() || !current.in_sync[s.index] {
                        continue;
                    }
                    if !current.in_sync[1 - s.index] {
                        // Never drop the last in-sync replica: hold.
                        continue;
                    }
                    self.remove(s).await;
                    while rx.try_recv().is_ok() {}
                }
                Some(i) = fences.recv() => {
                    while fences.try_recv().is_ok() {}
                    if self.f.membership.borrow().fenced.is_none() {
                        self.tell_fence(i).await;
                    }
                }
                _ = tick.tick() => {
                    if self.f.membership.borrow().fenced.is_some() {
                        continue;
                    }
                    for i in 0..2 {
                        self.tell_fence(i).await;
                        self.tell_if_untold(i).await;
                        self.rejoin_step(i).await;
                    }
                }
            }
        }
    }

    /// Replica `i`'s connection broke (and maybe came back: a watch shows
    /// only the last state). A replica whose process restarted may have
    /// lost what it had not flushed — its site lost power — and answers
    /// as if nothing happened: so an in-sync one is taken out (its return
    /// then marks what it recovered, see the module doc), and a returning
    /// one starts its return again.
    async fn connection_changed(&mut self, i: usize, state: ReplicaState) {
        let m = self.f.membership.borrow().clone();
        if m.fenced.is_some() || state == ReplicaState::Fenced {
            return;
        }
        if m.in_sync[i] {
            if m.in_sync[1 - i] {
                tracing::warn!(replica = %self.id(i), state = state.name(), "connection to an in-sync replica lost: it may have restarted and lost writes it had not flushed");
                self.remove(Suspect {
                    index: i,
                    since: Instant::now(),
                })
                .await;
            }
        } else if m.catch_up[i] || self.rejoin[i].phase != Phase::Idle {
            self.give_up(
                i,
                "its connection was lost (it may have restarted): its return starts again",
            );
        }
    }

    fn fence(&self, why: String) {
        tracing::error!(reason = %why, "fenced: no more acknowledgements");
        self.f.lease.fence();
        self.f.membership.send_modify(|m| m.fenced = Some(why));
    }

    fn id(&self, i: usize) -> &ReplicaId {
        self.f.replicas[i].id()
    }

    /// Sends a control request to replica `i`, with a deadline.
    async fn ask(&self, i: usize, op: Op) -> Result<Reply, Step> {
        let name = op.name();
        match tokio::time::timeout(CONTROL_TIMEOUT, self.f.replicas[i].call(op)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e @ CallError::Fenced { .. })) => Err(Step::Fence(e.to_string())),
            Ok(Err(e)) => Err(Step::Retry(format!(
                "{name} on replica {}: {}",
                self.id(i),
                crate::error_chain(&e)
            ))),
            Err(_) => Err(Step::Retry(format!(
                "{name} on replica {} did not answer within {CONTROL_TIMEOUT:?}",
                self.id(i)
            ))),
        }
    }

    /// The view of `record` to publish.
    fn view_of(&mut self, record: &VolumeRecord) -> Result<SyncView, Step> {
        self.views
            .of(record)
            .map_err(|e| Step::Fence(format!("arbiter version unusable: {e}")))
    }

    /// Tells replica `to` the record's `view` (`PeerState`): with
    /// `peer_incarnation` (0: unknown) the copy of its peer that was (or
    /// now is) in sync, and the floor of this frontend's given-up sessions
    /// to that peer. Answered once `to` holds both durably and tracks (or
    /// stops tracking) its peer accordingly.
    async fn tell(
        &mut self,
        to: usize,
        view: &SyncView,
        peer_incarnation: u64,
    ) -> Result<(), Step> {
        let peer = 1 - to;
        let floor = self.f.replicas[peer].abandoned_below();
        self.ask(
            to,
            Op::PeerState {
                you: self.id(to).clone(),
                peer: self.id(peer).clone(),
                view: view.clone(),
                peer_incarnation,
                fence: (floor.0 > 0).then_some(floor),
            },
        )
        .await?;
        self.views.told(to, view);
        let r = &mut self.rejoin[to];
        r.tell_backoff = Duration::from_millis(200);
        if view.lists(self.id(to)) {
            // The in-sync replica holds the floor: writes without `peer`
            // may go on.
            self.f.membership.send_if_modified(|m| {
                let raise = floor > m.fence_told[peer];
                if raise {
                    m.fence_told[peer] = floor;
                }
                raise
            });
        }
        Ok(())
    }

    /// [`Self::tell`], logging a failure instead of returning it: the
    /// replica is told again on a later tick.
    async fn tell_or_later(&mut self, to: usize, view: &SyncView, peer_incarnation: u64) {
        match self.tell(to, view, peer_incarnation).await {
            Ok(()) => {}
            Err(Step::Fence(why)) => self.fence(why),
            Err(Step::Retry(why)) => {
                let r = &mut self.rejoin[to];
                r.tell_at = Instant::now() + r.tell_backoff;
                r.tell_backoff = (r.tell_backoff * 2).min(REJOIN_MAX_BACKOFF);
                if let Some(n) = r.log.allow() {
                    tracing::warn!(replica = %self.id(to), reason = %why, suppressed = n, "cannot tell the replica the arbiter's record yet; retrying");
                }
            }
        }
    }

    /// Tells replica `i` the current view if it has not taken it yet and
    /// its connection is up.
    async fn tell_if_untold(&mut self, i: usize) {
        let Some(view) = self.views.current().cloned() else {
            return;
        };
        if !self.views.untold(i)
            || Instant::now() < self.rejoin[i].tell_at
            || self.f.replicas[i].state() != ReplicaState::InSync
        {
            return;
        }
        let inc = if view.lists(self.id(1 - i)) {
            self.f.replicas[1 - i].incarnation()
        } else {
            0
        };
        self.tell_or_later(i, &view, inc).await;
    }

    /// If this frontend gave up sessions to replica `i` that the in-sync
    /// peer does not know of yet, tells it (writes without `i` wait).
    async fn tell_fence(&mut self, i: usize) {
        let s = 1 - i;
        let m = self.f.membership.borrow().clone();
        let need = self.f.replicas[i].abandoned_below();
        if m.fence_told[i] >= need || !m.in_sync[s] || m.fenced.is_some() {
            return;
        }
        let Some(view) = self.views.current().cloned() else {
            return;
        };
        if Instant::now() < self.rejoin[s].tell_at && self.views.untold(s) {
            return;
        }
        self.tell_or_later(s, &view, 0).await;
    }

    async fn active_extents(&self, i: usize) -> Result<Vec<ByteRange>, Step> {
        self.extents(i, Op::ActiveExtents).await
    }

    /// Asks replica `i` for extents (`ActiveExtents`, `RecoveredExtents`).
    async fn extents(&self, i: usize, op: Op) -> Result<Vec<ByteRange>, Step> {
        let name = op.name();
        match self.ask(i, op).await? {
            Reply::Extents(r) => Ok(r),
            other => Err(Step::Retry(format!(
                "replica {} answered {name} with {other:?}",
                self.id(i)
            ))),
        }
    }

    /// Marks `ranges` dirty on replica `source` (which tracks its peer).
    async fn mark_dirty(&self, source: usize, ranges: &[ByteRange]) -> Result<(), Step> {
        for chunk in ranges.chunks(MAX_RANGES) {
            self.ask(
                source,
                Op::MarkDirty {
                    ranges: chunk.to_vec(),
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn read_record(&self) -> Result<VolumeRecord, Step> {
        match tokio::time::timeout(CONTROL_TIMEOUT, self.f.arbiter.read()).await {
            Ok(r) => r.map_err(Step::from),
            Err(_) => Err(Step::Retry(format!(
                "the arbiter did not answer within {CONTROL_TIMEOUT:?}"
            ))),
        }
    }

    async fn try_reconcile_at_start(&mut self) -> Result<(), Step> {
        let record = self.read_record().await?;
        owns(&record, &self.f.me, self.f.epoch).map_err(Step::Fence)?;
        let in_sync = [0, 1].map(|i| record.in_sync.contains(self.id(i)));
        let up = [0, 1].map(|i| self.f.replicas[i].state() == ReplicaState::InSync);
        match in_sync {
            [true, true] => {
                let mut found: [Option<Vec<ByteRange>>; 2] = [None, None];
                for i in 0..2 {
                    if up[i] {
                        match self.active_extents(i).await {
                            Ok(r) => found[i] = Some(r),
                            Err(Step::Fence(w)) => return Err(Step::Fence(w)),
                            Err(Step::Retry(_)) => {}
                        }
                    }
                }
                let (source, target) = match (&found[0], &found[1]) {
                    (None, None) => {
                        return Err(Step::Retry("neither replica answers".to_owned()));
                    }
                    (Some(a), Some(b)) if a.is_empty() && b.is_empty() => {
                        tracing::info!(
                            "both replicas in sync, no activity-log extents to reconcile"
                        );
                        // Both learn the record: a tracking header one of
                        // them kept from before (its stop never reached it)
                        // ends here.
                        let view = self.view_of(&record)?;
                        for i in 0..2 {
                            self.tell_or_later(i, &view, 0).await;
                        }
                        return Ok(());
                    }
                    (Some(_), Some(_)) => (self.f.local, 1 - self.f.local),
                    (Some(_), None) => (0, 1),
                    (None, Some(_)) => (1, 0),
                };
                let ranges = union(found.iter().flatten().flatten().copied());
                let bytes: u64 = ranges.iter().map(|r| r.len).sum();
                tracing::warn!(
                    source = %self.id(source), target = %self.id(target),
                    target_reachable = found[target].is_some(),
                    extents = ranges.len(), bytes,
                    "activity-log extents found: writes of the previous frontend may be on one replica only; the target leaves the in-sync set and the source's resync copies them"
                );
                let record = self.swap_out(target, source).await?;
                let view = self.view_of(&record)?;
                let inc = self.f.replicas[target].incarnation();
                self.tell(source, &view, inc).await?;
                self.rejoin[target].left_as = inc;
                if found[target].is_some() {
                    self.tell_or_later(target, &view, 0).await;
                }
                self.f.replicas[target].pin_incarnation(false);
                self.mark_dirty(source, &ranges).await?;
                for (i, f) in found.iter().enumerate() {
                    if f.is_some() {
                        self.ask(i, Op::ForgetActivity).await?;
                    }
                }
                self.rejoin[target].reconcile = found[target].is_none();
                self.f.membership.send_modify(|m| m.in_sync[target] = false);
                Ok(())
            }
            [true, false] | [false, true] => {
                let source = if in_sync[0] { 0 } else { 1 };
                let out = 1 - source;
                if !up[source] {
                    return Err(Step::Retry(format!(
                        "the only in-sync replica, {}, does not answer",
                        self.id(source)
                    )));
                }
                let view = self.view_of(&record)?;
                self.f.membership.send_modify(|m| m.in_sync[out] = false);
                self.f.replicas[out].pin_incarnation(false);
                self.tell(source, &view, 0).await?;
                if up[out] {
                    self.tell_or_later(out, &view, 0).await;
                }
                let ranges = self.active_extents(source).await?;
                self.mark_dirty(source, &ranges).await?;
                self.ask(source, Op::ForgetActivity).await?;
                self.rejoin[out].reconcile = true;
                tracing::info!(out = %self.id(out), source = %self.id(source), marked_bytes = ranges.iter().map(|r| r.len).sum::<u64>(), "replica out of sync at the arbiter: it rejoins once it answers and has caught up");
                Ok(())
            }
            [false, false] => Err(Step::Fence(
                "the arbiter has no replica in sync (its record is damaged)".to_owned(),
            )),
        }
    }

    /// Removes `lost` from the in-sync set at the arbiter (compare-and-swap
    /// on the version read; a conflict is re-read and re-decided).
    async fn swap_out(&self, lost: usize, survivor: usize) -> Result<VolumeRecord, Step> {
        let (lost, survivor) = (self.id(lost).clone(), self.id(survivor).clone());
        let mut record = self.read_record().await?;
        loop {
            match decide(&record, &self.f.me, self.f.epoch, &lost, &survivor) {
                Decision::Fence(why) => return Err(Step::Fence(why)),
                Decision::AlreadyOut => return Ok(record),
                Decision::Swap => {}
            }
            match self
                .f
                .arbiter
                .update(&record.version, Change::RemoveFromInSync(lost.clone()))
                .await
            {
                Ok(next) => return Ok(next),
                Err(ArbiterError::Conflict { current, .. }) => record = *current,
                Err(ArbiterError::Rejected(e)) => return Err(Step::Fence(e.to_string())),
                Err(e) => return Err(Step::from(e)),
            }
        }
    }

    /// Returns `back` to the in-sync set at the arbiter.
    async fn swap_in(&self, back: usize, source: usize) -> Result<VolumeRecord, Step> {
        let (back, source) = (self.id(back).clone(), self.id(source).clone());
        let mut record = self.read_record().await?;
        loop {
            match decide_return(&record, &self.f.me, self.f.epoch, &back, &source) {
                ReturnDecision::Fence(why) => return Err(Step::Fence(why)),
                ReturnDecision::AlreadyIn => return Ok(record),
                ReturnDecision::Swap => {}
            }
            let update = self
                .f
                .arbiter
                .update(&record.version, Change::ReturnToInSync(back.clone()));
            match tokio::time::timeout(CONTROL_TIMEOUT, update).await {
                Ok(Ok(next)) => return Ok(next),
                Ok(Err(ArbiterError::Conflict { current, .. })) => record = *current,
                Ok(Err(ArbiterError::Rejected(e))) => return Err(Step::Fence(e.to_string())),
                Ok(Err(e)) => return Err(Step::from(e)),
                Err(_) => {
                    return Err(Step::Retry(format!(
                        "the arbiter did not answer within {CONTROL_TIMEOUT:?}"
                    )));
                }
            }
        }
    }

    async fn remove(&mut self, s: Suspect) {
        let lost = self.id(s.index).clone();
        let survivor_ix = 1 - s.index;
        let survivor = self.id(survivor_ix).clone();
        tracing::warn!(replica = %lost, "replica did not answer: holding I/O and removing it from the in-sync set through the arbiter");
        let mut log = RateLimit::new(Duration::from_secs(1));
        // The survivor's own return may not be confirmed: the record must
        // list it in sync before anything is acknowledged on it alone.
        while self.rejoin[survivor_ix].unconfirmed {
            match self.swap_in(survivor_ix, s.index).await {
                Ok(record) => self.returned(survivor_ix, &record),
                Err(Step::Fence(why)) => {
                    self.fence(format!("lost the fail-over: {why}"));
                    return;
                }
                Err(Step::Retry(why)) => {
                    if let Some(n) = log.allow() {
                        tracing::warn!(reason = %why, suppressed = n, "cannot confirm the survivor's return at the arbiter: I/O held, not guessing");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let record = loop {
            match self.swap_out(s.index, survivor_ix).await {
                Ok(r) => break r,
                Err(Step::Fence(why)) => {
                    self.fence(format!("lost the fail-over: {why}"));
                    return;
                }
                Err(Step::Retry(why)) => {
                    if let Some(n) = log.allow() {
                        tracing::warn!(reason = %why, suppressed = n, "cannot reach the arbiter: I/O held, not guessing");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let view = match self.view_of(&record) {
            Ok(v) => v,
            Err(Step::Fence(why) | Step::Retry(why)) => {
                self.fence(why);
                return;
            }
        };
        // Requests it never answered must not land there later: every
        // session to it so far is given up (its connection aborted), and
        // the survivor learns the floor with the record, so that its
        // resync fences them on the lost replica before copying anything.
        self.f.replicas[s.index].give_up();
        // The survivor must track what its peer misses before any write is
        // acknowledged on it alone.
        let inc = self.f.replicas[s.index].incarnation();
        self.rejoin[s.index].left_as = inc;
        loop {
            match self.tell(survivor_ix, &view, inc).await {
                Ok(()) => break,
                Err(Step::Fence(why)) => {
                    self.fence(why);
                    return;
                }
                Err(Step::Retry(why)) => {
                    if let Some(n) = log.allow() {
                        tracing::warn!(replica = %survivor, reason = %why, suppressed = n, "survivor did not take the peer state; I/O held");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.f.membership.send_modify(|m| {
            m.in_sync[s.index] = false;
            m.catch_up[s.index] = false;
        });
        // A recreated copy may come back (through a full copy).
        self.f.replicas[s.index].pin_incarnation(false);
        let r = &mut self.rejoin[s.index];
        r.phase = Phase::Idle;
        r.unconfirmed = false;
        r.backoff = Duration::from_millis(200);
        r.retry_at = Instant::now();
        let pause = s.since.elapsed();
        self.f
            .metrics
            .record_failover(self.f.volume.as_str(), pause);
        tracing::warn!(replica = %lost, survivor = %survivor, version = %record.version, pause_ms = pause.as_millis() as u64, "replica out of sync: writes resumed on the survivor alone");
    }

    /// Ends a catch-up that cannot go on; retried later.
    fn give_up(&mut self, i: usize, why: &str) {
        self.f.progress.send_if_modified(|p| p[i].take().is_some());
        let was = self.f.membership.send_if_modified(|m| {
            let was = m.catch_up[i];
            m.catch_up[i] = false;
            was
        });
        if was {
            // What it did not answer must not land later: given up; the
            // in-sync replica learns the floor (`tell_fence`) before any
            // write goes on without it.
            self.f.replicas[i].give_up();
        }
        let id = self.f.replicas[i].id().clone();
        let r = &mut self.rejoin[i];
        r.phase = Phase::Idle;
        let retry_in = r.backoff;
        r.retry_at = Instant::now() + retry_in;
        r.backoff = (r.backoff * 2).min(REJOIN_MAX_BACKOFF);
        if let Some(n) = r.log.allow() {
            tracing::warn!(replica = %id, reason = %why, suppressed = n, retry_in = ?retry_in, "replica not returned to the in-sync set yet");
        }
    }

    fn step_failed(&mut self, i: usize, step: Step) {
        match step {
            Step::Fence(why) => self.fence(why),
            Step::Retry(why) => self.give_up(i, &why),
        }
    }

    /// One step of the return of replica `i` (see the module doc).
    async fn rejoin_step(&mut self, i: usize) {
        let (l, s) = (i, 1 - i);
        let m = self.f.membership.borrow().clone();
        if m.in_sync[l] {
            if self.rejoin[l].unconfirmed {
                self.confirm_return(l, s).await;
            }
            self.rejoin[l].phase = Phase::Idle;
            return;
        }
        if !m.in_sync[s] {
            self.rejoin[l].phase = Phase::Idle;
            return;
        }
        match self.rejoin[l].phase {
            Phase::Idle => {
                let up = |x: usize| self.f.replicas[x].state() == ReplicaState::InSync;
                if Instant::now() < self.rejoin[l].retry_at || !up(l) || !up(s) {
                    return;
                }
                match self.start_catch_up(l, s).await {
                    Ok(()) => {
                        let r = &mut self.rejoin[l];
                        r.phase = Phase::Copying;
                        r.started = Instant::now();
                    }
                    Err(e) => self.step_failed(l, e),
                }
            }
            Phase::Copying => {
                let Some(dirty_bytes) = self.resync_left(l, s).await else {
                    return;
                };
                if dirty_bytes <= CATCH_UP_BELOW
                    || self.rejoin[l].started.elapsed() >= CATCH_UP_WAIT
                {
                    self.f.membership.send_modify(|m| m.catch_up[l] = true);
                    self.rejoin[l].phase = Phase::Draining;
                    tracing::info!(replica = %self.id(l), source = %self.id(s), dirty_bytes, "replica catching up: it gets every write now, after the in-sync replica");
                }
            }
            Phase::Draining => {
                if !m.catch_up[l] {
                    self.give_up(l, "it failed a write while catching up");
                } else if self.f.skipping[l].load(Ordering::SeqCst) == 0 {
                    self.rejoin[l].phase = Phase::Polling;
                }
            }
            Phase::Polling => {
                if !m.catch_up[l] {
                    self.give_up(l, "it failed a write while catching up");
                    return;
                }
                let Some(dirty_bytes) = self.resync_left(l, s).await else {
                    return;
                };
                if dirty_bytes == 0 {
                    self.finish_rejoin(l, s).await;
                }
            }
        }
    }

    /// Bytes the in-sync replica `s` still has to copy to `l` (published
    /// for status, logged now and then); `None` (after giving up) if `s`
    /// does not answer or does not track `l`.
    async fn resync_left(&mut self, l: usize, s: usize) -> Option<u64> {
        let report = match self.ask(s, Op::ResyncStatus).await {
            Ok(Reply::Resync(r)) => r,
            Ok(other) => {
                let why = format!("resync_status answered with {other:?}");
                self.give_up(l, &why);
                return None;
            }
            Err(e) => {
                self.step_failed(l, e);
                return None;
            }
        };
        let ResyncReport {
            tracking,
            dirty_bytes,
            copied_bytes,
        } = report;
        if tracking.as_ref() != Some(self.id(l)) {
            let why = format!(
                "replica {} tracks {:?}, not {}",
                self.id(s),
                tracking.as_ref().map(ReplicaId::as_str),
                self.id(l)
            );
            self.give_up(l, &why);
            return None;
        }
        self.f.progress.send_if_modified(|p| {
            let changed = p[l] != Some(dirty_bytes);
            p[l] = Some(dirty_bytes);
            changed
        });
        if dirty_bytes > 0
            && let Some(n) = self.rejoin[l].log.allow()
        {
            tracing::info!(replica = %self.id(l), source = %self.id(s), dirty_bytes, copied_bytes, suppressed = n, "replica returning: the resync is copying what it missed");
        }
        Some(dirty_bytes)
    }

    async fn start_catch_up(&mut self, l: usize, s: usize) -> Result<(), Step> {
        // A connection can look up while the link is cut (no reset comes):
        // a cheap request with a short deadline says whether it answers,
        // before writes are made to wait for it.
        let probe = self.f.replicas[l].call(Op::ResyncStatus);
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Step::Retry(format!(
                    "replica {} does not answer: {}",
                    self.id(l),
                    crate::error_chain(&e)
                )));
            }
            Err(_) => {
                return Err(Step::Retry(format!(
                    "replica {} did not answer within {PROBE_TIMEOUT:?}",
                    self.id(l)
                )));
            }
        }
        let record = self.read_record().await?;
        if let ReturnDecision::Fence(why) =
            decide_return(&record, &self.f.me, self.f.epoch, self.id(l), self.id(s))
        {
            return Err(Step::Fence(why));
        }
        let view = self.view_of(&record)?;
        // Idempotent; a replica restarted with an untrusted bitmap starts
        // its full copy only on this.
        self.tell(s, &view, 0).await?;
        // The returning replica learns that it is out: a tracking header it
        // kept from a time it was a source ends here.
        self.tell(l, &view, 0).await?;
        // What it may have lost to a crash or power cut: the extents it
        // recovered at its restart (see the module doc); and, if this
        // frontend found it out or unreachable at its start, every extent
        // of its log (what a crashed predecessor left on it alone). Marked
        // on the source, then forgotten there — exactly those, so that a
        // restart in between cannot have it forget something unmarked (its
        // log may hold extents recovered after a crash, pinned until
        // reconciled: a full log of them refuses every other write).
        let mut ranges = self.extents(l, Op::RecoveredExtents).await?;
        if self.rejoin[l].reconcile {
            ranges.extend(self.active_extents(l).await?);
        }
        let (left_as, now) = (self.rejoin[l].left_as, self.f.replicas[l].incarnation());
        if left_as != 0 && now != 0 && now != left_as {
            let size = self.f.replicas[l].size();
            tracing::warn!(replica = %self.id(l), source = %self.id(s), left_as = format!("{left_as:016x}"), returns_as = format!("{now:016x}"), size, "the returning replica is another copy of the volume (recreated): all of it is marked for the resync");
            self.mark_dirty(
                s,
                &[ByteRange {
                    offset: 0,
                    len: size,
                }],
            )
            .await?;
            self.rejoin[l].left_as = now;
        }
        let ranges = union(ranges.into_iter());
        if !ranges.is_empty() {
            self.mark_dirty(s, &ranges).await?;
            for chunk in ranges.chunks(MAX_RANGES) {
                self.ask(
                    l,
                    Op::ForgetExtents {
                        ranges: chunk.to_vec(),
                    },
                )
                .await?;
            }
            tracing::info!(replica = %self.id(l), source = %self.id(s), ranges = ranges.len(), bytes = ranges.iter().map(|r| r.len).sum::<u64>(), "returning replica's possibly lost extents marked for the resync");
        }
        self.rejoin[l].reconcile = false;
        tracing::info!(replica = %self.id(l), source = %self.id(s), "replica answers again: the resync copies what it missed, then it catches up");
        Ok(())
    }

    async fn finish_rejoin(&mut self, l: usize, s: usize) {
        self.f.progress.send_if_modified(|p| p[l].take().is_some());
        let mut flipped = false;
        self.f.membership.send_if_modified(|m| {
            if m.catch_up[l] && !m.in_sync[l] {
                m.catch_up[l] = false;
                m.in_sync[l] = true;
                flipped = true;
            }
            flipped
        });
        if !flipped {
            self.give_up(l, "it stopped catching up just before the return");
            return;
        }
        // In sync from now: a recreated copy is no longer acceptable.
        self.f.replicas[l].pin_incarnation(true);
        self.rejoin[l].unconfirmed = true;
        self.confirm_return(l, s).await;
    }

    /// Swaps `l` (in sync locally) back in at the arbiter, reading the
    /// record first: done if it lands or already landed; an unknown
    /// outcome leaves `l` in sync locally and unconfirmed, tried again on
    /// the next tick (see the module doc).
    async fn confirm_return(&mut self, l: usize, s: usize) {
        match self.swap_in(l, s).await {
            Ok(record) => {
                self.returned(l, &record);
                // Both learn the record (the in-sync one stops tracking); one
                // that does not answer now is told on a later tick.
                match self.view_of(&record) {
                    Ok(view) => {
                        let inc = self.f.replicas[l].incarnation();
                        self.tell_or_later(s, &view, inc).await;
                        self.tell_or_later(l, &view, 0).await;
                    }
                    Err(Step::Fence(why) | Step::Retry(why)) => self.fence(why),
                }
            }
            Err(Step::Fence(why)) => self.fence(why),
            Err(Step::Retry(why)) => {
                if let Some(n) = self.rejoin[l].log.allow() {
                    tracing::warn!(replica = %self.id(l), reason = %why, suppressed = n, "the arbiter did not answer the replica's return (it may have landed): the replica stays required, its loss a fail-over through the arbiter, until the record is read again");
                }
            }
        }
    }

    /// The arbiter's record has `l` back in the in-sync set.
    fn returned(&mut self, l: usize, record: &VolumeRecord) {
        let took = self.rejoin[l].started.elapsed();
        tracing::info!(replica = %self.id(l), version = %record.version, catch_up_ms = took.as_millis() as u64, "replica back in the in-sync set");
        self.f.metrics.record_rejoin(self.f.volume.as_str());
        let r = &mut self.rejoin[l];
        r.unconfirmed = false;
        r.phase = Phase::Idle;
        r.backoff = Duration::from_millis(200);
    }
}

/// The next change of a watched replica connection: its index and state.
/// A connection whose task ended is no longer watched.
async fn connection_changed(
    conns: &mut [watch::Receiver<ReplicaState>; 2],
    watching: &mut [bool; 2],
) -> (usize, ReplicaState) {
    loop {
        let [a, b] = &mut *conns;
        let (i, r) = tokio::select! {
            r = a.changed(), if watching[0] => (0, r),
            r = b.changed(), if watching[1] => (1, r),
            else => std::future::pending().await,
        };
        match r {
            Ok(()) => return (i, *conns[i].borrow_and_update()),
            Err(_) => watching[i] = false,
        }
    }
}

/// The union of byte ranges, sorted and merged.
fn union(ranges: impl Iterator<Item = ByteRange>) -> Vec<ByteRange> {
    let sorted: BTreeSet<(u64, u64)> = ranges
        .filter(|r| r.len > 0)
        .map(|r| (r.offset, r.offset.saturating_add(r.len)))
        .collect();
    let mut out: Vec<ByteRange> = Vec::new();
    for (start, end) in sorted {
        match out.last_mut() {
            Some(last) if start <= last.offset + last.len => {
                let e = end.max(last.offset + last.len);
                last.len = e - last.offset;
            }
            _ => out.push(ByteRange {
                offset: start,
                len: end - start,
            }),
        }
    }
    out
}

enum Step {
    Fence(String),
    Retry(String),
}

impl From<ArbiterError> for Step {
    fn from(e: ArbiterError) -> Self {
        Step::Retry(crate::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::arbiter::{Lease, Version};

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("valid")
    }

    fn record(in_sync: &[&str], holder: &str, epoch: u64) -> VolumeRecord {
        let mut rec = VolumeRecord::new(Version("5".into()), [r("a"), r("b")].into());
        rec.in_sync = in_sync.iter().map(|s| r(s)).collect();
        rec.epoch = Epoch(epoch);
        rec.lease = Some(Lease {
            holder: FrontendId(holder.into()),
            epoch: Epoch(epoch),
            renewed_at_ms: 0,
            duration: Duration::from_secs(10),
        });
        rec
    }

    #[test]
    fn a_lost_replica_in_the_set_is_swapped_out() {
        let me = FrontendId("fe".into());
        let d = decide(
            &record(&["a", "b"], "fe", 3),
            &me,
            Epoch(3),
            &r("a"),
            &r("b"),
        );
        assert_eq!(d, Decision::Swap);
        let d = decide(&record(&["b"], "fe", 3), &me, Epoch(3), &r("a"), &r("b"));
        assert_eq!(d, Decision::AlreadyOut);
    }

    #[test]
    fn losing_the_race_or_the_lease_fences() {
        let me = FrontendId("fe".into());
        // Our survivor was removed instead (the other side won).
        assert!(matches!(
            decide(&record(&["a"], "fe", 3), &me, Epoch(3), &r("a"), &r("b")),
            Decision::Fence(_)
        ));
        assert!(matches!(
            decide(
                &record(&["a", "b"], "other", 3),
                &me,
                Epoch(3),
                &r("a"),
                &r("b")
            ),
            Decision::Fence(_)
        ));
        assert!(matches!(
            decide(
                &record(&["a", "b"], "fe", 4),
                &me,
                Epoch(3),
                &r("a"),
                &r("b")
            ),
            Decision::Fence(_)
        ));
    }
}
