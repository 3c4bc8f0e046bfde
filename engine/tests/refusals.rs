//! Bad input is refused with an error that says what was wrong, and touches
//! no data: a wrong secret, another protocol version, an older epoch. Real
//! processes (two replicas, frontends) on loopback, through the harness.
//!
//! Each test checks what a user sees (the frontend's error output, the
//! replica's log) and that both replicas' data files are byte-for-byte
//! unchanged.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    MIB, Stack, StackOptions, create_volume, digest, output_text, qemu_io, run_with_deadline,
    set_flag,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn replicas_only() -> Stack {
    Stack::start(StackOptions {
        size: 4 * MIB,
        frontend: false,
        ..StackOptions::default()
    })
}

fn digests(stack: &Stack) -> Vec<String> {
    stack
        .replica_data_paths()
        .iter()
        .map(|p| digest(p))
        .collect()
}

fn replica_logs(stack: &Stack) -> String {
    stack
        .replica_log_paths()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// Writes a pattern through the stack's NBD export with qemu-io.
fn qemu_write(stack: &Stack, pattern: u8, offset: u64, len: u64) {
    let out = run_with_deadline(
        qemu_io::command(
            &stack.nbd_uri(),
            &[
                format!("write -P {pattern:#x} {offset} {len}"),
                "flush".into(),
            ],
        ),
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "qemu-io write failed: {}",
        output_text(&out)
    );
}

#[test]
fn wrong_secret_is_refused_on_both_ends_and_touches_no_data() {
    let stack = replicas_only();
    let before = digests(&stack);
    let other = stack.dir().join("other-secret");
    std::fs::write(&other, "a-different-secret-of-enough-length").expect("write secret");
    let mut args = stack.frontend_args(1);
    set_flag(&mut args, "--secret-file", other.display().to_string());
    let mut cmd = Command::new(common::engine_bin());
    cmd.args(&args)
        .arg("--nbd-unix")
        .arg(stack.dir().join("wrong-secret.sock"));
    let out = run_with_deadline(cmd, DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "frontend must fail: {stderr}");
    assert!(
        stderr.contains("authentication failed") && stderr.contains("secret"),
        "frontend error must say the secret is wrong: {stderr}"
    );
    let logs = replica_logs(&stack);
    assert!(
        logs.contains("refused connection") && logs.contains("authentication failed"),
        "replica must log the refusal: {logs}"
    );
    assert_eq!(digests(&stack), before, "replica data changed");
}

#[test]
fn other_protocol_version_is_refused_naming_both_versions_and_touches_no_data() {
    let stack = replicas_only();
    let before = digests(&stack);
    let mut cmd = stack.frontend_command(1);
    cmd.args(["--protocol-version", "99"]);
    let out = run_with_deadline(cmd, DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "frontend must fail: {stderr}");
    assert!(
        stderr.contains("protocol version mismatch")
            && stderr.contains(&format!(
                "version {},",
                twinvol_engine::protocol::PROTOCOL_VERSION
            ))
            && stderr.contains("version 99"),
        "frontend error must name both versions: {stderr}"
    );
    let logs = replica_logs(&stack);
    assert!(
        logs.contains("protocol version mismatch") && logs.contains("version 99"),
        "replica must log the refusal naming the version: {logs}"
    );
    assert_eq!(digests(&stack), before, "replica data changed");
}

#[test]
fn older_epoch_is_refused_as_stale_and_touches_no_data() {
    let mut stack = Stack::start(StackOptions {
        size: 4 * MIB,
        epoch: 5,
        ..StackOptions::default()
    });
    qemu_write(&stack, 0x5a, 0, 65536);
    assert!(
        stack.stop_frontend(DEADLINE),
        "frontend did not stop cleanly"
    );
    let before = digests(&stack);
    assert_eq!(
        before[0], before[1],
        "replicas differ after a mirrored write"
    );

    let out = run_with_deadline(stack.frontend_command(3), DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "frontend at epoch 3 must fail: {stderr}"
    );
    assert!(
        stderr.contains("stale epoch") && stderr.contains("epoch 3") && stderr.contains("epoch 5"),
        "frontend error must say its epoch is older: {stderr}"
    );
    assert_eq!(digests(&stack), before, "replica data changed");

    // The owner's epoch still works.
    stack.start_frontend(5);
    qemu_write(&stack, 0x33, 65536, 4096);
    assert!(stack.stop_frontend(DEADLINE));
    let after = digests(&stack);
    assert_ne!(after, before);
    assert_eq!(after[0], after[1]);
}

#[test]
fn a_newer_frontend_fences_the_old_one() {
    let stack = Stack::start(StackOptions {
        size: 4 * MIB,
        epoch: 1,
        ..StackOptions::default()
    });
    qemu_write(&stack, 0x11, 0, 4096);
    // A second frontend takes over at epoch 2 while the first still runs.
    let args = stack.frontend_args(2);
    let sock2 = stack.dir().join("nbd2.sock");
    let ready2 = stack.dir().join("frontend-new.ready");
    let log2 = std::fs::File::create(stack.dir().join("frontend-new.log")).expect("log");
    let mut new = Command::new(common::engine_bin())
        .args(&args)
        .arg("--nbd-unix")
        .arg(&sock2)
        .arg("--ready-file")
        .arg(&ready2)
        .stderr(log2)
        .spawn()
        .expect("start new frontend");
    let ready = common::wait_until(DEADLINE, || ready2.exists().then_some(()));
    // The old frontend's writes are now refused: the client sees an error.
    let old = run_with_deadline(
        qemu_io::command(&stack.nbd_uri(), &["write -P 0x22 0 4096"]),
        DEADLINE,
    );
    let _ = new.kill();
    let _ = new.wait();
    assert!(
        ready.is_some(),
        "new frontend not ready:\n{}",
        stack.log_tails(20)
    );
    let text = output_text(&old);
    assert!(
        text.contains("failed") || !old.status.success(),
        "the fenced frontend acknowledged a write: {text}"
    );
    let frontend_log =
        std::fs::read_to_string(stack.frontend_log_path().expect("log")).unwrap_or_default();
    assert!(
        frontend_log.contains("fenced"),
        "old frontend must log that it is fenced: {frontend_log}"
    );
    for path in stack.replica_data_paths() {
        let data = std::fs::read(&path).expect("read data");
        assert!(
            data[..4096].iter().all(|&b| b == 0x11),
            "fenced write landed"
        );
    }
}

#[test]
fn size_mismatch_between_replicas_is_refused_naming_both_sizes() {
    let stack = replicas_only();
    // A second volume whose two replicas differ in size.
    for (replica, size) in stack.replicas.iter().zip(["1M", "2M"]) {
        create_volume(&replica.pool, "v2", size);
    }
    let mut args = stack.frontend_args(1);
    set_flag(&mut args, "--volume", "v2");
    let mut cmd = Command::new(common::engine_bin());
    cmd.args(&args)
        .arg("--nbd-unix")
        .arg(stack.dir().join("v2.sock"));
    let out = run_with_deadline(cmd, DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "frontend must fail: {stderr}");
    assert!(
        stderr.contains("replica sizes differ")
            && stderr.contains("1048576")
            && stderr.contains("2097152"),
        "error must name both sizes: {stderr}"
    );
}

#[test]
fn unwritable_pool_and_bad_sizes_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123").expect("secret");
    // Root ignores permission bits; sysfs refuses new files even to root.
    let out = run_with_deadline(
        {
            let mut c = Command::new(common::engine_bin());
            c.args(["replica", "--pool", "/sys", "--listen", "127.0.0.1:0"])
                .arg("--secret-file")
                .arg(&secret);
            c
        },
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pool directory /sys is not writable"),
        "{stderr}"
    );
    let out = run_with_deadline(
        {
            let mut c = Command::new(common::engine_bin());
            c.args(["volume", "create", "--pool"])
                .arg(dir.path())
                .args(["--volume", "v1", "--size", "1000"]);
            c
        },
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("multiple of 4096"), "{stderr}");
    assert!(
        !dir.path().join("v1").exists(),
        "a refused volume left files"
    );
}
