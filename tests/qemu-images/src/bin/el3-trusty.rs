//! The Trusty model as EL3 firmware: serves real `smc #0` calls from the normal world, then
//! drops to it (NS-EL1 directly, or Xen at EL2) as `/chosen/trusty-ipc-stack,el3-next` says.
#![cfg_attr(target_arch = "aarch64", no_std, no_main)]

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("el3-trusty is an aarch64-unknown-none image; see tests/qemu/run.sh");
}

#[cfg(target_arch = "aarch64")]
mod image {
    extern crate alloc;

    use alloc::sync::Arc;
    use core::cell::RefCell;

    use baremetal::clock::CounterClock;
    use baremetal::el3::{self, LowerEl};
    use baremetal::{console, println};
    use critical_section::Mutex;
    use qemu_images::args;
    use trusty_model::raw::RawPhysMem;
    use trusty_model::{Model, ModelConfig};

    baremetal::entry!(main, stack_pages = 32, heap_size = 8 << 20);

    /// Where the runner loads the normal world's device tree.
    const NS_DTB: usize = 0x4800_0000;
    /// The normal world's RAM (QEMU virt, -m 2G).
    const NS_RAM: (u64, u64) = (0x4000_0000, 2 << 30);

    /// FF-A 1.1: the lowest SPMC version Xen's mediator takes.
    const SPMC_FFA_VERSION: u32 = 0x1_0001;

    static MODEL: Mutex<RefCell<Option<Model>>> = Mutex::new(RefCell::new(None));

    /// PSCI/SMCCC queries (and power-off) are the monitor's own; everything else is Trusty's,
    /// and the model runs inside the call, as Trusty runs on the calling CPU. The monitor
    /// answers as an SPMC would, so that Xen's FF-A mediator accepts it (xen-ffa-mediator.md
    /// §4.1, `ffa_probe()`): SMCCC 1.2, FF-A 1.1, FFA_RUN in FFA_FEATURES.
    fn smc(regs: &mut [u64; 8]) {
        if el3::standard_service_smccc(regs, el3::SMCCC_VERSION_1_2) {
            return;
        }
        critical_section::with(|cs| match MODEL.borrow(cs).borrow_mut().as_mut() {
            Some(m) => *regs = m.smc(*regs),
            None => regs[0] = el3::NOT_SUPPORTED,
        });
    }

    fn main(_x0: usize) -> ! {
        console::set_console(&console::PL011_QEMU_VIRT);
        // SAFETY: the runner loads the normal world's device tree at NS_DTB; its header gives
        // its length.
        let header = unsafe { core::slice::from_raw_parts(NS_DTB as *const u8, 8) };
        // SAFETY: as above.
        let fdt = unsafe { core::slice::from_raw_parts(NS_DTB as *const u8, args::fdt_size(header)) };
        let Some((entry, el)) = args::el3_next(fdt) else {
            println!("el3-trusty: no /chosen/trusty-ipc-stack,el3-next in the device tree at {NS_DTB:#x}");
            baremetal::exit(4)
        };
        // SAFETY: NS_RAM is the normal world's RAM, which the monitor may access.
        let phys = unsafe { RawPhysMem::new(alloc::vec![NS_RAM]) };
        let cfg = ModelConfig { ffa: true, max_api_version: 5, spmc_ffa_version: SPMC_FFA_VERSION, ..Default::default() };
        let model = Model::new(cfg, Arc::new(phys), Arc::new(CounterClock));
        critical_section::with(|cs| MODEL.borrow(cs).replace(Some(model)));
        el3::set_smc_handler(smc);
        // SAFETY: QEMU virt's GIC distributor and redistributor, touched by nothing else yet.
        if let Err(e) = unsafe { el3::gicv3::init_for_non_secure(el3::gicv3::QEMU_VIRT_GICD, el3::gicv3::QEMU_VIRT_GICR) } {
            println!("el3-trusty: GIC set-up failed: {e:?}");
        }
        println!("el3-trusty: Trusty model ready; entering EL{el} at {entry:#x}");
        let level = if el == 2 { LowerEl::El2 } else { LowerEl::El1 };
        // SAFETY: the runner loaded the normal world's image at `entry` and its device tree at
        // NS_DTB; nothing of the monitor lives there.
        unsafe { el3::enter_lower_el(entry as usize, level, NS_DTB) }
    }
}
