//! ext4 on the FUSE export: a loop device (`losetup --direct-io=on`) over
//! the volume's file, mkfs.ext4, mount, a directory tree written, unmount;
//! then each replica's data file alone, through its own read-only loop
//! device, must pass `fsck.ext4 -fn` and hold the same files.
//!
//! Needs root, /dev/fuse and loop devices. Every loop device and mount the
//! test makes is undone by a guard, even when it fails; only the test's own
//! loop devices are detached.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use twinvol_engine::frontend::backend::{BackendError, BlockBackend, check_range};

const MIB: u64 = 1024 * 1024;

/// Runs a command, failing the test with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
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
        let dev = run(cmd.arg(file)).trim().to_string();
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
        run(Command::new("mount").args(["-o", options, dev]).arg(at));
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

/// Deterministic pseudo-random numbers (xorshift64*).
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
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        buf
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

/// A file on local disk behind the export (stand-in for the mirror until
/// the stack harness exists).
struct FileBackend {
    file: Arc<std::fs::File>,
    size: u64,
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        check_range(offset, u64::from(len), self.size)?;
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        check_range(offset, data.len() as u64, self.size)?;
        let file = self.file.clone();
        blocking(move || {
            std::os::unix::fs::FileExt::write_all_at(&*file, &data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, false).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), BackendError> {
        self.write(offset, Bytes::from(vec![0; len as usize]), fua)
            .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Io(e.to_string()))?
        .map_err(|e| BackendError::Io(e.to_string()))
}

#[test]
fn ext4_on_the_fuse_loop_device_lands_intact_on_every_replica() {
    let size = 256 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("replica.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&data)
        .expect("data file");
    file.set_len(size).expect("size");
    let replicas = vec![data];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fuse_dir = dir.path().join("fuse");
    std::fs::create_dir(&fuse_dir).expect("mkdir");
    let backend = Arc::new(FileBackend {
        file: Arc::new(file),
        size,
    });
    let export =
        twinvol_engine::frontend::fuse::mount(backend, &fuse_dir, "volume", rt.handle().clone())
            .expect("mount the FUSE export");
    let volume_file = export.file_path().to_path_buf();
    assert_eq!(std::fs::metadata(&volume_file).expect("stat").len(), size);

    let fs_dir = dir.path().join("ext4");
    std::fs::create_dir(&fs_dir).expect("mkdir");
    let files = {
        let dev = LoopDevice::attach(&volume_file, false);
        run(Command::new("mkfs.ext4").args(["-q", "-F", dev.path()]));
        let mounted = Mounted::new(dev.path(), &fs_dir, "rw");
        let files = write_tree(&fs_dir);
        check_tree(&fs_dir, &files, "the mounted volume");
        drop(mounted);
        files
    };
    drop(export);

    for replica in &replicas {
        let dev = LoopDevice::attach(replica, true);
        run(Command::new("fsck.ext4").args(["-fn", dev.path()]));
        let mounted = Mounted::new(dev.path(), &fs_dir, "ro,noload");
        check_tree(&fs_dir, &files, &replica.display().to_string());
        drop(mounted);
    }
    drop(rt);
}
