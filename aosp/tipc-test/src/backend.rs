//! What the tests talk to: a libtrusty-like interface (connect / read / write / close on
//! small handles), implemented by the in-process stack against the embedded model.

use std::fmt;
use std::time::Duration;

use platforms::Profile;
use tipc::stack::{bring_up_platform, BringUp, StackConfig};
use tipc::{ChannelId, Timeout, TipcDevice};
use trusty_model::host::{ModelMode, Sim};

/// An errno value with its name, as tipc-test reports failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use tipc::errno::*;
        let name = match self.0 {
            ENOENT => "ENOENT",
            EIO => "EIO",
            E2BIG => "E2BIG",
            EBADF => "EBADF",
            EAGAIN => "EAGAIN",
            ENOMEM => "ENOMEM",
            EACCES => "EACCES",
            ENODEV => "ENODEV",
            EINVAL => "EINVAL",
            ENOTTY => "ENOTTY",
            ENAMETOOLONG => "ENAMETOOLONG",
            EMSGSIZE => "EMSGSIZE",
            EISCONN => "EISCONN",
            ENOTCONN => "ENOTCONN",
            ESHUTDOWN => "ESHUTDOWN",
            ETIMEDOUT => "ETIMEDOUT",
            EALREADY => "EALREADY",
            _ => return write!(f, "errno {}", self.0),
        };
        write!(f, "{name}")
    }
}

impl From<tipc::Error> for Errno {
    fn from(e: tipc::Error) -> Self {
        Errno(e.errno())
    }
}

/// A channel handle.
pub type Handle = i32;

/// The operations tipc-test needs: those of libtrusty plus read/write/select on the handle.
pub trait TipcBackend {
    /// A one-line description of what is under test.
    fn describe(&self) -> String;
    fn connect(&mut self, port: &str) -> Result<Handle, Errno>;
    fn writev(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno>;
    fn write(&mut self, h: Handle, data: &[u8]) -> Result<usize, Errno> {
        self.writev(h, &[data])
    }
    /// Reads one message, waiting at most `timeout` (`None`: without limit).
    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], timeout: Option<Duration>) -> Result<usize, Errno>;
    fn read(&mut self, h: Handle, buf: &mut [u8], timeout: Option<Duration>) -> Result<usize, Errno> {
        self.readv(h, &mut [buf], timeout)
    }
    /// Waits until the handle is readable (or in error); false on timeout (what select does).
    fn wait_readable(&mut self, h: Handle, timeout: Duration) -> Result<bool, Errno>;
    fn close(&mut self, h: Handle) -> Result<(), Errno>;
    /// Anything the secure side saw go wrong (a fault, a panic); checked after every test.
    fn health(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// The in-process stack over the embedded model.
pub struct SimBackend {
    // Field order matters: the device goes before the machine it runs on.
    dev: Option<TipcDevice>,
    handles: Vec<Option<ChannelId>>,
    sim: Sim,
    mode: ModelMode,
    profile: String,
    info: BringUp,
}

/// A bring-up that failed, with what the secure side saw.
#[derive(Debug)]
pub struct BringUpFailure {
    /// The sharing line of the plan that was tried, if bring-up got that far.
    pub sharing: Option<String>,
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

impl SimBackend {
    /// Boots the machine of `profile` and brings the stack up on it.
    pub fn new(mode: ModelMode, profile: &Profile, cfg: StackConfig) -> Result<SimBackend, BringUpFailure> {
        let sim = profile.boot(mode);
        match bring_up_platform(profile.access(&sim), cfg) {
            Ok((dev, info)) => {
                Ok(SimBackend { dev: Some(dev), handles: Vec::new(), sim, mode, profile: profile.name.clone(), info })
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

    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    pub fn device(&mut self) -> &mut TipcDevice {
        self.dev.as_mut().expect("device present until shutdown")
    }

    fn chan(&self, h: Handle) -> Result<ChannelId, Errno> {
        usize::try_from(h)
            .ok()
            .and_then(|i| self.handles.get(i).copied().flatten())
            .ok_or(Errno(tipc::errno::EBADF))
    }

    /// Tears the stack down; returns the error of the teardown, if any.
    pub fn shutdown(&mut self) -> Result<(), String> {
        match self.dev.take() {
            Some(dev) => dev.shutdown().1.map_err(|e| format!("teardown failed: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for SimBackend {
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

impl TipcBackend for SimBackend {
    fn describe(&self) -> String {
        let mode = match self.mode {
            ModelMode::Sync => "sim",
            ModelMode::Threaded => "sim-threaded",
        };
        format!("{mode}: platform {}, embedded Trusty model '{}', API {}", self.profile, self.info.version, self.info.api_version)
    }

    fn connect(&mut self, port: &str) -> Result<Handle, Errno> {
        let id = self.device().connect(port)?;
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
        let t = Timeout::Ms(self.device().config().txbuf_timeout_ms);
        Ok(self.device().send(id, iov, &[], t)?)
    }

    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], t: Option<Duration>) -> Result<usize, Errno> {
        let id = self.chan(h)?;
        Ok(self.device().recv(id, bufs, timeout(t))?)
    }

    fn wait_readable(&mut self, h: Handle, t: Duration) -> Result<bool, Errno> {
        let id = self.chan(h)?;
        let flags = self.device().wait_any(&[id], timeout(Some(t)))?;
        Ok(flags.first().is_some_and(|f| f.readable || f.error))
    }

    fn close(&mut self, h: Handle) -> Result<(), Errno> {
        let id = self.chan(h)?;
        self.handles[h as usize] = None;
        Ok(self.device().close(id)?)
    }

    fn health(&mut self) -> Result<(), String> {
        let m = self.sim.model();
        if let Some(f) = m.faults().first() {
            return Err(format!("{f}"));
        }
        if m.panicked() {
            return Err("Trusty model panicked".into());
        }
        Ok(())
    }
}
