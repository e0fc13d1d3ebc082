//! AOSP libtrusty's C API: `tipc_connect` returns a file descriptor, and the caller uses it
//! with `read`/`write`/`readv`/`writev`/`poll`/`select`/`close` as with the kernel driver
//! (drivers/trusty/trusty-ipc.c); `tipc_send` sends one message with memory references;
//! `tipc_close` closes it.
//!
//! Device names, chosen as AOSP's library does (`tipc_connect()` in libtrusty's trusty.c):
//! - `VSOCK:[STREAM:|SEQPACKET:]cid:port`: a vsock connection to Trusty's vsock bridge (or to
//!   trusty-ipcd's vsock listener) with the bridge's convention (see [`conn`]);
//! - a path to a socket (trusty-ipcd's `--socket`): the daemon, same convention over
//!   `AF_UNIX` `SOCK_SEQPACKET`;
//! - any other path (`/dev/trusty-ipcN`, `/dev/trusty-ipc-dev0`): the kernel driver,
//!   `open(O_RDWR)` then `TIPC_IOC_CONNECT`;
//! - with the `sim` feature, a name without '/' (`sim`, `sim-threaded`, a platform profile):
//!   an in-process stack on the embedded model, served by the daemon's serving loop on a
//!   thread of this process over a socket pair per channel (see [`inproc`]).
//!
//! Return conventions are AOSP's: `tipc_connect` returns the fd or a negative errno;
//! `tipc_send` returns the ioctl's result on the kernel driver (-1, errno set) and, like
//! AOSP's vsock path, a negative errno on a socket channel (errno is set too); `tipc_close`
//! returns close(2)'s result. Nothing here relies on unwinding (device builds use
//! panic=abort): no code path panics on caller input.

use std::ffi::{c_char, c_int, CStr};
use std::os::fd::{IntoRawFd, OwnedFd};

pub mod conn;
#[cfg(feature = "sim")]
pub mod inproc;
pub mod kernel;

/// `enum transfer_kind` (AOSP `trusty/ipc.h`, spec §7.1): `TRUSTY_SHARE`, Linux and Trusty
/// both see the memory.
pub const TRUSTY_SHARE: u32 = 0;
/// `TRUSTY_LEND`: only Trusty sees the memory while it has it.
pub const TRUSTY_LEND: u32 = 1;
/// `TRUSTY_SEND_SECURE`: the memory is already secure; only Trusty sees it.
pub const TRUSTY_SEND_SECURE: u32 = 2;
/// `TRUSTY_SEND_SECURE_OR_SHARE`: secure memory is sent as such, other memory is shared.
pub const TRUSTY_SEND_SECURE_OR_SHARE: u32 = 3;

/// Most buffers one `tipc_send` takes (Linux's UIO_MAXIOV).
pub const MAX_IOV: c_int = 1024;

/// `struct iovec` of `<sys/uio.h>`.
pub type IoVec = libc::iovec;

/// `struct trusty_shm` of `<trusty/ipc.h>` (8 bytes, spec §7.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustyShm {
    /// The dma-buf file descriptor.
    pub fd: i32,
    /// A value of `enum transfer_kind`.
    pub transfer: u32,
}

/// A failure: the positive errno value.
pub type Errno = i32;

/// Opens a channel to `port` through device `dev` (the names of the crate documentation).
pub fn connect(dev: &str, port: &str) -> Result<OwnedFd, Errno> {
    if let Some(rest) = dev.strip_prefix("VSOCK:") {
        return conn::connect_vsock(rest, port);
    }
    if !dev.contains('/') {
        #[cfg(feature = "sim")]
        return inproc::connect(dev, port);
        #[cfg(not(feature = "sim"))]
        return Err(libc::ENOENT);
    }
    let path = std::path::Path::new(dev);
    if conn::is_socket(path) {
        return conn::connect_unix(path, port);
    }
    kernel::connect(path, port)
}

/// Sends one message of the concatenation of `iov`, with memory references `shm`, on the
/// channel `fd`: a socket channel gets one packet (memory references: see
/// [`conn::send`]), a kernel channel `TIPC_IOC_SEND_MSG`. Returns the data length.
///
/// # Safety
/// `iov` holds valid iovecs (each `iov_base` readable for `iov_len` bytes); `shm` entries are
/// plain values.
pub unsafe fn send(fd: c_int, iov: &[IoVec], shm: &[TrustyShm]) -> Result<usize, Errno> {
    match trusty_ipcd::sys::socket_type(fd) {
        // SAFETY: the caller's promise about `iov` is passed on.
        Ok(_) => unsafe { conn::send(fd, iov, shm) },
        // SAFETY: as above.
        Err(libc::ENOTSOCK) => unsafe { kernel::send(fd, iov, shm) },
        Err(e) => Err(e),
    }
}

/// Sets the calling thread's errno.
fn set_errno(e: Errno) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Connects to the service `srv_name` through the device `dev_name`; returns a file
/// descriptor, or a negative errno (see `trusty/tipc.h`).
///
/// # Safety
/// Each argument is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tipc_connect(dev_name: *const c_char, srv_name: *const c_char) -> c_int {
    if dev_name.is_null() || srv_name.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: not NULL; the caller promises NUL-terminated strings.
    let (dev, srv) = unsafe { (CStr::from_ptr(dev_name), CStr::from_ptr(srv_name)) };
    let (Ok(dev), Ok(srv)) = (dev.to_str(), srv.to_str()) else { return -libc::EINVAL };
    match connect(dev, srv) {
        Ok(fd) => fd.into_raw_fd(),
        Err(e) => -e,
    }
}

/// Sends one message: the concatenation of `iov`, plus the `shm` memory objects; returns the
/// number of data bytes sent, or an error as `trusty/tipc.h` describes.
///
/// # Safety
/// `iov` is NULL or points to `iovcnt` `struct iovec`s whose buffers are readable; `shm` is
/// NULL or points to `shmcnt` `struct trusty_shm`s.
#[no_mangle]
pub unsafe extern "C" fn tipc_send(fd: c_int, iov: *const IoVec, iovcnt: c_int, shm: *mut TrustyShm, shmcnt: c_int) -> isize {
    let fail = |e: Errno| {
        set_errno(e);
        -(e as isize)
    };
    let (Ok(iovcnt), Ok(shmcnt)) = (usize::try_from(iovcnt), usize::try_from(shmcnt)) else {
        return fail(libc::EINVAL);
    };
    if iovcnt > MAX_IOV as usize || (iov.is_null() && iovcnt > 0) || (shm.is_null() && shmcnt > 0) {
        return fail(libc::EINVAL);
    }
    let iov: &[IoVec] = if iovcnt == 0 {
        &[]
    } else {
        // SAFETY: not NULL, and the caller promises `iovcnt` iovecs.
        unsafe { std::slice::from_raw_parts(iov, iovcnt) }
    };
    let shm: &[TrustyShm] = if shmcnt == 0 {
        &[]
    } else {
        // SAFETY: not NULL, and the caller promises `shmcnt` entries.
        unsafe { std::slice::from_raw_parts(shm, shmcnt) }
    };
    // SAFETY: the caller's promises about the buffers are passed on.
    match unsafe { send(fd, iov, shm) } {
        Ok(n) => n as isize,
        // The kernel path returns the ioctl's -1 with errno, as AOSP's tipc_send does.
        Err(e) if trusty_ipcd::sys::socket_type(fd) == Err(libc::ENOTSOCK) => {
            set_errno(e);
            -1
        }
        Err(e) => fail(e),
    }
}

/// Closes the channel `fd` (the peer is told); returns close(2)'s result.
#[no_mangle]
pub extern "C" fn tipc_close(fd: c_int) -> c_int {
    conn::forget(fd);
    // SAFETY: closing a descriptor the caller owns; nothing else here uses it.
    unsafe { libc::close(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_c_header() {
        assert_eq!(std::mem::size_of::<TrustyShm>(), 8);
        assert_eq!(std::mem::size_of::<IoVec>(), 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn null_pointers_are_einval() {
        // SAFETY: NULL arguments are allowed; the functions must reject them.
        unsafe {
            assert_eq!(tipc_connect(std::ptr::null(), c"x".as_ptr()), -libc::EINVAL);
            assert_eq!(tipc_connect(c"sim".as_ptr(), std::ptr::null()), -libc::EINVAL);
            assert_eq!(tipc_send(0, std::ptr::null(), 1, std::ptr::null_mut(), 0), -(libc::EINVAL as isize));
            assert_eq!(tipc_send(0, std::ptr::null(), -1, std::ptr::null_mut(), 0), -(libc::EINVAL as isize));
            assert_eq!(tipc_send(0, std::ptr::null(), 0, std::ptr::null_mut(), 1), -(libc::EINVAL as isize));
        }
    }

    #[test]
    fn unknown_devices_are_enoent() {
        assert_eq!(connect("/no/such/dir/trusty-ipc-dev0", "x").err(), Some(libc::ENOENT));
        #[cfg(feature = "sim")]
        assert_eq!(connect("no-such-platform", "x").err(), Some(libc::ENOENT));
    }
}
