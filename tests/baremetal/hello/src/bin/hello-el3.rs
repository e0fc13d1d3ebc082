//! An EL3 monitor smoke test for the baremetal runtime, for QEMU virt with secure=on (booted
//! with `-bios`).
//!
//! Prints on the PL011, exercises the heap and the counter, sets up GICv3 for the non-secure
//! side, registers an SMC handler, and leaves EL3 with x0 = [`NS_DTB`] for one of:
//! - by default: the staged non-secure payload (an arm64 Image at [`STAGING`], hello-el1),
//!   copied to [`NS_ENTRY`] and entered at NS-EL1. Its SMCs (PSCI_VERSION, `HELLO_SMC_FID`,
//!   `CLOBBER_SIMD_SMC_FID`) are answered here;
//! - with `hello-el3,next = "el2"` in the DTB's `/chosen`: a hypervisor Image (Xen) loaded at
//!   [`EL2_ENTRY`], entered at NS-EL2. Its PSCI/SMCCC calls get the runtime's
//!   `el3::standard_service` answers (SYSTEM_OFF/RESET end QEMU).
//!
//! Why the copy: QEMU puts its own DTB at 0x4000_0000 (the base of RAM) whenever it boots
//! firmware or no kernel, so `-device loader` cannot load anything there ("ROM regions are
//! overlapping"). Staging elsewhere and copying is what a real boot loader stage does anyway.
#![cfg_attr(target_arch = "aarch64", no_std, no_main)]

#[cfg(target_arch = "aarch64")]
extern crate alloc;

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("hello-el3 is a bare-metal AArch64 image: build it with --target aarch64-unknown-none");
}

/// Where run.sh stages the non-secure payload (`-device loader,...,addr=0x50000000`).
#[cfg(target_arch = "aarch64")]
const STAGING: usize = 0x5000_0000;
/// Where the payload is linked and runs.
#[cfg(target_arch = "aarch64")]
const NS_ENTRY: usize = 0x4000_0000;
/// The payload's DTB (`-device loader,...,addr=0x48000000`).
#[cfg(target_arch = "aarch64")]
const NS_DTB: usize = 0x4800_0000;
/// Where a hypervisor entered at EL2 is loaded (`-device loader,...,addr=0x40200000`).
#[cfg(target_arch = "aarch64")]
const EL2_ENTRY: usize = 0x4020_0000;
/// How much of the staging area is copied: the payload's file must not be larger.
#[cfg(target_arch = "aarch64")]
const STAGING_COPY: usize = 1 << 20;

#[cfg(target_arch = "aarch64")]
mod image {
    use alloc::vec::Vec;
    use core::ptr::read_volatile;

    use baremetal::clock::CounterClock;
    use baremetal::el3::{self, gicv3, LowerEl};
    use baremetal::{console, println, sysreg};
    use baremetal_hello::{CLOBBER_SIMD_SMC_FID, EL3_MAGIC, HELLO_SMC_FID, NS_EXIT_CODE};
    use trusty_platform::clock::Clock;

    use super::{EL2_ENTRY, NS_DTB, NS_ENTRY, STAGING, STAGING_COPY};

    baremetal::entry!(main);

    /// The arm64 Image magic at offset 56.
    const IMAGE_MAGIC: u32 = 0x644d_5241;

    fn main(_x0: usize) -> ! {
        console::set_console(&console::PL011_QEMU_VIRT);
        println!(
            "hello-el3: hello from EL{} (MPIDR={:#x}, EL2 implemented: {})",
            sysreg::current_el(),
            sysreg::mpidr(),
            sysreg::el2_implemented()
        );

        let v: Vec<u32> = (0..4096).collect();
        assert_eq!(v.iter().map(|&x| u64::from(x)).sum::<u64>(), 4096 * 4095 / 2);
        let clock = CounterClock;
        let t0 = clock.now_ns();
        clock.sleep_ns(1_000_000);
        println!(
            "hello-el3: heap ok ({} bytes used), counter at {} Hz, slept 1 ms -> {} ns",
            baremetal::heap::used(),
            CounterClock::frequency(),
            clock.now_ns() - t0
        );
        drop(v);

        // SAFETY: QEMU virt with gic-version=3: the distributor and redistributors are at the
        // virt addresses, in their reset state, and the CPU has the GICv3 system registers.
        match unsafe { gicv3::init_for_non_secure(gicv3::QEMU_VIRT_GICD, gicv3::QEMU_VIRT_GICR) } {
            Ok(()) => println!("hello-el3: GICv3 set up for the non-secure side"),
            Err(e) => panic!("GICv3 set-up failed: {e:?}"),
        }

        el3::set_smc_handler(handle_smc);

        if next_is_el2() {
            // SAFETY: run.sh loads the hypervisor's 4-aligned Image header at EL2_ENTRY.
            let magic = unsafe { read_volatile((EL2_ENTRY + 56) as *const u32) };
            assert_eq!(magic, IMAGE_MAGIC, "no arm64 Image at {EL2_ENTRY:#x}");
            println!("hello-el3: entering NS-EL2 at {EL2_ENTRY:#x} with x0={NS_DTB:#x}");
            // SAFETY: an arm64 Image (Xen) is loaded at EL2_ENTRY, its DTB at NS_DTB, EL2
            // exists (asserted by enter_lower_el), and nothing on this stack is used afterwards.
            unsafe { el3::enter_lower_el(EL2_ENTRY, LowerEl::El2, NS_DTB) }
        }

        // SAFETY: run.sh loads the payload at STAGING (RAM); the magic is a 4-aligned u32.
        let magic = unsafe { read_volatile((STAGING + 56) as *const u32) };
        assert_eq!(magic, IMAGE_MAGIC, "no arm64 Image staged at {STAGING:#x}");
        // SAFETY: both ranges are non-secure RAM that nothing else uses now (QEMU's own DTB at
        // NS_ENTRY is not needed: the payload gets NS_DTB); they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(STAGING as *const u8, NS_ENTRY as *mut u8, STAGING_COPY) };

        println!("hello-el3: entering NS-EL1 at {NS_ENTRY:#x} with x0={NS_DTB:#x}");
        // SAFETY: a complete arm64 Image linked at NS_ENTRY (hello-el1) was just copied there,
        // its DTB is at NS_DTB, and nothing on this stack is used afterwards.
        unsafe { el3::enter_lower_el(NS_ENTRY, LowerEl::El1, NS_DTB) }
    }

    /// Whether the non-secure DTB's `/chosen` says `hello-el3,next = "el2"`.
    fn next_is_el2() -> bool {
        // SAFETY: run.sh loads a DTB at NS_DTB; `from_ptr` checks its magic and reads only
        // within its `totalsize`; nothing writes it while EL3 runs.
        let Ok(fdt) = (unsafe { fdt::Fdt::from_ptr(NS_DTB as *const u8) }) else {
            return false;
        };
        fdt.find_node("/chosen")
            .and_then(|chosen| chosen.property("hello-el3,next"))
            .and_then(|p| p.as_str())
            == Some("el2")
    }

    fn handle_smc(regs: &mut [u64; 8]) {
        let (fid, a1, a2) = (regs[0] as u32, regs[1], regs[2]);
        if el3::standard_service(regs) {
            println!("hello-el3: SMC {fid:#x} (standard) -> {:#x}", regs[0]);
            return;
        }
        match fid {
            HELLO_SMC_FID => {
                regs[0] = 0;
                regs[1] = NS_EXIT_CODE;
                regs[2] = a1.wrapping_add(a2);
                regs[3] = EL3_MAGIC;
            }
            CLOBBER_SIMD_SMC_FID => {
                // SAFETY: writes v16 only, which is declared clobbered.
                unsafe { core::arch::asm!("movi v16.2d, #0", out("v16") _, options(nomem, nostack)) };
                regs[0] = 0;
            }
            _ => regs[0] = el3::NOT_SUPPORTED,
        }
        println!("hello-el3: SMC {fid:#x}({a1:#x}, {a2:#x}) -> {:#x}", regs[0]);
    }
}
