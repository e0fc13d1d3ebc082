//! The device against a scripted secure side ([`crate::fake_peer`]) that misbehaves on purpose,
//! and the points where the device follows Linux's trusty-ipc driver (drivers/trusty/
//! trusty-ipc.c) rather than what the model happens to do.

extern crate std;

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use std::time::{Duration, Instant};

use crate::fake_peer::{data_frame, raw_ctrl_frame, Harness, OnConnect, Peer};
use crate::wire::{self, Ctrl, ShmDesc};
use crate::{errno, ChannelId, ChannelState, Config, DeviceState, Error, Timeout};

/// The source address of the last CONN_REQ the peer saw: the channel's local address.
fn last_conn_req_src(h: &Harness) -> u32 {
    h.peer().ctrl_sent().iter().rev().find(|(_, c)| matches!(c, Ctrl::ConnReq { .. })).map(|&(src, _)| src).expect("a CONN_REQ")
}

fn connect(h: &mut Harness) -> (ChannelId, u32) {
    let ch = h.dev.connect("test.port").expect("connect");
    (ch, last_conn_req_src(h))
}

fn recv_now(h: &mut Harness, ch: ChannelId) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; 8192];
    let n = h.dev.recv(ch, &mut [&mut buf], Timeout::NonBlocking)?;
    buf.truncate(n);
    Ok(buf)
}

/// Sends GO_OFFLINE once, after the device has made `after` more calls.
fn go_offline_after(h: &Harness, after: u64) {
    let mut p = h.peer();
    let at = p.calls + after;
    let mut sent = false;
    p.hook = Some(Box::new(move |p: &mut Peer| {
        if !sent && p.calls >= at {
            sent = true;
            p.queue_ctrl(&Ctrl::GoOffline);
        }
    }));
}

// ----- §4: a hostile peer --------------------------------------------------------------------

#[test]
fn a_peer_that_answers_every_call_with_a_frame_cannot_grow_the_stack() {
    let mut h = Harness::new(Config::default(), 8);
    const FRAMES: u64 = 400;
    {
        let mut p = h.peer();
        // From now on every call into the secure side brings one more frame (for an address
        // nobody has), 400 in all so that the test ends even against a recursive scan.
        let mut left = FRAMES;
        p.hook = Some(Box::new(move |p: &mut Peer| {
            if left > 0 && p.rx_available() {
                left -= 1;
                p.put_frame(&data_frame(0x7777_0000, b"more"), None);
            }
        }));
        p.calls = 0;
        p.stack_span = None;
    }
    h.dev.pump().unwrap();
    {
        let p = h.peer();
        let (lo, hi) = p.stack_span.unwrap();
        assert!(p.calls <= 8, "one pump made {} calls into the secure side", p.calls);
        assert!(hi - lo < 32 * 1024, "the stack moved {} bytes between calls", hi - lo);
    }
    // The owed kicks are made by later scans: everything is taken in the end, nothing lost.
    for _ in 0..FRAMES {
        if h.dev.stats().undeliverable_frames >= FRAMES {
            break;
        }
        h.dev.pump().unwrap();
    }
    assert_eq!(h.dev.stats().undeliverable_frames, FRAMES);
    assert_eq!(h.dev.stats().ring_errors, 0);
    h.peer().echo = true;
    let (ch, _) = connect(&mut h);
    h.dev.send(ch, &[b"still working"], &[], Timeout::Ms(1000)).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(h.dev.recv(ch, &mut [&mut buf], Timeout::Ms(1000)), Ok(13));
}

#[test]
fn a_used_id_repeated_in_one_batch_is_not_delivered_twice() {
    for spares in [0, 8] {
        let cfg = Config { rx_spare_buffers: spares, ..Default::default() };
        let mut h = Harness::new(cfg, 8);
        let (ch, local) = connect(&mut h);
        // With spares, a read message's buffer becomes a spare that still holds it.
        h.peer().queue_data(local, b"old!");
        h.dev.pump().unwrap();
        assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&b"old!"[..]));
        let errors = h.dev.stats().ring_errors;
        {
            let mut p = h.peer();
            let head = p.put_frame(&data_frame(local, b"new!"), None).unwrap();
            // The same descriptor again, in the same batch.
            p.push_raw_used(head, 20);
        }
        h.dev.pump().unwrap();
        assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&b"new!"[..]));
        assert_eq!(recv_now(&mut h, ch), Err(Error::Again), "spares {spares}: a message was delivered again");
        assert_eq!(h.dev.stats().ring_errors, errors + 1, "the repeat is counted as a ring error");
    }
}

#[test]
fn a_memory_id_sent_in_two_messages_is_reclaimable_after_both_releases() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let shm = ShmDesc { obj_id: 0x5000_0000, size: 4096, tag: 0 };
    h.dev.send(ch, &[b"one"], &[shm], Timeout::Ms(1000)).unwrap();
    h.dev.send(ch, &[b"two"], &[shm], Timeout::Ms(1000)).unwrap();
    h.peer().queue_ctrl(&Ctrl::Release { id: shm.obj_id });
    h.dev.pump().unwrap();
    assert_eq!(h.dev.take_released(), None, "the second message still holds the id");
    h.peer().queue_ctrl(&Ctrl::Release { id: shm.obj_id });
    h.dev.pump().unwrap();
    assert_eq!(h.dev.take_released(), Some(shm.obj_id));
    assert_eq!(h.dev.take_released(), None);
}

#[test]
fn a_channel_never_read_holds_at_most_the_rx_pool() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, local) = connect(&mut h);
    for i in 0..40u8 {
        h.peer().queue_data(local, &[i; 100]);
    }
    for _ in 0..100 {
        if h.peer().outbox.is_empty() {
            break;
        }
        h.dev.pump().unwrap();
    }
    assert!(h.peer().outbox.is_empty(), "the peer could send everything");
    let mut read = Vec::new();
    while let Ok(m) = recv_now(&mut h, ch) {
        read.push(m[0]);
    }
    // The rx pool is 8 buffers: the first 8 messages are kept, the rest discarded.
    assert_eq!(read, (0..8).collect::<Vec<u8>>());
    // The channel works on once read.
    h.peer().queue_data(local, b"after");
    h.dev.pump().unwrap();
    assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&b"after"[..]));
}

#[test]
fn overflowing_a_channel_queue_is_counted_and_configurable() {
    let cfg = Config { rx_queue_limit: Some(3), ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    let (ch, local) = connect(&mut h);
    for i in 0..5u8 {
        h.peer().queue_data(local, &[i]);
    }
    h.dev.pump().unwrap();
    assert_eq!(h.dev.stats().rx_queue_overflows, 2);
    assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&[0u8][..]));
}

// ----- §3: Linux trusty-ipc semantics --------------------------------------------------------

#[test]
fn close_after_a_connect_timeout_sends_disc_req_and_the_late_answer_misses_new_channels() {
    let cfg = Config { connect_timeout_ms: 30, ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    h.peer().on_connect = OnConnect::Swallow;
    let a = h.dev.open().unwrap();
    h.dev.start_connect(a, "slow.port").unwrap();
    assert_eq!(h.dev.finish_connect(a), Err(Error::TimedOut));
    assert_eq!(h.dev.channel_state(a), Ok(ChannelState::Stale));
    assert_eq!(h.dev.finish_connect(a), Err(Error::Shutdown));
    assert_eq!(h.dev.start_connect(a, "slow.port"), Err(Error::Shutdown));
    let a_local = last_conn_req_src(&h);
    h.dev.close(a).unwrap();
    // Linux tipc_chan_shutdown(): the channel is still CONNECTING on the wire, so Trusty is told
    // (target 0: it never named its endpoint) and can free it.
    assert_eq!(h.peer().ctrl_sent().last(), Some(&(a_local, Ctrl::DiscReq { target: 0 })));

    // A new channel connecting meanwhile gets another address...
    let b = h.dev.open().unwrap();
    h.dev.start_connect(b, "slow.port").unwrap();
    let b_local = last_conn_req_src(&h);
    assert_ne!(a_local, b_local, "a just-freed address was handed out again");
    // ...so the late answer for the old one cannot complete it.
    h.peer().queue_ctrl(&Ctrl::ConnRsp { target: a_local, status: 0, remote: 1005, max_msg_size: 4096, max_msg_cnt: 1 });
    h.dev.pump().unwrap();
    assert_eq!(h.dev.channel_state(b), Ok(ChannelState::Connecting));
    h.dev.close(b).unwrap();
}

#[test]
fn a_late_answer_before_close_addresses_the_disc_req() {
    let cfg = Config { connect_timeout_ms: 30, ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    h.peer().on_connect = OnConnect::Swallow;
    // Accepted late: close names Trusty's endpoint; the channel stays stale for its user.
    let a = h.dev.open().unwrap();
    h.dev.start_connect(a, "slow.port").unwrap();
    assert_eq!(h.dev.finish_connect(a), Err(Error::TimedOut));
    let a_local = last_conn_req_src(&h);
    h.peer().queue_ctrl(&Ctrl::ConnRsp { target: a_local, status: 0, remote: 1007, max_msg_size: 4096, max_msg_cnt: 1 });
    h.dev.pump().unwrap();
    assert_eq!(h.dev.channel_state(a), Ok(ChannelState::Stale));
    h.dev.close(a).unwrap();
    assert_eq!(h.peer().ctrl_sent().last(), Some(&(a_local, Ctrl::DiscReq { target: 1007 })));
    // Closed by Trusty late (DISC_REQ): Trusty holds nothing, close sends nothing.
    let b = h.dev.open().unwrap();
    h.dev.start_connect(b, "slow.port").unwrap();
    assert_eq!(h.dev.finish_connect(b), Err(Error::TimedOut));
    let b_local = last_conn_req_src(&h);
    h.peer().queue_ctrl(&Ctrl::DiscReq { target: b_local });
    h.dev.pump().unwrap();
    let sent = h.peer().sent.len();
    h.dev.close(b).unwrap();
    assert_eq!(h.peer().sent.len(), sent);
}

#[test]
fn go_offline_ends_a_send_waiting_for_a_tx_buffer_at_once() {
    let cfg = Config { tx_buffers: Some(2), txbuf_timeout_ms: 3000, ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    let (ch, _) = connect(&mut h);
    h.peer().stall_from_ns = true;
    h.dev.send(ch, &[b"1"], &[], Timeout::Ms(100)).unwrap();
    h.dev.send(ch, &[b"2"], &[], Timeout::Ms(100)).unwrap();
    go_offline_after(&h, 20);
    let start = Instant::now();
    // Linux _go_offline() wakes `sendq`; _get_txbuf_locked() answers ENODEV.
    assert_eq!(h.dev.send(ch, &[b"3"], &[], Timeout::Ms(3000)), Err(Error::NoDevice));
    assert!(start.elapsed() < Duration::from_millis(1000), "waited {:?}", start.elapsed());
}

#[test]
fn go_offline_ends_a_close_waiting_for_a_tx_buffer_at_once() {
    let cfg = Config { tx_buffers: Some(2), txbuf_timeout_ms: 3000, ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    let (ch, _) = connect(&mut h);
    h.peer().stall_from_ns = true;
    h.dev.send(ch, &[b"1"], &[], Timeout::Ms(100)).unwrap();
    h.dev.send(ch, &[b"2"], &[], Timeout::Ms(100)).unwrap();
    go_offline_after(&h, 20);
    let start = Instant::now();
    assert_eq!(h.dev.close(ch), Err(Error::NoDevice));
    assert!(start.elapsed() < Duration::from_millis(1000), "waited {:?}", start.elapsed());
    assert_eq!(h.dev.open_channels(), 0);
}

#[test]
fn a_connect_ended_by_go_offline_is_eio() {
    let cfg = Config { connect_timeout_ms: 3000, ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    h.peer().on_connect = OnConnect::Swallow;
    let a = h.dev.open().unwrap();
    h.dev.start_connect(a, "slow.port").unwrap();
    go_offline_after(&h, 10);
    let start = Instant::now();
    // Linux dn_wait_for_reply(): woken with the channel STALE -> EIO.
    let e = h.dev.finish_connect(a).unwrap_err();
    assert_eq!(e.errno(), errno::EIO, "{e:?}");
    assert!(start.elapsed() < Duration::from_millis(1000));
    // The device is offline: nothing is sent on close.
    let sent = h.peer().sent.len();
    h.dev.close(a).unwrap();
    assert_eq!(h.peer().sent.len(), sent);
}

#[test]
fn write_errors_come_in_linux_order_and_open_offline_is_einval() {
    let cfg = Config { tx_buffers: Some(1), ..Default::default() };
    let mut h = Harness::new(cfg, 8);
    let (ch, _) = connect(&mut h);
    let idle = h.dev.open().unwrap();
    h.peer().stall_from_ns = true;
    h.dev.send(ch, &[b"takes the only tx buffer"], &[], Timeout::Ms(100)).unwrap();
    let big = vec![0u8; 5000];
    // tipc_write_iter(): the tx buffer first...
    assert_eq!(h.dev.send(ch, &[&big], &[], Timeout::NonBlocking), Err(Error::Again));
    assert_eq!(h.dev.send(idle, &[b"x"], &[], Timeout::NonBlocking), Err(Error::Again));
    assert_eq!(h.dev.send(idle, &[b"x"], &[], Timeout::Ms(30)), Err(Error::TimedOut));
    h.peer().stall_from_ns = false;
    h.dev.pump().unwrap();
    // ...then the size, then the channel's state.
    assert_eq!(h.dev.send(idle, &[&big], &[], Timeout::NonBlocking), Err(Error::MessageSize));
    assert_eq!(h.dev.send(idle, &[b"x"], &[], Timeout::NonBlocking), Err(Error::NotConnected));
    // With memory references, a channel not connected is refused before anything else
    // (dn_share_fd()).
    let shm = ShmDesc { obj_id: 0x6000_0000, size: 4096, tag: 0 };
    h.peer().stall_from_ns = true;
    h.dev.send(ch, &[b"busy again"], &[], Timeout::Ms(100)).unwrap();
    assert_eq!(h.dev.send(idle, &[b"x"], &[shm], Timeout::NonBlocking), Err(Error::NotConnected));
    h.peer().stall_from_ns = false;
    h.dev.pump().unwrap();
    // Offline: writes are ENODEV (before the size), opening a channel EINVAL (vds_add_channel()).
    h.peer().queue_ctrl(&Ctrl::GoOffline);
    h.dev.pump().unwrap();
    assert_eq!(h.dev.state(), DeviceState::Offline);
    assert_eq!(h.dev.send(ch, &[&big], &[], Timeout::NonBlocking), Err(Error::NoDevice));
    assert_eq!(h.dev.open(), Err(Error::InvalidArgument));
    assert_eq!(h.dev.connect("test.port").map_err(|e| e.errno()), Err(errno::EINVAL));
    // A connect on an existing channel needs a tx buffer first: ENODEV.
    assert_eq!(h.dev.start_connect(idle, "test.port"), Err(Error::NoDevice));
}

#[test]
fn go_online_with_a_body_is_accepted() {
    let table = trusty_virtio::rsc::default_tipc_table("dev0");
    let cfg = Config { online_timeout_ms: 300, ..Default::default() };
    let h = Harness::with_table(cfg, table, |p| {
        p.go_online_frame = Some(raw_ctrl_frame(wire::ctrl::GO_ONLINE, &[1, 2, 3, 4, 5, 6]));
    })
    .expect("bring-up with a GO_ONLINE that carries a body");
    assert_eq!(h.dev.state(), DeviceState::Online);
}

#[test]
fn a_release_with_a_long_body_is_taken() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let shm = ShmDesc { obj_id: 0x7000_0000, size: 4096, tag: 0 };
    h.dev.send(ch, &[b"ref"], &[shm], Timeout::Ms(1000)).unwrap();
    let mut body = vec![0u8; 300];
    body[..8].copy_from_slice(&shm.obj_id.to_le_bytes());
    h.peer().outbox.push_back((raw_ctrl_frame(wire::ctrl::RELEASE, &body), None));
    let malformed = h.dev.stats().malformed_frames;
    h.dev.pump().unwrap();
    assert_eq!(h.dev.take_released(), Some(shm.obj_id));
    assert_eq!(h.dev.stats().malformed_frames, malformed);
}

#[test]
fn the_device_name_is_cut_to_31_bytes() {
    let mut config = trusty_virtio::rsc::tipc_config(4096, 4096, "");
    config[8..40].fill(b'n');
    let rings = [
        trusty_virtio::rsc::VringDecl { align: 4096, num: 8, notifyid: 1 },
        trusty_virtio::rsc::VringDecl { align: 4096, num: 8, notifyid: 2 },
    ];
    let table = trusty_virtio::rsc::TableBuilder::new().vdev(trusty_virtio::rsc::VIRTIO_ID_TIPC, 0, &rings, &config).build();
    let h = Harness::with_table(Config::default(), table, |_| {}).unwrap();
    // Linux tipc_virtio_probe(): strncpy into 32 bytes, last byte forced to NUL.
    assert_eq!(h.dev.dev_name(), "n".repeat(31));
}

// ----- memory references to foreign pages (spec §6.9) ----------------------------------------

/// Drops set the flag: what `send_memrefs` keeps alive until Trusty's RELEASE.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn foreign(addr: u64, pages: u32) -> (crate::ForeignMemRef, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = crate::ForeignMemRef {
        ranges: vec![trusty_platform::mem::PhysRange { addr, pages }],
        size: u64::from(pages) * 4096,
        access: trusty_platform::mem::Access::ReadWrite,
        tag: 0,
        keep: Box::new(DropFlag(dropped.clone())),
    };
    (r, dropped)
}

fn dropped(flag: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> bool {
    flag.load(std::sync::atomic::Ordering::SeqCst)
}

/// Linux filp_send_ioctl() + _handle_release(): the object is shared before the message goes,
/// described after the data (hdr.shm_cnt, 24-byte descriptor with the id and the object's
/// size), kept alive while Trusty holds it, and reclaimed and let go on its RELEASE, which is
/// not handed to `take_released` (the stack owns the share).
#[test]
fn a_foreign_memref_is_kept_until_its_release_then_reclaimed() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let live_before = h.dev.bus().mem_ref().sharer().live_shares();
    let (r, gone) = foreign(0x4000_0000_0000, 10);
    assert_eq!(h.dev.send_memrefs(ch, &[b"data"], vec![r], Timeout::Ms(1000)), Ok(4));
    assert_eq!(h.dev.bus().mem_ref().sharer().live_shares(), live_before + 1);
    assert_eq!(h.dev.memrefs_outstanding(), 1);
    let sent = h.peer().sent.last().map(|s| (s.header, s.payload.clone())).expect("a frame");
    assert_eq!(sent.0.shm_cnt, 1);
    assert_eq!(usize::from(sent.0.len), 4 + wire::SHM_DESC_LEN);
    assert_eq!(&sent.1[..4], b"data");
    let (data_len, descs) = wire::split_shm(&sent.0, &sent.1).expect("descriptors");
    assert_eq!(data_len, 4);
    let descs: Vec<ShmDesc> = descs.collect();
    let desc = descs[0];
    assert_eq!((desc.obj_id, desc.size, desc.tag), (0x4000_0000_0000, 10 * 4096, 0));
    h.dev.pump().unwrap();
    assert!(!dropped(&gone), "kept while Trusty holds the reference");
    // A RELEASE for another id changes nothing.
    h.peer().queue_ctrl(&Ctrl::Release { id: 0x1234_5000 });
    h.dev.pump().unwrap();
    assert!(!dropped(&gone));
    h.peer().queue_ctrl(&Ctrl::Release { id: desc.obj_id });
    h.dev.pump().unwrap();
    assert!(dropped(&gone), "let go after the RELEASE");
    assert_eq!(h.dev.bus().mem_ref().sharer().live_shares(), live_before, "reclaimed");
    assert_eq!((h.dev.memrefs_outstanding(), h.dev.stats().memrefs_reclaimed), (0, 1));
    assert_eq!(h.dev.take_released(), None, "the stack's own share is not handed out");
}

/// Errors leave nothing shared and let go of every object at once: a channel not connected
/// (dn_share_fd() checks it first), an empty object, and a send that cannot get a tx buffer.
#[test]
fn a_failed_foreign_send_shares_nothing() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let idle = h.dev.open().unwrap();
    let live0 = h.dev.bus().mem_ref().sharer().live_shares();
    let (r, gone) = foreign(0x4100_0000_0000, 1);
    assert_eq!(h.dev.send_memrefs(idle, &[], vec![r], Timeout::NonBlocking), Err(Error::NotConnected));
    assert!(dropped(&gone));
    let (mut r, gone) = foreign(0x4200_0000_0000, 1);
    r.ranges.clear();
    assert_eq!(h.dev.send_memrefs(ch, &[], vec![r], Timeout::NonBlocking), Err(Error::InvalidArgument));
    assert!(dropped(&gone));
    assert_eq!(h.dev.bus().mem_ref().sharer().live_shares(), live0);
    // No tx buffer without blocking: both objects shared, then both reclaimed.
    h.peer().stall_from_ns = true;
    while h.dev.send(ch, &[b"fill"], &[], Timeout::NonBlocking).is_ok() {}
    // The tx pool grew while filling: that is the baseline now.
    let live = h.dev.bus().mem_ref().sharer().live_shares();
    let (r1, gone1) = foreign(0x4300_0000_0000, 1);
    let (r2, gone2) = foreign(0x4400_0000_0000, 2);
    assert_eq!(h.dev.send_memrefs(ch, &[b"x"], vec![r1, r2], Timeout::NonBlocking), Err(Error::Again));
    assert!(dropped(&gone1) && dropped(&gone2));
    assert_eq!(h.dev.bus().mem_ref().sharer().live_shares(), live);
    assert_eq!(h.dev.memrefs_outstanding(), 0);
    h.peer().stall_from_ns = false;
    h.dev.pump().unwrap();
}

/// Teardown: references Trusty still held are reclaimed after the reset (or kept, if refused).
#[test]
fn shutdown_reclaims_outstanding_foreign_memrefs() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let (r, gone) = foreign(0x4500_0000_0000, 3);
    h.dev.send_memrefs(ch, &[], vec![r], Timeout::Ms(1000)).unwrap();
    h.dev.pump().unwrap();
    assert!(!dropped(&gone));
    let Harness { dev, .. } = h;
    let (bus, result) = dev.shutdown();
    result.unwrap();
    assert!(dropped(&gone));
    assert_eq!(bus.mem_ref().sharer().live_shares(), 0);
}

// ----- the data path ---------------------------------------------------------------------------

#[test]
fn a_reused_channel_slot_does_not_take_the_old_addresses_messages() {
    // Routing remembers the last slot it found; a slot reused by a channel with another
    // address must not receive messages for the old one.
    let mut h = Harness::new(Config::default(), 8);
    let (a, a_addr) = connect(&mut h);
    let (b, b_addr) = connect(&mut h);
    h.peer().queue_data(a_addr, b"for a");
    h.peer().queue_data(b_addr, b"for b");
    h.dev.pump().unwrap();
    assert_eq!(recv_now(&mut h, a).as_deref(), Ok(&b"for a"[..]));
    assert_eq!(recv_now(&mut h, b).as_deref(), Ok(&b"for b"[..]));
    // The last message routed went to a's slot: now a closes and c takes its slot.
    h.peer().queue_data(a_addr, b"a again");
    h.dev.pump().unwrap();
    h.dev.close(a).unwrap();
    let (c, c_addr) = connect(&mut h);
    assert_ne!(c_addr, a_addr);
    let undeliverable = h.dev.stats().undeliverable_frames;
    h.peer().queue_data(a_addr, b"stale");
    h.peer().queue_data(c_addr, b"for c");
    h.dev.pump().unwrap();
    assert_eq!(recv_now(&mut h, c).as_deref(), Ok(&b"for c"[..]));
    assert_eq!(recv_now(&mut h, c), Err(Error::Again), "c got a message for a's old address");
    assert_eq!(h.dev.stats().undeliverable_frames, undeliverable + 1);
}
