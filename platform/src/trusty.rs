//! Trusty's call discipline on top of a [`Conduit`] (spec §2.4-§2.6), as Linux's
//! drivers/trusty/trusty.c does it, with stated limits where Linux waits forever.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::clock::{Clock, Deadline, NS_PER_MS};
use crate::smc::{api, call, result32, Conduit, SmError};
use crate::Error;

/// The limit of one call's loops. `After(ms)` reads the clock only when a loop first has to
/// check it, so a NOP that Trusty finishes at once costs no clock read; the limit then counts
/// from that first check, later than the call's start by at most one call.
#[derive(Clone, Copy)]
enum Limit {
    At(Deadline),
    After(u64),
}

impl Limit {
    fn deadline(&mut self, clock: &dyn Clock) -> Deadline {
        match *self {
            Limit::At(d) => d,
            Limit::After(ms) => {
                let d = Deadline::after_ms(clock, ms);
                *self = Limit::At(d);
                d
            }
        }
    }
}

/// Limits on how long the discipline keeps retrying. Trusty's own driver retries BUSY forever;
/// this stack states a limit instead, so that a wedged secure side becomes an error.
#[derive(Clone, Copy, Debug)]
pub struct CallPolicy {
    /// BUSY answers retried at once before backing off (spec §2.5 rule 4: 5).
    pub busy_immediate_retries: u32,
    /// Upper bound of the doubling BUSY backoff, in ms (spec §2.5 rule 4: about 1 s).
    pub busy_backoff_max_ms: u64,
    /// Total time one standard call may take, restarts, FIQ restarts, CPU_IDLE waits and BUSY
    /// retries included. When it runs out while Trusty holds the call, the call stays pending
    /// and is collected before the next standard call (see [`Trusty::std_call`]).
    pub std_call_timeout_ms: u64,
    /// How long a CPU_IDLE call donates NOPs waiting for one to complete before it restarts
    /// anyway (Linux `trusty_std_call_cpu_idle`: 10 s, then a warning and a restart).
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
    /// Fast calls.
    pub fast_calls: u64,
    /// Standard calls.
    pub std_calls: u64,
    /// NOP calls.
    pub nop_calls: u64,
    /// Retries after SM_ERR_BUSY.
    pub busy_retries: u64,
    /// SMC_SC_RESTART_LAST calls after an interruption.
    pub restart_last: u64,
    /// SMC_SC_RESTART_FIQ calls after a FIQ.
    pub restart_fiq: u64,
    /// Standard calls left pending by a timeout and collected later (their result discarded).
    pub collected_late: u64,
}

/// What answers a standard call next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// The call itself: Trusty has not taken it (not issued yet, or answered BUSY).
    Call,
    /// SMC_SC_RESTART_LAST: Trusty took the call and owes its result.
    RestartLast,
}

/// A standard call on its way through Trusty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StdCall {
    fid: u32,
    args: [u32; 3],
    next: Next,
    /// The last answer was SM_ERR_FIQ_INTERRUPTED: SMC_SC_RESTART_FIQ must come next, before
    /// anything else (Trusty `sm_handle_fiq` answers every other call SM_ERR_INTERLEAVED_SMC).
    fiq: bool,
}

impl StdCall {
    /// Whether Trusty may hold the call (or owes a RESTART_FIQ for it).
    fn owed(&self) -> bool {
        self.fiq || self.next == Next::RestartLast
    }
}

/// Where a standard call left by a timeout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingCall {
    /// The function id of the call Trusty holds.
    pub fid: u32,
    /// SMC_SC_RESTART_FIQ is owed before anything else.
    pub restart_fiq_owed: bool,
}

/// What one answer means for a standard call.
enum Step {
    /// The call ended: its result, or the error Trusty answered.
    Done(Result<u32, Error>),
    /// Call again (RESTART_FIQ, RESTART_LAST or the call itself, as `StdCall` now says).
    Again,
    /// BUSY: call the same thing again after a backoff.
    Busy,
    /// CPU_IDLE: give Trusty CPU time with NOPs, then RESTART_LAST.
    Idle,
}

const WHAT_BUSY: &str = "a busy secure side";
const WHAT_PENDING: &str =
    "a standard call Trusty took and has not finished (it stays pending and is collected with RESTART_LAST before the next standard call)";
const WHAT_FIQ: &str = "SMC_SC_RESTART_FIQ after SM_ERR_FIQ_INTERRUPTED (owed before the next call)";
const WHAT_NOP: &str = "an interrupted NOP";

/// The normal world's side of Trusty's call discipline. `&mut self` on every call serialises
/// standard calls, as spec §2.5 rule 1 requires (NOPs are serialised too, which is allowed).
///
/// A standard call is never abandoned. Linux (`trusty_std_call32`) holds its `smc_lock` and
/// loops on RESTART_LAST until the call ends, so no fresh standard call can reach Trusty while
/// one is pending; Trusty itself answers BUSY to a fresh one until the pending one is collected
/// (`sm_queue_stdcall`). This stack states limits instead of waiting forever, so when a limit
/// fires while Trusty holds the call, [`Trusty::std_call`] returns [`Error::Timeout`] and
/// *keeps the call pending*: the next standard call first collects it with RESTART_LAST
/// (within its own limit, the late result is logged and discarded), and only then issues the
/// fresh call. That is Linux's order of events, with the wait cut into bounded pieces. We chose
/// this over declaring the device failed because a slow Trusty (a long CPU_IDLE, a descheduled
/// VM) recovers; a dead one keeps timing out, and never sees a fresh call.
pub struct Trusty {
    conduit: Arc<dyn Conduit>,
    clock: Arc<dyn Clock>,
    policy: CallPolicy,
    api_version: u32,
    panicked: bool,
    stats: CallStats,
    /// A standard call Trusty holds (or owes a RESTART_FIQ for) after a timeout.
    pending: Option<StdCall>,
    /// A NOP was answered FIQ_INTERRUPTED and the limit ran out: RESTART_FIQ is owed.
    nop_fiq_owed: bool,
    /// The conduit said it can carry no further call ([`Conduit::failure`]).
    transport_failed: Option<&'static str>,
}

impl Trusty {
    /// A discipline over `conduit`; the API version is 0 until [`Trusty::negotiate_api`].
    pub fn new(conduit: Arc<dyn Conduit>, clock: Arc<dyn Clock>, policy: CallPolicy) -> Self {
        Trusty {
            conduit,
            clock,
            policy,
            api_version: 0,
            panicked: false,
            stats: CallStats::default(),
            pending: None,
            nop_fiq_owed: false,
            transport_failed: None,
        }
    }

    /// The negotiated API version (0 before negotiation).
    pub fn api_version(&self) -> u32 {
        self.api_version
    }

    /// Whether Trusty has reported a panic.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// The counters so far.
    pub fn stats(&self) -> CallStats {
        self.stats
    }

    /// The clock every wait uses.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The conduit the calls go through.
    pub fn conduit(&self) -> &Arc<dyn Conduit> {
        &self.conduit
    }

    /// The standard call a timeout left in Trusty's hands, if any. Memory that call refers to
    /// may still be used by Trusty: it must not be freed (the bus leaks it instead).
    pub fn pending_call(&self) -> Option<PendingCall> {
        self.pending.map(|c| PendingCall { fid: c.fid, restart_fiq_owed: c.fiq })
    }

    /// One secure call; notes a failed transport or a Trusty panic. Out of line: shared by
    /// every call but the common NOP's ([`Trusty::raw_inline`]).
    #[inline(never)]
    fn raw(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> i32 {
        self.raw_inline(fid, a0, a1, a2)
    }

    /// [`Trusty::raw`], inlined where a call saves a NOP (a kick, a pump) its cost; the rare
    /// outcomes are out of line.
    #[inline(always)]
    fn raw_inline(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> i32 {
        self.stats.smcs += 1;
        let regs = [u64::from(fid), u64::from(a0), u64::from(a1), u64::from(a2), 0, 0, 0, 0];
        let result = result32(&self.conduit.call(regs));
        let failure = self.conduit.failure();
        if failure.is_some() || result == SmError::Panic.code() {
            self.note_trouble(fid, result, failure);
        }
        result
    }

    /// After a call: the transport failed (`failure`), or Trusty panicked (`result`).
    #[cold]
    #[inline(never)]
    fn note_trouble(&mut self, fid: u32, result: i32, failure: Option<&'static str>) {
        if let Some(why) = failure {
            if self.transport_failed.is_none() {
                log::error!("call {fid:#x}: {why}");
            }
            self.transport_failed = Some(why);
        }
        if result == SmError::Panic.code() {
            log::error!("Trusty panicked (call {fid:#x})");
            self.panicked = true;
            self.pending = None;
            self.nop_fiq_owed = false;
        }
    }

    fn check_alive(&self) -> Result<(), Error> {
        if let Some(why) = self.transport_failed {
            Err(Error::TransportFailed(why))
        } else if self.panicked {
            Err(Error::TrustyPanicked)
        } else {
            Ok(())
        }
    }

    /// After a call: a failed transport ends everything, whatever the answer said.
    fn check_transport(&self) -> Result<(), Error> {
        match self.transport_failed {
            Some(why) => Err(Error::TransportFailed(why)),
            None => Ok(()),
        }
    }

    /// A fast call; returns the raw result word, which some calls use for values that look
    /// negative (e.g. 0xFFFFFFFF for "not supported"). Fast calls may be made while a standard
    /// call is pending or a RESTART_FIQ is owed: Trusty runs them inline (`sm_sched_nonsecure_fiq_loop`).
    // Out of line: shared by its callers, and the secure call it makes dwarfs a call.
    #[inline(never)]
    pub fn fast_call(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> Result<i32, Error> {
        self.check_alive()?;
        self.stats.fast_calls += 1;
        let r = self.raw(fid, a0, a1, a2);
        self.check_transport()?;
        if self.panicked {
            return Err(Error::Sm(SmError::Panic));
        }
        Ok(r)
    }

    /// A standard call with the rules of spec §2.5, as Linux's `trusty_std_call32` /
    /// `trusty_std_call_helper` apply them: FIQ_INTERRUPTED -> RESTART_FIQ; INTERRUPTED ->
    /// RESTART_LAST; CPU_IDLE -> donate time with NOPs, then RESTART_LAST; BUSY -> the same
    /// thing again (the original call, or RESTART_LAST when BUSY answered a restart: Trusty
    /// answers BUSY to a restarted call that has not finished at API < 2, `sm_get_stdcall_ret`),
    /// 5 times at once, then with a doubling backoff; PANIC is sticky.
    ///
    /// Every one of those loops is bounded by [`CallPolicy::std_call_timeout_ms`]. A call left
    /// pending by an earlier timeout is collected first (see [`Trusty`]); if that does not end
    /// within this call's limit, this call fails with [`Error::Timeout`] without being issued.
    pub fn std_call(&mut self, fid: u32, a0: u32, a1: u32, a2: u32) -> Result<u32, Error> {
        self.check_alive()?;
        let deadline = Deadline::after_ms(&*self.clock, self.policy.std_call_timeout_ms);
        self.settle_nop_fiq(&mut Limit::At(deadline))?;
        // A call whose FIQ restart is owed is settled first: answered BUSY it was never taken
        // and is dropped (never re-issued); otherwise it is left for RESTART_LAST below.
        self.settle_std_fiq(&mut Limit::At(deadline))?;
        if let Some(old) = self.pending {
            log::warn!("collecting standard call {:#x} left pending by a timeout before issuing {fid:#x}", old.fid);
            match self.run_std(old, &deadline) {
                Ok(r) => log::warn!("late result of standard call {:#x}: {r:#x} (discarded)", old.fid),
                Err(Error::Timeout { what }) => return Err(Error::Timeout { what }),
                Err(e) => log::warn!("late result of standard call {:#x}: {e} (discarded)", old.fid),
            }
            self.stats.collected_late += 1;
            self.check_alive()?;
        }
        self.stats.std_calls += 1;
        self.run_std(StdCall { fid, args: [a0, a1, a2], next: Next::Call, fiq: false }, &deadline)
    }

    /// What one answer `r` means for `c`, updating where `c` stands.
    fn step(c: &mut StdCall, r: i32) -> Step {
        let e = SmError::from_code(r);
        c.fiq = e == Some(SmError::FiqInterrupted);
        match e {
            None => Step::Done(Ok(r as u32)),
            Some(SmError::FiqInterrupted) => Step::Again,
            Some(SmError::Interrupted) => {
                c.next = Next::RestartLast;
                Step::Again
            }
            Some(SmError::CpuIdle) => {
                c.next = Next::RestartLast;
                Step::Idle
            }
            // Linux passes SMC_SC_RESTART_LAST itself into its BUSY loop: BUSY repeats whatever
            // was answered BUSY (`next` is unchanged).
            Some(SmError::Busy) => Step::Busy,
            Some(e) => Step::Done(Err(Error::Sm(e))),
        }
    }

    /// Drives `c` until Trusty ends it or `deadline` passes; `self.pending` always says where
    /// the call stands, so a timeout leaves it recorded.
    fn run_std(&mut self, mut c: StdCall, deadline: &Deadline) -> Result<u32, Error> {
        let mut busy_retries = 0u32;
        let mut backoff_ms = 1u64;
        loop {
            let r = if c.fiq {
                self.stats.restart_fiq += 1;
                self.raw(call::SC_RESTART_FIQ, 0, 0, 0)
            } else if c.next == Next::RestartLast {
                self.stats.restart_last += 1;
                self.raw(call::SC_RESTART_LAST, 0, 0, 0)
            } else {
                self.raw(c.fid, c.args[0], c.args[1], c.args[2])
            };
            let step = Self::step(&mut c, r);
            if self.panicked {
                return Err(Error::Sm(SmError::Panic));
            }
            self.pending = c.owed().then_some(c);
            self.check_transport()?;
            let what = if c.fiq {
                WHAT_FIQ
            } else if c.next == Next::RestartLast {
                WHAT_PENDING
            } else {
                WHAT_BUSY
            };
            match step {
                Step::Done(result) => {
                    self.pending = None;
                    return result;
                }
                Step::Again => self.expire_check(deadline, what)?,
                Step::Busy => {
                    self.stats.busy_retries += 1;
                    self.expire_check(deadline, what)?;
                    busy_retries += 1;
                    if busy_retries > self.policy.busy_immediate_retries {
                        self.sleep_before(deadline, backoff_ms);
                        backoff_ms = (backoff_ms * 2).min(self.policy.busy_backoff_max_ms.max(1));
                    }
                }
                Step::Idle => {
                    self.expire_check(deadline, what)?;
                    // Trusty's call is blocked: pause before donating time again, so a peer
                    // that answers CPU_IDLE for ever is not met with a hot loop of calls.
                    self.clock.relax();
                    self.wait_for_nop_progress(deadline)?;
                }
            }
        }
    }

    /// Sleeps `ms`, but not past `deadline`.
    fn sleep_before(&self, deadline: &Deadline, ms: u64) {
        let ns = (ms * NS_PER_MS).min(deadline.remaining_ns(&*self.clock));
        if ns > 0 {
            self.clock.sleep_ns(ns);
        }
    }

    // Out of line: checked once per call step, each of which is a world switch.
    #[inline(never)]
    fn expire_limit(&self, limit: &mut Limit, what: &'static str) -> Result<(), Error> {
        let deadline = limit.deadline(&*self.clock);
        self.expire_check(&deadline, what)
    }

    fn expire_check(&self, deadline: &Deadline, what: &'static str) -> Result<(), Error> {
        if deadline.expired(&*self.clock) {
            Err(timed_out(what))
        } else {
            Ok(())
        }
    }

    /// CPU_IDLE: the standard call is blocked inside Trusty; give it CPU time with NOPs until
    /// one completes (spec §2.5 rule 6). Like Linux's `trusty_std_call_cpu_idle`, a wait that
    /// sees no NOP complete within [`CallPolicy::cpu_idle_timeout_ms`] warns and lets the caller
    /// restart anyway; only the overall `deadline` (or a panic) ends it with an error.
    fn wait_for_nop_progress(&mut self, deadline: &Deadline) -> Result<(), Error> {
        let idle = Deadline::after_ms(&*self.clock, self.policy.cpu_idle_timeout_ms).min(*deadline);
        loop {
            match self.nop_inner::<false>(0, 0, 0, &mut Limit::At(idle)) {
                Ok(()) => return Ok(()),
                Err(e @ (Error::Sm(SmError::Panic) | Error::TransportFailed(_))) => return Err(e),
                Err(_) if !idle.expired(&*self.clock) => self.clock.relax(),
                Err(_) => {
                    self.expire_check(deadline, WHAT_PENDING)?;
                    log::warn!("no NOP completed within {} ms after CPU_IDLE; restarting anyway", self.policy.cpu_idle_timeout_ms);
                    return Ok(());
                }
            }
        }
    }

    /// A NOP call: donates CPU time to Trusty, optionally carrying work for an entity in `a0`
    /// (spec §2.6). Repeats while Trusty reports NOP_INTERRUPTED, and follows FIQ_INTERRUPTED
    /// with RESTART_FIQ as Linux's `trusty_std_call_inner` does for every standard call (NOPs
    /// included). Before API 2 it is the serialised SMC_SC_LOCKED_NOP.
    #[inline]
    pub fn nop(&mut self, a0: u32, a1: u32, a2: u32) -> Result<(), Error> {
        self.check_alive()?;
        if self.api_version < api::SMP {
            return self.std_call(call::SC_LOCKED_NOP, 0, 0, 0).map(|_| ());
        }
        // The clock is read only if Trusty does not finish the NOP at once: the common NOP
        // (a kick, a pump) costs no clock read.
        self.nop_inner::<true>(a0, a1, a2, &mut Limit::After(self.policy.std_call_timeout_ms))
    }

    /// Issues whatever RESTART_FIQ is owed (a NOP's, or a pending standard call's) before a
    /// NOP or a standard call goes out.
    // Out of line: shared by its callers, and the secure call it makes dwarfs a call.
    #[inline(never)]
    fn settle_nop_fiq(&mut self, deadline: &mut Limit) -> Result<(), Error> {
        while self.nop_fiq_owed {
            self.stats.restart_fiq += 1;
            let r = self.raw(call::SC_RESTART_FIQ, 0, 0, 0);
            self.check_alive()?;
            if r != SmError::FiqInterrupted.code() {
                // The interrupted NOP's own answer: nothing waits for it.
                self.nop_fiq_owed = false;
            } else {
                self.expire_limit(deadline, WHAT_FIQ)?;
            }
        }
        Ok(())
    }

    fn settle_std_fiq(&mut self, deadline: &mut Limit) -> Result<(), Error> {
        while let Some(mut c) = self.pending.filter(|c| c.fiq) {
            self.stats.restart_fiq += 1;
            let r = self.raw(call::SC_RESTART_FIQ, 0, 0, 0);
            self.check_alive()?;
            let step = Self::step(&mut c, r);
            self.pending = c.owed().then_some(c);
            match step {
                Step::Done(result) => {
                    log::warn!("late result of standard call {:#x}: {result:?} (discarded)", c.fid);
                    self.stats.collected_late += 1;
                }
                Step::Again => self.expire_limit(deadline, WHAT_FIQ)?,
                // A BUSY original call was never taken; a BUSY or CPU_IDLE restart stays pending
                // for the next standard call to collect.
                Step::Busy | Step::Idle => {}
            }
        }
        Ok(())
    }

    /// The NOP itself: whatever RESTART_FIQ is owed first, then SMC_SC_NOP. Inline: on the
    /// common path (nothing owed, Trusty done at once) it is one call of `raw` and two checks;
    /// every other answer goes on in [`Trusty::nop_rest`]. `INLINE_CALL`: the secure call is
    /// inlined too ([`Trusty::raw_inline`]), for [`Trusty::nop`] (every kick and pump), not for
    /// the CPU_IDLE wait's NOPs (a standard call's slow path: one out-of-line copy is enough).
    #[inline]
    fn nop_inner<const INLINE_CALL: bool>(
        &mut self,
        a0: u32,
        a1: u32,
        a2: u32,
        deadline: &mut Limit,
    ) -> Result<(), Error> {
        // Checked inline: nothing is owed on the common path (a kick, a pump).
        if self.nop_fiq_owed || self.pending.is_some_and(|c| c.fiq) {
            self.settle_nop_fiq(deadline)?;
            self.settle_std_fiq(deadline)?;
        }
        self.stats.nop_calls += 1;
        let r =
            if INLINE_CALL { self.raw_inline(call::SC_NOP, a0, a1, a2) } else { self.raw(call::SC_NOP, a0, a1, a2) };
        self.check_transport()?;
        // Done: no error code (`SmError::from_code` is None), or NOP_DONE.
        if r >= 0 || r == SmError::NopDone.code() {
            return Ok(());
        }
        self.nop_rest(r, deadline)
    }

    /// A NOP answered `r`, which did not end it: FIQ_INTERRUPTED is followed by RESTART_FIQ
    /// (until another answer), NOP_INTERRUPTED by further NOPs without the work item (spec
    /// §2.6), each retry bounded by `deadline`; any other error ends it.
    // Out of line: the rare answers of a NOP, shared by both of its callers.
    #[inline(never)]
    fn nop_rest(&mut self, r: i32, deadline: &mut Limit) -> Result<(), Error> {
        let mut r = SmError::from_code(r);
        loop {
            while r == Some(SmError::FiqInterrupted) {
                self.nop_fiq_owed = true;
                self.expire_limit(deadline, WHAT_FIQ)?;
                self.stats.restart_fiq += 1;
                r = SmError::from_code(self.raw(call::SC_RESTART_FIQ, 0, 0, 0));
                self.check_transport()?;
                self.nop_fiq_owed = false;
            }
            match r {
                None | Some(SmError::NopDone) => return Ok(()),
                Some(SmError::NopInterrupted) => {
                    // The work item was taken; more calls only donate time (spec §2.6).
                    self.expire_limit(deadline, WHAT_NOP)?;
                    r = SmError::from_code(self.raw(call::SC_NOP, 0, 0, 0));
                    self.check_transport()?;
                }
                Some(e) => return Err(Error::Sm(e)),
            }
        }
    }

    /// Negotiates the API version (spec §2.4): asks for `wanted`, reads 0xFFFFFFFF
    /// (SM_ERR_UNDEFINED_SMC) as version 0 and rejects an answer above what was asked
    /// (Linux `trusty_init_api_version`).
    pub fn negotiate_api(&mut self, wanted: u32) -> Result<u32, Error> {
        let r = self.fast_call(call::FC_API_VERSION, wanted, 0, 0)?;
        // Any other monitor error (e.g. a transport that got no answer) is an error, not a
        // version number in the billions.
        if let Some(e) = SmError::from_code(r).filter(|e| !matches!(e, SmError::UndefinedSmc | SmError::Other(_))) {
            return Err(Error::Sm(e));
        }
        let r = r as u32;
        let got = if r == u32::MAX { 0 } else { r };
        if got > wanted {
            return Err(Error::BadApiVersion { asked: wanted, got });
        }
        self.api_version = got;
        Ok(got)
    }

    /// Reads Trusty's version string character by character (spec §2.2 GET_VERSION_STR).
    /// Linux's `trusty_init_version` only logs a failure of this call and goes on; callers
    /// should do the same (see `version_string_or_log`).
    pub fn version_string(&mut self) -> Result<String, Error> {
        /// Longer answers are not a version string; refuse them rather than loop for long.
        const MAX_LEN: i32 = 1024;
        let len = self.fast_call(call::FC_GET_VERSION_STR, u32::MAX, 0, 0)?;
        if !(0..=MAX_LEN).contains(&len) {
            return Err(answer_error(len));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        for i in 0..len {
            let c = self.fast_call(call::FC_GET_VERSION_STR, i as u32, 0, 0)?;
            match u8::try_from(c) {
                Ok(b) => bytes.push(b),
                Err(_) => return Err(answer_error(c)),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The version string, or `None` after logging why it could not be read: the string is
    /// optional, as in Linux's `trusty_init_version` (a failure is logged, probe goes on). A
    /// panic is still an error.
    pub fn version_string_or_log(&mut self) -> Result<Option<String>, Error> {
        match self.version_string() {
            Ok(v) => Ok(Some(v)),
            Err(e @ (Error::Sm(SmError::Panic) | Error::TrustyPanicked)) => Err(e),
            Err(e) => {
                log::warn!("failed to get Trusty's version string: {e}; going on without it");
                Ok(None)
            }
        }
    }
}

/// An answer that is not what the call returns, as the secure-monitor error it is (or an
/// unknown one). Cold and out of line: the version string's two checks share it.
#[cold]
#[inline(never)]
fn answer_error(code: i32) -> Error {
    Error::Sm(SmError::from_code(code).unwrap_or(SmError::Other(code)))
}

/// The error of a wait that ran out of time, logged once. Out of line and cold: the many
/// deadline checks inline only the comparison.
#[cold]
#[inline(never)]
fn timed_out(what: &'static str) -> Error {
    log::error!("timed out waiting for {what}");
    Error::Timeout { what }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::{AtomicU64, Ordering};
    use std::boxed::Box;
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
    const G: u32 = call::SC_VIRTIO_STOP;
    const RL: u32 = call::SC_RESTART_LAST;
    const RF: u32 = call::SC_RESTART_FIQ;
    const NOP: u32 = call::SC_NOP;

    type Rule = dyn FnMut(u32) -> i32 + Send;

    /// A peer that answers by rule, costs 1 ms of (fake) time per call, and stops a test that
    /// would otherwise never end: a discipline without a deadline makes it panic.
    struct Peer {
        rule: Mutex<Box<Rule>>,
        calls: Mutex<Vec<u32>>,
        clock: Arc<FakeClock>,
    }
    const CALL_CAP: usize = 200_000;
    impl Peer {
        fn new(clock: &Arc<FakeClock>, rule: impl FnMut(u32) -> i32 + Send + 'static) -> Arc<Self> {
            Arc::new(Peer { rule: Mutex::new(Box::new(rule)), calls: Mutex::new(Vec::new()), clock: clock.clone() })
        }
        fn set(&self, rule: impl FnMut(u32) -> i32 + Send + 'static) {
            *self.rule.lock().unwrap() = Box::new(rule);
        }
        fn calls(&self) -> Vec<u32> {
            self.calls.lock().unwrap().clone()
        }
        fn take_calls(&self) -> Vec<u32> {
            core::mem::take(&mut *self.calls.lock().unwrap())
        }
    }
    impl Conduit for Peer {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            let f = regs[0] as u32;
            let n = {
                let mut c = self.calls.lock().unwrap();
                c.push(f);
                c.len()
            };
            assert!(n < CALL_CAP, "the discipline never gave up (no deadline on this loop)");
            self.clock.0.fetch_add(NS_PER_MS, Ordering::SeqCst);
            let r = (self.rule.lock().unwrap())(f);
            [r as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
        }
    }
    fn with_peer(rule: impl FnMut(u32) -> i32 + Send + 'static) -> (Arc<Peer>, Arc<FakeClock>, Trusty) {
        let clock = Arc::new(FakeClock(AtomicU64::new(0)));
        let p = Peer::new(&clock, rule);
        let mut t = Trusty::new(p.clone(), clock.clone(), CallPolicy::default());
        t.api_version = 5;
        (p, clock, t)
    }
    fn secs(c: &FakeClock) -> u64 {
        c.0.load(Ordering::SeqCst) / 1_000_000_000
    }
    const PENDING: Error = Error::Timeout { what: WHAT_PENDING };
    const FIQ_OWED: Error = Error::Timeout { what: WHAT_FIQ };

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
        let c = Scripted::new(&[-7]);
        let mut t = trusty(&c);
        assert_eq!(t.negotiate_api(5), Err(Error::Sm(SmError::InternalFailure)));
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

    #[test]
    fn busy_answer_to_restart_last_retries_restart_last() {
        // Trusty at API < 2 answers BUSY to a restart of an unfinished call (sm_get_stdcall_ret).
        let mut n = 0;
        let (p, _, mut t) = with_peer(move |f| {
            n += 1;
            match (f, n) {
                (F, 1) => -3,
                (RL, 2..=4) => -5,
                (RL, _) => 9,
                _ => -5,
            }
        });
        assert_eq!(t.std_call(F, 1, 2, 3), Ok(9));
        assert_eq!(p.calls(), vec![F, RL, RL, RL, RL], "BUSY to RESTART_LAST must not re-issue the call");
        assert_eq!(t.pending_call(), None);
    }

    #[test]
    fn fiq_interrupted_forever_ends_within_the_limit() {
        let (_, clock, mut t) = with_peer(|_| -12);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(FIQ_OWED));
        assert!(secs(&clock) <= 31, "{} s", secs(&clock));
        assert_eq!(t.pending_call(), Some(PendingCall { fid: F, restart_fiq_owed: true }));
    }

    #[test]
    fn cpu_idle_forever_ends_within_the_limit() {
        let (p, clock, mut t) = with_peer(|f| if f == NOP { -15 } else { -13 });
        assert_eq!(t.std_call(F, 0, 0, 0), Err(PENDING));
        assert!(secs(&clock) <= 31, "{} s", secs(&clock));
        let calls = p.calls();
        assert_eq!(calls.iter().filter(|&&f| f == F).count(), 1, "the call is issued once");
        assert!(calls.contains(&RL) && calls.contains(&NOP));
    }

    #[test]
    fn cpu_idle_without_nop_progress_restarts_anyway() {
        // Linux trusty_std_call_cpu_idle: after 10 s without a completed NOP, warn and restart.
        let (_, clock, mut t) = with_peer(|f| match f {
            F => -13,
            NOP => -7,
            _ => 3,
        });
        assert_eq!(t.std_call(F, 0, 0, 0), Ok(3));
        assert!((10..=11).contains(&secs(&clock)), "{} s", secs(&clock));
    }

    #[test]
    fn interrupted_forever_keeps_the_call_pending_and_collects_it_before_a_fresh_call() {
        let (p, clock, mut t) = with_peer(|_| -3);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(PENDING));
        assert!(secs(&clock) <= 31);
        assert_eq!(t.pending_call(), Some(PendingCall { fid: F, restart_fiq_owed: false }));
        p.take_calls();
        // Trusty finishes the old call: the next standard call collects it, then goes out.
        p.set(|f| match f {
            RL => 5,
            G => 0,
            _ => -5,
        });
        assert_eq!(t.std_call(G, 0, 0, 0), Ok(0));
        assert_eq!(p.calls(), vec![RL, G]);
        assert_eq!(t.pending_call(), None);
        assert_eq!(t.stats().collected_late, 1);
    }

    #[test]
    fn a_pending_call_that_cannot_be_collected_blocks_every_fresh_call() {
        let (p, _, mut t) = with_peer(|_| -3);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(PENDING));
        p.take_calls();
        // Still unfinished (BUSY to its restart, as Trusty at API < 2 answers): G never goes out.
        p.set(|f| if f == RL { -5 } else { 0 });
        assert_eq!(t.std_call(G, 0, 0, 0), Err(PENDING));
        let calls = p.calls();
        assert!(!calls.is_empty() && calls.iter().all(|&f| f == RL), "only RESTART_LAST: {:?}", &calls[..3]);
        assert_eq!(t.pending_call(), Some(PendingCall { fid: F, restart_fiq_owed: false }));
    }

    #[test]
    fn an_owed_fiq_restart_is_settled_first_and_a_busy_call_is_never_reissued() {
        let (p, _, mut t) = with_peer(|_| -12);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(FIQ_OWED));
        p.take_calls();
        // The FIQ restart finally returns to the original call, which Trusty answers BUSY:
        // it was never taken, so it is dropped, not re-issued.
        p.set(|f| match f {
            RF => -5,
            G => 0,
            _ => -7,
        });
        assert_eq!(t.std_call(G, 0, 0, 0), Ok(0));
        assert_eq!(p.calls(), vec![RF, G]);
        assert_eq!(t.pending_call(), None);
    }

    #[test]
    fn a_nop_follows_fiq_interrupted_with_restart_fiq() {
        let mut n = 0;
        let (p, _, mut t) = with_peer(move |f| {
            n += 1;
            match (f, n) {
                (NOP, 1) => -12,
                (RF, _) => -15,
                _ => -7,
            }
        });
        assert_eq!(t.nop(0, 0, 0), Ok(()));
        assert_eq!(p.calls(), vec![NOP, RF]);
    }

    /// A conduit that answers from a script and records every call's registers x0..x3.
    struct ArgsScripted {
        answers: Mutex<Vec<i32>>,
        calls: Mutex<Vec<[u32; 4]>>,
    }
    impl Conduit for ArgsScripted {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            self.calls.lock().unwrap().push([regs[0] as u32, regs[1] as u32, regs[2] as u32, regs[3] as u32]);
            let r = self.answers.lock().unwrap().pop().unwrap_or(-7);
            [r as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
        }
    }

    #[test]
    fn an_interrupted_nop_is_retried_without_its_work_item_and_a_fiq_restarted_first() {
        // NOP(work) -> NOP_INTERRUPTED; NOP(0) -> FIQ_INTERRUPTED; RESTART_FIQ -> NOP_INTERRUPTED;
        // NOP(0) -> NOP_DONE. Then a second NOP goes straight out: nothing is owed.
        let mut answers = vec![-14, -12, -14, -15, 0];
        answers.reverse();
        let c = Arc::new(ArgsScripted { answers: Mutex::new(answers), calls: Mutex::new(Vec::new()) });
        let mut t = Trusty::new(c.clone(), Arc::new(FakeClock(AtomicU64::new(0))), CallPolicy::default());
        t.api_version = 5;
        assert_eq!(t.nop(7, 8, 9), Ok(()));
        assert_eq!(t.nop(1, 2, 3), Ok(()));
        assert_eq!(
            *c.calls.lock().unwrap(),
            vec![[NOP, 7, 8, 9], [NOP, 0, 0, 0], [RF, 0, 0, 0], [NOP, 0, 0, 0], [NOP, 1, 2, 3]]
        );
        let stats = t.stats();
        assert_eq!((stats.nop_calls, stats.restart_fiq, stats.smcs), (2, 1, 5));
        // Any other error ends the NOP at once.
        let c = Arc::new(ArgsScripted { answers: Mutex::new(vec![-2, -14]), calls: Mutex::new(Vec::new()) });
        let mut t = Trusty::new(c.clone(), Arc::new(FakeClock(AtomicU64::new(0))), CallPolicy::default());
        t.api_version = 5;
        assert_eq!(t.nop(0, 0, 0), Err(Error::Sm(SmError::InvalidParameters)));
        assert_eq!(c.calls.lock().unwrap().len(), 2);
    }

    #[test]
    fn nop_before_a_pending_calls_fiq_restart_is_not_interleaved() {
        let (p, _, mut t) = with_peer(|_| -12);
        assert_eq!(t.std_call(F, 0, 0, 0), Err(FIQ_OWED));
        p.take_calls();
        p.set(|f| match f {
            RF => -3,
            NOP => -15,
            _ => -7,
        });
        assert_eq!(t.nop(0, 0, 0), Ok(()));
        assert_eq!(p.calls(), vec![RF, NOP]);
        assert_eq!(t.pending_call(), Some(PendingCall { fid: F, restart_fiq_owed: false }));
    }

    #[test]
    fn version_string_is_optional() {
        let c = Scripted::new(&[-1]);
        let mut t = trusty(&c);
        assert_eq!(t.version_string_or_log(), Ok(None));
        let c = Scripted::new(&[-11]);
        let mut t = trusty(&c);
        assert_eq!(t.version_string_or_log(), Err(Error::Sm(SmError::Panic)));
    }
}
