//! Library half of `tipc-bench`: the minimal secure-side peer that lets the bench and the tests
//! measure the normal-world stack alone.

pub mod stack_peer;
