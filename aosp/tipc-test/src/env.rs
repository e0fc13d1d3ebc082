//! The tests' environment on a host: `std` time, sleep and stdout.

use std::fmt;
use std::time::{Duration, Instant};

pub use tipc_test_cases::TestEnv;

/// [`TestEnv`] with `Instant`, `thread::sleep` and `println!`.
#[derive(Clone, Copy, Debug)]
pub struct StdEnv {
    origin: Instant,
}

impl StdEnv {
    /// An environment whose clock starts now.
    pub fn new() -> StdEnv {
        StdEnv { origin: Instant::now() }
    }
}

impl Default for StdEnv {
    fn default() -> Self {
        StdEnv::new()
    }
}

impl TestEnv for StdEnv {
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
    fn println(&self, args: fmt::Arguments<'_>) {
        println!("{args}");
    }
}
