//! The tests' environment on a host: `std` time, sleep and stdout.

use std::fmt;
use std::time::{Duration, Instant};

pub use tipc_test_cases::TestEnv;

/// [`TestEnv`] with `Instant`, `thread::sleep` and stdout.
#[derive(Clone, Copy, Debug)]
pub struct StdEnv {
    origin: Instant,
    /// Lines go through [`print_line`] (the command) rather than `println!` (a test harness,
    /// which captures `println!` and not direct writes to stdout).
    command: bool,
}

impl StdEnv {
    /// An environment whose clock starts now; lines printed with `println!`.
    pub fn new() -> StdEnv {
        StdEnv { origin: Instant::now(), command: false }
    }
    /// The command's environment: lines printed with [`print_line`], so that a reader that
    /// went away ends the program quietly.
    pub fn command() -> StdEnv {
        StdEnv { origin: Instant::now(), command: true }
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
        if self.command {
            print_line(args);
        } else {
            println!("{args}");
        }
    }
}

/// Exit status of a program whose reader went away: what a shell reports for one killed by
/// SIGPIPE (128 + 13), as AOSP's C tipc-test is when its output is piped into `head`.
pub const EXIT_READER_GONE: i32 = 141;

/// Writes one line to stdout, as `println!` does, but never panics: when the reader has gone
/// (`tipc-test ... | head`) the program ends at once and quietly with [`EXIT_READER_GONE`], as
/// the C tool dies of SIGPIPE (Rust programs ignore SIGPIPE, so the write fails with EPIPE
/// instead, and `println!` would panic); any other write error ends it with a message and
/// status 1. The process's exit releases what it holds (channels, shares, a model's memory).
pub fn print_line(args: fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(format_args!("{args}\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_READER_GONE);
        }
        eprintln!("tipc-test: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
