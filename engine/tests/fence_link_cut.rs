//! Issue 9, finding 1: writes queued on a connection the frontend gave up
//! on must never land. Replica a runs behind a veth in its own network
//! namespace; fio's nbd engine writes 4 MiB blocks at iodepth 32 over a
//! 64 MiB region (so the frontend's socket to a holds megabytes of queued
//! writes when the link goes); a's link is cut for 37 s, then restored.
//!
//! Why 37 s: the frontend fails a over after about a second; the kernel
//! retransmits a stalled segment after 0.2 s, doubling each time (RTO_MIN
//! 200 ms, `tcp_retries2` = 15 gives up only after ~15 minutes), so the
//! retransmissions fall at 0.2, 0.6, 1.4, 3.0, 6.2, 12.6, 25.4 and 51.0 s
//! after the cut. A cut of 37 s is long enough for the fail-over and short
//! enough that TCP still retransmits, and it leaves 14 s between the link's
//! return and the next retransmission: b's resync reconnects and copies
//! what a missed in that time, then the old queued writes arrive. Before
//! sessions fenced them, a applied those writes (they carry the current
//! epoch: a fail-over does not bump it) over the resync's newer copy, a
//! rejoined the in-sync set, and with writes stopped the two replica files
//! differed in megabytes — a second copy that silently serves old data.
//!
//! The check: once both replicas are in sync at the arbiter, fio has
//! stopped and the volume is flushed, the two data files are identical
//! (cmp). Needs root (namespaces), fio (nbd engine) and qemu-io.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    MIB, Stack, StackOptions, fio, holds_nonzero_byte, qemu_io, run_with_deadline, wait_until,
};

const CUT: Duration = Duration::from_secs(37);
/// fio's run: the cut starts about 3 s in, ends at about 40 s; writes go
/// on while a returns and stop before the comparison.
const FIO_RUNTIME_S: u64 = 55;
const DEADLINE: Duration = Duration::from_secs(120);

/// Bytes that differ between two files of the same length (`cmp -l`).
fn differing_bytes(a: &std::path::Path, b: &std::path::Path) -> u64 {
    let out = Command::new("cmp")
        .arg("-l")
        .arg(a)
        .arg(b)
        .output()
        .expect("run cmp");
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

#[test]
fn writes_queued_on_a_connection_given_up_on_never_land_after_the_link_returns() {
    let stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        netns: true,
        ..StackOptions::default()
    });
    let mut writer = Command::new("fio");
    writer.current_dir(stack.dir()).args([
        "--name=twinvol-fence",
        "--ioengine=nbd",
        &format!("--uri={}", stack.nbd_uri()),
        "--rw=randwrite",
        "--bs=4m",
        "--iodepth=32",
        "--size=64m",
        "--time_based",
        &format!("--runtime={FIO_RUNTIME_S}"),
        "--randseed=9",
        "--output-format=terse",
    ]);
    let fio = fio::Background::spawn(writer);
    let data = stack.replica_data_paths();
    // Writes flow to both (at iodepth 32 of 4 MiB, far more is in flight
    // than a socket holds: the connection to a has a full queue).
    assert!(
        wait_until(DEADLINE, || data
            .iter()
            .all(|d| holds_nonzero_byte(d))
            .then_some(()))
        .is_some(),
        "fio wrote nothing"
    );
    stack.set_site_link(0, false);
    let cut = Instant::now();
    let out = wait_until(Duration::from_secs(30), || {
        stack
            .arbiter_show()
            .contains("out_of_sync: a\n")
            .then_some(())
    });
    assert!(
        out.is_some(),
        "a never left the in-sync set:\n{}",
        stack.log_tails(30)
    );
    eprintln!("a out of sync {:?} after the cut", cut.elapsed());
    if let Some(left) = CUT.checked_sub(cut.elapsed()) {
        std::thread::sleep(left);
    }
    stack.set_site_link(0, true);
    eprintln!("link restored after {:?}", cut.elapsed());

    let done = fio.finish(DEADLINE);
    let (status, report) = done.unwrap_or_else(|| panic!("fio did not end"));
    eprintln!("fio ended ({status}) {:?} after the cut", cut.elapsed());
    assert!(
        status.success(),
        "fio failed: {report}\n{}",
        stack.log_tails(30)
    );
    let rejoined = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("in_sync: a,b\n")
            .then_some(())
    });
    assert!(
        rejoined.is_some(),
        "a did not rejoin:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(40)
    );
    eprintln!("a back in sync {:?} after the cut", cut.elapsed());
    let out = run_with_deadline(qemu_io::command(&stack.nbd_uri(), &["flush"]), DEADLINE);
    assert!(out.status.success(), "flush failed");
    // What a refused of the connection the frontend gave up on (requests
    // that arrived after the fence; with the connection aborted at once,
    // usually none arrive at all).
    let a_log = std::fs::read_to_string(&stack.replica_log_paths()[0]).unwrap_or_default();
    let refused = a_log
        .lines()
        .filter(|l| l.contains("stale frontend session"))
        .count();
    eprintln!("requests of given-up frontend sessions refused by a: {refused}");
    // Both in sync, nothing written, flushed: the copies must be identical.
    let diff = differing_bytes(&data[0], &data[1]);
    eprintln!("replica files differ in {diff} bytes");
    assert_eq!(
        diff,
        0,
        "both replicas count as in sync but their files differ in {diff} bytes:\n{}",
        stack.log_tails(40)
    );
}
