//! The secure side as one state machine behind an SMC entry point: Trusty's fast / standard /
//! NOP call semantics (spec §2), the virtio bus (spec §5) with its TIPC device, an FF-A
//! memory-sharing stand-in for the SPMC (spec §3.3), and fault injection.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use tipc::wire::Ctrl;
use trusty_platform::clock::Clock;
use trusty_platform::ffa::{self, func};
use trusty_platform::smc::{call, fid, SmError};
use trusty_virtio::rsc;

use crate::ipc::{lk, Ipc};
use crate::mem::{Fault, IdScheme, PhysMem, ShareStats, ShareTable};
use crate::tipc_dev::{Malformed, TipcDev, TipcDevStats};
use crate::xen_ffa::{self, XenFfa};

/// What stands between the normal world and Trusty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Trusty's SMCs reach it (no hypervisor, or one that forwards them untouched).
    Direct,
    /// Xen's FF-A mediator ([`ModelConfig::xen_ffa`] says which Xen): plain Trusty SMCs are
    /// refused with FFA_ERROR(NOT_SUPPORTED); the FF-A calls Xen handles pass, with the guest's
    /// addresses in MEM_SHARE and RXTX_MAP translated, read-write single-fragment shares only
    /// (spec dma-decisions §4.3, xen-ffa-mediator.md §4.3; the rules are in [`crate::xen_ffa`]).
    XenFfaMediator,
    /// An NXP-style Trusty mediator: Trusty's SMCs pass and the guest addresses they carry are
    /// translated, first page only (spec dma-decisions §4.4). FF-A calls are not forwarded.
    TrustyMediator,
    /// Trusty is Xen domain `domid`, reached through a mailbox and event channels; it maps only
    /// what the guest grants it. SMCs from the guest go nowhere.
    XenVm {
        /// Trusty's domain.
        domid: u16,
    },
    /// Xen without a mediator: every Trusty and FF-A call is refused.
    XenNoPath,
}

/// Which Trusty tree the model follows where trees differ (README: fidelity table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// Upstream trusty/kernel (lib/trusty/trusty_virtio.c with one virtio bus per client:
    /// `virtio_get_description` creates the bus, a second GET_DESCR while it exists is
    /// ERR_NOT_ALLOWED, `virtio_stop` resets every device and removes the bus).
    #[default]
    Upstream,
    /// NXP's tree for Android in a Xen DomU (spec TK-NXP, §5.6): one bus for good; GET_DESCR on
    /// an active bus stops it first, so a guest that rebooted without VIRTIO_STOP can bring the
    /// bus up again; vring consumer indices start from 0 at every probe.
    Nxp,
}

impl Variant {
    /// `upstream` or `nxp`.
    pub fn from_name(name: &str) -> Option<Variant> {
        match name {
            "upstream" => Some(Variant::Upstream),
            "nxp" => Some(Variant::Nxp),
            _ => None,
        }
    }

    /// `upstream` or `nxp`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Upstream => "upstream",
            Variant::Nxp => "nxp",
        }
    }

    /// Both variants, upstream first.
    pub const ALL: [Variant; 2] = [Variant::Upstream, Variant::Nxp];
}

/// What kind of Trusty the model is.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// What stands between the normal world and Trusty.
    pub path: Path,
    /// Highest API version it speaks (spec §2.4).
    pub max_api_version: u32,
    /// The version string it reports.
    pub version: String,
    /// Whether an FF-A SPMC answers FF-A calls (memory sharing by handle).
    pub ffa: bool,
    /// The normal world's FF-A endpoint id (FFA_ID_GET).
    pub ns_endpoint_id: u16,
    /// At most this many live shares (Xen's FF-A mediator allows 32 per guest).
    pub share_cap: Option<usize>,
    /// The TIPC device name in the descriptor.
    pub dev_name: String,
    /// Entries per vring.
    pub ring_size: u32,
    /// Threaded mode: NOPs and kicks return before the work they asked for is done; the
    /// owner runs [`Model::run_background`] on its own thread.
    pub deferred: bool,
    /// Upstream Trusty, or NXP's patched tree.
    pub variant: Variant,
    /// Serve these bytes from GET_DESCR instead of the default table (to test parsers).
    pub descriptor_override: Option<Vec<u8>>,
    /// XENVER_get_features submap 0 as the simulated hypervisor answers it (None: no Xen).
    pub xen_features: Option<u32>,
    /// Whether SMC_FC_GET_VERSION_STR exists (`false`: answered SM_ERR_UNDEFINED_SMC, as by a
    /// Trusty whose fast-call table has no entry for it, lib/sm/smcall.c `smc_undefined`).
    pub has_version_str: bool,
    /// Trusty before 2019: GET_DESCR/START/STOP decode their memory argument with
    /// `smc32_decode_mem_buf_info` -> `sm_decode_ns_memory_attr` (lib/sm/ns_mem.c) whatever the
    /// API version, so a bare address (attribute 0) is ERR_NOT_SUPPORTED, and
    /// `get_ns_mem_buf` (lib/trusty/smcall.c) refuses read-only or EL0 memory (ERR_INVALID_ARGS).
    pub mem_buf_attrs_required: bool,
    /// Which Xen's FF-A mediator [`Path::XenFfaMediator`] stands for.
    pub xen_ffa: XenFfa,
    /// What the SPMC stand-in answers FFA_VERSION (1.0 by default; the EL3 image answers 1.1,
    /// the least Xen's FF-A mediator accepts from an SPMC). Its descriptors stay the 1.0 layout.
    pub spmc_ffa_version: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: Path::Direct,
            xen_features: None,
            max_api_version: 5,
            version: String::from("Trusty model (trusty-ipc-stack) 1.0"),
            ffa: true,
            ns_endpoint_id: 0,
            share_cap: None,
            dev_name: String::from("dev0"),
            ring_size: 32,
            deferred: false,
            variant: Variant::Upstream,
            descriptor_override: None,
            has_version_str: true,
            mem_buf_attrs_required: false,
            xen_ffa: XenFfa::Newer,
            spmc_ffa_version: ffa::VERSION_1_0,
        }
    }
}

/// Fault-injection switches. Counts are consumed one per event.
#[derive(Clone, Debug, Default)]
pub struct Injection {
    /// Answer the next N standard calls with SM_ERR_BUSY.
    pub busy: u32,
    /// Answer the next N standard calls with SM_ERR_INTERRUPTED (finished by RESTART_LAST).
    pub interrupted: u32,
    /// Answer the next N standard calls with SM_ERR_FIQ_INTERRUPTED (finished by RESTART_FIQ).
    pub fiq_interrupted: u32,
    /// The next N standard calls do not finish before the CPU idles: SM_ERR_CPU_IDLE at API >= 2
    /// (finished by RESTART_LAST after a NOP); below API 2 SM_ERR_INTERRUPTED, then SM_ERR_BUSY
    /// to the first RESTART_LAST, then the result (Trusty `sm_get_stdcall_ret`).
    pub cpu_idle: u32,
    /// Answer the next N NOPs with SM_ERR_NOP_INTERRUPTED.
    pub nop_interrupted: u32,
    /// Trusty panics at the next call: every call from then on answers SM_ERR_PANIC.
    pub panic: bool,
    /// Answer every standard call and NOP with SM_ERR_BUSY (a wedged secure side).
    pub always_busy: bool,
    /// Trusty VM slower than the guest's mailbox timeout (descheduled by Xen, say): the next
    /// `mailbox_slow_std_calls` standard calls taken from the mailbox are executed at once but
    /// answered `mailbox_delay_ms` later. Not a Trusty behaviour: a test of the transport.
    pub mailbox_slow_std_calls: u32,
    /// How late those calls are answered.
    pub mailbox_delay_ms: u64,
    /// A hung Trusty VM: requests are seen (and counted) but never executed or answered.
    pub mailbox_silent: bool,
    /// Answer the next N FF-A direct requests and FFA_RUNs with FFA_INTERRUPT (u32::MAX:
    /// forever), as an SPMC does when a normal-world interrupt preempts the partition (FF-A
    /// 1.1 §8.3 "FFA_INTERRUPT"); an interrupted direct request is finished by a later FFA_RUN,
    /// which returns its FFA_MSG_SEND_DIRECT_RESP.
    pub ffa_interrupt: u32,
}

/// Counters of the whole model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Every call that reached the model.
    pub smcs: u64,
    /// Calls with Trusty's own function ids (not FF-A).
    pub plain_trusty_smcs: u64,
    /// FF-A calls.
    pub ffa_calls: u64,
    /// Fast calls.
    pub fast_calls: u64,
    /// Standard calls.
    pub std_calls: u64,
    /// NOP calls.
    pub nops: u64,
    /// Vring kicks.
    pub kicks: u64,
    /// Trusty SMCs the hypervisor refused before they reached Trusty.
    pub refused_smcs: u64,
    /// FFA_MEM_SHAREs Xen's mediator refused before forwarding them (read-only, too large...).
    pub xen_ffa_refused_shares: u64,
    /// Calls that arrived as FF-A direct requests.
    pub ffa_direct_requests: u64,
    /// Calls that arrived through the Xen mailbox.
    pub mailbox_calls: u64,
    /// Mailbox requests a hung VM (`Injection::mailbox_silent`) saw and never answered.
    pub mailbox_unanswered: u64,
    /// Share counters.
    pub shares: ShareStats,
    /// TIPC device counters.
    pub tipc: TipcDevStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StdState {
    Idle,
    /// Preempted: the result waits for RESTART_LAST.
    Interrupted(i32),
    /// Preempted by a FIQ: RESTART_FIQ must come next.
    Fiq(i32),
    /// Blocked: waits for a NOP, then RESTART_LAST.
    CpuIdle { result: i32, nop_seen: bool },
    /// Not finished when the CPU went back to the normal world, for a client below API 2
    /// (`sm_get_stdcall_ret`: INTERRUPTED the first time, BUSY after a restart): each
    /// RESTART_LAST gives it time; `busy_left` more restarts find it unfinished.
    Unfinished { result: i32, busy_left: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BusState {
    /// Upstream: no bus for the client (before GET_DESCR, after STOP). NXP: registry not frozen.
    Uninitialized,
    Idle,
    Active,
}

/// The secure side.
pub struct Model {
    cfg: ModelConfig,
    clock: Arc<dyn Clock>,
    shares: ShareTable,
    ipc: Ipc,
    tipc: TipcDev,
    descriptor: Vec<u8>,
    bus: BusState,
    client_id: u64,
    api: u32,
    api_locked: bool,
    std: StdState,
    panicked: bool,
    /// A kick arrived: there is ring work for `run_background` (threaded mode).
    work_pending: bool,
    /// FF-A transport: the queued standard call, and its result once FFA_RUN ran it.
    queued_std: Option<(u32, [u32; 3])>,
    queued_result: Option<i32>,
    /// A Trusty VM's mapping of the guest's mailbox page.
    mailbox: Option<crate::mem::Mapping>,
    /// The grant reference of the guest's mailbox page: `MAILBOX_GREF` unless a rendezvous
    /// named another (`set_mailbox_gref`).
    mailbox_gref: u32,
    /// The last request a hung VM saw (so each is counted once).
    mailbox_seen: u32,
    /// The answer of a direct request preempted by FFA_INTERRUPT, returned by the next FFA_RUN.
    ffa_resumed: Option<[u64; 8]>,
    /// The FF-A version the guest gave Xen's mediator in FFA_VERSION (`None`: not yet).
    xen_ffa_guest_version: Option<u32>,
    /// Misbehaviour to inject.
    pub inject: Injection,
    stats: ModelStats,
}

fn ret(w0: i32) -> [u64; 8] {
    [w0 as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
}

fn ffa_success(w2: u64, w3: u64) -> [u64; 8] {
    [u64::from(func::SUCCESS), 0, w2, w3, 0, 0, 0, 0]
}

fn ffa_error(code: i32) -> [u64; 8] {
    [u64::from(func::ERROR), 0, code as u32 as u64, 0, 0, 0, 0, 0]
}

/// Trusty's translation of LK errors for the TRUSTED_OS entity (spec §2.3).
fn lk_to_sm(e: i32) -> i32 {
    match e {
        0.. => e,
        lk::ERR_INVALID_ARGS => SmError::InvalidParameters.code(),
        lk::ERR_NOT_SUPPORTED => SmError::NotSupported.code(),
        lk::ERR_NOT_ALLOWED => SmError::NotAllowed.code(),
        _ => SmError::InternalFailure.code(),
    }
}

impl Model {
    /// A model of Trusty that sees normal-world RAM as `phys` (only through shares) and the
    /// ipc-unittest services of spec §9.2.
    pub fn new(cfg: ModelConfig, phys: Arc<dyn PhysMem>, clock: Arc<dyn Clock>) -> Self {
        let descriptor = Self::build_descriptor(&cfg);
        let mut shares = ShareTable::new(phys, cfg.share_cap);
        shares.set_mediators(cfg.path == Path::TrustyMediator, cfg.path == Path::XenFfaMediator);
        if let Path::XenVm { domid } = cfg.path {
            shares.set_scheme(IdScheme::Grant { domid });
        }
        let mut ipc = Ipc::with_unittest_services();
        ipc.set_clock(clock.clone());
        Model {
            shares,
            ipc,
            tipc: TipcDev::new(0),
            descriptor,
            bus: BusState::Uninitialized,
            client_id: 0,
            api: 0,
            api_locked: false,
            std: StdState::Idle,
            panicked: false,
            work_pending: false,
            queued_std: None,
            queued_result: None,
            mailbox: None,
            mailbox_gref: trusty_platform::mailbox::MAILBOX_GREF,
            mailbox_seen: 0,
            ffa_resumed: None,
            xen_ffa_guest_version: None,
            inject: Injection::default(),
            stats: ModelStats::default(),
            cfg,
            clock,
        }
    }

    fn build_descriptor(cfg: &ModelConfig) -> Vec<u8> {
        if let Some(d) = &cfg.descriptor_override {
            return d.clone();
        }
        let rings = [
            rsc::VringDecl { align: 4096, num: cfg.ring_size, notifyid: 1 },
            rsc::VringDecl { align: 4096, num: cfg.ring_size, notifyid: 2 },
        ];
        rsc::TableBuilder::new()
            .vdev(rsc::VIRTIO_ID_TIPC, 0, &rings, &rsc::tipc_config(4096, 4096, &cfg.dev_name))
            .build()
    }

    /// What kind of Trusty it is.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The counters so far.
    pub fn stats(&self) -> ModelStats {
        let mut s = self.stats;
        s.shares = self.shares.stats();
        s.tipc = self.tipc.stats();
        s
    }

    /// Accesses to memory that was never shared (each one fails the run).
    pub fn faults(&self) -> &[Fault] {
        self.shares.faults()
    }

    /// Trusty has panicked.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// The IPC core, for tests that look at the services.
    pub fn ipc(&self) -> &Ipc {
        &self.ipc
    }

    /// Normal-world channels the TIPC device has open (each one a TA-side channel).
    pub fn open_endpoints(&self) -> usize {
        self.tipc.open_endpoints()
    }

    /// Live FF-A shares.
    pub fn live_shares(&self) -> usize {
        self.shares.live()
    }

    /// Whether the normal world's FF-A RX/TX pair is mapped.
    pub fn rxtx_mapped(&self) -> bool {
        self.shares.rxtx_mapped()
    }

    /// The guest told the (simulated) hypervisor where its grant table is.
    pub fn set_grant_table(&mut self, ipa: u64, entries: u32) {
        self.shares.set_grant_table(ipa, entries);
    }

    /// A Trusty VM on real Xen maps grants with hypercalls.
    pub fn set_grant_mapper(&mut self, mapper: alloc::boxed::Box<dyn crate::mem::GrantMapper>) {
        self.shares.set_grant_mapper(mapper);
    }

    /// Deny the next `n` reclaims, as if the memory were still mapped.
    pub fn deny_reclaims(&mut self, n: u32) {
        self.shares.deny_reclaims = n;
    }

    /// Drop the next `n` data messages from the normal world (negative used length).
    pub fn drop_messages(&mut self, n: u32) {
        self.tipc.inject.drop_messages = n;
    }

    /// Device-side switches: dropped messages, swallowed connects, a stalled ring.
    pub fn tipc_injection(&mut self) -> &mut crate::tipc_dev::TipcInjection {
        self.work_pending = true;
        &mut self.tipc.inject
    }

    /// Send a broken frame to the normal world at the next opportunity.
    pub fn send_malformed(&mut self, kind: Malformed) {
        self.tipc.queue_malformed(kind);
        self.work_pending = true;
    }

    /// Send GO_OFFLINE (current Trusty never does; the normal world must handle it).
    pub fn send_go_offline(&mut self) {
        self.tipc.queue_ctrl(Ctrl::GoOffline);
        self.work_pending = true;
    }

    /// Whether FF-A calls from the guest reach an SPMC.
    fn ffa_reachable(&self) -> bool {
        match self.cfg.path {
            Path::Direct => self.cfg.ffa,
            Path::XenFfaMediator => true,
            Path::TrustyMediator | Path::XenVm { .. } | Path::XenNoPath => false,
        }
    }

    /// The secure monitor's entry point: one SMC from the normal world with x0..x7, as it
    /// arrives after whatever hypervisor stands in between.
    #[inline(always)]
    pub fn smc(&mut self, regs: [u64; 8]) -> [u64; 8] {
        self.stats.smcs += 1;
        let f = regs[0] as u32;
        if self.cfg.path == Path::XenFfaMediator {
            return self.xen_ffa_mediator(regs);
        }
        // FF-A calls go to the SPMC stand-in, which is not Trusty (entity 4, fast).
        if ffa::is_ffa_call(f) {
            if !self.ffa_reachable() {
                self.stats.refused_smcs += 1;
                return ret(-1);
            }
            self.stats.ffa_calls += 1;
            return self.ffa_call(f, &regs);
        }
        if !matches!(self.cfg.path, Path::Direct | Path::TrustyMediator) {
            // Xen answers Trusted-OS calls it has no mediator for with SMCCC NOT_SUPPORTED
            // (spec dma-decisions §4.1, §4.3).
            self.stats.refused_smcs += 1;
            return ret(-1);
        }
        self.trusty_call(regs)
    }

    /// Xen's FF-A mediator in front of the SPMC, as the DomU meets it (`ffa_handle_call()` in
    /// xen/arch/arm/tee/ffa.c; version differences in [`XenFfa`]).
    fn xen_ffa_mediator(&mut self, regs: [u64; 8]) -> [u64; 8] {
        let xen = self.cfg.xen_ffa;
        let f = regs[0] as u32;
        // vsmc hands the Trusted-OS ranges to the mediator as well; what ffa_handle_call() does
        // not handle is "unhandled fid": FFA_ERROR(NOT_SUPPORTED), x0 = 0x84000060, not -1.
        if !ffa::is_ffa_call(f) || !xen.handles(f) {
            self.stats.refused_smcs += 1;
            return xen_ffa::error(ffa::err::NOT_SUPPORTED);
        }
        // The development branch serves nothing before the guest's FFA_VERSION.
        if xen == XenFfa::Newer && self.xen_ffa_guest_version.is_none() && f != func::VERSION {
            self.stats.refused_smcs += 1;
            return xen_ffa::error(ffa::err::NOT_SUPPORTED);
        }
        self.stats.ffa_calls += 1;
        match f {
            // ffa_handle_version(): Xen answers with its own version and remembers the guest's.
            func::VERSION => {
                self.xen_ffa_guest_version = Some(regs[1] as u32);
                ret(xen.version() as i32)
            }
            // ffa_handle_features(): Xen's own table.
            func::FEATURES => {
                if xen.feature(regs[1] as u32, Self::spmc_has) {
                    ffa_success(0, 0)
                } else {
                    xen_ffa::error(ffa::err::NOT_SUPPORTED)
                }
            }
            // handle_msg_send_direct_req(): the sender must be the guest itself.
            func::MSG_SEND_DIRECT_REQ => {
                if (regs[1] >> 16) as u16 != self.cfg.ns_endpoint_id || regs[1] & 0x8000 == 0 {
                    return xen_ffa::error(ffa::err::INVALID_PARAMETERS);
                }
                let out = self.ffa_call(f, &regs);
                xen.direct_answer(out)
            }
            func::MEM_SHARE => {
                let mut desc = alloc::vec![0u8; (regs[2] as usize).min(trusty_platform::mem::PAGE_SIZE)];
                if !self.shares.peek_tx(&mut desc) {
                    return xen_ffa::error(ffa::err::DENIED);
                }
                match xen.check_mem_share(&regs, &desc, self.cfg.ns_endpoint_id, self.shares.live()) {
                    Ok(()) => self.ffa_call(f, &regs),
                    Err(code) => {
                        self.stats.xen_ffa_refused_shares += 1;
                        xen_ffa::error(code)
                    }
                }
            }
            _ => self.ffa_call(f, &regs),
        }
    }

    /// The model SPMC's FFA_FEATURES table.
    fn spmc_has(fid: u32) -> bool {
        matches!(
            fid,
            func::VERSION
                | func::FEATURES
                | func::ID_GET
                | func::RXTX_MAP64
                | func::RXTX_UNMAP
                | func::RX_RELEASE
                | func::PARTITION_INFO_GET
                | func::MSG_SEND_DIRECT_REQ
                | func::RUN
                | func::MEM_SHARE
                | func::MEM_FRAG_TX
                | func::MEM_RECLAIM
        )
    }

    /// A Trusty VM's entry point: one call taken from the mailbox (the guest's SMC registers).
    pub fn mailbox_call(&mut self, regs: [u64; 8]) -> [u64; 8] {
        self.stats.mailbox_calls += 1;
        self.trusty_call(regs)
    }

    /// A Trusty VM told where the guest's mailbox is (a guest that picks its grant references
    /// itself names it through the rendezvous page, `trusty_platform::xen::rendezvous`): from
    /// now on the mailbox is the page granted with reference `gref`, not `MAILBOX_GREF`.
    /// Returns whether that page can be mapped now; a mapping of the previous one is dropped.
    pub fn set_mailbox_gref(&mut self, gref: u32) -> bool {
        self.mailbox = None;
        self.mailbox_gref = gref;
        self.mailbox_seen = 0;
        self.map_mailbox().map(|m| self.mailbox = Some(m)).is_some()
    }

    /// The guest's mailbox page, mapped read-write through its grant (quietly: a guest that
    /// has not granted it yet is not a fault).
    fn map_mailbox(&mut self) -> Option<crate::mem::Mapping> {
        let id = trusty_platform::xen::grant::grant_id(self.mailbox_gref);
        self.shares.try_map(id, trusty_platform::mem::PAGE_SIZE, true, "Trusty VM mailbox")
    }

    /// A Trusty VM woken on its call event channel: takes the request from the mailbox page the
    /// guest granted it (reference `MAILBOX_GREF`, or the one `set_mailbox_gref` named), runs
    /// it, and answers in the same page. Returns whether a request was served.
    pub fn serve_mailbox(&mut self) -> bool {
        use trusty_platform::mailbox as mb;
        let Path::XenVm { .. } = self.cfg.path else { return false };
        // The mailbox stays mapped once the guest has granted it (it never takes it back).
        let m = match self.mailbox.take() {
            Some(m) => m,
            None => match self.map_mailbox() {
                Some(m) => m,
                None => return false,
            },
        };
        let mut word = [0u8; 4];
        let read_u32 = |m: &crate::mem::Mapping, off: usize, w: &mut [u8; 4]| -> u32 {
            if m.read(off, w) {
                u32::from_le_bytes(*w)
            } else {
                0
            }
        };
        let magic = read_u32(&m, mb::OFF_MAGIC, &mut word);
        let req = read_u32(&m, mb::OFF_REQ_SEQ, &mut word);
        let rsp = read_u32(&m, mb::OFF_RSP_SEQ, &mut word);
        let mut served = magic == mb::MAILBOX_MAGIC && req != rsp;
        if served && self.inject.mailbox_silent {
            if req != self.mailbox_seen {
                self.mailbox_seen = req;
                self.stats.mailbox_unanswered += 1;
            }
            served = false;
        }
        if served {
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let mut raw = [0u8; 64];
            let mut regs = [0u64; 8];
            if m.read(mb::OFF_REQUEST, &mut raw) {
                for (i, r) in regs.iter_mut().enumerate() {
                    *r = u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
                }
            }
            let out = self.mailbox_call(regs);
            let std_call = !fid::is_fast(regs[0] as u32) && regs[0] as u32 != call::SC_NOP;
            if std_call && self.inject.mailbox_slow_std_calls > 0 {
                self.inject.mailbox_slow_std_calls -= 1;
                self.clock.sleep_ns(self.inject.mailbox_delay_ms.saturating_mul(1_000_000));
            }
            for (i, r) in out.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&r.to_le_bytes());
            }
            m.write(mb::OFF_RESPONSE, &raw);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
            m.write(mb::OFF_RSP_SEQ, &req.to_le_bytes());
        }
        self.mailbox = Some(m);
        served
    }

    /// Trusty's own dispatcher (spec §2): fast, standard and NOP calls. Follows lib/sm/sm.c
    /// sm_return_and_wait_for_next_stdcall() (NOPs go to sm_nopcall_table, everything else to
    /// sm_queue_stdcall()) and sm_sched_nonsecure_fiq_loop() (fast calls answered at once;
    /// after platform_halt() every call answers SM_ERR_PANIC).
    #[inline(always)]
    fn trusty_call(&mut self, regs: [u64; 8]) -> [u64; 8] {
        let f = regs[0] as u32;
        self.stats.plain_trusty_smcs += 1;
        if self.inject.panic {
            self.panicked = true;
        }
        if self.panicked {
            return ret(SmError::Panic.code());
        }
        let a = [regs[1] as u32, regs[2] as u32, regs[3] as u32];
        if fid::is_fast(f) {
            self.stats.fast_calls += 1;
            return ret(self.fast_call(f, a));
        }
        let r = match f {
            call::SC_RESTART_LAST => self.restart_last(),
            // lib/sm/sm.c sm_handle_fiq(): FIQ_INTERRUPTED waits for RESTART_FIQ.
            call::SC_RESTART_FIQ => match self.std {
                StdState::Fiq(r) => {
                    self.std = StdState::Idle;
                    r
                }
                _ => SmError::UnexpectedRestart.code(),
            },
            call::SC_NOP => self.nop(a),
            _ => self.std_entry(f, a, regs[7]),
        };
        ret(r)
    }

    /// lib/sm/smcall.c smc_get_version_str() (length at index -1, then one character per
    /// call) and lib/sm/sm.c smc_sm_api_version() (min of asked and supported, unless
    /// sm_get_api_version() has locked it).
    fn fast_call(&mut self, f: u32, a: [u32; 3]) -> i32 {
        match f {
            call::FC_GET_VERSION_STR if !self.cfg.has_version_str => SmError::UndefinedSmc.code(),
            call::FC_GET_VERSION_STR => {
                let v = self.cfg.version.as_bytes();
                match a[0] {
                    u32::MAX => v.len() as i32,
                    i => v.get(i as usize).map_or(SmError::InvalidParameters.code(), |&c| i32::from(c)),
                }
            }
            call::FC_API_VERSION => {
                let wanted = a[0].min(self.cfg.max_api_version);
                // Once features of a version are in use it is locked (spec §2.4): smc_sm_api_version()
                // then answers the locked version to any request, higher or lower.
                if !self.api_locked {
                    self.api = wanted;
                    self.update_scheme();
                }
                self.api as i32
            }
            _ => SmError::UndefinedSmc.code(),
        }
    }

    /// Trusty reads memory ids by API version (spec §3.1); a VM peer reads grants.
    fn update_scheme(&mut self) {
        if matches!(self.cfg.path, Path::XenVm { .. }) {
            return;
        }
        self.shares.set_scheme(match self.api {
            5.. => IdScheme::FfaHandle,
            4 => IdScheme::Compat,
            _ => IdScheme::Bare,
        });
    }

    /// Trusty lib/sm/sm.c sm_queue_stdcall(): one standard call in flight; a fresh one while it
    /// is pending (or its result is not collected) is SM_ERR_BUSY. sm_handle_fiq(): anything but
    /// RESTART_FIQ after FIQ_INTERRUPTED is SM_ERR_INTERLEAVED_SMC.
    fn std_entry(&mut self, f: u32, a: [u32; 3], client: u64) -> i32 {
        if matches!(self.std, StdState::Fiq(_)) {
            return SmError::InterleavedSmc.code();
        }
        if self.std != StdState::Idle || self.inject.always_busy {
            return SmError::Busy.code();
        }
        if self.inject.busy > 0 {
            self.inject.busy -= 1;
            return SmError::Busy.code();
        }
        self.stats.std_calls += 1;
        let r = self.exec_std(f, a, client);
        if self.inject.interrupted > 0 {
            self.inject.interrupted -= 1;
            self.std = StdState::Interrupted(r);
            return SmError::Interrupted.code();
        }
        if self.inject.fiq_interrupted > 0 {
            self.inject.fiq_interrupted -= 1;
            self.std = StdState::Fiq(r);
            return SmError::FiqInterrupted.code();
        }
        if self.inject.cpu_idle > 0 {
            self.inject.cpu_idle -= 1;
            // Trusty lib/sm/sm.c sm_get_stdcall_ret(): a client at API >= 2 (SMP) is told
            // CPU_IDLE; an older one INTERRUPTED while restart_count is 0.
            if self.api >= 2 {
                self.std = StdState::CpuIdle { result: r, nop_seen: false };
                return SmError::CpuIdle.code();
            }
            self.std = StdState::Unfinished { result: r, busy_left: 1 };
            return SmError::Interrupted.code();
        }
        r
    }

    /// Trusty lib/sm/sm.c sm_queue_stdcall(): RESTART_LAST with no call pending is
    /// UNEXPECTED_RESTART; with one pending it restarts it (restart_count++), and
    /// sm_get_stdcall_ret() answers its result once done.
    fn restart_last(&mut self) -> i32 {
        match self.std {
            StdState::Idle => SmError::UnexpectedRestart.code(),
            StdState::Fiq(_) => SmError::InterleavedSmc.code(),
            // sm_get_stdcall_ret(): unfinished, API < 2, restart_count > 0 -> SM_ERR_BUSY. The
            // call stays pending: the caller must restart it again, never re-issue it.
            StdState::Unfinished { result, busy_left } => {
                if busy_left > 0 {
                    self.std = StdState::Unfinished { result, busy_left: busy_left - 1 };
                    SmError::Busy.code()
                } else {
                    self.std = StdState::Idle;
                    result
                }
            }
            StdState::Interrupted(r) | StdState::CpuIdle { result: r, nop_seen: true } => {
                self.std = StdState::Idle;
                r
            }
            StdState::CpuIdle { nop_seen: false, .. } => SmError::CpuIdle.code(),
        }
    }

    /// SMC_SC_NOP: lib/sm/sm.c hands it to sm_nopcall_table[SMC_ENTITY(a0)]; a non-zero
    /// handler result is returned at once, otherwise Trusty runs (sm_wait_for_smcall()) and the
    /// CPU comes back with NOP_DONE when idle or NOP_INTERRUPTED on an interrupt
    /// (sm_irq_return_ns()).
    #[inline(always)]
    fn nop(&mut self, a: [u32; 3]) -> i32 {
        if matches!(self.std, StdState::Fiq(_)) {
            return SmError::InterleavedSmc.code();
        }
        if self.inject.always_busy {
            return SmError::Busy.code();
        }
        self.stats.nops += 1;
        if let StdState::CpuIdle { result, .. } = self.std {
            self.std = StdState::CpuIdle { result, nop_seen: true };
        }
        let r = self.nop_args(a[0], a[1], a[2]);
        if r != 0 {
            return r;
        }
        if !self.cfg.deferred {
            self.run_until_idle();
        }
        if self.inject.nop_interrupted > 0 {
            self.inject.nop_interrupted -= 1;
            return SmError::NopInterrupted.code();
        }
        SmError::NopDone.code()
    }

    /// The work a NOP carries: dispatched by the entity in a0 (spec §2.6); 0 when there is none.
    /// lib/trusty/smcall.c trusty_sm_nopcall(): SMC_NC_VDEV_KICK_VQ -> virtio_kick_vq(), any
    /// other Trusted-OS function ERR_NOT_SUPPORTED; an unregistered entity is
    /// SM_ERR_UNDEFINED_SMC.
    #[inline(always)]
    fn nop_args(&mut self, a0: u32, a1: u32, a2: u32) -> i32 {
        if a0 == 0 {
            0
        } else if fid::entity(a0) == fid::ENTITY_TRUSTED_OS && a0 == call::NC_VDEV_KICK_VQ {
            lk_to_sm(self.kick(a1, a2))
        } else if fid::entity(a0) == fid::ENTITY_TRUSTED_OS {
            SmError::NotSupported.code()
        } else {
            SmError::UndefinedSmc.code()
        }
    }

    fn exec_std(&mut self, f: u32, a: [u32; 3], client: u64) -> i32 {
        let id = u64::from(a[0]) | (u64::from(a[1]) << 32);
        if self.cfg.mem_buf_attrs_required
            && matches!(f, call::SC_VIRTIO_GET_DESCR | call::SC_VIRTIO_START | call::SC_VIRTIO_STOP)
        {
            if let Err(e) = Self::decode_mem_buf(id) {
                return lk_to_sm(e);
            }
        }
        let r = match f {
            call::SC_LOCKED_NOP => 0,
            call::SC_VIRTIO_GET_DESCR => self.get_descr(id, a[2], client),
            call::SC_VIRTIO_START => self.start(id, a[2], client),
            call::SC_VIRTIO_STOP => self.stop(client),
            call::SC_VDEV_RESET => self.vdev_reset(a[0]),
            call::SC_VDEV_KICK_VQ => self.kick(a[0], a[1]),
            // lib/trusty/smcall.c trusty_sm_stdcall(): an unknown Trusted-OS function is
            // ERR_NOT_SUPPORTED; lib/sm: an entity nobody registered is SM_ERR_UNDEFINED_SMC.
            _ if fid::entity(f) == fid::ENTITY_TRUSTED_OS => lk::ERR_NOT_SUPPORTED,
            _ => return SmError::UndefinedSmc.code(),
        };
        // Trusty runs its scheduler before a standard call returns.
        if !self.cfg.deferred {
            self.run_until_idle();
        }
        lk_to_sm(r)
    }

    // ----- virtio bus (spec §5.5, §5.6) ------------------------------------------------------

    /// Trusty before 2019 (lib/trusty/smcall.c `get_ns_mem_buf` over lib/sm/ns_mem.c
    /// `smc32_decode_mem_buf_info` / `sm_decode_ns_memory_attr`): the id must carry attributes
    /// of normal cached inner-shareable or uncached memory (MAIR 0 = device strongly-ordered,
    /// which a bare address reads as, is ERR_NOT_SUPPORTED), and the memory must be read-write
    /// and not EL0 (else ERR_INVALID_ARGS).
    fn decode_mem_buf(id: u64) -> Result<(), i32> {
        use trusty_platform::phys::{decode_compat, AP_EL0};
        match decode_compat(id) {
            Err(_) => Err(lk::ERR_NOT_SUPPORTED),
            Ok((_, true)) => Err(lk::ERR_INVALID_ARGS),
            Ok(_) if id & AP_EL0 != 0 => Err(lk::ERR_INVALID_ARGS),
            Ok(_) => Ok(()),
        }
    }

    /// Upstream lib/trusty/trusty_virtio.c virtio_get_description(): create_new_bus() for the
    /// caller's client id; if that client already has a bus the call is refused with
    /// ERR_NOT_ALLOWED ("may only call the VIRTIO_GET_DESCR once") and the bus is left as it
    /// is; a failed call removes the bus it created. finalize_vdev_registry() freezes the
    /// registry; a buffer smaller than the table is ERR_NOT_ENOUGH_BUFFER; the page is mapped,
    /// zeroed and filled, and every vdev records the client id.
    /// NXP: one bus for good, and an active bus is stopped first (the DomU-reboot patch).
    fn get_descr(&mut self, id: u64, size: u32, client: u64) -> i32 {
        // Decoding the buffer's id reads the API version, which locks it (sm_get_api_version()).
        self.api_locked = true;
        match self.cfg.variant {
            Variant::Upstream => {
                if self.bus != BusState::Uninitialized {
                    return lk::ERR_NOT_ALLOWED;
                }
            }
            Variant::Nxp => {
                if self.bus == BusState::Active {
                    self.reset_devices();
                }
            }
        }
        self.bus = BusState::Idle;
        let r = self.write_descriptor(id, size);
        if r < 0 && self.cfg.variant == Variant::Upstream {
            // remove_client_bus() on the error paths of virtio_get_description().
            self.bus = BusState::Uninitialized;
        }
        if r >= 0 {
            self.client_id = client;
        }
        r
    }

    fn write_descriptor(&mut self, id: u64, size: u32) -> i32 {
        let len = self.descriptor.len();
        if (size as usize) < len {
            return lk::ERR_NOT_ENOUGH_BUFFER;
        }
        let Some(m) = self.shares.map(id, size as usize, true, "virtio descriptor page") else {
            return lk::ERR_NOT_VALID;
        };
        let mut page = alloc::vec![0u8; size as usize];
        page[..len].copy_from_slice(&self.descriptor);
        let ok = m.write(0, &page);
        self.shares.unmap(m);
        if !ok {
            return lk::ERR_NOT_VALID;
        }
        len as i32
    }

    /// lib/trusty/trusty_virtio.c virtio_start(): no bus for the client is ERR_BAD_STATE (upstream
    /// keys buses by client id, so another client has none); a vdev recorded for another client
    /// is ERR_INVALID_ARGS (the single-bus tree, NXP); the bus must be IDLE (ERR_BAD_STATE);
    /// the size must be the descriptor's exactly (ERR_INVALID_ARGS); the normal world's copy is
    /// read into secure memory and each vdev probed on it, probe errors ignored; bus ACTIVE.
    fn start(&mut self, id: u64, size: u32, client: u64) -> i32 {
        if self.cfg.variant == Variant::Upstream && !self.has_bus(client) {
            return lk::ERR_BAD_STATE;
        }
        if client != self.client_id {
            return lk::ERR_INVALID_ARGS;
        }
        if self.bus != BusState::Idle {
            return lk::ERR_BAD_STATE;
        }
        if size as usize != self.descriptor.len() {
            return lk::ERR_INVALID_ARGS;
        }
        let Some(m) = self.shares.map(id, size as usize, false, "virtio descriptor page (START)") else {
            return lk::ERR_NOT_VALID;
        };
        let mut copy = alloc::vec![0u8; size as usize];
        let ok = m.read(0, &mut copy);
        self.shares.unmap(m);
        if !ok {
            return lk::ERR_NOT_VALID;
        }
        self.bus = BusState::Active;
        // Probe errors are ignored, as Trusty does (spec §5.5 step 6): the device stays in
        // reset and GO_ONLINE never comes.
        match rsc::parse(&copy) {
            Ok(vdevs) => {
                let devid = self.tipc.devid();
                for v in vdevs.iter().filter(|v| v.notifyid == devid) {
                    if let Err(e) = self.tipc.probe(v, &mut self.shares) {
                        log::warn!("TIPC probe failed: {e}");
                    }
                }
            }
            Err(e) => log::warn!("normal world's descriptor copy does not parse: {e}"),
        }
        self.work_pending = true;
        0
    }

    /// lib/trusty/trusty_virtio.c virtio_stop(): no bus is ERR_BAD_STATE; a vdev of another
    /// client is ERR_INVALID_ARGS; a bus that is not ACTIVE is removed all the same and the
    /// answer is ERR_BAD_STATE; otherwise every vdev is reset and (upstream) the bus removed, so
    /// the next GET_DESCR builds fresh devices. NXP: the bus goes back to IDLE.
    fn stop(&mut self, client: u64) -> i32 {
        if self.cfg.variant == Variant::Upstream && !self.has_bus(client) {
            return lk::ERR_BAD_STATE;
        }
        if client != self.client_id {
            return lk::ERR_INVALID_ARGS;
        }
        let was_active = self.bus == BusState::Active;
        if was_active {
            self.reset_devices();
        }
        match (self.cfg.variant, was_active) {
            (Variant::Upstream, active) => {
                self.bus = BusState::Uninitialized;
                if active {
                    0
                } else {
                    lk::ERR_BAD_STATE
                }
            }
            (Variant::Nxp, true) => {
                self.bus = BusState::Idle;
                0
            }
            (Variant::Nxp, false) => lk::ERR_BAD_STATE,
        }
    }

    /// Upstream get_client_bus(): whether `client` has a bus (the model serves one client).
    fn has_bus(&self, client: u64) -> bool {
        self.bus != BusState::Uninitialized && client == self.client_id
    }

    /// tipc_virtio_dev.c tipc_dev_reset() through the vdev's reset op: channels closed without
    /// a word to the normal world, threads stopped, vrings unmapped, device in RESET.
    fn reset_devices(&mut self) {
        let now = self.clock.now_ns();
        self.tipc.reset(&mut self.shares, &mut self.ipc, now);
    }

    /// lib/trusty/trusty_virtio.c virtio_device_reset(): the bus must be ACTIVE
    /// (ERR_BAD_STATE), the device found by devid (ERR_NOT_FOUND); the bus stays ACTIVE.
    fn vdev_reset(&mut self, devid: u32) -> i32 {
        if self.bus != BusState::Active {
            return lk::ERR_BAD_STATE;
        }
        if devid != self.tipc.devid() {
            return lk::ERR_NOT_FOUND;
        }
        self.reset_devices();
        0
    }

    /// lib/trusty/trusty_virtio.c virtio_kick_vq() -> tipc_vdev_kick_vq(): bus ACTIVE
    /// (ERR_BAD_STATE), devid and vqid known (ERR_NOT_FOUND); the ring's thread is woken.
    #[inline(always)]
    fn kick(&mut self, devid: u32, vqid: u32) -> i32 {
        if self.bus != BusState::Active {
            return lk::ERR_BAD_STATE;
        }
        if devid != self.tipc.devid() || !self.tipc.has_vring(vqid) {
            return lk::ERR_NOT_FOUND;
        }
        self.stats.kicks += 1;
        self.work_pending = true;
        0
    }

    /// Runs Trusty until it idles: ring work, services, timers that are due.
    #[inline(always)]
    fn run_until_idle(&mut self) -> bool {
        // Time has moved on since the last call; the IPC core reads the clock only if a timer
        // is armed or an app asks for the time (time 0 below adds nothing: time never goes
        // backwards).
        self.ipc.time_passed();
        let now = 0;
        self.work_pending = false;
        if !self.tipc.active() {
            return self.ipc.run(now);
        }
        match self.tipc.run(&mut self.shares, &mut self.ipc, now) {
            Ok(any) => any,
            Err(e) => {
                // Trusty panics on these (spec §5.7); the model records the normal world's bug.
                self.shares.fault("vring", 0, alloc::format!("normal world broke the ring protocol: {e:?}"));
                self.panicked = true;
                true
            }
        }
    }

    /// Threaded mode: does the work that kicks and timers asked for. Returns whether anything
    /// happened.
    pub fn run_background(&mut self) -> bool {
        if self.panicked {
            return false;
        }
        self.run_until_idle()
    }

    /// Starts fetching the ring index lines the device reads first in a round (a polling
    /// thread calls it when a request arrives, before it takes the model's lock): the lines
    /// the normal world wrote then come in together, not one after the other.
    pub fn prefetch_rings(&self) {
        self.tipc.prefetch_rings();
    }

    /// Between calls, in [`ModelMode::Cores`]: the next frame to the normal world's lines taken
    /// for writing ahead ([`TipcDev::prepare_next_rx_write`]).
    pub fn prepare_next_rx_write(&mut self) {
        self.tipc.prepare_next_rx_write(&mut self.shares);
    }

    /// Whether a kick or a control message is waiting for [`Model::run_background`].
    pub fn has_pending_work(&self) -> bool {
        self.work_pending
    }

    /// When the next service timer fires (monotonic ns).
    pub fn next_deadline(&self) -> Option<u64> {
        self.ipc.next_deadline()
    }

    // ----- FF-A SPMC stand-in (spec §3.3) ----------------------------------------------------

    fn share_answer(&mut self, r: Result<Option<u64>, i32>) -> [u64; 8] {
        match r {
            Ok(Some(h)) => ffa_success(h & 0xFFFF_FFFF, h >> 32),
            // More fragments expected: FFA_MEM_FRAG_RX with the offset received so far.
            Ok(None) => [u64::from(func::MEM_FRAG_RX), 0, 0, self.shares.fragment_offset() as u64, 0, 0, 0, 0],
            Err(e) => ffa_error(e),
        }
    }

    /// Trusty's FF-A call transport (spec trusty-protocol §11): opcode in w3, arguments w4..w7.
    /// Written from the normal world's side of it (ACK drivers/trusty/trusty-ffa.c and
    /// ql-tipc's trusty_dev_common.c), not from a Trusty source: QUEUE_STDCALL while one is
    /// queued is BUSY as sm_queue_stdcall() answers.
    fn direct_request(&mut self, regs: &[u64; 8]) -> [u64; 8] {
        let receiver = regs[1] as u16;
        if receiver != ffa::TRUSTY_ENDPOINT_ID {
            return ffa_error(ffa::err::INVALID_PARAMETERS);
        }
        self.stats.ffa_direct_requests += 1;
        if self.inject.panic {
            self.panicked = true;
        }
        let w = [regs[4] as u32, regs[5] as u32, regs[6] as u32, regs[7] as u32];
        let client = u64::from(self.cfg.ns_endpoint_id);
        let answer: i32 = if self.panicked {
            SmError::Panic.code()
        } else {
            match regs[3] as u32 {
                trusty_platform::ffa_call::opcode::RUN_FASTCALL => {
                    self.stats.fast_calls += 1;
                    self.fast_call(w[0], [w[1], w[2], w[3]])
                }
                trusty_platform::ffa_call::opcode::QUEUE_STDCALL => {
                    if self.queued_std.is_some() || self.queued_result.is_some() {
                        SmError::Busy.code()
                    } else {
                        self.queued_std = Some((w[0], [w[1], w[2], w[3]]));
                        0
                    }
                }
                trusty_platform::ffa_call::opcode::GET_STDCALL_RET => match self.queued_result.take() {
                    Some(r) => r,
                    None if self.queued_std.is_some() => SmError::CpuIdle.code(),
                    None => SmError::UnexpectedRestart.code(),
                },
                trusty_platform::ffa_call::opcode::RUN_NOPCALL => {
                    let _ = client;
                    self.nop_args(w[0], w[1], w[2])
                }
                trusty_platform::ffa_call::opcode::IS_IDLE => i32::from(!self.work_pending || !self.cfg.deferred),
                _ => SmError::NotSupported.code(),
            }
        };
        [u64::from(func::MSG_SEND_DIRECT_RESP), (u64::from(ffa::TRUSTY_ENDPOINT_ID) << 16) | (regs[1] >> 16), 0, u64::from(answer as u32), 0, 0, 0, 0]
    }

    /// FFA_INTERRUPT injection (see [`Injection::ffa_interrupt`]) and the FFA_RUN that resumes
    /// a preempted direct request.
    fn ffa_preempt(&mut self, f: u32, regs: &[u64; 8]) -> Option<[u64; 8]> {
        if !matches!(f, func::MSG_SEND_DIRECT_REQ | func::RUN) {
            return None;
        }
        if f == func::MSG_SEND_DIRECT_REQ && self.ffa_resumed.is_some() {
            // The partition is still inside the preempted request.
            return Some(ffa_error(ffa::err::BUSY));
        }
        if self.inject.ffa_interrupt == 0 {
            return if f == func::RUN { self.ffa_resumed.take() } else { None };
        }
        if self.inject.ffa_interrupt != u32::MAX {
            self.inject.ffa_interrupt -= 1;
        }
        let vcpu = if f == func::RUN { regs[1] & 0xFFFF } else { 0 };
        if f == func::MSG_SEND_DIRECT_REQ {
            let out = self.direct_request(regs);
            self.ffa_resumed = Some(out);
        }
        Some([u64::from(func::INTERRUPT), (u64::from(ffa::TRUSTY_ENDPOINT_ID) << 16) | vcpu, 0, 0, 0, 0, 0, 0])
    }

    fn ffa_call(&mut self, f: u32, regs: &[u64; 8]) -> [u64; 8] {
        if !self.cfg.ffa {
            return ret(-1);
        }
        if let Some(out) = self.ffa_preempt(f, regs) {
            return out;
        }
        match f {
            func::VERSION => ret(self.cfg.spmc_ffa_version as i32),
            func::FEATURES => {
                if Self::spmc_has(regs[1] as u32) {
                    ffa_success(0, 0)
                } else {
                    ffa_error(ffa::err::NOT_SUPPORTED)
                }
            }
            func::ID_GET => ffa_success(u64::from(self.cfg.ns_endpoint_id), 0),
            func::RXTX_MAP64 => match self.shares.rxtx_map(regs[1], regs[2], regs[3]) {
                Ok(()) => ffa_success(0, 0),
                Err(e) => ffa_error(e),
            },
            func::RXTX_UNMAP => match self.shares.rxtx_unmap(regs[1], self.cfg.ns_endpoint_id) {
                Ok(()) => ffa_success(0, 0),
                Err(e) => ffa_error(e),
            },
            func::MEM_SHARE => {
                let r = self.shares.mem_share(regs[1], regs[2], self.cfg.ns_endpoint_id);
                self.share_answer(r)
            }
            func::MEM_FRAG_TX => {
                let r = self.shares.mem_frag_tx(regs[3]);
                self.share_answer(r)
            }
            func::PARTITION_INFO_GET => {
                let uuid = [regs[1], regs[2], regs[3], regs[4]].map(|w| w as u32);
                if uuid != trusty_platform::ffa_call::TRUSTY_UUID_WORDS {
                    return ffa_error(ffa::err::INVALID_PARAMETERS);
                }
                // Trusty: id 0x8000, one execution context, receives direct requests.
                let mut desc = [0u8; 8];
                desc[0..2].copy_from_slice(&ffa::TRUSTY_ENDPOINT_ID.to_le_bytes());
                desc[2..4].copy_from_slice(&1u16.to_le_bytes());
                desc[4..8].copy_from_slice(&trusty_platform::ffa_call::PARTITION_DIRECT_REQ_RECV.to_le_bytes());
                if !self.shares.write_rx(&desc) {
                    return ffa_error(ffa::err::BUSY);
                }
                ffa_success(1, 0)
            }
            func::RX_RELEASE => ffa_success(0, 0),
            func::MSG_SEND_DIRECT_REQ => self.direct_request(regs),
            func::RUN => {
                // CPU time for Trusty: run the queued standard call, then whatever it started.
                if let Some((f, a)) = self.queued_std.take() {
                    // Preemption is FFA_RUN's business here; of the std-call injections only
                    // BUSY has a meaning on this transport.
                    let client = u64::from(self.cfg.ns_endpoint_id);
                    let r = if self.inject.busy > 0 {
                        self.inject.busy -= 1;
                        SmError::Busy.code()
                    } else {
                        self.stats.std_calls += 1;
                        self.exec_std(f, a, client)
                    };
                    self.queued_result = Some(r);
                }
                if !self.cfg.deferred {
                    self.run_until_idle();
                }
                ffa_success(0, 0)
            }
            func::MEM_RECLAIM => match self.shares.mem_reclaim((regs[1] & 0xFFFF_FFFF) | (regs[2] << 32)) {
                Ok(()) => ffa_success(0, 0),
                Err(e) => ffa_error(e),
            },
            _ => ffa_error(ffa::err::NOT_SUPPORTED),
        }
    }
}
