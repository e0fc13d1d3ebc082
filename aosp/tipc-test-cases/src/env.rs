//! What the tests need from where they run: a clock, a way to sleep, and a console.

use core::fmt;
use core::time::Duration;

/// The environment the tests and the runner run in (no threads or std time assumed).
pub trait TestEnv {
    /// Monotonic time in microseconds since an arbitrary, fixed origin.
    fn now_us(&self) -> u64;
    /// Waits for at least `d` (closer3 gives the service time to close its channels).
    fn sleep(&self, d: Duration);
    /// Prints `args` as one line: the environment appends the line ending.
    fn println(&self, args: fmt::Arguments<'_>);
}

/// Microseconds since `start_us`, by `env`'s clock.
pub(crate) fn elapsed_us(env: &dyn TestEnv, start_us: u64) -> u64 {
    env.now_us().saturating_sub(start_us)
}
