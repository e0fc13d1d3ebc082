//! Pages for buffers shared with the peer, from a static pool. The images run with the MMU off,
//! so an address the CPU uses is the address the peer is told (an IPA in a DomU, a PA at EL1
//! without a hypervisor).

use alloc::vec::Vec;
use core::ptr::NonNull;

use trusty_platform::mem::{DmaRegion, PageAllocator, PAGE_SIZE};

/// First-fit page allocator over `[base, base + pages * PAGE_SIZE)`.
pub struct PoolAllocator {
    base: usize,
    used: Vec<bool>,
}

impl PoolAllocator {
    /// # Safety
    /// The region must be page-aligned memory owned by this allocator for the program's life,
    /// at an address that is also its physical (or intermediate physical) address.
    pub unsafe fn new(base: usize, len: usize) -> PoolAllocator {
        PoolAllocator { base, used: alloc::vec![false; len / PAGE_SIZE] }
    }

    pub fn pages_in_use(&self) -> usize {
        self.used.iter().filter(|&&u| u).count()
    }
}

impl PageAllocator for PoolAllocator {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        if pages == 0 {
            return None;
        }
        let mut run = 0;
        let first = self.used.iter().enumerate().find_map(|(i, &u)| {
            run = if u { 0 } else { run + 1 };
            (run == pages).then(|| i + 1 - pages)
        })?;
        self.used[first..first + pages].iter_mut().for_each(|u| *u = true);
        let addr = self.base + first * PAGE_SIZE;
        // SAFETY: the pages lie in the pool (`new`) and were free; zeroing memory nobody holds.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE_SIZE) };
        let vaddr = NonNull::new(addr as *mut u8)?;
        // SAFETY: the region is handed to the caller until it comes back through `free`.
        Some(unsafe { DmaRegion::new(vaddr, addr as u64, pages) })
    }

    unsafe fn free(&mut self, region: DmaRegion) {
        let Some(off) = (region.paddr() as usize).checked_sub(self.base) else { return };
        let first = off / PAGE_SIZE;
        if let Some(s) = self.used.get_mut(first..first + region.pages()) {
            s.iter_mut().for_each(|u| *u = false);
        }
    }
}
