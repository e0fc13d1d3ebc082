//! TIPC frames as received from the secure side: input = `used` (the length the ring reported,
//! little-endian u32) followed by the buffer as copied out of shared memory. `parse_frame`,
//! `parse_ctrl` (both the normal-world and the secure-side variant) and `split_shm` must never
//! panic, and what they accept must be exactly what the bytes say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tipc::wire::{self, Ctrl, Frame, FrameError, Header, CTRL_ADDR, HEADER_LEN, SHM_DESC_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let used = u32::from_le_bytes(data[..4].try_into().unwrap());
    let buf = &data[4..];

    match wire::parse_frame(buf, used) {
        Ok(Frame::Data { header, payload }) => {
            // Exact lengths (16 + hdr.len == used), inside the buffer.
            assert_eq!(used as usize, HEADER_LEN + usize::from(header.len));
            assert_eq!(payload, &buf[HEADER_LEN..used as usize]);
            assert_ne!(header.dst, CTRL_ADDR);
            assert_eq!(Header::decode(buf), Some(header));
            check_split(&header, payload);
        }
        Ok(Frame::Control(msg)) => {
            let header = Header::decode(buf).unwrap();
            assert_eq!(header.dst, CTRL_ADDR);
            assert_eq!(used as usize, HEADER_LEN + usize::from(header.len));
            round_trip(&msg);
        }
        Err(FrameError::BadLength { used: u }) => assert_eq!(u, used),
        Err(_) => {}
    }

    // The control parser on its own, on whatever follows a decoded header, both as the normal
    // world (shm_cnt ignored) and as the secure side (shm_cnt must be 0).
    if let Some(header) = Header::decode(buf) {
        let payload = &buf[HEADER_LEN..];
        let nw = wire::parse_ctrl(payload, header.shm_cnt, false);
        let sw = wire::parse_ctrl(payload, header.shm_cnt, true);
        if header.shm_cnt != 0 {
            assert_eq!(sw, Err(FrameError::ControlWithShm));
        } else {
            assert_eq!(sw, nw);
        }
        if let Ok(msg) = &nw {
            round_trip(msg);
        }
        check_split(&header, payload);
    }
});

/// Encoding a parsed control message and parsing the frame again gives the same message.
fn round_trip(msg: &Ctrl) {
    let mut out = [0u8; HEADER_LEN + wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
    let n = wire::encode_ctrl(msg, CTRL_ADDR, &mut out).expect("a parsed control message encodes");
    assert_eq!(wire::parse_frame(&out, n as u32), Ok(Frame::Control(msg.clone())));
}

/// `split_shm` either refuses a count that does not fit or splits the payload exactly.
fn check_split(header: &Header, payload: &[u8]) {
    let shm_bytes = usize::from(header.shm_cnt) * SHM_DESC_LEN;
    match wire::split_shm(header, payload) {
        Ok((data_len, descs)) => {
            assert!(shm_bytes <= payload.len());
            assert_eq!(data_len + shm_bytes, payload.len());
            let descs: Vec<_> = descs.collect();
            assert_eq!(descs.len(), usize::from(header.shm_cnt));
            for (d, raw) in descs.iter().zip(payload[data_len..].chunks_exact(SHM_DESC_LEN)) {
                assert_eq!(&d.encode()[..], raw);
            }
        }
        Err(e) => {
            assert!(shm_bytes > payload.len());
            assert_eq!(e, FrameError::BadShmCount { shm_cnt: header.shm_cnt, len: header.len });
        }
    }
}
