//! Every fault-injection switch of the model, driving the stack's error path to a defined error:
//! never a panic, never a hang past a stated timeout.

use std::time::{Duration, Instant};

use conformance::{Rig, DATASINK, ECHO};
use trusty_stack::StackConfig;
use tipc::{ChannelState, Config, DeviceState, Error, Timeout};
use trusty_model::host::ModelMode;
use trusty_model::{Malformed, ModelConfig};
use trusty_platform::smc::SmError;
use trusty_platform::trusty::CallPolicy;
use trusty_virtio::BusError;

fn platform_err(e: trusty_platform::Error) -> Error {
    Error::Bus(BusError::Platform(e))
}

#[test]
fn busy_std_calls_are_retried_with_the_original_arguments() {
    let mut rig = Rig::with(ModelMode::Sync, ModelConfig::default(), StackConfig::default(), |sim| {
        sim.model().inject.busy = 9;
    });
    assert_eq!(rig.dev().bus().trusty_ref().stats().busy_retries, 9);
    rig.echo_once(b"after busy");
    rig.shutdown_clean();
}

#[test]
fn a_wedged_secure_side_times_out() {
    let cfg = StackConfig { calls: CallPolicy { std_call_timeout_ms: 200, ..Default::default() }, ..Default::default() };
    let start = Instant::now();
    let Err((e, _sim)) = Rig::try_with(ModelMode::Sync, ModelConfig::default(), cfg, |sim| sim.model().inject.always_busy = true)
    else {
        panic!("bring-up must fail");
    };
    assert_eq!(e, platform_err(trusty_platform::Error::Timeout { what: "a busy secure side" }));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn interrupted_fiq_and_idle_calls_are_restarted() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let mut rig = Rig::with(mode, ModelConfig::default(), StackConfig::default(), |sim| {
            let mut m = sim.model();
            // Bring-up makes three standard calls (GET_DESCR, VDEV_RESET, START): one of each.
            m.inject.interrupted = 1;
            m.inject.fiq_interrupted = 1;
            m.inject.cpu_idle = 1;
        });
        let stats = rig.dev().bus().trusty_ref().stats();
        assert_eq!(stats.restart_fiq, 1, "{stats:?}");
        assert!(stats.restart_last >= 2, "{stats:?}");
        assert!(stats.nop_calls >= 1, "CPU_IDLE waits for NOP progress: {stats:?}");
        rig.echo_once(b"after restarts");
        rig.shutdown_clean();
    }
}

#[test]
fn interrupted_nops_are_repeated() {
    let mut rig = Rig::new(ModelMode::Sync);
    rig.sim.model().inject.nop_interrupted = 5;
    rig.echo_once(b"through interrupted NOPs");
    rig.shutdown_clean();
}

#[test]
fn trusty_panic_is_sticky_and_reported() {
    let mut rig = Rig::new(ModelMode::Sync);
    let ch = rig.dev().connect(ECHO).unwrap();
    rig.sim.model().inject.panic = true;
    let e = rig.dev().send(ch, &[b"x"], &[], Timeout::Ms(100)).unwrap_err();
    assert_eq!(e, platform_err(trusty_platform::Error::Sm(SmError::Panic)));
    assert_eq!(e.errno(), tipc::errno::EIO);
    assert!(rig.dev().bus().trusty_ref().panicked());
    let calls = rig.sim.model().stats().smcs;
    let e = rig.dev().recv(ch, &mut [&mut [0u8; 8]], Timeout::Ms(100)).unwrap_err();
    assert_eq!(e, platform_err(trusty_platform::Error::TrustyPanicked));
    assert_eq!(rig.sim.model().stats().smcs, calls, "no call after a panic");
}

#[test]
fn dropped_messages_are_counted_and_lose_nothing_else() {
    let mut rig = Rig::new(ModelMode::Sync);
    let dev = rig.dev();
    let ch = dev.connect(ECHO).unwrap();
    rig.sim.model().drop_messages(1);
    let dev = rig.dev();
    // write() does not learn about drops (spec §6.5 step 5).
    assert_eq!(dev.send(ch, &[b"lost"], &[], Timeout::Ms(100)), Ok(4));
    assert_eq!(dev.recv(ch, &mut [&mut [0u8; 8]], Timeout::Ms(50)), Err(Error::TimedOut));
    assert_eq!(dev.stats().dropped_by_peer, 1);
    dev.send(ch, &[b"kept"], &[], Timeout::Ms(100)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(dev.recv(ch, &mut [&mut buf], Timeout::Ms(100)), Ok(4));
    assert_eq!(&buf[..4], b"kept");
    dev.close(ch).unwrap();
    rig.shutdown_clean();
}

#[test]
fn malformed_frames_are_dropped_counted_and_their_buffers_reposted() {
    let kinds = [
        Malformed::ShortUsedLen,
        Malformed::LengthMismatch,
        Malformed::UnknownDst,
        Malformed::BadCtrlBody,
        Malformed::UnknownCtrlType,
        Malformed::NegativeUsedLen,
        Malformed::BadUsedId,
    ];
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let mut rig = Rig::new(mode);
        // More broken frames than the ring holds: only re-posting keeps the device alive.
        for round in 0..6 {
            for &k in &kinds {
                rig.sim.model().send_malformed(k);
            }
            rig.dev().pump().unwrap();
            std::thread::sleep(Duration::from_millis(2));
            rig.dev().pump().unwrap();
            let s = rig.dev().stats();
            let seen = s.malformed_frames + s.undeliverable_frames + s.ring_errors;
            assert_eq!(seen, (round + 1) * kinds.len() as u64, "{s:?}");
            rig.echo_once(b"still alive");
        }
        assert_eq!(rig.dev().state(), DeviceState::Online);
        rig.shutdown_clean();
    }
}

#[test]
fn go_offline_makes_channels_stale_and_the_device_unusable() {
    let mut rig = Rig::new(ModelMode::Sync);
    let ch = rig.dev().connect(DATASINK).unwrap();
    rig.sim.model().send_go_offline();
    rig.dev().pump().unwrap();
    let dev = rig.dev();
    assert_eq!(dev.state(), DeviceState::Offline);
    assert_eq!(dev.channel_state(ch), Ok(ChannelState::Stale));
    assert_eq!(dev.send(ch, &[b"x"], &[], Timeout::Ms(10)), Err(Error::NoDevice));
    assert_eq!(dev.recv(ch, &mut [&mut [0u8; 4]], Timeout::Ms(10)), Err(Error::Shutdown));
    // Opening a channel on an offline device: EINVAL, as Linux vds_add_channel().
    assert_eq!(dev.connect(ECHO), Err(Error::InvalidArgument));
    dev.close(ch).unwrap();
    rig.shutdown_clean();
}

#[test]
fn connect_without_answer_times_out_and_goes_stale() {
    let cfg = StackConfig { tipc: Config { connect_timeout_ms: 100, ..Default::default() }, ..Default::default() };
    let mut rig = Rig::with(ModelMode::Sync, ModelConfig::default(), cfg, |_| {});
    rig.sim.model().tipc_injection().swallow_conn_req = 1;
    let dev = rig.dev();
    let ch = dev.open().unwrap();
    dev.start_connect(ch, ECHO).unwrap();
    let start = Instant::now();
    assert_eq!(dev.finish_connect(ch), Err(Error::TimedOut));
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(dev.channel_state(ch), Ok(ChannelState::Stale));
    assert_eq!(dev.start_connect(ch, ECHO), Err(Error::Shutdown));
    dev.close(ch).unwrap();
    rig.echo_once(b"next connect works");
    rig.shutdown_clean();
}

#[test]
fn full_tx_pool_times_out_or_would_block() {
    let cfg = StackConfig { tipc: Config { txbuf_timeout_ms: 100, ..Default::default() }, ..Default::default() };
    let mut rig = Rig::with(ModelMode::Sync, ModelConfig::default(), cfg, |_| {});
    let ch = rig.dev().connect(DATASINK).unwrap();
    rig.sim.model().tipc_injection().stall_from_ns = true;
    let dev = rig.dev();
    for _ in 0..32 {
        dev.send(ch, &[b"fill"], &[], Timeout::Ms(100)).unwrap();
    }
    assert_eq!(dev.send(ch, &[b"one more"], &[], Timeout::NonBlocking), Err(Error::Again));
    let start = Instant::now();
    assert_eq!(dev.send(ch, &[b"one more"], &[], Timeout::Ms(100)), Err(Error::TimedOut));
    assert!(start.elapsed() >= Duration::from_millis(100));
    rig.sim.model().tipc_injection().stall_from_ns = false;
    let dev = rig.dev();
    assert_eq!(dev.send(ch, &[b"flows again"], &[], Timeout::Ms(1000)), Ok(11));
    dev.close(ch).unwrap();
    rig.shutdown_clean();
}

#[test]
fn denied_reclaim_leaks_and_counts_never_frees() {
    let mut rig = Rig::new(ModelMode::Sync);
    rig.echo_once(b"x");
    rig.sim.model().deny_reclaims(1);
    let dev = rig.dev.take().unwrap();
    let (bus, result) = dev.shutdown();
    assert!(matches!(result, Err(Error::Bus(BusError::Platform(trusty_platform::Error::ReclaimDenied(_))))), "{result:?}");
    let leaked = bus.mem_ref().leaked();
    assert_eq!(leaked.regions, 1);
    // The leaked pages stay allocated (the peer may still map them) and stay shared.
    assert_eq!(rig.sim.ram().pages_in_use(), conformance::RXTX_PAGES + leaked.pages);
    assert_eq!(rig.sim.model().live_shares(), 1);
}
