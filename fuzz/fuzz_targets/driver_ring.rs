//! The driver end of a vring against a hostile device (the device writes the used ring, the
//! used index and anything else in the ring); the program and the properties checked are
//! described in `src/ring.rs`. The indices start at 0.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_ipc_stack_fuzz::ring::{run, Start};

fuzz_target!(|data: &[u8]| run(data, Start::Zero));
