//! Behaviour of the activity log: durable before the write, no I/O for hot
//! extents, shared updates, the size bound, LRU eviction of idle extents
//! only, recovery of every extent with a write in flight.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::format::{self, Read, SLOT_LEN};
use super::*;
use crate::bitmap::tests::Counting;
use crate::storage::{FileStorage, Storage};

pub(super) const MIB4: u64 = 4 << 20;

pub(super) fn config(max_active: usize) -> AlConfig {
    AlConfig::new(64 * MIB4, MIB4, max_active, 0).expect("config")
}

pub(super) fn new_file(p: &Path, c: AlConfig) {
    let s = FileStorage::create_new(p).expect("create");
    ActivityLog::create(&s, c).expect("create log");
}

async fn open(p: &Path, c: AlConfig) -> (ActivityLog, Recovery) {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(p).expect("open"));
    ActivityLog::open(s, c).await.expect("open log")
}

/// The set on disk now, read as recovery would.
pub(super) fn on_disk(p: &Path) -> BTreeSet<u64> {
    match format::read(&FileStorage::open(p).expect("open"), 0).expect("read") {
        Read::Valid(s) => s.extents.into_iter().collect(),
        Read::Invalid { slot0, slot1 } => panic!("log invalid: {slot0}, {slot1}"),
    }
}

fn recovered(r: &Recovery) -> BTreeSet<u64> {
    match r {
        Recovery::Extents(v) => v.iter().map(|e| e.0).collect(),
        Recovery::Lost { .. } => panic!("log lost: {r:?}"),
    }
}

#[tokio::test]
async fn an_extent_is_durable_before_the_write_and_hot_extents_cost_no_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(8);
    new_file(&p, c);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let (log, rec) = ActivityLog::open(s.clone(), c).await.expect("open");
    assert_eq!(rec, Recovery::Extents(vec![]));
    let g = log.begin_write(MIB4 + 10, 4096).await.expect("begin");
    assert_eq!(s.counts(), (1, 1));
    assert_eq!(on_disk(&p), BTreeSet::from([1]));
    for i in 0..50 {
        drop(log.begin_write(MIB4 + i * 4096, 4096).await.expect("begin"));
    }
    drop(g);
    drop(log.begin_write(MIB4, MIB4).await.expect("begin"));
    assert_eq!(s.counts(), (1, 1), "extent already logged: no I/O");
}

#[tokio::test]
async fn concurrent_begins_share_one_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(256);
    new_file(&p, c);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let (log, _) = ActivityLog::open(s.clone(), c).await.expect("open");
    let begins = (0..64u64).map(|i| log.begin_write(i * MIB4, 4096));
    let guards: Vec<_> = futures::future::join_all(begins).await;
    assert!(guards.iter().all(|g| g.is_ok()));
    let (w, y) = s.counts();
    assert!(w <= 2 && y <= 2, "64 begins took {w} writes, {y} syncs");
    assert_eq!(on_disk(&p), (0..64).collect());
}

#[tokio::test]
async fn the_log_never_holds_more_than_max_active_and_evicts_the_least_recently_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(4);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    for e in [0u64, 1, 2, 3, 0, 4, 5] {
        drop(log.begin_write(e * MIB4, 4096).await.expect("begin"));
        assert!(on_disk(&p).len() <= 4);
    }
    // 1 and 2 were the least recently used when 4 and 5 came.
    assert_eq!(on_disk(&p), BTreeSet::from([0, 3, 4, 5]));
    assert_eq!(c.bound_bytes(), 4 * MIB4);
}

#[tokio::test]
async fn a_full_log_of_busy_extents_makes_new_writes_wait_for_a_completion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(2);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    let a = log.begin_write(0, MIB4 + 1).await.expect("extents 0 and 1");
    let waiting = tokio::spawn({
        let log = log.clone();
        async move { log.begin_write(2 * MIB4, 2 * MIB4).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "no idle extent to evict");
    assert_eq!(on_disk(&p), BTreeSet::from([0, 1]));
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("admitted after the completion")
        .expect("task")
        .expect("begin");
    assert_eq!(on_disk(&p), BTreeSet::from([2, 3]));
}

#[tokio::test]
async fn a_cancelled_begin_gives_its_place_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(1);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    let a = log.begin_write(0, 4096).await.expect("begin");
    let r = tokio::time::timeout(Duration::from_millis(50), log.begin_write(MIB4, 4096)).await;
    assert!(r.is_err(), "waits: the only extent is busy");
    drop(a);
    let b = tokio::time::timeout(Duration::from_secs(5), log.begin_write(2 * MIB4, 4096))
        .await
        .expect("not blocked by the cancelled request")
        .expect("begin");
    drop(b);
    assert_eq!(on_disk(&p), BTreeSet::from([2]));
}

#[tokio::test]
async fn recovery_returns_every_extent_with_a_write_in_flight_and_pins_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(5);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    let held = [
        log.begin_write(0, 4096).await.expect("begin"),
        log.begin_write(5 * MIB4 - 4096, 8192).await.expect("begin"),
    ];
    drop(log.begin_write(9 * MIB4, 4096).await.expect("begin"));
    // The crash: the process is gone with its writes in flight.
    std::mem::forget(held);
    drop(log);
    let (log, rec) = open(&p, c).await;
    let got = recovered(&rec);
    assert!(got.is_superset(&BTreeSet::from([0, 4, 5])), "{got:?}");
    assert_eq!(
        got,
        BTreeSet::from([0, 4, 5, 9]),
        "9 was idle but still logged"
    );
    // Pinned: with one slot free and busy, a new write cannot push the
    // recovered extents out before they are reconciled.
    let g20 = log
        .begin_write(20 * MIB4, 4096)
        .await
        .expect("one free slot");
    let blocked = tokio::time::timeout(Duration::from_millis(50), log.begin_write(21 * MIB4, 4096));
    assert!(blocked.await.is_err(), "recovered extents are pinned");
    assert!(on_disk(&p).is_superset(&got));
    log.release_recovered();
    drop(
        log.begin_write(21 * MIB4, 4096)
            .await
            .expect("after release"),
    );
    assert!(on_disk(&p).contains(&21));
    drop(g20);
}

#[tokio::test]
async fn an_unreadable_log_is_reported_lost_and_the_extent_size_change_is_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(4);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    let g = log.begin_write(3 * MIB4, 4096).await.expect("begin");
    std::mem::forget(g);
    drop(log);
    // Reopened with 8 MiB extents: extent 3 of 4 MiB is extent 1 of 8 MiB.
    let c8 = AlConfig::new(64 * MIB4, 2 * MIB4, 4, 0).expect("config");
    let (_, rec) = open(&p, c8).await;
    assert_eq!(rec, Recovery::Extents(vec![ExtentIndex(1)]));

    let s = FileStorage::open(&p).expect("open");
    s.write_at(&[0xee; 16], 100).expect("damage slot 0");
    s.write_at(&[0xee; 16], SLOT_LEN as u64 + 100)
        .expect("damage slot 1");
    let (log, rec) = open(&p, c).await;
    assert!(
        matches!(
            rec,
            Recovery::Lost {
                slot0: SlotError::BadChecksum,
                slot1: SlotError::BadChecksum
            }
        ),
        "{rec:?}"
    );
    drop(
        log.begin_write(0, 4096)
            .await
            .expect("a lost log starts over"),
    );
    assert_eq!(on_disk(&p), BTreeSet::from([0]));
}

#[tokio::test]
async fn bad_requests_and_configurations_are_refused() {
    assert!(matches!(
        AlConfig::new(1 << 30, 3 << 20, 4, 0),
        Err(AlError::BadExtentSize(_))
    ));
    assert!(matches!(
        AlConfig::new(1 << 30, MIB4, MAX_ACTIVE + 1, 0),
        Err(AlError::BadMaxActive { .. })
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(2);
    new_file(&p, c);
    let (log, _) = open(&p, c).await;
    assert!(matches!(
        log.begin_write(0, 3 * MIB4).await,
        Err(AlError::TooLarge { extents: 3, .. })
    ));
    assert!(matches!(
        log.begin_write(64 * MIB4 - 10, 11).await,
        Err(AlError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn the_log_can_live_inside_another_file_at_an_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("meta");
    let s = FileStorage::create_new(&p).expect("create");
    s.set_len(1 << 20).expect("set_len");
    s.write_at(&[7u8; 65536], 0).expect("someone else's bytes");
    let c = AlConfig::new(64 * MIB4, MIB4, 8, 65536).expect("config");
    ActivityLog::create(&s, c).expect("create");
    assert_eq!(s.size().expect("size"), 1 << 20, "not shrunk");
    let (log, _) = ActivityLog::open(Arc::new(s), c).await.expect("open");
    std::mem::forget(log.begin_write(0, 1).await.expect("begin"));
    drop(log);
    let s = FileStorage::open(&p).expect("open");
    let mut before = vec![0u8; 65536];
    s.read_at(&mut before, 0).expect("read");
    assert!(
        before.iter().all(|&b| b == 7),
        "bytes before the base untouched"
    );
    let (_, rec) = ActivityLog::open(Arc::new(s), c).await.expect("open");
    assert_eq!(rec, Recovery::Extents(vec![ExtentIndex(0)]));
}

#[derive(Debug, Clone)]
enum Step {
    Begin(u64, u64),
    End(usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            (0u64..12, 1u64..3).prop_map(|(e, n)| Step::Begin(e, n)),
            any::<usize>().prop_map(Step::End),
        ],
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// After every step, the log on disk holds at most `max_active`
    /// extents and every extent of every write in flight.
    #[test]
    fn the_log_on_disk_is_bounded_and_covers_every_write_in_flight(steps in steps()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("al");
            let c = config(4);
            new_file(&p, c);
            let (log, _) = open(&p, c).await;
            let mut held: Vec<(std::ops::Range<u64>, WriteGuard)> = Vec::new();
            for step in steps {
                match step {
                    Step::Begin(e, n) => {
                        let busy: BTreeSet<u64> = held.iter().flat_map(|h| h.0.clone()).collect();
                        let fits = busy.union(&(e..e + n).collect()).count() <= 4;
                        if !fits {
                            // It would wait for a completion forever: skip.
                            continue;
                        }
                        let g = log.begin_write(e * MIB4, n * MIB4).await.expect("begin");
                        held.push((e..e + n, g));
                    }
                    Step::End(i) if !held.is_empty() => {
                        let i = i % held.len();
                        held.swap_remove(i);
                    }
                    Step::End(_) => {}
                }
                let disk = on_disk(&p);
                assert!(disk.len() <= 4, "{disk:?}");
                for (r, _) in &held {
                    assert!(r.clone().all(|e| disk.contains(&e)), "{r:?} not in {disk:?}");
                }
            }
            let still: BTreeSet<u64> = held.iter().flat_map(|h| h.0.clone()).collect();
            std::mem::forget(held);
            drop(log);
            let (_, rec) = open(&p, c).await;
            assert!(recovered(&rec).is_superset(&still));
        });
    }
}
