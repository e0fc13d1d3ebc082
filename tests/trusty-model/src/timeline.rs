//! Where the time of a cross-core call goes: time stamps taken on both ends of a
//! [`HostMailbox`](crate::host::HostMailbox), the caller's conduit (when the call enters and when
//! it returns) and the serving thread (when it sees the request and when it has written the
//! answer), matched by request number. A bench reads them to split a cross-core echo into the
//! caller's work before the call, the request's crossing, the peer's work, the answer's
//! crossing and the caller's work after it.
//!
//! Test tooling: nothing here is linked into what ships. A mailbox made before [`enable`] has
//! no timeline and takes no stamp at all; one made after it gets its own ([`latest`] hands it
//! to the bench) and takes two stamps per call and side while
//! [`CallTimeline::set_recording`] is on.

use std::boxed::Box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::atomic::AtomicBool as Flag;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use std::vec::Vec;

/// Calls remembered: stamps of older calls are overwritten (ring of the last `CAPACITY`; 256 KiB
/// a side, which stays in L2).
pub const CAPACITY: usize = 1 << 14;

/// A counter that both cores read alike: the time-stamp counter on x86-64 (invariant and
/// synchronised across cores where the CPU says `constant_tsc`/`nonstop_tsc`, as KVM guests
/// do), the virtual counter on AArch64, elsewhere nanoseconds since the first call.
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter; it touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let v: u64;
        // SAFETY: CNTVCT_EL0 is readable at EL0 on Linux; reading it has no other effect.
        unsafe { core::arch::asm!("mrs {0}, cntvct_el0", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks of [`ticks`] per nanosecond, measured once against the monotonic clock (20 ms).
pub fn ticks_per_ns() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let (t0, i0) = (ticks(), Instant::now());
        while i0.elapsed().as_millis() < 20 {
            std::hint::spin_loop();
        }
        let (t1, ns) = (ticks(), i0.elapsed().as_nanos() as f64);
        (t1.wrapping_sub(t0) as f64 / ns).max(f64::MIN_POSITIVE)
    })
}

/// A value alone in its cache lines (a line and the one fetched with it): the caller writes
/// its call counter on every call, and the serving thread must not pull that line over when it
/// reads the recording flag.
#[repr(align(128))]
#[derive(Default)]
struct Alone<T>(T);

/// Stamps of the calls through one host mailbox.
pub struct CallTimeline {
    /// Written only when recording starts or stops: stays shared in both cores' caches.
    recording: Alone<AtomicBool>,
    /// Calls the conduit made (recorded or not); the k-th call (from 1) publishes request k
    /// unless it was refused BUSY without being published, which the matching detects.
    /// Written by the caller's thread only.
    calls: Alone<AtomicU64>,
    /// By call number: [entered, returned]. Written by the caller's thread only.
    caller: Box<[[AtomicU64; 2]]>,
    /// By request number: [seen, answered]. Written by the serving thread only (another
    /// cache line than the caller's stamps, so the two never pull each other's lines).
    server: Box<[[AtomicU64; 2]]>,
}

impl Default for CallTimeline {
    fn default() -> Self {
        CallTimeline::new()
    }
}

fn slots() -> Box<[[AtomicU64; 2]]> {
    (0..CAPACITY).map(|_| [AtomicU64::new(0), AtomicU64::new(0)]).collect()
}

impl CallTimeline {
    /// An empty timeline, not recording.
    pub fn new() -> CallTimeline {
        CallTimeline { recording: Alone::default(), calls: Alone::default(), caller: slots(), server: slots() }
    }

    /// Starts or stops taking stamps.
    pub fn set_recording(&self, on: bool) {
        self.recording.0.store(on, Ordering::Relaxed);
    }

    /// Calls made so far through the conduit (the next call is number `calls() + 1`).
    pub fn calls(&self) -> u64 {
        self.calls.0.load(Ordering::Relaxed)
    }

    #[inline]
    fn recording(&self) -> bool {
        self.recording.0.load(Ordering::Relaxed)
    }

    /// Numbers the caller's next call (from 1).
    #[inline]
    pub(crate) fn next_call(&self) -> u64 {
        // Only the caller's thread writes the counter: a load and a store, no locked add.
        let n = self.calls.0.load(Ordering::Relaxed) + 1;
        self.calls.0.store(n, Ordering::Relaxed);
        n
    }

    /// Whether stamps are being taken.
    #[inline]
    pub(crate) fn is_recording(&self) -> bool {
        self.recording()
    }

    /// The caller's stamps of call `n`. Stored once the call has returned: a store of a stamp
    /// made during the call would wait in the store buffer ahead of the call's own (x86
    /// stores leave in program order), and a slot whose line is not in L1 would hold them up.
    #[inline]
    pub(crate) fn record_call(&self, n: u64, entered: u64, returned: u64) {
        let slot = &self.caller[n as usize % CAPACITY];
        slot[0].store(entered, Ordering::Relaxed);
        slot[1].store(returned, Ordering::Relaxed);
    }

    /// The server's stamps of request `req`, stored once its answer is published (as above).
    #[inline]
    pub(crate) fn record_serve(&self, req: u32, seen: u64, answered: u64) {
        let slot = &self.server[req as usize % CAPACITY];
        slot[0].store(seen, Ordering::Relaxed);
        slot[1].store(answered, Ordering::Relaxed);
    }

    /// The stamps of call `n`: (entered, seen, answered, returned), if all four were taken for
    /// this call and lie in that order (a call refused without being published, or stamps of an
    /// older call still in a slot, fail the order and are left out).
    pub fn call(&self, n: u64) -> Option<[u64; 4]> {
        let i = n as usize % CAPACITY;
        let c = &self.caller[i];
        let s = &self.server[i];
        let t = [c[0].load(Ordering::Relaxed), s[0].load(Ordering::Relaxed), s[1].load(Ordering::Relaxed), c[1].load(Ordering::Relaxed)];
        (t[0] != 0 && t.windows(2).all(|w| w[0] <= w[1])).then_some(t)
    }
}

/// How one round trip (an echo) through a single call splits, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Split {
    /// From the round trip's start to the call's entry: the caller's work before the call.
    pub before: f64,
    /// From the call's entry to the serving thread seeing the request: the conduit publishing
    /// it and the line crossing to the other core.
    pub request: f64,
    /// The serving thread's work on the request, to its answer written.
    pub serve: f64,
    /// From the answer written to the call's return: the line crossing back, and the conduit
    /// reading the answer.
    pub answer: f64,
    /// From the call's return to the round trip's end: the caller's work after the call.
    pub after: f64,
}

/// Medians of each part of [`Split`] over round trips given as (start, end, call number), start
/// and end in [`ticks`]; round trips whose call is not matched (see [`CallTimeline::call`]) or
/// whose start and end do not enclose it are left out. Returns the medians and how many round
/// trips counted.
pub fn split(t: &CallTimeline, trips: &[(u64, u64, u64)]) -> (Split, usize) {
    let per_ns = ticks_per_ns();
    let mut parts: [Vec<f64>; 5] = Default::default();
    for &(start, end, n) in trips {
        let Some([entered, seen, answered, returned]) = t.call(n) else { continue };
        if start > entered || returned > end {
            continue;
        }
        let marks = [start, entered, seen, answered, returned, end];
        for (p, w) in parts.iter_mut().zip(marks.windows(2)) {
            p.push((w[1] - w[0]) as f64 / per_ns);
        }
    }
    let counted = parts[0].len();
    let mut med = [0.0; 5];
    for (m, p) in med.iter_mut().zip(parts.iter_mut()) {
        p.sort_by(|a, b| a.total_cmp(b));
        *m = p.get(p.len() / 2).copied().unwrap_or(f64::NAN);
    }
    (Split { before: med[0], request: med[1], serve: med[2], answer: med[3], after: med[4] }, counted)
}

/// Runs `iters` round trips through `one` with `t` recording, and splits those made of exactly
/// one call through the timeline's mailbox (see [`split`]).
pub fn split_round_trips<E>(
    t: &CallTimeline,
    iters: usize,
    mut one: impl FnMut() -> Result<(), E>,
) -> Result<(Split, usize), E> {
    let mut trips = Vec::with_capacity(iters);
    t.set_recording(true);
    let mut run = || {
        for _ in 0..iters {
            let before = t.calls();
            let start = ticks();
            one()?;
            let end = ticks();
            if t.calls() == before + 1 {
                trips.push((start, end, before + 1));
            }
        }
        Ok(())
    };
    let r = run();
    t.set_recording(false);
    r.map(|()| split(t, &trips))
}

static ENABLED: Flag = Flag::new(false);
static LATEST: Mutex<Option<Arc<CallTimeline>>> = Mutex::new(None);

/// Every [`HostMailbox`](crate::host::HostMailbox) made from now on gets a timeline of its own
/// (its call and request numbers start together at 1), which [`latest`] returns.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The timeline of the host mailbox made last since [`enable`], if any.
pub fn latest() -> Option<Arc<CallTimeline>> {
    LATEST.lock().ok()?.clone()
}

/// A timeline for a new host mailbox if timelines are enabled (it becomes the [`latest`]).
pub(crate) fn for_new_mailbox() -> Option<Arc<CallTimeline>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let t = Arc::new(CallTimeline::new());
    if let Ok(mut l) = LATEST.lock() {
        *l = Some(t.clone());
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One call through both ends, as the host conduit and the server stamp it.
    fn served_call(t: &CallTimeline) -> u64 {
        let n = t.next_call();
        let entered = ticks();
        let (seen, answered) = (ticks(), ticks());
        t.record_serve(n as u32, seen, answered);
        t.record_call(n, entered, ticks());
        n
    }

    #[test]
    fn a_call_counts_only_with_its_four_stamps_in_order() {
        let t = CallTimeline::new();
        let n = t.next_call();
        let entered = ticks();
        assert_eq!(t.call(n), None, "no stamps yet");
        let (seen, answered) = (ticks(), ticks());
        t.record_serve(n as u32, seen, answered);
        assert_eq!(t.call(n), None, "the caller's stamps are missing");
        t.record_call(n, entered, ticks());
        let s = t.call(n).expect("four stamps in order");
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        // A call the server never saw keeps the stamps of the call CAPACITY before it, which
        // came before its entry: out of order, left out.
        let m = n + CAPACITY as u64;
        while t.calls() < m - 1 {
            t.next_call();
        }
        assert_eq!(t.next_call(), m);
        let entered = ticks();
        t.record_call(m, entered, ticks());
        assert_eq!(t.call(m), None, "stale server stamps do not match a newer call");
        // Stamps out of order (a clock that went back between the cores) are left out too.
        let k = t.next_call();
        t.record_serve(k as u32, 10, 20);
        t.record_call(k, 30, 40);
        assert_eq!(t.call(k), None);
    }

    #[test]
    fn calls_are_counted_whether_or_not_recording() {
        let t = CallTimeline::new();
        assert!(!t.is_recording());
        t.next_call();
        t.set_recording(true);
        assert!(t.is_recording());
        t.next_call();
        assert_eq!(t.calls(), 2);
    }

    #[test]
    fn split_takes_the_median_of_each_part_and_skips_what_does_not_enclose_its_call() {
        let t = CallTimeline::new();
        t.set_recording(true);
        let mut trips = Vec::new();
        for _ in 0..3 {
            let start = ticks();
            let n = served_call(&t);
            trips.push((start, ticks(), n));
        }
        // A round trip whose end comes before its call returned is not counted.
        let (s0, _, n0) = trips[0];
        trips.push((s0, s0, n0));
        let (s, counted) = split(&t, &trips);
        assert_eq!(counted, 3);
        for v in [s.before, s.request, s.serve, s.answer, s.after] {
            assert!(v.is_finite() && v >= 0.0, "{s:?}");
        }
        let (_, none) = split(&t, &[]);
        assert_eq!(none, 0);
    }

    #[test]
    fn round_trips_of_one_call_are_split_and_others_are_not() {
        let t = CallTimeline::new();
        let mut i = 0;
        // Every third round trip makes two calls, one in three none: only a third count.
        let (_, counted) = split_round_trips::<()>(&t, 9, || {
            i += 1;
            for _ in 0..i % 3 {
                served_call(&t);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(counted, 3);
        assert!(!t.recording(), "recording ends with the round trips");
        let err = split_round_trips(&t, 5, || Err("peer gone"));
        assert_eq!(err.unwrap_err(), "peer gone");
        assert!(!t.recording(), "and when one fails");
    }
}
