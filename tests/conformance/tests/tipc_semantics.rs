//! TIPC semantics as Linux's trusty-ipc driver has them (drivers/trusty/trusty-ipc.c), checked
//! against the model: what a timed-out connect leaves behind, GO_OFFLINE ending every wait, the
//! errno (and order) of each failure, and per-message accounting of memory references.

use std::time::{Duration, Instant};

use conformance::{Rig, DATASINK, ECHO};
use trusty_stack::StackConfig;
use tipc::wire::ShmDesc;
use tipc::{errno, ChannelState, Config, DeviceState, Error, Timeout};
use trusty_model::host::ModelMode;
use trusty_model::ModelConfig;
use trusty_platform::mem::Access;

const CLOSER3: &str = "com.android.ipc-unittest.srv.closer3";

fn rig_with(tipc: Config) -> Rig {
    Rig::with(ModelMode::Sync, ModelConfig::default(), StackConfig { tipc, ..Default::default() }, |_| {})
}

/// Gives Trusty time (NOPs) for `ms` milliseconds.
fn pump_for(rig: &mut Rig, ms: u64) {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        rig.dev().pump().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// closer3 accepts four channels, then sleeps 100 ms without accepting: a fifth connect stays
/// pending in Trusty past a short connect timeout. Linux leaves that channel CONNECTING, so
/// close sends DISC_REQ{target 0} and Trusty frees the pending endpoint (tipc_chan_shutdown(),
/// Trusty handle_disc_req()). Without it the endpoint leaks and is accepted later.
#[test]
fn close_after_a_connect_timeout_frees_trustys_endpoint() {
    let mut rig = rig_with(Config { connect_timeout_ms: 30, ..Default::default() });
    let held: Vec<_> = (0..4).map(|_| rig.dev().connect(CLOSER3).expect("closer3 accepts four")).collect();
    let dev = rig.dev();
    let late = dev.open().unwrap();
    dev.start_connect(late, CLOSER3).unwrap();
    assert_eq!(dev.finish_connect(late), Err(Error::TimedOut));
    assert_eq!(dev.channel_state(late), Ok(ChannelState::Stale));
    let before = rig.sim.model().ipc().stats();
    rig.dev().close(late).unwrap();
    rig.dev().pump().unwrap();
    let after = rig.sim.model().ipc().stats();
    assert_eq!(after.closed_by_ns, before.closed_by_ns + 1, "Trusty was told about the timed-out connect");
    // closer3 wakes, closes the four it holds (DISC_REQ to us) and finds nothing more to accept.
    pump_for(&mut rig, 200);
    for ch in held {
        assert_eq!(rig.dev().channel_state(ch), Ok(ChannelState::Disconnected));
        rig.dev().close(ch).unwrap();
    }
    pump_for(&mut rig, 20);
    let stats = rig.sim.model().ipc().stats();
    assert_eq!(stats.ns_channels, 0, "no endpoint left behind in Trusty: {stats:?}");
    assert_eq!(rig.dev().stats().undeliverable_frames, 0, "no late answer arrived");
    rig.echo_once(b"after");
    rig.shutdown_clean();
}

/// Linux _go_offline() wakes every sender waiting for a tx buffer; _get_txbuf_locked() then
/// answers ENODEV. Here GO_OFFLINE arrives while a send waits (the model stops taking messages).
#[test]
fn go_offline_ends_a_blocked_send_with_enodev_at_once() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let cfg = StackConfig { tipc: Config { txbuf_timeout_ms: 5000, ..Default::default() }, ..Default::default() };
        let mut rig = Rig::with(mode, ModelConfig::default(), cfg, |_| {});
        let ch = rig.dev().connect(DATASINK).unwrap();
        rig.sim.model().tipc_injection().stall_from_ns = true;
        for _ in 0..32 {
            rig.dev().send(ch, &[b"fill"], &[], Timeout::Ms(100)).unwrap();
        }
        let Rig { dev, sim } = &mut rig;
        let dev = dev.as_mut().unwrap();
        let start = Instant::now();
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                sim.model().send_go_offline();
            });
            dev.send(ch, &[b"one more"], &[], Timeout::Ms(5000))
        });
        assert_eq!(result, Err(Error::NoDevice), "{mode:?}");
        assert!(start.elapsed() < Duration::from_millis(2000), "{mode:?}: waited {:?}", start.elapsed());
        assert_eq!(rig.dev().state(), DeviceState::Offline);
        rig.sim.model().tipc_injection().stall_from_ns = false;
        rig.dev().close(ch).unwrap();
        rig.shutdown_clean();
    }
}

/// Linux dn_wait_for_reply(): a connect woken by GO_OFFLINE finds its channel STALE -> EIO.
#[test]
fn a_connect_ended_by_go_offline_is_eio() {
    let mut rig = rig_with(Config { connect_timeout_ms: 5000, ..Default::default() });
    rig.sim.model().tipc_injection().swallow_conn_req = 1;
    let ch = rig.dev().open().unwrap();
    rig.dev().start_connect(ch, ECHO).unwrap();
    let Rig { dev, sim } = &mut rig;
    let dev = dev.as_mut().unwrap();
    let start = Instant::now();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            sim.model().send_go_offline();
        });
        dev.finish_connect(ch)
    });
    let e = result.unwrap_err();
    assert_eq!(e.errno(), errno::EIO, "{e}");
    assert!(start.elapsed() < Duration::from_millis(2000));
    rig.dev().close(ch).unwrap();
    rig.shutdown_clean();
}

/// tipc_write_iter(): tx buffer first (EAGAIN / ETIMEDOUT / ENODEV), then EMSGSIZE, then the
/// channel's state (ENOTCONN / ESHUTDOWN); tipc_open() on an offline device: EINVAL.
#[test]
fn write_and_open_errno_follow_the_driver() {
    let mut rig = rig_with(Config::default());
    let ch = rig.dev().connect(DATASINK).unwrap();
    let idle = rig.dev().open().unwrap();
    rig.sim.model().tipc_injection().stall_from_ns = true;
    for _ in 0..32 {
        rig.dev().send(ch, &[b"fill"], &[], Timeout::Ms(100)).unwrap();
    }
    let big = vec![0u8; 4081];
    let dev = rig.dev();
    assert_eq!(dev.send(ch, &[&big], &[], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::EAGAIN));
    assert_eq!(dev.send(idle, &[b"x"], &[], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::EAGAIN));
    assert_eq!(dev.send(idle, &[b"x"], &[], Timeout::Ms(20)).map_err(|e| e.errno()), Err(errno::ETIMEDOUT));
    rig.sim.model().tipc_injection().stall_from_ns = false;
    let dev = rig.dev();
    dev.pump().unwrap();
    assert_eq!(dev.send(idle, &[&big], &[], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::EMSGSIZE));
    assert_eq!(dev.send(idle, &[b"x"], &[], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::ENOTCONN));
    assert_eq!(dev.send(ch, &[&big[..4080]], &[], Timeout::Ms(100)), Ok(4080));
    rig.sim.model().send_go_offline();
    let dev = rig.dev();
    dev.pump().unwrap();
    assert_eq!(dev.send(ch, &[&big], &[], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::ENODEV));
    assert_eq!(dev.recv(ch, &mut [&mut [0u8; 8]], Timeout::NonBlocking).map_err(|e| e.errno()), Err(errno::ESHUTDOWN));
    assert_eq!(dev.open().map_err(|e| e.errno()), Err(errno::EINVAL));
    dev.close(ch).unwrap();
    dev.close(idle).unwrap();
    rig.shutdown_clean();
}

/// Trusty sends one RELEASE per reference it was given. The same id in two messages is
/// reclaimable once, after both RELEASEs, not after the first.
#[test]
fn a_memory_id_in_two_messages_is_released_once_after_both() {
    let mut rig = rig_with(Config::default());
    let page = rig.dev().bus_mut().mem().alloc_shared(4096, Access::ReadOnly).unwrap();
    let shm = ShmDesc { obj_id: page.id().0, size: 4096, tag: 0 };
    let ch = rig.dev().connect(DATASINK).unwrap();
    // Both messages are in flight before Trusty looks at either.
    rig.sim.model().tipc_injection().stall_from_ns = true;
    rig.dev().send(ch, &[b"one"], &[shm], Timeout::Ms(100)).unwrap();
    rig.dev().send(ch, &[b"two"], &[shm], Timeout::Ms(100)).unwrap();
    assert_eq!(rig.dev().take_released(), None);
    rig.sim.model().tipc_injection().stall_from_ns = false;
    pump_for(&mut rig, 10);
    assert_eq!(rig.sim.model().stats().tipc.releases_sent, 2);
    assert_eq!(rig.dev().take_released(), Some(shm.obj_id));
    assert_eq!(rig.dev().take_released(), None, "reported once");
    rig.dev().close(ch).unwrap();
    rig.dev().bus_mut().mem().release(page).unwrap();
    rig.shutdown_clean();
}

/// A channel nobody reads keeps at most the rx pool of messages; the rest are discarded and
/// counted, and the device goes on working.
#[test]
fn an_unread_channel_is_bounded_by_the_rx_pool() {
    let mut rig = rig_with(Config::default());
    let ch = rig.dev().connect(ECHO).unwrap();
    for i in 0..50u8 {
        rig.dev().send(ch, &[&[i; 16]], &[], Timeout::Ms(1000)).unwrap();
    }
    pump_for(&mut rig, 20);
    let stats = rig.dev().stats();
    assert_eq!(stats.rx_queue_overflows, 50 - 32, "{stats:?}");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(n) = rig.dev().recv(ch, &mut [&mut buf], Timeout::NonBlocking) {
        assert_eq!(n, 16);
        got.push(buf[0]);
    }
    assert_eq!(got, (0..32).collect::<Vec<u8>>());
    rig.dev().close(ch).unwrap();
    rig.echo_once(b"still fine");
    rig.shutdown_clean();
}
