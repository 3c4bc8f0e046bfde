//! Real NBD clients nobody here wrote (qemu-io, nbdcopy, fio's nbd engine)
//! against the NBD export, checking what a user would: the bytes read back,
//! and the bytes each replica holds afterwards.
//!
//! Needs qemu-utils, libnbd-bin and fio (installed by the README's test
//! command).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::rng::Rng;
use common::{MIB, Stack, StackOptions, command, fio, qemu_io, run_ok};

/// How long one client run may take before the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(300);

/// Runs a client under [`CLIENT_DEADLINE`]; its stdout, or the test fails
/// with its output.
fn run(cmd: std::process::Command) -> String {
    run_ok(cmd, CLIENT_DEADLINE)
}

fn start_volume(size: u64) -> Stack {
    Stack::start(StackOptions {
        size,
        ..StackOptions::default()
    })
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
    let out = run(qemu_io::command(&stack.nbd_uri(), &writes));
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );

    // Read back every written range (as it stands after all the writes),
    // with pattern checks where the range is uniform.
    let mut reads = Vec::new();
    for (offset, len) in &checks {
        let range = &expected[*offset as usize..(*offset + *len) as usize];
        if range.iter().all(|b| *b == range[0]) {
            reads.push(format!("read -P {} {offset} {len}", range[0]));
        }
    }
    let out = run(qemu_io::command(&stack.nbd_uri(), &reads));
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
    let out = run(fio::verified_random_writes(
        stack.dir(),
        &stack.nbd_uri(),
        "twinvol-verify",
        4242,
        &[
            "--iodepth=32",
            "--bssplit=4k/40:16k/20:64k/20:256k/10:1m/10",
            // Four clients at once, each on its own connection and region.
            "--numjobs=4",
            "--size=48m",
            "--offset_increment=48m",
        ],
    ));
    // Terse output: one line per job; field 5 (index 4) is its error code.
    let jobs = fio::terse_jobs(&out);
    assert_eq!(jobs.len(), 4, "fio did not report four jobs:\n{out}");
    for job in jobs {
        assert_eq!(
            fio::terse_error(job),
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
    run(qemu_io::command(&tcp_uri, &["write -P 0x5c 12345 100000"]));
    let out = run(qemu_io::command(
        &stack.nbd_uri(),
        &["read -P 0x5c 12345 100000", "read -P 0 0 12345"],
    ));
    assert!(
        !out.contains("failed"),
        "qemu-io read back other data:\n{out}"
    );
}
