//! A host process over a simulated machine (the embedded Trusty model): what the tests,
//! tipc-test and trusty-ipcd's `sim` feature run on. The machine hands over its parts; the
//! Trusty VM, when the profile has one, is reached through a grant table in simulated guest RAM
//! and the model's event channels ([`GrantTableLink`]).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use trusty_platform::clock::Clock;
use trusty_platform::mailbox::EventChannel;
use trusty_platform::mem::PageAllocator;
use trusty_platform::smc::Conduit;

use super::grant_table::{GrantTableLink, GrantTableProvider};
use crate::PlatformAccess;

/// The parts of a simulated machine.
pub struct SimulatedMachine {
    /// Calls into the model.
    pub conduit: Arc<dyn Conduit>,
    /// The machine's clock.
    pub clock: Arc<dyn Clock>,
    /// Pages of the simulated guest RAM.
    pub allocator: Box<dyn PageAllocator>,
    /// What the simulated hypervisor answers to XENVER_get_features (`None`: no Xen).
    pub xen_features: Option<u32>,
    /// Event channels to the model when it plays a Trusty VM.
    pub events: Arc<dyn EventChannel>,
    /// A page of guest RAM registered with the simulated hypervisor as the grant table.
    pub grant_table: GrantTableProvider,
}

/// What a simulated machine booted with `fdt` gives the stack.
pub fn access(m: SimulatedMachine, fdt: Vec<u8>) -> PlatformAccess {
    let features = m.xen_features;
    PlatformAccess {
        conduit: m.conduit,
        clock: m.clock,
        allocator: m.allocator,
        fdt,
        xen_features: Box::new(move || features),
        // Without the `xen-grant` feature there is no Trusty VM to reach.
        trusty_vm: if crate::Mechanisms::BUILT.xen_grant {
            Some(Box::new(GrantTableLink::new(m.events, m.grant_table)))
        } else {
            None
        },
    }
}
