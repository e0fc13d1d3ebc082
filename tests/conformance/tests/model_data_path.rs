//! The model's data path allocates nothing per message: with the model inside each call
//! (`ModelMode::Sync`, `-D sim`), an echo round trip and a one-way message to the data sink,
//! stack and model together, make no heap allocation once warm (issue 11: "a model fast enough
//! not to hide the stack"). The default model: FF-A handles, identity stage-2.


use conformance::{Rig, DATASINK, ECHO};
use tipc_bench::alloc_count::{allocs_on_this_thread, CountingAlloc};
use tipc::Timeout;
use trusty_model::host::ModelMode;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const WAIT: Timeout = Timeout::Ms(5_000);

#[test]
fn an_echo_round_trip_with_the_model_in_the_call_allocates_nothing() {
    let mut rig = Rig::new(ModelMode::Sync);
    let dev = rig.dev();
    let ch = dev.connect(ECHO).expect("connect to echo");
    for size in [16usize, 256, 1024, 4000] {
        let msg = vec![0xa5u8; size];
        let mut back = vec![0u8; 4096];
        let mut round = |dev: &mut tipc::TipcDevice| {
            assert_eq!(dev.send(ch, &[&msg], &[], WAIT), Ok(size));
            let n = dev.recv(ch, &mut [&mut back], WAIT).expect("echo reply");
            assert_eq!(&back[..n], &msg[..]);
        };
        // Warm: pools and queues reach their working size.
        for _ in 0..64 {
            round(dev);
        }
        let before = allocs_on_this_thread();
        for _ in 0..500 {
            round(dev);
        }
        let n = allocs_on_this_thread() - before;
        assert_eq!(n, 0, "{n} heap allocations in 500 echo round trips of {size} B (stack and model)");
    }
    dev.close(ch).expect("close");
    rig.shutdown_clean();
}

#[test]
fn one_way_messages_to_the_data_sink_allocate_nothing() {
    let mut rig = Rig::new(ModelMode::Sync);
    let dev = rig.dev();
    let ch = dev.connect(DATASINK).expect("connect to the data sink");
    let msg = vec![0x3cu8; 4000];
    for _ in 0..64 {
        assert_eq!(dev.send(ch, &[&msg], &[], WAIT), Ok(msg.len()));
    }
    let before = allocs_on_this_thread();
    for _ in 0..1000 {
        assert_eq!(dev.send(ch, &[&msg], &[], WAIT), Ok(msg.len()));
    }
    let n = allocs_on_this_thread() - before;
    assert_eq!(n, 0, "{n} heap allocations in 1000 messages to the data sink (stack and model)");
    dev.close(ch).expect("close");
    rig.shutdown_clean();
}

/// With the model on its own core (`-D sim-cores`), the kick that carries a message is the
/// only secure call of an echo: the model finishes the work before it answers, so the reply is
/// in the ring when the call returns (as the Trusty VM image does under QEMU).
#[test]
fn one_secure_call_per_echo_with_the_model_on_another_core() {
    // The idle pump adds a NOP when Trusty has not run for `idle_pump_ms`: on a loaded machine
    // a round trip can take that long, and that NOP is not what this test counts.
    let cfg = conformance::config_without_idle_pump();
    let mut rig = Rig::with(ModelMode::Cores, trusty_model::ModelConfig::default(), cfg, |_| {});
    let dev = rig.dev();
    let ch = dev.connect(ECHO).expect("connect to echo");
    let mut buf = [0u8; 64];
    dev.send(ch, &[b"warm"], &[], WAIT).unwrap();
    dev.recv(ch, &mut [&mut buf], WAIT).unwrap();
    let before = dev.bus().trusty_ref().stats().smcs;
    for _ in 0..200 {
        dev.send(ch, &[b"ping"], &[], WAIT).unwrap();
        assert_eq!(dev.recv(ch, &mut [&mut buf], WAIT), Ok(4));
    }
    let calls = dev.bus().trusty_ref().stats().smcs - before;
    assert_eq!(calls, 200, "one kick per round trip, nothing else");
    dev.close(ch).expect("close");
    rig.shutdown_clean();
}

/// With the model inside the call, an echo is one round of the model's TIPC device (frame in,
/// the echo app, frame out): no second round is run only to find that nothing moves.
#[test]
fn an_echo_is_one_round_of_the_models_device() {
    let mut rig = Rig::new(ModelMode::Sync);
    let ch = rig.dev().connect(ECHO).expect("connect to echo");
    let mut buf = [0u8; 64];
    rig.dev().send(ch, &[b"warm"], &[], WAIT).unwrap();
    rig.dev().recv(ch, &mut [&mut buf], WAIT).unwrap();
    let before = rig.sim.model().stats();
    for _ in 0..100 {
        rig.dev().send(ch, &[b"ping"], &[], WAIT).unwrap();
        assert_eq!(rig.dev().recv(ch, &mut [&mut buf], WAIT), Ok(4));
    }
    let after = rig.sim.model().stats();
    let rounds = after.tipc.rounds - before.tipc.rounds;
    // The send's idle catch-up NOPs when this thread was stalled past the idle threshold (a
    // loaded machine): such a NOP may run one round of its own, and nothing else may.
    let nops = after.nops - before.nops;
    assert!(
        (100..=100 + nops).contains(&rounds),
        "one device round per echo: {rounds} rounds for 100 echoes ({nops} catch-up NOPs)"
    );
    rig.dev().close(ch).expect("close");
    rig.shutdown_clean();
}
