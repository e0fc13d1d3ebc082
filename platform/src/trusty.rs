//! Trusty's call discipline on top of a [`Conduit`] (spec §2.4-§2.6).

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::clock::{Clock, Deadline, NS_PER_MS};
use crate::smc::{api, call, result32, Conduit, SmError};
use crate::Error;

/// Limits on how long the discipline keeps retrying. Trusty's own driver retries BUSY forever;
/// this stack states a limit instead, so that a wedged secure side becomes an error.
#[derive(Clone, Copy, Debug)]
pub struct CallPolicy {
    /// BUSY answers retried at once before backing off (spec §2.5 rule 4: 5).
    pub busy_immediate_retries: u32,
    /// Upper bound of the doubling BUSY backoff, in ms (spec §2.5 rule 4: about 1 s).
    pub busy_backoff_max_ms: u64,
    /// Total time one standard call may take, restarts and BUSY retries included.
    pub std_call_timeout_ms: u64,
    /// How long a CPU_IDLE call waits for NOP progress before giving up (spec §2.5 rule 6: 10 s).
    pub cpu_idle_timeout_ms: u64,
}

impl Default for CallPolicy {
    fn default() -> Self {
        CallPolicy {
            busy_immediate_retries: 5,
            busy_backoff_max_ms: 1000,
            std_call_timeout_ms: 30_000,
            cpu_idle_timeout_ms: 10_000,
        }
    }
}

/// Counters of what crossed into the secure side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Every call instruction issued (each return is a reason to rescan the rings, spec §4).
    pub smcs: u64,
    pub fast_calls: u64,
    pub std_calls: u64,
    pub nop_calls: u64,
    pub busy_retries: u64,
    pub restart_last: u64,
    pub restart_fiq: u64,
}

/// The normal world's side of Trusty's call discipline. `&mut self` on every call serialises
/// standard calls, as spec §2.5 rule 1 requires (NOPs are serialised too, which is allowed).
pub struct Trusty {
    conduit: Arc<dyn Conduit>,
    clock: Arc<dyn Clock>,
    policy: CallPolicy,
    api_version: u32,
    panicked: bool,
    stats: CallStats,
}

impl Trusty {
    /// A discipline over `conduit`; the API version is 0 until [`Trusty::negotiate_api`].
    pub fn new(conduit: Arc<dyn Conduit>, clock: Arc<dyn Clock>, policy: CallPolicy) -> Self {
        Trusty { conduit, clock, policy, api_version: 0, panicked: false, stats: CallStats::default() }
    }

    /// The negotiated API version (0 before negotiation).
    pub fn api_version(&self) -> u32 {
        self.api_version
    }

    /// Whether Trusty has reported a panic.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    pub fn stats(&self) -> CallStats {
        self.stats
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn conduit(&self) -> &Arc<dyn Conduit> {
        &self.conduit
    }

    fn raw(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> i32 {
        self.stats.smcs += 1;
        let regs = [u64::from(fid), u64::from(a0), u64::from(a1), u64::from(a2), 0, 0, 0, 0];
        let result = result32(&self.conduit.call(regs));
        if result == SmError::Panic.code() {
            log::error!("Trusty panicked (call {fid:#x})");
            self.panicked = true;
        }
        result
    }

    fn check_alive(&self) -> Result<(), Error> {
        if self.panicked {
            Err(Error::TrustyPanicked)
        } else {
            Ok(())
        }
    }

    /// A fast call; returns the raw result word, which some calls use for values that look
    /// negative (e.g. 0xFFFFFFFF for "not supported").
    pub fn fast_call(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> Result<i32, Error> {
        self.check_alive()?;
        self.stats.fast_calls += 1;
        let r = self.raw(fid, a0, a1, a2);
        if self.panicked {
            return Err(Error::Sm(SmError::Panic));
        }
        Ok(r)
    }

    /// A standard call with the retry rules of spec §2.5: FIQ_INTERRUPTED -> RESTART_FIQ,
    /// INTERRUPTED -> RESTART_LAST, CPU_IDLE -> donate time with NOPs then RESTART_LAST,
    /// BUSY -> the same call again (5 times at once, then with a doubling backoff), PANIC sticky.
    /// Returns the non-negative result, or the error Trusty answered.
    pub fn std_call(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> Result<u32, Error> {
        self.check_alive()?;
        self.stats.std_calls += 1;
        let deadline = Deadline::after_ms(&*self.clock, self.policy.std_call_timeout_ms);
        let mut busy_retries = 0u32;
        let mut backoff_ms = 1u64;
        loop {
            let mut r = self.raw(fid, a0, a1, a2);
            loop {
                r = match SmError::from_code(r) {
                    Some(SmError::FiqInterrupted) => {
                        self.stats.restart_fiq += 1;
                        self.raw(call::SC_RESTART_FIQ, 0, 0, 0)
                    }
                    Some(SmError::Interrupted) => {
                        self.stats.restart_last += 1;
                        self.expire_check(&deadline, "an interrupted standard call")?;
                        self.raw(call::SC_RESTART_LAST, 0, 0, 0)
                    }
                    Some(SmError::CpuIdle) => {
                        self.wait_for_nop_progress()?;
                        self.stats.restart_last += 1;
                        self.raw(call::SC_RESTART_LAST, 0, 0, 0)
                    }
                    _ => break,
                };
            }
            match SmError::from_code(r) {
                None => return Ok(r as u32),
                Some(SmError::Busy) => {
                    self.stats.busy_retries += 1;
                    self.expire_check(&deadline, "a busy secure side")?;
                    busy_retries += 1;
                    if busy_retries > self.policy.busy_immediate_retries {
                        self.clock.sleep_ns(backoff_ms * NS_PER_MS);
                        backoff_ms = (backoff_ms * 2).min(self.policy.busy_backoff_max_ms.max(1));
                    }
                }
                Some(SmError::Panic) => return Err(Error::Sm(SmError::Panic)),
                Some(e) => return Err(Error::Sm(e)),
            }
        }
    }

    fn expire_check(&self, deadline: &Deadline, what: &'static str) -> Result<(), Error> {
        if deadline.expired(&*self.clock) {
            Err(Error::Timeout { what })
        } else {
            Ok(())
        }
    }

    /// CPU_IDLE: the standard call is blocked inside Trusty; give it CPU time with NOPs until one
    /// completes (spec §2.5 rule 6).
    fn wait_for_nop_progress(&mut self) -> Result<(), Error> {
        let deadline = Deadline::after_ms(&*self.clock, self.policy.cpu_idle_timeout_ms);
        loop {
            match self.nop_inner(0, 0, 0) {
                Ok(()) => return Ok(()),
                Err(Error::Sm(SmError::Panic)) => return Err(Error::Sm(SmError::Panic)),
                Err(_) if !deadline.expired(&*self.clock) => self.clock.relax(),
                Err(_) => return Err(Error::Timeout { what: "NOP progress after CPU_IDLE" }),
            }
        }
    }

    /// A NOP call: donates CPU time to Trusty, optionally carrying work for an entity in `a0`
    /// (spec §2.6). Repeats while Trusty reports NOP_INTERRUPTED. Before API 2 it is the
    /// serialised SMC_SC_LOCKED_NOP.
    pub fn nop(&mut self, a0: u32, a1: u32, a2: u32) -> Result<(), Error> {
        self.check_alive()?;
        if self.api_version < api::SMP {
            return self.std_call(call::SC_LOCKED_NOP, 0, 0, 0).map(|_| ());
        }
        self.nop_inner(a0, a1, a2)
    }

    fn nop_inner(&mut self, a0: u32, a1: u32, a2: u32) -> Result<(), Error> {
        self.stats.nop_calls += 1;
        let deadline = Deadline::after_ms(&*self.clock, self.policy.std_call_timeout_ms);
        let mut args = (a0, a1, a2);
        loop {
            let r = self.raw(call::SC_NOP, args.0, args.1, args.2);
            match SmError::from_code(r) {
                None | Some(SmError::NopDone) => return Ok(()),
                Some(SmError::NopInterrupted) => {
                    // The work item was taken; more calls only donate time (spec §2.6).
                    args = (0, 0, 0);
                    self.expire_check(&deadline, "an interrupted NOP")?;
                }
                Some(e) => return Err(Error::Sm(e)),
            }
        }
    }

    /// Negotiates the API version (spec §2.4): asks for `wanted`, reads 0xFFFFFFFF as version 0
    /// and rejects an answer above what was asked.
    pub fn negotiate_api(&mut self, wanted: u32) -> Result<u32, Error> {
        let r = self.fast_call(call::FC_API_VERSION, wanted, 0, 0)? as u32;
        let got = if r == u32::MAX { 0 } else { r };
        if got > wanted {
            return Err(Error::BadApiVersion { asked: wanted, got });
        }
        self.api_version = got;
        Ok(got)
    }

    /// Reads Trusty's version string character by character (spec §2.2 GET_VERSION_STR).
    pub fn version_string(&mut self) -> Result<String, Error> {
        /// Longer answers are not a version string; refuse them rather than loop for long.
        const MAX_LEN: i32 = 1024;
        let len = self.fast_call(call::FC_GET_VERSION_STR, u32::MAX, 0, 0)?;
        if !(0..=MAX_LEN).contains(&len) {
            return Err(Error::Sm(SmError::from_code(len).unwrap_or(SmError::Other(len))));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        for i in 0..len {
            let c = self.fast_call(call::FC_GET_VERSION_STR, i as u32, 0, 0)?;
            match u8::try_from(c) {
                Ok(b) => bytes.push(b),
                Err(_) => return Err(Error::Sm(SmError::from_code(c).unwrap_or(SmError::Other(c)))),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::vec;

    /// A conduit that answers from a script and records the calls.
    struct Scripted {
        answers: Mutex<Vec<i32>>,
        calls: Mutex<Vec<u32>>,
    }
    impl Scripted {
        fn new(answers: &[i32]) -> Arc<Self> {
            let mut a = answers.to_vec();
            a.reverse();
            Arc::new(Scripted { answers: Mutex::new(a), calls: Mutex::new(Vec::new()) })
        }
        fn calls(&self) -> Vec<u32> {
            self.calls.lock().unwrap().clone()
        }
    }
    impl Conduit for Scripted {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            self.calls.lock().unwrap().push(regs[0] as u32);
            let r = self.answers.lock().unwrap().pop().unwrap_or(0);
            [r as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
        }
    }
    struct FakeClock(AtomicU64);
    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn sleep_ns(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
        fn relax(&self) {
            self.0.fetch_add(1000, Ordering::SeqCst);
        }
    }
    fn trusty(c: &Arc<Scripted>) -> Trusty {
        let mut t = Trusty::new(c.clone(), Arc::new(FakeClock(AtomicU64::new(0))), CallPolicy::default());
        t.api_version = 5;
        t
    }
    const F: u32 = call::SC_VIRTIO_START;

    #[test]
    fn fiq_then_interrupted_then_result() {
        let c = Scripted::new(&[-12, -3, 7]);
        let mut t = trusty(&c);
        assert_eq!(t.std_call(F, 1, 2, 3), Ok(7));
        assert_eq!(c.calls(), vec![F, call::SC_RESTART_FIQ, call::SC_RESTART_LAST]);
    }

    #[test]
    fn busy_retries_the_original_call() {
        let c = Scripted::new(&[-5, -5, -5, -5, -5, -5, -5, 0]);
        let mut t = trusty(&c);
        assert_eq!(t.std_call(F, 1, 2, 3), Ok(0));
        assert!(c.calls().iter().all(|&f| f == F));
        assert_eq!(t.stats().busy_retries, 7);
    }

    #[test]
    fn busy_forever_times_out() {
        let c = Scripted::new(&[-5; 10_000]);
        let mut t = trusty(&c);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(Error::Timeout { what: "a busy secure side" }));
    }

    #[test]
    fn cpu_idle_donates_time_then_restarts() {
        let c = Scripted::new(&[-13, -14, -15, 4]);
        let mut t = trusty(&c);
        assert_eq!(t.std_call(F, 0, 0, 0), Ok(4));
        assert_eq!(c.calls(), vec![F, call::SC_NOP, call::SC_NOP, call::SC_RESTART_LAST]);
    }

    #[test]
    fn panic_is_sticky() {
        let c = Scripted::new(&[-11]);
        let mut t = trusty(&c);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(Error::Sm(SmError::Panic)));
        assert!(t.panicked());
        assert_eq!(t.nop(0, 0, 0), Err(Error::TrustyPanicked));
        assert_eq!(t.fast_call(call::FC_API_VERSION, 5, 0, 0), Err(Error::TrustyPanicked));
        assert_eq!(c.calls().len(), 1);
    }

    #[test]
    fn api_negotiation_rules() {
        let c = Scripted::new(&[-1]);
        let mut t = trusty(&c);
        assert_eq!(t.negotiate_api(5), Ok(0));
        let c = Scripted::new(&[6]);
        let mut t = trusty(&c);
        assert_eq!(t.negotiate_api(5), Err(Error::BadApiVersion { asked: 5, got: 6 }));
        let c = Scripted::new(&[3]);
        let mut t = trusty(&c);
        assert_eq!(t.negotiate_api(5), Ok(3));
        assert_eq!(t.api_version(), 3);
    }

    #[test]
    fn version_string_read_char_by_char_and_bounded() {
        let c = Scripted::new(&[2, b'o' as i32, b'k' as i32]);
        let mut t = trusty(&c);
        assert_eq!(t.version_string().as_deref(), Ok("ok"));
        let c = Scripted::new(&[1_000_000]);
        let mut t = trusty(&c);
        assert!(t.version_string().is_err());
        let c = Scripted::new(&[3, b'a' as i32, -2]);
        let mut t = trusty(&c);
        assert_eq!(t.version_string(), Err(Error::Sm(SmError::InvalidParameters)));
    }

    #[test]
    fn locked_nop_before_api_2() {
        let c = Scripted::new(&[0]);
        let mut t = trusty(&c);
        t.api_version = 1;
        assert_eq!(t.nop(0, 0, 0), Ok(()));
        assert_eq!(c.calls(), vec![call::SC_LOCKED_NOP]);
    }
}
