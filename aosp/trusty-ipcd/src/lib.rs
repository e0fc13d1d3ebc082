//! trusty-ipcd: one process owns the normal-world TIPC stack and serves client processes.
//!
//! Clients connect over `AF_UNIX` `SOCK_SEQPACKET` (and `AF_VSOCK` where the kernel has it)
//! with the convention of Trusty's vsock bridge as AOSP's libtrusty uses it (see
//! [`server`]). The same serving loop runs inside a process for libtrusty's in-process
//! device names (`sim`, the platform profiles): a socket pair per channel and a service thread.

pub mod cli;
pub mod linux;
pub mod logger;
pub mod memref;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sys;

pub use server::{Limits, Server, ServerHandle, Stack};
