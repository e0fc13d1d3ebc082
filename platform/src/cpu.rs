//! Which CPU the caller runs on, for transports that give Trusty time on the calling CPU's
//! execution context (Trusty's FF-A transport: FFA_RUN on vCPU `smp_processor_id()`).

/// The calling CPU's number. On AArch64 it is read from MPIDR_EL1 as Xen numbers a guest's
/// vCPUs (`vcpuid_to_vaffinity`: Aff0 = id % 16, Aff1 = id / 16), which is also the logical
/// order of a single-cluster machine; elsewhere (host tests) it is 0.
pub fn current_cpu() -> u16 {
    #[cfg(target_arch = "aarch64")]
    {
        let mpidr: u64;
        // SAFETY: reading MPIDR_EL1 has no side effects and is allowed at EL1 and above.
        unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack, preserves_flags)) };
        from_mpidr(mpidr)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        0
    }
}

/// A CPU number from MPIDR's Aff0 and Aff1 fields, in Xen's vCPU numbering.
pub const fn from_mpidr(mpidr: u64) -> u16 {
    let aff0 = (mpidr & 0xff) as u16;
    let aff1 = ((mpidr >> 8) & 0xff) as u16;
    aff1 * 16 + aff0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_vcpu_numbering() {
        assert_eq!(from_mpidr(0x8000_0000), 0);
        assert_eq!(from_mpidr(0x8000_0003), 3);
        assert_eq!(from_mpidr(0x8000_0102), 18);
    }
}
