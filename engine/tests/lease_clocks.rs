//! The lease against wrong clocks and restarted holders (design invariant
//! 4), with real frontend processes and the file arbiter:
//!
//! - a frontend whose wall clock runs a minute ahead (the hidden
//!   `--wall-clock-offset` flag) never takes a lease its holder keeps
//!   renewing — expiry is judged on the observer's own monotonic clock, by
//!   how long the record went without a change, not by comparing its clock
//!   with the holder's `renewed_at` — and takes it once the holder died and
//!   the lease went unrenewed for its duration plus the margin;
//! - a frontend restarted with the same id while its predecessor hangs
//!   (SIGSTOP) waits for the predecessor's lease like any other frontend,
//!   and the predecessor, resumed, is fenced: a lease is one acquisition
//!   (holder and epoch), not a name.
//!
//! Needs qemu-io.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, MIB, Proc, Stack, StackOptions, engine_bin, set_flag, wait_until};

const LEASE: &[&str] = &["--lease-duration", "2s", "--lease-margin", "1s"];
const LEASE_DURATION: Duration = Duration::from_secs(2);

fn stack() -> Stack {
    Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    })
}

/// Starts a frontend of `stack` named `id` exporting on `name.sock`, with
/// `extra` flags, without waiting for it to serve (it may wait for the
/// lease).
fn spawn_frontend(stack: &Stack, name: &str, id: &str, extra: &[&str]) -> (KillOnDrop, PathBuf) {
    let mut args = stack.frontend_args(0);
    set_flag(&mut args, "--frontend-id", id);
    args.extend(LEASE.iter().chain(extra).map(|s| (*s).to_owned()));
    let sock = stack.dir().join(format!("{name}.sock"));
    let ready = stack.dir().join(format!("{name}.ready"));
    let log = stack.dir().join(format!("{name}.log"));
    args.extend(["--nbd-unix".into(), sock.display().to_string()]);
    args.extend(["--ready-file".into(), ready.display().to_string()]);
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(engine_bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        // Its own group, as the harness's processes: `Proc::kill` kills
        // the group.
        .process_group(0)
        .spawn()
        .expect("start frontend");
    let proc = Proc {
        name: name.to_owned(),
        child,
        log,
        ready: vec![],
    };
    (KillOnDrop(proc), ready)
}

fn qemu(sock: &Path, cmds: &[&str]) -> String {
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = common::run_with_deadline(
        common::qemu_io::command(&uri, cmds),
        Duration::from_secs(30),
    );
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
fn a_frontend_whose_clock_runs_ahead_never_takes_a_live_lease() {
    let mut stack = stack();
    stack.start_frontend_with(LEASE);
    let (_ahead, ahead_ready) =
        spawn_frontend(&stack, "ahead", "fe-ahead", &["--wall-clock-offset", "60s"]);
    // Three lease periods (duration plus margin) while the holder renews.
    let watch_until = Instant::now() + 3 * (LEASE_DURATION + Duration::from_secs(1));
    while Instant::now() < watch_until {
        let show = stack.arbiter_show();
        assert!(
            show.contains("epoch: 1\n") && show.contains("lease: fe-1 "),
            "a frontend whose clock is a minute ahead took a live lease:\n{show}"
        );
        assert!(!ahead_ready.exists(), "the frontend ahead serves");
        // Sampling a window in which nothing may happen, not waiting for
        // something to happen.
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = qemu(&stack.nbd_socket(), &["write -P 0x21 0 64k"]);
    assert!(out.contains("wrote"), "the holder stopped serving: {out}");

    // The holder dies without releasing: the lease now goes unrenewed and
    // is taken once that lasted its duration plus the margin.
    stack.kill_frontend();
    let killed = Instant::now();
    let took = wait_until(Duration::from_secs(30), || {
        ahead_ready.exists().then(|| killed.elapsed())
    })
    .expect("the frontend ahead never took the expired lease");
    assert!(
        took >= LEASE_DURATION,
        "took the lease {took:?} after its holder died (lease {LEASE_DURATION:?})"
    );
    let show = stack.arbiter_show();
    assert!(
        show.contains("epoch: 2\n") && show.contains("lease: fe-ahead "),
        "{show}"
    );
    let sock = stack.dir().join("ahead.sock");
    let out = qemu(&sock, &["read -P 0x21 0 64k"]);
    assert!(out.contains("read ") && !out.contains("failed"), "{out}");
}

#[test]
fn a_frontend_restarted_with_the_same_id_waits_and_its_predecessor_is_fenced() {
    let mut stack = stack();
    let status = stack.dir().join("first.status");
    let status_arg = status.display().to_string();
    stack.start_frontend_with(&[LEASE, &["--status-file", &status_arg]].concat());
    let out = qemu(&stack.nbd_socket(), &["write -P 0x31 0 64k"]);
    assert!(out.contains("wrote"), "{out}");
    let first = stack.frontend_pid().expect("first frontend");
    signal(first, "-STOP");
    let stopped = Instant::now();

    // The same id again (a restarted node plugin, say), while the first
    // one hangs with its lease.
    let (_second, ready) = spawn_frontend(&stack, "second", "fe-1", &[]);
    let waited = wait_until(Duration::from_secs(30), || {
        ready.exists().then(|| stopped.elapsed())
    })
    .expect("the restarted frontend never served");
    assert!(
        waited >= LEASE_DURATION,
        "the restarted frontend took its predecessor's live lease after {waited:?}"
    );
    let show = stack.arbiter_show();
    assert!(
        show.contains("epoch: 2\n") && show.contains("lease: fe-1 "),
        "{show}"
    );

    // The predecessor wakes up: its lease is gone, not renewable by name.
    signal(first, "-CONT");
    let fenced = wait_until(Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&status).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["lease"] == "fenced").then_some(())
    });
    assert!(
        fenced.is_some(),
        "the predecessor is not fenced: {}",
        std::fs::read_to_string(&status).unwrap_or_default()
    );
    let out = qemu(&stack.nbd_socket(), &["write -P 0x99 0 4096"]);
    assert!(
        !out.contains("wrote"),
        "the predecessor acknowledged: {out}"
    );
    let sock = stack.dir().join("second.sock");
    let out = qemu(&sock, &["read -P 0x31 0 64k"]);
    assert!(out.contains("read ") && !out.contains("failed"), "{out}");
}
