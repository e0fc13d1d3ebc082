//! `tipc-bench`: the machine reference (a cache line bounced between two cores, memcpy in L1)
//! and the stack's figures against it, measured in the same run: echo round trips (p50/p99) and
//! one-way streaming for `-D sim` (the model inside each call), `-D sim-cores` (the model
//! polling a mailbox on the other core), `stack` (the normal-world stack alone, against the
//! minimal echo peer of [`tipc_bench::stack_peer`] run inside each call) and `stack-cores` (the
//! same peer polling the mailbox on the other core: the stack and its cross-core transport
//! without the model's work), secure calls per echo and heap allocations per message on the
//! caller's thread.
//!
//! `--json` prints the same figures as one JSON object; `--quick` runs few iterations (a smoke
//! run: it checks that everything runs, not how fast).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use trusty_stack::{bring_up_platform, StackConfig};
use tipc::{Timeout, TipcDevice};
use tipc_bench::alloc_count::{allocs_on_this_thread, CountingAlloc};
use tipc_bench::stack_peer::{self, Placement};
use trusty_model::host::{cpu_count, pin_to_cpu, ModelMode};

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
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Round trip of one cache line between this thread (core 0) and a thread on the last core:
/// this side writes an odd value, the other answers with the next even one. Median of 3
/// batches, each at most `iters` round trips or 300 ms (a loaded machine deschedules spinners).
fn cacheline_rtt_ns(iters: u64) -> f64 {
    #[repr(align(128))]
    struct Line(AtomicU64);
    const STOP: u64 = u64::MAX;
    let line = Arc::new(Line(AtomicU64::new(0)));
    let l = line.clone();
    let other = cpu_count().saturating_sub(1);
    let t = std::thread::spawn(move || {
        pin_to_cpu(other);
        loop {
            // Acquire/Release: a plain ping-pong of one word; the orderings add nothing to the
            // line's transfer on arm64 or x86, which is what is measured.
            let v = l.0.load(Ordering::Acquire);
            if v == STOP {
                return;
            }
            if v % 2 == 1 {
                l.0.store(v + 1, Ordering::Release);
            }
            std::hint::spin_loop();
        }
    });
    let mut batches = Vec::new();
    let mut v = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let mut n = 0;
        while n < iters {
            line.0.store(v + 1, Ordering::Release);
            while line.0.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
            n += 1;
            if n % 1024 == 0 && start.elapsed().as_millis() >= 300 {
                break;
            }
        }
        batches.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    line.0.store(STOP, Ordering::Release);
    let _ = t.join();
    median(&mut batches)
}

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

/// A stack brought up against one peer, and how to count the calls it made into that peer.
struct Up {
    dev: TipcDevice,
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
    let model_mode = match mode {
        Mode::Sim => ModelMode::Sync,
        Mode::Cores => ModelMode::Cores,
        Mode::Stack | Mode::StackCores => {
            let placement = if mode == Mode::Stack { Placement::InCall } else { Placement::OtherCore };
            let rig = stack_peer::bring_up_at(StackConfig::default().tipc, placement)?;
            let (peer, peer2) = (rig.peer.clone(), rig.peer.clone());
            return Ok(Up {
                dev: rig.dev,
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
    Ok(Up { dev, calls: Box::new(move || sim.model().stats().smcs), clock_reads: None, peer: None })
}

struct EchoFigures {
    p50_ns: f64,
    p99_ns: f64,
    calls_per_echo: f64,
    allocs_per_message: f64,
    clock_reads_per_echo: Option<f64>,
    /// Median time inside the peer per echo (ns), timer cost taken out (stack mode).
    peer_ns: Option<f64>,
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

fn echo(up: &mut Up, size: usize, iters: usize) -> Result<EchoFigures, String> {
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
    let mut times = Vec::with_capacity(iters);
    let smcs0 = (up.calls)();
    let reads0 = up.clock_reads.as_ref().map(|f| f());
    let allocs0 = allocs_on_this_thread();
    for _ in 0..iters {
        let t = Instant::now();
        one(&mut up.dev)?;
        times.push(t.elapsed().as_nanos() as f64);
    }
    let allocs = allocs_on_this_thread() - allocs0;
    let smcs = (up.calls)() - smcs0;
    let reads = up.clock_reads.as_ref().zip(reads0).map(|(f, r0)| f() - r0);
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
    up.dev.close(ch).map_err(|e| format!("close: {e}"))?;
    Ok(EchoFigures {
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
/// `perf stat -e task-clock`): prints the mean wall time per echo.
fn stack_loop(mode: Mode, size: usize, rounds: u64) -> Result<(), String> {
    // As the full run does: the caller on core 0, the peer's thread on the last core.
    if matches!(mode, Mode::Cores | Mode::StackCores) && cpu_count() > 1 {
        pin_to_cpu(0);
    }
    let mut up = bring_up(mode)?;
    let ch = up.dev.connect(ECHO_PORT).map_err(|e| format!("connect {ECHO_PORT}: {e}"))?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..rounds {
        up.dev.send(ch, &[&msg], &[], WAIT).map_err(|e| format!("echo send: {e}"))?;
        let n = up.dev.recv(ch, &mut [&mut back], WAIT).map_err(|e| format!("echo recv: {e}"))?;
        if n != size {
            return Err(format!("echo returned {n} bytes, sent {size}"));
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / rounds.max(1) as f64;
    println!("{size} B: {ns:.0} ns per echo (wall, mean of {rounds})");
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
    let rtt = cacheline_rtt_ns(rtt_iters);
    out.insert("reference.cacheline_rtt_ns".into(), rtt);
    for s in SIZES {
        out.insert(format!("reference.memcpy_ns.{s}"), memcpy_ns(s, cpy_iters));
    }
    let mut calls = Vec::new();
    let mut allocs = Vec::new();
    for (name, mode) in MODES {
        if !o.modes.is_empty() && !o.modes.iter().any(|m| m == name) {
            continue;
        }
        let mut up = bring_up(mode)?;
        for s in SIZES {
            let e = echo(&mut up, s, echo_iters)?;
            out.insert(format!("echo.{name}.{s}.p50_ns"), e.p50_ns);
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
        print_table(&out, cpus);
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

fn print_table(out: &BTreeMap<String, f64>, cpus: usize) {
    let g = |k: &str| out.get(k).copied().unwrap_or(f64::NAN);
    let rtt = g("reference.cacheline_rtt_ns");
    println!("machine: {cpus} cpus; reference measured in this run");
    println!("cache-line round trip across cores: {rtt:.1} ns");
    for s in SIZES {
        let m = g(&format!("reference.memcpy_ns.{s}"));
        println!("memcpy {s:>5} B in L1: {m:>8.1} ns  ({:.2} GB/s)", s as f64 / m);
    }
    println!();
    println!("echo round trip                 p50        p99   p50/cache-line RTT");
    let measured = |name: &str| out.contains_key(&format!("echo.{name}.16.p50_ns"));
    for (name, _) in MODES.iter().filter(|(n, _)| measured(n)) {
        for s in SIZES {
            let p50 = g(&format!("echo.{name}.{s}.p50_ns"));
            let p99 = g(&format!("echo.{name}.{s}.p99_ns"));
            println!("  {name:<11} {s:>5} B  {:>8.2} us {:>8.2} us  {:>8.1}x", p50 / 1e3, p99 / 1e3, p50 / rtt);
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
    let mut o = Opts { json: false, quick: false, modes: Vec::new(), stack_loop: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--quick" => o.quick = true,
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
            "-h" | "--help" => {
                println!("usage: tipc-bench [--json] [--quick] [--mode sim|cores|stack|stack-cores]... | --stack-loop SIZE ROUNDS | --sim-loop SIZE ROUNDS | --cores-loop SIZE ROUNDS | --stack-cores-loop SIZE ROUNDS");
                return;
            }
            other => {
                eprintln!("tipc-bench: unknown argument '{other}' (expected --json, --quick, --mode)");
                std::process::exit(2);
            }
        }
    }
    let r = match o.stack_loop {
        Some((mode, size, rounds)) => stack_loop(mode, size, rounds),
        None => run(&o),
    };
    if let Err(e) = r {
        eprintln!("tipc-bench: {e}");
        std::process::exit(1);
    }
}
