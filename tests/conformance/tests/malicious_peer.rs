//! A secure side that writes nonsense: the stack must drop it, count it, and carry on.

use conformance::Rig;
use trusty_stack::StackConfig;
use tipc::{DeviceState, Error};
use trusty_model::host::ModelMode;
use trusty_model::{Malformed, ModelConfig};
use trusty_virtio::rsc::{self, RscError};
use trusty_virtio::BusError;

#[test]
fn garbage_frames_never_panic_the_stack() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let mut rig = Rig::new(mode);
        for seed in 1..=400u64 {
            rig.sim.model().send_malformed(Malformed::Garbage(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            if seed % 20 == 0 {
                rig.dev().pump().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
                rig.dev().pump().unwrap();
                // Garbage may carry GO_OFFLINE; otherwise the device must still work.
                if rig.dev().state() == DeviceState::Online {
                    rig.echo_once(b"still here");
                }
            }
        }
        rig.assert_no_faults();
    }
}

fn bring_up_with_table(table: Vec<u8>) -> (Error, usize) {
    let model = ModelConfig { descriptor_override: Some(table), ..Default::default() };
    match Rig::try_with(ModelMode::Sync, model, StackConfig::default(), |_| {}) {
        Ok(_) => panic!("bring-up must fail"),
        Err((e, sim)) => (e, sim.ram().pages_in_use()),
    }
}

#[test]
fn malformed_resource_tables_fail_bring_up_and_release_everything() {
    let good = rsc::default_tipc_table("dev0");
    let mut bad_version = good.clone();
    bad_version[0] = 9;
    let (e, pages) = bring_up_with_table(bad_version);
    assert_eq!(e, Error::Bus(BusError::Descriptor(RscError::BadVersion(9))));
    assert_eq!(pages, conformance::RXTX_PAGES, "the descriptor page was released");

    let mut bad_offset = good.clone();
    bad_offset[16..20].copy_from_slice(&4000u32.to_le_bytes());
    let (e, _) = bring_up_with_table(bad_offset);
    assert!(matches!(e, Error::Bus(BusError::Descriptor(RscError::BadOffset { .. }))), "{e:?}");

    let mut too_large = good.clone();
    too_large[40..44].copy_from_slice(&400u32.to_le_bytes());
    let (e, _) = bring_up_with_table(too_large);
    assert!(matches!(e, Error::Bus(BusError::Descriptor(RscError::VdevTooLarge { .. }))), "{e:?}");

    // A table without a TIPC device: no device, nothing left shared.
    let rings = [rsc::VringDecl { align: 4096, num: 8, notifyid: 1 }];
    let other = rsc::TableBuilder::new().vdev(1, 0, &rings, &[]).build();
    let (e, pages) = bring_up_with_table(other);
    assert_eq!(e, Error::NoDevice);
    assert_eq!(pages, conformance::RXTX_PAGES);

    // One vring instead of two: refused before anything is started.
    let one_ring = rsc::TableBuilder::new().vdev(13, 0, &rings, &rsc::tipc_config(4096, 4096, "dev0")).build();
    let (_, pages) = bring_up_with_table(one_ring);
    assert_eq!(pages, conformance::RXTX_PAGES);

    // A ring size that is not a power of two.
    let odd = [rsc::VringDecl { align: 4096, num: 33, notifyid: 1 }, rsc::VringDecl { align: 4096, num: 32, notifyid: 2 }];
    let odd = rsc::TableBuilder::new().vdev(13, 0, &odd, &rsc::tipc_config(4096, 4096, "dev0")).build();
    let (_, pages) = bring_up_with_table(odd);
    assert_eq!(pages, conformance::RXTX_PAGES);
}
