//! Reading what the volume holds, and comparing the two replica files.
//!
//! The volume is over 2 GiB (so that a trim can span 2 GiB) but the
//! workload writes only its live region: checks read that region through
//! the frontend (qemu-img dd, a real NBD client) and from each replica's
//! data file. The divergence comparison covers the two data files whole,
//! cheaply: it asks each file where its data is (`SEEK_DATA`/`SEEK_HOLE`;
//! a hole reads as zeros), compares the union of those ranges byte for byte
//! and checks that nothing outside the live region holds anything but
//! zeros (only zeroing operations reach it). Replica files are read after
//! a flush through the frontend ([`flush_via_frontend`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{MIB, run_with_deadline};
use crate::{BLOCK, LIVE, SIZE};

/// The live region read through the frontend at `uri`, or why not.
pub fn read_live_via_frontend(uri: &str, scratch: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(scratch);
    let mut c = Command::new("qemu-img");
    c.args(["dd", "-f", "raw", "-O", "raw", "bs=4M"])
        .arg(format!("count={}", LIVE / (4 * MIB)))
        .arg(format!("if={uri}"))
        .arg(format!("of={}", scratch.display()));
    let out = run_with_deadline(c, Duration::from_secs(120));
    if !out.status.success() {
        return Err(format!(
            "qemu-img dd failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let data = std::fs::read(scratch).map_err(|e| format!("read {}: {e}", scratch.display()))?;
    let _ = std::fs::remove_file(scratch);
    if data.len() as u64 != LIVE {
        return Err(format!("qemu-img dd read {} bytes of {LIVE}", data.len()));
    }
    Ok(data)
}

/// A flush through the frontend (qemu-io), so that every in-sync
/// replica's data file holds what it acknowledged: a replica with the
/// volatile cache keeps unflushed writes in its process, not its file.
pub fn flush_via_frontend(uri: &str) -> Result<(), String> {
    let c = crate::common::qemu_io::command(uri, &["flush"]);
    let out = run_with_deadline(c, Duration::from_secs(60));
    let text = crate::common::output_text(&out);
    if out.status.success() && !text.contains("failed") {
        Ok(())
    } else {
        Err(format!("qemu-io flush: {} {text}", out.status))
    }
}

/// The live region of a replica's data file.
pub fn read_live(path: &Path) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; LIVE as usize];
    f.read_exact_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

/// The ranges of `f` that hold data (everything else is a hole).
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut ranges = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: lseek on a file descriptor this function borrows; no memory.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `off`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { size } else { hole as u64 });
        ranges.push((start, end.min(size)));
        off = end;
    }
    ranges
}

/// Union of two sorted range lists.
fn union(mut a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    a.extend(b);
    a.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in a {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// What comparing the two replica files found.
#[derive(Debug, Default)]
pub struct Comparison {
    pub bytes_compared: u64,
    /// Offsets of differing 4 KiB blocks (the first 64) and their count.
    pub differing: Vec<u64>,
    pub differing_blocks: u64,
    /// A block outside the live region that is not zeros (file, offset).
    pub stray: Option<(usize, u64)>,
}

impl Comparison {
    pub fn identical(&self) -> bool {
        self.differing_blocks == 0
    }
}

/// Compares the two data files whole (see the module note).
pub fn compare_files(paths: [&Path; 2]) -> Comparison {
    let files =
        paths.map(|p| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())));
    let ranges = union(data_ranges(&files[0], SIZE), data_ranges(&files[1], SIZE));
    let mut c = Comparison::default();
    let chunk = 4 * MIB;
    let mut bufs = [vec![0u8; chunk as usize], vec![0u8; chunk as usize]];
    for (start, end) in ranges {
        let mut off = start - start % BLOCK;
        while off < end {
            let len = chunk.min(end - off).min(SIZE - off) as usize;
            for i in 0..2 {
                files[i]
                    .read_exact_at(&mut bufs[i][..len], off)
                    .unwrap_or_else(|e| panic!("read {}: {e}", paths[i].display()));
            }
            c.bytes_compared += len as u64;
            for (k, (x, y)) in bufs[0][..len]
                .chunks(BLOCK as usize)
                .zip(bufs[1][..len].chunks(BLOCK as usize))
                .enumerate()
            {
                let at = off + k as u64 * BLOCK;
                if x != y {
                    c.differing_blocks += 1;
                    if c.differing.len() < 64 {
                        c.differing.push(at);
                    }
                }
                if at >= LIVE && c.stray.is_none() {
                    if x.iter().any(|&b| b != 0) {
                        c.stray = Some((0, at));
                    } else if y.iter().any(|&b| b != 0) {
                        c.stray = Some((1, at));
                    }
                }
            }
            off += len as u64;
        }
    }
    c
}

/// One block of a file, for failure messages.
pub fn read_block(path: &Path, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK as usize];
    if let Ok(f) = File::open(path) {
        let _ = f.read_exact_at(&mut buf, offset);
    }
    buf
}
