//! In-process device names (feature `sim`): `sim`, `sim-threaded` and the platform profiles
//! start a stack on the embedded model the first time they are used, served by trusty-ipcd's
//! serving loop on a thread of this process; each channel is a socket pair whose far end
//! that loop serves, so the fd behaves exactly as one from the daemon.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use trusty_ipcd::{sim, Limits, Server, ServerHandle};

use crate::conn;
use crate::Errno;

/// The stacks started so far: device name, the process that started it, its loop.
/// A child made by fork() has no copy of the serving thread, so it starts its own.
static SERVERS: Mutex<Vec<(String, i32, ServerHandle)>> = Mutex::new(Vec::new());

/// The platform profile and model mode of a device name.
fn platform_of(dev: &str) -> (&str, bool) {
    match dev {
        "sim" => (sim::DEFAULT_PLATFORM, false),
        "sim-threaded" => (sim::DEFAULT_PLATFORM, true),
        other => (other, false),
    }
}

fn server(dev: &str) -> Result<ServerHandle, Errno> {
    let mut servers = SERVERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() };
    servers.retain(|(_, p, _)| *p == pid);
    if let Some((_, _, h)) = servers.iter().find(|(n, _, _)| n == dev) {
        return Ok(h.clone());
    }
    let (platform, threaded) = platform_of(dev);
    let (stack, _sharing) = sim::bring_up(platform, threaded).map_err(|(msg, errno)| {
        if errno != libc::ENOENT {
            eprintln!("libtrusty: {msg}");
        }
        errno
    })?;
    let server = Server::new(stack, Limits::default())?;
    let (handle, _thread) = server.spawn().map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))?;
    servers.push((dev.to_owned(), pid, handle.clone()));
    Ok(handle)
}

/// Opens a channel to `port` on the in-process device `dev`.
pub fn connect(dev: &str, port: &str) -> Result<OwnedFd, Errno> {
    if port.len() >= conn::MAX_PORT_NAME {
        return Err(libc::ENAMETOOLONG);
    }
    if port.is_empty() {
        return Err(libc::EINVAL);
    }
    let fd = server(dev)?.connect_pair()?;
    conn::handshake(fd, port)
}
