//! The stack against a hostile peer (conformance::hostile): a conduit that replaces answers and
//! writes raw ring memory. Nothing the peer does may panic the stack or hold a caller past its
//! stated timeout; every broken ring entry is counted.

use std::time::Duration;

use conformance::hostile::{self, within, Peer, RawDesc, Regs};
use conformance::{Rig, DATASINK, ECHO};
use trusty_stack::StackConfig;
use tipc::wire::{self, Ctrl, Header, ShmDesc};
use tipc::{Config, Error, Timeout};
use trusty_model::host::ModelMode;
use trusty_model::ModelConfig;
use trusty_platform::smc::{call, SmError};
use trusty_platform::trusty::CallPolicy;

/// Short limits, so that a peer that misbehaves forever is given up on quickly.
const CALL_MS: u64 = 300;
const CONNECT_MS: u64 = 300;
const TXBUF_MS: u64 = 300;
/// What scheduling on a loaded 2-core machine may add to a stated timeout.
const SLACK: Duration = Duration::from_millis(1500);
/// A hang is reported after this long instead of holding the test run.
const HANG: Duration = Duration::from_secs(20);

fn short() -> StackConfig {
    StackConfig {
        tipc: Config { connect_timeout_ms: CONNECT_MS, txbuf_timeout_ms: TXBUF_MS, online_timeout_ms: 1000, ..Config::default() },
        calls: CallPolicy {
            busy_immediate_retries: 5,
            busy_backoff_max_ms: 20,
            std_call_timeout_ms: CALL_MS,
            cpu_idle_timeout_ms: CALL_MS,
        },
        ..StackConfig::default()
    }
}

fn sm(code: SmError) -> Regs {
    [code.code() as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
}

fn is_kick(regs: &Regs) -> bool {
    regs[0] as u32 == call::SC_NOP && regs[1] as u32 == call::NC_VDEV_KICK_VQ
}

/// Every operation of an online stack, after the peer started answering every call with
/// `code`: each must end with an error (or, for close, at least end) within its stated limit.
fn every_operation_ends_in_time(code: SmError) {
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    let ch = rig.dev().connect(ECHO).expect("connect before the peer turns");
    peer.answer_everything(sm(code));
    let limit = |stated: u64| Duration::from_millis(stated) + SLACK;
    let mut dev = rig.dev.take().unwrap();

    let ((r, d), t) = within(HANG, "connect", move || {
        let r = dev.connect(DATASINK);
        (r, dev)
    });
    let mut dev = d;
    let e = r.expect_err("connect through a peer that never runs");
    assert!(t <= limit(CONNECT_MS + CALL_MS), "{code}: connect took {t:?}: {e}");
    assert!(!e.to_string().is_empty());

    let ((r, d), t) = within(HANG, "send", move || {
        let r = dev.send(ch, &[b"ping"], &[], Timeout::Ms(TXBUF_MS));
        (r, dev)
    });
    dev = d;
    // The message is in a tx buffer; the kick that announces it fails.
    assert!(t <= limit(TXBUF_MS + CALL_MS), "{code}: send took {t:?}: {r:?}");

    let ((r, d), t) = within(HANG, "recv", move || {
        let mut buf = [0u8; 64];
        let r = dev.recv(ch, &mut [&mut buf], Timeout::Ms(TXBUF_MS));
        (r, dev)
    });
    dev = d;
    let e = r.expect_err("no reply can come");
    assert!(t <= limit(TXBUF_MS + CALL_MS), "{code}: recv took {t:?}: {e}");

    let ((_, d), t) = within(HANG, "close", move || {
        let r = dev.close(ch);
        (r, dev)
    });
    dev = d;
    assert!(t <= limit(TXBUF_MS + CALL_MS), "{code}: close took {t:?}");

    let ((r, d), t) = within(HANG, "pump", move || {
        let r = dev.pump();
        (r, dev)
    });
    dev = d;
    assert!(t <= limit(CALL_MS), "{code}: pump took {t:?}: {r:?}");

    let ((_, result), t) = within(HANG, "shutdown", move || dev.shutdown());
    let e = result.expect_err("teardown through a peer that never runs");
    assert!(t <= limit(3 * CALL_MS), "{code}: shutdown took {t:?}: {e}");
    eprintln!("{code}: teardown error: {e}");
    assert!(peer.replaced() > 0);
}

#[test]
fn a_peer_answering_busy_forever() {
    every_operation_ends_in_time(SmError::Busy);
}

#[test]
fn a_peer_answering_interrupted_forever() {
    every_operation_ends_in_time(SmError::Interrupted);
}

#[test]
fn a_peer_answering_fiq_interrupted_forever() {
    every_operation_ends_in_time(SmError::FiqInterrupted);
}

#[test]
fn a_peer_answering_cpu_idle_forever() {
    every_operation_ends_in_time(SmError::CpuIdle);
}

#[test]
fn a_peer_answering_nop_interrupted_forever() {
    every_operation_ends_in_time(SmError::NopInterrupted);
}

#[test]
fn bring_up_through_a_peer_that_answers_busy_forever_fails_in_time() {
    for code in [SmError::Busy, SmError::Interrupted, SmError::FiqInterrupted, SmError::CpuIdle, SmError::NopInterrupted] {
        let peer = Peer::new(ModelMode::Sync, ModelConfig::default());
        peer.answer_everything(sm(code));
        let p = peer.clone();
        let (r, t) = within(HANG, "bring-up", move || p.bring_up(short()).map(|_| ()));
        let e = r.expect_err("bring-up through a peer that never answers");
        assert!(t <= Duration::from_millis(3 * CALL_MS) + SLACK, "{code}: bring-up took {t:?}: {e}");
        assert_eq!(peer.sim().as_ref().unwrap().ram().pages_in_use(), 0, "{code}: nothing left allocated");
    }
}

#[test]
fn a_peer_that_never_answers_a_connect() {
    // The peer takes every call but never gives Trusty the CPU: CONN_REQ is never read.
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    rig.echo_once(b"before");
    let swallow = peer.before(|_, regs| (regs[0] as u32 == call::SC_NOP).then_some([0; 8]));
    let mut dev = rig.dev.take().unwrap();
    let ((r, d), t) = within(HANG, "connect", move || {
        let r = dev.connect(ECHO);
        (r, dev)
    });
    assert_eq!(r, Err(Error::TimedOut), "a connect nobody answers times out");
    assert!(t >= Duration::from_millis(CONNECT_MS), "not before its timeout: {t:?}");
    assert!(t <= Duration::from_millis(CONNECT_MS) + SLACK, "connect took {t:?}");
    rig.dev = Some(d);
    peer.remove(swallow);
    rig.echo_once(b"after");
}

/// An rx descriptor the driver posted on vring 0 and the model has not used yet.
fn posted_rx(peer: &Peer) -> (u16, RawDesc) {
    peer.with_memory(|m| {
        let [r0, _] = m.rings().expect("rings known after START");
        let slot = m.used_idx(r0);
        let head = m.avail_entry(r0, slot);
        (head, m.read_desc(r0, head))
    })
}

fn data_frame(src: u32, dst: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Header { src, dst, shm_cnt: 0, len: payload.len() as u16, flags: 0 }.encode().to_vec();
    f.extend_from_slice(payload);
    f
}

fn ring_errors(rig: &mut Rig) -> u64 {
    rig.dev().stats().ring_errors
}

/// Writes one hostile entry with `inject` into a fresh online stack, then checks that the stack
/// counted it, did not panic, and that every later operation still ends (with or without an
/// error: the peer has desynchronised its own ring, so replies may be lost) in time.
///
/// `returns_a_posted_buffer`: the injected used entry hands back a buffer the model has not
/// consumed. The stack rightly takes it back and posts it again, so the model's own consumer
/// (which never used it) then sees one more available entry than the ring holds; upstream
/// Trusty's vqueue_get_avail_buf() panics on that ("new avail idx out of range"), and so does
/// the model. That fault is the peer's own desynchronisation and is the only one allowed then.
fn survives(
    what: &str,
    returns_a_posted_buffer: bool,
    inject: impl FnOnce(&Peer),
    counted: impl Fn(&tipc::DeviceStats, &tipc::DeviceStats) -> bool,
) {
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    rig.echo_once(b"warm up");
    let before = rig.dev().stats();
    inject(&peer);
    let _ = rig.dev().pump();
    let after = rig.dev().stats();
    assert!(counted(&before, &after), "{what}: counted ({before:?} -> {after:?})");
    let mut dev = rig.dev.take().unwrap();
    let (_, t) = within(HANG, what, move || {
        if let Ok(ch) = dev.connect(ECHO) {
            let _ = dev.send(ch, &[b"after"], &[], Timeout::Ms(TXBUF_MS));
            let mut buf = [0u8; 64];
            let _ = dev.recv(ch, &mut [&mut buf], Timeout::Ms(TXBUF_MS));
            let _ = dev.close(ch);
        }
        let (_, r) = dev.shutdown();
        r
    });
    assert!(t <= Duration::from_millis(CONNECT_MS + 2 * TXBUF_MS + 3 * CALL_MS) + SLACK, "{what}: took {t:?}");
    if returns_a_posted_buffer {
        let m = rig.sim.model();
        let unexpected: Vec<_> = m
            .faults()
            .iter()
            .filter(|f| !(f.mechanism == "vring" && f.what.contains("AvailIndexJump")))
            .collect();
        assert!(unexpected.is_empty(), "{what}: model faults other than the peer's own ring desync: {unexpected:?}");
    } else {
        rig.assert_no_faults();
    }
}

fn more_ring_errors(b: &tipc::DeviceStats, a: &tipc::DeviceStats) -> bool {
    a.ring_errors > b.ring_errors
}

#[test]
fn garbage_used_ids_are_counted_not_trusted() {
    for (what, ring, id) in [
        ("rx: id 0xFFFFFFFF", 0, 0xFFFF_FFFFu32),
        ("rx: id one past the ring", 0, 32),
        ("rx: id 65535", 0, 0xFFFF),
        ("tx: id 0xFFFFFFFF", 1, 0xFFFF_FFFF),
        ("tx: id one past the ring", 1, 32),
    ] {
        survives(what, false, |p| p.with_memory(|m| m.push_used(m.rings().unwrap()[ring], id, 16)), more_ring_errors);
    }
}

#[test]
fn huge_used_lengths_are_counted_not_trusted() {
    for len in [0xFFFF_FFF0u32, 0x8000_0000, 4097, 1 << 20] {
        survives(
            &format!("rx: used.len {len:#x} on a buffer in flight"),
            true,
            |p| {
                let (head, _) = posted_rx(p);
                p.with_memory(|m| m.push_used(m.rings().unwrap()[0], u32::from(head), len));
            },
            |b, a| a.ring_errors + a.malformed_frames > b.ring_errors + b.malformed_frames,
        );
    }
}

#[test]
fn a_used_index_that_jumps_past_the_ring_is_counted() {
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    rig.echo_once(b"warm up");
    for ring in 0..2 {
        let before = ring_errors(&mut rig);
        peer.with_memory(|m| {
            let r = m.rings().unwrap()[ring];
            m.set_used_idx(r, m.used_idx(r).wrapping_add(r.num + 5));
        });
        let dev = rig.dev();
        let _ = dev.pump();
        let _ = dev.pump();
        assert!(ring_errors(&mut rig) > before, "vring {ring}: an index jump is counted");
    }
}

#[test]
fn a_used_id_repeated_in_one_batch_is_not_delivered_twice() {
    // The peer writes one data frame and publishes its descriptor twice in one batch. The
    // second entry names a buffer that was just re-posted: it must not deliver (an old, or any)
    // message again, and it is counted.
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    let dev = rig.dev();
    let ch = dev.connect(DATASINK).unwrap();
    dev.send(ch, &[b"hi"], &[], Timeout::Ms(100)).unwrap();
    // The channel's addresses, as the last message the driver put on vring 1 carries them.
    let sent = peer.with_memory(|m| {
        let r1 = m.rings().unwrap()[1];
        let head = m.avail_entry(r1, m.avail_idx(r1).wrapping_sub(1));
        let mut h = [0u8; 16];
        assert!(m.read_buffer(m.read_desc(r1, head).addr, 0, &mut h));
        Header::decode(&h).expect("a header")
    });
    let (head, desc) = posted_rx(&peer);
    let frame = data_frame(sent.dst, sent.src, b"once");
    let before = rig.dev().stats();
    peer.with_memory(|m| {
        let r0 = m.rings().unwrap()[0];
        assert!(m.write_buffer(desc.addr, 0, &frame), "the rx buffer is reachable");
        m.push_used(r0, u32::from(head), frame.len() as u32);
        m.push_used(r0, u32::from(head), frame.len() as u32);
    });
    let dev = rig.dev();
    dev.pump().unwrap();
    let mut buf = [0u8; 64];
    let first = dev.recv(ch, &mut [&mut buf], Timeout::Ms(50));
    let second = dev.recv(ch, &mut [&mut buf], Timeout::Ms(50));
    let after = dev.stats();
    assert_eq!(first, Ok(4), "the frame is delivered once");
    assert_eq!(second, Err(Error::TimedOut), "and only once");
    assert!(after.ring_errors > before.ring_errors, "the repeated id is counted");
    let _ = dev.close(ch);
}

#[test]
fn a_peer_that_returns_a_frame_on_every_kick_cannot_exhaust_the_stack() {
    // Every kick is answered with one more frame in the next posted rx buffer (for an address
    // nobody has, so each is dropped and its buffer re-posted, which kicks again). Scanning
    // must stay bounded: no stack overflow, and the operation returns.
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    rig.echo_once(b"warm up");
    let frame = data_frame(1000, 4000, b"again");
    let mut sent = 0u64;
    let mut next: Option<u16> = None;
    peer.after(move |m, regs, _| {
        let Some([r0, r1]) = m.rings() else { return };
        // Always ask for kicks (a device that never sets VRING_USED_F_NO_NOTIFY).
        m.set_used_flags(r0, 0);
        m.set_used_flags(r1, 0);
        if !is_kick(regs) || sent >= 200_000 {
            return;
        }
        let slot = *next.get_or_insert_with(|| m.used_idx(r0));
        if slot == m.avail_idx(r0) {
            return;
        }
        let head = m.avail_entry(r0, slot);
        let d = m.read_desc(r0, head);
        if m.write_buffer(d.addr, 0, &frame) {
            m.write_used(r0, m.used_idx(r0), u32::from(head), frame.len() as u32);
            m.set_used_idx(r0, m.used_idx(r0).wrapping_add(1));
            next = Some(slot.wrapping_add(1));
            sent += 1;
        }
    });
    let mut dev = rig.dev.take().unwrap();
    let ((r, d), t) = within(HANG, "send with a frame on every kick", move || {
        let ch = dev.connect(DATASINK);
        (ch.and_then(|c| dev.send(c, &[b"x"], &[], Timeout::Ms(TXBUF_MS))), dev)
    });
    rig.dev = Some(d);
    eprintln!("send: {r:?} in {t:?}; stats {:?}", rig.dev().stats());
    assert!(rig.dev().stats().undeliverable_frames > 0, "the peer's frames arrived and were dropped");
}

/// Connects to datasink, sends one message, and returns the channel with its (local, remote)
/// addresses as the driver wrote them into that message's header on vring 1.
fn datasink_channel(rig: &mut Rig, peer: &Peer) -> (tipc::ChannelId, u32, u32) {
    let dev = rig.dev();
    let ch = dev.connect(DATASINK).unwrap();
    dev.send(ch, &[b"hi"], &[], Timeout::Ms(100)).unwrap();
    let h = peer.with_memory(|m| {
        let r1 = m.rings().unwrap()[1];
        let head = m.avail_entry(r1, m.avail_idx(r1).wrapping_sub(1));
        let mut h = [0u8; 16];
        assert!(m.read_buffer(m.read_desc(r1, head).addr, 0, &mut h));
        Header::decode(&h).expect("a header")
    });
    (ch, h.src, h.dst)
}

/// Puts `frame` into the next posted rx buffer and publishes it.
fn inject(peer: &Peer, frame: &[u8]) {
    let (head, desc) = posted_rx(peer);
    peer.with_memory(|m| {
        assert!(m.write_buffer(desc.addr, 0, frame), "the rx buffer is reachable");
        m.push_used(m.rings().unwrap()[0], u32::from(head), frame.len() as u32);
    });
}

#[test]
fn a_memory_id_in_two_messages_is_reclaimable_only_after_both_releases() {
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    let (ch, _, _) = datasink_channel(&mut rig, &peer);
    // From here the peer takes calls but never runs: only what it writes by hand arrives.
    peer.before(|_, regs| (regs[0] as u32 == call::SC_NOP).then_some([0; 8]));
    let shm = ShmDesc { obj_id: 0x5EC0_0000_0BAD, size: 4096, tag: 0 };
    let dev = rig.dev();
    dev.send(ch, &[b"one"], &[shm], Timeout::Ms(100)).unwrap();
    dev.send(ch, &[b"two"], &[shm], Timeout::Ms(100)).unwrap();
    let mut release = [0u8; 64];
    let n = wire::encode_ctrl(&Ctrl::Release { id: shm.obj_id }, wire::CTRL_ADDR, &mut release).unwrap();
    inject(&peer, &release[..n]);
    rig.dev().pump().unwrap();
    assert_eq!(rig.dev().take_released(), None, "one of the two messages is still Trusty's");
    inject(&peer, &release[..n]);
    rig.dev().pump().unwrap();
    assert_eq!(rig.dev().take_released(), Some(shm.obj_id), "both released: the owner may reclaim");
    assert_eq!(rig.dev().take_released(), None, "reported once");
}

#[test]
fn a_channel_that_is_never_read_holds_a_bounded_queue() {
    let (mut rig, peer) = hostile::rig(ModelMode::Sync, ModelConfig::default(), short());
    let (ch, local, remote) = datasink_channel(&mut rig, &peer);
    peer.before(|_, regs| (regs[0] as u32 == call::SC_NOP).then_some([0; 8]));
    let ring = peer.rings().unwrap()[0].num as usize;
    let frame = data_frame(remote, local, &[0x5A; 64]);
    for _ in 0..4 * ring {
        inject(&peer, &frame);
        rig.dev().pump().unwrap();
    }
    let dev = rig.dev();
    let mut queued = 0;
    let mut buf = [0u8; 128];
    while dev.recv(ch, &mut [&mut buf], Timeout::NonBlocking).is_ok() {
        queued += 1;
    }
    assert!(queued >= 1, "messages were delivered");
    assert!(queued <= ring, "{queued} messages queued on one channel: at most the rx pool ({ring})");
}
