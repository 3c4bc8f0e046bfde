//! The clocks the lease rules use, in one place, so that nothing compares
//! times taken on two machines by accident.
//!
//! - [`WallClock`]: wall-clock milliseconds since the Unix epoch, only ever
//!   *recorded* at the arbiter (`renewed_at_ms`, a Kubernetes `renewTime`)
//!   for people to read. It can be offset (a hidden test flag) to play a
//!   machine whose clock is wrong.
//! - [`BootInstant`]: `CLOCK_BOOTTIME`, a monotonic clock that keeps
//!   running while the machine is suspended. A frontend's self-fencing is
//!   timed on it: a frontend whose machine slept through its lease must
//!   find the lease expired on waking, which `CLOCK_MONOTONIC` (Rust's
//!   `Instant` on Linux) would not show, since it stops during suspend.
//!
//! Another frontend's lease is judged on the observer's own monotonic clock
//! (how long the record went unchanged since it saw it change), see
//! `frontend::lease`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock as this process records it, possibly offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    /// Added to the system's wall clock (negative: behind).
    pub offset_ms: i64,
}

impl WallClock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system's wall clock moved by `offset_ms` (tests: a machine whose
    /// clock runs ahead, or behind).
    pub fn offset(offset_ms: i64) -> Self {
        Self { offset_ms }
    }

    /// Milliseconds since the Unix epoch (0 before it).
    pub fn now_ms(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        u64::try_from(real.saturating_add(self.offset_ms)).unwrap_or(0)
    }
}

/// A point on `CLOCK_BOOTTIME` (time since boot, suspend included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now, on `CLOCK_BOOTTIME`.
    pub fn now() -> Self {
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            Ok(t) => Self(Duration::new(
                u64::try_from(t.tv_sec()).unwrap_or(0),
                u32::try_from(t.tv_nsec()).unwrap_or(0),
            )),
            // Every Linux since 2.6.39 has it; should it ever fail, the
            // monotonic clock is the closest safe stand-in (it only stops
            // during suspend, which then goes unnoticed).
            Err(_) => Self(monotonic_fallback()),
        }
    }

    /// The instant `d` after boot (as [`Self::since_boot`] gave it): how
    /// another process on the same machine hands over a point in time.
    pub fn from_since_boot(d: Duration) -> Self {
        Self(d)
    }

    /// Time since boot.
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// How long after `earlier` this is (zero if it is not later).
    pub fn saturating_since(self, earlier: Self) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// Time elapsed since this instant.
    pub fn elapsed(self) -> Duration {
        Self::now().saturating_since(self)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;

    /// `self + d`, saturating.
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

fn monotonic_fallback() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            Duration::new(
                u64::try_from(t.tv_sec()).unwrap_or(0),
                u32::try_from(t.tv_nsec()).unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_wall_clock_is_ahead_or_behind_by_the_offset() {
        let real = WallClock::system().now_ms();
        let ahead = WallClock::offset(60_000).now_ms();
        let behind = WallClock::offset(-60_000).now_ms();
        assert!((59_000..61_000).contains(&(ahead - real)), "{ahead} {real}");
        assert!(
            (59_000..61_000).contains(&(real - behind)),
            "{behind} {real}"
        );
        assert_eq!(WallClock::offset(i64::MIN).now_ms(), 0);
    }

    #[test]
    fn boot_time_is_monotonic_and_not_behind_the_monotonic_clock() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(5));
        let b = BootInstant::now();
        assert!(b > a);
        assert!(b.saturating_since(a) >= Duration::from_millis(5));
        assert_eq!(a.saturating_since(b), Duration::ZERO);
        // Boot time includes suspends, so it is never behind the
        // monotonic clock (read first).
        let monotonic = monotonic_fallback();
        assert!(BootInstant::now().since_boot() >= monotonic);
        assert_eq!(
            (a + Duration::from_secs(1)).saturating_since(a),
            Duration::from_secs(1)
        );
    }
}
