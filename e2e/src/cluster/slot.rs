//! Taking a cluster slot: an exclusive `flock` on
//! `/run/twinvol-cluster/slot-<n>.lock`, held for the cluster's lifetime by
//! the process that owns it (a test, or the `twinvol-cluster` supervisor).
//!
//! The lock dies with its holder, so a slot whose lock can be taken has no
//! live owner: whatever of that slot is still on the machine is a leftover of
//! a crashed run, and the new owner may sweep it. The lock file is opened
//! close-on-exec, so the cluster's own processes never inherit it (else a
//! leftover kubelet would keep a dead owner's slot taken).

use std::{fs, path::PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::{HarnessError, cluster::layout::Slot};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/twinvol-cluster";

/// A slot held by this process.
#[derive(Debug)]
pub struct SlotLock {
    slot: Slot,
    _lock: Flock<fs::File>,
}

fn lock_path(slot: Slot) -> PathBuf {
    PathBuf::from(LOCK_DIR).join(format!("slot-{}.lock", slot.number()))
}

impl SlotLock {
    /// Takes `slot` if no one holds it.
    pub fn try_acquire(slot: Slot) -> Result<Option<Self>, HarnessError> {
        fs::create_dir_all(LOCK_DIR).map_err(|source| HarnessError::Io {
            action: "creating",
            path: LOCK_DIR.into(),
            source,
        })?;
        let path = lock_path(slot);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| HarnessError::Io {
                action: "opening",
                path: path.clone(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self { slot, _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(HarnessError::Slot(format!(
                "locking {}: {errno}",
                path.display()
            ))),
        }
    }

    /// Takes the first free slot.
    pub fn acquire_any() -> Result<Self, HarnessError> {
        for slot in Slot::all() {
            if let Some(lock) = Self::try_acquire(slot)? {
                return Ok(lock);
            }
        }
        Err(HarnessError::Slot(format!(
            "all {} cluster slots are taken (see {LOCK_DIR}); stop a cluster with \
             `e2e/cluster.sh down` or wait for running tests",
            crate::cluster::layout::SLOTS
        )))
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_not_handed_out_twice() {
        let first = SlotLock::acquire_any().expect("a free slot");
        let again = SlotLock::try_acquire(first.slot()).expect("lock call works");
        assert!(again.is_none(), "slot {:?} taken twice", first.slot());
        let second = SlotLock::acquire_any().expect("another free slot");
        assert_ne!(first.slot(), second.slot());
        let slot = first.slot();
        drop(first);
        assert!(
            SlotLock::try_acquire(slot)
                .expect("lock call works")
                .is_some(),
            "a released slot is free again"
        );
    }
}
