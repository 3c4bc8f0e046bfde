//! The views of the arbiter's record this frontend publishes to the
//! replicas (design invariant 3: the direction of every resync comes from
//! the record).
//!
//! The frontend numbers the records it learns in its epoch: a record with
//! a version it has not published yet gets the next sequence number, the
//! same version keeps its number. Only the lease holder of an epoch changes
//! the in-sync set during it and every acquisition bumps the epoch, so
//! `(epoch, seq)` orders views as the arbiter's history does, whatever the
//! arbiter's versions look like (they are opaque: a counter for the file
//! arbiter, a resourceVersion for Kubernetes). Replicas keep the newest
//! view they learned (`replica::direction`). [`Views`] also remembers which
//! replica has not acknowledged the current view yet, so that the
//! fail-over task tells it again.

use crate::arbiter::{Version, VolumeRecord};
use crate::protocol::{ArbiterVersion, ArbiterVersionTooLong, Epoch, SyncView};

/// The views one frontend published.
#[derive(Debug)]
pub struct Views {
    epoch: Epoch,
    seq: u64,
    current: Option<(Version, SyncView)>,
    /// Replicas (indexed like the mirror's) that have not acknowledged the
    /// current view.
    untold: [bool; 2],
}

impl Views {
    pub fn new(epoch: Epoch) -> Self {
        Self {
            epoch,
            seq: 0,
            current: None,
            untold: [false, false],
        }
    }

    /// The view of `record`: the current one if its version was published
    /// already, else the next (which both replicas are then still to be
    /// told).
    pub fn of(&mut self, record: &VolumeRecord) -> Result<SyncView, ArbiterVersionTooLong> {
        if let Some((v, view)) = &self.current
            && *v == record.version
        {
            return Ok(view.clone());
        }
        let view = SyncView {
            epoch: self.epoch,
            seq: self.seq + 1,
            arbiter_version: ArbiterVersion::new(record.version.0.clone())?,
            // A BTreeSet: sorted, as views are compared and stored.
            in_sync: record.in_sync.iter().cloned().collect(),
        };
        self.seq += 1;
        self.current = Some((record.version.clone(), view.clone()));
        self.untold = [true, true];
        Ok(view)
    }

    /// The view last published, if any.
    pub fn current(&self) -> Option<&SyncView> {
        self.current.as_ref().map(|(_, v)| v)
    }

    /// Replica `i` acknowledged `view`.
    pub fn told(&mut self, i: usize, view: &SyncView) {
        if self.current().is_some_and(|c| c.stamp() == view.stamp()) {
            self.untold[i] = false;
        }
    }

    /// Whether replica `i` is still to be told the current view.
    pub fn untold(&self, i: usize) -> bool {
        self.untold[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ReplicaId;

    fn record(version: &str, in_sync: &[&str]) -> VolumeRecord {
        let r = |s: &str| ReplicaId::new(s).expect("valid");
        let mut rec = VolumeRecord::new(Version(version.into()), [r("a"), r("b")].into());
        rec.in_sync = in_sync.iter().map(|s| r(s)).collect();
        rec
    }

    #[test]
    fn every_new_record_gets_the_next_number_and_a_repeated_one_keeps_its_own() {
        let mut v = Views::new(Epoch(4));
        let first = v.of(&record("10", &["b", "a"])).expect("view");
        assert_eq!((first.epoch, first.seq), (Epoch(4), 1));
        assert_eq!(first.in_sync.len(), 2);
        assert!(first.in_sync[0] < first.in_sync[1], "sorted");
        v.told(0, &first);
        assert!(!v.untold(0) && v.untold(1));
        assert_eq!(v.of(&record("10", &["a", "b"])).expect("view").seq, 1);
        assert!(!v.untold(0), "the same record is not told again");
        let next = v.of(&record("11", &["b"])).expect("view");
        assert_eq!(next.seq, 2);
        assert!(v.untold(0) && v.untold(1));
        // An acknowledgement of an older view does not count.
        v.told(1, &first);
        assert!(v.untold(1));
        assert!(next.stamp() > first.stamp());
    }
}
