//! Socket channels: trusty-ipcd's `AF_UNIX` socket, vsock (Trusty's vsock bridge or the
//! daemon's vsock listener), and the in-process socket pairs.
//!
//! The convention is the one AOSP's libtrusty uses with Trusty's vsock bridge
//! (`tipc_vsock_connect()` / `tipc_vsock_send()` in libtrusty's trusty.c): the first packet is
//! the port name; one status byte comes back once the channel is connected, or the connection
//! closes if it could not be; then each packet is one message. On the fd this gives what the
//! kernel driver's fds give (`tipc_read_iter()`, `tipc_write_iter()`, `tipc_poll()` in
//! drivers/trusty/trusty-ipc.c): one `write`/`writev` = one message, one `read`/`readv` = one
//! whole message, POLLIN when a message is queued, POLLOUT while writes are accepted. Where the
//! socket differs: after Trusty closes the channel, the driver's fd reports POLLERR and
//! ENOTCONN; the socket reports POLLHUP (and POLLIN), `read` returns 0 once the queued messages
//! are read, and `write` fails with EPIPE (`tipc_send` maps that to ENOTCONN). A message larger
//! than the largest TIPC message is dropped by the daemon (logged) instead of failing the
//! write with EMSGSIZE.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Mutex, Once};

use trusty_ipcd::sys;

use crate::{Errno, IoVec, TrustyShm};

/// Port names must be shorter than this (spec §6.3; the driver answers ENAMETOOLONG).
pub const MAX_PORT_NAME: usize = 256;
/// Longest wait for the status byte: the daemon's 15 s wait for a tx buffer plus its 5 s
/// connect timeout, with margin.
pub const HANDSHAKE_TIMEOUT_S: i64 = 30;

/// Whether `path` is a socket (trusty-ipcd's), not a device node.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The port-name checks the driver makes before anything is sent (`tipc_ioctl()` /
/// `tipc_chan_connect()`): too long -> ENAMETOOLONG, empty -> EINVAL.
fn check_port(port: &str) -> Result<(), Errno> {
    if port.len() >= MAX_PORT_NAME {
        return Err(libc::ENAMETOOLONG);
    }
    if port.is_empty() {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// A write on a socket channel whose peer is gone raises SIGPIPE, which a kernel trusty-ipc
/// fd never does; so the first socket channel sets SIGPIPE to "ignore" if the program left it
/// at the default (a program's own handler is kept). Documented in `trusty/tipc.h`.
fn no_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: reading and then setting the disposition of SIGPIPE; `old` is written by the
        // kernel.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_DFL {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
        }
    });
}

fn set_rcvtimeo(fd: RawFd, secs: i64) -> Result<(), Errno> {
    let tv = libc::timeval { tv_sec: secs as _, tv_usec: 0 };
    // SAFETY: `tv` is a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(sys::errno())
    } else {
        Ok(())
    }
}

/// Flag in the status byte: the daemon cannot carry memory references
/// (`trusty_ipcd::server::STATUS_NO_MEMREFS`; AOSP's libtrusty ignores the byte's value).
pub const STATUS_NO_MEMREFS: u8 = trusty_ipcd::server::STATUS_NO_MEMREFS;

/// Channels whose daemon said it cannot carry memory references: (fd, socket inode). The
/// inode tells a reused descriptor number from the channel that was registered.
static NO_MEMREFS: Mutex<Vec<(c_int, u64)>> = Mutex::new(Vec::new());

/// The inode of the socket behind `fd`, or None if it is not open.
fn inode_of(fd: c_int) -> Option<u64> {
    // SAFETY: fstat writes only into the local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer for the call.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino as u64)
}

/// Records what the status byte said about channel `fd` (replacing what an earlier channel
/// on the same descriptor number said).
fn note_status(fd: c_int, status: u8) {
    let ino = inode_of(fd);
    let mut list = NO_MEMREFS.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|&(f, _)| f != fd);
    if let (true, Some(ino)) = (status & STATUS_NO_MEMREFS != 0, ino) {
        list.push((fd, ino));
    }
}

/// Whether channel `fd` goes through a daemon that cannot carry memory references.
pub fn refuses_memrefs(fd: c_int) -> bool {
    let Some(ino) = inode_of(fd) else { return false };
    let list = NO_MEMREFS.lock().unwrap_or_else(|e| e.into_inner());
    list.contains(&(fd, ino))
}

/// Forgets channel `fd` (it is being closed).
pub fn forget(fd: c_int) {
    NO_MEMREFS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&(f, _)| f != fd);
}

/// The connect handshake on a fresh connection: port name out, status byte in.
/// No status byte (the peer closed) is ENOTCONN, the driver's errno for a refused connect;
/// none within [`HANDSHAKE_TIMEOUT_S`] is ETIMEDOUT.
pub fn handshake(fd: OwnedFd, port: &str) -> Result<OwnedFd, Errno> {
    no_sigpipe();
    let raw = fd.as_raw_fd();
    let iov = [libc::iovec { iov_base: port.as_ptr().cast_mut().cast(), iov_len: port.len() }];
    let sent = sys::send_iov_fds(raw, &iov, &[])?;
    if sent != port.len() {
        return Err(libc::EIO);
    }
    set_rcvtimeo(raw, HANDSHAKE_TIMEOUT_S)?;
    let mut status = 0u8;
    let n = loop {
        // SAFETY: one byte into a local.
        let n = unsafe { libc::read(raw, std::ptr::addr_of_mut!(status).cast(), 1) };
        if n < 0 && sys::errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    match n {
        1 => {
            set_rcvtimeo(raw, 0)?;
            note_status(raw, status);
            Ok(fd)
        }
        0 => Err(libc::ENOTCONN),
        _ => match sys::errno() {
            libc::EAGAIN => Err(libc::ETIMEDOUT),
            libc::ECONNRESET | libc::EPIPE => Err(libc::ENOTCONN),
            e => Err(e),
        },
    }
}

/// A channel through trusty-ipcd's socket at `path`.
pub fn connect_unix(path: &Path, port: &str) -> Result<OwnedFd, Errno> {
    check_port(port)?;
    let fd = sys::connect_unix(path)?;
    handshake(fd, port)
}

/// Parses a number as strtol(.., 0) does: decimal, `0x` hex or leading-0 octal.
fn parse_num(s: &str) -> Option<u32> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The socket type, CID and port of `[STREAM:|SEQPACKET:]cid:port` (STREAM when no type is
/// given, as AOSP's library defaults to it); EINVAL when malformed.
pub fn parse_vsock(spec: &str) -> Result<(c_int, u32, u32), Errno> {
    let (ty, rest) = if let Some(r) = spec.strip_prefix("STREAM:") {
        (libc::SOCK_STREAM, r)
    } else if let Some(r) = spec.strip_prefix("SEQPACKET:") {
        (libc::SOCK_SEQPACKET, r)
    } else {
        (libc::SOCK_STREAM, spec)
    };
    let (cid, port) = rest.split_once(':').ok_or(libc::EINVAL)?;
    Ok((ty, parse_num(cid).ok_or(libc::EINVAL)?, parse_num(port).ok_or(libc::EINVAL)?))
}

/// A channel over vsock to `VSOCK:<spec>`.
pub fn connect_vsock(spec: &str, port: &str) -> Result<OwnedFd, Errno> {
    let (ty, cid, vport) = parse_vsock(spec)?;
    check_port(port)?;
    let fd = sys::connect_vsock(ty, cid, vport)?;
    handshake(fd, port)
}

/// Sends one message on a socket channel. Memory references go with the packet as
/// SCM_RIGHTS (see [`check_memrefs`]); a daemon whose status byte said it cannot carry them
/// ([`STATUS_NO_MEMREFS`]) gets none: the send fails with EOPNOTSUPP and nothing is sent,
/// as AOSP's `tipc_vsock_send()` refuses descriptors (the channel stays usable). EPIPE (the
/// peer closed the channel) is reported as ENOTCONN, the driver's errno.
///
/// # Safety
/// Each iovec's buffer is readable for its length.
pub unsafe fn send(fd: c_int, iov: &[IoVec], shm: &[TrustyShm]) -> Result<usize, Errno> {
    if !shm.is_empty() && refuses_memrefs(fd) {
        return Err(libc::EOPNOTSUPP);
    }
    let fds = if shm.is_empty() { Vec::new() } else { check_memrefs(fd, shm)? };
    match sys::send_iov_fds(fd, iov, &fds) {
        Err(libc::EPIPE) => Err(libc::ENOTCONN),
        r => r,
    }
}

/// Whether the channel's socket says the other end closed (Trusty closed the channel).
fn hung_up(fd: c_int) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd; no waiting.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

/// TRUSTY_SHARE, TRUSTY_LEND, TRUSTY_SEND_SECURE and TRUSTY_SEND_SECURE_OR_SHARE
/// (`enum transfer_kind`), defined once in the crate root.
pub use crate::{TRUSTY_LEND, TRUSTY_SEND_SECURE, TRUSTY_SEND_SECURE_OR_SHARE, TRUSTY_SHARE};

/// The checks the kernel driver makes before it shares anything (`filp_send_ioctl()`,
/// `dn_share_fd()`), made here so that `tipc_send` reports them as the driver would; the
/// daemon shares what passes. More than 65535 references: E2BIG; more than fit one packet
/// ([`sys::MAX_FDS_PER_PACKET`], above Trusty's 8 per message anyway): E2BIG. Per descriptor:
/// an unknown transfer kind is EINVAL; TRUSTY_LEND is EOPNOTSUPP (the stack's sharers cannot
/// lend: the normal world would keep its access); TRUSTY_SEND_SECURE is ENODATA (the memory
/// owns no platform memory id, `trusty_dma_buf_get_shared_mem_id()`); TRUSTY_SHARE and
/// TRUSTY_SEND_SECURE_OR_SHARE share; then, as `dn_share_fd()`, a channel Trusty closed is
/// ENOTCONN, a bad fd EBADF and a write-only one EACCES.
pub fn check_memrefs(chan: c_int, shm: &[TrustyShm]) -> Result<Vec<c_int>, Errno> {
    if shm.len() > usize::from(u16::MAX) || shm.len() > sys::MAX_FDS_PER_PACKET {
        return Err(libc::E2BIG);
    }
    let mut fds = Vec::with_capacity(shm.len());
    for s in shm {
        match s.transfer {
            TRUSTY_SHARE | TRUSTY_SEND_SECURE_OR_SHARE => {}
            TRUSTY_LEND => return Err(libc::EOPNOTSUPP),
            TRUSTY_SEND_SECURE => return Err(libc::ENODATA),
            _ => return Err(libc::EINVAL),
        }
        if hung_up(chan) {
            return Err(libc::ENOTCONN);
        }
        let (readable, _) = trusty_ipcd::memref::fd_access(s.fd)?;
        if !readable {
            return Err(libc::EACCES);
        }
        fds.push(s.fd);
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_names_parse_as_aosp() {
        assert_eq!(parse_vsock("1:5560"), Ok((libc::SOCK_STREAM, 1, 5560)));
        assert_eq!(parse_vsock("STREAM:3:0x10"), Ok((libc::SOCK_STREAM, 3, 16)));
        assert_eq!(parse_vsock("SEQPACKET:1:010"), Ok((libc::SOCK_SEQPACKET, 1, 8)));
        assert_eq!(parse_vsock("SEQPACKET:1"), Err(libc::EINVAL));
        assert_eq!(parse_vsock("x:1"), Err(libc::EINVAL));
    }

    /// A daemon whose status byte says it cannot carry memory references: `send` with one
    /// fails with EOPNOTSUPP at once and nothing reaches the daemon; plain messages go; a
    /// channel on a daemon that can carry them sends them.
    #[test]
    fn a_daemon_without_memory_references_gets_none_and_the_send_says_eopnotsupp() {
        for (status, refused) in [(STATUS_NO_MEMREFS, true), (0u8, false)] {
            let (client, daemon) = sys::seqpacket_pair().expect("socket pair");
            let iov = [libc::iovec { iov_base: [status].as_ptr().cast_mut().cast(), iov_len: 1 }];
            assert_eq!(sys::send_iov_fds(daemon.as_raw_fd(), &iov, &[]), Ok(1));
            let client = handshake(client, "port").expect("handshake");
            let fd = client.as_raw_fd();
            assert_eq!(refuses_memrefs(fd), refused);
            let mut name = [0u8; 16];
            // SAFETY: reads into a local buffer.
            let n = unsafe { libc::read(daemon.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) };
            assert_eq!(n, 4, "the port name");
            let (shared, _keep) = sys::seqpacket_pair().expect("a descriptor to pass");
            let shm = [TrustyShm { fd: shared.as_raw_fd(), transfer: TRUSTY_SHARE }];
            let data = b"x";
            let iov = [IoVec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: 1 }];
            // SAFETY: the iovec covers `data`.
            let r = unsafe { send(fd, &iov, &shm) };
            // SAFETY: as above.
            let plain = unsafe { send(fd, &iov, &[]) };
            assert_eq!(plain, Ok(1));
            let mut buf = [0u8; 8];
            let mut packets = 0;
            loop {
                // SAFETY: reads into a local buffer, without blocking.
                let n = unsafe { libc::recv(daemon.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n < 0 {
                    break;
                }
                packets += 1;
            }
            if refused {
                assert_eq!(r, Err(libc::EOPNOTSUPP));
                assert_eq!(packets, 1, "only the plain message reached the daemon");
            } else {
                assert_eq!(r, Ok(1));
                assert_eq!(packets, 2);
            }
            drop(client);
            forget(fd);
        }
    }

    #[test]
    fn port_names_are_checked_first() {
        assert_eq!(check_port(&"a".repeat(256)), Err(libc::ENAMETOOLONG));
        assert_eq!(check_port(""), Err(libc::EINVAL));
        assert_eq!(check_port(&"a".repeat(255)), Ok(()));
    }
}
