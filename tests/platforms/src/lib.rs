//! Platform profiles for the simulated machine. Each profile is two things:
//! - the flattened device tree the normal world boots with (all it may know of the platform,
//!   together with what its probes answer), and
//! - the machine that really runs: the guest's stage-2 translation, what stands between the
//!   normal world and Trusty, Trusty's API version, the hypervisor's feature bits.
//!
//! The machine is also written into the device tree, in a node `/trusty-ipc-stack-sim` that the
//! stack never reads, so that a DTB file alone can reproduce a run (`tipc-test --platform
//! FILE.dtb`).

use trusty_stack::backend::host::{self, SimulatedMachine};
use trusty_stack::PlatformAccess;
use trusty_model::host::{ModelMode, Sim, Stage2};
use trusty_model::model::Path;
use trusty_model::xen_ffa::XenFfa;
use trusty_model::ModelConfig;
use trusty_platform::dtb::{DeviceTree, Writer};

/// Guest RAM base of a Xen DomU (GUEST_RAM0_BASE) and of QEMU's `virt` machine.
pub const RAM_IPA_BASE: u64 = 0x4000_0000;
/// Where a DomU's RAM really is in the simulated machine: not where the guest thinks.
pub const DOMU_PA_BASE: u64 = 0x8_8000_0000;
/// XENFEAT bits (xen/include/public/features.h): XENFEAT_not_direct_mapped.
pub const XENFEAT_NOT_DIRECT_MAPPED: u32 = 1 << 16;
/// XENFEAT_direct_mapped: the domain's own pages have gfn == mfn.
pub const XENFEAT_DIRECT_MAPPED: u32 = 1 << 17;
/// The Trusty VM's domain id and event channels in the trusty-vm profile.
pub const TRUSTY_VM_DOMID: u16 = 1;
/// The event channel that signals a call in the trusty-vm profile.
pub const TRUSTY_VM_CALL_EVTCHN: u32 = 10;
/// The event channel that asks for a vring kick in the trusty-vm profile.
pub const TRUSTY_VM_KICK_EVTCHN: u32 = 11;
/// The guest's own domain id in the DomU profiles.
pub const GUEST_DOMID: u16 = 2;

/// What the simulated machine really is.
#[derive(Clone, Debug)]
pub struct Machine {
    /// How the guest's addresses map to physical ones.
    pub stage2: Stage2,
    /// The Trusty behind the normal world.
    pub model: ModelConfig,
}

/// A named platform: the guest's device tree and the machine behind it.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Its name (`--platform`).
    pub name: String,
    /// One line on what it stands for.
    pub description: &'static str,
    /// The flattened device tree the guest boots with.
    pub fdt: Vec<u8>,
    /// The machine behind it.
    pub machine: Machine,
}

/// What a profile's device tree says.
#[derive(Clone, Copy, Debug, Default)]
struct GuestView {
    xen: bool,
    domid: Option<u16>,
    trusty_node: bool,
    trusty_mediator: bool,
    trusty_vm: bool,
}

struct Spec {
    name: &'static str,
    description: &'static str,
    view: GuestView,
    stage2: Stage2,
    path: Path,
    api: u32,
    ffa: bool,
    share_cap: Option<usize>,
    xen_features: Option<u32>,
    ns_endpoint_id: u16,
    /// Which Xen's FF-A mediator, for [`Path::XenFfaMediator`].
    xen_ffa: XenFfa,
}

fn specs() -> Vec<Spec> {
    let xen_view = |domid| GuestView { xen: true, domid: Some(domid), trusty_node: true, ..Default::default() };
    let native = GuestView { trusty_node: true, ..Default::default() };
    let translated = Stage2::Translated { pa_base: DOMU_PA_BASE };
    vec![
        Spec {
            name: "native-api4",
            description: "no hypervisor; Trusty API 4 (physical address + attributes), no FF-A",
            view: native,
            stage2: Stage2::Identity,
            path: Path::Direct,
            api: 4,
            ffa: false,
            share_cap: None,
            xen_features: None,
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "native-api5",
            description: "no hypervisor; Trusty API 5 with an FF-A SPMC (memory handles)",
            view: native,
            stage2: Stage2::Identity,
            path: Path::Direct,
            api: 5,
            ffa: true,
            share_cap: None,
            xen_features: None,
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-dom0",
            description: "Xen 4.17 dom0, direct-mapped (IPA == PA); Trusty's SMCs forwarded; API 4",
            view: xen_view(0),
            stage2: Stage2::Identity,
            path: Path::Direct,
            api: 4,
            ffa: false,
            share_cap: None,
            xen_features: Some(XENFEAT_DIRECT_MAPPED),
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-domu-direct-mapped",
            description: "dom0less DomU with direct-map and static memory (IPA == PA); SMCs forwarded; API 4",
            view: xen_view(GUEST_DOMID),
            stage2: Stage2::Identity,
            path: Path::Direct,
            api: 4,
            ffa: false,
            share_cap: None,
            xen_features: Some(XENFEAT_DIRECT_MAPPED),
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-domu-ffa-mediator",
            description: "DomU (IPA != PA) behind Xen's FF-A mediator (development branch: FF-A 1.2, FFA_RUN): 32 read-write shares, one fragment",
            view: xen_view(GUEST_DOMID),
            stage2: translated,
            path: Path::XenFfaMediator,
            api: 5,
            ffa: true,
            share_cap: Some(32),
            xen_features: Some(XENFEAT_NOT_DIRECT_MAPPED),
            ns_endpoint_id: GUEST_DOMID + 1,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-domu-ffa-mediator-4.20",
            description: "DomU (IPA != PA) behind Xen 4.20/4.21's FF-A mediator: no FFA_RUN (refused at bring-up)",
            view: xen_view(GUEST_DOMID),
            stage2: translated,
            path: Path::XenFfaMediator,
            api: 5,
            ffa: true,
            share_cap: Some(32),
            xen_features: Some(XENFEAT_NOT_DIRECT_MAPPED),
            ns_endpoint_id: GUEST_DOMID + 1,
            xen_ffa: XenFfa::V4_20,
        },
        Spec {
            name: "xen-domu-trusty-mediator",
            description: "DomU (IPA != PA) with an NXP-style Trusty mediator that rewrites guest addresses; API 4",
            view: GuestView { trusty_mediator: true, ..xen_view(GUEST_DOMID) },
            stage2: translated,
            path: Path::TrustyMediator,
            api: 4,
            ffa: false,
            share_cap: None,
            xen_features: Some(XENFEAT_NOT_DIRECT_MAPPED),
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-domu-trusty-vm",
            description: "DomU (IPA != PA); Trusty runs as Xen domain 1: mailbox + event channels, grants",
            view: GuestView { trusty_node: false, trusty_vm: true, ..xen_view(GUEST_DOMID) },
            stage2: translated,
            path: Path::XenVm { domid: TRUSTY_VM_DOMID },
            api: 5,
            ffa: false,
            share_cap: None,
            xen_features: Some(XENFEAT_NOT_DIRECT_MAPPED),
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
        Spec {
            name: "xen-domu-no-path",
            description: "DomU (IPA != PA) under Xen 4.17 with no mediator: Trusty's SMCs go nowhere",
            view: xen_view(GUEST_DOMID),
            stage2: translated,
            path: Path::XenNoPath,
            api: 5,
            ffa: false,
            share_cap: None,
            xen_features: Some(XENFEAT_NOT_DIRECT_MAPPED),
            ns_endpoint_id: 0,
            xen_ffa: XenFfa::Newer,
        },
    ]
}

impl Profile {
    /// Boots the machine this profile describes (without the stack).
    pub fn boot(&self, mode: ModelMode) -> Sim {
        Sim::with_stage2(mode, self.machine.model.clone(), self.machine.stage2)
    }

    /// What the simulated platform gives the stack: the conduit, clock, RAM, this profile's
    /// device tree, and the simulated hypervisor's answers.
    pub fn access(&self, sim: &Sim) -> PlatformAccess {
        let machine = SimulatedMachine {
            conduit: sim.conduit(),
            clock: sim.clock(),
            allocator: sim.allocator(),
            xen_features: sim.xen_features(),
            events: sim.events(),
            grant_table: sim.grant_table_provider(),
        };
        host::access(machine, self.fdt.clone())
    }
}

/// The names of all profiles, in a stable order.
pub fn names() -> Vec<&'static str> {
    specs().iter().map(|s| s.name).collect()
}

/// A profile by name.
pub fn by_name(name: &str) -> Option<Profile> {
    specs().into_iter().find(|s| s.name == name).map(build)
}

/// Every profile.
pub fn all() -> Vec<Profile> {
    specs().into_iter().map(build).collect()
}

const SIM_NODE: &str = "trusty-ipc-stack-sim";
const RAM_SIZE: u64 = 16 * 1024 * 1024;

fn path_name(p: Path) -> &'static str {
    match p {
        Path::Direct => "direct",
        Path::XenFfaMediator => "xen-ffa-mediator",
        Path::TrustyMediator => "trusty-mediator",
        Path::XenVm { .. } => "xen-vm",
        Path::XenNoPath => "xen-no-path",
    }
}

fn build(s: Spec) -> Profile {
    let fdt = write_fdt(&s);
    let model = ModelConfig {
        path: s.path,
        max_api_version: s.api,
        ffa: s.ffa,
        share_cap: s.share_cap,
        xen_features: s.xen_features,
        ns_endpoint_id: s.ns_endpoint_id,
        xen_ffa: s.xen_ffa,
        ..Default::default()
    };
    Profile { name: s.name.into(), description: s.description, fdt, machine: Machine { stage2: s.stage2, model } }
}

fn write_fdt(s: &Spec) -> Vec<u8> {
    let mut w = Writer::new();
    w.begin_node("");
    w.property_str("compatible", "linux,dummy-virt");
    w.property_u32("#address-cells", 2);
    w.property_u32("#size-cells", 2);
    w.begin_node("chosen");
    if let Some(domid) = s.view.domid {
        w.property_u32("trusty-ipc-stack,domid", u32::from(domid));
    }
    w.end_node();
    w.begin_node(&format!("memory@{RAM_IPA_BASE:x}"));
    w.property_str("device_type", "memory");
    w.property_u64s("reg", &[RAM_IPA_BASE, RAM_SIZE]);
    w.end_node();
    if s.view.xen {
        // As Xen describes itself to a guest with PV interfaces (xen,enhanced): grant-table
        // area, event-channel PPI.
        w.begin_node("hypervisor");
        w.property_strs("compatible", &["xen,xen-4.17", "xen,xen"]);
        w.property_u64s("reg", &[0x3800_0000, 0x0100_0000]);
        w.property_u32s("interrupts", &[1, 15, 0xf08]);
        w.end_node();
    }
    if s.view.trusty_node {
        w.begin_node("trusty");
        w.property_str("compatible", "android,trusty-smc-v1");
        if s.view.trusty_mediator {
            w.property_null(trusty_platform::facts::IPA_REWRITING_MEDIATOR_PROP);
        }
        w.begin_node("virtio");
        w.property_str("compatible", "android,trusty-virtio-v1");
        w.end_node();
        w.end_node();
    }
    if s.view.trusty_vm {
        w.begin_node("trusty-vm");
        w.property_str("compatible", "trusty-ipc-stack,trusty-vm-v1");
        w.property_u32("backend-domid", u32::from(TRUSTY_VM_DOMID));
        w.property_u32("call-evtchn", TRUSTY_VM_CALL_EVTCHN);
        w.property_u32("kick-evtchn", TRUSTY_VM_KICK_EVTCHN);
        w.end_node();
    }
    w.begin_node(SIM_NODE);
    w.property_str("profile", s.name);
    w.property_str("path", path_name(s.path));
    if s.path == Path::XenFfaMediator {
        w.property_str("xen-ffa", s.xen_ffa.name());
    }
    if let Path::XenVm { domid } = s.path {
        w.property_u32("trusty-domid", u32::from(domid));
    }
    match s.stage2 {
        Stage2::Identity => w.property_str("stage2", "identity"),
        Stage2::Translated { pa_base } => {
            w.property_str("stage2", "translated");
            w.property_u64("pa-base", pa_base);
        }
    }
    w.property_u32("api", s.api);
    if s.ffa {
        w.property_null("ffa");
    }
    if let Some(cap) = s.share_cap {
        w.property_u32("share-cap", cap as u32);
    }
    if let Some(f) = s.xen_features {
        w.property_u32("xen-features", f);
    }
    w.property_u32("ns-endpoint-id", u32::from(s.ns_endpoint_id));
    w.end_node();
    w.end_node();
    w.finish()
}

/// A profile from a DTB file: the machine comes from its `/trusty-ipc-stack-sim` node.
pub fn from_dtb(bytes: &[u8]) -> Result<Profile, String> {
    let tree = DeviceTree::parse(bytes).map_err(|_| "not a device tree".to_string())?;
    let sim = tree
        .find(&format!("/{SIM_NODE}"))
        .ok_or_else(|| format!("the device tree has no /{SIM_NODE} node describing the simulated machine"))?;
    let str_prop = |n: &str| tree.property_str(sim, n).map(str::to_owned);
    let u32_prop = |n: &str| tree.property_u64(sim, n).map(|v| v as u32);
    let path = match str_prop("path").as_deref() {
        Some("direct") => Path::Direct,
        Some("xen-ffa-mediator") => Path::XenFfaMediator,
        Some("trusty-mediator") => Path::TrustyMediator,
        Some("xen-vm") => Path::XenVm { domid: u32_prop("trusty-domid").unwrap_or(1) as u16 },
        Some("xen-no-path") => Path::XenNoPath,
        other => return Err(format!("unknown path {other:?} in /{SIM_NODE}")),
    };
    let stage2 = match str_prop("stage2").as_deref() {
        Some("identity") | None => Stage2::Identity,
        Some("translated") => Stage2::Translated {
            pa_base: tree.property_u64(sim, "pa-base").unwrap_or(DOMU_PA_BASE),
        },
        Some(other) => return Err(format!("unknown stage2 '{other}' in /{SIM_NODE}")),
    };
    let xen_ffa = match str_prop("xen-ffa") {
        None => XenFfa::default(),
        Some(v) => XenFfa::from_name(&v).ok_or_else(|| format!("unknown xen-ffa '{v}' in /{SIM_NODE}"))?,
    };
    let model = ModelConfig {
        path,
        max_api_version: u32_prop("api").unwrap_or(5),
        ffa: tree.property(sim, "ffa").is_some(),
        share_cap: u32_prop("share-cap").map(|c| c as usize),
        xen_features: u32_prop("xen-features"),
        ns_endpoint_id: u32_prop("ns-endpoint-id").unwrap_or(0) as u16,
        xen_ffa,
        ..Default::default()
    };
    let name = str_prop("profile").unwrap_or_else(|| "dtb".into());
    Ok(Profile { name, description: "from a device-tree file", fdt: bytes.to_vec(), machine: Machine { stage2, model } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nine_profiles_round_trip_through_their_dtb() {
        let all = all();
        assert_eq!(all.len(), 9);
        for p in all {
            let back = from_dtb(&p.fdt).unwrap();
            assert_eq!(back.name, p.name);
            assert_eq!(back.machine.stage2, p.machine.stage2);
            assert_eq!(back.machine.model.path, p.machine.model.path);
            assert_eq!(back.machine.model.max_api_version, p.machine.model.max_api_version);
            assert_eq!(back.machine.model.share_cap, p.machine.model.share_cap);
            assert_eq!(back.machine.model.xen_ffa, p.machine.model.xen_ffa, "{}", p.name);
        }
        assert_eq!(by_name("xen-domu-ffa-mediator-4.20").unwrap().machine.model.xen_ffa, XenFfa::V4_20);
        assert_eq!(by_name("xen-domu-ffa-mediator").unwrap().machine.model.xen_ffa, XenFfa::Newer);
        assert!(from_dtb(b"not a dtb").is_err());
    }
}
