//! FF-A memory-transaction descriptors as a receiver (an SPMC, Xen's mediator, the model)
//! decodes them. `decode_descriptor` must not panic; what it accepts must re-encode with
//! `encode_descriptor` into a descriptor that decodes to the same transaction.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_platform::ffa::{decode_descriptor, descriptor_len, encode_descriptor, MemTransaction};

const MAX_RANGES: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Ok(tx) = decode_descriptor(data, MAX_RANGES) else { return };
    assert!(!tx.ranges.is_empty() && tx.ranges.len() <= MAX_RANGES);
    // Every accepted range (and the 16-byte composite before them) was inside the input.
    assert!(16 + 16 * tx.ranges.len() <= data.len(), "{} ranges from {} bytes", tx.ranges.len(), data.len());

    let view = MemTransaction {
        sender: tx.sender,
        receiver: tx.receiver,
        attributes: tx.attributes,
        permissions: tx.permissions,
        tag: tx.tag,
        ranges: &tx.ranges[..],
    };
    let mut buf = vec![0u8; descriptor_len(tx.ranges.len())];
    let len = encode_descriptor(&view, &mut buf).expect("an accepted descriptor re-encodes");
    assert_eq!(len, buf.len());
    let back = decode_descriptor(&buf[..len], MAX_RANGES).expect("a re-encoded descriptor decodes");
    assert_eq!(back, tx);
});
