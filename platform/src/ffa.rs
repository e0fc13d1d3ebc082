//! FF-A memory sharing, the API-5 mechanism: memory ids are FF-A handles (spec §3.3).
//!
//! The arm-ffa crate was considered; this module needs only the v1.0 memory-transaction
//! descriptor and five calls, and must run over our own [`Conduit`] (a model on the host, a
//! mediator in a DomU), so the descriptor is encoded here with zerocopy.

use alloc::sync::Arc;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::mem::{Access, DmaRegion, MemoryId, PageAllocator, PhysRange, Sharer, PAGE_SIZE};
use crate::smc::Conduit;
use crate::Error;

/// FF-A function ids (spec §2.2, §11).
pub mod func {
    pub const ERROR: u32 = 0x8400_0060;
    pub const SUCCESS: u32 = 0x8400_0061;
    pub const SUCCESS64: u32 = 0xC400_0061;
    pub const INTERRUPT: u32 = 0x8400_0062;
    pub const VERSION: u32 = 0x8400_0063;
    pub const FEATURES: u32 = 0x8400_0064;
    pub const RX_RELEASE: u32 = 0x8400_0065;
    pub const RXTX_MAP64: u32 = 0xC400_0066;
    pub const RXTX_UNMAP: u32 = 0x8400_0067;
    pub const PARTITION_INFO_GET: u32 = 0x8400_0068;
    pub const ID_GET: u32 = 0x8400_0069;
    pub const MSG_WAIT: u32 = 0x8400_006B;
    pub const RUN: u32 = 0x8400_006D;
    pub const MSG_SEND_DIRECT_REQ: u32 = 0x8400_006F;
    pub const MSG_SEND_DIRECT_RESP: u32 = 0x8400_0070;
    pub const MEM_SHARE: u32 = 0x8400_0073;
    pub const MEM_LEND: u32 = 0x8400_0072;
    pub const MEM_RETRIEVE_REQ: u32 = 0x8400_0074;
    pub const MEM_RECLAIM: u32 = 0x8400_0077;
    pub const MEM_FRAG_RX: u32 = 0x8400_007A;
    pub const MEM_FRAG_TX: u32 = 0x8400_007B;
}

/// FF-A error codes carried in w2 of FFA_ERROR.
pub mod err {
    pub const NOT_SUPPORTED: i32 = -1;
    pub const INVALID_PARAMETERS: i32 = -2;
    pub const NO_MEMORY: i32 = -3;
    pub const BUSY: i32 = -4;
    pub const INTERRUPTED: i32 = -5;
    pub const DENIED: i32 = -6;
    pub const RETRY: i32 = -7;
    pub const ABORTED: i32 = -8;
}

/// FF-A version 1.0, the one Trusty speaks (major must be 1).
pub const VERSION_1_0: u32 = 0x1_0000;
/// Trusty's FF-A endpoint id when it is not discovered (spec §3.3).
pub const TRUSTY_ENDPOINT_ID: u16 = 0x8000;
/// Memory attributes: normal memory, write-back, inner shareable (spec §3.3).
pub const ATTR_NORMAL_WB_INNER_SHAREABLE: u8 = 0x2F;
/// Access permission byte of an endpoint memory-access descriptor.
pub const PERM_RO: u8 = 1;
pub const PERM_RW: u8 = 2;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct MemRegionHeader {
    sender: U16,
    attributes: u8,
    reserved0: u8,
    flags: U32,
    handle: U64,
    tag: U64,
    reserved1: U32,
    endpoint_count: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct EndpointAccess {
    endpoint: U16,
    permissions: u8,
    flags: u8,
    composite_offset: U32,
    reserved: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct Composite {
    total_pages: U32,
    range_count: U32,
    reserved: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct AddressRange {
    address: U64,
    pages: U32,
    reserved: U32,
}

const HEADER_LEN: usize = core::mem::size_of::<MemRegionHeader>();
const EMAD_LEN: usize = core::mem::size_of::<EndpointAccess>();
const COMPOSITE_OFFSET: usize = HEADER_LEN + EMAD_LEN;
const RANGES_OFFSET: usize = COMPOSITE_OFFSET + core::mem::size_of::<Composite>();
const RANGE_LEN: usize = core::mem::size_of::<AddressRange>();

/// A memory-transaction descriptor (FF-A v1.0, one receiver), as the sender describes a share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemTransaction<R> {
    pub sender: u16,
    pub receiver: u16,
    pub attributes: u8,
    pub permissions: u8,
    pub tag: u64,
    pub ranges: R,
}

/// Bytes needed to describe `ranges` ranges.
pub const fn descriptor_len(ranges: usize) -> usize {
    RANGES_OFFSET + RANGE_LEN * ranges
}

/// Writes the descriptor for `tx` into `out`; returns its length.
pub fn encode_descriptor(tx: &MemTransaction<&[PhysRange]>, out: &mut [u8]) -> Result<usize, Error> {
    let len = descriptor_len(tx.ranges.len());
    if len > out.len() {
        return Err(Error::InvalidArgument("FF-A descriptor does not fit the TX buffer"));
    }
    let total_pages = tx.ranges.iter().try_fold(0u32, |acc, r| acc.checked_add(r.pages));
    let total_pages = total_pages.ok_or(Error::InvalidArgument("too many pages"))?;
    let header = MemRegionHeader {
        sender: tx.sender.into(),
        attributes: tx.attributes,
        tag: tx.tag.into(),
        endpoint_count: 1.into(),
        ..Default::default()
    };
    let emad = EndpointAccess {
        endpoint: tx.receiver.into(),
        permissions: tx.permissions,
        composite_offset: (COMPOSITE_OFFSET as u32).into(),
        ..Default::default()
    };
    let composite = Composite {
        total_pages: total_pages.into(),
        range_count: (tx.ranges.len() as u32).into(),
        reserved: 0.into(),
    };
    out[..HEADER_LEN].copy_from_slice(header.as_bytes());
    out[HEADER_LEN..COMPOSITE_OFFSET].copy_from_slice(emad.as_bytes());
    out[COMPOSITE_OFFSET..RANGES_OFFSET].copy_from_slice(composite.as_bytes());
    for (i, r) in tx.ranges.iter().enumerate() {
        let range = AddressRange { address: r.addr.into(), pages: r.pages.into(), reserved: 0.into() };
        let at = RANGES_OFFSET + i * RANGE_LEN;
        out[at..at + RANGE_LEN].copy_from_slice(range.as_bytes());
    }
    Ok(len)
}

/// Why a descriptor was refused by [`decode_descriptor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    TooShort,
    EndpointCount(u32),
    CompositeOffset(u32),
    RangeCount(u32),
    PageCountMismatch,
}

/// Parses a descriptor that a sender wrote (the receiving side: an SPMC or the model). Every
/// count and offset is checked against `bytes`; at most `max_ranges` ranges are accepted.
pub fn decode_descriptor(
    bytes: &[u8],
    max_ranges: usize,
) -> Result<MemTransaction<alloc::vec::Vec<PhysRange>>, DescriptorError> {
    let (header, _) = MemRegionHeader::read_from_prefix(bytes).map_err(|_| DescriptorError::TooShort)?;
    if header.endpoint_count.get() != 1 {
        return Err(DescriptorError::EndpointCount(header.endpoint_count.get()));
    }
    let emad_bytes = bytes.get(HEADER_LEN..).ok_or(DescriptorError::TooShort)?;
    let (emad, _) = EndpointAccess::read_from_prefix(emad_bytes).map_err(|_| DescriptorError::TooShort)?;
    let comp_off = emad.composite_offset.get();
    let comp_bytes = bytes.get(comp_off as usize..).ok_or(DescriptorError::CompositeOffset(comp_off))?;
    let (composite, rest) =
        Composite::read_from_prefix(comp_bytes).map_err(|_| DescriptorError::CompositeOffset(comp_off))?;
    let count = composite.range_count.get();
    if count == 0 || count as usize > max_ranges || rest.len() < count as usize * RANGE_LEN {
        return Err(DescriptorError::RangeCount(count));
    }
    let mut ranges = alloc::vec::Vec::with_capacity(count as usize);
    let mut pages = 0u64;
    for chunk in rest.chunks_exact(RANGE_LEN).take(count as usize) {
        let (r, _) = AddressRange::read_from_prefix(chunk).map_err(|_| DescriptorError::TooShort)?;
        pages += u64::from(r.pages.get());
        ranges.push(PhysRange { addr: r.address.get(), pages: r.pages.get() });
    }
    if pages != u64::from(composite.total_pages.get()) {
        return Err(DescriptorError::PageCountMismatch);
    }
    Ok(MemTransaction {
        sender: header.sender.get(),
        receiver: emad.endpoint.get(),
        attributes: header.attributes,
        permissions: emad.permissions,
        tag: header.tag.get(),
        ranges,
    })
}

fn ffa_call(conduit: &dyn Conduit, regs: [u64; 8], name: &'static str) -> Result<[u64; 8], Error> {
    let out = conduit.call(regs);
    match out[0] as u32 {
        func::SUCCESS | func::SUCCESS64 => Ok(out),
        func::ERROR => Err(Error::Ffa { call: name, code: out[2] as u32 as i32 }),
        other => {
            log::warn!("FF-A {name}: unexpected answer {other:#x}");
            Err(Error::Ffa { call: name, code: err::NOT_SUPPORTED })
        }
    }
}

/// Shares memory with Trusty through FFA_MEM_SHARE and takes it back with FFA_MEM_RECLAIM.
/// Message tx buffers are shared read-only, everything else read-write (spec §3.3).
pub struct FfaSharer {
    conduit: Arc<dyn Conduit>,
    own_id: u16,
    receiver: u16,
    tx: DmaRegion,
    // Kept mapped with the TX buffer for the lifetime of the sharer (FFA_RXTX_MAP takes both).
    _rx: DmaRegion,
    live: usize,
    budget: Option<usize>,
}

impl FfaSharer {
    /// FF-A set-up (spec §3.3): version 1.x, MEM_SHARE supported, own id, RX/TX buffers mapped.
    /// The two buffer pages come from `allocator` and stay mapped for the sharer's lifetime.
    pub fn new(
        conduit: Arc<dyn Conduit>,
        allocator: &mut dyn PageAllocator,
        budget: Option<usize>,
    ) -> Result<Self, Error> {
        let v = conduit.call([u64::from(func::VERSION), u64::from(VERSION_1_0), 0, 0, 0, 0, 0, 0]);
        let version = v[0] as u32;
        if version as i32 == err::NOT_SUPPORTED || version >> 16 != 1 {
            return Err(Error::Ffa { call: "FFA_VERSION", code: version as i32 });
        }
        ffa_call(&*conduit, [u64::from(func::FEATURES), u64::from(func::MEM_SHARE), 0, 0, 0, 0, 0, 0], "FFA_FEATURES")?;
        let id = ffa_call(&*conduit, [u64::from(func::ID_GET), 0, 0, 0, 0, 0, 0, 0], "FFA_ID_GET")?;
        let own_id = id[2] as u16;
        let tx = allocator.alloc_zeroed(1).ok_or(Error::OutOfMemory)?;
        let rx = allocator.alloc_zeroed(1).ok_or(Error::OutOfMemory)?;
        let map = [u64::from(func::RXTX_MAP64), tx.paddr(), rx.paddr(), 1, 0, 0, 0, 0];
        ffa_call(&*conduit, map, "FFA_RXTX_MAP")?;
        Ok(FfaSharer { conduit, own_id, receiver: TRUSTY_ENDPOINT_ID, tx, _rx: rx, live: 0, budget })
    }

    /// Our FF-A endpoint id.
    pub fn own_id(&self) -> u16 {
        self.own_id
    }
}

impl Sharer for FfaSharer {
    fn mechanism(&self) -> &'static str {
        "ffa-handle"
    }

    fn share(&mut self, ranges: &[PhysRange], access: Access) -> Result<MemoryId, Error> {
        if let Some(budget) = self.budget {
            if self.live >= budget {
                return Err(Error::ShareBudgetExhausted { budget });
            }
        }
        let tx = MemTransaction {
            sender: self.own_id,
            receiver: self.receiver,
            attributes: ATTR_NORMAL_WB_INNER_SHAREABLE,
            permissions: match access {
                Access::ReadOnly => PERM_RO,
                Access::ReadWrite => PERM_RW,
            },
            tag: 0,
            ranges,
        };
        let mut desc = [0u8; PAGE_SIZE];
        let len = encode_descriptor(&tx, &mut desc)?;
        // SAFETY: the TX page is owned by this sharer and PAGE_SIZE long; `len` <= PAGE_SIZE.
        unsafe { core::ptr::copy_nonoverlapping(desc.as_ptr(), self.tx.vaddr().as_ptr(), len) };
        let regs = [u64::from(func::MEM_SHARE), len as u64, len as u64, 0, 0, 0, 0, 0];
        let out = ffa_call(&*self.conduit, regs, "FFA_MEM_SHARE")?;
        self.live += 1;
        Ok(MemoryId::from_parts(out[2] as u32, out[3] as u32))
    }

    fn reclaim(&mut self, id: MemoryId) -> Result<(), Error> {
        let regs = [u64::from(func::MEM_RECLAIM), u64::from(id.lo()), u64::from(id.hi()), 0, 0, 0, 0, 0];
        match ffa_call(&*self.conduit, regs, "FFA_MEM_RECLAIM") {
            Ok(_) => {
                self.live = self.live.saturating_sub(1);
                Ok(())
            }
            Err(Error::Ffa { code: err::DENIED, .. }) => Err(Error::ReclaimDenied(id)),
            Err(e) => Err(e),
        }
    }

    fn live_shares(&self) -> usize {
        self.live
    }

    fn budget(&self) -> Option<usize> {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_layout_matches_spec() {
        let ranges = [PhysRange { addr: 0x4000_1000, pages: 2 }];
        let tx = MemTransaction { sender: 1, receiver: 0x8000, attributes: 0x2F, permissions: PERM_RW, tag: 0, ranges: &ranges[..] };
        let mut buf = [0u8; 128];
        let len = encode_descriptor(&tx, &mut buf).unwrap();
        assert_eq!(len, 80);
        assert_eq!(&buf[0..2], &[1, 0]);
        assert_eq!(buf[2], 0x2F);
        assert_eq!(&buf[28..32], &[1, 0, 0, 0]); // one endpoint
        assert_eq!(&buf[32..34], &[0, 0x80]); // receiver 0x8000
        assert_eq!(buf[34], PERM_RW);
        assert_eq!(&buf[36..40], &[48, 0, 0, 0]); // composite offset
        assert_eq!(&buf[48..52], &[2, 0, 0, 0]); // total pages
        assert_eq!(&buf[52..56], &[1, 0, 0, 0]); // range count
        assert_eq!(&buf[64..72], &0x4000_1000u64.to_le_bytes());
        let back = decode_descriptor(&buf[..len], 4).unwrap();
        assert_eq!(back.ranges, alloc::vec![ranges[0]]);
        assert_eq!(back.receiver, 0x8000);
    }

    #[test]
    fn malformed_descriptors_are_refused() {
        let ranges = [PhysRange { addr: 0x1000, pages: 1 }];
        let tx = MemTransaction { sender: 1, receiver: 0x8000, attributes: 0x2F, permissions: PERM_RO, tag: 0, ranges: &ranges[..] };
        let mut buf = [0u8; 80];
        encode_descriptor(&tx, &mut buf).unwrap();
        assert_eq!(decode_descriptor(&buf[..40], 4).unwrap_err(), DescriptorError::TooShort);
        let mut bad = buf;
        bad[36] = 0xF0; // composite offset beyond the end
        assert!(matches!(decode_descriptor(&bad, 4), Err(DescriptorError::CompositeOffset(_))));
        let mut bad = buf;
        bad[52] = 9; // more ranges than bytes
        assert_eq!(decode_descriptor(&bad, 16).unwrap_err(), DescriptorError::RangeCount(9));
        let mut bad = buf;
        bad[48] = 7; // total pages disagree
        assert_eq!(decode_descriptor(&bad, 4).unwrap_err(), DescriptorError::PageCountMismatch);
        let mut bad = buf;
        bad[28] = 2;
        assert_eq!(decode_descriptor(&bad, 4).unwrap_err(), DescriptorError::EndpointCount(2));
        assert!(encode_descriptor(&tx, &mut [0u8; 40]).is_err());
    }
}
