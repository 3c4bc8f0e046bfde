//! Conflict detection for the mirror's writes (design invariant 6: two
//! replicas that both count as in sync are byte-identical).
//!
//! A client may have several writes (trims, write-zeroes) in flight over
//! the same bytes. Which one wins is not defined for the client, but it
//! must be the same on both replicas: sent to both at once, two
//! overlapping writes can be queued in one order on one replica's
//! connection and in the other order on the other's, and the copies end
//! different while both count as in sync. So, as DRBD does, a write that
//! overlaps one admitted before it and not ended yet is sent to no
//! replica until that one ended on every replica (acknowledged, or failed
//! over to the survivor); writes that overlap nothing in flight go at
//! once, fully in parallel.
//!
//! [`Conflicts::admit`] takes a place in admission order (synchronously,
//! so the order is the order the mirror was handed the writes);
//! [`Admitted::wait_turn`] returns once no earlier admitted write that
//! overlaps is left; dropping the [`Admitted`] ends it and wakes the
//! writes waiting. A write only ever waits for earlier ones, so there is
//! no cycle. The table is a small vector (the writes in flight) behind a
//! mutex held for a scan, never across an await; no allocation per write
//! once it has grown to the usual depth.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// A byte range `[start, end)` of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(offset: u64, len: u64) -> Self {
        Self {
            start: offset,
            end: offset.saturating_add(len),
        }
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// The writes in flight, by range, in admission order.
#[derive(Debug, Default)]
pub struct Conflicts {
    state: Mutex<State>,
    ended: Notify,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// `(ticket, range)` of the admitted writes not ended, oldest first.
    active: Vec<(u64, Range)>,
}

impl Conflicts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic while
        // holding the lock cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a write of `range`: it is ordered after every write admitted
    /// before and not ended.
    pub fn admit(self: &Arc<Self>, range: Range) -> Admitted {
        let mut st = self.lock();
        let ticket = st.next;
        st.next += 1;
        st.active.push((ticket, range));
        drop(st);
        Admitted {
            table: self.clone(),
            ticket,
            range,
        }
    }

    /// Whether a write admitted before `ticket` and overlapping `range` is
    /// still in flight.
    fn blocked(&self, ticket: u64, range: &Range) -> bool {
        self.lock()
            .active
            .iter()
            .take_while(|(t, _)| *t < ticket)
            .any(|(_, r)| r.overlaps(range))
    }

    /// Writes admitted and not ended.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().active.len()
    }
}

/// A write's place in the table; ends it when dropped.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<Conflicts>,
    ticket: u64,
    range: Range,
}

impl Admitted {
    /// Waits until every earlier admitted write that overlaps this one
    /// has ended; at once if none is in flight.
    pub async fn wait_turn(&self) {
        loop {
            let ended = self.table.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.table.blocked(self.ticket, &self.range) {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.table.lock();
        if let Some(i) = st.active.iter().position(|(t, _)| *t == self.ticket) {
            st.active.remove(i);
        }
        drop(st);
        self.table.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn now_or_never(f: impl std::future::Future<Output = ()>) -> bool {
        futures::FutureExt::now_or_never(f).is_some()
    }

    #[tokio::test]
    async fn writes_that_overlap_nothing_in_flight_go_at_once() {
        let c = Conflicts::new();
        let a = c.admit(Range::new(0, 4096));
        let b = c.admit(Range::new(4096, 4096));
        let d = c.admit(Range::new(1 << 20, 512));
        assert!(now_or_never(a.wait_turn()));
        assert!(now_or_never(b.wait_turn()));
        assert!(now_or_never(d.wait_turn()));
        assert_eq!(c.in_flight(), 3);
        drop((a, b, d));
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_overlapping_write_waits_for_every_earlier_one_it_overlaps() {
        let c = Conflicts::new();
        let first = c.admit(Range::new(0, 8192));
        let second = c.admit(Range::new(4096, 8192));
        let third = c.admit(Range::new(10_000, 10));
        // Overlaps the second only (not the first): still waits for it.
        assert!(!now_or_never(second.wait_turn()));
        assert!(!now_or_never(third.wait_turn()));
        let waiter = tokio::spawn(async move {
            third.wait_turn().await;
            third
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        assert!(now_or_never(second.wait_turn()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "went before the second ended");
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
        drop(third);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_later_write_never_holds_up_an_earlier_one() {
        let c = Conflicts::new();
        let first = c.admit(Range::new(0, 4096));
        let later = c.admit(Range::new(0, 4096));
        assert!(now_or_never(first.wait_turn()));
        assert!(!now_or_never(later.wait_turn()));
        drop(first);
        assert!(now_or_never(later.wait_turn()));
    }

    #[test]
    fn ranges_touching_do_not_overlap() {
        assert!(!Range::new(0, 10).overlaps(&Range::new(10, 5)));
        assert!(Range::new(0, 11).overlaps(&Range::new(10, 5)));
        assert!(!Range::new(0, 0).overlaps(&Range::new(0, 5)));
    }
}
