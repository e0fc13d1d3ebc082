//! A Rust port of AOSP's tipc-test (spec §9.1) on a host: the backend over the embedded model,
//! the backend over a Linux trusty-ipc device, the std environment, and the runner with
//! tipc-test's benchmark output. The test cases themselves live in the `no_std` crate
//! `tipc-test-cases`, which bare-metal images run too.

pub mod backend;
pub mod env;
pub mod kernel;
pub mod runner;
pub mod shm;

pub use env::StdEnv;
/// The test cases, re-exported from `tipc-test-cases`.
pub use tipc_test_cases::cases;
