//! The mirror against two in-process replica servers on loopback.

use std::path::PathBuf;

use super::*;
use crate::protocol::PROTOCOL_VERSION;
use crate::replica::{Pool, ReplicaConfig, ReplicaServer};

const SECRET: &[u8] = b"mirror-test-secret-0123";

struct Replicas {
    _dirs: Vec<tempfile::TempDir>,
    data: Vec<PathBuf>,
    specs: Vec<ReplicaSpec>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn vol() -> VolumeId {
    VolumeId::new("v1").expect("valid")
}

async fn replicas(sizes: [u64; 2]) -> Replicas {
    let mut r = Replicas {
        _dirs: vec![],
        data: vec![],
        specs: vec![],
        tasks: vec![],
    };
    for (name, size) in ["a", "b"].into_iter().zip(sizes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        pool.create_volume(&vol(), size).expect("create");
        r.data.push(pool.data_path(&vol()));
        let server = ReplicaServer::bind(
            ReplicaConfig {
                pool: dir.path().to_owned(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                secret: Secret::from_bytes(SECRET),
                protocol_version: PROTOCOL_VERSION,
            },
            Metrics::new("twinvol_replica"),
        )
        .await
        .expect("bind");
        let addr = server.local_addr();
        r.tasks.push(tokio::spawn(async move {
            let _ = server.run().await;
        }));
        r.specs.push(ReplicaSpec {
            id: ReplicaId::new(name).expect("valid"),
            addr: addr.to_string(),
        });
        r._dirs.push(dir);
    }
    r
}

fn config(r: &Replicas, epoch: u64) -> MirrorConfig {
    MirrorConfig {
        volume: vol(),
        replicas: r.specs.clone(),
        local: ReplicaId::new("b").expect("valid"),
        epoch: Epoch(epoch),
        secret: Secret::from_bytes(SECRET),
        protocol_version: PROTOCOL_VERSION,
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writes_land_on_both_replicas_byte_for_byte() {
    let size = 16 << 20;
    let r = replicas([size, size]).await;
    let m = Arc::new(
        Mirror::connect(config(&r, 1), Metrics::new("twinvol_frontend"))
            .await
            .expect("connect"),
    );
    let mut image = vec![0u8; size as usize];
    // 300 non-overlapping writes in flight at once: more than one
    // connection's window (MAX_IN_FLIGHT).
    let mut tasks = vec![];
    for i in 0..300u64 {
        let off = i * 53_248;
        let len = 512 + (i as usize * 997) % 52_000;
        let data = pattern(i, len);
        image[off as usize..off as usize + len].copy_from_slice(&data);
        let m = m.clone();
        tasks.push(tokio::spawn(async move { m.write(off, data, false).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("write");
    }
    // A write larger than one protocol request is split.
    let big = pattern(999, (MAX_IO_BYTES as usize) + 12_288);
    image[4096..4096 + big.len()].copy_from_slice(&big);
    m.write(4096, big.clone(), true).await.expect("big write");
    m.flush().await.expect("flush");
    let back = m.read(4096, big.len() as u32).await.expect("big read");
    assert_eq!(back, big);
    m.write_zeroes(8192, 8192, false).await.expect("zeroes");
    image[8192..16384].fill(0);
    m.flush().await.expect("flush");
    for path in &r.data {
        let on_disk = std::fs::read(path).expect("read data file");
        assert!(
            on_disk == image,
            "{} differs from the image",
            path.display()
        );
    }
}

#[tokio::test]
async fn request_beyond_the_end_is_refused_without_touching_data() {
    let r = replicas([1 << 20, 1 << 20]).await;
    let m = Mirror::connect(config(&r, 1), Metrics::new("twinvol_frontend"))
        .await
        .expect("connect");
    let e = m
        .write((1 << 20) - 512, Bytes::from(vec![1u8; 1024]), false)
        .await
        .expect_err("out of range");
    assert!(matches!(e, BackendError::OutOfRange { .. }), "{e:?}");
    for path in &r.data {
        assert!(std::fs::read(path).expect("read").iter().all(|&b| b == 0));
    }
}

#[tokio::test]
async fn size_mismatch_between_replicas_is_refused_naming_both_sizes() {
    let r = replicas([1 << 20, 2 << 20]).await;
    let e = Mirror::connect(config(&r, 1), Metrics::new("twinvol_frontend"))
        .await
        .err()
        .expect("mismatch");
    let t = e.to_string();
    assert!(t.contains("1048576") && t.contains("2097152"), "{t}");
}

#[tokio::test]
async fn older_epoch_is_refused_and_a_newer_frontend_fences_the_old_one() {
    let r = replicas([1 << 20, 1 << 20]).await;
    let old = Mirror::connect(config(&r, 3), Metrics::new("twinvol_frontend"))
        .await
        .expect("epoch 3");
    old.write(0, Bytes::from(vec![3u8; 4096]), true)
        .await
        .expect("write at 3");
    let new = Mirror::connect(config(&r, 5), Metrics::new("twinvol_frontend"))
        .await
        .expect("epoch 5");
    let e = old
        .write(0, Bytes::from(vec![4u8; 4096]), true)
        .await
        .expect_err("old frontend fenced");
    assert!(matches!(e, BackendError::Fenced { .. }), "{e:?}");
    let e = Mirror::connect(config(&r, 4), Metrics::new("twinvol_frontend"))
        .await
        .err()
        .expect("epoch 4 refused");
    let t = crate::error_chain(&e);
    assert!(t.contains("epoch 4") && t.contains("epoch 5"), "{t}");
    assert_eq!(
        new.read(0, 4096).await.expect("read"),
        Bytes::from(vec![3u8; 4096])
    );
}

#[tokio::test]
async fn reads_go_to_the_local_replica() {
    let r = replicas([1 << 20, 1 << 20]).await;
    let metrics = Metrics::new("twinvol_frontend");
    let m = Mirror::connect(config(&r, 1), metrics.clone())
        .await
        .expect("connect");
    for i in 0..10u64 {
        m.read(i * 4096, 4096).await.expect("read");
    }
    let text = metrics.encode();
    let count = |replica: &str| {
        let key = format!(
            "twinvol_frontend_io_latency_seconds_count{{volume=\"v1\",replica=\"{replica}\",op=\"Read\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("b"), 10, "local replica b serves reads:\n{text}");
    assert_eq!(count("a"), 0, "remote replica a serves none");
}

/// Compares each replica's data file with `image`.
fn assert_replicas_hold(r: &Replicas, image: &[u8]) {
    for path in &r.data {
        let on_disk = std::fs::read(path).expect("read data file");
        if let Some(at) = on_disk.iter().zip(image).position(|(a, b)| a != b) {
            panic!("{} differs from the image at byte {at}", path.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_went_away_still_reaches_both_replicas() {
    let size = 24 << 20;
    let r = replicas([size, size]).await;
    let m = Mirror::connect(config(&r, 1), Metrics::new("twinvol_frontend"))
        .await
        .expect("connect");
    let mut image = vec![0u8; size as usize];
    // Each write is polled once (it is handed to the replicas' connections)
    // and then dropped, as an NBD client reset drops the export's futures;
    // the last one larger than a protocol request (split into chunks). They
    // do not overlap (overlapping writes in flight at once have no order for
    // the client; `tests/overlapping_writes.rs` checks
    // that the replicas still agree).
    for i in 0..49u64 {
        let (off, len) = if i == 48 {
            (16 << 20, MAX_IO_BYTES as usize + 8192)
        } else {
            (i * 256 * 1024, 128 * 1024)
        };
        let data = pattern(1000 + i, len);
        image[off as usize..off as usize + len].copy_from_slice(&data);
        let w = m.write(off, data, false);
        let _ = tokio::time::timeout(Duration::ZERO, w).await;
    }
    assert!(
        m.drain(Duration::from_secs(30)).await,
        "{} writes still in flight",
        m.writes_in_flight()
    );
    assert_eq!(m.writes_in_flight(), 0);
    m.flush().await.expect("flush");
    assert_replicas_hold(&r, &image);
    // Nothing was left half-done: the activity logs may be forgotten.
    m.forget_activity().await.expect("forget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_and_write_zeroes_go_in_pieces_and_reach_both_replicas() {
    let size = 160 << 20;
    let r = replicas([size, size]).await;
    let m = Mirror::connect(config(&r, 1), Metrics::new("twinvol_frontend"))
        .await
        .expect("connect");
    let data = pattern(7, size as usize);
    for (i, part) in data.chunks(MAX_IO_BYTES as usize).enumerate() {
        let off = (i * MAX_IO_BYTES as usize) as u64;
        m.write(off, Bytes::copy_from_slice(part), false)
            .await
            .expect("fill");
    }
    let mut image = data.to_vec();
    // More than two pieces each, not aligned to them.
    let (t_off, t_len) = (4096u64, 2 * DISCARD_CHUNK + 12_288);
    m.trim(t_off, t_len).await.expect("trim");
    image[t_off as usize..(t_off + u64::from(t_len)) as usize].fill(0);
    let (z_off, z_len) = (
        size - u64::from(DISCARD_CHUNK) - 40_960,
        DISCARD_CHUNK + 8192,
    );
    m.write_zeroes(z_off, z_len, true)
        .await
        .expect("write zeroes");
    image[z_off as usize..(z_off + u64::from(z_len)) as usize].fill(0);
    m.flush().await.expect("flush");
    assert_replicas_hold(&r, &image);
}
