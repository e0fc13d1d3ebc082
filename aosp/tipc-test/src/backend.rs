//! What the tests talk to: the libtrusty-like interface of `tipc-test-cases`, implemented by
//! the in-process stack against the embedded model.

use std::os::fd::RawFd;
use std::sync::Arc;

use tipc::ForeignMemRef;
use trusty_model::host::{ForeignPages, GuestRam};
use trusty_platform::mem::Access;

use crate::shm::{fd_access, fd_size, FdObject, Mapping};

use platforms::Profile;
use trusty_stack::{bring_up_platform, BringUp, StackConfig};
use tipc::TipcDevice;
use trusty_model::host::{ModelMode, Sim};

pub use tipc_test_cases::backend::{Errno, Handle, ShmObject, TipcBackend, Transfer};
pub use tipc_test_cases::DeviceBackend;

/// The in-process stack over the embedded model: a [`DeviceBackend`] whose health check asks
/// the model for faults and panics.
pub struct SimBackend {
    // Field order matters: the device goes before the machine it runs on.
    dev: DeviceBackend,
    sim: Arc<Sim>,
    info: BringUp,
}

/// A bring-up that failed, with what the secure side saw.
#[derive(Debug)]
pub struct BringUpFailure {
    /// The sharing line of the plan that was tried, if bring-up got that far.
    pub sharing: Option<String>,
    /// What failed.
    pub error: String,
    /// Faults the model recorded (memory it was never given).
    pub faults: Vec<String>,
}

impl std::fmt::Display for BringUpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bring-up failed: {}", self.error)?;
        for fault in &self.faults {
            write!(f, "\n  {fault}")?;
        }
        Ok(())
    }
}

/// The first fault the model recorded, or its panic.
fn model_health(sim: &Sim) -> Result<(), String> {
    let m = sim.model();
    if let Some(f) = m.faults().first() {
        return Err(format!("{f}"));
    }
    if m.panicked() {
        return Err("Trusty model panicked".into());
    }
    Ok(())
}

impl SimBackend {
    /// Boots the machine of `profile` and brings the stack up on it.
    pub fn new(mode: ModelMode, profile: &Profile, cfg: StackConfig) -> Result<SimBackend, BringUpFailure> {
        let sim = Arc::new(profile.boot(mode));
        match bring_up_platform(profile.access(&sim), cfg) {
            Ok((dev, info)) => {
                let mode = match mode {
                    ModelMode::Sync => "sim",
                    ModelMode::Threaded => "sim-threaded",
                    ModelMode::Cores => "sim-cores",
                };
                let describe = format!(
                    "{mode}: platform {}, embedded Trusty model '{}' ({} variant), API {}",
                    profile.name,
                    info.version.as_deref().unwrap_or("unknown"),
                    profile.machine.model.variant.name(),
                    info.api_version
                );
                let model = sim.clone();
                let dev = DeviceBackend::new(dev, describe).with_health(move || model_health(&model));
                Ok(SimBackend { dev, sim, info })
            }
            Err(e) => {
                let faults = sim.model().faults().iter().map(|f| f.to_string()).collect();
                Err(BringUpFailure { sharing: e.plan().map(|p| p.to_string()), error: e.to_string(), faults })
            }
        }
    }

    /// The default machine: no hypervisor, Trusty API 5 with FF-A.
    pub fn native(mode: ModelMode) -> Result<SimBackend, BringUpFailure> {
        let profile = platforms::by_name("native-api5").expect("built-in profile");
        SimBackend::new(mode, &profile, StackConfig::default())
    }

    /// What bring-up learned and decided.
    pub fn bring_up_info(&self) -> &BringUp {
        &self.info
    }

    /// The simulated machine (the model and its guest RAM).
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// The TIPC device (present until shutdown).
    pub fn device(&mut self) -> &mut TipcDevice {
        self.dev.device().expect("device present until shutdown")
    }

    /// The handle table over the device.
    pub fn backend(&mut self) -> &mut DeviceBackend {
        &mut self.dev
    }

    /// Tears the stack down; returns the error of the teardown, if any.
    pub fn shutdown(&mut self) -> Result<(), String> {
        self.dev.shutdown()
    }
}

impl TipcBackend for SimBackend {
    fn describe(&self) -> String {
        self.dev.describe()
    }
    fn connect(&mut self, port: &str) -> Result<Handle, Errno> {
        self.dev.connect(port)
    }
    fn writev(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno> {
        self.dev.writev(h, iov)
    }
    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], timeout: Option<std::time::Duration>) -> Result<usize, Errno> {
        self.dev.readv(h, bufs, timeout)
    }
    fn wait_readable(&mut self, h: Handle, timeout: std::time::Duration) -> Result<bool, Errno> {
        self.dev.wait_readable(h, timeout)
    }
    fn close(&mut self, h: Handle) -> Result<(), Errno> {
        self.dev.close(h)
    }
    fn alloc_shm(&mut self, len: usize) -> Result<Box<dyn ShmObject>, String> {
        // The embedded machine has no dma-buf heap: a memfd, as tipc-test uses where none exists.
        FdObject::memfd(len).map(|o| Box::new(o) as Box<dyn ShmObject>).map_err(|e| e.to_string())
    }

    fn send_shm(&mut self, h: Handle, iov: &[&[u8]], shm: &[(&dyn ShmObject, Transfer)]) -> Result<usize, Errno> {
        let mut fds = Vec::with_capacity(shm.len());
        for (obj, transfer) in shm {
            let o = obj.as_any().downcast_ref::<FdObject>().ok_or(Errno(libc::EBADF))?;
            fds.push((o.fd(), *transfer));
        }
        self.send_fds(h, iov, &fds)
    }

    fn health(&mut self) -> Result<(), String> {
        self.dev.health()
    }
}

impl SimBackend {
    /// libtrusty's `tipc_send` with fds on the embedded machine: each fd becomes a memory
    /// reference ([`fd_memref`]), honouring the transfer kind as the Linux driver does.
    pub fn send_fds(&mut self, h: Handle, iov: &[&[u8]], shm: &[(RawFd, Transfer)]) -> Result<usize, Errno> {
        // Linux filp_send_ioctl(): more than 65535 references is E2BIG before anything else.
        if shm.len() > usize::from(u16::MAX) {
            return Err(Errno(tipc::errno::E2BIG));
        }
        let mut refs = Vec::with_capacity(shm.len());
        // Linux filp_send_ioctl(): per fd, the transfer kind, then dn_share_fd() (the
        // channel's state, then the fd).
        for &(fd, transfer) in shm {
            transfer.check_shareable()?;
            self.dev.require_connected(h)?;
            refs.push(fd_memref(self.sim.ram(), fd, transfer)?);
        }
        self.dev.send_memrefs(h, iov, refs)
    }
}

/// What keeps a sent fd's pages alive: detached from guest RAM first, then unmapped.
struct FdHold {
    _pages: ForeignPages,
}

/// One fd as a memory reference of the embedded machine, as Linux `dn_share_fd()` takes it:
/// a write-only fd is EACCES; a writable one is shared read-write, else read-only. The fd's
/// memory is mapped here and attached to the machine's guest RAM at a fresh address (so the
/// model reaches exactly those pages, and only through the share); the mapping is what the
/// reference keeps alive until Trusty releases it.
///
/// Transfer kinds as [`Transfer::check_shareable`] says.
pub fn fd_memref(ram: &Arc<GuestRam>, fd: RawFd, transfer: Transfer) -> Result<ForeignMemRef, Errno> {
    transfer.check_shareable()?;
    let (readable, writable) = fd_access(fd).map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    if !readable {
        return Err(Errno(libc::EACCES));
    }
    let size = fd_size(fd).map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EINVAL)))?;
    if size == 0 {
        return Err(Errno(libc::EINVAL));
    }
    let pages = size.div_ceil(trusty_platform::mem::PAGE_SIZE);
    let len = pages * trusty_platform::mem::PAGE_SIZE;
    // A read-only fd is mapped copy-on-write: where the platform's ids carry no permission
    // (bare addresses) a peer writing anyway cannot reach the fd (nor fault this process).
    let map = if writable { Mapping::new(fd, len, true) } else { Mapping::new_private(fd, len) };
    let map = map.map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::ENOMEM)))?;
    let ptr = map.ptr();
    // SAFETY: `map` maps pages * PAGE_SIZE bytes of the fd at `ptr` (page-aligned, as every
    // mmap is) and is moved into the guard, which keeps it until the pages are detached.
    let pages_guard = unsafe { ram.attach_foreign(ptr, pages, Box::new(map)) }.ok_or(Errno(libc::ENOMEM))?;
    let range = pages_guard.range();
    Ok(ForeignMemRef {
        ranges: vec![range],
        size: size as u64,
        access: if writable { Access::ReadWrite } else { Access::ReadOnly },
        tag: 0,
        keep: Box::new(FdHold { _pages: pages_guard }),
    })
}
