//! Call discipline and memory ids against the model, as Linux's drivers/trusty/trusty.c and
//! trusty-virtio.c behave (issue 8 §1, §2): optional version string, attributed descriptor-page
//! ids below API 4, a Trusty VM slower than the mailbox timeout, FF-A interrupts, and a call
//! left pending by a timeout that is collected before any fresh call.

use conformance::echo;
use std::time::{Duration, Instant};

use conformance::Rig;
use platforms::by_name;
use trusty_stack::{bring_up_platform, StackConfig};
use trusty_model::host::ModelMode;
use trusty_model::ModelConfig;
use trusty_platform::plan::Mechanism;

const ECHO: &str = "com.android.ipc-unittest.srv.echo";

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

/// A Trusty VM slower than the guest's mailbox timeout: every call is executed exactly once
/// (a timeout is not BUSY; the late answer is collected by RESTART_LAST, never re-sent).
#[test]
fn a_trusty_vm_slower_than_the_mailbox_timeout_runs_each_call_once() {
    let profile = by_name("xen-domu-trusty-vm").expect("profile");
    let sim = profile.boot(ModelMode::Threaded);
    {
        let mut m = sim.model();
        m.inject.mailbox_slow_std_calls = 3; // GET_DESCR, VDEV_RESET, START
        m.inject.mailbox_delay_ms = 80;
    }
    let cfg = StackConfig { mailbox_timeout_ms: 20, ..Default::default() };
    let (mut dev, _) = bring_up_platform(profile.access(&sim), cfg).unwrap_or_else(|e| panic!("bring-up: {e}"));
    let issued = dev.bus().trusty_ref().stats().std_calls;
    assert_eq!(sim.model().stats().std_calls, issued, "each standard call executed once");
    assert!(dev.bus().trusty_ref().stats().restart_last >= 3, "late answers collected by RESTART_LAST");
    echo(&mut dev, b"after a slow VM");
    let (_, result) = dev.shutdown();
    result.expect("teardown");
    let m = sim.model();
    assert!(m.faults().is_empty(), "{:?}", m.faults());
}

/// A Trusty VM that stops answering: the operation ends with a clear error within the stated
/// limit, the request it took is never published again, and no fresh standard call follows
/// while the old one is outstanding.
#[test]
fn a_trusty_vm_that_never_answers_ends_with_a_clear_error() {
    let profile = by_name("xen-domu-trusty-vm").expect("profile");
    let sim = profile.boot(ModelMode::Threaded);
    let limit_ms = 300;
    let cfg = StackConfig {
        mailbox_timeout_ms: 20,
        calls: trusty_platform::trusty::CallPolicy { std_call_timeout_ms: limit_ms, ..Default::default() },
        ..Default::default()
    };
    let (mut dev, _) = bring_up_platform(profile.access(&sim), cfg).unwrap_or_else(|e| panic!("bring-up: {e}"));
    sim.model().inject.mailbox_silent = true;
    let start = Instant::now();
    let e = dev.connect(ECHO).expect_err("a silent Trusty VM cannot connect");
    let took = start.elapsed();
    assert!(matches!(e, tipc::Error::Bus(trusty_virtio::BusError::Platform(trusty_platform::Error::Timeout { .. }))), "{e}");
    assert!(took < Duration::from_millis(limit_ms + 1000), "{took:?}");
    let seen = sim.model().stats().mailbox_unanswered;
    assert_eq!(seen, 1, "the one request taken was never published again");
    // A later operation does not publish anything new either while that answer is outstanding.
    let _ = dev.connect(ECHO);
    assert_eq!(sim.model().stats().mailbox_unanswered, 1);
}

/// Linux's arm_ffa driver follows FFA_INTERRUPT with FFA_RUN until the direct request (or the
/// run) finishes; bring-up and traffic go through interrupts on both.
#[test]
fn ffa_interrupts_are_followed_with_ffa_run() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let profile = by_name("xen-domu-ffa-mediator").expect("profile");
        let sim = profile.boot(mode);
        sim.model().inject.ffa_interrupt = 7;
        let (mut dev, _) =
            bring_up_platform(profile.access(&sim), StackConfig::default()).unwrap_or_else(|e| panic!("bring-up: {e}"));
        assert_eq!(sim.model().inject.ffa_interrupt, 0, "every interrupt was met");
        sim.model().inject.ffa_interrupt = 5;
        echo(&mut dev, b"through FFA_INTERRUPT");
        let (_, result) = dev.shutdown();
        result.expect("teardown");
        let m = sim.model();
        assert!(m.faults().is_empty(), "{:?}", m.faults());
        assert_eq!(m.live_shares(), 0);
    }
}

/// A partition that answers FFA_INTERRUPT for ever: the operation ends with a clear error within
/// the limit, and nothing is sent to Trusty afterwards (the transport is declared failed).
#[test]
fn ffa_interrupt_forever_ends_with_a_clear_error() {
    let profile = by_name("xen-domu-ffa-mediator").expect("profile");
    let sim = profile.boot(ModelMode::Sync);
    let limit_ms = 300;
    let cfg = StackConfig {
        calls: trusty_platform::trusty::CallPolicy { std_call_timeout_ms: limit_ms, ..Default::default() },
        ..Default::default()
    };
    let (mut dev, _) = bring_up_platform(profile.access(&sim), cfg).unwrap_or_else(|e| panic!("bring-up: {e}"));
    sim.model().inject.ffa_interrupt = u32::MAX;
    let start = Instant::now();
    let e = dev.connect(ECHO).expect_err("no connect through endless interrupts");
    assert!(start.elapsed() < Duration::from_millis(3 * limit_ms + 1000), "{:?}", start.elapsed());
    assert!(
        matches!(e, tipc::Error::Bus(trusty_virtio::BusError::Platform(trusty_platform::Error::TransportFailed(_)))),
        "{e}"
    );
    assert!(e.to_string().contains("FFA_INTERRUPT"), "{e}");
    let requests = sim.model().stats().ffa_direct_requests;
    let _ = dev.connect(ECHO);
    assert_eq!(sim.model().stats().ffa_direct_requests, requests, "no request after the failure");
}

/// A Trusty that keeps GET_DESCR unfinished past the limit: the descriptor page it was given
/// is leaked, not freed (Trusty may still write it when it finishes), and the id it was given
/// carried memory attributes even at API < 4.
#[test]
fn a_page_a_pending_call_may_still_use_is_leaked_not_freed() {
    use std::sync::{Arc, Mutex};
    use trusty_platform::mem::SharedMemory;
    use trusty_platform::phys::{decode_compat, AddressKind, AddressSharer};
    use trusty_platform::smc::{call, Conduit, SmError};
    use trusty_platform::trusty::{CallPolicy, Trusty};

    /// GET_DESCR is taken and never finishes; NOPs complete.
    struct Stuck(Mutex<Vec<[u64; 8]>>);
    impl Conduit for Stuck {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            self.0.lock().unwrap().push(regs);
            let r = if regs[0] as u32 == call::SC_NOP { SmError::NopDone } else { SmError::Interrupted };
            [u64::from(r.code() as u32), 0, 0, 0, 0, 0, 0, 0]
        }
    }
    let sim = trusty_model::host::Sim::new(ModelMode::Sync, ModelConfig::default());
    let stuck = Arc::new(Stuck(Mutex::new(Vec::new())));
    let policy = CallPolicy { std_call_timeout_ms: 100, ..Default::default() };
    let trusty = Trusty::new(stuck.clone(), sim.clock(), policy);
    let mem = SharedMemory::new(sim.allocator(), Box::new(AddressSharer::new(AddressKind::Bare)));
    let mut bus = trusty_virtio::Bus::new(trusty, mem);
    let e = bus.fetch_descriptor().expect_err("GET_DESCR never finishes");
    assert!(matches!(e, trusty_virtio::BusError::Platform(trusty_platform::Error::Timeout { .. })), "{e}");
    assert!(bus.trusty_ref().pending_call().is_some());
    assert_eq!(bus.mem_ref().leaked().pages, 1, "the descriptor page is kept");
    assert_eq!(sim.ram().pages_in_use(), 1);
    let first = stuck.0.lock().unwrap()[0];
    assert_eq!(first[0] as u32, call::SC_VIRTIO_GET_DESCR);
    let id = first[1] | (first[2] << 32);
    assert!(decode_compat(id).is_ok(), "GET_DESCR's id {id:#x} carries memory attributes");
}
