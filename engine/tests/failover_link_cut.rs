//! Site A's link cut during writes (both replicas in their own network
//! namespaces, the host side of A's veth set down): the frontend times A
//! out, swaps it out of the in-sync set and resumes on B within 2 s; fio's
//! verification passes. With the link restored, A stays out of sync: new
//! writes reach B only (returning A is the resync's job). Needs root
//! (namespaces), fio and qemu-io.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{MIB, Stack, StackOptions, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

fn pause_ms(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("writes resumed on the survivor"))?;
    let at = line.find("pause_ms=")? + "pause_ms=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn cutting_site_a_link_resumes_writes_on_b_and_a_stays_out_of_sync_when_back() {
    let stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        netns: true,
        ..StackOptions::default()
    });
    let mut fio = Command::new("fio")
        .current_dir(stack.dir())
        .args([
            "--name=twinvol-linkcut",
            "--ioengine=nbd",
            &format!("--uri={}", stack.nbd_uri()),
            "--rw=randwrite",
            "--iodepth=16",
            "--bs=64k",
            "--size=32m",
            "--rate=8m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_dump=0",
            "--verify_state_save=0",
            "--randseed=99",
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    let data = stack.replica_data_paths();
    let started = wait_until(DEADLINE, || {
        std::fs::read(&data[1])
            .ok()
            .filter(|d| d.iter().any(|&b| b != 0))
    });
    assert!(started.is_some(), "fio wrote nothing");
    stack.set_site_link(0, false);
    let status = wait_until(DEADLINE, || fio.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = fio.kill();
        let _ = fio.wait();
        panic!("fio did not finish:\n{}", stack.log_tails(30));
    };
    let mut out = String::new();
    if let Some(mut o) = fio.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let job = out.lines().find(|l| l.starts_with("3;")).unwrap_or("");
    assert!(
        status.success() && job.split(';').nth(4) == Some("0"),
        "fio failed:\n{out}\n{}",
        stack.log_tails(30)
    );
    let log = stack
        .frontend_log_path()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let pause = pause_ms(&log).unwrap_or_else(|| panic!("no fail-over logged:\n{log}"));
    eprintln!("I/O pause at site A link cut: {pause} ms");
    assert!(pause < 2000, "writes paused {pause} ms");
    assert!(stack.arbiter_show().contains("out_of_sync: a\n"));

    // The link returns; A stays out of sync: a new write reaches B only.
    stack.set_site_link(0, true);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &stack.nbd_uri()])
        .args(["-c", "write -P 0x5a 0 65536", "-c", "flush"])
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
