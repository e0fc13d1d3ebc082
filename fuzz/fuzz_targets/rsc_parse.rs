//! The resource table Trusty writes into the descriptor page (GET_DESCR): peer-written bytes.
//! `parse` must never panic, and whatever it accepts must lie inside the bytes it was given,
//! because the bus later writes the negotiated fields (status, gfeatures, vring da/pa) back at
//! the offsets it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_virtio::rsc::{self, field, RSC_VDEV};

fuzz_target!(|data: &[u8]| {
    let Ok(vdevs) = rsc::parse(data) else { return };
    for v in &vdevs {
        // The entry type word just before the struct says "vdev".
        assert!(v.offset >= 4, "vdev at {} leaves no room for its type", v.offset);
        assert_eq!(&data[v.offset - 4..v.offset], &RSC_VDEV.to_le_bytes());
        // The struct, its vrings and its config space all lie inside the table.
        let end = v.offset + field::VRINGS + v.vrings.len() * field::VRING_LEN + v.config.len();
        assert!(end <= data.len(), "vdev at {} ends at {end}, past {}", v.offset, data.len());
        assert_eq!(&data[end - v.config.len()..end], &v.config[..]);
        // Every field the normal world writes back is inside the table.
        assert!(v.offset + field::STATUS < data.len());
        assert!(v.offset + field::GFEATURES + 4 <= data.len());
        for i in 0..v.vrings.len() {
            assert!(v.vring_field_offset(i, field::VRING_DA) + 4 <= data.len());
            assert!(v.vring_field_offset(i, field::VRING_PA) + 4 <= data.len());
        }
        // The copy is the bytes: the status byte and vring words read back the same.
        assert_eq!(data[v.offset + field::STATUS], v.status);
        for (i, r) in v.vrings.iter().enumerate() {
            let word = |off: usize| u32::from_le_bytes(data[off..off + 4].try_into().unwrap());
            assert_eq!(word(v.vring_field_offset(i, field::VRING_DA)), r.da);
            assert_eq!(word(v.vring_field_offset(i, field::VRING_PA)), r.pa);
        }
    }
});
