//! The backend over the in-process stack: a [`TipcDevice`] behind libtrusty-like integer
//! handles, with errors mapped to the errno values AOSP's driver returns.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use tipc::errno::{EBADF, ENODEV};
use tipc::{ChannelId, ForeignMemRef, Timeout, TipcDevice};

use crate::backend::{Errno, Handle, ShmObject, TipcBackend, Transfer};
use alloc::sync::Arc;
use core::any::Any;
use trusty_platform::mem::{Access, DmaRegion, PageAllocator, PhysRange, PAGE_SIZE};

/// A minimal spin lock (no_std, no dependency): the test's objects and the stack share one
/// page allocator, and a released object may be freed from inside the stack.
pub struct Mutex<T> {
    locked: core::sync::atomic::AtomicBool,
    value: core::cell::UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked` (see `lock`).
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: moving the lock moves the value; T: Send.
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        Mutex { locked: core::sync::atomic::AtomicBool::new(false), value: core::cell::UnsafeCell::new(value) }
    }

    /// Spins until the lock is free, then holds it until the guard is dropped.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        use core::sync::atomic::Ordering;
        while self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        MutexGuard { m: self }
    }
}

/// Holds a [`Mutex`].
pub struct MutexGuard<'a, T> {
    m: &'a Mutex<T>,
}

impl<T> core::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the value exists.
        unsafe { &*self.m.value.get() }
    }
}

impl<T> core::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and the guard is borrowed mutably.
        unsafe { &mut *self.m.value.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        self.m.locked.store(false, core::sync::atomic::Ordering::Release);
    }
}

/// Where a [`DeviceBackend`] takes pages for the test's memory objects (send-fd): an allocator
/// shared with whoever else uses it.
pub type ShmPages = Arc<Mutex<Box<dyn PageAllocator>>>;

/// A [`PageAllocator`] over [`ShmPages`], for the stack to share the allocator with the
/// backend's memory objects.
pub struct SharedPageAllocator(pub ShmPages);

impl PageAllocator for SharedPageAllocator {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        self.0.lock().alloc_zeroed(pages)
    }
    unsafe fn free(&mut self, region: DmaRegion) {
        // SAFETY: the caller's guarantee, passed on to the allocator the region came from.
        unsafe { self.0.lock().free(region) }
    }
}

/// Pages of one test object; given back to the allocator when the test and the stack (which
/// holds them until Trusty's RELEASE) have both let go.
struct PageRegion {
    region: Mutex<Option<DmaRegion>>,
    pages: ShmPages,
    len: usize,
    range: PhysRange,
    vaddr: usize,
}

impl Drop for PageRegion {
    fn drop(&mut self) {
        if let Some(r) = self.region.lock().take() {
            // SAFETY: the last holder is gone: the test dropped its object and the stack
            // reclaimed the share (or never shared it), so nobody uses the pages any more.
            unsafe { self.pages.lock().free(r) };
        }
    }
}

/// A memory object of a bare-metal backend: pages of the guest, written and read by the test
/// directly, as a process writes its dma-buf through its mapping.
pub struct PageObject {
    inner: Arc<PageRegion>,
}

impl PageObject {
    fn span(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        (end <= self.inner.len).then_some((self.inner.vaddr + off) as *mut u8)
    }
}

impl ShmObject for PageObject {
    fn len(&self) -> usize {
        self.inner.len
    }
    fn kind(&self) -> &'static str {
        "page buffer"
    }
    fn write(&mut self, off: usize, data: &[u8]) -> bool {
        match self.span(off, data.len()) {
            Some(p) => {
                // SAFETY: in bounds of pages this object keeps allocated; the peer may access
                // them concurrently (byte copies, as shared memory allows).
                unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => false,
        }
    }
    fn read(&self, off: usize, out: &mut [u8]) -> bool {
        match self.span(off, out.len()) {
            Some(p) => {
                // SAFETY: as in `write`.
                unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                true
            }
            None => false,
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What [`TipcBackend::health`] asks: anything the secure side saw go wrong.
pub type HealthCheck = Box<dyn FnMut() -> Result<(), String> + Send>;

/// A [`TipcDevice`] as a [`TipcBackend`]: handles are the smallest free slot of a table of
/// channels, as file descriptors are. Dropping it shuts the device down.
pub struct DeviceBackend {
    dev: Option<TipcDevice>,
    handles: Vec<Option<ChannelId>>,
    describe: String,
    health: Option<HealthCheck>,
    shm_pages: Option<ShmPages>,
}

impl DeviceBackend {
    /// Wraps a device that is up; `describe` is what [`TipcBackend::describe`] returns.
    pub fn new(dev: TipcDevice, describe: impl Into<String>) -> DeviceBackend {
        DeviceBackend { dev: Some(dev), handles: Vec::new(), describe: describe.into(), health: None, shm_pages: None }
    }

    /// Gives the backend pages for the test's memory objects, so that send-fd can run.
    pub fn with_shm_pages(mut self, pages: ShmPages) -> DeviceBackend {
        self.shm_pages = Some(pages);
        self
    }

    /// Sets the check [`TipcBackend::health`] runs after every test (without one: always Ok).
    pub fn with_health(mut self, check: impl FnMut() -> Result<(), String> + Send + 'static) -> DeviceBackend {
        self.set_health(check);
        self
    }

    /// Replaces the health check.
    pub fn set_health(&mut self, check: impl FnMut() -> Result<(), String> + Send + 'static) {
        self.health = Some(Box::new(check));
    }

    /// The device, until [`DeviceBackend::shutdown`] or [`DeviceBackend::take_device`].
    pub fn device(&mut self) -> Option<&mut TipcDevice> {
        self.dev.as_mut()
    }

    /// Takes the device out without shutting it down; every handle becomes invalid and every
    /// later operation fails with ENODEV.
    pub fn take_device(&mut self) -> Option<TipcDevice> {
        self.handles.clear();
        self.dev.take()
    }

    /// Tears the device down (spec §5.6); returns the error of the teardown, if any. Later
    /// operations fail with ENODEV; a second call does nothing.
    pub fn shutdown(&mut self) -> Result<(), String> {
        match self.take_device() {
            Some(dev) => dev.shutdown().1.map_err(|e| format!("teardown failed: {e}")),
            None => Ok(()),
        }
    }

    /// Sends one message with memory references to foreign pages
    /// ([`TipcDevice::send_memrefs`]), for a backend that can turn its objects into them.
    pub fn send_memrefs(&mut self, h: Handle, iov: &[&[u8]], refs: Vec<ForeignMemRef>) -> Result<usize, Errno> {
        let id = self.chan(h)?;
        let dev = self.dev()?;
        let t = Timeout::Ms(dev.config().txbuf_timeout_ms);
        Ok(dev.send_memrefs(id, iov, refs, t)?)
    }

    /// Linux `dn_share_fd()`'s first check: sharing needs a connected channel (ENOTCONN);
    /// EBADF for a handle that names none.
    pub fn require_connected(&mut self, h: Handle) -> Result<(), Errno> {
        let id = self.chan(h)?;
        match self.dev()?.channel_state(id)? {
            tipc::ChannelState::Connected => Ok(()),
            _ => Err(Errno(tipc::errno::ENOTCONN)),
        }
    }

    fn dev(&mut self) -> Result<&mut TipcDevice, Errno> {
        self.dev.as_mut().ok_or(Errno(ENODEV))
    }

    fn chan(&self, h: Handle) -> Result<ChannelId, Errno> {
        usize::try_from(h).ok().and_then(|i| self.handles.get(i).copied().flatten()).ok_or(Errno(EBADF))
    }
}

impl Drop for DeviceBackend {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn timeout(t: Option<Duration>) -> Timeout {
    match t {
        None => Timeout::Forever,
        Some(d) => Timeout::Ms(d.as_millis() as u64),
    }
}

impl TipcBackend for DeviceBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn connect(&mut self, port: &str) -> Result<Handle, Errno> {
        let id = self.dev()?.connect(port)?;
        let slot = match self.handles.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.handles.push(None);
                self.handles.len() - 1
            }
        };
        self.handles[slot] = Some(id);
        Ok(slot as Handle)
    }

    fn writev(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno> {
        let id = self.chan(h)?;
        let dev = self.dev()?;
        let t = Timeout::Ms(dev.config().txbuf_timeout_ms);
        Ok(dev.send(id, iov, &[], t)?)
    }

    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], t: Option<Duration>) -> Result<usize, Errno> {
        let id = self.chan(h)?;
        Ok(self.dev()?.recv(id, bufs, timeout(t))?)
    }

    fn wait_readable(&mut self, h: Handle, t: Duration) -> Result<bool, Errno> {
        let id = self.chan(h)?;
        let flags = self.dev()?.wait_any(&[id], timeout(Some(t)))?;
        Ok(flags.first().is_some_and(|f| f.readable || f.error))
    }

    fn close(&mut self, h: Handle) -> Result<(), Errno> {
        let id = self.chan(h)?;
        self.handles[h as usize] = None;
        Ok(self.dev()?.close(id)?)
    }

    fn alloc_shm(&mut self, len: usize) -> Result<Box<dyn ShmObject>, String> {
        let pages = self.shm_pages.clone().ok_or_else(|| String::from("no pages for memory objects were given to this backend"))?;
        let n = len.div_ceil(PAGE_SIZE).max(1);
        let region = pages.lock().alloc_zeroed(n).ok_or_else(|| format!("out of pages for a {len}-byte object"))?;
        let inner = PageRegion {
            range: region.range(),
            vaddr: region.vaddr().as_ptr() as usize,
            len: n * PAGE_SIZE,
            region: Mutex::new(Some(region)),
            pages,
        };
        Ok(Box::new(PageObject { inner: Arc::new(inner) }))
    }

    fn send_shm(&mut self, h: Handle, iov: &[&[u8]], shm: &[(&dyn ShmObject, Transfer)]) -> Result<usize, Errno> {
        if shm.len() > usize::from(u16::MAX) {
            return Err(Errno(tipc::errno::E2BIG));
        }
        let mut refs = Vec::with_capacity(shm.len());
        // Linux filp_send_ioctl(): per object, the transfer kind, then dn_share_fd() (the
        // channel's state, then the object).
        for (obj, transfer) in shm {
            transfer.check_shareable()?;
            self.require_connected(h)?;
            let o = obj.as_any().downcast_ref::<PageObject>().ok_or(Errno(EBADF))?;
            refs.push(ForeignMemRef {
                ranges: Vec::from([o.inner.range]),
                size: o.inner.len as u64,
                access: Access::ReadWrite,
                tag: 0,
                keep: Box::new(o.inner.clone()),
            });
        }
        self.send_memrefs(h, iov, refs)
    }

    fn health(&mut self) -> Result<(), String> {
        match &mut self.health {
            Some(check) => check(),
            None => Ok(()),
        }
    }
}
