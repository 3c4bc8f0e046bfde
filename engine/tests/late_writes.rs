//! A write that reaches the resync's target before its source.
//!
//! While a returning replica catches up, the frontend sends every write to
//! both replicas; the in-sync one (the source) copies the dirty regions to
//! the returning one (the target) beside them. The frontend's path to the
//! source can lose packets while its path to the target does not: the
//! write lands on the target at once and on the source only when TCP
//! retransmits it, a second or more later. If the source read the region
//! for its copy before the write came in, and finished that copy before
//! the write came in, the copy's older bytes land on the target over the
//! write and the region's bit is cleared: the two replicas then count as in
//! sync while they differ.
//!
//! Injected exactly that: with the source ("b") the only replica in sync
//! and the target ("a") catching up under a rate-limited resync, random
//! writes run while every packet from the frontend's host into b's network
//! namespace is dropped for a second, again and again (b's packets to and
//! from a pass). At the end, in sync and quiet, the two replica files must
//! be byte-identical, and fio's verification must pass.
//!
//! What holds it: the frontend sends a write to a catching-up replica only
//! after the in-sync one has it (engine/src/frontend/mirror.rs, `both`).
//! With that order taken out (both sent at once), this test failed twice
//! in two runs: "both in sync, but the replicas differ in 16316 bytes".
//!
//! Needs root (network namespaces, nftables), fio (nbd engine), qemu-io.

mod common;

use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, fio, qemu_io, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

fn in_sync(stack: &Stack) -> bool {
    stack.arbiter_show().contains("in_sync: a,b\n")
}

#[test]
fn writes_retransmitted_late_to_the_resync_source_are_not_lost_on_its_target() {
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        netns: true,
        frontend: false,
        // 48 MiB dirty at 2 MiB/s: the resync runs for about 24 s.
        replica_args: vec!["--resync-rate".into(), "2M".into()],
        ..StackOptions::default()
    });
    // b silent for up to 3 s (a dropped request's retransmissions) is
    // waited for, not dropped: it is the only replica in sync.
    stack.start_frontend_with(&["--replica-timeout", "8s"]);
    stack.kill_replica(0);
    // Written with a away: 48 MiB dirty for a on b.
    let out = qemu_io::command(&stack.nbd_uri(), &["write -P 0x11 0 48M", "flush"])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.log_tails(30)
    );
    assert!(
        stack.arbiter_show().contains("out_of_sync: a\n"),
        "a never left:\n{}",
        stack.arbiter_show()
    );
    stack.start_replica(0);
    assert!(
        wait_until(DEADLINE, || stack
            .frontend_log()
            .contains("catching up")
            .then_some(()))
        .is_some(),
        "a never caught up:\n{}",
        stack.log_tails(40)
    );
    // Random 4 KiB writes over the dirty 48 MiB, 32 at once, each read back.
    let mut fio = fio::Background::spawn(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "twinvol-late",
        7,
        &["--iodepth=32", "--bs=4k", "--size=48m", "--io_size=40m"],
    ));
    let started = Instant::now();
    let mut drops = 0;
    while !in_sync(&stack) && !fio.is_done() && started.elapsed() < Duration::from_secs(120) {
        stack.drop_host_packets_into(1, true);
        std::thread::sleep(Duration::from_millis(1000));
        stack.drop_host_packets_into(1, false);
        drops += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    eprintln!(
        "{drops} drops of the frontend's packets to b in {:?}, a in sync: {}",
        started.elapsed(),
        in_sync(&stack)
    );
    assert!(drops >= 3, "the resync ended before the faults: not a test");
    if let Err(e) = fio.finish_clean(Duration::from_secs(300)) {
        panic!("{e}\n{}", stack.log_tails(30));
    }
    assert!(
        wait_until(Duration::from_secs(180), || in_sync(&stack).then_some(())).is_some(),
        "a did not rejoin:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(40)
    );
    let out = qemu_io::command(&stack.nbd_uri(), &["flush"])
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "flush failed");
    let paths = stack.replica_data_paths();
    let cmp = std::process::Command::new("cmp")
        .arg("-l")
        .args(&paths)
        .output()
        .expect("cmp");
    let differing = String::from_utf8_lossy(&cmp.stdout).lines().count();
    let first = String::from_utf8_lossy(&cmp.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    assert!(
        cmp.status.success(),
        "both in sync, but the replicas differ in {differing} bytes (first, 1-based offset and octal bytes: {first})\n{}",
        stack.log_tails(40)
    );
}
