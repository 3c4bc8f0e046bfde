//! Writes in flight at the same time over the same bytes (design
//! invariant 6: two replicas that both count as in sync are
//! byte-identical, always). A client may send overlapping writes without
//! waiting for either: which one wins is not defined for the client, but
//! it must be the same on both replicas — otherwise reads of those bytes
//! answer differently depending on the replica, and the next fail-over
//! serves the other version.
//!
//! Real clients over the frontend's NBD export, with an arbiter: fio's nbd
//! engine (four connections, depth 64 each, random unaligned block sizes
//! from 512 bytes to 64 KiB over a 128 KiB region: nearly every write
//! overlaps others in flight) and qemu-io (a burst of overlapping
//! `aio_write`s of distinct patterns). Once the clients ended (every write
//! answered) with the arbiter listing both replicas in sync, the two data
//! files must be identical.
//!
//! Needs fio and qemu-io.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MIB, Stack, StackOptions, qemu_io, run_ok};

/// The region the writes overlap in.
const REGION: u64 = 128 * 1024;
const ROUNDS: usize = 3;

fn start() -> Stack {
    Stack::start(StackOptions {
        size: 16 * MIB,
        arbiter: true,
        ..StackOptions::default()
    })
}

/// Offset and count of the bytes that differ between the two replicas'
/// data files (the first differing offset, if any).
fn differing(files: &[PathBuf]) -> (Option<usize>, usize) {
    let a = std::fs::read(&files[0]).expect("replica a data");
    let b = std::fs::read(&files[1]).expect("replica b data");
    assert_eq!(a.len(), b.len());
    let mut first = None;
    let mut n = 0;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if x != y {
            first.get_or_insert(i);
            n += 1;
        }
    }
    (first, n)
}

/// Both replicas in sync at the arbiter (no write was held or failed).
fn assert_both_in_sync(stack: &Stack, what: &str) {
    let show = stack.arbiter_show();
    assert!(
        show.contains("in_sync: a,b\n"),
        "{what}: a replica left the in-sync set, the comparison would prove nothing:\n{show}\n{}",
        stack.log_tails(30)
    );
}

fn assert_identical(stack: &Stack, what: &str) {
    assert_both_in_sync(stack, what);
    let (first, n) = differing(&stack.replica_data_paths());
    assert!(
        n == 0,
        "{what}: both replicas count as in sync but their data files differ in {n} bytes (first at {first:?})"
    );
}

/// fio: `jobs` connections writing random, unaligned, overlapping blocks
/// over the region for `secs` seconds.
fn fio_overlapping(stack: &Stack, round: usize, secs: u32) -> Command {
    let mut fio = Command::new("fio");
    fio.current_dir(stack.dir()).args([
        "--thread",
        "--name=overlap",
        "--ioengine=nbd",
        &format!("--uri={}", stack.nbd_uri()),
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--bs_unaligned",
        "--norandommap",
        &format!("--size={REGION}"),
        "--iodepth=64",
        "--numjobs=4",
        "--time_based",
        &format!("--runtime={secs}"),
        &format!("--randseed={}", 17 + round),
        "--group_reporting",
        "--output-format=terse",
    ]);
    fio
}

#[test]
fn overlapping_writes_in_flight_from_fio_land_alike_on_both_replicas() {
    let stack = start();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let report = run_ok(fio_overlapping(&stack, round, 4), Duration::from_secs(120));
        let job = common::fio::terse_jobs(&report)
            .first()
            .copied()
            .unwrap_or("");
        assert_eq!(
            common::fio::terse_error(job),
            Some("0"),
            "fio failed:\n{report}"
        );
        eprintln!("round {round}: fio ran {:?}", started.elapsed());
        assert_identical(&stack, &format!("fio round {round}"));
    }
}

#[test]
fn overlapping_aio_writes_from_qemu_io_land_alike_on_both_replicas() {
    let stack = start();
    for round in 0..ROUNDS {
        // 256 writes of 4 KiB–68 KiB, each with its own pattern, all
        // issued before any is waited for; starts step by 1.5 KiB so that
        // each overlaps dozens of others.
        let mut cmds: Vec<String> = (0..256u64)
            .map(|k| {
                let off = (k * 1536 + round as u64 * 512) % (REGION - 68 * 1024);
                let len = 4096 + (k * 7919 % 16) * 4096;
                format!("aio_write -P {} {off} {len}", (k + round as u64) % 255 + 1)
            })
            .collect();
        cmds.push("aio_flush".to_owned());
        let out = run_ok(
            qemu_io::command(&stack.nbd_uri(), &cmds),
            Duration::from_secs(120),
        );
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io round {round}: {out}"
        );
        assert_identical(&stack, &format!("qemu-io round {round}"));
    }
}
