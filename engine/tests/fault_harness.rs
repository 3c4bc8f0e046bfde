//! The randomized fault harness (design "Test pyramid", issues 5 and 9): a
//! mirrored volume as real processes — replica a and replica b each in its
//! own network namespace ("site"), both on one bridge with the host, a
//! frontend on the host with a file-backed arbiter and a short lease —
//! takes random faults while real NBD clients write (qemu-io batches of
//! small writes; nbdcopy with sixteen 4 MiB writes in flight), and every
//! acknowledged write is checked after every fault and at the end.
//!
//! Faults ([`faults`], `TWINVOL_FAULT_KINDS` names them): kill -9 a replica;
//! cut a site's link for a few seconds, or for 30–60 s with a deep queue of
//! 4 MiB writes on the wire (TCP retransmits old data when it returns);
//! power loss of a replica (its unflushed writes gone); kill -9 the
//! frontend (a new one takes the lease after expiry + margin) or SIGTERM it
//! with writes in flight; kill -9 the NBD client with writes in flight;
//! stall the arbiter at its commit points (a swap lands after its caller
//! timed out); trim ≥ 2 GiB; kill -9 the surviving replica mid-resync.
//! The schedule is seeded: every kind allowed appears once early in the run,
//! then random draws; long cuts are few (`TWINVOL_FAULT_LONG_CUTS`).
//!
//! Checks ([`harness`]), with the writer quiet: after every fault and
//! every rejoin, the live region read through the frontend and from the
//! data file of every replica the arbiter has in sync, block by block
//! against the write log ([`model`]: a write acknowledged must read back, a
//! write not acknowledged may or may not have landed); and whenever the
//! arbiter has both replicas in sync, the divergence check: the two data
//! files identical, whole ([`compare`]). At the end, after the resync, the
//! same. The summary line gives faults per kind, writes checked, writes
//! lost and divergent comparisons.
//!
//! `TWINVOL_FAULT_SEED=S` replays the choices and the writes of a run
//! (timing, on a noisy machine, still varies); `TWINVOL_FAULTS=N` sets the
//! number of faults (default 30; `benches/fault-soak.sh` runs 500);
//! `TWINVOL_FAULT_KINDS=link-cut,frontend-kill` restricts the kinds;
//! `TWINVOL_FAULT_LONG_CUTS=N` the number of long cuts (default one per 40
//! faults, at least one); `TWINVOL_FAULT_MINUTES=M` stops injecting after M
//! minutes (then converges and checks as after the last fault); `TWINVOL_FAULT_KEEP=1` keeps the directory with
//! the logs (and, after a failure, `write-log.txt`: each write, its outcome,
//! its batch's UTC time); `TWINVOL_FAULT_HELD_IO=0` pauses the writer while
//! the only in-sync replica is away. Needs root (network namespaces),
//! qemu-io, qemu-img and nbdcopy.

#[path = "fault_harness/cluster.rs"]
mod cluster;
mod common;
#[path = "fault_harness/compare.rs"]
mod compare;
#[path = "fault_harness/faults.rs"]
mod faults;
#[path = "fault_harness/harness.rs"]
mod harness;
#[path = "fault_harness/model.rs"]
mod model;
#[path = "fault_harness/writer.rs"]
mod writer;

use std::time::Duration;

use common::MIB;
use common::rng::Rng;

/// Over 2 GiB, so that a trim can span 2 GiB and more.
const SIZE: u64 = 2048 * MIB + 128 * MIB;
const BLOCK: u64 = 4096;
/// Where the workload writes: the large region (nbdcopy's 4 MiB writes)
/// then the small region (qemu-io's). Checks read this much.
const LARGE: u64 = 64 * MIB;
const LARGE_WRITE: u64 = 4 * MIB;
const SMALL_START: u64 = LARGE;
const SMALL_LEN: u64 = 32 * MIB;
const LIVE: u64 = LARGE + SMALL_LEN;
const LIVE_BLOCKS: usize = (LIVE / BLOCK) as usize;
const VOLUME: &str = "v1";
const PORT: u16 = 7700;
const NAMES: [&str; 2] = ["a", "b"];
/// Short: a frontend kill costs expiry + margin (renewed every third).
const LEASE: [&str; 4] = ["--lease-duration", "2s", "--lease-margin", "1s"];
/// The large region is copied in about a second: still copying when the
/// harness looks for a survivor to kill, quick for the rejoin before the
/// next fault.
const RESYNC_RATE: &str = "64M";
const DEFAULT_FAULTS: u32 = 30;

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

#[test]
fn random_faults_lose_no_acknowledged_write_and_replicas_never_diverge() {
    let seed = env_u64("TWINVOL_FAULT_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        stream(t, u64::from(std::process::id())).next()
    });
    let target = env_u64("TWINVOL_FAULTS").map_or(DEFAULT_FAULTS, |n| n as u32);
    let long_cuts = env_u64("TWINVOL_FAULT_LONG_CUTS").map_or((target / 40).max(1), |n| n as u32);
    eprintln!(
        "fault harness: seed {seed} (TWINVOL_FAULT_SEED={seed} replays it), {target} faults, \
         {long_cuts} long cut(s)"
    );
    let mut h = harness::Harness::new(seed, target, long_cuts, faults::fault_kinds());
    h.run(target);
    let summary = h.summary();
    eprintln!("{}", h.totals());
    eprintln!("{summary}");
    assert!(h.clean(), "{summary}");
}
