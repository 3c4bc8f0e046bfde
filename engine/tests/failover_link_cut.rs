//! Site A's link cut during writes (both replicas in their own network
//! namespaces, the host side of A's veth set down): the frontend times A
//! out, swaps it out of the in-sync set and resumes on B within 2 s; fio's
//! verification passes. While the link is down, new writes reach B only;
//! with the link restored, B's resync copies what A missed (no more than
//! the region fio wrote), A catches up and rejoins the in-sync set through
//! the arbiter, and the two copies end byte-identical. Needs root
//! (namespaces), fio and qemu-io.

mod common;

use std::time::{Duration, Instant};

use common::{
    MIB, Stack, StackOptions, digest, failover_pause_ms, fio, holds_nonzero_byte, qemu_io,
    wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn cutting_site_a_link_resumes_writes_on_b_and_a_rejoins_when_back() {
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

    // While A is cut off, a write reaches B only.
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

    // The link returns: B's resync copies what A missed, A catches up and
    // rejoins through the arbiter, and the copies end identical.
    stack.set_site_link(0, true);
    let back = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("in_sync: a,b\n")
            .then_some(())
    });
    assert!(back.is_some(), "A did not rejoin:\n{}", stack.log_tails(40));
    let out = qemu_io::command(&stack.nbd_uri(), &["flush"])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    assert_eq!(digest(&data[0]), digest(&data[1]), "replicas differ");
    // Only what changed was copied: fio wrote within its first 32 MiB, the
    // extra write is in it too.
    let status = std::fs::read_to_string(stack.dir().join("pool-b/v1/resync-status.json"))
        .expect("B's resync status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    let copied = v["copied_bytes"].as_u64().expect("copied_bytes");
    eprintln!("resync after the link came back: {copied} bytes copied of a 64 MiB volume");
    let pool_b = stack.dir().join("pool-b").display().to_string();
    let printed = common::run_ok(
        common::command(
            common::engine_bin(),
            ["volume", "status", "--pool", &pool_b, "--volume", "v1"],
        ),
        DEADLINE,
    );
    // Done, and idle since A is back in sync (B stopped tracking it).
    assert!(
        printed.contains("remaining_bytes: 0\n")
            && printed.contains(&format!("copied_bytes: {copied}\n"))
            && !printed.contains("completed: 0\n"),
        "{printed}"
    );
    assert!(copied > 0 && copied <= 32 * MIB, "copied {copied} bytes");
}

/// After a fail-over the arbiter lists the lost site's replica out of
/// sync; a frontend started then on the surviving site (the operator's
/// case: the old one is fenced, the pod moves) must not wait for the lost
/// site, which drops every packet: it connects to the in-sync replica,
/// serves, and keeps trying the other in the background. Before, its
/// first I/O waited the whole connect timeout (5 s) on the silent site.
#[test]
fn a_frontend_started_after_a_fail_over_does_not_wait_for_the_silent_site() {
    const LEASE: [&str; 4] = ["--lease-duration", "2s", "--lease-margin", "500ms"];
    let mut stack = Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        netns: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(&LEASE);
    let write = |cmds: &[&str]| {
        let out = qemu_io::command(&stack.nbd_uri(), cmds)
            .output()
            .expect("qemu-io");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains("wrote"),
            "{stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stack.log_tails(30)
        );
    };
    write(&["write -P 0x61 0 1M", "flush"]);
    // Site b goes dark; the next write times it out and takes it out.
    stack.silence_site(1);
    write(&["write -P 0x62 1M 1M", "flush"]);
    let show = stack.arbiter_show();
    assert!(show.contains("out_of_sync: b\n"), "{show}");

    // The frontend dies with its site's pod; a new one starts.
    stack.kill_frontend();
    let started = Instant::now();
    stack.start_frontend_with(&LEASE);
    let took = started.elapsed();
    let log = stack.frontend_log();
    assert!(
        log.contains("not waiting for it, connecting in the background"),
        "{log}"
    );
    let out = qemu_io::command(
        &stack.nbd_uri(),
        &["read -P 0x61 0 1M", "read -P 0x62 1M 1M"],
    )
    .output()
    .expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("read 1048576/1048576").count(),
        2,
        "{stdout}"
    );
    eprintln!("a new frontend served {took:?} after its start (the old lease: 2 s + 0.5 s)");
    // The lease wait is at most 2.5 s; the connect timeout alone was 5 s.
    assert!(
        took < Duration::from_millis(4500),
        "the new frontend took {took:?} to serve: it waited for the silent site\n{log}"
    );
}
