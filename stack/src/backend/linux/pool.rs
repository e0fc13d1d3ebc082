//! Pages granted to the Trusty VM by `/dev/xen/gntalloc`, and the event channel.
//!
//! gntalloc grants a page when it allocates it: a program cannot grant memory it already has.
//! So the page allocator and the grant sharer are one object here ([`GntallocPool`], seen
//! through its two faces [`GntallocAllocator`] and [`GntallocSharer`]): `share()` returns the
//! grant id of pages the pool allocated, and refuses anything else with an error that says so.
//! Ids are the bare-metal [`trusty_platform::xen::grant::GrantSharer`]'s: Linux's grant-DMA
//! encoding of the first reference (`1 << 63 | gref << 12`, drivers/xen/grant-dma-ops.c), the
//! rest of a multi-page buffer at the consecutive references after it. gntalloc takes each
//! page's reference from the guest's free list one by one (gntalloc.c add_grefs ->
//! gnttab_grant_foreign_access), which usually hands out consecutive ones; an allocation whose
//! references are not consecutive cannot be named by one id and is refused.
//!
//! Access: gntalloc's grants are read-write (GNTALLOC_FLAG_WRITABLE, fixed at allocation), so
//! the pool does not take read-only shares ([`Sharer::takes_read_only`]): the stack's own
//! buffers are shared read-write, as under Xen's FF-A mediator.
//!
//! Reclaim: the share ends with the allocation. Freeing (IOCTL_GNTALLOC_DEALLOC_GREF) ends
//! the grants, and gntalloc keeps any page the Trusty VM still maps until it lets go
//! (gnttab_end_foreign_access defers the free), so a page can never be reused while the
//! peer reaches it: the kernel enforces "denied means leak, never free" for us.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use trusty_platform::decision::GRANT_ENTRIES_BUDGET;
use trusty_platform::mailbox::EventChannel;
use trusty_platform::mem::{Access, DmaRegion, MemoryId, PageAllocator, PhysRange, Sharer};
use trusty_platform::xen::grant::{decode_grant_id, grant_id};
use trusty_platform::Error;

use super::dev::{GrantedPages, XenDevices};

/// What a [`DmaRegion`]'s address is for the pool's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageAddresses {
    /// The pages' address in this process. Trusty never sees it (it gets grant ids); it only
    /// names the region to the pool.
    Virtual,
    /// The guest-physical address of the first page, from `/proc/self/pagemap` (root only):
    /// what a forced `phys` decision hands to Trusty, to show that a Trusty VM cannot use it.
    GuestPhysical,
}

struct Allocation {
    pages: GrantedPages,
    shared: bool,
}

struct State {
    /// Allocations by their region address.
    allocs: BTreeMap<u64, Allocation>,
    /// First reference -> region address, for reclaim.
    by_gref: BTreeMap<u32, u64>,
    live: usize,
}

/// Pages allocated and granted to one domain through gntalloc.
pub struct GntallocPool {
    dev: Arc<dyn XenDevices>,
    domid: u16,
    addresses: PageAddresses,
    state: Mutex<State>,
}

impl GntallocPool {
    /// A pool granting to `domid`.
    pub fn new(dev: Arc<dyn XenDevices>, domid: u16, addresses: PageAddresses) -> Arc<GntallocPool> {
        Arc::new(GntallocPool {
            dev,
            domid,
            addresses,
            state: Mutex::new(State { allocs: BTreeMap::new(), by_gref: BTreeMap::new(), live: 0 }),
        })
    }

    /// The domain the pages are granted to.
    pub fn domid(&self) -> u16 {
        self.domid
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn alloc(&self, count: usize) -> Result<DmaRegion, String> {
        let count = u32::try_from(count).map_err(|_| "too many pages".to_string())?;
        let pages = self.dev.alloc_granted(self.domid, count).map_err(|e| e.to_string())?;
        let first = pages.grefs[0];
        let consecutive = pages.grefs.iter().enumerate().all(|(i, g)| u64::from(*g) == u64::from(first) + i as u64);
        if !consecutive || pages.grefs.len() != count as usize {
            let refs = format!("{:?}", pages.grefs);
            let _ = self.dev.free_granted(pages);
            return Err(format!(
                "gntalloc gave references {refs} for {count} pages: not consecutive, so no one grant id names them"
            ));
        }
        let vaddr = pages.ptr.as_ptr() as usize;
        let addr = match self.addresses {
            PageAddresses::Virtual => vaddr as u64,
            PageAddresses::GuestPhysical => match self.dev.guest_physical(vaddr) {
                Ok(a) => a,
                Err(e) => {
                    let _ = self.dev.free_granted(pages);
                    return Err(format!("guest-physical address of a granted page: {e}"));
                }
            },
        };
        let mut st = self.state();
        if st.allocs.contains_key(&addr) {
            drop(st);
            let _ = self.dev.free_granted(pages);
            return Err(format!("two allocations at address {addr:#x}"));
        }
        let ptr = pages.ptr;
        st.by_gref.insert(first, addr);
        st.allocs.insert(addr, Allocation { pages, shared: false });
        // SAFETY: `count` pages mapped at `ptr`, owned by the pool until `free` gives them back.
        Ok(unsafe { DmaRegion::new(ptr, addr, count as usize) })
    }

    fn free(&self, addr: u64) {
        let mut st = self.state();
        let Some(a) = st.allocs.remove(&addr) else {
            log::error!("gntalloc pool: free of {addr:#x}, which it did not allocate");
            return;
        };
        st.by_gref.remove(&a.pages.grefs[0]);
        if a.shared {
            st.live -= 1;
        }
        drop(st);
        if let Err(e) = self.dev.free_granted(a.pages) {
            log::warn!("gntalloc pool: {e}");
        }
    }

    fn share(&self, ranges: &[PhysRange]) -> Result<MemoryId, Error> {
        const NOT_OURS: &str = "gntalloc grants only the pages it allocated: this memory did not come from the \
                                gntalloc pool (Linux userspace cannot grant other memory to the Trusty VM)";
        let [range] = ranges else {
            return Err(Error::InvalidArgument(NOT_OURS));
        };
        let mut st = self.state();
        let a = st.allocs.get_mut(&range.addr).ok_or(Error::InvalidArgument(NOT_OURS))?;
        if range.pages as usize != a.pages.grefs.len() {
            return Err(Error::InvalidArgument("a gntalloc share covers one whole allocation"));
        }
        if a.shared {
            return Err(Error::InvalidArgument("these gntalloc pages are shared already"));
        }
        a.shared = true;
        let id = MemoryId(grant_id(a.pages.grefs[0]));
        st.live += 1;
        Ok(id)
    }

    fn reclaim(&self, id: MemoryId) -> Result<(), Error> {
        let first = decode_grant_id(id.0).ok_or(Error::InvalidArgument("not a xen-grant memory id"))?;
        let mut st = self.state();
        let addr = *st.by_gref.get(&first).ok_or(Error::InvalidArgument("reclaim of a grant id that is not live"))?;
        let a = st.allocs.get_mut(&addr).ok_or(Error::InvalidArgument("reclaim of a grant id that is not live"))?;
        if !a.shared {
            return Err(Error::InvalidArgument("reclaim of a grant id that is not live"));
        }
        a.shared = false;
        st.live -= 1;
        Ok(())
    }

    /// Allocations not given back.
    pub fn allocations(&self) -> usize {
        self.state().allocs.len()
    }
}

/// The pool as the stack's page allocator.
pub struct GntallocAllocator(pub Arc<GntallocPool>);

impl PageAllocator for GntallocAllocator {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        match self.0.alloc(pages) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("gntalloc pool: {pages} page(s): {e}");
                None
            }
        }
    }

    unsafe fn free(&mut self, region: DmaRegion) {
        self.0.free(region.paddr());
    }
}

/// The pool as the stack's sharer ("xen-grant").
pub struct GntallocSharer(pub Arc<GntallocPool>);

impl Sharer for GntallocSharer {
    fn mechanism(&self) -> &'static str {
        "xen-grant"
    }

    fn share(&mut self, ranges: &[PhysRange], _access: Access) -> Result<MemoryId, Error> {
        // Read-only shares never get here from the stack (takes_read_only is false), and
        // SharedMemory refuses a read-only share of anyone else's memory.
        self.0.share(ranges)
    }

    fn reclaim(&mut self, id: MemoryId) -> Result<(), Error> {
        self.0.reclaim(id)
    }

    fn live_shares(&self) -> usize {
        self.0.state().live
    }

    fn budget(&self) -> Option<usize> {
        Some(GRANT_ENTRIES_BUDGET)
    }

    fn takes_read_only(&self) -> bool {
        false
    }
}

/// Waits on the event channel that ended with no event (the time ran out, or a signal).
pub static EMPTY_WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The call event channel through `/dev/xen/evtchn`: notify with IOCTL_EVTCHN_NOTIFY, block
/// with poll(2) until the Trusty VM signals.
pub struct EvtchnEvents(pub Arc<dyn XenDevices>);

impl EventChannel for EvtchnEvents {
    fn notify(&self, port: u32) {
        if let Err(e) = self.0.notify(port) {
            log::warn!("event channel {port}: {e}");
        }
    }

    fn wait(&self, _port: u32, timeout_ns: u64) -> bool {
        // poll(2) counts whole milliseconds: round up, so a short wait still blocks.
        let ms = timeout_ns.div_ceil(1_000_000).clamp(1, i32::MAX as u64) as i32;
        match self.0.wait_events(ms) {
            Ok(ports) => {
                if ports.is_empty() {
                    EMPTY_WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                log::warn!("waiting on /dev/xen/evtchn: {e}");
                false
            }
        }
    }
}
