//! The Trusty model as a Xen DomU: it serves the guest's calls from the granted mailbox page
//! and reaches the guest's memory only through grant mappings.

use alloc::sync::Arc;

use trusty_model::model::Path;
use trusty_model::raw::RawPhysMem;
use trusty_model::{Model, ModelConfig};
use trusty_platform::clock::Clock;
use trusty_platform::xen::hypercall::Hypercall;

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

/// Serves calls for ever: the mailbox is polled (the guest's event only hurries a VM that
/// sleeps, and this one does not), service timers run in between. Faults are reported once.
pub fn serve(model: &mut Model, clock: &dyn Clock, report: fn(core::fmt::Arguments<'_>)) -> ! {
    let mut reported = 0;
    loop {
        let served = model.serve_mailbox();
        if !served {
            model.run_background();
            clock.relax();
        }
        let faults = model.faults();
        for f in &faults[reported..] {
            report(format_args!("trusty-vm: {f}"));
        }
        reported = faults.len();
    }
}
