//! The FUSE export as a file, through plain system calls on the real
//! mirrored stack: reads and writes at the edges of the volume, fsync,
//! fallocate (punch hole → trim, zero range → write zeroes) and the size
//! that cannot change — each checked against both replicas' data files.
//!
//! Needs root and /dev/fuse.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{MIB, Stack, StackOptions};

const SIZE: u64 = 8 * MIB;

fn open_volume(stack: &Stack) -> File {
    let path = stack.fuse_file().expect("the stack exports a FUSE file");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the volume file")
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn replica_range(replica: &PathBuf, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(replica).expect("open replica data");
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset)
        .expect("read replica data");
    buf
}

#[test]
fn the_volume_file_has_block_device_semantics_and_reaches_both_replicas() {
    let stack = Stack::start(StackOptions {
        size: SIZE,
        fuse: true,
        ..StackOptions::default()
    });
    let file = open_volume(&stack);
    assert_eq!(file.metadata().expect("stat").len(), SIZE);

    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8 + 1).collect();
    file.write_all_at(&pattern, MIB).expect("write 1 MiB");
    file.sync_all().expect("fsync");
    let mut back = vec![0; pattern.len()];
    file.read_exact_at(&mut back, MIB).expect("read back");
    assert!(back == pattern, "read back other bytes");

    // Zero range: exactly zeroes, on both replicas.
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, MIB + 4096, 8192).expect("zero range");
    // Punch hole: a trim, which our replicas carry out by punching a hole
    // in their data file, so the range reads back as zeroes there too.
    fallocate(
        &file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        MIB + 65536,
        65536,
    )
    .expect("punch hole");
    // Growing the file is not a thing a volume does.
    let grow = fallocate(&file, 0, SIZE - 4096, 8192);
    assert!(grow.is_err(), "fallocate past the end must fail");
    file.sync_all().expect("fsync");
    let mut expected = pattern.clone();
    expected[4096..4096 + 8192].fill(0);
    expected[65536..131072].fill(0);
    for replica in stack.replica_data_paths() {
        let got = replica_range(&replica, MIB, expected.len());
        if let Some(at) = got.iter().zip(&expected).position(|(g, e)| g != e) {
            panic!(
                "{} differs at volume byte {}",
                replica.display(),
                MIB as usize + at
            );
        }
    }

    // At the end of the volume: a write crossing it is cut short, one at
    // it fails like a full device, a read at it returns nothing.
    let written = file
        .write_at(&[0xee; 8192], SIZE - 4096)
        .expect("short write");
    assert_eq!(written, 4096);
    let past = file
        .write_at(&[0xee; 512], SIZE)
        .expect_err("write at the end");
    assert_eq!(past.raw_os_error(), Some(libc::ENOSPC), "{past}");
    let mut tail = [0u8; 16];
    assert_eq!(file.read_at(&mut tail, SIZE).expect("read at the end"), 0);
    // The size is fixed.
    let truncated = file.set_len(SIZE / 2).expect_err("truncate");
    assert_eq!(truncated.raw_os_error(), Some(libc::EINVAL), "{truncated}");
    file.sync_all().expect("fsync");
    for replica in stack.replica_data_paths() {
        assert_eq!(replica_range(&replica, SIZE - 4096, 4096), vec![0xee; 4096]);
        assert_eq!(std::fs::metadata(&replica).expect("stat").len(), SIZE);
    }
}
