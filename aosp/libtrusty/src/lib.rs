//! A libtrusty-compatible C API over the in-process TIPC stack.
//!
//! `tipc_connect`, `tipc_send` and `tipc_close` have AOSP libtrusty's names and signatures
//! (spec §7.4). With the kernel driver, a libtrusty channel is a file descriptor that callers
//! read, write and poll with the ordinary system calls; here the stack runs in the calling
//! process (on the embedded Trusty model), so the API adds `tipc_recv`, `tipc_write` and
//! `tipc_poll` for those operations and `tipc_init` / `tipc_shutdown` to start and stop the
//! stack. The C declarations are in `include/trusty/tipc.h` and `include/trusty/ipc.h`; link
//! the static library `libtrusty_capi.a` with `-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc`.
//!
//! Conventions (the header says the same for C users):
//! - failures are negative errno values, those AOSP's driver returns for the same condition
//!   (spec §7.3); NULL where data is required is `-EINVAL`, never a crash;
//! - handles are the lowest free small non-negative integers, never given out twice while open;
//! - every entry point may be called from any thread: one [`std::sync::Mutex`] guards the
//!   stack, and waiting calls release it between short slices;
//! - no panic crosses the boundary: each entry point catches unwinding and returns `-EIO`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod stack;

pub use stack::{DEFAULT_PLATFORM, SIM_DEV_NAME, TRUSTY_DEV_PREFIX};

/// `tipc_poll`: a message is queued.
pub const TIPC_POLLIN: c_int = 1;
/// `tipc_poll`: the channel is not connected (refused, closed by the peer, stale).
pub const TIPC_POLLERR: c_int = 8;

/// `enum transfer_kind` (AOSP `trusty/ipc.h`, spec §7.1): `TRUSTY_SHARE`, Linux and Trusty
/// both see the memory.
pub const TRUSTY_SHARE: u32 = 0;
/// `TRUSTY_LEND`: only Trusty sees the memory while it has it.
pub const TRUSTY_LEND: u32 = 1;
/// `TRUSTY_SEND_SECURE`: the memory is already secure; only Trusty sees it.
pub const TRUSTY_SEND_SECURE: u32 = 2;

/// Most buffers one `tipc_send` takes (Linux's UIO_MAXIOV).
pub const MAX_IOV: c_int = 1024;

/// `struct iovec` of `<sys/uio.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoVec {
    /// Start of the buffer.
    pub iov_base: *mut c_void,
    /// Its length in bytes.
    pub iov_len: usize,
}

/// `struct trusty_shm` of `<trusty/ipc.h>` (8 bytes, spec §7.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustyShm {
    /// The dma-buf file descriptor.
    pub fd: i32,
    /// A value of `enum transfer_kind`.
    pub transfer: u32,
}

/// Errno values this API returns besides those of `tipc::errno`.
pub mod errno {
    pub use tipc::errno::*;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
}

/// A failure: the positive errno value.
type Errno = i32;

/// A return type of the C API: a value, or a negative errno.
trait CReturn {
    fn from_errno(e: Errno) -> Self;
}

impl CReturn for c_int {
    fn from_errno(e: Errno) -> Self {
        -e
    }
}

impl CReturn for isize {
    fn from_errno(e: Errno) -> Self {
        -(e as isize)
    }
}

/// Runs one entry point: its `Err(errno)` becomes `-errno`, and a panic becomes `-EIO`.
fn entry<T: CReturn>(body: impl FnOnce() -> Result<T, Errno>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => T::from_errno(e),
        Err(_) => T::from_errno(errno::EIO),
    }
}

/// The bytes of a C string, or EINVAL for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
unsafe fn c_str<'a>(p: *const c_char) -> Result<&'a [u8], Errno> {
    if p.is_null() {
        return Err(errno::EINVAL);
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string valid for 'a.
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// `len` bytes at `p` as a slice (EINVAL for NULL with a non-zero length).
///
/// # Safety
/// Unless `len` is 0, `p` is NULL or points to `len` readable bytes valid for `'a`.
unsafe fn bytes<'a>(p: *const c_void, len: usize) -> Result<&'a [u8], Errno> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() || len > isize::MAX as usize {
        return Err(errno::EINVAL);
    }
    // SAFETY: not NULL, and the caller promises `len` readable bytes valid for 'a.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// Starts the stack on the platform profile `platform` (NULL: `"native-api5"`).
///
/// Returns 0 (also if that platform already runs), `-EBUSY` if another platform runs,
/// `-ENOENT` for an unknown profile, `-EINVAL` for a name that is not UTF-8, `-ENODEV` if the
/// platform has no safe way to reach Trusty, or the errno of the failed bring-up step.
/// Calling it is optional: `tipc_connect` starts the default platform if nothing runs.
///
/// # Safety
/// `platform` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tipc_init(platform: *const c_char) -> c_int {
    entry(|| {
        let name = if platform.is_null() {
            DEFAULT_PLATFORM
        } else {
            // SAFETY: not NULL; the caller promises a NUL-terminated string.
            let raw = unsafe { c_str(platform) }?;
            std::str::from_utf8(raw).map_err(|_| errno::EINVAL)?
        };
        stack::init(name).map(|()| 0)
    })
}

/// Stops the stack; every handle becomes invalid. Does nothing if it is not running.
#[no_mangle]
pub extern "C" fn tipc_shutdown() {
    entry(|| {
        stack::shutdown();
        Ok(0i32)
    });
}

/// Connects to the service `srv_name` through the device `dev_name` (`"sim"`, or
/// `"/dev/trusty-ipc-NAME"` for the TIPC device whose configured name is NAME); returns a
/// handle or a negative errno (see the header).
///
/// # Safety
/// Each argument is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tipc_connect(dev_name: *const c_char, srv_name: *const c_char) -> c_int {
    entry(|| {
        // SAFETY: the caller promises NULL or NUL-terminated strings.
        let (dev, srv) = unsafe { (c_str(dev_name)?, c_str(srv_name)?) };
        stack::connect(dev, srv)
    })
}

/// Sends one message: the concatenation of `iov`, plus `shm` memory objects (which this stack
/// cannot resolve: a well-formed entry gives `-EBADF`). Returns the data length or a negative
/// errno (see the header).
///
/// # Safety
/// `iov` is NULL or points to `iovcnt` `struct iovec`s, each of whose `iov_base` is NULL or
/// points to `iov_len` readable bytes; `shm` is NULL or points to `shmcnt` `struct trusty_shm`s.
#[no_mangle]
pub unsafe extern "C" fn tipc_send(
    fd: c_int,
    iov: *const IoVec,
    iovcnt: c_int,
    shm: *mut TrustyShm,
    shmcnt: c_int,
) -> isize {
    entry(|| {
        let (Ok(iovcnt), Ok(shmcnt)) = (usize::try_from(iovcnt), usize::try_from(shmcnt)) else {
            return Err(errno::EINVAL);
        };
        if iovcnt > MAX_IOV as usize || (iov.is_null() && iovcnt > 0) || (shm.is_null() && shmcnt > 0) {
            return Err(errno::EINVAL);
        }
        let iov: &[IoVec] = if iovcnt == 0 {
            &[]
        } else {
            // SAFETY: not NULL, and the caller promises `iovcnt` iovecs.
            unsafe { std::slice::from_raw_parts(iov, iovcnt) }
        };
        let parts = iov
            .iter()
            // SAFETY: the caller promises `iov_len` readable bytes at each non-NULL `iov_base`.
            .map(|v| unsafe { bytes(v.iov_base, v.iov_len) })
            .collect::<Result<Vec<&[u8]>, Errno>>()?;
        let shm: &[TrustyShm] = if shmcnt == 0 {
            &[]
        } else {
            // SAFETY: not NULL, and the caller promises `shmcnt` entries.
            unsafe { std::slice::from_raw_parts(shm, shmcnt) }
        };
        stack::send(fd, &parts, shm).map(|n| n as isize)
    })
}

/// Sends `len` bytes at `buf` as one message; returns `len` or a negative errno.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn tipc_write(fd: c_int, buf: *const c_void, len: usize) -> isize {
    entry(|| {
        // SAFETY: the caller promises `len` readable bytes at a non-NULL `buf`.
        let data = unsafe { bytes(buf, len) }?;
        stack::send(fd, &[data], &[]).map(|n| n as isize)
    })
}

/// Receives one whole message into `buf` (`-EMSGSIZE`, message kept, if it is smaller);
/// `timeout_ms` < 0 waits without limit, 0 not at all (`-EAGAIN`), > 0 at most that long
/// (`-ETIMEDOUT`). Returns the message length or a negative errno.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes that nothing else accesses during the call.
#[no_mangle]
pub unsafe extern "C" fn tipc_recv(fd: c_int, buf: *mut c_void, len: usize, timeout_ms: c_int) -> isize {
    entry(|| {
        let out: &mut [u8] = if len == 0 {
            &mut []
        } else if buf.is_null() || len > isize::MAX as usize {
            return Err(errno::EINVAL);
        } else {
            // SAFETY: not NULL, and the caller promises `len` writable bytes, not aliased.
            unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }
        };
        stack::recv(fd, out, timeout_ms).map(|n| n as isize)
    })
}

/// Waits until the channel is readable or not connected; returns `TIPC_POLLIN` /
/// `TIPC_POLLERR` bits, 0 on timeout, or a negative errno.
#[no_mangle]
pub extern "C" fn tipc_poll(fd: c_int, timeout_ms: c_int) -> c_int {
    entry(|| {
        let flags = stack::poll(fd, timeout_ms)?;
        let mut mask = 0;
        if flags.readable {
            mask |= TIPC_POLLIN;
        }
        if flags.error {
            mask |= TIPC_POLLERR;
        }
        Ok(mask)
    })
}

/// Closes a handle (free again on return); 0 or a negative errno.
#[no_mangle]
pub extern "C" fn tipc_close(fd: c_int) -> c_int {
    entry(|| stack::close(fd).map(|()| 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_become_negative_errno_and_panics_eio() {
        assert_eq!(entry::<c_int>(|| Err(errno::ENOENT)), -errno::ENOENT);
        assert_eq!(entry::<isize>(|| Err(errno::EMSGSIZE)), -(errno::EMSGSIZE as isize));
        assert_eq!(entry::<c_int>(|| Ok(3)), 3);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = entry::<c_int>(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(r, -errno::EIO);
    }

    #[test]
    fn struct_layouts_match_the_c_header() {
        assert_eq!(std::mem::size_of::<TrustyShm>(), 8);
        assert_eq!(std::mem::size_of::<IoVec>(), 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn null_pointers_are_einval() {
        // SAFETY: NULL arguments are allowed; the functions must reject them.
        unsafe {
            assert_eq!(tipc_connect(std::ptr::null(), c"x".as_ptr()), -errno::EINVAL);
            assert_eq!(tipc_connect(c"sim".as_ptr(), std::ptr::null()), -errno::EINVAL);
            assert_eq!(tipc_write(0, std::ptr::null(), 4), -(errno::EINVAL as isize));
            assert_eq!(tipc_recv(0, std::ptr::null_mut(), 4, 0), -(errno::EINVAL as isize));
            assert_eq!(tipc_send(0, std::ptr::null(), 1, std::ptr::null_mut(), 0), -(errno::EINVAL as isize));
            assert_eq!(tipc_send(0, std::ptr::null(), -1, std::ptr::null_mut(), 0), -(errno::EINVAL as isize));
            assert_eq!(tipc_send(0, std::ptr::null(), 0, std::ptr::null_mut(), 1), -(errno::EINVAL as isize));
        }
    }
}
