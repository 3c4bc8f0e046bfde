//! A stall at the file arbiter's commit points (feature `failpoints`): the
//! model of an arbiter update whose answer is lost.
//!
//! Over HTTP an update can land at the API server while its caller gives up
//! waiting (the Kubernetes arbiter's deadline is 3 s): the caller cannot
//! know whether it happened. To make that happen on purpose, a
//! [`CommitStall`] makes the file arbiter commit the change (the record is
//! renamed into place and synced, the lock released) and then sleep before
//! it answers — past the caller's deadline, so that the caller times out on
//! a change that is already in the record.
//!
//! Spec (comma-separated): `CHANGE[#N]=DURATION`, CHANGE one of
//! `remove-from-in-sync`, `return-to-in-sync`, `acquire-lease`,
//! `renew-lease`, `release-lease` or `any`; `#N` stalls only the N-th commit
//! of that kind in this process (1-based), without it every one; DURATION
//! like `6s` or `500ms`. E.g. `return-to-in-sync#1=8s`. A frontend takes it
//! from `--arbiter-stall` (env `TWINVOL_ARBITER_STALL`); every stall is
//! logged (`arbiter commit stalled`) when it starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::record::Change;

/// Why a stall spec could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "arbiter stall item {item:?}: {reason} (items: CHANGE[#N]=DURATION, CHANGE one of remove-from-in-sync, return-to-in-sync, acquire-lease, renew-lease, release-lease, any)"
)]
pub struct StallSpecError {
    pub item: String,
    pub reason: String,
}

const KINDS: [&str; 6] = [
    "remove-from-in-sync",
    "return-to-in-sync",
    "acquire-lease",
    "renew-lease",
    "release-lease",
    "any",
];

#[derive(Debug)]
struct Rule {
    kind: &'static str,
    nth: Option<u64>,
    stall: Duration,
    seen: AtomicU64,
}

/// Which commits stall, and for how long.
#[derive(Debug)]
pub struct CommitStall {
    rules: Vec<Rule>,
}

/// The kind of a change, as the spec names it.
pub fn change_kind(change: &Change) -> &'static str {
    #[allow(unreachable_patterns)] // other helpers may add kinds
    match change {
        Change::RemoveFromInSync(_) => "remove-from-in-sync",
        Change::ReturnToInSync(_) => "return-to-in-sync",
        Change::AcquireLease { .. } => "acquire-lease",
        Change::RenewLease { .. } => "renew-lease",
        Change::ReleaseLease { .. } => "release-lease",
        _ => "other",
    }
}

fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

impl CommitStall {
    pub fn parse(spec: &str) -> Result<Self, StallSpecError> {
        let mut rules = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |reason: &str| StallSpecError {
                item: item.to_owned(),
                reason: reason.to_owned(),
            };
            let (what, dur) = item.split_once('=').ok_or_else(|| bad("no `=`"))?;
            let stall = parse_duration(dur).ok_or_else(|| bad("bad duration (6s, 500ms)"))?;
            let (kind, nth) = match what.split_once('#') {
                Some((k, n)) => (
                    k,
                    Some(
                        n.parse::<u64>()
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| bad("bad #N"))?,
                    ),
                ),
                None => (what, None),
            };
            let kind = KINDS
                .into_iter()
                .find(|k| *k == kind)
                .ok_or_else(|| bad("unknown change"))?;
            rules.push(Rule {
                kind,
                nth,
                stall,
                seen: AtomicU64::new(0),
            });
        }
        Ok(Self { rules })
    }

    /// How long to stall after committing `change` (counts the commit).
    pub fn after_commit(&self, change: &Change) -> Option<Duration> {
        let kind = change_kind(change);
        let mut stall = None;
        for r in &self.rules {
            if r.kind != "any" && r.kind != kind {
                continue;
            }
            let n = r.seen.fetch_add(1, Ordering::SeqCst) + 1;
            if stall.is_none() && r.nth.is_none_or(|want| want == n) {
                stall = Some(r.stall);
            }
        }
        stall
    }
}

static PROCESS_STALL: OnceLock<Arc<CommitStall>> = OnceLock::new();

/// Installs the commit stall of this process (once; a second call is
/// ignored and returns false): every file arbiter opened afterwards uses it.
pub fn install_commit_stall(stall: CommitStall) -> bool {
    tracing::warn!(
        rules = stall.rules.len(),
        "arbiter commit stall is on (tests only)"
    );
    PROCESS_STALL.set(Arc::new(stall)).is_ok()
}

/// The stall installed for this process, if any.
pub fn process_stall() -> Option<Arc<CommitStall>> {
    PROCESS_STALL.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ReplicaId;

    fn ret() -> Change {
        Change::ReturnToInSync(ReplicaId::new("a").expect("valid"))
    }

    #[test]
    fn the_nth_commit_of_a_kind_stalls() {
        let s = CommitStall::parse("return-to-in-sync#2=6s").expect("valid");
        assert_eq!(s.after_commit(&ret()), None);
        let out = Change::RemoveFromInSync(ReplicaId::new("a").expect("valid"));
        assert_eq!(s.after_commit(&out), None, "another kind does not count");
        assert_eq!(s.after_commit(&ret()), Some(Duration::from_secs(6)));
        assert_eq!(s.after_commit(&ret()), None);
        let every = CommitStall::parse("any=500ms").expect("valid");
        assert_eq!(every.after_commit(&out), Some(Duration::from_millis(500)));
        assert_eq!(every.after_commit(&ret()), Some(Duration::from_millis(500)));
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in ["return=6s", "any", "any=6", "any#0=1s", "any#x=1s"] {
            assert!(CommitStall::parse(bad).is_err(), "{bad}");
        }
    }
}
