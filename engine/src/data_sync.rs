//! The durability of a replica volume's data file: which completed writes
//! a successful fdatasync covered, and a failed one made sticky.
//!
//! # Which writes are durable
//!
//! Data writes go through the page cache; only an fdatasync makes them
//! survive a power cut. The activity log must keep every extent with a
//! write that may still be only in the page cache (after a power cut it is
//! the record of what this copy may have lost), so it asks which writes a
//! sync covered. [`DataSync`] numbers syncs: a write that completed while
//! the counter was at `g` ([`DataSync::tag`]) is durable once a sync that
//! started after it succeeded, i.e. once [`DataSync::is_durable`]`(g)`.
//! A sync takes its number *before* it calls fdatasync, and the kernel's
//! fdatasync covers every write completed before the call, so a tag read
//! after the write completed is never declared durable too early (a tag
//! read a little late only keeps an extent a little longer).
//!
//! # A failed sync is final
//!
//! When fdatasync fails (EIO), Linux has already dropped the dirty pages it
//! could not write, marked them clean and reported the error once: a later
//! fdatasync succeeds without them. Taking that later success as "durable"
//! would acknowledge a flush for writes that are gone (the PostgreSQL
//! "fsyncgate"). So the first failure is recorded and returned by every
//! later [`DataSync::sync`] and [`DataSync::check`] without touching the
//! disk again: the replica refuses every request of the volume from then on
//! (`WireError::VolumeFailed`), the frontend takes it out of the in-sync set
//! as a lost replica, and only a restart — which reopens the files and
//! recovers through the activity log, so the returning copy is resynced like
//! one that lost power — lets it serve again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::storage::{Storage, StorageError};

/// Why the data of a volume can no longer be trusted on this replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "fdatasync failed on {target} ({cause}): writes acknowledged since the last good sync may be lost, so the volume refuses every request until the replica restarts (then its peer resyncs what it may have lost)"
)]
pub struct SyncFailed {
    pub target: String,
    pub cause: String,
}

/// Tracks the syncs of one data file (shared by the volume and its
/// activity log).
pub struct DataSync {
    storage: Arc<dyn Storage>,
    volume: String,
    /// The number the next sync takes; writes completing now carry it.
    next: AtomicU64,
    /// Writes tagged up to this are durable.
    durable: AtomicU64,
    failed: OnceLock<SyncFailed>,
}

impl DataSync {
    pub fn new(volume: &str, storage: Arc<dyn Storage>) -> Arc<Self> {
        Arc::new(Self {
            storage,
            volume: volume.to_owned(),
            next: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            failed: OnceLock::new(),
        })
    }

    /// The tag of a write that completed just now.
    pub fn tag(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Whether a write tagged `tag` is on stable storage.
    pub fn is_durable(&self, tag: u64) -> bool {
        tag <= self.durable.load(Ordering::SeqCst)
    }

    /// Makes every completed write durable (fdatasync). Blocking. After a
    /// failure, fails at once with the first failure, for good.
    pub fn sync(&self) -> Result<(), SyncFailed> {
        self.check()?;
        let covers = self.next.fetch_add(1, Ordering::SeqCst);
        match self.storage.sync() {
            Ok(()) => {
                self.durable.fetch_max(covers, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Fails if a sync failed before.
    pub fn check(&self) -> Result<(), SyncFailed> {
        match self.failed.get() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// The failure that stopped the volume, if one did.
    pub fn failure(&self) -> Option<&SyncFailed> {
        self.failed.get()
    }

    fn fail(&self, e: &StorageError) -> SyncFailed {
        let mut first = false;
        let f = self.failed.get_or_init(|| {
            first = true;
            SyncFailed {
                target: self.storage.target().to_owned(),
                cause: crate::error_chain(e),
            }
        });
        if first {
            tracing::error!(volume = %self.volume, error = %f, "fdatasync failed: the volume refuses every request from now on");
        }
        f.clone()
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;
    use crate::storage::{FaultAction, FaultPlan, FaultyStorage, FileStorage};

    fn faulty() -> (tempfile::TempDir, Arc<FaultPlan>, Arc<DataSync>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = FaultPlan::new();
        let s = FaultyStorage::volatile(
            FileStorage::create_new(&dir.path().join("data")).expect("create"),
            "data",
            plan.clone(),
            1 << 20,
        );
        s.set_len(4096).expect("set_len");
        (dir, plan, DataSync::new("v1", Arc::new(s)))
    }

    #[test]
    fn a_write_is_durable_once_a_sync_started_after_it_succeeded() {
        let (_d, _plan, sync) = faulty();
        let before = sync.tag();
        assert!(!sync.is_durable(before));
        sync.sync().expect("sync");
        assert!(sync.is_durable(before));
        let after = sync.tag();
        assert!(!sync.is_durable(after), "written after the sync started");
        sync.sync().expect("sync");
        assert!(sync.is_durable(after));
    }

    #[test]
    fn a_failed_sync_fails_every_later_one_without_trying() {
        let (_d, plan, sync) = faulty();
        plan.inject("data::sync", 0, Some(1), FaultAction::Fail);
        let tag = sync.tag();
        let e = sync.sync().expect_err("injected EIO");
        assert!(e.to_string().contains("refuses every request"), "{e}");
        // The storage would now report success (the pages were dropped):
        // the volume must not believe it.
        assert_eq!(sync.sync(), Err(e.clone()));
        assert_eq!(sync.check(), Err(e));
        assert!(!sync.is_durable(tag));
        assert_eq!(plan.hits("data::sync"), 1, "no second fdatasync");
    }
}
