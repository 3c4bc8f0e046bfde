//! Crash tests (feature `failpoints`): a scripted workload of begins and
//! completions runs once per write and per sync of the log, with exactly
//! that call torn, dropped or failed. The operation during which the fault
//! hit is the crash (it never returns to its caller); the log is reopened
//! from the file. Recovery must never lose the log, must return every extent
//! whose write an earlier operation let through and that did not complete, must stay within
//! `max_active`, and must be the set before the crashing update or one that
//! covers it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::tests::{MIB4, config, new_file};
use super::*;
use crate::storage::{FaultAction, FaultPlan, FaultyStorage, FileStorage, Storage};

#[derive(Debug, Clone)]
enum Op {
    /// Concurrent begins of (first extent, extent count).
    Begin(Vec<(u64, u64)>),
    /// Completes the `n` oldest writes in flight.
    End(usize),
}

fn script() -> Vec<Op> {
    vec![
        Op::Begin(vec![(0, 1)]),
        Op::Begin(vec![(1, 1), (2, 1)]),
        Op::End(1),
        Op::Begin(vec![(3, 1)]),
        Op::Begin(vec![(4, 1)]),
        Op::End(4),
        Op::Begin(vec![(5, 2), (7, 1)]),
        Op::Begin(vec![(5, 1)]),
        Op::End(2),
        Op::Begin(vec![(8, 1), (9, 1)]),
        Op::End(3),
        Op::Begin(vec![(0, 2), (10, 2)]),
    ]
}

const MAX: usize = 4;

async fn crash_at(point: &str, nth: u64, action: FaultAction) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(MAX);
    new_file(&p, c);
    let plan = FaultPlan::new();
    let s = FaultyStorage::new(FileStorage::open(&p).expect("open"), "al", plan.clone());
    let (log, _) = ActivityLog::open(Arc::new(s), c).await.expect("open");
    plan.inject(point, nth, Some(1), action);

    let mut held: Vec<(std::ops::Range<u64>, WriteGuard)> = Vec::new();
    for op in script() {
        let before = super::tests::on_disk(&p);
        let acknowledged = held.len();
        let mut attempted = BTreeSet::new();
        match &op {
            Op::Begin(ranges) => {
                let begins = ranges
                    .iter()
                    .map(|&(e, n)| log.begin_write(e * MIB4, n * MIB4));
                let results = futures::future::join_all(begins).await;
                for (&(e, n), r) in ranges.iter().zip(results) {
                    attempted.extend(e..e + n);
                    if let Ok(g) = r {
                        held.push((e..e + n, g));
                    } else if plan.hits(point) <= nth {
                        panic!("{op:?} failed without a fault");
                    }
                }
            }
            Op::End(n) => {
                held.drain(..(*n).min(held.len()));
            }
        }
        if plan.hits(point) <= nth {
            continue;
        }
        // The crash: nothing more reaches the disk; writes in flight stay
        // in flight (their guards are never dropped).
        for pt in ["al::write_at", "al::sync"] {
            plan.inject(pt, 0, None, FaultAction::Fail);
        }
        // The crash came at the faulty call, before the operation returned:
        // only writes let through by earlier operations are in flight.
        let in_flight: BTreeSet<u64> = held[..acknowledged.min(held.len())]
            .iter()
            .flat_map(|h| h.0.clone())
            .collect();
        std::mem::forget(held);
        drop(log);
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p).expect("open"));
        let (_, rec) = ActivityLog::open(s, c).await.expect("reopen");
        let Recovery::Extents(got) = rec else {
            panic!("{point}#{nth} {action:?} during {op:?}: log lost: {rec:?}");
        };
        let got: BTreeSet<u64> = got.into_iter().map(|e| e.0).collect();
        let ctx = format!(
            "{point}#{nth} {action:?} during {op:?}: recovered {got:?}, before {before:?}, in flight {in_flight:?}"
        );
        assert!(got.is_superset(&in_flight), "{ctx}");
        assert!(got.len() <= MAX, "{ctx}");
        let covers_update = attempted.iter().any(|e| got.contains(e));
        assert!(got == before || covers_update, "{ctx}");
        return true;
    }
    false
}

#[tokio::test]
async fn a_fault_at_any_update_keeps_every_write_in_flight_recoverable() {
    let mut crashes = 0;
    for point in ["al::write_at", "al::sync"] {
        for action in [
            FaultAction::Fail,
            FaultAction::Drop,
            FaultAction::Tear { keep: 0 },
            FaultAction::Tear { keep: 70 },
            FaultAction::Tear { keep: 2048 },
        ] {
            let mut nth = 0;
            while crash_at(point, nth, action).await {
                nth += 1;
                crashes += 1;
            }
            assert!(nth >= 6, "{point}: the script made only {nth} calls");
        }
    }
    assert!(crashes >= 60, "{crashes} crashes checked");
}

#[tokio::test]
async fn a_failed_update_poisons_the_log_until_reopened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("al");
    let c = config(MAX);
    new_file(&p, c);
    let plan = FaultPlan::new();
    let s = FaultyStorage::new(FileStorage::open(&p).expect("open"), "al", plan.clone());
    let (log, _) = ActivityLog::open(Arc::new(s), c).await.expect("open");
    let g = log.begin_write(0, 1).await.expect("begin");
    plan.inject("al::sync", 0, Some(1), FaultAction::Fail);
    assert!(matches!(
        log.begin_write(MIB4, 1).await,
        Err(AlError::Failed { .. })
    ));
    assert!(
        matches!(
            log.begin_write(2 * MIB4, 1).await,
            Err(AlError::Failed { .. })
        ),
        "poisoned"
    );
    drop(log.begin_write(0, 1).await.ok());
    drop(g);
    drop(log);
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p).expect("open"));
    let (log, rec) = ActivityLog::open(s, c).await.expect("reopen");
    assert!(matches!(rec, Recovery::Extents(ref v) if v.contains(&ExtentIndex(0))));
    drop(
        log.begin_write(2 * MIB4, 1)
            .await
            .expect("works after reopen"),
    );
}
