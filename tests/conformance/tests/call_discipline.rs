//! Call discipline and memory ids against the model, as Linux's drivers/trusty/trusty.c and
//! trusty-virtio.c behave (issue 8 §1, §2): optional version string, attributed descriptor-page
//! ids below API 4, a Trusty VM slower than the mailbox timeout, FF-A interrupts, and a call
//! left pending by a timeout that is collected before any fresh call.

use std::time::{Duration, Instant};

use conformance::Rig;
use platforms::by_name;
use tipc::stack::{bring_up_platform, StackConfig};
use tipc::Timeout;
use trusty_model::host::ModelMode;
use trusty_model::ModelConfig;
use trusty_platform::plan::Mechanism;

const ECHO: &str = "com.android.ipc-unittest.srv.echo";

fn echo(dev: &mut tipc::TipcDevice, payload: &[u8]) {
    let ch = dev.connect(ECHO).expect("connect");
    dev.send(ch, &[payload], &[], Timeout::Ms(1000)).expect("send");
    let mut buf = vec![0u8; 4096];
    let n = dev.recv(ch, &mut [&mut buf], Timeout::Ms(2000)).expect("reply");
    assert_eq!(&buf[..n], payload);
    dev.close(ch).expect("close");
}

/// Linux trusty_init_version only logs a failed SMC_FC_GET_VERSION_STR; bring-up goes on.
#[test]
fn a_trusty_without_a_version_string_still_comes_up() {
    let model = ModelConfig { has_version_str: false, ..Default::default() };
    let mut rig = Rig::with(ModelMode::Sync, model, StackConfig::default(), |_| {});
    rig.echo_once(b"no version string");
    rig.shutdown_clean();
}

/// Trusty before 2019 at API 3: GET_DESCR/START/STOP decode their id with
/// sm_decode_ns_memory_attr and refuse a bare address; vrings and buffers are bare addresses.
#[test]
fn api_3_descriptor_page_id_carries_memory_attributes() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let mut profile = by_name("native-api4").expect("profile");
        profile.machine.model.max_api_version = 3;
        profile.machine.model.mem_buf_attrs_required = true;
        let sim = profile.boot(mode);
        let (mut dev, info) =
            bring_up_platform(profile.access(&sim), StackConfig::default()).unwrap_or_else(|e| panic!("bring-up: {e}"));
        assert_eq!(info.api_version, 3);
        assert_eq!(info.plan.mechanism, Mechanism::Phys);
        echo(&mut dev, b"api 3");
        let (bus, result) = dev.shutdown();
        result.expect("STOP with the attributed id is accepted too");
        assert_eq!(bus.mem_ref().leaked(), Default::default());
        let m = sim.model();
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        drop(m);
        assert_eq!(sim.ram().pages_in_use(), 0, "every page freed");
    }
}
