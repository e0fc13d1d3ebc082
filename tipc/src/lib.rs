//! TIPC, Trusty's channel protocol over two vrings (spec §6).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod device;
mod error;
pub mod wire;

pub use device::{ChannelId, ChannelState, Config, DeviceState, DeviceStats, ForeignMemRef, PollFlags, Timeout, TipcDevice};
pub use error::{errno, Error};

#[cfg(test)]
mod fake_peer;
#[cfg(test)]
mod device_tests;
