//! Real NBD clients nobody here wrote (qemu-io, nbdcopy, fio's nbd engine)
//! against the NBD export, checking what a user would: the bytes read back,
//! and the bytes each replica holds afterwards.
//!
//! Needs qemu-utils, libnbd-bin and fio (installed by the README's test
//! command).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{MIB, Stack, StackOptions, run_with_deadline};

/// How long one client run may take before the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(300);

fn start_volume(size: u64) -> Stack {
    Stack::start(StackOptions {
        size,
        ..StackOptions::default()
    })
}

/// Runs a command with a deadline, failing the test with its output if it
/// fails.
fn run(cmd: Command) -> String {
    let described = format!("{cmd:?}");
    let output = run_with_deadline(cmd, CLIENT_DEADLINE);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{described} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// A command with its arguments.
fn command<S: AsRef<std::ffi::OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Deterministic pseudo-random numbers (xorshift64*), so a failure can be
/// replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn assert_replicas_equal(replicas: &[PathBuf], expected: &[u8]) {
    for replica in replicas {
        let actual = std::fs::read(replica).expect("replica data");
        assert_eq!(
            actual.len(),
            expected.len(),
            "{} has the wrong size",
            replica.display()
        );
        if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
            panic!(
                "{} differs from the expected image at byte {at} (got {:#04x}, expected {:#04x})",
                replica.display(),
                actual[at],
                expected[at]
            );
        }
    }
}

#[test]
fn qemu_io_patterns_read_back_and_land_on_every_replica() {
    let size = 64 * MIB;
    let stack = start_volume(size);
    let mut expected = vec![0u8; size as usize];
    let mut rng = Rng(0x7431_6e76_6f6c_0001);
    let mut writes = Vec::new();
    let mut checks = Vec::new();
    // Overlapping sequential writes of many sizes, aligned and not, some
    // of them write-zeroes and some FUA.
    for i in 0..120u64 {
        let len = match i % 4 {
            0 => 512 * (1 + rng.below(8)),
            1 => 1 + rng.below(70_000),
            2 => 4096 * (1 + rng.below(256)),
            _ => MIB * (1 + rng.below(4)),
        };
        let offset = rng.below(size - len + 1);
        let pattern = (1 + rng.below(255)) as u8;
        if i % 10 == 9 {
            writes.push(format!("write -z {offset} {len}"));
            expected[offset as usize..(offset + len) as usize].fill(0);
        } else {
            let fua = if i % 7 == 0 { "-f " } else { "" };
            writes.push(format!("write {fua}-P {pattern} {offset} {len}"));
            expected[offset as usize..(offset + len) as usize].fill(pattern);
        }
        checks.push((offset, len));
    }
    // Concurrent writes to disjoint 1 MiB slots at the end of the volume.
    for slot in 0..16u64 {
        let offset = size - 16 * MIB + slot * MIB;
        let len = 4096 * (1 + rng.below(256));
        let pattern = (slot + 1) as u8;
        writes.push(format!("aio_write -P {pattern} {offset} {len}"));
        expected[offset as usize..(offset + len) as usize].fill(pattern);
        checks.push((offset, len));
    }
    writes.push("aio_flush".to_string());
    writes.push("flush".to_string());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &stack.nbd_uri()]);
    for w in &writes {
        cmd.args(["-c", w]);
    }
    let out = run(cmd);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );

    // Read back every written range (as it stands after all the writes),
    // with pattern checks where the range is uniform.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &stack.nbd_uri()]);
    for (offset, len) in &checks {
        let range = &expected[*offset as usize..(*offset + *len) as usize];
        if range.iter().all(|b| *b == range[0]) {
            cmd.args(["-c", &format!("read -P {} {offset} {len}", range[0])]);
        }
    }
    let out = run(cmd);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io read back other data:\n{out}"
    );
    assert_replicas_equal(&stack.replica_data_paths(), &expected);
}

#[test]
fn nbdcopy_copies_a_random_image_in_and_out_identically() {
    let size = 256 * MIB;
    let stack = start_volume(size);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("random.img");
    let mut data = vec![0u8; size as usize];
    Rng(0x6e62_6463_6f70_7921).fill(&mut data);
    std::fs::write(&image, &data).expect("write image");
    run(command(
        "nbdcopy",
        [image.as_os_str(), stack.nbd_uri().as_ref()],
    ));
    let back = dir.path().join("back.img");
    run(command(
        "nbdcopy",
        [stack.nbd_uri().as_ref(), back.as_os_str()],
    ));
    let copied = std::fs::read(&back).expect("read copy");
    assert!(
        copied == data,
        "the image copied back out differs from the one copied in"
    );
    assert_replicas_equal(&stack.replica_data_paths(), &data);
}

#[test]
fn fio_nbd_engine_random_writes_verify() {
    let size = 256 * MIB;
    let stack = start_volume(size);
    let mut fio = Command::new("fio");
    // fio may leave state files in its working directory.
    fio.current_dir(stack.dir()).args([
        "--name=twinvol-verify",
        "--ioengine=nbd",
        &format!("--uri={}", stack.nbd_uri()),
        "--rw=randwrite",
        "--iodepth=32",
        "--bssplit=4k/40:16k/20:64k/20:256k/10:1m/10",
        // Four clients at once, each on its own connection and region.
        "--numjobs=4",
        "--size=48m",
        "--offset_increment=48m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
        "--verify_state_save=0",
        "--randseed=4242",
        "--output-format=terse",
    ]);
    let out = run(fio);
    // Terse output: one line per job; field 5 (index 4) is its error code.
    let jobs: Vec<&str> = out.lines().filter(|l| l.starts_with("3;")).collect();
    assert_eq!(jobs.len(), 4, "fio did not report four jobs:\n{out}");
    for job in jobs {
        assert_eq!(
            job.split(';').nth(4),
            Some("0"),
            "fio reported an error:\n{out}"
        );
    }
}

#[test]
fn nbdinfo_and_qemu_io_negotiate_over_unix_and_tcp() {
    let size = 16 * MIB;
    let stack = Stack::start(StackOptions {
        size,
        nbd_tcp: true,
        ..StackOptions::default()
    });
    let tcp = stack
        .nbd_tcp_addr()
        .expect("the stack exports NBD over TCP");
    let tcp_uri = format!("nbd://{tcp}/");
    for uri in [stack.nbd_uri(), tcp_uri.clone()] {
        let out = run(command("nbdinfo", ["--json", uri.as_str()]));
        let info: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
        assert_eq!(info["protocol"], "newstyle-fixed", "{out}");
        let export = &info["exports"][0];
        assert_eq!(export["export-size"], size, "{out}");
        for capability in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(export[capability], true, "{capability} over {uri}: {out}");
        }
        assert_eq!(export["is_read_only"], false, "{out}");
        assert_eq!(export["block_size_maximum"], 32 * MIB, "{out}");
        // NBD_OPT_LIST names the one export.
        let list = run(command("nbdinfo", ["--list", uri.as_str()]));
        assert!(list.contains("export=\"\""), "{list}");
    }
    // Written over TCP, read back over the unix socket.
    run(command(
        "qemu-io",
        ["-f", "raw", &tcp_uri, "-c", "write -P 0x5c 12345 100000"],
    ));
    let out = run(command(
        "qemu-io",
        [
            "-f",
            "raw",
            &stack.nbd_uri(),
            "-c",
            "read -P 0x5c 12345 100000",
            "-c",
            "read -P 0 0 12345",
        ],
    ));
    assert!(
        !out.contains("failed"),
        "qemu-io read back other data:\n{out}"
    );
}
