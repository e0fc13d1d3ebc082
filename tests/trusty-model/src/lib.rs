//! The secure side of Trusty, modelled from the protocol facts.
#![no_std]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod ipc;
