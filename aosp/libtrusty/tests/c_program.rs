//! Builds the C programs of `tests/c` (written like AOSP clients: tipc_connect / tipc_send /
//! tipc_close and read / write / readv / writev / poll / select / close on the fds) against the
//! crate's static library, and runs them on the in-process device `sim` and through
//! trusty-ipcd, the daemon running as a child process (this test binary re-run in its
//! `daemon_child` mode, which is `trusty-ipcd --foreground`).
//! Also: 8 processes x 8 channels through one daemon, and a client killed mid-traffic.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const DAEMON_ENV: &str = "LIBTRUSTY_TEST_DAEMON_ARGS";

/// Every symbol the header declares.
const EXPORTED: &[&str] = &["tipc_connect", "tipc_send", "tipc_close"];

/// The static library cargo built for this run: the newest `libtrusty_capi*.a` in this test
/// binary's directory (`deps/`) or its parent (where `cargo build` copies it).
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for dir in [Some(deps), deps.parent()].into_iter().flatten() {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("libtrusty_capi") && name.ends_with(".a") {
                let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, entry.path()));
            }
        }
    }
    found.sort();
    match found.pop() {
        Some((_, path)) => path,
        None => panic!("no libtrusty_capi*.a next to {}: is `staticlib` still in crate-type?", exe.display()),
    }
}

/// A fresh directory for this test's outputs.
fn out_dir(name: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join("libtrusty-capi").join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create output directory");
    dir
}

/// The target triple this test was built for (the C program must match it).
fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        format!("{arch}-unknown-linux-gnu")
    } else if cfg!(all(target_os = "linux", target_env = "musl")) {
        format!("{arch}-unknown-linux-musl")
    } else if cfg!(target_os = "android") {
        format!("{arch}-linux-android")
    } else {
        panic!("the C test programs are only built on Linux and Android hosts")
    }
}

/// What a C program linking a Rust static library needs besides it
/// (`rustc --print native-static-libs` for a staticlib on Linux with glibc).
fn native_libs() -> &'static [&'static str] {
    if cfg!(target_os = "android") {
        &["-ldl", "-llog", "-lc", "-lm"]
    } else {
        &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]
    }
}

/// Compiles `tests/c/<name>.c` against the static library (strict warnings); returns the
/// executable.
fn compile(name: &str, dir: &Path) -> PathBuf {
    let target = target_triple();
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .target(&target)
        .host(&target)
        .opt_level(1)
        .debug(false)
        .out_dir(dir)
        .try_get_compiler()
        .expect("a C compiler (cc) for the host");
    let exe = dir.join(name);
    let root = Path::new(MANIFEST_DIR);
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c99", "-D_DEFAULT_SOURCE", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join(format!("tests/c/{name}.c")))
        .arg(staticlib())
        .args(native_libs())
        .arg("-o")
        .arg(&exe);
    let out = cmd.output().unwrap_or_else(|e| panic!("running the C compiler {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "compiling {name}.c failed: {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// A trusty-ipcd child process serving `socket`; killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let socket = dir.join("ipcd.sock");
        let args = format!("--socket\x1f{}\x1f--foreground\x1f--vsock-port\x1f0", socket.display());
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["daemon_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(DAEMON_ENV, args)
            .env("TRUSTY_IPCD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while trusty_ipcd::sys::connect_unix(&socket).is_err() {
            assert!(Instant::now() < deadline, "trusty-ipcd did not listen on {} within 20 s", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket }
    }

    fn dev(&self) -> &str {
        self.socket.to_str().expect("UTF-8 path")
    }

    /// The daemon's status words as (key, value) pairs.
    fn status(&self) -> Vec<(String, u64)> {
        let fd = trusty_ipcd::sys::connect_unix(&self.socket).expect("connect for status");
        use std::os::fd::AsRawFd;
        let req = trusty_ipcd::server::CONTROL_STATUS;
        let iov = [libc::iovec { iov_base: req.as_ptr().cast_mut().cast(), iov_len: req.len() }];
        trusty_ipcd::sys::send_iov_fds(fd.as_raw_fd(), &iov, &[]).expect("send status request");
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0, "no status answer");
        String::from_utf8_lossy(&buf[..n as usize])
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }

    fn stat(&self, key: &str) -> u64 {
        let s = self.status();
        s.iter().find(|(k, _)| k == key).map(|(_, v)| *v).unwrap_or_else(|| panic!("no '{key}' in status {s:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test of its own: the daemon's process when re-run by [`Daemon::start`].
#[test]
fn daemon_child() {
    let Ok(args) = std::env::var(DAEMON_ENV) else { return };
    let argv = std::iter::once("trusty-ipcd".to_owned()).chain(args.split('\x1f').map(str::to_owned));
    let code = trusty_ipcd::cli::main_with(argv);
    assert_eq!(code, std::process::ExitCode::SUCCESS);
}

fn run_client_test(exe: &Path, dev: &str) {
    let out = Command::new(exe).args([dev, "-q"]).output().expect("run the C test program");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "C test program on '{dev}' failed ({}):\n{stdout}{stderr}", out.status);
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" passed, 0 failed"), "unexpected summary: {summary}");
    let passed: u32 = summary.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(passed >= 40, "too few checks ran: {summary}");
}

#[test]
fn c_clients_pass_on_sim() {
    let dir = out_dir("c-sim");
    let exe = compile("tipc_client_test", &dir);
    run_client_test(&exe, "sim");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_clients_pass_through_the_daemon() {
    let dir = out_dir("c-daemon");
    let exe = compile("tipc_client_test", &dir);
    let daemon = Daemon::start(&dir);
    run_client_test(&exe, daemon.dev());
    // Everything the program opened is closed again, on both sides.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.stat("channels") != 0 || daemon.stat("model_endpoints") != 0 {
        assert!(Instant::now() < deadline, "channels left open: {:?}", daemon.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eight_processes_with_eight_channels_each_through_one_daemon() {
    let dir = out_dir("c-stress");
    let exe = compile("tipc_stress", &dir);
    let daemon = Daemon::start(&dir);
    let out = Command::new(&exe).args([daemon.dev(), "8", "8", "50"]).output().expect("run tipc_stress");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tipc_stress failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("8 processes x 8 channels x 50 rounds: 0 failed"), "{stdout}");
    assert!(daemon.stat("connected") >= 64, "{:?}", daemon.status());
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forked_processes_each_get_their_own_in_process_stack() {
    let dir = out_dir("c-stress-sim");
    let exe = compile("tipc_stress", &dir);
    let out = Command::new(&exe).args(["sim", "4", "4", "20"]).output().expect("run tipc_stress");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tipc_stress on sim failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("4 processes x 4 channels x 20 rounds: 0 failed"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_killed_mid_traffic_leaves_no_channel_open() {
    let dir = out_dir("c-kill");
    let exe = compile("tipc_stress", &dir);
    let daemon = Daemon::start(&dir);
    let mut holder = Command::new(&exe).args([daemon.dev(), "hold", "8"]).stdout(Stdio::piped()).spawn().expect("start holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout")).read_line(&mut line).expect("read holder");
    assert_eq!(line.trim(), "ready");
    assert_eq!(daemon.stat("channels"), 8, "{:?}", daemon.status());
    assert_eq!(daemon.stat("model_endpoints"), 8, "{:?}", daemon.status());
    std::thread::sleep(Duration::from_millis(100)); // traffic in flight
    // The stack's own buffers are FF-A shares too, and its pools grow on demand; by now the
    // traffic has grown them. What the client held must not add to them.
    let baseline_shares = daemon.stat("live_shares");
    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = daemon.status();
        let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        if get("channels") == Some(0)
            && get("device_channels") == Some(0)
            && get("model_endpoints") == Some(0)
            && get("live_shares").is_some_and(|n| n <= baseline_shares)
            && get("live_memrefs") == Some(0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "5 s after SIGKILL: {s:?} (live_shares before: {baseline_shares})");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// AOSP's send-fd as a C client (a memfd through `tipc_send` with one `struct trusty_shm`):
/// on `sim` and through the daemon, the receiver's writes are seen through the client's own
/// mapping, refused kinds and modes carry the driver's errno, and afterwards no reference and
/// no client page is left shared.
#[test]
fn send_fd_passes_on_sim_and_through_the_daemon() {
    let dir = out_dir("c-send-fd");
    let exe = compile("tipc_send_fd", &dir);
    let daemon = Daemon::start(&dir);
    for dev in ["sim", "sim-threaded", daemon.dev()] {
        let out = Command::new(&exe).arg(dev).output().expect("run tipc_send_fd");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "tipc_send_fd on '{dev}' failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.lines().last(), Some("11 passed, 0 failed"), "{stdout}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.stat("live_memrefs") != 0 || daemon.stat("foreign_attached") != 0 || daemon.stat("channels") != 0 {
        assert!(Instant::now() < deadline, "memory references left: {:?}", daemon.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(daemon.stat("memref_refused"), 0, "{:?}", daemon.status());
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Clients killed right after sending memfds (8 messages to echo each, replies unread) leave
/// no channel, no memory reference and no client page shared: the daemon closes their
/// channels, Trusty lets go of the messages, the references are reclaimed and the mappings
/// dropped.
#[test]
fn a_client_killed_with_a_memref_in_flight_leaves_no_live_share() {
    let dir = out_dir("c-kill-memref");
    let exe = compile("tipc_send_fd", &dir);
    let daemon = Daemon::start(&dir);
    for _ in 0..4 {
        let mut holder = Command::new(&exe).args([daemon.dev(), "hold"]).stdout(Stdio::piped()).spawn().expect("start holder");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("stdout")).read_line(&mut line).expect("read holder");
        assert_eq!(line.trim(), "ready");
        holder.kill().expect("SIGKILL the holder");
        let _ = holder.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = daemon.status();
        let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        if get("channels") == Some(0)
            && get("model_endpoints") == Some(0)
            && get("live_memrefs") == Some(0)
            && get("foreign_attached") == Some(0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "5 s after SIGKILL: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(daemon.stat("memref_refused"), 0, "every memfd was shared: {:?}", daemon.status());
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn staticlib_exports_libtrusty_symbols() {
    let lib = staticlib();
    let out = Command::new("nm")
        .args(["-g", "--defined-only"])
        .arg(&lib)
        .output()
        .unwrap_or_else(|e| panic!("running nm on {}: {e}", lib.display()));
    assert!(out.status.success(), "nm failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let defined: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some(_addr), Some("T"), Some(name)) => Some(name),
                _ => None,
            }
        })
        .collect();
    for sym in EXPORTED {
        assert!(defined.contains(sym), "{} does not export `{sym}` as a C function", lib.display());
    }
}

#[test]
fn header_is_aosps_contract() {
    let root = Path::new(MANIFEST_DIR).join("include/trusty");
    let tipc = std::fs::read_to_string(root.join("tipc.h")).expect("tipc.h");
    for decl in [
        "int tipc_connect(const char* dev_name, const char* srv_name);",
        "ssize_t tipc_send(int fd, const struct iovec* iov, int iovcnt, struct trusty_shm* shm, int shmcnt);",
        "int tipc_close(int fd);",
    ] {
        assert!(tipc.contains(decl), "tipc.h lacks `{decl}`");
    }
    let ipc = std::fs::read_to_string(root.join("ipc.h")).expect("ipc.h");
    for item in [
        "TRUSTY_SHARE = 0",
        "TRUSTY_LEND = 1",
        "TRUSTY_SEND_SECURE = 2",
        "TRUSTY_SEND_SECURE_OR_SHARE = 3",
        "struct trusty_shm {",
        "struct tipc_send_msg_req {",
        "#define TIPC_IOC_CONNECT _IOW(TIPC_IOC_MAGIC, 0x80, char*)",
        "#define TIPC_IOC_SEND_MSG _IOW(TIPC_IOC_MAGIC, 0x81, struct tipc_send_msg_req)",
    ] {
        assert!(ipc.contains(item), "ipc.h lacks `{item}`");
    }
    // Not the kernel UAPI's guard, so both can be included.
    assert!(!ipc.contains("_UAPI_LINUX_TRUSTY_IPC_H_"));
}

#[test]
fn the_android_build_links_neither_the_model_nor_the_profiles() {
    let root = Path::new(MANIFEST_DIR);
    for bp in [root.join("Android.bp"), root.join("../trusty-ipcd/Android.bp")] {
        let text = std::fs::read_to_string(&bp).unwrap_or_else(|e| panic!("{}: {e}", bp.display()));
        for module in ["libtrusty_model", "libplatforms"] {
            assert!(!text.contains(module), "{} names {module}: the model is test code", bp.display());
        }
        // No `features: ["sim"]` either.
        assert!(!text.contains("\"sim\""), "{} turns on the sim feature", bp.display());
    }
}
