//! Thin wrappers over the socket calls the daemon and the library need (libc), each returning
//! `Result<_, i32>` with the positive errno value.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(r: c_int) -> Result<c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn check_len(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// A peer's credentials (SO_PEERCRED).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl std::fmt::Display for Cred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {}", self.pid, self.uid)
    }
}

/// `sockaddr_un` for `path` (EINVAL if it does not fit).
fn unix_addr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), i32> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(libc::EINVAL);
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn socket(domain: c_int, ty: c_int) -> Result<OwnedFd, i32> {
    // SAFETY: plain system call without pointers.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening AF_UNIX SOCK_SEQPACKET socket at `path` (a stale socket file there is removed
/// first), non-blocking.
pub fn listen_unix(path: &Path, backlog: c_int) -> Result<OwnedFd, i32> {
    let (addr, len) = unix_addr(path)?;
    let fd = socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK)?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })?;
    // SAFETY: plain system call on our socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// A blocking AF_UNIX SOCK_SEQPACKET socket connected to `path`.
pub fn connect_unix(path: &Path) -> Result<OwnedFd, i32> {
    let (addr, len) = unix_addr(path)?;
    let fd = socket(libc::AF_UNIX, libc::SOCK_SEQPACKET)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        match check(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) }) {
            Ok(_) => return Ok(fd),
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A listening AF_VSOCK SOCK_SEQPACKET socket on `port` (any CID), non-blocking.
pub fn listen_vsock(port: u32, backlog: c_int) -> Result<OwnedFd, i32> {
    let fd = socket(libc::AF_VSOCK, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK)?;
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })?;
    // SAFETY: plain system call on our socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` of linux/vm_sockets.h (the `_OLD` value, which is the
/// name's value where `long` is 64-bit; libc does not export it).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: c_int = 6;
/// Connect attempts while the peer CID is not ready (ENODEV, or ESOCKTNOSUPPORT for
/// SOCK_SEQPACKET), one second apart, and the connect timeout: as AOSP libtrusty's
/// `tipc_vsock_connect()`.
pub const VSOCK_CONNECT_TRIES: u32 = 10;
/// Seconds one vsock connect may take (`SO_VM_SOCKETS_CONNECT_TIMEOUT`).
pub const VSOCK_CONNECT_TIMEOUT_S: i64 = 60;

/// A blocking AF_VSOCK socket of type `ty` connected to `cid:port`.
pub fn connect_vsock(ty: c_int, cid: u32, port: u32) -> Result<OwnedFd, i32> {
    let fd = socket(libc::AF_VSOCK, ty)?;
    let tv = libc::timeval { tv_sec: VSOCK_CONNECT_TIMEOUT_S as _, tv_usec: 0 };
    // SAFETY: `tv` is a timeval of the size given. A failure only leaves the default timeout
    // (AOSP goes on as well).
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        log::debug!("vsock {cid}:{port}: connect timeout not set (errno {})", errno());
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let mut tries = VSOCK_CONNECT_TRIES;
    loop {
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        match check(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) }) {
            Ok(_) => return Ok(fd),
            Err(libc::EINTR) => continue,
            Err(e @ (libc::ENODEV | libc::ESOCKTNOSUPPORT)) if tries > 1 => {
                tries -= 1;
                log::warn!("vsock {cid}:{port}: connect failed (errno {e}), {tries} retries left");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one connection, non-blocking and close-on-exec; EAGAIN when none is pending.
pub fn accept(listener: RawFd) -> Result<OwnedFd, i32> {
    // SAFETY: NULL address arguments are allowed.
    let fd = check(unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by accept4() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A connected pair of SOCK_SEQPACKET sockets: (client end, blocking; server end,
/// non-blocking).
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), i32> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both were just returned by socketpair() and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking(b.as_raw_fd())?;
    Ok((a, b))
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> Result<(), i32> {
    // SAFETY: plain fcntl calls on a descriptor the caller owns.
    unsafe {
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        check(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// The peer's credentials; zeros where the socket family has none (vsock).
pub fn peer_cred(fd: RawFd) -> Cred {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a ucred with `len` bytes of room.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(c).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Cred::default();
    }
    Cred {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    }
}

/// The socket type (SOCK_STREAM, SOCK_SEQPACKET, ...) of `fd`, or the errno (ENOTSOCK for a
/// file that is not a socket).
pub fn socket_type(fd: RawFd) -> Result<c_int, i32> {
    let mut ty: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `ty` is a c_int with `len` bytes of room.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::addr_of_mut!(ty).cast(),
            &mut len,
        )
    })?;
    Ok(ty)
}

/// Sends one packet without blocking and without SIGPIPE.
pub fn send_packet(fd: RawFd, data: &[u8]) -> Result<usize, i32> {
    // SAFETY: `data` is valid for its length.
    check_len(unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Most descriptors one packet may carry (SCM_RIGHTS); more are closed by the kernel
/// (MSG_CTRUNC) and the packet is refused.
pub const MAX_FDS_PER_PACKET: usize = 16;

/// One packet received without blocking.
pub struct Packet {
    /// The packet's length (may be more than was stored, see `truncated`).
    pub len: usize,
    /// The packet did not fit the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// Descriptors that came with it (SCM_RIGHTS).
    pub fds: Vec<OwnedFd>,
    /// Descriptors were lost because there was no room (MSG_CTRUNC).
    pub fds_truncated: bool,
}

/// Receives one packet into `buf` without blocking, with any SCM_RIGHTS descriptors.
pub fn recv_packet(fd: RawFd, buf: &mut [u8]) -> Result<Packet, i32> {
    const SPACE: usize = 256; // >= CMSG_SPACE(16 * sizeof(int))
    let mut cbuf = [0u64; SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = SPACE as _;
    // SAFETY: `msg` points to `iov` (over `buf`) and `cbuf`, all valid for the call.
    let n = check_len(unsafe {
        libc::recvmsg(
            fd,
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    })?;
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // msg_controllen; each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Packet {
        len: n,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends `iov` as one packet, with `fds` as SCM_RIGHTS when not empty; blocking unless the
/// socket is non-blocking; never raises SIGPIPE.
pub fn send_iov_fds(fd: RawFd, iov: &[libc::iovec], fds: &[RawFd]) -> Result<usize, i32> {
    const SPACE: usize = 256;
    if fds.len() > MAX_FDS_PER_PACKET {
        return Err(libc::EINVAL);
    }
    let mut cbuf = [0u64; SPACE / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as _;
        // SAFETY: the control buffer has SPACE >= CMSG_SPACE(16 ints) bytes; the header and the
        // descriptors are written inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    loop {
        // SAFETY: `msg` points to the caller's iovecs (valid buffers) and `cbuf`.
        match check_len(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }) {
            Err(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// A pipe used to wake a poll loop: (read end, write end), both non-blocking.
pub fn wake_pipe() -> Result<(OwnedFd, OwnedFd), i32> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: both were just returned by pipe2() and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes one byte to a wake pipe (a full pipe already wakes the reader).
pub fn wake(fd: RawFd) {
    let b = 1u8;
    // SAFETY: one byte from a valid local.
    let _ = unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
}

/// Empties a wake pipe.
pub fn drain(fd: RawFd) {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is valid for its length.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// poll(2) over `fds` for at most `timeout_ms` (< 0: no limit); EINTR counts as a timeout.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: c_int) -> Result<usize, i32> {
    // SAFETY: `fds` is a valid array of its length.
    match check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) }) {
        Ok(n) => Ok(n as usize),
        Err(libc::EINTR) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes the "ready" byte to a daemonizing parent and closes the pipe.
pub fn send_ready(w: OwnedFd) -> Result<(), i32> {
    let b = 1u8;
    // SAFETY: one byte from a local.
    let r = unsafe { libc::write(w.as_raw_fd(), std::ptr::addr_of!(b).cast(), 1) };
    if r == 1 {
        Ok(())
    } else {
        Err(errno())
    }
}
