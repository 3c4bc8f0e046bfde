//! The operator's changes to a volume's arbiter record, built only from the
//! engine's own rules ([`VolumeRecord::apply`]), so that the operator can
//! never make a change a frontend could not: the same checks (the last
//! in-sync replica never leaves, a live lease is never taken before it
//! expired plus the margin, every acquisition bumps the epoch) hold for
//! both. The reconciler writes the result as one compare-and-swap on the
//! MirroredVolume status (`twinvol_csi_driver::arbiter::mapping`), so a
//! fail-over is one atomic step: an operator killed before the write did
//! nothing, one killed after it left a record that needs no second bump.
//!
//! - [`fence`]: a lost site's frontend is fenced — the operator takes the
//!   lease (epoch + 1: every replica now refuses the old frontend) and gives
//!   it up at once, so the next frontend need not wait; the lost site's
//!   replica leaves the in-sync set if another one stays in it.
//! - [`promote`]: the audited override — the surviving replica, not in sync,
//!   becomes the in-sync one and the lost one leaves (its writes the
//!   survivor missed are given up).

use std::time::Duration;

use twinvol_engine::arbiter::{Change, FrontendId, Lease, LeaseId, Rejected, VolumeRecord};
use twinvol_engine::protocol::ReplicaId;

/// The lease holder the operator uses for its fencing bumps (a frontend
/// never has this identity: frontends are named after node and process).
pub const OPERATOR_HOLDER: &str = "twinvol-operator/fence";

/// The operator's acquisition names `expired`, the lease it watched go
/// unrenewed for its duration plus the margin on its own clock: the rules
/// take a held lease only from a caller that names exactly the lease held
/// now (they never compare clocks), and the compare-and-swap makes sure the
/// record did not change since it was read.
fn bump(
    record: &VolumeRecord,
    now_ms: u64,
    expired: Option<Lease>,
) -> Result<VolumeRecord, Rejected> {
    let holder = FrontendId(OPERATOR_HOLDER.to_owned());
    let version = record.version.clone();
    let acquired = record.apply(
        Change::AcquireLease {
            holder: holder.clone(),
            duration: Duration::ZERO,
            now_ms,
            replaces: expired,
        },
        version.clone(),
    )?;
    let lease = LeaseId {
        holder,
        epoch: acquired.epoch,
    };
    acquired.apply(Change::ReleaseLease { lease }, version)
}

/// The record after fencing the frontend of a lost site whose replica is
/// `lost`: epoch + 1, no lease, `lost` out of the in-sync set if another
/// replica stays in it. `expired` is the lease the operator watched expire
/// (plus the margin, on its own clock); refused by the rules when the
/// record holds another one.
pub fn fence(
    record: &VolumeRecord,
    lost: &ReplicaId,
    now_ms: u64,
    expired: Option<Lease>,
) -> Result<VolumeRecord, Rejected> {
    let mut next = bump(record, now_ms, expired)?;
    if next.in_sync.contains(lost) && next.in_sync.len() > 1 {
        next = next.apply(
            Change::RemoveFromInSync(lost.clone()),
            record.version.clone(),
        )?;
    }
    Ok(next)
}

/// The record after the override promoting `promote` over `demote`: the
/// epoch bumped if `bump_epoch` (the frontend was on the lost site), then
/// `promote` into the in-sync set and `demote` out of it.
pub fn promote(
    record: &VolumeRecord,
    promote: &ReplicaId,
    demote: &ReplicaId,
    bump_epoch: bool,
    now_ms: u64,
    expired: Option<Lease>,
) -> Result<VolumeRecord, Rejected> {
    let version = record.version.clone();
    let mut next = if bump_epoch {
        bump(record, now_ms, expired)?
    } else {
        record.clone()
    };
    if !next.in_sync.contains(promote) {
        next = next.apply(Change::ReturnToInSync(promote.clone()), version.clone())?;
    }
    if next.in_sync.contains(demote) {
        next = next.apply(Change::RemoveFromInSync(demote.clone()), version)?;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use twinvol_engine::arbiter::Version;
    use twinvol_engine::protocol::Epoch;

    use super::*;

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("valid")
    }

    fn held(epoch: u64, in_sync: &[&str], renewed_at_ms: u64) -> VolumeRecord {
        let mut record = VolumeRecord::new(Version("7".into()), [r("a"), r("b")].into());
        record.epoch = Epoch(epoch);
        record.in_sync = in_sync.iter().map(|s| r(s)).collect();
        record.lease = Some(Lease {
            holder: FrontendId("node-a1/fe".into()),
            epoch: Epoch(epoch),
            renewed_at_ms,
            duration: Duration::from_secs(10),
        });
        record
    }

    #[test]
    fn fencing_bumps_once_frees_the_lease_and_drops_the_lost_replica() {
        let before = held(4, &["a", "b"], 1_000);
        let after = fence(&before, &r("a"), 13_000, before.lease.clone()).expect("expired");
        assert_eq!(after.epoch, Epoch(5));
        assert_eq!(after.lease, None);
        assert_eq!(after.in_sync, [r("b")].into());
    }

    #[test]
    fn fencing_a_lease_other_than_the_one_watched_expire_is_refused_by_the_engine_rules() {
        let before = held(4, &["a", "b"], 1_000);
        // The operator watched an older acquisition expire; the record holds
        // a newer one (the frontend restarted and acquired again).
        let mut watched = before.lease.clone().expect("held");
        watched.epoch = Epoch(3);
        assert!(matches!(
            fence(&before, &r("a"), 13_000, Some(watched)),
            Err(Rejected::LeaseHeld { .. })
        ));
        assert!(matches!(
            fence(&before, &r("a"), 13_000, None),
            Err(Rejected::LeaseHeld { .. })
        ));
    }

    #[test]
    fn fencing_never_empties_the_in_sync_set() {
        let before = held(4, &["a"], 0);
        let after = fence(&before, &r("a"), 60_000, before.lease.clone()).expect("expired");
        assert_eq!(
            after.in_sync,
            [r("a")].into(),
            "a holds the only complete copy"
        );
    }

    #[test]
    fn the_override_swaps_the_in_sync_replica_and_bumps_when_asked() {
        let before = held(4, &["a"], 0);
        let after = promote(
            &before,
            &r("b"),
            &r("a"),
            true,
            60_000,
            before.lease.clone(),
        )
        .expect("ok");
        assert_eq!(after.in_sync, [r("b")].into());
        assert_eq!(after.epoch, Epoch(5));
        assert_eq!(after.lease, None);
        let no_bump = promote(&before, &r("b"), &r("a"), false, 60_000, None).expect("ok");
        assert_eq!(no_bump.epoch, Epoch(4));
        assert_eq!(no_bump.lease, before.lease);
    }

    proptest! {
        #[test]
        fn the_operators_changes_never_lower_the_epoch_and_bump_it_by_exactly_one(
            epoch in 0u64..1_000_000,
            a_in in any::<bool>(),
            b_in in any::<bool>(),
            renewed in 0u64..100_000,
            now in 0u64..200_000,
            lease in any::<bool>(),
            which in any::<bool>(),
            watched_current in any::<bool>(),
        ) {
            let mut in_sync = Vec::new();
            if a_in { in_sync.push("a"); }
            if b_in || !a_in { in_sync.push("b"); }
            let mut before = held(epoch, &in_sync, renewed);
            if !lease { before.lease = None; }
            let watched = if watched_current { before.lease.clone() } else { None };
            let (lost, other) = if which { (r("a"), r("b")) } else { (r("b"), r("a")) };
            for result in [
                fence(&before, &lost, now, watched.clone()),
                promote(&before, &other, &lost, true, now, watched.clone()),
            ] {
                match result {
                    Ok(after) => {
                        prop_assert_eq!(after.epoch.get(), epoch + 1);
                        prop_assert_eq!(&after.lease, &None);
                        prop_assert!(!after.in_sync.is_empty());
                        prop_assert_eq!(&watched, &before.lease);
                    }
                    Err(Rejected::LeaseHeld { .. }) => {
                        prop_assert!(before.lease.is_some() && watched != before.lease);
                    }
                    Err(other) => prop_assert!(false, "unexpected refusal {other}"),
                }
            }
        }
    }
}
