//! Issue 9, finding 2: a replica that was out of sync must never become a
//! resync source. The direction of every resync comes from the arbiter's
//! record: only a replica the record lists as in sync copies to its peer,
//! and a target refuses copies from a source the record lists as out of
//! sync.
//!
//! The scenario, with real processes and the file arbiter:
//! 1. replica a is killed under writes; the frontend swaps it out, b tracks
//!    it (a dirty-tracking header on b);
//! 2. a returns, b's resync copies what it missed, the frontend returns a to
//!    the in-sync set — and b's link drops the message that would tell b
//!    that a is back (a proxy between the frontend and b cuts the link at
//!    exactly that frame): b keeps its tracking header, which has outlived
//!    its reason;
//! 3. the frontend times b out and swaps *b* out: a alone is in sync, and
//!    new data is written (acknowledged by a alone);
//! 4. b is killed and restarted: it recovers its stale header and its
//!    activity-log extents, marks them dirty and — before the fix — copied
//!    them onto a, the only in-sync replica, at the current epoch,
//!    overwriting acknowledged writes with old data. Now b is no source:
//!    its view of the record (learned from the frontend, from a's resync
//!    claim, or from a's refusal of its own claim) lists it out of sync;
//! 5. the link returns, b rejoins through a's resync.
//!
//! The check: every write acknowledged in step 3 reads back through the
//! frontend, and the two replica files end identical. Needs qemu-io.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{
    KillOnDrop, MIB, Stack, StackOptions, qemu_io, run_with_deadline, start_proc, wait_until,
};
use twinvol_engine::protocol::codec::decode_body;
use twinvol_engine::protocol::{Message, Op, Request};

const DEADLINE: Duration = Duration::from_secs(60);
const SIZE: u64 = 64 * MIB;
/// One 64 KiB slot at the start of each 4 MiB activity-log extent.
const SLOT: u64 = 64 * 1024;
const EXTENT: u64 = 4 * MIB;

/// Whether `body` is a request telling a replica that its peer is back in
/// the in-sync set.
fn tells_peer_back(body: &[u8]) -> bool {
    matches!(
        decode_body(Bytes::copy_from_slice(body)),
        Ok(Message::Request(Request {
            op: Op::PeerState { peer, view, .. },
            ..
        })) if view.lists(&peer)
    )
}

#[derive(Default)]
struct ProxyState {
    /// Cut at the first frame that tells b its peer is back.
    armed: AtomicBool,
    cut: AtomicBool,
    /// Every socket of the proxy (kept open while cut, like a link that
    /// drops packets; shut down when the link is restored).
    sockets: Mutex<Vec<TcpStream>>,
}

/// A TCP proxy in front of replica b for the frontend's connections: it
/// forwards both ways, frame by frame from the frontend, until the frame
/// it is armed for; then nothing passes either way (connections stay open,
/// new ones are accepted and held) until [`Proxy::restore`].
struct Proxy {
    addr: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let state = Arc::new(ProxyState::default());
        let s = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let keep = |sock: &TcpStream| {
                    if let Ok(c) = sock.try_clone() {
                        s.sockets.lock().expect("lock").push(c);
                    }
                };
                keep(&client);
                if s.cut.load(Ordering::SeqCst) {
                    continue; // held: the link is down
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                keep(&server);
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let up = s.clone();
                std::thread::spawn(move || forward_frames(client, server, &up));
                let down = s.clone();
                std::thread::spawn(move || forward_bytes(s2, c2, &down));
            }
        });
        Proxy { addr, state }
    }

    /// From now on, the first frame that tells b its peer is back cuts
    /// the link.
    fn arm(&self) {
        self.state.armed.store(true, Ordering::SeqCst);
    }

    fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// The link returns: the connections it cut are closed (their peers
    /// reconnect) and new ones are forwarded.
    fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        for s in self.state.sockets.lock().expect("lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Frontend → replica, one frame at a time.
fn forward_frames(mut from: TcpStream, mut to: TcpStream, state: &ProxyState) {
    loop {
        let mut header = [0u8; 8];
        if from.read_exact(&mut header).is_err() {
            return;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() || state.cut.load(Ordering::SeqCst) {
            return;
        }
        if state.armed.load(Ordering::SeqCst) && tells_peer_back(&body) {
            state.armed.store(false, Ordering::SeqCst);
            state.cut.store(true, Ordering::SeqCst);
            return;
        }
        if to.write_all(&header).is_err() || to.write_all(&body).is_err() {
            return;
        }
    }
}

/// Replica → frontend.
fn forward_bytes(mut from: TcpStream, mut to: TcpStream, state: &ProxyState) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// qemu-io commands writing pattern `p` into the slot of every extent.
fn write_slots(p: u8) -> Vec<String> {
    (0..SIZE / EXTENT)
        .map(|k| format!("write -P {p} {} {SLOT}", k * EXTENT))
        .chain(std::iter::once("flush".to_owned()))
        .collect()
}

fn run_qemu_io(stack: &Stack, cmds: &[String]) -> String {
    let out = run_with_deadline(qemu_io::command(&stack.nbd_uri(), cmds), DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io failed:\n{text}\n{}",
        stack.log_tails(30)
    );
    text
}

fn arbiter_has(stack: &Stack, needle: &str) -> bool {
    wait_until(DEADLINE, || {
        stack.arbiter_show().contains(needle).then_some(())
    })
    .is_some()
}

#[test]
fn a_replica_the_record_lists_out_of_sync_never_copies_onto_the_in_sync_one() {
    let mut stack = Stack::start(StackOptions {
        size: SIZE,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    let proxy = Proxy::start(stack.replicas[1].addr.clone());
    let mut args = stack.frontend_args(1);
    for a in args.iter_mut() {
        if a.starts_with("b=") {
            *a = format!("b={}", proxy.addr);
        }
    }
    args.extend([
        "--nbd-unix".into(),
        stack.nbd_socket().display().to_string(),
    ]);
    let frontend = KillOnDrop(start_proc("frontend-proxied", args, stack.dir()));

    // 1. Both in sync; every extent written; then a is lost under writes.
    run_qemu_io(&stack, &write_slots(0x11));
    stack.kill_replica(0);
    run_qemu_io(&stack, &write_slots(0x22));
    assert!(arbiter_has(&stack, "out_of_sync: a\n"), "a never left");

    // 2. a returns and rejoins; b never hears that it did.
    proxy.arm();
    stack.start_replica(0);
    let cut = wait_until(DEADLINE, || proxy.is_cut().then_some(()));
    assert!(
        cut.is_some(),
        "the frontend never told b that a is back:\n{}",
        stack.log_tails(30)
    );
    assert!(arbiter_has(&stack, "in_sync: a,b\n"), "a never rejoined");

    // 3. b times out and leaves; what is written now is on a alone.
    run_qemu_io(&stack, &write_slots(0x33));
    assert!(
        arbiter_has(&stack, "out_of_sync: b\n"),
        "b never left:\n{}",
        stack.log_tails(30)
    );
    run_qemu_io(&stack, &write_slots(0x44));

    // 4. b restarts with its stale tracking header and activity log. It
    // either copies onto a (the bug) or is refused / refuses itself.
    stack.kill_replica(1);
    stack.start_replica(1);
    let b_log = stack.replica_log_paths()[1].clone();
    let since_restart = || {
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        log.rsplit("replica serving")
            .next()
            .unwrap_or("")
            .to_owned()
    };
    // b knows it is no source by now (it learned a's newer record from a's
    // resync claim, or learns it from a's refusal), or — the bug — it
    // starts copying onto a.
    let outcome = wait_until(DEADLINE, || {
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        if since_restart().contains("resync started") {
            return Some("resync started (copying onto a)");
        }
        [
            "it is no resync source",
            "not a resync source",
            "outlived its reason",
        ]
        .into_iter()
        .find(|s| log.contains(s))
    });
    let outcome = outcome
        .unwrap_or_else(|| panic!("b's restart did nothing visible:\n{}", stack.log_tails(30)));
    eprintln!("b after its restart: {outcome}");
    // Whatever b does, what a alone acknowledged must stay readable: watch
    // it for a while (b's copies, if any, land within seconds).
    let reads: Vec<String> = (0..SIZE / EXTENT)
        .map(|k| format!("read -P 0x44 {} {SLOT}", k * EXTENT))
        .collect();
    let lost = |stack: &Stack| {
        let out = run_with_deadline(qemu_io::command(&stack.nbd_uri(), &reads), DEADLINE);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.matches("Pattern verification failed").count(), text)
    };
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        let (n, text) = lost(&stack);
        assert_eq!(
            n,
            0,
            "{n} of {} writes acknowledged by a alone were overwritten by the stale replica b:\n{text}\n{}",
            reads.len(),
            stack.log_tails(40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // 5. The link returns; b rejoins.
    proxy.restore();
    assert!(
        arbiter_has(&stack, "in_sync: a,b\n"),
        "b never rejoined:\n{}",
        stack.log_tails(40)
    );

    // Every write acknowledged by a alone is still there, on both.
    let (n, text) = lost(&stack);
    assert_eq!(n, 0, "acknowledged writes lost after b's rejoin:\n{text}");
    let paths = stack.replica_data_paths();
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .args(&paths)
        .status()
        .expect("cmp");
    assert!(same.success(), "the replicas differ");
    drop(frontend);
}
