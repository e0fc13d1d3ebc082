//! Memory references a client attaches to a message (spec §6.9): its file descriptors (memfd,
//! dma-buf) arrive with the packet as SCM_RIGHTS and become TIPC shm descriptors.
//!
//! Each fd is taken as Linux `dn_share_fd()` takes it: not readable (write-only) is EACCES;
//! writable means shared read-write, else read-only. Turning an fd's memory into something the
//! platform's sharer can share is the platform's part ([`Stack::memref`]): on the embedded
//! machine its pages are mapped here and attached to the simulated guest RAM; where a platform
//! has no way (plain Linux user space cannot hand its pages to Trusty), every descriptor is
//! refused with EOPNOTSUPP. The stack keeps what each reference needs alive (the mapping)
//! until Trusty's RELEASE, or until the message is dropped, and then reclaims the share and
//! drops it ([`tipc::TipcDevice::send_memrefs`]). A client that dies closes its channels;
//! Trusty then lets go of the references and the same happens.
//!
//! Transfer kinds travel no further than the library: it refuses TRUSTY_LEND and
//! TRUSTY_SEND_SECURE (as the kernel driver does where the platform cannot honour them), so
//! every descriptor the daemon gets is to be shared.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use tipc::{ForeignMemRef, TipcDevice};

use crate::server::Stack;

/// Identifies the connection that owns references (its slot and a generation).
pub type Owner = u64;

/// A platform's way of turning one client fd into a memory reference.
pub type FdToMemRef = Box<dyn FnMut(RawFd) -> Result<ForeignMemRef, i32> + Send>;

/// The memory references the daemon holds for its clients (the device holds each until
/// Trusty is done with it).
#[derive(Default)]
pub struct MemRefs {
    _private: (),
}

impl MemRefs {
    /// No references held yet.
    pub fn new() -> MemRefs {
        MemRefs::default()
    }

    /// Turns the descriptors of one message from `owner` into memory references to send with
    /// it. The fds stay the caller's (a message that must wait for a tx buffer is attached
    /// again when it goes).
    pub fn attach(&mut self, stack: &mut Stack, _owner: Owner, fds: &[OwnedFd]) -> Result<Vec<ForeignMemRef>, i32> {
        let Some(f) = stack.memref.as_mut() else {
            return Err(libc::EOPNOTSUPP);
        };
        fds.iter().map(|fd| f(fd.as_raw_fd())).collect()
    }

    /// Ids released by Trusty that were not the daemon's own references (those are reclaimed
    /// by the device itself).
    pub fn reap(&mut self, dev: &mut TipcDevice) {
        while let Some(id) = dev.take_released() {
            log::debug!("memory reference {id:#x} released by Trusty");
        }
    }

    /// `owner` went away: what it still holds goes once Trusty releases it.
    pub fn client_gone(&mut self, _owner: Owner) {}

    /// References shared and not yet released.
    pub fn live(&self, dev: &TipcDevice) -> usize {
        dev.memrefs_outstanding()
    }
}

/// The access mode of `fd`: (readable, writable), as `dn_share_fd()` reads `f_mode`.
pub fn fd_access(fd: RawFd) -> Result<(bool, bool), i32> {
    // SAFETY: F_GETFL only reads the flags of the caller's fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno());
    }
    Ok(match flags & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    })
}

/// Size in bytes of the object behind `fd` (`fstat`).
pub fn fd_size(fd: RawFd) -> Result<usize, i32> {
    // SAFETY: fstat fills the zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(errno());
    }
    usize::try_from(st.st_size).map_err(|_| libc::EINVAL)
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// A mapping of a client's fd, unmapped on drop.
pub struct FdMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; its owner may move between threads.
unsafe impl Send for FdMapping {}
// SAFETY: the owner only hands out the pointer.
unsafe impl Sync for FdMapping {}

impl FdMapping {
    /// Maps `len` bytes of `fd`: shared read-write when `writable`; otherwise copy-on-write,
    /// so that a peer writing where it was given read access (ids without permissions) can
    /// never reach the fd.
    pub fn new(fd: RawFd, len: usize, writable: bool) -> Result<FdMapping, i32> {
        let flags = if writable { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        // SAFETY: a fresh mapping chosen by the kernel; nothing is overwritten.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(libc::ENOMEM)?;
        Ok(FdMapping { ptr, len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for FdMapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; nobody uses it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Checks one fd as `dn_share_fd()` does and maps it whole: (mapping, size, writable).
pub fn map_client_fd(fd: RawFd, page_size: usize) -> Result<(FdMapping, usize, bool), i32> {
    let (readable, writable) = fd_access(fd)?;
    if !readable {
        return Err(libc::EACCES);
    }
    let size = fd_size(fd)?;
    if size == 0 {
        return Err(libc::EINVAL);
    }
    let len = size.div_ceil(page_size) * page_size;
    Ok((FdMapping::new(fd, len, writable)?, size, writable))
}
