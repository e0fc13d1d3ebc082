//! Address-based memory ids (spec trusty-protocol §3.1, §3.2): the id Trusty is given is the
//! buffer's own address, bare (API < 4) or with attributes (API 4, the "compat" encoding).
//!
//! Nothing is handed over at share time and nothing can be revoked at reclaim time: an address
//! id is only safe where the peer sees the same addresses as the normal world (no hypervisor, a
//! direct-mapped domain) or where a mediator in the hypervisor rewrites the addresses
//! ("mediated-ipa", spec dma-decisions §4.4). [`AddressSharer`] still tracks live shares so that
//! budgets, per-buffer limits and the reclaim discipline work exactly as for the other sharers.

use alloc::collections::btree_map::Entry;
use alloc::collections::BTreeMap;
use core::fmt;

use crate::mem::{Access, MemoryId, PhysRange, Sharer, PAGE_SIZE};
use crate::Error;

/// Bits 47..12 of an id: the physical address (Trusty's `NS_PTE_PHYSADDR_MASK`, lib/sm/ns_mem.c).
pub const PA_MASK: u64 = 0x0000_FFFF_FFFF_F000;
/// MAIR byte of normal memory, inner and outer write-back, read/write-allocate.
pub const MAIR_NORMAL_WB_RWA: u8 = 0xFF;
/// MAIR byte of normal non-cacheable memory.
pub const MAIR_NORMAL_UNCACHED: u8 = 0x44;
/// Shareability field (bits 9..8) value for inner shareable.
pub const SH_INNER: u64 = 3;
/// Bit 7 (`AP[2]`): read-only.
pub const AP_RO: u64 = 1 << 7;
/// Bit 6 (`AP[1]`): EL0 access. Never set by this stack.
pub const AP_EL0: u64 = 1 << 6;

const MAIR_SHIFT: u32 = 48;
const SH_SHIFT: u32 = 8;
/// Bits 63..56, which the §3.2 encoding leaves zero.
const HIGH_MASK: u64 = 0xFF00_0000_0000_0000;

/// The §3.2 "compat" id of `pa` for normal write-back cacheable, inner-shareable memory: MAIR
/// 0xFF in bits 55..48, the address in bits 47..12, shareability 3 in bits 9..8, AP bit 7 set
/// for read-only, EL0 bit 6 clear. Address bits outside 47..12 are dropped (callers check
/// alignment and range first, as [`AddressSharer`] does).
pub const fn encode_compat(pa: u64, access: Access) -> u64 {
    let ro = match access {
        Access::ReadOnly => AP_RO,
        Access::ReadWrite => 0,
    };
    ((MAIR_NORMAL_WB_RWA as u64) << MAIR_SHIFT) | (pa & PA_MASK) | (SH_INNER << SH_SHIFT) | ro
}

/// Why [`decode_compat`] refused an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompatError {
    /// No attribute bits at all: a bare address, which Trusty refuses from API 4 on.
    ZeroAttributes,
    /// Bits 63..56 are not zero (the value of those bits is carried).
    HighBits(u8),
    /// A MAIR byte other than 0xFF (cached) or 0x44 (uncached).
    UnsupportedMair(u8),
    /// Cached memory that is not inner shareable (the shareability field is carried).
    NotInnerShareable(u8),
}

impl fmt::Display for CompatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompatError::ZeroAttributes => f.write_str("memory id has no attributes (bare address at API >= 4)"),
            CompatError::HighBits(b) => write!(f, "memory id bits 63..56 are {b:#x}, not 0"),
            CompatError::UnsupportedMair(m) => write!(f, "memory id MAIR byte {m:#x} is neither 0xff nor 0x44"),
            CompatError::NotInnerShareable(s) => write!(f, "cached memory id with shareability {s}, not inner (3)"),
        }
    }
}

/// Decodes a §3.2 id the way Trusty's `sm_decode_ns_memory_attr` (lib/sm/ns_mem.c) does at
/// API >= 4: attribute part non-zero, MAIR 0xFF (cached) or 0x44 (uncached) only, cached memory
/// inner shareable (Trusty's SMP builds). Bits 63..56 must be zero as §3.2 specifies (Trusty
/// itself does not look at them; this decoder is stricter). Returns the physical address and
/// whether the mapping is read-only.
pub const fn decode_compat(id: u64) -> Result<(u64, bool), CompatError> {
    let attr = id & !PA_MASK;
    if attr == 0 {
        return Err(CompatError::ZeroAttributes);
    }
    if id & HIGH_MASK != 0 {
        return Err(CompatError::HighBits((id >> 56) as u8));
    }
    let mair = (id >> MAIR_SHIFT) as u8;
    let shareability = ((id >> SH_SHIFT) & 3) as u8;
    match mair {
        MAIR_NORMAL_WB_RWA => {
            if shareability as u64 != SH_INNER {
                return Err(CompatError::NotInnerShareable(shareability));
            }
        }
        MAIR_NORMAL_UNCACHED => {}
        other => return Err(CompatError::UnsupportedMair(other)),
    }
    Ok((id & PA_MASK, id & AP_RO != 0))
}

/// The two address encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressKind {
    /// The bare address, masked to bits 47..12 as Linux's `trusty_share_memory_compat` does for
    /// API < 4.
    Bare,
    /// The §3.2 encoding with attributes ([`encode_compat`]), API 4.
    Compat,
}

impl AddressKind {
    /// The encoding Trusty expects at `api_version` (spec §3.1): bare below 4, compat from 4.
    /// (From 5 on, ids are FF-A handles; the compat encoding is what API-4 code paths accept.)
    pub const fn for_api(api_version: u32) -> Self {
        if api_version < crate::smc::api::PHYS_MEM_OBJ {
            AddressKind::Bare
        } else {
            AddressKind::Compat
        }
    }
}

/// Largest address (exclusive) an address id can carry: 48 bits.
const ADDR_LIMIT: u64 = 1 << 48;

/// The address mechanisms: "phys" (bare, API < 4), "phys-attr" (compat, API 4) and
/// "mediated-ipa" (the guest's IPA in either encoding, rewritten by a hypervisor mediator).
///
/// Each share is one contiguous range (an address id covers exactly one range, §3.2). Optional
/// limits: `max_pages` per share (a mediator that translates only the first page of a buffer
/// is `Some(1)`), and a budget of live shares.
#[derive(Debug)]
pub struct AddressSharer {
    kind: AddressKind,
    mechanism: &'static str,
    max_pages: Option<usize>,
    budget: Option<usize>,
    /// Live shares by id, with a count (the same range shared twice gives the same id).
    live: BTreeMap<u64, usize>,
    live_total: usize,
}

impl AddressSharer {
    /// "phys" for [`AddressKind::Bare`], "phys-attr" for [`AddressKind::Compat`]; no limits.
    pub fn new(kind: AddressKind) -> Self {
        let mechanism = match kind {
            AddressKind::Bare => "phys",
            AddressKind::Compat => "phys-attr",
        };
        AddressSharer { kind, mechanism, max_pages: None, budget: None, live: BTreeMap::new(), live_total: 0 }
    }

    /// "mediated-ipa": the guest's own addresses in `kind`'s encoding, for a hypervisor
    /// mediator to rewrite.
    pub fn mediated(kind: AddressKind) -> Self {
        AddressSharer { mechanism: "mediated-ipa", ..Self::new(kind) }
    }

    /// Limits every share to `max_pages` pages (`None`: no limit).
    pub fn with_max_pages(mut self, max_pages: Option<usize>) -> Self {
        self.max_pages = max_pages;
        self
    }

    /// Limits the number of live shares (`None`: no limit).
    pub fn with_budget(mut self, budget: Option<usize>) -> Self {
        self.budget = budget;
        self
    }

    /// How addresses are encoded in ids.
    pub fn kind(&self) -> AddressKind {
        self.kind
    }

    /// Most pages one share may hold (`None`: no limit).
    pub fn max_pages(&self) -> Option<usize> {
        self.max_pages
    }

    /// The id of `range` in this sharer's encoding, after the checks every share makes.
    pub fn id_of(&self, range: &PhysRange, access: Access) -> Result<MemoryId, Error> {
        if range.pages == 0 {
            return Err(Error::InvalidArgument("cannot share an empty range"));
        }
        if range.addr & (PAGE_SIZE as u64 - 1) != 0 {
            return Err(Error::InvalidArgument("an address id needs a page-aligned address"));
        }
        let end = (range.pages as u64).checked_mul(PAGE_SIZE as u64).and_then(|len| range.addr.checked_add(len));
        if end.map_or(true, |end| end > ADDR_LIMIT) {
            return Err(Error::InvalidArgument("an address id carries only 48 address bits; the range lies above"));
        }
        if let Some(max) = self.max_pages {
            if range.pages as usize > max {
                return Err(Error::InvalidArgument(
                    "buffer has more pages than the mediator translates per share (max_pages)",
                ));
            }
        }
        Ok(MemoryId(match self.kind {
            AddressKind::Bare => range.addr & PA_MASK,
            AddressKind::Compat => encode_compat(range.addr, access),
        }))
    }
}

impl Sharer for AddressSharer {
    fn mechanism(&self) -> &'static str {
        self.mechanism
    }

    fn share(&mut self, ranges: &[PhysRange], access: Access) -> Result<MemoryId, Error> {
        let [range] = ranges else {
            return Err(Error::InvalidArgument(
                "an address id covers exactly one contiguous range; share one range per id",
            ));
        };
        let id = self.id_of(range, access)?;
        if let Some(budget) = self.budget {
            if self.live_total >= budget {
                return Err(Error::ShareBudgetExhausted { budget });
            }
        }
        *self.live.entry(id.0).or_insert(0) += 1;
        self.live_total += 1;
        Ok(id)
    }

    fn reclaim(&mut self, id: MemoryId) -> Result<(), Error> {
        // One search: the entry both counts down and, at zero, goes.
        let Entry::Occupied(mut count) = self.live.entry(id.0) else {
            return Err(Error::InvalidArgument("reclaim of an address id that is not live"));
        };
        *count.get_mut() -= 1;
        if *count.get() == 0 {
            count.remove();
        }
        self.live_total -= 1;
        Ok(())
    }

    fn live_shares(&self) -> usize {
        self.live_total
    }

    fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// A bare id (API < 4) becomes the §3.2 encoding with attributes, as Linux's
    /// `trusty_share_memory` returns it before `trusty_share_memory_compat` masks it; compat ids
    /// already carry them.
    fn attributed_id(&self, id: MemoryId, access: Access) -> MemoryId {
        match self.kind {
            AddressKind::Bare => MemoryId(encode_compat(id.0, access)),
            AddressKind::Compat => id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: Access = Access::ReadWrite;
    const RO: Access = Access::ReadOnly;

    #[test]
    fn compat_encoding_matches_spec_3_2() {
        assert_eq!(encode_compat(0x4000_1000, RW), 0x00FF_0000_4000_1300);
        assert_eq!(encode_compat(0x4000_1000, RO), 0x00FF_0000_4000_1380);
        assert_eq!(encode_compat(0xFFFF_FFFF_F000, RW) >> 56, 0);
        // EL0 bit is never set.
        assert_eq!(encode_compat(0x1000, RO) & AP_EL0, 0);
        for (pa, access) in [(0x1000, RW), (0x8_0000_0000, RO), (0xFFFF_FFFF_F000, RW)] {
            assert_eq!(decode_compat(encode_compat(pa, access)), Ok((pa, access == RO)));
        }
    }

    #[test]
    fn compat_decoder_makes_trustys_checks() {
        assert_eq!(decode_compat(0x4000_1000), Err(CompatError::ZeroAttributes));
        assert_eq!(decode_compat(0x01FF_0000_4000_1300), Err(CompatError::HighBits(1)));
        assert_eq!(decode_compat(0x00EE_0000_4000_1300), Err(CompatError::UnsupportedMair(0xEE)));
        assert_eq!(decode_compat(0x0004_0000_4000_1300), Err(CompatError::UnsupportedMair(0x04)));
        assert_eq!(decode_compat(0x00FF_0000_4000_1200), Err(CompatError::NotInnerShareable(2)));
        // Uncached memory need not be inner shareable.
        assert_eq!(decode_compat(0x0044_0000_4000_1080), Ok((0x4000_1000, true)));
    }

    #[test]
    fn bare_and_compat_ids() {
        let r = PhysRange { addr: 0x4000_2000, pages: 3 };
        let mut bare = AddressSharer::new(AddressKind::Bare);
        assert_eq!(bare.mechanism(), "phys");
        assert_eq!(bare.share(&[r], RO).unwrap(), MemoryId(0x4000_2000));
        let mut compat = AddressSharer::new(AddressKind::Compat);
        assert_eq!(compat.mechanism(), "phys-attr");
        assert_eq!(compat.share(&[r], RO).unwrap(), MemoryId(encode_compat(0x4000_2000, RO)));
        assert_eq!(AddressSharer::mediated(AddressKind::Bare).mechanism(), "mediated-ipa");
        assert_eq!(AddressKind::for_api(3), AddressKind::Bare);
        assert_eq!(AddressKind::for_api(4), AddressKind::Compat);
    }

    #[test]
    fn refuses_what_an_address_id_cannot_express() {
        let mut s = AddressSharer::new(AddressKind::Compat);
        let a = PhysRange { addr: 0x1000, pages: 1 };
        let b = PhysRange { addr: 0x3000, pages: 1 };
        assert!(matches!(s.share(&[a, b], RW), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.share(&[], RW), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.share(&[PhysRange { addr: 0x1000, pages: 0 }], RW), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.share(&[PhysRange { addr: 0x1800, pages: 1 }], RW), Err(Error::InvalidArgument(_))));
        let high = PhysRange { addr: (1 << 48) - 0x1000, pages: 2 };
        assert!(matches!(s.share(&[high], RW), Err(Error::InvalidArgument(_))));
        assert!(s.share(&[PhysRange { addr: (1 << 48) - 0x1000, pages: 1 }], RW).is_ok());
        assert_eq!(s.live_shares(), 1);
    }

    #[test]
    fn max_pages_and_budget() {
        let mut s = AddressSharer::mediated(AddressKind::Bare).with_max_pages(Some(1)).with_budget(Some(2));
        assert_eq!(s.budget(), Some(2));
        let one = PhysRange { addr: 0x1000, pages: 1 };
        let two = PhysRange { addr: 0x5000, pages: 2 };
        match s.share(&[two], RW) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("max_pages")),
            other => panic!("{other:?}"),
        }
        let id1 = s.share(&[one], RW).unwrap();
        let id2 = s.share(&[PhysRange { addr: 0x9000, pages: 1 }], RW).unwrap();
        assert_eq!(s.share(&[one], RW), Err(Error::ShareBudgetExhausted { budget: 2 }));
        s.reclaim(id1).unwrap();
        assert_eq!(s.live_shares(), 1);
        s.reclaim(id2).unwrap();
        assert_eq!(s.live_shares(), 0);
    }

    #[test]
    fn descriptor_page_id_carries_attributes_below_api_4() {
        let r = PhysRange { addr: 0x4000_2000, pages: 1 };
        let mut bare = AddressSharer::new(AddressKind::Bare);
        let id = bare.share(&[r], RW).unwrap();
        assert_eq!(id, MemoryId(0x4000_2000));
        let attr = bare.attributed_id(id, RW);
        assert_eq!(attr, MemoryId(encode_compat(0x4000_2000, RW)));
        assert_eq!(decode_compat(attr.0), Ok((0x4000_2000, false)));
        // The bare id stays the one to reclaim.
        bare.reclaim(id).unwrap();
        let mut compat = AddressSharer::new(AddressKind::Compat);
        let id = compat.share(&[r], RW).unwrap();
        assert_eq!(compat.attributed_id(id, RW), id);
    }

    #[test]
    fn reclaim_tracks_live_ids() {
        let mut s = AddressSharer::new(AddressKind::Bare);
        let r = PhysRange { addr: 0x2000, pages: 1 };
        assert!(matches!(s.reclaim(MemoryId(0x2000)), Err(Error::InvalidArgument(_))));
        let a = s.share(&[r], RW).unwrap();
        let b = s.share(&[r], RO).unwrap();
        assert_eq!(a, b); // a bare id carries no access bits
        assert_eq!(s.live_shares(), 2);
        s.reclaim(a).unwrap();
        s.reclaim(b).unwrap();
        assert!(matches!(s.reclaim(a), Err(Error::InvalidArgument(_))));
        assert_eq!(s.live_shares(), 0);
    }
}
