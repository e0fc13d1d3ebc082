//! TIPC wire format (spec §6.2, §6.3, §6.9): the 16-byte header, control messages and
//! shared-memory descriptors, with exact validation of everything received.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Address of the control endpoint on both sides (spec §6.1).
pub const CTRL_ADDR: u32 = 53;
/// Lowest normal-world channel address.
pub const MIN_LOCAL_ADDR: u32 = 1024;
/// Trusty's endpoint addresses are 1000 + slot, 256 slots (spec §6.1).
pub const TRUSTY_ADDR_BASE: u32 = 1000;
/// Number of Trusty's endpoint slots.
pub const TRUSTY_ADDR_SLOTS: u32 = 256;
/// Header size.
pub const HEADER_LEN: usize = 16;
/// Control payload header: type + body length.
pub const CTRL_HEADER_LEN: usize = 8;
/// CONN_REQ name field.
pub const PORT_NAME_FIELD: usize = 256;
/// One shared-memory descriptor (the 2021 layout with tag, spec §6.9).
pub const SHM_DESC_LEN: usize = 24;

/// Control message types (spec §6.3).
pub mod ctrl {
    /// Trusty's side is up.
    pub const GO_ONLINE: u32 = 1;
    /// Trusty's side went down.
    pub const GO_OFFLINE: u32 = 2;
    /// Connect a channel to a port.
    pub const CONN_REQ: u32 = 3;
    /// The answer to CONN_REQ.
    pub const CONN_RSP: u32 = 4;
    /// Disconnect a channel.
    pub const DISC_REQ: u32 = 5;
    /// Release shared memory.
    pub const RELEASE: u32 = 6;
    /// Ask to reuse message buffers.
    pub const REUSE_MSGBUF_REQ: u32 = 7;
    /// The answer to REUSE_MSGBUF_REQ.
    pub const REUSE_MSGBUF_RSP: u32 = 8;
    /// Ask to unmap shared memory.
    pub const UNMAP_REQ: u32 = 9;
    /// The answer to UNMAP_REQ.
    pub const UNMAP_RSP: u32 = 10;
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C)]
struct RawHeader {
    src: U32,
    dst: U32,
    reserved: U16,
    shm_cnt: U16,
    len: U16,
    flags: U16,
}

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's address.
    pub src: u32,
    /// Receiver's address.
    pub dst: u32,
    /// Shared-memory descriptors at the end of the payload.
    pub shm_cnt: u16,
    /// Payload length in bytes.
    pub len: u16,
    /// Flags (none defined).
    pub flags: u16,
}

impl Header {
    /// The header's 16 wire bytes (little-endian, reserved field zero).
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            src: self.src.into(),
            dst: self.dst.into(),
            reserved: 0.into(),
            shm_cnt: self.shm_cnt.into(),
            len: self.len.into(),
            flags: self.flags.into(),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// The header at the start of `bytes`; `None` when shorter than a header.
    #[inline]
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let (raw, _) = RawHeader::read_from_prefix(bytes).ok()?;
        Some(Header {
            src: raw.src.get(),
            dst: raw.dst.get(),
            shm_cnt: raw.shm_cnt.get(),
            len: raw.len.get(),
            flags: raw.flags.get(),
        })
    }
}

/// A control message, parsed (spec §6.3). It lives briefly on the stack; CONN_REQ's inline
/// name keeps parsing free of allocation, hence the size difference.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ctrl {
    /// GO_ONLINE: Trusty's side is up.
    GoOnline,
    /// GO_OFFLINE: Trusty's side went down.
    GoOffline,
    /// The port name without its NUL padding.
    ConnReq {
        /// The port to connect to.
        name: heapless_name::Name,
    },
    /// CONN_RSP: the answer to a CONN_REQ.
    ConnRsp {
        /// The local address the request came from.
        target: u32,
        /// 0 or a negative error.
        status: i32,
        /// The remote (Trusty) address of the channel.
        remote: u32,
        /// Largest message the channel takes.
        max_msg_size: u32,
        /// Messages the channel queues.
        max_msg_cnt: u32,
    },
    /// DISC_REQ: the peer closed the channel.
    DiscReq {
        /// The local address of the channel.
        target: u32,
    },
    /// RELEASE: the peer is done with shared memory `id`.
    Release {
        /// The memory id.
        id: u64,
    },
    /// REUSE_MSGBUF_REQ.
    ReuseMsgBufReq,
    /// REUSE_MSGBUF_RSP.
    ReuseMsgBufRsp,
    /// UNMAP_REQ: asks the peer to unmap shared memory `id`.
    UnmapReq {
        /// The memory id.
        id: u64,
    },
    /// UNMAP_RSP: the answer to an UNMAP_REQ.
    UnmapRsp {
        /// 0 or a negative error.
        result: i32,
        /// The memory id.
        id: u64,
    },
}

/// A fixed-capacity port name (at most 255 bytes), so parsing allocates nothing.
pub mod heapless_name {
    /// Up to 255 bytes of a port name.
    #[derive(Clone, PartialEq, Eq)]
    pub struct Name {
        len: u8,
        bytes: [u8; 255],
    }
    impl Name {
        /// `None` when longer than 255 bytes.
        pub fn new(name: &[u8]) -> Option<Name> {
            let len = u8::try_from(name.len()).ok()?;
            let mut bytes = [0u8; 255];
            bytes[..name.len()].copy_from_slice(name);
            Some(Name { len, bytes })
        }
        /// The name's bytes.
        pub fn as_bytes(&self) -> &[u8] {
            &self.bytes[..usize::from(self.len)]
        }
    }
    impl core::fmt::Debug for Name {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{:?}", core::str::from_utf8(self.as_bytes()).unwrap_or("<non-utf8>"))
        }
    }
}

/// Why a received frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than 16 bytes, or more than the buffer holds.
    BadLength {
        /// The length the ring reported.
        used: u32,
    },
    /// 16 + hdr.len differs from the length the ring reported.
    LengthMismatch {
        /// The length the ring reported.
        used: u32,
        /// The header's payload length.
        hdr_len: u16,
    },
    /// A control payload whose 8 + body_len differs from hdr.len, or with a body of the wrong
    /// size for its type.
    BadControl {
        /// The control type.
        ctrl_type: u32,
        /// The body length it states.
        body_len: u32,
    },
    /// A control message with shared-memory descriptors.
    ControlWithShm,
    /// More shm descriptors than the payload holds.
    BadShmCount {
        /// Descriptors the header states.
        shm_cnt: u16,
        /// The payload length.
        len: u16,
    },
    /// A CONN_REQ name without a NUL within 256 bytes.
    UnterminatedName,
}

/// A frame, parsed and validated.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A control message (sent to the control address).
    Control(Ctrl),
    /// A data message for a channel.
    Data {
        /// Its header.
        header: Header,
        /// Its payload (shm descriptors included).
        payload: &'a [u8],
    },
}

/// Validates one received frame: `buf` is the buffer as copied out of shared memory and
/// `used` the length the ring reported. Lengths are checked exactly (spec §6.6 step 6,
/// §11 subtlety 8).
pub fn parse_frame(buf: &[u8], used: u32) -> Result<Frame<'_>, FrameError> {
    let used_len = used as usize;
    if used_len < HEADER_LEN || used_len > buf.len() {
        return Err(FrameError::BadLength { used });
    }
    let header = Header::decode(buf).ok_or(FrameError::BadLength { used })?;
    if used_len - HEADER_LEN != usize::from(header.len) {
        return Err(FrameError::LengthMismatch { used, hdr_len: header.len });
    }
    let payload = &buf[HEADER_LEN..used_len];
    if header.dst == CTRL_ADDR {
        return parse_ctrl(payload, header.shm_cnt, false).map(Frame::Control);
    }
    Ok(Frame::Data { header, payload })
}

/// The little-endian word at `at` in `b`; 0 past the end (callers check lengths first).
// Out of line, without a panic path: parse_ctrl reads a dozen words.
#[inline(never)]
fn le32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(&[b0, b1, b2, b3]) => u32::from_le_bytes([b0, b1, b2, b3]),
        _ => 0,
    }
}

/// Where the first NUL byte of `b` is (a C string's end in a fixed-size name field).
// One out-of-line copy of the byte search for the port name and the device name.
#[inline(never)]
pub(crate) fn nul_at(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == 0)
}

/// Parses a control payload. `check_shm` is for the secure side, which rejects control messages
/// that carry shm descriptors; Trusty leaves shm_cnt unwritten in what it sends (spec §11 5), so
/// the normal world must not look at it.
pub fn parse_ctrl(payload: &[u8], shm_cnt: u16, check_shm: bool) -> Result<Ctrl, FrameError> {
    if check_shm && shm_cnt != 0 {
        return Err(FrameError::ControlWithShm);
    }
    let bad = |t: u32, l: u32| FrameError::BadControl { ctrl_type: t, body_len: l };
    if payload.len() < CTRL_HEADER_LEN {
        return Err(bad(0, 0));
    }
    let ctrl_type = le32(payload, 0);
    let body_len = le32(payload, 4);
    let body = &payload[CTRL_HEADER_LEN..];
    if body.len() != body_len as usize {
        return Err(bad(ctrl_type, body_len));
    }
    let u64_at = |at: usize| -> u64 { u64::from(le32(body, at)) | (u64::from(le32(body, at + 4)) << 32) };
    let exact = |n: usize| if body.len() == n { Ok(()) } else { Err(bad(ctrl_type, body_len)) };
    Ok(match ctrl_type {
        // Linux _handle_ctrl_msg() looks at no body for GO_ONLINE / GO_OFFLINE: whatever follows
        // (a body_len consistent with hdr.len) is ignored, not refused.
        ctrl::GO_ONLINE => Ctrl::GoOnline,
        ctrl::GO_OFFLINE => Ctrl::GoOffline,
        ctrl::CONN_REQ => {
            exact(PORT_NAME_FIELD)?;
            let end = nul_at(body).ok_or(FrameError::UnterminatedName)?;
            let name = heapless_name::Name::new(&body[..end]).ok_or(FrameError::UnterminatedName)?;
            Ctrl::ConnReq { name }
        }
        ctrl::CONN_RSP => {
            exact(20)?;
            Ctrl::ConnRsp {
                target: le32(body, 0),
                status: le32(body, 4) as i32,
                remote: le32(body, 8),
                max_msg_size: le32(body, 12),
                max_msg_cnt: le32(body, 16),
            }
        }
        ctrl::DISC_REQ => {
            exact(4)?;
            Ctrl::DiscReq { target: le32(body, 0) }
        }
        // The normal world accepts a RELEASE body of 8 or more bytes (spec §6.3; Linux
        // _handle_release() only refuses `len < sizeof(*req)`).
        ctrl::RELEASE if body.len() >= 8 => Ctrl::Release { id: u64_at(0) },
        ctrl::REUSE_MSGBUF_REQ => {
            exact(0)?;
            Ctrl::ReuseMsgBufReq
        }
        ctrl::REUSE_MSGBUF_RSP => Ctrl::ReuseMsgBufRsp,
        ctrl::UNMAP_REQ => {
            exact(8)?;
            Ctrl::UnmapReq { id: u64_at(0) }
        }
        ctrl::UNMAP_RSP => {
            exact(12)?;
            Ctrl::UnmapRsp { result: le32(body, 0) as i32, id: u64_at(4) }
        }
        _ => return Err(bad(ctrl_type, body_len)),
    })
}

/// Writes a control frame (header + control header + body) into `out`; returns its length.
/// `src` is the header's source address (the channel for CONN_REQ/DISC_REQ from the normal
/// world, 53 for the others; spec §6.3 table).
pub fn encode_ctrl(msg: &Ctrl, src: u32, out: &mut [u8]) -> Option<usize> {
    let mut body = [0u8; PORT_NAME_FIELD];
    let (ctrl_type, body_len) = match msg {
        Ctrl::GoOnline => (ctrl::GO_ONLINE, 0),
        Ctrl::GoOffline => (ctrl::GO_OFFLINE, 0),
        Ctrl::ConnReq { name } => {
            let n = name.as_bytes();
            body[..n.len()].copy_from_slice(n);
            (ctrl::CONN_REQ, PORT_NAME_FIELD)
        }
        Ctrl::ConnRsp { target, status, remote, max_msg_size, max_msg_cnt } => {
            for (i, v) in [*target, *status as u32, *remote, *max_msg_size, *max_msg_cnt].iter().enumerate() {
                body[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            (ctrl::CONN_RSP, 20)
        }
        Ctrl::DiscReq { target } => {
            body[..4].copy_from_slice(&target.to_le_bytes());
            (ctrl::DISC_REQ, 4)
        }
        Ctrl::Release { id } => {
            body[..8].copy_from_slice(&id.to_le_bytes());
            (ctrl::RELEASE, 8)
        }
        Ctrl::ReuseMsgBufReq => (ctrl::REUSE_MSGBUF_REQ, 0),
        Ctrl::ReuseMsgBufRsp => (ctrl::REUSE_MSGBUF_RSP, 0),
        Ctrl::UnmapReq { id } => {
            body[..8].copy_from_slice(&id.to_le_bytes());
            (ctrl::UNMAP_REQ, 8)
        }
        Ctrl::UnmapRsp { result, id } => {
            body[..4].copy_from_slice(&result.to_le_bytes());
            body[4..12].copy_from_slice(&id.to_le_bytes());
            (ctrl::UNMAP_RSP, 12)
        }
    };
    let total = HEADER_LEN + CTRL_HEADER_LEN + body_len;
    let out = out.get_mut(..total)?;
    let header = Header { src, dst: CTRL_ADDR, shm_cnt: 0, len: (CTRL_HEADER_LEN + body_len) as u16, flags: 0 };
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&ctrl_type.to_le_bytes());
    out[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[HEADER_LEN + CTRL_HEADER_LEN..total].copy_from_slice(&body[..body_len]);
    Some(total)
}

/// A shared-memory reference carried at the end of a message (spec §6.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmDesc {
    /// The memory's id ([`trusty_platform::mem::MemoryId`]).
    pub obj_id: u64,
    /// Size in bytes.
    pub size: u64,
    /// The sharer's tag (the FF-A tag; 0 otherwise).
    pub tag: u64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default)]
#[repr(C)]
struct RawShm {
    obj_id: U64,
    size: U64,
    tag: U64,
}

impl ShmDesc {
    /// The descriptor's 24 wire bytes (little-endian).
    pub fn encode(&self) -> [u8; SHM_DESC_LEN] {
        let raw = RawShm { obj_id: self.obj_id.into(), size: self.size.into(), tag: self.tag.into() };
        let mut out = [0u8; SHM_DESC_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// Splits a data payload into its data bytes and its shm descriptors (spec §6.5 step 6, with
/// the check Trusty omits: 24·shm_cnt must fit in len).
pub fn split_shm<'a>(header: &Header, payload: &'a [u8]) -> Result<(usize, impl Iterator<Item = ShmDesc> + 'a), FrameError> {
    let shm_bytes = usize::from(header.shm_cnt) * SHM_DESC_LEN;
    let data_len = payload
        .len()
        .checked_sub(shm_bytes)
        .ok_or(FrameError::BadShmCount { shm_cnt: header.shm_cnt, len: header.len })?;
    let descs = payload[data_len..].chunks_exact(SHM_DESC_LEN).filter_map(|c| {
        RawShm::read_from_bytes(c).ok().map(|r| ShmDesc { obj_id: r.obj_id.get(), size: r.size.get(), tag: r.tag.get() })
    });
    Ok((data_len, descs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &Ctrl, src: u32) -> ([u8; 512], u32) {
        let mut buf = [0u8; 512];
        let n = encode_ctrl(msg, src, &mut buf).unwrap();
        (buf, n as u32)
    }

    #[test]
    fn frame_sizes_match_spec() {
        let name = heapless_name::Name::new(b"com.android.ipc-unittest.srv.echo").unwrap();
        assert_eq!(frame(&Ctrl::GoOnline, 53).1, 24);
        assert_eq!(frame(&Ctrl::ConnReq { name }, 1024).1, 280);
        assert_eq!(frame(&Ctrl::ConnRsp { target: 1024, status: 0, remote: 1000, max_msg_size: 4096, max_msg_cnt: 1 }, 53).1, 44);
        assert_eq!(frame(&Ctrl::DiscReq { target: 1000 }, 1024).1, 28);
        assert_eq!(frame(&Ctrl::Release { id: 7 }, 53).1, 32);
    }

    #[test]
    fn control_round_trips() {
        let name = heapless_name::Name::new(b"port").unwrap();
        for msg in [
            Ctrl::GoOnline,
            Ctrl::GoOffline,
            Ctrl::ConnReq { name },
            Ctrl::ConnRsp { target: 1024, status: -41, remote: 0, max_msg_size: 0, max_msg_cnt: 0 },
            Ctrl::DiscReq { target: 1001 },
            Ctrl::Release { id: 0x1234_5678_9abc },
            Ctrl::ReuseMsgBufReq,
            Ctrl::UnmapReq { id: 9 },
            Ctrl::UnmapRsp { result: -2, id: 9 },
        ] {
            let (buf, n) = frame(&msg, 53);
            assert_eq!(parse_frame(&buf, n), Ok(Frame::Control(msg)));
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        let (buf, n) = frame(&Ctrl::DiscReq { target: 1 }, 53);
        assert_eq!(parse_frame(&buf, 15), Err(FrameError::BadLength { used: 15 }));
        assert_eq!(parse_frame(&buf[..20], n), Err(FrameError::BadLength { used: n }));
        assert!(matches!(parse_frame(&buf, n - 1), Err(FrameError::LengthMismatch { .. })));
        assert!(matches!(parse_frame(&buf, u32::MAX), Err(FrameError::BadLength { .. })));
        // body_len disagrees with hdr.len
        let mut bad = buf;
        bad[20] = 5;
        assert!(matches!(parse_frame(&bad, n), Err(FrameError::BadControl { .. })));
        // CONN_RSP with a 16-byte body
        let (mut rsp, _) = frame(&Ctrl::ConnRsp { target: 1, status: 0, remote: 2, max_msg_size: 3, max_msg_cnt: 4 }, 53);
        rsp[12] = 24;
        rsp[20] = 16;
        assert!(matches!(parse_frame(&rsp, 40), Err(FrameError::BadControl { ctrl_type: 4, body_len: 16 })));
        // unknown type
        let (mut unk, n) = frame(&Ctrl::GoOnline, 53);
        unk[16] = 99;
        assert!(matches!(parse_frame(&unk, n), Err(FrameError::BadControl { ctrl_type: 99, .. })));
        // CONN_REQ name with no NUL
        let (mut req, n) = frame(&Ctrl::ConnReq { name: heapless_name::Name::new(b"x").unwrap() }, 1024);
        req[24..280].fill(b'a');
        assert_eq!(parse_frame(&req, n), Err(FrameError::UnterminatedName));
        // shm on a control message, secure-side check
        assert_eq!(parse_ctrl(&buf[16..28], 1, true), Err(FrameError::ControlWithShm));
        // a control payload shorter than its header
        assert!(parse_ctrl(&[1, 0, 0], 0, false).is_err());
    }

    #[test]
    fn go_online_and_offline_bodies_and_long_release_bodies_are_accepted() {
        // Linux _handle_ctrl_msg(): only 8 + body_len == hdr.len is checked for these types.
        for (ctrl_type, want) in [(ctrl::GO_ONLINE, Ctrl::GoOnline), (ctrl::GO_OFFLINE, Ctrl::GoOffline)] {
            let mut payload = [0u8; 8 + 12];
            payload[..4].copy_from_slice(&ctrl_type.to_le_bytes());
            payload[4..8].copy_from_slice(&12u32.to_le_bytes());
            assert_eq!(parse_ctrl(&payload, 0, false), Ok(want));
        }
        let mut release = [0u8; 8 + 300];
        release[..4].copy_from_slice(&ctrl::RELEASE.to_le_bytes());
        release[4..8].copy_from_slice(&300u32.to_le_bytes());
        release[8..16].copy_from_slice(&0xabcd_u64.to_le_bytes());
        assert_eq!(parse_ctrl(&release, 0, false), Ok(Ctrl::Release { id: 0xabcd }));
        // Shorter than the id: refused (Linux: "undersized release control message").
        let mut short = [0u8; 8 + 4];
        short[..4].copy_from_slice(&ctrl::RELEASE.to_le_bytes());
        short[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(parse_ctrl(&short, 0, false).is_err());
    }

    #[test]
    fn shm_split_checks_count() {
        let h = Header { src: 1024, dst: 1000, shm_cnt: 2, len: 40, flags: 0 };
        assert!(split_shm(&h, &[0u8; 40]).is_err());
        let d = ShmDesc { obj_id: 5, size: 4096, tag: 0 };
        let mut payload = [0u8; 3 + 24];
        payload[3..].copy_from_slice(&d.encode());
        let h = Header { src: 1024, dst: 1000, shm_cnt: 1, len: 27, flags: 0 };
        let (n, mut it) = split_shm(&h, &payload).unwrap();
        assert_eq!(n, 3);
        assert_eq!(it.next(), Some(d));
    }

    #[test]
    fn parser_never_panics_on_byte_flips() {
        let (buf, n) = frame(&Ctrl::ConnRsp { target: 1024, status: 0, remote: 1000, max_msg_size: 4096, max_msg_cnt: 1 }, 53);
        for i in 0..n as usize {
            for v in [0u8, 1, 0x35, 0x80, 0xff] {
                let mut b = buf;
                b[i] = v;
                for used in [0, 15, 16, n - 1, n, n + 1, 600, u32::MAX] {
                    let _ = parse_frame(&b, used);
                }
            }
        }
    }
}
