//! Crash tests (feature `failpoints`): a scripted life of a bitmap is run
//! once to count its writes and syncs, then once per write (and per sync),
//! tearing, dropping or failing exactly that one. The operation during which
//! the fault hit is treated as the crash: nothing after it happens, its
//! result is not acknowledged, and the file is reopened. What is loaded must
//! be the state before or after that operation — every acknowledged dirty
//! bit present, nothing never marked — or `Untrusted`, and `Untrusted` only
//! when a write was actually torn.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use super::format::REGIONS_PER_BLOCK;
use super::tests::geometry;
use super::*;
use crate::protocol::{Epoch, ReplicaId};
use crate::storage::{FaultAction, FaultPlan, FaultyStorage, FileStorage, Storage};

const G4K: u64 = 4096;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Start(u64),
    Mark(Vec<(u64, u64)>),
    Copy(u64),
    Persist,
    Stop,
    Reset(u64),
}

fn script() -> Vec<Op> {
    let b = REGIONS_PER_BLOCK;
    vec![
        Op::Start(1),
        Op::Mark(vec![(3, 2)]),
        Op::Mark(vec![(b - 1, 2)]),
        Op::Mark(vec![(10, 1), (b + 10, 1), (2 * b + 10, 1), (11, 1)]),
        Op::Mark(vec![(3, 1)]),
        Op::Copy(4),
        Op::Copy(b + 10),
        Op::Persist,
        Op::Mark(vec![(4, 1), (2 * b + 50, 3)]),
        Op::Stop,
        Op::Start(5),
        Op::Mark(vec![(7, 1)]),
        Op::Reset(6),
        Op::Copy(0),
        Op::Copy(2 * b),
        Op::Persist,
        Op::Mark(vec![(0, 1)]),
    ]
}

/// What the disk may hold: the mode, bits that must be there, bits that
/// may be there.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    tracking: Option<Epoch>,
    must: BTreeSet<u64>,
    may: BTreeSet<u64>,
}

impl Model {
    fn apply(&mut self, op: &Op, cleared: &[u64], all: u64) {
        match op {
            Op::Start(e) => {
                self.tracking = Some(Epoch(*e));
                self.must.clear();
                self.may.clear();
            }
            Op::Mark(ranges) => {
                for &(r, n) in ranges {
                    self.must.extend(r..r + n);
                    self.may.extend(r..r + n);
                }
            }
            Op::Copy(_) => {
                for r in cleared {
                    self.must.remove(r);
                }
            }
            Op::Persist => self.may = self.must.clone(),
            Op::Stop => {
                self.tracking = None;
                self.must.clear();
                self.may.clear();
            }
            Op::Reset(e) => {
                self.tracking = Some(Epoch(*e));
                self.must = (0..all).collect();
                self.may = self.must.clone();
            }
        }
    }

    fn accepts(&self, tracking: Option<Epoch>, bits: &BTreeSet<u64>, other: &Model) -> bool {
        self.tracking == tracking
            && self.must.is_subset(bits)
            && bits
                .iter()
                .all(|b| self.may.contains(b) || other.may.contains(b))
    }
}

/// Runs `op`; returns the regions a copy cleared, or `None` on error.
async fn run(b: &Bitmap, op: &Op) -> Option<Vec<u64>> {
    let peer = ReplicaId::new("site-a").expect("id");
    match op {
        Op::Start(e) => b.start_tracking(peer, Epoch(*e)).await.ok().map(|_| vec![]),
        Op::Reset(e) => b
            .reset_all_dirty(peer, Epoch(*e))
            .await
            .ok()
            .map(|_| vec![]),
        Op::Stop => b.stop_tracking().await.ok().map(|_| vec![]),
        Op::Persist => b.persist().await.ok().map(|_| vec![]),
        Op::Mark(ranges) => {
            let marks = ranges.iter().map(|&(r, n)| b.mark(r * G4K, n * G4K));
            let all = futures::future::join_all(marks).await;
            all.into_iter().all(|m| m.is_ok()).then(Vec::new)
        }
        Op::Copy(r) => {
            let c = b.begin_copy(RegionIndex(*r)).ok()??;
            Some(if c.finish() { vec![*r] } else { vec![] })
        }
    }
}

async fn reopen(p: &Path) -> Bitmap {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(p).expect("open"));
    Bitmap::open(s, geometry()).await.expect("load")
}

fn loaded(b: &Bitmap) -> Option<(Option<Epoch>, BTreeSet<u64>)> {
    match b.state() {
        BitmapState::Untrusted(_) => None,
        BitmapState::Clean => Some((None, b.dirty_regions().map(|r| r.0).collect())),
        BitmapState::Tracking { since, .. } => {
            Some((Some(since), b.dirty_regions().map(|r| r.0).collect()))
        }
    }
}

/// Runs the script with `action` at the `nth` call of `point`; returns
/// whether the fault hit (false: the script has fewer such calls).
async fn crash_at(point: &str, nth: u64, action: FaultAction) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    create(&FileStorage::create_new(&p).expect("create"), g).expect("format");
    let plan = FaultPlan::new();
    let s = FaultyStorage::new(FileStorage::open(&p).expect("open"), "bitmap", plan.clone());
    let b = Bitmap::open(Arc::new(s), g).await.expect("load");
    plan.inject(point, nth, Some(1), action);

    let all = g.region_count();
    let mut model = Model {
        tracking: None,
        must: BTreeSet::new(),
        may: BTreeSet::new(),
    };
    for op in script() {
        let result = run(&b, &op).await;
        if plan.hits(point) <= nth {
            let cleared = result.unwrap_or_else(|| panic!("{op:?} failed without a fault"));
            model.apply(&op, &cleared, all);
            continue;
        }
        // The crash: the storage dies with the process, then the file is
        // reopened as it is.
        for pt in ["bitmap::write_at", "bitmap::sync"] {
            plan.inject(pt, 0, None, FaultAction::Fail);
        }
        drop(b);
        let mut after = model.clone();
        let cleared = match &op {
            Op::Copy(r) => vec![*r],
            _ => vec![],
        };
        after.apply(&op, &cleared, all);
        let b = reopen(&p).await;
        match loaded(&b) {
            Some((tracking, bits)) => assert!(
                model.accepts(tracking, &bits, &after) || after.accepts(tracking, &bits, &model),
                "{point}#{nth} {action:?} during {op:?}: loaded {tracking:?} {} bits, \
                 before: {model:?}, after: {after:?}",
                bits.len()
            ),
            None => {
                assert!(
                    matches!(action, FaultAction::Tear { keep } if keep > 0),
                    "{point}#{nth} {action:?} during {op:?}: untrusted without a torn write: {:?}",
                    b.state()
                );
                // The way out of untrusted works: a full resync.
                b.reset_all_dirty(ReplicaId::new("site-a").expect("id"), Epoch(99))
                    .await
                    .expect("reset");
                drop(b);
                let b = reopen(&p).await;
                assert_eq!(b.dirty_count(), all);
            }
        }
        return true;
    }
    false
}

#[tokio::test]
async fn a_fault_at_any_write_or_sync_loses_no_acknowledged_bit() {
    let mut crashes = 0;
    for point in ["bitmap::write_at", "bitmap::sync"] {
        for action in [
            FaultAction::Fail,
            FaultAction::Drop,
            FaultAction::Tear { keep: 0 },
            FaultAction::Tear { keep: 20 },
            FaultAction::Tear { keep: 512 },
            FaultAction::Tear { keep: 4000 },
        ] {
            let mut nth = 0;
            while crash_at(point, nth, action).await {
                nth += 1;
                crashes += 1;
            }
            assert!(nth > 10, "{point}: the script made only {nth} calls");
        }
    }
    assert!(crashes > 100, "{crashes} crashes checked");
}

#[tokio::test]
async fn a_failed_flush_fails_the_mark_and_the_next_mark_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    create(&FileStorage::create_new(&p).expect("create"), g).expect("format");
    let plan = FaultPlan::new();
    let s = FaultyStorage::new(FileStorage::open(&p).expect("open"), "bitmap", plan.clone());
    let b = Bitmap::open(Arc::new(s), g).await.expect("load");
    b.start_tracking(ReplicaId::new("site-a").expect("id"), Epoch(1))
        .await
        .expect("start");
    plan.inject("bitmap::sync", 0, Some(1), FaultAction::Fail);
    assert!(matches!(
        b.mark(0, G4K).await,
        Err(BitmapError::Storage { .. })
    ));
    drop(b.mark(0, G4K).await.expect("retry succeeds"));
    drop(b.mark(G4K, G4K).await.expect("and later marks too"));
    drop(b);
    let b = reopen(&p).await;
    assert_eq!(
        b.dirty_regions().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 1]
    );
}
