//! As `driver_ring`, with the driver's used and avail indices 64 short of the u16 wrap when
//! the program starts, so that a hostile device meets the wrap. Slow (about 40 ms of honest
//! traffic per execution before the program), hence a target of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_ipc_stack_fuzz::ring::{run, Start};

fuzz_target!(|data: &[u8]| run(data, Start::NearWrap));
