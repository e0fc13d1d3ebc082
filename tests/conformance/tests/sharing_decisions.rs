//! The sharing decision on every platform profile, proven against a secure side that can only
//! touch what it was given (spec dma-decisions.md §6, §7).

use conformance::echo;
use platforms::{by_name, Profile};
use trusty_stack::{bring_up_platform, BringUp, BringUpError, StackConfig};
use tipc::{Timeout, TipcDevice};
use trusty_model::host::{ModelMode, Sim};
use trusty_platform::plan::{CallTransport, Mechanism};

const DATASINK: &str = "com.android.ipc-unittest.srv.datasink";

fn up(name: &str, mode: ModelMode, cfg: StackConfig) -> (Profile, Sim, Result<(TipcDevice, BringUp), BringUpError>) {
    let profile = by_name(name).expect("profile");
    let sim = profile.boot(mode);
    let r = bring_up_platform(profile.access(&sim), cfg);
    (profile, sim, r)
}

#[test]
fn every_profile_with_a_path_decides_and_works_without_faults() {
    let expected = [
        ("native-api4", "phys-attr", CallTransport::Smc),
        ("native-api5", "ffa-handle", CallTransport::Smc),
        ("xen-dom0", "phys-attr", CallTransport::Smc),
        ("xen-domu-direct-mapped", "phys-attr", CallTransport::Smc),
        ("xen-domu-ffa-mediator", "ffa-handle", CallTransport::FfaDirect),
        ("xen-domu-trusty-mediator", "mediated-ipa", CallTransport::Smc),
    ];
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        for (name, mechanism, transport) in expected {
            let (_, sim, r) = up(name, mode, StackConfig::default());
            let (mut dev, info) = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(info.plan.mechanism.name(), mechanism, "{name}");
            assert_eq!(info.plan.transport, transport, "{name}");
            assert!(info.plan.to_string().starts_with(&format!("sharing: {mechanism} (")), "{name}");
            for size in [1usize, 100, 4080] {
                echo(&mut dev, &vec![0x5a; size]);
            }
            let (_, result) = dev.shutdown();
            result.unwrap_or_else(|e| panic!("{name}: teardown: {e}"));
            let m = sim.model();
            assert!(m.faults().is_empty(), "{name}: {:?}", m.faults());
            assert_eq!(m.live_shares(), 0, "{name}: FF-A shares left behind");
        }
    }
}

#[test]
fn trusty_vm_gets_grants_through_the_mailbox() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let (_, sim, r) = up("xen-domu-trusty-vm", mode, StackConfig::default());
        let (mut dev, info) = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.plan.mechanism, Mechanism::XenGrant { backend_domid: platforms::TRUSTY_VM_DOMID });
        assert!(matches!(info.plan.transport, CallTransport::XenMailbox { backend_domid: 1, .. }));
        assert_eq!(info.plan.to_string().split(" (").next(), Some("sharing: xen-grant to domain 1"));
        echo(&mut dev, b"through grants");
        let (_, result) = dev.shutdown();
        result.expect("teardown: every grant ended");
        let m = sim.model();
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        let s = m.stats();
        assert!(s.mailbox_calls > 0);
        assert_eq!(s.smcs, s.refused_smcs, "no SMC reached Trusty; it is a VM");
    }
}

#[test]
fn ffa_mediator_makes_every_call_a_direct_request() {
    let (_, sim, r) = up("xen-domu-ffa-mediator", ModelMode::Sync, StackConfig::default());
    let (mut dev, _) = r.expect("bring-up");
    echo(&mut dev, b"x");
    let s = sim.model().stats();
    assert_eq!(s.plain_trusty_smcs, s.mailbox_calls, "every Trusty call came as an FF-A direct request");
    assert_eq!(s.plain_trusty_smcs, 0);
    assert_eq!(s.refused_smcs, 0, "not even a probe went the plain way");
    assert!(s.ffa_direct_requests > 10, "{s:?}");
}

#[test]
fn no_path_fails_naming_what_is_missing_and_touches_nothing() {
    let (_, sim, r) = up("xen-domu-no-path", ModelMode::Sync, StackConfig::default());
    let e = r.err().expect("must fail");
    let BringUpError::NoSafeSharing(d) = &e else { panic!("wrong error: {e}") };
    assert!(d.missing.contains("FF-A mediator") && d.missing.contains("Trusty mediator"), "{d}");
    assert!(e.to_string().contains("NOT_SUPPORTED"), "{e}");
    let m = sim.model();
    assert_eq!(m.stats().plain_trusty_smcs, 0);
    assert_eq!(m.live_shares(), 0);
    assert_eq!(sim.ram().pages_in_use(), 0, "nothing was allocated for a stack that cannot run");
}

fn forced(name: &str, m: Mechanism) -> (BringUpError, Vec<trusty_model::mem::Fault>) {
    let cfg = StackConfig { force_mechanism: Some(m), ..Default::default() };
    let (_, sim, r) = up(name, ModelMode::Sync, cfg);
    let e = r.err().unwrap_or_else(|| panic!("{name} with {m:?} must fail"));
    let faults = sim.model().faults().to_vec();
    (e, faults)
}

#[test]
fn wrong_decisions_fault_visibly() {
    // A DomU handing its guest addresses to Trusty (what bypassing, or wrongly using, the DMA
    // path does): Trusty would read the wrong memory; the model faults on the IPA.
    for m in [Mechanism::Phys, Mechanism::PhysAttr] {
        let (e, faults) = forced("xen-domu-ffa-mediator", m);
        assert_eq!(e.plan().map(|p| p.mechanism), Some(m));
        let f = faults.first().expect("a fault");
        assert!(f.addr >= platforms::RAM_IPA_BASE && f.addr < platforms::RAM_IPA_BASE + (16 << 20), "{f}");
        assert!(f.what.contains("not the normal world's RAM"), "{f}");
    }
    // Physical addresses handed to a Trusty VM: it can map only grants.
    let (_, faults) = forced("xen-domu-trusty-vm", Mechanism::Phys);
    let f = faults.first().expect("a fault");
    assert_eq!(f.mechanism, "xen-grant");
    assert!(f.what.contains("not a grant reference"), "{f}");
    // Addresses without the mediator that would rewrite them.
    let (_, faults) = forced("xen-domu-ffa-mediator", Mechanism::MediatedIpa);
    assert!(!faults.is_empty());
}

#[test]
fn share_budget_holds_under_the_ffa_mediator() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let (_, sim, r) = up("xen-domu-ffa-mediator", mode, StackConfig::default());
        let (mut dev, info) = r.expect("bring-up");
        assert_eq!(info.plan.share_budget, Some(32));
        assert!(trusty_platform::decision::fits_budget(&info.plan));
        // More messages than tx buffers, several channels at once.
        let chans: Vec<_> = (0..4).map(|_| dev.connect(DATASINK).unwrap()).collect();
        for round in 0..50u8 {
            for &c in &chans {
                assert_eq!(dev.send(c, &[&[round; 64]], &[], Timeout::Ms(2000)), Ok(64));
            }
        }
        for _ in 0..20 {
            echo(&mut dev, &[7u8; 2000]);
        }
        for c in chans {
            dev.close(c).unwrap();
        }
        let s = sim.model().stats().shares;
        assert!(s.max_live <= 32, "live shares peaked at {}", s.max_live);
        assert_eq!(s.over_cap, 0, "the stack never asked for a 33rd share");
        assert!(sim.model().faults().is_empty());
    }
}

#[test]
fn trusty_mediator_allows_single_page_buffers_only() {
    let (_, _, r) = up("xen-domu-trusty-mediator", ModelMode::Sync, StackConfig::default());
    let (_, info) = r.expect("bring-up");
    assert_eq!(info.plan.max_buffer_pages, Some(1));
}

#[test]
fn an_unreadable_device_tree_is_a_clear_error_and_nothing_is_shared() {
    let profile = by_name("native-api5").expect("profile");
    let sim = profile.boot(ModelMode::Sync);
    let mut access = profile.access(&sim);
    access.fdt = b"not a device tree".to_vec();
    let e = bring_up_platform(access, StackConfig::default()).err().expect("must fail");
    assert!(matches!(e, BringUpError::DeviceTree(_)), "{e}");
    assert!(e.to_string().starts_with("device tree:"), "{e}");
    assert_eq!(sim.model().stats().smcs, 0, "no call before the facts are known");
    assert_eq!(sim.ram().pages_in_use(), 0);
}

// --- Xen's FF-A mediator, version by version (spec xen-ffa-mediator.md §4.3) ------------------

use trusty_platform::ffa::{self, func, FfaSharer};
use trusty_platform::mem::{Access, Sharer};

/// The development branch: FFA_RUN forwarded, so the stack runs; its plan shares read-write
/// only (Xen refuses read-only), at most 256 pages, and no share was refused by the mediator.
#[test]
fn newer_mediator_runs_with_read_write_shares() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let (_, sim, r) = up("xen-domu-ffa-mediator", mode, StackConfig::default());
        let (mut dev, info) = r.unwrap_or_else(|e| panic!("{e}"));
        let m = info.facts.mediator.expect("the mediator was probed");
        assert_eq!(m.version, 0x1_0002, "the development branch speaks FF-A 1.2");
        assert!(m.run && m.direct_req && m.mem_share && m.mem_reclaim, "{m:?}");
        assert!(!info.plan.read_only_shares);
        assert_eq!(info.plan.max_buffer_pages, Some(256));
        for size in [1usize, 4080] {
            echo(&mut dev, &vec![0x33; size]);
        }
        let (_, result) = dev.shutdown();
        result.expect("teardown");
        let m = sim.model();
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        assert_eq!(m.stats().xen_ffa_refused_shares, 0, "tx buffers reached Xen read-only");
        assert_eq!(m.live_shares(), 0);
    }
}

/// Xen 4.20 / 4.21: no FFA_RUN. Bring-up stops before any call to Trusty, naming FFA_RUN and the
/// Xen versions that forward it, with the plan it could not carry out; nothing else is tried.
#[test]
fn mediator_4_20_is_refused_at_once_naming_ffa_run() {
    let (_, sim, r) = up("xen-domu-ffa-mediator-4.20", ModelMode::Sync, StackConfig::default());
    let e = r.err().expect("must fail");
    let BringUpError::Unusable { plan, error } = &e else { panic!("wrong error: {e}") };
    assert!(error.missing.contains("FFA_RUN") && error.missing.contains("4.20 and 4.21"), "{error}");
    assert!(error.missing.contains("development branch"), "{error}");
    assert_eq!((plan.mechanism, plan.transport), (Mechanism::FfaHandle, CallTransport::FfaDirect));
    assert_eq!(plan.max_buffer_pages, Some(255), "4.20's page limit");
    assert!(e.to_string().contains("FFA_RUN") && e.to_string().contains("sharing: ffa-handle"), "{e}");
    let m = sim.model();
    let s = m.stats();
    assert_eq!((s.plain_trusty_smcs, s.ffa_direct_requests, s.refused_smcs), (0, 0, 0), "{s:?}");
    assert!(!m.rxtx_mapped(), "not even the FF-A buffers were set up");
    assert_eq!(sim.ram().pages_in_use(), 0);
}

fn ffa_version(conduit: &dyn trusty_platform::smc::Conduit) -> u64 {
    conduit.call([u64::from(func::VERSION), u64::from(ffa::VERSION_1_0), 0, 0, 0, 0, 0, 0])[0]
}

/// A read-only share that reaches the mediator stand-in gets Xen's NOT_SUPPORTED
/// (`ffa_handle_mem_share()`: access other than FFA_MEM_ACC_RW), on both versions; the same
/// buffer shared read-write is taken.
#[test]
fn read_only_share_gets_xens_not_supported() {
    for name in ["xen-domu-ffa-mediator", "xen-domu-ffa-mediator-4.20"] {
        let profile = by_name(name).unwrap();
        let sim = profile.boot(ModelMode::Sync);
        let mut access = profile.access(&sim);
        assert_ne!(ffa_version(&*access.conduit) as u32 & 0x8000_0000, 0x8000_0000);
        let mut sharer = FfaSharer::with_fragments(access.conduit.clone(), &mut *access.allocator, None, false).unwrap();
        let page = access.allocator.alloc_zeroed(1).unwrap();
        let e = sharer.share(&[page.range()], Access::ReadOnly).unwrap_err();
        assert_eq!(e, trusty_platform::Error::Ffa { call: "FFA_MEM_SHARE", code: ffa::err::NOT_SUPPORTED }, "{name}");
        assert_eq!(sim.model().stats().xen_ffa_refused_shares, 1, "{name}: refused by Xen, not the SPMC");
        assert_eq!(sim.model().live_shares(), 0);
        // What the stack does under the mediator: a read-only share of someone else's memory is
        // refused before it reaches Xen; the stack's own buffers are shared read-write.
        sharer.set_read_only_shares(false);
        assert!(matches!(sharer.share(&[page.range()], Access::ReadOnly), Err(trusty_platform::Error::InvalidArgument(_))));
        assert_eq!(sim.model().stats().xen_ffa_refused_shares, 1, "{name}: nothing more reached Xen");
        let mut mem = trusty_platform::mem::SharedMemory::new(access.allocator, Box::new(sharer));
        let buf = mem.alloc_shared(100, Access::ReadOnly).expect(name);
        assert_eq!(buf.access(), Access::ReadWrite);
        assert_eq!(sim.model().live_shares(), 1);
        mem.release(buf).unwrap();
        assert_eq!(sim.model().live_shares(), 0);
    }
}

/// Plain Trusty SMCs from behind the mediator come back as FFA_ERROR (x0 = 0x84000060,
/// w2 = NOT_SUPPORTED), not -1; the newer branch refuses any call before FFA_VERSION.
#[test]
fn mediator_answers_like_xen_before_and_outside_ff_a() {
    use trusty_platform::smc::call;
    for name in ["xen-domu-ffa-mediator", "xen-domu-ffa-mediator-4.20"] {
        let profile = by_name(name).unwrap();
        let sim = profile.boot(ModelMode::Sync);
        let c = sim.conduit();
        let id_get = c.call([u64::from(func::ID_GET), 0, 0, 0, 0, 0, 0, 0]);
        if name.ends_with("4.20") {
            assert_eq!(id_get[0] as u32, func::SUCCESS, "4.20 serves calls before FFA_VERSION");
        } else {
            assert_eq!((id_get[0] as u32, id_get[2] as u32 as i32), (func::ERROR, ffa::err::NOT_SUPPORTED));
        }
        let v = ffa_version(&*c);
        assert_eq!(v, if name.ends_with("4.20") { 0x1_0001 } else { 0x1_0002 }, "{name}");
        let r = c.call([u64::from(call::FC_GET_VERSION_STR), u64::from(u32::MAX), 0, 0, 0, 0, 0, 0]);
        assert_eq!((r[0], r[2] as u32 as i32), (0x8400_0060, ffa::err::NOT_SUPPORTED), "{name}");
        let run = c.call([u64::from(func::FEATURES), u64::from(func::RUN), 0, 0, 0, 0, 0, 0]);
        let expect_run = !name.ends_with("4.20");
        assert_eq!(run[0] as u32 == func::SUCCESS, expect_run, "{name}: FFA_FEATURES(FFA_RUN)");
        let run = c.call([u64::from(func::RUN), u64::from(ffa::TRUSTY_ENDPOINT_ID) << 16, 0, 0, 0, 0, 0, 0]);
        assert_eq!(run[0] as u32 == func::ERROR, !expect_run, "{name}: FFA_RUN");
        assert_eq!(sim.model().stats().plain_trusty_smcs, 0);
    }
}

/// An FFA_INTERRUPT answer to a direct request passes the newer mediator and becomes ABORTED
/// on 4.20 (`handle_msg_send_direct_req()`).
#[test]
fn preempted_direct_request_is_aborted_by_4_20_only() {
    for name in ["xen-domu-ffa-mediator", "xen-domu-ffa-mediator-4.20"] {
        let profile = by_name(name).unwrap();
        let sim = profile.boot(ModelMode::Sync);
        let c = sim.conduit();
        ffa_version(&*c);
        sim.model().inject.ffa_interrupt = 1;
        let own = u64::from(profile.machine.model.ns_endpoint_id);
        let x1 = (own << 16) | u64::from(ffa::TRUSTY_ENDPOINT_ID);
        let op = u64::from(trusty_platform::ffa_call::opcode::IS_IDLE);
        let r = c.call([u64::from(func::MSG_SEND_DIRECT_REQ), x1, 0, op, 0, 0, 0, 0]);
        if name.ends_with("4.20") {
            assert_eq!((r[0] as u32, r[2] as u32 as i32), (func::ERROR, ffa::err::ABORTED), "{name}");
        } else {
            assert_eq!(r[0] as u32, func::INTERRUPT, "{name}");
        }
    }
}

/// The EL3 image's SPMC face (tests/qemu-images el3-trusty): FFA_VERSION 1.1 (the least Xen's
/// mediator accepts) and FFA_RUN with the direct-request and memory calls in FFA_FEATURES;
/// the normal-world stack still runs over it natively.
#[test]
fn spmc_answers_ff_a_1_1_with_ffa_run() {
    let cfg = trusty_model::ModelConfig { ffa: true, max_api_version: 5, spmc_ffa_version: 0x1_0001, ..Default::default() };
    let sim = Sim::with_stage2(ModelMode::Sync, cfg, trusty_model::host::Stage2::Identity);
    let c = sim.conduit();
    assert_eq!(ffa_version(&*c), 0x1_0001);
    for fid in [func::RUN, func::MSG_SEND_DIRECT_REQ, func::MEM_SHARE, func::MEM_RECLAIM, func::PARTITION_INFO_GET] {
        let r = c.call([u64::from(func::FEATURES), u64::from(fid), 0, 0, 0, 0, 0, 0]);
        assert_eq!(r[0] as u32, func::SUCCESS, "FFA_FEATURES({fid:#x})");
    }
    let (mut dev, info) = trusty_stack::bring_up(sim.conduit(), sim.clock(), sim.allocator(), StackConfig::default()).expect("bring-up");
    assert_eq!(info.plan.mechanism, Mechanism::FfaHandle);
    echo(&mut dev, b"over an FF-A 1.1 SPMC");
}

/// Under the mediator a client's read-only memory reference is refused with a clear error
/// before anything reaches Xen (widening it to read-write is not the stack's to do); the same
/// pages read-write go through, and the channel keeps working.
#[test]
fn read_only_memref_under_the_mediator_is_refused_not_widened() {
    let (_, sim, r) = up("xen-domu-ffa-mediator", ModelMode::Sync, StackConfig::default());
    let (mut dev, _) = r.expect("bring-up");
    let mut alloc = sim.allocator();
    let page = alloc.alloc_zeroed(1).unwrap();
    let memref = |access| tipc::ForeignMemRef { ranges: vec![page.range()], size: 4096, access, tag: 0, keep: Box::new(()) };
    let ch = dev.connect(DATASINK).expect("connect");
    let e = dev.send_memrefs(ch, &[b"ro"], vec![memref(Access::ReadOnly)], Timeout::Ms(1000)).unwrap_err();
    assert!(e.to_string().contains("read-write shares only"), "{e}");
    assert_eq!(sim.model().stats().xen_ffa_refused_shares, 0, "nothing reached Xen");
    dev.send_memrefs(ch, &[b"rw"], vec![memref(Access::ReadWrite)], Timeout::Ms(1000)).expect("read-write memref");
    dev.close(ch).expect("close");
    echo(&mut dev, b"still working");
    let (_, result) = dev.shutdown();
    result.expect("teardown");
    assert!(sim.model().faults().is_empty());
}
