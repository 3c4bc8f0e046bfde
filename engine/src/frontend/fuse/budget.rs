//! The byte budget of the FUSE export: how much read and write data may be
//! in flight between the kernel and the backend at once.
//!
//! The kernel queues up to `max_background` requests of up to 1 MiB each
//! (a loop device keeps 128 in flight), which would otherwise all be
//! buffered by the daemon. A request takes its share on a FUSE thread
//! before its data is copied or read, and gives it back when its reply has
//! been sent. Waiting blocks that FUSE thread, which is the backpressure we
//! want: the kernel keeps the requests queued instead of us holding their
//! data. Nothing here allocates, and no lock is held while waiting or
//! across an await.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A pool of bytes that requests borrow.
pub(super) struct Budget {
    available: Mutex<u64>,
    returned: Condvar,
    total: u64,
}

/// Bytes borrowed from a [`Budget`], returned on drop.
pub(super) struct Grant {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub(super) fn new(total: u64) -> Arc<Self> {
        Arc::new(Budget {
            available: Mutex::new(total),
            returned: Condvar::new(),
            total,
        })
    }

    /// Borrows `bytes` (at most the whole budget), waiting until they are
    /// available.
    pub(super) fn acquire(self: &Arc<Self>, bytes: u64) -> Grant {
        let bytes = bytes.min(self.total);
        let mut available = self.lock();
        while *available < bytes {
            available = match self.returned.wait(available) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        *available -= bytes;
        Grant {
            budget: self.clone(),
            bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // The counter stays consistent even if a holder panicked.
        match self.available.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        *self.budget.lock() += self.bytes;
        self.budget.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_request_waits_until_enough_bytes_are_returned() {
        let budget = Budget::new(100);
        let first = budget.acquire(70);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let grant = budget.acquire(50);
                tx.send(()).expect("send");
                drop(grant);
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "50 bytes were granted while only 30 were free"
        );
        drop(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("granted once the first request returned its bytes");
        waiter.join().expect("waiter");
        assert_eq!(*budget.lock(), 100);
    }

    #[test]
    fn a_request_larger_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(100);
        let grant = budget.acquire(1000);
        assert_eq!(*budget.lock(), 0);
        drop(grant);
        assert_eq!(*budget.lock(), 100);
    }
}
