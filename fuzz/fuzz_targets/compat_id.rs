//! §3.2 "compat" memory ids, as the secure side (or a mediator) decodes what the normal world
//! sent. Any u64: `decode_compat` must not panic, an accepted id must yield a 48-bit
//! page-aligned address, and `encode_compat` of that address must decode to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_platform::mem::Access;
use trusty_platform::phys::{decode_compat, encode_compat, AP_RO, MAIR_NORMAL_WB_RWA, PA_MASK};

fuzz_target!(|data: &[u8]| {
    let mut raw = [0u8; 8];
    let n = data.len().min(8);
    raw[..n].copy_from_slice(&data[..n]);
    let id = u64::from_le_bytes(raw);

    let Ok((pa, read_only)) = decode_compat(id) else { return };
    assert_eq!(pa & !PA_MASK, 0, "decoded address {pa:#x} of {id:#x} has bits outside 47..12");
    assert_eq!(pa, id & PA_MASK);
    assert_eq!(read_only, id & AP_RO != 0);

    let access = if read_only { Access::ReadOnly } else { Access::ReadWrite };
    let again = encode_compat(pa, access);
    assert_eq!(decode_compat(again), Ok((pa, read_only)), "id {id:#x}: re-encoded as {again:#x}");
    // For cached memory the re-encoding is the id without the bits the decoder ignores
    // (EL0 bit 6, bits 5..0, 11..10).
    if (id >> 48) as u8 == MAIR_NORMAL_WB_RWA {
        let kept = 0x00FF_0000_0000_0000 | PA_MASK | (3 << 8) | AP_RO;
        assert_eq!(again, id & kept, "id {id:#x}: re-encoded as {again:#x}");
    }
});
