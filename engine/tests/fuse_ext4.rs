//! ext4 on the FUSE export: a loop device (`losetup --direct-io=on`) over
//! the volume's file, mkfs.ext4, mount, a directory tree written, frozen
//! and thawed (every dirty block written, the journal checkpointed), unmount;
//! then each replica's data file alone, through its own read-only loop
//! device, must pass `fsck.ext4 -fn` and hold the same files.
//!
//! Needs root, /dev/fuse and loop devices. Every loop device and mount the
//! test makes is undone by a guard, even when it fails; only the test's own
//! loop devices are detached.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::rng::Rng;
use common::{MIB, Stack, StackOptions, command, run_ok};

/// How long one tool run (mkfs, fsck, mount) may take.
const TOOL_DEADLINE: Duration = Duration::from_secs(300);

/// Runs a tool under [`TOOL_DEADLINE`]; its stdout, or the test fails with
/// its output.
fn run(cmd: Command) -> String {
    run_ok(cmd, TOOL_DEADLINE)
}

/// A loop device this test attached; detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path, read_only: bool) -> Self {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        } else {
            cmd.arg("--direct-io=on");
        }
        cmd.arg(file);
        let dev = run(cmd).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        let dev = LoopDevice(dev);
        if !read_only {
            // losetup quietly falls back to buffered I/O if the file refuses
            // O_DIRECT; the export must not.
            let name = dev.0.trim_start_matches("/dev/");
            let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
                .expect("loop dio attribute");
            assert_eq!(dio.trim(), "1", "{} is not using direct I/O", dev.0);
        }
        dev
    }
    fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount this test made; unmounted on drop (lazily if busy).
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &str, at: &Path, options: &str) -> Self {
        run(command(
            "mount",
            [
                "-o".as_ref(),
                options.as_ref(),
                dev.as_ref(),
                at.as_os_str(),
            ],
        ));
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes a tree of directories and files under `root`; returns each
/// file's relative path with its length and CRC32C.
fn write_tree(root: &Path) -> Vec<(PathBuf, usize, u32)> {
    let mut rng = Rng(0x6675_7365_6578_7434);
    let mut files = Vec::new();
    for d in 0..6 {
        let dir = PathBuf::from(format!("dir{d}")).join(format!("sub{}", d % 3));
        std::fs::create_dir_all(root.join(&dir)).expect("mkdir");
        for f in 0..12 {
            let len = match f % 4 {
                0 => rng.below(4096) as usize,
                1 => rng.below(64 * 1024) as usize,
                2 => rng.below(MIB) as usize,
                _ => (MIB + rng.below(3 * MIB)) as usize,
            };
            let data = rng.bytes(len);
            let rel = dir.join(format!("file{f}.bin"));
            std::fs::write(root.join(&rel), &data).expect("write file");
            files.push((rel, len, crc32c::crc32c(&data)));
        }
    }
    files
}

fn check_tree(root: &Path, files: &[(PathBuf, usize, u32)], what: &str) {
    for (rel, len, crc) in files {
        let data = std::fs::read(root.join(rel))
            .unwrap_or_else(|e| panic!("{what}: cannot read {}: {e}", rel.display()));
        assert_eq!(
            data.len(),
            *len,
            "{what}: {} has the wrong length",
            rel.display()
        );
        assert_eq!(
            crc32c::crc32c(&data),
            *crc,
            "{what}: {} has other bytes",
            rel.display()
        );
    }
}

#[test]
fn ext4_on_the_fuse_loop_device_lands_intact_on_every_replica() {
    let size = 256 * MIB;
    let mut stack = Stack::start(StackOptions {
        size,
        fuse: true,
        ..StackOptions::default()
    });
    let volume_file = stack.fuse_file().expect("the stack exports a FUSE file");
    assert_eq!(std::fs::metadata(&volume_file).expect("stat").len(), size);
    let fs_dir = stack.dir().join("ext4");
    std::fs::create_dir(&fs_dir).expect("mkdir");

    let files = {
        let dev = LoopDevice::attach(&volume_file, false);
        run(command("mkfs.ext4", ["-q", "-F", dev.path()]));
        let mounted = Mounted::new(dev.path(), &fs_dir, "rw");
        let files = write_tree(&fs_dir);
        check_tree(&fs_dir, &files, "the mounted volume");
        // Freeze and thaw before the unmount: a freeze writes every dirty
        // block and checkpoints the journal, so the volume's bytes are a
        // clean file system whatever the unmount does. The unmount alone is
        // not enough on a shared machine: a process that unshares its mount
        // namespace (a container starting, a test beside this one) while
        // this file system is mounted keeps a copy of the mount, and the
        // unmount here then succeeds without shutting the file system down,
        // leaving its last writes in the page cache (seen in CI).
        run(command("fsfreeze", ["-f".as_ref(), fs_dir.as_os_str()]));
        run(command("fsfreeze", ["-u".as_ref(), fs_dir.as_os_str()]));
        drop(mounted);
        files
    };
    // A clean stop: the FUSE file is unmounted and the mirror flushed.
    assert!(
        stack.stop_frontend(Duration::from_secs(60)),
        "the frontend did not stop cleanly"
    );

    for replica in stack.replica_data_paths() {
        let dev = LoopDevice::attach(&replica, true);
        run(command("fsck.ext4", ["-fn", dev.path()]));
        let mounted = Mounted::new(dev.path(), &fs_dir, "ro,noload");
        check_tree(&fs_dir, &files, &replica.display().to_string());
        drop(mounted);
    }
}
