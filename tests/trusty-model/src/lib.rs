//! A model of the Trusty secure side, written from the protocol facts (spec §2-§6, §9.2): the
//! SMC dispatcher with Trusty's fast / standard / NOP semantics, an FF-A memory-sharing
//! stand-in, the virtio bus and its TIPC device, and the ipc-unittest services as small trusted
//! apps. It reaches normal-world memory only through ids that were really shared with it, so a
//! wrong sharing decision becomes a recorded [`mem::Fault`].
//!
//! `no_std` + `alloc`: the same model runs on the host (feature `std`: simulated RAM and
//! conduits in [`host`]), and is meant to run at EL3 or as a Xen DomU.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
pub mod host;
pub mod ipc;
pub mod mem;
pub mod model;
pub mod raw;
pub mod tipc_dev;
#[cfg(feature = "std")]
pub mod timeline;
pub mod xen_ffa;

pub use model::{Injection, Model, ModelConfig, ModelStats, Variant};
pub use tipc_dev::Malformed;
