//! The SMC and HVC instructions, through the smccc crate. Compiled only for AArch64.

use crate::smc::Conduit;

/// Issues `smc #0`: the normal world's way into the secure monitor.
#[derive(Clone, Copy, Debug, Default)]
pub struct SmcConduit;

/// Issues `hvc #0`: for calls a hypervisor handles (or forwards).
#[derive(Clone, Copy, Debug, Default)]
pub struct HvcConduit;

fn regs_to_args(regs: &[u64; 8]) -> [u64; 17] {
    let mut args = [0u64; 17];
    args[..7].copy_from_slice(&regs[1..8]);
    args
}

fn result_to_regs(res: [u64; 18]) -> [u64; 8] {
    let mut out = [0u64; 8];
    out.copy_from_slice(&res[..8]);
    out
}

impl Conduit for SmcConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        result_to_regs(smccc::smc64(regs[0] as u32, regs_to_args(&regs)))
    }
}

impl Conduit for HvcConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        result_to_regs(smccc::hvc64(regs[0] as u32, regs_to_args(&regs)))
    }
}
