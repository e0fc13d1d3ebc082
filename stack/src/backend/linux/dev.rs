//! Xen's userspace devices in a Linux guest, behind one trait ([`XenDevices`]) so that all the
//! logic above them runs in host tests against a fake. [`LinuxXen`] is the real thing:
//! `/dev/xen/gntalloc`, `/dev/xen/gntdev`, `/dev/xen/evtchn` (modules `xen-gntalloc`,
//! `xen-gntdev`, `xen-evtchn`), and `/proc/self/pagemap` for guest-physical frames.
//!
//! The ioctl argument structs and numbers are written here from Linux's UAPI headers
//! (include/uapi/xen/gntalloc.h, gntdev.h, evtchn.h); `_IOC(_IOC_NONE, type, nr, size)` is
//! `size << 16 | type << 8 | nr` on arm64 and x86 (include/uapi/asm-generic/ioctl.h).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use trusty_platform::mem::PAGE_SIZE;

/// Pages `/dev/xen/gntalloc` allocated and granted, mapped into this process.
#[derive(Debug)]
pub struct GrantedPages {
    /// Where the pages are mapped (page-aligned, `grefs.len()` pages).
    pub ptr: NonNull<u8>,
    /// One grant reference per page, in page order.
    pub grefs: Vec<u32>,
    /// The mmap offset gntalloc gave them (`ioctl_gntalloc_alloc_gref.index`).
    pub index: u64,
}

// SAFETY: the pages are plain shared memory owned by whoever holds this value.
unsafe impl Send for GrantedPages {}

/// Another domain's page mapped through `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct ForeignPage {
    /// Where it is mapped (one page).
    pub ptr: NonNull<u8>,
    /// The mmap offset gntdev gave it (`ioctl_gntdev_map_grant_ref.index`).
    pub index: u64,
}

// SAFETY: as for GrantedPages.
unsafe impl Send for ForeignPage {}

/// What the Linux backend needs from Xen's userspace devices.
pub trait XenDevices: Send + Sync {
    /// `count` zeroed pages granted read-write to `domid` and mapped here
    /// (IOCTL_GNTALLOC_ALLOC_GREF, then mmap at its index).
    fn alloc_granted(&self, domid: u16, count: u32) -> io::Result<GrantedPages>;
    /// Unmaps and deallocates pages from [`XenDevices::alloc_granted`]
    /// (IOCTL_GNTALLOC_DEALLOC_GREF; gntalloc ends the grants, deferring the free of any page
    /// the other domain still maps).
    fn free_granted(&self, pages: GrantedPages) -> io::Result<()>;
    /// Maps grant `gref` of domain `domid` read-write (IOCTL_GNTDEV_MAP_GRANT_REF, then mmap).
    fn map_foreign(&self, domid: u16, gref: u32) -> io::Result<ForeignPage>;
    /// Unmaps a page from [`XenDevices::map_foreign`] (munmap, IOCTL_GNTDEV_UNMAP_GRANT_REF).
    fn unmap_foreign(&self, page: ForeignPage);
    /// Binds `remote_port` of `domid` (IOCTL_EVTCHN_BIND_INTERDOMAIN): the local port.
    fn bind_interdomain(&self, domid: u16, remote_port: u32) -> io::Result<u32>;
    /// Signals local port `port` (IOCTL_EVTCHN_NOTIFY).
    fn notify(&self, port: u32) -> io::Result<()>;
    /// Waits up to `timeout_ms` for events (poll(2)); consumes and unmasks every port that
    /// fired (read, then write the ports back) and returns them. Empty: the time ran out.
    fn wait_events(&self, timeout_ms: i32) -> io::Result<Vec<u32>>;
    /// The guest-physical address of the page mapped at `vaddr` (`/proc/self/pagemap`; the
    /// frame number reads as 0 without CAP_SYS_ADMIN, which is an error here).
    fn guest_physical(&self, vaddr: usize) -> io::Result<u64>;
}

// --- ioctl ABI (include/uapi/xen/*.h) ---------------------------------------------------------

const fn ioc_none(ty: u8, nr: u8, size: usize) -> u64 {
    ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `struct ioctl_gntalloc_alloc_gref` (gntalloc.h): domid, flags, count in; index and
/// `gref_ids[count]` out. The ioctl number carries the size with one gref id (24 bytes); the
/// kernel writes `count` ids, so the buffer is sized for them (`GntallocAlloc`).
#[repr(C)]
struct GntallocAllocHeader {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
}
const GNTALLOC_ALLOC_GREF_SIZE: usize = 24;
const _: () = assert!(core::mem::size_of::<GntallocAllocHeader>() + 4 <= GNTALLOC_ALLOC_GREF_SIZE);
/// IOCTL_GNTALLOC_ALLOC_GREF: `_IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: u64 = ioc_none(b'G', 5, GNTALLOC_ALLOC_GREF_SIZE);
/// GNTALLOC_FLAG_WRITABLE.
const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_dealloc_gref`: index, count.
#[repr(C)]
struct GntallocDealloc {
    index: u64,
    count: u32,
}
/// IOCTL_GNTALLOC_DEALLOC_GREF: `_IOC(_IOC_NONE, 'G', 6, 16)`.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u64 = ioc_none(b'G', 6, core::mem::size_of::<GntallocDealloc>());

/// `struct ioctl_gntdev_map_grant_ref` (gntdev.h) with one `struct ioctl_gntdev_grant_ref`
/// (domid u32, ref u32).
#[repr(C)]
struct GntdevMapOne {
    count: u32,
    pad: u32,
    index: u64,
    domid: u32,
    gref: u32,
}
/// IOCTL_GNTDEV_MAP_GRANT_REF: `_IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u64 = ioc_none(b'G', 0, core::mem::size_of::<GntdevMapOne>());

/// `struct ioctl_gntdev_unmap_grant_ref`: index, count, pad.
#[repr(C)]
struct GntdevUnmap {
    index: u64,
    count: u32,
    pad: u32,
}
/// IOCTL_GNTDEV_UNMAP_GRANT_REF: `_IOC(_IOC_NONE, 'G', 1, 16)`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u64 = ioc_none(b'G', 1, core::mem::size_of::<GntdevUnmap>());

/// `struct ioctl_evtchn_bind_interdomain` (evtchn.h): remote_domain, remote_port.
#[repr(C)]
struct EvtchnBindInterdomain {
    remote_domain: u32,
    remote_port: u32,
}
/// IOCTL_EVTCHN_BIND_INTERDOMAIN: `_IOC(_IOC_NONE, 'E', 1, 8)`; returns the local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u64 = ioc_none(b'E', 1, core::mem::size_of::<EvtchnBindInterdomain>());

/// `struct ioctl_evtchn_notify`: port.
#[repr(C)]
struct EvtchnNotify {
    port: u32,
}
/// IOCTL_EVTCHN_NOTIFY: `_IOC(_IOC_NONE, 'E', 4, 4)`.
pub const IOCTL_EVTCHN_NOTIFY: u64 = ioc_none(b'E', 4, core::mem::size_of::<EvtchnNotify>());

/// Most grant references one allocation asks gntalloc for (its module parameter `limit`
/// defaults to 1024 for the whole device).
pub const MAX_ALLOC_PAGES: u32 = 256;

/// The real devices.
pub struct LinuxXen {
    gntalloc: OwnedFd,
    gntdev: OwnedFd,
    evtchn: OwnedFd,
    pagemap: Option<OwnedFd>,
}

fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the returned descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn with_path(path: &str, e: io::Error) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            " (is the module loaded: insmod xen-evtchn, xen-gntalloc, xen-gntdev? Linux finds Xen only with a \
             /hypervisor node: `xen,enhanced` for a dom0less guest)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => " (run as root)",
        _ => "",
    };
    io::Error::new(e.kind(), format!("{path}: {e}{hint}"))
}

/// ioctl(2) with a pointer argument; the result, or the errno.
///
/// # Safety
/// `arg` must point to the struct the request `req` reads and writes, valid for its size.
unsafe fn ioctl(fd: RawFd, req: u64, arg: *mut libc::c_void) -> io::Result<libc::c_int> {
    // The request parameter's C type differs between libcs (c_ulong for glibc, c_int for musl).
    // SAFETY: the caller's contract.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn mmap_shared(fd: RawFd, pages: usize, index: u64) -> io::Result<NonNull<u8>> {
    let offset = libc::off_t::try_from(index).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: a fresh mapping the kernel places; nothing existing is overwritten.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
}

fn munmap(ptr: NonNull<u8>, pages: usize) {
    // SAFETY: the caller hands over a mapping of `pages` pages it made with `mmap_shared` and
    // no longer uses.
    if unsafe { libc::munmap(ptr.as_ptr().cast(), pages * PAGE_SIZE) } != 0 {
        log::warn!("munmap: {}", io::Error::last_os_error());
    }
}

impl LinuxXen {
    /// Opens `/dev/xen/{gntalloc,gntdev,evtchn}` (and `/proc/self/pagemap` when `pagemap`).
    pub fn open(pagemap: bool) -> io::Result<LinuxXen> {
        let rw = libc::O_RDWR;
        Ok(LinuxXen {
            gntalloc: open(c"/dev/xen/gntalloc", rw).map_err(|e| with_path("/dev/xen/gntalloc", e))?,
            gntdev: open(c"/dev/xen/gntdev", rw).map_err(|e| with_path("/dev/xen/gntdev", e))?,
            evtchn: open(c"/dev/xen/evtchn", rw | libc::O_NONBLOCK).map_err(|e| with_path("/dev/xen/evtchn", e))?,
            pagemap: if pagemap {
                Some(open(c"/proc/self/pagemap", libc::O_RDONLY).map_err(|e| with_path("/proc/self/pagemap", e))?)
            } else {
                None
            },
        })
    }
}

impl XenDevices for LinuxXen {
    fn alloc_granted(&self, domid: u16, count: u32) -> io::Result<GrantedPages> {
        if count == 0 || count > MAX_ALLOC_PAGES {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Header plus `count` gref ids, in u64 words (the struct is 8-aligned).
        let words = (16 + 4 * count as usize).div_ceil(8).max(GNTALLOC_ALLOC_GREF_SIZE / 8);
        let mut buf = vec![0u64; words];
        let header = GntallocAllocHeader { domid, flags: GNTALLOC_FLAG_WRITABLE, count, index: 0 };
        // SAFETY: `buf` is at least 16 bytes and 8-aligned; the header is written at its start.
        unsafe { buf.as_mut_ptr().cast::<GntallocAllocHeader>().write(header) };
        // SAFETY: `buf` holds the header and room for `count` ids, as the kernel writes them
        // (gntalloc_ioctl_alloc copies `count` ids to `gref_ids`).
        unsafe { ioctl(self.gntalloc.as_raw_fd(), IOCTL_GNTALLOC_ALLOC_GREF, buf.as_mut_ptr().cast()) }
            .map_err(|e| with_path("IOCTL_GNTALLOC_ALLOC_GREF", e))?;
        let index = buf[1];
        let ids: Vec<u32> = (0..count as usize)
            .map(|i| {
                let w = buf[2 + i / 2];
                // Little-endian words: the first id of a pair is the low half.
                if cfg!(target_endian = "little") == (i % 2 == 0) {
                    w as u32
                } else {
                    (w >> 32) as u32
                }
            })
            .collect();
        match mmap_shared(self.gntalloc.as_raw_fd(), count as usize, index) {
            Ok(ptr) => Ok(GrantedPages { ptr, grefs: ids, index }),
            Err(e) => {
                let mut d = GntallocDealloc { index, count };
                // SAFETY: the struct the request reads.
                let _ = unsafe { ioctl(self.gntalloc.as_raw_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, raw_mut(&mut d).cast()) };
                Err(with_path("mmap of /dev/xen/gntalloc", e))
            }
        }
    }

    fn free_granted(&self, pages: GrantedPages) -> io::Result<()> {
        let count = pages.grefs.len() as u32;
        munmap(pages.ptr, count as usize);
        let mut d = GntallocDealloc { index: pages.index, count };
        // SAFETY: the struct the request reads.
        unsafe { ioctl(self.gntalloc.as_raw_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, raw_mut(&mut d).cast()) }
            .map(drop)
            .map_err(|e| with_path("IOCTL_GNTALLOC_DEALLOC_GREF", e))
    }

    fn map_foreign(&self, domid: u16, gref: u32) -> io::Result<ForeignPage> {
        let mut m = GntdevMapOne { count: 1, pad: 0, index: 0, domid: u32::from(domid), gref };
        // SAFETY: the struct the request reads and writes (one grant ref).
        unsafe { ioctl(self.gntdev.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, raw_mut(&mut m).cast()) }
            .map_err(|e| with_path("IOCTL_GNTDEV_MAP_GRANT_REF", e))?;
        match mmap_shared(self.gntdev.as_raw_fd(), 1, m.index) {
            Ok(ptr) => Ok(ForeignPage { ptr, index: m.index }),
            Err(e) => {
                let mut u = GntdevUnmap { index: m.index, count: 1, pad: 0 };
                // SAFETY: the struct the request reads.
                let _ = unsafe { ioctl(self.gntdev.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, raw_mut(&mut u).cast()) };
                // The map hypercall happens at mmap: a refused grant shows here (EINVAL under
                // XSM SILO, linux-domu.md §4).
                Err(with_path("mmap of /dev/xen/gntdev (Xen refused the grant mapping?)", e))
            }
        }
    }

    fn unmap_foreign(&self, page: ForeignPage) {
        munmap(page.ptr, 1);
        let mut u = GntdevUnmap { index: page.index, count: 1, pad: 0 };
        // SAFETY: the struct the request reads.
        if let Err(e) = unsafe { ioctl(self.gntdev.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, raw_mut(&mut u).cast()) } {
            log::warn!("IOCTL_GNTDEV_UNMAP_GRANT_REF: {e}");
        }
    }

    fn bind_interdomain(&self, domid: u16, remote_port: u32) -> io::Result<u32> {
        let mut b = EvtchnBindInterdomain { remote_domain: u32::from(domid), remote_port };
        // SAFETY: the struct the request reads; the result is the local port.
        let port = unsafe { ioctl(self.evtchn.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, raw_mut(&mut b).cast()) }
            .map_err(|e| with_path("IOCTL_EVTCHN_BIND_INTERDOMAIN", e))?;
        Ok(port as u32)
    }

    fn notify(&self, port: u32) -> io::Result<()> {
        let mut n = EvtchnNotify { port };
        // SAFETY: the struct the request reads.
        unsafe { ioctl(self.evtchn.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, raw_mut(&mut n).cast()) }
            .map(drop)
            .map_err(|e| with_path("IOCTL_EVTCHN_NOTIFY", e))
    }

    fn wait_events(&self, timeout_ms: i32) -> io::Result<Vec<u32>> {
        let fd = self.evtchn.as_raw_fd();
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(e) };
        }
        if r == 0 {
            return Ok(Vec::new());
        }
        // The device hands out pending ports as u32s; each stays masked until written back
        // (drivers/xen/evtchn.c evtchn_read / evtchn_write).
        let mut ports = [0u32; 16];
        // SAFETY: reads at most the buffer's size into it.
        let n = unsafe { libc::read(fd, ports.as_mut_ptr().cast(), core::mem::size_of_val(&ports)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(Vec::new()) } else { Err(e) };
        }
        let got = &ports[..n as usize / 4];
        // SAFETY: writes exactly the ports just read back: unmasks them.
        let w = unsafe { libc::write(fd, got.as_ptr().cast(), core::mem::size_of_val(got)) };
        if w < 0 {
            log::warn!("unmasking event channel ports {got:?}: {}", io::Error::last_os_error());
        }
        Ok(got.to_vec())
    }

    fn guest_physical(&self, vaddr: usize) -> io::Result<u64> {
        let fd = self.pagemap.as_ref().ok_or_else(|| io::Error::other("/proc/self/pagemap not opened"))?;
        // One u64 per virtual page (Documentation/admin-guide/mm/pagemap.rst): bit 63
        // present, bits 0-54 the frame number (0 without CAP_SYS_ADMIN).
        let mut entry = 0u64;
        let offset = (vaddr / PAGE_SIZE * 8) as libc::off_t;
        // SAFETY: reads 8 bytes into a local.
        let n = unsafe { libc::pread(fd.as_raw_fd(), raw_mut(&mut entry).cast(), 8, offset) };
        if n != 8 {
            return Err(with_path("/proc/self/pagemap", io::Error::last_os_error()));
        }
        let frame = entry & ((1 << 55) - 1);
        if entry >> 63 == 0 || frame == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "/proc/self/pagemap shows no frame number (needs root: CAP_SYS_ADMIN)",
            ));
        }
        Ok(frame * PAGE_SIZE as u64)
    }
}

fn raw_mut<T>(r: &mut T) -> *mut T {
    r as *mut T
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers Linux's headers produce (checked against a C build of
    /// include/uapi/xen/*.h: `printf("%#lx", IOCTL_...)`).
    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }
}
