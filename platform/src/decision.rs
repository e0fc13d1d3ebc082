//! The sharing decision: a pure function from [`PlatformFacts`] to a [`SharingPlan`], or an
//! error that names what is missing. Each arm is a row of spec dma-decisions.md §6 whose peer
//! is Trusty; the failure modes it avoids are §7.
//!
//! There is deliberately no "Xen, therefore the DMA API" arm, and no DMA-API mechanism at all:
//! Linux's `xen_domain()` rule in `vring_use_dma_api()` is the bug this stack exists to avoid
//! (§0, §1). What matters is who dereferences the id and what that peer can see.

use crate::plan::{
    AddressMap, CallTransport, DecisionError, Mechanism, MediatorFacts, PlatformFacts, SharingPlan, TrustyPath,
};
use crate::smc::api;

/// Live shares Xen's FF-A mediator allows one guest (dma-decisions §4.3, row 10).
pub const FFA_MEDIATOR_SHARE_BUDGET: usize = 32;
/// Pages one FFA_MEM_SHARE may cover under Xen's FF-A mediator on the development branch
/// (FF-A 1.2; `FFA_MAX_SHM_PAGE_COUNT` = 2 × 512 KiB, checked in `alloc_ffa_shm_mem()`, §4.3).
pub const FFA_MEDIATOR_MAX_PAGES: usize = 256;
/// The same limit in Xen 4.20 and 4.21 (FF-A 1.1): at most 255 pages (xen-ffa-mediator.md §4.3).
pub const FFA_MEDIATOR_4_20_MAX_PAGES: usize = 255;
/// Grant references this stack uses at most for a Trusty VM (a slice of the guest's grant
/// table, which Xen sizes with `max_grant_frames`; §3).
pub const GRANT_ENTRIES_BUDGET: usize = 512;
/// The NXP Trusty mediator translates only the first page of a buffer (§4.4).
pub const TRUSTY_MEDIATOR_MAX_PAGES: usize = 1;

/// Buffer pools without a share budget.
pub const DEFAULT_RX_BUFFERS: usize = 32;
/// Tx buffers to allocate at most without a share budget.
pub const DEFAULT_TX_BUFFERS: usize = 32;
/// Spare rx buffers without a share budget.
pub const DEFAULT_RX_SPARE_BUFFERS: usize = 8;
/// Shares the virtio bus itself holds: the descriptor page and two vrings (trusty-protocol §5.5).
pub const BUS_SHARES: usize = 3;
/// Shares kept free under a budget for memory references sent with messages (TIPC §6.9).
pub const MEMREF_RESERVE: usize = 4;

/// Rx buffers to post, tx buffers to allocate at most, spare rx buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferPools {
    /// Rx buffers to post.
    pub rx: usize,
    /// Tx buffers to allocate at most.
    pub tx: usize,
    /// Spare rx buffers kept to replace ones the peer holds.
    pub rx_spare: usize,
}

/// Pool sizes for a share budget: the defaults when they fit (or with no budget), else the
/// room left after [`BUS_SHARES`] and [`MEMREF_RESERVE`], split in the defaults' 4:4:1
/// proportions with rx first (a missing rx buffer stalls Trusty's replies; a missing tx buffer
/// only delays a send). `None` if the budget leaves no room for one rx and one tx buffer.
pub const fn pool_sizes(budget: Option<usize>) -> Option<BufferPools> {
    const DEFAULTS: BufferPools =
        BufferPools { rx: DEFAULT_RX_BUFFERS, tx: DEFAULT_TX_BUFFERS, rx_spare: DEFAULT_RX_SPARE_BUFFERS };
    const DEFAULT_TOTAL: usize = DEFAULT_RX_BUFFERS + DEFAULT_TX_BUFFERS + DEFAULT_RX_SPARE_BUFFERS;
    let Some(budget) = budget else { return Some(DEFAULTS) };
    let room = budget.saturating_sub(BUS_SHARES + MEMREF_RESERVE);
    if room >= DEFAULT_TOTAL {
        return Some(DEFAULTS);
    }
    let rx_spare = room * DEFAULT_RX_SPARE_BUFFERS / DEFAULT_TOTAL;
    let tx = (room - rx_spare) / 2;
    let rx = room - rx_spare - tx;
    if tx == 0 {
        return None;
    }
    Some(BufferPools { rx, tx, rx_spare })
}

/// Shares a plan holds once the bus is up with every pool allocated.
pub const fn shares_needed(plan: &SharingPlan) -> usize {
    BUS_SHARES + plan.rx_buffers + plan.tx_buffers + plan.rx_spare_buffers
}

/// Whether `plan` fits its share budget with [`MEMREF_RESERVE`] shares to spare.
pub const fn fits_budget(plan: &SharingPlan) -> bool {
    match plan.share_budget {
        None => true,
        Some(budget) => shares_needed(plan) + MEMREF_RESERVE <= budget,
    }
}

// The fixed budgets leave room for the pools (checked when the crate compiles).
const _: () = assert!(pool_sizes(Some(FFA_MEDIATOR_SHARE_BUDGET)).is_some());
const _: () = assert!(pool_sizes(Some(GRANT_ENTRIES_BUDGET)).is_some());

/// A plan with `share_budget` and pools sized to fit it (no buffer-size limit, whole
/// descriptors, read-only shares; callers override what differs). Bring-up uses it too, for
/// a mechanism forced against the decision.
pub fn sized(
    mechanism: Mechanism,
    transport: CallTransport,
    share_budget: Option<usize>,
    reason: &'static str,
) -> Result<SharingPlan, DecisionError> {
    let Some(pools) = pool_sizes(share_budget) else {
        return Err(refuse("a share budget with room for the buffer pools", "every buffer is a live share"));
    };
    Ok(SharingPlan {
        mechanism,
        transport,
        share_budget,
        max_buffer_pages: None,
        fragmented_descriptors: false,
        read_only_shares: true,
        rx_buffers: pools.rx,
        tx_buffers: pools.tx,
        rx_spare_buffers: pools.rx_spare,
        reason,
    })
}

/// The highest Trusty API version whose memory ids are safe here (ask Trusty for at most this):
/// 5 where FF-A handles (or grants) work, 4 where ids are addresses (no FF-A memory sharing),
/// 0 when Trusty cannot be reached.
pub fn api_ceiling(facts: &PlatformFacts) -> u32 {
    match facts.trusty {
        TrustyPath::FfaNative | TrustyPath::FfaMediator | TrustyPath::XenVm { .. } => api::MEM_OBJ,
        TrustyPath::Smc | TrustyPath::TrustyMediator => api::PHYS_MEM_OBJ,
        TrustyPath::Unreachable => 0,
    }
}

const fn refuse(missing: &'static str, because: &'static str) -> DecisionError {
    DecisionError { missing, because }
}

/// Memory ids are addresses: bare below API 4, with attributes at 4 (trusty-protocol §3.1).
const fn address_mechanism(api_version: u32) -> Mechanism {
    if api_version >= api::PHYS_MEM_OBJ {
        Mechanism::PhysAttr
    } else {
        Mechanism::Phys
    }
}

/// Trusty is out of reach (§7: Trusty's SMCs through Xen without a Trusty mediator).
const NO_PATH: DecisionError = refuse(
    "a path to Trusty (an FF-A mediator, a Trusty mediator, or a Trusty VM node)",
    "this domain's Trusty SMCs come back NOT_SUPPORTED",
);

/// Reasons, one short line each (they end the sharing line).
mod reason {
    pub const XEN_VM: &str = "Trusty runs in that domain: it can map only what is granted to it";
    pub const FFA_MEDIATOR: &str = "Xen's FF-A mediator turns the guest's IPAs into physical addresses";
    pub const TRUSTY_MEDIATOR: &str = "the hypervisor's Trusty mediator rewrites guest addresses in Trusty's SMCs";
    pub const NATIVE_FFA: &str = "no hypervisor: Trusty API 5 takes FF-A memory handles";
    pub const NATIVE: &str = "no hypervisor: the addresses Trusty is given are physical addresses";
    pub const DIRECT_MAPPED: &str = "direct-mapped Xen domain: guest addresses are physical addresses";
}

/// Under Xen's FF-A mediator, whether what it forwards is enough for Trusty's FF-A transport
/// and FF-A sharing; `Ok` on every other path. Needs no Trusty call, so bring-up asks it before
/// making any: a mediator without FFA_RUN is refused at once, never worked around (no other
/// transport reaches Trusty from behind it, and none that would pass guest addresses is safe).
pub fn check_mediator(facts: &PlatformFacts) -> Result<(), DecisionError> {
    if facts.trusty != TrustyPath::FfaMediator {
        return Ok(());
    }
    let Some(m) = facts.mediator else {
        return Err(refuse(
            "what Xen's FF-A mediator forwards (FFA_VERSION, then FFA_FEATURES)",
            "Xen 4.20/4.21 and the development branch forward different calls",
        ));
    };
    if !m.run {
        return Err(refuse(
            "FFA_RUN through Xen's FF-A mediator (forwarded by Xen 4.22 / the development branch when \
             the SPMC lists it; Xen 4.20 and 4.21 answer NOT_SUPPORTED)",
            "Trusty's FF-A call transport gives standard calls CPU time with FFA_RUN",
        ));
    }
    if !m.direct_req {
        return Err(refuse(
            "FFA_MSG_SEND_DIRECT_REQ through Xen's FF-A mediator (its SPMC must list it)",
            "every call to Trusty is an FF-A direct request here",
        ));
    }
    if !(m.mem_share && m.mem_reclaim) {
        return Err(refuse(
            "FFA_MEM_SHARE and FFA_MEM_RECLAIM through Xen's FF-A mediator (its SPMC must list them)",
            "buffers reach Trusty only as FF-A shares here",
        ));
    }
    Ok(())
}

/// Pages one share may cover under the mediator that answered `m` (255 on Xen 4.20/4.21, which
/// speak FF-A 1.1; 256 on the development branch, which speaks 1.2).
pub const fn mediator_max_pages(m: &MediatorFacts) -> usize {
    if m.minor() >= 2 {
        FFA_MEDIATOR_MAX_PAGES
    } else {
        FFA_MEDIATOR_4_20_MAX_PAGES
    }
}

/// The sharing plan for `facts`. `facts.api_version` must be the negotiated version.
pub fn decide(facts: &PlatformFacts) -> Result<SharingPlan, DecisionError> {
    // Nothing to negotiate with: say that first, it is the cause of a missing version too.
    if facts.trusty == TrustyPath::Unreachable {
        return Err(NO_PATH);
    }
    check_mediator(facts)?;
    let Some(api_version) = facts.api_version else {
        return Err(refuse(
            "a negotiated Trusty API version",
            "the memory-id format depends on it (trusty-protocol §2.4, §3.1)",
        ));
    };
    if api_version > api::CURRENT {
        return Err(refuse(
            "a Trusty API version of at most 5",
            "newer memory-id formats are unknown to this stack (trusty-protocol §2.4)",
        ));
    }

    match facts.trusty {
        TrustyPath::Unreachable => Err(NO_PATH),

        // Row 4 (grant binding, peer = another domain): a Trusty VM sees only granted pages,
        // whatever the API version; the grant table needs `xen,enhanced` (§3, row 7).
        TrustyPath::XenVm { backend_domid, call_evtchn, kick_evtchn } => {
            if !facts.grant_table {
                return Err(refuse(
                    "the Xen grant table (`xen,enhanced` for a dom0less guest; no /hypervisor node)",
                    "a Trusty VM can map only pages granted to it",
                ));
            }
            sized(
                Mechanism::XenGrant { backend_domid },
                CallTransport::XenMailbox { backend_domid, call_evtchn, kick_evtchn },
                Some(GRANT_ENTRIES_BUDGET),
                reason::XEN_VM,
            )
        }

        // Rows 9 and 10: Xen's FF-A mediator carries FF-A calls only, MEM_SHARE read-write
        // with one fragment, at most 32 live shares of at most 255 (4.20/4.21) or 256 pages;
        // no MEM_LEND. `check_mediator` has seen FFA_RUN and the memory calls forwarded.
        TrustyPath::FfaMediator => {
            let max_pages = facts.mediator.as_ref().map_or(FFA_MEDIATOR_4_20_MAX_PAGES, mediator_max_pages);
            if api_version < api::MEM_OBJ {
                return Err(refuse(
                    "Trusty API 5 (FF-A memory handles)",
                    "Xen's FF-A mediator only carries FF-A memory sharing",
                ));
            }
            let plan = sized(
                Mechanism::FfaHandle,
                CallTransport::FfaDirect,
                Some(FFA_MEDIATOR_SHARE_BUDGET),
                reason::FFA_MEDIATOR,
            )?;
            Ok(SharingPlan {
                max_buffer_pages: Some(max_pages),
                fragmented_descriptors: false,
                read_only_shares: false,
                ..plan
            })
        }

        // Row 8: the NXP mediator rewrites IPAs in the legacy (address) ABI, first page only.
        TrustyPath::TrustyMediator => {
            if api_version > api::PHYS_MEM_OBJ {
                return Err(refuse(
                    "Trusty API 4 or lower (address memory ids)",
                    "a Trusty mediator rewrites addresses and cannot make FF-A handles",
                ));
            }
            let plan = sized(Mechanism::MediatedIpa, CallTransport::Smc, None, reason::TRUSTY_MEDIATOR)?;
            Ok(SharingPlan { max_buffer_pages: Some(TRUSTY_MEDIATOR_MAX_PAGES), ..plan })
        }

        // Row 12 at API 5 (FF-A handles), row 13 below (addresses): no hypervisor.
        // A native SPMC takes fragmented descriptors (FFA_MEM_FRAG_TX, trusty-protocol §3.3).
        TrustyPath::FfaNative if api_version >= api::MEM_OBJ => {
            let plan = sized(Mechanism::FfaHandle, CallTransport::Smc, None, reason::NATIVE_FFA)?;
            Ok(SharingPlan { fragmented_descriptors: true, ..plan })
        }
        TrustyPath::FfaNative => sized(address_mechanism(api_version), CallTransport::Smc, None, reason::NATIVE),

        // Trusty's own SMCs reach it and nothing translates: ids are addresses, safe only
        // where guest addresses are physical addresses.
        TrustyPath::Smc => {
            let reason = match facts.address_map {
                // Row 13.
                AddressMap::Physical => reason::NATIVE,
                // Rows 1 and 6: IPA == PA (and no DMA API: Trusty is not a device behind one).
                AddressMap::DirectMapped => reason::DIRECT_MAPPED,
                // Row 2's answer (IPA) is for a backend that maps guest memory itself; Trusty
                // would read the IPA as a physical address (§7).
                AddressMap::Translated => {
                    return Err(refuse(
                        "a direct map, or an FF-A or Trusty mediator in the hypervisor",
                        "guest addresses are IPAs that Trusty would read as physical addresses",
                    ))
                }
                AddressMap::Unknown => {
                    return Err(refuse(
                        "XENFEAT_direct_mapped / not_direct_mapped from the hypervisor",
                        "cannot tell whether guest addresses are physical",
                    ))
                }
            };
            if api_version >= api::MEM_OBJ {
                return Err(refuse(
                    "FF-A (FFA_VERSION 1.x) for Trusty API 5 memory handles",
                    "API 5 memory ids are FF-A handles; ask Trusty for at most API 4 here",
                ));
            }
            sized(address_mechanism(api_version), CallTransport::Smc, None, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Hypervisor;
    use alloc::format;
    use alloc::vec::Vec;

    const XEN: Hypervisor = Hypervisor::Xen { version: Some((4, 19)), domid: Some(1) };
    /// What the development branch's mediator answers over an SPMC that lists FFA_RUN.
    const MEDIATOR_NEWER: MediatorFacts =
        MediatorFacts { version: 0x1_0002, run: true, direct_req: true, mem_share: true, mem_reclaim: true };
    /// What Xen 4.20.4 answered in the QEMU boot (xen-ffa-mediator.md §6): FF-A 1.1, no FFA_RUN.
    const MEDIATOR_4_20: MediatorFacts = MediatorFacts { version: 0x1_0001, run: false, ..MEDIATOR_NEWER };

    fn under(m: MediatorFacts, api: u32) -> PlatformFacts {
        PlatformFacts { mediator: Some(m), ..facts(XEN, AddressMap::Translated, TrustyPath::FfaMediator, api) }
    }

    fn facts(hypervisor: Hypervisor, address_map: AddressMap, trusty: TrustyPath, api: u32) -> PlatformFacts {
        PlatformFacts {
            hypervisor,
            address_map,
            trusty,
            ffa_available: matches!(trusty, TrustyPath::FfaNative | TrustyPath::FfaMediator),
            grant_table: hypervisor != Hypervisor::None,
            api_version: Some(api),
            mediator: (trusty == TrustyPath::FfaMediator).then_some(MEDIATOR_NEWER),
        }
    }

    const VM: TrustyPath = TrustyPath::XenVm { backend_domid: 7, call_evtchn: 11, kick_evtchn: 12 };

    fn assert_refused(facts: &PlatformFacts, missing_contains: &str) -> DecisionError {
        let err = decide(facts).expect_err("no safe mechanism here");
        assert!(err.missing.contains(missing_contains), "{err}");
        assert!(!err.because.is_empty());
        assert!(format!("{err}").contains(err.missing));
        err
    }

    fn assert_default_pools(plan: &SharingPlan) {
        assert_eq!((plan.rx_buffers, plan.tx_buffers, plan.rx_spare_buffers), (32, 32, 8));
    }

    /// Row 1: Xen dom0, direct-mapped. Guest addresses are physical; Trusty gets them as ids
    /// over its own SMCs, with no DMA API in between.
    #[test]
    fn row1_direct_mapped_dom0() {
        let dom0 = Hypervisor::Xen { version: Some((4, 19)), domid: Some(0) };
        let plan = decide(&facts(dom0, AddressMap::DirectMapped, TrustyPath::Smc, 4)).unwrap();
        assert_eq!(plan.mechanism, Mechanism::PhysAttr);
        assert_eq!(plan.transport, CallTransport::Smc);
        assert_eq!(plan.share_budget, None);
        assert_eq!(plan.reason, "direct-mapped Xen domain: guest addresses are physical addresses");
        assert_default_pools(&plan);
        let old = decide(&facts(dom0, AddressMap::DirectMapped, TrustyPath::Smc, 3)).unwrap();
        assert_eq!(old.mechanism, Mechanism::Phys);
    }

    /// Row 2: a translated DomU without a mediator. The row's IPA answer is for a backend that
    /// maps guest memory itself; for Trusty it would be the §7 "IPA read as PA" corruption.
    #[test]
    fn row2_translated_domu_without_mediator_is_refused() {
        let err = assert_refused(&facts(XEN, AddressMap::Translated, TrustyPath::Smc, 4), "mediator");
        assert!(err.missing.contains("direct map"));
        assert!(err.because.contains("IPA"));
    }

    /// Row 4: the peer is another domain reached by grants: grant references, mailbox calls.
    #[test]
    fn row4_trusty_vm_uses_grants() {
        for api in [0, 3, 4, 5] {
            let plan = decide(&facts(XEN, AddressMap::Translated, VM, api)).unwrap();
            assert_eq!(plan.mechanism, Mechanism::XenGrant { backend_domid: 7 });
            assert_eq!(
                plan.transport,
                CallTransport::XenMailbox { backend_domid: 7, call_evtchn: 11, kick_evtchn: 12 }
            );
            assert_eq!(plan.share_budget, Some(GRANT_ENTRIES_BUDGET));
            assert!(!plan.fragmented_descriptors);
            assert_default_pools(&plan);
            assert!(format!("{plan}").starts_with("sharing: xen-grant to domain 7 ("));
        }
    }

    /// Row 6: dom0less DomU with `direct-map` + `xen,enhanced`: the same as row 1.
    #[test]
    fn row6_direct_mapped_dom0less_domu() {
        let plan = decide(&facts(XEN, AddressMap::DirectMapped, TrustyPath::Smc, 4)).unwrap();
        assert_eq!(plan.mechanism, Mechanism::PhysAttr);
        assert_eq!(plan.transport, CallTransport::Smc);
        assert_eq!(plan.reason, reason::DIRECT_MAPPED);
    }

    /// Row 7: a dom0less DomU without `xen,enhanced` has no /hypervisor node, so its device tree
    /// looks native. The facts do not: Xen traps the SMCs and, with no mediator for the domain,
    /// Trusty's fast call and FFA_VERSION fail, so the path is Unreachable (see
    /// facts::tests::dom0less_without_enhanced_is_not_mistaken_for_native). A Trusty VM node in
    /// such a tree is refused for want of the grant table. Neither becomes "physical".
    #[test]
    fn row7_dom0less_without_enhanced() {
        let silent = PlatformFacts {
            api_version: None,
            ..facts(Hypervisor::None, AddressMap::Physical, TrustyPath::Unreachable, 0)
        };
        let err = assert_refused(&silent, "a path to Trusty");
        assert_eq!(err.because, "this domain's Trusty SMCs come back NOT_SUPPORTED");

        let vm_without_grants = facts(Hypervisor::None, AddressMap::Physical, VM, 5);
        assert!(!vm_without_grants.grant_table);
        let err = assert_refused(&vm_without_grants, "grant table");
        assert!(err.missing.contains("xen,enhanced"));
    }

    /// Row 8: the NXP Trusty mediator rewrites IPAs; only the first page of a buffer.
    #[test]
    fn row8_trusty_mediator() {
        for api in [3, 4] {
            let plan = decide(&facts(XEN, AddressMap::Translated, TrustyPath::TrustyMediator, api)).unwrap();
            assert_eq!(plan.mechanism, Mechanism::MediatedIpa);
            assert_eq!(plan.transport, CallTransport::Smc);
            assert_eq!(plan.share_budget, None);
            assert_eq!(plan.max_buffer_pages, Some(1));
            assert!(!plan.fragmented_descriptors);
        }
        let err = assert_refused(&facts(XEN, AddressMap::Translated, TrustyPath::TrustyMediator, 5), "API 4");
        assert!(err.because.contains("FF-A"));
    }

    /// Row 9: Xen's FF-A mediator: FF-A handles, calls as FF-A direct requests.
    #[test]
    fn row9_ffa_mediator() {
        let plan = decide(&facts(XEN, AddressMap::Translated, TrustyPath::FfaMediator, 5)).unwrap();
        assert_eq!(plan.mechanism, Mechanism::FfaHandle);
        assert_eq!(plan.transport, CallTransport::FfaDirect);
        assert_eq!(
            format!("{plan}"),
            "sharing: ffa-handle (Xen's FF-A mediator turns the guest's IPAs into physical addresses)"
        );
    }

    /// Row 10: the mediator's limits are in the plan: 32 shares, 256 pages, one fragment.
    #[test]
    fn row10_ffa_mediator_limits() {
        let plan = decide(&facts(XEN, AddressMap::Unknown, TrustyPath::FfaMediator, 5)).unwrap();
        assert_eq!(plan.share_budget, Some(32));
        assert_eq!(plan.max_buffer_pages, Some(256));
        assert!(!plan.fragmented_descriptors);
        assert_eq!((plan.rx_buffers, plan.tx_buffers, plan.rx_spare_buffers), (12, 11, 2));
        assert!(fits_budget(&plan));
        assert_eq!(shares_needed(&plan) + MEMREF_RESERVE, 32);
    }

    /// The development branch: FFA_RUN forwarded, FF-A 1.2, 256 pages, read-write shares only.
    #[test]
    fn newer_mediator_plan() {
        let plan = decide(&under(MEDIATOR_NEWER, 5)).unwrap();
        assert_eq!((plan.mechanism, plan.transport), (Mechanism::FfaHandle, CallTransport::FfaDirect));
        assert_eq!(plan.max_buffer_pages, Some(256));
        assert!(!plan.read_only_shares, "Xen refuses read-only shares with NOT_SUPPORTED");
        assert!(!plan.fragmented_descriptors);
        assert_eq!(plan.share_budget, Some(32));
        assert_eq!(check_mediator(&under(MEDIATOR_NEWER, 5)), Ok(()));
    }

    /// Xen 4.20 / 4.21: no FFA_RUN, so Trusty's FF-A transport cannot run a standard call.
    /// Refused whatever the API version (before any Trusty call), naming FFA_RUN and the Xen
    /// versions that forward it; nothing else is tried.
    #[test]
    fn mediator_4_20_is_refused_for_want_of_ffa_run() {
        for api in [None, Some(4), Some(5)] {
            let f = PlatformFacts { api_version: api, ..under(MEDIATOR_4_20, 5) };
            let err = decide(&f).expect_err("no FFA_RUN");
            assert!(err.missing.contains("FFA_RUN"), "{err}");
            assert!(err.missing.contains("4.20 and 4.21"), "{err}");
            assert!(err.missing.contains("development branch"), "{err}");
            assert_eq!(check_mediator(&f), Err(err));
        }
    }

    /// A 4.20-era mediator with FFA_RUN (a patched 4.20) would get 255 pages, the 4.20 limit.
    #[test]
    fn mediator_1_1_page_limit_is_255() {
        let plan = decide(&under(MediatorFacts { run: true, ..MEDIATOR_4_20 }, 5)).unwrap();
        assert_eq!(plan.max_buffer_pages, Some(255));
        assert!(!plan.read_only_shares);
    }

    /// Without direct requests or memory calls forwarded the mediator is refused, naming them.
    #[test]
    fn mediator_without_direct_requests_or_memory_calls() {
        let err = decide(&under(MediatorFacts { direct_req: false, ..MEDIATOR_NEWER }, 5)).unwrap_err();
        assert!(err.missing.contains("FFA_MSG_SEND_DIRECT_REQ"), "{err}");
        let err = decide(&under(MediatorFacts { mem_share: false, ..MEDIATOR_NEWER }, 5)).unwrap_err();
        assert!(err.missing.contains("FFA_MEM_SHARE"), "{err}");
        let err = decide(&under(MediatorFacts { mem_reclaim: false, ..MEDIATOR_NEWER }, 5)).unwrap_err();
        assert!(err.missing.contains("FFA_MEM_RECLAIM"), "{err}");
        let unknown = PlatformFacts { mediator: None, ..under(MEDIATOR_NEWER, 5) };
        assert!(decide(&unknown).unwrap_err().missing.contains("FFA_FEATURES"));
    }

    /// Other paths never need mediator facts, and only the mediator is refused read-only shares.
    #[test]
    fn read_only_shares_elsewhere() {
        let plan = decide(&facts(Hypervisor::None, AddressMap::Physical, TrustyPath::FfaNative, 5)).unwrap();
        assert!(plan.read_only_shares);
        let plan = decide(&facts(XEN, AddressMap::Translated, VM, 5)).unwrap();
        assert!(plan.read_only_shares);
    }

    #[test]
    fn ffa_mediator_needs_api_5() {
        for api in [0, 3, 4] {
            let err = assert_refused(&facts(XEN, AddressMap::Translated, TrustyPath::FfaMediator, api), "Trusty API 5");
            assert_eq!(err.because, "Xen's FF-A mediator only carries FF-A memory sharing");
        }
    }

    /// Row 12: no hypervisor, FF-A present, API 5: FF-A handles over Trusty's own SMCs.
    #[test]
    fn row12_native_ffa_handles() {
        let plan = decide(&facts(Hypervisor::None, AddressMap::Physical, TrustyPath::FfaNative, 5)).unwrap();
        assert_eq!(plan.mechanism, Mechanism::FfaHandle);
        assert_eq!(plan.transport, CallTransport::Smc);
        assert_eq!(plan.share_budget, None);
        assert!(plan.fragmented_descriptors);
        assert_default_pools(&plan);
    }

    /// Row 13: no hypervisor, address ids: with attributes at API 4, bare below.
    #[test]
    fn row13_native_addresses() {
        for trusty in [TrustyPath::Smc, TrustyPath::FfaNative] {
            let plan = decide(&facts(Hypervisor::None, AddressMap::Physical, trusty, 4)).unwrap();
            assert_eq!(plan.mechanism, Mechanism::PhysAttr);
            assert_eq!(plan.transport, CallTransport::Smc);
            assert_eq!(plan.share_budget, None);
            assert_eq!(plan.reason, reason::NATIVE);
            for api in [0, 1, 2, 3] {
                let plan = decide(&facts(Hypervisor::None, AddressMap::Physical, trusty, api)).unwrap();
                assert_eq!(plan.mechanism, Mechanism::Phys);
            }
        }
    }

    #[test]
    fn native_smc_at_api_5_needs_ffa() {
        let err = assert_refused(&facts(Hypervisor::None, AddressMap::Physical, TrustyPath::Smc, 5), "FF-A");
        assert!(err.because.contains("API 5"));
        assert_refused(&facts(XEN, AddressMap::DirectMapped, TrustyPath::Smc, 5), "FF-A");
    }

    #[test]
    fn unknown_address_map_is_refused() {
        let err = assert_refused(&facts(XEN, AddressMap::Unknown, TrustyPath::Smc, 4), "XENFEAT_direct_mapped");
        assert_eq!(err.because, "cannot tell whether guest addresses are physical");
    }

    #[test]
    fn unreachable_is_refused_whatever_the_version() {
        for api_version in [None, Some(0), Some(5)] {
            let f = PlatformFacts { api_version, ..facts(XEN, AddressMap::Translated, TrustyPath::Unreachable, 0) };
            assert_refused(&f, "a path to Trusty");
        }
    }

    #[test]
    fn a_version_is_required() {
        let f = PlatformFacts { api_version: None, ..facts(XEN, AddressMap::Translated, TrustyPath::FfaMediator, 5) };
        assert_refused(&f, "a negotiated Trusty API version");
    }

    #[test]
    fn versions_above_5_are_refused() {
        assert_refused(&facts(Hypervisor::None, AddressMap::Physical, TrustyPath::FfaNative, 6), "at most 5");
    }

    #[test]
    fn trusty_vm_needs_the_grant_table() {
        let f = PlatformFacts { grant_table: false, ..facts(XEN, AddressMap::Translated, VM, 5) };
        assert_refused(&f, "Xen grant table");
    }

    #[test]
    fn ceilings() {
        let at = |trusty| api_ceiling(&facts(XEN, AddressMap::Translated, trusty, 0));
        assert_eq!(at(TrustyPath::FfaNative), 5);
        assert_eq!(at(TrustyPath::FfaMediator), 5);
        assert_eq!(at(VM), 5);
        assert_eq!(at(TrustyPath::Smc), 4);
        assert_eq!(at(TrustyPath::TrustyMediator), 4);
        assert_eq!(at(TrustyPath::Unreachable), 0);
    }

    #[test]
    fn pool_sizing() {
        assert_eq!(pool_sizes(None), Some(BufferPools { rx: 32, tx: 32, rx_spare: 8 }));
        assert_eq!(pool_sizes(Some(512)), pool_sizes(None));
        assert_eq!(pool_sizes(Some(32)), Some(BufferPools { rx: 12, tx: 11, rx_spare: 2 }));
        assert_eq!(pool_sizes(Some(8)), None);
        for budget in 0..200 {
            if let Some(p) = pool_sizes(Some(budget)) {
                assert!(BUS_SHARES + p.rx + p.tx + p.rx_spare + MEMREF_RESERVE <= budget, "budget {budget}");
                assert!(p.rx >= p.tx && p.tx >= 1, "budget {budget}");
            } else {
                assert!(budget < BUS_SHARES + MEMREF_RESERVE + 2, "budget {budget}");
            }
        }
    }

    /// Every combination of facts: decide never panics, every plan fits its budget and uses a
    /// version within the ceiling, every error says what is missing, and no reason mentions the
    /// DMA API.
    #[test]
    fn every_combination() {
        let hypervisors = [Hypervisor::None, XEN, Hypervisor::Xen { version: None, domid: None }];
        let maps = [AddressMap::Physical, AddressMap::DirectMapped, AddressMap::Translated, AddressMap::Unknown];
        let paths = [
            TrustyPath::Smc,
            TrustyPath::FfaNative,
            TrustyPath::FfaMediator,
            TrustyPath::TrustyMediator,
            VM,
            TrustyPath::Unreachable,
        ];
        let mut plans = Vec::new();
        for hypervisor in hypervisors {
            for address_map in maps {
                for trusty in paths {
                    for ffa_available in [false, true] {
                        for grant_table in [false, true] {
                            for api_version in [None, Some(0), Some(3), Some(4), Some(5), Some(6)] {
                                let f = PlatformFacts {
                                    hypervisor,
                                    address_map,
                                    trusty,
                                    ffa_available,
                                    grant_table,
                                    api_version,
                                    mediator: (trusty == TrustyPath::FfaMediator).then_some(MEDIATOR_NEWER),
                                };
                                match decide(&f) {
                                    Ok(plan) => {
                                        assert!(fits_budget(&plan), "{f:?}");
                                        assert!(api_version.unwrap() <= api_ceiling(&f), "{f:?}");
                                        assert!(!plan.reason.contains("DMA"), "{f:?}");
                                        assert!(plan.rx_buffers >= 1 && plan.tx_buffers >= 1);
                                        plans.push(plan);
                                    }
                                    Err(err) => {
                                        assert!(!err.missing.is_empty() && !err.because.is_empty());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(!plans.is_empty());
    }
}
