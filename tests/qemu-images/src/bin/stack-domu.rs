//! The stack as a guest: a Xen DomU, or the normal world under the EL3 model. It learns which
//! from its device tree and probes, brings the stack up, runs the tipc-test suite, and exits
//! QEMU with the number of failed tests (or 2 / 3 when bring-up fails).
#![cfg_attr(target_arch = "aarch64", no_std, no_main)]

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("stack-domu is an aarch64-unknown-none image; see tests/qemu/run.sh");
}

#[cfg(target_arch = "aarch64")]
mod image {
    extern crate alloc;

    use alloc::boxed::Box;
    use alloc::sync::Arc;

    use baremetal::clock::CounterClock;
    use baremetal::{console, println};
    use qemu_images::args;
    use qemu_images::pages::PoolAllocator;
    use qemu_images::stack::{self, BareEnv};
    use trusty_stack::backend::bare::Machine;
    use trusty_platform::aarch64::SmcConduit;
    use trusty_platform::xen::hypercall::HvcHypercall;

    baremetal::entry!(main, stack_pages = 32, heap_size = 4 << 20);

    /// Pages shared with Trusty come from here (the MMU is off: addresses are IPAs).
    const POOL_SIZE: usize = 4 << 20;
    #[repr(C, align(4096))]
    struct Pool([u8; POOL_SIZE]);
    static mut POOL: Pool = Pool([0; POOL_SIZE]);

    fn print(a: core::fmt::Arguments<'_>) {
        println!("{a}");
    }

    /// The stack's log lines on the console. The image keeps only error-level lines (log's
    /// `max_level_error`, set in this crate's Cargo.toml): the rest are compiled out.
    struct ConsoleLog;

    impl log::Log for ConsoleLog {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            println!("tipc-stack: {}: {}", record.level(), record.args());
        }
        fn flush(&self) {}
    }

    fn main(dtb: usize) -> ! {
        // SAFETY: the boot protocol leaves a flattened device tree at x0; its header says how
        // long it is, and it stays untouched for the life of the image.
        let header = unsafe { core::slice::from_raw_parts(dtb as *const u8, 8) };
        let len = args::fdt_size(header);
        // SAFETY: as above, `len` bytes from the header's own size field.
        let fdt = unsafe { core::slice::from_raw_parts(dtb as *const u8, len) };
        let xen = fdt::Fdt::new(fdt).is_ok_and(|t| t.find_node("/hypervisor").is_some());
        console::set_console(if xen { &console::XEN } else { &console::PL011_QEMU_VIRT });
        if log::set_logger(&ConsoleLog).is_ok() {
            log::set_max_level(log::STATIC_MAX_LEVEL);
        }
        println!("tipc-stack: up at EL{} with {} bytes of device tree, {}", baremetal::sysreg::current_el(), len, if xen { "under Xen" } else { "no hypervisor" });
        let clock = Arc::new(CounterClock);
        // SAFETY: POOL is used only here, once, and handed to the allocator for good.
        let allocator = unsafe { PoolAllocator::new((&raw mut POOL) as usize, POOL_SIZE) };
        let machine = Machine {
            conduit: Arc::new(SmcConduit),
            clock: clock.clone(),
            allocator: Box::new(allocator),
            xen: if xen { Some(Arc::new(HvcHypercall)) } else { None },
        };
        let code = stack::run(fdt, machine, &BareEnv { clock, print });
        println!("tipc-stack: exit {code}");
        baremetal::exit(code)
    }
}
