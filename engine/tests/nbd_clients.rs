//! Real NBD clients nobody here wrote (qemu-io, nbdcopy, fio's nbd engine)
//! against the NBD export, checking what a user would: the bytes read back,
//! and the bytes each replica holds afterwards.
//!
//! Needs qemu-utils, libnbd-bin and fio (installed by the README's test
//! command).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use twinvol_engine::frontend::backend::{BackendError, BlockBackend, check_range};

const MIB: u64 = 1024 * 1024;

/// A volume under test: how to reach it over NBD and where its bytes end up.
struct Volume {
    socket: PathBuf,
    replicas: Vec<PathBuf>,
    _server: LocalServer,
}

impl Volume {
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
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

/// Serves a FileBackend on a unix socket from its own runtime; stops on drop.
struct LocalServer {
    rt: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

fn start_volume(size: u64) -> Volume {
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
    let socket = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let backend = Arc::new(FileBackend {
        file: Arc::new(file),
        size,
    });
    let path = socket.clone();
    rt.spawn(async move {
        if let Err(e) = twinvol_engine::frontend::nbd::serve_unix(&path, backend).await {
            eprintln!("nbd server failed: {e}");
        }
    });
    wait_for(|| socket.exists(), "the NBD socket to appear");
    Volume {
        socket,
        replicas: vec![data],
        _server: LocalServer {
            rt: Some(rt),
            _dir: dir,
        },
    }
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

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
    let volume = start_volume(size);
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
    cmd.args(["-f", "raw", &volume.uri()]);
    for w in &writes {
        cmd.args(["-c", w]);
    }
    let out = run(&mut cmd);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );

    // Read back every written range (as it stands after all the writes),
    // with pattern checks where the range is uniform.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &volume.uri()]);
    for (offset, len) in &checks {
        let range = &expected[*offset as usize..(*offset + *len) as usize];
        if range.iter().all(|b| *b == range[0]) {
            cmd.args(["-c", &format!("read -P {} {offset} {len}", range[0])]);
        }
    }
    let out = run(&mut cmd);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io read back other data:\n{out}"
    );
    assert_replicas_equal(&volume.replicas, &expected);
}

#[test]
fn nbdcopy_copies_a_random_image_in_and_out_identically() {
    let size = 256 * MIB;
    let volume = start_volume(size);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("random.img");
    let mut data = vec![0u8; size as usize];
    Rng(0x6e62_6463_6f70_7921).fill(&mut data);
    std::fs::write(&image, &data).expect("write image");
    run(Command::new("nbdcopy").arg(&image).arg(volume.uri()));
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(volume.uri()).arg(&back));
    let copied = std::fs::read(&back).expect("read copy");
    assert!(
        copied == data,
        "the image copied back out differs from the one copied in"
    );
    assert_replicas_equal(&volume.replicas, &data);
}

#[test]
fn fio_nbd_engine_random_writes_verify() {
    let size = 256 * MIB;
    let volume = start_volume(size);
    let out = run(Command::new("fio").args([
        "--name=twinvol-verify",
        "--ioengine=nbd",
        &format!("--uri={}", volume.uri()),
        "--rw=randwrite",
        "--iodepth=32",
        "--bssplit=4k/40:16k/20:64k/20:256k/10:1m/10",
        "--size=192m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
        "--verify_state_save=0",
        "--randseed=4242",
        "--output-format=terse",
    ]));
    // Terse output: field 3 is the error code of the job.
    let fields: Vec<&str> = out.lines().last().unwrap_or("").split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported an error:\n{out}");
}
