//! Degraded operation: taking a lost replica out of the in-sync set through
//! the arbiter before any write is acknowledged without it (design
//! invariant 2).
//!
//! One task (the [`run`] loop) owns the procedure, so that concurrent
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::arbiter::{Arbiter, ArbiterError, Change, FrontendId, VolumeRecord};
use crate::metrics::Metrics;
use crate::protocol::{ArbiterVersion, Epoch, Op, ReplicaId, VolumeId};

use super::connection::ReplicaHandle;
use super::lease::{LeaseGuard, RateLimit};

/// Which replicas get writes, as this frontend last agreed with the arbiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Indexed like the mirror's replicas.
    pub in_sync: [bool; 2],
    /// Set when this frontend must not acknowledge anything any more.
    pub fenced: Option<String>,
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

/// The pure fail-over rule.
pub fn decide(
    record: &VolumeRecord,
    me: &FrontendId,
    epoch: Epoch,
    lost: &ReplicaId,
    survivor: &ReplicaId,
) -> Decision {
    if record.epoch != epoch {
        return Decision::Fence(format!(
            "the volume's epoch is {} but this frontend runs at {epoch}",
            record.epoch
        ));
    }
    match &record.lease {
        Some(l) if l.holder == *me => {}
        other => {
            return Decision::Fence(format!(
                "the lease is held by {}",
                other
                    .as_ref()
                    .map_or_else(|| "nobody".to_owned(), |l| l.holder.to_string())
            ));
        }
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
    pub membership: watch::Sender<Membership>,
    pub metrics: Arc<Metrics>,
    pub volume: VolumeId,
}

impl<A: Arbiter> Failover<A> {
    /// Handles suspects until the mirror goes away.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Suspect>) {
        while let Some(s) = rx.recv().await {
            let current = self.membership.borrow().clone();
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
    }

    async fn remove(&self, s: Suspect) {
        let lost = self.replicas[s.index].id().clone();
        let survivor_ix = 1 - s.index;
        let survivor = self.replicas[survivor_ix].id().clone();
        tracing::warn!(replica = %lost, "replica did not answer: holding I/O and removing it from the in-sync set through the arbiter");
        let mut log = RateLimit::new(Duration::from_secs(1));
        let record = loop {
            match self.try_remove(&lost, &survivor).await {
                Ok(r) => break r,
                Err(Step::Fence(why)) => {
                    tracing::error!(reason = %why, "lost the fail-over: fenced, no more acknowledgements");
                    self.lease.fence();
                    self.membership.send_modify(|m| m.fenced = Some(why));
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
        let version = match ArbiterVersion::new(record.version.0.clone()) {
            Ok(v) => v,
            Err(e) => {
                let why = format!("arbiter version unusable: {e}");
                self.membership.send_modify(|m| m.fenced = Some(why));
                return;
            }
        };
        // The survivor must track what its peer misses before any write is
        // acknowledged on it alone.
        loop {
            let op = Op::PeerState {
                peer: lost.clone(),
                in_sync: false,
                arbiter_version: version.clone(),
            };
            match self.replicas[survivor_ix].call(op).await {
                Ok(_) => break,
                Err(e) => {
                    if let Some(n) = log.allow() {
                        tracing::warn!(replica = %survivor, error = %e, suppressed = n, "survivor did not take the peer state; I/O held");
                    }
                    if matches!(e, super::connection::CallError::Fenced { .. }) {
                        self.membership
                            .send_modify(|m| m.fenced = Some(e.to_string()));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.membership.send_modify(|m| m.in_sync[s.index] = false);
        let pause = s.since.elapsed();
        self.metrics.record_failover(self.volume.as_str(), pause);
        tracing::warn!(replica = %lost, survivor = %survivor, version = %record.version, pause_ms = pause.as_millis() as u64, "replica out of sync: writes resumed on the survivor alone");
    }

    async fn try_remove(
        &self,
        lost: &ReplicaId,
        survivor: &ReplicaId,
    ) -> Result<VolumeRecord, Step> {
        let mut record = self.arbiter.read().await.map_err(Step::from)?;
        loop {
            match decide(&record, &self.me, self.epoch, lost, survivor) {
                Decision::Fence(why) => return Err(Step::Fence(why)),
                Decision::AlreadyOut => return Ok(record),
                Decision::Swap => {}
            }
            match self
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
