//! The sharing decision on every platform profile, proven against a secure side that can only
//! touch what it was given (spec dma-decisions.md §6, §7).

use platforms::{by_name, Profile};
use tipc::stack::{bring_up_platform, BringUp, BringUpError, StackConfig};
use tipc::{Timeout, TipcDevice};
use trusty_model::host::{ModelMode, Sim};
use trusty_platform::plan::{CallTransport, Mechanism};

const ECHO: &str = "com.android.ipc-unittest.srv.echo";
const DATASINK: &str = "com.android.ipc-unittest.srv.datasink";

fn up(name: &str, mode: ModelMode, cfg: StackConfig) -> (Profile, Sim, Result<(TipcDevice, BringUp), BringUpError>) {
    let profile = by_name(name).expect("profile");
    let sim = profile.boot(mode);
    let r = bring_up_platform(profile.access(&sim), cfg);
    (profile, sim, r)
}

fn echo(dev: &mut TipcDevice, payload: &[u8]) {
    let ch = dev.connect(ECHO).expect("connect");
    dev.send(ch, &[payload], &[], Timeout::Ms(1000)).expect("send");
    let mut buf = vec![0u8; 4096];
    let n = dev.recv(ch, &mut [&mut buf], Timeout::Ms(2000)).expect("reply");
    assert_eq!(&buf[..n], payload);
    dev.close(ch).expect("close");
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
