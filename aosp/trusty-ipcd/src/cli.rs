//! The `trusty-ipcd` command: brings the TIPC stack up and serves client processes over a
//! SOCK_SEQPACKET socket (see [`crate::server`] for the convention). In the library so that
//! tests and the bench can run the daemon as a child process of their own binary.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use clap::Parser;
use crate::{logger, sys, Limits, Server};

/// The vsock port clients use by default (`VSOCK:SEQPACKET:1:<port>` on a device with vsock
/// loopback).
const DEFAULT_VSOCK_PORT: u32 = 5560;
/// Where Android's init hands over the socket it created for the service (`socket` line of
/// trusty-ipcd.rc): `ANDROID_SOCKET_<name>` holds its descriptor number.
const ANDROID_SOCKET_ENV: &str = "ANDROID_SOCKET_trusty_ipcd";

#[derive(Parser, Debug)]
#[command(
    name = "trusty-ipcd",
    about = "Own the Trusty IPC stack and serve client processes over a socket"
)]
struct Args {
    /// Path of the AF_UNIX SOCK_SEQPACKET socket to listen on (a device name for libtrusty
    /// and `tipc-test -D`); with init's socket in ANDROID_SOCKET_trusty_ipcd, that one is used
    #[arg(long)]
    socket: PathBuf,
    /// `linux`: the real platform (this Linux's device tree and command line, a Trusty VM
    /// through /dev/xen); any other name: a platform profile of the embedded model (see
    /// `tipc-test --list-platforms`; builds with the `sim` feature)
    #[arg(long, default_value = DEFAULT_PLATFORM)]
    platform: String,
    /// With `--platform linux`: share memory this way whatever the facts say (phys, phys-attr,
    /// mediated-ipa, xen-grant, ffa-handle), to show that a wrong decision fails
    #[arg(long, value_name = "MECH")]
    force_sharing: Option<String>,
    /// With `--platform linux`: how long to wait for the Trusty VM's rendezvous offer (ms)
    #[arg(long, value_name = "MS")]
    rendezvous_timeout_ms: Option<u64>,
    /// Run the model on its own thread (as `tipc-test -D sim-threaded`)
    #[arg(long)]
    threaded_model: bool,
    /// Stay in the foreground (otherwise detach once the stack is up)
    #[arg(long)]
    foreground: bool,
    /// AF_VSOCK port to listen on as well (0: none); skipped with a log line where the
    /// kernel has no vsock
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT)]
    vsock_port: u32,
    /// Channels one client process may have open
    #[arg(long, default_value_t = Limits::default().channels_per_client)]
    max_channels: usize,
    /// Bytes of messages from Trusty the daemon queues for one client process
    #[arg(long, default_value_t = Limits::default().queued_bytes_per_client)]
    max_queued_bytes: usize,
    /// More log output (-v debug, -vv trace); TRUSTY_IPCD_LOG=level overrides
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
}

static STOP: AtomicBool = AtomicBool::new(false);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; one byte from a local.
        let _ = unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
    }
}

fn android_socket() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(ANDROID_SOCKET_ENV).ok()?.parse().ok()?;
    if fd < 0 || sys::socket_type(fd).is_err() {
        return None;
    }
    // SAFETY: init handed this descriptor to us for our use only; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The platform when none is named: the embedded model's native profile where it is built in,
/// else the real one.
#[cfg(feature = "sim")]
const DEFAULT_PLATFORM: &str = "native-api5";
#[cfg(not(feature = "sim"))]
const DEFAULT_PLATFORM: &str = crate::linux::PLATFORM_NAME;

fn bring_up(args: &Args) -> Result<crate::Stack, String> {
    if args.platform == crate::linux::PLATFORM_NAME {
        let la = crate::linux::LinuxArgs {
            force_sharing: args.force_sharing.clone(),
            rendezvous_timeout_ms: args.rendezvous_timeout_ms,
        };
        return crate::linux::bring_up(&la);
    }
    if args.force_sharing.is_some() || args.rendezvous_timeout_ms.is_some() {
        return Err("--force-sharing and --rendezvous-timeout-ms go with --platform linux".into());
    }
    bring_up_model(args)
}

#[cfg(feature = "sim")]
fn bring_up_model(args: &Args) -> Result<crate::Stack, String> {
    let (stack, sharing) = crate::sim::bring_up(&args.platform, args.threaded_model).map_err(|(msg, _)| msg)?;
    log::info!("stack up on platform {} ({sharing})", args.platform);
    Ok(stack)
}

#[cfg(not(feature = "sim"))]
fn bring_up_model(args: &Args) -> Result<crate::Stack, String> {
    Err(format!(
        "platform '{}': this build has no embedded model (built without the `sim` feature); use --platform {}",
        args.platform,
        crate::linux::PLATFORM_NAME
    ))
}

/// Runs the daemon with command-line arguments `argv` (the first is the program name).
pub fn main_with<I: IntoIterator<Item = String>>(argv: I) -> ExitCode {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    logger::init("trusty-ipcd", args.verbose);
    let from_init = android_socket();
    let created_socket = from_init.is_none();
    let listener = match from_init {
        Some(fd) => {
            log::info!("serving init's socket {ANDROID_SOCKET_ENV}");
            if let Err(e) = sys::set_nonblocking(fd.as_raw_fd()) {
                log::error!("init's socket: errno {e}");
                return ExitCode::from(2);
            }
            fd
        }
        None => match sys::listen_unix(&args.socket, 128) {
            Ok(fd) => fd,
            Err(e) => {
                log::error!(
                    "cannot listen on {}: {}",
                    args.socket.display(),
                    std::io::Error::from_raw_os_error(e)
                );
                return ExitCode::from(2);
            }
        },
    };
    // Detaching happens before any thread exists (the model's threads come with bring-up).
    let mut ready_pipe: Option<OwnedFd> = None;
    if !args.foreground {
        match daemonize() {
            Ok(Daemonized::Parent(code)) => return code,
            Ok(Daemonized::Child(w)) => ready_pipe = Some(w),
            Err(e) => {
                log::error!("cannot detach: errno {e}");
                return ExitCode::from(2);
            }
        }
    }
    let stack = match bring_up(&args) {
        Ok(s) => s,
        Err(msg) => {
            for line in msg.lines() {
                log::error!("{line}");
            }
            // No stale socket file for the next start (init's own socket stays).
            if created_socket {
                let _ = std::fs::remove_file(&args.socket);
            }
            return ExitCode::from(2);
        }
    };
    let limits = Limits {
        channels_per_client: args.max_channels,
        queued_bytes_per_client: args.max_queued_bytes,
        ..Limits::default()
    };
    let mut server = match Server::new(stack, limits) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot set up the serving loop: errno {e}");
            return ExitCode::from(2);
        }
    };
    server.add_listener(listener, "unix");
    if args.vsock_port != 0 {
        match sys::listen_vsock(args.vsock_port, 128) {
            Ok(fd) => {
                log::info!("listening on vsock port {}", args.vsock_port);
                server.add_listener(fd, "vsock");
            }
            Err(e) => log::info!(
                "not listening on vsock port {}: {} (no AF_VSOCK here?)",
                args.vsock_port,
                std::io::Error::from_raw_os_error(e)
            ),
        }
    }
    let handle = server.handle();
    // Signals stop the loop: the handler sets the loop's flag through a wake pipe of its own.
    let stop_flag = handle.stop_flag();
    let (sig_rd, sig_wr) = match sys::wake_pipe() {
        Ok(p) => p,
        Err(e) => {
            log::error!("cannot create a pipe: errno {e}");
            return ExitCode::from(2);
        }
    };
    WAKE_FD.store(sig_wr.as_raw_fd(), Ordering::SeqCst);
    // SAFETY: the handler only touches atomics and calls write(2).
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as usize);
        libc::signal(libc::SIGINT, on_signal as *const () as usize);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let watcher = std::thread::spawn(move || {
        let mut fds = [libc::pollfd {
            fd: sig_rd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        loop {
            let _ = sys::poll(&mut fds, 200);
            if STOP.load(Ordering::SeqCst) {
                stop_flag.store(true, Ordering::SeqCst);
                handle.stop();
                return;
            }
        }
    });
    log::info!("serving on {}", args.socket.display());
    if let Some(w) = ready_pipe.take() {
        let _ = sys::send_ready(w);
    }
    server.run();
    STOP.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    // Only a socket file this process made; init's stays for the next start.
    if created_socket {
        let _ = std::fs::remove_file(&args.socket);
    }
    ExitCode::SUCCESS
}

enum Daemonized {
    Parent(ExitCode),
    Child(OwnedFd),
}

/// fork, setsid, fork: the original process waits until the daemon reports ready (exit 0) or
/// dies first (exit 2), at most 30 s.
fn daemonize() -> Result<Daemonized, i32> {
    let (rd, wr) = sys::wake_pipe()?;
    // SAFETY: no other thread exists yet (the stack is brought up after this).
    match unsafe { libc::fork() } {
        -1 => Err(sys::errno()),
        0 => {
            drop(rd);
            // SAFETY: plain system calls in the single-threaded child.
            unsafe {
                libc::setsid();
                match libc::fork() {
                    -1 => libc::_exit(2),
                    0 => {}
                    _ => libc::_exit(0),
                }
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
            Ok(Daemonized::Child(wr))
        }
        _ => {
            drop(wr);
            let mut fds = [libc::pollfd {
                fd: rd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let _ = sys::poll(&mut fds, 30_000);
            let mut b = [0u8; 1];
            // SAFETY: one byte into a local buffer.
            let n = unsafe { libc::read(rd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            Ok(Daemonized::Parent(if n == 1 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }))
        }
    }
}
