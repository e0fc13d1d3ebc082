//! Memory objects for `send-fd`: a dma-buf from the system heap where the kernel has one
//! (`/dev/dma_heap/system`, as tipc_test.c's `DmabufHeapAlloc(allocator, "system", ...)`),
//! else a memfd; each mapped into this process so the test reads and writes it as the C test
//! does through its `mmap`.

use std::any::Any;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use tipc_test_cases::backend::ShmObject;

/// Linux `DMA_HEAP_IOCTL_ALLOC` = `_IOWR('H', 0x0, struct dma_heap_allocation_data)`.
const DMA_HEAP_IOCTL_ALLOC: u32 = crate::kernel::ioctl::iowr(b'H', 0, std::mem::size_of::<DmaHeapAllocationData>());

/// `struct dma_heap_allocation_data` (linux/dma-heap.h).
#[repr(C)]
struct DmaHeapAllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// The system dma-buf heap.
pub const DMA_HEAP_SYSTEM: &str = "/dev/dma_heap/system";

/// A shared mapping of `len` bytes of `fd` at `ptr`, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; moving its owner between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: the owner only hands out byte copies and the raw pointer.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, read-write if `write`.
    pub fn new(fd: RawFd, len: usize, write: bool) -> io::Result<Mapping> {
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        Mapping::map(fd, len, prot, libc::MAP_SHARED)
    }

    /// Maps `len` bytes of a read-only `fd` copy-on-write: readable, and writable without the
    /// writes ever reaching the fd (for a peer that may write where it was given read access,
    /// on a platform whose ids carry no permission).
    pub fn new_private(fd: RawFd, len: usize) -> io::Result<Mapping> {
        Mapping::map(fd, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
    }

    fn map(fd: RawFd, len: usize, prot: libc::c_int, flags: libc::c_int) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing is overwritten.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        // SAFETY: off <= end <= len: inside the mapping.
        (end <= self.len).then(|| unsafe { self.ptr.as_ptr().add(off) })
    }

    /// Copies `data` in at `off`; false outside the mapping.
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        match self.range(off, data.len()) {
            // SAFETY: in bounds (checked); the other world may touch the bytes concurrently,
            // which shared memory allows (copies, no references kept).
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len());
                true
            },
            None => false,
        }
    }

    /// Copies out `out.len()` bytes at `off`; false outside the mapping.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        match self.range(off, out.len()) {
            // SAFETY: as in `write`.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len());
                true
            },
            None => false,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; nobody uses it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A memory object: its fd and this process's mapping of it.
pub struct FdObject {
    fd: OwnedFd,
    map: Mapping,
    kind: &'static str,
}

impl FdObject {
    /// A memfd of `len` bytes (sealed against shrinking, so a mapping of it stays valid).
    pub fn memfd(len: usize) -> io::Result<FdObject> {
        let name: &CStr = c"tipc-test-send-fd";
        // SAFETY: a valid NUL-terminated name; the flags are plain bits.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscalls on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above. Without shrinking, no mapping of it can lose its pages (SIGBUS).
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping::new(fd.as_raw_fd(), len, true)?;
        Ok(FdObject { fd, map, kind: "memfd" })
    }

    /// A dma-buf of `len` bytes from the heap device at `heap`.
    pub fn dma_buf(heap: &str, len: usize) -> io::Result<FdObject> {
        let heap_fd = std::fs::OpenOptions::new().read(true).open(heap)?;
        let mut data = DmaHeapAllocationData {
            len: len as u64,
            fd: 0,
            fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
            heap_flags: 0,
        };
        // SAFETY: the argument is the struct the ioctl number encodes, alive for the call.
        let rc = unsafe { libc::ioctl(heap_fd.as_raw_fd(), DMA_HEAP_IOCTL_ALLOC as _, &mut data as *mut DmaHeapAllocationData) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(data.fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel handed us this new fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let map = Mapping::new(fd.as_raw_fd(), len, true)?;
        Ok(FdObject { fd, map, kind: "dma-buf" })
    }

    /// tipc-test's choice: the system dma-buf heap if the kernel has it, else a memfd.
    pub fn for_send_fd(len: usize) -> io::Result<FdObject> {
        if std::path::Path::new(DMA_HEAP_SYSTEM).exists() {
            FdObject::dma_buf(DMA_HEAP_SYSTEM, len)
        } else {
            FdObject::memfd(len)
        }
    }

    /// The object's file descriptor (still owned by the object).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl ShmObject for FdObject {
    fn len(&self) -> usize {
        self.map.len()
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn write(&mut self, off: usize, data: &[u8]) -> bool {
        self.map.write(off, data)
    }
    fn read(&self, off: usize, out: &mut [u8]) -> bool {
        self.map.read(off, out)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The access mode of `fd`: (readable, writable), as `dn_share_fd()` reads `f_mode`.
pub fn fd_access(fd: RawFd) -> io::Result<(bool, bool)> {
    // SAFETY: F_GETFL on a caller's fd only reads its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match flags & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    })
}

/// Size of the object behind `fd` (`fstat`; for a dma-buf, its size as the kernel reports it).
pub fn fd_size(fd: RawFd) -> io::Result<usize> {
    // SAFETY: fstat fills the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// linux/dma-heap.h: DMA_HEAP_IOCTL_ALLOC is _IOWR('H', 0x0, struct
    /// dma_heap_allocation_data), a 24-byte struct.
    #[test]
    fn dma_heap_alloc_ioctl_number() {
        assert_eq!(std::mem::size_of::<DmaHeapAllocationData>(), 24);
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xC018_4800);
    }

    #[test]
    fn a_memfd_object_is_seen_through_a_second_mapping() {
        let mut obj = FdObject::memfd(3 * 4096).unwrap();
        assert_eq!((obj.len(), obj.kind()), (3 * 4096, "memfd"));
        assert!(obj.write(4096, b"hello"));
        assert!(!obj.write(3 * 4096 - 2, b"abc"), "past the end");
        let other = Mapping::new(obj.fd(), 3 * 4096, false).unwrap();
        let mut got = [0u8; 5];
        assert!(other.read(4096, &mut got));
        assert_eq!(&got, b"hello");
        assert_eq!(fd_access(obj.fd()).unwrap(), (true, true));
        assert_eq!(fd_size(obj.fd()).unwrap(), 3 * 4096);
        // A private mapping's writes never reach the memfd.
        let private = Mapping::new_private(obj.fd(), 4096).unwrap();
        assert!(private.write(0, b"secret"));
        let mut first = [0u8; 6];
        assert!(obj.read(0, &mut first));
        assert_eq!(first, [0; 6]);
    }
}
