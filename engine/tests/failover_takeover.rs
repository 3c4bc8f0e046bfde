//! Frontend hand-over through the lease: the old frontend stops (SIGSTOP,
//! as a hung or partitioned node would), a new one acquires the lease only
//! after it expired plus the margin, with a bumped epoch; every write the
//! old one acknowledged is readable through the new one; the old one,
//! resumed (SIGCONT), is refused by both replicas (stale epoch) and
//! acknowledges nothing. Needs qemu-io.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    KillOnDrop, MIB, Stack, StackOptions, qemu_io, set_flag, start_proc, wait_for_log, wait_until,
};

const LEASE: &[&str] = &["--lease-duration", "3s", "--lease-margin", "1s"];

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut child = qemu_io::command(uri, cmds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    let done = wait_until(Duration::from_secs(30), || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("qemu-io output");
    common::output_text(&out)
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn a_new_frontend_takes_over_after_the_lease_and_the_old_one_is_refused() {
    let mut stack = Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(LEASE);
    let old_uri = stack.nbd_uri();
    // Acknowledged writes: (offset, len, pattern), logged by the client.
    let writes: Vec<(u64, u64, u8)> = (0..8u64)
        .map(|i| (i * 256 * 1024, 64 * 1024, 0x40 + i as u8))
        .collect();
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&old_uri, &cmds);
    let acked = out.lines().filter(|l| l.starts_with("wrote")).count();
    assert_eq!(acked, writes.len(), "{out}");
    let old_pid = stack.frontend_pid().expect("old frontend");
    signal(old_pid, "-STOP");
    let stopped = Instant::now();

    // The new frontend waits for the lease to run out plus the margin.
    let mut args = stack.frontend_args(0);
    set_flag(&mut args, "--frontend-id", "fe-new");
    let new_sock = stack.dir().join("new.sock");
    args.extend(LEASE.iter().map(|s| (*s).to_owned()));
    args.extend(["--nbd-unix".into(), new_sock.display().to_string()]);
    let _new = KillOnDrop(start_proc("frontend-new", args, stack.dir()));
    let waited = stopped.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "took over a live lease after {waited:?}"
    );
    let show = stack.arbiter_show();
    assert!(
        show.contains("epoch: 2\n") && show.contains("lease: fe-new"),
        "{show}"
    );

    // Every write the old frontend acknowledged is readable.
    let new_uri = format!("nbd+unix:///?socket={}", new_sock.display());
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&new_uri, &cmds);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("read")).count(),
        writes.len(),
        "{out}"
    );
    assert!(!out.contains("verification failed"), "{out}");

    // The old frontend resumes: nothing it does is acknowledged, and both
    // replicas refuse it.
    signal(old_pid, "-CONT");
    let out = qemu_io(&old_uri, &["write -P 0x99 0 4096".to_owned()]);
    assert!(!out.contains("wrote"), "the old frontend acked: {out}");
    for log in stack.replica_log_paths() {
        assert!(
            wait_for_log(&log, "stale epoch", Duration::from_secs(10)),
            "{} did not refuse the old epoch:\n{}",
            log.display(),
            stack.log_tails(20)
        );
    }
    let out = qemu_io(&new_uri, &["read -P 0x40 0 65536".to_owned()]);
    assert!(out.contains("read") && !out.contains("failed"), "{out}");
}
