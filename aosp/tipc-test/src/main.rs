//! tipc-test: AOSP's TIPC test tool, in Rust, running against the embedded Trusty model by
//! default. `tipc-test -t all` runs every test and ends with `N passed, M failed`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tipc_test::backend::{SimBackend, TipcBackend};
use tipc_test::cases::{self, Params, Rng, TestCase};
use tipc_test::runner;
use trusty_model::host::ModelMode;
use trusty_model::ModelConfig;

#[derive(Parser, Debug)]
#[command(name = "tipc-test", about = "Run AOSP's TIPC tests against Trusty (by default, the embedded model)")]
struct Args {
    /// Device: `sim` (the model runs inside each call), `sim-threaded` (the model runs on its
    /// own thread)
    #[arg(short = 'D', long = "dev", default_value = "sim")]
    dev: String,
    /// Service name for the `connect` test
    #[arg(short = 'S', long = "srv")]
    srv: Option<String>,
    /// Test to run, or `all`
    #[arg(short = 't', long = "test")]
    test: Option<String>,
    /// Repeat count
    #[arg(short = 'r', long = "repeat", default_value_t = 1)]
    repeat: u32,
    /// Burst count
    #[arg(short = 'b', long = "burst", default_value_t = 32)]
    burst: u32,
    /// Max message size
    #[arg(short = 'm', long = "msgsize", default_value_t = 32)]
    msgsize: usize,
    /// Variable message size (random, below msgsize)
    #[arg(short = 'v', long = "variable")]
    variable: bool,
    /// Silent
    #[arg(short = 's', long = "silent")]
    silent: bool,
    /// Run as a benchmark N times and print JSON (min/max/avg/cold in microseconds)
    #[arg(short = 'B', long = "bench", default_value_t = 0)]
    bench: u32,
    /// How long blocked_read waits for the message that never comes, in ms
    #[arg(long = "blocked-read-ms", default_value_t = 500)]
    blocked_read_ms: u64,
}

fn list_tests() -> String {
    let mut s = String::from("tests: all");
    for t in cases::ALL {
        s.push(' ');
        s.push_str(t.name);
    }
    s
}

fn open_backend(dev: &str) -> Result<Box<dyn TipcBackend>, String> {
    let mode = match dev {
        "sim" => ModelMode::Sync,
        "sim-threaded" => ModelMode::Threaded,
        other => return Err(format!("unknown device '{other}': use sim or sim-threaded")),
    };
    Ok(Box::new(SimBackend::new(mode, ModelConfig::default(), Default::default())?))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(test) = args.test.clone() else {
        eprintln!("need a test to run (-t NAME or -t all)\n{}", list_tests());
        return ExitCode::FAILURE;
    };
    let selected: Vec<&'static TestCase> = if test == "all" {
        cases::ALL.iter().collect()
    } else if let Some(t) = cases::find(&test) {
        vec![t]
    } else if let Some((_, why)) = cases::UNSUPPORTED.iter().find(|(n, _)| *n == test) {
        eprintln!("test '{test}' cannot run here: {why}");
        return ExitCode::FAILURE;
    } else {
        eprintln!("unrecognized test name '{test}'\n{}", list_tests());
        return ExitCode::FAILURE;
    };
    let params = Params {
        repeat: args.repeat,
        msgsize: args.msgsize,
        burst: args.burst,
        variable: args.variable,
        silent: args.silent || args.bench > 0,
        srv: args.srv.clone(),
        blocked_read_timeout: Duration::from_millis(args.blocked_read_ms),
    };
    let mut backend = match open_backend(&args.dev) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tipc-test: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.bench > 0 {
        // Keep stdout pure JSON in benchmark mode.
        eprintln!("{}", backend.describe());
    } else if !args.silent {
        println!("{}", backend.describe());
    }
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    if args.bench > 0 {
        let mut failed = false;
        for t in &selected {
            match runner::bench(&mut *backend, t, &params, &mut rng, args.bench) {
                Ok(r) => println!("{}", runner::bench_json(t.name, &r)),
                Err(e) => {
                    eprintln!("FAIL {}: {e}", t.name);
                    failed = true;
                }
            }
        }
        return if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    }
    let summary = runner::run_tests(&mut *backend, &selected, &params, &mut rng);
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
