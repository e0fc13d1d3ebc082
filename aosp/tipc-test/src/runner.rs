//! Runs tests and reports them the way tipc-test does, plus a closing `N passed, M failed` line:
//! `tipc-test-cases`' runner in the [`StdEnv`].

use tipc_test_cases::runner as generic;
pub use tipc_test_cases::runner::{bench_json, BenchResult, Summary};

use crate::backend::TipcBackend;
use crate::cases::{Params, Rng, TestCase};
use crate::env::StdEnv;

/// Runs one test and then checks that the secure side saw nothing go wrong.
pub fn run_one(b: &mut dyn TipcBackend, t: &TestCase, p: &Params, rng: &mut Rng) -> Result<(), String> {
    generic::run_one(b, &StdEnv::new(), t, p, rng)
}

/// Runs `tests` in order, printing one result line each and the summary line in `env`.
pub fn run_tests(b: &mut dyn TipcBackend, env: &StdEnv, tests: &[&TestCase], p: &Params, rng: &mut Rng) -> Summary {
    generic::run_tests(b, env, tests, p, rng)
}

/// Runs `t` `n + 1` times: the first run is "cold", the other `n` give min / max / avg
/// (tipc-test's `-B`). Stops at the first failure.
pub fn bench(b: &mut dyn TipcBackend, env: &StdEnv, t: &TestCase, p: &Params, rng: &mut Rng, n: u32) -> Result<BenchResult, String> {
    generic::bench(b, env, t, p, rng, n)
}
