//! How the model reaches normal-world memory: only through what was shared with it.
//!
//! [`PhysMem`] is the machine's RAM as the secure side sees it. It is private to this module:
//! the rest of the model gets a [`Mapping`] from the [`ShareTable`] for an id that was really
//! shared, with the access it was shared with, and every access outside that is a [`Fault`].

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use trusty_platform::ffa;
use trusty_platform::mem::{PhysRange, PAGE_SIZE};
use trusty_platform::xen::grant::{GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING};
use trusty_virtio::vring::RingMemory;

/// Physical memory as the secure side reaches it (bytes and naturally aligned words).
pub trait PhysMem: Send + Sync {
    /// Whether `[pa, pa + len)` is RAM.
    fn contains(&self, pa: u64, len: usize) -> bool;
    /// The normal-world guest's stage-2 translation of `ipa`. Only the hypervisor stand-ins
    /// (FF-A mediator, Trusty mediator, grant table) use it; Trusty itself never sees IPAs.
    fn guest_to_phys(&self, ipa: u64) -> Option<u64>;
    /// Copies out; `false` if the range is not RAM.
    fn read(&self, pa: u64, out: &mut [u8]) -> bool;
    /// Copies in; `false` if the range is not RAM.
    fn write(&self, pa: u64, data: &[u8]) -> bool;
    /// Reads a little-endian u16; `None` if not RAM.
    fn read_u16(&self, pa: u64) -> Option<u16>;
    /// Writes a little-endian u16; `false` if not RAM.
    fn write_u16(&self, pa: u64, v: u16) -> bool;
    /// Reads a little-endian u32; `None` if not RAM.
    fn read_u32(&self, pa: u64) -> Option<u32>;
    /// Writes a little-endian u32; `false` if not RAM.
    fn write_u32(&self, pa: u64, v: u32) -> bool;
    /// Reads a little-endian u64; `None` if not RAM.
    fn read_u64(&self, pa: u64) -> Option<u64>;
    /// Writes a little-endian u64; `false` if not RAM.
    fn write_u64(&self, pa: u64, v: u64) -> bool;
    /// Where `[pa, pa + len)` lies in this process's memory, if it is one run of plain RAM that
    /// stays in place for as long as this memory lives; `None` (the default) sends every
    /// access through the methods above. A [`Mapping`] asks once, when it is made, so its
    /// accesses need no lookup.
    fn direct(&self, _pa: u64, _len: usize) -> Option<DirectSpan> {
        None
    }
}

/// For a secure-side peer polling on another core, as a request arrives: asks for the lines its
/// call reads first together, instead of one after the other as each read depends on the last
/// (the avail index, then the slot it names, then the buffer): both avail lines of each ring
/// ([`DeviceQueue::prefetch_avail`]) and the first two lines at `last_frame`, where the last
/// frame from the normal world lay (0: none yet), a guess that is right when the driver hands
/// its last freed buffer out first. Hints only: a prefetch never faults and reads nothing into
/// the program, so any address will do.
///
/// [`DeviceQueue::prefetch_avail`]: trusty_virtio::vring::DeviceQueue::prefetch_avail
#[inline(always)]
pub fn prefetch_call_lines<'a, M: RingMemory + 'a>(
    rings: impl IntoIterator<Item = (&'a trusty_virtio::vring::DeviceQueue, &'a M)>,
    last_frame: usize,
) {
    for (queue, mem) in rings {
        queue.prefetch_avail(mem);
    }
    if last_frame != 0 {
        let p = last_frame as *const u8;
        trusty_virtio::vring::prefetch_line(p);
        trusty_virtio::vring::prefetch_line(p.wrapping_add(64));
    }
}

/// Takes the lines of `len` bytes at `base` into this core's cache for writing, by storing back
/// the byte each line starts with (every byte keeps its value): for a peer about to copy into
/// memory the other side has read since (see [`ShareTable::touch_for_write`]).
///
/// # Safety
/// `base..base + len` must be writable memory that stays valid for the call; another thread may
/// read it meanwhile (it sees the same bytes), none may write it.
pub unsafe fn touch_lines_for_write(base: *mut u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `off < len`, inside the range the caller vouches for; the byte written is the
        // one read.
        unsafe {
            let p = base.add(off);
            p.write_volatile(p.read_volatile());
        }
        // The next line's first byte (lines of 64 bytes or less are all reached).
        off = (base as usize + off + 64) / 64 * 64 - base as usize;
    }
}

/// A run of process memory standing for a run of physical memory (see [`PhysMem::direct`]).
#[derive(Clone, Copy, Debug)]
pub struct DirectSpan {
    ptr: core::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a span only names memory that its `PhysMem` (itself `Send + Sync`) keeps alive;
// both worlds reach it with copies and volatile word accesses, as CPUs share RAM.
unsafe impl Send for DirectSpan {}
// SAFETY: as above; the span itself is never written through a shared reference.
unsafe impl Sync for DirectSpan {}

impl DirectSpan {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the [`PhysMem`]
    /// that hands this span out lives, whatever borrow it was handed out through. Both worlds
    /// may access the bytes concurrently (byte copies and volatile, aligned word accesses, as
    /// two CPUs share RAM).
    pub unsafe fn new(ptr: core::ptr::NonNull<u8>, len: usize) -> Self {
        DirectSpan { ptr, len }
    }
}

/// An access the model made, or was asked to make, to memory it was never given. A run with a
/// fault has failed: a wrong sharing decision shows up here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The sharing mechanism through which the access was attempted.
    pub mechanism: &'static str,
    /// The id or address the normal world handed over.
    pub addr: u64,
    /// What went wrong.
    pub what: String,
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "secure-side fault: {} at {:#x} ({})", self.what, self.addr, self.mechanism)
    }
}

/// One FF-A share as the secure side recorded it.
#[derive(Clone, Debug)]
struct Share {
    /// Shared with every mapping made of it (no copy per mapping).
    ranges: Arc<[PhysRange]>,
    /// Bytes shared (the ranges' total).
    size: usize,
    /// The first range's place in memory ([`PhysMem::direct`]), found once at share time
    /// (kept only when it covers the whole first range).
    direct: Option<DirectSpan>,
    /// Bytes of the first range: the most that `direct` reaches of the share.
    first_bytes: usize,
    writable: bool,
    /// Mappings the secure side holds (a mapped share cannot be reclaimed).
    mapped: u32,
}

/// Buckets of [`ShareMap`]'s look-up cache.
const RECENT_BUCKETS: usize = 64;

/// Live shares by handle: a slab of slots with an index by handle, and a direct-mapped cache of
/// recent look-ups so a buffer mapped for every message costs no tree search. A cache entry is
/// only a hint: a hit counts only when the slot still holds that very handle, so a reclaimed
/// handle (its slot emptied or reused) always misses and is then looked up in the index, where
/// it is not found.
struct ShareMap {
    slots: Vec<Option<(u64, Share)>>,
    /// Empty slots, reused by the next share.
    free: Vec<usize>,
    index: BTreeMap<u64, usize>,
    recent: [usize; RECENT_BUCKETS],
}

impl ShareMap {
    fn new() -> Self {
        ShareMap { slots: Vec::new(), free: Vec::new(), index: BTreeMap::new(), recent: [usize::MAX; RECENT_BUCKETS] }
    }

    fn bucket(id: u64) -> usize {
        // Handles go up in steps of two; the low bit carries nothing.
        (id >> 1) as usize % RECENT_BUCKETS
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn insert(&mut self, id: u64, share: Share) {
        let slot = match self.index.get(&id) {
            Some(&slot) => slot,
            None => {
                let slot = match self.free.pop() {
                    Some(slot) => slot,
                    None => {
                        self.slots.push(None);
                        self.slots.len() - 1
                    }
                };
                self.index.insert(id, slot);
                slot
            }
        };
        if let Some(entry) = self.slots.get_mut(slot) {
            *entry = Some((id, share));
        }
        self.recent[Self::bucket(id)] = slot;
    }

    /// The slot holding `id`: the cached one if it still holds `id`, else the index's.
    #[inline]
    fn slot_of(&self, id: u64) -> Option<usize> {
        let hint = self.recent[Self::bucket(id)];
        if matches!(self.slots.get(hint), Some(Some((held, _))) if *held == id) {
            return Some(hint);
        }
        self.index.get(&id).copied()
    }

    fn get(&self, id: u64) -> Option<&Share> {
        let slot = self.slot_of(id)?;
        self.slots.get(slot)?.as_ref().map(|(_, share)| share)
    }

    /// [`ShareMap::get`] that also remembers the slot in the look-up cache (a buffer used for
    /// every message keeps hitting it).
    #[inline]
    fn get_recent(&mut self, id: u64) -> Option<&Share> {
        let hint = self.recent[Self::bucket(id)];
        if matches!(self.slots.get(hint), Some(Some((held, _))) if *held == id) {
            return self.slots.get(hint)?.as_ref().map(|(_, share)| share);
        }
        self.get_recent_slow(id)
    }

    /// [`ShareMap::get_recent`] when the cache misses: the index, and the cache updated.
    #[inline(never)]
    fn get_recent_slow(&mut self, id: u64) -> Option<&Share> {
        let slot = self.index.get(&id).copied()?;
        self.recent[Self::bucket(id)] = slot;
        self.slots.get(slot)?.as_ref().map(|(_, share)| share)
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Share> {
        let slot = self.slot_of(id)?;
        self.recent[Self::bucket(id)] = slot;
        self.slots.get_mut(slot)?.as_mut().map(|(_, share)| share)
    }

    fn remove(&mut self, id: u64) -> Option<Share> {
        let slot = self.index.remove(&id)?;
        let taken = self.slots.get_mut(slot)?.take();
        self.free.push(slot);
        taken.map(|(_, share)| share)
    }
}

/// Counters about shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareStats {
    /// Shares live now.
    pub live: usize,
    /// Most shares live at once.
    pub max_live: usize,
    /// Shares made.
    pub shared_total: u64,
    /// Shares reclaimed.
    pub reclaimed: u64,
    /// Reclaims refused.
    pub denied_reclaims: u64,
    /// MEM_SHARE refused because the share cap was reached.
    pub over_cap: u64,
    /// FFA_RXTX_MAP while mapped, or FFA_RXTX_UNMAP while not, refused.
    pub rxtx_refused: u64,
}

/// How Trusty reads the memory ids it is given (spec §3.1): by API version, or as grant
/// references when it is a VM peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdScheme {
    /// API < 4: a bare physical address.
    Bare,
    /// API 4: physical address + attributes (spec §3.2).
    Compat,
    /// API 5: an FF-A handle.
    FfaHandle,
    /// Trusty is Xen domain `domid`: ids are grant references of the guest `guest_domid`.
    Grant {
        /// The domain the secure side is (grants must name it).
        domid: u16,
    },
}

impl IdScheme {
    fn name(self) -> &'static str {
        match self {
            IdScheme::Bare => "phys",
            IdScheme::Compat => "phys-attr",
            IdScheme::FfaHandle => "ffa-handle",
            IdScheme::Grant { .. } => "xen-grant",
        }
    }
}

/// Maps another domain's grant references into the secure side's address space, as Xen's
/// GNTTABOP_map_grant_ref does for a Trusty VM. The host harness reads the guest's grant table
/// itself ([`HostGrantTable`]); a Trusty VM image asks Xen.
pub trait GrantMapper: Send {
    /// Maps reference `gref`, read-only unless `write`. Returns the page's address as
    /// [`PhysMem`] reaches it and a handle for `unmap`, or why not.
    fn map(&mut self, gref: u32, write: bool) -> Result<(u64, u32), GrantMapError>;
    /// Unmaps what `map` returned.
    fn unmap(&mut self, addr: u64, handle: u32);
}

/// Why a grant could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantMapError {
    /// Not granted to us, or not for this access (GNTST_permission_denied and friends).
    NotGranted,
    /// The granted frame is not the guest's RAM.
    BadFrame(u32),
    /// The hypervisor refused for another reason (its status code).
    Refused(i32),
}

/// Where Trusty's memory ids come from and what stands between the normal world and Trusty:
/// the FF-A sharing registry (an SPMC, or Xen's FF-A mediator that translates IPAs), address
/// ids (optionally rewritten by a Trusty mediator), and the guest's grant table as Xen would
/// read it for a Trusty VM.
pub struct ShareTable {
    phys: Arc<dyn PhysMem>,
    scheme: IdScheme,
    /// A Trusty mediator rewrites address ids from IPA to PA (first page only, as NXP's does).
    mediated_addresses: bool,
    /// Xen's FF-A mediator: MEM_SHARE and RXTX_MAP carry IPAs, descriptors single-fragment.
    ffa_mediator: bool,
    /// How grant references are mapped (a Trusty VM).
    grants: Option<alloc::boxed::Box<dyn GrantMapper>>,
    /// A share being received in fragments: bytes so far, total length, sender.
    fragments: Option<(Vec<u8>, usize, u16)>,
    shares: ShareMap,
    next_handle: u64,
    cap: Option<usize>,
    stats: ShareStats,
    faults: Vec<Fault>,
    /// FFA_RXTX_MAP: the normal world's TX buffer (the secure side reads descriptors there)
    /// and RX buffer (partition information is written there), as physical addresses.
    tx_buffer: Option<u64>,
    rx_buffer: Option<u64>,
    /// Test switch: deny the next N reclaims as if still mapped.
    pub deny_reclaims: u32,
    /// A `try_map` is under way: refusals are not faults.
    quiet: bool,
}

/// Why MEM_SHARE was refused, as an FF-A error code.
pub type FfaErr = i32;

impl ShareTable {
    /// A table over `phys`, refusing shares beyond `cap` live ones (`None`: no cap).
    pub fn new(phys: Arc<dyn PhysMem>, cap: Option<usize>) -> Self {
        ShareTable {
            phys,
            shares: ShareMap::new(),
            // Handles look nothing like addresses, so a confused normal world is caught.
            next_handle: 0x5EC0_0000_0001,
            cap,
            stats: ShareStats::default(),
            faults: Vec::new(),
            tx_buffer: None,
            rx_buffer: None,
            deny_reclaims: 0,
            quiet: false,
            scheme: IdScheme::FfaHandle,
            mediated_addresses: false,
            ffa_mediator: false,
            grants: None,
            fragments: None,
        }
    }

    /// How ids are read from now on (the model sets it when the API version is chosen).
    pub fn set_scheme(&mut self, scheme: IdScheme) {
        self.scheme = scheme;
    }

    /// How ids are read.
    pub fn scheme(&self) -> IdScheme {
        self.scheme
    }

    /// A Trusty mediator translates address ids; Xen's FF-A mediator translates FF-A ranges.
    pub fn set_mediators(&mut self, mediated_addresses: bool, ffa_mediator: bool) {
        self.mediated_addresses = mediated_addresses;
        self.ffa_mediator = ffa_mediator;
    }

    /// How grant references reach memory.
    pub fn set_grant_mapper(&mut self, mapper: alloc::boxed::Box<dyn GrantMapper>) {
        self.grants = Some(mapper);
    }

    /// The host harness: the guest told Xen where its grant table is.
    pub fn set_grant_table(&mut self, ipa: u64, entries: u32) {
        if let IdScheme::Grant { domid } = self.scheme {
            self.grants = Some(alloc::boxed::Box::new(HostGrantTable::new(self.phys.clone(), ipa, entries, domid)));
        }
    }

    /// Reads a guest address as the secure side must: through the stage-2 if a hypervisor
    /// stand-in translates it, as a physical address otherwise.
    fn guest_range_to_phys(&self, ipa: u64, pages: u32) -> Option<Vec<PhysRange>> {
        let mut out: Vec<PhysRange> = Vec::new();
        for i in 0..u64::from(pages) {
            let pa = self.phys.guest_to_phys(ipa.checked_add(i * PAGE_SIZE as u64)?)?;
            match out.last_mut() {
                Some(r) if r.addr + u64::from(r.pages) * PAGE_SIZE as u64 == pa => r.pages += 1,
                _ => out.push(PhysRange { addr: pa, pages: 1 }),
            }
        }
        Some(out)
    }

    /// The RX buffer of the normal world's FF-A mailbox (PA), for PARTITION_INFO_GET.
    pub fn write_rx(&mut self, data: &[u8]) -> bool {
        match self.rx_buffer {
            Some(rx) => self.phys.write(rx, data),
            None => false,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> ShareStats {
        self.stats
    }

    /// Every fault recorded.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// Records a fault (unless faults are being ignored).
    pub fn fault(&mut self, mechanism: &'static str, addr: u64, what: String) {
        if self.quiet {
            return;
        }
        log::error!("secure-side fault: {what} at {addr:#x} ({mechanism})");
        self.faults.push(Fault { mechanism, addr, what });
    }

    /// FFA_RXTX_MAP: remembers the TX buffer (one page) if it is RAM. A second map without
    /// FFA_RXTX_UNMAP is DENIED, as FF-A v1.0 §7.2 says and Xen's mediator does
    /// (`ffa_handle_rxtx_map()`: "Already mapped" -> FFA_RET_DENIED; Hafnium likewise).
    pub fn rxtx_map(&mut self, tx: u64, rx: u64, pages: u64) -> Result<(), FfaErr> {
        if self.tx_buffer.is_some() {
            self.stats.rxtx_refused += 1;
            return Err(ffa::err::DENIED);
        }
        let (tx, rx) = if self.ffa_mediator {
            // Xen translates the guest's buffer addresses, and they must be its RAM (spec
            // dma-decisions §4.3).
            match (self.phys.guest_to_phys(tx), self.phys.guest_to_phys(rx)) {
                (Some(t), Some(r)) => (t, r),
                _ => return Err(ffa::err::INVALID_PARAMETERS),
            }
        } else {
            (tx, rx)
        };
        if pages != 1 || !self.phys.contains(tx, PAGE_SIZE) || !self.phys.contains(rx, PAGE_SIZE) {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        self.tx_buffer = Some(tx);
        self.rx_buffer = Some(rx);
        Ok(())
    }

    /// FFA_RXTX_UNMAP (FF-A v1.0 §7.3): forgets the pair. w1 bits 31..16 name the endpoint
    /// only when a hypervisor unmaps for a VM; from the endpoint itself they are 0 (or its own
    /// id). With no pair mapped the answer is INVALID_PARAMETERS (Xen's `rxtx_unmap()`).
    pub fn rxtx_unmap(&mut self, w1: u64, own_id: u16) -> Result<(), FfaErr> {
        let id = (w1 >> 16) as u16;
        if (id != 0 && id != own_id) || self.tx_buffer.is_none() {
            self.stats.rxtx_refused += 1;
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        self.tx_buffer = None;
        self.rx_buffer = None;
        self.fragments = None;
        Ok(())
    }

    /// Whether the normal world's RX/TX pair is mapped (FFA_RXTX_MAP without UNMAP).
    pub fn rxtx_mapped(&self) -> bool {
        self.tx_buffer.is_some()
    }

    /// FFA_MEM_SHARE: the first (or only) fragment of a descriptor in the TX buffer. Returns
    /// the handle when complete, `Ok(None)` when more fragments are expected (FFA_MEM_FRAG_RX).
    pub fn mem_share(&mut self, total: u64, fragment: u64, sender: u16) -> Result<Option<u64>, FfaErr> {
        if fragment == 0 || fragment > total || fragment as usize > PAGE_SIZE || total > 64 * PAGE_SIZE as u64 {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        if fragment != total && self.ffa_mediator {
            // Xen's mediator takes single-fragment descriptors only (spec dma-decisions §4.3).
            return Err(ffa::err::NOT_SUPPORTED);
        }
        let mut desc = alloc::vec![0u8; fragment as usize];
        if !self.read_tx(&mut desc) {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        self.fragments = Some((desc, total as usize, sender));
        self.finish_share()
    }

    /// FFA_MEM_FRAG_TX: the next fragment.
    pub fn mem_frag_tx(&mut self, fragment: u64) -> Result<Option<u64>, FfaErr> {
        let Some((mut desc, total, sender)) = self.fragments.take() else { return Err(ffa::err::INVALID_PARAMETERS) };
        if fragment == 0 || fragment as usize > PAGE_SIZE || desc.len() + fragment as usize > total {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        let mut more = alloc::vec![0u8; fragment as usize];
        if !self.read_tx(&mut more) {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        desc.extend_from_slice(&more);
        self.fragments = Some((desc, total, sender));
        self.finish_share()
    }

    /// Bytes of the descriptor received so far (FFA_MEM_FRAG_RX's offset).
    pub fn fragment_offset(&self) -> usize {
        self.fragments.as_ref().map_or(0, |f| f.0.len())
    }

    /// The first bytes of the normal world's TX buffer, as a hypervisor in front of the SPMC
    /// reads them (Xen's mediator checks a descriptor there before it forwards the share).
    pub fn peek_tx(&self, out: &mut [u8]) -> bool {
        self.read_tx(out)
    }

    fn read_tx(&self, out: &mut [u8]) -> bool {
        match self.tx_buffer {
            Some(tx) => self.phys.read(tx, out),
            None => false,
        }
    }

    fn finish_share(&mut self) -> Result<Option<u64>, FfaErr> {
        match &self.fragments {
            Some((desc, total, _)) if desc.len() < *total => return Ok(None),
            None => return Err(ffa::err::INVALID_PARAMETERS),
            _ => {}
        }
        let Some((desc, _, sender)) = self.fragments.take() else { return Err(ffa::err::INVALID_PARAMETERS) };
        let tx_desc = ffa::decode_descriptor(&desc, 4096).map_err(|_| ffa::err::INVALID_PARAMETERS)?;
        if tx_desc.sender != sender || tx_desc.receiver != ffa::TRUSTY_ENDPOINT_ID {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        let mut ranges = Vec::new();
        for r in &tx_desc.ranges {
            if r.addr % PAGE_SIZE as u64 != 0 {
                return Err(ffa::err::INVALID_PARAMETERS);
            }
            if self.ffa_mediator {
                // Xen walks the guest's pages and shares machine addresses (§4.3); a page that
                // is not the guest's RAM is DENIED.
                let translated = self.guest_range_to_phys(r.addr, r.pages).ok_or(ffa::err::DENIED)?;
                ranges.extend(translated);
            } else {
                ranges.push(*r);
            }
        }
        for r in &ranges {
            if !self.phys.contains(r.addr, r.pages as usize * PAGE_SIZE) && !self.ranges_contained(r) {
                return Err(ffa::err::INVALID_PARAMETERS);
            }
        }
        if let Some(cap) = self.cap {
            if self.shares.len() >= cap {
                self.stats.over_cap += 1;
                return Err(ffa::err::NO_MEMORY);
            }
        }
        let writable = match tx_desc.permissions {
            ffa::PERM_RO => false,
            ffa::PERM_RW => true,
            _ => return Err(ffa::err::INVALID_PARAMETERS),
        };
        let handle = self.next_handle;
        self.next_handle += 2;
        let size = ranges.iter().map(|r| r.pages as usize * PAGE_SIZE).sum();
        let first_bytes = ranges.first().map_or(0, |r| (r.pages as usize).saturating_mul(PAGE_SIZE));
        let direct = ranges.first().and_then(|r| self.phys.direct(r.addr, r.pages as usize * PAGE_SIZE));
        let direct = direct.filter(|d| d.len >= first_bytes);
        self.shares.insert(handle, Share { ranges: Arc::from(ranges), size, direct, first_bytes, writable, mapped: 0 });
        self.stats.shared_total += 1;
        self.stats.live = self.shares.len();
        self.stats.max_live = self.stats.max_live.max(self.stats.live);
        Ok(Some(handle))
    }

    /// A range may span stage-2 blocks; then each page must be RAM.
    fn ranges_contained(&self, r: &PhysRange) -> bool {
        (0..u64::from(r.pages)).all(|i| self.phys.contains(r.addr + i * PAGE_SIZE as u64, PAGE_SIZE))
    }

    /// FFA_MEM_RECLAIM (the SPMC's side, FF-A v1.0 §11): DENIED while the borrower has not
    /// relinquished. Trusty relinquishes when its last mapping goes (lib/sm/shared_mem.c
    /// sm_mem_obj_destroy() sends FFA_MEM_RELINQUISH), so "still mapped" is the model's test.
    pub fn mem_reclaim(&mut self, handle: u64) -> Result<(), FfaErr> {
        let share = self.shares.get(handle).ok_or(ffa::err::INVALID_PARAMETERS)?;
        if share.mapped > 0 || self.deny_reclaims > 0 {
            self.deny_reclaims = self.deny_reclaims.saturating_sub(1);
            self.stats.denied_reclaims += 1;
            return Err(ffa::err::DENIED);
        }
        self.shares.remove(handle);
        self.stats.reclaimed += 1;
        self.stats.live = self.shares.len();
        Ok(())
    }

    /// Maps `len` bytes of the memory named by `id`, read as the current [`IdScheme`] says,
    /// with the access asked for. Anything that was not made visible to Trusty this way is a
    /// fault that names the id and the mechanism.
    pub fn map(&mut self, id: u64, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        self.quiet = false;
        self.map_inner(id, len, write, purpose)
    }

    /// Like [`ShareTable::map`], but a refusal is not a fault: for memory the peer may simply
    /// not have granted yet (a Trusty VM waiting for the guest's mailbox).
    pub fn try_map(&mut self, id: u64, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        self.quiet = true;
        let m = self.map_inner(id, len, write, purpose);
        self.quiet = false;
        m
    }

    fn map_inner(&mut self, id: u64, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        let pages = len.div_ceil(PAGE_SIZE).max(1) as u32;
        match self.scheme {
            IdScheme::FfaHandle => self.map_ffa(id, len, write, purpose),
            IdScheme::Bare | IdScheme::Compat => self.map_address(id, pages, len, write, purpose),
            IdScheme::Grant { domid } => self.map_grant(id, pages, len, write, domid, purpose),
        }
    }

    /// API 5: lib/sm/shared_mem.c ext_mem_get_vmm_obj() retrieves the handle from the SPMC
    /// (FFA_MEM_RETRIEVE_REQ) with the caller's client id; an unknown handle, a range too short
    /// or write access to a read-only share fails the retrieve / the mapping.
    fn map_ffa(&mut self, id: u64, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        let Some(share) = self.shares.get_mut(id) else {
            self.fault("ffa-handle", id, format!("{purpose}: memory id was never shared"));
            return None;
        };
        let size = share.size;
        if len > size {
            self.fault("ffa-handle", id, format!("{purpose}: {len} bytes wanted, {size} shared"));
            return None;
        }
        if write && !share.writable {
            self.fault("ffa-handle", id, format!("{purpose}: write to a read-only share"));
            return None;
        }
        share.mapped += 1;
        let ranges = match *share.ranges {
            [one] => Ranges::One(one),
            _ => Ranges::Many(share.ranges.clone()),
        };
        let direct = share.direct;
        Some(Mapping::with_direct(id, ranges, len, write, self.phys.clone(), Vec::new(), direct))
    }

    /// API < 5: lib/sm/ns_mem.c ext_mem_get_vmm_obj() decodes the id with
    /// sm_decode_ns_memory_attr() (API 4: address + MAIR/shareability attributes) or takes it
    /// as a bare physical address (API < 4, vqueue_init()/vmm_alloc_physical() of older trees)
    /// and maps it as NS memory; nothing checks that the normal world meant to share it, which is
    /// why the model records an address outside the normal world's RAM as a fault.
    fn map_address(&mut self, id: u64, pages: u32, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        let mechanism = if self.mediated_addresses { "mediated-ipa" } else { self.scheme.name() };
        let (addr, read_only) = if self.scheme == IdScheme::Compat {
            match trusty_platform::phys::decode_compat(id) {
                Ok(d) => d,
                Err(e) => {
                    self.fault(mechanism, id, format!("{purpose}: not a valid physical-address id ({e:?})"));
                    return None;
                }
            }
        } else {
            (id & 0x0000_FFFF_FFFF_F000, false)
        };
        if write && read_only {
            self.fault(mechanism, id, format!("{purpose}: write through a read-only id"));
            return None;
        }
        let pa = if self.mediated_addresses {
            // An NXP-style mediator translates the first page only (spec dma-decisions §4.4).
            match self.phys.guest_to_phys(addr) {
                Some(pa) => pa,
                None => {
                    self.fault(mechanism, addr, format!("{purpose}: the mediator found no guest RAM here"));
                    return None;
                }
            }
        } else {
            addr
        };
        let range = PhysRange { addr: pa, pages };
        if !self.phys.contains(pa, len.max(1)) && !self.ranges_contained(&range) {
            self.fault(mechanism, pa, format!("{purpose}: {len} bytes at this address are not the normal world's RAM"));
            return None;
        }
        Some(Mapping::new(id, Ranges::One(range), len, write, self.phys.clone(), Vec::new()))
    }

    fn map_grant(&mut self, id: u64, pages: u32, len: usize, write: bool, domid: u16, purpose: &str) -> Option<Mapping> {
        let Some(first) = trusty_platform::xen::grant::decode_grant_id(id) else {
            self.fault("xen-grant", id, format!("{purpose}: not a grant reference"));
            return None;
        };
        let mut ranges: Vec<PhysRange> = Vec::new();
        let mut grants = Vec::new();
        for i in 0..pages {
            let gref = first.wrapping_add(i);
            let mapped = match self.grants.as_mut() {
                Some(m) => m.map(gref, write),
                None => Err(GrantMapError::NotGranted),
            };
            let (addr, handle) = match mapped {
                Ok(m) => m,
                Err(e) => {
                    if let Some(m) = self.grants.as_mut() {
                        for (a, h) in grants {
                            m.unmap(a, h);
                        }
                    }
                    self.fault("xen-grant", u64::from(gref), format!("{purpose}: grant reference not mapped for domain {domid} ({e:?})"));
                    return None;
                }
            };
            grants.push((addr, handle));
            match ranges.last_mut() {
                Some(r) if r.addr + u64::from(r.pages) * PAGE_SIZE as u64 == addr => r.pages += 1,
                _ => ranges.push(PhysRange { addr, pages: 1 }),
            }
        }
        let ranges = match *ranges {
            [one] => Ranges::One(one),
            _ => Ranges::Many(Arc::from(ranges)),
        };
        Some(Mapping::new(id, ranges, len, write, self.phys.clone(), grants))
    }

    /// Gives a mapping back.
    pub fn unmap(&mut self, m: Mapping) {
        match self.scheme {
            IdScheme::FfaHandle => {
                if let Some(share) = self.shares.get_mut(m.id) {
                    share.mapped = share.mapped.saturating_sub(1);
                }
            }
            _ => {
                if let Some(mapper) = self.grants.as_mut() {
                    for (addr, handle) in m.grants {
                        mapper.unmap(addr, handle);
                    }
                }
            }
        }
    }

    /// Live shares.
    pub fn live(&self) -> usize {
        self.shares.len()
    }

    /// Maps `len` bytes of `id` as [`ShareTable::map`] does (the same checks, the same faults)
    /// for the one access `f` makes, and gives the mapping back after it. Under FF-A handles
    /// the share is looked up and reached in place, with no mapping to count or give back (the
    /// table stays borrowed, so nothing can reclaim the share meanwhile; a reclaimed handle is
    /// not found and faults, as with `map`); under the other schemes it is `map`, `f`,
    /// `unmap`. `None` when the mapping is refused.
    #[inline(always)]
    pub fn with_mapped<R>(&mut self, id: u64, len: usize, write: bool, purpose: &str, f: impl FnOnce(&Span<'_>) -> R) -> Option<R> {
        if self.scheme != IdScheme::FfaHandle {
            let m = self.map(id, len, write, purpose)?;
            let r = f(&m.span());
            self.unmap(m);
            return Some(r);
        }
        match self.share_span(id, len, write) {
            Ok(span) => Some(f(&span)),
            Err(why) => {
                self.refuse_span(id, len, purpose, why);
                None
            }
        }
    }

    /// Takes the first `len` bytes of the writable share `id` into this core's cache for
    /// writing, by storing back, a line at a time, the byte each line starts with: memory
    /// keeps exactly what it held. For a buffer the normal world has read since this side last
    /// wrote it: the lines are then in the other core's cache, and a copy into them pays for
    /// each line's trip back while it runs (at 4000 bytes about 450 ns of a 1.7 us echo at the
    /// 67 ns placement, 120 ns when the lines were taken beforehand; `PREFETCHW` left that
    /// unchanged on this machine). Only under the FF-A scheme and within the share's direct
    /// run, and quietly: an id not shared (writable, that long) is left alone, no fault, no
    /// mapping counted.
    ///
    /// Storing into a buffer the driver made available to this side changes nothing it may
    /// read: it reads an rx buffer only after the device returns it, up to the used length.
    pub fn touch_for_write(&mut self, id: u64, len: usize) {
        if self.scheme != IdScheme::FfaHandle {
            return;
        }
        let Some(share) = self.shares.get_recent(id) else { return };
        if !share.writable || len > share.size {
            return;
        }
        let Some(direct) = share.direct else { return };
        let run = share.first_bytes.min(len).min(direct.len);
        // SAFETY: `run` bytes from the start of the direct run `PhysMem::direct` vouched for
        // when the share was made, kept alive by the `PhysMem` and the share this table holds
        // (it is borrowed here, so the share cannot be reclaimed meanwhile); the share is
        // writable.
        unsafe { touch_lines_for_write(direct.ptr.as_ptr(), run) };
    }

    /// The FF-A share `id` as a [`Span`] of `len` bytes, checked as `map_ffa` checks it
    /// (lib/sm/shared_mem.c ext_mem_get_vmm_obj(): shared, long enough, writable if written).
    #[inline(always)]
    fn share_span(&mut self, id: u64, len: usize, write: bool) -> Result<Span<'_>, SpanRefused> {
        let share = self.shares.get_recent(id).ok_or(SpanRefused::NeverShared)?;
        if len > share.size {
            return Err(SpanRefused::TooLong { shared: share.size });
        }
        if write && !share.writable {
            return Err(SpanRefused::ReadOnly);
        }
        let ranges: &[PhysRange] = &share.ranges;
        // The first range's bytes up to `len`, which `direct` covers (found at share time).
        let run = share.first_bytes.min(len);
        let direct = share.direct.map(|d| DirectSpan { ptr: d.ptr, len: run });
        Ok(Span { ranges, len, writable: write, phys: &self.phys, direct })
    }

    /// The fault of a refused [`ShareTable::with_mapped`] (out of line: never on a data path
    /// that works).
    #[cold]
    #[inline(never)]
    fn refuse_span(&mut self, id: u64, len: usize, purpose: &str, why: SpanRefused) {
        let what = match why {
            SpanRefused::NeverShared => format!("{purpose}: memory id was never shared"),
            SpanRefused::TooLong { shared } => format!("{purpose}: {len} bytes wanted, {shared} shared"),
            SpanRefused::ReadOnly => format!("{purpose}: write to a read-only share"),
        };
        self.quiet = false;
        self.fault("ffa-handle", id, what);
    }
}

/// Why [`ShareTable::with_mapped`] refused an FF-A share.
#[derive(Clone, Copy, Debug)]
enum SpanRefused {
    NeverShared,
    TooLong { shared: usize },
    ReadOnly,
}

/// The host harness's stand-in for Xen's grant mapping: reads the guest's grant table (whose
/// location the guest registered) through the stage-2, checks the entry as Xen would, and marks
/// it in use while mapped.
pub struct HostGrantTable {
    phys: Arc<dyn PhysMem>,
    /// Guest address and entry count of the table.
    table: (u64, u32),
    /// The domain the secure side is (grants must name it).
    domid: u16,
}

impl HostGrantTable {
    /// The grant table of `entries` entries at guest address `table_ipa`, for domain `domid`.
    pub fn new(phys: Arc<dyn PhysMem>, table_ipa: u64, entries: u32, domid: u16) -> Self {
        HostGrantTable { phys, table: (table_ipa, entries), domid }
    }

    fn entry_pa(&self, gref: u32) -> Option<u64> {
        let (ipa, entries) = self.table;
        if gref >= entries {
            return None;
        }
        self.phys.guest_to_phys(ipa + u64::from(gref) * 8)
    }
}

impl GrantMapper for HostGrantTable {
    fn map(&mut self, gref: u32, write: bool) -> Result<(u64, u32), GrantMapError> {
        let epa = self.entry_pa(gref).ok_or(GrantMapError::NotGranted)?;
        let flags = self.phys.read_u16(epa).ok_or(GrantMapError::NotGranted)?;
        let granted_to = self.phys.read_u16(epa + 2).ok_or(GrantMapError::NotGranted)?;
        let frame = self.phys.read_u32(epa + 4).ok_or(GrantMapError::NotGranted)?;
        if flags & GTF_PERMIT_ACCESS == 0 || granted_to != self.domid || (write && flags & GTF_READONLY != 0) {
            return Err(GrantMapError::NotGranted);
        }
        let pa = self.phys.guest_to_phys(u64::from(frame) << 12).ok_or(GrantMapError::BadFrame(frame))?;
        // Xen marks the entry while it is mapped, so the granter cannot end access.
        self.phys.write_u16(epa, flags | if write { GTF_WRITING | GTF_READING } else { GTF_READING });
        Ok((pa, gref))
    }

    fn unmap(&mut self, _addr: u64, gref: u32) {
        if let Some(epa) = self.entry_pa(gref) {
            if let Some(flags) = self.phys.read_u16(epa) {
                self.phys.write_u16(epa, flags & !(GTF_READING | GTF_WRITING));
            }
        }
    }
}

/// The physical runs behind a mapping: one (the usual case, kept inline) or several.
enum Ranges {
    One(PhysRange),
    Many(Arc<[PhysRange]>),
}

impl Ranges {
    fn as_slice(&self) -> &[PhysRange] {
        match self {
            Ranges::One(r) => core::slice::from_ref(r),
            Ranges::Many(v) => v,
        }
    }
}

/// A mapped share: bounded access to exactly the bytes that were shared.
///
/// The translation is looked up once, when the mapping is made: if the mapping's first bytes
/// are one run of plain RAM ([`PhysMem::direct`]), accesses inside that run go straight to it,
/// bounds-checked against the mapping; anything else goes through [`PhysMem`] each time.
/// Nothing outlives the share: a mapping holds the share mapped (no reclaim meanwhile), and
/// after [`ShareTable::unmap`] a new mapping must be asked for, which is checked afresh.
pub struct Mapping {
    id: u64,
    ranges: Ranges,
    len: usize,
    writable: bool,
    phys: Arc<dyn PhysMem>,
    /// Grant pages mapped for this mapping: address and unmap handle.
    grants: Vec<(u64, u32)>,
    /// Bytes `[0, n)` of the mapping lie at `ptr` in this process (see [`PhysMem::direct`]).
    direct: Option<DirectSpan>,
    /// The direct run as the word accesses use it, resolved once here instead of on every
    /// access: its start (8-aligned, so a word's alignment is its offset's; dangling when
    /// there is no such run) and, per word size (1, 2, 4, 8 bytes), how many offsets a word of
    /// that size may start at inside it: `run + 1 - size`, 0 when the run is shorter than a
    /// word or missing (every access then goes through [`PhysMem`]). A word at `off` is in the
    /// run exactly when `off < starts[size]`: the same bounds as `direct`, one compare.
    words: WordWindow,
}

/// See [`Mapping`]'s `words`.
#[derive(Clone, Copy)]
struct WordWindow {
    base: core::ptr::NonNull<u8>,
    /// Offsets a word may start at, by log2 of its size; reads.
    starts: [usize; 4],
    /// The same for writes: all 0 when the mapping is read-only.
    write_starts: [usize; 4],
}

// SAFETY: the window only names memory of a `DirectSpan` (see its Send/Sync), reached within
// its bounds with volatile words.
unsafe impl Send for WordWindow {}
// SAFETY: as above.
unsafe impl Sync for WordWindow {}

impl WordWindow {
    fn new(direct: Option<DirectSpan>, writable: bool) -> Self {
        let run = match direct {
            Some(d) if d.ptr.as_ptr() as usize % 8 == 0 => Some(d),
            _ => None,
        };
        let base = run.map_or(core::ptr::NonNull::dangling(), |d| d.ptr);
        let len = run.map_or(0, |d| d.len);
        let starts = [1usize, 2, 4, 8].map(|size| (len + 1).saturating_sub(size));
        let write_starts = if writable { starts } else { [0; 4] };
        WordWindow { base, starts, write_starts }
    }
}

impl Mapping {
    fn new(id: u64, ranges: Ranges, len: usize, writable: bool, phys: Arc<dyn PhysMem>, grants: Vec<(u64, u32)>) -> Self {
        let first = ranges.as_slice().first().and_then(|r| phys.direct(r.addr, r.pages as usize * PAGE_SIZE));
        Mapping::with_direct(id, ranges, len, writable, phys, grants, first)
    }

    /// A mapping whose first range lies at `first` (the whole range, as
    /// [`PhysMem::direct`] gave it), found earlier; only its first `len` bytes are reachable.
    fn with_direct(
        id: u64,
        ranges: Ranges,
        len: usize,
        writable: bool,
        phys: Arc<dyn PhysMem>,
        grants: Vec<(u64, u32)>,
        first: Option<DirectSpan>,
    ) -> Self {
        let run = ranges.as_slice().first().map_or(0, |r| (r.pages as usize).saturating_mul(PAGE_SIZE).min(len));
        let direct = first.filter(|d| d.len >= run).map(|d| DirectSpan { ptr: d.ptr, len: run });
        let words = WordWindow::new(direct, writable);
        Mapping { id, ranges, len, writable, phys, grants, direct, words }
    }

    /// The id the share was mapped by.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping allows writes.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The mapping as a borrowed [`Span`] (the accesses of both are one code).
    #[inline]
    fn span(&self) -> Span<'_> {
        Span { ranges: self.ranges.as_slice(), len: self.len, writable: self.writable, phys: &self.phys, direct: self.direct }
    }

    /// The physical address of byte `off`, if the run `[off, off + n)` stays in one range.
    fn pa(&self, off: usize, n: usize) -> Option<u64> {
        self.span().pa(off, n)
    }

    /// Copies `out.len()` bytes from offset `off`; false if out of the mapping.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        self.span().read(off, out)
    }

    /// Copies `data` to offset `off`; false if out of the mapping or read-only.
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        self.span().write(off, data)
    }
}

/// `copy_nonoverlapping` of `n` bytes, with the short copies of a message's header and a
/// small payload done inline (two overlapping unaligned words) instead of a call to `memcpy`.
///
/// # Safety
/// As `copy_nonoverlapping`: `src` readable and `dst` writable for `n` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: in every arm the words read and written lie inside the `n` bytes at `src` and
    // `dst` (the second word of a pair ends exactly at byte `n`), which the caller vouches for.
    unsafe {
        if (16..=32).contains(&n) {
            let (a, b) = (src.cast::<u128>().read_unaligned(), src.add(n - 16).cast::<u128>().read_unaligned());
            dst.cast::<u128>().write_unaligned(a);
            dst.add(n - 16).cast::<u128>().write_unaligned(b);
        } else if (8..16).contains(&n) {
            let (a, b) = (src.cast::<u64>().read_unaligned(), src.add(n - 8).cast::<u64>().read_unaligned());
            dst.cast::<u64>().write_unaligned(a);
            dst.add(n - 8).cast::<u64>().write_unaligned(b);
        } else {
            core::ptr::copy_nonoverlapping(src, dst, n);
        }
    }
}

/// A share reached for one access ([`ShareTable::with_mapped`]): the same bounded view as a
/// [`Mapping`], borrowed from the share table for the length of a call, so it needs no
/// reference counts and nothing to give back, and cannot outlive the share (the table, which
/// alone can end it, is borrowed meanwhile).
#[derive(Clone, Copy)]
pub struct Span<'a> {
    ranges: &'a [PhysRange],
    len: usize,
    writable: bool,
    /// Reached through the `Arc` only off the direct run (so a direct access never derives the
    /// trait object).
    phys: &'a Arc<dyn PhysMem>,
    /// Bytes `[0, n)` lie at `ptr` in this process (see [`PhysMem::direct`]).
    direct: Option<DirectSpan>,
}

impl Span<'_> {
    /// Where bytes `[off, off + n)` are in this process, if inside the direct run.
    #[inline]
    pub(crate) fn direct_at(&self, off: usize, n: usize) -> Option<*mut u8> {
        let d = self.direct.as_ref()?;
        if off.checked_add(n)? > d.len {
            return None;
        }
        // SAFETY: off + n <= d.len, the run's length (checked above).
        Some(unsafe { d.ptr.as_ptr().add(off) })
    }

    /// The physical address of byte `off`, if the run `[off, off + n)` stays in one range.
    fn pa(&self, off: usize, n: usize) -> Option<u64> {
        if off.checked_add(n)? > self.len {
            return None;
        }
        let mut start = 0usize;
        for r in self.ranges {
            let size = r.pages as usize * PAGE_SIZE;
            if off >= start && off + n <= start + size {
                return Some(r.addr + (off - start) as u64);
            }
            start += size;
        }
        None
    }

    /// Bytes reachable.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes from offset `off`; false if out of the share's mapped bytes.
    #[inline(always)]
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        if let Some(p) = self.direct_at(off, out.len()) {
            // SAFETY: `direct_at` bounded the run to the span `PhysMem::direct` vouched for,
            // kept alive by the `PhysMem` this view borrows; bytes are copied, not referenced.
            unsafe { copy_bytes(p, out.as_mut_ptr(), out.len()) };
            return true;
        }
        Span::read_through_phys(*self, off, out)
    }

    /// [`Span::read`] outside the direct run: page by page through [`PhysMem`]. The paths off
    /// the direct run take the span by value (a copy made only where they are called), so that
    /// the direct accesses never need it in memory.
    #[inline(never)]
    fn read_through_phys(self, off: usize, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            let chunk = (PAGE_SIZE - (off + done) % PAGE_SIZE).min(out.len() - done);
            match self.pa(off + done, chunk) {
                Some(pa) if self.phys.read(pa, &mut out[done..done + chunk]) => done += chunk,
                _ => return false,
            }
        }
        true
    }

    /// Copies `data` to offset `off`; false if out of the share's mapped bytes or read-only.
    #[inline(always)]
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        if !self.writable {
            return false;
        }
        if let Some(p) = self.direct_at(off, data.len()) {
            // SAFETY: as in `read`.
            unsafe { copy_bytes(data.as_ptr(), p, data.len()) };
            return true;
        }
        Span::write_through_phys(*self, off, data)
    }

    /// [`Span::write`] of each `(offset, bytes)` part, with one bound check for all of them
    /// when they lie in the direct run (a frame's header fields and payload written in place).
    /// False if any part is out of the share's mapped bytes or the span is read-only; parts
    /// are written in order, as separate writes would write them.
    #[inline(always)]
    pub fn write_parts<const N: usize>(&self, parts: [(usize, &[u8]); N]) -> bool {
        if self.writable {
            let end = parts.iter().try_fold(0usize, |end, (off, d)| Some(end.max(off.checked_add(d.len())?)));
            if let Some(p) = end.and_then(|end| self.direct_at(0, end)) {
                for (off, d) in parts {
                    // SAFETY: off + d.len() <= end, and `direct_at` bounded [0, end) to the span
                    // `PhysMem::direct` vouched for (as in `write`).
                    unsafe { copy_bytes(d.as_ptr(), p.add(off), d.len()) };
                }
                return true;
            }
        }
        Span::write_parts_one_by_one(*self, parts)
    }

    /// [`Span::write_parts`] outside the direct run (or to a read-only span): part by part,
    /// out of line, so that the parts are only gathered where this is needed.
    #[cold]
    #[inline(never)]
    fn write_parts_one_by_one<const N: usize>(self, parts: [(usize, &[u8]); N]) -> bool {
        parts.iter().all(|(off, d)| self.write(*off, d))
    }

    /// [`Span::write`] outside the direct run: page by page through [`PhysMem`].
    #[inline(never)]
    fn write_through_phys(self, off: usize, data: &[u8]) -> bool {
        let mut done = 0;
        while done < data.len() {
            let chunk = (PAGE_SIZE - (off + done) % PAGE_SIZE).min(data.len() - done);
            match self.pa(off + done, chunk) {
                Some(pa) if self.phys.write(pa, &data[done..done + chunk]) => done += chunk,
                _ => return false,
            }
        }
        true
    }
}

impl Mapping {
    /// An aligned word of the direct run at `off`, if there is one: one bound and one
    /// alignment test against the window resolved when the mapping was made (`words`).
    /// `write`: for a write (a read-only mapping has no window for it).
    #[inline(always)]
    fn direct_word<T>(&self, off: usize, write: bool) -> Option<*mut T> {
        let size = core::mem::size_of::<T>();
        let w = &self.words;
        let starts = if write { &w.write_starts } else { &w.starts };
        if off >= starts[size.trailing_zeros() as usize & 3] || off % core::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: off < run + 1 - size, i.e. off + size <= run, the length of the direct run
        // at `base` (`WordWindow::new`; the run is `direct`, which `PhysMem::direct` vouched
        // for and the mapping keeps alive).
        Some(unsafe { w.base.as_ptr().add(off) }.cast())
    }
}

macro_rules! mapping_word {
    ($read:ident, $write:ident, $read_slow:ident, $write_slow:ident, $t:ty) => {
        #[inline]
        fn $read(&self, off: usize) -> $t {
            if let Some(p) = self.direct_word::<$t>(off, false) {
                // SAFETY: in the direct run and aligned (`direct_word`); volatile: the other
                // world writes concurrently.
                return <$t>::from_le(unsafe { p.read_volatile() });
            }
            self.$read_slow(off)
        }
        #[inline]
        fn $write(&self, off: usize, v: $t) {
            if let Some(p) = self.direct_word::<$t>(off, true) {
                // SAFETY: as in the read above (the write window is empty unless writable).
                unsafe { p.write_volatile(v.to_le()) };
                return;
            }
            if self.writable {
                self.$write_slow(off, v)
            }
        }
    };
}

/// The accesses of [`mapping_word`] outside the direct run, through [`PhysMem`]: out of line,
/// so that a ring access on the direct run stays a few instructions wherever it is inlined.
macro_rules! mapping_word_slow {
    ($read_slow:ident, $write_slow:ident, $read:ident, $write:ident, $t:ty) => {
        #[cold]
        #[inline(never)]
        fn $read_slow(&self, off: usize) -> $t {
            self.pa(off, core::mem::size_of::<$t>()).and_then(|pa| self.phys.$read(pa)).unwrap_or(0)
        }
        #[cold]
        #[inline(never)]
        fn $write_slow(&self, off: usize, v: $t) {
            if let Some(pa) = self.pa(off, core::mem::size_of::<$t>()) {
                self.phys.$write(pa, v);
            }
        }
    };
}

impl Mapping {
    mapping_word_slow!(read_u16_slow, write_u16_slow, read_u16, write_u16, u16);
    mapping_word_slow!(read_u32_slow, write_u32_slow, read_u32, write_u32, u32);
    mapping_word_slow!(read_u64_slow, write_u64_slow, read_u64, write_u64, u64);
}

impl RingMemory for Mapping {
    fn len(&self) -> usize {
        self.len
    }
    #[inline]
    fn prefetch(&self, off: usize) {
        if let Some(p) = self.direct_word::<u8>(off, false) {
            trusty_virtio::vring::prefetch_line(p);
        }
    }
    mapping_word!(read_u16, write_u16, read_u16_slow, write_u16_slow, u16);
    mapping_word!(read_u32, write_u32, read_u32_slow, write_u32_slow, u32);
    mapping_word!(read_u64, write_u64, read_u64_slow, write_u64_slow, u64);
}

#[cfg(all(test, feature = "std"))]
mod tests {
    //! Mappings translate once, when they are made; what they reach stays exactly what was
    //! shared, and nothing of a share survives its reclaim.
    extern crate std;

    use super::*;
    use crate::host::{GuestRam, Stage2};
    use trusty_platform::ffa::{encode_descriptor, MemTransaction, ATTR_NORMAL_WB_INNER_SHAREABLE, PERM_RO, PERM_RW, TRUSTY_ENDPOINT_ID};

    const BASE: u64 = 0x4000_0000;
    const TX: u64 = BASE;
    const RX: u64 = BASE + 0x1000;
    const SENDER: u16 = 1;

    /// A share table over 16 pages of guest RAM with the normal world's RX/TX pair mapped.
    fn table(stage2: Stage2) -> (Arc<GuestRam>, ShareTable) {
        let ram = GuestRam::new(BASE, 16, stage2);
        let mut t = ShareTable::new(ram.clone(), None);
        let (tx, rx) = (ram.ipa_to_pa(TX).unwrap(), ram.ipa_to_pa(RX).unwrap());
        t.rxtx_map(tx, rx, 1).unwrap();
        (ram, t)
    }

    /// FFA_MEM_SHARE of `pages` pages at guest address `ipa` (as a physical address), with
    /// `perm`.
    fn share(ram: &GuestRam, t: &mut ShareTable, ipa: u64, pages: u32, perm: u8) -> u64 {
        let ranges = [PhysRange { addr: ram.ipa_to_pa(ipa).unwrap(), pages }];
        let tx = MemTransaction {
            sender: SENDER,
            receiver: TRUSTY_ENDPOINT_ID,
            attributes: ATTR_NORMAL_WB_INNER_SHAREABLE,
            permissions: perm,
            tag: 0,
            ranges: &ranges[..],
        };
        let mut d = alloc::vec![0u8; PAGE_SIZE];
        let len = encode_descriptor(&tx, &mut d).unwrap();
        assert!(PhysMem::write(ram, ram.ipa_to_pa(TX).unwrap(), &d[..len]));
        t.mem_share(len as u64, len as u64, SENDER).unwrap().unwrap()
    }

    #[test]
    fn an_access_after_reclaim_faults_and_a_mapping_reaches_only_its_share() {
        for stage2 in [Stage2::Identity, Stage2::Translated { pa_base: 0x8000_0000 }] {
            let (ram, mut t) = table(stage2);
            let page = BASE + 0x3000;
            let h = share(&ram, &mut t, page, 1, PERM_RW);
            let m = t.map(h, PAGE_SIZE, true, "test buffer").expect("a share maps");
            // Bytes and words land in the shared page (through the translation made once).
            assert!(m.write(8, b"secure"));
            RingMemory::write_u32(&m, 16, 0xfeed_f00d);
            let mut back = [0u8; 6];
            assert!(PhysMem::read(&*ram, ram.ipa_to_pa(page).unwrap() + 8, &mut back));
            assert_eq!(&back, b"secure");
            assert_eq!(RingMemory::read_u32(&m, 16), 0xfeed_f00d);
            // Nothing past the share: not the next page, not a word straddling the end.
            assert!(!m.read(PAGE_SIZE - 2, &mut [0u8; 4]));
            assert!(!m.write(PAGE_SIZE, b"x"));
            RingMemory::write_u32(&m, PAGE_SIZE - 2, 0x1111_1111);
            assert_eq!(RingMemory::read_u32(&m, PAGE_SIZE - 2), 0);
            let mut next = [0u8; 4];
            assert!(PhysMem::read(&*ram, ram.ipa_to_pa(page + 0x1000).unwrap(), &mut next));
            assert_eq!(next, [0; 4], "the next page was never written");
            // Mapped: the owner cannot take it back.
            assert_eq!(t.mem_reclaim(h), Err(ffa::err::DENIED));
            t.unmap(m);
            assert_eq!(t.mem_reclaim(h), Ok(()));
            assert!(t.faults().is_empty());
            // After the reclaim the id reaches nothing, however recently it was used.
            assert!(t.map(h, PAGE_SIZE, false, "buffer after reclaim").is_none());
            assert_eq!(t.faults().len(), 1, "the access after reclaim is a fault");
            assert!(t.faults()[0].what.contains("never shared"), "{:?}", t.faults());
            // A new share of the same page is a new id; the old one still faults.
            let h2 = share(&ram, &mut t, page, 1, PERM_RO);
            assert_ne!(h2, h);
            assert!(t.map(h2, PAGE_SIZE, true, "write to a read-only share").is_none(), "read-only");
            let m2 = t.map(h2, PAGE_SIZE, false, "read-only share").expect("maps read-only");
            assert!(!m2.write(0, b"no"), "a read-only mapping refuses writes");
            RingMemory::write_u16(&m2, 0, 0x7777);
            assert_eq!(RingMemory::read_u16(&m2, 0), 0, "nor word writes (byte 0 was never written)");
            t.unmap(m2);
            assert!(t.map(h, 1, false, "buffer after reclaim").is_none());
            assert_eq!(t.faults().len(), 3);
        }
    }

    /// Ring words take a window resolved once when the mapping is made: it reaches exactly
    /// the mapping's bytes (not the rest of the shared page), refuses words that straddle its
    /// end, and leaves unaligned words to the checked path.
    #[test]
    fn ring_words_reach_exactly_the_mapped_bytes() {
        for stage2 in [Stage2::Identity, Stage2::Translated { pa_base: 0x8000_0000 }] {
            let (ram, mut t) = table(stage2);
            let page = BASE + 0x7000;
            let h = share(&ram, &mut t, page, 1, PERM_RW);
            let pa = ram.ipa_to_pa(page).unwrap();
            let m = t.map(h, 100, true, "short ring").expect("maps 100 bytes of the page");
            RingMemory::write_u64(&m, 88, 0x0102_0304_0506_0708);
            assert_eq!(RingMemory::read_u64(&m, 88), 0x0102_0304_0506_0708);
            RingMemory::write_u32(&m, 96, 0xaabb_ccdd);
            assert_eq!(RingMemory::read_u32(&m, 96), 0xaabb_ccdd, "the last word of the mapping");
            // Past the mapping's 100 bytes, though still in the shared page: nothing.
            for off in [97usize, 98, 99, 100, 104, PAGE_SIZE, usize::MAX - 1] {
                RingMemory::write_u32(&m, off, 0x5555_5555);
                assert_eq!(RingMemory::read_u32(&m, off), 0, "word at {off}");
            }
            RingMemory::write_u64(&m, 96, u64::MAX);
            RingMemory::write_u16(&m, 100, 0x7777);
            let mut tail = [0u8; 12];
            assert!(PhysMem::read(&*ram, pa + 96, &mut tail));
            assert_eq!(tail, [0xdd, 0xcc, 0xbb, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0], "nothing written past byte 100");
            // An unaligned word inside the mapping leaves the window for the checked path,
            // which refuses it as guest RAM does (ring words are always aligned).
            assert!(m.write(0, &[0x5a; 8]));
            RingMemory::write_u32(&m, 2, 0x1122_3344);
            assert_eq!(RingMemory::read_u32(&m, 2), 0);
            let mut b = [0u8; 8];
            assert!(PhysMem::read(&*ram, pa, &mut b));
            assert_eq!(b, [0x5a; 8], "the unaligned write was refused");
            t.unmap(m);
            // Read-only: no word write lands, on either path.
            let m = t.map(h, PAGE_SIZE, false, "read-only ring").expect("maps read-only");
            RingMemory::write_u32(&m, 96, 0);
            RingMemory::write_u16(&m, 4, 0);
            assert_eq!(RingMemory::read_u32(&m, 96), 0xaabb_ccdd);
            assert_eq!(RingMemory::read_u16(&m, 4), 0x5a5a);
            t.unmap(m);
            assert!(t.faults().is_empty(), "{:?}", t.faults());
        }
    }

    /// A share reached in place for one access ([`ShareTable::with_mapped`], the data path's
    /// way) is held to what was shared exactly as a mapping is: its bytes only, read-only when
    /// shared so, and nothing at all once reclaimed, however often the handle was used before.
    #[test]
    fn an_access_in_place_is_bounded_and_faults_after_reclaim() {
        for stage2 in [Stage2::Identity, Stage2::Translated { pa_base: 0x8000_0000 }] {
            let (ram, mut t) = table(stage2);
            let page = BASE + 0x5000;
            let h = share(&ram, &mut t, page, 1, PERM_RW);
            for i in 0..3u8 {
                let ok = t.with_mapped(h, PAGE_SIZE, true, "rx buffer", |m| m.write(4, &[i; 8]) && !m.write(PAGE_SIZE - 4, &[0; 8]));
                assert_eq!(ok, Some(true), "writes inside the share land; a write past its end is refused");
            }
            let mut back = [0u8; 8];
            assert_eq!(t.with_mapped(h, 64, false, "tx buffer", |m| m.read(4, &mut back) && !m.read(60, &mut [0u8; 8])), Some(true));
            assert_eq!(back, [2; 8]);
            assert!(t.faults().is_empty());
            // More than was shared is refused (and is a fault), as `map` refuses it.
            assert!(t.with_mapped(h, 2 * PAGE_SIZE, false, "too long", |_| ()).is_none());
            assert_eq!(t.faults().len(), 1);
            // Nothing holds the share between accesses: the owner can take it back at once.
            assert_eq!(t.mem_reclaim(h), Ok(()));
            assert!(t.with_mapped(h, 16, false, "buffer after reclaim", |m| m.read(0, &mut [0u8; 16])).is_none());
            assert_eq!(t.faults().len(), 2, "the access after reclaim is a fault");
            assert!(t.faults()[1].what.contains("never shared"), "{:?}", t.faults());
            // A read-only share refuses a writable access.
            let ro = share(&ram, &mut t, page, 1, PERM_RO);
            assert!(t.with_mapped(ro, 16, true, "write to a read-only share", |_| ()).is_none());
            assert_eq!(t.faults().len(), 3);
        }
    }

    /// Taking a share's lines for writing leaves every byte as it was, and is quiet (no fault,
    /// nothing touched) for an id never shared, reclaimed, read-only or shorter than asked.
    #[test]
    fn touching_for_write_keeps_the_bytes_and_refuses_quietly() {
        for stage2 in [Stage2::Identity, Stage2::Translated { pa_base: 0x8000_0000 }] {
            let (ram, mut t) = table(stage2);
            let page = BASE + 0x5000;
            let pattern: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect();
            assert!(PhysMem::write(&*ram, ram.ipa_to_pa(page).unwrap(), &pattern));
            let h = share(&ram, &mut t, page, 2, PERM_RW);
            for len in [0, 1, 63, 64, 65, 4000, 2 * PAGE_SIZE] {
                t.touch_for_write(h, len);
            }
            let ro = share(&ram, &mut t, page, 1, PERM_RO);
            t.touch_for_write(ro, 64);
            t.touch_for_write(h, 2 * PAGE_SIZE + 1);
            t.touch_for_write(0xdead_beef, 64);
            assert_eq!(t.mem_reclaim(h), Ok(()));
            t.touch_for_write(h, 64);
            let mut back = alloc::vec![0u8; 2 * PAGE_SIZE];
            assert!(PhysMem::read(&*ram, ram.ipa_to_pa(page).unwrap(), &mut back));
            assert!(back == pattern, "every byte as it was");
            assert!(t.faults().is_empty(), "{:?}", t.faults());
        }
    }

    /// Short copies (done inline, two overlapping words) and multi-part writes (one bound
    /// check for all parts) land exactly the bytes asked, and refuse, writing nothing past the
    /// share, what does not fit or a read-only span.
    #[test]
    fn short_copies_and_part_writes_stay_in_bounds() {
        let (ram, mut t) = table(Stage2::Identity);
        let page = BASE + 0x8000;
        let h = share(&ram, &mut t, page, 1, PERM_RW);
        let pa = ram.ipa_to_pa(page).unwrap();
        let pattern: Vec<u8> = (1..=40u8).collect();
        for n in 0..=40usize {
            for off in [0usize, 3, PAGE_SIZE - n] {
                assert!(PhysMem::write(&*ram, pa, &[0u8; PAGE_SIZE]));
                let ok = t.with_mapped(h, PAGE_SIZE, true, "buffer", |m| m.write(off, &pattern[..n]));
                assert_eq!(ok, Some(true), "{n} bytes at {off}");
                let mut back = alloc::vec![0u8; PAGE_SIZE];
                assert!(PhysMem::read(&*ram, pa, &mut back));
                assert_eq!(&back[off..off + n], &pattern[..n], "{n} bytes at {off}");
                assert!(back[..off].iter().chain(&back[off + n..]).all(|&b| b == 0), "only those bytes");
                let mut out = alloc::vec![0u8; n];
                assert_eq!(t.with_mapped(h, PAGE_SIZE, false, "buffer", |m| m.read(off, &mut out)), Some(true));
                assert_eq!(out, &pattern[..n]);
                // One byte more does not fit at the end of the page.
                if off == PAGE_SIZE - n {
                    let mut long = alloc::vec![0u8; n + 1];
                    assert_eq!(t.with_mapped(h, PAGE_SIZE, false, "buffer", |m| m.read(off, &mut long)), Some(false));
                }
            }
        }
        // Parts: header fields around a gap, then a payload; the gap keeps its bytes.
        assert!(PhysMem::write(&*ram, pa, &[0xee; 64]));
        let ok = t.with_mapped(h, 64, true, "rx buffer", |m| m.write_parts([(0, &pattern[..10]), (12, &pattern[12..16]), (16, &pattern[16..32])]));
        assert_eq!(ok, Some(true));
        let mut back = [0u8; 34];
        assert!(PhysMem::read(&*ram, pa, &mut back));
        assert_eq!(&back[..10], &pattern[..10]);
        assert_eq!(&back[10..12], &[0xee, 0xee], "the gap is left as it was");
        assert_eq!(&back[12..32], &pattern[12..32]);
        assert_eq!(&back[32..], &[0xee, 0xee]);
        // A part past the mapped bytes refuses (the parts before it are written, as separate
        // writes would be; nothing lands past the span).
        let ok = t.with_mapped(h, 64, true, "rx buffer", |m| m.write_parts([(0, &[1u8; 4][..]), (60, &[2u8; 8][..])]));
        assert_eq!(ok, Some(false));
        let mut tail = [0u8; 8];
        assert!(PhysMem::read(&*ram, pa + 60, &mut tail));
        assert_eq!(tail, [0xee, 0xee, 0xee, 0xee, 0, 0, 0, 0], "nothing of the refused part, in or past the span");
        let ok = t.with_mapped(h, 64, true, "rx buffer", |m| m.write_parts([(usize::MAX, &[1u8; 2][..])]));
        assert_eq!(ok, Some(false), "an offset that overflows is refused");
        // Read-only: nothing written.
        let ro = share(&ram, &mut t, page, 1, PERM_RO);
        let ok = t.with_mapped(ro, 64, false, "read-only", |m| m.write_parts([(0, &[9u8; 16][..])]));
        assert_eq!(ok, Some(false));
        assert!(PhysMem::read(&*ram, pa, &mut back));
        assert_eq!(&back[..4], &[1, 1, 1, 1]);
        assert!(t.faults().is_empty(), "{:?}", t.faults());
    }

    /// Handles that meet in one bucket of the look-up cache each reach their own share, and a
    /// reclaimed one faults though its bucket points at a live share.
    #[test]
    fn shares_sharing_a_lookup_bucket_stay_apart() {
        let (ram, mut t) = table(Stage2::Identity);
        let a = share(&ram, &mut t, BASE + 0x3000, 1, PERM_RW);
        let others: Vec<u64> = (0..RECENT_BUCKETS - 1).map(|_| share(&ram, &mut t, BASE + 0x4000, 1, PERM_RO)).collect();
        let b = share(&ram, &mut t, BASE + 0x5000, 2, PERM_RO);
        assert_eq!(ShareMap::bucket(a), ShareMap::bucket(b), "the test needs a collision");
        for _ in 0..2 {
            let m = t.map(b, 2 * PAGE_SIZE, false, "b").expect("b has two pages");
            t.unmap(m);
            let m = t.map(a, PAGE_SIZE, true, "a").expect("a is writable");
            t.unmap(m);
            assert!(t.faults().is_empty(), "{:?}", t.faults());
            assert!(t.map(a, 2 * PAGE_SIZE, false, "a is one page").is_none());
            assert!(t.map(b, PAGE_SIZE, true, "b is read-only").is_none());
            assert_eq!(t.faults().len(), 2);
            t.faults.clear();
        }
        assert_eq!(t.mem_reclaim(a), Ok(()));
        let m = t.map(b, PAGE_SIZE, false, "b").expect("b still maps");
        t.unmap(m);
        assert!(t.map(a, PAGE_SIZE, false, "a after reclaim").is_none());
        assert!(t.faults()[0].what.contains("never shared"), "{:?}", t.faults());
        // The freed slot goes to the next share; `a` still reaches nothing.
        let c = share(&ram, &mut t, BASE + 0x6000, 1, PERM_RW);
        assert!(t.map(c, PAGE_SIZE, true, "c").is_some());
        assert!(t.map(a, PAGE_SIZE, false, "a after reuse").is_none());
        assert_eq!(t.faults().len(), 2);
        assert_eq!(t.live(), others.len() + 2);
    }

    /// Foreign pages (a client's memfd attached to guest RAM) may be detached while shared, so
    /// their mappings never take the direct path: after the detach an access fails instead of
    /// touching freed memory.
    #[test]
    fn a_mapping_of_foreign_pages_fails_once_they_are_detached() {
        let (ram, mut t) = table(Stage2::Identity);
        let layout = std::alloc::Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        struct Keep(*mut u8, std::alloc::Layout);
        // SAFETY: test memory, freed only by this guard after the detach.
        unsafe impl Send for Keep {}
        // SAFETY: as above.
        unsafe impl Sync for Keep {}
        impl Drop for Keep {
            fn drop(&mut self) {
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(self.0, self.1) };
            }
        }
        let ptr = core::ptr::NonNull::new(mem).unwrap();
        // SAFETY: one page, page-aligned, freed only by `Keep` after detaching.
        let pages = unsafe { ram.attach_foreign(ptr, 1, alloc::boxed::Box::new(Keep(mem, layout))) }.unwrap();
        let h = share(&ram, &mut t, pages.ipa(), 1, PERM_RW);
        let m = t.map(h, PAGE_SIZE, true, "foreign page").expect("maps");
        assert!(m.write(0, b"memfd"));
        // SAFETY: the test's own page, still attached.
        assert_eq!(unsafe { core::slice::from_raw_parts(mem, 5) }, b"memfd");
        drop(pages);
        assert!(!m.write(0, b"gone"), "detached pages are not reachable");
        assert!(!m.read(0, &mut [0u8; 4]));
        assert_eq!(RingMemory::read_u32(&m, 0), 0);
        t.unmap(m);
    }
}
