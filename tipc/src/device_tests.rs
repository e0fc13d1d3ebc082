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

/// Many objects held at once, released out of order and sent again: each RELEASE lets go of
/// exactly its own object (the holds live in reused slots named by the id's map entry).
#[test]
fn foreign_memrefs_released_out_of_order_let_go_of_their_own_objects() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, _) = connect(&mut h);
    let live0 = h.dev.bus().mem_ref().sharer().live_shares();
    let send = |h: &mut Harness, addr: u64| {
        let (r, gone) = foreign(addr, 1);
        h.dev.send_memrefs(ch, &[b"m"], vec![r], Timeout::Ms(1000)).unwrap();
        let sent = h.peer().sent.last().map(|s| (s.header, s.payload.clone())).expect("a frame");
        let id = wire::split_shm(&sent.0, &sent.1).expect("descriptors").1.next().expect("one").obj_id;
        h.dev.pump().unwrap();
        (id, gone)
    };
    let mut held: Vec<(u64, _)> = (0..6u64).map(|i| send(&mut h, 0x4600_0000_0000 + (i << 24))).collect();
    assert_eq!(h.dev.memrefs_outstanding(), 6);
    for round in 0..3u64 {
        // Release the third, then the first: only those two objects go.
        for pick in [2, 0] {
            let (id, gone) = held.remove(pick);
            h.peer().queue_ctrl(&Ctrl::Release { id });
            h.dev.pump().unwrap();
            assert!(dropped(&gone), "round {round}: the released object is let go");
            assert!(held.iter().all(|(_, g)| !dropped(g)), "round {round}: the others are kept");
        }
        assert_eq!(h.dev.memrefs_outstanding(), held.len());
        // Two more take the freed slots.
        for i in 0..2u64 {
            held.push(send(&mut h, 0x4700_0000_0000 + ((round * 2 + i) << 24)));
        }
        assert_eq!(h.dev.memrefs_outstanding(), 6);
    }
    for (id, gone) in held.drain(..).rev() {
        h.peer().queue_ctrl(&Ctrl::Release { id });
        h.dev.pump().unwrap();
        assert!(dropped(&gone));
    }
    assert_eq!(h.dev.memrefs_outstanding(), 0);
    assert_eq!(h.dev.bus().mem_ref().sharer().live_shares(), live0);
    assert_eq!(h.dev.stats().memrefs_reclaimed, 12);
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

#[test]
fn recv_returns_a_queued_message_without_a_scan_and_scans_an_empty_queue_first() {
    let mut h = Harness::new(Config::default(), 8);
    let (ch, addr) = connect(&mut h);
    h.peer().queue_data(addr, b"one");
    h.dev.pump().unwrap();
    // A peer on another core publishes a second message without a call: nothing scans it yet.
    h.peer().put_frame(&data_frame(addr, b"two"), None).expect("an rx buffer");
    let received = h.dev.stats().messages_received;
    assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&b"one"[..]));
    assert_eq!(h.dev.stats().messages_received, received, "a queued message was returned after a scan");
    // The queue is empty now: it is scanned before it is judged empty.
    assert_eq!(recv_now(&mut h, ch).as_deref(), Ok(&b"two"[..]));
    assert_eq!(recv_now(&mut h, ch), Err(Error::Again));
    // A closed handle is refused before anything else: no scan takes what the peer published.
    h.dev.close(ch).unwrap();
    h.peer().put_frame(&data_frame(addr, b"late"), None).expect("an rx buffer");
    let before = h.dev.stats();
    assert_eq!(recv_now(&mut h, ch), Err(Error::BadHandle));
    assert_eq!(h.dev.stats(), before);
    h.dev.pump().unwrap();
    assert_eq!(h.dev.stats().undeliverable_frames, before.undeliverable_frames + 1);
}

// ----- the send's idle catch-up on a coarse clock ----------------------------------------------

/// A clock moved by hand whose coarse reading is the precise one rounded down to `tick` (as
/// Linux's CLOCK_MONOTONIC_COARSE is the time of the last tick), offered when `tick` fits the
/// caller's `max_lag_ns`. Counts both kinds of read and keeps the largest lag asked for.
struct TickClock {
    now: std::sync::atomic::AtomicU64,
    tick: u64,
    precise_reads: std::sync::atomic::AtomicU64,
    coarse_reads: std::sync::atomic::AtomicU64,
    max_lag_asked: std::sync::atomic::AtomicU64,
}

impl TickClock {
    fn new(tick: u64) -> alloc::sync::Arc<TickClock> {
        use std::sync::atomic::AtomicU64;
        alloc::sync::Arc::new(TickClock {
            now: AtomicU64::new(0),
            tick,
            precise_reads: AtomicU64::new(0),
            coarse_reads: AtomicU64::new(0),
            max_lag_asked: AtomicU64::new(0),
        })
    }
    fn set_ms_us(&self, ms: u64, us: u64) {
        self.now.store(ms * 1_000_000 + us * 1_000, std::sync::atomic::Ordering::SeqCst);
    }
    fn reads(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.precise_reads.load(SeqCst), self.coarse_reads.load(SeqCst))
    }
}

impl trusty_platform::clock::Clock for TickClock {
    fn now_ns(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        self.precise_reads.fetch_add(1, SeqCst);
        self.now.load(SeqCst)
    }
    fn sleep_ns(&self, ns: u64) {
        self.now.fetch_add(ns, std::sync::atomic::Ordering::SeqCst);
    }
    // A time that moves only by hand: a wait would never end, so relax moves it 1 ms.
    fn relax(&self) {
        self.now.fetch_add(1_000_000, std::sync::atomic::Ordering::SeqCst);
    }
    fn now_coarse_ns(&self, max_lag_ns: u64) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.max_lag_asked.fetch_max(max_lag_ns, SeqCst);
        if self.tick > max_lag_ns {
            return (self.now_ns(), 0);
        }
        self.coarse_reads.fetch_add(1, SeqCst);
        let now = self.now.load(SeqCst);
        (now - now % self.tick, self.tick)
    }
}

/// A connected channel on a [`TickClock`] of `tick` ns and the default 10 ms idle pump, with
/// an echoing peer; the clock stands at 1 ms after a NOP there (Trusty last ran at 1 ms).
fn tick_rig(tick: u64) -> (Harness, alloc::sync::Arc<TickClock>, ChannelId) {
    let clock = TickClock::new(tick);
    let mut h = Harness::with_clock(Config::default(), clock.clone());
    let (ch, _) = connect(&mut h);
    h.peer().echo = true;
    clock.set_ms_us(1, 0);
    h.dev.pump().unwrap();
    (h, clock, ch)
}

/// Sends one message and returns how many NOPs it made (the fake peer counts every call, and
/// kicks apart: the send kicks tx, and rx when it gives buffers back).
fn nops_for_send(h: &mut Harness, ch: ChannelId) -> u64 {
    let counts = |h: &Harness| {
        let p = h.peer();
        (p.calls, p.kicks)
    };
    let (calls, kicks) = counts(h);
    h.dev.send(ch, &[b"ping"], &[], Timeout::NonBlocking).unwrap();
    let (calls, kicks) = (counts(h).0 - calls, counts(h).1 - kicks);
    assert!(kicks >= 1, "the send kicked");
    assert_eq!(recv_now(h, ch).unwrap(), b"ping");
    calls - kicks
}

#[test]
fn the_send_catch_up_reads_the_coarse_clock_and_no_precise_one() {
    // The clock reads of one send (after a NOP at the same time, so none is owed), on a clock
    // whose tick fits the idle threshold and on one whose tick does not.
    let send_reads = |tick: u64| {
        let (mut h, clock, ch) = tick_rig(tick);
        let (p0, c0) = clock.reads();
        h.dev.send(ch, &[b"ping"], &[], Timeout::NonBlocking).unwrap();
        let (p1, c1) = clock.reads();
        assert_eq!(recv_now(&mut h, ch).unwrap(), b"ping");
        // Under half the 10 ms threshold: two reads a tick apart each way never reach it.
        let asked = clock.max_lag_asked.load(std::sync::atomic::Ordering::SeqCst);
        assert!(asked >= 4_000_000 && 2 * asked < 10_000_000, "lag allowed {asked} ns");
        (p1 - p0, c1 - c0)
    };
    let (precise, coarse) = send_reads(4_000_000);
    assert_eq!(coarse, 1, "the catch-up reads the coarse clock");
    // The fake peer's kick is a standard call, which reads the precise clock for its deadline:
    // the catch-up's read is the one that moved.
    let (precise_without, coarse_without) = send_reads(6_000_000);
    assert_eq!((precise_without, coarse_without), (precise + 1, 0), "the same send without a coarse clock");
}

#[test]
fn a_stale_coarse_reading_pumps_within_its_lag_of_the_threshold() {
    // Ticks of 4 ms, a 10 ms threshold: the NOP comes after 6 to 14 ms of idle, never outside.
    let (mut h, clock, ch) = tick_rig(4_000_000);
    // Trusty last ran at 1 ms (the NOP's precise stamp). At 15 ms it has been idle 14 ms; the
    // coarse clock says 12 ms, 11 ms of idle by the reading: the NOP comes before the message.
    clock.set_ms_us(15, 0);
    assert_eq!(nops_for_send(&mut h, ch), 1, "14 ms idle (threshold + lag)");
    // 0.9 ms later: no NOP; the kick is stamped with the coarse reading, 12 ms (3.9 ms stale).
    clock.set_ms_us(15, 900);
    assert_eq!(nops_for_send(&mut h, ch), 0, "0.9 ms idle");
    // 6 ms after that kick (21.9 ms, coarse 20 ms): 8 ms by the readings, under the threshold.
    clock.set_ms_us(21, 900);
    assert_eq!(nops_for_send(&mut h, ch), 0, "6 ms idle (threshold - lag)");
    // 14 ms after that kick (35.9 ms, coarse 32 ms, stamp 20 ms): the NOP comes.
    clock.set_ms_us(35, 900);
    assert_eq!(nops_for_send(&mut h, ch), 1, "14 ms idle after a stale stamp");
}

#[test]
fn messages_a_coarse_tick_apart_get_no_nop() {
    // Sends across tick boundaries, each under one tick after the last: the readings differ by
    // at most a tick, under the 10 ms threshold, so a steady stream gets no NOP.
    let (mut h, clock, ch) = tick_rig(4_000_000);
    for step in 1..=12u64 {
        clock.set_ms_us(1 + step * 3, 900);
        assert_eq!(nops_for_send(&mut h, ch), 0, "send {step}");
    }
}

#[test]
fn a_coarse_clock_too_coarse_for_the_threshold_is_not_used() {
    // Ticks of 6 ms cannot be allowed under a 10 ms threshold: the precise clock is read, and
    // the pump comes exactly at 10 ms of idle.
    let (mut h, clock, ch) = tick_rig(6_000_000);
    let (_, c0) = clock.reads();
    clock.set_ms_us(10, 999);
    assert_eq!(nops_for_send(&mut h, ch), 0, "9.999 ms idle");
    clock.set_ms_us(20, 999);
    assert_eq!(nops_for_send(&mut h, ch), 1, "10 ms idle since the last call");
    assert_eq!(clock.reads().1, c0, "no coarse read");
}

// ----- rx buffers back in batches ---------------------------------------------------------

/// Rx buffers go back on vring 0 a quarter of the pool at a time while Trusty has buffers (it
/// keeps VRING_USED_F_NO_NOTIFY set), so most messages cost no avail write and no kick check;
/// as soon as Trusty says it waits for one (flag clear), everything held goes back at once.
/// Nothing is lost either way.
#[test]
fn rx_buffers_go_back_in_batches_unless_trusty_waits_for_one() {
    // Room on the channel for a burst longer than the pool.
    let mut h = Harness::new(Config { rx_queue_limit: Some(64), ..Config::default() }, 16);
    let (ch, local) = connect(&mut h);
    h.peer().rx_notify_when_waiting = true;
    let deliver = |h: &mut Harness| {
        h.peer().queue_data(local, b"batch");
        h.dev.pump().unwrap();
        assert_eq!(recv_now(h, ch).unwrap(), b"batch");
        h.peer().rx_posted()
    };
    let posted: Vec<u16> = (0..12).map(|_| deliver(&mut h)).collect();
    // A pool of 16: batches of 4. One buffer fewer per message, back to full every fourth.
    assert!(posted.iter().all(|&n| (12..=16).contains(&n)), "posted after each message: {posted:?}");
    let ups = posted.windows(2).filter(|w| w[1] > w[0]).count();
    let downs = posted.windows(2).filter(|w| w[1] + 1 == w[0]).count();
    assert!(ups >= 2 && downs >= 6, "held one at a time, back in batches: {posted:?}");
    // Trusty waits for a buffer: a burst larger than what is posted fills every buffer, the
    // flag is cleared, and the scan puts every held buffer back at once.
    let before = usize::from(h.peer().rx_posted());
    for _ in 0..before + 2 {
        h.peer().queue_data(local, b"burst");
    }
    h.dev.pump().unwrap();
    let mut burst = 0;
    while let Ok(m) = recv_now(&mut h, ch) {
        assert_eq!(m, b"burst");
        burst += 1;
        h.dev.pump().unwrap();
    }
    assert_eq!(burst, before + 2, "every message of the burst arrived");
    assert!(h.peer().outbox.is_empty());
    assert_eq!(h.dev.stats().rx_queue_overflows, 0);
}
