//! Memory the normal world makes visible to Trusty (spec §3): page allocation, the 64-bit
//! memory id Trusty is given for every shared region, and the [`Sharer`] trait behind which each
//! sharing mechanism sits.

use alloc::boxed::Box;
use core::fmt;
use core::ptr::NonNull;

use crate::Error;

/// Page size of the normal world's shared buffers (all buffers are whole pages, spec §6.11).
pub const PAGE_SIZE: usize = 4096;

/// The 64-bit id Trusty is given for a shared region: an FF-A handle, a physical address with
/// attributes, or a grant reference, depending on the mechanism (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryId(pub u64);

impl MemoryId {
    /// The low 32 bits, as passed in the first SMC32 argument.
    pub const fn lo(self) -> u32 {
        self.0 as u32
    }
    /// The high 32 bits.
    pub const fn hi(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// The id made of its low and high 32 bits.
    pub const fn from_parts(lo: u32, hi: u32) -> Self {
        MemoryId(((hi as u64) << 32) | lo as u64)
    }
}

impl fmt::Display for MemoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memory id {:#x}", self.0)
    }
}

/// What the peer may do with a shared region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The peer may only read.
    ReadOnly,
    /// The peer may read and write.
    ReadWrite,
}

/// A physically contiguous run of pages, by its address as the normal world sees it (the IPA in
/// a guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// Address of the first page.
    pub addr: u64,
    /// Number of pages.
    pub pages: u32,
}

/// Pages from a [`PageAllocator`]: where the normal world reaches them and their address.
#[derive(Debug)]
pub struct DmaRegion {
    vaddr: NonNull<u8>,
    paddr: u64,
    pages: usize,
}

// SAFETY: a DmaRegion is an owned run of pages; moving the owner to another thread is sound.
unsafe impl Send for DmaRegion {}

impl DmaRegion {
    /// # Safety
    /// `vaddr` must point to `pages * PAGE_SIZE` bytes that stay valid and are owned by the new
    /// region until it is handed back to the allocator it came from.
    pub unsafe fn new(vaddr: NonNull<u8>, paddr: u64, pages: usize) -> Self {
        DmaRegion { vaddr, paddr, pages }
    }
    /// Where the normal world reaches the pages.
    pub fn vaddr(&self) -> NonNull<u8> {
        self.vaddr
    }
    /// The pages' physical address (the IPA in a guest).
    pub fn paddr(&self) -> u64 {
        self.paddr
    }
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }
    /// No pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
    /// The pages as a [`PhysRange`].
    pub fn range(&self) -> PhysRange {
        PhysRange { addr: self.paddr, pages: self.pages as u32 }
    }
}

/// Hands out zeroed, page-aligned, physically contiguous pages that can be shared with the peer.
pub trait PageAllocator: Send {
    /// `pages` zeroed pages, or `None` when none are left.
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion>;
    /// Gives pages back.
    ///
    /// # Safety
    /// `region` came from this allocator and is no longer shared with, or used by, anyone.
    unsafe fn free(&mut self, region: DmaRegion);
}

/// One mechanism that makes memory visible to the peer and takes it back (spec §3).
pub trait Sharer: Send {
    /// A short name of the mechanism, for logs and the sharing line.
    fn mechanism(&self) -> &'static str;
    /// Makes `ranges` visible to the peer; returns the id the peer is given.
    fn share(&mut self, ranges: &[PhysRange], access: Access) -> Result<MemoryId, Error>;
    /// Takes a share back. [`Error::ReclaimDenied`] means the peer still holds it: the memory
    /// must then be leaked, never freed.
    fn reclaim(&mut self, id: MemoryId) -> Result<(), Error>;
    /// Shares currently live.
    fn live_shares(&self) -> usize;
    /// The most live shares the platform allows, if it limits them.
    fn budget(&self) -> Option<usize>;
    /// The id to hand Trusty where it decodes normal-world memory attributes from the id even
    /// below API 4: the virtio descriptor page of GET_DESCR/START/STOP. Linux shares that page
    /// with `trusty_share_memory` (physical address plus attributes at API < 4) and only vrings
    /// and message buffers with `trusty_share_memory_compat` (attributes masked off); Trusty
    /// before 2019 decodes those three calls' argument with `sm_decode_ns_memory_attr`, which
    /// refuses attribute 0. `id` is what [`Sharer::share`] returned (and stays the id to
    /// reclaim). Default: `id` itself (handles and grants carry no attributes).
    fn attributed_id(&self, id: MemoryId, access: Access) -> MemoryId {
        let _ = access;
        id
    }

    /// Whether the peer takes read-only shares. Where it does not (Xen's FF-A mediator), the
    /// stack's own buffers are shared read-write instead ([`SharedMemory::alloc_shared`]), and
    /// a read-only share of anyone else's memory is refused by [`Sharer::share`]: widening the
    /// access a client gave is not the stack's to do. Default: yes.
    fn takes_read_only(&self) -> bool {
        true
    }

    /// Gives back what the mechanism itself holds (FF-A's RX/TX buffer pair: unmapped with
    /// FFA_RXTX_UNMAP, then freed into `allocator`). Called once at teardown, after every share
    /// was reclaimed; later shares fail. Pages the peer would not give back are leaked, not freed,
    /// and the error says why. The default holds nothing.
    fn close(&mut self, allocator: &mut dyn PageAllocator) -> Result<(), Error> {
        let _ = allocator;
        Ok(())
    }
}

/// Memory that was shared and could not be taken back, so it is kept forever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakStats {
    /// Regions leaked.
    pub regions: usize,
    /// Pages leaked.
    pub pages: usize,
}

/// A buffer that is shared with the peer. It is released only through
/// [`SharedMemory::release`], which decides between freeing and leaking it.
#[derive(Debug)]
#[must_use = "a shared buffer must be released through SharedMemory::release"]
pub struct SharedBuf {
    region: DmaRegion,
    id: MemoryId,
    access: Access,
}

impl SharedBuf {
    /// The id the peer knows the buffer by.
    pub fn id(&self) -> MemoryId {
        self.id
    }
    /// What the peer may do with it.
    pub fn access(&self) -> Access {
        self.access
    }
    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.region.len()
    }
    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }
    /// The buffer's physical address.
    pub fn paddr(&self) -> u64 {
        self.region.paddr()
    }
    /// The start of the buffer, for code that lays out structures the peer reads (vrings).
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.vaddr().as_ptr()
    }

    /// Copies `data` into the buffer at `offset`.
    #[inline]
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        let end = offset.checked_add(data.len()).ok_or(Error::InvalidArgument("offset overflow"))?;
        if end > self.len() {
            return Err(Error::InvalidArgument("write past the end of a shared buffer"));
        }
        #[cfg(feature = "copy-count")]
        copy_count::count(&copy_count::WRITES, data.len());
        // SAFETY: offset..end lies inside the region, which this buffer owns; the peer may read
        // it concurrently, which is what shared memory is for (byte copies, no references).
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies bytes from the buffer at `offset` into `out`.
    #[inline]
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        let end = offset.checked_add(out.len()).ok_or(Error::InvalidArgument("offset overflow"))?;
        if end > self.len() {
            return Err(Error::InvalidArgument("read past the end of a shared buffer"));
        }
        #[cfg(feature = "copy-count")]
        copy_count::count(&copy_count::READS, out.len());
        // SAFETY: as in `write`; the bytes are copied out, never referenced in place.
        unsafe {
            core::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }
}

/// Counts of the copies into and out of shared buffers ([`SharedBuf::write`] and
/// [`SharedBuf::read`], the only ways the stack moves bytes through them), for tests that prove
/// the data path's copy count. Only with the `copy-count` feature, which shipped builds leave
/// off; the counters are global, so a test reads them with nothing else running in its process.
#[cfg(feature = "copy-count")]
pub mod copy_count {
    use core::sync::atomic::{AtomicU64, Ordering};

    /// Copies and bytes in one direction.
    pub struct Counter {
        copies: AtomicU64,
        bytes: AtomicU64,
    }

    /// Copies into shared buffers.
    pub static WRITES: Counter = Counter { copies: AtomicU64::new(0), bytes: AtomicU64::new(0) };
    /// Copies out of shared buffers.
    pub static READS: Counter = Counter { copies: AtomicU64::new(0), bytes: AtomicU64::new(0) };

    pub(crate) fn count(c: &Counter, bytes: usize) {
        c.copies.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    impl Counter {
        /// (copies, bytes) so far.
        pub fn get(&self) -> (u64, u64) {
            (self.copies.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
        }
    }
}

/// Pages plus the mechanism that shares them: allocates-and-shares, reclaims-and-frees, and
/// leaks (and counts) what the peer will not give back.
pub struct SharedMemory {
    allocator: Box<dyn PageAllocator>,
    sharer: Box<dyn Sharer>,
    leaked: LeakStats,
}

impl SharedMemory {
    /// Shares pages from `allocator` by `sharer`.
    pub fn new(allocator: Box<dyn PageAllocator>, sharer: Box<dyn Sharer>) -> Self {
        SharedMemory { allocator, sharer, leaked: LeakStats::default() }
    }

    /// Allocates `bytes` (rounded up to whole pages), zeroed, and shares them with `access`
    /// (read-write instead of read-only where the peer takes no read-only shares: the memory
    /// is the stack's own, so only what the peer may do with it widens).
    pub fn alloc_shared(&mut self, bytes: usize, access: Access) -> Result<SharedBuf, Error> {
        let access = if self.sharer.takes_read_only() { access } else { Access::ReadWrite };
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        let region = self.allocator.alloc_zeroed(pages).ok_or(Error::OutOfMemory)?;
        match self.sharer.share(&[region.range()], access) {
            Ok(id) => Ok(SharedBuf { region, id, access }),
            Err(e) => {
                // SAFETY: the region was never shared and nobody else has seen it.
                unsafe { self.allocator.free(region) };
                Err(e)
            }
        }
    }

    /// Reclaims a buffer and frees it. If the peer denies the reclaim (or the reclaim fails in
    /// a way that leaves the state unknown) the pages are leaked and counted instead, because
    /// the peer may still map them (spec §3.3).
    pub fn release(&mut self, buf: SharedBuf) -> Result<(), Error> {
        match self.sharer.reclaim(buf.id) {
            Ok(()) => {
                // SAFETY: the peer gave the share back; the buffer is consumed, so no user is left.
                unsafe { self.allocator.free(buf.region) };
                Ok(())
            }
            Err(e) => {
                log::warn!("leaking {} page(s) of {}: {e}", buf.region.pages(), buf.id);
                self.leaked.regions += 1;
                self.leaked.pages += buf.region.pages();
                // SharedBuf has no destructor: dropping it here keeps the pages allocated for good.
                drop(buf);
                Err(e)
            }
        }
    }

    /// Keeps a shared buffer allocated and shared for good (counted as leaked): for memory the
    /// peer may still use, e.g. while a standard call that refers to it is pending.
    pub fn leak(&mut self, buf: SharedBuf) {
        self.leaked.regions += 1;
        self.leaked.pages += buf.region.pages();
        // SharedBuf has no destructor: dropping it keeps the pages allocated and shared.
        drop(buf);
    }

    /// What was leaked so far.
    pub fn leaked(&self) -> LeakStats {
        self.leaked
    }

    /// Teardown's last step: the sharer gives back what it holds for itself (see
    /// [`Sharer::close`]). Idempotent; buffers still shared stay the caller's to release first.
    pub fn close(&mut self) -> Result<(), Error> {
        self.sharer.close(&mut *self.allocator)
    }

    /// The sharer.
    pub fn sharer(&self) -> &dyn Sharer {
        &*self.sharer
    }

    /// The sharer, mutably.
    pub fn sharer_mut(&mut self) -> &mut dyn Sharer {
        &mut *self.sharer
    }
}

/// A safety net for every path that drops the memory without [`SharedMemory::close`] (a
/// bring-up that fails half-way): the sharer still gives back what it holds, so that repeated
/// bring-ups do not leak the mechanism's own pages (FF-A's RX/TX pair).
impl Drop for SharedMemory {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("closing the sharer on drop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::alloc::Layout;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Heap pages whose "physical" address is their address; counts what is outstanding.
    struct Heap(Arc<AtomicUsize>);

    impl PageAllocator for Heap {
        fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
            let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
            // SAFETY: the layout has a non-zero size.
            let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
            self.0.fetch_add(pages, Ordering::Relaxed);
            // SAFETY: `p` points to `pages` fresh pages, owned by the region until `free`.
            Some(unsafe { DmaRegion::new(p, p.as_ptr() as u64, pages) })
        }
        unsafe fn free(&mut self, region: DmaRegion) {
            self.0.fetch_sub(region.pages(), Ordering::Relaxed);
            let layout = Layout::from_size_align(region.len(), PAGE_SIZE).unwrap();
            // SAFETY: the region came from `alloc_zeroed` with this layout (the caller's contract).
            unsafe { alloc::alloc::dealloc(region.vaddr().as_ptr(), layout) };
        }
    }

    /// Address ids; denies the next `deny` reclaims; counts closes.
    struct Fake {
        live: usize,
        deny: u32,
        closes: Arc<AtomicUsize>,
    }

    impl Sharer for Fake {
        fn mechanism(&self) -> &'static str {
            "fake"
        }
        fn share(&mut self, ranges: &[PhysRange], _: Access) -> Result<MemoryId, Error> {
            self.live += 1;
            Ok(MemoryId(ranges[0].addr))
        }
        fn reclaim(&mut self, id: MemoryId) -> Result<(), Error> {
            if self.deny > 0 {
                self.deny -= 1;
                return Err(Error::ReclaimDenied(id));
            }
            self.live -= 1;
            Ok(())
        }
        fn live_shares(&self) -> usize {
            self.live
        }
        fn budget(&self) -> Option<usize> {
            None
        }
        fn close(&mut self, _: &mut dyn PageAllocator) -> Result<(), Error> {
            self.closes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn memory(deny: u32) -> (SharedMemory, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (pages, closes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let sharer = Fake { live: 0, deny, closes: closes.clone() };
        (SharedMemory::new(Box::new(Heap(pages.clone())), Box::new(sharer)), pages, closes)
    }

    #[test]
    fn shared_buffers_copy_within_bounds_only() {
        let (mut mem, pages, _) = memory(0);
        let buf = mem.alloc_shared(PAGE_SIZE + 1, Access::ReadWrite).unwrap();
        assert_eq!((buf.len(), pages.load(Ordering::Relaxed)), (2 * PAGE_SIZE, 2));
        buf.write(PAGE_SIZE - 2, b"span").unwrap();
        let mut out = [0u8; 4];
        buf.read(PAGE_SIZE - 2, &mut out).unwrap();
        assert_eq!(&out, b"span");
        assert!(buf.write(2 * PAGE_SIZE - 3, b"four").is_err(), "past the end");
        assert!(buf.read(2 * PAGE_SIZE, &mut out).is_err());
        assert!(buf.write(usize::MAX, b"x").is_err(), "offset overflow");
        assert!(buf.read(usize::MAX - 1, &mut out).is_err());
        buf.write(2 * PAGE_SIZE, b"").unwrap();
        mem.release(buf).unwrap();
        assert_eq!(pages.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn denied_reclaims_leak_and_drop_closes_the_sharer() {
        let (mut mem, pages, closes) = memory(1);
        let a = mem.alloc_shared(1, Access::ReadOnly).unwrap();
        let b = mem.alloc_shared(1, Access::ReadOnly).unwrap();
        assert!(matches!(mem.release(a), Err(Error::ReclaimDenied(_))));
        mem.release(b).unwrap();
        assert_eq!(mem.leaked(), LeakStats { regions: 1, pages: 1 });
        assert_eq!(pages.load(Ordering::Relaxed), 1, "the denied page stays allocated");
        mem.close().unwrap();
        drop(mem);
        assert_eq!(closes.load(Ordering::Relaxed), 2, "explicit close, then the drop's");
    }
}
