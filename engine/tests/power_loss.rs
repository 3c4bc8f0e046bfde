//! Power loss at a site, with real processes: the replicas run with a
//! volatile write cache (`--storage-faults volatile`: writes stay in the
//! process until fdatasync), so kill -9 of a replica drops every write it
//! had not flushed — what a power cut does to a page cache and a kill of a
//! real process cannot (the kernel keeps a killed process's dirty pages).
//!
//! - a replica's site loses power with writes acknowledged by both
//!   replicas but not flushed; the frontend fails over, more writes and a
//!   flush go to the survivor alone; the replica returns, is resynced and
//!   rejoins: its data file equals the survivor's and holds every
//!   acknowledged write;
//! - the whole site loses power, its frontend too: a frontend on the other
//!   site starts with only the survivor; the same checks once the replica
//!   returns;
//! - an fdatasync that fails (EIO, the cache drops its pages as Linux
//!   does): the replica refuses everything after it, leaves the in-sync
//!   set, says why, and after a restart is resynced like a power loss.
//!
//! Needs qemu-io.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, MIB, Stack, StackOptions, qemu_io, set_flag, start_proc, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
const SLOT: u64 = 64 * 1024;
/// One slot per 4 MiB extent of the activity log.
const EXTENT_SLOTS: u64 = 4 * MIB / SLOT;
const SHORT_LEASE: [&str; 4] = ["--lease-duration", "3s", "--lease-margin", "1s"];

fn volatile_stack(frontend: bool) -> Stack {
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        frontend: false,
        replica_args: vec!["--storage-faults".into(), "volatile".into()],
        ..StackOptions::default()
    });
    if frontend {
        stack.start_frontend_with(&SHORT_LEASE);
    }
    stack
}

/// A write of one slot with its own pattern byte.
#[derive(Debug, Clone, Copy)]
struct SlotWrite {
    slot: u64,
    byte: u8,
}

/// Writes `writes` through `uri` and returns once each was acknowledged,
/// with no flush: qemu-io in cache mode `writeback` (no FUA) keeps its
/// connection open (`sleep`) until it is killed with -9 here, so it never
/// sends the flush it would send on a clean exit. `stdbuf` makes it report
/// each write as it completes.
fn write_unflushed(uri: &str, writes: &[SlotWrite]) {
    let mut c = Command::new("stdbuf");
    c.args(["-oL", "qemu-io", "-f", "raw", "-t", "writeback", uri]);
    for w in writes {
        c.args([
            "-c",
            &format!("write -P {} {} {SLOT}", w.byte, w.slot * SLOT),
        ]);
    }
    c.args(["-c", "sleep 600000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = c.spawn().expect("start qemu-io");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let end = Instant::now() + DEADLINE;
    let mut acked = 0;
    let mut seen = String::new();
    while acked < writes.len() {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                acked += usize::from(line.starts_with("wrote "));
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => break,
        }
    }
    // SAFETY: kill(2) on the process group created for this child.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
    assert_eq!(
        acked,
        writes.len(),
        "not every write was acknowledged: {seen}"
    );
}

/// Writes then flushes (the flush acknowledged too).
fn write_flushed(uri: &str, writes: &[SlotWrite]) {
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|w| format!("write -P {} {} {SLOT}", w.byte, w.slot * SLOT))
        .collect();
    cmds.push("flush".into());
    let out = qemu_io::command(uri, &cmds).output().expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let acked = stdout.lines().filter(|l| l.starts_with("wrote ")).count();
    assert!(
        out.status.success() && acked == writes.len() && !stdout.contains("failed"),
        "writes or flush failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn flush(uri: &str) {
    let out = qemu_io::command(uri, &["flush"]).output().expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "flush failed: {stdout}"
    );
}

/// The slots of `writes` whose bytes in the data file at `path` are not
/// the write's (the last write of a slot counts).
fn missing(path: &Path, writes: &[SlotWrite]) -> Vec<u64> {
    let data = std::fs::read(path).expect("read data file");
    let mut last = std::collections::BTreeMap::new();
    for w in writes {
        last.insert(w.slot, w.byte);
    }
    last.into_iter()
        .filter(|&(slot, byte)| {
            let at = (slot * SLOT) as usize;
            data[at..at + SLOT as usize].iter().any(|&b| b != byte)
        })
        .map(|(slot, _)| slot)
        .collect()
}

/// Bytes at which two files differ.
fn differing_bytes(a: &Path, b: &Path) -> usize {
    let (x, y) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    assert_eq!(x.len(), y.len());
    x.iter().zip(&y).filter(|(p, q)| p != q).count()
}

fn wait_arbiter(stack: &Stack, line: &str) {
    let ok = wait_until(DEADLINE, || {
        stack.arbiter_show().contains(line).then_some(())
    });
    assert!(
        ok.is_some(),
        "arbiter never showed {line:?}:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(40)
    );
}

/// After the returning replica rejoined and a flush: both data files
/// identical, and replica a's alone holds every acknowledged write.
fn assert_a_holds_everything(stack: &Stack, uri: &str, acked: &[SlotWrite]) {
    wait_arbiter(stack, "in_sync: a,b\n");
    flush(uri);
    let [a, b]: [std::path::PathBuf; 2] = stack.replica_data_paths().try_into().expect("two");
    let lost = missing(&a, acked);
    let differ = differing_bytes(&a, &b);
    eprintln!(
        "after the rejoin: {} of {} acknowledged slots missing on a, the data files differ in {differ} bytes",
        lost.len(),
        acked.len()
    );
    assert!(
        lost.is_empty() && differ == 0,
        "replica a rejoined without {} acknowledged writes (slots {lost:?}); the data files differ in {differ} bytes\n{}",
        lost.len(),
        stack.log_tails(30)
    );
    assert!(missing(&b, acked).is_empty(), "b lost writes");
}

#[test]
fn writes_a_replica_lost_in_a_power_cut_are_resynced_before_it_rejoins() {
    let mut stack = volatile_stack(true);
    let uri = stack.nbd_uri();
    // Acknowledged by both, not flushed: one slot in each of the first 8
    // extents.
    let before: Vec<SlotWrite> = (0..8u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 3,
            byte: 0x11 + e as u8,
        })
        .collect();
    write_unflushed(&uri, &before);
    let paths = stack.replica_data_paths();
    assert_eq!(
        missing(&paths[0], &before).len(),
        before.len(),
        "the writes reached a's disk: not a test of unflushed writes"
    );
    // Site A loses power.
    stack.kill_replica(0);
    // Writes and a flush on b alone (after the fail-over), one of them over
    // a slot written before.
    let mut after: Vec<SlotWrite> = (8..12u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 5,
            byte: 0x81 + e as u8,
        })
        .collect();
    after.push(SlotWrite {
        slot: before[2].slot,
        byte: 0xee,
    });
    write_flushed(&uri, &after);
    wait_arbiter(&stack, "out_of_sync: a\n");
    // Site A's power returns.
    stack.start_replica(0);
    let acked: Vec<SlotWrite> = before.iter().chain(&after).copied().collect();
    assert_a_holds_everything(&stack, &uri, &acked);
}

#[test]
fn a_replica_back_from_a_power_cut_before_any_io_noticed_is_resynced_too() {
    let mut stack = volatile_stack(true);
    let uri = stack.nbd_uri();
    let before: Vec<SlotWrite> = (0..6u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 11,
            byte: 0x41 + e as u8,
        })
        .collect();
    write_unflushed(&uri, &before);
    // The power comes back at once: no write, no read in between, so no
    // request fails for the frontend to notice.
    stack.kill_replica(0);
    stack.start_replica(0);
    // The frontend must not go on counting a as holding what it lost.
    let out = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("out_of_sync: a\n")
            .then_some(())
    });
    eprintln!("a taken out after its restart: {}", out.is_some());
    assert_a_holds_everything(&stack, &uri, &before);
}

#[test]
fn a_whole_site_lost_to_a_power_cut_loses_nothing_once_its_replica_returns() {
    let mut stack = volatile_stack(true);
    let before: Vec<SlotWrite> = (0..8u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 7,
            byte: 0x21 + e as u8,
        })
        .collect();
    write_unflushed(&stack.nbd_uri(), &before);
    // Site A goes dark: its frontend and its replica, page caches gone.
    stack.kill_frontend();
    stack.kill_replica(0);
    // A frontend on site B, with only b.
    let mut args = stack.frontend_args(0);
    set_flag(&mut args, "--local", "b");
    set_flag(&mut args, "--frontend-id", "fe-site-b");
    args.extend(SHORT_LEASE.iter().map(|s| (*s).to_owned()));
    let sock = stack.dir().join("site-b.sock");
    args.extend(["--nbd-unix".into(), sock.display().to_string()]);
    let _fe = KillOnDrop(start_proc("frontend-site-b", args, stack.dir()));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    wait_arbiter(&stack, "out_of_sync: a\n");
    let after: Vec<SlotWrite> = (8..12u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 9,
            byte: 0x91 + e as u8,
        })
        .collect();
    write_flushed(&uri, &after);
    stack.start_replica(0);
    let acked: Vec<SlotWrite> = before.iter().chain(&after).copied().collect();
    assert_a_holds_everything(&stack, &uri, &acked);
}

#[test]
fn a_failed_fdatasync_takes_the_replica_out_until_it_restarts_and_resyncs() {
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        frontend: false,
        replica_args: vec!["--storage-faults".into(), "volatile".into()],
        ..StackOptions::default()
    });
    // Replica a's first data fdatasync fails: its cache drops the pages,
    // and the next fdatasync would succeed without them.
    stack.kill_replica(0);
    stack.start_replica_with(
        0,
        &[
            "--storage-faults".into(),
            "volatile,data::sync=fail@0x1".into(),
        ],
    );
    stack.start_frontend_with(&SHORT_LEASE);
    let uri = stack.nbd_uri();
    let first: Vec<SlotWrite> = (0..4u64)
        .map(|e| SlotWrite {
            slot: e * EXTENT_SLOTS + 1,
            byte: 0x31 + e as u8,
        })
        .collect();
    // The flush fails on a (EIO): whatever the frontend answers, a later
    // flush must not count a as holding these writes durably.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-t", "writeback", &uri]);
    for w in &first {
        c.args([
            "-c",
            &format!("write -P {} {} {SLOT}", w.byte, w.slot * SLOT),
        ]);
    }
    let out = c.args(["-c", "flush"]).output().expect("qemu-io");
    eprintln!("first flush: {}", String::from_utf8_lossy(&out.stdout));
    let second = [SlotWrite {
        slot: 5 * EXTENT_SLOTS,
        byte: 0x55,
    }];
    write_flushed(&uri, &second);
    let a = stack.replica_data_paths()[0].clone();
    let show = stack.arbiter_show();
    let lost = missing(&a, &first);
    eprintln!(
        "after the second flush: arbiter {:?}, {} of {} first writes missing from a's disk",
        show.lines().find(|l| l.starts_with("in_sync")),
        lost.len(),
        first.len()
    );
    assert!(
        !show.contains("in_sync: a,b\n") || lost.is_empty(),
        "a flush was acknowledged with a in sync although a's failed fdatasync dropped {} writes:\n{show}\n{}",
        lost.len(),
        stack.log_tails(30)
    );
    wait_arbiter(&stack, "out_of_sync: a\n");
    let log_a = std::fs::read_to_string(&stack.replica_log_paths()[0]).expect("a's log");
    assert!(
        log_a.contains("fdatasync failed") && log_a.contains("refuses"),
        "a's log does not say why it stopped:\n{log_a}"
    );
    let status = Command::new(common::engine_bin())
        .args(["volume", "status", "--volume", "v1", "--pool"])
        .arg(stack.dir().join("pool-a"))
        .output()
        .expect("volume status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("failed: "), "volume status: {status}");
    // Replaced disk or not, a restart resyncs it like a power loss.
    stack.kill_replica(0);
    stack.start_replica(0);
    let acked: Vec<SlotWrite> = first.iter().chain(&second).copied().collect();
    assert_a_holds_everything(&stack, &uri, &acked);
}
