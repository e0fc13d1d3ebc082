//! A counting global allocator for the bench and the data-path tests: it counts the heap
//! allocations of each thread (so tests running in parallel, or the model's own thread in
//! `cores` mode, do not see each other's) and forwards every call to the system allocator.
//!
//! A program opts in with `#[global_allocator] static A: CountingAlloc = CountingAlloc;` and
//! reads [`allocs_on_this_thread`] before and after the code it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator: [`System`], plus a per-thread count of allocations (`alloc`,
/// `alloc_zeroed`, `realloc`).
pub struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

/// Allocations made so far on the calling thread (0 where [`CountingAlloc`] is not the global
/// allocator).
pub fn allocs_on_this_thread() -> u64 {
    ALLOCS.with(|c| c.get())
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// const-initialised thread-local without a destructor, so touching it never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
