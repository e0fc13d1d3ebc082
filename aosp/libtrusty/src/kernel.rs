//! Channels of the Linux trusty-ipc driver: `open(dev, O_RDWR)` then `TIPC_IOC_CONNECT`
//! (libtrusty's `tipc_connect()`), and `TIPC_IOC_SEND_MSG` for `tipc_send`.

use std::ffi::{c_int, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use trusty_ipcd::sys;

use crate::{Errno, IoVec, TrustyShm};

/// `_IOW('r', 0x80, char *)` (asm-generic `_IOC` encoding).
pub const TIPC_IOC_CONNECT: u32 = iow(0x80, std::mem::size_of::<*const u8>());
/// `_IOW('r', 0x81, struct tipc_send_msg_req)`.
pub const TIPC_IOC_SEND_MSG: u32 = iow(0x81, std::mem::size_of::<TipcSendMsgReq>());

const fn iow(nr: u32, size: usize) -> u32 {
    (1 << 30) | ((size as u32) << 16) | ((b'r' as u32) << 8) | nr
}

/// `struct tipc_send_msg_req` of the UAPI: user pointers and counts, all 64-bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TipcSendMsgReq {
    /// Address of the `struct iovec` array.
    pub iov: u64,
    /// Address of the `struct trusty_shm` array.
    pub shm: u64,
    /// Number of iovecs.
    pub iov_cnt: u64,
    /// Number of memory references.
    pub shm_cnt: u64,
}

/// Opens a channel of the driver at `path` to `port`.
pub fn connect(path: &Path, port: &str) -> Result<OwnedFd, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let dev = CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    let name = CString::new(port).map_err(|_| libc::EINVAL)?;
    let raw = loop {
        // SAFETY: `dev` is a NUL-terminated path.
        let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 && sys::errno() == libc::EINTR {
            continue;
        }
        break fd;
    };
    if raw < 0 {
        return Err(sys::errno());
    }
    // SAFETY: `raw` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    loop {
        // SAFETY: CONNECT reads the NUL-terminated string `name`, alive for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TIPC_IOC_CONNECT as _, name.as_ptr()) };
        if r >= 0 {
            return Ok(fd);
        }
        match sys::errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// `TIPC_IOC_SEND_MSG` on a driver channel.
///
/// # Safety
/// Each iovec's buffer is readable for its length.
pub unsafe fn send(fd: c_int, iov: &[IoVec], shm: &[TrustyShm]) -> Result<usize, Errno> {
    let req = TipcSendMsgReq {
        iov: iov.as_ptr() as u64,
        shm: shm.as_ptr() as u64,
        iov_cnt: iov.len() as u64,
        shm_cnt: shm.len() as u64,
    };
    loop {
        // SAFETY: the driver reads `req`, then the iovecs and trusty_shm entries it points to,
        // all borrowed for the call; the caller promises the iovec buffers are readable.
        let r = unsafe { libc::ioctl(fd, TIPC_IOC_SEND_MSG as _, &req as *const TipcSendMsgReq) };
        if r >= 0 {
            return Ok(r as usize);
        }
        match sys::errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_uapi_ones() {
        if cfg!(target_pointer_width = "64") {
            assert_eq!(TIPC_IOC_CONNECT, 0x4008_7280);
        }
        assert_eq!(TIPC_IOC_SEND_MSG, 0x4020_7281);
    }

    #[test]
    fn a_file_that_is_not_the_driver_is_enotty() {
        assert_eq!(connect(Path::new("/dev/null"), "x").err(), Some(libc::ENOTTY));
    }
}
