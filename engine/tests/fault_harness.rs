//! The randomized fault harness (design "Test pyramid", issue 5): a mirrored
//! volume as real processes — replica a and replica b each in its own
//! network namespace ("site"), both on one bridge with the host, a frontend
//! on the host with a file-backed arbiter and a short lease — takes random
//! faults while a real NBD client (qemu-io) writes, and every acknowledged
//! write is checked after every fault and at the end.
//!
//! Faults, chosen by a seeded RNG from those the current state allows:
//! kill -9 replica a or b (restarted after some degraded writes), cut a
//! site's link (host side of its veth down; restored likewise), kill -9 the
//! frontend (a new one takes the lease after expiry + margin, with a bumped
//! epoch), and — as a second fault while a returned replica catches up —
//! kill -9 the surviving replica during its resync (restarted) or the
//! frontend. A fault that removes a replica from the in-sync set is only
//! chosen when both are in sync (the arbiter says so): with one replica
//! already out, its peer's loss would leave no replica to write to. When one
//! is out the harness first waits, with a deadline, for the frontend to
//! return it; if returns are never seen, it goes on with the faults that
//! state allows (the survivor's outage, the other replica's, the frontend's).
//! While the only in-sync replica is away the writer goes on: its writes
//! must be held, then completed once the replica is back
//! (`TWINVOL_FAULT_HELD_IO=0` pauses the writer for such an outage instead).
//!
//! The write log: every write has its own data (each 4 KiB block starts with
//! the seed, the write id and the block's offset, then seeded noise), so a
//! stale, misplaced or foreign block is named in the failure. qemu-io prints
//! `wrote …` once a write is acknowledged: those are the acknowledged writes.
//! A write that failed or was in flight when its client lost the frontend
//! may or may not have landed: its blocks may hold either value until an
//! acknowledged write covers them again. Checks, with the writer quiet:
//! after every fault and every rejoin, the whole volume read through the
//! frontend (nbdcopy) and the data file of every replica the arbiter has in
//! sync; at the end, after the resync, the two replica files byte for byte.
//!
//! `TWINVOL_FAULT_SEED=S` replays the choices and the writes of a run
//! (timing, on a noisy machine, still varies); `TWINVOL_FAULTS=N` sets the
//! number of faults (default 20; `benches/fault-soak.sh` runs 500).
//! `TWINVOL_FAULT_KINDS=link-cut,frontend-kill` restricts the kinds of fault.
//! `TWINVOL_FAULT_KEEP=1` keeps the directory with the logs (and, after a
//! failure, `write-log.txt`: each write, its outcome, its batch's UTC time).
//! Needs root
//! (network namespaces), qemu-io and nbdcopy.
//!
//! Written apart from `common::Stack` because the harness needs what it
//! lacks: replicas started with `--peer` (for the resync) on fixed
//! addresses, and sites that reach each other (a bridge) so that a link
//! cut separates a site from both the frontend and the other site.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::rng::Rng;
use common::{
    MIB, Proc, command, create_volume, engine_bin, qemu_io, run_ok, run_with_deadline, start_proc,
    start_proc_in, wait_until,
};

const SIZE: u64 = 16 * MIB;
const BLOCK: u64 = 4096;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const VOLUME: &str = "v1";
const PORT: u16 = 7700;
const NAMES: [&str; 2] = ["a", "b"];
/// Short: a frontend kill costs expiry + margin (renewed every third).
const LEASE: [&str; 4] = ["--lease-duration", "2s", "--lease-margin", "1s"];
/// A whole-volume resync takes about a second: still copying when the
/// harness looks for a second fault, quick for the rejoin before the next.
const RESYNC_RATE: &str = "16M";
const DEFAULT_FAULTS: u32 = 20;
/// A write batch held longer than this: I/O is stuck.
const IO_STALL: Duration = Duration::from_secs(60);
/// From a replica's loss to the arbiter showing it out of sync.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);
/// For a returned replica to be back in the in-sync set.
const REJOIN_DEADLINE: Duration = Duration::from_secs(20);
/// For the final resync to end with identical files.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

/// The harness's draws from the shared xorshift generator.
trait Draw {
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64;
    fn one_in(&mut self, n: u64) -> bool;
    fn ms(&mut self, lo: u64, hi: u64) -> Duration;
}

impl Draw for Rng {
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// Stream `stream` of `seed` (xorshift must not start at zero).
fn stream(seed: u64, stream: u64) -> Rng {
    Rng((seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

// ---------------------------------------------------------------- sites --

/// Two network namespaces on a bridge with the host (10.X.Y.0/24: host .1,
/// site a .2, site b .3); removed on drop.
struct Sites {
    bridge: String,
    ns: [String; 2],
    host_if: [String; 2],
    ip: [String; 2],
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sites {
    fn create(tag: u32) -> Sites {
        // 10.200-249.*: apart from common::SiteNet's 10.100-199.*.
        let (x, y) = (200 + tag % 50, (tag >> 8) & 0xff);
        let t = format!("{:06x}", tag & 0xff_ffff);
        let sites = Sites {
            bridge: format!("tvf{t}br"),
            ns: NAMES.map(|n| format!("tvf-{t}-{n}")),
            host_if: NAMES.map(|n| format!("tvf{t}{n}")),
            ip: [2, 3].map(|h| format!("10.{x}.{y}.{h}")),
        };
        // From here on, Drop removes whatever exists.
        ip(&["link", "add", &sites.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.{x}.{y}.1/24"),
            "dev",
            &sites.bridge,
        ]);
        ip(&["link", "set", &sites.bridge, "up"]);
        for i in 0..2 {
            let (ns, host_if) = (&sites.ns[i], &sites.host_if[i]);
            let peer = format!("{host_if}p");
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", host_if, "type", "veth", "peer", "name", &peer,
            ]);
            ip(&["link", "set", &peer, "netns", ns]);
            ip(&["link", "set", host_if, "master", &sites.bridge, "up"]);
            let addr = format!("{}/24", sites.ip[i]);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &peer]);
            ip(&["-n", ns, "link", "set", &peer, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        sites
    }

    /// Cuts (`false`) or restores site `i`'s link to the host and the other site.
    fn set_link(&self, i: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_if[i],
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if[i]])
                .output();
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns[i]])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

// -------------------------------------------------------------- cluster --

/// The processes of the volume. Drop kills them (then the sites go).
struct Cluster {
    replicas: [Option<Proc>; 2],
    frontend: Option<Proc>,
    frontends_started: u32,
    sites: Sites,
    secret: PathBuf,
    root: Option<tempfile::TempDir>,
}

impl Cluster {
    fn start(tag: u32) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("twinvol-faults-")
            .tempdir()
            .expect("tempdir");
        let secret = root.path().join("secret");
        std::fs::write(&secret, "fault-harness-secret-0123456789abcdef\n").expect("secret");
        let mut c = Cluster {
            replicas: [None, None],
            frontend: None,
            frontends_started: 0,
            sites: Sites::create(tag),
            secret,
            root: Some(root),
        };
        for name in NAMES {
            let pool = c.dir().join(format!("pool-{name}"));
            std::fs::create_dir(&pool).expect("pool dir");
            create_volume(&pool, VOLUME, &SIZE.to_string());
        }
        let arbiter = c.arbiter_path().display().to_string();
        let replicas = ["--replica", "a", "--replica", "b"];
        c.engine(&[&["arbiter", "create", "--path", &arbiter][..], &replicas].concat());
        c.start_replica(0);
        c.start_replica(1);
        c.start_frontend();
        c
    }

    fn dir(&self) -> &Path {
        self.root.as_ref().expect("root until drop").path()
    }

    /// Runs `twinvol-engine ARGS`; fails the test if it fails.
    fn engine(&self, args: &[&str]) -> String {
        run_ok(command(engine_bin(), args), Duration::from_secs(30))
    }

    fn arbiter_path(&self) -> PathBuf {
        self.dir().join("arbiter.json")
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.sites.ip[i])
    }

    fn pool_file(&self, i: usize, file: &str) -> PathBuf {
        self.dir()
            .join(format!("pool-{}", NAMES[i]))
            .join(VOLUME)
            .join(file)
    }

    fn start_replica(&mut self, i: usize) {
        let args = vec![
            "replica".to_owned(),
            "--pool".into(),
            self.dir()
                .join(format!("pool-{}", NAMES[i]))
                .display()
                .to_string(),
            "--listen".into(),
            self.addr(i),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--peer".into(),
            format!("{}={}", NAMES[1 - i], self.addr(1 - i)),
            "--resync-rate".into(),
            RESYNC_RATE.into(),
        ];
        let name = format!("replica-{}", NAMES[i]);
        let p = start_proc_in(&name, args, self.dir(), Some(&self.sites.ns[i]));
        self.replicas[i] = Some(p);
    }

    fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].take() {
            p.kill();
        }
    }

    fn nbd_uri(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir().join("nbd.sock").display()
        )
    }

    /// Starts a frontend (a new lease holder) and waits until it serves:
    /// after a killed one, that is after its lease expired plus the margin.
    fn start_frontend(&mut self) {
        self.frontends_started += 1;
        let mut args: Vec<String> = [
            "frontend",
            "--volume",
            VOLUME,
            "--local",
            "a",
            "--secret-file",
        ]
        .map(str::to_owned)
        .to_vec();
        args.push(self.secret.display().to_string());
        args.extend([
            "--arbiter".into(),
            self.arbiter_path().display().to_string(),
        ]);
        args.extend([
            "--frontend-id".into(),
            format!("fe-{}", self.frontends_started),
        ]);
        for (i, name) in NAMES.iter().enumerate() {
            args.extend(["--replica".into(), format!("{name}={}", self.addr(i))]);
        }
        args.extend(LEASE.map(str::to_owned));
        args.extend([
            "--nbd-unix".into(),
            self.dir().join("nbd.sock").display().to_string(),
        ]);
        let name = format!("frontend-{}", self.frontends_started);
        self.frontend = Some(start_proc(&name, args, self.dir()));
    }

    fn kill_frontend(&mut self) {
        if let Some(mut p) = self.frontend.take() {
            p.kill();
        }
    }

    /// The arbiter's in-sync set, as `arbiter show` prints it.
    fn in_sync(&self) -> [bool; 2] {
        let path = self.arbiter_path().display().to_string();
        let show = self.engine(&["arbiter", "show", "--path", &path]);
        let line = show
            .lines()
            .find_map(|l| l.strip_prefix("in_sync:"))
            .unwrap_or_else(|| panic!("no in_sync line in:\n{show}"));
        let set: BTreeSet<&str> = line.split(',').map(str::trim).collect();
        NAMES.map(|n| set.contains(n))
    }

    /// Whether replica `i` accepts a TCP connection from the host (where
    /// the frontend runs) within the rejoin deadline.
    fn reachable(&self, i: usize) -> bool {
        let addr: std::net::SocketAddr = self.addr(i).parse().expect("replica address");
        wait_until(REJOIN_DEADLINE, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()
        })
        .is_some()
    }

    /// How often the running frontend logged a reconnection to replica `i`.
    fn reconnects(&self, i: usize) -> usize {
        let Some(fe) = &self.frontend else { return 0 };
        let addr = format!("addr={}", self.addr(i));
        std::fs::read_to_string(&fe.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("reconnected to replica") && l.contains(&addr))
            .count()
    }

    /// The `state` of replica `i`'s resync status file (`None`: no file).
    fn resync_state(&self, i: usize) -> Option<(String, u64)> {
        let text = std::fs::read_to_string(self.pool_file(i, "resync-status.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let state = match &v["state"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
            other => other.to_string(),
        };
        Some((
            state.to_lowercase(),
            v["remaining_bytes"].as_u64().unwrap_or(0),
        ))
    }

    fn log_tails(&self, lines: usize) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir())
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|x| x == "log"));
        logs.sort();
        logs.iter()
            .map(|l| format!("----- {} -----\n{}\n", l.display(), common::tail(l, lines)))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("fault harness failed; logs:\n{}", self.log_tails(40));
        }
        self.kill_frontend();
        self.kill_replica(0);
        self.kill_replica(1);
        if std::env::var_os("TWINVOL_FAULT_KEEP").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept {}", root.keep().display());
        }
    }
}

// ---------------------------------------------------------- write model --

/// One write of the log: where, and the crc32c of each of its blocks.
#[derive(Debug, Clone)]
struct Write {
    id: u64,
    offset: u64,
    len: u64,
    fua: bool,
    crcs: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// qemu-io printed `wrote`: acknowledged.
    Acked,
    /// Failed or in flight when the client lost the frontend: may have landed.
    Maybe,
    /// qemu-io could not open the export: never sent.
    NotSent,
}

/// The data of block `k` of write `id`: a header naming it, then noise.
fn block_data(seed: u64, id: u64, offset: u64, out: &mut [u8]) {
    out[..4].copy_from_slice(b"TVFH");
    out[4..12].copy_from_slice(&seed.to_le_bytes());
    out[12..20].copy_from_slice(&id.to_le_bytes());
    out[20..28].copy_from_slice(&offset.to_le_bytes());
    stream(seed ^ offset, id).fill(&mut out[28..]);
}

/// What a block read back holds, for failure messages.
fn describe(seed: u64, block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeros (never written)".into();
    }
    if &block[..4] == b"TVFH" {
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(block[r].try_into().expect("8 bytes"));
        let (s, id, off) = (word(4..12), word(12..20), word(20..28));
        let mut intact = vec![0u8; BLOCK as usize];
        block_data(s, id, off, &mut intact);
        let whose = if s == seed { "" } else { " of another seed" };
        let state = if intact == block { "" } else { ", corrupted" };
        return format!("write #{id}'s block for offset {off}{whose}{state}");
    }
    "bytes no write of this harness made".into()
}

/// Every block's possible crc32c values (the first is the latest
/// acknowledged one) and the acknowledged write that made it.
struct Model {
    seed: u64,
    values: Vec<Vec<u32>>,
    owner: Vec<Option<u64>>,
    acked: u64,
    maybe: u64,
    /// Acknowledged writes seen intact by at least one check.
    verified: BTreeSet<u64>,
    lost: BTreeSet<u64>,
}

impl Model {
    fn new(seed: u64) -> Model {
        let zero = crc32c::crc32c(&[0u8; BLOCK as usize]);
        Model {
            seed,
            values: vec![vec![zero]; BLOCKS],
            owner: vec![None; BLOCKS],
            acked: 0,
            maybe: 0,
            verified: BTreeSet::new(),
            lost: BTreeSet::new(),
        }
    }

    fn apply(&mut self, w: &Write, outcome: Outcome) {
        let first = (w.offset / BLOCK) as usize;
        for (k, &crc) in w.crcs.iter().enumerate() {
            let b = first + k;
            match outcome {
                Outcome::Acked => {
                    self.values[b] = vec![crc];
                    self.owner[b] = Some(w.id);
                }
                Outcome::Maybe => {
                    if !self.values[b].contains(&crc) {
                        self.values[b].push(crc);
                    }
                }
                Outcome::NotSent => {}
            }
        }
        match outcome {
            Outcome::Acked => self.acked += 1,
            Outcome::Maybe => self.maybe += 1,
            Outcome::NotSent => {}
        }
    }

    /// Checks a full image of the volume; returns the mismatches, described.
    fn check(&mut self, what: &str, image: &[u8]) -> Vec<String> {
        assert_eq!(image.len() as u64, SIZE, "{what}: short read");
        let mut bad = Vec::new();
        for (b, block) in image.chunks(BLOCK as usize).enumerate() {
            let crc = crc32c::crc32c(block);
            if self.values[b].contains(&crc) {
                if crc == self.values[b][0]
                    && let Some(id) = self.owner[b]
                {
                    self.verified.insert(id);
                }
                continue;
            }
            let expected = match self.owner[b] {
                Some(id) => format!("write #{id}"),
                None => "zeros".into(),
            };
            if let Some(id) = self.owner[b] {
                self.lost.insert(id);
            }
            bad.push(format!(
                "{what}: block at offset {} should hold {expected}{}, holds {}",
                b as u64 * BLOCK,
                if self.values[b].len() > 1 {
                    " (or an unacknowledged write's data)"
                } else {
                    ""
                },
                describe(self.seed, block)
            ));
        }
        bad
    }
}

// --------------------------------------------------------------- writer --

/// What a write phase hands back.
struct Written {
    /// Each write, its outcome and when its qemu-io batch ran (UTC).
    results: Vec<(Write, Outcome, String)>,
    rng: Rng,
    next_id: u64,
    stalled: Option<String>,
}

/// qemu-io batches in a thread until stopped; the acknowledged count is
/// live so that the harness can wait for writes to flow.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    handle: JoinHandle<Written>,
}

impl Writer {
    fn start(uri: String, dir: PathBuf, seed: u64, rng: Rng, next_id: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), acked.clone());
        let handle = std::thread::spawn(move || write_loop(&uri, &dir, seed, rng, next_id, &s, &a));
        Writer {
            stop,
            acked,
            handle,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes were acknowledged than `since`.
    fn wait_acked(&self, since: u64, n: u64, deadline: Duration) -> bool {
        wait_until(deadline, || {
            (self.acked() >= since + n || self.handle.is_finished()).then_some(())
        });
        self.acked() >= since + n
    }

    /// Lets the current batch finish and returns everything written.
    fn finish(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        let done = wait_until(IO_STALL + Duration::from_secs(10), || {
            self.handle.is_finished().then_some(())
        });
        assert!(done.is_some(), "the writer did not stop");
        self.handle.join().expect("writer thread")
    }
}

fn write_loop(
    uri: &str,
    dir: &Path,
    seed: u64,
    mut rng: Rng,
    mut next_id: u64,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> Written {
    let mut results = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let batch: Vec<Write> = (0..rng.range(4, 17))
            .map(|_| {
                let id = next_id;
                next_id += 1;
                let blocks = match rng.range(0, 10) {
                    0..=5 => rng.range(1, 3),
                    6..=8 => rng.range(3, 17),
                    _ => 64,
                };
                // Half the writes in the first MiB: overwrites and hot regions.
                let span = if rng.one_in(2) {
                    MIB / BLOCK
                } else {
                    BLOCKS as u64
                };
                let first = rng.range(0, span - blocks + 1);
                let (offset, len) = (first * BLOCK, blocks * BLOCK);
                let data = &mut buf[..len as usize];
                let mut crcs = Vec::with_capacity(blocks as usize);
                for (k, block) in data.chunks_mut(BLOCK as usize).enumerate() {
                    block_data(seed, id, offset + k as u64 * BLOCK, block);
                    crcs.push(crc32c::crc32c(block));
                }
                std::fs::write(dir.join(format!("w{id}")), &*data).expect("write data file");
                Write {
                    id,
                    offset,
                    len,
                    fua: rng.one_in(8),
                    crcs,
                }
            })
            .collect();
        let sent = utc_now();
        let (outcomes, stalled) = run_batch(uri, dir, &batch, acked);
        let span = format!("{sent}..{}", utc_now());
        for w in &batch {
            let _ = std::fs::remove_file(dir.join(format!("w{}", w.id)));
        }
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

/// One qemu-io process writing `batch` in order; each write's outcome from
/// its `wrote LEN/LEN bytes at offset OFF` line.
fn run_batch(
    uri: &str,
    dir: &Path,
    batch: &[Write],
    acked: &AtomicU64,
) -> (Vec<Outcome>, Option<String>) {
    let writes: Vec<String> = batch
        .iter()
        .map(|w| {
            let file = dir.join(format!("w{}", w.id));
            let fua = if w.fua { "-f " } else { "" };
            format!("write {fua}-s {} {} {}", file.display(), w.offset, w.len)
        })
        .collect();
    let mut cmd = qemu_io::command(uri, &writes);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    let started = Instant::now();
    let status = wait_until(IO_STALL, || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("qemu-io output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut outcomes = vec![Outcome::Maybe; batch.len()];
    let mut next = 0;
    for line in stdout.lines() {
        let Some((len, off)) = parse_wrote(line) else {
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
    let stalled = status.is_none().then(|| {
        format!(
            "a write batch made no progress for {:?} (I/O held for good?); qemu-io said:\n{stdout}{stderr}",
            started.elapsed()
        )
    });
    (outcomes, stalled)
}

/// Wall-clock time of day, UTC, as in the engine's logs (HH:MM:SS.mmm).
fn utc_now() -> String {
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

fn parse_wrote(line: &str) -> Option<(u64, u64)> {
    // "wrote 4096/4096 bytes at offset 8192"
    let rest = line.strip_prefix("wrote ")?;
    let (len, rest) = rest.split_once('/')?;
    let off = rest.split_once("at offset ")?.1;
    Some((len.parse().ok()?, off.trim().parse().ok()?))
}

// -------------------------------------------------------------- harness --

/// The names `TWINVOL_FAULT_KINDS` takes (default: all).
const KINDS: [&str; 4] = ["replica-kill", "link-cut", "frontend-kill", "survivor-kill"];

fn kind(f: Fault) -> &'static str {
    match f {
        Fault::KillReplica(_) => "replica-kill",
        Fault::CutLink(_) => "link-cut",
        Fault::KillFrontend => "frontend-kill",
        Fault::KillSurvivor(_) => "survivor-kill",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillReplica(usize),
    CutLink(usize),
    KillFrontend,
    /// Kill -9 the in-sync replica while its out-of-sync peer is resynced.
    KillSurvivor(usize),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Fault::KillReplica(i) => write!(f, "kill -9 replica {}", NAMES[i]),
            Fault::CutLink(i) => write!(f, "cut site {}'s link", NAMES[i]),
            Fault::KillFrontend => write!(f, "kill -9 the frontend"),
            Fault::KillSurvivor(i) => write!(f, "kill -9 surviving replica {}", NAMES[i]),
        }
    }
}

struct Harness {
    cluster: Cluster,
    model: Model,
    seed: u64,
    rng: Rng,
    write_rng: Option<Rng>,
    next_id: u64,
    writer: Option<Writer>,
    started: Instant,
    faults: u32,
    history: Vec<String>,
    checks: u32,
    /// None: not known yet; Some(false): a returned replica never came back
    /// into the in-sync set within the deadline (the harness stops waiting).
    rejoins: Option<bool>,
    /// Every write sent, for the post-mortem of a failure.
    write_log: Vec<String>,
    /// The fault kinds this run may inject.
    kinds: BTreeSet<&'static str>,
    /// Keep writing while the only in-sync replica is away (the writes in
    /// flight must be held, then completed when it returns).
    held_io: bool,
}

impl Harness {
    fn summary(&self) -> String {
        format!(
            "faults survived {}, writes checked {}, writes lost {}, seed {}",
            self.faults
                .saturating_sub(u32::from(!self.model.lost.is_empty())),
            self.model.verified.len(),
            self.model.lost.len(),
            self.seed
        )
    }

    fn fail(&self, what: &str) -> ! {
        eprintln!("{}", self.summary());
        // For the post-mortem, next to the logs (TWINVOL_FAULT_KEEP=1 keeps them).
        let log = self.cluster.dir().join("write-log.txt");
        let _ = std::fs::write(&log, self.write_log.join("\n") + "\n");
        panic!(
            "{what}\nseed {} (rerun with TWINVOL_FAULT_SEED={}); write log {}; faults so far:\n{}",
            self.seed,
            self.seed,
            log.display(),
            self.history.join("\n")
        );
    }

    fn start_writer(&mut self) {
        let rng = self.write_rng.take().expect("writer not running");
        let dir = self.cluster.dir().join("writes");
        std::fs::create_dir_all(&dir).expect("writes dir");
        self.writer = Some(Writer::start(
            self.cluster.nbd_uri(),
            dir,
            self.seed,
            rng,
            self.next_id,
        ));
    }

    fn stop_writer(&mut self) {
        let w = self.writer.take().expect("writer running").finish();
        for (write, outcome, span) in &w.results {
            self.model.apply(write, *outcome);
            if *outcome != Outcome::NotSent {
                self.write_log.push(format!(
                    "#{} offset {} len {}{} {outcome:?} batch {span} (fault {})",
                    write.id,
                    write.offset,
                    write.len,
                    if write.fua { " fua" } else { "" },
                    self.faults + 1
                ));
            }
        }
        self.write_rng = Some(w.rng);
        self.next_id = w.next_id;
        if let Some(s) = w.stalled {
            self.fail(&s);
        }
    }

    /// Lets `n` more writes be acknowledged (the workload around a fault).
    fn let_writes_flow(&self, n: u64, why: &str) {
        let w = self.writer.as_ref().expect("writer running");
        if !w.wait_acked(w.acked(), n, Duration::from_secs(45)) {
            self.fail(&format!("no writes acknowledged {why}"));
        }
    }

    fn wait_out(&self, i: usize) -> Duration {
        let t = Instant::now();
        if wait_until(FAILOVER_DEADLINE, || {
            (!self.cluster.in_sync()[i]).then_some(())
        })
        .is_none()
        {
            self.fail(&format!(
                "replica {} was not taken out of the in-sync set within {FAILOVER_DEADLINE:?}",
                NAMES[i]
            ));
        }
        t.elapsed()
    }

    /// Waits (unless returns were never seen) for both replicas in sync.
    fn wait_both_in_sync(&mut self) -> bool {
        if self.cluster.in_sync() == [true, true] {
            return true;
        }
        if self.rejoins == Some(false) {
            return false;
        }
        let back = wait_until(REJOIN_DEADLINE, || {
            (self.cluster.in_sync() == [true, true]).then_some(())
        });
        if back.is_some() {
            self.rejoins = Some(true);
            return true;
        }
        if self.rejoins == Some(true) {
            self.fail(&format!(
                "a returned replica did not rejoin the in-sync set within {REJOIN_DEADLINE:?}"
            ));
        }
        eprintln!(
            "note: a returned replica stays out of the in-sync set (no rejoin within {REJOIN_DEADLINE:?}); \
             from now on only faults that keep a replica in sync are chosen"
        );
        self.rejoins = Some(false);
        false
    }

    fn choose(&mut self, in_sync: [bool; 2]) -> Fault {
        let x = self.rng.range(0, 2) as usize;
        let survivor = if in_sync[0] { 0 } else { 1 };
        // (fault, weight): replica faults only with both in sync.
        let candidates = if in_sync == [true, true] {
            vec![
                (Fault::KillReplica(x), 4),
                (Fault::CutLink(x), 3),
                (Fault::KillFrontend, 3),
            ]
        } else {
            vec![
                (Fault::KillSurvivor(survivor), 3),
                (Fault::KillReplica(1 - survivor), 2),
                (Fault::CutLink(x), 2),
                (Fault::KillFrontend, 3),
            ]
        };
        let allowed: Vec<(Fault, u64)> = candidates
            .into_iter()
            .filter(|(f, _)| self.kinds.contains(kind(*f)))
            .collect();
        let total: u64 = allowed.iter().map(|(_, w)| w).sum();
        if total == 0 {
            self.fail(&format!(
                "TWINVOL_FAULT_KINDS={} leaves no fault for in-sync set {}",
                self.kinds.iter().copied().collect::<Vec<_>>().join(","),
                show_set(in_sync)
            ));
        }
        let mut r = self.rng.range(0, total);
        for (f, w) in allowed {
            if r < w {
                return f;
            }
            r -= w;
        }
        unreachable!("r < total")
    }

    /// One fault and its recovery, with the writer running; returns how
    /// many faults that was (a survivor kill may follow a replica loss).
    fn inject(&mut self, fault: Fault, in_sync: [bool; 2]) -> (u32, String) {
        let n = self.rng.range(2, 12);
        let note = match fault {
            Fault::KillReplica(i) | Fault::CutLink(i) if in_sync[i] && !in_sync[1 - i] => {
                self.survivor_outage(i, matches!(fault, Fault::CutLink(_)))
            }
            Fault::KillSurvivor(i) => self.survivor_outage(i, false),
            Fault::KillReplica(i) | Fault::CutLink(i) => {
                let cut = matches!(fault, Fault::CutLink(_));
                if cut {
                    self.cluster.sites.set_link(i, false);
                } else {
                    self.cluster.kill_replica(i);
                }
                let mut note = if in_sync[i] {
                    format!("failed over in {:.1?}", self.wait_out(i))
                } else {
                    "out of sync already: writes went on".into()
                };
                self.let_writes_flow(n, "while a replica was away");
                if cut {
                    self.cluster.sites.set_link(i, true);
                } else {
                    self.cluster.start_replica(i);
                }
                // A second fault while the returned replica catches up.
                if in_sync == [true, true] {
                    let (k, more) = match self.rng.range(0, 6) {
                        0 | 1 if self.kinds.contains("survivor-kill") => {
                            self.kill_survivor_during_resync(1 - i)
                        }
                        2 if self.kinds.contains("frontend-kill") => {
                            self.cluster.kill_frontend();
                            let t = Instant::now();
                            self.cluster.start_frontend();
                            let m = format!(
                                "; then kill -9 the frontend while {} catches up, new one serving after {:.1?}",
                                NAMES[i],
                                t.elapsed()
                            );
                            (1, m)
                        }
                        _ => (0, String::new()),
                    };
                    if k > 0 {
                        note.push_str(&more);
                        self.let_writes_flow(n, "after the second fault");
                        return (1 + k, note);
                    }
                }
                note
            }
            Fault::KillFrontend => {
                self.cluster.kill_frontend();
                let t = Instant::now();
                self.cluster.start_frontend();
                format!("new frontend serving after {:.1?}", t.elapsed())
            }
        };
        self.let_writes_flow(n, &format!("after: {fault}"));
        (1, note)
    }

    /// The only in-sync replica `i` goes away (killed, or its link cut) and
    /// returns: I/O is held meanwhile and must resume after. Without
    /// `held_io` the writer is stopped first (see `TWINVOL_FAULT_HELD_IO`).
    fn survivor_outage(&mut self, i: usize, cut: bool) -> String {
        let resync = self.cluster.resync_state(i);
        let reconnects = self.cluster.reconnects(i);
        if !self.held_io {
            self.stop_writer();
        }
        if cut {
            self.cluster.sites.set_link(i, false);
        } else {
            self.cluster.kill_replica(i);
        }
        let away = self.rng.ms(100, 1200);
        std::thread::sleep(away);
        if cut {
            self.cluster.sites.set_link(i, true);
        } else {
            self.cluster.start_replica(i);
        }
        if !self.held_io {
            // Writes resume once the frontend can use the replica again
            // (TWINVOL_FAULT_HELD_IO=0, the outage without I/O): after a cut,
            // once the site answers from the host (neighbour resolved);
            // after a kill, once the frontend logged its reconnection.
            if cut && !self.cluster.reachable(i) {
                self.fail(&format!(
                    "site {} unreachable from the host {REJOIN_DEADLINE:?} after its link was restored",
                    NAMES[i]
                ));
            }
            if !cut
                && wait_until(REJOIN_DEADLINE, || {
                    (self.cluster.reconnects(i) > reconnects).then_some(())
                })
                .is_none()
            {
                self.fail(&format!(
                    "the frontend did not reconnect to replica {} within {REJOIN_DEADLINE:?} of its restart",
                    NAMES[i]
                ));
            }
            self.start_writer();
        }
        let t = Instant::now();
        let n = self.rng.range(2, 8);
        self.let_writes_flow(
            n,
            &format!("after the only in-sync replica {} returned", NAMES[i]),
        );
        let resync = match resync {
            Some((state, rem)) => format!("{state}, {} KiB left", rem / 1024),
            None => "none".into(),
        };
        format!(
            "away {away:.1?} (its resync of {}: {resync}), writes {} {:.1?} after its return",
            NAMES[1 - i],
            if self.held_io {
                "held, resumed"
            } else {
                "quiet, resumed"
            },
            t.elapsed()
        )
    }

    /// With replica `survivor` resyncing its returned peer: kill it while
    /// it copies, restart it. Returns the faults injected and a note.
    fn kill_survivor_during_resync(&mut self, survivor: usize) -> (u32, String) {
        let copying = wait_until(Duration::from_secs(10), || {
            self.cluster
                .resync_state(survivor)
                .filter(|(s, rem)| s == "copying" && *rem > 0)
        });
        if copying.is_none() {
            return (
                0,
                "; resync over before the survivor could be killed".into(),
            );
        }
        let note = self.survivor_outage(survivor, false);
        (
            1,
            format!(
                "; then kill -9 surviving replica {} mid-resync: {note}",
                NAMES[survivor]
            ),
        )
    }

    /// The volume through the frontend, and every in-sync replica's file.
    fn check_all(&mut self, when: &str) -> usize {
        self.checks += 1;
        let mut c = Command::new("nbdcopy");
        c.args([&self.cluster.nbd_uri(), "-"]);
        let out = run_with_deadline(c, Duration::from_secs(60));
        if !out.status.success() {
            self.fail(&format!(
                "{when}: nbdcopy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut bad = self
            .model
            .check(&format!("{when}, read through the frontend"), &out.stdout);
        let in_sync = self.cluster.in_sync();
        for i in 0..2 {
            if in_sync[i] {
                let data = std::fs::read(self.cluster.pool_file(i, "data")).expect("replica data");
                bad.extend(self.model.check(
                    &format!("{when}, replica {} (in sync) data file", NAMES[i]),
                    &data,
                ));
            }
        }
        if !bad.is_empty() {
            bad.truncate(20);
            self.fail(&format!(
                "acknowledged writes lost ({} writes):\n{}",
                self.model.lost.len(),
                bad.join("\n")
            ));
        }
        in_sync.iter().filter(|&&s| s).count()
    }

    /// After the last fault: both replicas back in sync if the engine
    /// returns them, the resync done, the two files identical.
    fn converge(&mut self) -> Duration {
        let t = Instant::now();
        let both = self.wait_both_in_sync();
        let paths = [0, 1].map(|i| self.cluster.pool_file(i, "data"));
        let settled = |c: &Cluster| {
            (0..2).all(|i| match c.resync_state(i) {
                None => true,
                Some((s, rem)) => (s == "done" || s == "idle") && rem == 0,
            })
        };
        let same = wait_until(CONVERGE_DEADLINE, || {
            let same = settled(&self.cluster)
                && std::fs::read(&paths[0]).ok() == std::fs::read(&paths[1]).ok();
            if !same {
                // Two volume reads per look: look less often than the default.
                std::thread::sleep(Duration::from_millis(200));
            }
            same.then_some(())
        });
        if same.is_none() {
            let (a, b) = (
                std::fs::read(&paths[0]).expect("a"),
                std::fs::read(&paths[1]).expect("b"),
            );
            let diff: Vec<String> = a
                .chunks(BLOCK as usize)
                .zip(b.chunks(BLOCK as usize))
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .take(10)
                .map(|(k, (x, y))| {
                    format!(
                        "offset {}: a holds {}, b holds {}",
                        k as u64 * BLOCK,
                        describe(self.seed, x),
                        describe(self.seed, y)
                    )
                })
                .collect();
            self.fail(&format!(
                "the replicas differ {CONVERGE_DEADLINE:?} after the last fault (in sync: {:?}, resync a: {:?}, b: {:?}):\n{}",
                self.cluster.in_sync(),
                self.cluster.resync_state(0),
                self.cluster.resync_state(1),
                diff.join("\n")
            ));
        }
        if !both {
            eprintln!("note: the replicas are identical, but one is still out of the in-sync set");
        }
        for i in 0..2 {
            let data = std::fs::read(&paths[i]).expect("replica data");
            let bad = self
                .model
                .check(&format!("end, replica {} data file", NAMES[i]), &data);
            if !bad.is_empty() {
                self.fail(&format!("acknowledged writes lost:\n{}", bad.join("\n")));
            }
        }
        t.elapsed()
    }

    fn run(&mut self, target: u32) {
        self.check_all("at start");
        while self.faults < target {
            let t = Instant::now();
            let before = self.cluster.in_sync();
            if before != [true, true] && self.wait_both_in_sync() {
                // A replica the frontend returned to the in-sync set must
                // hold every acknowledged write.
                self.check_all(&format!("after {} rejoined", show_set(before.map(|s| !s))));
            }
            let in_sync = self.cluster.in_sync();
            let fault = self.choose(in_sync);
            self.start_writer();
            let n = self.rng.range(3, 20);
            self.let_writes_flow(n, "before the fault");
            let (count, note) = self.inject(fault, in_sync);
            self.stop_writer();
            self.faults += count;
            let line = format!(
                "[{:6.1}s] fault {:3}/{target}: {fault} (in sync before: {}) {note}",
                self.started.elapsed().as_secs_f64(),
                self.faults,
                show_set(in_sync),
            );
            self.history.push(line.clone());
            let checked = self.check_all(&format!("after fault {}: {fault}", self.faults));
            eprintln!(
                "{line}; checked through the frontend and {checked} in-sync replica file(s): \
                 {} writes acked, {} verified so far, 0 lost ({:.1?})",
                self.model.acked,
                self.model.verified.len(),
                t.elapsed()
            );
        }
        let took = self.converge();
        eprintln!(
            "[{:6.1}s] converged in {took:.1?}: replica files identical",
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn show_set(s: [bool; 2]) -> String {
    let v: Vec<&str> = (0..2).filter(|&i| s[i]).map(|i| NAMES[i]).collect();
    v.join(",")
}

/// `TWINVOL_FAULT_KINDS=a,b` (names from [`KINDS`]), to soak or replay
/// some kinds of fault alone; all of them by default.
fn fault_kinds() -> BTreeSet<&'static str> {
    let Ok(list) = std::env::var("TWINVOL_FAULT_KINDS") else {
        return KINDS.into_iter().collect();
    };
    list.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            KINDS
                .into_iter()
                .find(|known| *known == k)
                .unwrap_or_else(|| {
                    panic!("TWINVOL_FAULT_KINDS: unknown kind {k:?}; known: {KINDS:?}")
                })
        })
        .collect()
}

#[test]
fn random_faults_lose_no_acknowledged_write_and_replicas_end_identical() {
    let seed = env_u64("TWINVOL_FAULT_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        stream(t, u64::from(std::process::id())).next()
    });
    let target = env_u64("TWINVOL_FAULTS").map_or(DEFAULT_FAULTS, |n| n as u32);
    eprintln!("fault harness: seed {seed} (TWINVOL_FAULT_SEED={seed} replays it), {target} faults");
    let tag = (stream(seed, 0).next() ^ u64::from(std::process::id())) as u32 & 0xff_ffff;
    let started = Instant::now();
    let mut h = Harness {
        cluster: Cluster::start(tag),
        model: Model::new(seed),
        seed,
        rng: stream(seed, 1),
        write_rng: Some(stream(seed, 2)),
        next_id: 1,
        writer: None,
        started,
        faults: 0,
        history: Vec::new(),
        checks: 0,
        rejoins: None,
        write_log: Vec::new(),
        kinds: fault_kinds(),
        held_io: std::env::var_os("TWINVOL_FAULT_HELD_IO").is_none_or(|v| v != "0"),
    };
    h.run(target);
    let m = &h.model;
    eprintln!(
        "writes acknowledged {}, unacknowledged (in flight at a fault) {}, checks {}, {} s",
        m.acked,
        m.maybe,
        h.checks,
        started.elapsed().as_secs()
    );
    let summary = h.summary();
    eprintln!("{summary}");
    assert!(m.lost.is_empty(), "{summary}");
}
