//! A Rust port of AOSP's tipc-test (spec §9.1): the test cases, the backends they run against,
//! and the runner with tipc-test's benchmark output.

pub mod backend;
pub mod cases;
pub mod runner;
