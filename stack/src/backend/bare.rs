//! Bare metal: an AArch64 guest image (or firmware) with no operating system. Calls go out
//! with the SMC conduit it passes in; under Xen, hypercalls give the feature bits, the event
//! channels (EVTCHNOP_send) and the grant table (its frame mapped with XENMEM_add_to_physmap
//! at the grant window `/hypervisor` reg names). Everything here runs on the host against a
//! fake [`Hypercall`]; only the `hvc` instruction behind it is AArch64.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;

use trusty_platform::clock::Clock;
use trusty_platform::mailbox::EventChannel;
use trusty_platform::mem::{PageAllocator, PAGE_SIZE};
use trusty_platform::smc::Conduit;
use trusty_platform::xen::hypercall::{self, Hypercall, XenError};

use super::grant_table::GrantTableLink;
use crate::PlatformAccess;

/// The guest-physical address where Xen's dom0less DomUs find the grant-table window
/// (`/hypervisor` reg region 0; qemu-xen.md §2).
pub const GRANT_WINDOW: u64 = 0x3800_0000;

/// What the machine gives the stack.
pub struct Machine {
    /// `smc #0`.
    pub conduit: Arc<dyn Conduit>,
    /// The counter clock.
    pub clock: Arc<dyn Clock>,
    /// Pages the stack shares (the MMU is off: their addresses are IPAs).
    pub allocator: Box<dyn PageAllocator>,
    /// Xen's hypercalls, when the device tree shows Xen.
    pub xen: Option<Arc<dyn Hypercall>>,
}

/// EVTCHNOP_send on a static event channel.
pub struct XenEvents(pub Arc<dyn Hypercall>);

impl EventChannel for XenEvents {
    fn notify(&self, port: u32) {
        if let Err(e) = hypercall::evtchn_send(&*self.0, port) {
            log::warn!("EVTCHNOP_send({port}) failed: {e:?}");
        }
    }
}

/// Maps grant-table frame 0 at `window` (XENMEM_add_to_physmap, XENMAPSPACE_grant_table) and
/// returns it as the table's memory: 512 v1 entries. The MMU is off, so the window's
/// guest-physical address is where the program reaches it.
pub fn grant_table_frame(h: &dyn Hypercall, window: u64) -> Result<(NonNull<u8>, usize), XenError> {
    hypercall::map_grant_table_frames(h, window / PAGE_SIZE as u64, 1)?;
    let p = NonNull::new(window as usize as *mut u8).ok_or(XenError::TooLarge { op: "grant window at address 0" })?;
    Ok((p, PAGE_SIZE))
}

/// What a bare-metal machine booted with `fdt` gives the stack.
pub fn access(m: Machine, fdt: Vec<u8>) -> PlatformAccess {
    let xen_for_features = m.xen.clone();
    // Without the `xen-grant` feature there is no Trusty VM to reach (and no grant code linked).
    let trusty_vm = m.xen.filter(|_| crate::Mechanisms::BUILT.xen_grant).map(|h| {
        let events: Arc<dyn EventChannel> = Arc::new(XenEvents(h.clone()));
        let table = Box::new(move || {
            grant_table_frame(&*h, GRANT_WINDOW)
                .map_err(|_| trusty_platform::Error::InvalidArgument("could not map the grant table"))
        });
        Box::new(GrantTableLink::new(events, table)) as Box<dyn crate::TrustyVmLink>
    });
    PlatformAccess {
        conduit: m.conduit,
        clock: m.clock,
        allocator: m.allocator,
        fdt,
        xen_features: Box::new(move || xen_for_features.as_ref().and_then(|h| hypercall::xen_features(&**h, 0).ok())),
        trusty_vm,
    }
}
