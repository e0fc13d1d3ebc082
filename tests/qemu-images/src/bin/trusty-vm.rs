//! The Trusty model as a Xen DomU: serves the guest's calls from the mailbox page it granted,
//! and maps the guest's memory only through grants. With `trusty-vm.rendezvous=1` it meets a
//! guest that picks its own grant references through a rendezvous page (`vm::Rendezvous`).
#![cfg_attr(target_arch = "aarch64", no_std, no_main)]

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("trusty-vm is an aarch64-unknown-none image; see tests/qemu/run.sh");
}

#[cfg(target_arch = "aarch64")]
mod image {
    extern crate alloc;

    use alloc::sync::Arc;

    use baremetal::clock::CounterClock;
    use baremetal::{console, println};
    use qemu_images::{args, vm};
    use trusty_platform::xen::hypercall::HvcHypercall;

    baremetal::entry!(main, stack_pages = 32, heap_size = 8 << 20);

    fn report(a: core::fmt::Arguments<'_>) {
        println!("{a}");
    }

    fn main(dtb: usize) -> ! {
        console::set_console(&console::XEN);
        // SAFETY: Xen leaves the guest's device tree at x0; its header gives its length.
        let header = unsafe { core::slice::from_raw_parts(dtb as *const u8, 8) };
        // SAFETY: as above.
        let fdt = unsafe { core::slice::from_raw_parts(dtb as *const u8, args::fdt_size(header)) };
        let bootargs = args::bootargs(fdt).unwrap_or("");
        let guest = args::number(bootargs, "trusty-vm.guest-domid").unwrap_or(2) as u16;
        let domid = args::number(bootargs, "trusty-vm.domid").unwrap_or(1) as u16;
        let ram = args::memory(fdt).unwrap_or((0x4000_0000, 64 << 20));
        let clock = Arc::new(CounterClock);
        let xen = Arc::new(HvcHypercall);
        // SAFETY: `ram` is this domain's memory (from its device tree) and the grant window is
        // unused guest-physical space in Xen's extended regions.
        let mut model = unsafe { vm::trusty_vm(domid, guest, ram, xen.clone(), clock.clone()) };
        if args::number(bootargs, "trusty-vm.rendezvous") == Some(1) {
            // A guest that picks its own grant references (Linux userspace): meet it through
            // the rendezvous page.
            let mut rv = match vm::Rendezvous::offer(xen, domid, guest) {
                Ok(rv) => rv,
                Err(e) => {
                    println!("trusty-vm: cannot offer a rendezvous to domain {guest}: {e}");
                    baremetal::halt()
                }
            };
            println!(
                "trusty-vm: ready as domain {domid}, rendezvous for domain {guest} at grant reference {}, port {}",
                trusty_platform::xen::rendezvous::RENDEZVOUS_GREF,
                rv.port()
            );
            rv.wait_for_guest(&mut model, report);
            rv.serve(&mut model, &*clock, report)
        }
        let event = match args::number(bootargs, "trusty-vm.call-evtchn") {
            Some(port) => match vm::CallEvent::new(xen, port as u32) {
                Ok(ev) => Some(ev),
                Err(e) => {
                    println!("trusty-vm: cannot map shared_info ({e:?}); polling the mailbox instead");
                    None
                }
            },
            None => None,
        };
        let how = if event.is_some() { "sleeping on its call event channel" } else { "polling its mailbox" };
        println!("trusty-vm: ready as domain {domid}, serving domain {guest}, {how}");
        vm::serve(&mut model, event.as_ref(), &*clock, report)
    }
}
