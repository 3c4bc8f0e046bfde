//! The run: the loop of faults, the writer around them, and the checks.
//!
//! Checks, always with the writer quiet (every client process finished),
//! replica files read after a flush through the frontend:
//! - the live region read through the frontend, and from the data file of
//!   every replica the arbiter lists in sync, block by block against the
//!   write log ([`crate::model`]);
//! - whenever the arbiter lists both replicas in sync: the divergence
//!   comparison of the two data files, whole ([`crate::compare`]). A
//!   difference may be a write the frontend still completes after its
//!   client went away; it must be gone within [`SETTLE`] (counted as
//!   transient) with both still in sync, or the comparison is divergent and
//!   the run fails.
//!
//! They run after every fault, after every rejoin, and at the end, after
//! the last resync.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::common::rng::Rng;
use crate::common::wait_until;
use crate::compare::{self, Comparison};
use crate::faults::Kind;
use crate::model::{Model, Outcome, describe};
use crate::writer::{self, Mix, Target, Writer};
use crate::{BLOCK, Draw, LIVE, NAMES, stream};

/// From a replica's loss to the arbiter showing it out of sync.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);
/// For a returned replica to be back in the in-sync set: this long
/// without progress of the resyncs (their remaining bytes).
pub const REJOIN_DEADLINE: Duration = Duration::from_secs(20);
/// ... and at most this long in all.
const REJOIN_CAP: Duration = Duration::from_secs(300);
/// For a check's read or flush through the frontend to succeed.
const CHECK_IO_DEADLINE: Duration = Duration::from_secs(30);
/// For a difference between two in-sync replicas to go away.
const SETTLE: Duration = Duration::from_secs(5);

pub struct Harness {
    pub cluster: Cluster,
    pub model: Model,
    pub seed: u64,
    pub rng: Rng,
    write_rng: Option<Rng>,
    next_id: u64,
    pub writer: Option<Writer>,
    started: Instant,
    pub faults: u32,
    pub per_kind: BTreeMap<&'static str, u32>,
    history: Vec<String>,
    checks: u32,
    comparisons: u32,
    pub divergent: u32,
    transient: u32,
    /// Check reads and flushes the frontend refused (retried).
    refused: u32,
    /// None: not known yet; Some(false): a returned replica never came back
    /// into the in-sync set within the deadline (the harness stops waiting).
    rejoins: Option<bool>,
    /// Every write sent, for the post-mortem of a failure.
    write_log: Vec<String>,
    /// The fault kinds this run may inject.
    pub kinds: Vec<Kind>,
    /// Kinds still to come first (each kind once, early in the run), then
    /// the random draws; long cuts left.
    pub deck: Vec<Kind>,
    pub long_cuts_left: u32,
    /// Keep writing while the only in-sync replica is away (the writes in
    /// flight must be held, then completed when it returns).
    pub held_io: bool,
    large_batches: u64,
    /// Whether new frontends may get an `--arbiter-stall` spec.
    commit_stalls: bool,
}

impl Harness {
    pub fn new(seed: u64, target: u32, long_cuts: u32, kinds: Vec<Kind>) -> Harness {
        let tag = (stream(seed, 0).next() ^ u64::from(std::process::id())) as u32 & 0xff_ffff;
        let mut rng = stream(seed, 1);
        let volatile = [0, 1].map(|_| volatile_draw(&kinds, &mut rng));
        let stalls = crate::faults::commit_stall_supported();
        let stall = stall_draw(stalls, &mut rng);
        let mut h = Harness {
            cluster: Cluster::start(tag, volatile, stall),
            model: Model::new(seed),
            seed,
            rng,
            write_rng: Some(stream(seed, 2)),
            next_id: 1,
            writer: None,
            started: Instant::now(),
            faults: 0,
            per_kind: BTreeMap::new(),
            history: Vec::new(),
            checks: 0,
            comparisons: 0,
            divergent: 0,
            transient: 0,
            refused: 0,
            rejoins: None,
            write_log: Vec::new(),
            kinds,
            deck: Vec::new(),
            long_cuts_left: long_cuts,
            held_io: std::env::var_os("TWINVOL_FAULT_HELD_IO").is_none_or(|v| v != "0"),
            large_batches: 0,
            commit_stalls: stalls,
        };
        h.deal(target);
        h
    }

    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .per_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "faults survived {} ({}), writes checked {}, writes lost {}, divergent comparisons {} of {}, seed {}",
            self.faults.saturating_sub(u32::from(!self.clean())),
            kinds.join(", "),
            self.model.verified.len(),
            self.model.lost.len(),
            self.divergent,
            self.comparisons,
            self.seed
        )
    }

    pub fn totals(&self) -> String {
        let m = &self.model;
        format!(
            "writes acknowledged {}, unacknowledged (failed or in flight at a fault) {}, large batches {}, \
             checks {}, check I/O refused and retried {}, transient differences {}, arbiter commit stalls {}, {} s",
            m.acked,
            m.maybe,
            self.large_batches,
            self.checks,
            self.refused,
            self.transient,
            self.cluster.commit_stalls(),
            self.started.elapsed().as_secs()
        )
    }

    pub fn clean(&self) -> bool {
        self.model.lost.is_empty() && self.divergent == 0
    }

    pub fn fail(&self, what: &str) -> ! {
        eprintln!("{}", self.totals());
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

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// (Re)starts replica `i`, with or without the volatile cache (drawn).
    pub fn restart_replica(&mut self, i: usize) {
        let v = volatile_draw(&self.kinds, &mut self.rng);
        self.cluster.start_replica(i, v);
    }

    /// Starts a new frontend, at times with a commit stall (drawn).
    pub fn restart_frontend(&mut self) {
        let stall = stall_draw(self.commit_stalls, &mut self.rng);
        self.cluster.start_frontend(stall);
    }

    // ----------------------------------------------------------- writer --

    pub fn start_writer(&mut self, mix: Mix) {
        let rng = self.write_rng.take().expect("writer not running");
        let dir = writer::data_dir(self.cluster.dir());
        std::fs::create_dir_all(&dir).expect("writes dir");
        let target = Target {
            uri: self.cluster.nbd_uri(),
            dir,
            seed: self.seed,
        };
        self.writer = Some(Writer::start(target, rng, self.next_id, mix));
    }

    pub fn writer(&self) -> &Writer {
        self.writer.as_ref().expect("writer running")
    }

    pub fn stop_writer(&mut self) {
        let w = self.writer.take().expect("writer running");
        self.large_batches += w.large_batches();
        let w = w.finish();
        for (write, outcome, span) in w.results {
            self.record(&write, outcome, &span);
        }
        self.write_rng = Some(w.rng);
        self.next_id = w.next_id;
        if let Some(s) = w.stalled {
            self.fail(&s);
        }
    }

    /// Enters an operation the harness ran itself into the log.
    pub fn record(&mut self, write: &crate::model::Write, outcome: Outcome, span: &str) {
        self.model.apply(write, outcome);
        if outcome != Outcome::NotSent {
            self.write_log.push(format!(
                "{} {outcome:?} batch {span} (fault {})",
                write.describe(),
                self.faults + 1
            ));
        }
    }

    /// A write id of its own (for the harness's own operations).
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Lets `n` more writes be acknowledged (the workload around a fault).
    pub fn let_writes_flow(&self, n: u64, why: &str) {
        let w = self.writer();
        if !w.wait_acked(w.acked(), n, Duration::from_secs(60)) {
            self.fail(&format!("no writes acknowledged {why}"));
        }
    }

    // ------------------------------------------------------------ waits --

    pub fn wait_out(&self, i: usize) -> Duration {
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

    /// The bytes both resyncs still have to copy, and their states.
    fn resync_progress(&self) -> (u64, String) {
        let s = [0, 1].map(|i| self.cluster.resync_state(i));
        let rem = s.iter().flatten().map(|(_, r)| r).sum();
        (rem, format!("{s:?}"))
    }

    /// Waits (unless returns were never seen) for both replicas in sync:
    /// as long as the resyncs make progress, for [`REJOIN_DEADLINE`]
    /// without.
    pub fn wait_both_in_sync(&mut self) -> bool {
        if self.cluster.in_sync() == [true, true] {
            return true;
        }
        if self.rejoins == Some(false) {
            return false;
        }
        let start = Instant::now();
        let mut last = self.resync_progress();
        let mut progressed = Instant::now();
        let back = loop {
            if self.cluster.in_sync() == [true, true] {
                break true;
            }
            let now = self.resync_progress();
            if now != last {
                last = now;
                progressed = Instant::now();
            }
            if progressed.elapsed() > REJOIN_DEADLINE || start.elapsed() > REJOIN_CAP {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if back {
            self.rejoins = Some(true);
            return true;
        }
        if self.rejoins == Some(true) {
            self.fail(&format!(
                "a returned replica did not rejoin the in-sync set ({REJOIN_DEADLINE:?} without \
                 progress, {:.0?} in all; resyncs: {})",
                start.elapsed(),
                last.1
            ));
        }
        eprintln!(
            "note: a returned replica stays out of the in-sync set (no rejoin within {REJOIN_DEADLINE:?}); \
             from now on only faults that keep a replica in sync are chosen"
        );
        self.rejoins = Some(false);
        false
    }

    // ----------------------------------------------------------- checks --

    /// The live region through the frontend, every in-sync replica's file,
    /// and the divergence comparison when both are in sync. Returns the
    /// number of in-sync replicas checked.
    pub fn check_all(&mut self, when: &str) -> usize {
        self.checks += 1;
        let scratch = self.cluster.dir().join("read-back");
        let uri = self.cluster.nbd_uri();
        let image = self.retry(when, "reading through the frontend", || {
            compare::read_live_via_frontend(&uri, &scratch)
        });
        let mut bad = self
            .model
            .check(&format!("{when}, read through the frontend"), &image);
        drop(image);
        self.retry(when, "a flush through the frontend", || {
            compare::flush_via_frontend(&uri)
        });
        let in_sync = self.cluster.in_sync();
        for i in 0..2 {
            if in_sync[i] {
                let data = compare::read_live(&self.cluster.pool_file(i, "data"));
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
        if in_sync == [true, true] {
            self.divergence_check(when);
        }
        in_sync.iter().filter(|&&s| s).count()
    }

    /// Runs a check's I/O through the frontend until it succeeds, for up
    /// to [`CHECK_IO_DEADLINE`]: a frontend may refuse I/O for a while
    /// (its lease not renewed in time while the arbiter stalls); that is
    /// noted and counted, not a lost write. Fails the run after that.
    fn retry<T>(&mut self, when: &str, what: &str, mut io: impl FnMut() -> Result<T, String>) -> T {
        let t = Instant::now();
        loop {
            match io() {
                Ok(v) => return v,
                Err(e) if t.elapsed() < CHECK_IO_DEADLINE => {
                    self.refused += 1;
                    eprintln!("note: {when}: {what} failed ({e}); again in 500 ms");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => self.fail(&format!(
                    "{when}: {what} failed for {CHECK_IO_DEADLINE:?} with the writer quiet: {e}"
                )),
            }
        }
    }

    fn compare_replicas(&self) -> Comparison {
        let paths = [0, 1].map(|i| self.cluster.pool_file(i, "data"));
        compare::compare_files([&paths[0], &paths[1]])
    }

    /// Both replicas in sync at the arbiter, the writer quiet: their data
    /// files must be identical.
    fn divergence_check(&mut self, when: &str) {
        self.comparisons += 1;
        let first = self.compare_replicas();
        self.fail_on_stray(when, &first);
        if first.identical() {
            return;
        }
        let t = Instant::now();
        let mut last = first;
        while t.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(250));
            if self.cluster.in_sync() != [true, true] {
                eprintln!(
                    "note: {when}: the replicas differed in {} blocks while both in sync, then one \
                     left the in-sync set {:.1?} later",
                    last.differing_blocks,
                    t.elapsed()
                );
                self.transient += 1;
                return;
            }
            let _ = compare::flush_via_frontend(&self.cluster.nbd_uri());
            last = self.compare_replicas();
            self.fail_on_stray(when, &last);
            if last.identical() {
                eprintln!(
                    "note: {when}: the in-sync replicas differed in {} blocks, identical {:.1?} later",
                    last.differing_blocks.max(1),
                    t.elapsed()
                );
                self.transient += 1;
                return;
            }
        }
        self.divergent += 1;
        let lines = self.describe_difference(&last);
        self.fail(&format!(
            "{when}: DIVERGENT: both replicas in sync at the arbiter, writes quiet for {SETTLE:?}, \
             and their data files differ in {} blocks of 4 KiB ({} bytes compared):\n{}",
            last.differing_blocks,
            last.bytes_compared,
            lines.join("\n")
        ));
    }

    fn fail_on_stray(&self, when: &str, c: &Comparison) {
        if let Some((i, off)) = c.stray {
            let block = compare::read_block(&self.cluster.pool_file(i, "data"), off);
            self.fail(&format!(
                "{when}: replica {} holds data at offset {off}, outside the region the workload \
                 writes (only zeros belong there): {}",
                NAMES[i],
                describe(self.seed, &block)
            ));
        }
    }

    fn describe_difference(&self, c: &Comparison) -> Vec<String> {
        let paths = [0, 1].map(|i| self.cluster.pool_file(i, "data"));
        c.differing
            .iter()
            .take(12)
            .map(|&off| {
                let [a, b] = [0, 1].map(|i| compare::read_block(&paths[i], off));
                let expected = if off < LIVE {
                    format!("; the log: {}", self.model.expected((off / BLOCK) as usize))
                } else {
                    String::new()
                };
                format!(
                    "offset {off}: a holds {}, b holds {}{expected}",
                    describe(self.seed, &a),
                    describe(self.seed, &b)
                )
            })
            .collect()
    }

    /// After the last fault: both replicas back in sync if the engine
    /// returns them, the resync done, the two files identical and holding
    /// every acknowledged write.
    fn converge(&mut self) -> Duration {
        let t = Instant::now();
        let both = self.wait_both_in_sync();
        let settled = |c: &Cluster| {
            (0..2).all(|i| match c.resync_state(i) {
                None => true,
                Some((s, rem)) => (s == "done" || s == "idle") && rem == 0,
            })
        };
        let uri = self.cluster.nbd_uri();
        let same = wait_until(Duration::from_secs(60), || {
            let same = settled(&self.cluster)
                && compare::flush_via_frontend(&uri).is_ok()
                && self.compare_replicas().identical();
            if !same {
                std::thread::sleep(Duration::from_millis(200));
            }
            same.then_some(())
        });
        if same.is_none() {
            let c = self.compare_replicas();
            let lines = self.describe_difference(&c);
            if both {
                self.divergent += 1;
            }
            self.fail(&format!(
                "the replicas differ 60 s after the last fault (in sync: {:?}, resync a: {:?}, b: {:?}) \
                 in {} blocks:\n{}",
                self.cluster.in_sync(),
                self.cluster.resync_state(0),
                self.cluster.resync_state(1),
                c.differing_blocks,
                lines.join("\n")
            ));
        }
        if both {
            self.comparisons += 1;
        } else {
            eprintln!("note: the replicas are identical, but one is still out of the in-sync set");
        }
        self.fail_on_stray("end", &self.compare_replicas());
        for (i, name) in NAMES.iter().enumerate() {
            let data = compare::read_live(&self.cluster.pool_file(i, "data"));
            let bad = self
                .model
                .check(&format!("end, replica {name} data file"), &data);
            if !bad.is_empty() {
                self.fail(&format!("acknowledged writes lost:\n{}", bad.join("\n")));
            }
        }
        t.elapsed()
    }

    pub fn run(&mut self, target: u32) {
        self.check_all("at start");
        let budget = crate::env_u64("TWINVOL_FAULT_MINUTES").map(|m| Duration::from_secs(m * 60));
        while self.faults < target {
            if budget.is_some_and(|b| self.started.elapsed() > b) {
                eprintln!(
                    "note: TWINVOL_FAULT_MINUTES={} reached after {} faults: no more faults",
                    budget.map_or(0, |b| b.as_secs() / 60),
                    self.faults
                );
                break;
            }
            let t = Instant::now();
            let before = self.cluster.in_sync();
            if before != [true, true] && self.wait_both_in_sync() {
                // A replica the frontend returned to the in-sync set must
                // hold every acknowledged write, and be identical to its peer.
                self.check_all(&format!("after {} rejoined", show_set(before.map(|s| !s))));
            }
            let in_sync = self.cluster.in_sync();
            let kind = self.choose(in_sync);
            self.start_writer(Mix::Mixed);
            let n = self.rng.range(3, 20);
            self.let_writes_flow(n, "before the fault");
            let (done, note) = self.inject(kind, in_sync);
            if self.writer.is_some() {
                self.stop_writer();
            }
            for k in &done {
                self.faults += 1;
                *self.per_kind.entry(k.name()).or_default() += 1;
            }
            let names: Vec<&str> = done.iter().map(|k| k.name()).collect();
            let line = format!(
                "[{:6.1}s] fault {:3}/{target}: {} (in sync before: {}) {note}",
                self.elapsed(),
                self.faults,
                names.join(" + "),
                show_set(in_sync),
            );
            self.history.push(line.clone());
            let checked = self.check_all(&format!(
                "after fault {}: {}",
                self.faults,
                names.join(" + ")
            ));
            eprintln!(
                "{line}; checked through the frontend and {checked} in-sync replica file(s){}: \
                 {} writes acked, {} verified so far, 0 lost ({:.1?})",
                if checked == 2 { ", compared" } else { "" },
                self.model.acked,
                self.model.verified.len(),
                t.elapsed()
            );
        }
        let took = self.converge();
        eprintln!(
            "[{:6.1}s] converged in {took:.1?}: replica files identical",
            self.elapsed()
        );
    }
}

/// Whether a replica (re)starts with the volatile cache: both ways when
/// both replica-kill and power-loss may be injected, else the one that may.
fn volatile_draw(kinds: &[Kind], rng: &mut Rng) -> bool {
    match (
        kinds.contains(&Kind::ReplicaKill),
        kinds.contains(&Kind::PowerLoss),
    ) {
        (false, true) => true,
        (true, true) => rng.one_in(2),
        _ => false,
    }
}

/// An `--arbiter-stall` spec for a new frontend, one time in two: one of
/// its first commits of a kind sleeps past its deadline after landing.
fn stall_draw(supported: bool, rng: &mut Rng) -> Option<&'static str> {
    const SPECS: [&str; 5] = [
        "return-to-in-sync#1=5s",
        "return-to-in-sync#2=5s",
        "remove-from-in-sync#1=5s",
        "remove-from-in-sync#2=5s",
        "renew-lease#20=4s",
    ];
    if rng.one_in(2) && supported {
        Some(SPECS[rng.range(0, SPECS.len() as u64) as usize])
    } else {
        None
    }
}

pub fn show_set(s: [bool; 2]) -> String {
    let v: Vec<&str> = (0..2).filter(|&i| s[i]).map(|i| NAMES[i]).collect();
    v.join(",")
}
