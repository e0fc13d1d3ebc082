//! Runs tests and reports them the way tipc-test does, plus a closing `N passed, M failed` line.

use std::time::Instant;

use crate::backend::TipcBackend;
use crate::cases::{Params, Rng, TestCase};

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
}

/// Runs one test and then checks that the secure side saw nothing go wrong.
pub fn run_one(b: &mut dyn TipcBackend, t: &TestCase, p: &Params, rng: &mut Rng) -> Result<(), String> {
    (t.run)(b, p, rng)?;
    b.health()
}

/// Runs `tests` in order, printing one result line each and the summary line.
pub fn run_tests(b: &mut dyn TipcBackend, tests: &[&TestCase], p: &Params, rng: &mut Rng) -> Summary {
    let mut s = Summary::default();
    for t in tests {
        let start = Instant::now();
        let r = run_one(b, t, p, rng);
        let ms = start.elapsed().as_millis();
        match r {
            Ok(()) => {
                s.passed += 1;
                println!("PASS {} ({ms} ms)", t.name);
            }
            Err(e) => {
                s.failed += 1;
                println!("FAIL {} ({ms} ms): {e}", t.name);
            }
        }
    }
    println!("{} passed, {} failed", s.passed, s.failed);
    s
}

/// Timings of a benchmark, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchResult {
    pub min: u64,
    pub max: u64,
    pub avg: u64,
    pub cold: u64,
}

/// Runs `t` `n + 1` times: the first run is "cold", the other `n` give min / max / avg
/// (tipc-test's `-B`). Stops at the first failure.
pub fn bench(b: &mut dyn TipcBackend, t: &TestCase, p: &Params, rng: &mut Rng, n: u32) -> Result<BenchResult, String> {
    let mut r = BenchResult { min: u64::MAX, max: 0, avg: 0, cold: 0 };
    let mut total = 0u64;
    for i in 0..=n {
        let start = Instant::now();
        run_one(b, t, p, rng)?;
        let us = start.elapsed().as_micros() as u64;
        if i == 0 {
            r.cold = us;
        } else {
            r.min = r.min.min(us);
            r.max = r.max.max(us);
            total += us;
        }
    }
    r.avg = total / u64::from(n.max(1));
    if n == 0 {
        r.min = 0;
    }
    Ok(r)
}

/// tipc-test's benchmark JSON (schema version 3), as valid JSON: the C template leaves a
/// trailing comma after the results entry, which is dropped here.
pub fn bench_json(name: &str, r: &BenchResult) -> String {
    format!(
        "{{\n    \"schema_version\": 3,\n    \"suite_name\": \"tipc\",\n    \"bench_name\": \"{name}\",\n    \"results\": [\n        {{\n            \"metric_name\": \"time_micro_sec\",\n            \"min\": \"{min}\",\n            \"max\": \"{max}\",\n            \"avg\": \"{avg}\",\n            \"cold\": \"{cold}\",\n            \"raw_min\": {min},\n            \"raw_max\": {max},\n            \"raw_avg\": {avg},\n            \"raw_cold\": {cold}\n        }}\n    ]\n}}",
        min = r.min,
        max = r.max,
        avg = r.avg,
        cold = r.cold
    )
}
