//! The in-process stack behind the C API: one TIPC device brought up on a simulated platform
//! (the embedded Trusty model), a table of handles over its channels, and the lock that
//! serialises every call.
//!
//! Waiting operations never hold the lock for long: they wait in slices of [`SLICE_MS`],
//! releasing the lock between two, so that one thread blocked in `tipc_recv` does not keep
//! another from writing on a different channel. `tipc_connect` is the exception: it holds the
//! lock until the secure side answers (on the embedded model the answer comes inside the kick).

use std::ffi::c_int;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tipc::stack::{bring_up_platform, BringUpError, StackConfig};
use tipc::{ChannelId, PollFlags, Timeout, TipcDevice};
use trusty_model::host::{ModelMode, Sim};

use crate::{errno, Errno, TrustyShm, TRUSTY_SEND_SECURE};

/// The platform profile `tipc_init(NULL)` and an implicit start use: no hypervisor, Trusty
/// API 5 with FF-A.
pub const DEFAULT_PLATFORM: &str = "native-api5";
/// The device name of the in-process stack, as `tipc-test -D sim` names it.
pub const SIM_DEV_NAME: &str = "sim";
/// Android's device nodes are this prefix plus the name in the TIPC device's configuration
/// (spec §5.1: `/dev/trusty-ipc-dev0` for the device named "dev0").
pub const TRUSTY_DEV_PREFIX: &str = "/dev/trusty-ipc-";
/// Port names must be shorter than this (spec §6.3, §7.3).
const MAX_PORT_NAME: usize = 256;
/// Longest time a waiting call holds the lock at once.
const SLICE_MS: u64 = 5;

/// A running stack.
struct Stack {
    // Field order matters: the device is dropped before the machine it runs on.
    dev: TipcDevice,
    sim: Sim,
    platform: String,
    /// Handle -> channel; a handle is the index of its slot.
    handles: Vec<Option<ChannelId>>,
}

static STACK: Mutex<Option<Stack>> = Mutex::new(None);

/// Takes the global lock. A panic while it was held has already been reported to its caller as
/// EIO; the stack itself keeps no half-done state across its own calls, so later calls go on.
fn lock() -> MutexGuard<'static, Option<Stack>> {
    STACK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn err(e: tipc::Error) -> Errno {
    e.errno()
}

impl Stack {
    /// Boots the simulated machine of `platform` and brings the stack up on it.
    fn bring_up(platform: &str) -> Result<Stack, Errno> {
        let profile = platforms::by_name(platform).ok_or(errno::ENOENT)?;
        let sim = profile.boot(ModelMode::Sync);
        match bring_up_platform(profile.access(&sim), StackConfig::default()) {
            Ok((dev, _)) => Ok(Stack { dev, sim, platform: platform.to_owned(), handles: Vec::new() }),
            Err(e) => {
                eprintln!("libtrusty-capi: bringing the stack up on platform {platform} failed: {e}");
                for fault in sim.model().faults() {
                    eprintln!("libtrusty-capi:   {fault}");
                }
                Err(match e {
                    BringUpError::Stack(e) | BringUpError::AfterPlan { error: e, .. } => e.errno(),
                    BringUpError::DeviceTree(_) | BringUpError::NoSafeSharing(_) => errno::ENODEV,
                })
            }
        }
    }

    /// Whether `name` names this stack's TIPC device.
    fn is_device(&self, name: &[u8]) -> bool {
        let configured = self.dev.dev_name().as_bytes();
        name == SIM_DEV_NAME.as_bytes()
            || (!configured.is_empty() && name.strip_prefix(TRUSTY_DEV_PREFIX.as_bytes()) == Some(configured))
    }

    fn chan(&self, h: c_int) -> Result<ChannelId, Errno> {
        usize::try_from(h).ok().and_then(|i| self.handles.get(i).copied().flatten()).ok_or(errno::EBADF)
    }

    /// Gives `id` the lowest free handle.
    fn insert(&mut self, id: ChannelId) -> Result<c_int, Errno> {
        let slot = match self.handles.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.handles.push(None);
                self.handles.len() - 1
            }
        };
        let Ok(h) = c_int::try_from(slot) else {
            let _ = self.dev.close(id);
            return Err(errno::ENOMEM);
        };
        self.handles[slot] = Some(id);
        Ok(h)
    }
}

/// The running stack with an open handle `h`, or EBADF.
fn with_handle<T>(
    guard: &mut Option<Stack>,
    h: c_int,
    f: impl FnOnce(&mut Stack, ChannelId) -> Result<T, Errno>,
) -> Result<T, Errno> {
    let stack = guard.as_mut().ok_or(errno::EBADF)?;
    let id = stack.chan(h)?;
    f(stack, id)
}

/// A deadline `timeout_ms` from now; `None` for a negative (unlimited) timeout.
fn deadline(timeout_ms: c_int) -> Option<Instant> {
    u64::try_from(timeout_ms).ok().map(|ms| Instant::now() + Duration::from_millis(ms))
}

/// How long the next slice of a wait may take.
fn slice(deadline: Option<Instant>) -> Timeout {
    let ms = match deadline {
        None => SLICE_MS,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            SLICE_MS.min(left.as_millis().try_into().unwrap_or(SLICE_MS))
        }
    };
    Timeout::Ms(ms)
}

fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// Lets other threads take the lock between two slices of a wait.
fn between_slices(guard: MutexGuard<'static, Option<Stack>>) {
    drop(guard);
    std::thread::yield_now();
}

pub fn init(platform: &str) -> Result<(), Errno> {
    let mut guard = lock();
    match &*guard {
        Some(s) if s.platform == platform => Ok(()),
        Some(_) => Err(errno::EBUSY),
        None => {
            *guard = Some(Stack::bring_up(platform)?);
            Ok(())
        }
    }
}

pub fn shutdown() {
    let mut guard = lock();
    let Some(Stack { dev, sim, .. }) = guard.take() else { return };
    let (bus, result) = dev.shutdown();
    drop(bus);
    if let Err(e) = result {
        eprintln!("libtrusty-capi: teardown of the TIPC device failed: {e}");
    }
    drop(sim);
}

/// Opens a channel to `port` on device `dev`; starts the default platform if nothing runs.
/// Checks in the order the driver does: the device (open), then the name (CONNECT).
pub fn connect(dev: &[u8], port: &[u8]) -> Result<c_int, Errno> {
    if dev != SIM_DEV_NAME.as_bytes() && !dev.starts_with(TRUSTY_DEV_PREFIX.as_bytes()) {
        return Err(errno::ENOENT);
    }
    let mut guard = lock();
    let stack = match &mut *guard {
        Some(s) => s,
        none => none.insert(Stack::bring_up(DEFAULT_PLATFORM)?),
    };
    if !stack.is_device(dev) {
        return Err(errno::ENOENT);
    }
    if port.len() >= MAX_PORT_NAME {
        return Err(errno::ENAMETOOLONG);
    }
    let port = std::str::from_utf8(port).map_err(|_| errno::EINVAL)?;
    let id = stack.dev.connect(port).map_err(err)?;
    stack.insert(id)
}

/// Sends one message. Memory objects are checked after the handle: a transfer kind outside
/// `enum transfer_kind` is EINVAL; any other entry is EBADF, because this stack cannot turn a
/// file descriptor into memory to share (the driver's errno for an fd it cannot import,
/// spec §7.3).
pub fn send(h: c_int, parts: &[&[u8]], shm: &[TrustyShm]) -> Result<usize, Errno> {
    let mut txbuf_deadline: Option<Instant> = None;
    loop {
        let mut guard = lock();
        let sent = with_handle(&mut guard, h, |stack, id| {
            if shm.iter().any(|s| s.transfer > TRUSTY_SEND_SECURE) {
                return Err(errno::EINVAL);
            }
            if !shm.is_empty() {
                return Err(errno::EBADF);
            }
            let limit = stack.dev.config().txbuf_timeout_ms;
            let deadline = *txbuf_deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(limit));
            match stack.dev.send(id, parts, &[], slice(Some(deadline))) {
                Err(tipc::Error::TimedOut) if !expired(Some(deadline)) => Ok(None),
                r => r.map(Some).map_err(err),
            }
        })?;
        if let Some(n) = sent {
            return Ok(n);
        }
        between_slices(guard);
    }
}

/// Receives one whole message into `out`.
pub fn recv(h: c_int, out: &mut [u8], timeout_ms: c_int) -> Result<usize, Errno> {
    let deadline = deadline(timeout_ms);
    loop {
        let mut guard = lock();
        let got = with_handle(&mut guard, h, |stack, id| {
            let t = if timeout_ms == 0 { Timeout::NonBlocking } else { slice(deadline) };
            match stack.dev.recv(id, &mut [&mut *out], t) {
                Err(tipc::Error::TimedOut) if !expired(deadline) => Ok(None),
                r => r.map(Some).map_err(err),
            }
        })?;
        if let Some(n) = got {
            return Ok(n);
        }
        between_slices(guard);
    }
}

/// Waits until the channel is readable or in error, or the timeout passes.
pub fn poll(h: c_int, timeout_ms: c_int) -> Result<PollFlags, Errno> {
    let deadline = deadline(timeout_ms);
    loop {
        let mut guard = lock();
        let flags = with_handle(&mut guard, h, |stack, id| {
            if timeout_ms == 0 {
                return stack.dev.poll(id).map_err(err);
            }
            let flags = stack.dev.wait_any(&[id], slice(deadline)).map_err(err)?;
            flags.first().copied().ok_or(errno::EBADF)
        })?;
        if flags.readable || flags.error || timeout_ms == 0 || expired(deadline) {
            return Ok(flags);
        }
        between_slices(guard);
    }
}

/// Closes a handle; it is free again even if telling the peer failed.
pub fn close(h: c_int) -> Result<(), Errno> {
    let mut guard = lock();
    with_handle(&mut guard, h, |stack, id| {
        if let Some(slot) = usize::try_from(h).ok().and_then(|i| stack.handles.get_mut(i)) {
            *slot = None;
        }
        stack.dev.close(id).map_err(err)
    })
}
