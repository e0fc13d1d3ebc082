//! The probes behind [`crate::facts::gather`], made with real calls: FFA_VERSION and Trusty's
//! GET_VERSION_STR through a conduit, Xen's feature bits through whatever reaches the
//! hypervisor (a hypercall on hardware, the simulated hypervisor on the host).

use crate::facts::Probes;
use crate::ffa;
use crate::smc::{call, result32, Conduit};

/// Probes over a conduit and a source of Xen's feature bits.
pub struct CallProbes<'a> {
    /// Where the SMC probes go.
    pub conduit: &'a dyn Conduit,
    /// XENVER_get_features submap 0; called only when the device tree shows Xen.
    pub xen_features: &'a mut dyn FnMut() -> Option<u32>,
}

impl Probes for CallProbes<'_> {
    fn xen_features(&mut self) -> Option<u32> {
        (self.xen_features)()
    }

    fn ffa_version_ok(&mut self) -> bool {
        let v = self.conduit.call([u64::from(ffa::func::VERSION), u64::from(ffa::VERSION_1_0), 0, 0, 0, 0, 0, 0]);
        let v = v[0] as u32;
        v as i32 >= 0 && v >> 16 == 1
    }

    fn trusty_smc_answers(&mut self) -> bool {
        let r = self.conduit.call([u64::from(call::FC_GET_VERSION_STR), u64::from(u32::MAX), 0, 0, 0, 0, 0, 0]);
        result32(&r) >= 0
    }
}
