//! A replica's return, and frontends that change, with real processes and
//! the file-backed arbiter:
//! - a replica killed under a running fio comes back, catches up *while fio
//!   keeps writing* and rejoins the in-sync set; fio's verification passes
//!   and the two replica files end byte-identical;
//! - a frontend killed (-9) in the middle of writes: the next one takes the
//!   lease with a bumped epoch, reconciles the activity-log extents (one
//!   replica leaves, the other's resync copies them, it rejoins), every
//!   write the old frontend acknowledged reads back, and the replicas end
//!   identical;
//! - a frontend stopped cleanly hands over at once: its successor finds no
//!   activity-log extent to reconcile and takes no replica out;
//! - a whole site lost (its frontend and its replica killed together): a
//!   frontend started on the other site serves with the lost replica out,
//!   and the replica rejoins when it returns.
//!
//! Needs fio (nbd engine) and qemu-io.

mod common;

use std::time::{Duration, Instant};

use common::metrics::scrape;
use common::{MIB, Stack, StackOptions, fio, holds_nonzero_byte, qemu_io, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
/// A short lease so that a takeover after a kill takes seconds.
const SHORT_LEASE: [&str; 4] = ["--lease-duration", "3s", "--lease-margin", "1s"];

fn frontend_logs(stack: &Stack) -> String {
    let mut out = String::new();
    for i in 1..=8 {
        if let Ok(s) = std::fs::read_to_string(stack.dir().join(format!("frontend-{i}.log"))) {
            out.push_str(&s);
        }
    }
    out
}

fn both_in_sync(stack: &Stack) -> bool {
    stack.arbiter_show().contains("in_sync: a,b\n")
}

/// How far the resyncs have got: their progress lines in the replicas'
/// logs (the source logs one a second while it copies).
fn resync_progress(stack: &Stack) -> usize {
    ["replica-a.log", "replica-b.log"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(stack.dir().join(f)).ok())
        .map(|log| log.lines().filter(|l| l.contains("resync v1 → ")).count())
        .sum()
}

/// Waits for both replicas in sync at the arbiter: DEADLINE without
/// progress fails, and so do five minutes in all. A full activity log is a
/// gigabyte to copy back, which a loaded two-core machine copies at
/// 15 MiB/s (seen in a run with four builds beside the tests); a resync that
/// stalls still fails after DEADLINE.
fn wait_rejoined(stack: &Stack) -> bool {
    let cap = Instant::now() + Duration::from_secs(300);
    let mut progress = resync_progress(stack);
    let mut moved = Instant::now();
    loop {
        if both_in_sync(stack) {
            return true;
        }
        let now = resync_progress(stack);
        if now != progress {
            progress = now;
            moved = Instant::now();
        }
        if moved.elapsed() > DEADLINE || Instant::now() > cap {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until both replicas are in sync at the arbiter, then until a
/// flushed, quiet volume has byte-identical replica files.
fn assert_rejoined_and_identical(stack: &Stack) {
    assert!(
        wait_rejoined(stack),
        "replica did not rejoin:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(40)
    );
    let out = qemu_io::command(&stack.nbd_uri(), &["flush"])
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "flush failed");
    let paths = stack.replica_data_paths();
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .args(&paths)
        .status()
        .expect("cmp");
    assert!(same.success(), "replicas differ");
}

#[test]
fn a_returning_replica_catches_up_under_load_and_rejoins() {
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        metrics: true,
        ..StackOptions::default()
    });
    // About 96 s of writes over 48 MiB: the kill, the return and the
    // rejoin all happen while fio writes (at 1 MiB/s, 48 s, a rejoin on a
    // machine running the test command's five lanes took 47.6 s and fio
    // had ended). The restarted replica's
    // activity-log extents — everything fio wrote, never flushed — may
    // have been lost (a kill cannot be told from a power cut), so the
    // resync copies them too, yielding to fio (about 1.5 MiB/s here).
    let mut fio = fio::Background::spawn(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "twinvol-rejoin",
        91,
        &["--iodepth=16", "--bs=64k", "--size=48m", "--rate=512k"],
    ));
    let data_b = stack.replica_data_paths()[1].clone();
    assert!(
        wait_until(DEADLINE, || holds_nonzero_byte(&data_b).then_some(())).is_some(),
        "fio wrote nothing"
    );
    stack.kill_replica(0);
    let out = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("out_of_sync: a\n")
            .then_some(())
    });
    assert!(out.is_some(), "a never left:\n{}", stack.log_tails(30));
    std::thread::sleep(Duration::from_secs(1));
    stack.start_replica(0);
    let back = Instant::now();
    let rejoined = wait_until(DEADLINE, || both_in_sync(&stack).then_some(()));
    assert!(
        rejoined.is_some(),
        "a did not rejoin:\n{}",
        stack.log_tails(40)
    );
    let took = back.elapsed();
    // The point: the rejoin happened while fio was still writing.
    let fio_running = !fio.is_done();
    let log = frontend_logs(&stack);
    eprintln!("a rejoined {took:?} after its restart, fio still writing: {fio_running}");
    assert!(
        fio_running,
        "fio ended before the rejoin: not a test under load"
    );
    assert!(log.contains("catching up"), "{log}");
    if let Err(e) = fio.finish_clean(Duration::from_secs(180)) {
        panic!("{e}\n{}", stack.log_tails(30));
    }
    assert_rejoined_and_identical(&stack);
    // Only what changed was copied: fio writes within its first 48 MiB.
    let status = std::fs::read_to_string(stack.dir().join("pool-b/v1/resync-status.json"))
        .expect("B's resync status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    let copied = v["copied_bytes"].as_u64().expect("copied_bytes");
    eprintln!("resync copied {copied} bytes of a 64 MiB volume");
    assert!(copied > 0 && copied <= 48 * MIB, "copied {copied} bytes");
    let metrics = scrape(&stack.frontend_metrics_addr().expect("metrics"));
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    // At least the one of the kill (a slow machine may time a replica out
    // once more), and as many rejoins: a ends in sync.
    let failovers = value("twinvol_frontend_failovers_total{volume=\"v1\"}");
    let rejoins = value("twinvol_frontend_rejoins_total{volume=\"v1\"}");
    assert!(
        failovers >= 1 && rejoins == failovers,
        "{failovers} fail-overs, {rejoins} rejoins"
    );
    assert_eq!(
        value("twinvol_frontend_replica_state{volume=\"v1\",replica=\"a\",state=\"in_sync\"}"),
        1
    );
}

/// The frontend's `--status-file`.
fn frontend_report(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("status file");
    serde_json::from_str(&text).expect("status JSON")
}

/// The pattern byte of 64 KiB slot `i`: never 0.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8 + 1
}

const SLOT: u64 = 64 * 1024;

/// The offsets qemu-io reports as written ("wrote N/N bytes at offset X").
fn acknowledged(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("wrote "))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// A stack with a file arbiter whose frontend holds a short lease.
fn short_lease_stack(size: u64) -> Stack {
    let mut stack = Stack::start(StackOptions {
        size,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(&SHORT_LEASE);
    stack
}

/// Writes each 64 KiB slot of `slots` with its pattern, one after the
/// other; returns the offsets acknowledged, checked to be all of them.
fn write_slots(stack: &Stack, slots: impl Iterator<Item = u64>) -> Vec<u64> {
    let cmds: Vec<String> = slots
        .map(|slot| format!("write -P {} {} {SLOT}", pattern(slot), slot * SLOT))
        .collect();
    let out = qemu_io::spawn(&stack.nbd_uri(), &cmds)
        .wait_with_output()
        .expect("qemu-io");
    let acked = acknowledged(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(acked.len(), cmds.len(), "not every write was acknowledged");
    acked
}

/// Reads every slot in `acked` back through the frontend and checks its
/// pattern.
fn check_acked(stack: &Stack, acked: &[u64]) {
    for chunk in acked.chunks(64) {
        let cmds: Vec<String> = chunk
            .iter()
            .map(|&off| format!("read -P {} {off} {SLOT}", pattern(off / SLOT)))
            .collect();
        let out = qemu_io::spawn(&stack.nbd_uri(), &cmds)
            .wait_with_output()
            .expect("qemu-io");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains("Pattern verification failed") && !stdout.contains("failed"),
            "an acknowledged write is not readable:\n{stdout}"
        );
        assert_eq!(
            stdout.lines().filter(|l| l.starts_with("read ")).count(),
            chunk.len(),
            "{stdout}"
        );
    }
}

#[test]
fn a_frontend_killed_mid_writes_is_replaced_and_its_activity_log_reconciled() {
    let mut stack = short_lease_stack(64 * MIB);
    // 768 writes of 64 KiB, 16 in flight at a time, over the whole volume;
    // the frontend is killed while they run.
    let cmds: Vec<String> = (0..768u64)
        .map(|k| {
            let slot = (k * 389) % 1024;
            let sync = if k % 16 == 15 {
                "aio_flush".to_owned()
            } else {
                String::new()
            };
            let w = format!("aio_write -P {} {} {SLOT}", pattern(slot), slot * SLOT);
            if sync.is_empty() {
                w
            } else {
                format!("{w}\n{sync}")
            }
        })
        .flat_map(|s| s.split('\n').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let writer = qemu_io::spawn(&stack.nbd_uri(), &cmds);
    let data_a = stack.replica_data_paths()[0].clone();
    assert!(
        wait_until(DEADLINE, || holds_nonzero_byte(&data_a).then_some(())).is_some(),
        "nothing written"
    );
    std::thread::sleep(Duration::from_millis(300));
    stack.kill_frontend();
    let out = writer.wait_with_output().expect("qemu-io");
    let acked = acknowledged(&String::from_utf8_lossy(&out.stdout));
    eprintln!("{} writes acknowledged before the kill", acked.len());
    assert!(!acked.is_empty(), "no write acknowledged before the kill");

    let started = Instant::now();
    stack.start_frontend_with(&SHORT_LEASE);
    eprintln!("new frontend ready {:?} after the kill", started.elapsed());
    let show = stack.arbiter_show();
    assert!(show.contains("epoch: 2\n"), "{show}");
    let log = frontend_logs(&stack);
    assert!(
        log.contains("activity-log extents found"),
        "no reconciliation logged:\n{log}"
    );
    check_acked(&stack, &acked);
    assert_rejoined_and_identical(&stack);
    check_acked(&stack, &acked);
}

#[test]
fn a_frontend_stopped_cleanly_hands_over_at_once_with_nothing_to_reconcile() {
    let mut stack = short_lease_stack(64 * MIB);
    let acked = write_slots(&stack, (0..64u64).map(|s| s * 7));
    assert!(
        stack.stop_frontend(Duration::from_secs(20)),
        "no clean stop"
    );
    let started = Instant::now();
    stack.start_frontend_with(&SHORT_LEASE);
    let took = started.elapsed();
    eprintln!("clean hand-over: new frontend ready in {took:?}");
    // The lease was released: no wait for its expiry (3 s + 1 s).
    assert!(took < Duration::from_secs(3), "hand-over took {took:?}");
    let log = frontend_logs(&stack);
    assert!(
        log.contains("activity logs cleared")
            && log.contains("no activity-log extents to reconcile"),
        "{log}"
    );
    let show = stack.arbiter_show();
    assert!(
        show.contains("in_sync: a,b\n") && show.contains("epoch: 2\n"),
        "{show}"
    );
    check_acked(&stack, &acked);
}

#[test]
fn a_lost_site_frontend_and_replica_is_replaced_from_the_other_site() {
    let mut stack = short_lease_stack(64 * MIB);
    let acked = write_slots(&stack, (0..32u64).map(|s| s * 5));
    // Site A goes dark: its frontend and its replica at once.
    stack.kill_frontend();
    stack.kill_replica(0);
    let started = Instant::now();
    let status_file = stack.dir().join("frontend-status.json");
    let status_arg = status_file.display().to_string();
    let mut args = SHORT_LEASE.to_vec();
    args.extend(["--status-file", &status_arg]);
    stack.start_frontend_with(&args);
    eprintln!(
        "frontend on the surviving site ready {:?} after the loss",
        started.elapsed()
    );
    let show = stack.arbiter_show();
    assert!(
        show.contains("in_sync: b\n") && show.contains("out_of_sync: a\n"),
        "{show}"
    );
    check_acked(&stack, &acked);
    let report = frontend_report(&status_file);
    assert_eq!(report["epoch"], 2, "{report}");
    assert_eq!(report["lease"], "held", "{report}");
    assert_eq!(report["replicas"][0]["id"], "a", "{report}");
    assert_eq!(report["replicas"][0]["state"], "out_of_sync", "{report}");
    assert_eq!(report["replicas"][1]["state"], "in_sync", "{report}");
    // Writes on the surviving site.
    let acked2 = write_slots(&stack, (32..64u64).map(|s| s * 5));
    // Site A returns.
    stack.start_replica(0);
    assert_rejoined_and_identical(&stack);
    let back = wait_until(DEADLINE, || {
        let r = frontend_report(&status_file);
        (r["replicas"][0]["state"] == "in_sync").then_some(r)
    });
    assert!(back.is_some(), "{}", frontend_report(&status_file));
    check_acked(&stack, &acked);
    check_acked(&stack, &acked2);
}

/// Site A's disk replaced: replica a (stopped) gets an empty new copy of
/// the 32 MiB volume under the same name, and starts again.
fn recreate_replica_a(stack: &mut Stack) {
    let pool_a = stack.dir().join("pool-a");
    std::fs::remove_dir_all(pool_a.join("v1")).expect("remove a's volume");
    common::create_volume(&pool_a, "v1", "32M");
    stack.start_replica(0);
}

#[test]
fn a_replica_recreated_under_its_name_is_never_read_as_in_sync_and_gets_a_full_copy() {
    let mut stack = Stack::start(StackOptions {
        size: 32 * MIB,
        arbiter: true,
        ..StackOptions::default()
    });
    let acked = write_slots(&stack, (0..32u64).map(|s| s * 9));
    // Site A's disk is replaced: same replica name, an empty new copy of
    // the volume, back before the frontend noticed anything.
    stack.kill_replica(0);
    recreate_replica_a(&mut stack);
    // Either the frontend took a out when its connection broke (it may
    // have lost what it had not flushed), or it refuses the other copy
    // while a counts as in sync: never is the new copy used as in sync.
    let refused = wait_until(DEADLINE, || {
        let log = std::fs::read_to_string(stack.frontend_log_path().expect("log")).ok()?;
        (log.contains("answers with another copy of the volume")
            || stack.arbiter_show().contains("out_of_sync: a\n"))
        .then_some(())
    });
    assert!(refused.is_some(), "{}", stack.log_tails(30));
    // Reads come from the copy that holds the data (the frontend reads
    // from a, its local replica, when it can): never the empty one.
    check_acked(&stack, &acked);
    // A write takes the recreated replica out through the arbiter; it
    // comes back through a full copy and rejoins.
    let out = qemu_io::command(&stack.nbd_uri(), &["write -P 0x77 65536 65536", "flush"])
        .output()
        .expect("qemu-io");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    assert_rejoined_and_identical(&stack);
    let status =
        std::fs::read_to_string(stack.dir().join("pool-b/v1/resync-status.json")).expect("status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    let copied = v["copied_bytes"].as_u64().expect("copied");
    let log_b = std::fs::read_to_string(&stack.replica_log_paths()[1]).expect("b's log");
    assert!(log_b.contains("was recreated"), "no full copy logged");
    assert!(copied >= 32 * MIB, "a full copy of 32 MiB, copied {copied}");
    check_acked(&stack, &acked);
}

#[test]
fn a_replica_restarted_with_a_full_activity_log_catches_up_and_rejoins() {
    // 2 GiB: 512 extents of 4 MiB, twice what the activity log holds.
    let mut stack = Stack::start(StackOptions {
        size: 2048 * MIB,
        arbiter: true,
        ..StackOptions::default()
    });
    // One write in each of the first 256 extents: the log is full.
    let extent = 4 * MIB / SLOT;
    write_slots(&stack, (0..256u64).map(|e| e * extent));
    // Replica a restarts: it recovers a full log of extents, pinned until
    // they are reconciled, so it takes no write to any other extent.
    stack.kill_replica(0);
    stack.start_replica(0);
    // Writes to the other extents: a times out on them, leaves the in-sync
    // set, and comes back only once its log is cleared.
    let acked = write_slots(&stack, (256..288u64).map(|e| e * extent));
    assert_rejoined_and_identical(&stack);
    check_acked(&stack, &acked);
}

/// The same disk replacement, but the frontend takes the replica out while
/// it is down (its connection broke) and it comes back recreated only
/// then, with nothing written meanwhile: the frontend's connection,
/// unpinned once the replica is out, accepts the new copy, and b's bitmap
/// is empty. The frontend sees the other incarnation and marks the whole
/// volume for the resync; before, nothing was copied (b's resync, which
/// notices a recreated peer, runs only on dirty bits), the replica caught
/// up and rejoined empty, and the two copies, both in sync at the arbiter,
/// differed (CI, 2026-12-02, in the test above).
#[test]
fn a_replica_recreated_while_out_of_sync_gets_a_full_copy() {
    let mut stack = Stack::start(StackOptions {
        size: 32 * MIB,
        arbiter: true,
        ..StackOptions::default()
    });
    let acked = write_slots(&stack, (0..32u64).map(|s| s * 9 + 3));
    stack.kill_replica(0);
    // Its broken connection takes it out (it may have lost what it had not
    // flushed); no write is made while it is away: b's bitmap stays empty.
    let out = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("out_of_sync: a\n")
            .then_some(())
    });
    assert!(out.is_some(), "{}", stack.log_tails(30));
    recreate_replica_a(&mut stack);
    assert_rejoined_and_identical(&stack);
    check_acked(&stack, &acked);
    let log = stack.frontend_log();
    assert!(
        log.contains("the returning replica is another copy of the volume (recreated)"),
        "{log}"
    );
}
