//! Platform facts: what the flattened device tree says ([`read_device_tree`]) combined with what
//! the hypervisor and the secure side answer ([`Probes`], [`gather`]) into [`PlatformFacts`].
//!
//! Nothing here decides how to share memory; that is [`crate::decision`]. The rules follow spec
//! dma-decisions.md §2.6 (how a guest knows it runs on Xen), §3 (what a DomU's device tree shows,
//! `xen,enhanced`) and §4 (how Trusty is reached from a DomU).
//!
//! The device tree is parsed by [`crate::dtb`], our own small reader (why not the `fdt` crate:
//! see there), which validates the whole blob with checked arithmetic and never panics.

use core::fmt;

use crate::dtb::{DeviceTree, NodeId};

use crate::plan::{AddressMap, Hypervisor, MediatorFacts, PlatformFacts, TrustyPath};

/// What the device tree says (no calls made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtFacts {
    /// From `/hypervisor` (compatible `"xen,xen-<maj>.<min>"`, `"xen,xen"`): `Xen { version,
    /// domid: None }`; no such node: `None`.
    pub hypervisor: Hypervisor,
    /// `/hypervisor` is present: Xen describes itself only when the PV interfaces, the grant
    /// table among them, are enabled (`xen,enhanced` for dom0less guests, dma-decisions §3).
    pub grant_table: bool,
    /// A node compatible with [`TRUSTY_SMC_COMPATIBLE`].
    pub trusty_node: bool,
    /// That node has the boolean property [`IPA_REWRITING_MEDIATOR_PROP`]: an NXP-style mediator
    /// in the hypervisor rewrites guest addresses in Trusty's SMCs (dma-decisions §4.4).
    pub trusty_mediator: bool,
    /// A node compatible with [`TRUSTY_VM_COMPATIBLE`]: `(backend-domid, call-evtchn,
    /// kick-evtchn)`.
    pub trusty_vm: Option<(u16, u32, u32)>,
    /// `/chosen` property [`CHOSEN_DOMID_PROP`] (dom0less guests know their id from their
    /// configuration).
    pub domid: Option<u16>,
}

/// The device tree cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactsError {
    /// Not a flattened device tree, or a structurally broken one.
    BadDeviceTree,
    /// A property this stack relies on is missing or malformed (its name).
    BadProperty(&'static str),
}

impl fmt::Display for FactsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FactsError::BadDeviceTree => f.write_str("malformed flattened device tree"),
            FactsError::BadProperty(name) => {
                write!(f, "device tree: property `{name}` is missing or malformed")
            }
        }
    }
}

/// Compatible of Trusty's device-tree node (AOSP trusty driver binding).
pub const TRUSTY_SMC_COMPATIBLE: &str = "android,trusty-smc-v1";
/// Boolean property on the Trusty node: the hypervisor rewrites IPAs in Trusty's SMCs.
/// (39 characters: over the devicetree specification's 31 for property names, which libfdt,
/// Linux and Xen do not enforce but some writers, vm-fdt among them, do.)
pub const IPA_REWRITING_MEDIATOR_PROP: &str = "trusty-ipc-stack,ipa-mediator";
/// Compatible of the node describing Trusty running as another Xen domain.
pub const TRUSTY_VM_COMPATIBLE: &str = "trusty-ipc-stack,trusty-vm-v1";
/// u32 properties of the Trusty VM node.
pub const TRUSTY_VM_BACKEND_DOMID_PROP: &str = "backend-domid";
/// u32 property of the Trusty VM node: the event channel that signals a call.
pub const TRUSTY_VM_CALL_EVTCHN_PROP: &str = "call-evtchn";
/// u32 property of the Trusty VM node: the event channel that asks for a vring kick.
pub const TRUSTY_VM_KICK_EVTCHN_PROP: &str = "kick-evtchn";
/// Optional u32 property of `/chosen`: this domain's id.
pub const CHOSEN_DOMID_PROP: &str = "trusty-ipc-stack,domid";
/// Error name used when `/hypervisor` exists but is not Xen's.
pub const HYPERVISOR_COMPATIBLE_PROP: &str = "/hypervisor compatible (xen,xen)";

/// Xen's generic compatible and the prefix of its versioned one (Linux `xen_early_init`).
const XEN_COMPATIBLE: &str = "xen,xen";
const XEN_VERSION_PREFIX: &str = "xen,xen-";
/// Domain ids from here on are reserved (DOMID_FIRST_RESERVED, xen/include/public/xen.h).
pub const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

/// Reads the facts the device tree states. Never panics, whatever `fdt` holds.
pub fn read_device_tree(fdt: &[u8]) -> Result<DtFacts, FactsError> {
    let tree = DeviceTree::parse(fdt).map_err(|_| FactsError::BadDeviceTree)?;
    let root = tree.root();

    // Linux looks for a top-level node named exactly "hypervisor" (dma-decisions §2.6).
    let hypervisor_node = tree.child(root, "hypervisor");
    let hypervisor = match hypervisor_node {
        None => Hypervisor::None,
        Some(node) => {
            if !tree.is_compatible(node, XEN_COMPATIBLE) {
                // Some other hypervisor (Gunyah publishes one too): its address map is unknown
                // and cannot be expressed as facts, so refuse rather than look native.
                return Err(FactsError::BadProperty(HYPERVISOR_COMPATIBLE_PROP));
            }
            let version = tree
                .strings(node, "compatible")
                .find_map(|c| c.strip_prefix(XEN_VERSION_PREFIX).and_then(parse_version));
            Hypervisor::Xen { version, domid: None }
        }
    };

    let trusty = tree.nodes().find(|&n| tree.is_compatible(n, TRUSTY_SMC_COMPATIBLE));
    let trusty_mediator = trusty.is_some_and(|n| tree.property(n, IPA_REWRITING_MEDIATOR_PROP).is_some());

    let trusty_vm = match tree.nodes().find(|&n| tree.is_compatible(n, TRUSTY_VM_COMPATIBLE)) {
        None => None,
        Some(node) => {
            let backend = required_u32(&tree, node, TRUSTY_VM_BACKEND_DOMID_PROP)?;
            let call = required_u32(&tree, node, TRUSTY_VM_CALL_EVTCHN_PROP)?;
            let kick = required_u32(&tree, node, TRUSTY_VM_KICK_EVTCHN_PROP)?;
            Some((domid_from(backend, FactsError::BadProperty(TRUSTY_VM_BACKEND_DOMID_PROP))?, call, kick))
        }
    };

    let chosen = tree.child(root, "chosen");
    let domid = match chosen {
        Some(chosen) if tree.property(chosen, CHOSEN_DOMID_PROP).is_some() => {
            Some(domid_from(required_u32(&tree, chosen, CHOSEN_DOMID_PROP)?, FactsError::BadProperty(CHOSEN_DOMID_PROP))?)
        }
        _ => None,
    };
    // A dom0less guest's device tree is written by Xen, so the Trusty VM may instead be named on
    // the kernel command line (the domain node's `bootargs`).
    let trusty_vm = match (trusty_vm, chosen.and_then(|c| tree.property_str(c, "bootargs"))) {
        (None, Some(args)) => trusty_vm_from_bootargs(args)?,
        (vm, _) => vm,
    };

    Ok(DtFacts {
        hypervisor,
        grant_table: hypervisor_node.is_some(),
        trusty_node: trusty.is_some(),
        trusty_mediator,
        trusty_vm,
        domid,
    })
}

/// The boot argument naming a Trusty VM: `trusty-ipc-stack.trusty-vm=<domid>,<call>,<kick>`
/// (static event channels, as the bare-metal image binds them), or
/// `trusty-ipc-stack.trusty-vm=<domid>` alone: the ports come from the Trusty VM's rendezvous
/// page ([`crate::xen::rendezvous`]; a guest without xenstore and without static event
/// channels, such as Linux userspace).
pub const TRUSTY_VM_BOOTARG: &str = "trusty-ipc-stack.trusty-vm=";

/// The port value that stands for "offered on the rendezvous page": Xen never hands out event
/// channel port 0 (`evtchn_init()` reserves it; xen/common/event_channel.c), so no static
/// binding can name it.
pub const PORTS_FROM_RENDEZVOUS: u32 = 0;

/// Reads [`TRUSTY_VM_BOOTARG`] from a command line, if present: `(domid, call, kick)`, with
/// both ports [`PORTS_FROM_RENDEZVOUS`] for the one-field form.
pub fn trusty_vm_from_bootargs(args: &str) -> Result<Option<(u16, u32, u32)>, FactsError> {
    const BAD: FactsError =
        FactsError::BadProperty("bootargs trusty-ipc-stack.trusty-vm=<domid>[,<call-evtchn>,<kick-evtchn>]");
    // The first word (split at ASCII whitespace, as the kernel splits its command line) that
    // starts with the key. Read byte by byte: one small loop instead of generic iterators.
    let (bytes, key) = (args.as_bytes(), TRUSTY_VM_BOOTARG.as_bytes());
    let mut start = 0;
    let value = loop {
        while start < bytes.len() && bytes[start].is_ascii_whitespace() {
            start += 1;
        }
        if start == bytes.len() {
            return Ok(None);
        }
        let mut end = start;
        while end < bytes.len() && !bytes[end].is_ascii_whitespace() {
            end += 1;
        }
        if let Some(value) = bytes[start..end].strip_prefix(key) {
            break value;
        }
        start = end;
    };
    // One or three decimal u32 fields separated by commas.
    let mut fields = [0u32; 3];
    let mut n = 0;
    let mut rest = value;
    loop {
        let end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
        *fields.get_mut(n).ok_or(BAD)? = decimal(&rest[..end]).ok_or(BAD)?;
        n += 1;
        match rest.get(end + 1..) {
            Some(next) => rest = next,
            None => break,
        }
    }
    let [domid, call, kick] = fields;
    match n {
        1 => Ok(Some((domid_from(domid, BAD)?, PORTS_FROM_RENDEZVOUS, PORTS_FROM_RENDEZVOUS))),
        // Port 0 is the rendezvous form's marker, never a static port.
        3 if call != PORTS_FROM_RENDEZVOUS && kick != PORTS_FROM_RENDEZVOUS => {
            Ok(Some((domid_from(domid, BAD)?, call, kick)))
        }
        _ => Err(BAD),
    }
}

/// A property that must be exactly one big-endian u32.
fn required_u32(tree: &DeviceTree<'_>, node: NodeId, name: &'static str) -> Result<u32, FactsError> {
    tree.property_u32(node, name).ok_or(FactsError::BadProperty(name))
}

/// A domain id: below DOMID_FIRST_RESERVED (the ids above name DOMID_SELF, DOMID_IO, ...).
fn domid_from(value: u32, error: FactsError) -> Result<u16, FactsError> {
    match u16::try_from(value) {
        Ok(domid) if value < DOMID_FIRST_RESERVED => Ok(domid),
        _ => Err(error),
    }
}

/// `"<maj>.<min>"` of `xen,xen-<maj>.<min>`.
fn parse_version(s: &str) -> Option<(u16, u16)> {
    let (major, minor) = s.split_once('.')?;
    let number = |s: &str| decimal(s.as_bytes()).and_then(|n| u16::try_from(n).ok());
    Some((number(major)?, number(minor)?))
}

/// A decimal number that fits a u32: one or more ASCII digits, nothing else (no sign). One
/// small out-of-line parser for the few numbers the facts read from text.
#[inline(never)]
fn decimal(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u32::from(b - b'0')),
        _ => None,
    })
}

// --- Probes and gathering ---------------------------------------------------------------------

/// Answers the probes need; implemented over real calls on hardware and by fakes in tests.
pub trait Probes {
    /// XENVER_get_features submap 0, if the hypervisor answers.
    fn xen_features(&mut self) -> Option<u32>;
    /// FFA_VERSION's answer when its major version is 1 (`None`: no FF-A, or another major).
    fn ffa_version(&mut self) -> Option<u32>;
    /// Whether FFA_FEATURES(`fid`) answers FFA_SUCCESS (asked only after FFA_VERSION answered).
    fn ffa_feature(&mut self, fid: u32) -> bool;
    /// Whether Trusty answers its own fast call SMC_FC_GET_VERSION_STR(-1) with a length >= 0
    /// (under Xen's FF-A mediator, or with no mediator at all, it comes back NOT_SUPPORTED = -1).
    fn trusty_smc_answers(&mut self) -> bool;
}

/// XENFEAT bit: guest addresses are not physical addresses (xen/include/public/features.h).
pub const XENFEAT_NOT_DIRECT_MAPPED: u32 = 16;
/// XENFEAT bit: guest addresses equal physical addresses (Xen >= 4.16).
pub const XENFEAT_DIRECT_MAPPED: u32 = 17;

/// The address map Xen's feature bits state (dma-decisions §2.4). Both bits, or neither, or
/// no answer: unknown (Xen < 4.16 sets neither; the documented defaults are not trusted).
pub fn xen_address_map(features: Option<u32>) -> AddressMap {
    let Some(bits) = features else { return AddressMap::Unknown };
    let direct = bits & (1 << XENFEAT_DIRECT_MAPPED) != 0;
    let not_direct = bits & (1 << XENFEAT_NOT_DIRECT_MAPPED) != 0;
    match (direct, not_direct) {
        (true, false) => AddressMap::DirectMapped,
        (false, true) => AddressMap::Translated,
        _ => AddressMap::Unknown,
    }
}

/// Combines the device tree with probes into [`PlatformFacts`] (`api_version: None`: the
/// version is negotiated afterwards, over the transport the plan picks).
///
/// Probes, in this order and only when their answer matters:
/// 1. `xen_features` only with a `/hypervisor` node (a hypercall elsewhere would be undefined).
/// 2. None at all when the device tree names a Trusty VM: Trusty is not behind the monitor
///    (`ffa_available` is then false: not asked, and not used by the decision).
/// 3. `trusty_smc_answers`: Trusty's own fast call.
/// 4. `ffa_version`; under Xen first of all (before any Trusty SMC): Xen routes the Trusted-OS
///    and FF-A ranges to one mediator (dma-decisions §4.1), and its FF-A mediator refuses
///    Trusty's own SMCs (§4.3). When FF-A answers under Xen, `ffa_feature` asks the mediator
///    what it forwards ([`MediatorFacts`]); the development branch refuses any call before
///    FFA_VERSION, which is why the version comes first.
pub fn gather(dt: &DtFacts, probes: &mut dyn Probes) -> PlatformFacts {
    let (hypervisor, address_map) = match dt.hypervisor {
        Hypervisor::None => (Hypervisor::None, AddressMap::Physical),
        Hypervisor::Xen { version, domid } => {
            (Hypervisor::Xen { version, domid: domid.or(dt.domid) }, xen_address_map(probes.xen_features()))
        }
    };
    let xen = hypervisor != Hypervisor::None;
    let mut mediator = None;

    let (trusty, ffa_available) = if let Some((backend_domid, call_evtchn, kick_evtchn)) = dt.trusty_vm {
        (TrustyPath::XenVm { backend_domid, call_evtchn, kick_evtchn }, false)
    } else if xen {
        // Xen routes Trusted-OS and FF-A calls to the one mediator it runs (spec dma-decisions
        // §4.1). If FF-A answers, that is the FF-A mediator, which refuses Trusty's own calls:
        // no Trusty SMC is sent to find that out (§4.3).
        if let Some(version) = probes.ffa_version() {
            mediator = Some(mediator_facts(version, probes));
            (TrustyPath::FfaMediator, true)
        } else if probes.trusty_smc_answers() {
            let path = if dt.trusty_mediator { TrustyPath::TrustyMediator } else { TrustyPath::Smc };
            (path, false)
        } else {
            (TrustyPath::Unreachable, false)
        }
    } else if probes.trusty_smc_answers() {
        if probes.ffa_version().is_some() {
            (TrustyPath::FfaNative, true)
        } else {
            (TrustyPath::Smc, false)
        }
    } else {
        // No hypervisor, and Trusty does not answer: FF-A alone does not reach it.
        (TrustyPath::Unreachable, probes.ffa_version().is_some())
    };

    PlatformFacts { hypervisor, address_map, trusty, ffa_available, grant_table: dt.grant_table, api_version: None, mediator }
}

/// Asks Xen's FF-A mediator, after its FFA_VERSION answered `version`, which of the calls
/// Trusty's FF-A transport and sharing need it forwards (Xen answers FFA_FEATURES itself, from
/// `ffa_handle_features()`; 4.20 and 4.21 have no FFA_RUN there).
fn mediator_facts(version: u32, probes: &mut dyn Probes) -> MediatorFacts {
    use crate::ffa::func;
    MediatorFacts {
        version,
        run: probes.ffa_feature(func::RUN),
        direct_req: probes.ffa_feature(func::MSG_SEND_DIRECT_REQ),
        mem_share: probes.ffa_feature(func::MEM_SHARE),
        mem_reclaim: probes.ffa_feature(func::MEM_RECLAIM),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtb::{
        align4, c_str, header_word, read_u32, Writer, FDT_BEGIN_NODE, FDT_MAGIC, FDT_NOP, FDT_PROP, HEADER_LEN,
        RSVMAP_LEN,
    };
    use alloc::vec;
    use alloc::vec::Vec;

    /// A tree like the ones Xen writes for a guest, with optional extra nodes.
    struct TreeSpec {
        xen_version: Option<&'static str>,
        hypervisor_compatible: Option<&'static [&'static str]>,
        trusty: Option<bool>,
        trusty_vm: Option<&'static [(&'static str, u32)]>,
        chosen_domid: Option<u32>,
    }

    const NATIVE: TreeSpec =
        TreeSpec { xen_version: None, hypervisor_compatible: None, trusty: None, trusty_vm: None, chosen_domid: None };

    fn build(spec: &TreeSpec) -> Vec<u8> {
        let mut w = Writer::new();
        w.begin_node("");
        w.property_u32("#address-cells", 2);
        w.property_u32("#size-cells", 2);
        w.property_str("compatible", "xen,xenvm");

        w.begin_node("chosen");
        w.property_str("bootargs", "console=hvc0");
        if let Some(domid) = spec.chosen_domid {
            w.property_u32(CHOSEN_DOMID_PROP, domid);
        }
        w.end_node();

        w.begin_node("memory@40000000");
        w.property_str("device_type", "memory");
        w.property_u64s("reg", &[0x4000_0000, 0x1000_0000]);
        w.end_node();

        if let Some(version) = spec.xen_version {
            w.begin_node("hypervisor");
            match spec.hypervisor_compatible {
                Some(list) => w.property_strs("compatible", list),
                None => w.property_strs("compatible", &[version, "xen,xen"]),
            }
            w.property_u64s("reg", &[0x3800_0000, 0x100_0000]);
            w.property_u32s("interrupts", &[1, 15, 0xf08]);
            w.end_node();
        }

        if let Some(mediator) = spec.trusty {
            w.begin_node("trusty");
            w.property_str("compatible", TRUSTY_SMC_COMPATIBLE);
            if mediator {
                w.property_null(IPA_REWRITING_MEDIATOR_PROP);
            }
            w.begin_node("virtio");
            w.property_str("compatible", "android,trusty-virtio-v1");
            w.end_node();
            w.end_node();
        }

        if let Some(props) = spec.trusty_vm {
            w.begin_node("soc");
            w.begin_node("trusty-vm");
            w.property_str("compatible", TRUSTY_VM_COMPATIBLE);
            for (name, value) in props {
                w.property_u32(name, *value);
            }
            w.end_node();
            w.end_node();
        }

        w.end_node();
        w.finish()
    }

    const VM_PROPS: &[(&str, u32)] = &[("backend-domid", 7), ("call-evtchn", 11), ("kick-evtchn", 12)];

    #[test]
    fn no_hypervisor_node_means_native() {
        let facts = read_device_tree(&build(&NATIVE)).unwrap();
        assert_eq!(
            facts,
            DtFacts {
                hypervisor: Hypervisor::None,
                grant_table: false,
                trusty_node: false,
                trusty_mediator: false,
                trusty_vm: None,
                domid: None,
            }
        );
    }

    #[test]
    fn xen_4_17_with_version() {
        let facts = read_device_tree(&build(&TreeSpec { xen_version: Some("xen,xen-4.17"), ..NATIVE })).unwrap();
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: Some((4, 17)), domid: None });
        assert!(facts.grant_table);
    }

    #[test]
    fn xen_without_a_version_string() {
        let spec = TreeSpec { xen_version: Some(""), hypervisor_compatible: Some(&["xen,xen"]), ..NATIVE };
        let facts = read_device_tree(&build(&spec)).unwrap();
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: None, domid: None });
        // An unparsable version is not an error: the version is informational.
        let spec =
            TreeSpec { xen_version: Some(""), hypervisor_compatible: Some(&["xen,xen-4.x", "xen,xen"]), ..NATIVE };
        let facts = read_device_tree(&build(&spec)).unwrap();
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: None, domid: None });
    }

    #[test]
    fn a_hypervisor_node_that_is_not_xen_is_refused() {
        let spec =
            TreeSpec { xen_version: Some(""), hypervisor_compatible: Some(&["qcom,gunyah-hypervisor"]), ..NATIVE };
        assert_eq!(read_device_tree(&build(&spec)), Err(FactsError::BadProperty(HYPERVISOR_COMPATIBLE_PROP)));
    }

    #[test]
    fn chosen_domid() {
        let spec = TreeSpec { xen_version: Some("xen,xen-4.19"), chosen_domid: Some(3), ..NATIVE };
        assert_eq!(read_device_tree(&build(&spec)).unwrap().domid, Some(3));
        let spec = TreeSpec { chosen_domid: Some(0x7FF0), ..spec };
        assert_eq!(read_device_tree(&build(&spec)), Err(FactsError::BadProperty(CHOSEN_DOMID_PROP)));
    }

    #[test]
    fn trusty_node_without_mediator() {
        let facts = read_device_tree(&build(&TreeSpec { trusty: Some(false), ..NATIVE })).unwrap();
        assert!(facts.trusty_node);
        assert!(!facts.trusty_mediator);
    }

    #[test]
    fn trusty_node_with_mediator() {
        let spec = TreeSpec { xen_version: Some("xen,xen-4.13"), trusty: Some(true), ..NATIVE };
        let facts = read_device_tree(&build(&spec)).unwrap();
        assert!(facts.trusty_node);
        assert!(facts.trusty_mediator);
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: Some((4, 13)), domid: None });
    }

    #[test]
    fn trusty_vm_node() {
        let spec = TreeSpec { xen_version: Some("xen,xen-4.19"), trusty_vm: Some(VM_PROPS), ..NATIVE };
        let facts = read_device_tree(&build(&spec)).unwrap();
        assert_eq!(facts.trusty_vm, Some((7, 11, 12)));
        assert!(!facts.trusty_node);
    }

    #[test]
    fn trusty_vm_from_the_command_line() {
        assert_eq!(trusty_vm_from_bootargs("console=hvc0 trusty-ipc-stack.trusty-vm=1,10,11 quiet"), Ok(Some((1, 10, 11))));
        assert_eq!(trusty_vm_from_bootargs("console=hvc0"), Ok(None));
        assert_eq!(trusty_vm_from_bootargs(""), Ok(None));
        assert_eq!(trusty_vm_from_bootargs(" \t\n "), Ok(None));
        assert_eq!(trusty_vm_from_bootargs("xtrusty-ipc-stack.trusty-vm=1"), Ok(None), "a key only at a word's start");
        assert_eq!(trusty_vm_from_bootargs("a\ttrusty-ipc-stack.trusty-vm=4294,7,8\r\nb"), Ok(Some((4294, 7, 8))));
        // The first such word counts, as before.
        assert_eq!(trusty_vm_from_bootargs("trusty-ipc-stack.trusty-vm=2,5,6 trusty-ipc-stack.trusty-vm=x"), Ok(Some((2, 5, 6))));
        assert_eq!(trusty_vm_from_bootargs("trusty-ipc-stack.trusty-vm=00003,4294967295,1"), Ok(Some((3, u32::MAX, 1))));
        for bad in [
            "trusty-ipc-stack.trusty-vm=1,10",
            "trusty-ipc-stack.trusty-vm=1,10,11,12",
            "trusty-ipc-stack.trusty-vm=x,1,2",
            "trusty-ipc-stack.trusty-vm=70000,1,2",
            "trusty-ipc-stack.trusty-vm=1,0,11",
            "trusty-ipc-stack.trusty-vm=",
            "trusty-ipc-stack.trusty-vm=x",
            "trusty-ipc-stack.trusty-vm=32752",
            "trusty-ipc-stack.trusty-vm=1,,11",
            "trusty-ipc-stack.trusty-vm=1,10,",
            "trusty-ipc-stack.trusty-vm=,1,10,11",
            "trusty-ipc-stack.trusty-vm=1,4294967296,11",
            "trusty-ipc-stack.trusty-vm=-1",
            "trusty-ipc-stack.trusty-vm=1\u{a0},10,11",
        ] {
            assert!(trusty_vm_from_bootargs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_in_text_are_plain_decimal() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"4294967295"), Some(u32::MAX));
        for bad in [&b""[..], b"4294967296", b"+1", b"-1", b" 1", b"1 ", b"0x10", b"1.5"] {
            assert_eq!(decimal(bad), None, "{bad:?}");
        }
        assert_eq!(parse_version("4.17"), Some((4, 17)));
        assert_eq!(parse_version("4.70000"), None, "beyond u16");
        for bad in ["4", "4.", ".17", "4.x", "4.17.1", "+4.17"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    /// The domain id alone: the ports come from the Trusty VM's rendezvous page.
    #[test]
    fn trusty_vm_domid_alone_means_the_rendezvous() {
        let r = PORTS_FROM_RENDEZVOUS;
        assert_eq!(trusty_vm_from_bootargs("quiet trusty-ipc-stack.trusty-vm=1"), Ok(Some((1, r, r))));
        assert_eq!(trusty_vm_from_bootargs("trusty-ipc-stack.trusty-vm=7 console=ttyAMA0"), Ok(Some((7, r, r))));
    }

    #[test]
    fn trusty_vm_node_missing_a_property() {
        for missing in [TRUSTY_VM_BACKEND_DOMID_PROP, TRUSTY_VM_CALL_EVTCHN_PROP, TRUSTY_VM_KICK_EVTCHN_PROP] {
            let props: Vec<(&'static str, u32)> = VM_PROPS.iter().copied().filter(|(n, _)| *n != missing).collect();
            let props: &'static [(&'static str, u32)] = Vec::leak(props);
            let spec = TreeSpec { trusty_vm: Some(props), ..NATIVE };
            assert_eq!(read_device_tree(&build(&spec)), Err(FactsError::BadProperty(missing)));
        }
    }

    #[test]
    fn trusty_vm_backend_domid_must_be_a_domain_id() {
        let props = &[("backend-domid", 0x1_0007), ("call-evtchn", 11), ("kick-evtchn", 12)];
        let spec = TreeSpec { trusty_vm: Some(props), ..NATIVE };
        assert_eq!(read_device_tree(&build(&spec)), Err(FactsError::BadProperty(TRUSTY_VM_BACKEND_DOMID_PROP)));
    }

    #[test]
    fn garbage_is_a_bad_device_tree() {
        for garbage in [&[][..], &[0u8; 3][..], &[0xffu8; 64][..], b"not a device tree at all, just words"] {
            assert_eq!(read_device_tree(garbage), Err(FactsError::BadDeviceTree));
        }
        // The right magic and nothing else.
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(&FDT_MAGIC.to_be_bytes());
        assert_eq!(read_device_tree(&header), Err(FactsError::BadDeviceTree));
    }

    fn full_tree() -> Vec<u8> {
        build(&TreeSpec {
            xen_version: Some("xen,xen-4.17"),
            hypervisor_compatible: None,
            trusty: Some(true),
            trusty_vm: Some(VM_PROPS),
            chosen_domid: Some(2),
        })
    }

    #[test]
    fn every_prefix_of_a_valid_blob_is_refused_without_panic() {
        let blob = full_tree();
        assert!(read_device_tree(&blob).is_ok());
        for len in 0..blob.len() {
            assert_eq!(read_device_tree(&blob[..len]), Err(FactsError::BadDeviceTree), "prefix {len}");
        }
    }

    #[test]
    fn corrupted_blobs_never_panic() {
        for blob in [full_tree(), with_nops(&full_tree())] {
            // Every byte replaced by a few telling values (token numbers, all ones, zero).
            for at in 0..blob.len() {
                for value in [0u8, 1, 2, 3, 4, 9, 0x7f, 0xff] {
                    let mut bad = blob.clone();
                    bad[at] = value;
                    let _ = read_device_tree(&bad);
                }
            }
            // And random multi-byte damage (xorshift, fixed seed).
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for _ in 0..20_000 {
                let mut bad = blob.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % bad.len() as u64) as usize;
                    bad[at] = next() as u8;
                }
                let _ = read_device_tree(&bad);
            }
        }
    }

    /// Rewrites a structure block token sequence with NOPs inserted before every token.
    fn with_nops(blob: &[u8]) -> Vec<u8> {
        let off_struct = header_word(blob, 2) as usize;
        let size_struct = header_word(blob, 9) as usize;
        let structs = &blob[off_struct..off_struct + size_struct];
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < structs.len() {
            let token = read_u32(structs, pos).unwrap();
            let next = match token {
                FDT_BEGIN_NODE => align4(pos + 4 + c_str(&structs[pos + 4..]).unwrap().len() + 1).unwrap(),
                FDT_PROP => align4(pos + 12 + read_u32(structs, pos + 4).unwrap() as usize).unwrap(),
                _ => pos + 4,
            };
            out.extend_from_slice(&FDT_NOP.to_be_bytes());
            out.extend_from_slice(&structs[pos..next]);
            pos = next;
        }
        let strings_off = header_word(blob, 3) as usize;
        let strings = &blob[strings_off..strings_off + header_word(blob, 8) as usize];
        let mut rebuilt = blob[..HEADER_LEN].to_vec();
        rebuilt.extend_from_slice(&[0; RSVMAP_LEN]);
        let new_struct_off = rebuilt.len();
        rebuilt.extend_from_slice(&out);
        let new_strings_off = rebuilt.len();
        rebuilt.extend_from_slice(strings);
        let total = rebuilt.len() as u32;
        for (index, value) in [
            (1, total),
            (2, new_struct_off as u32),
            (3, new_strings_off as u32),
            (4, HEADER_LEN as u32),
            (9, out.len() as u32),
        ] {
            rebuilt[index * 4..index * 4 + 4].copy_from_slice(&value.to_be_bytes());
        }
        rebuilt
    }

    #[test]
    fn nop_tokens_are_ignored() {
        let blob = full_tree();
        let noisy = with_nops(&blob);
        assert!(noisy.len() > blob.len());
        assert_eq!(read_device_tree(&noisy), read_device_tree(&blob));
        for len in 0..noisy.len() {
            assert_eq!(read_device_tree(&noisy[..len]), Err(FactsError::BadDeviceTree));
        }
    }

    #[test]
    fn error_display_names_the_property() {
        let text = alloc::format!("{}", FactsError::BadProperty("kick-evtchn"));
        assert!(text.contains("kick-evtchn"));
        assert!(!alloc::format!("{}", FactsError::BadDeviceTree).is_empty());
    }

    // --- gather ---

    /// Fake probes: fixed answers, and a log of which probes were asked, in order.
    #[derive(Default)]
    struct FakeProbes {
        features: Option<u32>,
        ffa: bool,
        /// FFA_VERSION's answer when `ffa` (0: the newer mediator's 1.2).
        ffa_version: u32,
        /// FFA_FEATURES answers SUCCESS for these (`None`: for everything).
        ffa_calls: Option<&'static [u32]>,
        trusty: bool,
        asked: Vec<&'static str>,
    }

    impl Probes for FakeProbes {
        fn xen_features(&mut self) -> Option<u32> {
            self.asked.push("xen");
            self.features
        }
        fn ffa_version(&mut self) -> Option<u32> {
            self.asked.push("ffa");
            self.ffa.then_some(if self.ffa_version == 0 { 0x1_0002 } else { self.ffa_version })
        }
        fn ffa_feature(&mut self, fid: u32) -> bool {
            self.asked.push(match fid {
                crate::ffa::func::RUN => "features(RUN)",
                _ => "features",
            });
            match self.ffa_calls {
                None => true,
                Some(calls) => calls.contains(&fid),
            }
        }
        fn trusty_smc_answers(&mut self) -> bool {
            self.asked.push("trusty");
            self.trusty
        }
    }

    const DT_NATIVE: DtFacts = DtFacts {
        hypervisor: Hypervisor::None,
        grant_table: false,
        trusty_node: true,
        trusty_mediator: false,
        trusty_vm: None,
        domid: None,
    };
    const DT_XEN: DtFacts =
        DtFacts { hypervisor: Hypervisor::Xen { version: Some((4, 19)), domid: None }, grant_table: true, ..DT_NATIVE };
    const DIRECT: u32 = 1 << XENFEAT_DIRECT_MAPPED;
    const MEDIATOR_NEWER: MediatorFacts =
        MediatorFacts { version: 0x1_0002, run: true, direct_req: true, mem_share: true, mem_reclaim: true };
    const NOT_DIRECT: u32 = 1 << XENFEAT_NOT_DIRECT_MAPPED;

    #[test]
    fn native_smc() {
        let mut probes = FakeProbes { trusty: true, ..Default::default() };
        let facts = gather(&DT_NATIVE, &mut probes);
        assert_eq!(facts.hypervisor, Hypervisor::None);
        assert_eq!(facts.address_map, AddressMap::Physical);
        assert_eq!(facts.trusty, TrustyPath::Smc);
        assert!(!facts.ffa_available);
        assert_eq!(facts.api_version, None);
        assert_eq!(probes.asked, ["trusty", "ffa"], "no Xen probe without /hypervisor");
    }

    #[test]
    fn native_ffa() {
        let mut probes = FakeProbes { trusty: true, ffa: true, ..Default::default() };
        let facts = gather(&DT_NATIVE, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::FfaNative);
        assert!(facts.ffa_available);
        assert_eq!(probes.asked, ["trusty", "ffa"]);
    }

    #[test]
    fn native_trusty_silent_is_unreachable_even_with_ffa() {
        let mut probes = FakeProbes { ffa: true, ..Default::default() };
        let facts = gather(&DT_NATIVE, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::Unreachable);
        assert!(facts.ffa_available);
    }

    #[test]
    fn xen_ffa_mediator() {
        let mut probes = FakeProbes { features: Some(NOT_DIRECT), ffa: true, ..Default::default() };
        let facts = gather(&DT_XEN, &mut probes);
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: Some((4, 19)), domid: None });
        assert_eq!(facts.address_map, AddressMap::Translated);
        assert_eq!(facts.trusty, TrustyPath::FfaMediator);
        assert!(facts.ffa_available);
        assert!(facts.grant_table);
        assert_eq!(
            probes.asked,
            ["xen", "ffa", "features(RUN)", "features", "features", "features"],
            "FFA_VERSION first, then FFA_FEATURES; no Trusty SMC once FF-A answered under Xen"
        );
        assert_eq!(facts.mediator, Some(MEDIATOR_NEWER));
    }

    /// Xen 4.20 / 4.21: FFA_VERSION 1.1 and no FFA_RUN in its FFA_FEATURES table.
    #[test]
    fn xen_ffa_mediator_4_20() {
        use crate::ffa::func;
        const XEN_4_20: &[u32] = &[func::MSG_SEND_DIRECT_REQ, func::MEM_SHARE, func::MEM_RECLAIM];
        let mut probes =
            FakeProbes { features: Some(NOT_DIRECT), ffa: true, ffa_version: 0x1_0001, ffa_calls: Some(XEN_4_20), ..Default::default() };
        let facts = gather(&DT_XEN, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::FfaMediator);
        assert_eq!(
            facts.mediator,
            Some(MediatorFacts { version: 0x1_0001, run: false, direct_req: true, mem_share: true, mem_reclaim: true })
        );
    }

    /// Without Xen nothing is asked of a mediator.
    #[test]
    fn no_mediator_facts_without_xen() {
        let mut probes = FakeProbes { ffa: true, trusty: true, ..Default::default() };
        let facts = gather(&DT_NATIVE, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::FfaNative);
        assert_eq!(facts.mediator, None);
        assert!(!probes.asked.iter().any(|a| a.starts_with("features")));
    }

    #[test]
    fn xen_trusty_mediator() {
        let dt = DtFacts { trusty_mediator: true, ..DT_XEN };
        let mut probes = FakeProbes { features: Some(NOT_DIRECT), trusty: true, ..Default::default() };
        let facts = gather(&dt, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::TrustyMediator);
        assert!(!facts.ffa_available);
        assert_eq!(probes.asked, ["xen", "ffa", "trusty"]);
    }

    #[test]
    fn xen_direct_mapped_smc() {
        let mut probes = FakeProbes { features: Some(DIRECT), trusty: true, ..Default::default() };
        let facts = gather(&DT_XEN, &mut probes);
        assert_eq!(facts.address_map, AddressMap::DirectMapped);
        assert_eq!(facts.trusty, TrustyPath::Smc);
    }

    #[test]
    fn xen_trusty_vm_needs_no_smc_probe() {
        let dt = DtFacts { trusty_vm: Some((7, 11, 12)), trusty_node: false, domid: Some(3), ..DT_XEN };
        let mut probes = FakeProbes { features: Some(NOT_DIRECT), trusty: true, ffa: true, ..Default::default() };
        let facts = gather(&dt, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::XenVm { backend_domid: 7, call_evtchn: 11, kick_evtchn: 12 });
        assert_eq!(facts.hypervisor, Hypervisor::Xen { version: Some((4, 19)), domid: Some(3) });
        assert_eq!(probes.asked, ["xen"]);
    }

    #[test]
    fn xen_nothing_answers_is_unreachable() {
        let mut probes = FakeProbes { features: Some(NOT_DIRECT), ..Default::default() };
        let facts = gather(&DT_XEN, &mut probes);
        assert_eq!(facts.trusty, TrustyPath::Unreachable);
        assert_eq!(probes.asked, ["xen", "ffa", "trusty"]);
    }

    #[test]
    fn xen_feature_bits() {
        assert_eq!(xen_address_map(Some(DIRECT)), AddressMap::DirectMapped);
        assert_eq!(xen_address_map(Some(NOT_DIRECT | 1)), AddressMap::Translated);
        assert_eq!(xen_address_map(Some(0)), AddressMap::Unknown);
        assert_eq!(xen_address_map(Some(DIRECT | NOT_DIRECT)), AddressMap::Unknown);
        assert_eq!(xen_address_map(None), AddressMap::Unknown);
        let mut probes = FakeProbes { features: None, trusty: true, ..Default::default() };
        assert_eq!(gather(&DT_XEN, &mut probes).address_map, AddressMap::Unknown);
    }

    /// Row 7 of dma-decisions §6: a dom0less DomU without `xen,enhanced` has no /hypervisor
    /// node, so the tree looks native. The probes do not: Xen traps the SMCs and, with no
    /// mediator for the domain, Trusty's fast call and FFA_VERSION both come back unknown.
    #[test]
    fn dom0less_without_enhanced_is_not_mistaken_for_native() {
        let dt = read_device_tree(&build(&TreeSpec { trusty: Some(false), ..NATIVE })).unwrap();
        let mut probes = FakeProbes::default();
        let facts = gather(&dt, &mut probes);
        assert_eq!(facts.hypervisor, Hypervisor::None);
        assert_eq!(facts.trusty, TrustyPath::Unreachable);
        assert_eq!(probes.asked, ["trusty", "ffa"]);
    }

    #[test]
    fn device_tree_to_facts_end_to_end() {
        let dt = read_device_tree(&build(&TreeSpec {
            xen_version: Some("xen,xen-4.18"),
            trusty: Some(false),
            chosen_domid: Some(1),
            ..NATIVE
        }))
        .unwrap();
        let mut probes = FakeProbes { features: Some(NOT_DIRECT), ffa: true, ..Default::default() };
        let facts = gather(&dt, &mut probes);
        assert_eq!(
            facts,
            PlatformFacts {
                hypervisor: Hypervisor::Xen { version: Some((4, 18)), domid: Some(1) },
                address_map: AddressMap::Translated,
                trusty: TrustyPath::FfaMediator,
                ffa_available: true,
                grant_table: true,
                api_version: None,
                mediator: Some(MEDIATOR_NEWER),
            }
        );
    }
}
