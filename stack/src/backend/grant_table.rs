//! The way to a Trusty VM where this program owns its grant table (bare metal: the table's
//! frames mapped into the guest; the host model: guest RAM the simulated hypervisor was told
//! about) and the event channels are static: the mailbox page is the first grant
//! ([`MAILBOX_GREF`]), the call port is the one the facts name.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::ptr::NonNull;

use trusty_platform::facts::PORTS_FROM_RENDEZVOUS;
use trusty_platform::mailbox::{EventChannel, MAILBOX_GREF};
use trusty_platform::mem::{Access, PageAllocator, Sharer};
use trusty_platform::xen::grant::{decode_grant_id, GrantSharer, GrantTable};

use crate::{TrustyVm, TrustyVmLink, VmLink};

/// Gives the grant table's memory: where it is, and its length in bytes.
pub type GrantTableProvider = Box<dyn FnMut() -> Result<(NonNull<u8>, usize), trusty_platform::Error> + Send>;

/// A Trusty VM reached through a grant table this program writes and static event channels.
pub struct GrantTableLink {
    events: Arc<dyn EventChannel>,
    grant_table: GrantTableProvider,
}

impl GrantTableLink {
    /// Event channels through `events`; the grant table's memory from `grant_table`, asked for
    /// once, only when a Trusty VM (or a forced `xen-grant`) needs it.
    pub fn new(events: Arc<dyn EventChannel>, grant_table: GrantTableProvider) -> Self {
        GrantTableLink { events, grant_table }
    }

    fn sharer(&mut self, backend_domid: u16) -> Result<GrantSharer, String> {
        let (table_mem, table_len) = (self.grant_table)().map_err(|e| format!("grant table: {e}"))?;
        // SAFETY: the platform hands the table's memory to the stack for good (the hypervisor
        // reads it as our grant table; nothing else in this program touches it).
        let table = unsafe { GrantTable::new(table_mem, table_len) }.map_err(|e| format!("grant table: {e}"))?;
        Ok(GrantSharer::new(table, backend_domid))
    }
}

impl TrustyVmLink for GrantTableLink {
    fn connect(&mut self, vm: TrustyVm, allocator: &mut dyn PageAllocator) -> Result<VmLink, String> {
        if vm.call_evtchn == PORTS_FROM_RENDEZVOUS {
            return Err(format!(
                "domain {} is named without its event channels; this environment binds static \
                 ones: trusty-ipc-stack.trusty-vm=<domid>,<call-evtchn>,<kick-evtchn>",
                vm.backend_domid
            ));
        }
        let mut sharer = self.sharer(vm.backend_domid)?;
        let page = allocator.alloc_zeroed(1).ok_or("no page for the mailbox")?;
        let id = sharer.share(&[page.range()], Access::ReadWrite).map_err(|e| format!("granting the mailbox: {e}"))?;
        if decode_grant_id(id.0) != Some(MAILBOX_GREF) {
            return Err(format!("the mailbox must be grant {MAILBOX_GREF}, the first one; it got {id}"));
        }
        // The mailbox page is never given back (regions have no destructor): the Trusty VM may
        // touch it for the life of the stack.
        Ok(VmLink { sharer: Box::new(sharer), mailbox: page.vaddr(), events: self.events.clone(), call_port: vm.call_evtchn })
    }

    fn grant_sharer(&mut self, backend_domid: u16, _allocator: &mut dyn PageAllocator) -> Result<Box<dyn Sharer>, String> {
        Ok(Box::new(self.sharer(backend_domid)?))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use trusty_platform::mem::{DmaRegion, PAGE_SIZE};
    use trusty_platform::xen::grant::GrantEntryV1;

    /// Page-aligned heap memory at made-up guest addresses from 0x4000_0000, never freed.
    struct HeapPages(u64);
    impl PageAllocator for HeapPages {
        fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
            let layout = std::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
            // SAFETY: non-zero size.
            let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
            let addr = 0x4000_0000 + self.0 * PAGE_SIZE as u64;
            self.0 += pages as u64;
            // SAFETY: `pages` fresh pages, leaked for the test.
            Some(unsafe { DmaRegion::new(p, addr, pages) })
        }
        unsafe fn free(&mut self, _region: DmaRegion) {}
    }

    struct Sent(Mutex<Vec<u32>>);
    impl EventChannel for Sent {
        fn notify(&self, port: u32) {
            self.0.lock().unwrap().push(port);
        }
    }

    fn link(calls: Arc<AtomicU32>) -> (GrantTableLink, Arc<Sent>, *const GrantEntryV1) {
        let table: &'static mut [u64] = Vec::leak(vec![0u64; 64]);
        let base = table.as_mut_ptr();
        let addr = base as usize;
        let sent = Arc::new(Sent(Mutex::new(Vec::new())));
        let provider: GrantTableProvider = Box::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok((NonNull::new(addr as *mut u8).unwrap(), 64 * 8))
        });
        (GrantTableLink::new(sent.clone(), provider), sent, base.cast())
    }

    #[test]
    fn a_static_trusty_vm_gets_the_mailbox_at_the_first_grant() {
        let calls = Arc::new(AtomicU32::new(0));
        let (mut l, sent, table) = link(calls.clone());
        let vm = TrustyVm { backend_domid: 1, call_evtchn: 10, kick_evtchn: 11 };
        let link = l.connect(vm, &mut HeapPages(0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the table is asked for once");
        assert_eq!(link.call_port, 10);
        // SAFETY: entry 8 of the leaked table.
        let e = unsafe { table.add(MAILBOX_GREF as usize).read_volatile() };
        assert_eq!((e.domid, e.frame), (1, 0x4_0000), "the mailbox page, granted to the Trusty VM");
        link.events.notify(10);
        assert_eq!(*sent.0.lock().unwrap(), [10]);
    }

    #[test]
    fn the_rendezvous_form_is_refused_where_channels_are_static() {
        let calls = Arc::new(AtomicU32::new(0));
        let (mut l, _, _) = link(calls.clone());
        let vm = TrustyVm { backend_domid: 1, call_evtchn: PORTS_FROM_RENDEZVOUS, kick_evtchn: PORTS_FROM_RENDEZVOUS };
        let e = l.connect(vm, &mut HeapPages(0)).err().expect("refused");
        assert!(e.contains("trusty-ipc-stack.trusty-vm=<domid>,<call-evtchn>,<kick-evtchn>"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing touched");
    }
}
