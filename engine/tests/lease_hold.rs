//! A lease renewal answered late holds I/O; it does not fail it (design
//! invariants 2 and 4). The frontend runs with a 2 s lease and
//! `--arbiter-stall renew-lease#3=8s,renew-lease#4=8s`: its third and
//! fourth renewals land at the file arbiter but are answered only after
//! the frontend's deadline (3 s), so its lease runs out on its own clock
//! for about five seconds, then the fifth renewal succeeds — nobody else
//! took the lease meanwhile. Reads and writes sent while the lease is out
//! must be held (no acknowledgement, and no error either: an NBD client
//! would see EIO/ESHUTDOWN and a filesystem on it would go read-only) and
//! answered once the lease is renewed.
//!
//! Needs qemu-io.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, qemu_io, wait_for_log, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn io_sent_while_a_late_renewal_left_the_lease_expired_is_held_then_acknowledged() {
    let mut stack = Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(&[
        "--lease-duration",
        "2s",
        "--lease-margin",
        "1s",
        "--arbiter-stall",
        "renew-lease#3=8s,renew-lease#4=8s",
    ]);
    let log = stack.frontend_log_path().expect("frontend log");
    let out = common::run_ok(
        qemu_io::command(&stack.nbd_uri(), &["write -P 0x21 0 64k", "flush"]),
        DEADLINE,
    );
    assert!(out.contains("wrote"), "{out}");
    assert!(
        wait_for_log(&log, "lease expired", DEADLINE),
        "the stalled renewals never let the lease run out:\n{}",
        stack.log_tails(30)
    );
    let sent = Instant::now();
    let mut client = qemu_io::spawn(
        &stack.nbd_uri(),
        &[
            "read -P 0x21 0 64k",
            "write -P 0x42 64k 64k",
            "read -P 0x42 64k 64k",
            "flush",
        ],
    );
    let status = wait_until(DEADLINE, || client.try_wait().ok().flatten());
    let waited = sent.elapsed();
    let Some(status) = status else {
        let _ = client.kill();
        panic!(
            "I/O held for more than {DEADLINE:?}: the lease was never renewed:\n{}",
            stack.log_tails(30)
        );
    };
    let mut stdout = String::new();
    if let Some(mut o) = client.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    let frontend = stack.frontend_log();
    assert!(
        status.success()
            && stdout.matches("read ").count() == 2
            && stdout.contains("wrote ")
            && !stdout.contains("failed")
            && !stdout.contains("error"),
        "I/O sent while the lease was out failed instead of being held ({status}, after {waited:?}):\n{stdout}\n{}",
        stack.log_tails(30)
    );
    assert!(
        frontend.contains("lease renewed again"),
        "answered without the lease having been renewed:\n{frontend}"
    );
    let expired_at = frontend.find("lease expired").expect("expiry logged");
    let renewed_at = frontend
        .find("lease renewed again")
        .expect("renewal logged");
    assert!(expired_at < renewed_at);
    eprintln!("held for {waited:?}, then acknowledged");
    // Held, not answered at once: the renewal came seconds later.
    assert!(
        waited >= Duration::from_millis(500),
        "answered after {waited:?}: was the lease really out?"
    );
    // Both copies got the write, and the volume still works.
    let out = common::run_ok(
        qemu_io::command(&stack.nbd_uri(), &["read -P 0x42 64k 64k"]),
        DEADLINE,
    );
    assert!(out.contains("read ") && !out.contains("failed"), "{out}");
}
