//! The composition root: bringing the whole normal-world stack up. Facts from the device tree
//! and probes, the call transport they imply, API negotiation (spec §2.4), the sharing plan
//! (platform `decision`), the sharer it names, the virtio bus and the TIPC device (spec §5.5).
//!
//! It knows every mechanism and every environment, so it lives above the protocol crates
//! (DESIGN.md, Composition). What differs between environments is what they hand to
//! [`bring_up_platform`] in a [`PlatformAccess`]; one module of [`backend`] per environment
//! builds it:
//! - [`backend::bare`]: bare metal (an AArch64 DomU image, firmware): SMC conduit, Xen
//!   hypercalls, the grant table mapped into the guest, static event channels;
//! - [`backend::host`]: a host process over a simulated machine (the embedded Trusty model of
//!   the tests, tipc-test and trusty-ipcd's `sim` feature);
//! - `backend::linux` (feature `linux`): Linux userspace in a Xen DomU, next to a Trusty VM:
//!   `/dev/xen/{gntalloc,gntdev,evtchn}`, facts from `/proc/device-tree` and `/proc/cmdline`.
//!
//! The crate is `no_std` (with `alloc`) except for the `linux` backend.
//!
//! Each sharing mechanism and call transport is a Cargo feature (`ffa-handle`, `ffa-direct`,
//! `xen-grant`, `phys`; all default): an image for a fixed platform leaves out what it cannot
//! meet, and bring-up refuses a platform that needs it by name ([`Mechanisms`]).
#![cfg_attr(not(feature = "linux"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod backend;

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;
use core::ptr::NonNull;

use trusty_platform::clock::Clock;
use trusty_platform::decision::{api_ceiling, check_mediator, decide, sized};
use trusty_platform::facts::{gather, read_device_tree, FactsError};
use trusty_platform::ffa::FfaSharer;
use trusty_platform::ffa_call::{discover, FfaCallConduit};
use trusty_platform::mailbox::{EventChannel, MailboxConduit};
use trusty_platform::mem::{PageAllocator, SharedMemory, Sharer};
use trusty_platform::phys::{AddressKind, AddressSharer};
use trusty_platform::plan::{CallTransport, DecisionError, MediatorFacts, Mechanism, PlatformFacts, SharingPlan};
use trusty_platform::probe::CallProbes;
use trusty_platform::smc::{api, Conduit};
use trusty_platform::trusty::{CallPolicy, Trusty};
use trusty_virtio::Bus;

use tipc::{Config, Error, TipcDevice};

/// Everything bring-up can be told.
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    /// The TIPC device's configuration.
    pub tipc: Config,
    /// How calls into Trusty retry and time out.
    pub calls: CallPolicy,
    /// Use this mechanism whatever the facts say (to demonstrate a wrong decision).
    pub force_mechanism: Option<Mechanism>,
    /// How long a Trusty VM may take to answer one mailbox call.
    pub mailbox_timeout_ms: u64,
    /// The mechanisms bring-up may use: [`Mechanisms::BUILT`] by default; a narrower set
    /// refuses more platforms (a wider one cannot add what the build left out).
    pub mechanisms: Mechanisms,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            tipc: Config::default(),
            calls: CallPolicy::default(),
            force_mechanism: None,
            mailbox_timeout_ms: 1000,
            mechanisms: Mechanisms::BUILT,
        }
    }
}

/// What the platform provides to the stack.
pub struct PlatformAccess {
    /// The SMC (or HVC) conduit into the secure monitor, as the hardware offers it (one that
    /// answers every call NOT_SUPPORTED where the environment has none: Linux userspace).
    pub conduit: Arc<dyn Conduit>,
    /// Time, for every wait.
    pub clock: Arc<dyn Clock>,
    /// Pages for everything shared with Trusty.
    pub allocator: Box<dyn PageAllocator>,
    /// The flattened device tree the normal world booted with (in Linux userspace, the one
    /// `/proc/device-tree` shows, written back into a blob, with `/proc/cmdline` as bootargs).
    pub fdt: alloc::vec::Vec<u8>,
    /// XENVER_get_features submap 0 (asked only when the device tree shows Xen).
    pub xen_features: Box<dyn FnMut() -> Option<u32> + Send>,
    /// The way to a Trusty VM, if the environment has one (event channels and grants).
    pub trusty_vm: Option<Box<dyn TrustyVmLink>>,
}

/// The Trusty VM the facts name ([`trusty_platform::plan::TrustyPath::XenVm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustyVm {
    /// The Trusty VM's domain.
    pub backend_domid: u16,
    /// The event channel that signals a call, or
    /// [`trusty_platform::facts::PORTS_FROM_RENDEZVOUS`]: the Trusty VM offers one on its
    /// rendezvous page.
    pub call_evtchn: u32,
    /// The event channel that asks for a vring kick (unused today), or
    /// [`trusty_platform::facts::PORTS_FROM_RENDEZVOUS`].
    pub kick_evtchn: u32,
}

/// An open way to a Trusty VM: what [`MailboxConduit`] and the grant mechanism need.
pub struct VmLink {
    /// Shares memory with the Trusty VM by grants (ids in Linux's grant-DMA encoding).
    pub sharer: Box<dyn Sharer>,
    /// The mailbox page: granted to the Trusty VM, which serves it. It is never given back.
    pub mailbox: NonNull<u8>,
    /// Signals (and, where the environment can block, waits for) the call event channel.
    pub events: Arc<dyn EventChannel>,
    /// This side's port of the call event channel.
    pub call_port: u32,
}

// SAFETY: `mailbox` is a page owned by the link for the life of the stack (see the field); the
// rest is Send.
unsafe impl Send for VmLink {}

/// How an environment reaches a Trusty VM (event channels, grants, the mailbox page).
pub trait TrustyVmLink: Send {
    /// Opens the way to `vm`: grants a mailbox page (from `allocator` where the environment
    /// grants arbitrary pages) and makes the call event channel usable. Bounded in time: a
    /// Trusty VM that never answers is an error, not a hang.
    fn connect(&mut self, vm: TrustyVm, allocator: &mut dyn PageAllocator) -> Result<VmLink, String>;

    /// A grant sharer towards `backend_domid` without a mailbox (only to run a forced
    /// `xen-grant` decision where no Trusty VM is the peer, to demonstrate it faults).
    fn grant_sharer(&mut self, backend_domid: u16, allocator: &mut dyn PageAllocator) -> Result<Box<dyn Sharer>, String>;
}

/// Why bring-up failed, naming what is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BringUpError {
    /// The device tree could not be read.
    DeviceTree(FactsError),
    /// No safe way to share memory (or to reach Trusty) on this platform.
    NoSafeSharing(DecisionError),
    /// Everything else, from the layers below.
    Stack(Error),
    /// The way to the Trusty VM could not be opened (the environment says why).
    TrustyVm(String),
    /// Failed after the sharing plan was made (the plan is what was tried).
    AfterPlan {
        /// The plan that was tried.
        plan: Box<SharingPlan>,
        /// What failed.
        error: Error,
    },
    /// The platform lacks a call the plan needs (Xen's FF-A mediator without FFA_RUN), found
    /// before any call to Trusty; or this build of the stack lacks the plan's transport (found
    /// before any call to Trusty) or mechanism (found once the API version is negotiated):
    /// [`Mechanisms`].
    Unusable {
        /// The plan that would have been used.
        plan: Box<SharingPlan>,
        /// What is missing.
        error: DecisionError,
    },
}

impl BringUpError {
    /// The plan that was being carried out, if bring-up got that far.
    pub fn plan(&self) -> Option<&SharingPlan> {
        match self {
            BringUpError::AfterPlan { plan, .. } | BringUpError::Unusable { plan, .. } => Some(&**plan),
            _ => None,
        }
    }
}

impl fmt::Display for BringUpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BringUpError::DeviceTree(e) => write!(f, "device tree: {e}"),
            BringUpError::NoSafeSharing(e) => write!(f, "{e}"),
            BringUpError::TrustyVm(e) => write!(f, "Trusty VM: {e}"),
            BringUpError::Unusable { plan, error } => {
                let transport = match plan.transport {
                    CallTransport::FfaDirect => "FF-A direct requests, standard calls run with FFA_RUN",
                    CallTransport::Smc => "Trusty SMCs",
                    CallTransport::XenMailbox { .. } => "a Xen mailbox",
                };
                write!(f, "{error}; cannot carry out: {plan}, transport: {transport}")
            }
            BringUpError::Stack(e) | BringUpError::AfterPlan { error: e, .. } => write!(f, "{e}"),
        }
    }
}

impl From<Error> for BringUpError {
    fn from(e: Error) -> Self {
        BringUpError::Stack(e)
    }
}

impl From<trusty_platform::Error> for BringUpError {
    fn from(e: trusty_platform::Error) -> Self {
        BringUpError::Stack(e.into())
    }
}

/// What bring-up learned and decided.
#[derive(Clone, Debug)]
pub struct BringUp {
    /// Trusty's version string; `None` when Trusty would not give it (the call is optional).
    pub version: Option<String>,
    /// The API version negotiated.
    pub api_version: u32,
    /// What the platform showed.
    pub facts: PlatformFacts,
    /// How memory is shared and calls are made.
    pub plan: SharingPlan,
}

/// The sharing mechanisms and call transports a build of the stack carries: one Cargo feature
/// of this crate each, all on by default. An image for a fixed platform leaves out what that
/// platform cannot have (the stack DomU image: FF-A direct requests, as no Xen it boots under
/// has an FF-A mediator), and the linker drops that code. Bring-up checks the plan against
/// [`Mechanisms::BUILT`] before carrying it out: a platform that needs what was left out gets
/// an error that names the feature ([`BringUpError::Unusable`]), never another mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mechanisms {
    /// Feature `ffa-handle`: FF-A memory handles ([`Mechanism::FfaHandle`]).
    pub ffa_handle: bool,
    /// Feature `ffa-direct`: FF-A direct requests ([`CallTransport::FfaDirect`]).
    pub ffa_direct: bool,
    /// Feature `xen-grant`: a Trusty VM ([`Mechanism::XenGrant`], [`CallTransport::XenMailbox`]).
    pub xen_grant: bool,
    /// Feature `phys`: addresses as ids ([`Mechanism::Phys`], [`Mechanism::PhysAttr`],
    /// [`Mechanism::MediatedIpa`]).
    pub phys: bool,
}

impl Mechanisms {
    /// What this build carries.
    pub const BUILT: Mechanisms = Mechanisms {
        ffa_handle: cfg!(feature = "ffa-handle"),
        ffa_direct: cfg!(feature = "ffa-direct"),
        xen_grant: cfg!(feature = "xen-grant"),
        phys: cfg!(feature = "phys"),
    };

    /// Everything (the default features).
    pub const ALL: Mechanisms = Mechanisms { ffa_handle: true, ffa_direct: true, xen_grant: true, phys: true };

    /// The mechanisms both sets carry.
    pub const fn and(self, other: Mechanisms) -> Mechanisms {
        Mechanisms {
            ffa_handle: self.ffa_handle && other.ffa_handle,
            ffa_direct: self.ffa_direct && other.ffa_direct,
            xen_grant: self.xen_grant && other.xen_grant,
            phys: self.phys && other.phys,
        }
    }

    /// What this set lacks for `transport`, in words, if anything.
    pub const fn lacks_transport(&self, transport: CallTransport) -> Option<&'static str> {
        match transport {
            CallTransport::FfaDirect if !self.ffa_direct => Some(LACKS_FFA_DIRECT),
            CallTransport::XenMailbox { .. } if !self.xen_grant => Some(LACKS_XEN_GRANT),
            _ => None,
        }
    }

    /// What this set lacks for `mechanism`, in words, if anything.
    pub const fn lacks_mechanism(&self, mechanism: Mechanism) -> Option<&'static str> {
        match mechanism {
            Mechanism::Phys | Mechanism::PhysAttr | Mechanism::MediatedIpa if !self.phys => Some(LACKS_PHYS),
            Mechanism::FfaHandle if !self.ffa_handle => Some(LACKS_FFA_HANDLE),
            Mechanism::XenGrant { .. } if !self.xen_grant => Some(LACKS_XEN_GRANT),
            _ => None,
        }
    }

    /// `Ok` if this set carries `plan`'s transport and mechanism; else an error that names the
    /// missing feature, with the plan's reason for needing it.
    pub fn check(&self, plan: &SharingPlan) -> Result<(), DecisionError> {
        match self.lacks_transport(plan.transport).or(self.lacks_mechanism(plan.mechanism)) {
            None => Ok(()),
            Some(missing) => Err(DecisionError { missing, because: plan.reason }),
        }
    }
}

const LACKS_FFA_HANDLE: &str = "FF-A memory sharing, left out of this build (trusty-stack feature `ffa-handle`)";
const LACKS_FFA_DIRECT: &str =
    "Trusty calls as FF-A direct requests, left out of this build (trusty-stack feature `ffa-direct`)";
const LACKS_XEN_GRANT: &str =
    "grants and the mailbox to a Trusty VM, left out of this build (trusty-stack feature `xen-grant`)";
const LACKS_PHYS: &str = "addresses as memory ids, left out of this build (trusty-stack feature `phys`)";

/// The transport the facts call for, before any call is made through it.
fn transport_for(facts: &PlatformFacts) -> Result<CallTransport, DecisionError> {
    use trusty_platform::plan::TrustyPath;
    Ok(match facts.trusty {
        TrustyPath::FfaMediator => CallTransport::FfaDirect,
        TrustyPath::XenVm { backend_domid, call_evtchn, kick_evtchn } => {
            CallTransport::XenMailbox { backend_domid, call_evtchn, kick_evtchn }
        }
        TrustyPath::Unreachable => return decide(&PlatformFacts { api_version: Some(0), ..*facts }).map(|p| p.transport),
        _ => CallTransport::Smc,
    })
}

/// The highest API version whose ids a mechanism can express.
fn api_ceiling_of(m: Mechanism) -> u32 {
    match m {
        Mechanism::Phys => api::SMP_NOP,
        Mechanism::PhysAttr | Mechanism::MediatedIpa => api::PHYS_MEM_OBJ,
        Mechanism::FfaHandle | Mechanism::XenGrant { .. } => api::MEM_OBJ,
    }
}

/// Brings the stack up on a platform: reads the facts, decides, and returns the online device.
pub fn bring_up_platform(mut p: PlatformAccess, cfg: StackConfig) -> Result<(TipcDevice, BringUp), BringUpError> {
    let dt = read_device_tree(&p.fdt).map_err(BringUpError::DeviceTree)?;
    let mut facts = {
        let mut probes = CallProbes { conduit: &*p.conduit, xen_features: &mut *p.xen_features };
        gather(&dt, &mut probes)
    };
    // Under Xen's FF-A mediator, what it forwards decides before any call to Trusty is made:
    // without FFA_RUN its FF-A transport cannot run a standard call, and nothing else is tried.
    if let Err(error) = check_mediator(&facts) {
        let would_use = decide(&PlatformFacts {
            api_version: Some(api::MEM_OBJ),
            mediator: facts.mediator.map(|m| MediatorFacts { run: true, direct_req: true, mem_share: true, mem_reclaim: true, ..m }),
            ..facts
        });
        return Err(match would_use {
            Ok(plan) => BringUpError::Unusable { plan: Box::new(plan), error },
            Err(_) => BringUpError::NoSafeSharing(error),
        });
    }
    let transport = transport_for(&facts).map_err(BringUpError::NoSafeSharing)?;
    // A transport this build left out is refused before any call to Trusty; a mechanism once
    // the API version is negotiated (it may change the mechanism: addresses below API 5).
    let built = cfg.mechanisms.and(Mechanisms::BUILT);
    if let Some(missing) = built.lacks_transport(transport) {
        return Err(match decide(&PlatformFacts { api_version: Some(api_ceiling(&facts)), ..facts }) {
            Ok(plan) => {
                let error = DecisionError { missing, because: plan.reason };
                BringUpError::Unusable { plan: Box::new(plan), error }
            }
            Err(e) => BringUpError::NoSafeSharing(e),
        });
    }

    // The call conduit, and for the FF-A transport the FF-A endpoint it discovers through.
    // (Each arm only where the build carries it: the linker then leaves the rest out.)
    let mut ffa_sharer: Option<FfaSharer> = None;
    let mut grant_sharer: Option<Box<dyn Sharer>> = None;
    let calls: Arc<dyn Conduit> = match transport {
        CallTransport::Smc => p.conduit.clone(),
        CallTransport::FfaDirect if Mechanisms::BUILT.ffa_direct => {
            let sharer = FfaSharer::new(p.conduit.clone(), &mut *p.allocator, None)?;
            let part = discover(&*p.conduit, |out| sharer.read_rx(out))?;
            let own = sharer.own_id();
            ffa_sharer = Some(sharer);
            // FFA_INTERRUPT is followed for as long as one standard call may take.
            Arc::new(FfaCallConduit::new(p.conduit.clone(), own, part, p.clock.clone(), cfg.calls.std_call_timeout_ms))
        }
        CallTransport::XenMailbox { backend_domid, call_evtchn, kick_evtchn } if Mechanisms::BUILT.xen_grant => {
            let vm = TrustyVm { backend_domid, call_evtchn, kick_evtchn };
            let link = p.trusty_vm.as_mut().ok_or_else(|| {
                BringUpError::TrustyVm("this environment has no event channels or grants to reach a Trusty VM".into())
            })?;
            let link = link.connect(vm, &mut *p.allocator).map_err(BringUpError::TrustyVm)?;
            grant_sharer = Some(link.sharer);
            // SAFETY: the mailbox page stays allocated and granted for the life of the stack
            // (it is never released: the Trusty VM may map it at any time), and only the
            // conduit uses it (`VmLink::mailbox`).
            Arc::new(unsafe {
                MailboxConduit::new(link.mailbox, link.events, p.clock.clone(), link.call_port, cfg.mailbox_timeout_ms)
            })
        }
        // Refused above.
        CallTransport::FfaDirect | CallTransport::XenMailbox { .. } => {
            return Err(Error::Unsupported("a call transport left out of this build").into())
        }
    };

    let mut trusty = Trusty::new(calls, p.clock.clone(), cfg.calls);
    // Optional, as in Linux's trusty_init_version: a failure is logged and bring-up goes on.
    let version = trusty.version_string_or_log()?;
    let ceiling = cfg.force_mechanism.map_or(api_ceiling(&facts), |m| api_ceiling(&facts).min(api_ceiling_of(m)));
    let api_version = trusty.negotiate_api(ceiling)?;
    facts.api_version = Some(api_version);
    let mut plan = match (decide(&facts), cfg.force_mechanism) {
        (Ok(plan), _) => plan,
        (Err(e), None) => return Err(BringUpError::NoSafeSharing(e)),
        // A forced mechanism is run even where the decision refuses it: that is the point.
        (Err(_), Some(_)) => {
            sized(Mechanism::Phys, transport, None, "").map_err(|_| Error::Unsupported("no buffer pools"))?
        }
    };
    if let Some(forced) = cfg.force_mechanism {
        plan.mechanism = forced;
        plan.reason = "forced by --force-sharing, whatever the platform is";
    }
    if let Err(error) = built.check(&plan) {
        return Err(BringUpError::Unusable { plan: Box::new(plan), error });
    }

    match carry_out(p, plan, trusty, ffa_sharer, grant_sharer, api_version, cfg) {
        Ok(dev) => {
            log::info!("Trusty '{}', API {api_version}; {plan}", version.as_deref().unwrap_or("unknown"));
            Ok((dev, BringUp { version, api_version, facts, plan }))
        }
        Err(error) => Err(BringUpError::AfterPlan { plan: Box::new(plan), error }),
    }
}

/// Makes the plan's sharer, the bus and the device.
fn carry_out(
    mut p: PlatformAccess,
    plan: SharingPlan,
    trusty: Trusty,
    mut ffa_sharer: Option<FfaSharer>,
    mut grant_sharer: Option<Box<dyn Sharer>>,
    api_version: u32,
    cfg: StackConfig,
) -> Result<TipcDevice, Error> {
    // Each arm only where the build carries it (`Mechanisms::check` refused the rest), so the
    // linker leaves the other sharers out.
    let built = Mechanisms::BUILT;
    let sharer: Box<dyn Sharer> = match plan.mechanism {
        // The three address mechanisms differ only in how the sharer is made: one box for all.
        Mechanism::Phys | Mechanism::PhysAttr | Mechanism::MediatedIpa if built.phys => {
            let s = match plan.mechanism {
                Mechanism::Phys => AddressSharer::new(AddressKind::Bare),
                Mechanism::PhysAttr => AddressSharer::new(AddressKind::Compat),
                _ => AddressSharer::mediated(AddressKind::for_api(api_version)),
            };
            Box::new(s.with_budget(plan.share_budget))
        }
        Mechanism::FfaHandle if built.ffa_handle => {
            let mut s = match ffa_sharer.take() {
                Some(s) => s.with_budget(plan.share_budget),
                None => FfaSharer::new(p.conduit.clone(), &mut *p.allocator, plan.share_budget)?,
            };
            s.set_fragments(plan.fragmented_descriptors);
            s.set_read_only_shares(plan.read_only_shares);
            Box::new(s)
        }
        Mechanism::XenGrant { backend_domid } if built.xen_grant => match grant_sharer.take() {
            Some(s) => s,
            None => match p.trusty_vm.as_mut() {
                Some(link) => link.grant_sharer(backend_domid, &mut *p.allocator).map_err(|e| {
                    log::error!("no grant sharer: {e}");
                    Error::Unsupported("no grant sharer for a forced xen-grant decision")
                })?,
                None => return Err(Error::Unsupported("no grants on this platform")),
            },
        },
        _ => return Err(Error::Unsupported("a sharing mechanism left out of this build")),
    };
    let mem = SharedMemory::new(p.allocator, sharer);
    let bus = Bus::new(trusty, mem);
    let tipc = Config {
        rx_buffers: Some(plan.rx_buffers),
        tx_buffers: Some(plan.tx_buffers),
        rx_spare_buffers: plan.rx_spare_buffers,
        max_buffer_pages: plan.max_buffer_pages,
        ..cfg.tipc
    };
    TipcDevice::probe(bus, tipc)
}

/// Brings the stack up over a conduit known to reach Trusty directly with FF-A memory sharing
/// (no device tree): the simple path of a native API-5 platform.
pub fn bring_up(
    conduit: Arc<dyn Conduit>,
    clock: Arc<dyn Clock>,
    mut allocator: Box<dyn PageAllocator>,
    cfg: StackConfig,
) -> Result<(TipcDevice, BringUp), Error> {
    if cfg.mechanisms.and(Mechanisms::BUILT).lacks_mechanism(Mechanism::FfaHandle).is_some() {
        return Err(Error::Unsupported("FF-A memory sharing is left out of this build (trusty-stack feature `ffa-handle`)"));
    }
    let mut trusty = Trusty::new(conduit.clone(), clock, cfg.calls);
    // Optional, as in Linux's trusty_init_version: a failure is logged and bring-up goes on.
    let version = trusty.version_string_or_log()?;
    let api_version = trusty.negotiate_api(api::CURRENT)?;
    if api_version < api::MEM_OBJ {
        return Err(Error::Unsupported("Trusty API version below 5 needs the platform's device tree (bring_up_platform)"));
    }
    let sharer = FfaSharer::new(conduit, &mut *allocator, None)?;
    let facts = PlatformFacts {
        hypervisor: trusty_platform::plan::Hypervisor::None,
        address_map: trusty_platform::plan::AddressMap::Physical,
        trusty: trusty_platform::plan::TrustyPath::FfaNative,
        ffa_available: true,
        grant_table: false,
        api_version: Some(api_version),
        mediator: None,
    };
    let plan = decide(&facts).map_err(|_| Error::Unsupported("no plan for a native FF-A platform"))?;
    let mem = SharedMemory::new(allocator, Box::new(sharer));
    let bus = Bus::new(trusty, mem);
    let dev = TipcDevice::probe(bus, cfg.tipc)?;
    Ok((dev, BringUp { version, api_version, facts, plan }))
}
