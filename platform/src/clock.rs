//! Time for timeouts and backoff. Trusty never interrupts the normal world for ring activity, so
//! every wait in this stack is a loop against a deadline from a [`Clock`].

/// A monotonic clock and a way to let time pass.
pub trait Clock: Send + Sync {
    /// Monotonic time in nanoseconds from an arbitrary origin.
    fn now_ns(&self) -> u64;
    /// Let about `ns` nanoseconds pass (sleep, or spin on bare metal).
    fn sleep_ns(&self, ns: u64);
    /// A short pause between two polls of shared memory (yield, `wfe`, or nothing).
    fn relax(&self) {}
    /// A cheaper reading of the same clock for a caller that tolerates `max_lag_ns` of
    /// staleness: returns `(reading, lag)` where `reading` is never later than [`Clock::now_ns`]
    /// would have been and at most `lag` earlier, `lag <= max_lag_ns`. A clock with a coarse
    /// variant (Linux `CLOCK_MONOTONIC_COARSE`, which lags by up to one tick) uses it when its
    /// resolution fits; otherwise, and by default, this is `(now_ns(), 0)`.
    fn now_coarse_ns(&self, max_lag_ns: u64) -> (u64, u64) {
        let _ = max_lag_ns;
        (self.now_ns(), 0)
    }
}

/// Nanoseconds in one millisecond.
pub const NS_PER_MS: u64 = 1_000_000;

/// A point in time after which a wait gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(u64);

impl Deadline {
    /// The deadline `timeout_ms` from now (saturating).
    pub fn after_ms(clock: &dyn Clock, timeout_ms: u64) -> Self {
        Deadline(clock.now_ns().saturating_add(timeout_ms.saturating_mul(NS_PER_MS)))
    }

    /// A deadline that has already passed: "do not wait".
    pub const fn now() -> Self {
        Deadline(0)
    }

    /// Whether the deadline has passed.
    pub fn expired(&self, clock: &dyn Clock) -> bool {
        clock.now_ns() >= self.0
    }

    /// Whether the deadline has passed at time `now_ns` (read by the caller from the same
    /// clock), so that a loop can use one clock read for several decisions.
    pub fn passed_at(&self, now_ns: u64) -> bool {
        now_ns >= self.0
    }

    /// Nanoseconds left until the deadline (0 once it has passed).
    pub fn remaining_ns(&self, clock: &dyn Clock) -> u64 {
        self.0.saturating_sub(clock.now_ns())
    }
}
