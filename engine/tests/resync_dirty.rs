//! Resync with real replica processes: replica a is out (killed) while
//! writes go to replica b alone (b told by `PeerState` that a left, as the
//! frontend does after the arbiter's swap); a returns; b copies exactly the
//! dirty regions to a by itself; both data files end byte-identical and
//! hold every acknowledged write. Also: b killed -9 in the middle of the
//! resync resumes from its persisted bitmap after a restart.
//!
//! The test drives the replica protocol directly (the library's replica
//! client), standing in for the frontend, so that it checks the replica
//! side alone.

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{KillOnDrop, MIB, create_volume, digest, metrics, start_proc, tail, wait_until};
use twinvol_engine::frontend::ReplicaSpec;
use twinvol_engine::frontend::connection::{ReplicaHandle, SessionParams};
use twinvol_engine::metrics::Metrics;
use twinvol_engine::protocol::{
    ArbiterVersion, Epoch, Op, PROTOCOL_VERSION, ReplicaId, Reply, Secret, SyncView, VolumeId,
};

const SIZE: u64 = 64 * MIB;
const REGION: u64 = 64 * 1024;
const EXTENT: u64 = 4 * MIB;
const DEADLINE: Duration = Duration::from_secs(90);

struct Site {
    name: &'static str,
    pool: PathBuf,
    addr: String,
}

impl Site {
    fn data(&self) -> PathBuf {
        self.pool.join("v1").join("data")
    }
    fn status_file(&self) -> PathBuf {
        self.pool.join("v1").join("resync-status.json")
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn setup(root: &Path) -> (Site, Site, PathBuf) {
    let secret = root.join("secret");
    std::fs::write(&secret, "resync-test-secret-0123456789abcdef\n").expect("secret");
    let mk = |name: &'static str| {
        let pool = root.join(format!("pool-{name}"));
        std::fs::create_dir(&pool).expect("pool");
        create_volume(&pool, "v1", &SIZE.to_string());
        Site {
            name,
            pool,
            addr: free_addr(),
        }
    };
    (mk("a"), mk("b"), secret)
}

/// Starts the replica of `site` on its fixed address (so that it returns
/// where its peer expects it) with `extra` arguments, ready to serve.
fn start(site: &Site, secret: &Path, extra: &[String], root: &Path) -> KillOnDrop {
    let mut args = vec![
        "replica".to_owned(),
        "--pool".into(),
        site.pool.display().to_string(),
        "--listen".into(),
        site.addr.clone(),
        "--secret-file".into(),
        secret.display().to_string(),
    ];
    args.extend_from_slice(extra);
    KillOnDrop(start_proc(&format!("replica-{}", site.name), args, root))
}

/// The resync status of `volume` that `site`'s replica publishes.
fn status_of(site: &Site, volume: &str) -> Option<serde_json::Value> {
    let t = std::fs::read_to_string(site.pool.join(volume).join("resync-status.json")).ok()?;
    serde_json::from_str(&t).ok()
}

fn status(site: &Site) -> Option<serde_json::Value> {
    status_of(site, "v1")
}

/// Waits for `site`'s resync status of v1 to satisfy `cond`; otherwise the
/// test fails, saying `what` with the last status.
fn wait_for_status(
    site: &Site,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until(DEADLINE, || status(site).filter(|s| cond(s)))
        .unwrap_or_else(|| panic!("{what}: {:?}", status(site)))
}

/// The resync finished: state done, nothing left to copy.
fn is_done(s: &serde_json::Value) -> bool {
    s["state"] == "done" && field(s, "remaining_bytes") == 0
}

/// The resync is copying and copied at least `bytes` in this attempt.
fn copying_at_least(s: &serde_json::Value, bytes: u64) -> bool {
    s["state"] == "copying" && field(s, "attempt_copied_bytes") >= bytes
}

fn field(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

async fn connect(site: &Site, secret: &Path, epoch: u64) -> ReplicaHandle {
    connect_volume(site, secret, epoch, "v1").await
}

async fn connect_volume(site: &Site, secret: &Path, epoch: u64, volume: &str) -> ReplicaHandle {
    let params = SessionParams::frontend(
        VolumeId::new(volume).expect("id"),
        Epoch(epoch),
        Secret::from_file(secret).expect("secret"),
        PROTOCOL_VERSION,
    );
    let spec = ReplicaSpec {
        id: ReplicaId::new(site.name).expect("id"),
        addr: site.addr.clone(),
    };
    let m = Metrics::new("test");
    tokio::time::timeout(
        Duration::from_secs(20),
        ReplicaHandle::connect(spec, params, m.handles(volume, site.name)),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

async fn call(h: &ReplicaHandle, op: Op) -> Reply {
    tokio::time::timeout(Duration::from_secs(20), h.call(op))
        .await
        .expect("answer in time")
        .expect("request ok")
}

/// Writes `len` bytes of `fill` at `offset` to every handle and to the
/// model of what must be on disk.
async fn write(hs: &[&ReplicaHandle], model: &mut [u8], offset: u64, len: usize, fill: u8) {
    let data = Bytes::from(vec![fill; len]);
    for h in hs {
        let r = call(
            h,
            Op::Write {
                offset,
                fua: false,
                mirrored: false,
                data: data.clone(),
            },
        )
        .await;
        assert_eq!(r, Reply::Done);
    }
    model[offset as usize..offset as usize + len].fill(fill);
}

/// `PeerState` telling b the arbiter's record as the frontend of `epoch`
/// publishes its `seq`-th one: b in sync, `peer` in sync too or not.
fn told_b(peer: &str, epoch: u64, seq: u64, peer_in_sync: bool) -> Op {
    let id = |s: &str| ReplicaId::new(s).expect("id");
    let mut in_sync = vec![id("b")];
    if peer_in_sync {
        in_sync.insert(0, id(peer));
    }
    Op::PeerState {
        you: id("b"),
        peer: id(peer),
        view: SyncView {
            epoch: Epoch(epoch),
            seq,
            arbiter_version: ArbiterVersion::new(format!("{epoch}.{seq}")).expect("version"),
            in_sync,
        },
        peer_incarnation: 0,
        fence: None,
    }
}

/// b is told that a left (the first record of the frontend of `epoch`).
fn peer_state(epoch: u64, in_sync: bool) -> Op {
    told_b("a", epoch, if in_sync { 2 } else { 1 }, in_sync)
}

/// The frontend's degraded mode as b sees it: the arbiter swapped a out,
/// so b is told by `PeerState` that a left; then a's session closes and a
/// dies.
async fn take_a_out(ha: ReplicaHandle, hb: &ReplicaHandle, pa: &mut KillOnDrop) {
    assert_eq!(call(hb, peer_state(1, false)).await, Reply::Done);
    drop(ha);
    pa.kill();
}

/// The frontend's rejoin as b sees it: the arbiter put a back in sync at
/// `epoch`, so b is told by `PeerState`.
fn a_back_in_sync(rt: &tokio::runtime::Runtime, b: &Site, secret: &Path, epoch: u64) {
    rt.block_on(async {
        let hb = connect(b, secret, epoch).await;
        assert_eq!(call(&hb, peer_state(epoch, true)).await, Reply::Done);
    });
}

/// Writes made while a is out: scattered small writes and a few larger
/// ones. Returns the dirty regions and the extents touched.
async fn degraded_writes(
    b: &ReplicaHandle,
    model: &mut [u8],
    count: u64,
    span: u64,
) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let regions_in_span = span / REGION;
    let mut regions = BTreeSet::new();
    let mut extents = BTreeSet::new();
    for i in 0..count {
        let (offset, len) = if i % 10 == 0 {
            (((i * 7) % (span / MIB - 1)) * MIB, 256 * 1024)
        } else {
            ((i * 7919 % regions_in_span) * REGION + 4096 * (i % 3), 4096)
        };
        write(&[b], model, offset, len as usize, (i % 251) as u8 + 1).await;
        for r in offset / REGION..(offset + len).div_ceil(REGION) {
            regions.insert(r);
        }
        for e in offset / EXTENT..(offset + len).div_ceil(EXTENT) {
            extents.insert(e);
        }
    }
    (regions, extents)
}

fn assert_identical(a: &Site, b: &Site, model: &[u8]) {
    let bytes_b = std::fs::read(b.data()).expect("read b");
    assert!(bytes_b == model, "replica b lost an acknowledged write");
    assert_eq!(digest(&a.data()), digest(&b.data()), "replicas differ");
}

#[test]
fn resync_copies_only_dirty_regions_and_replicas_end_identical() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b, secret) = setup(root.path());
    let metrics_addr = free_addr();
    let peer_arg = vec![
        "--peer".to_owned(),
        format!("a={}", a.addr),
        "--metrics-listen".into(),
        metrics_addr.clone(),
    ];
    let mut pa = start(&a, &secret, &[], root.path());
    let pb = start(&b, &secret, &peer_arg, root.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];

    let (dirty, _extents) = rt.block_on(async {
        let ha = connect(&a, &secret, 1).await;
        let hb = connect(&b, &secret, 1).await;
        write(&[&ha, &hb], &mut model, 0, 4 * MIB as usize, 0x11).await;
        take_a_out(ha, &hb, &mut pa).await;
        degraded_writes(&hb, &mut model, 200, SIZE).await
    });
    // Dirty: exactly the regions written while a was out. The extent
    // written just before reached both replicas; a live frontend re-sends
    // what it held, so nothing else is marked (see replica::logs).
    let dirty_bytes = dirty.len() as u64 * REGION;
    let before = status(&b).expect("status file");
    assert_eq!(field(&before, "copied_bytes"), 0);

    let started = Instant::now();
    let _pa = start(&a, &secret, &[], root.path());
    let done = wait_for_status(&b, "resync not done", is_done);
    let took = started.elapsed();
    let copied = field(&done, "copied_bytes");
    eprintln!(
        "dirty regions {} ({dirty_bytes} bytes), copied {copied} bytes, resync done {took:?} after a returned",
        dirty.len()
    );
    assert!(
        copied <= dirty_bytes,
        "copied {copied} > dirty {dirty_bytes}"
    );
    assert_eq!(copied, dirty_bytes, "every dirty region is copied once");
    let m = metrics::scrape(&metrics_addr);
    for want in [
        "twinvol_replica_resync_bytes_remaining{volume=\"v1\",replica=\"a\"} 0".to_owned(),
        format!("twinvol_replica_resync_bytes_copied{{volume=\"v1\",replica=\"a\"}} {copied}"),
        "twinvol_replica_resync_state{volume=\"v1\",replica=\"a\",state=\"done\"} 1".to_owned(),
    ] {
        assert!(m.contains(&want), "{want} not in metrics:\n{m}");
    }

    // The frontend's rejoin: arbiter ReturnToInSync, then PeerState.
    rt.block_on(async {
        let hb = connect(&b, &secret, 1).await;
        assert_eq!(call(&hb, peer_state(1, true)).await, Reply::Done);
        call(&hb, Op::Flush).await;
    });
    let log = std::fs::read_to_string(&pb.log).expect("log");
    assert!(log.contains("resync v1 → a:"), "progress line missing");
    assert!(
        log.contains("dirty tracking stopped"),
        "tracking not stopped"
    );
    assert_identical(&a, &b, &model);
}

#[test]
fn resync_resumes_after_the_surviving_replica_is_killed() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b, secret) = setup(root.path());
    // Slow enough to be caught in the middle.
    let args = vec![
        "--peer".to_owned(),
        format!("a={}", a.addr),
        "--resync-rate".into(),
        "2M".into(),
    ];
    let mut pa = start(&a, &secret, &[], root.path());
    let mut pb = start(&b, &secret, &args, root.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    let (dirty, extents) = rt.block_on(async {
        let ha = connect(&a, &secret, 1).await;
        let hb = connect(&b, &secret, 1).await;
        write(&[&ha, &hb], &mut model, 0, MIB as usize, 0x22).await;
        take_a_out(ha, &hb, &mut pa).await;
        // Within the first half: the copy after the restart (dirty regions
        // plus the activity log's extents) stays below a full copy.
        let r = degraded_writes(&hb, &mut model, 400, SIZE / 2).await;
        call(&hb, Op::Flush).await;
        r
    });
    let mut dirty = dirty;
    dirty.extend(0..EXTENT / REGION);
    let dirty_bytes = dirty.len() as u64 * REGION;
    // Extents with writes since b started: what its activity log may hold.
    let mut extents = extents;
    extents.insert(0);
    let al_bytes = extents.len() as u64 * EXTENT;

    let _pa = start(&a, &secret, &[], root.path());
    let mid = wait_for_status(&b, "resync did not start", |s| copying_at_least(s, MIB));
    let copied_first = field(&mid, "copied_bytes");
    assert!(field(&mid, "remaining_bytes") > 0, "{mid}");
    pb.kill();
    eprintln!("killed b after {copied_first}+ bytes copied of {dirty_bytes} dirty");
    std::fs::remove_file(b.status_file()).expect("remove status");

    let started = Instant::now();
    let pb2 = start(&b, &secret, &args, root.path());
    let done = wait_for_status(&b, "resumed resync not done", is_done);
    let copied_second = field(&done, "copied_bytes");
    eprintln!(
        "after restart: copied {copied_second} bytes in {:?} (dirty {dirty_bytes}, activity-log bound {al_bytes})",
        started.elapsed()
    );
    assert!(
        copied_second <= dirty_bytes + al_bytes,
        "copied {copied_second} > dirty {dirty_bytes} + activity log {al_bytes}"
    );
    assert!(copied_second < SIZE, "a full copy after the restart");
    a_back_in_sync(&rt, &b, &secret, 1);
    let log = std::fs::read_to_string(&pb2.log).expect("log");
    assert!(log.contains("dirty bitmap loaded"), "no recovery logged");
    assert_identical(&a, &b, &model);
}

/// A resync under way at 4 MiB/s (slow enough to be caught copying): a
/// was taken out, b took `count` degraded writes, a returned, and b has
/// started copying to it. Fields drop in order: the processes before the
/// directory holding their pools and logs.
struct Resyncing {
    _pa: KillOnDrop,
    pb: KillOnDrop,
    rt: tokio::runtime::Runtime,
    model: Vec<u8>,
    a: Site,
    b: Site,
    secret: PathBuf,
    _root: tempfile::TempDir,
}

fn resync_under_way(count: u64) -> Resyncing {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b, secret) = setup(root.path());
    let args = vec![
        "--peer".to_owned(),
        format!("a={}", a.addr),
        "--resync-rate".into(),
        "4M".into(),
    ];
    let mut pa = start(&a, &secret, &[], root.path());
    let pb = start(&b, &secret, &args, root.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    rt.block_on(async {
        let ha = connect(&a, &secret, 1).await;
        let hb = connect(&b, &secret, 1).await;
        take_a_out(ha, &hb, &mut pa).await;
        degraded_writes(&hb, &mut model, count, SIZE).await;
    });
    let pa = start(&a, &secret, &[], root.path());
    wait_for_status(&b, "resync did not start", |s| copying_at_least(s, 1));
    Resyncing {
        _pa: pa,
        pb,
        rt,
        model,
        a,
        b,
        secret,
        _root: root,
    }
}

#[test]
fn foreground_writes_during_the_resync_converge() {
    let Resyncing {
        rt,
        model,
        a,
        b,
        secret,
        ..
    } = &mut resync_under_way(300);
    // While it copies, the frontend sends new writes to both replicas (acks
    // from b alone would do; a converges either way), overlapping regions
    // being copied.
    rt.block_on(async {
        let ha = connect(a, secret, 1).await;
        let hb = connect(b, secret, 1).await;
        for i in 0..200u64 {
            let offset = (i * 104_729 % (SIZE / 4096 - 16)) * 4096;
            write(&[&hb, &ha], model, offset, 16 * 1024, (i % 200) as u8 + 7).await;
        }
    });
    let done = wait_for_status(b, "resync not done", is_done);
    eprintln!(
        "copied {} bytes, {} regions copied again after overlapping writes",
        field(&done, "copied_bytes"),
        field(&done, "recopied_regions")
    );
    a_back_in_sync(rt, b, secret, 1);
    assert_identical(a, b, model);
}

#[test]
fn a_new_frontend_epoch_during_the_resync_is_followed() {
    let Resyncing {
        pb,
        rt,
        model,
        a,
        b,
        secret,
        ..
    } = &mut resync_under_way(200);
    // A new frontend opens both replicas at epoch 2: the resync's session
    // with a (epoch 1) is fenced; it must reconnect at epoch 2 and finish.
    rt.block_on(async {
        let hb = connect(b, secret, 2).await;
        let ha = connect(a, secret, 2).await;
        write(&[&hb, &ha], model, 8 * MIB, 64 * 1024, 0x5a).await;
    });
    let done = wait_for_status(b, "resync not done", is_done);
    assert!(field(&done, "completed") >= 1);
    a_back_in_sync(rt, b, secret, 2);
    let log = std::fs::read_to_string(&pb.log).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("resync started") && l.contains("epoch=2")),
        "the resync did not reconnect at the new epoch:\n{}",
        tail(&pb.log, 30)
    );
    assert_identical(a, b, model);
}

#[test]
fn resyncs_beyond_the_limit_wait_for_a_slot() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b, secret) = setup(root.path());
    for site in [&a, &b] {
        create_volume(&site.pool, "v2", &SIZE.to_string());
    }
    let args = vec![
        "--peer".to_owned(),
        format!("a={}", a.addr),
        "--resync-rate".into(),
        "4M".into(),
        "--resync-max".into(),
        "1".into(),
    ];
    let mut pa = start(&a, &secret, &[], root.path());
    let _pb = start(&b, &secret, &args, root.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut models = [vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]];
    rt.block_on(async {
        for (vol, model) in ["v1", "v2"].into_iter().zip(models.iter_mut()) {
            let hb = connect_volume(&b, &secret, 1, vol).await;
            assert_eq!(call(&hb, peer_state(1, false)).await, Reply::Done);
            write(&[&hb], model, 16 * MIB, 4 * MIB as usize, 0x33).await;
        }
    });
    pa.kill();
    let status_of = |vol: &str| status_of(&b, vol);
    let _pa = start(&a, &secret, &[], root.path());
    // One copies, the other waits for the slot.
    let both = wait_until(DEADLINE, || {
        let (s1, s2) = (status_of("v1")?, status_of("v2")?);
        let states = [s1["state"].clone(), s2["state"].clone()];
        (states.contains(&"copying".into()) && states.contains(&"waiting".into())).then_some(())
    });
    assert!(
        both.is_some(),
        "never one copying and one waiting: {:?} {:?}",
        status_of("v1"),
        status_of("v2")
    );
    let done = wait_until(DEADLINE, || {
        let (s1, s2) = (status_of("v1")?, status_of("v2")?);
        (s1["state"] == "done" && s2["state"] == "done").then_some(())
    });
    assert!(
        done.is_some(),
        "{:?} {:?}",
        status_of("v1"),
        status_of("v2")
    );
    for (vol, model) in ["v1", "v2"].into_iter().zip(models.iter()) {
        let da = std::fs::read(a.pool.join(vol).join("data")).expect("a");
        let db = std::fs::read(b.pool.join(vol).join("data")).expect("b");
        assert!(db == *model && da == db, "{vol} differs");
    }
}

#[test]
fn a_replaced_peer_gets_a_full_copy_that_says_why() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b, secret) = setup(root.path());
    // The replica that returns at a's address is a new one, "c".
    let args = vec!["--peer".to_owned(), format!("c={}", a.addr)];
    let mut pa = start(&a, &secret, &[], root.path());
    let pb = start(&b, &secret, &args, root.path());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    rt.block_on(async {
        let hb = connect(&b, &secret, 1).await;
        assert_eq!(call(&hb, peer_state(1, false)).await, Reply::Done);
        pa.kill();
        degraded_writes(&hb, &mut model, 50, SIZE).await;
        let replaced = told_b("c", 1, 2, false);
        assert_eq!(call(&hb, replaced).await, Reply::Done);
    });
    // A blank replica at a's place.
    std::fs::remove_dir_all(a.pool.join("v1")).expect("wipe a");
    create_volume(&a.pool, "v1", &SIZE.to_string());
    let started = Instant::now();
    let _pc = start(&a, &secret, &[], root.path());
    let done = wait_for_status(&b, "full resync not done", is_done);
    eprintln!(
        "full copy of {SIZE} bytes done {:?} after the new replica started",
        started.elapsed()
    );
    assert_eq!(field(&done, "copied_bytes"), SIZE);
    let why = done["full_copy"].as_str().unwrap_or_default().to_owned();
    assert!(why.contains("replaced"), "status does not say why: {done}");
    let log = std::fs::read_to_string(&pb.log).expect("log");
    assert!(log.contains("full resync"), "log does not say so");
    rt.block_on(async {
        let hb = connect(&b, &secret, 1).await;
        let back = told_b("c", 1, 3, true);
        assert_eq!(call(&hb, back).await, Reply::Done);
    });
    assert_identical(&a, &b, &model);
}
