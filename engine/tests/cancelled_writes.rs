//! Writes whose caller goes away half-way must not leave the two copies
//! different while both count as in sync (design invariant 6). A real
//! client (fio's nbd engine, 1 MiB random writes at depth 32) writes
//! through a frontend with an arbiter while the link to replica b is slow
//! (a token bucket on its site's veth: requests to b queue in the
//! frontend); then the client is killed (SIGKILL: the export sees the
//! connection reset with writes in flight) or the frontend is stopped
//! (SIGTERM) in the middle. Whatever was in flight may or may not have
//! landed, but once the arbiter lists both replicas in sync and nothing is
//! in flight, their data files must be byte-identical.
//!
//! Needs root (network namespaces, tc) and fio.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, wait_until};

const SIZE: u64 = 64 * MIB;
/// The link to replica b: ~5 MB/s, so that a few MiB queue behind it.
const SLOW_LINK: &str = "40mbit";
/// Long enough that the slow link is not taken for a lost replica.
const FRONTEND: &[&str] = &["--replica-timeout", "60s"];
const CONVERGE: Duration = Duration::from_secs(90);

fn start() -> Stack {
    let mut stack = Stack::start(StackOptions {
        size: SIZE,
        netns: true,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.throttle_site_link(1, SLOW_LINK);
    stack.start_frontend_with(FRONTEND);
    stack
}

/// fio writing 1 MiB blocks at random, depth 32, until killed (one
/// process: its job runs as a thread, so killing fio kills the job).
fn fio(stack: &Stack) -> Child {
    Command::new("fio")
        .current_dir(stack.dir())
        .args([
            "--thread",
            "--name=inflight",
            "--ioengine=nbd",
            &format!("--uri={}", stack.nbd_uri()),
            "--rw=randwrite",
            "--bs=1M",
            "--iodepth=32",
            &format!("--size={SIZE}"),
            "--time_based",
            "--runtime=300",
            "--randseed=5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start fio")
}

/// SIGKILL to fio's process group: the connection is reset with its
/// writes in flight.
fn kill(mut fio: Child) {
    // SAFETY: kill(2) on the process group created for this child.
    unsafe {
        libc::kill(-(fio.id() as i32), libc::SIGKILL);
    }
    let _ = fio.wait();
}

/// NBD connections the frontend has seen end (reset or closed).
fn connections_ended(stack: &Stack) -> usize {
    let log = stack.frontend_log();
    log.matches("NBD connection failed").count() + log.matches("NBD client disconnected").count()
}

/// Bytes that differ between the two replicas' data files.
fn differing_bytes(files: &[PathBuf]) -> u64 {
    let a = std::fs::read(&files[0]).expect("replica a data");
    let b = std::fs::read(&files[1]).expect("replica b data");
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).filter(|(x, y)| x != y).count() as u64
}

/// Waits until the replicas differ while fio runs: writes that reached
/// replica a are still on their way to b.
fn wait_for_writes_in_flight(stack: &Stack) {
    let files = stack.replica_data_paths();
    let seen = wait_until(Duration::from_secs(60), || {
        (differing_bytes(&files) > 4 * MIB).then_some(())
    });
    assert!(
        seen.is_some(),
        "the writes never queued behind the slow link"
    );
}

/// Waits until the arbiter lists both replicas in sync and their data
/// files are identical; panics with the figures otherwise.
fn assert_converges(stack: &Stack, what: &str) {
    let files = stack.replica_data_paths();
    let started = Instant::now();
    let mut last = (0, String::new());
    let done = wait_until(CONVERGE, || {
        let show = stack.arbiter_show();
        let diff = differing_bytes(&files);
        last = (diff, show.clone());
        (show.contains("in_sync: a,b\n") && diff == 0).then_some(())
    });
    assert!(
        done.is_some(),
        "{what}: after {:?} the replicas still differ in {} bytes; arbiter:\n{}",
        started.elapsed(),
        last.0,
        last.1
    );
    eprintln!(
        "{what}: replicas identical and in sync after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_killed_with_writes_in_flight_leaves_identical_replicas() {
    let stack = start();
    let client = fio(&stack);
    wait_for_writes_in_flight(&stack);
    let ended_before = connections_ended(&stack);
    kill(client);
    assert!(
        wait_until(Duration::from_secs(30), || {
            (connections_ended(&stack) > ended_before).then_some(())
        })
        .is_some(),
        "the frontend never saw fio's connection end"
    );
    assert_converges(&stack, "fio killed with writes in flight");
    // Still a working volume.
    let out = common::run_ok(
        common::qemu_io::command(
            &stack.nbd_uri(),
            &["write -P 0x5c 0 64k", "read -P 0x5c 0 64k"],
        ),
        Duration::from_secs(120),
    );
    assert!(out.contains("wrote") && !out.contains("failed"), "{out}");
    assert_converges(&stack, "a write after the reset");
}

#[test]
fn a_frontend_stopped_with_writes_in_flight_leaves_identical_replicas() {
    let mut stack = start();
    let client = fio(&stack);
    wait_for_writes_in_flight(&stack);
    assert!(
        stack.stop_frontend(Duration::from_secs(60)),
        "the frontend did not stop cleanly on SIGTERM"
    );
    kill(client);
    // The next frontend finds what the stopped one left.
    stack.start_frontend_with(FRONTEND);
    assert_converges(&stack, "frontend stopped with writes in flight");
    assert!(
        stack.stop_frontend(Duration::from_secs(60)),
        "the second frontend did not stop cleanly"
    );
    let diff = differing_bytes(&stack.replica_data_paths());
    assert_eq!(diff, 0, "the replicas differ after a clean stop");
}
