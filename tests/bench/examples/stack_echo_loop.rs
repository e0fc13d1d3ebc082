//! Echo round trips of the stack alone against the stack peer, in a loop, for a profiler:
//! `cargo build --release -p tipc-bench --example stack_echo_loop &&
//!  perf record -g target/release/examples/stack_echo_loop [SIZE [ROUNDS]]`.

use std::time::Instant;

use tipc::Timeout;
use tipc_bench::stack_peer::{self, ECHO_PORT};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(Ok(16), |a| a.parse()).map_err(|e| format!("SIZE: {e}"))?;
    let rounds: u64 = args.next().map_or(Ok(2_000_000), |a| a.parse()).map_err(|e| format!("ROUNDS: {e}"))?;
    let mut rig = stack_peer::bring_up(tipc::Config::default())?;
    let ch = rig.dev.connect(ECHO_PORT).map_err(|e| e.to_string())?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..rounds {
        rig.dev.send(ch, &[&msg], &[], Timeout::Ms(5_000)).map_err(|e| e.to_string())?;
        let n = rig.dev.recv(ch, &mut [&mut back], Timeout::Ms(5_000)).map_err(|e| e.to_string())?;
        if n != size {
            return Err(format!("echo returned {n} bytes, sent {size}"));
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / rounds as f64;
    println!("{size} B: {ns:.0} ns per echo (mean of {rounds}), {:.2} calls per echo", rig.peer.stats().calls as f64 / rounds as f64);
    Ok(())
}
