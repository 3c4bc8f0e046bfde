//! A replica connection against an in-process replica server, through a
//! loopback "link" the test can cut (it stops forwarding both ways, the
//! sockets stay open: what a pulled cable looks like to TCP).

use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::metrics::Metrics;
use crate::protocol::PROTOCOL_VERSION;
use crate::replica::{Pool, ReplicaConfig, ReplicaServer};

const SECRET: &[u8] = b"connection-test-secret-0123";

fn vol() -> VolumeId {
    VolumeId::new("v1").expect("valid")
}

/// A replica server on loopback with a 256 MiB volume.
async fn replica() -> (tempfile::TempDir, String, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = Pool::open(dir.path()).expect("pool");
    pool.create_volume(&vol(), 256 << 20).expect("create");
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
    let addr = server.local_addr().to_string();
    let task = tokio::spawn(async move {
        let _ = server.run().await;
    });
    (dir, addr, task)
}

/// Forwards connections to `upstream` until `cut` is set; then nothing
/// passes (and nothing is read) either way.
async fn link(upstream: String, cut: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, cut.clone()));
            tokio::spawn(pipe(sr, cw, cut.clone()));
        }
    });
    addr
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn write(offset: u64, len: usize) -> Op {
    Op::Write {
        offset,
        fua: false,
        mirrored: false,
        data: Bytes::from(vec![0x5a; len]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_aborts_a_connection_blocked_writing_into_a_cut_link() {
    let (_dir, addr, _server) = replica().await;
    let cut = Arc::new(AtomicBool::new(false));
    let spec = ReplicaSpec {
        id: ReplicaId::new("a").expect("valid"),
        addr: link(addr, cut.clone()).await,
    };
    let params = SessionParams::frontend(
        vol(),
        Epoch(1),
        Secret::from_bytes(SECRET),
        PROTOCOL_VERSION,
    );
    let m = Metrics::new("test");
    let h = Arc::new(
        ReplicaHandle::connect(spec, params, m.handles("v1", "a"))
            .await
            .expect("connect"),
    );
    assert_eq!(h.call(write(0, 4096)).await.expect("write"), Reply::Done);
    // The link goes; 64 MiB of writes fill the socket buffers: the
    // connection task blocks writing.
    cut.store(true, Ordering::SeqCst);
    let calls: Vec<_> = (0..16u64)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.call(write(i * (4 << 20), 4 << 20)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(calls.iter().all(|c| !c.is_finished()), "the link is cut");
    let floor = h.give_up();
    assert_eq!(floor, SessionGen(2), "the one session so far is given up");
    assert_eq!(h.abandoned_below(), floor);
    // Without waiting for the link: every write fails at once.
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("the blocked connection was aborted, not left waiting")
            .expect("join");
        assert!(matches!(r, Err(CallError::ConnectionLost { .. })), "{r:?}");
    }
    // The link returns: a new session (above the floor) serves.
    cut.store(false, Ordering::SeqCst);
    let r = tokio::time::timeout(Duration::from_secs(20), h.call(write(0, 4096)))
        .await
        .expect("served again");
    assert_eq!(r.expect("write"), Reply::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_of_the_client_fences_the_older_one_and_a_restart_skips_past_it() {
    let (_dir, addr, _server) = replica().await;
    let spec = ReplicaSpec {
        id: ReplicaId::new("a").expect("valid"),
        addr,
    };
    let params = || {
        SessionParams::frontend(
            vol(),
            Epoch(1),
            Secret::from_bytes(SECRET),
            PROTOCOL_VERSION,
        )
    };
    let m = Metrics::new("test");
    let first = ReplicaHandle::connect(spec.clone(), params(), m.handles("v1", "a"))
        .await
        .expect("connect");
    assert_eq!(
        first.call(write(0, 4096)).await.expect("write"),
        Reply::Done
    );
    // A second process of the same client (its counter starts over): its
    // generation 1 is refused, it continues from the replica's floor, and
    // its session fences the first one's.
    let second_params = params();
    let counter = second_params.generations.clone();
    let second = ReplicaHandle::connect(spec, second_params, m.handles("v1", "a"))
        .await
        .expect("connect past the floor");
    assert_eq!(
        counter.next.load(Ordering::SeqCst),
        3,
        "skipped to 2, used it"
    );
    assert_eq!(
        second.call(write(0, 4096)).await.expect("write"),
        Reply::Done
    );
    assert!(matches!(
        first.call(write(0, 4096)).await,
        Err(CallError::ConnectionLost { .. })
    ));
}
