//! Behaviour of the live bitmap: durability across reopen, group commit,
//! the I/O-free hot path, the copy protocol and the trust decision.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;

use super::format::{PAGE, REGIONS_PER_BLOCK, block_offset, header_offset};
use super::*;
use crate::protocol::{Epoch, ReplicaId};
use crate::storage::{FileStorage, Storage, StorageError};

/// Counts writes and syncs of the storage it wraps.
pub(crate) struct Counting<S> {
    pub inner: S,
    pub writes: AtomicU64,
    pub syncs: AtomicU64,
}

impl<S: Storage> Counting<S> {
    pub fn new(inner: S) -> Arc<Self> {
        Arc::new(Self {
            inner,
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::SeqCst),
            self.syncs.load(Ordering::SeqCst),
        )
    }
}

impl<S: Storage> Storage for Counting<S> {
    fn target(&self) -> &str {
        self.inner.target()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync()
    }
    fn size(&self) -> Result<u64, StorageError> {
        self.inner.size()
    }
    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        self.inner.set_len(len)
    }
    fn preallocate(&self, len: u64) -> Result<(), StorageError> {
        self.inner.preallocate(len)
    }
    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.inner.punch(offset, len)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.inner.zero(offset, len)
    }
}

const G4K: u64 = 4096;

fn peer() -> ReplicaId {
    ReplicaId::new("site-a").expect("id")
}

/// A volume of three bitmap blocks at 4 KiB regions (the last one short).
pub(crate) fn geometry() -> Geometry {
    Geometry::new(
        (2 * REGIONS_PER_BLOCK + 100) * G4K,
        Granularity::new(G4K).expect("granularity"),
    )
    .expect("geometry")
}

fn new_file(path: &Path, g: Geometry) -> FileStorage {
    let s = FileStorage::create_new(path).expect("create");
    create(&s, g).expect("format");
    s
}

async fn open(path: &Path, g: Geometry) -> Bitmap {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path).expect("open"));
    Bitmap::open(s, g).await.expect("load")
}

fn set(b: &Bitmap) -> BTreeSet<u64> {
    b.dirty_regions().map(|r| r.0).collect()
}

#[tokio::test]
async fn marked_regions_are_dirty_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    assert_eq!(b.state(), BitmapState::Clean);
    b.start_tracking(peer(), Epoch(3)).await.expect("start");
    drop(b.mark(5 * G4K, 3 * G4K).await.expect("mark"));
    let last = g.volume_size() - G4K;
    drop(b.mark(last, G4K).await.expect("mark last"));
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(
        b.state(),
        BitmapState::Tracking {
            peer: peer(),
            since: Epoch(3)
        }
    );
    let last_region = g.region_count() - 1;
    assert_eq!(set(&b), BTreeSet::from([5, 6, 7, last_region]));
    assert_eq!(b.dirty_count(), 4);
    assert_eq!(b.dirty_bytes(), 4 * G4K);
    assert_eq!(b.next_dirty(RegionIndex(6)), Some(RegionIndex(6)));
    assert_eq!(b.next_dirty(RegionIndex(8)), Some(RegionIndex(last_region)));
}

#[tokio::test]
async fn dirty_bytes_counts_a_short_last_region_by_its_length() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = Geometry::new(65536 + 4096, Granularity::default()).expect("geometry");
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(65536, 4096).await.expect("mark"));
    drop(b.mark(0, 1).await.expect("mark"));
    assert_eq!(b.dirty_bytes(), 65536 + 4096);
    assert!(matches!(
        b.mark(65536, 8192).await,
        Err(BitmapError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn marking_without_tracking_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    assert!(matches!(
        b.mark(0, 4096).await,
        Err(BitmapError::NotTracking { .. })
    ));
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    let other = ReplicaId::new("site-c").expect("id");
    assert!(matches!(
        b.start_tracking(other, Epoch(2)).await,
        Err(BitmapError::OtherPeer { .. })
    ));
}

#[tokio::test]
async fn the_hot_path_does_no_io_for_durably_dirty_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    let before = s.counts();
    drop(b.mark(0, 16 * G4K).await.expect("mark"));
    let after_first = s.counts();
    assert_eq!(after_first.0 - before.0, 1, "one block written");
    assert_eq!(after_first.1 - before.1, 1, "one sync");
    for i in 0..100 {
        let g = b.mark((i % 16) * G4K, G4K).await.expect("mark");
        drop(g);
    }
    drop(b.mark(2 * G4K, 10 * G4K).await.expect("mark"));
    assert_eq!(s.counts(), after_first, "already durably dirty: no I/O");
    // Reopened, the bits are still known durable: still no I/O.
    drop(b);
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    drop(b.mark(3 * G4K, G4K).await.expect("mark"));
    assert_eq!(s.counts(), after_first);
}

#[tokio::test]
async fn concurrent_marks_share_one_write_per_block_and_one_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    let before = s.counts();
    // 64 writers, each on its own region, all in block 0.
    let marks = (0..64u64).map(|i| b.mark(i * 7 * G4K, G4K));
    let guards = futures::future::join_all(marks).await;
    assert!(guards.iter().all(|g| g.is_ok()));
    let (w, y) = s.counts();
    assert!(
        w - before.0 <= 2 && y - before.1 <= 2,
        "64 marks took {} writes and {} syncs",
        w - before.0,
        y - before.1
    );
    assert_eq!(b.dirty_count(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn marks_from_many_threads_coalesce() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    let before = s.counts();
    let tasks: Vec<_> = (0..256u64)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.mark(i * 3 * G4K, G4K).await.map(drop) })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("mark");
    }
    let (_, y) = s.counts();
    assert!(y - before.1 < 64, "256 marks took {} syncs", y - before.1);
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(set(&b), (0..256).map(|i| i * 3).collect());
}

#[tokio::test]
async fn a_finished_copy_clears_and_the_clear_is_persisted_lazily() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, 4 * G4K).await.expect("mark"));
    let c = b.begin_copy(RegionIndex(1)).expect("copy").expect("dirty");
    assert!(
        b.begin_copy(RegionIndex(9)).expect("copy").is_none(),
        "clean"
    );
    let before = s.counts();
    assert!(c.finish(), "no overlap: cleared");
    assert_eq!(s.counts(), before, "the clear costs no I/O by itself");
    assert_eq!(set(&b), BTreeSet::from([0, 2, 3]));
    b.persist().await.expect("persist");
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(set(&b), BTreeSet::from([0, 2, 3]));
}

#[tokio::test]
async fn a_write_during_the_copy_keeps_the_region_dirty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, 4 * G4K).await.expect("mark"));

    // Marked after the copy began.
    let c = b.begin_copy(RegionIndex(0)).expect("copy").expect("dirty");
    drop(b.mark(100, 10).await.expect("mark"));
    assert!(!c.finish(), "overlapped: stays dirty");

    // Marked before the copy began, data still in flight during it.
    let w = b.mark(G4K, 10).await.expect("mark");
    let c = b.begin_copy(RegionIndex(1)).expect("copy").expect("dirty");
    drop(w);
    assert!(!c.finish(), "in flight at begin_copy: stays dirty");

    // An abandoned copy changes nothing; a clean second copy clears.
    let c = b.begin_copy(RegionIndex(2)).expect("copy").expect("dirty");
    assert!(matches!(
        b.begin_copy(RegionIndex(2)),
        Err(BitmapError::AlreadyCopying { .. })
    ));
    drop(c);
    let c = b.begin_copy(RegionIndex(2)).expect("copy").expect("dirty");
    assert!(c.finish());
    assert_eq!(set(&b), BTreeSet::from([0, 1, 3]));
}

#[tokio::test]
async fn a_flush_during_a_copy_never_persists_its_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, G4K).await.expect("mark"));
    let c = b.begin_copy(RegionIndex(0)).expect("copy").expect("dirty");
    // Another region's mark flushes the same block while the copy runs.
    drop(b.mark(10 * G4K, G4K).await.expect("mark"));
    b.persist().await.expect("persist");
    // Crash before the copy finished: region 0 must still be dirty.
    drop(c);
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(set(&b), BTreeSet::from([0, 10]));
}

#[tokio::test]
async fn a_cleared_region_marked_again_is_durable_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, G4K).await.expect("mark"));
    let c = b.begin_copy(RegionIndex(0)).expect("copy").expect("dirty");
    assert!(c.finish());
    // Pending clear not yet on disk, then marked again, then persisted.
    drop(b.mark(0, G4K).await.expect("mark"));
    b.persist().await.expect("persist");
    let c = b.begin_copy(RegionIndex(0)).expect("copy").expect("dirty");
    assert!(c.finish());
    b.persist().await.expect("persist");
    drop(
        b.mark(0, G4K)
            .await
            .expect("re-mark after a persisted clear"),
    );
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(set(&b), BTreeSet::from([0]));
}

#[tokio::test]
async fn reset_makes_everything_dirty_in_one_header_write_and_stop_forgets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let s = Counting::new(FileStorage::open(&p).expect("open"));
    let b = Bitmap::open(s.clone(), g).await.expect("load");
    b.reset_all_dirty(peer(), Epoch(4)).await.expect("reset");
    assert_eq!(s.counts(), (1, 1));
    assert_eq!(b.dirty_count(), g.region_count());
    assert_eq!(b.dirty_bytes(), g.volume_size());
    let c = b.begin_copy(RegionIndex(REGIONS_PER_BLOCK)).expect("copy");
    assert!(c.expect("dirty").finish());
    b.persist().await.expect("persist");
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(b.dirty_count(), g.region_count() - 1);
    assert_eq!(
        b.next_dirty(RegionIndex(REGIONS_PER_BLOCK)).map(|r| r.0),
        Some(REGIONS_PER_BLOCK + 1)
    );
    b.stop_tracking().await.expect("stop");
    assert_eq!(b.state(), BitmapState::Clean);
    b.start_tracking(peer(), Epoch(9)).await.expect("start");
    assert_eq!(b.dirty_count(), 0, "a new session starts clean");
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(b.dirty_count(), 0, "old session's blocks are ignored");
}

fn corrupt(p: &Path, offset: u64, at: usize) {
    let s = FileStorage::open(p).expect("open");
    let mut b = vec![0u8; PAGE];
    s.read_at(&mut b, offset).expect("read");
    b[at] ^= 0xff;
    s.write_at(&b, offset).expect("write");
}

#[tokio::test]
async fn damage_is_reported_as_untrusted_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, G4K).await.expect("mark"));
    drop(b);

    // The only copy of block 0 in this session is damaged past its session
    // field: untrusted, never silently clean.
    corrupt(&p, block_offset(0, 0), 1000);
    let b = open(&p, g).await;
    assert_eq!(
        b.state(),
        BitmapState::Untrusted(UntrustedReason::BlockUnreadable { block: 0 })
    );
    assert!(matches!(
        b.mark(0, 1).await,
        Err(BitmapError::Untrusted { .. })
    ));
    assert!(matches!(
        b.start_tracking(peer(), Epoch(2)).await,
        Err(BitmapError::Untrusted { .. })
    ));
    b.reset_all_dirty(peer(), Epoch(2)).await.expect("reset");
    drop(b);
    let b = open(&p, g).await;
    assert_eq!(b.dirty_count(), g.region_count(), "full resync after reset");
    drop(b);

    // Both header slots damaged.
    corrupt(&p, header_offset(0), 20);
    corrupt(&p, header_offset(1), 20);
    let b = open(&p, g).await;
    assert!(matches!(
        b.state(),
        BitmapState::Untrusted(UntrustedReason::HeaderUnreadable { .. })
    ));
    drop(b);

    // Another region size.
    let p2 = dir.path().join("bitmap2");
    new_file(&p2, g);
    let coarser = Geometry::new(
        g.volume_size(),
        Granularity::new(2 * g.granularity().bytes()).expect("granularity"),
    )
    .expect("geometry");
    let b = open(&p2, coarser).await;
    assert!(matches!(
        b.state(),
        BitmapState::Untrusted(UntrustedReason::GeometryChanged { .. })
    ));
}

#[tokio::test]
async fn a_grown_bitmap_keeps_its_bits_and_loads_at_either_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(3)).await.expect("track");
    let last = g.region_count() - 1;
    drop(b.mark(0, G4K).await.expect("mark"));
    drop(b.mark(last * G4K, G4K).await.expect("mark last"));
    // Two more blocks and a half.
    let bigger = Geometry::new(
        g.volume_size() + (2 * REGIONS_PER_BLOCK + REGIONS_PER_BLOCK / 2) * G4K,
        g.granularity(),
    )
    .expect("geometry");
    b.grow(bigger).await.expect("grow");
    assert_eq!(b.geometry(), bigger);
    assert_eq!(set(&b), BTreeSet::from([0, last]), "the bits stay");
    let new_last = bigger.region_count() - 1;
    drop(
        b.mark(new_last * G4K, G4K)
            .await
            .expect("mark past the old end"),
    );
    assert!(
        b.grow(g).await.is_err(),
        "a bitmap never shrinks: {:?}",
        b.grow(g).await
    );
    b.grow(bigger).await.expect("the same size again");
    drop(b);
    assert!(
        std::fs::metadata(&p).expect("stat").len() >= format::file_len(bigger),
        "the file was extended"
    );

    // The volume's metadata committed the new size: tracking goes on.
    let b = open(&p, bigger).await;
    assert!(matches!(b.state(), BitmapState::Tracking { .. }));
    assert_eq!(set(&b), BTreeSet::from([0, last, new_last]));
    drop(b);

    // A crash before the metadata committed it (no write past the old end
    // then): the bitmap loads at the old size with its bits.
    let q = dir.path().join("bitmap-old");
    new_file(&q, g);
    let b = open(&q, g).await;
    b.start_tracking(peer(), Epoch(3)).await.expect("track");
    drop(b.mark(G4K, G4K).await.expect("mark"));
    b.grow(bigger).await.expect("grow");
    drop(b);
    let b = open(&q, g).await;
    assert!(matches!(b.state(), BitmapState::Tracking { .. }));
    assert_eq!(set(&b), BTreeSet::from([1]));
    drop(b);

    // A clean bitmap grows too, and stays clean.
    let c = dir.path().join("bitmap-clean");
    new_file(&c, g);
    let b = open(&c, g).await;
    b.grow(bigger).await.expect("grow clean");
    drop(b);
    let b = open(&c, bigger).await;
    assert_eq!(b.state(), BitmapState::Clean);
}

#[tokio::test]
async fn a_damaged_newer_copy_falls_back_to_the_older_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = geometry();
    new_file(&p, g);
    let b = open(&p, g).await;
    b.start_tracking(peer(), Epoch(1)).await.expect("start");
    drop(b.mark(0, G4K).await.expect("mark")); // copy 0, seq 1
    drop(b.mark(G4K, G4K).await.expect("mark")); // copy 1, seq 2
    drop(b);
    corrupt(&p, block_offset(0, 1), 2000);
    let b = open(&p, g).await;
    assert_eq!(set(&b), BTreeSet::from([0]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_acknowledged_mark_survives_reopen(
        ranges in proptest::collection::vec((0u64..(2 * REGIONS_PER_BLOCK + 90), 1u64..10), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("bitmap");
            let g = geometry();
            new_file(&p, g);
            let b = open(&p, g).await;
            b.start_tracking(peer(), Epoch(1)).await.expect("start");
            let mut expected = BTreeSet::new();
            let marks = ranges.iter().map(|&(r, n)| b.mark(r * G4K, n * G4K));
            for m in futures::future::join_all(marks).await {
                drop(m.expect("mark"));
            }
            for &(r, n) in &ranges {
                expected.extend(r..r + n);
            }
            drop(b);
            let b = open(&p, g).await;
            assert_eq!(set(&b), expected);
        });
    }
}

/// The resync loop as the replica will run it, against writers that keep
/// writing: when the writers stop and the bitmap is clean, the peer's copy
/// equals the local one — no write that raced a copy was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resync_racing_writers_converges_to_identical_copies() {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    const REGIONS: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bitmap");
    let g = Geometry::new(REGIONS * G4K, Granularity::new(G4K).expect("g")).expect("geometry");
    new_file(&p, g);
    let b = open(&p, g).await;
    b.reset_all_dirty(peer(), Epoch(1)).await.expect("reset");
    let local = Arc::new(Mutex::new(vec![0u8; (REGIONS * G4K) as usize]));
    let remote = Arc::new(Mutex::new(vec![1u8; (REGIONS * G4K) as usize]));
    let stop = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (b, local) = (b.clone(), local.clone());
            tokio::spawn(async move {
                let mut x = w * 7919 + 1;
                for i in 0..400u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = (x >> 33) % REGIONS;
                    let guard = b.mark(r * G4K, G4K).await.expect("mark");
                    tokio::task::yield_now().await;
                    let at = (r * G4K) as usize;
                    local.lock().expect("local")[at..at + G4K as usize].fill((i % 250) as u8 + 2);
                    drop(guard);
                }
            })
        })
        .collect();
    let resync = {
        let (b, local, remote, stop) = (b.clone(), local.clone(), remote.clone(), stop.clone());
        tokio::spawn(async move {
            let mut copies = 0u64;
            loop {
                let Some(r) = b.next_dirty(RegionIndex(0)) else {
                    if stop.load(Ordering::SeqCst) && b.dirty_count() == 0 {
                        return copies;
                    }
                    tokio::task::yield_now().await;
                    continue;
                };
                let Some(c) = b.begin_copy(r).expect("begin_copy") else {
                    continue;
                };
                let range = g.byte_range(r);
                let (s, e) = (range.start as usize, range.end as usize);
                let data = local.lock().expect("local")[s..e].to_vec();
                tokio::task::yield_now().await;
                remote.lock().expect("remote")[s..e].copy_from_slice(&data);
                c.finish();
                copies += 1;
                if copies.is_multiple_of(16) {
                    b.persist().await.expect("persist");
                }
            }
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    stop.store(true, Ordering::SeqCst);
    let copies = resync.await.expect("resync");
    assert!(copies >= REGIONS);
    assert!(
        *local.lock().expect("local") == *remote.lock().expect("remote"),
        "the peer misses a write that raced a copy"
    );
    b.persist().await.expect("persist");
    drop(b);
    assert_eq!(open(&p, g).await.dirty_count(), 0);
}
