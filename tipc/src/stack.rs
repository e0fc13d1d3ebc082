//! Bringing the whole normal-world stack up over a conduit: version string, API negotiation
//! (spec §2.4), FF-A set-up (spec §3.3), the virtio bus and the TIPC device (spec §5.5).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;

use trusty_platform::clock::Clock;
use trusty_platform::ffa::FfaSharer;
use trusty_platform::mem::{PageAllocator, SharedMemory};
use trusty_platform::smc::{api, Conduit};
use trusty_platform::trusty::{CallPolicy, Trusty};
use trusty_virtio::Bus;

use crate::{Config, Error, TipcDevice};

/// Everything bring-up can be told.
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    pub tipc: Config,
    pub calls: CallPolicy,
    /// The API version to ask for.
    pub api_version: u32,
    /// Live shares the platform allows, if limited.
    pub share_budget: Option<usize>,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig { tipc: Config::default(), calls: CallPolicy::default(), api_version: api::CURRENT, share_budget: None }
    }
}

/// What bring-up learned about the secure side.
#[derive(Clone, Debug)]
pub struct BringUp {
    pub version: String,
    pub api_version: u32,
    pub mechanism: &'static str,
}

/// Brings the stack up and returns the online TIPC device.
pub fn bring_up(
    conduit: Arc<dyn Conduit>,
    clock: Arc<dyn Clock>,
    mut allocator: Box<dyn PageAllocator>,
    cfg: StackConfig,
) -> Result<(TipcDevice, BringUp), Error> {
    let mut trusty = Trusty::new(conduit.clone(), clock, cfg.calls);
    let version = trusty.version_string()?;
    let api_version = trusty.negotiate_api(cfg.api_version)?;
    if api_version < api::MEM_OBJ {
        // Physical-address ids (API < 5) need to know the platform; see the sharing decision.
        return Err(Error::Unsupported("Trusty API version below 5: no FF-A memory handles"));
    }
    let sharer = FfaSharer::new(conduit, &mut *allocator, cfg.share_budget)?;
    let mechanism = trusty_platform::mem::Sharer::mechanism(&sharer);
    let mem = SharedMemory::new(allocator, Box::new(sharer));
    let bus = Bus::new(trusty, mem);
    let dev = TipcDevice::probe(bus, cfg.tipc)?;
    log::info!("Trusty '{version}', API {api_version}, TIPC device '{}' online", dev.dev_name());
    Ok((dev, BringUp { version, api_version, mechanism }))
}
