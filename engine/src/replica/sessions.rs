//! Session fencing within an epoch (design invariant 3).
//!
//! The epoch gate fences every older frontend at once, but within one epoch
//! a client gives connections up too: the frontend when a replica times out
//! (and the link may come back, TCP retransmitting writes it queued long
//! ago), the resync when an attempt fails. Nothing sent on such a
//! connection may be applied once newer data may have landed. Hoping that
//! an RST arrives is not enough (it is lost while the link is down), so the
//! replica fences by *session*:
//!
//! - every connection opens as a [`Session`] of a [`SessionKind`] (within
//!   an epoch one client of each kind: the lease holder, and the peer's
//!   resync) with a generation its client chose, higher than any opened
//!   before (a refusal names the lowest acceptable one, so that a
//!   restarted client continues from there);
//! - opening a session raises its kind's *floor* to its generation, and a
//!   [`Sessions::fence`] (sent by the resync for the frontend's sessions the
//!   frontend gave up on) raises it further; every request of a session
//!   below the floor is refused ([`WireError::StaleSession`]);
//! - raising a floor waits until no request of a session below it is still
//!   running. Exact, like the epoch gate: a request counts itself in flight
//!   *before* it reads the floor, and a raise stores the floor *before* it
//!   reads the counts (all sequentially consistent), so each request either
//!   sees the new floor or is waited for.
//!
//! Who "the same client" is: within an epoch, the frontend is the lease
//! holder of that epoch — every acquisition bumps the epoch, so a frontend
//! restarted under an arbiter is a new epoch, and the epoch gate fences
//! all of its predecessor's sessions at its first `Open`; without an
//! arbiter (a fixed `--epoch`) a restarted frontend is the same client: its
//! first generation is refused below the floor, it continues above it, and
//! its session fences its predecessor's. Its id is not needed for any of
//! this (two frontends at one epoch are what the lease prevents). The
//! resync client is the peer replica's resync (a volume has one peer); a
//! restarted source continues above the floor the same way.
//!
//! The table is per epoch: a newer epoch starts with fresh floors (the
//! epoch gate fences all of the old epoch's sessions), and a frontend's
//! floor relayed by the peer is tagged with its epoch and applied only at
//! it. It lives in memory
//! only: a replica restart ends every connection to it, so nothing from
//! before can arrive over one (the frontend's floor for a peer is persisted
//! by the *other* replica, which applies it to this one before copying).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::protocol::{Epoch, Session, SessionGen, SessionKind, SyncClaim, WireError};

/// The sessions of one volume.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    epoch: Epoch,
    kinds: [Arc<KindGate>; 2],
}

/// The floor of one kind of session and its live sessions.
#[derive(Default)]
struct KindGate {
    floor: AtomicU64,
    /// The highest generation opened: a new session must be above it, so
    /// that a client that lost count (a restarted process) cannot open a
    /// second session with its predecessor's generation and leave that one
    /// unfenced.
    opened: AtomicU64,
    live: Mutex<Vec<Weak<SessionGate>>>,
    /// Notified when a session's requests in flight drop to zero.
    drained: Notify,
}

/// One open session: its connection checks every request against it.
pub struct SessionGate {
    session: Session,
    gate: Arc<KindGate>,
    in_flight: AtomicU64,
    /// What a resync session claimed at its open (see
    /// `replica::direction`), re-checked when this replica learns a newer
    /// record.
    claim: Option<SyncClaim>,
    /// The volume's record generation at the last check of `claim`.
    checked: AtomicU64,
}

/// A request of a session in flight; leaving wakes a fence waiting for it.
pub struct SessionInFlight<'a>(&'a SessionGate);

impl Drop for SessionInFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.gate.drained.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single assignments under the lock: a poisoned lock is still sound.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sessions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The gate of `kind` at `epoch` (a newer epoch starts a fresh table),
    /// or why not (an older epoch).
    fn kind_gate(&self, epoch: Epoch, kind: SessionKind) -> Result<Arc<KindGate>, WireError> {
        let mut t = lock(&self.table);
        if epoch > t.epoch {
            *t = Table {
                epoch,
                kinds: Default::default(),
            };
        } else if epoch < t.epoch {
            return Err(WireError::StaleEpoch {
                seen: epoch,
                current: t.epoch,
            });
        }
        Ok(t.kinds[kind.index()].clone())
    }

    /// Opens `session` at `epoch` (the volume's current epoch): refused if
    /// a newer session of its kind was seen (or its kind was fenced above
    /// it); else the older sessions of its kind are fenced, and this
    /// returns once none of their requests runs any more.
    pub async fn open(
        &self,
        epoch: Epoch,
        session: Session,
        claim: Option<SyncClaim>,
        record_generation: u64,
    ) -> Result<Arc<SessionGate>, WireError> {
        let gate = self.kind_gate(epoch, session.kind)?;
        let new = Arc::new(SessionGate {
            session,
            gate: gate.clone(),
            in_flight: AtomicU64::new(0),
            claim,
            checked: AtomicU64::new(record_generation),
        });
        {
            let mut live = lock(&gate.live);
            let floor = gate.floor.load(Ordering::SeqCst);
            let min = floor.max(gate.opened.load(Ordering::SeqCst) + 1);
            if session.generation.0 < min {
                return Err(WireError::StaleSession {
                    kind: session.kind,
                    seen: session.generation,
                    floor: SessionGen(min),
                });
            }
            gate.opened
                .fetch_max(session.generation.0, Ordering::SeqCst);
            live.push(Arc::downgrade(&new));
        }
        raise(&gate, session.generation).await;
        Ok(new)
    }

    /// Fences the sessions of `kind` below `below` at `epoch` (the volume's
    /// current epoch); returns once none of their requests runs any more.
    pub async fn fence(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        below: SessionGen,
    ) -> Result<(), WireError> {
        let gate = self.kind_gate(epoch, kind)?;
        raise(&gate, below).await;
        Ok(())
    }

    /// The floor of `kind` (for logs and tests).
    pub fn floor(&self, kind: SessionKind) -> SessionGen {
        let t = lock(&self.table);
        SessionGen(t.kinds[kind.index()].floor.load(Ordering::SeqCst))
    }
}

/// Raises `gate`'s floor to `to`, then waits until no session below it has
/// a request in flight.
async fn raise(gate: &KindGate, to: SessionGen) {
    gate.floor.fetch_max(to.0, Ordering::SeqCst);
    let floor = gate.floor.load(Ordering::SeqCst);
    let below: Vec<Arc<SessionGate>> = {
        let mut live = lock(&gate.live);
        live.retain(|w| w.strong_count() > 0);
        live.iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.session.generation.0 < floor)
            .collect()
    };
    loop {
        let notified = gate.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if below
            .iter()
            .all(|s| s.in_flight.load(Ordering::SeqCst) == 0)
        {
            return;
        }
        notified.await;
    }
}

impl SessionGate {
    pub fn session(&self) -> Session {
        self.session
    }

    pub fn claim(&self) -> Option<&SyncClaim> {
        self.claim.as_ref()
    }

    fn stale(&self) -> Option<WireError> {
        let floor = SessionGen(self.gate.floor.load(Ordering::SeqCst));
        (self.session.generation < floor).then_some(WireError::StaleSession {
            kind: self.session.kind,
            seen: self.session.generation,
            floor,
        })
    }

    /// Counts a request in flight, then checks the session is not fenced.
    pub fn enter(&self) -> Result<SessionInFlight<'_>, WireError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = SessionInFlight(self);
        match self.stale() {
            Some(e) => Err(e),
            None => Ok(guard),
        }
    }

    /// Checks the session is not fenced, for a request that a fence need
    /// not wait for (control requests handled in order on the connection).
    pub fn check(&self) -> Result<(), WireError> {
        self.stale().map_or(Ok(()), Err)
    }

    /// The record generation `claim` was last checked at, and records a
    /// newer one.
    pub fn checked_at(&self) -> u64 {
        self.checked.load(Ordering::SeqCst)
    }

    pub fn set_checked_at(&self, generation: u64) {
        self.checked.store(generation, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn s(kind: SessionKind, g: u64) -> Session {
        Session {
            kind,
            generation: SessionGen(g),
        }
    }

    const F: SessionKind = SessionKind::Frontend;
    const R: SessionKind = SessionKind::Resync;

    #[tokio::test]
    async fn a_newer_session_of_a_client_fences_its_older_ones() {
        let t = Sessions::new();
        let old = t.open(Epoch(3), s(F, 1), None, 0).await.expect("open 1");
        assert!(old.enter().is_ok());
        let new = t.open(Epoch(3), s(F, 2), None, 0).await.expect("open 2");
        assert!(matches!(
            old.enter(),
            Err(WireError::StaleSession {
                seen: SessionGen(1),
                floor: SessionGen(2),
                ..
            })
        ));
        assert!(new.enter().is_ok());
        // The other kind is not affected.
        let resync = t.open(Epoch(3), s(R, 1), None, 0).await.expect("resync");
        assert!(resync.enter().is_ok() && new.enter().is_ok());
        // An older generation is refused, and so is the current one (a
        // restarted client that lost count), naming the lowest acceptable.
        for g in [1, 2] {
            assert!(matches!(
                t.open(Epoch(3), s(F, g), None, 0).await,
                Err(WireError::StaleSession {
                    floor: SessionGen(3),
                    ..
                })
            ));
        }
    }

    #[tokio::test]
    async fn a_fence_waits_for_the_requests_of_the_fenced_sessions() {
        let t = Arc::new(Sessions::new());
        let nine = t.open(Epoch(1), s(F, 9), None, 0).await.expect("open 9");
        let in_flight = nine.enter().expect("9 passes");
        let t2 = t.clone();
        let mut fence = tokio::spawn(async move { t2.fence(Epoch(1), F, SessionGen(10)).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut fence)
                .await
                .is_err(),
            "the fence waits for 9's request in flight"
        );
        assert!(nine.enter().is_err(), "but 9 takes no new request");
        drop(in_flight);
        tokio::time::timeout(Duration::from_secs(5), fence)
            .await
            .expect("drained")
            .expect("join")
            .expect("fenced");
        assert_eq!(t.floor(F), SessionGen(10));
        // A session at the floor is current.
        let ten = t.open(Epoch(1), s(F, 10), None, 0).await.expect("open 10");
        assert!(ten.enter().is_ok());
    }

    #[tokio::test]
    async fn opening_a_newer_session_waits_for_the_older_ones_requests() {
        let t = Arc::new(Sessions::new());
        let old = t.open(Epoch(1), s(R, 1), None, 0).await.expect("open 1");
        let held = old.enter().expect("passes");
        let t2 = t.clone();
        let mut open = tokio::spawn(async move { t2.open(Epoch(1), s(R, 2), None, 0).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut open)
                .await
                .is_err()
        );
        drop(held);
        let new = tokio::time::timeout(Duration::from_secs(5), open)
            .await
            .expect("drained")
            .expect("join")
            .expect("opened");
        assert!(new.enter().is_ok() && old.enter().is_err());
    }

    #[tokio::test]
    async fn a_newer_epoch_starts_fresh_floors_and_an_older_one_is_refused() {
        let t = Sessions::new();
        let _ = t.open(Epoch(1), s(F, 50), None, 0).await.expect("open");
        t.fence(Epoch(1), R, SessionGen(8)).await.expect("fence");
        let fresh = t.open(Epoch(2), s(F, 1), None, 0).await.expect("new epoch");
        assert!(fresh.enter().is_ok());
        assert_eq!(t.floor(R), SessionGen(0));
        assert!(matches!(
            t.open(Epoch(1), s(F, 60), None, 0).await,
            Err(WireError::StaleEpoch { .. })
        ));
    }
}
