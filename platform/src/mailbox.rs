//! The Xen inter-domain call transport to a Trusty VM: one page, granted to the Trusty domain,
//! carries a call's registers; a static event channel tells Trusty a call is waiting; the
//! answer comes back in the same page. The normal world polls for the answer (it polls its
//! rings too: Trusty's stack never relies on interrupts, spec trusty-protocol §4).
//!
//! Page layout (little-endian, this project's own; see the README):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MAILBOX_MAGIC`, written once by the guest |
//! | 4 | 4 | request sequence number, written last by the guest |
//! | 8 | 4 | response sequence number, written last by the Trusty VM |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 64 | request: x0..x7 |
//! | 80 | 64 | response: x0..x7 |
//!
//! The page is granted with reference [`MAILBOX_GREF`], so both sides know it without a
//! handshake; every other grant comes after it.

use alloc::sync::Arc;
use core::ptr::NonNull;
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::clock::Clock;
use crate::smc::{call, Conduit, SmError};

/// "TIPC" in little-endian ASCII.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"TIPC");
/// The grant reference of the mailbox page: the first one after Xen's reserved entries.
pub const MAILBOX_GREF: u32 = 8;
/// Byte offset of the magic ([`MAILBOX_MAGIC`]) in the page.
pub const OFF_MAGIC: usize = 0;
/// Byte offset of the request sequence number, written by the caller.
pub const OFF_REQ_SEQ: usize = 4;
/// Byte offset of the response sequence number, written by the Trusty VM.
pub const OFF_RSP_SEQ: usize = 8;
/// Byte offset of the request words.
pub const OFF_REQUEST: usize = 16;
/// Byte offset of the response words.
pub const OFF_RESPONSE: usize = 80;
/// Bytes of the page the protocol uses.
pub const MAILBOX_LEN: usize = 144;

/// Sends an event on a channel (EVTCHNOP_send on Xen; a model on the host), and where the
/// environment can block until one arrives (Linux userspace: poll(2) on `/dev/xen/evtchn`),
/// waits for one.
pub trait EventChannel: Send + Sync {
    /// Signals event channel `port`.
    fn notify(&self, port: u32);

    /// Blocks until an event may have arrived on `port`, or for at most `timeout_ns`. Returns
    /// `false` at once where this channel cannot block (bare metal: there the caller relaxes
    /// between polls of shared memory, as before); `true` after a real wait, whether an event
    /// came or the time ran out. Events wake only: the caller always rechecks the memory the
    /// peer writes, so a spurious or merged event costs one look.
    fn wait(&self, port: u32, timeout_ns: u64) -> bool {
        let _ = (port, timeout_ns);
        false
    }
}

/// The longest single block on the event channel while a call's answer is awaited. The Trusty
/// VM signals when it answers, so a block normally ends with that event; the slice bounds what
/// a lost or unsent event costs (one slice per call, never the whole timeout).
pub const EVENT_WAIT_SLICE_NS: u64 = 5_000_000;

/// What kind of call a request was, for what a late answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fast,
    /// SMC_SC_NOP: concurrent, its answer only says whether Trusty went idle.
    Nop,
    /// Any other standard call, restarts included.
    Std,
}

fn kind_of(fid: u32) -> Kind {
    if crate::smc::fid::is_fast(fid) {
        Kind::Fast
    } else if fid == call::SC_NOP {
        Kind::Nop
    } else {
        Kind::Std
    }
}

/// The mailbox's memory of a call the Trusty VM took and has not answered, and of an answer
/// that came too late for its caller.
#[derive(Default)]
struct Flight {
    /// Sequence number and kind of a request published but not answered within the timeout.
    outstanding: Option<(u32, Kind)>,
    /// A standard call's answer that arrived after its caller was told SM_ERR_INTERRUPTED: it
    /// is the answer to the next RESTART_LAST (or RESTART_FIQ).
    held: Option<[u64; 8]>,
}

/// A [`Conduit`] whose calls go through the mailbox.
///
/// A timeout is not BUSY: BUSY means "not executed", while a request the Trusty VM has not
/// answered in time may well be executing. So a request is published once and never again
/// (each has its own sequence number); while its answer is outstanding no other request is
/// published. Its caller is told what Trusty itself says of a call still running:
/// SM_ERR_INTERRUPTED for a standard call (the discipline's RESTART_LAST then collects the real
/// answer here, without a new request), SM_ERR_NOP_INTERRUPTED for a NOP; a fast call, which
/// Trusty runs to completion at once, gets SM_ERR_INTERNAL_FAILURE and an error in the log.
/// A fresh call made while an answer is outstanding is answered SM_ERR_BUSY without being
/// published (true: it was not executed).
pub struct MailboxConduit {
    page: NonNull<u8>,
    events: Arc<dyn EventChannel>,
    clock: Arc<dyn Clock>,
    call_port: u32,
    timeout_ms: u64,
    seq: AtomicU32,
    busy: AtomicBool,
    /// Touched only while `busy` is held (see `call`).
    flight: UnsafeCell<Flight>,
}

// SAFETY: the page is owned by this conduit for its lifetime; access is volatile and one call at
// a time (`busy`), which also guards the flight state.
unsafe impl Send for MailboxConduit {}
// SAFETY: as above.
unsafe impl Sync for MailboxConduit {}

impl MailboxConduit {
    /// # Safety
    /// `page` must point to a page-aligned 4 KiB page that stays valid for the conduit's life,
    /// already granted to the Trusty domain with [`MAILBOX_GREF`], and used by nothing else.
    pub unsafe fn new(
        page: NonNull<u8>,
        events: Arc<dyn EventChannel>,
        clock: Arc<dyn Clock>,
        call_port: u32,
        timeout_ms: u64,
    ) -> Self {
        let c = MailboxConduit {
            page,
            events,
            clock,
            call_port,
            timeout_ms,
            seq: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            flight: UnsafeCell::new(Flight::default()),
        };
        c.write_u32(OFF_MAGIC, MAILBOX_MAGIC);
        c.write_u32(OFF_REQ_SEQ, 0);
        c
    }

    fn word<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + core::mem::size_of::<T>() <= MAILBOX_LEN);
        // SAFETY: every offset used is a constant inside the first MAILBOX_LEN bytes of the page.
        unsafe { self.page.as_ptr().add(off).cast() }
    }

    fn write_u32(&self, off: usize, v: u32) {
        // SAFETY: aligned, in the page (see `word`); volatile because the peer reads it.
        unsafe { self.word::<u32>(off).write_volatile(v.to_le()) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: as in `write_u32`.
        u32::from_le(unsafe { self.word::<u32>(off).read_volatile() })
    }

    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: as in `write_u32`.
        unsafe { self.word::<u64>(off).write_volatile(v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: as in `write_u32`.
        u64::from_le(unsafe { self.word::<u64>(off).read_volatile() })
    }
}

fn ret(code: SmError) -> [u64; 8] {
    [u64::from(code.code() as u32), 0, 0, 0, 0, 0, 0, 0]
}

/// The shortest wait for a fast call's answer, whatever the configured timeout. Trusty runs a
/// fast call to completion and it cannot be restarted, so a fast call that times out is lost
/// (SM_ERR_INTERNAL_FAILURE); a short mailbox timeout, chosen so that slow standard calls are
/// handed back to the discipline early, must not also fail a fast call whose Trusty VM was
/// merely descheduled for a moment.
pub const FAST_CALL_MIN_WAIT_MS: u64 = 1000;

/// How long a call spins on the response word before it blocks on the event channel (or
/// relaxes between polls): long enough for a peer polling on another core (well under a
/// microsecond), for a short model step, and for a Trusty VM that answers a call within a
/// millisecond or two (measured in the Linux DomU under QEMU TCG, tests/qemu/README.md: a
/// block there costs two cross-domain wake-ups, 5-100 ms on a loaded host, and a 50 us spin
/// left most calls blocking); short enough that a peer that sleeps costs little CPU.
pub const SPIN_NS: u64 = 2_000_000;

/// Polls of the response word between two clock reads while spinning.
pub const SPIN_POLLS: u32 = 64;

/// Most spin steps of one wait, whatever the clock says (enough for [`SPIN_NS`] at about
/// 0.1 us per step; a clock that does not move alone stops spinning after ~1M polls).
pub const MAX_SPIN_STEPS: u32 = 16_384;

impl MailboxConduit {
    /// Reads the answer if the response sequence word says request `seq` has been answered.
    #[inline(always)]
    fn answered(&self, seq: u32) -> Option<[u64; 8]> {
        if self.read_u32(OFF_RSP_SEQ) != seq {
            return None;
        }
        // Acquire pairs with the peer's Release before it stores the response sequence word
        // (the model's `serve_mailbox`, the Trusty VM's answer): the response registers it
        // wrote before that store are visible to the reads below.
        fence(Ordering::Acquire);
        let mut out = [0u64; 8];
        for (i, r) in out.iter_mut().enumerate() {
            *r = self.read_u64(OFF_RESPONSE + 8 * i);
        }
        Some(out)
    }

    /// Waits for the answer to request `seq`: up to the timeout, or for a fast call at least
    /// [`FAST_CALL_MIN_WAIT_MS`]. A peer polling on another core answers in well under a
    /// microsecond, so the wait first spins for [`SPIN_NS`] (no sleep, no system call), then
    /// blocks on the event channel ([`EventChannel::wait`], at most [`EVENT_WAIT_SLICE_NS`] at a
    /// time; the Trusty VM signals when it answers), or where the channel cannot block falls
    /// back to [`Clock::relax`] between polls, so an idle wait burns no core. Each wait step
    /// (one batch of [`SPIN_POLLS`] polls, one block or one relax) reads the clock once.
    ///
    /// `timed` is set to the first clock read of the call, if it had to read the clock: an
    /// answer caught by the first polls reads no clock at all.
    fn wait_answer(&self, seq: u32, kind: Kind, timed: &mut Option<u64>) -> Option<[u64; 8]> {
        let ms = match kind {
            Kind::Fast => self.timeout_ms.max(FAST_CALL_MIN_WAIT_MS),
            Kind::Nop | Kind::Std => self.timeout_ms,
        };
        // Polls before the first clock read: the common cross-core answer never reads the clock.
        for _ in 0..SPIN_POLLS {
            if let Some(out) = self.answered(seq) {
                return Some(out);
            }
            core::hint::spin_loop();
        }
        let start = self.clock.now_ns();
        timed.get_or_insert(start);
        let deadline = start.saturating_add(ms.saturating_mul(crate::clock::NS_PER_MS));
        let spin_until = start.saturating_add(SPIN_NS);
        // Also bounded by a count, so that a clock that only moves when time is let pass
        // (a virtual clock, a stuck counter) still reaches `relax`.
        let mut spin_steps = 0u32;
        loop {
            if let Some(out) = self.answered(seq) {
                return Some(out);
            }
            let now = self.clock.now_ns();
            if now >= deadline {
                // One last look: the answer may have landed while the clock was read.
                return self.answered(seq);
            }
            if now < spin_until && spin_steps < MAX_SPIN_STEPS {
                spin_steps += 1;
                for _ in 0..SPIN_POLLS {
                    if let Some(out) = self.answered(seq) {
                        return Some(out);
                    }
                    core::hint::spin_loop();
                }
            } else if self.events.wait(self.call_port, (deadline - now).min(EVENT_WAIT_SLICE_NS)) {
                MAILBOX_STATS.event_waits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.clock.relax();
            }
        }
    }

    /// Publishes `regs` as request `seq` and signals the Trusty VM.
    fn publish(&self, seq: u32, regs: &[u64; 8]) {
        // Only the words that differ from what the page holds are written: a repeated call
        // (every NOP of a data path is the same eight words) then moves just the line of the
        // sequence word to the peer's core, and the request lines stay shared in both caches.
        // The page is compared, not a copy of ours, so the peer reads exactly `regs`.
        for (i, r) in regs.iter().enumerate() {
            let off = OFF_REQUEST + 8 * i;
            if self.read_u64(off) != *r {
                self.write_u64(off, *r);
            }
        }
        // Release pairs with the peer's Acquire after it reads the request sequence word (the
        // model's `serve_mailbox`): the registers must be visible before the sequence number
        // that publishes them.
        fence(Ordering::Release);
        self.write_u32(OFF_REQ_SEQ, seq);
        // The sequence word must be visible before the event (a peer woken by it must see the
        // request); on Xen the hypercall is itself a barrier, on the host a wake-up is.
        fence(Ordering::SeqCst);
        self.events.notify(self.call_port);
    }

    fn call_locked(&self, flight: &mut Flight, regs: [u64; 8], timed: &mut Option<u64>) -> [u64; 8] {
        let f = regs[0] as u32;
        let kind = kind_of(f);
        let restart = f == call::SC_RESTART_LAST || f == call::SC_RESTART_FIQ;
        // 1. An answer still outstanding comes first; nothing new is published before it.
        if let Some((seq, late_kind)) = flight.outstanding {
            match self.wait_answer(seq, late_kind, timed) {
                Some(out) => {
                    flight.outstanding = None;
                    match late_kind {
                        Kind::Std => flight.held = Some(out),
                        Kind::Nop | Kind::Fast => {
                            log::warn!("late mailbox answer {:#x} to request {seq} (a {late_kind:?} call) discarded", out[0])
                        }
                    }
                }
                None => {
                    log::warn!("Trusty VM still has not answered request {seq}; call {f:#x} not sent");
                    return match kind {
                        Kind::Std if restart => ret(SmError::Interrupted),
                        Kind::Std => ret(SmError::Busy),
                        Kind::Nop if regs[1] == 0 => ret(SmError::NopInterrupted),
                        Kind::Nop => ret(SmError::Busy),
                        Kind::Fast => ret(SmError::InternalFailure),
                    };
                }
            }
        }
        // 2. A standard call's late answer is what its restart collects.
        if let Some(out) = flight.held {
            if restart {
                flight.held = None;
                return out;
            }
            if kind == Kind::Std {
                // Trusty answers a fresh call BUSY while the last one's result is uncollected
                // (sm_queue_stdcall); the discipline never does this.
                return ret(SmError::Busy);
            }
        }
        // 3. A new request, published exactly once. Only the holder of `busy` touches `seq`: a
        // load and a store, no read-modify-write.
        let seq = self.seq.load(Ordering::Relaxed).wrapping_add(1);
        self.seq.store(seq, Ordering::Relaxed);
        self.publish(seq, &regs);
        match self.wait_answer(seq, kind, timed) {
            Some(out) => out,
            None => {
                log::error!(
                    "Trusty VM took call {f:#x} (request {seq}) and did not answer within {} ms; it is not sent again",
                    self.timeout_ms
                );
                flight.outstanding = Some((seq, kind));
                match kind {
                    Kind::Std => ret(SmError::Interrupted),
                    Kind::Nop => ret(SmError::NopInterrupted),
                    Kind::Fast => ret(SmError::InternalFailure),
                }
            }
        }
    }
}

/// Process-wide counters of mailbox calls (every conduit of this program), for status
/// reports: how many calls, how long they took, how many blocked on the event channel.
///
/// A call answered while the caller polls before its first clock read (a peer on another core
/// answers within microseconds) reads no clock: it is counted as `quick`, with no time, and
/// shown in the first bucket. A slower call is timed from that first clock read, which comes
/// at most [`SPIN_POLLS`] polls after the request was published, to the answer.
#[derive(Debug, Default)]
pub struct MailboxStats {
    /// Calls answered before the first clock read (untimed; under 1 ms by far).
    pub quick: AtomicU64,
    /// Total time of the timed calls, in ns.
    pub total_ns: AtomicU64,
    /// Longest call, in ns.
    pub max_ns: AtomicU64,
    /// Blocks on the event channel ([`EventChannel::wait`] calls).
    pub event_waits: AtomicU64,
    /// Timed calls by duration: under 1 ms, 5 ms, 20 ms, 100 ms, and longer. With `quick`,
    /// the number of calls.
    pub histogram: [AtomicU64; 5],
}

/// Upper bounds (ns) of the first buckets of [`MailboxStats::histogram`].
const HISTOGRAM_NS: [u64; 4] = [1_000_000, 5_000_000, 20_000_000, 100_000_000];

/// The counters of every mailbox call of this program.
pub static MAILBOX_STATS: MailboxStats = MailboxStats {
    quick: AtomicU64::new(0),
    total_ns: AtomicU64::new(0),
    max_ns: AtomicU64::new(0),
    event_waits: AtomicU64::new(0),
    histogram: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
};

impl MailboxStats {
    /// `key=value` words for a status line.
    pub fn summary(&self) -> alloc::string::String {
        let quick = self.quick.load(Ordering::Relaxed);
        // The quick calls are under 1 ms: in the first bucket.
        let h = |i: usize| self.histogram[i].load(Ordering::Relaxed) + if i == 0 { quick } else { 0 };
        let calls: u64 = (0..self.histogram.len()).map(h).sum();
        let timed = calls - quick;
        let total = self.total_ns.load(Ordering::Relaxed);
        alloc::format!(
            "mailbox_calls={calls} mailbox_avg_us={} mailbox_max_us={} mailbox_event_waits={} mailbox_ms_1/5/20/100/more={}/{}/{}/{}/{}",
            total.checked_div(timed).unwrap_or(0) / 1000,
            self.max_ns.load(Ordering::Relaxed) / 1000,
            self.event_waits.load(Ordering::Relaxed),
            h(0),
            h(1),
            h(2),
            h(3),
            h(4)
        )
    }

    /// Counts one call answered before its first clock read: one atomic add.
    fn record_quick(&self) {
        self.quick.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one call that took `ns`.
    fn record(&self, ns: u64) {
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = HISTOGRAM_NS.iter().position(|&b| ns < b).unwrap_or(HISTOGRAM_NS.len());
        self.histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

impl Conduit for MailboxConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        // One call at a time: a concurrent one was not executed, which is what BUSY says.
        if self.busy.swap(true, Ordering::Acquire) {
            return ret(SmError::Busy);
        }
        // SAFETY: `busy` was false and is now ours, so no other call is between these two
        // stores of `busy`: this is the only reference to the flight state until it is released.
        let flight = unsafe { &mut *self.flight.get() };
        let mut timed = None;
        let out = self.call_locked(flight, regs, &mut timed);
        match timed {
            Some(start) => MAILBOX_STATS.record(self.clock.now_ns().saturating_sub(start)),
            None => MAILBOX_STATS.record_quick(),
        }
        self.busy.store(false, Ordering::Release);
        out
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;
    use std::vec;

    struct NoVm;
    impl EventChannel for NoVm {
        fn notify(&self, _port: u32) {}
    }
    struct TestClock(AtomicU64);
    impl Clock for TestClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn sleep_ns(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
        fn relax(&self) {
            self.0.fetch_add(100_000, Ordering::SeqCst);
        }
    }

    /// A mailbox page in a heap buffer, with a Trusty VM the test plays by hand. Reached only
    /// through the raw pointer (as the peer would), never through a reference.
    struct Page(NonNull<u64>);
    const WORDS: usize = 512;
    impl Page {
        fn new() -> Page {
            let b: Box<[u64]> = vec![0u64; WORDS].into_boxed_slice();
            Page(NonNull::new(Box::into_raw(b).cast::<u64>()).unwrap())
        }
        fn ptr(&self) -> NonNull<u8> {
            self.0.cast()
        }
        fn word(&self, i: usize) -> *mut u64 {
            assert!(i < WORDS);
            // SAFETY: i is inside the allocation.
            unsafe { self.0.as_ptr().add(i) }
        }
        fn read(&self, i: usize) -> u64 {
            // SAFETY: in bounds (`word`), aligned, the allocation lives until drop.
            unsafe { self.word(i).read_volatile() }
        }
        fn write(&self, i: usize, v: u64) {
            // SAFETY: as in `read`.
            unsafe { self.word(i).write_volatile(v) }
        }
        fn u32_at(&self, off: usize) -> u32 {
            let w = self.read(off / 8);
            (if off % 8 == 0 { w } else { w >> 32 }) as u32
        }
        /// The VM answers request `seq` with `w0`.
        fn answer(&self, seq: u32, w0: i32) {
            self.write(OFF_RESPONSE / 8, u64::from(w0 as u32));
            let w = self.read(OFF_RSP_SEQ / 8);
            self.write(OFF_RSP_SEQ / 8, (w & 0xFFFF_FFFF_0000_0000) | u64::from(seq));
        }
        fn request_fid(&self) -> u32 {
            self.read(OFF_REQUEST / 8) as u32
        }
    }
    impl Drop for Page {
        fn drop(&mut self) {
            let slice = core::ptr::slice_from_raw_parts_mut(self.0.as_ptr(), WORDS);
            // SAFETY: made by Box::into_raw of a boxed slice of WORDS words in `new`.
            drop(unsafe { Box::from_raw(slice) });
        }
    }

    fn r(c: &MailboxConduit, f: u32) -> i32 {
        c.call([u64::from(f), 0, 0, 0, 0, 0, 0, 0])[0] as u32 as i32
    }

    #[test]
    fn a_taken_call_is_never_published_twice() {
        let page = Page::new();
        let clock = Arc::new(TestClock(AtomicU64::new(0)));
        // SAFETY: the page outlives the conduit (both live to the end of the test), nothing else uses it.
        let c = unsafe { MailboxConduit::new(page.ptr(), Arc::new(NoVm), clock, 1, 10) };
        let start = call::SC_VIRTIO_START;
        assert_eq!(r(&c, start), SmError::Interrupted.code(), "a timeout says: taken, not finished");
        assert_eq!(page.u32_at(OFF_REQ_SEQ), 1);
        // Still unanswered: a restart publishes nothing, a fresh call is BUSY (not executed).
        assert_eq!(r(&c, call::SC_RESTART_LAST), SmError::Interrupted.code());
        assert_eq!(r(&c, call::SC_VIRTIO_STOP), SmError::Busy.code());
        assert_eq!(r(&c, call::SC_NOP), SmError::NopInterrupted.code());
        assert_eq!(page.u32_at(OFF_REQ_SEQ), 1, "nothing new published while request 1 is outstanding");
        assert_eq!(page.request_fid(), start);
        // The VM answers late: the restart collects that answer, still without a new request.
        page.answer(1, 77);
        assert_eq!(r(&c, call::SC_RESTART_LAST), 77);
        assert_eq!(page.u32_at(OFF_REQ_SEQ), 1);
        // Then calls flow again, each as a new request.
        assert_eq!(r(&c, call::SC_VIRTIO_STOP), SmError::Interrupted.code());
        assert_eq!(page.u32_at(OFF_REQ_SEQ), 2);
        assert_eq!(page.request_fid(), call::SC_VIRTIO_STOP);
    }

    /// A clock whose Trusty VM answers request 1 with `w0` once `at_ns` has passed.
    struct AnsweringClock {
        now: AtomicU64,
        page: usize,
        at_ns: u64,
        w0: i32,
    }
    impl Clock for AnsweringClock {
        fn now_ns(&self) -> u64 {
            self.now.load(Ordering::SeqCst)
        }
        fn sleep_ns(&self, ns: u64) {
            self.now.fetch_add(ns, Ordering::SeqCst);
        }
        fn relax(&self) {
            let now = self.now.fetch_add(100_000, Ordering::SeqCst);
            if now >= self.at_ns {
                let page = Page(NonNull::new(self.page as *mut u64).unwrap());
                page.answer(1, self.w0);
                core::mem::forget(page);
            }
        }
    }

    /// An event channel that can block (Linux userspace): the Trusty VM answers request 1 and
    /// signals; the conduit sleeps in `wait`, never in `relax`.
    struct BlockingVm {
        page: usize,
        waits: AtomicU64,
        clock: Arc<TestClock>,
    }
    impl EventChannel for BlockingVm {
        fn notify(&self, _port: u32) {}
        fn wait(&self, port: u32, timeout_ns: u64) -> bool {
            assert_eq!(port, 7, "the wait is on the call port");
            assert!(timeout_ns > 0 && timeout_ns <= EVENT_WAIT_SLICE_NS);
            let n = self.waits.fetch_add(1, Ordering::SeqCst);
            // Time passes while blocked; on the third block the VM answers (and its event ends it).
            self.clock.0.fetch_add(timeout_ns, Ordering::SeqCst);
            if n == 2 {
                let page = Page(NonNull::new(self.page as *mut u64).unwrap());
                page.answer(1, 9);
                core::mem::forget(page);
            }
            true
        }
    }

    #[test]
    fn waits_block_on_an_event_channel_that_can() {
        let page = Page::new();
        let clock = Arc::new(TestClock(AtomicU64::new(0)));
        let vm = Arc::new(BlockingVm { page: page.0.as_ptr() as usize, waits: AtomicU64::new(0), clock: clock.clone() });
        // SAFETY: the page outlives the conduit (both live to the end of the test), nothing else uses it.
        let c = unsafe { MailboxConduit::new(page.ptr(), vm.clone(), clock.clone(), 7, 1000) };
        let before = clock.now_ns();
        assert_eq!(r(&c, call::SC_VIRTIO_START), 9);
        assert_eq!(vm.waits.load(Ordering::SeqCst), 3, "blocked until the answer, in slices");
        // TestClock's relax would add 100 us each time: the time spent is the three blocks alone.
        assert_eq!(clock.now_ns() - before, 3 * EVENT_WAIT_SLICE_NS, "no relax between blocks");
    }

    #[test]
    fn a_fast_call_waits_past_a_short_timeout() {
        let page = Page::new();
        // Answered 50 ms after it was published: past the 10 ms timeout, within the fast-call
        // minimum wait.
        let clock = Arc::new(AnsweringClock {
            now: AtomicU64::new(0),
            page: page.0.as_ptr() as usize,
            at_ns: 50 * crate::clock::NS_PER_MS,
            w0: 5,
        });
        // SAFETY: the page outlives the conduit (both live to the end of the test), nothing else uses it.
        let c = unsafe { MailboxConduit::new(page.ptr(), Arc::new(NoVm), clock.clone(), 1, 10) };
        assert_eq!(r(&c, call::FC_API_VERSION), 5, "a fast call is not lost to a short timeout");
        assert!(clock.now_ns() >= 50 * crate::clock::NS_PER_MS);
        assert_eq!(page.u32_at(OFF_REQ_SEQ), 1, "published once");
    }

    /// A clock that moves 10 us per read, and whose Trusty VM answers request 1 with `w0`
    /// once `at_ns` has passed (a VM on another vCPU that answers while the caller spins).
    struct TickingAnswerClock {
        now: AtomicU64,
        page: usize,
        at_ns: u64,
    }
    impl Clock for TickingAnswerClock {
        fn now_ns(&self) -> u64 {
            let now = self.now.fetch_add(10_000, Ordering::SeqCst);
            if now >= self.at_ns {
                let page = Page(NonNull::new(self.page as *mut u64).unwrap());
                page.answer(1, 4);
                core::mem::forget(page);
            }
            now
        }
        fn sleep_ns(&self, ns: u64) {
            self.now.fetch_add(ns, Ordering::SeqCst);
        }
        fn relax(&self) {}
    }

    /// An event channel that counts blocks (and ends each at once).
    struct CountingVm(AtomicU64);
    impl EventChannel for CountingVm {
        fn notify(&self, _port: u32) {}
        fn wait(&self, _port: u32, _timeout_ns: u64) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    /// An answer within a millisecond is caught by spinning: no block on the event channel,
    /// whose wake-up (two cross-domain wake-ups under a loaded TCG host) costs 5-100 ms.
    #[test]
    fn an_answer_within_a_millisecond_is_caught_without_blocking() {
        let page = Page::new();
        let clock = Arc::new(TickingAnswerClock { now: AtomicU64::new(0), page: page.0.as_ptr() as usize, at_ns: 1_000_000 });
        let vm = Arc::new(CountingVm(AtomicU64::new(0)));
        // SAFETY: the page outlives the conduit (both live to the end of the test), nothing else uses it.
        let c = unsafe { MailboxConduit::new(page.ptr(), vm.clone(), clock.clone(), 7, 1000) };
        assert_eq!(r(&c, call::SC_VIRTIO_START), 4);
        assert_eq!(vm.0.load(Ordering::SeqCst), 0, "answered while spinning, never blocked");
    }

    /// A Trusty VM that answers inside the notification, as a peer polling on another core
    /// answers within the caller's first polls.
    struct AnswersAtOnce(usize);
    impl EventChannel for AnswersAtOnce {
        fn notify(&self, _port: u32) {
            let page = Page(NonNull::new(self.0 as *mut u64).unwrap());
            page.answer(page.u32_at(OFF_REQ_SEQ), 9);
            core::mem::forget(page);
        }
    }

    /// A clock that counts its reads.
    struct CountingClock(AtomicU64);
    impl Clock for CountingClock {
        fn now_ns(&self) -> u64 {
            self.0.fetch_add(1, Ordering::SeqCst)
        }
        fn sleep_ns(&self, _ns: u64) {}
        fn relax(&self) {}
    }

    /// The common cross-core call, answered while the caller polls, reads no clock (neither
    /// for its wait nor for the statistics) and is counted as quick.
    #[test]
    fn an_answer_caught_by_the_first_polls_reads_no_clock() {
        let page = Page::new();
        let clock = Arc::new(CountingClock(AtomicU64::new(0)));
        let vm = Arc::new(AnswersAtOnce(page.0.as_ptr() as usize));
        // SAFETY: the page outlives the conduit (both live to the end of the test), nothing else uses it.
        let c = unsafe { MailboxConduit::new(page.ptr(), vm, clock.clone(), 1, 1000) };
        let quick = MAILBOX_STATS.quick.load(Ordering::SeqCst);
        for _ in 0..3 {
            assert_eq!(r(&c, call::SC_NOP), 9);
        }
        assert_eq!(clock.0.load(Ordering::SeqCst), 0, "clock reads for three quick calls");
        assert!(MAILBOX_STATS.quick.load(Ordering::SeqCst) >= quick + 3);
        assert!(MAILBOX_STATS.summary().contains("mailbox_calls="));
    }
}
