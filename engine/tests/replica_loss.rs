//! A replica that goes away and comes back, at this stage (before degraded
//! mode): the frontend logs the loss, holds new I/O while it reconnects, and
//! completes it once the replica is back; both replicas end identical.

mod common;

use std::time::Duration;

use common::{MIB, Stack, StackOptions, qemu_io, wait_for_log, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn io_waits_while_a_replica_restarts_then_completes_on_both() {
    let mut stack = Stack::start(StackOptions {
        size: 4 * MIB,
        ..StackOptions::default()
    });
    let log = stack.frontend_log_path().expect("frontend log");
    stack.kill_replica(1);
    assert!(
        wait_for_log(&log, "connection to replica lost", DEADLINE),
        "frontend did not notice:\n{}",
        stack.log_tails(20)
    );

    // A write issued now waits for replica b.
    let mut writer = qemu_io::spawn(&stack.nbd_uri(), &["write -P 0x7e 8192 65536", "flush"]);
    assert!(
        wait_for_log(&log, "replica unreachable; I/O waits", DEADLINE),
        "no reconnect attempt logged"
    );
    assert!(
        writer.try_wait().expect("poll").is_none(),
        "the write completed without replica b"
    );

    stack.start_replica(1);
    let status = wait_until(DEADLINE, || writer.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = writer.kill();
        let _ = writer.wait();
        panic!("write did not complete after the replica returned");
    };
    let out = writer.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(status.success() && !stdout.contains("failed"), "{stdout}");

    let paths = stack.replica_data_paths();
    let a = std::fs::read(&paths[0]).expect("read a");
    let b = std::fs::read(&paths[1]).expect("read b");
    assert!(a == b, "replicas differ");
    assert!(a[8192..8192 + 65536].iter().all(|&x| x == 0x7e));
    assert!(a[..8192].iter().all(|&x| x == 0));
}
