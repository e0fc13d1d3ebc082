//! The global allocator: `embedded-alloc`'s first-fit `LlffHeap` (linked_list_allocator) over
//! the region the image sizes in [`crate::entry!`] (8 MiB unless told otherwise).
//!
//! Why this allocator and this lock: the images run with the MMU off, where all memory is
//! Device memory and exclusive loads/stores (LDXR/STXR, which every spin lock and atomic
//! read-modify-write compiles to without LSE) are not guaranteed to work (qemu-xen.md gotcha 5).
//! `linked_list_allocator`'s `LockedHeap` uses a spin lock, so it is not used. `LlffHeap` wraps
//! the same allocator in a `critical_section::Mutex<RefCell<..>>`, which contains no atomics;
//! the runtime's `critical-section` implementation masks interrupts (DAIF) around it, which is
//! a correct lock on a single core (the runtime parks every other core at boot).

use core::arch::asm;

use embedded_alloc::LlffHeap;

#[global_allocator]
static HEAP: LlffHeap = LlffHeap::empty();

/// Hands `start..start + size` to the allocator.
///
/// # Safety
/// The region must be unused by anything else for the rest of the program; call once.
pub(crate) unsafe fn init(start: usize, size: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { HEAP.init(start, size) }
}

/// Bytes currently allocated.
pub fn used() -> usize {
    HEAP.used()
}

/// Bytes still free (the largest allocation that fits may be smaller).
pub fn free() -> usize {
    HEAP.free()
}

/// The `critical-section` implementation: mask D, A, I and F, restore them afterwards. Nests.
/// Lock-free, so it works with the MMU off; correct on one core, which is all the runtime runs.
struct DaifCriticalSection;
critical_section::set_impl!(DaifCriticalSection);

// SAFETY: `acquire` masks every interrupt on the only running core and returns the previous
// mask, and `release` restores exactly that mask, so the sections nest and nothing can
// interleave with a section's body.
unsafe impl critical_section::Impl for DaifCriticalSection {
    unsafe fn acquire() -> critical_section::RawRestoreState {
        let daif: u64;
        // SAFETY: reading DAIF and setting all four mask bits only delays interrupts. No `nomem`:
        // the asm is a compiler barrier, so the section's memory accesses stay inside it.
        unsafe { asm!("mrs {}, daif", "msr daifset, #0xf", out(reg) daif, options(nostack, preserves_flags)) };
        daif
    }

    unsafe fn release(daif: critical_section::RawRestoreState) {
        // SAFETY: restores the mask `acquire` returned; a compiler barrier like `acquire`.
        unsafe { asm!("msr daif, {}", in(reg) daif, options(nostack, preserves_flags)) };
    }
}
