//! The model's secure-side rules, checked with raw calls (spec §2, §3.3, §5).

use trusty_model::host::{ModelMode, Sim};
use trusty_model::{ModelConfig, Variant};
use trusty_platform::ffa::{self, func};
use trusty_platform::mem::{Access, PageAllocator, SharedMemory};
use trusty_platform::smc::{call, SmError};

fn sim() -> Sim {
    Sim::new(ModelMode::Sync, ModelConfig::default())
}

fn raw(sim: &Sim, fid: u32, a: [u32; 3]) -> i32 {
    sim.conduit().call([u64::from(fid), u64::from(a[0]), u64::from(a[1]), u64::from(a[2]), 0, 0, 0, 0])[0] as u32 as i32
}

#[test]
fn api_version_is_min_of_asked_and_supported_then_locked() {
    let s = Sim::new(ModelMode::Sync, ModelConfig { max_api_version: 4, ..Default::default() });
    assert_eq!(raw(&s, call::FC_API_VERSION, [9, 0, 0]), 4);
    assert_eq!(raw(&s, call::FC_API_VERSION, [3, 0, 0]), 3);
    // GET_DESCR uses the version: lower requests no longer lower it (spec §2.4).
    raw(&s, call::SC_VIRTIO_GET_DESCR, [0, 0, 4096]);
    assert_eq!(raw(&s, call::FC_API_VERSION, [1, 0, 0]), 3);
    assert_eq!(raw(&s, call::FC_API_VERSION, [4, 0, 0]), 3, "nor do higher ones raise it (smc_sm_api_version)");
}

#[test]
fn version_string_by_index() {
    let s = sim();
    let len = raw(&s, call::FC_GET_VERSION_STR, [u32::MAX, 0, 0]);
    assert!(len > 0);
    assert_eq!(raw(&s, call::FC_GET_VERSION_STR, [0, 0, 0]), i32::from(b'T'));
    assert_eq!(raw(&s, call::FC_GET_VERSION_STR, [len as u32, 0, 0]), SmError::InvalidParameters.code());
}

#[test]
fn std_call_state_machine() {
    let s = sim();
    assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::UnexpectedRestart.code());
    s.model().inject.fiq_interrupted = 1;
    assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::FiqInterrupted.code());
    assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::InterleavedSmc.code());
    assert_eq!(raw(&s, call::SC_NOP, [0; 3]), SmError::InterleavedSmc.code());
    // The restarted call completes with its own result (bus not active: bad state -> -7).
    assert_eq!(raw(&s, call::SC_RESTART_FIQ, [0; 3]), SmError::InternalFailure.code());
    s.model().inject.interrupted = 1;
    assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::Interrupted.code());
    assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::Busy.code(), "one std call at a time");
    assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::InternalFailure.code());
    // CPU_IDLE is for a client at API >= 2 (sm_get_stdcall_ret()).
    assert_eq!(raw(&s, call::FC_API_VERSION, [5, 0, 0]), 5);
    s.model().inject.cpu_idle = 1;
    assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::CpuIdle.code());
    assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::CpuIdle.code(), "needs NOP progress first");
    assert_eq!(raw(&s, call::SC_NOP, [0; 3]), SmError::NopDone.code());
    assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::InternalFailure.code());
}

#[test]
fn restart_last_of_an_unfinished_call_below_api_2_is_busy() {
    // Trusty lib/sm/sm.c sm_get_stdcall_ret(): a std call that has not finished when the CPU
    // returns to a client below API 2 answers INTERRUPTED, and BUSY once it was restarted
    // (restart_count > 0). The call stays pending: a fresh call is BUSY too, RESTART_LAST
    // finishes it.
    for api in [0u32, 1] {
        let s = sim();
        assert_eq!(raw(&s, call::FC_API_VERSION, [api, 0, 0]), api as i32);
        s.model().inject.cpu_idle = 1;
        assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::Interrupted.code());
        assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::Busy.code(), "restarted, still unfinished");
        assert_eq!(raw(&s, call::SC_VDEV_RESET, [0; 3]), SmError::Busy.code(), "a fresh call while one is pending");
        assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::InternalFailure.code(), "VDEV_RESET's own result");
        assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::UnexpectedRestart.code());
    }
}

#[test]
fn unknown_trusted_os_std_call_is_not_supported() {
    // lib/trusty/smcall.c trusty_sm_stdcall(): default -> ERR_NOT_SUPPORTED -> SM_ERR_NOT_SUPPORTED.
    let s = sim();
    assert_eq!(raw(&s, 0x3200_0077, [0; 3]), SmError::NotSupported.code());
}

#[test]
fn nop_dispatch_by_entity() {
    let s = sim();
    assert_eq!(raw(&s, call::SC_NOP, [0; 3]), SmError::NopDone.code());
    // A kick before the bus is active is refused (ERR_BAD_STATE -> -7).
    assert_eq!(raw(&s, call::SC_NOP, [call::NC_VDEV_KICK_VQ, 0, 1]), SmError::InternalFailure.code());
    assert_eq!(raw(&s, call::SC_NOP, [0x3200_0099, 0, 0]), SmError::NotSupported.code());
    assert_eq!(raw(&s, call::SC_NOP, [0x0100_0001, 0, 0]), SmError::UndefinedSmc.code());
    assert_eq!(raw(&s, 0x3C00_0077, [0; 3]), SmError::UndefinedSmc.code());
}

#[test]
fn bus_state_rules() {
    for variant in Variant::ALL {
        bus_state_rules_of(variant);
    }
}

fn bus_state_rules_of(variant: Variant) {
    let s = Sim::new(ModelMode::Sync, ModelConfig { variant, ..Default::default() });
    assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [0; 3]), SmError::InternalFailure.code(), "STOP before START");
    assert_eq!(raw(&s, call::SC_VIRTIO_START, [0, 0, 128]), SmError::InternalFailure.code(), "START before GET_DESCR");
    let mut alloc = s.allocator();
    let sharer = ffa::FfaSharer::new(s.conduit(), &mut *alloc, None).unwrap();
    let mut mem = SharedMemory::new(alloc, Box::new(sharer));
    let page = mem.alloc_shared(4096, Access::ReadWrite).unwrap();
    let id = page.id();
    assert_eq!(raw(&s, call::SC_VIRTIO_GET_DESCR, [id.lo(), id.hi(), 64]), SmError::InternalFailure.code(), "buffer too small");
    assert_eq!(raw(&s, call::SC_VIRTIO_GET_DESCR, [id.lo(), id.hi(), 4096]), 128);
    assert_eq!(raw(&s, call::SC_VIRTIO_START, [id.lo(), id.hi(), 4096]), SmError::InvalidParameters.code(), "size must match");
    // A client id that differs from GET_DESCR's (x7) is refused (spec §2.7): upstream has no bus
    // for that client (ERR_BAD_STATE), the single-bus tree finds the vdev's client id differs.
    let other = s.conduit().call([u64::from(call::SC_VIRTIO_START), u64::from(id.lo()), u64::from(id.hi()), 128, 0, 0, 0, 7]);
    let refused = match variant {
        Variant::Upstream => SmError::InternalFailure,
        Variant::Nxp => SmError::InvalidParameters,
    };
    assert_eq!(other[0] as u32 as i32, refused.code());
    assert_eq!(raw(&s, call::SC_VIRTIO_START, [id.lo(), id.hi(), 128]), 0);
    assert_eq!(raw(&s, call::SC_VIRTIO_START, [id.lo(), id.hi(), 128]), SmError::InternalFailure.code(), "already active");
    // GET_DESCR while the bus is active: upstream refuses (the client's bus exists); NXP stops
    // the bus first and describes it again.
    let again = raw(&s, call::SC_VIRTIO_GET_DESCR, [id.lo(), id.hi(), 4096]);
    match variant {
        Variant::Upstream => {
            assert_eq!(again, SmError::NotAllowed.code(), "upstream: GET_DESCR only once per bus");
            assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [id.lo(), id.hi(), 128]), 0);
            // STOP removed the bus: START needs a new GET_DESCR, and STOP has nothing to stop.
            assert_eq!(raw(&s, call::SC_VIRTIO_START, [id.lo(), id.hi(), 128]), SmError::InternalFailure.code());
            assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [id.lo(), id.hi(), 128]), SmError::InternalFailure.code());
            // A bus that never started is removed by STOP all the same (answer ERR_BAD_STATE).
            assert_eq!(raw(&s, call::SC_VIRTIO_GET_DESCR, [id.lo(), id.hi(), 4096]), 128);
            assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [id.lo(), id.hi(), 128]), SmError::InternalFailure.code());
            assert_eq!(raw(&s, call::SC_VIRTIO_GET_DESCR, [id.lo(), id.hi(), 4096]), 128, "removed: a new bus");
        }
        Variant::Nxp => {
            assert_eq!(again, 128, "NXP: implicit STOP, then the table");
            assert_eq!(raw(&s, call::SC_VIRTIO_START, [id.lo(), id.hi(), 128]), 0);
            assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [id.lo(), id.hi(), 128]), 0);
            assert_eq!(raw(&s, call::SC_VIRTIO_STOP, [id.lo(), id.hi(), 128]), SmError::InternalFailure.code());
        }
    }
    mem.release(page).unwrap();
}

#[test]
fn share_table_rules() {
    let s = sim();
    let c = s.conduit();
    let ffa_call = |regs: [u64; 8]| c.call(regs);
    // MEM_SHARE before RXTX_MAP has no descriptor to read.
    let r = ffa_call([u64::from(func::MEM_SHARE), 80, 80, 0, 0, 0, 0, 0]);
    assert_eq!(r[0] as u32, func::ERROR);
    let mut alloc = s.allocator();
    let sharer = ffa::FfaSharer::new(s.conduit(), &mut *alloc, Some(2)).unwrap();
    let mut mem = SharedMemory::new(alloc, Box::new(sharer));
    let a = mem.alloc_shared(4096, Access::ReadOnly).unwrap();
    let b = mem.alloc_shared(8192, Access::ReadWrite).unwrap();
    assert_eq!(mem.alloc_shared(4096, Access::ReadWrite).unwrap_err(), trusty_platform::Error::ShareBudgetExhausted { budget: 2 });
    assert_eq!(s.model().live_shares(), 2);
    // Reclaim of an unknown handle.
    let r = ffa_call([u64::from(func::MEM_RECLAIM), 0x1234, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r[0] as u32, func::ERROR);
    assert_eq!(r[2] as u32 as i32, ffa::err::INVALID_PARAMETERS);
    mem.release(a).unwrap();
    mem.release(b).unwrap();
    assert_eq!(s.model().live_shares(), 0);
    assert_eq!(s.model().stats().shares.max_live, 2);
}

#[test]
fn share_cap_in_the_model_is_enforced_and_counted() {
    let s = Sim::new(ModelMode::Sync, ModelConfig { share_cap: Some(1), ..Default::default() });
    let mut alloc = s.allocator();
    let sharer = ffa::FfaSharer::new(s.conduit(), &mut *alloc, None).unwrap();
    let mut mem = SharedMemory::new(alloc, Box::new(sharer));
    let a = mem.alloc_shared(4096, Access::ReadOnly).unwrap();
    let e = mem.alloc_shared(4096, Access::ReadOnly).unwrap_err();
    assert_eq!(e, trusty_platform::Error::Ffa { call: "FFA_MEM_SHARE", code: ffa::err::NO_MEMORY });
    assert_eq!(s.model().stats().shares.over_cap, 1);
    mem.release(a).unwrap();
    let _ = PageAllocator::alloc_zeroed(&mut *s.allocator(), 1).expect("pages were given back");
}

#[test]
fn stack_collects_an_unfinished_call_below_api_2_from_the_upstream_model() {
    // Upstream sm_get_stdcall_ret() answers BUSY to RESTART_LAST while the call is unfinished at
    // API < 2; Linux's trusty_std_call32() keeps RESTART_LAST in its BUSY loop. A discipline that
    // re-issues the original call gets BUSY (one call in flight) until its limit.
    use trusty_platform::trusty::{CallPolicy, Trusty};
    let s = sim();
    let policy = CallPolicy { std_call_timeout_ms: 2000, ..CallPolicy::default() };
    let mut t = Trusty::new(s.conduit(), s.clock(), policy);
    assert_eq!(t.negotiate_api(1), Ok(1));
    s.model().inject.cpu_idle = 1;
    // VDEV_RESET on a bus that was never started: the call's own answer is ERR_BAD_STATE.
    assert_eq!(t.std_call(call::SC_VDEV_RESET, 0, 0, 0), Err(trusty_platform::Error::Sm(SmError::InternalFailure)));
    // Nothing is left pending: a fresh call is taken.
    assert_eq!(raw(&s, call::SC_RESTART_LAST, [0; 3]), SmError::UnexpectedRestart.code());
}
