//! The workload: real NBD clients writing in a thread until stopped.
//!
//! Two kinds of batch, each one client process:
//! - *small*: one qemu-io writing 4–16 writes of 4 KiB–256 KiB in order in
//!   the small region (half of them in its first MiB: overwrites, hot
//!   regions), one in eight with FUA. qemu-io prints `wrote …` once a write
//!   is acknowledged: those are the acknowledged writes.
//! - *large*: one nbdcopy writing the whole large region as 4 MiB writes,
//!   all 16 in flight at once (`--requests=16`), sometimes followed by a
//!   flush. So a deep queue of big writes is on the wire when a fault comes
//!   (a link cut leaves megabytes queued in TCP that are retransmitted when
//!   it returns). nbdcopy reports no write alone: exit 0 means every one was
//!   acknowledged; otherwise each may or may not have landed.
//!
//! The mix of kinds ([`Mix`]) can change while the writer runs, and the
//! harness can kill the running client ([`Writer::kill_client`]: an NBD
//! client reset with writes in flight).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::rng::Rng;
use crate::common::{MIB, qemu_io, wait_until};
use crate::model::{Outcome, Write};
use crate::{BLOCK, Draw, LARGE, LARGE_WRITE, SMALL_LEN, SMALL_START};

/// A write batch held longer than this: I/O is stuck.
pub const IO_STALL: Duration = Duration::from_secs(90);

/// Which batches the writer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Small batches only.
    Small,
    /// Mostly small, one batch in four large.
    Mixed,
    /// Large batches only (a deep queue of 4 MiB writes, always).
    Large,
}

/// The client process of the batch running now.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub pid: u32,
    pub large: bool,
    pub started: Instant,
}

/// What the writer thread and the harness share.
struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    mix: AtomicU8,
    /// Set while a client runs; cleared (under the lock) before it is
    /// reaped, so that a pid read under the lock is never a reused one.
    client: Mutex<Option<Client>>,
    large_batches: AtomicU64,
}

/// What a write phase hands back.
pub struct Written {
    /// Each write, its outcome and when its batch ran (UTC).
    pub results: Vec<(Write, Outcome, String)>,
    pub rng: Rng,
    pub next_id: u64,
    pub stalled: Option<String>,
}

pub struct Writer {
    shared: Arc<Shared>,
    handle: JoinHandle<Written>,
}

/// Where and how to write.
pub struct Target {
    pub uri: String,
    pub dir: PathBuf,
    pub seed: u64,
}

impl Writer {
    pub fn start(target: Target, rng: Rng, next_id: u64, mix: Mix) -> Writer {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            mix: AtomicU8::new(mix as u8),
            client: Mutex::new(None),
            large_batches: AtomicU64::new(0),
        });
        let s = shared.clone();
        let handle = std::thread::spawn(move || write_loop(&target, rng, next_id, &s));
        Writer { shared, handle }
    }

    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    pub fn large_batches(&self) -> u64 {
        self.shared.large_batches.load(Ordering::SeqCst)
    }

    /// Whether the writer thread ended (it does only when stopped, or
    /// when a batch stalled).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn set_mix(&self, mix: Mix) {
        self.shared.mix.store(mix as u8, Ordering::SeqCst);
    }

    /// Waits until `n` more writes were acknowledged than `since`.
    pub fn wait_acked(&self, since: u64, n: u64, deadline: Duration) -> bool {
        wait_until(deadline, || {
            (self.acked() >= since + n || self.handle.is_finished()).then_some(())
        });
        self.acked() >= since + n
    }

    /// Waits (up to `deadline`) for a client that has run at least `age`
    /// (a large one if `large`) and kills it with SIGKILL: its writes in
    /// flight are cut off mid-way. Returns the client killed.
    pub fn kill_client(&self, large: bool, age: Duration, deadline: Duration) -> Option<Client> {
        let t = Instant::now();
        wait_until(deadline, || {
            let guard = self.shared.client.lock().expect("client lock");
            let age = relaxed(age, t);
            let c = (*guard).filter(|c| c.large == large && c.started.elapsed() >= age)?;
            // SAFETY: kill(2) on a child of this process that has not been
            // reaped (the writer clears the slot under this lock first).
            unsafe {
                libc::kill(c.pid as i32, libc::SIGKILL);
            }
            Some(c)
        })
    }

    /// Waits (up to `deadline`) until a client of the kind asked for has
    /// been running for `age`; whether one was.
    pub fn wait_client(&self, large: bool, age: Duration, deadline: Duration) -> bool {
        let t = Instant::now();
        wait_until(deadline, || {
            let guard = self.shared.client.lock().expect("client lock");
            let age = relaxed(age, t);
            (*guard)
                .filter(|c| c.large == large && c.started.elapsed() >= age)
                .map(|_| ())
        })
        .is_some()
    }

    /// Lets the current batch finish and returns everything written.
    pub fn finish(self) -> Written {
        self.shared.stop.store(true, Ordering::SeqCst);
        let done = wait_until(IO_STALL + Duration::from_secs(10), || {
            self.handle.is_finished().then_some(())
        });
        assert!(done.is_some(), "the writer did not stop");
        self.handle.join().expect("writer thread")
    }
}

/// The age a client must reach: `age` for the first 5 s of looking, then
/// any (batches may all be quicker than `age`).
fn relaxed(age: Duration, looking_since: Instant) -> Duration {
    if looking_since.elapsed() < Duration::from_secs(5) {
        age
    } else {
        Duration::from_millis(1)
    }
}

fn mix_of(v: u8) -> Mix {
    match v {
        0 => Mix::Small,
        1 => Mix::Mixed,
        _ => Mix::Large,
    }
}

fn write_loop(t: &Target, mut rng: Rng, mut next_id: u64, shared: &Shared) -> Written {
    let mut results = Vec::new();
    let mut buf = vec![0u8; LARGE_WRITE as usize];
    while !shared.stop.load(Ordering::SeqCst) {
        let large = match mix_of(shared.mix.load(Ordering::SeqCst)) {
            Mix::Small => false,
            Mix::Mixed => rng.one_in(4),
            Mix::Large => true,
        };
        let batch = if large {
            large_batch(t, &mut rng, &mut next_id, &mut buf)
        } else {
            small_batch(t, &mut rng, &mut next_id, &mut buf)
        };
        let sent = utc_now();
        let (outcomes, stalled) = if large {
            shared.large_batches.fetch_add(1, Ordering::SeqCst);
            let flush = rng.one_in(4);
            run_large(t, &batch, flush, shared)
        } else {
            run_small(t, &batch, shared)
        };
        let span = format!("{sent}..{}", utc_now());
        for w in &batch {
            let _ = std::fs::remove_file(t.dir.join(format!("w{}", w.id)));
        }
        let _ = std::fs::remove_file(t.dir.join("large"));
        let not_sent = outcomes.iter().all(|o| *o == Outcome::NotSent);
        results.extend(
            batch
                .into_iter()
                .zip(outcomes)
                .map(|(w, o)| (w, o, span.clone())),
        );
        if stalled.is_some() {
            return Written {
                results,
                rng,
                next_id,
                stalled,
            };
        }
        if not_sent {
            // No frontend serving (a new one waits for the lease).
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Written {
        results,
        rng,
        next_id,
        stalled: None,
    }
}

fn small_batch(t: &Target, rng: &mut Rng, next_id: &mut u64, buf: &mut [u8]) -> Vec<Write> {
    (0..rng.range(4, 17))
        .map(|_| {
            let id = *next_id;
            *next_id += 1;
            let blocks = match rng.range(0, 10) {
                0..=5 => rng.range(1, 3),
                6..=8 => rng.range(3, 17),
                _ => 64,
            };
            // Half the writes in the first MiB: overwrites and hot regions.
            let span = if rng.one_in(2) { MIB } else { SMALL_LEN } / BLOCK;
            let first = rng.range(0, span - blocks + 1);
            let (offset, len) = (SMALL_START + first * BLOCK, blocks * BLOCK);
            let fua = rng.one_in(8);
            let w = Write::data(t.seed, id, offset, len, fua, buf);
            std::fs::write(t.dir.join(format!("w{id}")), &buf[..len as usize])
                .expect("write data file");
            w
        })
        .collect()
}

fn large_batch(t: &Target, _rng: &mut Rng, next_id: &mut u64, buf: &mut [u8]) -> Vec<Write> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(t.dir.join("large")).expect("large data file");
    (0..LARGE / LARGE_WRITE)
        .map(|k| {
            let id = *next_id;
            *next_id += 1;
            let w = Write::data(t.seed, id, k * LARGE_WRITE, LARGE_WRITE, false, buf);
            file.write_all(buf).expect("write large data file");
            w
        })
        .collect()
}

/// Starts `cmd`, publishes it as the running client, waits for it (at
/// most [`IO_STALL`]) and returns its output, and whether it stalled.
fn run_client(mut cmd: Command, large: bool, shared: &Shared) -> (std::process::Output, bool) {
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start an NBD client");
    *shared.client.lock().expect("client lock") = Some(Client {
        pid: child.id(),
        large,
        started: Instant::now(),
    });
    // Read the pipes while waiting (nbdcopy or qemu-io could fill them).
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        {
            let mut slot = shared.client.lock().expect("client lock");
            if let Ok(Some(status)) = child.try_wait() {
                *slot = None;
                break Some(status);
            }
            if started.elapsed() > IO_STALL {
                *slot = None;
                let _ = child.kill();
                break None;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = match status {
        Some(s) => s,
        None => child.wait().expect("reap the client"),
    };
    let output = std::process::Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    (output, started.elapsed() > IO_STALL)
}

fn stall_note(what: &str, out: &std::process::Output) -> String {
    format!(
        "a {what} batch made no progress for {IO_STALL:?} (I/O held for good?); it said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One qemu-io process writing `batch` in order; each write's outcome
/// from its `wrote LEN/LEN bytes at offset OFF` line.
fn run_small(t: &Target, batch: &[Write], shared: &Shared) -> (Vec<Outcome>, Option<String>) {
    let writes: Vec<String> = batch
        .iter()
        .map(|w| {
            let file = t.dir.join(format!("w{}", w.id));
            let fua = if w.fua { "-f " } else { "" };
            format!("write {fua}-s {} {} {}", file.display(), w.offset, w.len)
        })
        .collect();
    let (out, stalled) = run_client(qemu_io::command(&t.uri, &writes), false, shared);
    let outcomes = qemu_io_outcomes(batch, &out, &shared.acked);
    (outcomes, stalled.then(|| stall_note("qemu-io", &out)))
}

/// Outcomes of a qemu-io batch from its output (`wrote …`, `discard …`).
pub fn qemu_io_outcomes(
    batch: &[Write],
    out: &std::process::Output,
    acked: &AtomicU64,
) -> Vec<Outcome> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut outcomes = vec![Outcome::Maybe; batch.len()];
    let mut next = 0;
    for line in stdout.lines() {
        let Some((len, off)) = parse_done(line) else {
            continue;
        };
        // The first write from `next` on with this extent; those skipped
        // failed (they stay Maybe).
        if let Some(k) =
            (next..batch.len()).find(|&k| batch[k].offset == off && batch[k].len == len)
        {
            outcomes[k] = Outcome::Acked;
            acked.fetch_add(1, Ordering::SeqCst);
            next = k + 1;
        }
    }
    if next == 0 && stderr.contains("can't open device") {
        outcomes.fill(Outcome::NotSent);
    }
    outcomes
}

/// One nbdcopy writing the large region with every write in flight at once.
fn run_large(
    t: &Target,
    batch: &[Write],
    flush: bool,
    shared: &Shared,
) -> (Vec<Outcome>, Option<String>) {
    let mut cmd = Command::new("nbdcopy");
    cmd.args([
        "--sparse=0",
        "--no-extents",
        "--connections=1",
        &format!("--request-size={LARGE_WRITE}"),
        &format!("--requests={}", LARGE / LARGE_WRITE),
    ]);
    if flush {
        cmd.arg("--flush");
    }
    cmd.arg(t.dir.join("large")).arg(&t.uri);
    let (out, stalled) = run_client(cmd, true, shared);
    let outcome = if out.status.success() {
        shared.acked.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Outcome::Acked
    } else if String::from_utf8_lossy(&out.stderr).contains("nbd_connect_uri") {
        Outcome::NotSent
    } else {
        Outcome::Maybe
    };
    (
        vec![outcome; batch.len()],
        stalled.then(|| stall_note("nbdcopy", &out)),
    )
}

/// Wall-clock time of day, UTC, as in the engine's logs (HH:MM:SS.mmm).
pub fn utc_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// `wrote 4096/4096 bytes at offset 8192`, `discard 4096/4096 bytes at
/// offset 0`: (length, offset).
fn parse_done(line: &str) -> Option<(u64, u64)> {
    let rest = line
        .strip_prefix("wrote ")
        .or_else(|| line.strip_prefix("discard "))?;
    let (len, rest) = rest.split_once('/')?;
    let off = rest.split_once("at offset ")?.1;
    Some((len.parse().ok()?, off.trim().parse().ok()?))
}

/// The directory of the batches' data files.
pub fn data_dir(root: &Path) -> PathBuf {
    root.join("writes")
}
