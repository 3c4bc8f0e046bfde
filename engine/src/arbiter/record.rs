//! A volume's record at the arbiter and the rules for changing it.
//!
//! Pure functions over a snapshot, so that every arbiter implementation (a
//! file here, the MirroredVolume status in the CSI driver) enforces the
//! same rules and they are tested without any storage:
//! - a replica leaves the in-sync set only if another one stays in it (the
//!   last in-sync replica holds the only complete copy);
//! - a replica returns only if it is one of the volume's replicas;
//! - a lease is one *acquisition*: its holder and the epoch it was acquired
//!   at ([`LeaseId`]). Every acquisition bumps the epoch, so that replicas
//!   fence the previous frontend, and only that acquisition renews or
//!   releases it — a frontend restarted under the same name is another
//!   acquisition, and its predecessor's renewals are refused;
//! - a frontend acquires a lease that is held (by anyone, itself included)
//!   only by naming the exact lease it saw expire (`replaces`): the caller
//!   judged that, the rules cannot, and the compare-and-swap on the version
//!   makes sure nothing changed since;
//! - every renewal changes the record (its time never goes backwards), so
//!   that an observer can tell a renewed lease from an abandoned one.
//!
//! # Time
//!
//! The rules never read a clock and never compare times. `renewed_at_ms`
//! is the holder's wall clock, recorded for people (`arbiter show`, the
//! Kubernetes `renewTime`); nobody decides anything from it, because two
//! machines' clocks need not agree. Expiry is judged by the observer, on
//! its own monotonic clock, from how long it has seen the lease unchanged
//! (`frontend::lease`, as client-go's leader election does); the holder
//! self-fences on its own clock (`CLOCK_BOOTTIME`).

use std::collections::BTreeSet;
use std::time::Duration;

use super::Version;
use crate::protocol::{Epoch, ReplicaId};

/// Identifies one frontend instance (node and process), the lease holder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FrontendId(pub String);

impl std::fmt::Display for FrontendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One acquisition of the lease: who, and at which epoch (every acquisition
/// bumps the epoch, so no two acquisitions share one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseId {
    pub holder: FrontendId,
    pub epoch: Epoch,
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (acquired at epoch {})", self.holder, self.epoch)
    }
}

/// Who may acknowledge I/O for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: FrontendId,
    /// The epoch the holder acquired the lease at (the record's epoch then).
    pub epoch: Epoch,
    /// When the holder last renewed, on the holder's wall clock (ms since
    /// the Unix epoch): for people to read, never compared with another
    /// clock. Strictly increasing over the renewals of one acquisition.
    pub renewed_at_ms: u64,
    /// How long the holder acknowledges I/O after a renewal began without
    /// another one succeeding.
    pub duration: Duration,
}

impl Lease {
    /// Which acquisition this is.
    pub fn id(&self) -> LeaseId {
        LeaseId {
            holder: self.holder.clone(),
            epoch: self.epoch,
        }
    }

    /// Whether this is acquisition `id`.
    pub fn is(&self, id: &LeaseId) -> bool {
        self.holder == id.holder && self.epoch == id.epoch
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Everything the arbiter knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub version: Version,
    pub epoch: Epoch,
    /// The volume's replicas (two).
    pub replicas: BTreeSet<ReplicaId>,
    /// The replicas that hold every acknowledged write.
    pub in_sync: BTreeSet<ReplicaId>,
    pub lease: Option<Lease>,
}

/// One change to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Stop waiting for this replica: writes are acknowledged without it.
    RemoveFromInSync(ReplicaId),
    /// The replica caught up (resync done) and gets every write again.
    ReturnToInSync(ReplicaId),
    /// Become the volume's frontend; bumps the epoch. With a lease held,
    /// `replaces` must be exactly that lease: the one the caller watched
    /// go unrenewed for its duration plus a margin, on its own clock.
    AcquireLease {
        holder: FrontendId,
        duration: Duration,
        /// The caller's wall clock, recorded as `renewed_at_ms`.
        now_ms: u64,
        replaces: Option<Lease>,
    },
    /// Extend the caller's own acquisition.
    RenewLease { lease: LeaseId, now_ms: u64 },
    /// Give the lease up (clean shutdown), so that the next frontend does
    /// not wait for it to expire.
    ReleaseLease { lease: LeaseId },
}

/// Why a change is not allowed from the current record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("replica {replica} is not a replica of this volume")]
    UnknownReplica { replica: ReplicaId },
    #[error(
        "replica {replica} is the last in-sync replica: it holds the only complete copy and cannot leave the in-sync set"
    )]
    LastInSync { replica: ReplicaId },
    #[error("replica {replica} is not in the in-sync set")]
    NotInSync { replica: ReplicaId },
    #[error("replica {replica} is already in the in-sync set")]
    AlreadyInSync { replica: ReplicaId },
    #[error(
        "the lease of {held} has not been seen expired by {requester}: it waits until the lease goes unrenewed for its duration plus the margin"
    )]
    LeaseHeld {
        held: LeaseId,
        requester: FrontendId,
    },
    #[error("{requester} does not hold the lease (it is {holder})")]
    NotHolder { requester: LeaseId, holder: String },
}

impl VolumeRecord {
    /// A new volume: both replicas in sync, epoch 0, no frontend.
    pub fn new(version: Version, replicas: BTreeSet<ReplicaId>) -> Self {
        Self {
            version,
            epoch: Epoch(0),
            in_sync: replicas.clone(),
            replicas,
            lease: None,
        }
    }

    /// The record after `change`, with `next_version`, or why not.
    pub fn apply(&self, change: Change, next_version: Version) -> Result<Self, Rejected> {
        let mut next = self.clone();
        next.version = next_version;
        match change {
            Change::RemoveFromInSync(replica) => {
                self.known(&replica)?;
                if !self.in_sync.contains(&replica) {
                    return Err(Rejected::NotInSync { replica });
                }
                if self.in_sync.len() == 1 {
                    return Err(Rejected::LastInSync { replica });
                }
                next.in_sync.remove(&replica);
            }
            Change::ReturnToInSync(replica) => {
                self.known(&replica)?;
                if !next.in_sync.insert(replica.clone()) {
                    return Err(Rejected::AlreadyInSync { replica });
                }
            }
            Change::AcquireLease {
                holder,
                duration,
                now_ms,
                replaces,
            } => {
                if let Some(lease) = &self.lease
                    && replaces.as_ref() != Some(lease)
                {
                    return Err(Rejected::LeaseHeld {
                        held: lease.id(),
                        requester: holder,
                    });
                }
                next.epoch = Epoch(self.epoch.get() + 1);
                next.lease = Some(Lease {
                    holder,
                    epoch: next.epoch,
                    renewed_at_ms: now_ms,
                    duration,
                });
            }
            Change::RenewLease { lease: id, now_ms } => {
                let lease = self.held_by(&id)?;
                next.lease = Some(Lease {
                    // Never the same time twice, never backwards: each
                    // renewal is a visible change to an observer.
                    renewed_at_ms: now_ms.max(lease.renewed_at_ms.saturating_add(1)),
                    ..lease.clone()
                });
            }
            Change::ReleaseLease { lease: id } => {
                self.held_by(&id)?;
                next.lease = None;
            }
        }
        Ok(next)
    }

    /// What `twinvol-engine arbiter show` prints: one `key: value` per
    /// line; the lease with its acquisition and how long ago its holder
    /// last renewed *by `now_ms`* (a wall clock that need not agree with
    /// the holder's: for people, not for decisions).
    pub fn summary(&self, now_ms: u64) -> String {
        let list = |set: &BTreeSet<ReplicaId>| {
            set.iter()
                .map(ReplicaId::as_str)
                .collect::<Vec<_>>()
                .join(",")
        };
        let out_of_sync: BTreeSet<ReplicaId> =
            self.replicas.difference(&self.in_sync).cloned().collect();
        let lease = match &self.lease {
            None => "none".to_owned(),
            Some(l) => {
                let ago = if now_ms >= l.renewed_at_ms {
                    format!("{} ms ago", now_ms - l.renewed_at_ms)
                } else {
                    format!("{} ms ahead of this clock", l.renewed_at_ms - now_ms)
                };
                format!(
                    "{} (epoch {}, duration {} ms, renewed {ago})",
                    l.holder,
                    l.epoch,
                    duration_ms(l.duration)
                )
            }
        };
        format!(
            "version: {}\nepoch: {}\nreplicas: {}\nin_sync: {}\nout_of_sync: {}\nlease: {}",
            self.version,
            self.epoch,
            list(&self.replicas),
            list(&self.in_sync),
            list(&out_of_sync),
            lease
        )
    }

    fn known(&self, replica: &ReplicaId) -> Result<(), Rejected> {
        if self.replicas.contains(replica) {
            Ok(())
        } else {
            Err(Rejected::UnknownReplica {
                replica: replica.clone(),
            })
        }
    }

    fn held_by(&self, requester: &LeaseId) -> Result<&Lease, Rejected> {
        match &self.lease {
            Some(lease) if lease.is(requester) => Ok(lease),
            other => Err(Rejected::NotHolder {
                requester: requester.clone(),
                holder: other
                    .as_ref()
                    .map_or_else(|| "nobody".to_owned(), |l| l.id().to_string()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).unwrap()
    }
    fn v(n: u64) -> Version {
        Version(n.to_string())
    }
    fn fe(s: &str) -> FrontendId {
        FrontendId(s.to_owned())
    }
    fn fresh() -> VolumeRecord {
        VolumeRecord::new(v(1), [r("a"), r("b")].into())
    }
    fn acquire(holder: &str, now_ms: u64, replaces: Option<&Lease>) -> Change {
        Change::AcquireLease {
            holder: fe(holder),
            duration: Duration::from_secs(10),
            now_ms,
            replaces: replaces.cloned(),
        }
    }
    fn id(holder: &str, epoch: u64) -> LeaseId {
        LeaseId {
            holder: fe(holder),
            epoch: Epoch(epoch),
        }
    }
    fn renew(holder: &str, epoch: u64, now_ms: u64) -> Change {
        Change::RenewLease {
            lease: id(holder, epoch),
            now_ms,
        }
    }

    #[test]
    fn the_summary_names_the_out_of_sync_replica_and_the_lease() {
        let held = fresh()
            .apply(acquire("fe-1", 1_000, None), v(2))
            .unwrap()
            .apply(Change::RemoveFromInSync(r("a")), v(3))
            .unwrap();
        let s = held.summary(4_000);
        assert!(s.contains("epoch: 1"), "{s}");
        assert!(s.contains("in_sync: b\n"), "{s}");
        assert!(s.contains("out_of_sync: a\n"), "{s}");
        assert!(
            s.contains("lease: fe-1 (epoch 1, duration 10000 ms, renewed 3000 ms ago)"),
            "{s}"
        );
        // A reader whose clock is behind the holder's is told so.
        assert!(
            held.summary(500)
                .contains("renewed 500 ms ahead of this clock")
        );
    }

    #[test]
    fn the_last_in_sync_replica_cannot_leave() {
        let one = fresh()
            .apply(Change::RemoveFromInSync(r("a")), v(2))
            .unwrap();
        assert_eq!(one.in_sync, [r("b")].into());
        assert_eq!(
            one.apply(Change::RemoveFromInSync(r("b")), v(3)),
            Err(Rejected::LastInSync { replica: r("b") })
        );
    }

    #[test]
    fn removing_an_out_of_sync_or_unknown_replica_is_rejected() {
        let one = fresh()
            .apply(Change::RemoveFromInSync(r("a")), v(2))
            .unwrap();
        assert_eq!(
            one.apply(Change::RemoveFromInSync(r("a")), v(3)),
            Err(Rejected::NotInSync { replica: r("a") })
        );
        assert_eq!(
            fresh().apply(Change::RemoveFromInSync(r("c")), v(2)),
            Err(Rejected::UnknownReplica { replica: r("c") })
        );
    }

    #[test]
    fn a_replica_returns_once() {
        let one = fresh()
            .apply(Change::RemoveFromInSync(r("a")), v(2))
            .unwrap();
        let both = one.apply(Change::ReturnToInSync(r("a")), v(3)).unwrap();
        assert_eq!(both.in_sync, both.replicas);
        assert_eq!(
            both.apply(Change::ReturnToInSync(r("a")), v(4)),
            Err(Rejected::AlreadyInSync { replica: r("a") })
        );
    }

    #[test]
    fn every_acquisition_bumps_the_epoch_and_is_recorded_with_it() {
        let first = fresh().apply(acquire("fe-1", 1_000, None), v(2)).unwrap();
        assert_eq!(first.epoch, Epoch(1));
        let lease = first.lease.clone().unwrap();
        assert_eq!(lease.id(), id("fe-1", 1));
        let again = first
            .apply(acquire("fe-1", 2_000, Some(&lease)), v(3))
            .unwrap();
        assert_eq!(again.epoch, Epoch(2));
        assert_eq!(again.lease.unwrap().id(), id("fe-1", 2));
    }

    #[test]
    fn a_held_lease_is_taken_only_by_naming_it_exactly() {
        let held = fresh().apply(acquire("fe-1", 1_000, None), v(2)).unwrap();
        let lease = held.lease.clone().unwrap();
        // Whatever the requester's clock says: without naming the lease it
        // saw expire, it is refused.
        for now_ms in [0, 1_000, 13_000, u64::MAX] {
            assert_eq!(
                held.apply(acquire("fe-2", now_ms, None), v(3)),
                Err(Rejected::LeaseHeld {
                    held: id("fe-1", 1),
                    requester: fe("fe-2"),
                })
            );
        }
        // Naming an older state of it (seen before a renewal) is refused.
        let renewed = held.apply(renew("fe-1", 1, 2_000), v(3)).unwrap();
        assert!(matches!(
            renewed.apply(acquire("fe-2", 99_000, Some(&lease)), v(4)),
            Err(Rejected::LeaseHeld { .. })
        ));
        // The same name does not help: a restarted holder is another
        // acquisition.
        assert!(matches!(
            renewed.apply(acquire("fe-1", 99_000, None), v(4)),
            Err(Rejected::LeaseHeld { .. })
        ));
        let current = renewed.lease.clone().unwrap();
        let taken = renewed
            .apply(acquire("fe-2", 0, Some(&current)), v(4))
            .unwrap();
        assert_eq!(taken.lease.as_ref().unwrap().id(), id("fe-2", 2));
        assert_eq!(taken.epoch, Epoch(2));
    }

    #[test]
    fn only_the_acquisition_itself_renews_or_releases() {
        let held = fresh().apply(acquire("fe-1", 1_000, None), v(2)).unwrap();
        let renewed = held.apply(renew("fe-1", 1, 5_000), v(3)).unwrap();
        assert_eq!(renewed.lease.as_ref().unwrap().renewed_at_ms, 5_000);
        assert_eq!(renewed.epoch, held.epoch, "renewal keeps the epoch");
        assert!(matches!(
            renewed.apply(renew("fe-2", 1, 6_000), v(4)),
            Err(Rejected::NotHolder { .. })
        ));
        // The predecessor of a restarted fe-1 (the same name, the old
        // epoch) is refused once the restart acquired.
        let lease = renewed.lease.clone().unwrap();
        let restarted = renewed
            .apply(acquire("fe-1", 6_000, Some(&lease)), v(4))
            .unwrap();
        assert_eq!(
            restarted.apply(renew("fe-1", 1, 7_000), v(5)),
            Err(Rejected::NotHolder {
                requester: id("fe-1", 1),
                holder: "fe-1 (acquired at epoch 2)".to_owned(),
            })
        );
        assert!(matches!(
            restarted.apply(
                Change::ReleaseLease {
                    lease: id("fe-1", 1)
                },
                v(5)
            ),
            Err(Rejected::NotHolder { .. })
        ));
        let released = restarted
            .apply(
                Change::ReleaseLease {
                    lease: id("fe-1", 2),
                },
                v(5),
            )
            .unwrap();
        assert_eq!(released.lease, None);
        let next = released.apply(acquire("fe-2", 6_000, None), v(6)).unwrap();
        assert_eq!(next.epoch, Epoch(3));
    }

    proptest! {
        /// However the holder's clock jumps, every renewal changes the
        /// lease and none goes back in time: an observer timing how long
        /// the lease stayed unchanged never mistakes a renewed lease for
        /// an abandoned one.
        #[test]
        fn every_renewal_is_a_visible_change(
            start in 0u64..1_000_000,
            clocks in proptest::collection::vec(0u64..2_000_000, 1..20),
        ) {
            let mut rec = fresh().apply(acquire("fe", start, None), v(2)).unwrap();
            for (i, now_ms) in clocks.into_iter().enumerate() {
                let before = rec.lease.clone().unwrap();
                rec = rec.apply(renew("fe", 1, now_ms), v(3 + i as u64)).unwrap();
                let after = rec.lease.clone().unwrap();
                prop_assert_ne!(&after, &before);
                prop_assert!(after.renewed_at_ms > before.renewed_at_ms);
                prop_assert_eq!(after.id(), before.id());
            }
        }
    }
}
