//! A volume's record at the arbiter and the rules for changing it.
//!
//! Pure functions over a snapshot, so that every arbiter implementation (a
//! file here, the MirroredVolume status later) enforces the same rules and
//! they are tested without any storage:
//! - a replica leaves the in-sync set only if another one stays in it (the
//!   last in-sync replica holds the only complete copy);
//! - a replica returns only if it is one of the volume's replicas;
//! - a frontend acquires the lease only when it is free, expired (plus a
//!   margin), or already its own, and every acquisition bumps the epoch, so
//!   that replicas fence the previous frontend;
//! - only the holder renews or releases the lease.
//!
//! Times are wall-clock milliseconds since the Unix epoch, as the Kubernetes
//! Lease object records them; a frontend's self-fencing uses its own
//! monotonic clock, not these.

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

/// Who may acknowledge I/O for the volume, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: FrontendId,
    /// When the holder last renewed (ms since the Unix epoch).
    pub renewed_at_ms: u64,
    pub duration: Duration,
}

impl Lease {
    /// Whether another frontend may take the lease at `now_ms`: the holder's
    /// lease ran out and `margin` more passed (clock skew, in-flight I/O).
    pub fn expired(&self, now_ms: u64, margin: Duration) -> bool {
        let until = self
            .renewed_at_ms
            .saturating_add(duration_ms(self.duration))
            .saturating_add(duration_ms(margin));
        now_ms >= until
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
    /// Become the volume's frontend; bumps the epoch.
    AcquireLease {
        holder: FrontendId,
        duration: Duration,
        margin: Duration,
        now_ms: u64,
    },
    /// Extend the caller's own lease.
    RenewLease { holder: FrontendId, now_ms: u64 },
    /// Give the lease up (clean shutdown), so that the next frontend does
    /// not wait for it to expire.
    ReleaseLease { holder: FrontendId },
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
        "the lease is held by {holder} until {until_ms} ms (plus margin); {requester} must wait"
    )]
    LeaseHeld {
        holder: FrontendId,
        requester: FrontendId,
        until_ms: u64,
    },
    #[error("{requester} does not hold the lease (holder: {holder})")]
    NotHolder {
        requester: FrontendId,
        holder: String,
    },
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
                margin,
                now_ms,
            } => {
                if let Some(lease) = &self.lease
                    && lease.holder != holder
                    && !lease.expired(now_ms, margin)
                {
                    return Err(Rejected::LeaseHeld {
                        holder: lease.holder.clone(),
                        requester: holder,
                        until_ms: lease
                            .renewed_at_ms
                            .saturating_add(duration_ms(lease.duration)),
                    });
                }
                next.epoch = Epoch(self.epoch.get() + 1);
                next.lease = Some(Lease {
                    holder,
                    renewed_at_ms: now_ms,
                    duration,
                });
            }
            Change::RenewLease { holder, now_ms } => {
                let lease = self.held_by(&holder)?;
                next.lease = Some(Lease {
                    renewed_at_ms: now_ms,
                    ..lease.clone()
                });
            }
            Change::ReleaseLease { holder } => {
                self.held_by(&holder)?;
                next.lease = None;
            }
        }
        Ok(next)
    }

    /// What `twinvol-engine arbiter show` prints: one `key: value` per
    /// line, the lease's expiry relative to `now_ms`.
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
                let until = l.renewed_at_ms.saturating_add(duration_ms(l.duration));
                if until > now_ms {
                    format!("{} (expires in {} ms)", l.holder, until - now_ms)
                } else {
                    format!("{} (expired {} ms ago)", l.holder, now_ms - until)
                }
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

    fn held_by(&self, requester: &FrontendId) -> Result<&Lease, Rejected> {
        match &self.lease {
            Some(lease) if lease.holder == *requester => Ok(lease),
            other => Err(Rejected::NotHolder {
                requester: requester.clone(),
                holder: other
                    .as_ref()
                    .map_or_else(|| "nobody".to_owned(), |l| l.holder.to_string()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn acquire(holder: &str, now_ms: u64) -> Change {
        Change::AcquireLease {
            holder: fe(holder),
            duration: Duration::from_secs(10),
            margin: Duration::from_secs(2),
            now_ms,
        }
    }

    #[test]
    fn the_summary_names_the_out_of_sync_replica_and_the_lease_expiry() {
        let held = fresh()
            .apply(acquire("fe-1", 1_000), v(2))
            .unwrap()
            .apply(Change::RemoveFromInSync(r("a")), v(3))
            .unwrap();
        let s = held.summary(4_000);
        assert!(s.contains("epoch: 1"), "{s}");
        assert!(s.contains("in_sync: b\n"), "{s}");
        assert!(s.contains("out_of_sync: a\n"), "{s}");
        assert!(s.contains("lease: fe-1 (expires in 7000 ms)"), "{s}");
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
    fn every_acquisition_bumps_the_epoch() {
        let first = fresh().apply(acquire("fe-1", 1_000), v(2)).unwrap();
        assert_eq!(first.epoch, Epoch(1));
        let again = first.apply(acquire("fe-1", 2_000), v(3)).unwrap();
        assert_eq!(
            again.epoch,
            Epoch(2),
            "re-acquiring (a restarted frontend) fences the old process too"
        );
    }

    #[test]
    fn a_live_lease_is_not_taken_until_expiry_plus_margin() {
        let held = fresh().apply(acquire("fe-1", 1_000), v(2)).unwrap();
        // Lease 10 s + margin 2 s from t = 1 s: free at 13 s, not before.
        assert!(matches!(
            held.apply(acquire("fe-2", 12_999), v(3)),
            Err(Rejected::LeaseHeld { .. })
        ));
        let taken = held.apply(acquire("fe-2", 13_000), v(3)).unwrap();
        assert_eq!(taken.lease.as_ref().unwrap().holder, fe("fe-2"));
        assert_eq!(taken.epoch, Epoch(2));
    }

    #[test]
    fn only_the_holder_renews_or_releases() {
        let held = fresh().apply(acquire("fe-1", 1_000), v(2)).unwrap();
        let renewed = held
            .apply(
                Change::RenewLease {
                    holder: fe("fe-1"),
                    now_ms: 5_000,
                },
                v(3),
            )
            .unwrap();
        assert_eq!(renewed.lease.as_ref().unwrap().renewed_at_ms, 5_000);
        assert_eq!(renewed.epoch, held.epoch, "renewal keeps the epoch");
        assert!(matches!(
            renewed.apply(
                Change::RenewLease {
                    holder: fe("fe-2"),
                    now_ms: 6_000
                },
                v(4)
            ),
            Err(Rejected::NotHolder { .. })
        ));
        let released = renewed
            .apply(Change::ReleaseLease { holder: fe("fe-1") }, v(4))
            .unwrap();
        assert_eq!(released.lease, None);
        let next = released.apply(acquire("fe-2", 6_000), v(5)).unwrap();
        assert_eq!(next.epoch, Epoch(2));
    }
}
