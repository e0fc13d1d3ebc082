//! One SMCCC call and the numbers Trusty gives them (spec §2.1-§2.3).

use core::fmt;

/// Issues one SMCCC call. `regs[0]` is the function id, `regs[1..=6]` the arguments and
/// `regs[7]` the client id a hypervisor inserts (0 without one, spec §2.7); the result is x0..x7.
///
/// Implementations: the `smc #0` / `hvc #0` instruction on AArch64 ([`crate::aarch64`]), the
/// secure-side model on the host, and transports that carry Trusty calls another way (FF-A direct
/// requests, a Xen mailbox). Like google/smccc, the instruction is only compiled for AArch64.
pub trait Conduit: Send + Sync {
    /// Make the call and return x0..x7 as the secure side left them.
    fn call(&self, regs: [u64; 8]) -> [u64; 8];

    /// Why this transport can carry no further call, once it knows (e.g. an FF-A direct request
    /// it had to give up while Trusty still ran it). The call discipline turns it into a sticky
    /// [`crate::Error::TransportFailed`]. Default: never.
    fn failure(&self) -> Option<&'static str> {
        None
    }
}

/// Function-id encoding (spec §2.1).
pub mod fid {
    /// Bit 31: fast call.
    pub const FAST_CALL: u32 = 1 << 31;
    /// Bit 30: SMC64 convention.
    pub const SMC64: u32 = 1 << 30;

    /// The entity field (bits 29..24).
    pub const fn entity(fid: u32) -> u32 {
        (fid >> 24) & 0x3f
    }
    /// The function number (bits 15..0).
    pub const fn function(fid: u32) -> u32 {
        fid & 0xffff
    }
    /// Whether `fid` names a fast call.
    pub const fn is_fast(fid: u32) -> bool {
        fid & FAST_CALL != 0
    }
    /// Builds a function id from its parts.
    pub const fn make(fast: bool, smc64: bool, entity: u32, function: u32) -> u32 {
        (if fast { FAST_CALL } else { 0 })
            | (if smc64 { SMC64 } else { 0 })
            | ((entity & 0x3f) << 24)
            | (function & 0xffff)
    }

    /// SMCCC entity of the secure monitor (Trusty's SMC_ENTITY_SECURE_MONITOR).
    pub const ENTITY_SECURE_MONITOR: u32 = 60;
    /// SMCCC entity of the trusted OS (SMC_ENTITY_TRUSTED_OS).
    pub const ENTITY_TRUSTED_OS: u32 = 50;
    /// SMCCC entity of Trusty's logging calls (SMC_ENTITY_LOGGING).
    pub const ENTITY_LOGGING: u32 = 51;
}

/// Trusty's call numbers (spec §2.2).
pub mod call {
    /// SMC_SC_RESTART_LAST: restart the interrupted standard call.
    pub const SC_RESTART_LAST: u32 = 0x3C00_0000;
    /// SMC_SC_LOCKED_NOP: a NOP call under the call lock (API < 2).
    pub const SC_LOCKED_NOP: u32 = 0x3C00_0001;
    /// SMC_SC_RESTART_FIQ: resume after a FIQ interrupted a call.
    pub const SC_RESTART_FIQ: u32 = 0x3C00_0002;
    /// SMC_SC_NOP: give Trusty time for pending work.
    pub const SC_NOP: u32 = 0x3C00_0003;
    /// SMC_FC_GET_VERSION_STR: one character of Trusty's version string per call.
    pub const FC_GET_VERSION_STR: u32 = 0xBC00_000A;
    /// SMC_FC_API_VERSION: negotiate the API version.
    pub const FC_API_VERSION: u32 = 0xBC00_000B;
    /// SMC_SC_VIRTIO_GET_DESCR: copy the virtio bus descriptor into a shared page.
    pub const SC_VIRTIO_GET_DESCR: u32 = 0x3200_0014;
    /// SMC_SC_VIRTIO_START: start the virtio bus.
    pub const SC_VIRTIO_START: u32 = 0x3200_0015;
    /// SMC_SC_VIRTIO_STOP: stop the virtio bus.
    pub const SC_VIRTIO_STOP: u32 = 0x3200_0016;
    /// SMC_SC_VDEV_RESET: reset one virtio device.
    pub const SC_VDEV_RESET: u32 = 0x3200_0017;
    /// SMC_SC_VDEV_KICK_VQ: kick one vring.
    pub const SC_VDEV_KICK_VQ: u32 = 0x3200_0018;
    /// Not a call: the NOP argument a0 that asks for a vring kick (spec §4).
    pub const NC_VDEV_KICK_VQ: u32 = 0x3200_0019;
}

/// API versions (spec §2.4).
pub mod api {
    /// TRUSTY_API_VERSION_RESTART_FIQ.
    pub const RESTART_FIQ: u32 = 1;
    /// TRUSTY_API_VERSION_SMP: calls from several CPUs.
    pub const SMP: u32 = 2;
    /// TRUSTY_API_VERSION_SMP_NOP: NOP calls without the lock.
    pub const SMP_NOP: u32 = 3;
    /// TRUSTY_API_VERSION_PHYS_MEM_OBJ: memory ids with attributes.
    pub const PHYS_MEM_OBJ: u32 = 4;
    /// TRUSTY_API_VERSION_MEM_OBJ: memory shared by FF-A handles.
    pub const MEM_OBJ: u32 = 5;
    /// The newest version this stack speaks.
    pub const CURRENT: u32 = MEM_OBJ;
}

/// Secure-monitor error codes: w0 as a negative 32-bit value (spec §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmError {
    /// -1 (SM_ERR_UNDEFINED_SMC): unknown call.
    UndefinedSmc,
    /// -2 (SM_ERR_INVALID_PARAMETERS).
    InvalidParameters,
    /// -3 (SM_ERR_INTERRUPTED): the standard call was interrupted; restart it.
    Interrupted,
    /// -4 (SM_ERR_UNEXPECTED_RESTART): a restart with no call pending.
    UnexpectedRestart,
    /// -5 (SM_ERR_BUSY): the secure side is busy; retry.
    Busy,
    /// -6 (SM_ERR_INTERLEAVED_SMC): a standard call while another is pending.
    InterleavedSmc,
    /// -7 (SM_ERR_INTERNAL_FAILURE).
    InternalFailure,
    /// -8 (SM_ERR_NOT_SUPPORTED).
    NotSupported,
    /// -9 (SM_ERR_NOT_ALLOWED).
    NotAllowed,
    /// -10 (SM_ERR_END_OF_INPUT): the end of a string read call by call.
    EndOfInput,
    /// -11 (SM_ERR_PANIC): Trusty panicked.
    Panic,
    /// -12 (SM_ERR_FIQ_INTERRUPTED): interrupted by a FIQ; restart with SMC_SC_RESTART_FIQ.
    FiqInterrupted,
    /// -13 (SM_ERR_CPU_IDLE): nothing to do.
    CpuIdle,
    /// -14 (SM_ERR_NOP_INTERRUPTED): the NOP call was interrupted.
    NopInterrupted,
    /// -15 (SM_ERR_NOP_DONE): the NOP call finished its work.
    NopDone,
    /// A negative value this stack does not know.
    Other(i32),
}

impl SmError {
    /// The error for a negative result word, `None` for a success (>= 0).
    pub const fn from_code(code: i32) -> Option<SmError> {
        Some(match code {
            0.. => return None,
            -1 => SmError::UndefinedSmc,
            -2 => SmError::InvalidParameters,
            -3 => SmError::Interrupted,
            -4 => SmError::UnexpectedRestart,
            -5 => SmError::Busy,
            -6 => SmError::InterleavedSmc,
            -7 => SmError::InternalFailure,
            -8 => SmError::NotSupported,
            -9 => SmError::NotAllowed,
            -10 => SmError::EndOfInput,
            -11 => SmError::Panic,
            -12 => SmError::FiqInterrupted,
            -13 => SmError::CpuIdle,
            -14 => SmError::NopInterrupted,
            -15 => SmError::NopDone,
            other => SmError::Other(other),
        })
    }

    /// The code on the wire.
    pub const fn code(self) -> i32 {
        match self {
            SmError::UndefinedSmc => -1,
            SmError::InvalidParameters => -2,
            SmError::Interrupted => -3,
            SmError::UnexpectedRestart => -4,
            SmError::Busy => -5,
            SmError::InterleavedSmc => -6,
            SmError::InternalFailure => -7,
            SmError::NotSupported => -8,
            SmError::NotAllowed => -9,
            SmError::EndOfInput => -10,
            SmError::Panic => -11,
            SmError::FiqInterrupted => -12,
            SmError::CpuIdle => -13,
            SmError::NopInterrupted => -14,
            SmError::NopDone => -15,
            SmError::Other(code) => code,
        }
    }
}

impl fmt::Display for SmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SmError::UndefinedSmc => "SM_ERR_UNDEFINED_SMC",
            SmError::InvalidParameters => "SM_ERR_INVALID_PARAMETERS",
            SmError::Interrupted => "SM_ERR_INTERRUPTED",
            SmError::UnexpectedRestart => "SM_ERR_UNEXPECTED_RESTART",
            SmError::Busy => "SM_ERR_BUSY",
            SmError::InterleavedSmc => "SM_ERR_INTERLEAVED_SMC",
            SmError::InternalFailure => "SM_ERR_INTERNAL_FAILURE",
            SmError::NotSupported => "SM_ERR_NOT_SUPPORTED",
            SmError::NotAllowed => "SM_ERR_NOT_ALLOWED",
            SmError::EndOfInput => "SM_ERR_END_OF_INPUT",
            SmError::Panic => "SM_ERR_PANIC",
            SmError::FiqInterrupted => "SM_ERR_FIQ_INTERRUPTED",
            SmError::CpuIdle => "SM_ERR_CPU_IDLE",
            SmError::NopInterrupted => "SM_ERR_NOP_INTERRUPTED",
            SmError::NopDone => "SM_ERR_NOP_DONE",
            SmError::Other(code) => return write!(f, "unknown secure-monitor error {code}"),
        };
        write!(f, "{name} ({})", self.code())
    }
}

/// The 32-bit result word of an SMC32 call, read as signed (spec §2.3).
pub const fn result32(regs: &[u64; 8]) -> i32 {
    regs[0] as u32 as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for code in -20..=0 {
            match SmError::from_code(code) {
                None => assert_eq!(code, 0),
                Some(e) => assert_eq!(e.code(), code),
            }
        }
        assert_eq!(SmError::from_code(-11), Some(SmError::Panic));
        assert_eq!(SmError::from_code(5), None);
    }

    #[test]
    fn fid_fields() {
        assert_eq!(fid::entity(call::SC_VIRTIO_START), fid::ENTITY_TRUSTED_OS);
        assert_eq!(fid::entity(call::SC_NOP), fid::ENTITY_SECURE_MONITOR);
        assert!(fid::is_fast(call::FC_API_VERSION));
        assert!(!fid::is_fast(call::SC_NOP));
        assert_eq!(fid::make(true, false, 60, 0xB), call::FC_API_VERSION);
        assert_eq!(result32(&[0xFFFF_FFFF, 0, 0, 0, 0, 0, 0, 0]), -1);
    }
}
