//! The logic of the emulation images, kept apart from the bare-metal entry points (`src/bin`)
//! so that it builds, and is unit-tested, on the host too.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod args;
pub mod pages;
pub mod stack;
pub mod vm;
pub mod xen;
