//! Teardown gives back everything bring-up took: shares, pages, and FF-A's RX/TX pair
//! (FFA_RXTX_UNMAP, as Linux's arm_ffa driver does in `ffa_rxtx_unmap()` at teardown).

use conformance::{Rig, ECHO};
use trusty_stack::{bring_up, StackConfig};
use trusty_model::host::{ModelMode, Sim};
use trusty_model::ModelConfig;
use trusty_platform::ffa::{err, func};

fn ffa(sim: &Sim, regs: [u64; 8]) -> (u32, i32) {
    let out = sim.conduit().call(regs);
    (out[0] as u32, out[2] as u32 as i32)
}

#[test]
fn every_bring_up_unmaps_and_frees_its_rxtx_pair() {
    // Before the fix each bring-up kept 2 pages mapped for good: a few thousand bring-ups on
    // one machine ran out of memory (the simulated RAM here has 4096 pages).
    let mut rig = Rig::new(ModelMode::Sync);
    for round in 0..3 {
        rig.echo_once(b"hello");
        assert!(rig.sim.model().rxtx_mapped(), "round {round}: mapped while up");
        rig.shutdown_clean();
        assert!(!rig.sim.model().rxtx_mapped(), "round {round}: FFA_RXTX_UNMAP at teardown");
        assert_eq!(rig.sim.ram().pages_in_use(), 0, "round {round}: RX/TX pages freed");
        assert_eq!(rig.sim.model().stats().shares.rxtx_refused, 0, "no map was refused");
        let (dev, _) = bring_up(rig.sim.conduit(), rig.sim.clock(), rig.sim.allocator(), StackConfig::default())
            .expect("bring-up again on the same machine");
        rig.dev = Some(dev);
    }
    rig.shutdown_clean();
}

#[test]
fn a_thousand_bring_ups_fit_in_a_small_machine() {
    // 1000 bring-ups x 2 RX/TX pages would exceed the 4096 pages of simulated RAM if any leaked.
    let sim = Sim::new(ModelMode::Sync, ModelConfig::default());
    for i in 0..1000 {
        let (dev, _) = bring_up(sim.conduit(), sim.clock(), sim.allocator(), StackConfig::default())
            .unwrap_or_else(|e| panic!("bring-up {i}: {e}"));
        let (bus, result) = dev.shutdown();
        result.unwrap_or_else(|e| panic!("teardown {i}: {e}"));
        drop(bus);
        assert_eq!(sim.ram().pages_in_use(), 0, "after bring-up {i}");
    }
    assert_eq!(sim.model().live_shares(), 0);
}

#[test]
fn the_model_refuses_a_second_rxtx_map_and_an_unmap_of_nothing() {
    // FF-A v1.0: FFA_RXTX_MAP while a pair is mapped is DENIED (Xen's mediator and Hafnium do
    // the same); FFA_RXTX_UNMAP with nothing mapped is INVALID_PARAMETERS.
    let sim = Sim::new(ModelMode::Sync, ModelConfig::default());
    let mut alloc = sim.allocator();
    let (tx, rx) = (alloc.alloc_zeroed(1).unwrap(), alloc.alloc_zeroed(1).unwrap());
    let map = [u64::from(func::RXTX_MAP64), tx.paddr(), rx.paddr(), 1, 0, 0, 0, 0];
    let unmap = [u64::from(func::RXTX_UNMAP), 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(ffa(&sim, unmap), (func::ERROR, err::INVALID_PARAMETERS));
    assert_eq!(ffa(&sim, map).0, func::SUCCESS);
    assert_eq!(ffa(&sim, map), (func::ERROR, err::DENIED));
    // Another endpoint's id in w1 is not ours to unmap.
    assert_eq!(ffa(&sim, [u64::from(func::RXTX_UNMAP), 7 << 16, 0, 0, 0, 0, 0, 0]), (func::ERROR, err::INVALID_PARAMETERS));
    assert_eq!(ffa(&sim, unmap).0, func::SUCCESS);
    assert!(!sim.model().rxtx_mapped());
    assert_eq!(ffa(&sim, map).0, func::SUCCESS, "mapped again after the unmap");
    assert_eq!(sim.model().stats().shares.rxtx_refused, 3);
}

#[test]
fn a_stale_pair_from_a_run_without_teardown_is_replaced() {
    // A guest that reboots without teardown left its pair mapped: the next bring-up is answered
    // DENIED, unmaps the stale pair and maps its own.
    let sim = Sim::new(ModelMode::Sync, ModelConfig::default());
    let (dev, _) = bring_up(sim.conduit(), sim.clock(), sim.allocator(), StackConfig::default()).unwrap();
    std::mem::forget(dev);
    let (mut dev, _) = bring_up(sim.conduit(), sim.clock(), sim.allocator(), StackConfig::default())
        .expect("bring-up after a reboot without teardown");
    let ch = dev.connect(ECHO).unwrap();
    dev.close(ch).unwrap();
    assert_eq!(sim.model().stats().shares.rxtx_refused, 1, "the second map was refused once");
    assert!(sim.model().rxtx_mapped());
}

#[test]
fn a_refused_unmap_keeps_the_pages() {
    // If the producer will not unmap, it may still write the RX buffer: the pages are leaked,
    // never freed, and teardown says so.
    let hostile = conformance::hostile::Peer::new(ModelMode::Sync, ModelConfig::default());
    let mut rig = hostile.bring_up(StackConfig::default()).expect("bring-up");
    hostile.before(|_, regs| {
        (regs[0] as u32 == func::RXTX_UNMAP).then_some([u64::from(func::ERROR), 0, err::DENIED as u32 as u64, 0, 0, 0, 0, 0])
    });
    let dev = rig.dev.take().unwrap();
    let (bus, result) = dev.shutdown();
    assert!(result.is_err(), "the refused unmap is reported");
    assert!(rig.sim.model().rxtx_mapped());
    drop(bus);
    assert_eq!(rig.sim.ram().pages_in_use(), 2, "the RX/TX pair stays allocated");
}
