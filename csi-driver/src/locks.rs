//! One operation per volume at a time: a second call on a volume while one
//! runs is answered `Aborted` at once (the CSI spec's rule; the sidecars
//! and kubelet retry with backoff), instead of two calls racing on the same
//! mounts or object.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{CsiError, CsiResult};

/// The set of volumes with a call in progress.
#[derive(Debug, Clone, Default)]
pub struct VolumeLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call runs on one volume; released on drop.
#[derive(Debug)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    volume: String,
}

impl VolumeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `volume` for this call, or fails with `OperationInProgress`.
    pub fn try_lock(&self, volume: &str) -> CsiResult<VolumeGuard> {
        // A poisoned lock means a call panicked while inserting or
        // removing; the set itself is still a valid set.
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(volume.to_owned()) {
            return Err(CsiError::OperationInProgress {
                volume: volume.to_owned(),
            });
        }
        Ok(VolumeGuard {
            busy: self.busy.clone(),
            volume: volume.to_owned(),
        })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_call_on_a_busy_volume_is_aborted_until_the_first_ends() {
        let locks = VolumeLocks::new();
        let first = locks.try_lock("v1").expect("free");
        assert!(matches!(
            locks.try_lock("v1"),
            Err(CsiError::OperationInProgress { .. })
        ));
        let _other = locks.try_lock("v2").expect("another volume is free");
        drop(first);
        locks.try_lock("v1").expect("free again");
    }
}
