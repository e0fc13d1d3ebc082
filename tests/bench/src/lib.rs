//! Library half of `tipc-bench`: the minimal secure-side peer that lets the bench and the tests
//! measure the normal-world stack alone, and the counting allocator they count heap
//! allocations with.

pub mod alloc_count;
pub mod stack_peer;
