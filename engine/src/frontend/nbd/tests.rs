//! Tests of the NBD server as a whole, over in-memory streams against an
//! in-memory backend: request checking, concurrency, and the property that
//! no byte sequence a client sends can panic or hang the server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::wire::{self, NbdErrno};
use super::{Peer, serve_connection};
use crate::frontend::backend::{BackendError, BlockBackend, check_range};

/// A volume in memory; counts writes so tests can tell data was untouched.
struct MemBackend {
    data: Mutex<Vec<u8>>,
    writes: Mutex<u64>,
}

impl MemBackend {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(MemBackend {
            data: Mutex::new(vec![0; size]),
            writes: Mutex::new(0),
        })
    }
    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("lock").clone()
    }
    fn writes(&self) -> u64 {
        *self.writes.lock().expect("lock")
    }
    fn put(&self, offset: u64, bytes: &[u8]) -> Result<(), BackendError> {
        check_range(offset, bytes.len() as u64, self.size())?;
        *self.writes.lock().expect("lock") += 1;
        let at = offset as usize;
        self.data.lock().expect("lock")[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().expect("lock").len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        check_range(offset, u64::from(len), self.size())?;
        // Yield so that concurrent requests really interleave.
        tokio::task::yield_now().await;
        let at = offset as usize;
        Ok(Bytes::copy_from_slice(
            &self.data.lock().expect("lock")[at..at + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        tokio::task::yield_now().await;
        self.put(offset, &data)
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, false).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), BackendError> {
        self.put(offset, &vec![0; len as usize])
    }
}

const SIZE: usize = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(10);

/// Starts a server connection over an in-memory pipe; returns the client end.
fn connect(backend: Arc<MemBackend>) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(server);
    let task = tokio::spawn(serve_connection(r, w, backend, Peer::Other("test")));
    (client, task)
}

/// Negotiates with NBD_OPT_GO; returns the export size and flags.
async fn go(client: &mut DuplexStream) -> (u64, u16) {
    let mut greeting = [0u8; wire::GREETING_LEN];
    client.read_exact(&mut greeting).await.expect("greeting");
    client
        .write_u32(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES)
        .await
        .expect("flags");
    let mut opt = Vec::new();
    opt.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    client.write_all(&opt).await.expect("go");
    let (mut size, mut flags) = (0, 0);
    loop {
        let mut header = [0u8; 20];
        client.read_exact(&mut header).await.expect("reply");
        let mut h = &header[..];
        assert_eq!(h.get_u64(), wire::OPT_REPLY_MAGIC);
        assert_eq!(h.get_u32(), wire::OPT_GO);
        let kind = h.get_u32();
        let mut data = vec![0; h.get_u32() as usize];
        client.read_exact(&mut data).await.expect("reply data");
        match kind {
            wire::REP_ACK => return (size, flags),
            wire::REP_INFO => {
                let mut d = &data[..];
                if d.get_u16() == wire::INFO_EXPORT {
                    size = d.get_u64();
                    flags = d.get_u16();
                }
            }
            other => panic!("unexpected option reply {other:#x}"),
        }
    }
}

async fn send(client: &mut DuplexStream, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
    let mut req = Vec::new();
    wire::encode_request(&mut req, flags, cmd, handle, offset, len);
    client.write_all(&req).await.expect("request");
}

/// Reads one simple reply: (handle, error).
async fn reply(client: &mut DuplexStream) -> (u64, u32) {
    let mut raw = [0u8; wire::SIMPLE_REPLY_LEN];
    client.read_exact(&mut raw).await.expect("reply");
    let mut r = &raw[..];
    assert_eq!(r.get_u32(), wire::SIMPLE_REPLY_MAGIC);
    let error = r.get_u32();
    (r.get_u64(), error)
}

#[tokio::test]
async fn go_reports_size_and_transmission_flags() {
    let backend = MemBackend::new(SIZE);
    let (mut client, _task) = connect(backend);
    let (size, flags) = tokio::time::timeout(DEADLINE, go(&mut client))
        .await
        .expect("deadline");
    assert_eq!(size, SIZE as u64);
    for flag in [
        wire::TFLAG_HAS_FLAGS,
        wire::TFLAG_SEND_FLUSH,
        wire::TFLAG_SEND_FUA,
        wire::TFLAG_SEND_TRIM,
        wire::TFLAG_SEND_WRITE_ZEROES,
        wire::TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} missing");
    }
}

#[tokio::test]
async fn out_of_range_and_malformed_requests_are_refused_without_touching_data() {
    let backend = MemBackend::new(SIZE);
    let (mut client, task) = connect(backend.clone());
    go(&mut client).await;
    let before = backend.snapshot();
    // A write crossing the end: ENOSPC, payload consumed, nothing written.
    send(&mut client, 0, wire::CMD_WRITE, 1, SIZE as u64 - 512, 1024).await;
    client.write_all(&[0xaa; 1024]).await.expect("payload");
    assert_eq!(reply(&mut client).await, (1, NbdErrno::Enospc as u32));
    // A read past the end, a read with an unknown flag, a zero-length
    // write, an unknown command, write-zeroes past the end: all refused.
    send(&mut client, 0, wire::CMD_READ, 2, SIZE as u64, 1).await;
    assert_eq!(reply(&mut client).await, (2, NbdErrno::Einval as u32));
    send(&mut client, 1 << 7, wire::CMD_READ, 3, 0, 512).await;
    assert_eq!(reply(&mut client).await, (3, NbdErrno::Einval as u32));
    send(&mut client, 0, wire::CMD_WRITE, 4, 0, 0).await;
    assert_eq!(reply(&mut client).await, (4, NbdErrno::Einval as u32));
    send(&mut client, 0, 42, 5, 0, 512).await;
    assert_eq!(reply(&mut client).await, (5, NbdErrno::Einval as u32));
    send(
        &mut client,
        0,
        wire::CMD_WRITE_ZEROES,
        6,
        u64::MAX - 10,
        100,
    )
    .await;
    assert_eq!(reply(&mut client).await, (6, NbdErrno::Enospc as u32));
    // FUA on a flush or a read is accepted (and means nothing more).
    send(&mut client, wire::CMD_FLAG_FUA, wire::CMD_FLUSH, 10, 0, 0).await;
    assert_eq!(reply(&mut client).await, (10, 0));
    send(&mut client, wire::CMD_FLAG_FUA, wire::CMD_READ, 11, 0, 16).await;
    assert_eq!(reply(&mut client).await, (11, 0));
    let mut data = [0u8; 16];
    client.read_exact(&mut data).await.expect("read data");
    // The stream is still in step: a valid write works.
    send(&mut client, wire::CMD_FLAG_FUA, wire::CMD_WRITE, 7, 4096, 4).await;
    client.write_all(b"abcd").await.expect("payload");
    assert_eq!(reply(&mut client).await, (7, 0));
    assert_eq!(backend.writes(), 1);
    let after = backend.snapshot();
    assert_eq!(&after[4096..4100], b"abcd");
    assert_eq!(before[..4096], after[..4096]);
    assert_eq!(before[4100..], after[4100..]);
    send(&mut client, 0, wire::CMD_DISC, 8, 0, 0).await;
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("ends")
        .expect("no panic");
}

#[tokio::test]
async fn an_oversized_write_is_refused_and_the_connection_closed() {
    let backend = MemBackend::new(SIZE);
    let (mut client, task) = connect(backend.clone());
    go(&mut client).await;
    send(
        &mut client,
        0,
        wire::CMD_WRITE,
        9,
        0,
        super::MAX_PAYLOAD + 1,
    )
    .await;
    assert_eq!(reply(&mut client).await, (9, NbdErrno::Einval as u32));
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("ends")
        .expect("no panic");
    assert_eq!(backend.writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_all_get_their_own_reply() {
    let backend = MemBackend::new(SIZE);
    let (mut client, task) = connect(backend.clone());
    go(&mut client).await;
    let n = 256u64;
    for i in 0..n {
        send(&mut client, 0, wire::CMD_WRITE, i, i * 4096, 4096).await;
        client.write_all(&[i as u8; 4096]).await.expect("payload");
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (handle, error) = tokio::time::timeout(DEADLINE, reply(&mut client))
            .await
            .expect("reply");
        assert_eq!(error, 0);
        assert!(
            !std::mem::replace(&mut seen[handle as usize], true),
            "duplicate reply"
        );
    }
    for i in 0..n {
        send(&mut client, 0, wire::CMD_READ, 1000 + i, i * 4096, 4096).await;
    }
    for _ in 0..n {
        let (handle, error) = reply(&mut client).await;
        assert_eq!(error, 0);
        let mut data = vec![0; 4096];
        client.read_exact(&mut data).await.expect("data");
        let i = handle - 1000;
        assert!(
            data.iter().all(|b| *b == i as u8),
            "read {i} returned other data"
        );
    }
    send(&mut client, 0, wire::CMD_DISC, 0, 0, 0).await;
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("ends")
        .expect("no panic");
}

/// Runs a server connection on `input` (the client's whole byte stream,
/// then EOF) and checks that it ends, without panicking, in bounded time.
fn server_survives(prefix: Vec<u8>, input: Vec<u8>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let backend = MemBackend::new(64 * 1024);
        let (client, task) = connect(backend);
        let (mut cr, mut cw) = tokio::io::split(client);
        // Drain whatever the server says so it never blocks on writing.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = cr.read_to_end(&mut sink).await;
        });
        let _ = cw.write_all(&prefix).await;
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
        let ended = tokio::time::timeout(DEADLINE, task).await;
        prop_assert!(ended.is_ok(), "server did not end after EOF");
        prop_assert!(ended.expect("checked").is_ok(), "server panicked");
        drain.abort();
        Ok(())
    })
}

/// A client that negotiates correctly with NBD_OPT_GO.
fn valid_negotiation() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes());
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    out.extend_from_slice(&6u32.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    out
}

/// Arbitrary requests with a valid magic, so the fuzzing reaches past the
/// magic check (offsets and lengths are often out of range, flags unknown).
fn request_stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (
            any::<u16>(),
            0u16..10,
            any::<u64>(),
            any::<u64>(),
            0u32..70_000,
            any::<bool>(),
        ),
        0..16,
    )
    .prop_map(|reqs| {
        let mut out = Vec::new();
        for (flags, cmd, handle, offset, len, small_offset) in reqs {
            let offset = if small_offset {
                offset % 70_000
            } else {
                offset
            };
            wire::encode_request(&mut out, flags % 4, cmd, handle, offset, len);
            if cmd == wire::CMD_WRITE {
                out.extend(std::iter::repeat_n(0x5a, (len % 5000) as usize));
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_during_negotiation_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        server_survives(Vec::new(), input)?;
    }

    #[test]
    fn arbitrary_bytes_during_transmission_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        server_survives(valid_negotiation(), input)?;
    }

    #[test]
    fn arbitrary_requests_never_panic(input in request_stream()) {
        server_survives(valid_negotiation(), input)?;
    }
}
