//! Library half of `tipc-bench`: the minimal secure-side peer that lets the bench and the tests
//! measure the normal-world stack alone, the counting allocator they count heap allocations
//! with, and the choice of an echo series' chunks by the cache-line round trips around them.

pub mod alloc_count;
pub mod chunks;
pub mod stack_peer;
