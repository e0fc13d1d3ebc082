//! ipcd-bench: echo round-trip latency, in the same run, through
//! 1. the stack's API in this process (`TipcDevice::send` + `recv`, no file descriptors),
//! 2. libtrusty-style file descriptors served in this process (a socket pair per channel and
//!    the serving loop on a thread: what libtrusty's `sim` device name gives),
//! 3. trusty-ipcd as a separate process (this binary re-run as the daemon), over its socket.
//!
//! All three run the embedded model in sync mode on the same platform profile. A benchmark: it
//! prints figures and only fails if a round trip fails.
//!
//!   cargo run --release -p trusty-ipcd --bin ipcd-bench -- [-n ROUNDS] [-s SIZE] [--platform P]

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tipc::Timeout;
use trusty_ipcd::{sim, sys, Limits, Server};

const ECHO: &str = "com.android.ipc-unittest.srv.echo";
const DAEMON_FLAG: &str = "--run-daemon";

struct Opts {
    rounds: usize,
    size: usize,
    platform: String,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts { rounds: 5000, size: 32, platform: sim::DEFAULT_PLATFORM.into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "-n" => o.rounds = val("-n")?.parse().map_err(|e| format!("-n: {e}"))?,
            "-s" => o.size = val("-s")?.parse().map_err(|e| format!("-s: {e}"))?,
            "--platform" => o.platform = val("--platform")?,
            other => return Err(format!("unknown argument '{other}' (use -n ROUNDS, -s SIZE, --platform P)")),
        }
    }
    if o.rounds == 0 || o.size == 0 || o.size > 4000 {
        return Err("need ROUNDS > 0 and 0 < SIZE <= 4000".into());
    }
    Ok(o)
}

/// Latencies in microseconds: min, median, 99th percentile, average.
fn summary(mut us: Vec<f64>) -> String {
    us.sort_by(f64::total_cmp);
    let n = us.len();
    let avg = us.iter().sum::<f64>() / n as f64;
    format!("min {:7.1}  p50 {:7.1}  p99 {:7.1}  avg {:7.1} us", us[0], us[n / 2], us[(n * 99 / 100).min(n - 1)], avg)
}

fn payload(size: usize, round: usize) -> Vec<u8> {
    (0..size).map(|i| (i + round * 7) as u8).collect()
}

/// 1: the stack's API directly.
fn direct(o: &Opts) -> Result<Vec<f64>, String> {
    let (mut stack, _) = sim::bring_up(&o.platform, false).map_err(|(m, _)| m)?;
    let dev = &mut stack.dev;
    let id = dev.connect(ECHO).map_err(|e| format!("connect: {e}"))?;
    let mut rx = vec![0u8; 4096];
    let mut out = Vec::with_capacity(o.rounds);
    for r in 0..o.rounds + o.rounds / 10 {
        let tx = payload(o.size, r);
        let t = Instant::now();
        dev.send(id, &[&tx], &[], Timeout::Ms(5000)).map_err(|e| format!("send: {e}"))?;
        let n = dev.recv(id, &mut [&mut rx[..]], Timeout::Ms(5000)).map_err(|e| format!("recv: {e}"))?;
        let el = t.elapsed();
        if rx[..n] != tx[..] {
            return Err("echo differs".into());
        }
        if r >= o.rounds / 10 {
            out.push(el.as_secs_f64() * 1e6);
        }
    }
    let _ = dev.close(id);
    Ok(out)
}

/// Round trips on a connected socket channel.
fn over_fd(fd: &OwnedFd, o: &Opts) -> Result<Vec<f64>, String> {
    let raw = fd.as_raw_fd();
    let mut rx = vec![0u8; 4096];
    let mut out = Vec::with_capacity(o.rounds);
    for r in 0..o.rounds + o.rounds / 10 {
        let tx = payload(o.size, r);
        let iov = [libc::iovec { iov_base: tx.as_ptr().cast_mut().cast(), iov_len: tx.len() }];
        let t = Instant::now();
        sys::send_iov_fds(raw, &iov, &[]).map_err(|e| format!("write: errno {e}"))?;
        // SAFETY: `rx` is writable for its length.
        let n = unsafe { libc::read(raw, rx.as_mut_ptr().cast(), rx.len()) };
        let el = t.elapsed();
        if n < 0 || rx[..n as usize] != tx[..] {
            return Err(format!("echo failed or differs (read {n})"));
        }
        if r >= o.rounds / 10 {
            out.push(el.as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// The client's half of the connect convention.
fn handshake(fd: OwnedFd) -> Result<OwnedFd, String> {
    let iov = [libc::iovec { iov_base: ECHO.as_ptr().cast_mut().cast(), iov_len: ECHO.len() }];
    sys::send_iov_fds(fd.as_raw_fd(), &iov, &[]).map_err(|e| format!("send port name: errno {e}"))?;
    let mut st = 0u8;
    // SAFETY: one byte into a local.
    let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(st).cast(), 1) };
    if n != 1 {
        return Err("no status byte: connect failed".into());
    }
    Ok(fd)
}

/// 2: fds served by the loop on a thread of this process.
fn in_process_fd(o: &Opts) -> Result<Vec<f64>, String> {
    let (stack, _) = sim::bring_up(&o.platform, false).map_err(|(m, _)| m)?;
    let server = Server::new(stack, Limits::default()).map_err(|e| format!("server: errno {e}"))?;
    let (handle, join) = server.spawn().map_err(|e| e.to_string())?;
    let fd = handshake(handle.connect_pair().map_err(|e| format!("socket pair: errno {e}"))?)?;
    let r = over_fd(&fd, o);
    drop(fd);
    handle.stop();
    let _ = join.join();
    r
}

/// 3: trusty-ipcd as its own process.
fn daemon(o: &Opts, dir: &Path) -> Result<Vec<f64>, String> {
    let socket = dir.join("ipcd-bench.sock");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([DAEMON_FLAG, "--socket"])
        .arg(&socket)
        .args(["--foreground", "--vsock-port", "0", "--platform", &o.platform])
        .env("TRUSTY_IPCD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the daemon: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = loop {
        match sys::connect_unix(&socket) {
            Ok(fd) => break handshake(fd).and_then(|fd| over_fd(&fd, o)),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("the daemon did not listen within 20 s (errno {e})")),
        }
    };
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// Writes one line to stdout without panicking: this binary talks to the daemon over sockets,
/// so SIGPIPE stays ignored (a dead daemon must be an error, not our death) and a reader that
/// went away (`ipcd-bench | head -1`) makes the write fail with EPIPE, where `println!` would
/// panic. Then the run ends quietly with status 141, as a C program killed by SIGPIPE; any
/// other write error with a message and status 1.
fn print_line(line: &str) -> Result<(), ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ExitCode::from(141)),
        Err(e) => {
            eprintln!("ipcd-bench: writing to stdout: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(DAEMON_FLAG) {
        let argv = std::iter::once("trusty-ipcd".to_owned()).chain(args.into_iter().skip(2));
        return trusty_ipcd::cli::main_with(argv);
    }
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ipcd-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // The header first: a reader gone already leaves nothing to clean up.
    let header = format!("echo round trip, {} bytes, {} rounds (after {} warm-up), platform {}", o.size, o.rounds, o.rounds / 10, o.platform);
    if let Err(status) = print_line(&header) {
        return status;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("ipcd-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("ipcd-bench: {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    let mut failed = false;
    let mut stdout_failed = None;
    type Run = fn(&Opts, &Path) -> Result<Vec<f64>, String>;
    let runs: [(&str, Run); 3] = [
        ("in-process, stack API", |o, _| direct(o)),
        ("in-process, fd (sim)", |o, _| in_process_fd(o)),
        ("trusty-ipcd process", daemon),
    ];
    for (name, run) in runs {
        let line = match run(&o, &dir) {
            Ok(us) => format!("{name:<24} {}", summary(us)),
            Err(e) => {
                failed = true;
                format!("{name:<24} FAILED: {e}")
            }
        };
        if let Err(status) = print_line(&line) {
            // Each run has ended its daemon already: only the directory is left, removed below.
            stdout_failed = Some(status);
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(status) = stdout_failed {
        return status;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
