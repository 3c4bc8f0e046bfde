//! Site A's link cut during writes (both replicas in their own network
//! namespaces, the host side of A's veth set down): the frontend times A
//! out, swaps it out of the in-sync set and resumes on B within 2 s; fio's
//! verification passes. With the link restored, A stays out of sync: new
//! writes reach B only (returning A is the resync's job). Needs root
//! (namespaces), fio and qemu-io.

mod common;

use std::time::Duration;

use common::{
    MIB, Stack, StackOptions, failover_pause_ms, fio, holds_nonzero_byte, qemu_io, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn cutting_site_a_link_resumes_writes_on_b_and_a_stays_out_of_sync_when_back() {
    let stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        netns: true,
        ..StackOptions::default()
    });
    let fio = fio::Background::spawn(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "twinvol-linkcut",
        99,
        &["--iodepth=16", "--bs=64k", "--size=32m", "--rate=8m"],
    ));
    let data = stack.replica_data_paths();
    let started = wait_until(DEADLINE, || holds_nonzero_byte(&data[1]).then_some(()));
    assert!(started.is_some(), "fio wrote nothing");
    stack.set_site_link(0, false);
    if let Err(e) = fio.finish_clean(DEADLINE) {
        panic!("{e}\n{}", stack.log_tails(30));
    }
    let log = stack.frontend_log();
    let pause = failover_pause_ms(&log).unwrap_or_else(|| panic!("no fail-over logged:\n{log}"));
    eprintln!("I/O pause at site A link cut: {pause} ms");
    assert!(pause < 2000, "writes paused {pause} ms");
    assert!(stack.arbiter_show().contains("out_of_sync: a\n"));

    // The link returns; A stays out of sync: a new write reaches B only.
    stack.set_site_link(0, true);
    let out = qemu_io::command(&stack.nbd_uri(), &["write -P 0x5a 0 65536", "flush"])
        .output()
        .expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote"), "{stdout}");
    let b = std::fs::read(&data[1]).expect("read b");
    assert!(b[..65536].iter().all(|&x| x == 0x5a), "B lacks the write");
    let a = std::fs::read(&data[0]).expect("read a");
    assert!(
        !a[..65536].iter().all(|&x| x == 0x5a),
        "an out-of-sync replica got a write"
    );
    assert!(stack.arbiter_show().contains("out_of_sync: a\n"));
}
