//! What the operator has seen change, on its own monotonic clock.
//!
//! Heartbeat Leases and frontend leases are judged by how long the operator
//! has seen no change of them (a Lease's resourceVersion; a frontend's
//! holder, renewal and epoch), never by the times written in them (design
//! invariant 4). The [`Tracker`] keeps, per key, the last value seen and the
//! [`Beat`] it gives; a value seen for the first time counts as having just
//! changed but proves nothing, so a restarted operator waits a full
//! threshold before it calls anything stale, and sees a site recovered only
//! after watching its heartbeats change.

use std::collections::HashMap;
use std::time::Duration;

use crate::decide::{Beat, Mono};

/// The tracker key of `node`'s heartbeat Lease.
pub fn heartbeat_key(node: &str) -> String {
    format!("hb/{node}")
}

/// The tracker key of `volume`'s frontend (its lease fingerprint).
pub fn frontend_key(volume: &str) -> String {
    format!("fe/{volume}")
}

#[derive(Clone, Debug)]
struct Entry {
    value: String,
    beat: Beat,
}

/// Observations keyed by a string (`heartbeat/<node>`, `frontend/<volume>`).
#[derive(Clone, Debug)]
pub struct Tracker {
    staleness: Duration,
    entries: HashMap<String, Entry>,
}

impl Tracker {
    /// A tracker calling a gap longer than `staleness` between two changes
    /// the end of a run of changes.
    pub fn new(staleness: Duration) -> Self {
        Self {
            staleness,
            entries: HashMap::new(),
        }
    }

    /// Records that `key` has `value` at `now`; returns its beat.
    pub fn observe(&mut self, key: &str, value: &str, now: Mono) -> Beat {
        match self.entries.get_mut(key) {
            None => {
                let beat = Beat {
                    last_change: now,
                    proven_since: None,
                };
                self.entries.insert(
                    key.to_owned(),
                    Entry {
                        value: value.to_owned(),
                        beat,
                    },
                );
                beat
            }
            Some(entry) => {
                if entry.value != value {
                    let gap = now.since(entry.beat.last_change);
                    if entry.beat.proven_since.is_none() || gap > self.staleness {
                        entry.beat.proven_since = Some(now);
                    }
                    entry.beat.last_change = now;
                    entry.value = value.to_owned();
                }
                entry.beat
            }
        }
    }

    /// The beat of `key`, if it was ever observed.
    pub fn get(&self, key: &str) -> Option<Beat> {
        self.entries.get(key).map(|e| e.beat)
    }

    /// The last value seen for `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(|e| e.value.as_str())
    }

    /// Forgets the keys starting with `prefix` that `keep` rejects (objects
    /// that disappeared): if one comes back it is a first sighting again.
    pub fn retain(&mut self, prefix: &str, keep: impl Fn(&str) -> bool) {
        self.entries
            .retain(|k, _| !k.starts_with(prefix) || keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Mono {
        Mono::from_millis(v)
    }

    #[test]
    fn only_changes_move_the_last_change_and_the_first_one_proves_life() {
        let mut t = Tracker::new(Duration::from_secs(8));
        let b = t.observe("hb/a1", "1", ms(0));
        assert_eq!(b.proven_since, None);
        assert_eq!(t.observe("hb/a1", "1", ms(5_000)).last_change, ms(0));
        let b = t.observe("hb/a1", "2", ms(6_000));
        assert_eq!(b.last_change, ms(6_000));
        assert_eq!(b.proven_since, Some(ms(6_000)));
        let b = t.observe("hb/a1", "3", ms(8_000));
        assert_eq!(b.proven_since, Some(ms(6_000)), "a steady run");
    }

    #[test]
    fn a_gap_longer_than_the_threshold_starts_a_new_run() {
        let mut t = Tracker::new(Duration::from_secs(8));
        t.observe("hb/a1", "1", ms(0));
        t.observe("hb/a1", "2", ms(1_000));
        let b = t.observe("hb/a1", "3", ms(20_000));
        assert_eq!(b.proven_since, Some(ms(20_000)));
    }

    #[test]
    fn a_forgotten_key_is_a_first_sighting_again() {
        let mut t = Tracker::new(Duration::from_secs(8));
        t.observe("hb/a1", "1", ms(0));
        t.observe("hb/a1", "2", ms(1_000));
        t.observe("fe/v", "x", ms(1_000));
        t.retain("hb/", |_| false);
        assert!(t.get("hb/a1").is_none());
        assert!(t.get("fe/v").is_some(), "other prefixes are kept");
        assert_eq!(t.observe("hb/a1", "2", ms(2_000)).proven_since, None);
    }
}
