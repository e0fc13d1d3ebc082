//! Shared set-up for the conformance suites: the stack brought up on a simulated machine.

pub mod hostile;

use trusty_stack::{bring_up, StackConfig};
use tipc::{Timeout, TipcDevice};
use trusty_model::host::{ModelMode, Sim};
use trusty_model::{ModelConfig, Variant};

pub const ECHO: &str = "com.android.ipc-unittest.srv.echo";
pub const DATASINK: &str = "com.android.ipc-unittest.srv.datasink";

/// Pages the normal world still holds after a clean teardown: none. (FF-A's RX/TX pair used to
/// stay mapped and allocated for good; teardown now unmaps it with FFA_RXTX_UNMAP and frees it.)
pub const RXTX_PAGES: usize = 0;

/// A simulated machine and the stack on it.
pub struct Rig {
    pub dev: Option<TipcDevice>,
    pub sim: Sim,
}

impl Rig {
    pub fn new(mode: ModelMode) -> Rig {
        Rig::with(mode, ModelConfig::default(), StackConfig::default(), |_| {})
    }

    /// The stack on a model of the given Trusty tree (upstream or NXP's).
    pub fn variant(mode: ModelMode, variant: Variant) -> Rig {
        Rig::with(mode, model(variant), StackConfig::default(), |_| {})
    }

    /// Builds the machine, lets `prepare` set switches on the model, then brings the stack up.
    pub fn with(mode: ModelMode, model: ModelConfig, cfg: StackConfig, prepare: impl FnOnce(&Sim)) -> Rig {
        Rig::try_with(mode, model, cfg, prepare).unwrap_or_else(|(e, _)| panic!("bring-up failed: {e}"))
    }

    pub fn try_with(
        mode: ModelMode,
        model: ModelConfig,
        cfg: StackConfig,
        prepare: impl FnOnce(&Sim),
    ) -> Result<Rig, (tipc::Error, Sim)> {
        let sim = Sim::new(mode, model);
        prepare(&sim);
        match bring_up(sim.conduit(), sim.clock(), sim.allocator(), cfg) {
            Ok((dev, _)) => Ok(Rig { dev: Some(dev), sim }),
            Err(e) => Err((e, sim)),
        }
    }

    pub fn dev(&mut self) -> &mut TipcDevice {
        self.dev.as_mut().expect("device is up")
    }

    /// One echo round trip; panics unless the reply matches.
    pub fn echo_once(&mut self, payload: &[u8]) {
        echo(self.dev(), payload);
    }

    /// Tears the stack down and checks that nothing stayed shared or allocated.
    pub fn shutdown_clean(&mut self) {
        let dev = self.dev.take().expect("device is up");
        let (bus, result) = dev.shutdown();
        result.expect("clean teardown");
        assert_eq!(bus.mem_ref().leaked(), Default::default());
        self.assert_no_faults();
        assert_eq!(self.sim.model().live_shares(), 0, "every share reclaimed");
        assert_eq!(self.sim.ram().pages_in_use(), RXTX_PAGES, "every page freed");
    }

    pub fn assert_no_faults(&self) {
        let m = self.sim.model();
        assert!(m.faults().is_empty(), "model faults: {:?}", m.faults());
    }
}

/// The default model, following `variant`.
pub fn model(variant: Variant) -> ModelConfig {
    ModelConfig { variant, ..ModelConfig::default() }
}

/// One echo round trip on `dev` (connect, send, receive, close); panics unless the reply
/// matches.
pub fn echo(dev: &mut TipcDevice, payload: &[u8]) {
    let ch = dev.connect(ECHO).expect("connect to echo");
    assert_eq!(dev.send(ch, &[payload], &[], Timeout::Ms(1000)), Ok(payload.len()));
    let mut buf = vec![0u8; 4096];
    let n = dev.recv(ch, &mut [&mut buf], Timeout::Ms(2000)).expect("echo reply");
    assert_eq!(&buf[..n], payload);
    dev.close(ch).expect("close");
}

/// The stack's default configuration without the idle pump (one NOP when Trusty has not run
/// for `idle_pump_ms`): for tests that count secure calls on a machine loaded enough to stall
/// a round trip that long.
pub fn config_without_idle_pump() -> StackConfig {
    let mut cfg = StackConfig::default();
    cfg.tipc.idle_pump_ms = u64::MAX;
    cfg
}
