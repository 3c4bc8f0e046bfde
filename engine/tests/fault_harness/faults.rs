//! The faults, the seeded schedule that picks them, and each one's
//! injection and recovery (with the writer running unless said).
//!
//! Kinds (the names `TWINVOL_FAULT_KINDS` takes):
//! - `replica-kill`: kill -9 a replica; degraded writes; restart.
//! - `link-cut`: a site's link down (host side of its veth) for a few
//!   seconds of degraded writes; restored.
//! - `long-cut`: a site's link down for 30–60 s, cut while nbdcopy has
//!   sixteen 4 MiB writes in flight, large writes again before and after it
//!   returns (TCP retransmits what was queued on the connection the
//!   frontend gave up on).
//! - `power-loss`: a replica's power cut: its process killed and every
//!   write it had not flushed gone (the engine's power-loss storage); back.
//! - `frontend-kill`: kill -9 the frontend; a new one takes the lease after
//!   expiry + margin, with a bumped epoch.
//! - `frontend-term`: SIGTERM to the frontend with writes in flight (a clean
//!   stop); a new one.
//! - `client-reset`: kill -9 the NBD client with writes in flight (nbdcopy's
//!   deep queue, or a qemu-io batch).
//! - `arbiter-stall`: the arbiter stalls at a commit point — the fail-over's
//!   swap, the rejoin's `ReturnToInSync` (then, at times, the returned
//!   replica killed again at once), or lease renewals — for longer than the
//!   frontend waits: the swap lands after its caller timed out.
//! - `big-trim`: a trim (or write-zeroes) of 2 GiB and more in requests of
//!   up to 2047 MiB (qemu-io's limit), alone (it must succeed) or with the
//!   frontend killed or stopped, or a replica killed, while it runs.
//! - `survivor-kill`: kill -9 the in-sync replica while it resyncs its
//!   returned peer (after a replica fault with large writes), or, with one
//!   replica out, the only in-sync one (I/O held, then resumed).
//!
//! Schedule: each kind allowed once, shuffled, at the start of the run,
//! then weighted draws; long cuts only as many as asked (they cost 30–60 s
//! each). A kind that needs both replicas in sync waits its turn while one
//! is out.

use std::time::{Duration, Instant};

use crate::common::{qemu_io, wait_until};
use crate::harness::{Harness, show_set};
use crate::model::{Data, Outcome, Write};
use crate::writer::{Mix, qemu_io_outcomes, utc_now};
use crate::{BLOCK, Draw, MIB, NAMES, SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    ReplicaKill,
    LinkCut,
    LongCut,
    PowerLoss,
    FrontendKill,
    FrontendTerm,
    ClientReset,
    ArbiterStall,
    BigTrim,
    SurvivorKill,
}

pub const ALL: [Kind; 10] = [
    Kind::ReplicaKill,
    Kind::LinkCut,
    Kind::LongCut,
    Kind::PowerLoss,
    Kind::FrontendKill,
    Kind::FrontendTerm,
    Kind::ClientReset,
    Kind::ArbiterStall,
    Kind::BigTrim,
    Kind::SurvivorKill,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::ReplicaKill => "replica-kill",
            Kind::LinkCut => "link-cut",
            Kind::LongCut => "long-cut",
            Kind::PowerLoss => "power-loss",
            Kind::FrontendKill => "frontend-kill",
            Kind::FrontendTerm => "frontend-term",
            Kind::ClientReset => "client-reset",
            Kind::ArbiterStall => "arbiter-stall",
            Kind::BigTrim => "big-trim",
            Kind::SurvivorKill => "survivor-kill",
        }
    }

    /// Weight of the random draws (long cuts come only from the deck).
    fn weight(self) -> u64 {
        match self {
            Kind::ReplicaKill => 4,
            Kind::LinkCut | Kind::FrontendKill | Kind::PowerLoss | Kind::ClientReset => 3,
            Kind::FrontendTerm | Kind::ArbiterStall | Kind::BigTrim | Kind::SurvivorKill => 2,
            Kind::LongCut => 0,
        }
    }

    /// Kinds that can be injected with one replica out of sync.
    fn degraded_ok(self) -> bool {
        matches!(
            self,
            Kind::SurvivorKill
                | Kind::ReplicaKill
                | Kind::LinkCut
                | Kind::FrontendKill
                | Kind::FrontendTerm
                | Kind::ClientReset
        )
    }
}

/// Whether `twinvol-engine CMD --help` lists `flag` (the fault hooks exist
/// only in test builds, with the `failpoints` feature).
fn engine_has(cmd: &str, flag: &str) -> bool {
    let out = std::process::Command::new(crate::common::engine_bin())
        .args([cmd, "--help"])
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

/// Whether the engine can model a power cut: its replicas take
/// `--storage-faults volatile`.
pub fn power_loss_supported() -> bool {
    engine_has("replica", "--storage-faults")
}

/// Whether a frontend takes `--arbiter-stall` (a stall after a commit).
pub fn commit_stall_supported() -> bool {
    engine_has("frontend", "--arbiter-stall")
}

/// `TWINVOL_FAULT_KINDS=a,b` (names of [`Kind`]), to soak or replay some
/// kinds of fault alone; all of them by default.
pub fn fault_kinds() -> Vec<Kind> {
    let mut kinds: Vec<Kind> = match std::env::var("TWINVOL_FAULT_KINDS") {
        Err(_) => ALL.to_vec(),
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                ALL.into_iter()
                    .find(|known| known.name() == k)
                    .unwrap_or_else(|| {
                        let names: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
                        panic!("TWINVOL_FAULT_KINDS: unknown kind {k:?}; known: {names:?}")
                    })
            })
            .collect(),
    };
    if kinds.contains(&Kind::PowerLoss) && !power_loss_supported() {
        eprintln!(
            "note: power-loss left out: this engine has no power-loss storage for its replicas yet"
        );
        kinds.retain(|k| *k != Kind::PowerLoss);
    }
    kinds
}

/// How a replica goes away: its process killed (a power cut if it runs
/// with the volatile cache), or its site's link cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    Kill,
    Cut,
}

impl Harness {
    /// Deals the schedule: every kind once, then draws (see the module note).
    pub fn deal(&mut self, target: u32) {
        let mut first: Vec<Kind> = self
            .kinds
            .iter()
            .copied()
            .filter(|k| *k != Kind::LongCut || self.long_cuts_left > 0)
            .collect();
        self.shuffle(&mut first);
        let mut rest: Vec<Kind> = Vec::new();
        let extra_long = if first.contains(&Kind::LongCut) {
            self.long_cuts_left.saturating_sub(1)
        } else {
            0
        };
        for _ in 0..extra_long {
            rest.push(Kind::LongCut);
        }
        while first.len() + rest.len() < target as usize {
            match self.draw(|k| k != Kind::LongCut) {
                Some(k) => rest.push(k),
                None => break,
            }
        }
        self.shuffle(&mut rest);
        first.extend(rest);
        first.reverse(); // popped from the end
        self.deck = first;
    }

    fn shuffle(&mut self, v: &mut [Kind]) {
        for i in (1..v.len()).rev() {
            let j = self.rng.range(0, i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// A weighted draw among the allowed kinds that pass `ok`.
    fn draw(&mut self, ok: impl Fn(Kind) -> bool) -> Option<Kind> {
        let allowed: Vec<Kind> = self
            .kinds
            .iter()
            .copied()
            .filter(|&k| ok(k) && k.weight() > 0)
            .collect();
        let total: u64 = allowed.iter().map(|k| k.weight()).sum();
        if total == 0 {
            return None;
        }
        let mut r = self.rng.range(0, total);
        for k in allowed {
            if r < k.weight() {
                return Some(k);
            }
            r -= k.weight();
        }
        unreachable!("r < total")
    }

    pub fn choose(&mut self, in_sync: [bool; 2]) -> Kind {
        if in_sync == [true, true] {
            if let Some(k) = self.deck.pop() {
                return k;
            }
            if let Some(k) = self.draw(|_| true) {
                return k;
            }
        } else if let Some(k) = self.draw(Kind::degraded_ok) {
            return k;
        }
        let names: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
        self.fail(&format!(
            "TWINVOL_FAULT_KINDS={} leaves no fault for in-sync set {}",
            names.join(","),
            show_set(in_sync)
        ));
    }

    /// One fault (or two) and its recovery; returns the kinds injected and
    /// a note.
    pub fn inject(&mut self, kind: Kind, in_sync: [bool; 2]) -> (Vec<Kind>, String) {
        let x = self.rng.range(0, 2) as usize;
        let n = self.rng.range(2, 12);
        let (kinds, note) = if in_sync != [true, true] {
            let survivor = if in_sync[0] { 0 } else { 1 };
            match kind {
                Kind::SurvivorKill => (vec![kind], self.survivor_outage(survivor, false)),
                Kind::LinkCut if x == survivor => (vec![kind], self.survivor_outage(x, true)),
                Kind::ReplicaKill | Kind::LinkCut => {
                    let (how, done) = if kind == Kind::LinkCut {
                        (Outage::Cut, kind)
                    } else {
                        (Outage::Kill, self.kill_kind(1 - survivor))
                    };
                    let note = self.replica_outage(1 - survivor, how, in_sync, false);
                    (vec![done], note)
                }
                _ => self.inject_any(kind, x, in_sync),
            }
        } else {
            self.inject_any(kind, x, in_sync)
        };
        if self.writer.is_some() {
            self.let_writes_flow(n, &format!("after: {}", kind.name()));
        }
        (kinds, note)
    }

    fn inject_any(&mut self, kind: Kind, x: usize, in_sync: [bool; 2]) -> (Vec<Kind>, String) {
        match kind {
            Kind::ReplicaKill | Kind::LinkCut | Kind::PowerLoss => {
                let (x, how, first) = if kind == Kind::LinkCut {
                    (x, Outage::Cut, kind)
                } else {
                    let x = self.victim(x, kind);
                    (x, Outage::Kill, self.kill_kind(x))
                };
                let mut note = self.replica_outage(x, how, in_sync, false);
                let mut kinds = vec![first];
                // At times a second fault while the returned replica catches up.
                if self.rng.one_in(6) && self.kinds.contains(&Kind::FrontendKill) {
                    note.push_str(&format!(
                        "; then kill -9 the frontend while {} catches up: {}",
                        NAMES[x],
                        self.frontend_kill()
                    ));
                    kinds.push(Kind::FrontendKill);
                }
                (kinds, note)
            }
            Kind::SurvivorKill => {
                let how = if self.rng.one_in(3) {
                    Outage::Cut
                } else {
                    Outage::Kill
                };
                let first = if how == Outage::Cut {
                    Kind::LinkCut
                } else {
                    self.kill_kind(x)
                };
                let mut note = self.replica_outage(x, how, in_sync, true);
                let (k, more) = self.kill_survivor_during_resync(1 - x);
                note.push_str(&more);
                let mut kinds = vec![first];
                if k {
                    kinds.push(Kind::SurvivorKill);
                } else {
                    self.requeue(Kind::SurvivorKill);
                }
                (kinds, note)
            }
            Kind::LongCut => (vec![kind], self.long_cut(x)),
            Kind::FrontendKill => (vec![kind], self.frontend_kill()),
            Kind::FrontendTerm => (vec![kind], self.frontend_term()),
            Kind::ClientReset => (vec![kind], self.client_reset()),
            Kind::ArbiterStall => (vec![kind], self.arbiter_stall(x)),
            Kind::BigTrim => self.big_trim(x),
        }
    }

    /// What killing replica `i` now is: a power cut under the volatile
    /// cache, a process crash (page cache kept) without.
    fn kill_kind(&self, i: usize) -> Kind {
        if self.cluster.volatile[i] {
            Kind::PowerLoss
        } else {
            Kind::ReplicaKill
        }
    }

    /// The replica to kill for `kind` (replica-kill or power-loss): `x`
    /// if its cache fits, else the other if that one's does; if neither
    /// does, `x`, and `kind` is dealt again soon.
    fn victim(&mut self, x: usize, kind: Kind) -> usize {
        let fits = |h: &Self, i: usize| h.kill_kind(i) == kind;
        if fits(self, x) {
            x
        } else if fits(self, 1 - x) {
            1 - x
        } else {
            self.requeue(kind);
            x
        }
    }

    /// Deals `kind` again soon (it could not be injected this time).
    fn requeue(&mut self, kind: Kind) {
        let at = self.deck.len().saturating_sub(2);
        self.deck.insert(at, kind);
    }

    fn outage_name(&self, i: usize, how: Outage) -> String {
        match how {
            Outage::Cut => format!("cut {}'s link", NAMES[i]),
            Outage::Kill if self.cluster.volatile[i] => format!("power cut of {}", NAMES[i]),
            Outage::Kill => format!("kill -9 {}", NAMES[i]),
        }
    }

    fn take_out(&mut self, i: usize, how: Outage) {
        match how {
            Outage::Kill => self.cluster.kill_replica(i),
            Outage::Cut => self.cluster.sites.set_link(i, false),
        }
    }

    fn bring_back(&mut self, i: usize, how: Outage) {
        match how {
            Outage::Kill => self.restart_replica(i),
            Outage::Cut => self.cluster.sites.set_link(i, true),
        }
    }

    /// Replica `i` goes away with degraded writes, and returns. With
    /// `large`, the degraded writes are large (a long resync follows).
    fn replica_outage(&mut self, i: usize, how: Outage, in_sync: [bool; 2], large: bool) -> String {
        let n = self.rng.range(2, 12);
        if large {
            self.writer().set_mix(Mix::Large);
        }
        let name = self.outage_name(i, how);
        self.take_out(i, how);
        let note = if in_sync[i] {
            format!("{name}: failed over in {:.1?}", self.wait_out(i))
        } else {
            format!("{name}: out of sync already, writes went on")
        };
        self.let_writes_flow(n, "while a replica was away");
        self.bring_back(i, how);
        self.writer().set_mix(Mix::Mixed);
        note
    }

    fn frontend_kill(&mut self) -> String {
        self.cluster.kill_frontend();
        let t = Instant::now();
        self.restart_frontend();
        format!("new frontend serving after {:.1?}", t.elapsed())
    }

    /// SIGTERM to the frontend with a batch in flight.
    fn frontend_term(&mut self) -> String {
        let large = !self.rng.one_in(3);
        self.writer()
            .set_mix(if large { Mix::Large } else { Mix::Small });
        let age = self.rng.ms(20, 400);
        if !self
            .writer()
            .wait_client(large, age, Duration::from_secs(30))
        {
            self.fail("frontend-term: no write batch in flight within 30 s");
        }
        let (clean, took) = self.cluster.terminate_frontend(Duration::from_secs(30));
        let t = Instant::now();
        self.restart_frontend();
        self.writer().set_mix(Mix::Mixed);
        format!(
            "SIGTERM {age:?} into a {} batch: {} in {took:.1?}; new frontend serving after {:.1?}",
            if large { "large" } else { "small" },
            if clean {
                "exited"
            } else {
                "did NOT exit (killed)"
            },
            t.elapsed()
        )
    }

    /// Kill -9 of the NBD client with writes in flight.
    fn client_reset(&mut self) -> String {
        let large = !self.rng.one_in(3);
        self.writer()
            .set_mix(if large { Mix::Large } else { Mix::Small });
        let age = self.rng.ms(20, 500);
        let killed = self
            .writer()
            .kill_client(large, age, Duration::from_secs(30));
        self.writer().set_mix(Mix::Mixed);
        match killed {
            Some(_) => format!(
                "kill -9 {} {age:?} into its batch",
                if large {
                    "nbdcopy (16 × 4 MiB in flight)"
                } else {
                    "qemu-io"
                }
            ),
            None => self.fail("client-reset: no write batch in flight within 30 s"),
        }
    }

    /// A 30–60 s cut of site `i` with a deep queue of 4 MiB writes.
    fn long_cut(&mut self, i: usize) -> String {
        self.long_cuts_left = self.long_cuts_left.saturating_sub(1);
        let cut_for = self.rng.ms(30_000, 60_001);
        let after = self.rng.ms(3_000, 8_001);
        self.writer().set_mix(Mix::Large);
        // Early in the batch: most of its 64 MiB still queued for the wire.
        let age = self.rng.ms(5, 80);
        if !self
            .writer()
            .wait_client(true, age, Duration::from_secs(30))
        {
            self.fail("long-cut: no large batch in flight within 30 s");
        }
        self.cluster.sites.set_link(i, false);
        let t = Instant::now();
        let out = self.wait_out(i);
        self.writer().set_mix(Mix::Mixed);
        // Large writes again for the last seconds of the cut and after it.
        let large_from = cut_for.saturating_sub(Duration::from_secs(3));
        while t.elapsed() < large_from {
            self.check_writer_alive("during a long cut");
            std::thread::sleep(Duration::from_millis(200));
        }
        self.writer().set_mix(Mix::Large);
        while t.elapsed() < cut_for {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.cluster.sites.set_link(i, true);
        let back = Instant::now();
        while back.elapsed() < after {
            self.check_writer_alive("after a long cut");
            std::thread::sleep(Duration::from_millis(200));
        }
        self.writer().set_mix(Mix::Mixed);
        format!(
            "cut {} {age:?} into a large batch, for {cut_for:.1?} (failed over in {out:.1?}), \
             large writes for {after:.1?} after its return",
            NAMES[i]
        )
    }

    fn check_writer_alive(&self, when: &str) {
        if self.writer.as_ref().is_some_and(|w| w.finished()) {
            self.fail(&format!("the writer stopped {when} (stalled I/O)"));
        }
    }

    /// The arbiter stalls at one of its commit points (see the module note).
    fn arbiter_stall(&mut self, i: usize) -> String {
        let hold = self.rng.ms(6_000, 9_001);
        match self.rng.range(0, 3) {
            0 => {
                let how = if self.rng.one_in(2) {
                    Outage::Cut
                } else {
                    Outage::Kill
                };
                let name = self.outage_name(i, how);
                let stall = self.cluster.stall_arbiter();
                let t = Instant::now();
                self.take_out(i, how);
                std::thread::sleep(hold);
                drop(stall);
                let out = self.wait_out(i);
                let n = self.rng.range(2, 12);
                self.let_writes_flow(n, "after a stalled fail-over");
                self.bring_back(i, how);
                format!(
                    "at the fail-over: {name} with the arbiter stalled for {hold:.1?}, out {:.1?} \
                     after the stall ended ({:.1?} in all)",
                    out,
                    t.elapsed()
                )
            }
            1 => self.stall_at_rejoin(i, hold),
            _ => {
                let hold = self.rng.ms(2_500, 5_001);
                let stall = self.cluster.stall_arbiter();
                std::thread::sleep(hold);
                drop(stall);
                format!("lease renewals stalled for {hold:.1?} with writes running")
            }
        }
    }

    /// Replica `i` out and back; the arbiter stalls from its return until
    /// `hold` after its resync is done, so the frontend's `ReturnToInSync`
    /// times out and lands later. Then, at times, `i` killed again at once.
    fn stall_at_rejoin(&mut self, i: usize, hold: Duration) -> String {
        let survivor = 1 - i;
        let name = self.outage_name(i, Outage::Kill);
        self.cluster.kill_replica(i);
        let out = self.wait_out(i);
        let n = self.rng.range(2, 12);
        self.let_writes_flow(n, "while a replica was away");
        let stall = self.cluster.stall_arbiter();
        self.restart_replica(i);
        let done = wait_until(Duration::from_secs(60), || {
            self.cluster
                .resync_state(survivor)
                .filter(|(s, rem)| (s == "done" || s == "idle") && *rem == 0)
        });
        std::thread::sleep(hold);
        drop(stall);
        let mut note = format!(
            "at the rejoin: {name} (out in {out:.1?}), back with the arbiter stalled until \
             {hold:.1?} after its resync {}",
            if done.is_some() {
                "was done"
            } else {
                "had not ended within 60 s"
            }
        );
        if self.rng.one_in(2) {
            // The frontend does not know whether its swap landed: the
            // returned replica fails again at once.
            let again = self.outage_name(i, Outage::Kill);
            self.cluster.kill_replica(i);
            let n = self.rng.range(2, 8);
            self.let_writes_flow(n, "after the returned replica died again");
            // Checks need the writer quiet (and its writes in the log).
            self.stop_writer();
            self.check_all(&format!(
                "arbiter-stall: {} killed again right after the stall",
                NAMES[i]
            ));
            self.restart_replica(i);
            self.start_writer(Mix::Mixed);
            note.push_str(&format!(
                "; then {again} again at once (in sync at the arbiter after that: {})",
                show_set(self.cluster.in_sync())
            ));
        }
        note
    }

    /// A trim or write-zeroes of 2 GiB and more, with the writer quiet,
    /// alone or with a fault while it runs.
    fn big_trim(&mut self, i: usize) -> (Vec<Kind>, String) {
        self.stop_writer();
        let offset = self.rng.range(0, 96 * MIB / BLOCK) * BLOCK;
        let len = (2048 * MIB + self.rng.range(0, 32 * MIB / BLOCK) * BLOCK).min(SIZE - offset);
        let discard = !self.rng.one_in(3);
        let max_piece = 2047 * MIB;
        let first_piece = self.rng.range(1100 * MIB / BLOCK, max_piece / BLOCK + 1) * BLOCK;
        let mut pieces = Vec::new();
        let (mut off, mut left) = (offset, len);
        let mut piece = first_piece.min(left);
        while left > 0 {
            let id = self.take_id();
            pieces.push(Write {
                id,
                offset: off,
                len: piece,
                fua: false,
                data: Data::Zeros { discard },
            });
            off += piece;
            left -= piece;
            piece = left.min(max_piece);
        }
        let cmds: Vec<String> = pieces
            .iter()
            .map(|w| {
                if discard {
                    format!("discard {} {}", w.offset, w.len)
                } else {
                    format!("write -z -u {} {}", w.offset, w.len)
                }
            })
            .collect();
        let variant = self.rng.range(0, 8);
        let delay = self.rng.ms(0, 150);
        let sent = utc_now();
        let child = qemu_io::spawn(&self.cluster.nbd_uri(), &cmds);
        let mut kinds = vec![Kind::BigTrim];
        let during = match variant {
            4 | 5 if self.kinds.contains(&Kind::FrontendKill) => {
                std::thread::sleep(delay);
                self.cluster.kill_frontend();
                kinds.push(Kind::FrontendKill);
                format!("; kill -9 the frontend {delay:?} into it")
            }
            6 if self.kinds.contains(&Kind::FrontendTerm) => {
                std::thread::sleep(delay);
                let (clean, took) = self.cluster.terminate_frontend(Duration::from_secs(30));
                kinds.push(Kind::FrontendTerm);
                format!(
                    "; SIGTERM to the frontend {delay:?} into it ({} in {took:.1?})",
                    if clean { "exited" } else { "killed" }
                )
            }
            7 if self.kinds.contains(&self.kill_kind(i)) => {
                std::thread::sleep(delay);
                let name = self.outage_name(i, Outage::Kill);
                kinds.push(self.kill_kind(i));
                self.cluster.kill_replica(i);
                format!("; {name} {delay:?} into it")
            }
            _ => String::new(),
        };
        let out = wait_for_child(child, Duration::from_secs(180));
        let outcomes = qemu_io_outcomes(&pieces, &out, &std::sync::atomic::AtomicU64::new(0));
        let span = format!("{sent}..{}", utc_now());
        for (w, o) in pieces.iter().zip(&outcomes) {
            self.record(w, *o, &span);
        }
        let acked = outcomes.iter().filter(|o| **o == Outcome::Acked).count();
        if during.is_empty() && acked < pieces.len() {
            self.fail(&format!(
                "big-trim: {} of {len} bytes at offset {offset} failed with no fault: {}{}",
                if discard { "discard" } else { "write-zeroes" },
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if kinds.contains(&Kind::FrontendKill) || kinds.contains(&Kind::FrontendTerm) {
            self.restart_frontend();
        }
        if kinds.contains(&Kind::ReplicaKill) || kinds.contains(&Kind::PowerLoss) {
            self.wait_out(i);
            self.restart_replica(i);
        }
        self.start_writer(Mix::Mixed);
        let note = format!(
            "{} of {} MiB at offset {offset} in {} request(s), {acked} acknowledged{during}",
            if discard { "discard" } else { "write-zeroes" },
            len / MIB,
            pieces.len()
        );
        (kinds, note)
    }

    /// The only in-sync replica `i` goes away (killed, or its link cut) and
    /// returns: I/O is held meanwhile and must resume after. Without
    /// `held_io` the writer is stopped first (see `TWINVOL_FAULT_HELD_IO`).
    fn survivor_outage(&mut self, i: usize, cut: bool) -> String {
        // A power cut of the only in-sync replica may lose what it had not
        // flushed, legitimately: a volatile one loses its link instead.
        let cut = cut || self.cluster.volatile[i];
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
            self.restart_replica(i);
        }
        if !self.held_io {
            // Writes resume once the frontend can use the replica again
            // (TWINVOL_FAULT_HELD_IO=0, the outage without I/O): after a cut,
            // once the site answers from the host (neighbour resolved);
            // after a kill, once the frontend logged its reconnection.
            if cut && !self.cluster.reachable(i) {
                self.fail(&format!(
                    "site {} unreachable from the host after its link was restored",
                    NAMES[i]
                ));
            }
            let deadline = crate::harness::REJOIN_DEADLINE;
            if !cut
                && wait_until(deadline, || {
                    (self.cluster.reconnects(i) > reconnects).then_some(())
                })
                .is_none()
            {
                self.fail(&format!(
                    "the frontend did not reconnect to replica {} within {deadline:?} of its restart",
                    NAMES[i]
                ));
            }
            self.start_writer(Mix::Mixed);
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
            "{} the only in-sync {}: away {away:.1?} (its resync of {}: {resync}), writes {} {:.1?} \
             after its return",
            if cut { "cut" } else { "kill -9" },
            NAMES[i],
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
    /// it copies, restart it. Whether it was killed, and a note.
    fn kill_survivor_during_resync(&mut self, survivor: usize) -> (bool, String) {
        let copying = wait_until(Duration::from_secs(10), || {
            self.cluster
                .resync_state(survivor)
                .filter(|(s, rem)| s == "copying" && *rem > 0)
        });
        if copying.is_none() {
            return (
                false,
                "; resync over before the survivor could be killed".into(),
            );
        }
        let note = self.survivor_outage(survivor, false);
        (true, format!("; then mid-resync: {note}"))
    }
}

/// Waits for a child started with piped output; kills it after `deadline`.
fn wait_for_child(mut child: std::process::Child, deadline: Duration) -> std::process::Output {
    if wait_until(deadline, || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("qemu-io output")
}
