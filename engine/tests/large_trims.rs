//! Trims and write-zeroes larger than the replicas' activity log can hold
//! at once (256 extents of 4 MiB, 1 GiB, at the defaults): what `fstrim` and
//! `mkfs` send. qemu-io discards and zeroes 2047 MiB of a 3 GiB volume
//! through the NBD export of a frontend with an arbiter (so with the
//! replica timeouts of degraded operation); the requests must succeed, the
//! volume read back as zeroes there and keep its data elsewhere, later
//! writes succeed, no replica claims it "refuses writes", both replicas
//! stay in sync and hold the same bytes. Needs qemu-io; the volume's files
//! are preallocated (unwritten extents, then holes: little real I/O).

mod common;

use std::time::Duration;

use common::{MIB, Stack, StackOptions, qemu_io, run_with_deadline, wait_until};

const GIB: u64 = 1024 * MIB;
const DEADLINE: Duration = Duration::from_secs(120);

fn qemu(stack: &Stack, cmds: &[String]) -> String {
    let out = run_with_deadline(qemu_io::command(&stack.nbd_uri(), cmds), DEADLINE);
    common::output_text(&out)
}

fn cmp(stack: &Stack) -> Result<(), String> {
    let files = stack.replica_data_paths();
    let out = run_with_deadline(
        common::command("cmp", [&files[0], &files[1]]),
        Duration::from_secs(300),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(common::output_text(&out))
    }
}

#[test]
fn a_discard_and_a_write_zeroes_of_2047_mib_succeed_and_leave_the_replicas_equal() {
    let mut stack = Stack::start(StackOptions {
        size: 3 * GIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(&[]);
    // Data inside and beyond the ranges about to be discarded.
    let marks = [0, GIB, 2047 * MIB - MIB, 2047 * MIB, 3 * GIB - MIB];
    let writes: Vec<String> = marks
        .iter()
        .map(|o| format!("write -P 0xab {o} 1M"))
        .collect();
    let out = qemu(&stack, &writes);
    assert_eq!(out.matches("wrote").count(), marks.len(), "{out}");

    let out = qemu(&stack, &["discard 0 2047M".to_owned()]);
    assert!(
        out.contains("discard 2146435072/2146435072") && !out.contains("error"),
        "discard of 2047 MiB: {out}"
    );
    let out = qemu(
        &stack,
        &[
            format!("read -P 0 {} 1M", GIB),
            format!("read -P 0 {} 1M", 2047 * MIB - MIB),
            format!("read -P 0xab {} 1M", 2047 * MIB),
            format!("read -P 0xab {} 1M", 3 * GIB - MIB),
        ],
    );
    assert_eq!(out.matches("read ").count(), 4, "{out}");
    assert!(!out.contains("failed"), "{out}");

    // Zeroes over [1 GiB, 3 GiB - 1 MiB).
    let out = qemu(
        &stack,
        &[
            format!("write -P 0xcd {} 1M", 2 * GIB),
            "write -z 1024M 2047M".to_owned(),
        ],
    );
    assert_eq!(
        out.matches("wrote").count(),
        2,
        "write-zeroes of 2047 MiB: {out}"
    );
    assert!(!out.contains("error"), "{out}");
    let out = qemu(
        &stack,
        &[
            format!("read -P 0 {} 1M", 2 * GIB),
            format!("read -P 0 {} 1M", 2047 * MIB),
            format!("read -P 0xab {} 1M", 3 * GIB - MIB),
            "write -P 0x11 0 64k".to_owned(),
            "read -P 0x11 0 64k".to_owned(),
            "flush".to_owned(),
        ],
    );
    assert_eq!(out.matches("read ").count(), 4, "{out}");
    assert_eq!(out.matches("wrote").count(), 1, "{out}");
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");

    for log in stack.replica_log_paths() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("refuses writes"),
            "{} claims the volume refuses writes:\n{}",
            log.display(),
            common::tail(&log, 20)
        );
    }
    let show = stack.arbiter_show();
    assert!(show.contains("in_sync: a,b\n"), "{show}");
    assert!(
        stack.stop_frontend(Duration::from_secs(60)),
        "the frontend did not stop cleanly"
    );
    let equal = wait_until(Duration::from_secs(1), || cmp(&stack).ok());
    if equal.is_none() {
        panic!(
            "the replicas differ although both are in sync: {}",
            cmp(&stack).unwrap_err()
        );
    }
}
