//! Growing a volume online, with real processes (two replicas, a frontend
//! with a file arbiter, the FUSE and NBD exports) and real clients:
//!
//! - grown while fio writes (with verify) through NBD: fio sees no error;
//!   a new NBD connection sees the new size, qemu-io writes and reads past
//!   the old end; the FUSE file's size changes and `losetup -c` gives its
//!   loop device the new size; shrinking is refused naming the sizes; both
//!   replicas' data files end byte-identical at the new size;
//! - a replica whose grow fails half-way (its bitmap cannot be extended,
//!   after its data file was) and then loses power (kill -9 with the
//!   volatile write cache), and replicas killed at random points of later
//!   resizes: each restarts at the old or the new size, is grown before it
//!   rejoins, and the copies end byte-identical holding what was written.
//!
//! Needs qemu-io, fio and losetup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, engine_bin, fio, qemu_io, run_with_deadline, wait_until};

const DEADLINE: Duration = Duration::from_secs(90);
const SHORT_LEASE: [&str; 4] = ["--lease-duration", "3s", "--lease-margin", "1s"];

fn control(stack: &Stack) -> PathBuf {
    stack.dir().join("control.sock")
}

fn start_frontend(stack: &mut Stack) {
    let ctl = control(stack).display().to_string();
    let mut args: Vec<&str> = SHORT_LEASE.to_vec();
    args.extend(["--control-socket", &ctl]);
    stack.start_frontend_with(&args);
}

/// `twinvol-engine resize`: (success, its output).
fn resize(stack: &Stack, size: u64) -> (bool, String) {
    let mut c = Command::new(engine_bin());
    c.args(["resize", "--control"])
        .arg(control(stack))
        .args(["--size", &size.to_string()]);
    let out = run_with_deadline(c, DEADLINE);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Resizes, retrying while a replica is away (a refusal other than an
/// invalid request), until `deadline`.
fn resize_eventually(stack: &Stack, size: u64) {
    let mut last = String::new();
    let done = wait_until(DEADLINE, || {
        let (ok, out) = resize(stack, size);
        last = out;
        ok.then_some(())
    });
    assert!(
        done.is_some(),
        "resize to {size} never succeeded: {last}\n{}",
        stack.log_tails(40)
    );
}

/// The volume's size as a new NBD client sees it (qemu-io `length`).
fn nbd_length(stack: &Stack) -> u64 {
    let out = qemu_io::command(&stack.nbd_uri(), &["length"])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    // "64 MiB" or "134217728" depending on qemu's version: ask for bytes.
    parse_qemu_length(&text).unwrap_or_else(|| panic!("qemu-io length: {text}"))
}

fn parse_qemu_length(text: &str) -> Option<u64> {
    let line = text.lines().next()?.trim();
    let (num, unit) = line.split_once(' ').unwrap_or((line, "B"));
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "B" | "bytes" => 1.0,
        "KiB" => 1024.0,
        "MiB" => MIB as f64,
        "GiB" => (1u64 << 30) as f64,
        _ => return None,
    };
    Some((n * mult) as u64)
}

fn qemu_ok(stack: &Stack, cmds: &[String]) -> String {
    let out = qemu_io::command(&stack.nbd_uri(), cmds)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn wait_in_sync(stack: &Stack) {
    let ok = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("in_sync: a,b\n")
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "replicas never both in sync:\n{}\n{}",
        stack.arbiter_show(),
        stack.log_tails(40)
    );
}

/// Both data files have `size` bytes and the same content.
fn assert_identical(stack: &Stack, size: u64) {
    let paths = stack.replica_data_paths();
    let (a, b) = (
        std::fs::read(&paths[0]).expect("read a"),
        std::fs::read(&paths[1]).expect("read b"),
    );
    assert_eq!(a.len() as u64, size, "replica a's data file size");
    assert_eq!(b.len() as u64, size, "replica b's data file size");
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        differ, 0,
        "the replicas' data files differ in {differ} bytes"
    );
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn blockdev_size(dev: &str) -> u64 {
    let out = Command::new("blockdev")
        .args(["--getsize64", dev])
        .output()
        .expect("blockdev");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("size")
}

#[test]
fn grows_online_under_fio_and_serves_past_the_old_end() {
    let started = Instant::now();
    let mut stack = Stack::start(StackOptions {
        size: 64 * MIB,
        arbiter: true,
        fuse: true,
        frontend: false,
        ..StackOptions::default()
    });
    start_frontend(&mut stack);
    let fuse = stack.fuse_file().expect("fuse file");
    let out = Command::new("losetup")
        .args(["--direct-io=on", "-f", "--show"])
        .arg(&fuse)
        .output()
        .expect("losetup");
    assert!(out.status.success(), "losetup: {out:?}");
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    assert_eq!(blockdev_size(&dev.0), 64 * MIB);

    let job = fio::Background::spawn(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "grow",
        7,
        &["--iodepth=8", "--bs=64k", "--size=48M", "--io_size=96M"],
    ));
    // Grow while fio writes.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = resize(&stack, 128 * MIB);
    assert!(ok, "resize failed: {out}\n{}", stack.log_tails(30));
    assert!(out.contains("134217728"), "resize says the new size: {out}");
    let fio_running = !{
        let mut j = job;
        let done = j.is_done();
        let r = j.finish_clean(DEADLINE);
        assert!(
            r.is_ok(),
            "fio while growing: {r:?}\n{}",
            stack.log_tails(30)
        );
        done
    };
    eprintln!("fio was still writing when the resize was answered: {fio_running}");

    // New NBD connections, the FUSE file and the loop device see it.
    assert_eq!(nbd_length(&stack), 128 * MIB);
    assert_eq!(file_len(&fuse), 128 * MIB, "the FUSE file's size");
    let c = Command::new("losetup")
        .args(["-c", &dev.0])
        .status()
        .expect("losetup -c");
    assert!(c.success());
    assert_eq!(
        blockdev_size(&dev.0),
        128 * MIB,
        "losetup -c sees the new size"
    );

    // Past the old end, through a new NBD connection.
    let at = 100 * MIB;
    qemu_ok(
        &stack,
        &[
            format!("write -P 0x5c {at} 1M"),
            format!("write -P 0x5d {} 64k", 128 * MIB - 65536),
            "flush".into(),
        ],
    );
    qemu_ok(
        &stack,
        &[
            format!("read -P 0x5c {at} 1M"),
            format!("read -P 0x5d {} 64k", 128 * MIB - 65536),
        ],
    );
    // And through the loop device over the FUSE file.
    let mut buf = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&dev.0).expect("open loop device");
        f.read_exact_at(&mut buf, at)
            .expect("read past the old end");
    }
    assert!(
        buf.iter().all(|&b| b == 0x5c),
        "loop device reads the new area"
    );

    // Shrinking is refused, naming both sizes; the size stays.
    let (ok, out) = resize(&stack, 96 * MIB);
    assert!(!ok, "a shrink must be refused: {out}");
    assert!(
        out.contains("shrink") && out.contains("134217728") && out.contains("100663296"),
        "the refusal says why: {out}"
    );
    let (ok, out) = resize(&stack, 128 * MIB + 512);
    assert!(
        !ok && out.contains("4096"),
        "a size not of whole blocks: {out}"
    );
    let (ok, out) = resize(&stack, 128 * MIB);
    assert!(ok, "the same size again is fine: {out}");
    assert_eq!(nbd_length(&stack), 128 * MIB);

    qemu_ok(&stack, &["flush".to_owned()]);
    wait_in_sync(&stack);
    assert_identical(&stack, 128 * MIB);
    drop(dev);
    eprintln!("grow under fio: {:?}", started.elapsed());
}

#[test]
fn a_replica_lost_mid_resize_opens_at_either_size_and_is_grown_before_it_rejoins() {
    let started = Instant::now();
    let volatile = vec!["--storage-faults".to_owned(), "volatile".to_owned()];
    let mut stack = Stack::start(StackOptions {
        size: 32 * MIB,
        arbiter: true,
        frontend: false,
        replica_args: volatile.clone(),
        ..StackOptions::default()
    });
    // Replica b cannot write its bitmap: its grow stops after the data
    // file was preallocated, before its metadata commits the new size.
    stack.kill_replica(1);
    stack.start_replica_with(
        1,
        &[
            "--storage-faults".into(),
            "volatile,bitmap::write_at=fail".into(),
        ],
    );
    start_frontend(&mut stack);
    qemu_ok(
        &stack,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x12 31M 1M".into(),
            "flush".into(),
        ],
    );
    let (ok, out) = resize(&stack, 48 * MIB);
    assert!(
        !ok,
        "a resize that fails on an in-sync replica is not acknowledged: {out}"
    );
    assert_eq!(nbd_length(&stack), 32 * MIB, "the volume keeps its size");
    let b_data = &stack.replica_data_paths()[1];
    assert_eq!(file_len(b_data), 48 * MIB, "b's data file was grown first");
    // Power cut of b mid-resize, back without the fault.
    stack.kill_replica(1);
    stack.start_replica_with(1, &volatile);
    // The pool's volumes open just after the server is ready.
    let cut = wait_until(DEADLINE, || (file_len(b_data) == 32 * MIB).then_some(()));
    assert!(
        cut.is_some(),
        "b opens at its committed size (the unfinished grow cut back): {} bytes",
        file_len(b_data)
    );
    resize_eventually(&stack, 48 * MIB);
    eprintln!("  {:?} first resize", started.elapsed());
    qemu_ok(&stack, &["write -P 0x13 40M 1M".into(), "flush".into()]);
    wait_in_sync(&stack);
    eprintln!("  {:?} first in sync", started.elapsed());
    qemu_ok(&stack, &["flush".into()]);
    assert_identical(&stack, 48 * MIB);

    // Kill -9 (a power cut) of a replica at points of a resize in
    // progress; it restarts at either size and is grown before it rejoins.
    let mut size = 48 * MIB;
    for (round, delay_ms) in [0u64, 3, 10].into_iter().enumerate() {
        let victim = round % 2;
        size += 16 * MIB;
        let ctl = control(&stack);
        let target = size;
        let resizer = std::thread::spawn(move || {
            let mut c = Command::new(engine_bin());
            c.args(["resize", "--control"])
                .arg(&ctl)
                .args(["--size", &target.to_string()]);
            run_with_deadline(c, DEADLINE)
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        stack.kill_replica(victim);
        let _ = resizer.join();
        let data = &stack.replica_data_paths()[victim];
        stack.start_replica(victim);
        // Opened (an unfinished grow cut back) just after it is ready.
        let _ = wait_until(Duration::from_secs(5), || {
            let len = file_len(data);
            (len == size || len == size - 16 * MIB).then_some(())
        });
        let after = file_len(data);
        assert!(
            after == size || after == size - 16 * MIB,
            "round {round}: replica {victim} restarted at {after} bytes, neither the old nor the new size"
        );
        eprintln!(
            "round {round}: replica {victim} killed {delay_ms} ms into the resize, restarted at {after} bytes"
        );
        eprintln!("  {:?} restarted", started.elapsed());
        resize_eventually(&stack, size);
        eprintln!("  {:?} resized", started.elapsed());
        qemu_ok(
            &stack,
            &[
                format!("write -P {} {} 1M", 0x20 + round, size - MIB),
                "flush".into(),
            ],
        );
        wait_in_sync(&stack);
        eprintln!("  {:?} in sync", started.elapsed());
        qemu_ok(&stack, &["flush".into()]);
        assert_identical(&stack, size);
    }
    qemu_ok(
        &stack,
        &[
            "read -P 0x11 0 1M".into(),
            "read -P 0x12 31M 1M".into(),
            "read -P 0x13 40M 1M".into(),
        ],
    );
    eprintln!("resize crash rounds: {:?}", started.elapsed());
}
