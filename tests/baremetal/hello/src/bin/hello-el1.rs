//! A Xen DomU / non-secure EL1 smoke test for the baremetal runtime.
//!
//! Reads `/chosen/bootargs` from the DTB in x0 (see `baremetal_hello::Config`), prints on the
//! chosen console, exercises the heap and the counter, optionally asks `hello-el3`'s monitor for
//! its exit status with SMCs (`exit=smc`), prints `hello-el1: PASS` and exits QEMU through
//! semihosting. `crash=udf|panic` checks the runtime's failure paths instead (exit 101/100).
#![cfg_attr(target_arch = "aarch64", no_std, no_main)]

#[cfg(target_arch = "aarch64")]
extern crate alloc;

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("hello-el1 is a bare-metal AArch64 image: build it with --target aarch64-unknown-none");
}

#[cfg(target_arch = "aarch64")]
mod image {
    use alloc::boxed::Box;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::fmt::Write;

    use baremetal::clock::CounterClock;
    use baremetal::{console, println, sysreg};
    use baremetal_hello::{
        Config, ConsoleKind, Crash, CLOBBER_SIMD_SMC_FID, EL3_MAGIC, HELLO_SMC_FID, NS_EXIT_CODE,
    };
    use trusty_platform::aarch64::SmcConduit;
    use trusty_platform::clock::Clock;
    use trusty_platform::smc::Conduit;

    baremetal::entry!(main);

    fn bootargs(dtb: usize) -> Option<&'static str> {
        if dtb == 0 {
            return None;
        }
        // SAFETY: x0 at entry is the DTB's address (Xen's DomU boot, or hello-el3's
        // enter_lower_el); `from_ptr` checks the magic and reads only within `totalsize`, and
        // nothing writes the DTB while this image runs.
        let fdt = unsafe { fdt::Fdt::from_ptr(dtb as *const u8) }.ok()?;
        fdt.chosen().bootargs()
    }

    fn main(dtb: usize) -> ! {
        let args = bootargs(dtb);
        let config = Config::parse(args.unwrap_or(""));
        match config.console {
            ConsoleKind::Xen => console::set_console(&console::XEN),
            ConsoleKind::Pl011 => console::set_console(&console::PL011_QEMU_VIRT),
        }
        println!(
            "hello-el1: hello from EL{} (MPIDR={:#x}, dtb at {dtb:#x}, bootargs {args:?})",
            sysreg::current_el(),
            sysreg::mpidr()
        );

        match config.crash {
            Some(Crash::Undef) => {
                println!("hello-el1: crash=udf");
                // SAFETY: deliberately undefined: the runtime's vector reports it and exits 101.
                unsafe { core::arch::asm!("udf #0", options(nomem, nostack)) };
            }
            Some(Crash::Panic) => panic!("crash=panic asked for a panic"),
            None => {}
        }

        // The heap.
        let v: Vec<u64> = (1..=1000).collect();
        let sum: u64 = v.iter().sum();
        assert_eq!(sum, 500_500);
        let big = Box::new([0x5au8; 64 * 1024]);
        assert!(big.iter().all(|&b| b == 0x5a));
        let mut s = String::new();
        write!(s, "{} items", v.len()).unwrap();
        println!(
            "hello-el1: heap ok: a Vec of {s} sums to {sum}, a 64 KiB Box; heap used {} free {}",
            baremetal::heap::used(),
            baremetal::heap::free()
        );
        drop((v, big));

        // The counter.
        let clock = CounterClock;
        let t0 = clock.now_ns();
        clock.sleep_ns(2_000_000);
        let slept = clock.now_ns() - t0;
        assert!(slept >= 2_000_000, "slept only {slept} ns");
        println!(
            "hello-el1: counter {} ticks at {} Hz, now {} ns; slept 2 ms -> {slept} ns",
            CounterClock::ticks(),
            CounterClock::frequency(),
            clock.now_ns()
        );

        let code = match config.exit {
            Some(code) => code,
            None => ask_monitor(),
        };
        println!("hello-el1: PASS, exiting with status {code}");
        baremetal::exit(code)
    }

    /// SMCs to hello-el3's monitor; returns the exit status it gives.
    fn ask_monitor() -> u32 {
        let smc = SmcConduit;
        let psci = smc.call([u64::from(baremetal::el3::PSCI_VERSION), 0, 0, 0, 0, 0, 0, 0]);
        println!("hello-el1: SMC PSCI_VERSION -> {:#x}", psci[0]);
        assert_eq!(psci[0], baremetal::el3::PSCI_VERSION_1_1);

        let r = smc.call([u64::from(HELLO_SMC_FID), 0x1111, 0x2222, 0, 0, 0, 0, 0]);
        println!("hello-el1: SMC {HELLO_SMC_FID:#x}(0x1111, 0x2222) -> x0={:#x} x1={} x2={:#x} x3={:#x}", r[0], r[1], r[2], r[3]);
        assert_eq!((r[0], r[2], r[3]), (0, 0x3333, EL3_MAGIC), "unexpected answer from the monitor");
        assert_eq!(r[1], NS_EXIT_CODE);

        let unknown = smc.call([0xC200_0FFF, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(unknown[0], baremetal::el3::NOT_SUPPORTED);

        // The monitor clobbers v16 while serving this call; SMCCC says it must come back.
        let pattern: u64 = 0x0123_4567_89ab_cdef;
        let (x0, after): (u64, u64);
        // SAFETY: an SMCCC call with function id CLOBBER_SIMD_SMC_FID and no arguments; the
        // SMCCC lets the callee change x0..x17, all declared clobbered; d16 is an in/out.
        unsafe {
            core::arch::asm!(
                "fmov d16, {pat}",
                "smc #0",
                "fmov {after}, d16",
                pat = in(reg) pattern,
                after = lateout(reg) after,
                inlateout("x0") u64::from(CLOBBER_SIMD_SMC_FID) => x0,
                lateout("x1") _, lateout("x2") _, lateout("x3") _, lateout("x4") _,
                lateout("x5") _, lateout("x6") _, lateout("x7") _, lateout("x8") _,
                lateout("x9") _, lateout("x10") _, lateout("x11") _, lateout("x12") _,
                lateout("x13") _, lateout("x14") _, lateout("x15") _, lateout("x16") _,
                lateout("x17") _, out("v16") _,
                options(nostack),
            );
        }
        println!("hello-el1: SMC {CLOBBER_SIMD_SMC_FID:#x} -> x0={x0:#x}, d16 {after:#x} (was {pattern:#x})");
        assert_eq!((x0, after), (0, pattern), "the monitor did not preserve d16");
        r[1] as u32
    }
}
