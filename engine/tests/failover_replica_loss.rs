//! Degraded operation with the file-backed arbiter, with real processes:
//! a replica killed mid-workload is swapped out of the in-sync set and
//! writes resume on the survivor within 2 s; a frontend cut from both its
//! peer and the arbiter acknowledges nothing once its lease expired.
//!
//! The arbiter record lives in its own directory; the tests "cut" the
//! arbiter by renaming that directory away, so every read and every
//! compare-and-swap fails as an unreachable API server's would (the frontend
//! cannot tell a vanished file from an unreachable endpoint, and neither
//! answer lets it guess). Needs fio (nbd engine) and qemu-io.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{
    MIB, Stack, StackOptions, failover_pause_ms, fio, holds_nonzero_byte, metrics, qemu_io,
    wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn killing_a_replica_mid_fio_resumes_writes_on_the_survivor_within_two_seconds() {
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        metrics: true,
        ..StackOptions::default()
    });
    assert!(stack.arbiter_show().contains("in_sync: a,b"));
    let fio = fio::Background::spawn(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "twinvol-failover",
        77,
        &[
            "--iodepth=16",
            "--bs=64k",
            "--size=32m",
            // About four seconds of writes: the kill lands in the middle.
            "--rate=8m",
        ],
    ));
    let data_b = stack.replica_data_paths()[1].clone();
    assert!(
        wait_until(DEADLINE, || holds_nonzero_byte(&data_b).then_some(())).is_some(),
        "fio wrote nothing"
    );
    stack.kill_replica(0);
    let killed = Instant::now();
    if let Err(e) = fio.finish_clean(DEADLINE) {
        panic!("{e}\n{}", stack.log_tails(30));
    }
    let log = stack.frontend_log();
    let pause = failover_pause_ms(&log).unwrap_or_else(|| panic!("no fail-over logged:\n{log}"));
    eprintln!(
        "I/O pause at replica loss: {pause} ms (fio done {:?} after the kill)",
        killed.elapsed()
    );
    assert!(pause < 2000, "writes paused {pause} ms");
    let show = stack.arbiter_show();
    assert!(
        show.contains("in_sync: b\n") && show.contains("out_of_sync: a\n"),
        "{show}"
    );
    let metrics = metrics::scrape(&stack.frontend_metrics_addr().expect("metrics"));
    for line in [
        "twinvol_frontend_failovers_total{volume=\"v1\"} 1",
        "twinvol_frontend_failover_pause_seconds_count{volume=\"v1\"} 1",
        "twinvol_frontend_replica_state{volume=\"v1\",replica=\"a\",state=\"out_of_sync\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
    assert!(metrics.contains("twinvol_frontend_lease_remaining_seconds{volume=\"v1\"}"));
}

#[test]
fn a_frontend_cut_from_its_peer_and_the_arbiter_acknowledges_nothing_after_its_lease() {
    let mut stack = Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    // A short lease so that the test sees it expire.
    stack.start_frontend_with(&["--lease-duration", "3s", "--lease-margin", "1s"]);
    // A write that completes proves the path works.
    let first = qemu_io::spawn(&stack.nbd_uri(), &["write -P 0x11 0 4096", "flush"]);
    let out = first.wait_with_output().expect("qemu-io");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));

    // Cut the arbiter (its directory vanishes) and the peer (replica b).
    let arbiter_dir = stack.arbiter_path().parent().expect("dir").to_owned();
    let hidden = stack.dir().join("arbiter-cut");
    std::fs::rename(&arbiter_dir, &hidden).expect("cut the arbiter");
    stack.kill_replica(1);
    let cut = Instant::now();

    // Every write from now on: none may be acknowledged.
    let mut writer = qemu_io::spawn(
        &stack.nbd_uri(),
        &["write -P 0x22 8192 4096", "write -P 0x33 16384 4096"],
    );
    let expired = wait_until(DEADLINE, || {
        stack
            .frontend_log()
            .contains("lease expired: self-fenced")
            .then_some(())
    });
    assert!(expired.is_some(), "no self-fence:\n{}", stack.log_tails(30));
    assert!(cut.elapsed() >= Duration::from_secs(2), "expired too early");
    assert!(
        writer.try_wait().expect("poll").is_none(),
        "a write completed while cut off"
    );
    // The peer returns (the arbiter stays cut): the held writes now reach
    // both replicas, but the lease is gone, so none is acknowledged.
    stack.start_replica(1);
    // Give the held writes time to be (wrongly) acknowledged: the
    // replica reconnects within its backoff (at most 5 s).
    let done = wait_until(Duration::from_secs(8), || writer.try_wait().ok().flatten());
    if done.is_none() {
        // Still held: nothing acknowledged, which is what we want.
        let _ = writer.kill();
        let _ = writer.wait();
    }
    let mut stdout = String::new();
    if let Some(mut o) = writer.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    assert!(
        !stdout.contains("wrote"),
        "a write was acknowledged after the lease expired:\n{stdout}"
    );
    let log = stack.frontend_log();
    let arbiter_lines = log
        .lines()
        .filter(|l| l.contains("cannot reach the arbiter") || l.contains("cannot renew"))
        .count();
    let secs = cut.elapsed().as_secs() + 1;
    assert!(
        arbiter_lines as u64 <= 2 * secs + 2,
        "{arbiter_lines} arbiter error lines in {secs} s: an error storm"
    );
    std::fs::rename(&hidden, &arbiter_dir).expect("restore the arbiter");
}
