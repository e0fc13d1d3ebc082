//! Library half of `tipc-bench`: the minimal secure-side peer that lets the bench and the tests
//! measure the normal-world stack alone, the counting allocator they count heap allocations
//! with, the choice of an echo series' chunks by the cache-line round trips around them, and
//! the echo floor (an echo's cache lines moved with no work, a machine reference).

pub mod alloc_count;
pub mod chunks;
pub mod floor;
pub mod stack_peer;
