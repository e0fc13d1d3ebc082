//! The tests of AOSP's tipc-test (spec §9.1) and their runner, without `std`: they need only
//! `alloc`, a [`TipcBackend`] to talk to and a [`TestEnv`] for time and output, so the same
//! cases run in the `tipc-test` command on a host and inside a bare-metal image.
//!
//! [`DeviceBackend`] is the backend over the in-process stack: a [`tipc::TipcDevice`] with
//! libtrusty-like integer handles.
#![no_std]

extern crate alloc;

pub mod backend;
pub mod cases;
pub mod device;
pub mod env;
pub mod runner;

pub use backend::{Errno, Handle, TipcBackend};
pub use cases::{Outcome, Params, Rng, TestCase};
pub use device::DeviceBackend;
pub use env::TestEnv;
pub use runner::{BenchResult, Summary};
