//! Everything of the normal-world Trusty stack that touches the CPU, the hypervisor or the secure
//! monitor, each piece behind a trait so that the layers above run in host tests.
//!
//! - [`smc`]: one SMCCC call ([`smc::Conduit`]), Trusty's function ids and monitor error codes.
//! - [`trusty`]: Trusty's call discipline on top of a conduit: fast, standard (with the retry
//!   rules of spec §2.5) and NOP calls, API-version negotiation, the version string.
//! - [`mem`]: memory ids, page allocation and the [`mem::Sharer`] trait.
//! - [`ffa`]: FF-A memory sharing (MEM_SHARE / MEM_RECLAIM), the API-5 sharing mechanism.
//! - [`clock`]: time, for every timeout and backoff.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod clock;
pub mod cpu;
pub mod decision;
pub mod dtb;
mod error;
pub mod facts;
pub mod ffa;
pub mod ffa_call;
pub mod mailbox;
pub mod mem;
pub mod phys;
pub mod plan;
pub mod probe;
pub mod smc;
pub mod trusty;
pub mod xen;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;

pub use error::Error;
