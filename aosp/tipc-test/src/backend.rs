//! What the tests talk to: the libtrusty-like interface of `tipc-test-cases`, implemented by
//! the in-process stack against the embedded model.

use std::sync::Arc;

use platforms::Profile;
use tipc::stack::{bring_up_platform, BringUp, StackConfig};
use tipc::TipcDevice;
use trusty_model::host::{ModelMode, Sim};

pub use tipc_test_cases::backend::{Errno, Handle, TipcBackend};
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
    fn health(&mut self) -> Result<(), String> {
        self.dev.health()
    }
}
