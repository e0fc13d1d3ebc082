//! Grant table v1 and the "xen-grant" sharing mechanism (spec dma-decisions §2.3, §6 row 4).
//!
//! A grant entry tells Xen that domain `domid` may map page `frame` of ours. A share of `n`
//! pages takes `n` **consecutive** references and grants one page each to the backend domain;
//! the id the peer gets is Linux's grant-DMA encoding of the first reference,
//! `1 << 63 | first_ref << 12` (drivers/xen/grant-dma-ops.c `grant_to_dma`, with Xen's 4 KiB
//! page shift). The peer maps the pages with GNTTABOP_map_grant_ref; while it does, Xen keeps
//! `GTF_reading`/`GTF_writing` set in the entry, and the grant cannot be ended: a reclaim then
//! fails with [`Error::ReclaimDenied`] and the pages must be leaked, never freed.
//!
//! Layout and rules are from xen/include/public/grant_table.h: `struct grant_entry_v1`
//! (flags u16, domid u16, frame u32), the `GTF_*` bits, `GNTTAB_NR_RESERVED_ENTRIES` = 8, and
//! the update protocol: write domid and frame, write barrier, then flags; end access with a
//! compare-and-swap of the flags to 0 that first observes neither `GTF_reading` nor
//! `GTF_writing`. Xen on ARM requires the table (like all shared memory) to be mapped Normal
//! Inner-WB Inner-Shareable (arch-arm.h), which is what makes the atomic flag accesses valid.

use alloc::collections::btree_map::Entry;
use alloc::collections::BTreeMap;
use core::mem::align_of;
use core::ptr::{addr_of, addr_of_mut, NonNull};
use core::sync::atomic::{fence, AtomicU16, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::mem::{Access, MemoryId, PhysRange, Sharer, PAGE_SIZE};
use crate::Error;

/// `struct grant_entry_v1` (grant_table.h): 8 bytes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GrantEntryV1 {
    /// `GTF_*`: written by the guest (type, readonly) and by Xen (reading, writing).
    pub flags: u16,
    /// The domain granted access.
    pub domid: u16,
    /// The guest frame number (IPA >> 12) of the granted page.
    pub frame: u32,
}

const _: () = assert!(core::mem::size_of::<GrantEntryV1>() == 8);

/// Allow `domid` to map and access `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// Read-only access only.
pub const GTF_READONLY: u16 = 1 << 2;
/// Set by Xen while the grantee has the page mapped for reading.
pub const GTF_READING: u16 = 1 << 3;
/// Set by Xen while the grantee has the page mapped for writing.
pub const GTF_WRITING: u16 = 1 << 4;
/// References below this are reserved (console, xenstore, toolstack use).
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;
/// Entries in one 4 KiB grant-table frame.
pub const ENTRIES_PER_FRAME: usize = PAGE_SIZE / core::mem::size_of::<GrantEntryV1>();

/// Bit 63 of a grant id: tells grant addresses from ordinary addresses (grant-dma-ops.c).
pub const GRANT_ID_FLAG: u64 = 1 << 63;
const XEN_PAGE_SHIFT: u32 = 12;

/// The id of a share whose first reference is `first_ref`: `1 << 63 | first_ref << 12`.
pub const fn grant_id(first_ref: u32) -> u64 {
    GRANT_ID_FLAG | ((first_ref as u64) << XEN_PAGE_SHIFT)
}

/// The first reference of a grant id, or `None` when `id` is not one: bit 63 clear, non-zero
/// low 12 bits (an in-page offset; a share id has none), or a reference beyond 32 bits.
pub const fn decode_grant_id(id: u64) -> Option<u32> {
    if id & GRANT_ID_FLAG == 0 || id & ((1 << XEN_PAGE_SHIFT) - 1) != 0 {
        return None;
    }
    let r = (id & !GRANT_ID_FLAG) >> XEN_PAGE_SHIFT;
    if r > u32::MAX as u64 {
        None
    } else {
        Some(r as u32)
    }
}

/// Why a grant-table entry operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// No such entry in this table.
    OutOfRange(u32),
    /// One of the first [`GNTTAB_NR_RESERVED_ENTRIES`] references.
    Reserved(u32),
    /// The entry is not free (granting) or still mapped by the grantee (ending).
    InUse {
        /// The reference.
        gref: u32,
        /// The entry's flags as found.
        flags: u16,
    },
}

/// The grant table: entries in memory that Xen reads (on real Xen the grant-table frames mapped
/// with XENMEM_add_to_physmap; on the host plain memory that a simulated Xen reads).
#[derive(Debug)]
pub struct GrantTable {
    base: NonNull<GrantEntryV1>,
    entries: u32,
}

// SAFETY: the table owns its entries for its lifetime (the contract of `new`); the only other
// party is the hypervisor, which is not a thread of this program. Moving the owner is sound.
unsafe impl Send for GrantTable {}

impl GrantTable {
    /// A table over `len` bytes at `base` (`len / 8` entries).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes for the table's lifetime, and
    /// nothing in this program may access them other than through this table. The hypervisor
    /// (or a simulated one) may, as Xen does: it reads entries and changes only the
    /// `GTF_reading`/`GTF_writing` bits of `flags`, atomically.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Result<Self, Error> {
        if base.as_ptr() as usize & (align_of::<GrantEntryV1>() - 1) != 0 {
            return Err(Error::InvalidArgument("grant table memory must be 8-byte aligned"));
        }
        let entries = u32::try_from(len / core::mem::size_of::<GrantEntryV1>()).unwrap_or(u32::MAX);
        if entries <= GNTTAB_NR_RESERVED_ENTRIES {
            return Err(Error::InvalidArgument("grant table has no entries beyond the reserved ones"));
        }
        Ok(GrantTable { base: base.cast(), entries })
    }

    /// Number of entries (reserved ones included).
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn entry_ptr(&self, gref: u32) -> Result<*mut GrantEntryV1, GrantError> {
        if gref >= self.entries {
            return Err(GrantError::OutOfRange(gref));
        }
        // SAFETY: gref < entries, so the offset stays inside the table's memory (`new`).
        Ok(unsafe { self.base.as_ptr().add(gref as usize) })
    }

    fn flags(&self, p: *mut GrantEntryV1) -> &AtomicU16 {
        // SAFETY: `p` is an entry of this table (from `entry_ptr`), valid for the table's
        // lifetime and 2-aligned (entries are 8-aligned); the flags are accessed only atomically
        // here and by Xen.
        unsafe { AtomicU16::from_ptr(addr_of_mut!((*p).flags)) }
    }

    /// The entry `gref` as it is now.
    pub fn entry(&self, gref: u32) -> Option<GrantEntryV1> {
        let p = self.entry_ptr(gref).ok()?;
        let flags = self.flags(p).load(Ordering::Acquire);
        // SAFETY: `p` is a valid entry (see `flags`); volatile because the memory is shared
        // with the hypervisor.
        let (domid, frame) = unsafe { (addr_of!((*p).domid).read_volatile(), addr_of!((*p).frame).read_volatile()) };
        Some(GrantEntryV1 { flags, domid, frame })
    }

    /// Whether the grantee still has `gref` mapped (Xen's `GTF_reading`/`GTF_writing`).
    pub fn in_use_by_peer(&self, gref: u32) -> bool {
        self.entry_ptr(gref).is_ok_and(|p| self.flags(p).load(Ordering::Acquire) & (GTF_READING | GTF_WRITING) != 0)
    }

    /// Whether `gref` grants nothing (flags 0).
    pub fn is_free(&self, gref: u32) -> bool {
        self.entry_ptr(gref).is_ok_and(|p| self.flags(p).load(Ordering::Acquire) == 0)
    }

    /// Grants `domid` access to guest frame `frame` through `gref`: domid and frame first, a
    /// release fence, then the flags (grant_table.h "Introducing a valid entry").
    pub fn grant_access(&mut self, gref: u32, domid: u16, frame: u32, readonly: bool) -> Result<(), GrantError> {
        if gref < GNTTAB_NR_RESERVED_ENTRIES {
            return Err(GrantError::Reserved(gref));
        }
        let p = self.entry_ptr(gref)?;
        let flags = self.flags(p).load(Ordering::Acquire);
        if flags != 0 {
            return Err(GrantError::InUse { gref, flags });
        }
        // SAFETY: `p` is a valid entry that grants nothing (flags 0), so Xen does not use its
        // domid and frame; volatile because the memory is shared with the hypervisor.
        unsafe {
            addr_of_mut!((*p).domid).write_volatile(domid);
            addr_of_mut!((*p).frame).write_volatile(frame);
        }
        fence(Ordering::Release);
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        self.flags(p).store(flags, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the grant `gref` unless the grantee still maps it: observe neither `GTF_reading`
    /// nor `GTF_writing`, then compare-and-swap the flags to 0 (grant_table.h "Invalidating an
    /// unused GTF_permit_access entry"). A free entry stays free.
    pub fn end_access(&mut self, gref: u32) -> Result<(), GrantError> {
        let p = self.entry_ptr(gref)?;
        let flags = self.flags(p);
        let mut current = flags.load(Ordering::Acquire);
        loop {
            if current & (GTF_READING | GTF_WRITING) != 0 {
                return Err(GrantError::InUse { gref, flags: current });
            }
            match flags.compare_exchange(current, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }
}

/// Shares pages with a backend domain through grants ("xen-grant").
///
/// Budget: every usable entry (all but the reserved ones) can hold one page, so at most that
/// many shares can be live. A share that cannot get enough consecutive free references fails
/// without side effects: [`Error::ShareBudgetExhausted`] when too few references are free at
/// all, [`Error::InvalidArgument`] naming fragmentation when enough are free but not in one run.
#[derive(Debug)]
pub struct GrantSharer {
    table: GrantTable,
    backend: u16,
    /// Live shares: first reference -> number of references. Runs never overlap.
    runs: BTreeMap<u32, u32>,
    used: u32,
}

impl GrantSharer {
    /// Grants go to `backend_domid` (the `xen,grant-dma` cell, or the Trusty VM's domain).
    pub fn new(table: GrantTable, backend_domid: u16) -> Self {
        GrantSharer { table, backend: backend_domid, runs: BTreeMap::new(), used: 0 }
    }

    /// The domain the references are granted to.
    pub fn backend_domid(&self) -> u16 {
        self.backend
    }

    /// The grant table.
    pub fn table(&self) -> &GrantTable {
        &self.table
    }

    /// References not reserved and not held by a live share.
    pub fn free_entries(&self) -> u32 {
        self.usable() - self.used
    }

    fn usable(&self) -> u32 {
        self.table.entries() - GNTTAB_NR_RESERVED_ENTRIES
    }

    /// First fit: the lowest run of `n` consecutive references outside every live share whose
    /// entries are all free in the table.
    fn find_run(&self, n: u32) -> Option<u32> {
        let end = self.table.entries();
        let mut cursor = GNTTAB_NR_RESERVED_ENTRIES;
        loop {
            let next = self.runs.range(cursor..).next();
            let limit = next.map_or(end, |(&start, _)| start);
            if limit - cursor >= n {
                match (cursor..cursor + n).find(|&r| !self.table.is_free(r)) {
                    None => return Some(cursor),
                    // An entry someone else uses: look on after it (it lies inside this gap).
                    Some(busy) => {
                        cursor = busy + 1;
                        continue;
                    }
                }
            }
            let (&start, &len) = next?;
            cursor = start + len;
        }
    }
}

impl Sharer for GrantSharer {
    fn mechanism(&self) -> &'static str {
        "xen-grant"
    }

    fn share(&mut self, ranges: &[PhysRange], access: Access) -> Result<MemoryId, Error> {
        let mut pages = 0u64;
        for r in ranges {
            if r.addr & (PAGE_SIZE as u64 - 1) != 0 {
                return Err(Error::InvalidArgument("grants cover whole pages: address not page-aligned"));
            }
            let last_frame = (r.addr >> XEN_PAGE_SHIFT) + u64::from(r.pages);
            if last_frame > u64::from(u32::MAX) + 1 {
                return Err(Error::InvalidArgument("frame number beyond 32 bits does not fit a v1 grant entry"));
            }
            pages += u64::from(r.pages);
        }
        if pages == 0 {
            return Err(Error::InvalidArgument("cannot share an empty range"));
        }
        let usable = self.usable();
        let n = match u32::try_from(pages) {
            Ok(n) if n <= usable => n,
            _ => return Err(Error::InvalidArgument("share needs more grant references than the grant table has")),
        };
        if n > self.free_entries() {
            return Err(Error::ShareBudgetExhausted { budget: usable as usize });
        }
        let Some(first) = self.find_run(n) else {
            log::warn!("grant table fragmented: {} free references, no run of {n}", self.free_entries());
            return Err(Error::InvalidArgument(
                "grant table fragmented: no run of consecutive free references is long enough",
            ));
        };
        let readonly = access == Access::ReadOnly;
        let mut gref = first;
        for r in ranges {
            let base = (r.addr >> XEN_PAGE_SHIFT) as u32;
            for i in 0..r.pages {
                // find_run checked that every entry of the run is free and not reserved.
                if let Err(e) = self.table.grant_access(gref, self.backend, base + i, readonly) {
                    log::error!("grant {gref} refused ({e:?}) after the run was found free");
                    for done in first..gref {
                        let _ = self.table.end_access(done);
                    }
                    return Err(Error::InvalidArgument("grant table entry changed under the sharer"));
                }
                gref += 1;
            }
        }
        self.runs.insert(first, n);
        self.used += n;
        Ok(MemoryId(grant_id(first)))
    }

    fn reclaim(&mut self, id: MemoryId) -> Result<(), Error> {
        let first = decode_grant_id(id.0).ok_or(Error::InvalidArgument("not a xen-grant memory id"))?;
        // One search: the run's entry is looked up once and removed through it at the end.
        let Entry::Occupied(run) = self.runs.entry(first) else {
            return Err(Error::InvalidArgument("reclaim of a grant id that is not live"));
        };
        let n = *run.get();
        if (first..first + n).any(|r| self.table.in_use_by_peer(r)) {
            return Err(Error::ReclaimDenied(id));
        }
        for r in first..first + n {
            if let Err(e) = self.table.end_access(r) {
                // The peer mapped it between the check and the swap. The references before `r`
                // are ended, the rest still granted; the share stays live (a later reclaim may
                // finish it) and its pages must be leaked.
                log::warn!("grant {r} of {id} mapped by the peer during reclaim: {e:?}");
                return Err(Error::ReclaimDenied(id));
            }
        }
        run.remove();
        self.used -= n;
        Ok(())
    }

    fn live_shares(&self) -> usize {
        self.runs.len()
    }

    fn budget(&self) -> Option<usize> {
        Some(self.usable() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const RW: Access = Access::ReadWrite;
    const RO: Access = Access::ReadOnly;

    /// Guest memory holding the table, and the hypervisor's view of it.
    struct Backing {
        mem: Vec<u64>,
    }

    impl Backing {
        fn new(entries: usize) -> Self {
            Backing { mem: vec![0u64; entries] }
        }
        fn base(&mut self) -> NonNull<u8> {
            NonNull::new(self.mem.as_mut_ptr().cast()).unwrap()
        }
        fn table(&mut self) -> GrantTable {
            let len = self.mem.len() * 8;
            // SAFETY: `mem` outlives the table in every test (declared first, dropped last) and
            // is touched otherwise only through `peer_flags`, atomically, as Xen would.
            unsafe { GrantTable::new(self.base(), len) }.unwrap()
        }
        /// What Xen does when the grantee maps or unmaps an entry.
        fn peer_flags(&mut self, gref: u32) -> &AtomicU16 {
            let p = self.mem.as_mut_ptr().cast::<u8>();
            // SAFETY: in bounds (tests use valid refs), 2-aligned; accessed atomically on both sides.
            unsafe { AtomicU16::from_ptr(p.add(gref as usize * 8).cast()) }
        }
    }

    fn range(addr: u64, pages: u32) -> PhysRange {
        PhysRange { addr, pages }
    }

    #[test]
    fn ids_encode_like_linux_grant_dma() {
        assert_eq!(grant_id(8), 0x8000_0000_0000_8000);
        assert_eq!(decode_grant_id(grant_id(8)), Some(8));
        assert_eq!(decode_grant_id(grant_id(u32::MAX)), Some(u32::MAX));
        assert_eq!(decode_grant_id(0x8000), None); // bit 63 clear
        assert_eq!(decode_grant_id(grant_id(9) | 0x10), None); // in-page offset
        assert_eq!(decode_grant_id(GRANT_ID_FLAG | (1 << 44)), None); // ref beyond 32 bits
    }

    #[test]
    fn share_grants_consecutive_references() {
        let mut b = Backing::new(ENTRIES_PER_FRAME);
        let mut s = GrantSharer::new(b.table(), 2);
        assert_eq!(s.mechanism(), "xen-grant");
        assert_eq!(s.budget(), Some(ENTRIES_PER_FRAME - 8));
        let id = s.share(&[range(0x4000_0000, 2), range(0x4010_0000, 1)], RW).unwrap();
        assert_eq!(decode_grant_id(id.0), Some(8));
        let t = s.table();
        assert_eq!(t.entry(8), Some(GrantEntryV1 { flags: GTF_PERMIT_ACCESS, domid: 2, frame: 0x40000 }));
        assert_eq!(t.entry(9).unwrap().frame, 0x40001);
        assert_eq!(t.entry(10).unwrap().frame, 0x40100);
        assert!(t.is_free(11));
        let ro = s.share(&[range(0x5000_0000, 1)], RO).unwrap();
        assert_eq!(decode_grant_id(ro.0), Some(11));
        assert_eq!(s.table().entry(11).unwrap().flags, GTF_PERMIT_ACCESS | GTF_READONLY);
        assert_eq!(s.live_shares(), 2);
        // Raw bytes as Xen reads them: flags, domid, frame, little-endian.
        assert_eq!(b.mem[11].to_le_bytes(), [5, 0, 2, 0, 0, 0, 5, 0]);
        s.reclaim(id).unwrap();
        s.reclaim(ro).unwrap();
        assert!((8..12).all(|r| s.table().is_free(r)));
        assert_eq!(s.live_shares(), 0);
        assert_eq!(s.free_entries(), ENTRIES_PER_FRAME as u32 - 8);
    }

    #[test]
    fn reclaim_is_denied_while_the_peer_maps() {
        let mut b = Backing::new(64);
        let mut s = GrantSharer::new(b.table(), 1);
        let id = s.share(&[range(0x4000_0000, 3)], RW).unwrap();
        b.peer_flags(10).fetch_or(GTF_WRITING, Ordering::AcqRel);
        assert_eq!(s.reclaim(id), Err(Error::ReclaimDenied(id)));
        // Entries untouched: all three still granted.
        assert!((8..11).all(|r| s.table().entry(r).unwrap().flags & GTF_PERMIT_ACCESS != 0));
        assert_eq!(s.live_shares(), 1);
        // The references stay taken: the next share goes after them.
        let other = s.share(&[range(0x4100_0000, 1)], RW).unwrap();
        assert_eq!(decode_grant_id(other.0), Some(11));
        b.peer_flags(10).fetch_and(!GTF_WRITING, Ordering::AcqRel);
        s.reclaim(id).unwrap();
        assert!((8..11).all(|r| s.table().is_free(r)));
    }

    #[test]
    fn reclaim_of_unknown_ids() {
        let mut b = Backing::new(64);
        let mut s = GrantSharer::new(b.table(), 1);
        assert!(matches!(s.reclaim(MemoryId(0x4000_0000)), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.reclaim(MemoryId(grant_id(8))), Err(Error::InvalidArgument(_))));
        let id = s.share(&[range(0x4000_0000, 2)], RW).unwrap();
        // The second reference of a share is not a share of its own.
        assert!(matches!(s.reclaim(MemoryId(grant_id(9))), Err(Error::InvalidArgument(_))));
        s.reclaim(id).unwrap();
        assert!(matches!(s.reclaim(id), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn full_and_fragmented_tables_fail_cleanly() {
        let mut b = Backing::new(16); // 8 usable references
        let mut s = GrantSharer::new(b.table(), 1);
        assert!(matches!(s.share(&[range(0x4000_0000, 9)], RW), Err(Error::InvalidArgument(_))));
        let ids: Vec<_> = (0..4).map(|i| s.share(&[range(0x4000_0000 + i * 0x2000, 2)], RW).unwrap()).collect();
        assert_eq!(s.free_entries(), 0);
        assert_eq!(s.share(&[range(0x5000_0000, 1)], RW), Err(Error::ShareBudgetExhausted { budget: 8 }));
        // Free refs 8-9 and 12-13: four free, but no run of three.
        s.reclaim(ids[0]).unwrap();
        s.reclaim(ids[2]).unwrap();
        match s.share(&[range(0x5000_0000, 3)], RW) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("fragmented")),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.live_shares(), 2);
        // Two fit, first fit.
        let id = s.share(&[range(0x5000_0000, 2)], RW).unwrap();
        assert_eq!(decode_grant_id(id.0), Some(8));
        s.reclaim(ids[1]).unwrap();
        let id = s.share(&[range(0x6000_0000, 4)], RW).unwrap();
        assert_eq!(decode_grant_id(id.0), Some(10));
    }

    #[test]
    fn entries_used_by_someone_else_are_skipped() {
        let mut b = Backing::new(32);
        b.peer_flags(9).store(GTF_PERMIT_ACCESS, Ordering::Release);
        let mut s = GrantSharer::new(b.table(), 1);
        let id = s.share(&[range(0x4000_0000, 2)], RW).unwrap();
        assert_eq!(decode_grant_id(id.0), Some(10));
    }

    #[test]
    fn refuses_what_a_grant_cannot_express() {
        let mut b = Backing::new(32);
        let mut s = GrantSharer::new(b.table(), 1);
        assert!(matches!(s.share(&[], RW), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.share(&[range(0x4000_0800, 1)], RW), Err(Error::InvalidArgument(_))));
        assert!(matches!(s.share(&[range(1 << 45, 1)], RW), Err(Error::InvalidArgument(_))));
        assert_eq!(s.live_shares(), 0);
        assert_eq!(s.free_entries(), 24);
    }

    #[test]
    fn table_entry_rules() {
        let mut b = Backing::new(16);
        let mut t = b.table();
        assert_eq!(t.grant_access(3, 1, 0x40000, false), Err(GrantError::Reserved(3)));
        assert_eq!(t.grant_access(16, 1, 0x40000, false), Err(GrantError::OutOfRange(16)));
        t.grant_access(8, 1, 0x40000, false).unwrap();
        assert_eq!(t.grant_access(8, 1, 0x40001, false), Err(GrantError::InUse { gref: 8, flags: 1 }));
        b.peer_flags(8).fetch_or(GTF_READING, Ordering::AcqRel);
        assert!(t.in_use_by_peer(8));
        assert_eq!(t.end_access(8), Err(GrantError::InUse { gref: 8, flags: GTF_PERMIT_ACCESS | GTF_READING }));
        b.peer_flags(8).fetch_and(!GTF_READING, Ordering::AcqRel);
        t.end_access(8).unwrap();
        t.end_access(8).unwrap(); // a free entry stays free
        assert!(t.is_free(8));
        let mut small = Backing::new(8);
        // SAFETY: `small.mem` outlives the (failed) construction.
        assert!(unsafe { GrantTable::new(small.base(), 64) }.is_err());
        let mut odd = Backing::new(4);
        // SAFETY: as above; the pointer is misaligned on purpose and never dereferenced.
        let misaligned = unsafe { NonNull::new_unchecked(odd.base().as_ptr().add(1)) };
        // SAFETY: construction fails on the alignment check before any access.
        assert!(unsafe { GrantTable::new(misaligned, 16) }.is_err());
    }
}
