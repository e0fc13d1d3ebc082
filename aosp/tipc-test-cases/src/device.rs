//! The backend over the in-process stack: a [`TipcDevice`] behind libtrusty-like integer
//! handles, with errors mapped to the errno values AOSP's driver returns.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use tipc::errno::{EBADF, ENODEV};
use tipc::{ChannelId, Timeout, TipcDevice};

use crate::backend::{Errno, Handle, TipcBackend};

/// What [`TipcBackend::health`] asks: anything the secure side saw go wrong.
pub type HealthCheck = Box<dyn FnMut() -> Result<(), String> + Send>;

/// A [`TipcDevice`] as a [`TipcBackend`]: handles are the smallest free slot of a table of
/// channels, as file descriptors are. Dropping it shuts the device down.
pub struct DeviceBackend {
    dev: Option<TipcDevice>,
    handles: Vec<Option<ChannelId>>,
    describe: String,
    health: Option<HealthCheck>,
}

impl DeviceBackend {
    /// Wraps a device that is up; `describe` is what [`TipcBackend::describe`] returns.
    pub fn new(dev: TipcDevice, describe: impl Into<String>) -> DeviceBackend {
        DeviceBackend { dev: Some(dev), handles: Vec::new(), describe: describe.into(), health: None }
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

    fn health(&mut self) -> Result<(), String> {
        match &mut self.health {
            Some(check) => check(),
            None => Ok(()),
        }
    }
}
