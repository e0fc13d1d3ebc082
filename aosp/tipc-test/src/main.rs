//! tipc-test: AOSP's TIPC test tool, in Rust, running against the embedded Trusty model by
//! default, or against a real Trusty through a Linux trusty-ipc device (`-D /dev/trusty-ipc-dev0`).
//! `tipc-test -t all` runs every test and ends with `N passed, M failed`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use trusty_stack::StackConfig;
use tipc_test::backend::{SimBackend, TipcBackend};
use tipc_test::cases::{self, Params, Rng, TestCase};
use tipc_test::kernel::KernelBackend;
use tipc_test::runner;
use tipc_test::StdEnv;
use trusty_model::host::ModelMode;
use trusty_model::Variant;
use trusty_platform::plan::Mechanism;

/// `println!` to stdout through [`tipc_test::env::print_line`]: a reader that went away ends the
/// program quietly instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        tipc_test::env::print_line(format_args!($($arg)*))
    };
}

#[derive(Parser, Debug)]
#[command(name = "tipc-test", about = "Run AOSP's TIPC tests against Trusty (by default, the embedded model)")]
struct Args {
    /// Device: `sim` (the model runs inside each call), `sim-threaded` (the model runs on its
    /// own thread), `sim-cores` (the model polls a mailbox on another core, as a Trusty VM
    /// does), a platform profile name (as --platform), the path of a Linux trusty-ipc
    /// device such as /dev/trusty-ipc-dev0, the path of trusty-ipcd's socket,
    /// `VSOCK:[STREAM:|SEQPACKET:]cid:port`, or `lib:NAME` for libtrusty's own device NAME
    /// (e.g. `lib:sim`: file descriptors from its in-process stack). Default: like AOSP,
    /// /dev/trusty-ipc-dev0 where it exists, else `sim`
    #[arg(short = 'D', long = "dev")]
    dev: Option<String>,
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
    /// Platform profile (see --list-platforms) or a DTB file made by --write-dtb; embedded
    /// model only
    #[arg(long = "platform", default_value = "native-api5")]
    platform: String,
    /// Share memory this way whatever the platform is, to demonstrate a wrong decision:
    /// phys, phys-attr, ffa-handle, mediated-ipa, xen-grant; embedded model only
    #[arg(long = "force-sharing")]
    force_sharing: Option<String>,
    /// Which Trusty the embedded model follows: `upstream` (AOSP trusty/kernel) or `nxp`
    /// (NXP's tree with its DomU-reboot patches); embedded model only
    #[arg(long = "model", default_value = "upstream")]
    model: String,
    /// List the platform profiles and exit
    #[arg(long = "list-platforms")]
    list_platforms: bool,
    /// Write the platform's device tree (with its machine description) to FILE and exit
    #[arg(long = "write-dtb", value_name = "FILE")]
    write_dtb: Option<std::path::PathBuf>,
}

fn list_tests() -> String {
    let mut s = String::from("tests: all");
    for t in cases::ALL {
        s.push(' ');
        s.push_str(t.name);
    }
    s
}

fn load_platform(name: &str) -> Result<platforms::Profile, String> {
    if let Some(p) = platforms::by_name(name) {
        return Ok(p);
    }
    if name.ends_with(".dtb") || std::path::Path::new(name).exists() {
        let bytes = std::fs::read(name).map_err(|e| format!("cannot read {name}: {e}"))?;
        return platforms::from_dtb(&bytes);
    }
    Err(format!("unknown platform '{name}' (profiles: {})", platforms::names().join(", ")))
}

fn parse_mechanism(name: &str, profile: &platforms::Profile) -> Result<Mechanism, String> {
    let backend = match profile.machine.model.path {
        trusty_model::model::Path::XenVm { domid } => domid,
        _ => 0,
    };
    Mechanism::from_name(name, backend).ok_or_else(|| {
        format!("unknown sharing mechanism '{name}': phys, phys-attr, ffa-handle, mediated-ipa, xen-grant")
    })
}

/// What `-D` names: the embedded model, a trusty-ipc device, or another libtrusty device.
enum Target {
    Model(ModelMode),
    Device(String),
    Library(String),
}

/// AOSP's tipc-test default device.
const ANDROID_DEVICE: &str = "/dev/trusty-ipc-dev0";

/// The device `-D` names, or the default: Android's device where it exists, else the model.
fn default_dev(dev: Option<&str>) -> String {
    match dev {
        Some(d) => d.to_owned(),
        None if std::path::Path::new(ANDROID_DEVICE).exists() => ANDROID_DEVICE.to_owned(),
        None => "sim".to_owned(),
    }
}

/// Whether `path` is a socket (trusty-ipcd's).
fn is_socket(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Opens the device before any test runs: a missing device fails at once.
fn open_device(path: &str) -> Result<KernelBackend, String> {
    KernelBackend::open(path).map_err(|e| {
        // A bare word that names nothing was most likely meant as a model name.
        if e.is_not_found() && !path.contains('/') {
            format!("unknown device '{path}' (not sim, sim-threaded or sim-cores): {e}")
        } else {
            e.to_string()
        }
    })
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let dev = default_dev(args.dev.as_deref());
    let mut platform = args.platform.clone();
    let target = match dev.as_str() {
        "sim" => Target::Model(ModelMode::Sync),
        "sim-threaded" => Target::Model(ModelMode::Threaded),
        "sim-cores" => Target::Model(ModelMode::Cores),
        name if platforms::by_name(name).is_some() => {
            platform = name.to_owned();
            Target::Model(ModelMode::Sync)
        }
        name if name.starts_with("VSOCK:") || is_socket(name) => Target::Library(name.to_owned()),
        name if name.starts_with("lib:") => Target::Library(name["lib:".len()..].to_owned()),
        path => Target::Device(path.to_string()),
    };
    if let Target::Device(path) | Target::Library(path) = &target {
        // A kernel driver makes its own platform and sharing decisions.
        for (opt, given) in [
            ("--platform", matches.value_source("platform") == Some(ValueSource::CommandLine)),
            ("--force-sharing", args.force_sharing.is_some()),
            ("--model", matches.value_source("model") == Some(ValueSource::CommandLine)),
        ] {
            if given {
                eprintln!(
                    "tipc-test: {opt} applies only to the embedded model (-D sim, sim-threaded or sim-cores), not to the device {path}: its driver decides for itself"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    if args.list_platforms {
        for p in platforms::all() {
            outln!("{:<26} {}", p.name, p.description);
        }
        return ExitCode::SUCCESS;
    }
    let mut profile = match load_platform(&platform) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tipc-test: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Variant::from_name(&args.model) {
        Some(v) => profile.machine.model.variant = v,
        None => {
            eprintln!("tipc-test: unknown model '{}': upstream or nxp", args.model);
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.write_dtb {
        return match std::fs::write(path, &profile.fdt) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tipc-test: cannot write {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
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
    let mode = match target {
        Target::Model(mode) => mode,
        Target::Library(name) => {
            let dev = name.clone();
            let connector: tipc_test::kernel::Connector =
                Box::new(move |port: &str| trusty_capi::connect(&dev, port).map_err(tipc_test::backend::Errno));
            return run(Box::new(KernelBackend::with_connector(&name, connector)), &args, &selected, &params);
        }
        Target::Device(path) => match open_device(&path) {
            Ok(b) => return run(Box::new(b), &args, &selected, &params),
            Err(e) => {
                eprintln!("tipc-test: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let force_mechanism = match args.force_sharing.as_deref().map(|m| parse_mechanism(m, &profile)).transpose() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tipc-test: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = StackConfig { force_mechanism, ..Default::default() };
    let backend: Box<dyn TipcBackend> = match SimBackend::new(mode, &profile, cfg) {
        Ok(b) => {
            // The sharing line comes first, whatever else is printed (stderr in benchmark mode,
            // which keeps stdout pure JSON).
            if args.bench > 0 {
                eprintln!("{}", b.bring_up_info().plan);
            } else {
                outln!("{}", b.bring_up_info().plan);
            }
            Box::new(b)
        }
        Err(e) => {
            if let Some(line) = &e.sharing {
                outln!("{line}");
            }
            eprintln!("tipc-test: {e}");
            return ExitCode::from(2);
        }
    };
    run(backend, &args, &selected, &params)
}

/// Runs the selected tests (or benchmarks them) on `backend`.
fn run(mut backend: Box<dyn TipcBackend>, args: &Args, selected: &[&'static TestCase], params: &Params) -> ExitCode {
    if args.bench > 0 {
        // Keep stdout pure JSON in benchmark mode.
        eprintln!("{}", backend.describe());
    } else if !args.silent {
        outln!("{}", backend.describe());
    }
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    if args.bench > 0 {
        let mut failed = false;
        for t in selected {
            match runner::bench(&mut *backend, &StdEnv::command(), t, params, &mut rng, args.bench) {
                Ok(r) => outln!("{}", runner::bench_json(t.name, &r)),
                Err(e) => {
                    eprintln!("FAIL {}: {e}", t.name);
                    failed = true;
                }
            }
        }
        return if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    }
    let summary = runner::run_tests(&mut *backend, &StdEnv::command(), selected, params, &mut rng);
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
