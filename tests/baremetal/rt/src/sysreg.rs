//! The few system registers the runtime reads, as safe functions (reading them has no side
//! effects), and the exception level helpers.

use core::arch::asm;

macro_rules! read_sysreg {
    ($(#[$meta:meta])* $fn:ident, $reg:literal) => {
        $(#[$meta])*
        #[inline]
        pub fn $fn() -> u64 {
            let value: u64;
            // SAFETY: reading this register has no side effects and is allowed at every EL the
            // runtime runs at (EL1..EL3); no memory is touched.
            unsafe { asm!(concat!("mrs {}, ", $reg), out(reg) value, options(nomem, nostack, preserves_flags)) };
            value
        }
    };
}

read_sysreg!(
    /// `CurrentEL` (raw: the EL is in bits 3:2; see [`current_el`]).
    current_el_raw, "CurrentEL"
);
read_sysreg!(
    /// `MPIDR_EL1`: this CPU's affinity (at EL1 under a hypervisor: the virtual MPIDR).
    mpidr, "mpidr_el1"
);
read_sysreg!(
    /// `MIDR_EL1`: the CPU's part number and revision.
    midr, "midr_el1"
);
read_sysreg!(
    /// `ID_AA64PFR0_EL1`: which ELs exist and in which execution states.
    id_aa64pfr0, "id_aa64pfr0_el1"
);
read_sysreg!(
    /// `CNTFRQ_EL0`: the generic timer's frequency in Hz (set by firmware; QEMU: 62.5 MHz).
    cntfrq, "cntfrq_el0"
);
read_sysreg!(
    /// `DAIF`: the interrupt masks.
    daif, "daif"
);

/// The exception level this code runs at (1, 2 or 3).
#[inline]
pub fn current_el() -> u8 {
    ((current_el_raw() >> 2) & 3) as u8
}

/// Whether the CPU implements EL2 (`ID_AA64PFR0_EL1.EL2 != 0`).
#[inline]
pub fn el2_implemented() -> bool {
    (id_aa64pfr0() >> 8) & 0xf != 0
}

/// Whether the CPU implements EL3 (`ID_AA64PFR0_EL1.EL3 != 0`).
#[inline]
pub fn el3_implemented() -> bool {
    (id_aa64pfr0() >> 12) & 0xf != 0
}

/// `CNTPCT_EL0`, the physical count, after an `isb` so it is not read early.
#[inline]
pub fn cntpct() -> u64 {
    let value: u64;
    // SAFETY: `isb` and a counter read have no side effects. EL1 may read CNTPCT_EL0 when
    // CNTHCTL_EL2.EL1PCTEN allows it: Xen sets it for guests and `el3::enter_lower_el` sets it.
    unsafe { asm!("isb", "mrs {}, cntpct_el0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// The affinity fields of an MPIDR value (Aff3..Aff0), with the U/MT/RES1 bits cleared.
#[inline]
pub const fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}
