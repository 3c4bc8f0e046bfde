//! Time as the decisions see it.
//!
//! [`Mono`] is a point on the operator's own monotonic clock (time since the
//! process started). Staleness of a heartbeat and expiry of a frontend's
//! lease are judged by how long the operator has seen *no change* of the
//! object on this clock — never by comparing a `renewTime` written by
//! another machine with this machine's wall clock (design invariant 4).
//! A restarted operator starts observing afresh: everything it sees for the
//! first time counts as having just changed, so a restart can only delay a
//! fail-over, never hasten one.

use std::time::Duration;

/// A point on the operator's monotonic clock: time since the process began
/// observing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(Duration);

impl Mono {
    pub const ZERO: Self = Self(Duration::ZERO);

    pub const fn from_duration(d: Duration) -> Self {
        Self(d)
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub const fn as_duration(self) -> Duration {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Mono) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn plus(self, d: Duration) -> Mono {
        Self(self.0.saturating_add(d))
    }
}

/// What the operator saw of one heartbeat (or one frontend lease): when its
/// value last changed, and since when it has been changing steadily.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Beat {
    /// The last time the observed value changed, or when it was first seen.
    pub last_change: Mono,
    /// The first change of the current run of changes no further apart than
    /// the staleness threshold; `None` while the operator has seen no change
    /// at all since the value (re)appeared. A first sighting proves nothing:
    /// only observed changes prove that the writer is alive.
    pub proven_since: Option<Mono>,
}

impl Beat {
    /// No change for longer than `staleness`.
    pub fn stale(&self, now: Mono, staleness: Duration) -> bool {
        now.since(self.last_change) > staleness
    }

    /// Changing steadily (proven alive) for at least `period`.
    pub fn proven_for(&self, now: Mono, staleness: Duration, period: Duration) -> bool {
        !self.stale(now, staleness) && self.proven_since.is_some_and(|s| now.since(s) >= period)
    }
}

/// The timings of fail-over and fail-back. Flags of the operator; the
/// defaults are chosen together (see [`Timings::failover_bound`]).
/// `Default` is what the decision tests use; the binary's flag defaults
/// (`main.rs`) are shorter — 1.5 s heartbeats, 5 s staleness and leases,
/// 1 s margin: 6.75 s — since a frontend's liveness became its node's
/// heartbeat, which costs no per-volume write however short it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How often a node plugin renews its heartbeat Lease (the node plugin's
    /// setting; the operator uses it for its own polling).
    pub heartbeat_period: Duration,
    /// A heartbeat not seen changing for longer than this is stale; a site
    /// whose heartbeats are all stale is lost.
    pub staleness: Duration,
    /// A frontend's lease duration when its record does not say.
    pub lease_duration: Duration,
    /// Extra wait after a frontend lease expired (on the operator's clock)
    /// before its epoch is bumped.
    pub margin: Duration,
    /// How long a fenced site's heartbeats must be seen changing steadily
    /// before the site is unfenced, and a site must be healthy before a
    /// volume moves to it.
    pub recovery: Duration,
    /// At most one automatic move home per volume within this time (so that a
    /// pod the scheduler keeps putting on the other site is not evicted in
    /// a loop).
    pub move_home_cooldown: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat_period: Duration::from_secs(2),
            staleness: Duration::from_secs(8),
            lease_duration: Duration::from_secs(10),
            margin: Duration::from_secs(2),
            recovery: Duration::from_secs(10),
            move_home_cooldown: Duration::from_secs(300),
        }
    }
}

impl Timings {
    /// The longest time from a site going dark to the operator bumping the
    /// epochs of the volumes served there (then it removes their pods at
    /// once): the later of the heartbeats turning stale and the frontend
    /// leases expiring plus the margin, both counted from the last change
    /// the operator saw before the blackout, plus one polling period. With
    /// the defaults: max(8 s, 10 s + 2 s) + 1 s = 13 s.
    pub fn failover_bound(&self) -> Duration {
        self.staleness
            .max(self.lease_duration + self.margin)
            .saturating_add(self.poll_period())
    }

    /// How often the Site reconciler looks at heartbeats: twice per
    /// heartbeat period, so a change is seen at most half a period late.
    pub fn poll_period(&self) -> Duration {
        (self.heartbeat_period / 2).max(Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_sighting_is_fresh_for_a_threshold_but_proves_nothing() {
        let beat = Beat {
            last_change: Mono::from_millis(1_000),
            proven_since: None,
        };
        let staleness = Duration::from_secs(8);
        assert!(!beat.stale(Mono::from_millis(9_000), staleness));
        assert!(beat.stale(Mono::from_millis(9_001), staleness));
        assert!(!beat.proven_for(Mono::from_millis(2_000), staleness, Duration::ZERO));
    }

    #[test]
    fn the_default_timings_fail_over_within_thirteen_seconds() {
        assert_eq!(Timings::default().failover_bound(), Duration::from_secs(13));
    }
}
