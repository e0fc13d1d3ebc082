//! The copy count of one echo through the stack alone: the payload is copied once into the tx
//! buffer and once out of the rx buffer, plus one 16-byte header each way. Counted at the only
//! routines that move bytes through shared buffers (`SharedBuf::{write,read}`, feature
//! `copy-count`); the counters are global, so this file holds one test (its own process).

use tipc::Timeout;
use tipc_bench::stack_peer::{self, ECHO_PORT};
use trusty_platform::mem::copy_count::{READS, WRITES};

#[test]
fn an_echo_copies_the_payload_once_each_way() {
    let mut rig = stack_peer::bring_up(tipc::Config::default()).unwrap_or_else(|e| panic!("{e}"));
    let ch = rig.dev.connect(ECHO_PORT).expect("connect");
    const HEADER: u64 = 16;
    const ROUNDS: u64 = 100;
    for size in [1usize, 16, 256, 1024, 4000] {
        let msg: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        let mut back = vec![0u8; size];
        let (w0, r0) = (WRITES.get(), READS.get());
        let rx_copies = rig.dev.stats().rx_copies;
        for _ in 0..ROUNDS {
            rig.dev.send(ch, &[&msg], &[], Timeout::Ms(5_000)).expect("send");
            assert_eq!(rig.dev.recv(ch, &mut [&mut back], Timeout::Ms(5_000)).expect("recv"), size);
        }
        assert_eq!(back, msg);
        let (w1, r1) = (WRITES.get(), READS.get());
        let size = size as u64;
        // Into the tx buffer: the header, then the payload from the caller's buffer.
        assert_eq!(((w1.0 - w0.0) / ROUNDS, (w1.1 - w0.1) / ROUNDS), (2, HEADER + size), "writes per echo of {size} B");
        // Out of the rx buffer: the header (validation), then the payload into the caller's.
        assert_eq!(((r1.0 - r0.0) / ROUNDS, (r1.1 - r0.1) / ROUNDS), (2, HEADER + size), "reads per echo of {size} B");
        assert_eq!((w1.0 - w0.0) % ROUNDS + (r1.0 - r0.0) % ROUNDS, 0, "copies per echo vary");
        assert_eq!(rig.dev.stats().rx_copies, rx_copies, "a message was copied out of its rx buffer on arrival");
    }
    // The peer's side: one copy of each payload from the tx buffer into an rx buffer.
    let s = rig.peer.stats();
    assert_eq!(s.echoed, 5 * ROUNDS);
}
