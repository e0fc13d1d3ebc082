//! Trusty's private virtio bus (spec §5): the resource table, the bus bring-up and tear-down
//! sequence, and vrings in the legacy layout with Trusty's rules.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod bus;
pub mod rsc;
pub mod vring;

pub use bus::{Bus, BusError, VdevHandle};
