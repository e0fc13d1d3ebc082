//! The Trusty model as EL3 firmware: every `smc #0` from the normal world lands here. PSCI and
//! SMCCC queries get the minimal answers a hypervisor or kernel needs; the rest goes to the
//! model, which runs inside the call (as Trusty runs on the calling CPU).

use trusty_model::Model;

/// SMCCC / PSCI function ids answered by the monitor itself.
pub mod fid {
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
    pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    pub const PSCI_CPU_OFF: u32 = 0x8400_0002;
    pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
    pub const PSCI_SYSTEM_RESET: u32 = 0x8400_0009;
    pub const PSCI_FEATURES: u32 = 0x8400_000A;
}

/// SMCCC's NOT_SUPPORTED.
pub const NOT_SUPPORTED: u64 = u64::MAX;

/// What the monitor must do after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Return,
    /// The normal world asked to power off or reset: end the run with this status.
    Exit(u32),
}

/// Handles one SMC: `regs` are x0..x7 in and out.
pub fn handle(model: &mut Model, regs: &mut [u64; 8]) -> After {
    let f = regs[0] as u32;
    let answer = match f {
        fid::SMCCC_VERSION => 0x1_0001,
        fid::PSCI_VERSION => 0x1_0001,
        fid::SMCCC_ARCH_FEATURES => NOT_SUPPORTED,
        fid::PSCI_FEATURES => match regs[1] as u32 {
            fid::PSCI_VERSION | fid::PSCI_SYSTEM_OFF | fid::PSCI_SYSTEM_RESET | fid::PSCI_FEATURES => 0,
            _ => NOT_SUPPORTED,
        },
        fid::PSCI_SYSTEM_OFF => return After::Exit(0),
        // A reset is how a panicking Xen ends: make it a failure the runner sees.
        fid::PSCI_SYSTEM_RESET => return After::Exit(1),
        fid::PSCI_CPU_OFF => NOT_SUPPORTED,
        _ => {
            *regs = model.smc(*regs);
            return After::Return;
        }
    };
    regs[0] = answer;
    After::Return
}
