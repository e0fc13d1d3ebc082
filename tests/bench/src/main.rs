//! `tipc-bench`: the machine reference (a cache line bounced between two cores, memcpy in L1)
//! and the stack's figures against it, measured in the same run: echo round trips (p50/p99) and
//! one-way streaming for `-D sim` (the model inside each call) and `-D sim-cores` (the model
//! polling a mailbox on the other core), secure calls per echo and heap allocations per message
//! on the caller's thread.
//!
//! `--json` prints the same figures as one JSON object; `--quick` runs few iterations (a smoke
//! run: it checks that everything runs, not how fast).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use trusty_stack::{bring_up_platform, StackConfig};
use tipc::{Timeout, TipcDevice};
use trusty_model::host::{cpu_count, pin_to_cpu, ModelMode, Sim};

/// Counts heap allocations made on the thread that asks (the model's own thread in `cores`
/// mode is not the stack's cost and is not counted).
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// const-initialised thread-local without a destructor, so touching it never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocs_here() -> u64 {
    ALLOCS.with(|c| c.get())
}

const SIZES: [usize; 4] = [16, 256, 1024, 4000];
const ECHO_PORT: &str = "com.android.ipc-unittest.srv.echo";
const SINK_PORT: &str = "com.android.ipc-unittest.srv.datasink";
/// Every wait in the bench is bounded: a stuck peer fails the run instead of hanging it.
const WAIT: Timeout = Timeout::Ms(5_000);

struct Opts {
    json: bool,
    quick: bool,
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

struct Up {
    sim: Sim,
    dev: TipcDevice,
}

fn bring_up(mode: ModelMode) -> Result<Up, String> {
    let profile = platforms::by_name("native-api5").ok_or("built-in profile native-api5 missing")?;
    let sim = profile.boot(mode);
    let (dev, _) = bring_up_platform(profile.access(&sim), StackConfig::default()).map_err(|e| e.to_string())?;
    Ok(Up { sim, dev })
}

struct EchoFigures {
    p50_ns: f64,
    p99_ns: f64,
    calls_per_echo: f64,
    allocs_per_message: f64,
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
    let smcs0 = up.sim.model().stats().smcs;
    let allocs0 = allocs_here();
    for _ in 0..iters {
        let t = Instant::now();
        one(&mut up.dev)?;
        times.push(t.elapsed().as_nanos() as f64);
    }
    let allocs = allocs_here() - allocs0;
    let smcs = up.sim.model().stats().smcs - smcs0;
    up.dev.close(ch).map_err(|e| format!("close: {e}"))?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(EchoFigures {
        p50_ns: times[times.len() / 2],
        p99_ns: times[(times.len() * 99 / 100).min(times.len() - 1)],
        calls_per_echo: smcs as f64 / iters as f64,
        // Two messages per echo (there and back).
        allocs_per_message: allocs as f64 / (2 * iters) as f64,
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
    for (name, mode) in [("sim", ModelMode::Sync), ("cores", ModelMode::Cores)] {
        let mut up = bring_up(mode)?;
        for s in SIZES {
            let e = echo(&mut up, s, echo_iters)?;
            out.insert(format!("echo.{name}.{s}.p50_ns"), e.p50_ns);
            out.insert(format!("echo.{name}.{s}.p99_ns"), e.p99_ns);
            calls.push(e.calls_per_echo);
            out.insert(format!("allocs_per_message.{name}.{s}"), e.allocs_per_message);
            // In `cores` mode the caller's thread runs only the stack: its allocations are the
            // data path's. In `sim` mode the model runs on the same thread and is counted too.
            if mode == ModelMode::Cores {
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
    println!("echo round trip            p50        p99   p50/cache-line RTT");
    for name in ["sim", "cores"] {
        for s in SIZES {
            let p50 = g(&format!("echo.{name}.{s}.p50_ns"));
            let p99 = g(&format!("echo.{name}.{s}.p99_ns"));
            println!("  {name:<6} {s:>5} B  {:>8.2} us {:>8.2} us  {:>8.1}x", p50 / 1e3, p99 / 1e3, p50 / rtt);
        }
    }
    println!();
    println!("one-way streaming          msgs/s       MB/s   of L1 memcpy bandwidth");
    for name in ["sim", "cores"] {
        for s in SIZES {
            let msgs = g(&format!("stream.{name}.{s}.msgs_s"));
            let mb = g(&format!("stream.{name}.{s}.mb_s"));
            let l1 = s as f64 / g(&format!("reference.memcpy_ns.{s}")) * 1e3;
            println!("  {name:<6} {s:>5} B  {:>10.0} {:>10.1}   1/{:.0}", msgs, mb, l1 / mb);
        }
    }
    println!();
    println!("secure calls per echo: {:.2}", g("calls_per_echo"));
    println!("heap allocations per message, the stack alone (cores mode, caller's thread): {:.2}", g("allocs_per_message"));
    println!(
        "heap allocations per message with the model on the same thread (sim, 16 B): {:.2}",
        g("allocs_per_message.sim.16")
    );
}

fn main() {
    let mut o = Opts { json: false, quick: false };
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--json" => o.json = true,
            "--quick" => o.quick = true,
            "-h" | "--help" => {
                println!("usage: tipc-bench [--json] [--quick]");
                return;
            }
            other => {
                eprintln!("tipc-bench: unknown argument '{other}' (expected --json, --quick)");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&o) {
        eprintln!("tipc-bench: {e}");
        std::process::exit(1);
    }
}
