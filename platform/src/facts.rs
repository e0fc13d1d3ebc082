//! Platform facts: what the flattened device tree says ([`read_device_tree`]) combined with what
//! the hypervisor and the secure side answer ([`Probes`], [`gather`]) into [`PlatformFacts`].
//!
//! Nothing here decides how to share memory; that is [`crate::decision`]. The rules follow spec
//! dma-decisions.md §2.6 (how a guest knows it runs on Xen), §3 (what a DomU's device tree shows,
//! `xen,enhanced`) and §4 (how Trusty is reached from a DomU).
//!
//! The device tree is parsed with the `fdt` crate. That crate trusts its input (it panics on
//! many malformed blobs), so [`read_device_tree`] first walks the whole structure block with
//! checked arithmetic and hands the crate only a blob whose grammar it is known to handle.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

use fdt::node::FdtNode;
use fdt::Fdt;

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
pub const TRUSTY_VM_CALL_EVTCHN_PROP: &str = "call-evtchn";
pub const TRUSTY_VM_KICK_EVTCHN_PROP: &str = "kick-evtchn";
/// Optional u32 property of `/chosen`: this domain's id.
pub const CHOSEN_DOMID_PROP: &str = "trusty-ipc-stack,domid";
/// Error name used when `/hypervisor` exists but is not Xen's.
pub const HYPERVISOR_COMPATIBLE_PROP: &str = "/hypervisor compatible (xen,xen)";

/// Xen's generic compatible and the prefix of its versioned one (Linux `xen_early_init`).
const XEN_COMPATIBLE: &str = "xen,xen";
const XEN_VERSION_PREFIX: &str = "xen,xen-";
/// Domain ids from here on are reserved (DOMID_FIRST_RESERVED, xen/include/public/xen.h).
const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

/// Reads the facts the device tree states. Never panics, whatever `fdt` holds.
pub fn read_device_tree(fdt: &[u8]) -> Result<DtFacts, FactsError> {
    let blob = checked_blob(fdt)?;
    let tree = Fdt::new(&blob).map_err(|_| FactsError::BadDeviceTree)?;
    let root = tree.find_node("/").ok_or(FactsError::BadDeviceTree)?;

    // Linux looks for a top-level node named exactly "hypervisor" (dma-decisions §2.6).
    let hypervisor_node = root.children().find(|n| n.name == "hypervisor");
    let hypervisor = match hypervisor_node {
        None => Hypervisor::None,
        Some(node) => {
            let compatible = node.compatible();
            let strings = || compatible.into_iter().flat_map(|c| c.all());
            if !strings().any(|c| c == XEN_COMPATIBLE) {
                // Some other hypervisor (Gunyah publishes one too): its address map is unknown
                // and cannot be expressed as facts, so refuse rather than look native.
                return Err(FactsError::BadProperty(HYPERVISOR_COMPATIBLE_PROP));
            }
            let version = strings().find_map(|c| c.strip_prefix(XEN_VERSION_PREFIX).and_then(parse_version));
            Hypervisor::Xen { version, domid: None }
        }
    };

    let trusty = tree.all_nodes().find(|n| is_compatible(n, TRUSTY_SMC_COMPATIBLE));
    let trusty_mediator = trusty.is_some_and(|n| n.property(IPA_REWRITING_MEDIATOR_PROP).is_some());

    let trusty_vm = match tree.all_nodes().find(|n| is_compatible(n, TRUSTY_VM_COMPATIBLE)) {
        None => None,
        Some(node) => {
            let backend = required_u32(node, TRUSTY_VM_BACKEND_DOMID_PROP)?;
            let call = required_u32(node, TRUSTY_VM_CALL_EVTCHN_PROP)?;
            let kick = required_u32(node, TRUSTY_VM_KICK_EVTCHN_PROP)?;
            Some((domid_from(backend, TRUSTY_VM_BACKEND_DOMID_PROP)?, call, kick))
        }
    };

    let chosen = root.children().find(|n| n.name == "chosen");
    let domid = match chosen {
        Some(chosen) if chosen.property(CHOSEN_DOMID_PROP).is_some() => {
            Some(domid_from(required_u32(chosen, CHOSEN_DOMID_PROP)?, CHOSEN_DOMID_PROP)?)
        }
        _ => None,
    };
    // A dom0less guest's device tree is written by Xen, so the Trusty VM may instead be named on
    // the kernel command line (the domain node's `bootargs`).
    let trusty_vm = match (trusty_vm, chosen.and_then(|c| c.property("bootargs")).and_then(|p| p.as_str())) {
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

/// The boot argument naming a Trusty VM: `trusty-ipc-stack.trusty-vm=<domid>,<call>,<kick>`.
pub const TRUSTY_VM_BOOTARG: &str = "trusty-ipc-stack.trusty-vm=";

/// Reads [`TRUSTY_VM_BOOTARG`] from a command line, if present.
pub fn trusty_vm_from_bootargs(args: &str) -> Result<Option<(u16, u32, u32)>, FactsError> {
    const WHAT: &str = "bootargs trusty-ipc-stack.trusty-vm=<domid>,<call-evtchn>,<kick-evtchn>";
    let Some(value) = args.split_ascii_whitespace().find_map(|w| w.strip_prefix(TRUSTY_VM_BOOTARG)) else {
        return Ok(None);
    };
    let mut parts = value.split(',').map(|p| p.parse::<u32>().map_err(|_| FactsError::BadProperty(WHAT)));
    let (Some(domid), Some(call), Some(kick), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(FactsError::BadProperty(WHAT));
    };
    Ok(Some((domid_from(domid?, WHAT)?, call?, kick?)))
}

fn is_compatible(node: &FdtNode<'_, '_>, compatible: &str) -> bool {
    node.compatible().is_some_and(|c| c.all().any(|s| s == compatible))
}

/// A property that must be exactly one big-endian u32.
fn required_u32(node: FdtNode<'_, '_>, name: &'static str) -> Result<u32, FactsError> {
    let value = node.property(name).ok_or(FactsError::BadProperty(name))?.value;
    let bytes: [u8; 4] = value.try_into().map_err(|_| FactsError::BadProperty(name))?;
    Ok(u32::from_be_bytes(bytes))
}

/// A domain id: below DOMID_FIRST_RESERVED (the ids above name DOMID_SELF, DOMID_IO, ...).
fn domid_from(value: u32, name: &'static str) -> Result<u16, FactsError> {
    match u16::try_from(value) {
        Ok(domid) if value < DOMID_FIRST_RESERVED => Ok(domid),
        _ => Err(FactsError::BadProperty(name)),
    }
}

/// `"<maj>.<min>"` of `xen,xen-<maj>.<min>`.
fn parse_version(s: &str) -> Option<(u16, u16)> {
    let (major, minor) = s.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

// --- Validation of the blob before the `fdt` crate sees it -----------------------------------
//
// Flattened device tree format (devicetree specification v0.4 §5): a 40-byte big-endian header,
// a structure block of 4-byte-aligned tokens and a strings block of property names.

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
const HEADER_LEN: usize = 40;
/// `size_dt_struct` exists from version 17 on; 17 is also the last one defined.
const FDT_VERSION: u32 = 17;
/// Deeper trees are refused: the crate keeps 64 parents and recurses per level.
const MAX_DEPTH: usize = 32;
/// `last_comp_version` written into a rebuilt blob (version 17 is compatible with 16).
const FDT_LAST_COMP_VERSION: u32 = 16;
/// Length of the empty memory-reservation map of a rebuilt blob (one zero entry).
const RSVMAP_LEN: usize = 16;
const BAD: FactsError = FactsError::BadDeviceTree;

/// Header field `index` (u32 words).
fn header_word(data: &[u8], index: usize) -> u32 {
    read_u32(data, index * 4).unwrap_or(0)
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn align4(n: usize) -> Option<usize> {
    Some(n.checked_add(3)? & !3)
}

/// A range of `data` given as (offset, size) header words, if it lies inside `total`.
fn block(data: &[u8], offset: u32, size: u32, total: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    if end > total {
        return None;
    }
    data.get(start..end)
}

/// The NUL-terminated UTF-8 string at the start of `bytes` (without the NUL).
fn c_str(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&bytes[..end]).ok()
}

/// Checks that `data` is a device tree whose every token the `fdt` crate can walk without
/// panicking: one root node named "", balanced nodes no deeper than [`MAX_DEPTH`], properties
/// before subnodes, every name and value inside its block, names valid UTF-8, FDT_END last.
///
/// The crate also mishandles NOP tokens between properties, so a blob with NOPs comes back as
/// a rebuilt copy without them (NOPs carry no meaning).
fn checked_blob(data: &[u8]) -> Result<Cow<'_, [u8]>, FactsError> {
    if data.len() < HEADER_LEN || header_word(data, 0) != FDT_MAGIC {
        return Err(BAD);
    }
    let total = usize::try_from(header_word(data, 1)).map_err(|_| BAD)?;
    if total < HEADER_LEN || total > data.len() {
        return Err(BAD);
    }
    if header_word(data, 5) < FDT_VERSION || header_word(data, 6) > FDT_VERSION {
        return Err(BAD);
    }
    let structs = block(data, header_word(data, 2), header_word(data, 9), total).ok_or(BAD)?;
    let strings = block(data, header_word(data, 3), header_word(data, 8), total).ok_or(BAD)?;

    let mut nops = 0usize;
    walk_structure(structs, strings, |token, _| nops += usize::from(token == FDT_NOP))?;
    if nops == 0 {
        return Ok(Cow::Borrowed(data));
    }

    // Rebuild: header, empty reservation map, structure block without NOPs, strings block.
    let mut compact = Vec::with_capacity(structs.len());
    walk_structure(structs, strings, |token, bytes| {
        if token != FDT_NOP {
            compact.extend_from_slice(bytes);
        }
    })?;
    let word = |n: usize| u32::try_from(n).map_err(|_| BAD);
    let struct_offset = HEADER_LEN + RSVMAP_LEN;
    let strings_offset = struct_offset + compact.len();
    let total = strings_offset + strings.len();
    let header = [
        FDT_MAGIC,
        word(total)?,
        word(struct_offset)?,
        word(strings_offset)?,
        word(HEADER_LEN)?,
        FDT_VERSION,
        FDT_LAST_COMP_VERSION,
        0,
        word(strings.len())?,
        word(compact.len())?,
    ];
    let mut blob = Vec::with_capacity(total);
    for value in header {
        blob.extend_from_slice(&value.to_be_bytes());
    }
    blob.extend_from_slice(&[0; RSVMAP_LEN]);
    blob.extend_from_slice(&compact);
    blob.extend_from_slice(strings);
    Ok(Cow::Owned(blob))
}

/// Walks the structure block token by token, checking the grammar [`checked_blob`] describes,
/// and hands each token with its bytes (padding included) to `visit`, up to FDT_END.
fn walk_structure(structs: &[u8], strings: &[u8], mut visit: impl FnMut(u32, &[u8])) -> Result<(), FactsError> {
    let mut pos = 0usize;
    let mut depth = 0usize;
    let mut root_done = false;
    // Properties are allowed right after a node begins, until its first subnode.
    let mut props_allowed = false;
    loop {
        let token = read_u32(structs, pos).ok_or(BAD)?;
        let body = pos + 4;
        let next = match token {
            FDT_NOP => body,
            FDT_BEGIN_NODE => {
                if root_done || depth == MAX_DEPTH {
                    return Err(BAD);
                }
                let name = c_str(structs.get(body..).ok_or(BAD)?).ok_or(BAD)?;
                // The crate finds "/" by an empty root name.
                if depth == 0 && !name.is_empty() {
                    return Err(BAD);
                }
                depth += 1;
                props_allowed = true;
                align4(body + name.len() + 1).ok_or(BAD)?
            }
            FDT_PROP => {
                if !props_allowed {
                    return Err(BAD);
                }
                let len = usize::try_from(read_u32(structs, body).ok_or(BAD)?).map_err(|_| BAD)?;
                let name_offset = usize::try_from(read_u32(structs, body + 4).ok_or(BAD)?).map_err(|_| BAD)?;
                let value_end = (body + 8).checked_add(len).ok_or(BAD)?;
                if value_end > structs.len() {
                    return Err(BAD);
                }
                c_str(strings.get(name_offset..).ok_or(BAD)?).ok_or(BAD)?;
                align4(value_end).ok_or(BAD)?
            }
            FDT_END_NODE => {
                if depth == 0 {
                    return Err(BAD);
                }
                depth -= 1;
                root_done = depth == 0;
                props_allowed = false;
                body
            }
            FDT_END if root_done => body,
            _ => return Err(BAD),
        };
        // Padding past the block's end cannot be followed by another token: refuse it here.
        visit(token, structs.get(pos..next).ok_or(BAD)?);
        if token == FDT_END {
            return Ok(());
        }
        pos = next;
    }
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
    use alloc::string::String;
    use alloc::vec;
    use vm_fdt::FdtWriter;

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
        let mut w = FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_string("compatible", "xen,xenvm").unwrap();

        let chosen = w.begin_node("chosen").unwrap();
        w.property_string("bootargs", "console=hvc0").unwrap();
        if let Some(domid) = spec.chosen_domid {
            w.property_u32(CHOSEN_DOMID_PROP, domid).unwrap();
        }
        w.end_node(chosen).unwrap();

        let memory = w.begin_node("memory@40000000").unwrap();
        w.property_string("device_type", "memory").unwrap();
        w.property_array_u64("reg", &[0x4000_0000, 0x1000_0000]).unwrap();
        w.end_node(memory).unwrap();

        if let Some(version) = spec.xen_version {
            let hyp = w.begin_node("hypervisor").unwrap();
            let mut compat = vec![String::from(version), String::from("xen,xen")];
            if let Some(list) = spec.hypervisor_compatible {
                compat = list.iter().map(|s| String::from(*s)).collect();
            }
            w.property_string_list("compatible", compat).unwrap();
            w.property_array_u64("reg", &[0x3800_0000, 0x100_0000]).unwrap();
            w.property_array_u32("interrupts", &[1, 15, 0xf08]).unwrap();
            w.end_node(hyp).unwrap();
        }

        if let Some(mediator) = spec.trusty {
            let trusty = w.begin_node("trusty").unwrap();
            w.property_string("compatible", TRUSTY_SMC_COMPATIBLE).unwrap();
            if mediator {
                w.property_null(MEDIATOR_PLACEHOLDER).unwrap();
            }
            let virtio = w.begin_node("virtio").unwrap();
            w.property_string("compatible", "android,trusty-virtio-v1").unwrap();
            w.end_node(virtio).unwrap();
            w.end_node(trusty).unwrap();
        }

        if let Some(props) = spec.trusty_vm {
            let soc = w.begin_node("soc").unwrap();
            let vm = w.begin_node("trusty-vm").unwrap();
            w.property_string("compatible", TRUSTY_VM_COMPATIBLE).unwrap();
            for (name, value) in props {
                w.property_u32(name, *value).unwrap();
            }
            w.end_node(vm).unwrap();
            w.end_node(soc).unwrap();
        }

        w.end_node(root).unwrap();
        rename_property(w.finish().unwrap(), MEDIATOR_PLACEHOLDER, IPA_REWRITING_MEDIATOR_PROP)
    }

    /// vm-fdt enforces the devicetree specification's 31-character limit on property names
    /// (§2.2.4); [`IPA_REWRITING_MEDIATOR_PROP`] is longer (Linux, Xen and libfdt do not mind),
    /// so the tree is written with a short stand-in that is then renamed.
    const MEDIATOR_PLACEHOLDER: &str = "stand-in,mediator";

    /// Appends `to` to the strings block (last in vm-fdt's layout) and points every property
    /// named `from` at it.
    fn rename_property(mut blob: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
        let word = |blob: &[u8], index: usize| header_word(blob, index) as usize;
        let (off_struct, off_strings) = (word(&blob, 2), word(&blob, 3));
        let (size_strings, size_struct) = (word(&blob, 8), word(&blob, 9));
        assert_eq!(off_strings + size_strings, blob.len(), "strings block last");
        let strings = &blob[off_strings..];
        let Some(from_offset) = strings
            .split(|&b| b == 0)
            .scan(0, |at, name| {
                let this = *at;
                *at += name.len() + 1;
                Some((this, name))
            })
            .find(|(_, name)| *name == from.as_bytes())
            .map(|(at, _)| at)
        else {
            return blob;
        };
        let mut pos = off_struct;
        while pos < off_struct + size_struct {
            let next = match read_u32(&blob, pos).unwrap() {
                FDT_BEGIN_NODE => align4(pos + 4 + c_str(&blob[pos + 4..]).unwrap().len() + 1).unwrap(),
                FDT_PROP => {
                    if read_u32(&blob, pos + 8).unwrap() as usize == from_offset {
                        blob[pos + 8..pos + 12].copy_from_slice(&(size_strings as u32).to_be_bytes());
                    }
                    align4(pos + 12 + read_u32(&blob, pos + 4).unwrap() as usize).unwrap()
                }
                _ => pos + 4,
            };
            pos = next;
        }
        blob.extend_from_slice(to.as_bytes());
        blob.push(0);
        let new_size = (size_strings + to.len() + 1) as u32;
        let total = blob.len() as u32;
        blob[32..36].copy_from_slice(&new_size.to_be_bytes());
        blob[4..8].copy_from_slice(&total.to_be_bytes());
        blob
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
        for bad in ["trusty-ipc-stack.trusty-vm=1,10", "trusty-ipc-stack.trusty-vm=1,10,11,12", "trusty-ipc-stack.trusty-vm=x,1,2", "trusty-ipc-stack.trusty-vm=70000,1,2"] {
            assert!(trusty_vm_from_bootargs(bad).is_err(), "{bad}");
        }
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
