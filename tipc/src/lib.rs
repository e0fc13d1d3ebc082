//! TIPC, Trusty's channel protocol over two vrings (spec §6).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod wire;
