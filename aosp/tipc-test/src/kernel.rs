//! The backend over a real Trusty: the Linux trusty-ipc character device (spec §7), used the
//! way libtrusty and AOSP's tipc-test use it.
//!
//! * connect: `open(dev, O_RDWR)` and `ioctl(TIPC_IOC_CONNECT, name)`; the fd is the handle
//!   (libtrusty's `tipc_connect`).
//! * writev: `write(2)` for one buffer, `writev(2)` for several, as tipc-test does: the driver
//!   turns each call into one message (§7.2). `TIPC_IOC_SEND_MSG` (libtrusty's `tipc_send`,
//!   which can also transfer memory) is [`KernelBackend::send`].
//! * readv: `poll(2)` for `POLLIN` within the timeout (`ETIMEDOUT` when it runs out), then
//!   `readv(2)`, which returns one whole message.
//! * wait_readable: `poll(2)`; close: `close(2)`.
//!
//! Errors are the syscall's errno, as an [`Errno`] (positive, like `tipc::errno`; libtrusty
//! returns the same values negated).
//!
//! The ioctl numbers use the `_IOC` encoding of asm-generic (arm, arm64, x86, x86_64, riscv);
//! powerpc, mips, sparc and alpha encode them differently and are not supported.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backend::{Errno, Handle, ShmObject, TipcBackend, Transfer};
use crate::shm::FdObject;

/// The trusty-ipc UAPI (`include/uapi/linux/trusty/ipc.h`, spec §7.1).
pub mod uapi {
    use core::mem::size_of;

    /// Widths and positions of the fields of an ioctl request number (asm-generic `ioctl.h`).
    pub const IOC_NRBITS: u32 = 8;
    /// Width of the type field.
    pub const IOC_TYPEBITS: u32 = 8;
    /// Width of the size field.
    pub const IOC_SIZEBITS: u32 = 14;
    /// Width of the direction field.
    pub const IOC_DIRBITS: u32 = 2;
    /// Position of the number field.
    pub const IOC_NRSHIFT: u32 = 0;
    /// Position of the type field.
    pub const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
    /// Position of the size field.
    pub const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
    /// Position of the direction field.
    pub const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

    /// Directions, as seen from user space: `WRITE` means the kernel reads the argument.
    pub const IOC_NONE: u32 = 0;
    /// `_IOC_WRITE`: user space writes the argument.
    pub const IOC_WRITE: u32 = 1;
    /// `_IOC_READ`: user space reads the argument.
    pub const IOC_READ: u32 = 2;

    /// Linux's `_IOC(dir, type, nr, size)`. Panics (at compile time in a constant) when `dir`
    /// or `size` does not fit its field.
    pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
        assert!(dir < 1 << IOC_DIRBITS, "ioctl direction out of range");
        assert!(size < 1 << IOC_SIZEBITS, "ioctl argument too large");
        (dir << IOC_DIRSHIFT) | ((size as u32) << IOC_SIZESHIFT) | ((ty as u32) << IOC_TYPESHIFT) | ((nr as u32) << IOC_NRSHIFT)
    }

    /// Linux's `_IOW(type, nr, T)` with `size` = `sizeof(T)`.
    pub const fn iow(ty: u8, nr: u8, size: usize) -> u32 {
        ioc(IOC_WRITE, ty, nr, size)
    }

    /// Linux's `_IOWR(type, nr, T)` with `size` = `sizeof(T)`.
    pub const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
        ioc(IOC_READ | IOC_WRITE, ty, nr, size)
    }

    /// The ioctl type of the trusty-ipc requests.
    pub const TIPC_IOC_MAGIC: u8 = b'r';
    /// `_IOW('r', 0x80, char *)`: the argument is a pointer to the NUL-terminated port name.
    pub const TIPC_IOC_CONNECT: u32 = iow(TIPC_IOC_MAGIC, 0x80, size_of::<*const core::ffi::c_char>());
    /// The same request as a 32-bit process computes it (the driver's compat path).
    pub const TIPC_IOC_CONNECT_COMPAT: u32 = iow(TIPC_IOC_MAGIC, 0x80, 4);
    /// `_IOW('r', 0x81, struct tipc_send_msg_req)`.
    pub const TIPC_IOC_SEND_MSG: u32 = iow(TIPC_IOC_MAGIC, 0x81, size_of::<TipcSendMsgReq>());

    /// The argument of `TIPC_IOC_SEND_MSG`: user pointers and counts, all 64-bit whatever the
    /// process's pointer size.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TipcSendMsgReq {
        /// Address of an array of `struct iovec` (the message data, concatenated).
        pub iov: u64,
        /// Address of an array of [`TrustyShm`] (memory to transfer).
        pub shm: u64,
        /// Number of iovecs.
        pub iov_cnt: u64,
        /// Number of memory transfers.
        pub shm_cnt: u64,
    }

    /// One memory transfer of `TIPC_IOC_SEND_MSG`: a dma-buf fd and how to transfer it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TrustyShm {
        /// The dma-buf file descriptor.
        pub fd: i32,
        /// One of [`TRUSTY_SHARE`], [`TRUSTY_LEND`], [`TRUSTY_SEND_SECURE`].
        pub transfer: u32,
    }

    /// Linux and Trusty both see the memory (mapped non-secure).
    pub const TRUSTY_SHARE: u32 = 0;
    /// Only Trusty sees the memory while it has it.
    pub const TRUSTY_LEND: u32 = 1;
    /// The memory is already secure; only Trusty sees it.
    pub const TRUSTY_SEND_SECURE: u32 = 2;
    /// The platform-assigned id if the buffer has one, else shared (newest drivers).
    pub const TRUSTY_SEND_SECURE_OR_SHARE: u32 = 3;
}

/// The ioctl-number helpers, for other device interfaces (dma-buf heaps).
pub mod ioctl {
    pub use super::uapi::{ioc, iow, iowr};
}

use uapi::{TipcSendMsgReq, TrustyShm, TIPC_IOC_CONNECT, TIPC_IOC_SEND_MSG};

/// Why a device could not be opened.
#[derive(Debug)]
pub enum OpenErrorKind {
    /// Nothing at the path (ENOENT, or ENOTDIR: a component of it is not a directory).
    Missing,
    /// Something is at the path, but not a character device, so not a trusty-ipc device.
    NotCharDevice,
    /// `open(path, O_RDWR)` failed.
    Open(io::Error),
}

/// A device path that cannot serve as a trusty-ipc device, and why.
#[derive(Debug)]
pub struct OpenError {
    /// The path tried.
    pub path: PathBuf,
    /// Why it cannot serve.
    pub kind: OpenErrorKind,
}

impl OpenError {
    /// The device is absent (nothing at the path, or a node no driver answers).
    pub fn is_not_found(&self) -> bool {
        match &self.kind {
            OpenErrorKind::Missing => true,
            OpenErrorKind::NotCharDevice => false,
            OpenErrorKind::Open(e) => matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)),
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            OpenErrorKind::Missing => write!(f, "{path}: device not found (is the trusty-ipc driver loaded?)"),
            OpenErrorKind::NotCharDevice => write!(f, "{path}: not a character device, so not a trusty-ipc device"),
            OpenErrorKind::Open(e) => {
                let errno = Errno(e.raw_os_error().unwrap_or(libc::EIO));
                match e.raw_os_error() {
                    // A node without a driver behind it, or one whose device is gone (spec §7.3).
                    Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => write!(
                        f,
                        "{path}: device not found: the node exists but opening it failed with {errno} (is the trusty-ipc driver loaded?)"
                    ),
                    Some(libc::EACCES | libc::EPERM) => {
                        write!(f, "{path}: permission denied ({errno}): tipc-test needs read and write access to the device")
                    }
                    // The driver refuses to allocate a channel while Trusty is not online (§7.3).
                    Some(libc::EINVAL) => write!(f, "{path}: cannot open the device: {errno} (is Trusty online?)"),
                    _ => write!(f, "{path}: cannot open the device: {errno} ({e})"),
                }
            }
        }
    }
}

impl std::error::Error for OpenError {}

fn errno_of(e: &io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// errno of the syscall that just failed; read it before anything else can change it.
fn last_errno() -> Errno {
    errno_of(&io::Error::last_os_error())
}

/// Opens `path` read-write (`O_RDWR`, plus `O_CLOEXEC`).
fn open_rdwr(path: &Path) -> io::Result<OwnedFd> {
    OpenOptions::new().read(true).write(true).open(path).map(OwnedFd::from)
}

/// `iovec`s over `bufs`, for the kernel to read from.
fn iovecs(bufs: &[&[u8]]) -> Vec<libc::iovec> {
    bufs.iter().map(|b| libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() }).collect()
}

/// The number of milliseconds to give poll for `d`: rounded up, so poll never gives up early.
fn poll_ms(d: Duration) -> libc::c_int {
    let ms = d.as_nanos().div_ceil(1_000_000);
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

/// Waits until `fd` is readable or in error (`POLLIN`, `POLLERR`, `POLLHUP`); false when
/// `timeout` runs out first. Restarts after signals.
fn poll_in(fd: RawFd, timeout: Duration) -> Result<bool, Errno> {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one valid, writable pollfd and the count says 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, poll_ms(left)) };
        if rc > 0 {
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(Errno(libc::EBADF));
            }
            return Ok(true);
        }
        if rc == 0 {
            if deadline.is_some_and(|d| Instant::now() < d) {
                // poll's range (i32 milliseconds) was shorter than the timeout.
                continue;
            }
            return Ok(false);
        }
        let e = last_errno();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

/// Runs a read/write syscall until it is not interrupted by a signal.
fn retry_eintr(mut call: impl FnMut() -> isize) -> Result<usize, Errno> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = last_errno();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

/// Opens one channel to a port: libtrusty's `tipc_connect` for a device name.
pub type Connector = Box<dyn FnMut(&str) -> Result<OwnedFd, Errno>>;

/// [`TipcBackend`] over a trusty-ipc character device: each handle is the fd of one channel.
/// With a [`Connector`], the same over any libtrusty file descriptor (trusty-ipcd's socket,
/// vsock, the in-process device names).
pub struct KernelBackend {
    path: PathBuf,
    /// The channels this backend opened; nothing else is ever written to, read or closed.
    chans: BTreeMap<Handle, OwnedFd>,
    /// Opens channels through libtrusty instead of open + TIPC_IOC_CONNECT.
    connector: Option<Connector>,
}

impl KernelBackend {
    /// Checks that `path` is a device tipc-test can use: it exists (else "device not found",
    /// exactly when there is nothing there), is a character device, and opens read-write. The
    /// probe's fd is closed again: every connect opens its own.
    pub fn open(path: impl Into<PathBuf>) -> Result<KernelBackend, OpenError> {
        let path = path.into();
        let err = |kind| OpenError { path: path.clone(), kind };
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => {}
            Ok(_) => return Err(err(OpenErrorKind::NotCharDevice)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => return Err(err(OpenErrorKind::Missing)),
            Err(e) => return Err(err(OpenErrorKind::Open(e))),
        }
        drop(open_rdwr(&path).map_err(|e| err(OpenErrorKind::Open(e)))?);
        Ok(KernelBackend { path, chans: BTreeMap::new(), connector: None })
    }

    /// Channels of libtrusty's device `name` (see `trusty_capi::connect`): file descriptors
    /// used exactly as the driver's. A socket channel reports the remote close differently
    /// (see `trusty/tipc.h`): a write failing with EPIPE and a read of 0 bytes on a hung-up
    /// channel are reported as the driver's ENOTCONN.
    pub fn with_connector(name: &str, connector: Connector) -> KernelBackend {
        KernelBackend { path: PathBuf::from(name), chans: BTreeMap::new(), connector: Some(connector) }
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fd(&self, h: Handle) -> Result<RawFd, Errno> {
        self.chans.get(&h).map(AsRawFd::as_raw_fd).ok_or(Errno(libc::EBADF))
    }

    /// Sends one message of the concatenation of `iov` with `shm` memory transfers through
    /// `TIPC_IOC_SEND_MSG` (libtrusty's `tipc_send`); returns the number of data bytes sent.
    pub fn send(&mut self, h: Handle, iov: &[&[u8]], shm: &[TrustyShm]) -> Result<usize, Errno> {
        let fd = self.fd(h)?;
        let iovs = iovecs(iov);
        let req = TipcSendMsgReq {
            iov: iovs.as_ptr() as u64,
            shm: shm.as_ptr() as u64,
            iov_cnt: iovs.len() as u64,
            shm_cnt: shm.len() as u64,
        };
        retry_eintr(|| {
            // SAFETY: `fd` is a channel this backend owns. The driver reads `req` (a live
            // TipcSendMsgReq of the size encoded in the request), then the `iov_cnt` iovecs and
            // `shm_cnt` TrustyShm it points to; those arrays and the buffers the iovecs describe
            // are borrowed for the whole call, and nothing is written through them.
            (unsafe { libc::ioctl(fd, TIPC_IOC_SEND_MSG as _, &req as *const TipcSendMsgReq) }) as isize
        })
    }
}

impl KernelBackend {
    fn writev_fd(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno> {
        let fd = self.fd(h)?;
        if let [buf] = iov {
            // SAFETY: `fd` is a channel this backend owns; the kernel reads `buf.len()` bytes
            // from `buf`, which is borrowed for the call.
            return retry_eintr(|| unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) });
        }
        let iovs = iovecs(iov);
        let cnt = libc::c_int::try_from(iovs.len()).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: `fd` is a channel this backend owns; `iovs` holds `cnt` iovecs, each over a
        // slice of `iov` that is borrowed for the call; the kernel only reads them.
        retry_eintr(|| unsafe { libc::writev(fd, iovs.as_ptr(), cnt) })
    }


    fn readv_fd(&mut self, h: Handle, bufs: &mut [&mut [u8]], timeout: Option<Duration>) -> Result<usize, Errno> {
        let fd = self.fd(h)?;
        if let Some(t) = timeout {
            if !poll_in(fd, t)? {
                return Err(Errno(libc::ETIMEDOUT));
            }
        }
        let iovs: Vec<libc::iovec> =
            bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        let cnt = libc::c_int::try_from(iovs.len()).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: `fd` is a channel this backend owns; `iovs` holds `cnt` iovecs, each over a
        // distinct slice of `bufs`, which is mutably borrowed for the call, so the kernel may
        // write up to each iovec's length into it.
        retry_eintr(|| unsafe { libc::readv(fd, iovs.as_ptr(), cnt) })
    }


    /// Whether the channel's socket reports a hang-up (its peer closed).
    fn hung_up(&self, h: Handle) -> Result<bool, Errno> {
        let mut pfd = libc::pollfd { fd: self.fd(h)?, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid, writable pollfd; no waiting.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        Ok(rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0)
    }
}

impl TipcBackend for KernelBackend {
    fn describe(&self) -> String {
        if self.connector.is_some() {
            format!("libtrusty: {} (file descriptors from tipc_connect)", self.path.display())
        } else {
            format!("kernel: {} (trusty-ipc driver)", self.path.display())
        }
    }

    fn alloc_shm(&mut self, len: usize) -> Result<Box<dyn ShmObject>, String> {
        FdObject::for_send_fd(len).map(|o| Box::new(o) as Box<dyn ShmObject>).map_err(|e| e.to_string())
    }

    /// TIPC_IOC_SEND_MSG with the objects' fds: the driver shares them (`dn_share_fd()`);
    /// what it refuses comes back as its errno (a memfd is not a dma-buf: `dma_buf_get()`
    /// fails).
    fn send_shm(&mut self, h: Handle, iov: &[&[u8]], shm: &[(&dyn ShmObject, Transfer)]) -> Result<usize, Errno> {
        let mut list = Vec::with_capacity(shm.len());
        for (obj, transfer) in shm {
            let o = obj.as_any().downcast_ref::<FdObject>().ok_or(Errno(libc::EBADF))?;
            list.push(TrustyShm { fd: o.fd(), transfer: *transfer as u32 });
        }
        if self.connector.is_some() {
            // libtrusty's tipc_send on one of its own fds (daemon socket, in-process device):
            // the descriptors go as SCM_RIGHTS and the stack behind shares them.
            let fd = self.fd(h)?;
            let iovs = iovecs(iov);
            let shm: Vec<trusty_capi::TrustyShm> =
                list.iter().map(|s| trusty_capi::TrustyShm { fd: s.fd, transfer: s.transfer }).collect();
            // SAFETY: each iovec covers a slice of `iov`, borrowed (and only read) for the call.
            return unsafe { trusty_capi::send(fd, &iovs, &shm) }.map_err(Errno);
        }
        self.send(h, iov, &list)
    }

    fn connect(&mut self, port: &str) -> Result<Handle, Errno> {
        if let Some(connect) = self.connector.as_mut() {
            let fd = connect(port)?;
            let h = fd.as_raw_fd();
            self.chans.insert(h, fd);
            return Ok(h);
        }
        let name = CString::new(port).map_err(|_| Errno(libc::EINVAL))?;
        let fd = open_rdwr(&self.path).map_err(|e| errno_of(&e))?;
        // SAFETY: `fd` is open and ours; CONNECT reads the NUL-terminated string at the
        // pointer, which `name` keeps alive until the call returns.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TIPC_IOC_CONNECT as _, name.as_ptr()) };
        if rc < 0 {
            let e = last_errno();
            drop(fd);
            return Err(e);
        }
        let h = fd.as_raw_fd();
        self.chans.insert(h, fd);
        Ok(h)
    }

    fn writev(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno> {
        match self.writev_fd(h, iov) {
            Err(Errno(libc::EPIPE)) if self.connector.is_some() => Err(Errno(libc::ENOTCONN)),
            r => r,
        }
    }

    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], timeout: Option<Duration>) -> Result<usize, Errno> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        match self.readv_fd(h, bufs, timeout) {
            // A socket channel's end of file: the peer closed (an empty message needs no room).
            Ok(0) if self.connector.is_some() && want > 0 && self.hung_up(h)? => Err(Errno(libc::ENOTCONN)),
            r => r,
        }
    }

    fn wait_readable(&mut self, h: Handle, timeout: Duration) -> Result<bool, Errno> {
        poll_in(self.fd(h)?, timeout)
    }

    fn close(&mut self, h: Handle) -> Result<(), Errno> {
        let fd = self.chans.remove(&h).ok_or(Errno(libc::EBADF))?.into_raw_fd();
        // SAFETY: `fd` was owned by this backend and has just been taken out of its table, so
        // it is closed exactly once and never used again.
        let rc = unsafe { libc::close(fd) };
        // Linux releases the fd even when close is interrupted.
        if rc < 0 {
            let e = last_errno();
            if e.0 != libc::EINTR {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::uapi::*;
    use super::*;
    use core::mem::{align_of, offset_of, size_of};
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn ioctl_numbers() {
        #[cfg(target_pointer_width = "64")]
        assert_eq!(TIPC_IOC_CONNECT, 0x4008_7280);
        #[cfg(target_pointer_width = "32")]
        assert_eq!(TIPC_IOC_CONNECT, 0x4004_7280);
        assert_eq!(TIPC_IOC_CONNECT_COMPAT, 0x4004_7280);
        assert_eq!(iow(TIPC_IOC_MAGIC, 0x80, 8), 0x4008_7280);
        assert_eq!(TIPC_IOC_SEND_MSG, 0x4020_7281);
    }

    #[test]
    fn ioc_encoding_matches_linux() {
        // Well-known requests of other drivers: TIOCGPTN = _IOR('T', 0x30, unsigned int),
        // TUNSETIFF = _IOW('T', 202, int), and a _IOWR and a _IO.
        assert_eq!(ioc(IOC_READ, b'T', 0x30, 4), 0x8004_5430);
        assert_eq!(iow(b'T', 202, 4), 0x4004_54ca);
        assert_eq!(ioc(IOC_READ | IOC_WRITE, b'r', 0x81, 32), 0xc020_7281);
        assert_eq!(ioc(IOC_NONE, b'r', 0x80, 0), 0x7280);
        // The largest size the field holds.
        assert_eq!(ioc(IOC_WRITE, 0, 0, (1 << IOC_SIZEBITS) - 1), 0x7fff_0000);
    }

    #[test]
    #[should_panic(expected = "too large")]
    fn ioc_rejects_an_oversized_argument() {
        let size = std::hint::black_box(1 << IOC_SIZEBITS);
        ioc(IOC_WRITE, b'r', 0x81, size);
    }

    #[test]
    fn send_msg_req_layout() {
        assert_eq!(size_of::<TipcSendMsgReq>(), 32);
        assert_eq!(align_of::<TipcSendMsgReq>(), 8);
        assert_eq!(offset_of!(TipcSendMsgReq, iov), 0);
        assert_eq!(offset_of!(TipcSendMsgReq, shm), 8);
        assert_eq!(offset_of!(TipcSendMsgReq, iov_cnt), 16);
        assert_eq!(offset_of!(TipcSendMsgReq, shm_cnt), 24);
    }

    #[test]
    fn trusty_shm_layout() {
        assert_eq!(size_of::<TrustyShm>(), 8);
        assert_eq!(align_of::<TrustyShm>(), 4);
        assert_eq!(offset_of!(TrustyShm, fd), 0);
        assert_eq!(offset_of!(TrustyShm, transfer), 4);
        assert_eq!((TRUSTY_SHARE, TRUSTY_LEND, TRUSTY_SEND_SECURE), (0, 1, 2));
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tipc-test-kernel-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_missing_device_is_not_found() {
        for path in ["/nonexistent/trusty-ipc-dev0", "/dev/null/x"] {
            let e = KernelBackend::open(path).err().expect("no such device");
            assert!(matches!(e.kind, OpenErrorKind::Missing), "{path}: {e:?}");
            assert!(e.is_not_found());
            let msg = e.to_string();
            assert!(msg.contains("device not found") && msg.contains(path), "{msg}");
        }
    }

    #[test]
    fn a_regular_file_is_not_a_device() {
        let path = temp_path("regular");
        std::fs::write(&path, b"").unwrap();
        let e = KernelBackend::open(&path).err().expect("not a device");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(e.kind, OpenErrorKind::NotCharDevice), "{e:?}");
        assert!(!e.is_not_found());
        assert!(e.to_string().contains("not a character device"), "{e}");
    }

    #[test]
    fn open_errors_name_their_errno() {
        let e = |errno| OpenError { path: "/dev/x".into(), kind: OpenErrorKind::Open(io::Error::from_raw_os_error(errno)) };
        assert!(e(libc::EACCES).to_string().contains("permission denied (EACCES)"), "{}", e(libc::EACCES));
        assert!(e(libc::ENXIO).is_not_found());
        assert!(e(libc::ENXIO).to_string().contains("device not found"), "{}", e(libc::ENXIO));
        assert!(e(libc::EINVAL).to_string().contains("EINVAL (is Trusty online?)"), "{}", e(libc::EINVAL));
        assert!(!e(libc::EBUSY).is_not_found());
    }

    /// A character device with no trusty-ipc driver behind it: the CONNECT and SEND_MSG
    /// ioctls reach the kernel and come back ENOTTY (unknown request).
    #[test]
    fn connect_on_a_device_without_the_driver_fails_with_enotty() {
        let mut b = KernelBackend::open("/dev/null").expect("/dev/null opens");
        assert_eq!(b.describe(), "kernel: /dev/null (trusty-ipc driver)");
        assert_eq!(b.connect(crate::cases::ECHO), Err(Errno(libc::ENOTTY)));
        assert_eq!(Errno(libc::ENOTTY).to_string(), "ENOTTY");
        assert!(b.chans.is_empty(), "the failed channel's fd is closed");
        assert_eq!(b.connect("bad\0name"), Err(Errno(libc::EINVAL)));

        let h = adopt(&mut b, open_rdwr(Path::new("/dev/null")).unwrap());
        assert_eq!(b.send(h, &[b"x"], &[]), Err(Errno(libc::ENOTTY)));
        let shm = [TrustyShm { fd: h, transfer: TRUSTY_SHARE }];
        assert_eq!(b.send(h, &[], &shm), Err(Errno(libc::ENOTTY)));
        assert_eq!(b.close(h), Ok(()));
    }

    #[test]
    fn handles_it_did_not_open_are_ebadf() {
        let mut b = KernelBackend { path: "/dev/null".into(), chans: BTreeMap::new(), connector: None };
        // fd 1 is open (stdout), but not a channel of this backend: it must not be touched.
        assert_eq!(b.write(1, b"x"), Err(Errno(libc::EBADF)));
        assert_eq!(b.read(1, &mut [0; 4], Some(Duration::ZERO)), Err(Errno(libc::EBADF)));
        assert_eq!(b.wait_readable(1, Duration::ZERO), Err(Errno(libc::EBADF)));
        assert_eq!(b.send(1, &[b"x"], &[]), Err(Errno(libc::EBADF)));
        assert_eq!(b.close(1), Err(Errno(libc::EBADF)));
    }

    fn adopt(b: &mut KernelBackend, fd: OwnedFd) -> Handle {
        let h = fd.as_raw_fd();
        b.chans.insert(h, fd);
        h
    }

    /// The data path over a datagram socket pair, which keeps message boundaries the way a
    /// trusty-ipc channel does; the far end plays the echo service.
    #[test]
    fn data_path_over_a_message_socket() {
        let (near, far) = UnixDatagram::pair().unwrap();
        let mut b = KernelBackend { path: "/dev/null".into(), chans: BTreeMap::new(), connector: None };
        let h = adopt(&mut b, near.into());

        // write and writev: one message each, the concatenation of the buffers.
        assert_eq!(b.write(h, b"hello"), Ok(5));
        assert_eq!(b.writev(h, &[b"ab", b"", b"cde"]), Ok(5));
        let mut rx = [0u8; 16];
        assert_eq!(far.recv(&mut rx).unwrap(), 5);
        assert_eq!(&rx[..5], b"hello");
        assert_eq!(far.recv(&mut rx).unwrap(), 5);
        assert_eq!(&rx[..5], b"abcde");

        // Nothing queued: select times out, a bounded read gives ETIMEDOUT after its bound.
        assert_eq!(b.wait_readable(h, Duration::ZERO), Ok(false));
        let start = Instant::now();
        assert_eq!(b.read(h, &mut rx, Some(Duration::from_millis(50))), Err(Errno(libc::ETIMEDOUT)));
        assert!(start.elapsed() >= Duration::from_millis(50));

        // A message: readable, and readv spreads it over the buffers in order.
        far.send(b"0123456789").unwrap();
        assert_eq!(b.wait_readable(h, Duration::from_secs(5)), Ok(true));
        let (mut a, mut c) = ([0u8; 3], [0u8; 10]);
        assert_eq!(b.readv(h, &mut [&mut a, &mut c], Some(Duration::from_secs(5))), Ok(10));
        assert_eq!(&a, b"012");
        assert_eq!(&c[..7], b"3456789");

        // Without a timeout the read blocks until the message is there.
        far.send(b"late").unwrap();
        assert_eq!(b.read(h, &mut rx, None), Ok(4));
        assert_eq!(&rx[..4], b"late");

        assert_eq!(b.close(h), Ok(()));
        assert_eq!(b.close(h), Err(Errno(libc::EBADF)));
        assert_eq!(b.write(h, b"x"), Err(Errno(libc::EBADF)));
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(poll_ms(Duration::ZERO), 0);
        assert_eq!(poll_ms(Duration::from_nanos(1)), 1);
        assert_eq!(poll_ms(Duration::from_millis(500)), 500);
        assert_eq!(poll_ms(Duration::from_micros(1500)), 2);
        assert_eq!(poll_ms(Duration::MAX), libc::c_int::MAX);
    }
}
