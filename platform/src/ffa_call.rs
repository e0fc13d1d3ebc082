//! Trusty's FF-A call transport (spec trusty-protocol §11): every Trusty call wrapped in an
//! FF-A direct request to Trusty's partition, with CPU time given by FFA_RUN. Under Xen's FF-A
//! mediator this is the only way a DomU reaches Trusty: its plain Trusty SMCs come back
//! NOT_SUPPORTED (spec dma-decisions §4.3).
//!
//! [`FfaCallConduit`] is a [`Conduit`]: the call discipline above it is unchanged, and FF-A calls
//! (memory sharing) pass through untouched.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::clock::{Clock, Deadline};

use crate::ffa::func;
use crate::smc::{call, fid, Conduit, SmError};
use crate::Error;

/// Trusty's partition UUID 40ee25f0-a2bc-304c-8c4c-a173c57d8af1 as FFA_PARTITION_INFO_GET's
/// four argument words (spec §11).
pub const TRUSTY_UUID_WORDS: [u32; 4] = [0xf025_ee40, 0x4c30_bca2, 0x73a1_4c8c, 0xf18a_7dc5];

/// Direct-request opcodes (w3) of Trusty's FF-A transport.
pub mod opcode {
    /// Run a fast call: w4..w7 carry the SMC's function id and arguments.
    pub const RUN_FASTCALL: u32 = 0;
    /// Queue a standard call.
    pub const QUEUE_STDCALL: u32 = 1;
    /// Collect the result of the queued standard call.
    pub const GET_STDCALL_RET: u32 = 2;
    /// Run a NOP call (let Trusty do pending work).
    pub const RUN_NOPCALL: u32 = 3;
    /// Ask whether Trusty is idle.
    pub const IS_IDLE: u32 = 4;
}

/// Bit 0 of a partition's properties: it receives direct requests.
pub const PARTITION_DIRECT_REQ_RECV: u32 = 1;
/// Size of one FF-A 1.0 partition-info descriptor: id u16, execution contexts u16, properties u32.
pub const PARTITION_INFO_LEN: usize = 8;

/// Trusty's partition as FFA_PARTITION_INFO_GET described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustyPartition {
    /// The partition's FF-A endpoint id.
    pub id: u16,
    /// Its number of execution contexts.
    pub exec_contexts: u16,
    /// Its properties (bit 0: [`PARTITION_DIRECT_REQ_RECV`]).
    pub properties: u32,
}

/// Finds Trusty's partition by UUID. `read_rx` copies the start of our RX buffer (mapped with
/// FFA_RXTX_MAP), where the answer is written; the buffer is released afterwards.
pub fn discover(conduit: &dyn Conduit, read_rx: impl FnOnce(&mut [u8])) -> Result<TrustyPartition, Error> {
    let w = TRUSTY_UUID_WORDS.map(u64::from);
    let out = conduit.call([u64::from(func::PARTITION_INFO_GET), w[0], w[1], w[2], w[3], 0, 0, 0]);
    match out[0] as u32 {
        func::SUCCESS | func::SUCCESS64 => {}
        func::ERROR => return Err(Error::Ffa { call: "FFA_PARTITION_INFO_GET", code: out[2] as u32 as i32 }),
        _ => return Err(Error::Ffa { call: "FFA_PARTITION_INFO_GET", code: crate::ffa::err::NOT_SUPPORTED }),
    }
    let count = out[2] as u32;
    let mut desc = [0u8; PARTITION_INFO_LEN];
    read_rx(&mut desc);
    // The RX buffer belongs to the producer again once we have read it.
    conduit.call([u64::from(func::RX_RELEASE), 0, 0, 0, 0, 0, 0, 0]);
    if count != 1 {
        return Err(Error::Ffa { call: "FFA_PARTITION_INFO_GET (Trusty's UUID)", code: crate::ffa::err::INVALID_PARAMETERS });
    }
    let part = TrustyPartition {
        id: u16::from_le_bytes([desc[0], desc[1]]),
        exec_contexts: u16::from_le_bytes([desc[2], desc[3]]),
        properties: u32::from_le_bytes([desc[4], desc[5], desc[6], desc[7]]),
    };
    if part.properties & PARTITION_DIRECT_REQ_RECV == 0 {
        return Err(Error::InvalidArgument("Trusty's partition does not receive direct requests"));
    }
    Ok(part)
}

/// Carries Trusty calls as FF-A direct requests.
///
/// FFA_INTERRUPT: Linux's arm_ffa driver (`ffa_msg_send_direct_req`, `ffa_run`) answers it
/// with FFA_RUN on the target the interrupt names (w1) until something else comes back. This
/// conduit does the same, for at most `interrupt_limit_ms` per call:
/// - FFA_RUN (giving Trusty time) still interrupted at the limit: Trusty simply has not gone
///   idle; the call is answered as not finished (SM_ERR_INTERRUPTED / SM_ERR_NOP_INTERRUPTED),
///   and the discipline's RESTART_LAST runs it again, within the discipline's own deadline;
/// - a direct request still interrupted at the limit: FF-A has no way to collect its answer
///   later but to keep running it, and a second request while it is live would be refused or
///   misread, so the transport is declared failed ([`Conduit::failure`]): no call is made
///   through it again, which keeps "never a fresh call while one is pending".
pub struct FfaCallConduit {
    inner: Arc<dyn Conduit>,
    own_id: u16,
    trusty: TrustyPartition,
    clock: Arc<dyn Clock>,
    interrupt_limit_ms: u64,
    current_cpu: fn() -> u16,
    failed: AtomicBool,
}

/// Why the transport stopped (see [`FfaCallConduit`]).
pub const INTERRUPTED_REQUEST: &str =
    "Trusty's FF-A partition kept answering FFA_INTERRUPT to a direct request past the limit; its answer is lost, so no further call is made";

fn ret(code: i32) -> [u64; 8] {
    [u64::from(code as u32), 0, 0, 0, 0, 0, 0, 0]
}

impl FfaCallConduit {
    /// `inner` issues the FF-A calls; `own_id` is ours (FFA_ID_GET), `trusty` Trusty's
    /// partition as [`discover`] found it. FFA_INTERRUPT is followed with FFA_RUN for at most
    /// `interrupt_limit_ms` per call, measured on `clock`.
    pub fn new(inner: Arc<dyn Conduit>, own_id: u16, trusty: TrustyPartition, clock: Arc<dyn Clock>, interrupt_limit_ms: u64) -> Self {
        FfaCallConduit {
            inner,
            own_id,
            trusty,
            clock,
            interrupt_limit_ms,
            current_cpu: crate::cpu::current_cpu,
            failed: AtomicBool::new(false),
        }
    }

    /// Names the calling CPU another way than [`crate::cpu::current_cpu`] (Trusty's FF-A
    /// transport runs the vCPU of the calling CPU: NXP/Google `trusty_ffa_run` passes
    /// `smp_processor_id()` to FFA_RUN).
    pub fn with_current_cpu(mut self, current_cpu: fn() -> u16) -> Self {
        self.current_cpu = current_cpu;
        self
    }

    /// FFA_RUN while the answer is FFA_INTERRUPT (Linux `ffa_run`, `ffa_msg_send_direct_req`),
    /// on the target the interrupt names. `None` when still interrupted at the limit.
    // Out of line: shared by its callers, and the secure call it makes dwarfs a call.
    #[inline(never)]
    fn resume(&self, mut out: [u64; 8]) -> Option<[u64; 8]> {
        let deadline = Deadline::after_ms(&*self.clock, self.interrupt_limit_ms);
        while out[0] as u32 == func::INTERRUPT {
            if deadline.expired(&*self.clock) {
                return None;
            }
            out = self.inner.call([u64::from(func::RUN), out[1], 0, 0, 0, 0, 0, 0]);
        }
        Some(out)
    }

    /// One direct request; Trusty's answer in w3, or INTERNAL_FAILURE for FFA_ERROR or
    /// anything else (spec §11). FFA_INTERRUPT is resumed (see [`FfaCallConduit`]).
    fn direct(&self, op: u32, args: [u32; 4]) -> i32 {
        let endpoints = (u64::from(self.own_id) << 16) | u64::from(self.trusty.id);
        let a = args.map(u64::from);
        let out = self.inner.call([u64::from(func::MSG_SEND_DIRECT_REQ), endpoints, 0, u64::from(op), a[0], a[1], a[2], a[3]]);
        let Some(out) = self.resume(out) else {
            log::error!("{INTERRUPTED_REQUEST} (opcode {op}, {} ms)", self.interrupt_limit_ms);
            self.failed.store(true, Ordering::Release);
            return SmError::InternalFailure.code();
        };
        if out[0] as u32 == func::MSG_SEND_DIRECT_RESP {
            out[3] as u32 as i32
        } else {
            SmError::InternalFailure.code()
        }
    }

    /// Gives Trusty CPU time (FFA_RUN on the calling CPU's vCPU), then asks whether it went
    /// idle. Interrupted past the limit: not idle.
    fn run_then_idle(&self) -> Result<bool, i32> {
        let cpu = (self.current_cpu)();
        if cpu >= self.trusty.exec_contexts.max(1) {
            log::error!("CPU {cpu} has no execution context in Trusty's partition ({})", self.trusty.exec_contexts);
            return Err(SmError::InternalFailure.code());
        }
        let target = (u64::from(self.trusty.id) << 16) | u64::from(cpu);
        let out = self.inner.call([u64::from(func::RUN), target, 0, 0, 0, 0, 0, 0]);
        let Some(out) = self.resume(out) else {
            log::warn!("FFA_RUN still interrupted after {} ms; Trusty is not idle yet", self.interrupt_limit_ms);
            return Ok(false);
        };
        match out[0] as u32 {
            func::SUCCESS | func::SUCCESS64 | func::MSG_WAIT => {}
            _ => return Err(SmError::InternalFailure.code()),
        }
        match self.direct(opcode::IS_IDLE, [0; 4]) {
            1 => Ok(true),
            0 => Ok(false),
            e => Err(e),
        }
    }

    /// After the std call ran: its result if Trusty is idle, else INTERRUPTED (the caller's
    /// RESTART_LAST comes back here).
    fn std_result(&self) -> i32 {
        match self.run_then_idle() {
            Ok(true) => self.direct(opcode::GET_STDCALL_RET, [0; 4]),
            Ok(false) => SmError::Interrupted.code(),
            Err(e) => e,
        }
    }
}

impl Conduit for FfaCallConduit {
    fn failure(&self) -> Option<&'static str> {
        self.failed.load(Ordering::Acquire).then_some(INTERRUPTED_REQUEST)
    }

    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        let f = regs[0] as u32;
        if self.failed.load(Ordering::Acquire) {
            return ret(SmError::InternalFailure.code());
        }
        // FF-A's own calls (memory sharing) go out as they are.
        if crate::ffa::is_ffa_call(f) {
            return self.inner.call(regs);
        }
        let (a0, a1, a2) = (regs[1] as u32, regs[2] as u32, regs[3] as u32);
        if fid::is_fast(f) {
            return ret(self.direct(opcode::RUN_FASTCALL, [f, a0, a1, a2]));
        }
        ret(match f {
            call::SC_NOP => {
                if a0 != 0 {
                    let r = self.direct(opcode::RUN_NOPCALL, [a0, a1, a2, 0]);
                    if r != 0 {
                        return ret(r);
                    }
                }
                match self.run_then_idle() {
                    Ok(true) => SmError::NopDone.code(),
                    Ok(false) => SmError::NopInterrupted.code(),
                    Err(e) => e,
                }
            }
            // RESTART_LAST becomes "FFA_RUN, then GET_STDCALL_RET" (spec §11); with direct
            // requests there is no FIQ preemption to resume, so RESTART_FIQ is the same.
            call::SC_RESTART_LAST | call::SC_RESTART_FIQ => self.std_result(),
            _ => match self.direct(opcode::QUEUE_STDCALL, [f, a0, a1, a2]) {
                0 => self.std_result(),
                e => e,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::AtomicU64;
    use std::sync::Mutex;
    use std::vec::Vec;

    /// A fake partition: records requests, answers from simple rules.
    struct FakeSp {
        log: Mutex<Vec<(u32, u32)>>,
        idle_after_runs: Mutex<u32>,
        /// Answer the next N direct requests / FFA_RUNs with FFA_INTERRUPT (u32::MAX: forever).
        interrupt_requests: Mutex<u32>,
        interrupt_runs: Mutex<u32>,
        /// w1 of every FFA_RUN.
        run_targets: Mutex<Vec<u64>>,
        /// The answer of a direct request that was interrupted: FFA_RUN resumes it and returns it.
        resumed: Mutex<Option<[u64; 8]>>,
        clock: Arc<TestClock>,
    }
    fn take(n: &Mutex<u32>) -> bool {
        let mut n = n.lock().unwrap();
        match *n {
            0 => false,
            u32::MAX => true,
            _ => {
                *n -= 1;
                true
            }
        }
    }
    const INTERRUPT: [u64; 8] = [func::INTERRUPT as u64, (0x8000 << 16) | 2, 0, 0, 0, 0, 0, 0];
    /// Time that passes by 1 ms per call.
    struct TestClock(AtomicU64);
    impl Clock for TestClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn sleep_ns(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }
    impl Conduit for FakeSp {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            let f = regs[0] as u32;
            self.log.lock().unwrap().push((f, regs[3] as u32));
            self.clock.0.fetch_add(1_000_000, Ordering::SeqCst);
            if f == func::RUN {
                self.run_targets.lock().unwrap().push(regs[1]);
                if take(&self.interrupt_runs) {
                    return INTERRUPT;
                }
                if let Some(out) = self.resumed.lock().unwrap().take() {
                    return out;
                }
            }
            let out = self.answer(f, &regs);
            if f == func::MSG_SEND_DIRECT_REQ && take(&self.interrupt_requests) {
                *self.resumed.lock().unwrap() = Some(out);
                return INTERRUPT;
            }
            out
        }
    }
    impl FakeSp {
        fn answer(&self, f: u32, regs: &[u64; 8]) -> [u64; 8] {
            match f {
                func::MSG_SEND_DIRECT_REQ => {
                    assert_eq!(regs[1], (5 << 16) | 0x8000, "sender << 16 | receiver");
                    let w3 = match regs[3] as u32 {
                        opcode::RUN_FASTCALL => regs[4] as u32 ^ 0xFF, // echo something of the fid
                        opcode::QUEUE_STDCALL => 0,
                        opcode::GET_STDCALL_RET => 42,
                        opcode::RUN_NOPCALL => 0,
                        opcode::IS_IDLE => {
                            let mut n = self.idle_after_runs.lock().unwrap();
                            if *n == 0 {
                                1
                            } else {
                                *n -= 1;
                                0
                            }
                        }
                        _ => -8i32 as u32,
                    };
                    [u64::from(func::MSG_SEND_DIRECT_RESP), 0, 0, u64::from(w3), 0, 0, 0, 0]
                }
                func::RUN => [u64::from(func::SUCCESS), 0, 0, 0, 0, 0, 0, 0],
                func::MEM_SHARE => [u64::from(func::SUCCESS), 0, 7, 0, 0, 0, 0, 0],
                _ => [u64::from(func::ERROR), 0, (-1i32) as u32 as u64, 0, 0, 0, 0, 0],
            }
        }
    }

    fn sp(busy_runs: u32) -> Arc<FakeSp> {
        Arc::new(FakeSp {
            log: Mutex::new(Vec::new()),
            idle_after_runs: Mutex::new(busy_runs),
            interrupt_requests: Mutex::new(0),
            interrupt_runs: Mutex::new(0),
            run_targets: Mutex::new(Vec::new()),
            resumed: Mutex::new(None),
            clock: Arc::new(TestClock(AtomicU64::new(0))),
        })
    }
    const PART: TrustyPartition = TrustyPartition { id: 0x8000, exec_contexts: 4, properties: 1 };
    const LIMIT_MS: u64 = 100;
    fn on(sp: &Arc<FakeSp>) -> FfaCallConduit {
        FfaCallConduit::new(sp.clone(), 5, PART, sp.clock.clone(), LIMIT_MS)
    }
    fn conduit(busy_runs: u32) -> (Arc<FakeSp>, FfaCallConduit) {
        let sp = sp(busy_runs);
        let c = on(&sp);
        (sp, c)
    }

    fn r(c: &FfaCallConduit, f: u32, a: u32) -> i32 {
        c.call([u64::from(f), u64::from(a), 0, 0, 0, 0, 0, 0])[0] as u32 as i32
    }

    #[test]
    fn fast_call_is_run_fastcall() {
        let (sp, c) = conduit(0);
        assert_eq!(r(&c, call::FC_API_VERSION, 5), (call::FC_API_VERSION ^ 0xFF) as i32);
        assert_eq!(sp.log.lock().unwrap().as_slice(), &[(func::MSG_SEND_DIRECT_REQ, opcode::RUN_FASTCALL)]);
    }

    #[test]
    fn std_call_is_queue_run_idle_get() {
        let (sp, c) = conduit(0);
        assert_eq!(r(&c, call::SC_VIRTIO_START, 1), 42);
        let log = sp.log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                (func::MSG_SEND_DIRECT_REQ, opcode::QUEUE_STDCALL),
                (func::RUN, 0),
                (func::MSG_SEND_DIRECT_REQ, opcode::IS_IDLE),
                (func::MSG_SEND_DIRECT_REQ, opcode::GET_STDCALL_RET)
            ]
        );
    }

    #[test]
    fn busy_partition_means_interrupted_then_restart_finishes() {
        let (_, c) = conduit(1);
        assert_eq!(r(&c, call::SC_VIRTIO_START, 1), SmError::Interrupted.code());
        assert_eq!(r(&c, call::SC_RESTART_LAST, 0), 42);
    }

    #[test]
    fn nops_and_passthrough() {
        let (sp, c) = conduit(1);
        assert_eq!(r(&c, call::SC_NOP, 0), SmError::NopInterrupted.code());
        assert_eq!(r(&c, call::SC_NOP, 0), SmError::NopDone.code());
        assert_eq!(c.call([u64::from(func::MEM_SHARE), 80, 80, 0, 0, 0, 0, 0])[2], 7);
        assert!(!sp.log.lock().unwrap().iter().any(|&(f, _)| f == call::SC_NOP), "no plain Trusty call leaks through");
    }

    #[test]
    fn ffa_interrupt_is_followed_with_ffa_run_on_the_named_target() {
        // Linux ffa_msg_send_direct_req / ffa_run: FFA_RUN(w1 of the interrupt) until done.
        let (sp, c) = conduit(0);
        *sp.interrupt_requests.lock().unwrap() = 2;
        assert_eq!(r(&c, call::FC_API_VERSION, 5), (call::FC_API_VERSION ^ 0xFF) as i32);
        *sp.interrupt_runs.lock().unwrap() = 1;
        assert_eq!(r(&c, call::SC_VIRTIO_START, 1), 42);
        let targets = sp.run_targets.lock().unwrap().clone();
        assert_eq!(&targets[..2], &[(0x8000 << 16) | 2, (0x8000 << 16) | 2], "resumed on the interrupt's target");
        assert!(c.failure().is_none());
    }

    #[test]
    fn ffa_run_gives_time_to_the_calling_cpus_vcpu() {
        let sp = sp(0);
        let c = on(&sp).with_current_cpu(|| 3);
        assert_eq!(r(&c, call::SC_NOP, 0), SmError::NopDone.code());
        assert_eq!(sp.run_targets.lock().unwrap().as_slice(), &[(0x8000 << 16) | 3]);
        // A CPU Trusty's partition has no execution context for is refused, not sent.
        let c = on(&sp).with_current_cpu(|| 4);
        assert_eq!(r(&c, call::SC_NOP, 0), SmError::InternalFailure.code());
        assert_eq!(sp.run_targets.lock().unwrap().len(), 1);
    }

    #[test]
    fn ffa_run_interrupted_forever_means_not_finished_within_the_limit() {
        let (sp, c) = conduit(0);
        *sp.interrupt_runs.lock().unwrap() = u32::MAX;
        assert_eq!(r(&c, call::SC_VIRTIO_START, 1), SmError::Interrupted.code());
        assert_eq!(r(&c, call::SC_NOP, 0), SmError::NopInterrupted.code());
        assert!(sp.clock.now_ns() <= 3 * (LIMIT_MS + 2) * 1_000_000);
        assert!(c.failure().is_none(), "running Trusty longer is always allowed");
    }

    #[test]
    fn direct_request_interrupted_forever_fails_the_transport_for_good() {
        use crate::trusty::{CallPolicy, Trusty};
        let sp = sp(0);
        *sp.interrupt_requests.lock().unwrap() = u32::MAX;
        *sp.interrupt_runs.lock().unwrap() = u32::MAX;
        let c = Arc::new(on(&sp));
        let mut t = Trusty::new(c.clone(), sp.clock.clone(), CallPolicy::default());
        assert_eq!(t.std_call(call::SC_VIRTIO_START, 1, 0, 0), Err(Error::TransportFailed(INTERRUPTED_REQUEST)));
        assert!(sp.clock.now_ns() <= (LIMIT_MS + 2) * 1_000_000);
        let sent = sp.log.lock().unwrap().len();
        // Nothing goes out again: not a fresh call, not a NOP, not a fast call.
        assert_eq!(t.std_call(call::SC_VIRTIO_STOP, 1, 0, 0), Err(Error::TransportFailed(INTERRUPTED_REQUEST)));
        assert_eq!(t.nop(0, 0, 0), Err(Error::TransportFailed(INTERRUPTED_REQUEST)));
        assert_eq!(t.fast_call(call::FC_API_VERSION, 5, 0, 0), Err(Error::TransportFailed(INTERRUPTED_REQUEST)));
        assert_eq!(sp.log.lock().unwrap().len(), sent);
    }
}
