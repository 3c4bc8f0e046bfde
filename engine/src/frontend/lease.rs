//! The frontend's lease at the arbiter and its self-fencing (design
//! invariants 3 and 4).
//!
//! A lease is one acquisition ([`LeaseId`]: holder and epoch). [`acquire`]
//! takes it through the arbiter's compare-and-swap (`AcquireLease` bumps
//! the epoch); [`renew`] then renews it every third of its duration, and
//! [`release`] gives it up on a clean stop. Only that acquisition renews or
//! releases it: a frontend restarted under the same name is another one.
//!
//! # Time: no two clocks are ever compared
//!
//! - *The holder* judges its own lease on `CLOCK_BOOTTIME`
//!   ([`BootInstant`]: monotonic, and running through a suspend): it is
//!   valid until `start + duration`, where `start` is when the last
//!   *successful* renew call began (a renew that took long only shortens
//!   the lease). [`LeaseGuard::valid`] is checked right before every
//!   acknowledgement, so nothing is acknowledged after the lease ran out —
//!   not even by a machine that slept through it.
//! - *Another frontend* judges the lease as client-go's leader election
//!   does: on its own monotonic clock, from the moment a read first showed
//!   it the lease as it now is ([`ExpiryWatch`]); the lease may be taken
//!   once it stayed exactly so (no renewal, whatever its time says) for its
//!   duration plus the margin. The holder's `renewed_at_ms` (its wall
//!   clock, recorded for people) never enters the decision, so a machine
//!   whose clock runs ahead or behind cannot take a live lease. The margin
//!   covers the two clocks' rates differing and the holder's last
//!   acknowledgements in flight.
//!
//! Being refused by the arbiter (another acquisition holds the lease) or a
//! replica reporting a newer epoch fences the frontend for good.
//!
//! # Liveness by the node's heartbeat
//!
//! With an arbiter whose holders prove liveness by their node's heartbeat
//! ([`Arbiter::node_heartbeat`], the Kubernetes one), [`renew`] writes
//! nothing in steady state: it follows the node-local report of the
//! heartbeat's last successful renewal ([`Arbiter::last_heartbeat`]: when
//! it was *sent*, on this machine's `CLOCK_BOOTTIME`) and extends the lease
//! to `sent + min(duration, heartbeat duration)`. Observers
//! ([`ExpiryWatch`], the operator) wait until neither the lease nor the
//! heartbeat changed for the longer of the two durations plus the margin.
//!
//! A report only extends a lease that is still held *when the report is
//! read*. Once the lease ran out, an observer may have judged it expired
//! from a read that the next renewal landed after, so a heartbeat coming
//! back is not enough: the frontend renews the lease in the record once
//! (a compare-and-swap: it fails if an observer took the volume, and makes
//! an observer that has not yet swapped see a change and wait again)
//! before acknowledging again. That is the only per-volume write besides
//! acquisition and release, and it happens only after an expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::arbiter::{
    Arbiter, ArbiterError, Change, FrontendId, Lease, LeaseId, Liveness, Rejected, VolumeRecord,
};
use crate::clock::{BootInstant, WallClock};

/// How this frontend holds its lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub holder: FrontendId,
    pub duration: Duration,
    /// Extra wait, after another holder's lease went unrenewed for its
    /// duration, before taking it.
    pub margin: Duration,
    /// The wall clock recorded at the arbiter (offset only in tests).
    pub wall_clock: WallClock,
    /// A lease held under this same holder name is a predecessor the
    /// caller *knows* dead, to be taken at once (still bumping the epoch,
    /// which fences anything of it still in flight) instead of waiting for
    /// it to expire. Only for a caller that can know: the CSI frontend,
    /// named after its node and holding the volume's instance lock on that
    /// node (which the kernel releases only when its holder died) — its
    /// node's heartbeat goes on while the predecessor is dead, so waiting
    /// for that would be waiting forever.
    pub reclaim_own: bool,
}

/// Why the lease could not be acquired.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the arbiter refused the lease to {holder}")]
    Refused {
        holder: FrontendId,
        #[source]
        source: ArbiterError,
    },
    #[error("gave up acquiring the lease for {holder} after {waited:?}")]
    GaveUp {
        holder: FrontendId,
        waited: Duration,
    },
}

/// Where this frontend's right to acknowledge I/O stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed in time; acknowledgements allowed.
    Held,
    /// Not renewed within its duration: no acknowledgement until a renew
    /// succeeds (which proves nobody else took the lease).
    Expired,
    /// Another frontend owns the volume. Final.
    Fenced,
}

/// The lease as the data path sees it: lock-free checks, on
/// `CLOCK_BOOTTIME`.
#[derive(Debug)]
pub struct LeaseGuard {
    id: LeaseId,
    base: BootInstant,
    /// Nanoseconds after `base` until which the lease is valid.
    valid_until_ns: AtomicU64,
    fenced: AtomicBool,
    duration: Duration,
    /// Woken by every renewal, extension and by the fence: I/O held while
    /// the lease is out waits on it.
    changed: tokio::sync::Notify,
}

impl LeaseGuard {
    /// Acquisition `id`, whose last successful renew call (or the
    /// acquisition itself) started at `start`.
    pub fn new(id: LeaseId, start: BootInstant, duration: Duration) -> Arc<Self> {
        let g = Arc::new(Self {
            id,
            base: start,
            valid_until_ns: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            duration,
            changed: tokio::sync::Notify::new(),
        });
        g.renewed(start);
        g
    }

    /// The acquisition this guard stands for.
    pub fn id(&self) -> &LeaseId {
        &self.id
    }

    fn ns(&self, t: BootInstant) -> u64 {
        u64::try_from(t.saturating_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records a successful renew call that began at `start`.
    pub fn renewed(&self, start: BootInstant) {
        let until = self.ns(start + self.duration);
        self.valid_until_ns.fetch_max(until, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Extends the lease to `until`, but only if it is still held at `now`
    /// (read after whatever proved `until`): a lease that ran out is not
    /// brought back by a heartbeat alone (see the module doc). Returns
    /// whether it was held.
    pub fn extend_if_held(&self, now: BootInstant, until: BootInstant) -> bool {
        if self.fenced.load(Ordering::SeqCst) {
            return false;
        }
        let (now, until) = (self.ns(now), self.ns(until));
        let mut current = self.valid_until_ns.load(Ordering::SeqCst);
        loop {
            if current <= now {
                return false;
            }
            if current >= until {
                return true;
            }
            match self.valid_until_ns.compare_exchange(
                current,
                until,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Sets the lease valid until `until` unless it already is longer
    /// (after a swap proved that nobody took the volume).
    pub fn extend_to(&self, until: BootInstant) {
        let until = self.ns(until);
        self.valid_until_ns.fetch_max(until, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The duration the lease is counted with.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Fences for good.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until the lease is held or fenced for good (at once if it is
    /// either): what I/O answered while the lease is out waits for.
    /// Returns the state then.
    pub async fn settled(&self) -> LeaseState {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.state() {
                LeaseState::Expired => {}
                state => return state,
            }
            changed.await;
        }
    }

    pub fn state_at(&self, now: BootInstant) -> LeaseState {
        if self.fenced.load(Ordering::SeqCst) {
            LeaseState::Fenced
        } else if self.ns(now) < self.valid_until_ns.load(Ordering::SeqCst) {
            LeaseState::Held
        } else {
            LeaseState::Expired
        }
    }

    pub fn state(&self) -> LeaseState {
        self.state_at(BootInstant::now())
    }

    /// Whether an acknowledgement may be sent now.
    pub fn valid(&self) -> bool {
        self.state() == LeaseState::Held
    }

    /// Time left on the lease (zero once expired or fenced).
    pub fn remaining(&self) -> Duration {
        if self.fenced.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        let now = self.ns(BootInstant::now());
        Duration::from_nanos(
            self.valid_until_ns
                .load(Ordering::SeqCst)
                .saturating_sub(now),
        )
    }
}

/// Wall-clock milliseconds since the Unix epoch of this machine, for what
/// people read (`arbiter show`); never used to judge a lease.
pub fn now_ms() -> u64 {
    WallClock::system().now_ms()
}

/// An observer's view of another acquisition's lease: since when, on the
/// observer's own monotonic clock, it has seen the lease, and what shows
/// its holder alive, exactly as they are.
#[derive(Debug, Default)]
pub struct ExpiryWatch {
    seen: Option<((Lease, Liveness), Instant)>,
}

impl ExpiryWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a read which returned at `read_at` showed `lease`;
    /// returns how much longer it must stay exactly so before it may be
    /// taken (zero: now). A lease seen for the first time, or changed in
    /// any way (a renewal, another acquisition), starts the wait again:
    /// the read returned after the change was written, and the holder
    /// counts its lease from before it wrote it.
    pub fn observe(&mut self, lease: &Lease, read_at: Instant, margin: Duration) -> Duration {
        let liveness = Liveness {
            token: String::new(),
            duration: lease.duration,
        };
        self.observe_with(lease, &liveness, read_at, margin)
    }

    /// [`Self::observe`] with what else shows the holder alive (its node's
    /// heartbeat, read after the lease): a change of either starts the
    /// wait again, which is the longer of the two durations plus the
    /// margin.
    pub fn observe_with(
        &mut self,
        lease: &Lease,
        liveness: &Liveness,
        read_at: Instant,
        margin: Duration,
    ) -> Duration {
        let wait = lease.duration.max(liveness.duration).saturating_add(margin);
        match &self.seen {
            Some(((seen, alive), since)) if seen == lease && alive == liveness => {
                (*since + wait).saturating_duration_since(read_at)
            }
            _ => {
                self.seen = Some(((lease.clone(), liveness.clone()), read_at));
                wait
            }
        }
    }

    /// How long the lease being watched has been seen unchanged, as of
    /// `now`.
    pub fn unchanged_for(&self, now: Instant) -> Duration {
        self.seen.as_ref().map_or(Duration::ZERO, |(_, since)| {
            now.saturating_duration_since(*since)
        })
    }
}

/// Emits at most one log line per `every` (no error storm while holding).
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` (lines suppressed since the last one) if a line may be
    /// logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// An acquisition whose answer was lost (the arbiter did not answer in
/// time): it may have landed, and then the lease is ours.
#[derive(Debug, Clone)]
struct Attempt {
    epoch: crate::protocol::Epoch,
    now_ms: u64,
    started: BootInstant,
}

impl Attempt {
    fn landed(&self, holder: &FrontendId, lease: &Lease) -> bool {
        lease.holder == *holder && lease.epoch == self.epoch && lease.renewed_at_ms == self.now_ms
    }
}

/// Acquires the lease, waiting for another acquisition's lease to go
/// unrenewed for its duration plus the margin (timed here, see the module
/// doc), and retrying an unreachable arbiter, until `give_up`. Returns the
/// record (with the new epoch) and the guard.
pub async fn acquire<A: Arbiter>(
    arbiter: &A,
    config: &LeaseConfig,
    give_up: Duration,
) -> Result<(VolumeRecord, Arc<LeaseGuard>), LeaseError> {
    let began = Instant::now();
    let deadline = began + give_up;
    let mut log = RateLimit::new(Duration::from_secs(1));
    let mut watch = ExpiryWatch::new();
    let mut lost_answers: Vec<Attempt> = Vec::new();
    loop {
        if Instant::now() >= deadline {
            return Err(LeaseError::GaveUp {
                holder: config.holder.clone(),
                waited: began.elapsed(),
            });
        }
        let start = BootInstant::now();
        let record = match arbiter.read().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot read the arbiter record; retrying");
                }
                sleep_until_or(deadline, Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Some(lease) = &record.lease
            && let Some(a) = lost_answers
                .iter()
                .find(|a| a.landed(&config.holder, lease))
        {
            tracing::info!(holder = %config.holder, epoch = lease.epoch.0, version = %record.version, "lease acquired (the acquisition whose answer was lost had landed)");
            let guard = LeaseGuard::new(lease.id(), a.started, config.duration);
            return Ok((record, guard));
        }
        let replaces = match &record.lease {
            None => None,
            Some(lease) if config.reclaim_own && lease.holder == config.holder => {
                tracing::warn!(lease = %lease.id(), "the lease is held under this frontend's own name by a predecessor known dead: taking it over at once (the epoch bump fences what it left in flight)");
                Some(lease.clone())
            }
            Some(lease) => {
                let liveness = match arbiter.liveness(lease).await {
                    Ok(l) => l,
                    Err(e) => {
                        if let Some(n) = log.allow() {
                            tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot read what shows the lease holder alive; retrying");
                        }
                        sleep_until_or(deadline, Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let left = watch.observe_with(lease, &liveness, Instant::now(), config.margin);
                if !left.is_zero() {
                    if let Some(n) = log.allow() {
                        tracing::info!(lease = %lease.id(), unchanged_for = ?watch.unchanged_for(Instant::now()), wait_at_least = ?left, suppressed = n, "the lease is held by another acquisition; waiting until it goes unrenewed for its duration plus the margin");
                    }
                    sleep_until_or(
                        deadline,
                        left.clamp(Duration::from_millis(20), Duration::from_millis(500)),
                    )
                    .await;
                    continue;
                }
                tracing::warn!(lease = %lease.id(), unchanged_for = ?watch.unchanged_for(Instant::now()), "the lease went unrenewed for its duration plus the margin: taking it over");
                Some(lease.clone())
            }
        };
        let now_ms = config.wall_clock.now_ms();
        let change = Change::AcquireLease {
            holder: config.holder.clone(),
            duration: config.duration,
            now_ms,
            replaces,
        };
        let retry_in = match arbiter.update(&record.version, change).await {
            Ok(next) => {
                let Some(lease) = next.lease.clone() else {
                    return Err(LeaseError::Refused {
                        holder: config.holder.clone(),
                        source: ArbiterError::Corrupt {
                            location: "the acquired record".to_owned(),
                            reason: "no lease after an acquisition".to_owned(),
                        },
                    });
                };
                tracing::info!(holder = %config.holder, epoch = next.epoch.0, version = %next.version, duration = ?config.duration, "lease acquired; epoch bumped");
                return Ok((next, LeaseGuard::new(lease.id(), start, config.duration)));
            }
            // Changed since the read: look again.
            Err(
                ArbiterError::Conflict { .. } | ArbiterError::Rejected(Rejected::LeaseHeld { .. }),
            ) => Duration::ZERO,
            Err(e @ ArbiterError::Unreachable { .. }) => {
                // It may land anyway (an HTTP write that timed out): if a
                // later read shows it, the lease is ours.
                lost_answers.push(Attempt {
                    epoch: crate::protocol::Epoch(record.epoch.get() + 1),
                    now_ms,
                    started: start,
                });
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot acquire the lease: arbiter unavailable; retrying");
                }
                Duration::from_millis(200)
            }
            Err(e @ ArbiterError::Corrupt { .. }) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot acquire the lease: arbiter record unreadable; retrying");
                }
                Duration::from_millis(200)
            }
            Err(e) => {
                return Err(LeaseError::Refused {
                    holder: config.holder.clone(),
                    source: e,
                });
            }
        };
        sleep_until_or(deadline, retry_in).await;
    }
}

/// Sleeps `d`, but not past `deadline`.
async fn sleep_until_or(deadline: Instant, d: Duration) {
    let until = (Instant::now() + d).min(deadline);
    tokio::time::sleep_until(until.into()).await;
}

/// Keeps the lease until fenced: renews it every third of its duration, or
/// follows the node's heartbeat (see the module doc); logs lease state
/// changes once each.
pub async fn renew<A: Arbiter>(arbiter: Arc<A>, config: LeaseConfig, guard: Arc<LeaseGuard>) {
    if arbiter.node_heartbeat() {
        return follow_heartbeat(arbiter, config, guard).await;
    }
    let period = config.duration / 3;
    let mut next = Instant::now() + period;
    let mut log = RateLimit::new(Duration::from_secs(1));
    let mut reported = LeaseState::Held;
    loop {
        // Wake at the next renewal, or when the lease would run out, to
        // report the expiry as it happens.
        let expiry = Instant::now() + guard.remaining();
        let wake = if reported == LeaseState::Held {
            next.min(expiry + Duration::from_millis(1))
        } else {
            next
        };
        tokio::time::sleep_until(wake.into()).await;
        let state = guard.state();
        if state != reported {
            log_state(&config, state);
            reported = state;
        }
        if state == LeaseState::Fenced {
            return;
        }
        if Instant::now() < next {
            continue;
        }
        let start = BootInstant::now();
        let started = Instant::now();
        match renew_once(arbiter.as_ref(), &config, guard.id()).await {
            Ok(record) => {
                guard.renewed(start);
                tracing::debug!(version = %record.version, "lease renewed");
                next = started + period;
            }
            Err(ArbiterError::Rejected(e)) => {
                tracing::error!(error = %e, "the arbiter says another acquisition holds the lease: fenced for good, no more acknowledgements");
                guard.fence();
                return;
            }
            Err(e) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, remaining = ?guard.remaining(), "cannot renew the lease; I/O stops being acknowledged when it runs out");
                }
                next = Instant::now() + Duration::from_millis(200).min(period);
            }
        }
        let state = guard.state();
        if state != reported {
            log_state(&config, state);
            reported = state;
        }
    }
}

/// How often the node-local heartbeat report is read: a read is a file on
/// this machine, cheap; the lease is extended at most this late.
fn heartbeat_poll(duration: Duration) -> Duration {
    (duration / 20).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

/// [`renew`] by the node's heartbeat: no write while the heartbeat keeps
/// the lease held; one swap in the record to come back after an expiry.
async fn follow_heartbeat<A: Arbiter>(
    arbiter: Arc<A>,
    config: LeaseConfig,
    guard: Arc<LeaseGuard>,
) {
    let poll = heartbeat_poll(config.duration);
    let mut log = RateLimit::new(Duration::from_secs(1));
    let mut reported = LeaseState::Held;
    loop {
        tokio::time::sleep(poll).await;
        let state = guard.state();
        if state != reported {
            log_state(&config, state);
            reported = state;
        }
        if state == LeaseState::Fenced {
            return;
        }
        let beat = match arbiter.last_heartbeat().await {
            Ok(beat) => beat,
            Err(e) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, remaining = ?guard.remaining(), "cannot read the node heartbeat's last renewal; I/O stops being acknowledged when the lease runs out");
                }
                continue;
            }
        };
        let until = beat.sent + beat.duration.min(config.duration);
        let now = BootInstant::now();
        if until <= now {
            if let Some(n) = log.allow() {
                tracing::warn!(renewed_ago = ?now.saturating_since(beat.sent), suppressed = n, remaining = ?guard.remaining(), "the node heartbeat is not being renewed; I/O stops being acknowledged when the lease runs out");
            }
            continue;
        }
        if guard.extend_if_held(now, until) {
            continue;
        }
        if guard.state() == LeaseState::Fenced {
            return;
        }
        // The lease ran out and the heartbeat is back: an observer may
        // have judged the lease expired; swap once to prove nobody took
        // the volume (and to show an observer a change) before
        // acknowledging again.
        match renew_once(arbiter.as_ref(), &config, guard.id()).await {
            Ok(record) => {
                guard.extend_to(until);
                tracing::info!(version = %record.version, "the node heartbeat is back and the lease still ours (renewed in the record once)");
            }
            Err(ArbiterError::Rejected(e)) => {
                tracing::error!(error = %e, "the arbiter says another acquisition holds the lease: fenced for good, no more acknowledgements");
                guard.fence();
                log_state(&config, LeaseState::Fenced);
                return;
            }
            Err(e) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "the node heartbeat is back but the lease cannot be confirmed in the record; still not acknowledging");
                }
            }
        }
    }
}

fn log_state(config: &LeaseConfig, state: LeaseState) {
    match state {
        LeaseState::Held => {
            tracing::info!(holder = %config.holder, "lease renewed again: acknowledging I/O")
        }
        LeaseState::Expired => {
            tracing::error!(holder = %config.holder, "lease expired: self-fenced, I/O is held (neither acknowledged nor failed) until it is renewed or the lease is taken over")
        }
        LeaseState::Fenced => tracing::error!(holder = %config.holder, "fenced for good"),
    }
}

/// One renewal of acquisition `id`: read, then compare-and-swap; a
/// conflict (someone changed the in-sync set) is re-read and retried a few
/// times.
async fn renew_once<A: Arbiter>(
    arbiter: &A,
    config: &LeaseConfig,
    id: &LeaseId,
) -> Result<VolumeRecord, ArbiterError> {
    let mut record = arbiter.read().await?;
    let change = || Change::RenewLease {
        lease: id.clone(),
        now_ms: config.wall_clock.now_ms(),
    };
    for _ in 0..3 {
        match arbiter.update(&record.version, change()).await {
            Err(ArbiterError::Conflict { current, .. }) => record = *current,
            other => return other,
        }
    }
    arbiter.update(&record.version, change()).await
}

/// Gives acquisition `id` up on a clean shutdown so that the next frontend
/// does not wait for it to expire.
/// A conflict (the record changed since the read: a swap of the in-sync
/// set, a renewal of this very lease) is re-read and retried a few times.
pub async fn release<A: Arbiter>(arbiter: &A, id: &LeaseId) -> Result<(), ArbiterError> {
    let mut record = arbiter.read().await?;
    let change = || Change::ReleaseLease { lease: id.clone() };
    for _ in 0..3 {
        match arbiter.update(&record.version, change()).await {
            Err(ArbiterError::Conflict { current, .. }) => record = *current,
            other => return other.map(|_| ()),
        }
    }
    arbiter.update(&record.version, change()).await.map(|_| ())
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
