//! The lease's time rules against the file arbiter, in process: expiry
//! judged by the observer's own clock, a wall clock far ahead, a restarted
//! holder, an acquisition whose answer was lost.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::arbiter::{FileArbiter, Version};
use crate::protocol::{Epoch, ReplicaId};

fn lease(holder: &str, epoch: u64, renewed_at_ms: u64) -> Lease {
    Lease {
        holder: FrontendId(holder.to_owned()),
        epoch: Epoch(epoch),
        renewed_at_ms,
        duration: Duration::from_secs(10),
    }
}

fn file_arbiter(dir: &tempfile::TempDir) -> FileArbiter {
    let replicas = ["a", "b"]
        .into_iter()
        .map(|s| ReplicaId::new(s).expect("valid"))
        .collect();
    FileArbiter::create(&dir.path().join("v1.arbiter"), replicas).expect("create")
}

fn cfg(holder: &str, duration_ms: u64, margin_ms: u64) -> LeaseConfig {
    LeaseConfig {
        holder: FrontendId(holder.to_owned()),
        duration: Duration::from_millis(duration_ms),
        margin: Duration::from_millis(margin_ms),
        wall_clock: WallClock::system(),
        reclaim_own: false,
    }
}

#[test]
fn a_lease_is_valid_for_its_duration_from_the_start_of_the_last_renew() {
    let t0 = BootInstant::now();
    let id = LeaseId {
        holder: FrontendId("fe".to_owned()),
        epoch: Epoch(1),
    };
    let g = LeaseGuard::new(id.clone(), t0, Duration::from_secs(10));
    assert_eq!(g.id(), &id);
    assert_eq!(g.state_at(t0 + Duration::from_secs(9)), LeaseState::Held);
    assert_eq!(
        g.state_at(t0 + Duration::from_secs(10)),
        LeaseState::Expired
    );
    g.renewed(t0 + Duration::from_secs(5));
    assert_eq!(g.state_at(t0 + Duration::from_secs(14)), LeaseState::Held);
    // An older renew call finishing late never shortens the lease.
    g.renewed(t0 + Duration::from_secs(1));
    assert_eq!(g.state_at(t0 + Duration::from_secs(14)), LeaseState::Held);
    g.fence();
    assert_eq!(g.state_at(t0), LeaseState::Fenced);
    assert_eq!(g.remaining(), Duration::ZERO);
}

#[tokio::test]
async fn io_held_while_the_lease_is_out_is_released_by_a_renewal_or_the_fence() {
    let id = LeaseId {
        holder: FrontendId("fe".to_owned()),
        epoch: Epoch(1),
    };
    let short = Duration::from_millis(50);
    let g = LeaseGuard::new(id.clone(), BootInstant::now(), short);
    assert_eq!(g.settled().await, LeaseState::Held);
    tokio::time::sleep(short * 2).await;
    assert_eq!(g.state(), LeaseState::Expired);
    let held = tokio::spawn({
        let g = g.clone();
        async move { g.settled().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!held.is_finished(), "not held while the lease is out");
    g.renewed(BootInstant::now());
    assert_eq!(held.await.expect("join"), LeaseState::Held);

    let g = LeaseGuard::new(id, BootInstant::now(), short);
    tokio::time::sleep(short * 2).await;
    let held = tokio::spawn({
        let g = g.clone();
        async move { g.settled().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!held.is_finished(), "not held while the lease is out");
    g.fence();
    assert_eq!(held.await.expect("join"), LeaseState::Fenced);
}

#[test]
fn the_rate_limit_lets_one_line_through_per_period() {
    let mut r = RateLimit::new(Duration::from_secs(60));
    assert_eq!(r.allow(), Some(0));
    assert_eq!(r.allow(), None);
    assert_eq!(r.allow(), None);
}

#[test]
fn an_observer_times_a_lease_from_when_it_saw_it_last_change() {
    let margin = Duration::from_secs(2);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut w = ExpiryWatch::new();
    // First sight: the full duration plus margin, whatever its time says
    // (here far in the past by the observer's wall clock).
    assert_eq!(
        w.observe(&lease("fe", 1, 0), at(0), margin),
        Duration::from_secs(12)
    );
    assert_eq!(
        w.observe(&lease("fe", 1, 0), at(5), margin),
        Duration::from_secs(7)
    );
    assert_eq!(w.unchanged_for(at(5)), Duration::from_secs(5));
    // A renewal — even one whose time went backwards — starts again.
    assert_eq!(
        w.observe(&lease("fe", 1, 1), at(11), margin),
        Duration::from_secs(12)
    );
    assert_eq!(
        w.observe(&lease("fe", 1, 1), at(22), margin),
        Duration::from_secs(1)
    );
    assert_eq!(
        w.observe(&lease("fe", 1, 1), at(23), margin),
        Duration::ZERO
    );
    assert_eq!(
        w.observe(&lease("fe", 1, 1), at(99), margin),
        Duration::ZERO
    );
    // Another acquisition (same name, new epoch) is another lease.
    assert_eq!(
        w.observe(&lease("fe", 2, 1), at(99), margin),
        Duration::from_secs(12)
    );
}

#[tokio::test]
async fn a_second_frontend_waits_until_the_lease_went_unrenewed_and_bumps_the_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(&dir);
    let (first, g1) = acquire(&arbiter, &cfg("fe-1", 300, 100), Duration::from_secs(5))
        .await
        .expect("first");
    let t = Instant::now();
    let (second, g2) = acquire(&arbiter, &cfg("fe-2", 300, 100), Duration::from_secs(5))
        .await
        .expect("second");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "took over after {:?}, before the lease went unrenewed for its duration plus the margin",
        t.elapsed()
    );
    assert_eq!(second.epoch.0, first.epoch.0 + 1);
    assert!(g2.valid());
    // The first frontend's renewal is refused: fenced for good.
    let r = renew_once(&arbiter, &cfg("fe-1", 300, 100), g1.id()).await;
    assert!(matches!(r, Err(ArbiterError::Rejected(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_whose_clock_is_an_hour_ahead_never_takes_a_renewed_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = Arc::new(file_arbiter(&dir));
    let holder = cfg("fe-1", 1_000, 500);
    let (_, guard) = acquire(arbiter.as_ref(), &holder, Duration::from_secs(5))
        .await
        .expect("holder");
    let renewing = tokio::spawn(renew(arbiter.clone(), holder, guard.clone()));
    let mut ahead = cfg("fe-ahead", 1_000, 500);
    ahead.wall_clock = WallClock::offset(3_600_000);
    let r = acquire(arbiter.as_ref(), &ahead, Duration::from_millis(4_500)).await;
    assert!(matches!(r, Err(LeaseError::GaveUp { .. })), "{r:?}");
    assert!(guard.valid(), "the holder lost its lease");
    let record = arbiter.read().await.expect("read");
    assert_eq!(record.lease.map(|l| l.holder.0), Some("fe-1".to_owned()));

    // The holder stops renewing: the lease is taken once it stayed
    // unrenewed for its duration plus the margin.
    renewing.abort();
    let stopped = Instant::now();
    let (taken, _) = acquire(arbiter.as_ref(), &ahead, Duration::from_secs(10))
        .await
        .expect("taken once unrenewed");
    assert!(stopped.elapsed() >= Duration::from_millis(1_500));
    assert_eq!(taken.epoch, Epoch(2));
}

#[tokio::test]
async fn a_restarted_holder_waits_like_anyone_and_its_predecessor_cannot_renew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(&dir);
    let config = cfg("fe", 300, 100);
    let (_, before) = acquire(&arbiter, &config, Duration::from_secs(5))
        .await
        .expect("first acquisition");
    let t = Instant::now();
    let (record, after) = acquire(&arbiter, &config, Duration::from_secs(5))
        .await
        .expect("second acquisition");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(record.epoch, Epoch(2));
    assert_eq!(after.id().epoch, Epoch(2));
    let r = renew_once(&arbiter, &config, before.id()).await;
    assert!(
        matches!(r, Err(ArbiterError::Rejected(Rejected::NotHolder { .. }))),
        "the predecessor renewed by name: {r:?}"
    );
    renew_once(&arbiter, &config, after.id())
        .await
        .expect("the new acquisition renews");
    release(&arbiter, before.id())
        .await
        .expect_err("the predecessor cannot release it either");
    release(&arbiter, after.id()).await.expect("released");
}

/// A file arbiter whose first acquisition lands but answers `Unreachable`
/// (an HTTP write that timed out after the server applied it).
struct LosesFirstAnswer {
    inner: FileArbiter,
    acquisitions: AtomicUsize,
}

impl Arbiter for LosesFirstAnswer {
    async fn read(&self) -> Result<VolumeRecord, ArbiterError> {
        self.inner.read().await
    }

    async fn update(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        let acquiring = matches!(change, Change::AcquireLease { .. });
        let r = self.inner.update(expected, change).await;
        if acquiring && r.is_ok() && self.acquisitions.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(ArbiterError::Unreachable {
                location: "test".to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "answer lost"),
            });
        }
        r
    }
}

#[tokio::test]
async fn an_acquisition_whose_answer_was_lost_is_recognised_as_ours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = LosesFirstAnswer {
        inner: file_arbiter(&dir),
        acquisitions: AtomicUsize::new(0),
    };
    let t = Instant::now();
    let (record, guard) = acquire(&arbiter, &cfg("fe", 10_000, 2_000), Duration::from_secs(5))
        .await
        .expect("acquired");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited for its own lease"
    );
    assert_eq!(record.epoch, Epoch(1), "one acquisition, one epoch");
    assert_eq!(guard.id().epoch, Epoch(1));
    assert!(guard.valid());
    assert_eq!(arbiter.acquisitions.load(Ordering::SeqCst), 1);
}

/// A file arbiter whose holders prove liveness by a node heartbeat the
/// test drives: `beat` is the last renewal the node-local renewer
/// reported, `token` what observers see of the heartbeat Lease.
struct HeartbeatArbiter {
    inner: FileArbiter,
    beat: std::sync::Mutex<Option<crate::arbiter::HeartbeatRenewal>>,
    token: std::sync::Mutex<u64>,
    updates: AtomicUsize,
    duration: Duration,
}

impl HeartbeatArbiter {
    fn new(dir: &tempfile::TempDir, duration: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: file_arbiter(dir),
            beat: std::sync::Mutex::new(None),
            token: std::sync::Mutex::new(0),
            updates: AtomicUsize::new(0),
            duration,
        })
    }

    /// One successful renewal of the node heartbeat, sent now.
    fn beat(&self) {
        *self.beat.lock().expect("lock") = Some(crate::arbiter::HeartbeatRenewal {
            sent: BootInstant::now(),
            duration: self.duration,
        });
        *self.token.lock().expect("lock") += 1;
    }

    fn updates(&self) -> usize {
        self.updates.load(Ordering::SeqCst)
    }
}

impl Arbiter for HeartbeatArbiter {
    async fn read(&self) -> Result<VolumeRecord, ArbiterError> {
        self.inner.read().await
    }

    async fn update(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        self.inner.update(expected, change).await
    }

    fn node_heartbeat(&self) -> bool {
        true
    }

    async fn last_heartbeat(&self) -> Result<crate::arbiter::HeartbeatRenewal, ArbiterError> {
        (*self.beat.lock().expect("lock")).ok_or_else(|| ArbiterError::Unreachable {
            location: "test heartbeat".to_owned(),
            source: std::io::Error::other("never renewed"),
        })
    }

    async fn liveness(&self, lease: &Lease) -> Result<Liveness, ArbiterError> {
        Ok(Liveness {
            token: self.token.lock().expect("lock").to_string(),
            duration: lease.duration.max(self.duration),
        })
    }
}

/// Renews the test heartbeat every `period` until aborted.
fn heartbeating(arbiter: Arc<HeartbeatArbiter>, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            arbiter.beat();
            tokio::time::sleep(period).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_heartbeat_keeps_the_lease_without_writing_the_record_and_its_stop_expires_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = HeartbeatArbiter::new(&dir, Duration::from_millis(600));
    let config = cfg("node-a", 600, 200);
    let (_, guard) = acquire(arbiter.as_ref(), &config, Duration::from_secs(5))
        .await
        .expect("acquired");
    let after_acquire = arbiter.updates();
    let beats = heartbeating(arbiter.clone(), Duration::from_millis(150));
    let keeping = tokio::spawn(renew(arbiter.clone(), config, guard.clone()));
    // Five lease durations: held throughout, not one write.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            guard.valid(),
            "the lease ran out while the heartbeat renewed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        arbiter.updates(),
        after_acquire,
        "steady state wrote the record"
    );
    // The renewer dies: the lease runs out within its duration of the
    // last renewal sent (plus one poll), still without a write.
    beats.abort();
    let _ = beats.await;
    let last = arbiter.last_heartbeat().await.expect("beat").sent;
    while guard.valid() {
        assert!(
            last.elapsed() < Duration::from_millis(600 + 50),
            "still acknowledging {:?} after the last heartbeat",
            last.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(last.elapsed() >= Duration::from_millis(600) - Duration::from_millis(1));
    assert_eq!(guard.state(), LeaseState::Expired);
    assert_eq!(arbiter.updates(), after_acquire);
    keeping.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_coming_back_after_an_expiry_swaps_once_or_finds_the_volume_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = HeartbeatArbiter::new(&dir, Duration::from_millis(400));
    let config = cfg("node-a", 400, 100);
    let (_, guard) = acquire(arbiter.as_ref(), &config, Duration::from_secs(5))
        .await
        .expect("acquired");
    let keeping = tokio::spawn(renew(arbiter.clone(), config.clone(), guard.clone()));
    // No heartbeat yet: the acquisition's own time runs out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(guard.state(), LeaseState::Expired);
    let before = arbiter.updates();
    let version = arbiter.read().await.expect("read").version;
    // The heartbeat comes back: one swap in the record, then held again.
    let beats = heartbeating(arbiter.clone(), Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !guard.valid() {
        assert!(Instant::now() < deadline, "never held again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(arbiter.updates(), before + 1, "one renewal in the record");
    assert_ne!(arbiter.read().await.expect("read").version, version);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(guard.valid());
    assert_eq!(arbiter.updates(), before + 1, "and no more");
    beats.abort();
    let _ = beats.await;
    keeping.abort();

    // While a second holder's heartbeat is gone, another acquisition takes
    // the volume; when that heartbeat returns, its holder finds out and is
    // fenced instead of acknowledging again.
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = HeartbeatArbiter::new(&dir, Duration::from_millis(400));
    let (_, old) = acquire(arbiter.as_ref(), &config, Duration::from_secs(5))
        .await
        .expect("acquired");
    let keeping = tokio::spawn(renew(arbiter.clone(), config.clone(), old.clone()));
    let (_, new) = acquire(
        arbiter.as_ref(),
        &cfg("node-b", 400, 100),
        Duration::from_secs(5),
    )
    .await
    .expect("taken once the heartbeat stayed unchanged");
    assert!(new.valid());
    assert!(!old.valid());
    let beats = heartbeating(arbiter.clone(), Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.state() != LeaseState::Fenced {
        assert!(!old.valid(), "the old holder acknowledges again");
        assert!(Instant::now() < deadline, "never fenced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    beats.abort();
    let _ = beats.await;
    keeping.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_waits_while_the_holders_heartbeat_changes_whatever_its_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = HeartbeatArbiter::new(&dir, Duration::from_millis(500));
    let holder = cfg("node-a", 500, 300);
    let (_, guard) = acquire(arbiter.as_ref(), &holder, Duration::from_secs(5))
        .await
        .expect("holder");
    let beats = heartbeating(arbiter.clone(), Duration::from_millis(100));
    let keeping = tokio::spawn(renew(arbiter.clone(), holder, guard.clone()));
    let mut ahead = cfg("node-b", 500, 300);
    ahead.wall_clock = WallClock::offset(3_600_000);
    // The record never changes, but the heartbeat does: no take-over.
    let r = acquire(arbiter.as_ref(), &ahead, Duration::from_secs(3)).await;
    assert!(matches!(r, Err(LeaseError::GaveUp { .. })), "{r:?}");
    assert!(guard.valid());
    beats.abort();
    let _ = beats.await;
    let stopped = Instant::now();
    let (taken, _) = acquire(arbiter.as_ref(), &ahead, Duration::from_secs(10))
        .await
        .expect("taken once the heartbeat stopped");
    assert!(
        stopped.elapsed() >= Duration::from_millis(800),
        "taken {:?} after the heartbeat stopped, before duration plus margin",
        stopped.elapsed()
    );
    assert!(!guard.valid(), "taken while the holder still acknowledged");
    assert_eq!(taken.epoch, Epoch(2));
    keeping.abort();
}
