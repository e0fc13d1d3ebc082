//! Unit tests of the IPC core and the ipc-unittest services (spec §6.4–§6.8, §9.2).

extern crate std;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use std::sync::{Arc, Mutex};

use super::services::{srv_port_name, CLOSER_SLEEP_NS};
use super::*;

const MS: u64 = 1_000_000;

fn srv(name: &str) -> Vec<u8> {
    srv_port_name(name).into_bytes()
}

fn drain(ipc: &mut Ipc) -> Vec<IpcEvent> {
    core::iter::from_fn(|| ipc.pop_event()).collect()
}

fn accepted(chan: ChanId) -> IpcEvent {
    IpcEvent::Accepted {
        chan,
        max_msg_size: CONN_RSP_MAX_MSG_SIZE,
        max_msg_cnt: CONN_RSP_MAX_MSG_CNT,
    }
}

fn closed(chan: ChanId) -> IpcEvent {
    IpcEvent::Closed { chan }
}

fn message(chan: ChanId, data: &[u8]) -> IpcEvent {
    IpcEvent::Message {
        chan,
        data: data.to_vec(),
    }
}

/// Connect and let the TA accept; the Accepted event is consumed.
fn open(ipc: &mut Ipc, name: &str, now: u64) -> ChanId {
    let chan = ipc.connect_ns(&srv(name), now).expect("connect");
    assert!(ipc.run(now));
    assert_eq!(drain(ipc), vec![accepted(chan)]);
    chan
}

#[test]
fn registers_the_service_table() {
    let ipc = Ipc::with_unittest_services();
    let all = IPC_PORT_ALLOW_ALL;
    let ns = IPC_PORT_ALLOW_NS_CONNECT;
    let ta = IPC_PORT_ALLOW_TA_CONNECT;
    for (name, num, size, flags) in [
        ("closer1", 2, 64, all),
        ("closer2", 2, 64, all),
        ("closer3", 2, 64, all),
        ("connect", 2, 64, ta),
        ("datasink", 2, 64, all),
        ("ns_only", 8, 64, ns),
        ("ta_only", 8, 64, ta),
        ("echo", 8, 4096, all),
        ("uuid", 2, 64, all),
    ] {
        assert_eq!(
            ipc.port_info(&srv(name)),
            Some((num, size, flags)),
            "{name}"
        );
    }
    // lib/unittest unittest_main(): 1 x 4096, NS and TA; memref-test receiver: 1 x 1, NS only.
    assert_eq!(ipc.port_info(b"com.android.ipc-unittest.ctrl"), Some((1, 4096, all)));
    assert_eq!(ipc.port_info(b"com.android.trusty.memref.receiver"), Some((1, 1, ns)));
    assert_eq!(ipc.next_deadline(), None);
    assert_eq!(ipc.pending_events(), 0);
}

#[test]
fn connect_rejects_bad_names() {
    let mut ipc = Ipc::with_unittest_services();
    assert_eq!(ipc.connect_ns(b"", 0), Err(lk::ERR_INVALID_ARGS));
    assert_eq!(ipc.connect_ns(&[b'a'; 64], 0), Err(lk::ERR_INVALID_ARGS));
    assert_eq!(ipc.connect_ns(&[b'a'; 63], 0), Err(lk::ERR_NOT_FOUND));
    assert_eq!(ipc.connect_ns(b"foo", 0), Err(lk::ERR_NOT_FOUND));
    let mut padded = srv("echo");
    padded.push(0);
    assert_eq!(ipc.connect_ns(&padded, 0), Err(lk::ERR_INVALID_ARGS));
    assert_eq!(ipc.connect_ns(&[0xff; 10], 0), Err(lk::ERR_NOT_FOUND));
    let stats = ipc.stats();
    assert_eq!((stats.connect_requests, stats.connect_rejected), (6, 6));
    assert!(!ipc.run(0));
    assert_eq!(ipc.pending_events(), 0);
}

#[test]
fn access_flags_are_enforced() {
    let mut ipc = Ipc::with_unittest_services();
    assert_eq!(
        ipc.connect_ns(&srv("ta_only"), 0),
        Err(lk::ERR_ACCESS_DENIED)
    );
    assert_eq!(
        ipc.connect_ns(&srv("connect"), 0),
        Err(lk::ERR_ACCESS_DENIED)
    );
    let chan = open(&mut ipc, "ns_only", 0);
    assert_eq!(ipc.deliver(chan, b"x", 0), Ok(1));
}

#[test]
fn accept_happens_in_run() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = ipc.connect_ns(&srv("echo"), 0).unwrap();
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.deliver(chan, b"early", 0), Err(lk::ERR_NOT_READY));
    assert!(ipc.run(0));
    assert_eq!(ipc.pop_event(), Some(accepted(chan)));
    assert_eq!(ipc.pop_event(), None);
    assert_eq!(ipc.deliver(chan, b"abc", 0), Ok(3));
    assert_eq!(ipc.stats().rejected, 1);
}

#[test]
fn datasink_discards_and_drops_when_full() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "datasink", 0);
    assert_eq!(ipc.deliver(chan, &[1; 64], 0), Ok(64));
    assert_eq!(ipc.deliver(chan, &[2; 64], 0), Ok(64));
    // 2-deep queue, TA has not run: dropped, no retry (spec §6.5 step 8).
    assert_eq!(
        ipc.deliver(chan, &[3; 64], 0),
        Err(lk::ERR_NOT_ENOUGH_BUFFER)
    );
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.deliver(chan, &[4; 1], 0), Ok(1));
    assert_eq!(ipc.deliver(chan, &[5; 1], 0), Ok(1));
    assert!(ipc.run(0));
    assert!(!ipc.run(0));
    let stats = ipc.stats();
    assert_eq!((stats.delivered, stats.dropped_queue_full), (4, 1));
    let port = stats
        .ports
        .iter()
        .find(|p| p.name.as_bytes() == srv("datasink").as_slice())
        .unwrap();
    assert_eq!(
        (
            port.connects,
            port.accepted,
            port.delivered,
            port.dropped_queue_full,
            port.sent
        ),
        (1, 1, 4, 1, 0)
    );
}

#[test]
fn ns_only_queue_is_eight_deep() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "ns_only", 0);
    for i in 0..8u8 {
        assert_eq!(ipc.deliver(chan, &[i], 0), Ok(1));
    }
    assert_eq!(ipc.deliver(chan, &[8], 0), Err(lk::ERR_NOT_ENOUGH_BUFFER));
}

#[test]
fn oversize_messages_are_cut_to_the_item_size_and_delivered() {
    // Trusty ipc_msg.c kern_msg_write_locked(): kern_iovec_to_membuf() copies at most the item.
    let mut ipc = Ipc::with_unittest_services();
    let sink = open(&mut ipc, "datasink", 0);
    assert_eq!(ipc.deliver(sink, &[0; 65], 0), Ok(64));
    assert_eq!(ipc.deliver(sink, &[0; 64], 0), Ok(64));
    let echo = open(&mut ipc, "echo", 0);
    let mut big = vec![7u8; 4096];
    big.push(9);
    assert_eq!(ipc.deliver(echo, &big, 0), Ok(4096));
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![message(echo, &[7; 4096])]);
}

#[test]
fn unknown_channels() {
    let mut ipc = Ipc::with_unittest_services();
    assert_eq!(ipc.deliver(ChanId(999), b"x", 0), Err(lk::ERR_NOT_FOUND));
    ipc.ns_close(ChanId(999), 0);
    ipc.unpop_event(IpcEvent::Closed { chan: ChanId(999) });
    ipc.unpop_event(message(ChanId(5), b"x"));
    ipc.unpop_event(accepted(ChanId(5)));
    assert_eq!(ipc.pop_event(), None);
}

#[test]
fn closer1_sleeps_on_odd_connections() {
    let mut ipc = Ipc::with_unittest_services();
    let c1 = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    assert!(ipc.run(0));
    assert_eq!(drain(&mut ipc), vec![accepted(c1)]);
    assert_eq!(ipc.next_deadline(), Some(CLOSER_SLEEP_NS));
    assert!(!ipc.run(99 * MS));
    assert_eq!(ipc.pending_events(), 0);
    assert!(ipc.run(100 * MS));
    assert_eq!(drain(&mut ipc), vec![closed(c1)]);
    assert_eq!(ipc.next_deadline(), None);

    let c2 = ipc.connect_ns(&srv("closer1"), 200 * MS).unwrap();
    assert!(ipc.run(200 * MS));
    assert_eq!(drain(&mut ipc), vec![accepted(c2), closed(c2)]);
    assert_eq!(ipc.next_deadline(), None);

    let c3 = ipc.connect_ns(&srv("closer1"), 300 * MS).unwrap();
    ipc.run(300 * MS);
    assert_eq!(drain(&mut ipc), vec![accepted(c3)]);
    assert_eq!(ipc.next_deadline(), Some(400 * MS));
}

#[test]
fn closer1_sleep_delays_the_next_accept() {
    let mut ipc = Ipc::with_unittest_services();
    let a = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    let b = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    ipc.run(0);
    // nanosleep blocks the service: b stays pending.
    assert_eq!(drain(&mut ipc), vec![accepted(a)]);
    assert_eq!(ipc.deliver(b, b"x", MS), Err(lk::ERR_NOT_READY));
    ipc.run(100 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(a), accepted(b), closed(b)]);
}

#[test]
fn closer2_refuses_by_restarting_its_port() {
    let mut ipc = Ipc::with_unittest_services();
    let c1 = ipc.connect_ns(&srv("closer2"), 0).unwrap();
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.deliver(c1, b"x", 0), Err(lk::ERR_NOT_READY));
    assert_eq!(ipc.next_deadline(), Some(100 * MS));
    ipc.run(100 * MS);
    assert_eq!(ipc.deliver(c1, b"x", 100 * MS), Err(lk::ERR_CHANNEL_CLOSED));
    assert_eq!(drain(&mut ipc), vec![closed(c1)]);
    assert_eq!(ipc.deliver(c1, b"x", 100 * MS), Err(lk::ERR_NOT_FOUND));
    assert_eq!(
        ipc.port_info(&srv("closer2")),
        Some((2, 64, IPC_PORT_ALLOW_ALL))
    );

    // Even connection: refused at once; odd again: after the sleep.
    let c2 = ipc.connect_ns(&srv("closer2"), 200 * MS).unwrap();
    ipc.run(200 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(c2)]);
    let c3 = ipc.connect_ns(&srv("closer2"), 300 * MS).unwrap();
    ipc.run(300 * MS);
    assert_eq!(ipc.pending_events(), 0);
    ipc.run(400 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(c3)]);
    assert_eq!(ipc.stats().accepted, 0);
    assert_eq!(ipc.stats().channel_records, 0);
}

#[test]
fn closer2_restart_refuses_every_pending_connection() {
    let mut ipc = Ipc::with_unittest_services();
    let a = ipc.connect_ns(&srv("closer2"), 0).unwrap();
    ipc.run(0);
    let b = ipc.connect_ns(&srv("closer2"), 50 * MS).unwrap();
    assert!(!ipc.run(50 * MS));
    ipc.run(100 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(a), closed(b)]);
    // b never reached the service, so the next one is its 2nd request: refused at once.
    let c = ipc.connect_ns(&srv("closer2"), 200 * MS).unwrap();
    ipc.run(200 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(c)]);
}

#[test]
fn closer3_holds_four_then_closes_all() {
    let mut ipc = Ipc::with_unittest_services();
    let chans: Vec<ChanId> = (0..3).map(|_| open(&mut ipc, "closer3", 0)).collect();
    for &c in &chans {
        assert_eq!(ipc.deliver(c, &[0; 64], 0), Ok(64));
    }
    ipc.run(10_000 * MS);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.next_deadline(), None);

    let t = 10_000 * MS;
    let fourth = open(&mut ipc, "closer3", t);
    assert_eq!(ipc.next_deadline(), Some(t + CLOSER_SLEEP_NS));
    // Sleeping: data is not consumed, the 2-deep queue fills.
    assert_eq!(ipc.deliver(fourth, &[1; 64], t), Ok(64));
    assert_eq!(ipc.deliver(fourth, &[2; 64], t), Ok(64));
    assert_eq!(
        ipc.deliver(fourth, &[3; 64], t),
        Err(lk::ERR_NOT_ENOUGH_BUFFER)
    );
    assert!(!ipc.run(t + 99 * MS));
    ipc.run(t + 100 * MS);
    let mut all = chans.clone();
    all.push(fourth);
    assert_eq!(
        drain(&mut ipc),
        all.iter().map(|&c| closed(c)).collect::<Vec<_>>()
    );
    assert_eq!(
        ipc.deliver(fourth, b"x", t + 100 * MS),
        Err(lk::ERR_NOT_FOUND)
    );
    assert_eq!(ipc.stats().channel_records, 0);
}

#[test]
fn closer3_counts_channels_the_ns_closed() {
    let mut ipc = Ipc::with_unittest_services();
    let a = open(&mut ipc, "closer3", 0);
    let b = open(&mut ipc, "closer3", 0);
    ipc.ns_close(a, 0);
    ipc.run(0);
    let c = open(&mut ipc, "closer3", 0);
    let d = open(&mut ipc, "closer3", 0);
    assert_eq!(ipc.next_deadline(), Some(100 * MS));
    ipc.run(100 * MS);
    assert_eq!(drain(&mut ipc), vec![closed(b), closed(c), closed(d)]);
}

#[test]
fn echo_returns_messages_in_order() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "echo", 0);
    assert_eq!(ipc.deliver(chan, b"hello", 0), Ok(5));
    assert_eq!(ipc.deliver(chan, b"world", 0), Ok(5));
    assert_eq!(ipc.deliver(chan, b"", 0), Ok(0));
    assert!(ipc.run(0));
    assert_eq!(
        drain(&mut ipc),
        vec![
            message(chan, b"hello"),
            message(chan, b"world"),
            message(chan, b"")
        ]
    );
    let stats = ipc.stats();
    assert_eq!((stats.delivered, stats.sent_to_ns), (3, 3));
}

#[test]
fn echo_back_pressure_and_resume() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "echo", 0);
    for i in 0..8u8 {
        assert_eq!(ipc.deliver(chan, &[i], 0), Ok(1));
    }
    ipc.run(0);
    // The NS side's queue (8 deep) is full now.
    assert_eq!(ipc.pending_events(), 8);
    for i in 8..16u8 {
        assert_eq!(ipc.deliver(chan, &[i], 0), Ok(1));
    }
    ipc.run(0);
    // Echo holds 8 un-retired messages: inbound is full, further messages are dropped.
    assert_eq!(ipc.pending_events(), 8);
    assert_eq!(
        ipc.deliver(chan, b"lost", 0),
        Err(lk::ERR_NOT_ENOUGH_BUFFER)
    );
    assert!(!ipc.run(0));

    // One slot frees -> SEND_UNBLOCKED -> one more echo, one inbound slot free.
    assert_eq!(ipc.pop_event(), Some(message(chan, &[0])));
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 8);
    assert_eq!(ipc.deliver(chan, b"A", 0), Ok(1));
    assert_eq!(ipc.deliver(chan, b"B", 0), Err(lk::ERR_NOT_ENOUGH_BUFFER));

    let mut got = vec![vec![0u8]];
    for _ in 0..100 {
        let events = drain(&mut ipc);
        let progressed = ipc.run(0);
        if events.is_empty() && !progressed {
            break;
        }
        for ev in events {
            match ev {
                IpcEvent::Message { chan: c, data } if c == chan => got.push(data),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut expected: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i]).collect();
    expected.push(b"A".to_vec());
    assert_eq!(got, expected);
    assert_eq!(ipc.stats().dropped_queue_full, 2);
}

#[test]
fn echo_holding_messages_on_one_channel_echoes_another_and_forgets_a_closed_ones() {
    // The echo app skips its own channel table only while it holds nothing on any channel;
    // with messages held on one channel the other still echoes, and closing the first lets
    // its held messages go (the count of held messages returns to zero: no underflow).
    let mut ipc = Ipc::with_unittest_services();
    let a = open(&mut ipc, "echo", 0);
    let b = open(&mut ipc, "echo", 0);
    for i in 0..8u8 {
        assert_eq!(ipc.deliver(a, &[i], 0), Ok(1));
    }
    assert!(ipc.run(0));
    // a's queue towards the normal world is full: the next two are held by the app.
    assert_eq!(ipc.deliver(a, &[8], 0), Ok(1));
    assert_eq!(ipc.deliver(a, &[9], 0), Ok(1));
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 8);
    assert_eq!(ipc.deliver(b, b"b1", 0), Ok(2));
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 9, "b echoed while a holds messages");
    // The normal world closes a: its events go, the app closes it on HUP with two held.
    ipc.ns_close(a, 0);
    assert!(ipc.run(0));
    assert_eq!(drain(&mut ipc), vec![message(b, b"b1")]);
    assert_eq!(ipc.deliver(b, b"b2", 0), Ok(2));
    assert!(ipc.run(0));
    assert_eq!(drain(&mut ipc), vec![message(b, b"b2")]);
    // A channel that is not the app's (closed) is refused as before.
    assert_eq!(ipc.deliver(a, b"x", 0), Err(lk::ERR_NOT_FOUND));
    assert_eq!(ipc.stats().ns_channels, 1);
}

#[test]
fn unpop_event_keeps_order_and_state() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = ipc.connect_ns(&srv("uuid"), 0).unwrap();
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 3);
    let ev = ipc.pop_event().unwrap();
    assert_eq!(ev, accepted(chan));
    ipc.unpop_event(ev);
    assert_eq!(ipc.pop_event(), Some(accepted(chan)));
    let ev = ipc.pop_event().unwrap();
    assert_eq!(ev, message(chan, &NS_CLIENT_UUID));
    ipc.unpop_event(ev);
    assert_eq!(ipc.pop_event(), Some(message(chan, &NS_CLIENT_UUID)));
    let ev = ipc.pop_event().unwrap();
    assert_eq!(ev, closed(chan));
    assert_eq!(ipc.deliver(chan, b"x", 0), Err(lk::ERR_NOT_FOUND));
    ipc.unpop_event(ev);
    assert_eq!(ipc.deliver(chan, b"x", 0), Err(lk::ERR_CHANNEL_CLOSED));
    assert_eq!(ipc.pop_event(), Some(closed(chan)));
    assert_eq!(ipc.pop_event(), None);
    assert_eq!(ipc.stats().channel_records, 0);
}

#[test]
fn unpop_event_restores_echo_back_pressure() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "echo", 0);
    for i in 0..8u8 {
        assert_eq!(ipc.deliver(chan, &[i], 0), Ok(1));
    }
    ipc.run(0);
    assert_eq!(ipc.deliver(chan, &[8], 0), Ok(1));
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 8);
    // The device could not place the message: it goes back, the queue is still full.
    let ev = ipc.pop_event().unwrap();
    ipc.unpop_event(ev);
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 8);
    assert_eq!(ipc.pop_event(), Some(message(chan, &[0])));
    ipc.run(0);
    let rest: Vec<IpcEvent> = drain(&mut ipc);
    assert_eq!(
        rest,
        (1..9u8).map(|i| message(chan, &[i])).collect::<Vec<_>>()
    );
}

#[test]
fn ns_close_while_pending() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = ipc.connect_ns(&srv("datasink"), 0).unwrap();
    ipc.ns_close(chan, 0);
    assert!(!ipc.run(0));
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.deliver(chan, b"x", 0), Err(lk::ERR_NOT_FOUND));
    let stats = ipc.stats();
    assert_eq!(
        (stats.ns_channels, stats.channel_records, stats.closed_by_ns),
        (0, 0, 1)
    );

    // closer1 never saw the withdrawn request: the next one is its 1st (sleeps).
    let gone = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    ipc.ns_close(gone, 0);
    let c = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![accepted(c)]);
    assert_eq!(ipc.next_deadline(), Some(100 * MS));
}

#[test]
fn ns_close_connected_discards_events_and_ta_sees_hup() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "echo", 0);
    for i in 0..3u8 {
        ipc.deliver(chan, &[i], 0).unwrap();
    }
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 3);
    ipc.ns_close(chan, 0);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().channel_records, 1);
    assert_eq!(ipc.deliver(chan, b"x", 0), Err(lk::ERR_NOT_FOUND));
    assert!(ipc.run(0));
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().channel_records, 0);
    ipc.ns_close(chan, 0);
    assert_eq!(ipc.stats().closed_by_ns, 1);
}

#[test]
fn ns_close_with_unread_messages_datasink() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "datasink", 0);
    ipc.deliver(chan, b"1", 0).unwrap();
    ipc.deliver(chan, b"2", 0).unwrap();
    ipc.ns_close(chan, 0);
    assert!(ipc.run(0));
    assert_eq!(ipc.stats().channel_records, 0);
    assert_eq!(ipc.pending_events(), 0);
}

#[test]
fn ns_close_during_closer1_sleep() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = open(&mut ipc, "closer1", 0);
    ipc.ns_close(chan, 10 * MS);
    ipc.run(10 * MS);
    ipc.run(100 * MS);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().channel_records, 0);
}

#[test]
fn ns_close_after_ta_close_drops_the_disc_req() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = ipc.connect_ns(&srv("uuid"), 0).unwrap();
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 3);
    ipc.ns_close(chan, 0);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().channel_records, 0);
}

#[test]
fn uuid_sends_ns_client_uuid_then_closes() {
    let mut ipc = Ipc::with_unittest_services();
    let chan = ipc.connect_ns(&srv("uuid"), 0).unwrap();
    ipc.run(0);
    assert_eq!(
        drain(&mut ipc),
        vec![accepted(chan), message(chan, &[0; 16]), closed(chan)]
    );
}

#[test]
fn reset_closes_everything_silently() {
    let mut ipc = Ipc::with_unittest_services();
    let echo = open(&mut ipc, "echo", 0);
    ipc.deliver(echo, b"queued", 0).unwrap();
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 1);
    let _sleeper = ipc.connect_ns(&srv("closer1"), 0).unwrap();
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 2);
    assert_eq!(ipc.next_deadline(), Some(100 * MS));
    let pending = ipc.connect_ns(&srv("datasink"), 0).unwrap();
    ipc.deliver(echo, b"unread", 0).unwrap();
    assert!(ipc.pending_events() > 0);

    ipc.reset(MS);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().ns_channels, 0);
    ipc.run(MS);
    ipc.run(200 * MS);
    assert_eq!(ipc.pending_events(), 0);
    assert_eq!(ipc.stats().channel_records, 0);
    assert_eq!(ipc.deliver(pending, b"x", 200 * MS), Err(lk::ERR_NOT_FOUND));

    let again = open(&mut ipc, "echo", 200 * MS);
    assert!(again > pending);
    ipc.deliver(again, b"hi", 200 * MS).unwrap();
    ipc.run(200 * MS);
    assert_eq!(drain(&mut ipc), vec![message(again, b"hi")]);
}

#[test]
fn channel_limit_is_256() {
    let mut ipc = Ipc::with_unittest_services();
    let chans: Vec<ChanId> = (0..MAX_CHANNELS)
        .map(|_| ipc.connect_ns(&srv("datasink"), 0).unwrap())
        .collect();
    assert_eq!(ipc.connect_ns(&srv("echo"), 0), Err(lk::ERR_NO_RESOURCES));
    ipc.run(0);
    assert_eq!(ipc.pending_events(), MAX_CHANNELS);
    assert_eq!(ipc.connect_ns(&srv("echo"), 0), Err(lk::ERR_NO_RESOURCES));
    ipc.ns_close(chans[7], 0);
    assert!(ipc.connect_ns(&srv("echo"), 0).is_ok());
    assert_eq!(ipc.connect_ns(&srv("echo"), 0), Err(lk::ERR_NO_RESOURCES));
}

#[test]
fn channel_ids_are_never_reused() {
    let mut ipc = Ipc::with_unittest_services();
    let mut last = None;
    for _ in 0..10 {
        let chan = ipc.connect_ns(&srv("uuid"), 0).unwrap();
        assert!(last.map_or(true, |l| chan > l));
        last = Some(chan);
        ipc.run(0);
        drain(&mut ipc);
    }
}

#[test]
fn run_when_idle_and_time_is_monotonic() {
    let mut ipc = Ipc::with_unittest_services();
    assert!(!ipc.run(0));
    assert!(!ipc.run(5 * MS));
    let chan = ipc.connect_ns(&srv("closer1"), 10 * MS).unwrap();
    ipc.run(10 * MS);
    assert_eq!(ipc.next_deadline(), Some(110 * MS));
    // A stale `now` does not move time back or fire the timer.
    assert!(!ipc.run(MS));
    assert_eq!(ipc.now(), 10 * MS);
    assert!(ipc.run(u64::MAX));
    assert_eq!(drain(&mut ipc), vec![accepted(chan), closed(chan)]);
}

/// A probe TA that records the results of edge-case handle operations.
struct Probe {
    log: Arc<Mutex<Vec<(&'static str, i32)>>>,
    port: Option<PortId>,
}

impl Probe {
    fn record(&self, what: &'static str, rc: i32) {
        self.log.lock().unwrap().push((what, rc));
    }
}

fn rc<T>(r: Result<T, i32>) -> i32 {
    r.err().unwrap_or(lk::NO_ERROR)
}

impl TrustedApp for Probe {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port = ctx
            .create_port("probe", 1, 16, IPC_PORT_ALLOW_NS_CONNECT)
            .ok();
        self.record("dup", rc(ctx.create_port("probe", 1, 16, 0)));
        self.record("empty", rc(ctx.create_port("", 1, 16, 0)));
        self.record("long", rc(ctx.create_port(&"p".repeat(64), 1, 16, 0)));
        self.record("zero", rc(ctx.create_port("z", 0, 16, 0)));
        self.record("big", rc(ctx.create_port("b", 1, 4097, 0)));
        self.record("foreign", rc(ctx.close_port(PortId(0))));
        if let Some(port) = self.port {
            self.record("accept-none", rc(ctx.accept(port)));
        }
        self.record("close-bogus", rc(ctx.close(ChanId(12345))));
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, _events: Events) {
        if let Ok((chan, uuid)) = ctx.accept(port) {
            self.record("uuid-zero", i32::from(uuid != NS_CLIENT_UUID));
            self.record("get-none", rc(ctx.get_msg(chan)));
            self.record("put-none", rc(ctx.put_msg(chan)));
            // Cut to the 16-byte item and sent (Trusty user_msg_write_locked()): the length.
            self.record("send-big", ctx.send_msg(chan, &[0; 17]).map_or_else(|e| e, |n| n as i32));
            self.record("send-1", rc(ctx.send_msg(chan, b"1")));
            self.record("send-2", rc(ctx.send_msg(chan, b"2")));
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::SEND_UNBLOCKED) {
            self.record("unblocked-send", rc(ctx.send_msg(chan, b"3")));
        }
        if events.intersects(Events::HUP) {
            self.record("hup-send", rc(ctx.send_msg(chan, b"4")));
            self.record("hup-close", rc(ctx.close(chan)));
            self.record("close-again", rc(ctx.close(chan)));
        }
    }
}

#[test]
fn handle_api_edge_cases() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut ipc = Ipc::with_unittest_services();
    ipc.add_app(Box::new(Probe {
        log: log.clone(),
        port: None,
    }));
    let chan = ipc.connect_ns(b"probe", 0).unwrap();
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![accepted(chan), message(chan, &[0; 16])]);
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![message(chan, b"3")]);
    ipc.ns_close(chan, 0);
    ipc.run(0);
    assert_eq!(ipc.pending_events(), 0);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            ("dup", lk::ERR_ALREADY_EXISTS),
            ("empty", lk::ERR_INVALID_ARGS),
            ("long", lk::ERR_INVALID_ARGS),
            ("zero", lk::ERR_INVALID_ARGS),
            ("big", lk::ERR_INVALID_ARGS),
            ("foreign", lk::ERR_BAD_HANDLE),
            ("accept-none", lk::ERR_NO_MSG),
            ("close-bogus", lk::ERR_BAD_HANDLE),
            ("uuid-zero", 0),
            ("get-none", lk::ERR_NO_MSG),
            ("put-none", lk::ERR_INVALID_ARGS),
            ("send-big", 16),
            ("send-1", lk::ERR_NOT_ENOUGH_BUFFER),
            ("send-2", lk::ERR_NOT_ENOUGH_BUFFER),
            ("unblocked-send", lk::NO_ERROR),
            ("hup-send", lk::ERR_CHANNEL_CLOSED),
            ("hup-close", lk::NO_ERROR),
            ("close-again", lk::ERR_BAD_HANDLE),
        ]
    );
}

/// A TA that never accepts and never reads: `run` must still terminate.
struct Lazy;

impl TrustedApp for Lazy {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        let _ = ctx.create_port("lazy", 2, 16, IPC_PORT_ALLOW_NS_CONNECT);
    }
    fn on_port_event(&mut self, _ctx: &mut Ctx<'_>, _port: PortId, _events: Events) {}
    fn on_chan_event(&mut self, _ctx: &mut Ctx<'_>, _chan: ChanId, _events: Events) {}
}

#[test]
fn misbehaving_app_cannot_stall_run() {
    let mut ipc = Ipc::new();
    ipc.add_app(Box::new(Lazy));
    let a = ipc.connect_ns(b"lazy", 0).unwrap();
    assert!(ipc.run(0));
    assert!(!ipc.run(0));
    assert_eq!(ipc.deliver(a, b"x", 0), Err(lk::ERR_NOT_READY));
    // A new connection re-signals the port.
    let _b = ipc.connect_ns(b"lazy", 0).unwrap();
    assert!(ipc.run(0));
    assert!(!ipc.run(0));
}

/// Tiny deterministic PRNG for the stress test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn random_operations_keep_invariants() {
    let names: Vec<Vec<u8>> = [
        "closer1", "closer2", "closer3", "datasink", "ns_only", "ta_only", "echo", "uuid",
    ]
    .iter()
    .map(|n| srv(n))
    .chain([b"foo".to_vec(), Vec::new(), vec![b'x'; 70]])
    .collect();
    for seed in 0..20u64 {
        let mut rng = Lcg(seed);
        let mut ipc = Ipc::with_unittest_services();
        let mut now = 0u64;
        let mut chans: Vec<ChanId> = Vec::new();
        // Per channel: accepted, closed (as seen by the NS), closed by NS.
        let mut seen: std::collections::BTreeMap<ChanId, (bool, bool, bool)> = Default::default();
        for _ in 0..3000 {
            match rng.below(10) {
                0 => {
                    let name = &names[rng.below(names.len() as u64) as usize];
                    if let Ok(c) = ipc.connect_ns(name, now) {
                        assert!(!seen.contains_key(&c));
                        seen.insert(c, (false, false, false));
                        chans.push(c);
                    }
                }
                1..=3 => {
                    let c = if chans.is_empty() || rng.below(20) == 0 {
                        ChanId(rng.below(10_000) as u32)
                    } else {
                        chans[rng.below(chans.len() as u64) as usize]
                    };
                    let len = rng.below(100) as usize;
                    let _ = ipc.deliver(c, &vec![0xa5; len], now);
                }
                4 => {
                    if !chans.is_empty() && rng.below(3) == 0 {
                        let c = chans[rng.below(chans.len() as u64) as usize];
                        ipc.ns_close(c, now);
                        if let Some(s) = seen.get_mut(&c) {
                            s.2 = true;
                        }
                    }
                }
                5 => now += rng.below(150 * MS),
                6 => {
                    if rng.below(50) == 0 {
                        ipc.reset(now);
                        for s in seen.values_mut() {
                            s.2 = true;
                        }
                    }
                }
                7 | 8 => {
                    ipc.run(now);
                }
                _ => {
                    for _ in 0..rng.below(6) {
                        let Some(ev) = ipc.pop_event() else { break };
                        if rng.below(4) == 0 {
                            ipc.unpop_event(ev);
                            break;
                        }
                        let c = ev.chan();
                        let s = seen.get_mut(&c).expect("event for a channel never opened");
                        assert!(!s.1 && !s.2, "event after close: {ev:?}");
                        match ev {
                            IpcEvent::Accepted { .. } => {
                                assert!(!s.0);
                                s.0 = true;
                            }
                            IpcEvent::Message { .. } => assert!(s.0),
                            IpcEvent::Closed { .. } => s.1 = true,
                        }
                    }
                }
            }
            let stats = ipc.stats();
            assert!(stats.ns_channels <= MAX_CHANNELS);
            assert!(stats.channel_records <= 4 * MAX_CHANNELS);
        }
    }
}

/// An app with no port that may keep a timer armed far in the future: while it does,
/// [`Ipc::run`] never takes its first-step shortcut (it is only for runs with no timer armed),
/// and the timer never fires, so the other apps see exactly what they would without it.
struct FarTimer(bool);

impl TrustedApp for FarTimer {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        if self.0 {
            ctx.set_timer(Some(u64::MAX / 2));
        }
    }
    fn on_port_event(&mut self, _ctx: &mut Ctx<'_>, _port: PortId, _events: Events) {}
    fn on_chan_event(&mut self, _ctx: &mut Ctx<'_>, _chan: ChanId, _events: Events) {}
    fn on_timer(&mut self, _ctx: &mut Ctx<'_>) {
        panic!("the far timer fired");
    }
}

/// [`Ipc::run`]'s first-step shortcut (no timer armed: the lowest busy app's step, and the
/// end when that leaves nothing queued) against the general loop alone (a far timer armed):
/// the same random operations on the unittest services give the same answers, events, run
/// results and counters, and the shortcut was taken both ways (ended and went on).
#[test]
fn runs_with_and_without_the_first_step_shortcut_agree() {
    let names: Vec<Vec<u8>> = ["closer1", "closer2", "closer3", "datasink", "ns_only", "echo", "uuid"]
        .iter()
        .map(|n| srv(n))
        .chain([b"com.android.ipc-unittest.ctrl".to_vec()])
        .collect();
    let mut taken = (0, 0);
    for seed in 0..12u64 {
        let mut ipcs = [false, true].map(|armed| {
            let mut ipc = Ipc::with_unittest_services();
            ipc.add_app(Box::new(FarTimer(armed)));
            ipc
        });
        assert_eq!(ipcs[0].next_deadline(), None);
        assert_eq!(ipcs[1].next_deadline(), Some(u64::MAX / 2));
        let mut rng = Lcg(seed);
        let mut now = 0u64;
        let mut chans: Vec<ChanId> = Vec::new();
        for step in 0..3000 {
            let op = rng.below(10);
            let (a, b) = (rng.next(), rng.next());
            let mut outcome = Vec::new();
            for ipc in ipcs.iter_mut() {
                let seen = match op {
                    0 => format!("{:?}", ipc.connect_ns(&names[(a % names.len() as u64) as usize], now)),
                    1..=3 if !chans.is_empty() => {
                        let c = chans[(a % chans.len() as u64) as usize];
                        format!("{:?}", ipc.deliver(c, &vec![b as u8; (b % 80) as usize], now))
                    }
                    4 if !chans.is_empty() && b % 3 == 0 => {
                        ipc.ns_close(chans[(a % chans.len() as u64) as usize], now);
                        String::new()
                    }
                    6..=8 => format!("{}", ipc.run(now)),
                    _ => format!("{:?}", core::iter::from_fn(|| ipc.pop_event()).take((a % 6) as usize).collect::<Vec<_>>()),
                };
                outcome.push(seen);
            }
            assert_eq!(outcome[0], outcome[1], "seed {seed} step {step} op {op}");
            if op == 5 {
                // Time moves on (the closers' sleeps end; the far timer never comes).
                now += a % (150 * MS);
            }
            // The channels the normal world knows: every id handed out so far.
            if op == 0 && outcome[0].starts_with("Ok(") {
                let id: u32 = outcome[0].trim_start_matches("Ok(ChanId(").trim_end_matches("))").parse().unwrap();
                chans.push(ChanId(id));
            }
            assert_eq!(ipcs[0].stats(), ipcs[1].stats(), "seed {seed} step {step}");
            assert_eq!(ipcs[0].pending_events(), ipcs[1].pending_events());
        }
        assert_eq!(ipcs[1].first_step, (0, 0), "a run with a timer armed takes no shortcut");
        taken.0 += ipcs[0].first_step.0;
        taken.1 += ipcs[0].first_step.1;
    }
    assert!(taken.0 >= 20 && taken.1 >= 20, "shortcut ended {} times, went on {} times", taken.0, taken.1);
}

/// What one client of the ctrl app saw.
struct CtrlRun {
    /// Every message, in order (the last is the status byte).
    got: Vec<Vec<u8>>,
    /// The channel was closed after the status.
    closed: bool,
    /// Model time the run took.
    elapsed: u64,
}

impl CtrlRun {
    fn status(&self) -> Option<u8> {
        self.got.last().and_then(|m| (m.len() == 1).then_some(m[0]))
    }
    /// The text of every TEST_MESSAGE.
    fn text(&self) -> String {
        use super::apps::TEST_MESSAGE;
        let mut s = String::new();
        for m in &self.got {
            if m.first() == Some(&TEST_MESSAGE) {
                s.push_str(core::str::from_utf8(&m[1..]).unwrap());
            }
        }
        s
    }
}

/// Connects to the ctrl port at `start` and drives the model as the device does: the apps run,
/// every event is taken, and when nothing more happens at the current time, time moves to the
/// next deadline (a sleep's end or a wait's timeout). At most 120 s of model time.
fn run_ctrl(ipc: &mut Ipc, start: u64) -> CtrlRun {
    let chan = ipc.connect_ns(b"com.android.ipc-unittest.ctrl", start).unwrap();
    let mut now = start;
    let mut got = Vec::new();
    let mut closed = false;
    while !closed && now - start < 120_000 * MS {
        ipc.run(now);
        let mut any = false;
        while let Some(ev) = ipc.pop_event() {
            any = true;
            match ev {
                IpcEvent::Accepted { .. } => {}
                IpcEvent::Message { data, .. } => got.push(data),
                IpcEvent::Closed { chan: c } => {
                    assert_eq!(c, chan);
                    closed = true;
                }
            }
        }
        if !any {
            match ipc.next_deadline() {
                Some(d) => now = now.max(d),
                None => break,
            }
        }
    }
    CtrlRun { got, closed, elapsed: now - start }
}

/// Every test of the ctrl app's suite, as the model runs it.
const CTRL_TESTS: [&str; 11] = [
    "run_port_create_test",
    "run_async_connect_test",
    "run_connect_close_test",
    "run_end_to_end_msg_test",
    "run_connect_close_by_peer_test(closer1)",
    "run_connect_close_by_peer_test(closer2)",
    "run_connect_close_by_peer_test(closer3)",
    "run_connect_selfie_test",
    "run_port_create_negative_test",
    "run_connect_negative_test",
    "run_accept_negative_test",
];

/// tipc-test's ta2ta-ipc protocol (lib/unittest `unittest_main()`): log lines as TEST_MESSAGE,
/// then TEST_PASSED, then the channel closes; the queue of one message drains as the normal
/// world takes each (send_msg_wait()). The tests that wait for the srv app run for real: the
/// closers' 100 ms sleeps pass in model time while the ctrl app waits, each of the 992
/// connect/close connections is accepted by datasink, 20000 messages go through echo.
#[test]
fn unittest_ctrl_reports_its_suite_and_closes() {
    use super::apps::{TEST_MESSAGE, TEST_PASSED};
    let mut ipc = Ipc::with_unittest_services();
    let run = run_ctrl(&mut ipc, 0);
    assert!(run.closed, "the runner closes the channel after the status");
    let text = run.text();
    assert_eq!(run.status(), Some(TEST_PASSED), "suite failed: {text}");
    let lines = &run.got[..run.got.len() - 1];
    assert_eq!(lines.len(), CTRL_TESTS.len() + 1, "one message per test and a summary: {text}");
    for l in lines {
        assert_eq!(l[0], TEST_MESSAGE);
        assert!(l.len() < 256, "tipc-test reads into 256 bytes");
    }
    for t in CTRL_TESTS {
        assert!(text.contains(&format!("{t}: PASSED")), "{t}: {text}");
    }
    assert!(!text.contains("FAILED"), "{text}");
    assert!(!text.contains("SKIPPED"), "{text}");
    assert!(text.contains("All tests PASSED"), "{text}");
    // closer1 sleeps on 8 of its 16 connections, closer2 on 8 requests, closer3 once per 4:
    // 2 s at least, all of it spent while the ctrl app waited.
    assert!(run.elapsed >= 20 * CLOSER_SLEEP_NS, "elapsed {} ns", run.elapsed);
    let stats = ipc.stats();
    let accepted = |name: &str| {
        let name = srv_port_name(name);
        stats.ports.iter().find(|p| p.name == name).map_or(0, |p| p.accepted)
    };
    assert!(accepted("datasink") >= 62 * 16, "every connect/close connection was accepted");
    assert_eq!(accepted("closer1"), 16);
    assert_eq!(accepted("closer2"), 0, "closer2 never accepts");
    assert_eq!(accepted("closer3"), 16);
    assert_eq!(accepted("echo"), 1);
    // Only the channels of the normal world's closed ctrl connection may be left, and none
    // of the tests' channels.
    assert_eq!(ipc.stats().channel_records, 0, "every test channel was closed");
    // A second client gets a second run (fresh port names, same verdict; the closers'
    // connection counters go on from where they were).
    let run2 = run_ctrl(&mut ipc, run.elapsed + 1);
    assert!(run2.closed);
    assert_eq!(run2.status(), Some(TEST_PASSED), "{}", run2.text());
}

/// The apps of [`Ipc::with_unittest_services`] with the srv services named in `replace`
/// left out, plus `fakes` in their place.
fn services_with(replace: &[&str], fakes: Vec<Box<dyn TrustedApp>>) -> Ipc {
    use super::services::{Closer1, Closer2, Closer3, Connect, DataSink, Echo, Uuid};
    let all: Vec<(&str, Box<dyn TrustedApp>)> = vec![
        ("closer1", Box::new(Closer1::new())),
        ("closer2", Box::new(Closer2::new())),
        ("closer3", Box::new(Closer3::new())),
        ("connect", Box::new(Connect::new())),
        ("datasink", Box::new(DataSink::new())),
        ("ns_only", Box::new(DataSink::ns_only())),
        ("ta_only", Box::new(DataSink::ta_only())),
        ("echo", Box::new(Echo::new())),
        ("uuid", Box::new(Uuid::new())),
    ];
    let mut ipc = Ipc::new();
    for (name, app) in all {
        if !replace.contains(&name) {
            ipc.add_app(app);
        }
    }
    for app in fakes {
        ipc.add_app(app);
    }
    ipc.add_app(Box::new(super::apps::UnittestCtrl::new()));
    ipc
}

/// A stand-in srv service on `srv.<name>` (2 x 64, or 8 x 4096 for echo): accepts every
/// connection (unless `accept` is false) and then does what `on_msg` says with each message;
/// never closes a channel itself.
struct FakeSrv {
    name: &'static str,
    accept: bool,
    /// Reply to a message (None: no reply).
    on_msg: fn(&[u8]) -> Option<Vec<u8>>,
}

impl TrustedApp for FakeSrv {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        let (num, size) = if self.name == "echo" { (8, 4096) } else { (2, 64) };
        ctx.create_port(&srv_port_name(self.name), num, size, IPC_PORT_ALLOW_ALL).unwrap();
    }
    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, _events: Events) {
        if self.accept {
            let _ = ctx.accept(port);
        }
    }
    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::MSG) {
            while let Ok(m) = ctx.get_msg(chan) {
                ctx.put_msg(chan).unwrap();
                if let Some(reply) = (self.on_msg)(&m) {
                    let _ = ctx.send_msg(chan, &reply);
                }
            }
        }
        if events.intersects(Events::HUP) {
            let _ = ctx.close(chan);
        }
    }
}

/// Runs the ctrl suite against `ipc` and checks that exactly `failed` among its tests failed.
fn suite_fails_only(ipc: &mut Ipc, failed: &str) -> CtrlRun {
    use super::apps::TEST_FAILED;
    let run = run_ctrl(ipc, 0);
    let text = run.text();
    assert!(run.closed, "{text}");
    assert_eq!(run.status(), Some(TEST_FAILED), "{text}");
    assert!(text.contains(&format!("{failed}: FAILED")), "{text}");
    for t in CTRL_TESTS.iter().filter(|t| **t != failed) {
        assert!(text.contains(&format!("{t}: PASSED")), "{t}: {text}");
    }
    assert!(text.contains("Some tests FAILED"), "{text}");
    run
}

/// A closer1 that accepts but never closes: connect_close_by_peer(closer1) waits 10 s for the
/// HUPs that never come and fails; the other tests pass.
#[test]
fn a_closer_that_never_closes_fails_connect_close_by_peer() {
    let fake = FakeSrv { name: "closer1", accept: true, on_msg: |_| None };
    let mut ipc = services_with(&["closer1"], vec![Box::new(fake)]);
    let run = suite_fails_only(&mut ipc, "run_connect_close_by_peer_test(closer1)");
    assert!(run.elapsed >= 10_000 * MS, "the last wait_any(10000) timed out");
    assert_eq!(ipc.stats().channel_records, 0, "the test closed what it held");
}

/// A closer3 whose port neither accepts nor closes: each of the 16 sync_connect(2000) times out
/// (32 s of model time, as main.c), the test fails, and its verdict reaches the client even
/// though its 16 failure lines do not fit in one message.
#[test]
fn a_closer_that_never_answers_fails_connect_close_by_peer() {
    let fake = FakeSrv { name: "closer3", accept: false, on_msg: |_| None };
    let mut ipc = services_with(&["closer3"], vec![Box::new(fake)]);
    let run = suite_fails_only(&mut ipc, "run_connect_close_by_peer_test(closer3)");
    assert!(run.elapsed >= 16 * 2000 * MS, "elapsed {}", run.elapsed);
    assert!(run.text().contains("...\n"), "{}", run.text());
}

/// An echo service that changes one byte of every reply fails the echo test (the model
/// compares the bytes; main.c the length), and only it.
#[test]
fn an_echo_that_corrupts_data_fails_end_to_end() {
    let fake = FakeSrv {
        name: "echo",
        accept: true,
        on_msg: |m| {
            let mut r = m.to_vec();
            if let Some(b) = r.last_mut() {
                *b ^= 1;
            }
            Some(r)
        },
    };
    let mut ipc = services_with(&["echo"], vec![Box::new(fake)]);
    let run = suite_fails_only(&mut ipc, "run_end_to_end_msg_test");
    assert!(run.text().contains("echo reply data"), "{}", run.text());
}

/// An echo service that answers with a shorter message fails on the length, as main.c does;
/// one that never answers fails after one 1 s timeout (the model stops at the first).
#[test]
fn an_echo_that_truncates_or_stays_silent_fails_end_to_end() {
    let short = FakeSrv { name: "echo", accept: true, on_msg: |m| Some(m[..m.len() / 2].to_vec()) };
    let mut ipc = services_with(&["echo"], vec![Box::new(short)]);
    let run = suite_fails_only(&mut ipc, "run_end_to_end_msg_test");
    assert!(run.text().contains("reading echo msg: expected 64 actual 32"), "{}", run.text());
    let silent = FakeSrv { name: "echo", accept: true, on_msg: |_| None };
    let mut ipc = services_with(&["echo"], vec![Box::new(silent)]);
    let run = suite_fails_only(&mut ipc, "run_end_to_end_msg_test");
    assert!(run.text().contains("waiting on echo response: expected 0 actual -13"), "{}", run.text());
}

/// A datasink that never accepts: connect/close fails after one sync_connect timeout.
#[test]
fn a_datasink_that_never_accepts_fails_connect_close() {
    let fake = FakeSrv { name: "datasink", accept: false, on_msg: |_| None };
    let mut ipc = services_with(&["datasink"], vec![Box::new(fake)]);
    let run = suite_fails_only(&mut ipc, "run_connect_close_test");
    assert!(run.text().contains("connect/close: expected >= 0 actual (-13)"), "{}", run.text());
}

/// `Ctx::set_timer`: events keep coming while the timer is armed (and come first), the timer
/// counts in `next_deadline`, fires once when no event came, and can be cancelled.
#[test]
fn a_timer_ends_a_wait_unless_an_event_comes_first() {
    struct Waiter {
        log: Arc<Mutex<Vec<String>>>,
    }
    impl TrustedApp for Waiter {
        fn start(&mut self, ctx: &mut Ctx<'_>) {
            ctx.create_port("test.waiter", 1, 16, IPC_PORT_ALLOW_NS_CONNECT).unwrap();
            ctx.set_timer(Some(100 * MS));
        }
        fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, _events: Events) {
            self.log.lock().unwrap().push(format!("ready at {}", ctx.now() / MS));
            ctx.accept(port).unwrap();
        }
        fn on_chan_event(&mut self, _ctx: &mut Ctx<'_>, _chan: ChanId, _events: Events) {}
        fn on_timer(&mut self, ctx: &mut Ctx<'_>) {
            self.log.lock().unwrap().push(format!("timer at {}", ctx.now() / MS));
            if ctx.now() < 200 * MS {
                // Re-armed, then cancelled by the next run's event below.
                ctx.set_timer(Some(ctx.now() + 50 * MS));
            }
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut ipc = Ipc::new();
    ipc.add_app(Box::new(Waiter { log: log.clone() }));
    assert_eq!(ipc.next_deadline(), Some(100 * MS));
    ipc.connect_ns(b"test.waiter", 10 * MS).unwrap();
    assert!(ipc.run(10 * MS));
    assert!(!ipc.run(99 * MS), "not due yet");
    assert!(ipc.run(100 * MS));
    assert!(!ipc.run(100 * MS), "fires once");
    assert_eq!(ipc.next_deadline(), Some(150 * MS));
    assert!(ipc.run(150 * MS));
    assert_eq!(ipc.next_deadline(), Some(200 * MS));
    assert!(ipc.run(300 * MS));
    assert_eq!(ipc.next_deadline(), None, "not re-armed at 300 ms");
    assert_eq!(
        log.lock().unwrap().clone(),
        vec![
            String::from("ready at 10"),
            String::from("timer at 100"),
            String::from("timer at 150"),
            String::from("timer at 300"),
        ]
    );
}

/// A TA-to-TA echo server for the tests below: accepts every connection on `port`, echoes
/// each message, closes a channel on HUP; logs what it saw.
struct TaEcho {
    log: Arc<Mutex<Vec<String>>>,
    port_flags: u32,
}

impl TrustedApp for TaEcho {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        ctx.create_port("test.ta.echo", 2, 64, self.port_flags).unwrap();
    }
    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, _events: Events) {
        let r = ctx.accept(port);
        self.log.lock().unwrap().push(format!("accept {:?}", r.map(|(_, u)| u)));
    }
    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::MSG) {
            let m = ctx.get_msg(chan).unwrap();
            ctx.put_msg(chan).unwrap();
            ctx.send_msg(chan, &m).unwrap();
        }
        if events.intersects(Events::HUP) {
            self.log.lock().unwrap().push(String::from("server hup"));
            ctx.close(chan).unwrap();
        }
    }
}

/// The client: connects in `start`, sends "ping" on READY, closes after the echo.
struct TaClient {
    log: Arc<Mutex<Vec<String>>>,
    chan: Option<ChanId>,
}

impl TrustedApp for TaClient {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        let r = ctx.connect("test.ta.echo", IPC_CONNECT_ASYNC);
        self.log.lock().unwrap().push(format!("connect {}", r.is_ok()));
        self.chan = r.ok();
        if let Some(c) = self.chan {
            // Not accepted yet: nothing may be sent.
            let r = ctx.send_msg(c, b"early");
            self.log.lock().unwrap().push(format!("early {r:?}"));
        }
    }
    fn on_port_event(&mut self, _ctx: &mut Ctx<'_>, _port: PortId, _events: Events) {}
    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        self.log.lock().unwrap().push(format!("client events {:#x}", events.0));
        if events.intersects(Events::READY) {
            ctx.send_msg(chan, b"ping").unwrap();
        }
        if events.intersects(Events::MSG) {
            let m = ctx.get_msg(chan).unwrap();
            ctx.put_msg(chan).unwrap();
            self.log.lock().unwrap().push(format!("reply {}", String::from_utf8_lossy(&m)));
            ctx.close(chan).unwrap();
        }
    }
}

/// TA-to-TA (Trusty `ipc_port_connect_async()` / `ipc_port_accept()`): the client's connect is
/// pending until the server accepts (send is ERR_NOT_READY), then READY reaches the client, a
/// message goes both ways, the client's close is HUP at the server, and no record is left.
#[test]
fn ta_to_ta_connect_accept_echo_close() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut ipc = Ipc::new();
    ipc.add_app(Box::new(TaEcho { log: log.clone(), port_flags: IPC_PORT_ALLOW_TA_CONNECT }));
    ipc.add_app(Box::new(TaClient { log: log.clone(), chan: None }));
    ipc.run(0);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            String::from("connect true"),
            format!("early Err({})", lk::ERR_NOT_READY),
            format!("accept Ok({:?})", ta_uuid(1)),
            format!("client events {:#x}", Events::READY.0),
            format!("client events {:#x}", Events::MSG.0),
            String::from("reply ping"),
            String::from("server hup"),
        ]
    );
    assert_eq!(ipc.stats().channel_records, 0);
    assert_eq!(ipc.pending_events(), 0, "nothing goes to the normal world");
}

/// A port open only to the normal world refuses a TA (ERR_ACCESS_DENIED); a missing port is
/// ERR_NOT_FOUND; a connect whose client closed before the accept is ERR_CHANNEL_CLOSED at the
/// server; closing a port with a pending TA connection is HUP at the client.
#[test]
fn ta_to_ta_connect_failures() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut ipc = Ipc::new();
    ipc.add_app(Box::new(TaEcho { log: log.clone(), port_flags: IPC_PORT_ALLOW_NS_CONNECT }));
    ipc.add_app(Box::new(TaClient { log: log.clone(), chan: None }));
    assert_eq!(log.lock().unwrap().first().cloned(), Some(String::from("connect false")));
    let mut ctx = Ctx { core: &mut ipc.core, app: 1 };
    assert_eq!(ctx.connect("test.ta.echo", IPC_CONNECT_ASYNC), Err(lk::ERR_ACCESS_DENIED));
    assert_eq!(ctx.connect("test.ta.none", IPC_CONNECT_ASYNC), Err(lk::ERR_NOT_FOUND));
    assert_eq!(ctx.connect("test.ta.echo", 0), Err(lk::ERR_ACCESS_DENIED));
    let port = ctx.create_port("test.ta.own", 1, 16, IPC_PORT_ALLOW_TA_CONNECT).unwrap();
    assert_eq!(ctx.connect("test.ta.own", 0), Err(lk::ERR_NOT_SUPPORTED), "blocking connect");
    let c = ctx.connect("test.ta.own", IPC_CONNECT_ASYNC).unwrap();
    ctx.close(c).unwrap();
    assert_eq!(ctx.port_ready(port), Ok(true));
    assert_eq!(ctx.accept(port).map(|_| ()), Err(lk::ERR_CHANNEL_CLOSED));
    assert_eq!(ctx.accept(port).map(|_| ()), Err(lk::ERR_NO_MSG));
    let c = ctx.connect("test.ta.own", IPC_CONNECT_ASYNC).unwrap();
    assert_eq!(ctx.send_msg(c, b"x"), Err(lk::ERR_NOT_READY));
    ctx.close_port(port).unwrap();
    assert_eq!(ctx.poll(c), Ok(Events::HUP));
    assert_eq!(ctx.send_msg(c, b"x"), Err(lk::ERR_CHANNEL_CLOSED));
    ctx.close(c).unwrap();
    assert_eq!(ipc.stats().channel_records, 0);
}

/// The scheduler looks only at handles an event queued: with many idle channels open, an echo
/// on one of them costs the same handful of visits, and a run with nothing queued visits none.
#[test]
fn the_scheduler_visits_only_handles_with_events() {
    let mut ipc = Ipc::with_unittest_services();
    let chans: Vec<ChanId> = (0..40).map(|_| open(&mut ipc, "echo", 0)).collect();
    let before = ipc.scheduler_visits();
    assert!(!ipc.run(0), "nothing queued: nothing to do");
    assert_eq!(ipc.scheduler_visits(), before, "an idle run visits nothing");
    for round in 0..3u8 {
        let before = ipc.scheduler_visits();
        ipc.deliver(chans[17], &[round; 16], 0).expect("deliver");
        assert!(ipc.run(0));
        assert_eq!(drain(&mut ipc), vec![message(chans[17], &[round; 16])]);
        let visits = ipc.scheduler_visits() - before;
        assert_eq!(visits, 1, "one channel had an event; 40 are open");
    }
    // The events of several channels are each visited once, lowest id first.
    let before = ipc.scheduler_visits();
    for &c in [chans[30], chans[3], chans[12]].iter() {
        ipc.deliver(c, b"x", 0).expect("deliver");
    }
    assert!(ipc.run(0));
    let order: Vec<ChanId> = drain(&mut ipc).iter().map(IpcEvent::chan).collect();
    assert_eq!(order, vec![chans[3], chans[12], chans[30]]);
    assert_eq!(ipc.scheduler_visits() - before, 3);
}

/// The clock is read only when something needs the time: a run with no timer armed reads
/// none; an app's sleep reads it once, and the due wake-up reads it again after time passed.
#[test]
fn the_clock_is_read_only_when_a_timer_or_an_app_needs_it() {
    struct Counting(core::sync::atomic::AtomicU64, core::sync::atomic::AtomicU64);
    impl Clock for Counting {
        fn now_ns(&self) -> u64 {
            self.1.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            self.0.load(core::sync::atomic::Ordering::Relaxed)
        }
        fn sleep_ns(&self, ns: u64) {
            self.0.fetch_add(ns, core::sync::atomic::Ordering::Relaxed);
        }
    }
    let clock = Arc::new(Counting(Default::default(), Default::default()));
    let reads = || clock.1.load(core::sync::atomic::Ordering::Relaxed);
    let mut ipc = Ipc::with_unittest_services();
    ipc.set_clock(clock.clone());
    let echo = open(&mut ipc, "echo", 0);
    let start = reads();
    for _ in 0..10 {
        ipc.time_passed();
        ipc.deliver(echo, b"ping", 0).expect("deliver");
        assert!(ipc.run(0));
        assert_eq!(drain(&mut ipc), vec![message(echo, b"ping")]);
    }
    assert_eq!(reads(), start, "echoes with no timer armed read no clock");
    // closer1 sleeps on its first connection: the sleep reads the time, and from then on a
    // run after time passed reads it (once) to see whether the wake-up is due.
    ipc.time_passed();
    let c = ipc.connect_ns(&srv("closer1"), 0).expect("connect");
    ipc.run(0);
    let armed = reads();
    assert!(armed > start, "the sleep read the clock");
    assert!(ipc.next_deadline().is_some());
    clock.sleep_ns(CLOSER_SLEEP_NS);
    ipc.time_passed();
    ipc.run(0);
    ipc.run(0);
    assert_eq!(reads(), armed + 1, "one read per time step, however many looks");
    let _ = c;
}

/// Drives [`Ctx::echo_queued`] through its refusals: each leaves the channel as it was, so the
/// separate calls still see every message.
struct EchoProbe {
    log: Arc<Mutex<Vec<(&'static str, i32)>>>,
    calls: u32,
}

impl TrustedApp for EchoProbe {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        ctx.create_port("echoprobe", 2, 8, IPC_PORT_ALLOW_NS_CONNECT).unwrap();
    }
    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, _events: Events) {
        let _ = ctx.accept(port);
    }
    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if !events.intersects(Events::MSG) {
            return;
        }
        self.calls += 1;
        let mut log = self.log.lock().unwrap();
        let code = |r: Result<usize, i32>| r.map_or_else(|e| e, |n| n as i32);
        match self.calls {
            1 => {
                // One message got: put_msg would retire it, not the next: refused.
                log.push(("got", code(ctx.get_msg_len(chan))));
                log.push(("with-got", code(ctx.echo_queued(chan))));
                log.push(("put", code(ctx.put_msg(chan).map(|()| 0))));
                log.push(("after-put", code(ctx.echo_queued(chan))));
                log.push(("empty", code(ctx.echo_queued(chan))));
            }
            2 => {
                // The NS queue (2 deep) holds one: the first goes, the second stays untouched.
                log.push(("room-for-one", code(ctx.echo_queued(chan))));
                log.push(("left", code(ctx.get_msg_len(chan))));
                log.push(("put-left", code(ctx.put_msg(chan).map(|()| 0))));
            }
            _ => log.push(("later", code(ctx.echo_queued(chan)))),
        }
    }
}

#[test]
fn echo_queued_acts_only_when_get_send_and_put_all_would_succeed() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut ipc = Ipc::new();
    ipc.add_app(Box::new(EchoProbe { log: log.clone(), calls: 0 }));
    let chan = ipc.connect_ns(b"echoprobe", 0).unwrap();
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![accepted(chan)]);
    assert_eq!(ipc.deliver(chan, b"one", 0), Ok(3));
    assert_eq!(ipc.deliver(chan, b"two", 0), Ok(3));
    ipc.run(0);
    // "one" was got and put by hand (not sent); "two" went back by the fast path.
    assert_eq!(ipc.pending_events(), 1);
    assert_eq!(ipc.stats().sent_to_ns, 1);
    assert_eq!(ipc.deliver(chan, b"three", 0), Ok(5));
    assert_eq!(ipc.deliver(chan, b"four", 0), Ok(4));
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![message(chan, b"two"), message(chan, b"three")]);
    let stats = ipc.stats();
    assert_eq!((stats.sent_to_ns, stats.ports[0].sent), (2, 2));
    // "four" was put by hand: its slot is free again, and no SEND_UNBLOCKED was armed by the
    // refusal (nothing runs).
    assert!(!ipc.run(0));
    assert_eq!(ipc.deliver(chan, b"five", 0), Ok(4));
    assert_eq!(ipc.deliver(chan, b"six", 0), Ok(3));
    assert_eq!(ipc.deliver(chan, b"seven", 0), Err(lk::ERR_NOT_ENOUGH_BUFFER));
    ipc.run(0);
    assert_eq!(drain(&mut ipc), vec![message(chan, b"five"), message(chan, b"six")]);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            ("got", 3),
            ("with-got", lk::ERR_BAD_STATE),
            ("put", 0),
            ("after-put", 1),
            ("empty", 0),
            ("room-for-one", lk::ERR_NOT_ENOUGH_BUFFER),
            ("left", 4),
            ("put-left", 0),
            ("later", 2),
        ]
    );
}
