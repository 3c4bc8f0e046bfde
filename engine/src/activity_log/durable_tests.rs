//! Power loss and the activity log (feature `failpoints`): with the data
//! file's syncs tracked, an extent leaves the log only once its writes are
//! durable, so that after a power cut the recovered set holds every extent
//! the copy may have lost.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::tests::{MIB4, config, new_file, on_disk};
use super::*;
use crate::data_sync::DataSync;
use crate::storage::{
    DEFAULT_CACHE_LIMIT, FaultAction, FaultPlan, FaultyStorage, FileStorage, Storage,
};

struct Rig {
    _dir: tempfile::TempDir,
    al_path: std::path::PathBuf,
    data: Arc<FaultyStorage<FileStorage>>,
    plan: Arc<FaultPlan>,
    sync: Arc<DataSync>,
    log: ActivityLog,
}

async fn rig(max_active: usize) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(max_active);
    let al_path = dir.path().join("al");
    new_file(&al_path, c);
    let plan = FaultPlan::new();
    let data = Arc::new(FaultyStorage::volatile(
        FileStorage::create_new(&dir.path().join("data")).expect("create"),
        "data",
        plan.clone(),
        DEFAULT_CACHE_LIMIT,
    ));
    data.set_len(64 * MIB4).expect("set_len");
    let sync = DataSync::new("v1", data.clone());
    let al: Arc<dyn Storage> = Arc::new(FileStorage::open(&al_path).expect("open"));
    let (log, _) = ActivityLog::open_tracking(al, c, sync.clone())
        .await
        .expect("open");
    Rig {
        _dir: dir,
        al_path,
        data,
        plan,
        sync,
        log,
    }
}

/// One write in extent `e`: logged, written to the (volatile) data file,
/// done.
async fn write(r: &Rig, e: u64) {
    let g = r.log.begin_write(e * MIB4, 4096).await.expect("begin");
    let data = r.data.clone();
    tokio::task::spawn_blocking(move || data.write_at(&[7; 4096], e * MIB4).expect("write"))
        .await
        .expect("join");
    drop(g);
}

#[tokio::test(flavor = "multi_thread")]
async fn extents_with_unsynced_writes_are_evicted_only_after_a_data_sync() {
    let r = rig(2).await;
    write(&r, 0).await;
    write(&r, 1).await;
    assert_eq!(r.plan.hits("data::sync"), 0);
    // A third extent needs room: the two idle ones hold writes that are
    // only in the page cache, so the data file is synced first.
    write(&r, 2).await;
    assert_eq!(r.plan.hits("data::sync"), 1, "one sync made room");
    assert_eq!(r.data.cached_bytes(), 4096, "the new write is not durable");
    assert_eq!(on_disk(&r.al_path).len(), 2);
    assert!(on_disk(&r.al_path).contains(&2));
    // After a sync the idle extents leave without another one.
    r.sync.sync().expect("sync");
    write(&r, 3).await;
    assert_eq!(r.plan.hits("data::sync"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_power_cut_every_extent_with_unsynced_writes_is_recovered() {
    let r = rig(8).await;
    for e in 0..4 {
        write(&r, e).await;
    }
    r.sync.sync().expect("sync");
    write(&r, 5).await;
    // Forgetting drops only what is durable: it syncs first, so here all.
    r.log.forget_idle().await.expect("forget");
    assert!(on_disk(&r.al_path).is_empty());
    write(&r, 6).await;
    write(&r, 7).await;
    // The power cut: the data file keeps what was synced; the log on disk
    // names both extents written since.
    let lost: BTreeSet<u64> = on_disk(&r.al_path);
    assert_eq!(lost, BTreeSet::from([6, 7]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_data_sync_while_making_room_fails_the_log() {
    let r = rig(1).await;
    write(&r, 0).await;
    r.plan.inject("data::sync", 0, Some(1), FaultAction::Fail);
    let e = r
        .log
        .begin_write(MIB4, 4096)
        .await
        .err()
        .expect("no room without a durable extent");
    assert!(e.to_string().contains("activity log"), "{e}");
    assert!(r.sync.check().is_err(), "the failure is the volume's");
    // The extent with the lost write stays in the log on disk.
    assert_eq!(on_disk(&r.al_path), BTreeSet::from([0]));
}
