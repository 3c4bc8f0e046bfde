//! A replica that is slow but alive is waited for; a silent one is not.
//!
//! The real failure: on a loaded machine (or a shared disk under someone
//! else's writes) one fdatasync can take seconds. Dropping the replica for
//! that — out of the in-sync set, a resync after — is a false alarm, and
//! on the two-site bed it turned a quiet run into a degraded volume. A
//! replica whose site lost power, on the other hand, answers nothing, and
//! must still leave the in-sync set within a couple of replica timeouts so
//! that writes go on.
//!
//! Slowness is injected where it happens, in the replica's storage (the
//! `slowMS` storage fault: every data sync of replica b waits 2.5 s); a
//! silent replica is a stopped process (SIGSTOP: its sockets stay open and
//! answer nothing, as behind a dead link). Needs qemu-io.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, qemu_io, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

fn write_and_flush(stack: &Stack, pattern: u8, offset: u64) -> (bool, Duration, String) {
    let started = Instant::now();
    let child = qemu_io::spawn(
        &stack.nbd_uri(),
        &[
            format!("write -P {pattern:#x} {offset} 4096"),
            "flush".to_owned(),
        ],
    );
    let out = child.wait_with_output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && text.contains("wrote") && !text.contains("error");
    (ok, started.elapsed(), text)
}

fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[test]
fn a_replica_whose_syncs_take_seconds_stays_in_sync_and_a_stopped_one_is_dropped() {
    let mut stack = Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    // Replica b again, with every data sync 2.5 s slow (its address kept).
    stack.kill_replica(1);
    stack.start_replica_with(
        1,
        &[
            "--storage-faults".to_owned(),
            "data::sync=slow2500".to_owned(),
        ],
    );
    stack.start_frontend_with(&["--replica-timeout", "1s"]);
    assert!(stack.arbiter_show().contains("in_sync: a,b"));

    // Slow, not lost: each flush waits for b's 2.5 s sync.
    for (i, pattern) in [0x11u8, 0x22].into_iter().enumerate() {
        let (ok, took, out) = write_and_flush(&stack, pattern, i as u64 * 4096);
        assert!(ok, "write + flush failed: {out}\n{}", stack.log_tails(30));
        eprintln!("write + flush with b's syncs 2.5 s slow: {took:?}");
        assert!(
            took >= Duration::from_millis(2400),
            "the flush did not wait for b's slow sync ({took:?})"
        );
    }
    let show = stack.arbiter_show();
    assert!(
        show.contains("in_sync: a,b"),
        "a slow replica left the in-sync set:\n{show}\n{}",
        stack.log_tails(30)
    );
    let log = stack.frontend_log();
    assert!(
        log.contains("a request is slow but the replica answers"),
        "no slow-replica line in the frontend log:\n{log}"
    );

    // Silent: replica b stops answering anything. Writes go on without it
    // 1-1.25 s after its last answer, plus the swap at the arbiter.
    let pid = stack.replicas[1].proc.as_ref().expect("replica b").pid();
    signal(pid, "-STOP");
    let (ok, took, out) = write_and_flush(&stack, 0x33, 2 * 4096);
    signal(pid, "-CONT");
    assert!(ok, "write + flush failed: {out}\n{}", stack.log_tails(30));
    eprintln!("write + flush with b stopped: {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "a silent replica held writes {took:?}"
    );
    let dropped = wait_until(DEADLINE, || {
        let show = stack.arbiter_show();
        show.contains("out_of_sync: b").then_some(show)
    });
    assert!(
        dropped.is_some(),
        "the stopped replica is still in sync:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(30)
    );
}
