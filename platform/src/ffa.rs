//! FF-A memory sharing, the API-5 mechanism: memory ids are FF-A handles (spec §3.3).
//!
//! The arm-ffa crate was considered; this module needs only the v1.0 memory-transaction
//! descriptor and five calls, and must run over our own [`Conduit`] (a model on the host, a
//! mediator in a DomU), so the descriptor is encoded here with zerocopy.

use alloc::sync::Arc;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::mem::{Access, DmaRegion, MemoryId, PageAllocator, PhysRange, Sharer};
use crate::smc::Conduit;
use crate::Error;

/// FF-A function ids (spec §2.2, §11).
pub mod func {
    /// FFA_ERROR: the call failed; w2 holds an [`err`](super::err) code.
    pub const ERROR: u32 = 0x8400_0060;
    /// FFA_SUCCESS (SMC32).
    pub const SUCCESS: u32 = 0x8400_0061;
    /// FFA_SUCCESS (SMC64).
    pub const SUCCESS64: u32 = 0xC400_0061;
    /// FFA_INTERRUPT: the call was interrupted.
    pub const INTERRUPT: u32 = 0x8400_0062;
    /// FFA_VERSION.
    pub const VERSION: u32 = 0x8400_0063;
    /// FFA_FEATURES.
    pub const FEATURES: u32 = 0x8400_0064;
    /// FFA_RX_RELEASE: the caller is done with its RX buffer.
    pub const RX_RELEASE: u32 = 0x8400_0065;
    /// FFA_RXTX_MAP (SMC64): registers the caller's RX/TX buffer pair.
    pub const RXTX_MAP64: u32 = 0xC400_0066;
    /// FFA_RXTX_UNMAP.
    pub const RXTX_UNMAP: u32 = 0x8400_0067;
    /// FFA_PARTITION_INFO_GET.
    pub const PARTITION_INFO_GET: u32 = 0x8400_0068;
    /// FFA_ID_GET: the caller's own endpoint id.
    pub const ID_GET: u32 = 0x8400_0069;
    /// FFA_MSG_WAIT.
    pub const MSG_WAIT: u32 = 0x8400_006B;
    /// FFA_RUN.
    pub const RUN: u32 = 0x8400_006D;
    /// FFA_MSG_SEND_DIRECT_REQ (SMC32).
    pub const MSG_SEND_DIRECT_REQ: u32 = 0x8400_006F;
    /// FFA_MSG_SEND_DIRECT_RESP (SMC32).
    pub const MSG_SEND_DIRECT_RESP: u32 = 0x8400_0070;
    /// FFA_MEM_SHARE.
    pub const MEM_SHARE: u32 = 0x8400_0073;
    /// FFA_MEM_LEND.
    pub const MEM_LEND: u32 = 0x8400_0072;
    /// FFA_MEM_RETRIEVE_REQ.
    pub const MEM_RETRIEVE_REQ: u32 = 0x8400_0074;
    /// FFA_MEM_RECLAIM.
    pub const MEM_RECLAIM: u32 = 0x8400_0077;
    /// FFA_MEM_FRAG_RX.
    pub const MEM_FRAG_RX: u32 = 0x8400_007A;
    /// FFA_MEM_FRAG_TX.
    pub const MEM_FRAG_TX: u32 = 0x8400_007B;
}

/// FF-A error codes carried in w2 of FFA_ERROR.
pub mod err {
    /// The call or feature is not supported.
    pub const NOT_SUPPORTED: i32 = -1;
    /// An argument is invalid.
    pub const INVALID_PARAMETERS: i32 = -2;
    /// Out of memory.
    pub const NO_MEMORY: i32 = -3;
    /// The callee is busy; try again.
    pub const BUSY: i32 = -4;
    /// The call was interrupted.
    pub const INTERRUPTED: i32 = -5;
    /// The request was refused.
    pub const DENIED: i32 = -6;
    /// Retry the call.
    pub const RETRY: i32 = -7;
    /// The operation was aborted.
    pub const ABORTED: i32 = -8;
}

/// Whether `fid` is an FF-A call: a fast SMC32/SMC64 call of the standard-service entity with a
/// function number from 0x60 (PSCI and SMCCC share the entity with lower numbers).
pub const fn is_ffa_call(fid: u32) -> bool {
    fid & 0xBF00_0000 == 0x8400_0000 && fid & 0xFFFF >= 0x60 && fid & 0xFFFF <= 0xFF
}

/// FF-A version 1.0, the one Trusty speaks (major must be 1).
pub const VERSION_1_0: u32 = 0x1_0000;
/// Trusty's FF-A endpoint id when it is not discovered (spec §3.3).
pub const TRUSTY_ENDPOINT_ID: u16 = 0x8000;
/// Memory attributes: normal memory, write-back, inner shareable (spec §3.3).
pub const ATTR_NORMAL_WB_INNER_SHAREABLE: u8 = 0x2F;
/// Access permission byte of an endpoint memory-access descriptor.
pub const PERM_RO: u8 = 1;
/// Access permission: read-write.
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
    /// The sending endpoint's id.
    pub sender: u16,
    /// The receiving endpoint's id (one receiver).
    pub receiver: u16,
    /// Memory region attributes (e.g. [`ATTR_NORMAL_WB_INNER_SHAREABLE`]).
    pub attributes: u8,
    /// The receiver's access permissions ([`PERM_RO`] or [`PERM_RW`]).
    pub permissions: u8,
    /// The sender's tag for the transaction.
    pub tag: u64,
    /// The address ranges described.
    pub ranges: R,
}

/// Bytes needed to describe `ranges` ranges.
pub const fn descriptor_len(ranges: usize) -> usize {
    RANGES_OFFSET + RANGE_LEN * ranges
}

/// Writes the descriptor for `tx` into `out`; returns its length. Every bound is checked once
/// up front; nothing here can panic.
// Out of line: `FfaSharer::share` calls it from two places (into the TX buffer, or into a
// buffer for fragments); one copy serves both.
#[inline(never)]
pub fn encode_descriptor(tx: &MemTransaction<&[PhysRange]>, out: &mut [u8]) -> Result<usize, Error> {
    const TOO_SMALL: Error = Error::InvalidArgument("FF-A descriptor does not fit the TX buffer");
    let len = RANGE_LEN.checked_mul(tx.ranges.len()).and_then(|n| n.checked_add(RANGES_OFFSET)).ok_or(TOO_SMALL)?;
    let (head, ranges_out) = out.get_mut(..len).and_then(|d| d.split_first_chunk_mut::<RANGES_OFFSET>()).ok_or(TOO_SMALL)?;
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
    head[..HEADER_LEN].copy_from_slice(header.as_bytes());
    head[HEADER_LEN..COMPOSITE_OFFSET].copy_from_slice(emad.as_bytes());
    head[COMPOSITE_OFFSET..].copy_from_slice(composite.as_bytes());
    for (at, r) in ranges_out.chunks_exact_mut(RANGE_LEN).zip(tx.ranges) {
        at.copy_from_slice(AddressRange { address: r.addr.into(), pages: r.pages.into(), reserved: 0.into() }.as_bytes());
    }
    Ok(len)
}

/// Why a descriptor was refused by [`decode_descriptor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    /// Shorter than the header, the access descriptor and the composite descriptor.
    TooShort,
    /// Not exactly one endpoint access descriptor (the count found).
    EndpointCount(u32),
    /// The composite descriptor is not where this encoder puts it (the offset found).
    CompositeOffset(u32),
    /// More ranges than the descriptor's length holds (the count found).
    RangeCount(u32),
    /// The ranges' pages do not add up to the composite's total.
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

// One out-of-line copy: every FF-A call site shares it (the SMC dominates the call's cost).
#[inline(never)]
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
///
/// A descriptor larger than the TX buffer is sent in fragments when the sharer allows them
/// (spec §3.3; FF-A v1.0 FFA_MEM_FRAG_TX / FFA_MEM_FRAG_RX): FFA_MEM_SHARE carries the total
/// length in w1 and the first fragment's length in w2; the receiver answers FFA_MEM_FRAG_RX
/// with the handle (or a cookie) in w1/w2 and the bytes received so far in w3; the sender
/// writes the next fragment into the TX buffer and calls FFA_MEM_FRAG_TX(w1 = handle low,
/// w2 = handle high, w3 = fragment length, w4 = 0), until FFA_SUCCESS brings the handle in
/// w2/w3. Sources: Trusty's Linux driver (`trusty_transfer_memory` in drivers/trusty/trusty.c
/// and the register comments in include/linux/trusty/arm_ffa.h), Linux's
/// drivers/firmware/arm_ffa/driver.c (`ffa_mem_first_frag`, `ffa_mem_next_frag`) and Hafnium's
/// `api_ffa_mem_frag_tx`. w4 carries a sender id in bits 31..16 only when a *hypervisor* sends
/// on behalf of a VM; from an endpoint it must be zero ("Sender ID MBZ at virtual instance" in
/// Hafnium, which refuses anything else with INVALID_PARAMETERS; both Linux drivers pass 0).
/// Every fragment holds whole 16-byte address ranges, as Trusty's retriever requires.
///
/// Xen's FF-A mediator accepts only single-fragment descriptors (spec dma-decisions §4.3):
/// a sharer built with `allow_fragments = false` refuses a descriptor that does not fit the TX
/// buffer with [`Error::InvalidArgument`] instead of sending it.
pub struct FfaSharer {
    conduit: Arc<dyn Conduit>,
    own_id: u16,
    receiver: u16,
    /// The TX buffer (descriptors go here), mapped with FFA_RXTX_MAP until [`Sharer::close`].
    /// `None` once unmapped and freed.
    tx: Option<DmaRegion>,
    /// Mapped with the TX buffer (FFA_RXTX_MAP takes both); the producer writes answers such as
    /// partition information here.
    rx: Option<DmaRegion>,
    live: usize,
    budget: Option<usize>,
    allow_fragments: bool,
    /// Whether the peer takes read-only shares (see [`FfaSharer::set_read_only_shares`]).
    read_only_shares: bool,
}

impl FfaSharer {
    /// FF-A set-up (spec §3.3): version 1.x, MEM_SHARE supported, own id, RX/TX buffers mapped.
    /// The two buffer pages come from `allocator` and stay mapped for the sharer's lifetime.
    /// Descriptors larger than the TX buffer are sent in fragments; see
    /// [`FfaSharer::with_fragments`] to forbid that.
    pub fn new(
        conduit: Arc<dyn Conduit>,
        allocator: &mut dyn PageAllocator,
        budget: Option<usize>,
    ) -> Result<Self, Error> {
        Self::with_fragments(conduit, allocator, budget, true)
    }

    /// As [`FfaSharer::new`]; `allow_fragments = false` for a peer that takes only
    /// single-fragment descriptors (Xen's FF-A mediator).
    pub fn with_fragments(
        conduit: Arc<dyn Conduit>,
        allocator: &mut dyn PageAllocator,
        budget: Option<usize>,
        allow_fragments: bool,
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
        let Some(rx) = allocator.alloc_zeroed(1) else {
            // SAFETY: the page was never mapped or shared; nobody else has seen it.
            unsafe { allocator.free(tx) };
            return Err(Error::OutOfMemory);
        };
        let map = [u64::from(func::RXTX_MAP64), tx.paddr(), rx.paddr(), 1, 0, 0, 0, 0];
        let mut mapped = ffa_call(&*conduit, map, "FFA_RXTX_MAP");
        if let Err(Error::Ffa { code: err::DENIED, .. }) = mapped {
            // A pair is already registered for this endpoint (FF-A v1.0 §7.2: DENIED; Xen's
            // mediator: "Already mapped"). At this instance there is one normal-world endpoint,
            // us, so the pair is a stale one from an earlier run that never tore down (a guest
            // reboot, a crashed loader): unmap it and map ours once more.
            log::warn!("FF-A RX/TX pair already mapped (an earlier run did not tear down); unmapping it");
            let unmap = [u64::from(func::RXTX_UNMAP), 0, 0, 0, 0, 0, 0, 0];
            mapped = ffa_call(&*conduit, unmap, "FFA_RXTX_UNMAP").and_then(|_| ffa_call(&*conduit, map, "FFA_RXTX_MAP"));
        }
        if let Err(e) = mapped {
            // A refused FFA_RXTX_MAP maps nothing (FF-A v1.0 §7.2), so the pages are ours again.
            // SAFETY: the producer refused the pair; neither page was ever visible to it.
            unsafe {
                allocator.free(tx);
                allocator.free(rx);
            }
            return Err(e);
        }
        Ok(FfaSharer {
            conduit,
            own_id,
            receiver: TRUSTY_ENDPOINT_ID,
            tx: Some(tx),
            rx: Some(rx),
            live: 0,
            budget,
            allow_fragments,
            read_only_shares: true,
        })
    }

    /// Whether the RX/TX pair is still mapped (until [`Sharer::close`]).
    pub fn rxtx_mapped(&self) -> bool {
        self.tx.is_some()
    }

    /// The TX buffer, or why there is none.
    fn tx_buf(&self) -> Result<&DmaRegion, Error> {
        self.tx.as_ref().ok_or(Error::InvalidArgument("FF-A RX/TX buffers were unmapped (the sharer is closed)"))
    }

    /// Our FF-A endpoint id.
    pub fn own_id(&self) -> u16 {
        self.own_id
    }

    /// Copies the start of the RX buffer (e.g. FFA_PARTITION_INFO_GET's answer) into `out`.
    /// After [`Sharer::close`] there is no RX buffer and `out` is zeroed.
    pub fn read_rx(&self, out: &mut [u8]) {
        let Some(rx) = &self.rx else {
            out.fill(0);
            return;
        };
        let n = out.len().min(rx.len());
        // SAFETY: the RX page is owned by this sharer and `rx.len()` long; n <= that. The
        // producer wrote it before the call that returned; bytes are copied, not referenced.
        unsafe { core::ptr::copy_nonoverlapping(rx.vaddr().as_ptr(), out.as_mut_ptr(), n) };
    }

    /// Replaces the live-share budget (the plan is decided after FF-A was set up).
    pub fn with_budget(mut self, budget: Option<usize>) -> Self {
        self.budget = budget;
        self
    }

    /// Allows or forbids fragmented descriptors (Xen's FF-A mediator takes one fragment only).
    pub fn set_fragments(&mut self, allow: bool) {
        self.allow_fragments = allow;
    }

    /// Allows read-only shares (the default), or refuses them here, before the peer does, for
    /// a peer that takes none: Xen's FF-A mediator answers NOT_SUPPORTED to any access but
    /// read-write (`ffa_handle_mem_share()` in xen/arch/arm/tee/ffa_shm.c). The stack's own
    /// buffers are then shared read-write ([`crate::mem::SharedMemory::alloc_shared`] asks
    /// [`Sharer::takes_read_only`]).
    pub fn set_read_only_shares(&mut self, allow: bool) {
        self.read_only_shares = allow;
    }

    /// Whether descriptors larger than the TX buffer are sent in fragments.
    pub fn allows_fragments(&self) -> bool {
        self.allow_fragments
    }

    /// Copies `bytes` to the start of the TX buffer.
    fn write_tx(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let tx = self.tx_buf()?;
        if bytes.len() > tx.len() {
            return Err(Error::InvalidArgument("FF-A descriptor fragment larger than the TX buffer"));
        }
        // SAFETY: the TX buffer is owned by this sharer and `tx.len()` bytes long; `bytes` fits
        // (checked above) and is a separate allocation.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), tx.vaddr().as_ptr(), bytes.len()) };
        Ok(())
    }

    /// Sends `desc` fragment by fragment (see the type's docs); returns the handle.
    fn share_fragmented(&mut self, desc: &[u8], first_len: usize, next_max: usize) -> Result<u64, Error> {
        let total = desc.len();
        self.write_tx(&desc[..first_len])?;
        let regs = [u64::from(func::MEM_SHARE), total as u64, first_len as u64, 0, 0, 0, 0, 0];
        let mut out = self.conduit.call(regs);
        let mut sent = first_len;
        let mut call = "FFA_MEM_SHARE";
        // The handle (or cookie) of the transaction under way, once the peer has named it.
        let mut cookie = None;
        let error = loop {
            match out[0] as u32 {
                func::MEM_FRAG_RX => {
                    let (handle, offset) = (MemoryId::from_parts(out[1] as u32, out[2] as u32), out[3] as u32 as usize);
                    cookie = Some(handle);
                    if sent >= total || offset != sent {
                        log::warn!("FF-A {call}: FFA_MEM_FRAG_RX asks for offset {offset}, {sent} of {total} sent");
                        break Error::Ffa { call, code: err::INVALID_PARAMETERS };
                    }
                    let len = next_max.min(total - sent);
                    if let Err(e) = self.write_tx(&desc[sent..sent + len]) {
                        break e;
                    }
                    let (lo, hi) = (u64::from(handle.lo()), u64::from(handle.hi()));
                    out = self.conduit.call([u64::from(func::MEM_FRAG_TX), lo, hi, len as u64, 0, 0, 0, 0]);
                    sent += len;
                    call = "FFA_MEM_FRAG_TX";
                }
                func::SUCCESS | func::SUCCESS64 => {
                    let handle = MemoryId::from_parts(out[2] as u32, out[3] as u32);
                    if sent == total {
                        return Ok(handle.0);
                    }
                    log::warn!("FF-A {call}: FFA_SUCCESS after {sent} of {total} descriptor bytes");
                    cookie = Some(handle);
                    break Error::Ffa { call, code: err::INVALID_PARAMETERS };
                }
                func::ERROR => break Error::Ffa { call, code: out[2] as u32 as i32 },
                other => {
                    log::warn!("FF-A {call}: unexpected answer {other:#x}");
                    break Error::Ffa { call, code: err::NOT_SUPPORTED };
                }
            }
        };
        if let Some(handle) = cookie {
            self.abort_fragmented(handle);
        }
        Err(error)
    }

    /// Best effort after a fragmented share went wrong: take back whatever the peer holds
    /// under `handle`, so that no transaction is left behind for memory about to be freed.
    fn abort_fragmented(&self, handle: MemoryId) {
        let regs = [u64::from(func::MEM_RECLAIM), u64::from(handle.lo()), u64::from(handle.hi()), 0, 0, 0, 0, 0];
        if let Err(e) = ffa_call(&*self.conduit, regs, "FFA_MEM_RECLAIM") {
            log::warn!("abandoning fragmented share {handle}: {e}");
        }
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
                Access::ReadOnly if !self.read_only_shares => {
                    return Err(Error::InvalidArgument(
                        "this peer takes read-write shares only (Xen's FF-A mediator); a read-only \
                         buffer cannot be shared read-only here",
                    ))
                }
                Access::ReadOnly => PERM_RO,
                Access::ReadWrite => PERM_RW,
            },
            tag: 0,
            ranges,
        };
        let len = descriptor_len(ranges.len());
        if u32::try_from(len).is_err() {
            return Err(Error::InvalidArgument("too many ranges for one FF-A descriptor"));
        }
        let tx_buf = self.tx_buf()?;
        let tx_len = tx_buf.len();
        let handle = if len <= tx_len {
            // The descriptor is written straight into the TX buffer: no copy, no allocation.
            // SAFETY: the TX page is owned by this sharer and `tx_len` bytes long; the producer
            // reads it only during the FFA_MEM_SHARE below, after this borrow ends.
            let out = unsafe { core::slice::from_raw_parts_mut(tx_buf.vaddr().as_ptr(), tx_len) };
            encode_descriptor(&tx, out)?;
            let regs = [u64::from(func::MEM_SHARE), len as u64, len as u64, 0, 0, 0, 0, 0];
            let out = ffa_call(&*self.conduit, regs, "FFA_MEM_SHARE")?;
            MemoryId::from_parts(out[2] as u32, out[3] as u32)
        } else if !self.allow_fragments {
            return Err(Error::InvalidArgument(
                "FF-A descriptor does not fit one TX buffer and this peer takes only single-fragment \
                 descriptors (Xen's FF-A mediator); share fewer ranges",
            ));
        } else {
            let mut desc = alloc::vec![0u8; len];
            encode_descriptor(&tx, &mut desc)?;
            // Fragments end on whole address ranges: the first holds the header and as many
            // ranges as fit, each later one as many ranges as fit.
            let first_len = RANGES_OFFSET + (tx_len - RANGES_OFFSET) / RANGE_LEN * RANGE_LEN;
            let next_max = tx_len / RANGE_LEN * RANGE_LEN;
            MemoryId(self.share_fragmented(&desc, first_len, next_max)?)
        };
        self.live += 1;
        Ok(handle)
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

    fn takes_read_only(&self) -> bool {
        self.read_only_shares
    }

    fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// FFA_RXTX_UNMAP, then the two pages go back to `allocator`, as Linux's arm_ffa driver
    /// tears down (`ffa_rxtx_unmap()` then `free_pages_exact()` in drivers/firmware/arm_ffa/
    /// driver.c). w1 is 0: the endpoint-id field is only for a hypervisor unmapping on behalf of
    /// a VM (current Linux passes 0; Xen's mediator puts the VM's id there when it forwards).
    /// If the producer refuses, the pair is still mapped, so the pages are kept (leaked), never
    /// freed, and the error is returned; a later `close` tries again.
    fn close(&mut self, allocator: &mut dyn PageAllocator) -> Result<(), Error> {
        if self.tx.is_none() {
            return Ok(());
        }
        if self.live > 0 {
            log::warn!("FF-A RX/TX buffers unmapped while {} share(s) are live", self.live);
        }
        let regs = [u64::from(func::RXTX_UNMAP), 0, 0, 0, 0, 0, 0, 0];
        if let Err(e) = ffa_call(&*self.conduit, regs, "FFA_RXTX_UNMAP") {
            log::warn!("keeping the FF-A RX/TX pages: {e}");
            return Err(e);
        }
        for region in [self.tx.take(), self.rx.take()].into_iter().flatten() {
            // SAFETY: the producer unmapped the pair (FFA_RXTX_UNMAP succeeded) and this sharer
            // owned both pages; nothing else refers to them.
            unsafe { allocator.free(region) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::mem::PAGE_SIZE;
    use alloc::vec::Vec;
    use core::alloc::Layout;
    use core::ptr::NonNull;
    use std::sync::Mutex;

    /// Page-aligned heap pages whose "physical" address is their address.
    struct HeapPages;

    impl PageAllocator for HeapPages {
        fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
            let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
            // SAFETY: the layout has a non-zero size.
            let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
            // SAFETY: `p` points to `pages` fresh pages, owned by the region until `free`.
            Some(unsafe { DmaRegion::new(p, p.as_ptr() as u64, pages) })
        }
        unsafe fn free(&mut self, region: DmaRegion) {
            let layout = Layout::from_size_align(region.len(), PAGE_SIZE).unwrap();
            // SAFETY: the region came from `alloc_zeroed` with this layout (the caller's contract).
            unsafe { alloc::alloc::dealloc(region.vaddr().as_ptr(), layout) };
        }
    }

    /// How the fake receiver misbehaves, if at all.
    #[derive(Clone, Copy, PartialEq)]
    enum Quirk {
        None,
        /// Answers the first FFA_MEM_FRAG_TX with FFA_MEM_FRAG_RX at a wrong offset.
        WrongOffset,
        /// Answers the first FFA_MEM_FRAG_TX with FFA_ERROR(NO_MEMORY).
        FailFragTx,
        /// Refuses FFA_RXTX_UNMAP.
        RefuseUnmap,
    }

    const COOKIE: u64 = 0x1234_5678_9ABC_DEF0;
    const HANDLE: u64 = 0x0000_0042_0000_0007;

    #[derive(Default)]
    struct State {
        tx: u64,
        total: usize,
        received: Vec<u8>,
        fragments: Vec<usize>,
        calls: Vec<[u64; 8]>,
        decoded: Option<MemTransaction<Vec<PhysRange>>>,
    }

    /// An FF-A receiver that reassembles fragmented descriptors from the TX buffer.
    struct Reassembler {
        quirk: Quirk,
        state: Mutex<State>,
    }

    impl Reassembler {
        fn new(quirk: Quirk) -> Arc<Self> {
            Arc::new(Reassembler { quirk, state: Mutex::new(State::default()) })
        }

        fn take_fragment(st: &mut State, len: usize) {
            let mut buf = alloc::vec![0u8; len];
            // SAFETY: `tx` is the TX page the sharer mapped (HeapPages: address == pointer), alive
            // as long as the sharer; `len` <= PAGE_SIZE was checked by the caller.
            unsafe { core::ptr::copy_nonoverlapping(st.tx as *const u8, buf.as_mut_ptr(), len) };
            st.received.extend_from_slice(&buf);
            st.fragments.push(len);
        }

        fn answer(st: &mut State) -> [u64; 8] {
            if st.received.len() < st.total {
                let off = st.received.len() as u64;
                return [u64::from(func::MEM_FRAG_RX), COOKIE & 0xFFFF_FFFF, COOKIE >> 32, off, 0, 0, 0, 0];
            }
            st.decoded = Some(decode_descriptor(&st.received, 4096).expect("reassembled descriptor decodes"));
            [u64::from(func::SUCCESS), 0, HANDLE & 0xFFFF_FFFF, HANDLE >> 32, 0, 0, 0, 0]
        }
    }

    impl Conduit for Reassembler {
        fn call(&self, regs: [u64; 8]) -> [u64; 8] {
            let mut st = self.state.lock().unwrap();
            st.calls.push(regs);
            let ok = [u64::from(func::SUCCESS), 0, 0, 0, 0, 0, 0, 0];
            let error = |code: i32| [u64::from(func::ERROR), 0, code as u32 as u64, 0, 0, 0, 0, 0];
            match regs[0] as u32 {
                func::VERSION => [u64::from(VERSION_1_0), 0, 0, 0, 0, 0, 0, 0],
                func::FEATURES | func::MEM_RECLAIM => ok,
                func::ID_GET => [u64::from(func::SUCCESS), 0, 5, 0, 0, 0, 0, 0],
                func::RXTX_MAP64 if st.tx != 0 => error(err::DENIED),
                func::RXTX_MAP64 => {
                    st.tx = regs[1];
                    ok
                }
                func::RXTX_UNMAP if self.quirk == Quirk::RefuseUnmap || st.tx == 0 => error(err::INVALID_PARAMETERS),
                func::RXTX_UNMAP => {
                    st.tx = 0;
                    ok
                }
                func::MEM_SHARE => {
                    let (total, frag) = (regs[1] as usize, regs[2] as usize);
                    if frag > PAGE_SIZE || frag > total || regs[3] != 0 || regs[4] != 0 {
                        return error(err::INVALID_PARAMETERS);
                    }
                    st.total = total;
                    st.received.clear();
                    Self::take_fragment(&mut st, frag);
                    Self::answer(&mut st)
                }
                func::MEM_FRAG_TX => {
                    let cookie = regs[1] | (regs[2] << 32);
                    let len = regs[3] as usize;
                    // Endpoints pass 0 in w4; whole 16-byte ranges per fragment.
                    if cookie != COOKIE || regs[4] != 0 || len > PAGE_SIZE || len & 15 != 0 {
                        return error(err::INVALID_PARAMETERS);
                    }
                    if st.fragments.len() == 1 && self.quirk == Quirk::FailFragTx {
                        return error(err::NO_MEMORY);
                    }
                    Self::take_fragment(&mut st, len);
                    if st.fragments.len() == 2 && self.quirk == Quirk::WrongOffset {
                        return [u64::from(func::MEM_FRAG_RX), COOKIE & 0xFFFF_FFFF, COOKIE >> 32, 16, 0, 0, 0, 0];
                    }
                    Self::answer(&mut st)
                }
                _ => error(err::NOT_SUPPORTED),
            }
        }
    }

    /// `n` ranges of one page each, none adjacent.
    fn scattered(n: usize) -> Vec<PhysRange> {
        (0..n).map(|i| PhysRange { addr: 0x4000_0000 + i as u64 * 0x2000, pages: 1 }).collect()
    }

    fn calls_of(fake: &Reassembler, fid: u32) -> Vec<[u64; 8]> {
        fake.state.lock().unwrap().calls.iter().filter(|r| r[0] as u32 == fid).copied().collect()
    }

    #[test]
    fn large_descriptors_go_in_fragments() {
        let fake = Reassembler::new(Quirk::None);
        let mut sharer = FfaSharer::new(fake.clone(), &mut HeapPages, None).unwrap();
        assert!(sharer.allows_fragments());
        let ranges = scattered(600); // 64 + 600 * 16 = 9664 bytes
        let id = sharer.share(&ranges, Access::ReadOnly).unwrap();
        assert_eq!(id, MemoryId(HANDLE));
        assert_eq!(sharer.live_shares(), 1);
        {
            let st = fake.state.lock().unwrap();
            assert_eq!(st.fragments, [4096, 4096, 1472]);
            let desc = st.decoded.as_ref().unwrap();
            assert_eq!(desc.ranges, ranges);
            assert_eq!((desc.sender, desc.receiver, desc.permissions), (5, TRUSTY_ENDPOINT_ID, PERM_RO));
        }
        let share = calls_of(&fake, func::MEM_SHARE);
        assert_eq!((share[0][1], share[0][2]), (9664, 4096)); // w1 total, w2 first fragment
        let frag_tx = calls_of(&fake, func::MEM_FRAG_TX);
        assert_eq!(frag_tx.len(), 2);
        assert_eq!((frag_tx[1][1], frag_tx[1][2], frag_tx[1][3]), (COOKIE & 0xFFFF_FFFF, COOKIE >> 32, 1472));
        // A descriptor that fits one page still goes in one piece.
        sharer.share(&scattered(252), Access::ReadWrite).unwrap();
        let share = calls_of(&fake, func::MEM_SHARE);
        assert_eq!((share[1][1], share[1][2]), (4096, 4096));
        assert_eq!(calls_of(&fake, func::MEM_FRAG_TX).len(), 2);
        sharer.reclaim(id).unwrap();
        assert_eq!(sharer.live_shares(), 1);
    }

    #[test]
    fn single_fragment_peers_refuse_large_descriptors() {
        let fake = Reassembler::new(Quirk::None);
        let mut sharer = FfaSharer::with_fragments(fake.clone(), &mut HeapPages, None, false).unwrap();
        assert!(!sharer.allows_fragments());
        match sharer.share(&scattered(253), Access::ReadWrite) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("single-fragment")),
            other => panic!("{other:?}"),
        }
        assert!(calls_of(&fake, func::MEM_SHARE).is_empty());
        assert_eq!(sharer.live_shares(), 0);
        assert_eq!(sharer.share(&scattered(252), Access::ReadWrite), Ok(MemoryId(HANDLE)));
    }

    #[test]
    fn broken_fragment_exchanges_fail_and_abort() {
        for (quirk, code) in [(Quirk::WrongOffset, err::INVALID_PARAMETERS), (Quirk::FailFragTx, err::NO_MEMORY)] {
            let fake = Reassembler::new(quirk);
            let mut sharer = FfaSharer::new(fake.clone(), &mut HeapPages, None).unwrap();
            assert_eq!(
                sharer.share(&scattered(600), Access::ReadWrite),
                Err(Error::Ffa { call: "FFA_MEM_FRAG_TX", code })
            );
            assert_eq!(sharer.live_shares(), 0);
            // The transaction under way is abandoned with a reclaim of its cookie.
            let reclaim = calls_of(&fake, func::MEM_RECLAIM);
            assert_eq!(reclaim.len(), 1);
            assert_eq!(reclaim[0][1] | (reclaim[0][2] << 32), COOKIE);
        }
    }

    /// HeapPages that counts the pages it has handed out and not yet taken back.
    struct Counted(usize);

    impl PageAllocator for Counted {
        fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
            self.0 += pages;
            HeapPages.alloc_zeroed(pages)
        }
        unsafe fn free(&mut self, region: DmaRegion) {
            self.0 -= region.pages();
            // SAFETY: forwarded with the caller's guarantee; the region came from HeapPages.
            unsafe { HeapPages.free(region) };
        }
    }

    #[test]
    fn close_unmaps_the_rxtx_pair_then_frees_it() {
        let fake = Reassembler::new(Quirk::None);
        let mut pages = Counted(0);
        let mut sharer = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        assert_eq!(pages.0, 2);
        assert!(sharer.rxtx_mapped());
        sharer.close(&mut pages).unwrap();
        assert_eq!(pages.0, 0, "both pages freed");
        assert!(!sharer.rxtx_mapped());
        let unmap = calls_of(&fake, func::RXTX_UNMAP);
        assert_eq!(unmap.len(), 1);
        assert_eq!(unmap[0][1], 0, "w1 (endpoint id) is 0 from an endpoint");
        // Idempotent, and a closed sharer refuses to share (it has no TX buffer).
        sharer.close(&mut pages).unwrap();
        assert_eq!(calls_of(&fake, func::RXTX_UNMAP).len(), 1);
        assert!(matches!(sharer.share(&scattered(1), Access::ReadOnly), Err(Error::InvalidArgument(_))));
        let mut out = [0xAAu8; 8];
        sharer.read_rx(&mut out);
        assert_eq!(out, [0; 8]);
        // The pair can be mapped again by a new sharer.
        let mut again = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        again.close(&mut pages).unwrap();
        assert_eq!(pages.0, 0);
    }

    #[test]
    fn a_refused_unmap_keeps_the_pages() {
        let fake = Reassembler::new(Quirk::RefuseUnmap);
        let mut pages = Counted(0);
        let mut sharer = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        assert_eq!(sharer.close(&mut pages), Err(Error::Ffa { call: "FFA_RXTX_UNMAP", code: err::INVALID_PARAMETERS }));
        assert_eq!(pages.0, 2, "still mapped, so never freed");
        assert!(sharer.rxtx_mapped());
    }

    #[test]
    fn a_stale_pair_is_unmapped_and_mapped_again() {
        let fake = Reassembler::new(Quirk::None);
        let mut pages = Counted(0);
        let first = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        core::mem::forget(first); // a run that never tore down
        let mut second = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        assert_eq!(calls_of(&fake, func::RXTX_MAP64).len(), 3, "map, DENIED, map again");
        assert_eq!(calls_of(&fake, func::RXTX_UNMAP).len(), 1);
        second.close(&mut pages).unwrap();
        assert_eq!(pages.0, 2, "only the forgotten run's pages remain");
    }

    #[test]
    fn a_refused_map_frees_the_pages() {
        let fake = Reassembler::new(Quirk::RefuseUnmap);
        let mut pages = Counted(0);
        let first = FfaSharer::new(fake.clone(), &mut pages, None).unwrap();
        core::mem::forget(first);
        // DENIED, and the stale pair cannot be unmapped: the new pages go back at once.
        assert_eq!(
            FfaSharer::new(fake.clone(), &mut pages, None).err(),
            Some(Error::Ffa { call: "FFA_RXTX_UNMAP", code: err::INVALID_PARAMETERS })
        );
        assert_eq!(pages.0, 2);
    }

    #[test]
    fn ffa_calls_are_told_from_psci_and_trusty_calls() {
        for f in [func::VERSION, func::MEM_SHARE, func::RXTX_MAP64, func::MSG_SEND_DIRECT_REQ, func::SUCCESS64] {
            assert!(is_ffa_call(f), "{f:#x}");
        }
        // PSCI and SMCCC share the standard-service entity; Trusty's calls are another entity.
        for f in [0x8400_0000, 0x8400_0009, 0x8400_000A, 0x8000_0000, 0xBC00_000B, 0x3200_0014, 0x8400_0100] {
            assert!(!is_ffa_call(f), "{f:#x}");
        }
    }

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
