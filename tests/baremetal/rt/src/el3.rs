//! Support for an EL3 monitor image: serve SMCs from lower ELs, drop to NS-EL1 or NS-EL2,
//! set up GICv3 for the non-secure side, and the PSCI/SMCCC numbers a minimal monitor answers.
//!
//! A typical monitor (see `tests/baremetal/hello/src/bin/hello-el3.rs`):
//!
//! ```text
//! fn main(_x0: usize) -> ! {
//!     console::set_console(&console::PL011_QEMU_VIRT);
//!     // SAFETY: QEMU virt with gic-version=3, nothing else has touched the GIC.
//!     unsafe { el3::gicv3::init_for_non_secure(el3::gicv3::QEMU_VIRT_GICD, el3::gicv3::QEMU_VIRT_GICR) }.unwrap();
//!     el3::set_smc_handler(handle_smc);
//!     // SAFETY: a non-secure image is loaded at 0x4000_0000 and its DTB at 0x4800_0000.
//!     unsafe { el3::enter_lower_el(0x4000_0000, el3::LowerEl::El1, 0x4800_0000) }
//! }
//! fn handle_smc(regs: &mut [u64; 8]) {
//!     if !el3::standard_service(regs) {
//!         regs[0] = el3::NOT_SUPPORTED;
//!     }
//! }
//! ```
//!
//! The monitor's exception stack is the boot stack: [`enter_lower_el`] resets SP_EL3 to its top.

use core::arch::asm;
use core::cell::Cell;

use critical_section::Mutex;

pub use smccc::arch::{
    SMCCC_ARCH_FEATURES, SMCCC_ARCH_SOC_ID, SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_2,
    SMCCC_ARCH_WORKAROUND_3, SMCCC_VERSION,
};
pub use smccc::psci::{
    PSCI_AFFINITY_INFO_64, PSCI_CPU_OFF, PSCI_CPU_ON_64, PSCI_CPU_SUSPEND_64, PSCI_FEATURES,
    PSCI_MIGRATE_INFO_TYPE, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET, PSCI_VERSION,
};

use crate::exceptions::ExceptionFrame;
use crate::{println, sysreg};

/// SMCCC's "unknown function" / PSCI's NOT_SUPPORTED: -1 in x0.
pub const NOT_SUPPORTED: u64 = u64::MAX;
/// SMCCC version 1.1, as `SMCCC_VERSION` returns it.
pub const SMCCC_VERSION_1_1: u64 = 0x1_0001;
/// SMCCC version 1.2 (x0-x17 for arguments and results). Xen's FF-A mediator needs at least
/// this from the monitor or turns itself off (`ffa_probe()`: "unsupported SMCCC version").
pub const SMCCC_VERSION_1_2: u64 = 0x1_0002;
/// PSCI version 1.1, as `PSCI_VERSION` returns it.
pub const PSCI_VERSION_1_1: u64 = 0x1_0001;
/// The QEMU exit status [`standard_service`] uses for `PSCI_SYSTEM_RESET` (`SYSTEM_OFF` exits 0).
pub const EXIT_SYSTEM_RESET: u32 = 1;

/// `SCR_EL3` bits.
pub mod scr {
    /// Lower ELs are non-secure.
    pub const NS: u64 = 1 << 0;
    /// Route IRQs to EL3.
    pub const IRQ: u64 = 1 << 1;
    /// Route FIQs to EL3.
    pub const FIQ: u64 = 1 << 2;
    /// Route external aborts and SErrors to EL3.
    pub const EA: u64 = 1 << 3;
    /// Bits 5:4 are RES1.
    pub const RES1: u64 = 3 << 4;
    /// SMC disabled (UNDEF at EL1 and above).
    pub const SMD: u64 = 1 << 7;
    /// HVC enabled.
    pub const HCE: u64 = 1 << 8;
    /// The next lower EL is AArch64.
    pub const RW: u64 = 1 << 10;
}

/// Where [`enter_lower_el`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowerEl {
    /// Non-secure EL1h. With EL2 implemented (virt,virtualization=on), EL2 is set up to stay
    /// out of the way: HCR_EL2.RW=1 and nothing trapped.
    El1,
    /// Non-secure EL2h (for a hypervisor such as Xen). Needs EL2.
    El2,
}

/// The handler for SMCs from lower ELs: gets x0..x7 of the caller, leaves its results there.
pub type SmcHandler = fn(&mut [u64; 8]);

static SMC_HANDLER: Mutex<Cell<Option<SmcHandler>>> = Mutex::new(Cell::new(None));

/// Makes `handler` serve every SMC (SMC64, EC 0x17 with immediate 0; SMC32 from AArch32,
/// EC 0x13) that a lower EL makes. The caller's x0..x30, FP/SIMD registers and PSTATE are
/// preserved apart from what the handler writes to x0..x7. Without a handler, or for an SMC
/// with a non-zero immediate (not SMCCC), the caller gets x0 = [`NOT_SUPPORTED`].
///
/// The handler runs at EL3 with interrupts masked, on the monitor's stack.
pub fn set_smc_handler(handler: SmcHandler) {
    critical_section::with(|cs| SMC_HANDLER.borrow(cs).set(Some(handler)));
}

/// Serves a synchronous exception from a lower EL if it is an SMC; false for anything else.
pub(crate) fn handle_lower_sync(frame: &mut ExceptionFrame) -> bool {
    let ec = (frame.esr >> 26) & 0x3f;
    let imm = frame.esr & 0xffff;
    match ec {
        0x17 | 0x13 => {}
        _ => return false,
    }
    let handler = critical_section::with(|cs| SMC_HANDLER.borrow(cs).get());
    let mut regs = [0u64; 8];
    regs.copy_from_slice(&frame.x[..8]);
    match handler {
        // EC 0x13's ISS has no immediate.
        Some(handler) if ec == 0x13 || imm == 0 => handler(&mut regs),
        _ => regs[0] = NOT_SUPPORTED,
    }
    frame.x[..8].copy_from_slice(&regs);
    // The preferred return address of an SMC taken to EL3 is the next instruction, which is
    // what ELR_EL3 already holds: nothing to advance.
    true
}

/// Answers the standard calls a minimal monitor needs (what Xen 4.17 asks at boot):
/// `SMCCC_VERSION` (1.1), `SMCCC_ARCH_FEATURES` (only `SMCCC_ARCH_FEATURES` itself; the
/// workarounds are NOT_SUPPORTED), `PSCI_VERSION` (1.1), `PSCI_FEATURES`, `PSCI_SYSTEM_OFF`
/// (exit 0) and `PSCI_SYSTEM_RESET` (exit [`EXIT_SYSTEM_RESET`]). Returns false, leaving `regs`
/// alone, for anything else.
pub fn standard_service(regs: &mut [u64; 8]) -> bool {
    standard_service_smccc(regs, SMCCC_VERSION_1_1)
}

/// [`standard_service`] with `SMCCC_VERSION` answering `smccc_version` ([`SMCCC_VERSION_1_2`]
/// for a monitor that stands in for an SPMC under Xen's FF-A mediator).
pub fn standard_service_smccc(regs: &mut [u64; 8], smccc_version: u64) -> bool {
    const SUPPORTED: [u32; 6] =
        [SMCCC_VERSION, SMCCC_ARCH_FEATURES, PSCI_VERSION, PSCI_FEATURES, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET];
    match regs[0] as u32 {
        SMCCC_VERSION => regs[0] = smccc_version,
        SMCCC_ARCH_FEATURES => {
            regs[0] = if regs[1] as u32 == SMCCC_ARCH_FEATURES { 0 } else { NOT_SUPPORTED };
        }
        PSCI_VERSION => regs[0] = PSCI_VERSION_1_1,
        PSCI_FEATURES => {
            regs[0] = if SUPPORTED.contains(&(regs[1] as u32)) { 0 } else { NOT_SUPPORTED };
        }
        PSCI_SYSTEM_OFF => {
            println!("baremetal: PSCI SYSTEM_OFF");
            crate::exit(0)
        }
        PSCI_SYSTEM_RESET => {
            println!("baremetal: PSCI SYSTEM_RESET");
            crate::exit(EXIT_SYSTEM_RESET)
        }
        _ => return false,
    }
    true
}

/// The `SCR_EL3` value [`enter_lower_el`] uses: non-secure, AArch64 below, SMC enabled, IRQs,
/// FIQs and aborts not routed to EL3, and HVC enabled when entering EL2.
pub const fn scr_el3_for(el: LowerEl) -> u64 {
    let base = scr::NS | scr::RES1 | scr::RW;
    match el {
        LowerEl::El1 => base,
        LowerEl::El2 => base | scr::HCE,
    }
}

/// SCTLR_EL1 with the MMU, caches and alignment checks off, little-endian (RES1 bits only).
const SCTLR_EL1_MMU_OFF: u64 = 0x30d0_0800;
/// SCTLR_EL2 (E2H=0) with the MMU, caches and alignment checks off (RES1 bits only).
const SCTLR_EL2_MMU_OFF: u64 = 0x30c5_0830;
/// HCR_EL2.RW: EL1 is AArch64. Nothing else is trapped or virtualised.
const HCR_EL2_RW: u64 = 1 << 31;
/// CNTHCTL_EL2.EL1PCTEN | EL1PCEN: EL1 may read the physical counter and use the timer.
const CNTHCTL_EL2_EL1_ACCESS: u64 = 3;
/// CPTR_EL2 (E2H=0): RES1 bits and TZ; TFP=0, so FP/SIMD is not trapped.
const CPTR_EL2_NO_FP_TRAP: u64 = 0x33ff;
/// SPSR: D, A, I and F masked.
const SPSR_DAIF: u64 = 0xf << 6;
const SPSR_EL1H: u64 = 0b0101;
const SPSR_EL2H: u64 = 0b1001;

extern "C" {
    /// The top of the boot stack (linker script).
    static boot_stack_end: u8;
}

/// Leaves EL3 for good: `eret`s to `entry` at non-secure `el` (h: with its own SP), with `x0`
/// in x0 and x1..x3 zero (the arm64 Linux boot protocol), all interrupts masked and the MMU
/// off. Sets SCR_EL3 ([`scr_el3_for`]), SPSR_EL3, ELR_EL3 and the target's SCTLR; when EL2 is
/// implemented and the target is EL1, also HCR_EL2 (RW=1 only), CNTHCTL_EL2 (physical counter
/// and timer not trapped), CNTVOFF_EL2=0, CPTR_EL2 (FP not trapped), HSTR_EL2=0 and
/// VPIDR/VMPIDR_EL2 (the real MIDR/MPIDR). SP_EL3 is reset to the top of the boot stack: the
/// monitor's SMC handler runs there from now on.
///
/// Panics if not at EL3, or if `el` is EL2 and EL2 is not implemented.
///
/// # Safety
/// `entry` must be the address of code built to run at `el` with the MMU off, and everything it
/// needs (its image, `x0`'s DTB) must be in place. Nothing on the current stack may be in use
/// afterwards (the function never returns, so only raw pointers could still refer to it).
pub unsafe fn enter_lower_el(entry: usize, el: LowerEl, x0: usize) -> ! {
    assert_eq!(sysreg::current_el(), 3, "enter_lower_el: not at EL3");
    let el2 = sysreg::el2_implemented();
    assert!(el2 || el == LowerEl::El1, "enter_lower_el: EL2 requested but the CPU has no EL2");
    let spsr = SPSR_DAIF
        | match el {
            LowerEl::El1 => SPSR_EL1H,
            LowerEl::El2 => SPSR_EL2H,
        };
    match el {
        LowerEl::El1 => {
            // SAFETY: EL3 may write SCTLR_EL1; the MMU-off value only affects EL1 and EL0,
            // which are not running yet.
            unsafe { asm!("msr sctlr_el1, {}", in(reg) SCTLR_EL1_MMU_OFF, options(nomem, nostack)) };
            if el2 {
                let (midr, mpidr) = (sysreg::midr(), sysreg::mpidr());
                // SAFETY: EL3 may write EL2's registers while EL2 is not running; these values
                // make EL2 transparent for EL1 (AArch64 EL1, no traps, no counter offset, the
                // real MIDR/MPIDR) and leave stage 2 off (HCR_EL2.VM=0).
                unsafe {
                    asm!(
                        "msr hcr_el2, {hcr}",
                        "msr cnthctl_el2, {cnthctl}",
                        "msr cntvoff_el2, xzr",
                        "msr cptr_el2, {cptr}",
                        "msr hstr_el2, xzr",
                        "msr vpidr_el2, {midr}",
                        "msr vmpidr_el2, {mpidr}",
                        hcr = in(reg) HCR_EL2_RW,
                        cnthctl = in(reg) CNTHCTL_EL2_EL1_ACCESS,
                        cptr = in(reg) CPTR_EL2_NO_FP_TRAP,
                        midr = in(reg) midr,
                        mpidr = in(reg) mpidr,
                        options(nomem, nostack),
                    )
                };
            }
        }
        LowerEl::El2 => {
            // SAFETY: EL3 may write SCTLR_EL2 (EL2 is implemented, checked above) while EL2 is
            // not running.
            unsafe { asm!("msr sctlr_el2, {}", in(reg) SCTLR_EL2_MMU_OFF, options(nomem, nostack)) };
        }
    }
    let sp = &raw const boot_stack_end as usize;
    // SAFETY: the caller guarantees `entry` is valid code for `el` and that nothing on the
    // current stack is still needed, so SP_EL3 may restart at the top of the boot stack (the
    // stack the vectors use for SMCs from now on). The eret switches to the lower EL; this
    // never returns.
    unsafe {
        asm!(
            "msr scr_el3, {scr}",
            "msr spsr_el3, {spsr}",
            "msr elr_el3, {entry}",
            "mov sp, {sp}",
            "mov x1, xzr",
            "mov x2, xzr",
            "mov x3, xzr",
            "isb",
            "eret",
            scr = in(reg) scr_el3_for(el),
            spsr = in(reg) spsr,
            entry = in(reg) entry,
            sp = in(reg) sp,
            in("x0") x0,
            options(noreturn, nostack),
        )
    }
}

/// GICv3 set-up for the non-secure side, as a minimal monitor must do it before a non-secure
/// OS (Xen) can use the GIC: affinity routing on for both states, every interrupt in
/// non-secure group 1, this CPU's redistributor awake, system-register access allowed below.
pub mod gicv3 {
    use core::arch::asm;
    use core::ptr::{read_volatile, write_volatile};

    use crate::sysreg;

    /// QEMU virt's distributor.
    pub const QEMU_VIRT_GICD: usize = 0x0800_0000;
    /// QEMU virt's first redistributor (one 128 KiB frame pair per CPU).
    pub const QEMU_VIRT_GICR: usize = 0x080a_0000;

    const GICD_CTLR: usize = 0x0000;
    const GICD_TYPER: usize = 0x0004;
    const GICD_IGROUPR: usize = 0x0080;
    const GICD_IGRPMODR: usize = 0x0d00;
    const GICD_CTLR_ARE_S: u32 = 1 << 4;
    const GICD_CTLR_ARE_NS: u32 = 1 << 5;
    const GICD_CTLR_RWP: u32 = 1 << 31;
    const GICR_FRAME: usize = 0x2_0000;
    const GICR_TYPER: usize = 0x0008;
    const GICR_TYPER_LAST: u32 = 1 << 4;
    const GICR_WAKER: usize = 0x0014;
    const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
    const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
    const GICR_SGI_BASE: usize = 0x1_0000;
    const GICR_IGROUPR0: usize = 0x0080;
    const GICR_IGRPMODR0: usize = 0x0d00;
    /// ICC_SRE_ELx: SRE | DFB | DIB | Enable (lower ELs may use the system registers).
    const ICC_SRE_ALL: u64 = 0xf;
    const POLL_LIMIT: u32 = 1_000_000;

    /// What went wrong.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum GicError {
        /// GICD_CTLR.RWP did not clear.
        DistributorTimeout,
        /// No redistributor frame has this CPU's affinity.
        NoRedistributor,
        /// GICR_WAKER.ChildrenAsleep did not clear.
        WakeTimeout,
    }

    /// Sets up the distributor at `gicd`, this CPU's redistributor (found from `gicr` by
    /// affinity), and `ICC_SRE_EL3` (and `ICC_SRE_EL2` when EL2 exists) for a non-secure OS.
    /// Must run at EL3 before the first [`super::enter_lower_el`].
    ///
    /// # Safety
    /// `gicd` and `gicr` must be the addresses of a GICv3 distributor and redistributor region
    /// (MMU off), the GIC must be in its reset state, and the CPU must implement the GICv3
    /// system-register interface (e.g. QEMU virt with `gic-version=3`).
    pub unsafe fn init_for_non_secure(gicd: usize, gicr: usize) -> Result<(), GicError> {
        // SAFETY: the caller guarantees `gicd` is a GICv3 distributor; these are its 32-bit
        // registers. Affinity routing may be enabled while both groups are disabled (reset).
        unsafe {
            write32(gicd + GICD_CTLR, GICD_CTLR_ARE_S | GICD_CTLR_ARE_NS);
            poll(|| read32(gicd + GICD_CTLR) & GICD_CTLR_RWP == 0).ok_or(GicError::DistributorTimeout)?;
            let lines = (read32(gicd + GICD_TYPER) & 0x1f) as usize + 1;
            // IGROUPR0/IGRPMODR0 (SGIs, PPIs) live in the redistributor with affinity routing.
            for n in 1..lines {
                write32(gicd + GICD_IGROUPR + 4 * n, u32::MAX);
                write32(gicd + GICD_IGRPMODR + 4 * n, 0);
            }
        }
        let mpidr = sysreg::mpidr();
        // GICR_TYPER[63:32] is Aff3.Aff2.Aff1.Aff0; MPIDR has Aff3 at 39:32.
        let aff = (mpidr & 0xff_ffff) | (((mpidr >> 32) & 0xff) << 24);
        let mut rd = gicr;
        loop {
            // SAFETY: `rd` is a redistributor frame: the first by the caller's guarantee, the
            // next ones because the previous frame's TYPER.Last was clear.
            let (typer_lo, typer_hi) = unsafe { (read32(rd + GICR_TYPER), read32(rd + GICR_TYPER + 4)) };
            if u64::from(typer_hi) == aff {
                break;
            }
            if typer_lo & GICR_TYPER_LAST != 0 {
                return Err(GicError::NoRedistributor);
            }
            rd += GICR_FRAME;
        }
        // SAFETY: `rd` is this CPU's redistributor; WAKER, IGROUPR0 and IGRPMODR0 are its
        // 32-bit registers (the last two in the SGI frame).
        unsafe {
            write32(rd + GICR_WAKER, read32(rd + GICR_WAKER) & !GICR_WAKER_PROCESSOR_SLEEP);
            poll(|| read32(rd + GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP == 0).ok_or(GicError::WakeTimeout)?;
            write32(rd + GICR_SGI_BASE + GICR_IGROUPR0, u32::MAX);
            write32(rd + GICR_SGI_BASE + GICR_IGRPMODR0, 0);
        }
        // SAFETY: the caller guarantees the GICv3 system-register interface; ICC_SRE_EL3 is
        // writable at EL3, and with its Enable bit set so is ICC_SRE_EL2.
        unsafe { asm!("msr icc_sre_el3, {}", "isb", in(reg) ICC_SRE_ALL, options(nomem, nostack)) };
        if sysreg::el2_implemented() {
            // SAFETY: as above; EL2 exists.
            unsafe { asm!("msr icc_sre_el2, {}", "isb", in(reg) ICC_SRE_ALL, options(nomem, nostack)) };
        }
        Ok(())
    }

    fn poll(mut done: impl FnMut() -> bool) -> Option<()> {
        (0..POLL_LIMIT).any(|_| done()).then_some(())
    }

    /// # Safety
    /// `addr` must be a readable 32-bit device register.
    unsafe fn read32(addr: usize) -> u32 {
        // SAFETY: forwarded from the caller.
        unsafe { read_volatile(addr as *const u32) }
    }

    /// # Safety
    /// `addr` must be a writable 32-bit device register.
    unsafe fn write32(addr: usize, value: u32) {
        // SAFETY: forwarded from the caller.
        unsafe { write_volatile(addr as *mut u32, value) }
    }
}
