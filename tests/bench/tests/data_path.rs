//! The stack's data path measured against the stack peer (tipc device + trusty-virtio +
//! platform, nothing else on the thread): no heap allocation per message, one secure call per
//! echo, at most one clock read per echo, and the peer reaches only what was shared.


use tipc::{Error, Timeout};
use tipc_bench::alloc_count::{allocs_on_this_thread, CountingAlloc};
use tipc_bench::stack_peer::{self, StackRig, ECHO_PORT, SINK_PORT};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const WAIT: Timeout = Timeout::Ms(5_000);
const SIZES: [usize; 5] = [1, 16, 256, 1024, 4000];

fn rig() -> StackRig {
    stack_peer::bring_up(tipc::Config::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn echo(rig: &mut StackRig, ch: tipc::ChannelId, msg: &[u8], back: &mut [u8]) {
    rig.dev.send(ch, &[msg], &[], WAIT).expect("send");
    let n = rig.dev.recv(ch, &mut [back], WAIT).expect("recv");
    assert_eq!(n, msg.len(), "echo length");
}

#[test]
fn an_echo_allocates_nothing_after_warm_up() {
    let mut rig = rig();
    let ch = rig.dev.connect(ECHO_PORT).expect("connect");
    for size in SIZES {
        let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let mut back = vec![0u8; size];
        for _ in 0..100 {
            echo(&mut rig, ch, &msg, &mut back);
        }
        let before = allocs_on_this_thread();
        for _ in 0..1000 {
            echo(&mut rig, ch, &msg, &mut back);
        }
        let n = allocs_on_this_thread() - before;
        assert_eq!(n, 0, "{n} heap allocations in 1000 echoes of {size} B (send + receive)");
        assert_eq!(back, msg, "the echo brought back other bytes");
    }
    let sink = rig.dev.connect(SINK_PORT).expect("connect to the sink");
    let msg = vec![7u8; 4000];
    for _ in 0..100 {
        rig.dev.send(sink, &[&msg], &[], WAIT).expect("send");
    }
    let before = allocs_on_this_thread();
    for _ in 0..1000 {
        rig.dev.send(sink, &[&msg], &[], WAIT).expect("send");
    }
    assert_eq!(allocs_on_this_thread() - before, 0, "heap allocations while streaming to the sink");
    let s = rig.peer.stats();
    assert_eq!((s.refused, s.malformed, s.lost), (0, 0, 0), "{s:?}");
}

#[test]
fn an_echo_is_one_secure_call_and_at_most_one_clock_read() {
    // The idle pump (a NOP when Trusty has not run for `idle_pump_ms`) depends on time, and a
    // loaded machine can pause this thread for longer than its 10 ms: it is out of the count.
    let cfg = tipc::Config { idle_pump_ms: 600_000, ..tipc::Config::default() };
    let mut rig = stack_peer::bring_up(cfg).unwrap_or_else(|e| panic!("{e}"));
    let ch = rig.dev.connect(ECHO_PORT).expect("connect");
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..10 {
        echo(&mut rig, ch, &msg, &mut back);
    }
    let calls = rig.peer.stats().calls;
    let reads = rig.peer.clock_reads();
    const ROUNDS: u64 = 1000;
    for _ in 0..ROUNDS {
        echo(&mut rig, ch, &msg, &mut back);
    }
    assert_eq!(rig.peer.stats().calls - calls, ROUNDS, "secure calls in {ROUNDS} echoes");
    let reads = rig.peer.clock_reads() - reads;
    assert!(reads <= ROUNDS, "{reads} clock reads in {ROUNDS} echoes (at most one each)");
}

#[test]
fn connect_refusal_disconnect_and_teardown_against_the_peer() {
    let mut rig = rig();
    assert_eq!(rig.dev.connect("no.such.port").err(), Some(Error::NotConnected));
    // More connect/close cycles than the peer has endpoints: each close's DISC_REQ frees one.
    for _ in 0..40 {
        let ch = rig.dev.connect(ECHO_PORT).expect("connect");
        let mut back = [0u8; 3];
        echo(&mut rig, ch, b"abc", &mut back);
        assert_eq!(&back, b"abc");
        rig.dev.close(ch).expect("close");
    }
    let s = rig.peer.stats();
    assert_eq!((s.refused, s.malformed, s.lost), (0, 0, 0), "{s:?}");
    assert_eq!(s.echoed, 40);
    let peer = rig.peer.clone();
    assert!(peer.live_shares() > 0);
    let (_bus, r) = rig.dev.shutdown();
    r.expect("teardown");
    assert_eq!(peer.live_shares(), 0, "shares left after teardown");
}

/// The peer on the other core, behind the mailbox (`tipc-bench`'s `stack-cores` mode): the
/// same echoes and counts as inside the call, and teardown stops its thread.
#[test]
fn the_peer_on_the_other_core_answers_through_the_mailbox_with_one_call_per_echo() {
    let cfg = tipc::Config { idle_pump_ms: 600_000, ..tipc::Config::default() };
    let mut rig = stack_peer::bring_up_at(cfg, stack_peer::Placement::OtherCore).unwrap_or_else(|e| panic!("{e}"));
    let ch = rig.dev.connect(ECHO_PORT).expect("connect");
    for size in SIZES {
        let msg: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        let mut back = vec![0u8; size];
        for _ in 0..50 {
            echo(&mut rig, ch, &msg, &mut back);
        }
        let calls = rig.peer.stats().calls;
        let before = allocs_on_this_thread();
        const ROUNDS: u64 = 500;
        for _ in 0..ROUNDS {
            echo(&mut rig, ch, &msg, &mut back);
        }
        assert_eq!(allocs_on_this_thread() - before, 0, "heap allocations on the stack's thread, {size} B");
        assert_eq!(rig.peer.stats().calls - calls, ROUNDS, "secure calls in {ROUNDS} echoes of {size} B");
        assert_eq!(back, msg, "the echo brought back other bytes");
    }
    rig.dev.close(ch).expect("close");
    let s = rig.peer.stats();
    assert_eq!((s.refused, s.malformed, s.lost), (0, 0, 0), "{s:?}");
    let peer = rig.peer.clone();
    let (_bus, r) = rig.dev.shutdown();
    r.expect("teardown through the mailbox");
    assert_eq!(peer.live_shares(), 0, "shares left after teardown");
}
