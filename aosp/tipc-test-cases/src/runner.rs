//! Runs tests and reports them the way tipc-test does, plus a closing `N passed, M failed` line.

use alloc::format;
use alloc::string::String;

use crate::backend::TipcBackend;
use crate::cases::{Params, Rng, TestCase};
use crate::env::{elapsed_us, TestEnv};

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tests that passed.
    pub passed: u32,
    /// Tests that failed.
    pub failed: u32,
}

/// Runs one test and then checks that the secure side saw nothing go wrong.
pub fn run_one(b: &mut dyn TipcBackend, env: &dyn TestEnv, t: &TestCase, p: &Params, rng: &mut Rng) -> Result<(), String> {
    (t.run)(b, env, p, rng)?;
    b.health()
}

/// Runs `tests` in order, printing one result line each and the summary line.
pub fn run_tests(b: &mut dyn TipcBackend, env: &dyn TestEnv, tests: &[&TestCase], p: &Params, rng: &mut Rng) -> Summary {
    let mut s = Summary::default();
    for t in tests {
        let start = env.now_us();
        let r = run_one(b, env, t, p, rng);
        let ms = elapsed_us(env, start) / 1000;
        match r {
            Ok(()) => {
                s.passed += 1;
                env.println(format_args!("PASS {} ({ms} ms)", t.name));
            }
            Err(e) => {
                s.failed += 1;
                env.println(format_args!("FAIL {} ({ms} ms): {e}", t.name));
            }
        }
    }
    env.println(format_args!("{} passed, {} failed", s.passed, s.failed));
    s
}

/// Timings of a benchmark, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchResult {
    /// Fastest warm run.
    pub min: u64,
    /// Slowest warm run.
    pub max: u64,
    /// Average of the warm runs.
    pub avg: u64,
    /// The first (cold) run.
    pub cold: u64,
}

/// Runs `t` `n + 1` times: the first run is "cold", the other `n` give min / max / avg
/// (tipc-test's `-B`). Stops at the first failure.
pub fn bench(b: &mut dyn TipcBackend, env: &dyn TestEnv, t: &TestCase, p: &Params, rng: &mut Rng, n: u32) -> Result<BenchResult, String> {
    let mut r = BenchResult { min: u64::MAX, max: 0, avg: 0, cold: 0 };
    let mut total = 0u64;
    for i in 0..=n {
        let start = env.now_us();
        run_one(b, env, t, p, rng)?;
        let us = elapsed_us(env, start);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Errno, Handle};
    use crate::cases::Outcome;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};
    use core::fmt;
    use core::time::Duration;

    /// A clock that moves only when slept on or read (each read advances it by `tick_us`).
    struct FakeEnv {
        now: Cell<u64>,
        tick_us: u64,
        lines: RefCell<Vec<String>>,
    }

    impl FakeEnv {
        fn new(tick_us: u64) -> FakeEnv {
            FakeEnv { now: Cell::new(0), tick_us, lines: RefCell::new(Vec::new()) }
        }
    }

    impl TestEnv for FakeEnv {
        fn now_us(&self) -> u64 {
            let t = self.now.get();
            self.now.set(t + self.tick_us);
            t
        }
        fn sleep(&self, d: Duration) {
            self.now.set(self.now.get() + d.as_micros() as u64);
        }
        fn println(&self, args: fmt::Arguments<'_>) {
            self.lines.borrow_mut().push(args.to_string());
        }
    }

    /// A backend with nothing behind it, whose health is set by the test.
    struct Nothing {
        healthy: bool,
    }

    impl TipcBackend for Nothing {
        fn describe(&self) -> String {
            "nothing".into()
        }
        fn connect(&mut self, _: &str) -> Result<Handle, Errno> {
            Err(Errno(tipc::errno::ENOTCONN))
        }
        fn writev(&mut self, _: Handle, _: &[&[u8]]) -> Result<usize, Errno> {
            Err(Errno(tipc::errno::EBADF))
        }
        fn readv(&mut self, _: Handle, _: &mut [&mut [u8]], _: Option<Duration>) -> Result<usize, Errno> {
            Err(Errno(tipc::errno::EBADF))
        }
        fn wait_readable(&mut self, _: Handle, _: Duration) -> Result<bool, Errno> {
            Err(Errno(tipc::errno::EBADF))
        }
        fn close(&mut self, _: Handle) -> Result<(), Errno> {
            Err(Errno(tipc::errno::EBADF))
        }
        fn health(&mut self) -> Result<(), String> {
            if self.healthy {
                Ok(())
            } else {
                Err("secure side fell over".into())
            }
        }
    }

    fn pass(_: &mut dyn TipcBackend, env: &dyn TestEnv, _: &Params, _: &mut Rng) -> Outcome {
        env.sleep(Duration::from_millis(3));
        Ok(())
    }

    fn fail(_: &mut dyn TipcBackend, _: &dyn TestEnv, _: &Params, _: &mut Rng) -> Outcome {
        Err("boom".into())
    }

    const PASS: TestCase = TestCase { name: "pass", run: pass };
    const FAIL: TestCase = TestCase { name: "fail", run: fail };

    #[test]
    fn run_tests_prints_a_line_per_test_and_the_summary() {
        let env = FakeEnv::new(0);
        let mut b = Nothing { healthy: true };
        let s = run_tests(&mut b, &env, &[&PASS, &FAIL, &PASS], &Params::default(), &mut Rng::new(1));
        assert_eq!(s, Summary { passed: 2, failed: 1 });
        assert_eq!(*env.lines.borrow(), ["PASS pass (3 ms)", "FAIL fail (0 ms): boom", "PASS pass (3 ms)", "2 passed, 1 failed"]);
    }

    #[test]
    fn an_unhealthy_secure_side_fails_a_passing_test() {
        let env = FakeEnv::new(0);
        let mut b = Nothing { healthy: false };
        assert_eq!(run_one(&mut b, &env, &PASS, &Params::default(), &mut Rng::new(1)), Err("secure side fell over".into()));
        let s = run_tests(&mut b, &env, &[&PASS], &Params::default(), &mut Rng::new(1));
        assert_eq!(s, Summary { passed: 0, failed: 1 });
        assert_eq!(*env.lines.borrow(), ["FAIL pass (3 ms): secure side fell over", "0 passed, 1 failed"]);
    }

    #[test]
    fn bench_times_by_the_environment_clock() {
        let env = FakeEnv::new(0);
        let mut b = Nothing { healthy: true };
        let r = bench(&mut b, &env, &PASS, &Params::default(), &mut Rng::new(1), 4).unwrap();
        assert_eq!(r, BenchResult { min: 3000, max: 3000, avg: 3000, cold: 3000 });
        let r = bench(&mut b, &env, &PASS, &Params::default(), &mut Rng::new(1), 0).unwrap();
        assert_eq!(r, BenchResult { min: 0, max: 0, avg: 0, cold: 3000 });
        assert_eq!(bench(&mut b, &env, &FAIL, &Params::default(), &mut Rng::new(1), 3), Err("boom".into()));
        assert!(env.lines.borrow().is_empty(), "bench prints nothing");
    }

    #[test]
    fn refusals_are_what_connect_foo_wants_and_no_service_fails_connect() {
        let env = FakeEnv::new(1);
        let mut b = Nothing { healthy: true };
        let p = Params { silent: true, ..Params::default() };
        let foo = crate::cases::find("connect_foo").unwrap();
        assert_eq!(run_one(&mut b, &env, foo, &p, &mut Rng::new(1)), Ok(()));
        let connect = crate::cases::find("connect").unwrap();
        assert_eq!(
            run_one(&mut b, &env, connect, &p, &mut Rng::new(1)),
            Err("failed to connect to 'com.android.ipc-unittest.srv.echo': ENOTCONN".into())
        );
        assert!(env.lines.borrow().is_empty(), "silent");
    }
}
