//! `tipc-bench`: the machine reference (a cache line bounced between two cores, memcpy in L1)
//! and the stack's figures against it, measured in the same run: echo round trips (p50/p99) and
//! one-way streaming for `-D sim` (the model inside each call), `-D sim-cores` (the model
//! polling a mailbox on the other core), `stack` (the normal-world stack alone, against the
//! minimal echo peer of [`tipc_bench::stack_peer`] run inside each call) and `stack-cores` (the
//! same peer polling the mailbox on the other core: the stack and its cross-core transport
//! without the model's work), secure calls per echo and heap allocations per message on the
//! caller's thread.
//!
//! The cross-core reference changes under the run: this VM's host moves its two vCPUs between
//! near and far physical cores within seconds (a cache-line round trip of 38, 69 or 325 ns). So
//! besides the reference at the start of the run, every echo series has its own: it is measured
//! in chunks, each between two short cache-line round trips; the chunks whose two agree count
//! ([`tipc_bench::chunks`]), and the series' ratio is the median of theirs. The loop modes print
//! a round trip measured just before and just after the loop.
//!
//! `--json` prints the same figures as one JSON object; `--quick` runs few iterations (a smoke
//! run: it checks that everything runs, not how fast).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trusty_stack::{bring_up_platform, StackConfig};
use tipc::{Timeout, TipcDevice};
use tipc_bench::alloc_count::{allocs_on_this_thread, CountingAlloc};
use tipc_bench::chunks::{references_agree, select, Chunk, Selection};
use tipc_bench::stack_peer::{self, Placement};
use trusty_model::host::{cpu_count, pin_to_cpu, ModelMode};
use trusty_model::timeline::{split_round_trips, CallTimeline, Split};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const SIZES: [usize; 4] = [16, 256, 1024, 4000];
const MODES: [(&str, Mode); 4] =
    [("sim", Mode::Sim), ("cores", Mode::Cores), ("stack", Mode::Stack), ("stack-cores", Mode::StackCores)];
const ECHO_PORT: &str = stack_peer::ECHO_PORT;
const SINK_PORT: &str = stack_peer::SINK_PORT;
/// Every wait in the bench is bounded: a stuck peer fails the run instead of hanging it.
const WAIT: Timeout = Timeout::Ms(5_000);

struct Opts {
    json: bool,
    quick: bool,
    /// Modes to measure; empty: all.
    modes: Vec<String>,
    /// `--stack-loop SIZE ROUNDS` / `--sim-loop SIZE ROUNDS` / `--cores-loop SIZE ROUNDS` /
    /// `--stack-cores-loop SIZE ROUNDS`: only echo round trips of the stack alone, with the
    /// model inside each call, with the model on the other core, or with the minimal peer on
    /// the other core, for a profiler.
    stack_loop: Option<(Mode, usize, u64)>,
    /// `--no-ref`: the loop modes without their cache-line references (for callgrind).
    no_ref: bool,
    /// `--floor-loop ROUNDS`: only the echo floor ([`tipc_bench::floor`]), between two
    /// cache-line references.
    floor_loop: Option<u32>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The line the reference bounces, alone in its cache lines (128 bytes: two 64-byte lines, as
/// the adjacent-line prefetcher pairs them).
#[repr(align(128))]
struct Line(AtomicU64);

/// What the caller and the pinger thread share: the line and whether the thread should be awake.
struct PingShared {
    line: Line,
    awake: AtomicBool,
}

/// Values of the line above the ping-pong's counter (which starts at 0 and never gets near).
/// The caller asks the thread to stop answering and park:
const PING_PARK: u64 = u64::MAX - 1;
/// The thread's answer to `PING_PARK`: it is about to park.
const PING_PARKED: u64 = u64::MAX - 2;
/// The caller asks the thread to exit.
const PING_STOP: u64 = u64::MAX;

/// A thread pinned to the last core that answers a cache line's pings while a reference is
/// measured, and sleeps (parked) between measurements: while echoes are measured it must not
/// take the last core from the peer that runs there in `cores` and `stack-cores` modes. The
/// caller writes an odd value, the thread answers with the next even one.
struct Pinger {
    shared: Arc<PingShared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last value the thread answered (even): the next ping writes `v + 1`.
    v: u64,
    /// One CPU: the two sides share it and must yield to each other, not spin.
    yields: bool,
}

/// Waits one poll of a spin loop: a spin-loop hint, or with one CPU for both sides a yield to
/// the other (a spinning wait would last until the scheduler's tick).
fn ping_wait(yields: bool) {
    if yields {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

impl Pinger {
    fn spawn() -> Pinger {
        let shared = Arc::new(PingShared { line: Line(AtomicU64::new(0)), awake: AtomicBool::new(false) });
        let sh = shared.clone();
        let other = cpu_count().saturating_sub(1);
        let yields = other == 0;
        let thread = std::thread::spawn(move || {
            pin_to_cpu(other);
            loop {
                while !sh.awake.load(Ordering::Acquire) {
                    std::thread::park();
                }
                loop {
                    // Acquire/Release: a plain ping-pong of one word; the orderings add nothing
                    // to the line's transfer on arm64 or x86, which is what is measured.
                    let v = sh.line.0.load(Ordering::Acquire);
                    if v == PING_STOP {
                        return;
                    }
                    if v == PING_PARK {
                        // `awake` goes down before the answer: the caller wakes the thread
                        // again only after it has seen the answer.
                        sh.awake.store(false, Ordering::Release);
                        sh.line.0.store(PING_PARKED, Ordering::Release);
                        break;
                    }
                    if v % 2 == 1 && v < PING_PARKED {
                        sh.line.0.store(v + 1, Ordering::Release);
                    }
                    ping_wait(yields);
                }
            }
        });
        Pinger { shared, thread: Some(thread), v: 0, yields }
    }

    fn wake(&self) {
        self.shared.awake.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Writes `value` and spins until the line reads `expect`, at most 5 s (a thread that
    /// cannot run fails the run instead of hanging it).
    fn exchange(&self, value: u64, expect: u64) -> Result<(), String> {
        let line = &self.shared.line.0;
        line.store(value, Ordering::Release);
        if !tipc_bench::spin_until(|| line.load(Ordering::Acquire) == expect, || ping_wait(self.yields), 5) {
            return Err("cache-line reference: the thread on the last core did not answer in 5 s".into());
        }
        Ok(())
    }

    /// Cache-line round trip between this thread (core 0) and the pinger (the last core): the
    /// median of `batches` (at most 8) batches, each of `per_batch` round trips or until `cap`
    /// (a loaded machine deschedules spinners; the median also drops a batch that the peer's
    /// thread on the last core interrupted). Allocates nothing: it runs between echoes whose
    /// allocations are counted.
    fn rtt_ns(&mut self, batches: usize, per_batch: u64, cap: Duration) -> Result<f64, String> {
        let mut means = [0f64; 8];
        let batches = batches.clamp(1, means.len());
        self.wake();
        // The first round trip waits for the thread to wake up: not timed.
        self.exchange(self.v + 1, self.v + 2)?;
        self.v += 2;
        for mean in &mut means[..batches] {
            let start = Instant::now();
            let mut n = 0;
            while n < per_batch.max(1) {
                self.exchange(self.v + 1, self.v + 2)?;
                self.v += 2;
                n += 1;
                if n % 64 == 0 && start.elapsed() >= cap {
                    break;
                }
            }
            *mean = start.elapsed().as_nanos() as f64 / n as f64;
        }
        self.exchange(PING_PARK, PING_PARKED)?;
        Ok(median(&mut means[..batches]))
    }

    /// A short reference around echoes: 5 batches of `per_batch` round trips (400: under 1 ms
    /// in all at the far placement, 325 ns). It first spins (on this core, which a sleep would
    /// let the host idle and perhaps move) for longer than a peer on the last core spins idle
    /// after its last echo (200 us for the model and the stack peer), so that the pinger has
    /// that core to itself.
    fn short_rtt_ns(&mut self, per_batch: u64) -> Result<f64, String> {
        let start = Instant::now();
        while start.elapsed() < PEER_IDLE_SPIN {
            std::hint::spin_loop();
        }
        self.rtt_ns(5, per_batch, Duration::from_millis(2))
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.wake();
        self.shared.line.0.store(PING_STOP, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Longer than the model's and the stack peer's idle spin (`MODEL_SPIN_NS`, `PEER_SPIN_NS`).
const PEER_IDLE_SPIN: Duration = Duration::from_micros(300);

/// memcpy of `size` bytes within L1 (both buffers hot), ns per copy. Median of 3 batches.
fn memcpy_ns(size: usize, iters: u64) -> f64 {
    let src = vec![0x5au8; size];
    let mut dst = vec![0u8; size];
    let mut batches = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..iters {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }
        batches.push(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    median(&mut batches)
}

/// The transport alone: a call through the host mailbox (the stack's `MailboxConduit`) to a
/// thread on the last core that polls it and answers at once, with the same words each time,
/// as a data path's NOPs are (so only the sequence words' line crosses, each way). Returns the
/// p50 of `iters` calls (ns) and the cache-line round trips just before and after.
fn mailbox_call_ns(pinger: &mut Pinger, iters: usize, quick: bool) -> Result<(f64, f64, f64), String> {
    use trusty_model::host::{move_to_last_core, HostMailbox, StdClock, StopFlag, Unpark};
    use trusty_model::timeline::{ticks, ticks_per_ns};
    let mailbox = HostMailbox::new();
    let mut server = mailbox.server();
    let stop = Arc::new(StopFlag::default());
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("mailbox-echo".into())
        .spawn(move || {
            move_to_last_core();
            // Idle like the stack peer's thread: 200 us of spinning, then 10 ms sleeps.
            server.serve_until_stopped(&stop2, 200_000, 10_000_000, |regs| [regs[0], 0, 0, 0, 0, 0, 0, 0], || ());
        })
        .map_err(|e| format!("spawn the mailbox thread: {e}"))?;
    let conduit = mailbox.conduit(Arc::new(Unpark(thread.thread().clone())), StdClock::new(), 5_000);
    let call = [u64::from(trusty_platform::smc::call::SC_NOP), 0, 0, 0, 0, 0, 0, 0];
    let before = pinger.short_rtt_ns(ref_batch(quick))?;
    let mut ticks_per_call = Vec::with_capacity(iters);
    for i in 0..iters + REWARM {
        let t0 = ticks();
        let out = conduit.call(call);
        let t1 = ticks();
        if out[0] != call[0] {
            return Err(format!("mailbox thread answered {:#x}", out[0]));
        }
        if i >= REWARM {
            ticks_per_call.push(t1.wrapping_sub(t0) as f64);
        }
    }
    let after = pinger.short_rtt_ns(ref_batch(quick))?;
    stop.stop();
    thread.thread().unpark();
    let _ = thread.join();
    Ok((median(&mut ticks_per_call) / ticks_per_ns(), before, after))
}

/// The echo floor ([`tipc_bench::floor`]) between two short cache-line round trips: (ns per
/// echo, reference before, reference after).
fn echo_floor(pinger: &mut Pinger, quick: bool) -> Result<(f64, f64, f64), String> {
    let before = pinger.short_rtt_ns(ref_batch(quick))?;
    let floor = tipc_bench::floor::echo_floor_ns(8, if quick { 500 } else { 20_000 })?;
    let after = pinger.short_rtt_ns(ref_batch(quick))?;
    Ok((floor, before, after))
}

/// A stack brought up against one peer, and how to count the calls it made into that peer.
struct Up {
    dev: TipcDevice,
    /// The timeline of the host mailbox the stack calls through (`cores`, `stack-cores`).
    timeline: Option<Arc<CallTimeline>>,
    calls: Box<dyn Fn() -> u64>,
    /// The stack's clock reads, where the peer counts them (stack mode).
    clock_reads: Option<Box<dyn Fn() -> u64>>,
    /// The stack peer, to time its share of an echo (stack mode).
    peer: Option<stack_peer::PeerHandle>,
}

/// The peer a mode measures against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The model on the caller's thread (`-D sim`).
    Sim,
    /// The model on the other core (`-D sim-cores`).
    Cores,
    /// The minimal echo peer on the caller's thread: the stack alone.
    Stack,
    /// The minimal echo peer on the other core, behind the mailbox: the stack and its
    /// cross-core transport, without the model's work.
    StackCores,
}

fn bring_up(mode: Mode) -> Result<Up, String> {
    let mut up = bring_up_stack(mode)?;
    // The host mailbox this bring-up made, if it made one: the newest timeline, unless it is the
    // one an earlier mode's mailbox left (the in-call modes make none).
    if matches!(mode, Mode::Cores | Mode::StackCores) {
        up.timeline = trusty_model::timeline::latest();
    }
    Ok(up)
}

fn bring_up_stack(mode: Mode) -> Result<Up, String> {
    let model_mode = match mode {
        Mode::Sim => ModelMode::Sync,
        Mode::Cores => ModelMode::Cores,
        Mode::Stack | Mode::StackCores => {
            let placement = if mode == Mode::Stack { Placement::InCall } else { Placement::OtherCore };
            let rig = stack_peer::bring_up_at(StackConfig::default().tipc, placement)?;
            let (peer, peer2) = (rig.peer.clone(), rig.peer.clone());
            return Ok(Up {
                dev: rig.dev,
                timeline: None,
                calls: Box::new(move || peer.stats().calls),
                clock_reads: Some(Box::new(move || peer2.clock_reads())),
                // The peer's share of an echo is timed only inside the caller's thread.
                peer: (mode == Mode::Stack).then_some(rig.peer),
            });
        }
    };
    let profile = platforms::by_name("native-api5").ok_or("built-in profile native-api5 missing")?;
    let sim = profile.boot(model_mode);
    let (dev, _) = bring_up_platform(profile.access(&sim), StackConfig::default()).map_err(|e| e.to_string())?;
    Ok(Up { dev, timeline: None, calls: Box::new(move || sim.model().stats().smcs), clock_reads: None, peer: None })
}

struct EchoFigures {
    /// The series' cache-line reference: the median of its kept chunks' (ns).
    ref_rtt_ns: f64,
    /// The median of its kept chunks' p50 / reference.
    ratio: f64,
    /// At least half of the chunks kept (in one of the attempts).
    stable: bool,
    chunks_kept: usize,
    attempts: usize,
    p50_ns: f64,
    p99_ns: f64,
    calls_per_echo: f64,
    allocs_per_message: f64,
    clock_reads_per_echo: Option<f64>,
    /// Median time inside the peer per echo (ns), timer cost taken out (stack mode).
    peer_ns: Option<f64>,
    /// Where a cross-core echo's time goes (`cores`, `stack-cores`): the medians of its parts,
    /// how many echoes were split, and the cache-line round trips before and after that pass.
    split: Option<(Split, usize, f64, f64)>,
    /// The p50 without the peer's share and the timer's cost: the stack's own (stack mode).
    own_ns: Option<f64>,
}

/// What one `Instant::now()` costs here: the median gap between two back to back, which is
/// what a start/stop pair adds to a timed interval.
fn instant_pair_ns() -> f64 {
    let mut v: Vec<f64> = (0..10_001)
        .map(|_| {
            let a = Instant::now();
            let b = Instant::now();
            (b - a).as_nanos() as f64
        })
        .collect();
    median(&mut v)
}

/// Chunks of an echo series, each between two short cache-line references.
const CHUNKS: usize = 8;
/// How far a chunk's references before and after it may differ: the larger at most 25% above
/// the smaller (the placements seen here, 38, 69 and 325 ns, differ 1.8x and more; two short
/// references on one placement differed by under 10% in 97% of 776 chunks, at most ~15%).
const REF_TOLERANCE: f64 = 0.25;
/// Attempts at a series before it is reported as placement unstable.
const ATTEMPTS: usize = 3;
/// Untimed echoes after each reference: they bring back the steady state the reference broke
/// (a peer on the last core that went to sleep after its idle spin, the lines where echoes
/// leave them).
const REWARM: usize = 32;

/// Round trips per batch of the short references around a series' chunks (5 batches each).
fn ref_batch(quick: bool) -> u64 {
    if quick {
        40
    } else {
        400
    }
}

/// One measurement of an echo series: every echo's time, the choice among its chunks, and the
/// counts over its timed echoes.
struct Attempt {
    times: Vec<f64>,
    sel: Selection,
    smcs: u64,
    reads: Option<u64>,
    allocs: u64,
}

/// `iters` timed echoes in [`CHUNKS`] chunks, a short cache-line reference before the first
/// and after each (the one after a chunk is the one before the next).
fn series(
    up: &mut Up,
    one: &mut dyn FnMut(&mut TipcDevice) -> Result<(), String>,
    iters: usize,
    pinger: &mut Pinger,
    quick: bool,
) -> Result<Attempt, String> {
    let mut times = Vec::with_capacity(iters);
    let mut chunks = Vec::with_capacity(CHUNKS);
    let (mut smcs, mut allocs) = (0, 0);
    let mut reads = up.clock_reads.as_ref().map(|_| 0);
    let mut before = pinger.short_rtt_ns(ref_batch(quick))?;
    for i in 0..CHUNKS {
        let n = iters / CHUNKS + if i == CHUNKS - 1 { iters % CHUNKS } else { 0 };
        for _ in 0..REWARM.min(n) {
            one(&mut up.dev)?;
        }
        let from = times.len();
        let smcs0 = (up.calls)();
        let reads0 = up.clock_reads.as_ref().map(|f| f());
        let allocs0 = allocs_on_this_thread();
        for _ in 0..n {
            let t = Instant::now();
            one(&mut up.dev)?;
            times.push(t.elapsed().as_nanos() as f64);
        }
        allocs += allocs_on_this_thread() - allocs0;
        smcs += (up.calls)() - smcs0;
        if let (Some(r), Some(f), Some(r0)) = (reads.as_mut(), up.clock_reads.as_ref(), reads0) {
            *r += f() - r0;
        }
        let mut chunk = times[from..].to_vec();
        chunk.sort_by(|a, b| a.total_cmp(b));
        let p50_ns = chunk.get(chunk.len() / 2).copied().unwrap_or(f64::NAN);
        let after = pinger.short_rtt_ns(ref_batch(quick))?;
        chunks.push(Chunk { p50_ns, ref_before_ns: before, ref_after_ns: after });
        before = after;
    }
    Ok(Attempt { times, sel: select(&chunks, REF_TOLERANCE), smcs, reads, allocs })
}

fn echo(up: &mut Up, size: usize, iters: usize, pinger: &mut Pinger, quick: bool) -> Result<EchoFigures, String> {
    let ch = up.dev.connect(ECHO_PORT).map_err(|e| format!("connect {ECHO_PORT}: {e}"))?;
    let msg = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let mut one = |dev: &mut TipcDevice| -> Result<(), String> {
        dev.send(ch, &[&msg], &[], WAIT).map_err(|e| format!("echo send: {e}"))?;
        let n = dev.recv(ch, &mut [&mut back], WAIT).map_err(|e| format!("echo recv: {e}"))?;
        if n != size {
            return Err(format!("echo returned {n} bytes, sent {size}"));
        }
        Ok(())
    };
    for _ in 0..iters.min(1000) {
        one(&mut up.dev)?;
    }
    // Measured again while the placement keeps changing under it, at most ATTEMPTS times; the
    // figures are the first stable attempt's, or the one that kept the most chunks.
    let mut best: Option<Attempt> = None;
    let mut attempts = 0;
    while attempts < ATTEMPTS && !best.as_ref().is_some_and(|b| b.sel.stable) {
        attempts += 1;
        let a = series(up, &mut one, iters, pinger, quick)?;
        // (`Option::is_none_or` is newer than the crate's rust-version.)
        if !matches!(&best, Some(b) if a.sel.chunks_kept() < b.sel.chunks_kept()) {
            best = Some(a);
        }
    }
    let Attempt { mut times, sel, smcs, reads, allocs } = best.ok_or("no echo series measured")?;
    times.sort_by(|a, b| a.total_cmp(b));
    let p50_ns = times[times.len() / 2];
    // A second pass with the peer's calls timed: the peer's share of an echo (median over the
    // echoes, the timer's cost taken out), so that what is left of the p50 is the stack's own.
    let mut peer_ns = None;
    let mut own_ns = None;
    if let Some(peer) = up.peer.clone() {
        let pair = instant_pair_ns();
        let mut shares = Vec::with_capacity(iters);
        peer.time_calls(true);
        for _ in 0..iters {
            let (ns0, calls0) = (peer.peer_ns(), (up.calls)());
            one(&mut up.dev)?;
            let calls = ((up.calls)() - calls0) as f64;
            shares.push((peer.peer_ns() - ns0) as f64 - calls * pair);
        }
        peer.time_calls(false);
        let p = median(&mut shares).max(0.0);
        peer_ns = Some(p);
        // The bench's own start/stop pair is in every sample too.
        own_ns = Some(p50_ns - pair - p);
    }
    // A third pass for a cross-core mode: each echo's call stamped on both cores, its time split
    // into the stack's work before and after the call, the two crossings and the peer's work.
    let mut split = None;
    if let Some(t) = up.timeline.clone() {
        let before = pinger.short_rtt_ns(ref_batch(quick))?;
        for _ in 0..REWARM {
            one(&mut up.dev)?;
        }
        let (parts, counted) = split_round_trips(&t, iters, || one(&mut up.dev))?;
        let after = pinger.short_rtt_ns(ref_batch(quick))?;
        split = Some((parts, counted, before, after));
    }
    up.dev.close(ch).map_err(|e| format!("close: {e}"))?;
    Ok(EchoFigures {
        split,
        ref_rtt_ns: sel.ref_ns,
        ratio: sel.ratio,
        stable: sel.stable,
        chunks_kept: sel.chunks_kept(),
        attempts,
        p50_ns,
        p99_ns: times[(times.len() * 99 / 100).min(times.len() - 1)],
        calls_per_echo: smcs as f64 / iters as f64,
        // Two messages per echo (there and back).
        allocs_per_message: allocs as f64 / (2 * iters) as f64,
        clock_reads_per_echo: reads.map(|r| r as f64 / iters as f64),
        peer_ns,
        own_ns,
    })
}

/// One-way streaming to the data sink: messages per second and MB/s (10^6 bytes).
fn stream(up: &mut Up, size: usize, iters: usize) -> Result<(f64, f64), String> {
    let ch = up.dev.connect(SINK_PORT).map_err(|e| format!("connect {SINK_PORT}: {e}"))?;
    let msg = vec![0x3cu8; size];
    for _ in 0..iters.min(1000) {
        up.dev.send(ch, &[&msg], &[], WAIT).map_err(|e| format!("stream send: {e}"))?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        up.dev.send(ch, &[&msg], &[], WAIT).map_err(|e| format!("stream send: {e}"))?;
    }
    let s = start.elapsed().as_secs_f64();
    up.dev.close(ch).map_err(|e| format!("close: {e}"))?;
    Ok((iters as f64 / s, (iters * size) as f64 / s / 1e6))
}

/// Echo round trips of the stack alone in a loop and nothing else (for `perf record` or
/// `perf stat -e task-clock`): prints the mean wall time per echo and, unless `no_ref`, a
/// cache-line round trip measured just before and just after the loop and the mean's ratio to
/// their mean (the placement of this VM's two vCPUs on the host changes within seconds; the
/// two differ when it changed during the loop). `no_ref` for callgrind: the reference's spin
/// loops would add a varying count of instructions.
fn stack_loop(mode: Mode, size: usize, rounds: u64, no_ref: bool) -> Result<(), String> {
    // As the full run does: the caller on core 0, the peer's thread on the last core. The
    // reference needs the caller on a known core whatever the mode.
    if (!no_ref || matches!(mode, Mode::Cores | Mode::StackCores)) && cpu_count() > 1 {
        pin_to_cpu(0);
    }
    let mut pinger = (!no_ref).then(Pinger::spawn);
    let mut up = bring_up(mode)?;
    let ch = up.dev.connect(ECHO_PORT).map_err(|e| format!("connect {ECHO_PORT}: {e}"))?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    // 5 x 1000 round trips: a few ms at most.
    let before = pinger.as_mut().map(|p| p.short_rtt_ns(1000)).transpose()?;
    let start = Instant::now();
    for _ in 0..rounds {
        up.dev.send(ch, &[&msg], &[], WAIT).map_err(|e| format!("echo send: {e}"))?;
        let n = up.dev.recv(ch, &mut [&mut back], WAIT).map_err(|e| format!("echo recv: {e}"))?;
        if n != size {
            return Err(format!("echo returned {n} bytes, sent {size}"));
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / rounds.max(1) as f64;
    let after = pinger.as_mut().map(|p| p.short_rtt_ns(1000)).transpose()?;
    match before.zip(after) {
        Some((b, a)) => println!(
            "{size} B: {ns:.0} ns per echo (wall, mean of {rounds}); cache-line RTT {b:.1}/{a:.1} ns before/after; {:.1}x",
            ns / ((b + a) / 2.0)
        ),
        None => println!("{size} B: {ns:.0} ns per echo (wall, mean of {rounds})"),
    }
    Ok(())
}

/// `--floor-loop ROUNDS`: the echo floor alone, as the loop modes print their echoes (ns per
/// echo, here the median of 5 batches of ROUNDS; the cache-line round trips just before and
/// after, the ratio to their mean).
fn floor_loop(rounds: u32) -> Result<(), String> {
    pin_to_cpu(0);
    let mut pinger = Pinger::spawn();
    let before = pinger.short_rtt_ns(1000)?;
    let ns = tipc_bench::floor::echo_floor_ns(5, rounds)?;
    let after = pinger.short_rtt_ns(1000)?;
    println!(
        "echo floor: {ns:.0} ns per echo (wall, median of 5 batches of {rounds}); cache-line RTT {before:.1}/{after:.1} ns before/after; {:.1}x",
        ns / ((before + after) / 2.0)
    );
    Ok(())
}

fn run(o: &Opts) -> Result<(), String> {
    let cpus = cpu_count();
    if cpus > 1 {
        pin_to_cpu(0);
    }
    let (rtt_iters, cpy_iters, echo_iters, stream_iters) =
        if o.quick { (1_000, 1_000, 200, 200) } else { (200_000, 2_000_000, 20_000, 50_000) };
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    // Host mailboxes made from here on (`cores`, `stack-cores`) stamp their calls.
    trusty_model::timeline::enable();
    let mut pinger = Pinger::spawn();
    // Once at the start, as before the per-series references: 3 batches of `rtt_iters` round
    // trips or 300 ms each.
    let rtt = pinger.rtt_ns(3, rtt_iters, Duration::from_millis(300))?;
    out.insert("reference.cacheline_rtt_ns".into(), rtt);
    for s in SIZES {
        out.insert(format!("reference.memcpy_ns.{s}"), memcpy_ns(s, cpy_iters));
    }
    let (call_ns, before, after) = mailbox_call_ns(&mut pinger, echo_iters, o.quick)?;
    out.insert("transport.mailbox_call_ns".into(), call_ns);
    out.insert("transport.ref_rtt_ns".into(), (before + after) / 2.0);
    let steady = references_agree(before, after, REF_TOLERANCE);
    out.insert("transport.ref_steady".into(), if steady { 1.0 } else { 0.0 });
    if cpus > 1 {
        let (floor_ns, before, after) = echo_floor(&mut pinger, o.quick)?;
        out.insert("reference.echo_floor_ns".into(), floor_ns);
        out.insert("reference.echo_floor_ref_rtt_ns".into(), (before + after) / 2.0);
        let steady = references_agree(before, after, REF_TOLERANCE);
        out.insert("reference.echo_floor_ref_steady".into(), if steady { 1.0 } else { 0.0 });
    }
    let mut calls = Vec::new();
    let mut allocs = Vec::new();
    for (name, mode) in MODES {
        if !o.modes.is_empty() && !o.modes.iter().any(|m| m == name) {
            continue;
        }
        let mut up = bring_up(mode)?;
        for s in SIZES {
            let e = echo(&mut up, s, echo_iters, &mut pinger, o.quick)?;
            out.insert(format!("echo.{name}.{s}.p50_ns"), e.p50_ns);
            out.insert(format!("echo.{name}.{s}.ref_rtt_ns"), e.ref_rtt_ns);
            out.insert(format!("echo.{name}.{s}.ratio"), e.ratio);
            out.insert(format!("echo.{name}.{s}.stable"), if e.stable { 1.0 } else { 0.0 });
            out.insert(format!("echo.{name}.{s}.chunks_kept"), e.chunks_kept as f64);
            out.insert(format!("echo.{name}.{s}.attempts"), e.attempts as f64);
            out.insert(format!("echo.{name}.{s}.p99_ns"), e.p99_ns);
            calls.push(e.calls_per_echo);
            out.insert(format!("calls_per_echo.{name}.{s}"), e.calls_per_echo);
            if let Some(r) = e.clock_reads_per_echo {
                out.insert(format!("clock_reads_per_echo.{name}.{s}"), r);
            }
            if let (Some(p), Some(own)) = (e.peer_ns, e.own_ns) {
                out.insert(format!("echo.{name}.{s}.peer_ns"), p);
                out.insert(format!("echo.{name}.{s}.own_ns"), own);
            }
            if let Some((parts, counted, before, after)) = e.split {
                let k = |part: &str| format!("echo.{name}.{s}.split.{part}");
                out.insert(k("before_call_ns"), parts.before);
                out.insert(k("request_ns"), parts.request);
                out.insert(k("serve_ns"), parts.serve);
                out.insert(k("answer_ns"), parts.answer);
                out.insert(k("after_call_ns"), parts.after);
                out.insert(k("echoes"), counted as f64);
                out.insert(k("ref_rtt_ns"), (before + after) / 2.0);
                out.insert(k("ref_steady"), if references_agree(before, after, REF_TOLERANCE) { 1.0 } else { 0.0 });
            }
            out.insert(format!("allocs_per_message.{name}.{s}"), e.allocs_per_message);
            // In `cores` and `stack-cores` modes the caller's thread runs only the stack, in
            // `stack` mode the stack and the echo peer (which allocates nothing per message):
            // their allocations are the data path's. In `sim` mode the model runs on the same
            // thread and is counted too.
            if mode != Mode::Sim {
                allocs.push(e.allocs_per_message);
            }
            let (msgs, mb) = stream(&mut up, s, stream_iters)?;
            out.insert(format!("stream.{name}.{s}.msgs_s"), msgs);
            out.insert(format!("stream.{name}.{s}.mb_s"), mb);
        }
    }
    out.insert("calls_per_echo".into(), calls.iter().cloned().fold(0.0, f64::max));
    out.insert("allocs_per_message".into(), allocs.iter().cloned().fold(0.0, f64::max));
    out.insert("machine.cpus".into(), cpus as f64);
    if o.json {
        print_json(&out);
    } else {
        print_table(&out, cpus, o.quick);
    }
    Ok(())
}

fn print_json(out: &BTreeMap<String, f64>) {
    let body: Vec<String> = out.iter().map(|(k, v)| format!("  \"{k}\": {}", fmt_num(*v))).collect();
    println!("{{\n{}\n}}", body.join(",\n"));
}

fn fmt_num(v: f64) -> String {
    if v.is_finite() {
        format!("{:.3}", v)
    } else {
        "null".into()
    }
}

fn print_table(out: &BTreeMap<String, f64>, cpus: usize, quick: bool) {
    let g = |k: &str| out.get(k).copied().unwrap_or(f64::NAN);
    let rtt = g("reference.cacheline_rtt_ns");
    println!("machine: {cpus} cpus; reference measured in this run");
    println!("cache-line round trip across cores, at the start of the run: {rtt:.1} ns");
    for s in SIZES {
        let m = g(&format!("reference.memcpy_ns.{s}"));
        println!("memcpy {s:>5} B in L1: {m:>8.1} ns  ({:.2} GB/s)", s as f64 / m);
    }
    let call = g("transport.mailbox_call_ns");
    if call.is_finite() {
        let r = g("transport.ref_rtt_ns");
        let steady = if g("transport.ref_steady") == 1.0 { "" } else { "; placement changed" };
        println!("the transport alone: a mailbox call answered at once by a thread polling on the other core,");
        println!("  the same words each time (only the sequence words' line crosses): p50 {call:.0} ns, {:.2}x its ref RTT {r:.1} ns{steady}", call / r);
    }
    let floor = g("reference.echo_floor_ns");
    if floor.is_finite() {
        let r = g("reference.echo_floor_ref_rtt_ns");
        let steady = if g("reference.echo_floor_ref_steady") == 1.0 { "" } else { "; placement changed" };
        println!("the echo floor: a 16 B echo's cache lines (mailbox, tx buffer, avail ring, rx buffer, used rings)");
        println!("  moved between the cores with no other work: {floor:.0} ns, {:.2}x its ref RTT {r:.1} ns{steady}", floor / r);
    }
    println!();
    println!(
        "echo round trip; ref RTT: the series' own cache-line round trip, {} short ones ({} round trips) before and after",
        CHUNKS + 1,
        5 * ref_batch(quick)
    );
    println!(
        "each of its {CHUNKS} chunks; a chunk whose two differ by more than {:.0}% is dropped; ref RTT and ratio are",
        REF_TOLERANCE * 100.0
    );
    println!("medians over the kept chunks (this VM's vCPUs change host cores within seconds)");
    println!("                                p50        p99     ref RTT   p50/ref RTT   chunks kept");
    let measured = |name: &str| out.contains_key(&format!("echo.{name}.16.p50_ns"));
    for (name, _) in MODES.iter().filter(|(n, _)| measured(n)) {
        for s in SIZES {
            let k = |f: &str| g(&format!("echo.{name}.{s}.{f}"));
            let attempts = k("attempts");
            let note = match (k("stable") == 1.0, attempts > 1.0) {
                (true, false) => String::new(),
                (true, true) => format!(" (attempt {attempts:.0})"),
                (false, _) => format!("  placement unstable ({attempts:.0} attempts)"),
            };
            println!(
                "  {name:<11} {s:>5} B  {:>8.2} us {:>8.2} us  {:>7.1} ns  {:>10.1}x   {:>3}/{CHUNKS}{note}",
                k("p50_ns") / 1e3,
                k("p99_ns") / 1e3,
                k("ref_rtt_ns"),
                k("ratio"),
                k("chunks_kept"),
            );
        }
    }
    let split_modes: Vec<&str> =
        ["cores", "stack-cores"].into_iter().filter(|n| out.contains_key(&format!("echo.{n}.16.split.echoes"))).collect();
    if !split_modes.is_empty() {
        println!("where a cross-core echo's time goes: medians of each part over one more pass of the series, each");
        println!("call stamped on both cores (time-stamp counter); before/after: the stack's work around the call;");
        println!("request/answer: a call crossing to the other core and back; peer: its work on the request");
        println!("                        before    request     peer    answer     after    ref RTT   echoes");
        for name in split_modes {
            for s in SIZES {
                let k = |part: &str| g(&format!("echo.{name}.{s}.split.{part}"));
                let steady = if k("ref_steady") == 1.0 { "" } else { "  placement changed" };
                println!(
                    "  {name:<11} {s:>5} B  {:>6.0} ns {:>6.0} ns {:>6.0} ns {:>6.0} ns {:>6.0} ns {:>6.1} ns  {:>7.0}{steady}",
                    k("before_call_ns"),
                    k("request_ns"),
                    k("serve_ns"),
                    k("answer_ns"),
                    k("after_call_ns"),
                    k("ref_rtt_ns"),
                    k("echoes"),
                );
            }
        }
    }
    if measured("stack") {
        println!("stack alone per echo: p50, the peer's share (timed), the stack's own (p50 - peer - timer),");
        println!("and that minus two L1 copies of the payload (target: under 150 ns)");
        for s in SIZES {
            let mean = g(&format!("echo.stack.{s}.p50_ns"));
            let peer = g(&format!("echo.stack.{s}.peer_ns"));
            let own = g(&format!("echo.stack.{s}.own_ns"));
            let m = g(&format!("reference.memcpy_ns.{s}"));
            println!("  stack  {s:>5} B  p50 {mean:>6.0} ns  peer {peer:>6.0} ns  own {own:>6.0} ns  own - 2 copies {:>6.0} ns", own - 2.0 * m);
        }
    }
    println!();
    println!("one-way streaming               msgs/s       MB/s   of L1 memcpy bandwidth");
    for (name, _) in MODES.iter().filter(|(n, _)| measured(n)) {
        for s in SIZES {
            let msgs = g(&format!("stream.{name}.{s}.msgs_s"));
            let mb = g(&format!("stream.{name}.{s}.mb_s"));
            let l1 = s as f64 / g(&format!("reference.memcpy_ns.{s}")) * 1e3;
            println!("  {name:<11} {s:>5} B  {:>10.0} {:>10.1}   1/{:.0}", msgs, mb, l1 / mb);
        }
    }
    println!();
    println!("secure calls per echo: {:.2}", g("calls_per_echo"));
    println!("clock reads per echo, the stack alone (stack, 16 B): {:.2}", g("clock_reads_per_echo.stack.16"));
    println!(
        "heap allocations per message, the stack alone (cores, stack, stack-cores; caller's thread): {:.2}",
        g("allocs_per_message")
    );
    if measured("sim") {
        println!(
            "heap allocations per message with the model on the same thread (sim, 16 B): {:.2}",
            g("allocs_per_message.sim.16")
        );
    }
}

fn main() {
    // A reader that goes away (`tipc-bench | head`) ends the bench quietly, as SIGPIPE ends a C
    // program: Rust starts with SIGPIPE ignored, and `println!` then panics on EPIPE. The bench
    // writes to no pipe or socket but its output.
    // SAFETY: sets a signal's disposition to the default, before any thread exists; no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let mut o = Opts { json: false, quick: false, modes: Vec::new(), stack_loop: None, no_ref: false, floor_loop: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--quick" => o.quick = true,
            "--no-ref" => o.no_ref = true,
            "--mode" => match args.next() {
                Some(m) if MODES.iter().any(|(n, _)| *n == m) => o.modes.push(m),
                m => {
                    eprintln!("tipc-bench: --mode takes one of sim, cores, stack, stack-cores (got {m:?})");
                    std::process::exit(2);
                }
            },
            "--stack-loop" | "--sim-loop" | "--cores-loop" | "--stack-cores-loop" => {
                let mode = match a.as_str() {
                    "--sim-loop" => Mode::Sim,
                    "--cores-loop" => Mode::Cores,
                    "--stack-cores-loop" => Mode::StackCores,
                    _ => Mode::Stack,
                };
                let size = args.next().and_then(|a| a.parse().ok()).filter(|&s: &usize| (1..=4000).contains(&s));
                let rounds = args.next().and_then(|a| a.parse().ok());
                let (Some(size), Some(rounds)) = (size, rounds) else {
                    eprintln!("tipc-bench: {a} takes SIZE (1..4000) and ROUNDS");
                    std::process::exit(2);
                };
                o.stack_loop = Some((mode, size, rounds));
            }
            "--floor-loop" => {
                let Some(rounds) = args.next().and_then(|a| a.parse().ok()).filter(|&r: &u32| r > 0) else {
                    eprintln!("tipc-bench: --floor-loop takes ROUNDS (1..2^32)");
                    std::process::exit(2);
                };
                o.floor_loop = Some(rounds);
            }
            "-h" | "--help" => {
                println!("usage: tipc-bench [--json] [--quick] [--mode sim|cores|stack|stack-cores]... | --stack-loop SIZE ROUNDS | --sim-loop SIZE ROUNDS | --cores-loop SIZE ROUNDS | --stack-cores-loop SIZE ROUNDS [--no-ref] | --floor-loop ROUNDS");
                return;
            }
            other => {
                eprintln!("tipc-bench: unknown argument '{other}' (expected --json, --quick, --mode, a loop mode, --no-ref, --floor-loop)");
                std::process::exit(2);
            }
        }
    }
    let r = match (o.stack_loop, o.floor_loop) {
        (Some((mode, size, rounds)), _) => stack_loop(mode, size, rounds, o.no_ref),
        (None, Some(rounds)) => floor_loop(rounds),
        (None, None) => run(&o),
    };
    if let Err(e) = r {
        eprintln!("tipc-bench: {e}");
        std::process::exit(1);
    }
}
