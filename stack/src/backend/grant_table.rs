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
