//! What the platform is ([`PlatformFacts`]) and how buffers become visible to Trusty on it
//! ([`SharingPlan`]). The facts come from the device tree and from probes (`facts`); the plan
//! is a pure function of the facts (`decision`). See spec dma-decisions.md §6 and
//! trusty-protocol.md §3.

use core::fmt;

/// The hypervisor the normal world runs under, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// No hypervisor: the normal world owns the physical address space.
    None,
    /// Xen, with its version when the device tree or a probe told it.
    Xen {
        /// `(major, minor)`, when known.
        version: Option<(u16, u16)>,
        /// Domain id, when known (0 = dom0 / hardware domain).
        domid: Option<u16>,
    },
}

/// How this domain's addresses relate to physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressMap {
    /// No stage-2 translation (no hypervisor).
    Physical,
    /// Guest addresses equal physical addresses (XENFEAT_direct_mapped).
    DirectMapped,
    /// Guest addresses are IPAs unrelated to physical addresses (XENFEAT_not_direct_mapped).
    Translated,
    /// A hypervisor is present but did not say.
    Unknown,
}

/// Where Trusty is and how a call reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustyPath {
    /// Trusty's own SMCs reach it (no hypervisor, or a hypervisor that forwards them untouched).
    Smc,
    /// FF-A is available without a hypervisor: Trusty's SMCs work and memory can be shared by
    /// FFA_MEM_SHARE (Trusty API 5).
    FfaNative,
    /// Xen's FF-A mediator: only FF-A calls pass (plain Trusty SMCs come back NOT_SUPPORTED),
    /// so calls travel as FF-A direct requests; memory by FFA_MEM_SHARE with IPAs, which Xen
    /// translates (spec dma-decisions §4.3).
    FfaMediator,
    /// An address-rewriting Trusty mediator in the hypervisor (NXP style, spec
    /// dma-decisions §4.4): Trusty's SMCs pass, and the guest addresses in them are rewritten.
    TrustyMediator,
    /// Trusty runs in another Xen domain: calls through a granted mailbox page and event
    /// channels, memory by grant references.
    XenVm {
        /// Trusty's domain.
        backend_domid: u16,
        /// The event channel that signals a call.
        call_evtchn: u32,
        /// The event channel that asks for a vring kick.
        kick_evtchn: u32,
    },
    /// Nothing reaches Trusty.
    Unreachable,
}

/// Everything the sharing decision needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformFacts {
    /// What the guest runs under.
    pub hypervisor: Hypervisor,
    /// How the guest's addresses relate to physical ones.
    pub address_map: AddressMap,
    /// How Trusty is reached.
    pub trusty: TrustyPath,
    /// Whether FFA_VERSION answered with a 1.x version.
    pub ffa_available: bool,
    /// Whether the grant table is usable (`xen,enhanced`; a hypervisor node is present).
    pub grant_table: bool,
    /// The Trusty API version negotiated over the chosen transport; `None` before negotiation.
    pub api_version: Option<u32>,
}

/// How each buffer's 64-bit memory id is formed (spec trusty-protocol §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Bare physical address (API < 4).
    Phys,
    /// Physical address + attributes, the §3.2 "compat" encoding (API 4).
    PhysAttr,
    /// FF-A memory handle from FFA_MEM_SHARE (API 5).
    FfaHandle,
    /// Xen grant reference of the first page, consecutive references for the rest
    /// (`1 << 63 | gref << 12`, Linux's grant-DMA encoding); the peer is `backend_domid`.
    XenGrant {
        /// The domain the references are granted to.
        backend_domid: u16,
    },
    /// The guest's own address (IPA), in the encoding of the API version (bare below 4,
    /// with attributes at 4), rewritten to a physical address by a mediator.
    MediatedIpa,
}

impl Mechanism {
    /// The mechanism called `name` (as [`Mechanism::name`] spells it); a grant's peer is
    /// `grant_backend`.
    pub fn from_name(name: &str, grant_backend: u16) -> Option<Mechanism> {
        Some(match name {
            "phys" => Mechanism::Phys,
            "phys-attr" => Mechanism::PhysAttr,
            "ffa-handle" => Mechanism::FfaHandle,
            "xen-grant" => Mechanism::XenGrant { backend_domid: grant_backend },
            "mediated-ipa" => Mechanism::MediatedIpa,
            _ => return None,
        })
    }

    /// Short name, as used by `--force-sharing` and in the sharing line.
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::Phys => "phys",
            Mechanism::PhysAttr => "phys-attr",
            Mechanism::FfaHandle => "ffa-handle",
            Mechanism::XenGrant { .. } => "xen-grant",
            Mechanism::MediatedIpa => "mediated-ipa",
        }
    }
}

/// How Trusty calls are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallTransport {
    /// SMC instructions with Trusty's function ids.
    Smc,
    /// Each call wrapped in an FF-A direct request (spec trusty-protocol §11).
    FfaDirect,
    /// A Xen mailbox page and event channels to a Trusty VM.
    XenMailbox {
        /// Trusty's domain.
        backend_domid: u16,
        /// The event channel that signals a call.
        call_evtchn: u32,
        /// The event channel that asks for a vring kick.
        kick_evtchn: u32,
    },
}

/// The decision: mechanism, transport, limits, and the reason in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharingPlan {
    /// How memory is shared.
    pub mechanism: Mechanism,
    /// How calls reach Trusty.
    pub transport: CallTransport,
    /// Live shares the platform allows at most (`None`: no limit).
    pub share_budget: Option<usize>,
    /// Largest buffer (in pages) one share may cover, if limited.
    pub max_buffer_pages: Option<usize>,
    /// Whether a share descriptor may be sent in several fragments.
    pub fragmented_descriptors: bool,
    /// Rx buffers to post, tx buffers to allocate at most, spare rx buffers: sized to fit the
    /// budget (descriptor page + 2 vrings + rx + tx + spares <= budget, with room left).
    pub rx_buffers: usize,
    /// Tx buffers to allocate at most.
    pub tx_buffers: usize,
    /// Spare rx buffers.
    pub rx_spare_buffers: usize,
    /// One line: why this mechanism is right on this platform.
    pub reason: &'static str,
}

impl fmt::Display for SharingPlan {
    /// The sharing line: `sharing: <mechanism> (<reason>)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mechanism {
            Mechanism::XenGrant { backend_domid } => {
                write!(f, "sharing: xen-grant to domain {backend_domid} ({})", self.reason)
            }
            m => write!(f, "sharing: {} ({})", m.name(), self.reason),
        }
    }
}

/// No safe way exists: names what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecisionError {
    /// What is missing, in words (e.g. "an FF-A or Trusty mediator in the hypervisor").
    pub missing: &'static str,
    /// Why it is needed.
    pub because: &'static str,
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no safe way to share memory with Trusty: missing {} ({})", self.missing, self.because)
    }
}
