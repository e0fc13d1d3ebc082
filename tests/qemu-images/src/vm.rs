//! The Trusty model as a Xen DomU: it serves the guest's calls from the granted mailbox page
//! and reaches the guest's memory only through grant mappings.

use alloc::sync::Arc;

use trusty_model::model::Path;
use trusty_model::raw::RawPhysMem;
use trusty_model::{Model, ModelConfig};
use trusty_platform::clock::Clock;
use core::sync::atomic::{fence, Ordering};

use trusty_platform::mem::PAGE_SIZE;
use trusty_platform::xen::hypercall::{self, Hypercall, XenError};

use crate::xen::XenGrantMapper;

/// Where grants are mapped: inside the first extended region Xen gives a 64 MiB DomU.
pub const GRANT_MAP_WINDOW: u64 = 0x8000_0000;
/// Pages of that window.
pub const GRANT_MAP_SLOTS: usize = 1024;

/// A Trusty VM: the model, its memory (`own_ram` plus the grant window) and grant mapper.
///
/// # Safety
/// `own_ram` must be this domain's RAM as `(base, len)`, and the grant window must be unused
/// guest-physical space, for the program's whole life.
pub unsafe fn trusty_vm(domid: u16, guest: u16, own_ram: (u64, u64), h: Arc<dyn Hypercall>, clock: Arc<dyn Clock>) -> Model {
    let window = (GRANT_MAP_WINDOW, (GRANT_MAP_SLOTS * trusty_platform::mem::PAGE_SIZE) as u64);
    // SAFETY: the caller guarantees both ranges (own RAM; the window, mapped by Xen on demand).
    let phys = unsafe { RawPhysMem::new(alloc::vec![own_ram, window]) };
    let cfg = ModelConfig { path: Path::XenVm { domid }, ..Default::default() };
    let mut model = Model::new(cfg, Arc::new(phys), clock);
    model.set_grant_mapper(alloc::boxed::Box::new(XenGrantMapper::new(h, guest, GRANT_MAP_WINDOW, GRANT_MAP_SLOTS)));
    model
}

/// Where the VM maps its shared_info page (unused guest-physical space; qemu-xen.md §4).
pub const SHARED_INFO: u64 = 0x3910_0000;
/// Offset of `evtchn_pending[]` in shared_info on Arm: one 48-byte vcpu_info precedes it
/// (qemu-xen.md §4).
const EVTCHN_PENDING: u64 = 48;

/// Sleeping until the guest signals the call event channel.
pub struct CallEvent {
    h: Arc<dyn Hypercall>,
    port: u32,
}

impl CallEvent {
    /// Maps shared_info at [`SHARED_INFO`] (to clear the port's pending bit before sleeping).
    pub fn new(h: Arc<dyn Hypercall>, port: u32) -> Result<CallEvent, XenError> {
        hypercall::add_to_physmap(&*h, hypercall::XENMAPSPACE_SHARED_INFO, 0, SHARED_INFO / PAGE_SIZE as u64)?;
        Ok(CallEvent { h, port })
    }

    /// Clears the port's pending bit. A plain read-modify-write: exclusives do not work with the
    /// MMU off (qemu-xen.md gotcha 5); a bit Xen sets meanwhile for this port is caught by the
    /// caller's re-check of the mailbox, and no other port is waited on.
    fn clear(&self) {
        let word = (SHARED_INFO + EVTCHN_PENDING + u64::from(self.port / 64) * 8) as usize as *mut u64;
        // SAFETY: shared_info is mapped at SHARED_INFO for good (`new`); the word lies in it.
        unsafe { word.write_volatile(word.read_volatile() & !(1u64 << (self.port % 64))) };
        fence(Ordering::SeqCst);
    }

    fn wait(&self) {
        let mut ports = [self.port];
        if let Err(e) = hypercall::sched_poll(&*self.h, &mut ports) {
            log::warn!("SCHEDOP_poll failed: {e:?}");
        }
    }
}

/// Serves calls for ever. With service timers armed (or work pending) it keeps running; when
/// idle it clears the call event, checks the mailbox once more, and sleeps in SCHEDOP_poll until
/// the guest signals the next call. Faults are reported once each.
pub fn serve(model: &mut Model, event: Option<&CallEvent>, clock: &dyn Clock, report: fn(core::fmt::Arguments<'_>)) -> ! {
    let mut reported = 0;
    loop {
        let mut served = model.serve_mailbox();
        if !served {
            model.run_background();
        }
        let faults = model.faults();
        for f in &faults[reported..] {
            report(format_args!("trusty-vm: {f}"));
        }
        reported = faults.len();
        if served {
            continue;
        }
        match event {
            Some(ev) if !model.has_pending_work() && model.next_deadline().is_none() => {
                ev.clear();
                served = model.serve_mailbox();
                if !served {
                    ev.wait();
                }
            }
            // Timers need time to pass, not events: keep running.
            _ => clock.relax(),
        }
    }
}
