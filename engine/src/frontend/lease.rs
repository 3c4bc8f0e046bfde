//! The frontend's lease at the arbiter and its self-fencing (design
//! invariants 3 and 4).
//!
//! [`acquire`] takes the lease through the arbiter's compare-and-swap
//! (`AcquireLease` bumps the epoch), waiting — and saying why — while a live
//! lease of another holder has not expired plus the margin. [`renew`] then
//! renews it every third of its duration.
//!
//! The lease is judged on this process's own monotonic clock, never on the
//! arbiter's wall-clock times: it is valid until `start + duration`, where
//! `start` is when the last *successful* renew call began (a renew that
//! took long only shortens the lease). [`LeaseGuard::valid`] is checked
//! right before every acknowledgement, so nothing is acknowledged after the
//! lease expired. Being refused by the arbiter (another holder) or a
//! replica reporting a newer epoch fences the frontend for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::arbiter::{Arbiter, ArbiterError, Change, FrontendId, Rejected, VolumeRecord};

/// How this frontend holds its lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub holder: FrontendId,
    pub duration: Duration,
    /// Extra wait after another holder's lease expired before taking it.
    pub margin: Duration,
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

/// The lease as the data path sees it: lock-free checks.
#[derive(Debug)]
pub struct LeaseGuard {
    base: Instant,
    /// Nanoseconds after `base` until which the lease is valid.
    valid_until_ns: AtomicU64,
    fenced: AtomicBool,
    duration: Duration,
}

impl LeaseGuard {
    /// A lease whose last successful renew call started at `start`.
    pub fn new(start: Instant, duration: Duration) -> Arc<Self> {
        let g = Arc::new(Self {
            base: start,
            valid_until_ns: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            duration,
        });
        g.renewed(start);
        g
    }

    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records a successful renew call that began at `start`.
    pub fn renewed(&self, start: Instant) {
        let until = self.ns(start + self.duration);
        self.valid_until_ns.fetch_max(until, Ordering::SeqCst);
    }

    /// Fences for good.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    pub fn state_at(&self, now: Instant) -> LeaseState {
        if self.fenced.load(Ordering::SeqCst) {
            LeaseState::Fenced
        } else if self.ns(now) < self.valid_until_ns.load(Ordering::SeqCst) {
            LeaseState::Held
        } else {
            LeaseState::Expired
        }
    }

    pub fn state(&self) -> LeaseState {
        self.state_at(Instant::now())
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
        let now = self.ns(Instant::now());
        Duration::from_nanos(
            self.valid_until_ns
                .load(Ordering::SeqCst)
                .saturating_sub(now),
        )
    }
}

/// Wall-clock milliseconds since the Unix epoch, as the arbiter records
/// lease times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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

/// Acquires the lease, waiting for another holder's lease to expire plus
/// the margin, and retrying an unreachable arbiter, until `give_up`.
/// Returns the record (with the new epoch) and the guard.
pub async fn acquire<A: Arbiter>(
    arbiter: &A,
    config: &LeaseConfig,
    give_up: Duration,
) -> Result<(VolumeRecord, Arc<LeaseGuard>), LeaseError> {
    let began = Instant::now();
    let deadline = began + give_up;
    let mut log = RateLimit::new(Duration::from_secs(1));
    loop {
        if Instant::now() >= deadline {
            return Err(LeaseError::GaveUp {
                holder: config.holder.clone(),
                waited: began.elapsed(),
            });
        }
        let start = Instant::now();
        let wait = match arbiter.read().await {
            Ok(record) => {
                let change = Change::AcquireLease {
                    holder: config.holder.clone(),
                    duration: config.duration,
                    margin: config.margin,
                    now_ms: now_ms(),
                };
                match arbiter.update(&record.version, change).await {
                    Ok(next) => {
                        tracing::info!(holder = %config.holder, epoch = next.epoch.0, version = %next.version, duration = ?config.duration, "lease acquired; epoch bumped");
                        return Ok((next, LeaseGuard::new(start, config.duration)));
                    }
                    Err(ArbiterError::Conflict { .. }) => Duration::ZERO,
                    Err(ArbiterError::Rejected(Rejected::LeaseHeld {
                        holder, until_ms, ..
                    })) => {
                        let free_at = until_ms.saturating_add(
                            u64::try_from(config.margin.as_millis()).unwrap_or(u64::MAX),
                        );
                        let left = Duration::from_millis(free_at.saturating_sub(now_ms()));
                        if log.allow().is_some() {
                            tracing::info!(holder = %holder, wait = ?left, "the lease is held by another frontend; waiting for it to expire plus the margin");
                        }
                        left.clamp(Duration::from_millis(20), Duration::from_millis(500))
                    }
                    Err(e @ (ArbiterError::Unreachable { .. } | ArbiterError::Corrupt { .. })) => {
                        if let Some(n) = log.allow() {
                            tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot acquire the lease: arbiter unavailable; retrying");
                        }
                        Duration::from_millis(200)
                    }
                    Err(e) => {
                        return Err(LeaseError::Refused {
                            holder: config.holder.clone(),
                            source: e,
                        });
                    }
                }
            }
            Err(e) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed = n, "cannot read the arbiter record; retrying");
                }
                Duration::from_millis(200)
            }
        };
        let until = (Instant::now() + wait).min(deadline);
        tokio::time::sleep_until(until.into()).await;
    }
}

/// Renews the lease every third of its duration until fenced; logs lease
/// state changes once each.
pub async fn renew<A: Arbiter>(arbiter: Arc<A>, config: LeaseConfig, guard: Arc<LeaseGuard>) {
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
        let start = Instant::now();
        match renew_once(arbiter.as_ref(), &config).await {
            Ok(record) => {
                guard.renewed(start);
                tracing::debug!(version = %record.version, "lease renewed");
                next = start + period;
            }
            Err(ArbiterError::Rejected(e)) => {
                tracing::error!(error = %e, "the arbiter says another frontend holds the lease: fenced for good, no more acknowledgements");
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

fn log_state(config: &LeaseConfig, state: LeaseState) {
    match state {
        LeaseState::Held => {
            tracing::info!(holder = %config.holder, "lease renewed again: acknowledging I/O")
        }
        LeaseState::Expired => {
            tracing::error!(holder = %config.holder, "lease expired: self-fenced, no I/O is acknowledged until it is renewed")
        }
        LeaseState::Fenced => tracing::error!(holder = %config.holder, "fenced for good"),
    }
}

/// One renewal: read, then compare-and-swap; a conflict (someone changed
/// the in-sync set) is re-read and retried once more.
async fn renew_once<A: Arbiter>(
    arbiter: &A,
    config: &LeaseConfig,
) -> Result<VolumeRecord, ArbiterError> {
    let mut record = arbiter.read().await?;
    for _ in 0..3 {
        let change = Change::RenewLease {
            holder: config.holder.clone(),
            now_ms: now_ms(),
        };
        match arbiter.update(&record.version, change).await {
            Err(ArbiterError::Conflict { current, .. }) => record = *current,
            other => return other,
        }
    }
    let change = Change::RenewLease {
        holder: config.holder.clone(),
        now_ms: now_ms(),
    };
    arbiter.update(&record.version, change).await
}

/// Gives the lease up on a clean shutdown so that the next frontend does
/// not wait for it to expire.
pub async fn release<A: Arbiter>(arbiter: &A, holder: &FrontendId) -> Result<(), ArbiterError> {
    let record = arbiter.read().await?;
    arbiter
        .update(
            &record.version,
            Change::ReleaseLease {
                holder: holder.clone(),
            },
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_valid_for_its_duration_from_the_start_of_the_last_renew() {
        let t0 = Instant::now();
        let g = LeaseGuard::new(t0, Duration::from_secs(10));
        assert_eq!(g.state_at(t0 + Duration::from_secs(9)), LeaseState::Held);
        assert_eq!(
            g.state_at(t0 + Duration::from_secs(10)),
            LeaseState::Expired
        );
        g.renewed(t0 + Duration::from_secs(5));
        assert_eq!(g.state_at(t0 + Duration::from_secs(14)), LeaseState::Held);
        // An older renew call finishing late never shortens the lease.
        g.renewed(t0 + Duration::from_secs(1));
        assert_eq!(g.state_at(t0 + Duration::from_secs(14)), LeaseState::Held);
        g.fence();
        assert_eq!(g.state_at(t0), LeaseState::Fenced);
        assert_eq!(g.remaining(), Duration::ZERO);
    }

    #[test]
    fn the_rate_limit_lets_one_line_through_per_period() {
        let mut r = RateLimit::new(Duration::from_secs(60));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
    }

    #[tokio::test]
    async fn a_second_frontend_waits_for_expiry_and_bumps_the_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v1.arbiter");
        let replicas = ["a", "b"]
            .into_iter()
            .map(|s| crate::protocol::ReplicaId::new(s).expect("valid"))
            .collect();
        let arbiter = crate::arbiter::FileArbiter::create(&path, replicas).expect("create");
        let cfg = |h: &str| LeaseConfig {
            holder: FrontendId(h.to_owned()),
            duration: Duration::from_millis(300),
            margin: Duration::from_millis(100),
        };
        let (first, _g1) = acquire(&arbiter, &cfg("fe-1"), Duration::from_secs(5))
            .await
            .expect("first");
        let t = Instant::now();
        let (second, g2) = acquire(&arbiter, &cfg("fe-2"), Duration::from_secs(5))
            .await
            .expect("second");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "took over a live lease after {:?}",
            t.elapsed()
        );
        assert_eq!(second.epoch.0, first.epoch.0 + 1);
        assert!(g2.valid());
        // The first frontend's renewal is refused: fenced for good.
        let r = renew_once(&arbiter, &cfg("fe-1")).await;
        assert!(matches!(r, Err(ArbiterError::Rejected(_))), "{r:?}");
    }
}
