//! Split virtqueues in the legacy layout Trusty uses (spec §5.3, §5.7), with both ends:
//! [`DriverQueue`] for the normal world and [`DeviceQueue`] for a secure-side implementation.
//!
//! virtio-drivers' `VirtQueue` is not used for the rings: it places whatever its static `Hal`
//! returns from `share()` into each descriptor, once per `add`, while Trusty needs the memory id
//! of a buffer that was shared once and stays shared, from a per-device sharer with a budget;
//! it also reads `used.len` as a byte count, where the normal-to-secure ring carries a status
//! (spec §6.7). What is shared with it is the layout arithmetic and the volatile-access style.
//!
//! The driver never reads back what it published: descriptors and the avail index live in a
//! trusted shadow, and everything the device writes (used index, used entries) is validated
//! before use, so a hostile device can make a queue report errors but never panic it.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU16, Ordering};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: indirect table (Trusty does not support it).
pub const DESC_F_INDIRECT: u16 = 4;
/// `used.flags` bit by which the device says "do not kick me" (spec §4).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Volatile access to the memory of one ring. Offsets come from a validated [`Layout`], so
/// they are always in range; an implementation still never touches memory outside `len()`.
pub trait RingMemory {
    /// Length of the ring's memory in bytes.
    fn len(&self) -> usize;
    /// No memory.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads the little-endian u16 at byte `off`.
    fn read_u16(&self, off: usize) -> u16;
    /// Writes `v` as a little-endian u16 at byte `off`.
    fn write_u16(&self, off: usize, v: u16);
    /// Reads the little-endian u32 at byte `off`.
    fn read_u32(&self, off: usize) -> u32;
    /// Writes `v` as a little-endian u32 at byte `off`.
    fn write_u32(&self, off: usize, v: u32);
    /// Reads the little-endian u64 at byte `off`.
    fn read_u64(&self, off: usize) -> u64;
    /// Writes `v` as a little-endian u64 at byte `off`.
    fn write_u64(&self, off: usize, v: u64);

    /// Reads the index word at `off` with acquire ordering: whatever the peer wrote before it
    /// published this word (a release store, or a write barrier then the store) is visible to
    /// this side's later reads. Linux `virtio_rmb()` after reading `used.idx`
    /// (`virtqueue_get_buf_ctx_split()`), Trusty's read barrier after `avail.idx`.
    #[inline]
    fn read_u16_acquire(&self, off: usize) -> u16 {
        let v = self.read_u16(off);
        fence(Ordering::Acquire);
        v
    }

    /// Writes the index word at `off` with release ordering: every earlier write of this side
    /// (descriptors, ring slots, used entries) is visible before it. Linux `virtio_wmb()`
    /// before `avail->idx` (`virtqueue_add_split()`), Trusty's before `used.idx`.
    #[inline]
    fn write_u16_release(&self, off: usize, v: u16) {
        fence(Ordering::Release);
        self.write_u16(off, v);
    }

    /// A hint that the word at `off` is about to be read: its cache line is fetched now, so
    /// that several lines the peer wrote arrive together instead of one after the other.
    /// Changes nothing a reader sees; the default does nothing.
    #[inline]
    fn prefetch(&self, off: usize) {
        let _ = off;
    }

    /// A hint that the word at `off` is about to be written by this side: its cache line is
    /// fetched for ownership now, so that the stores need not wait for it when they come (a
    /// later barrier, or a store that publishes them, waits for every one before it). Changes
    /// nothing a reader sees; the default does nothing.
    #[inline]
    fn prefetch_for_write(&self, off: usize) {
        let _ = off;
    }

    /// [`RingMemory::write_u16_release`] that is also a store-load barrier: the store is
    /// ordered before every later [`RingMemory::read_u16_acquire`] of this side. That is the
    /// full barrier (Linux `virtio_mb()`) each end of a ring needs between publishing its own
    /// word and reading the other's, so that a driver publishing `avail.idx` and a device
    /// clearing `VRING_USED_F_NO_NOTIFY` cannot both read the other's old word (a lost kick).
    #[inline]
    fn write_u16_fenced(&self, off: usize, v: u16) {
        fence(Ordering::Release);
        self.write_u16(off, v);
        fence(Ordering::SeqCst);
    }

    // The same accesses at offsets the caller has checked once and for all ([`DriverQueue`]
    // checks its memory against its validated [`Layout`] when it is made). An implementation
    // may leave out its own bounds and alignment check; the defaults keep it.

    /// [`RingMemory::read_u16`] at a checked offset.
    /// # Safety
    /// `off + 2 <= self.len()` and `off` is even.
    #[inline]
    unsafe fn read_u16_unchecked(&self, off: usize) -> u16 {
        self.read_u16(off)
    }
    /// [`RingMemory::write_u16`] at a checked offset.
    /// # Safety
    /// As [`RingMemory::read_u16_unchecked`].
    #[inline]
    unsafe fn write_u16_unchecked(&self, off: usize, v: u16) {
        self.write_u16(off, v)
    }
    /// [`RingMemory::read_u32`] at a checked offset.
    /// # Safety
    /// `off + 4 <= self.len()` and `off` is a multiple of 4.
    #[inline]
    unsafe fn read_u32_unchecked(&self, off: usize) -> u32 {
        self.read_u32(off)
    }
    /// [`RingMemory::read_u64`] at a checked offset.
    /// # Safety
    /// `off + 8 <= self.len()` and `off` is a multiple of 8.
    #[inline]
    unsafe fn read_u64_unchecked(&self, off: usize) -> u64 {
        self.read_u64(off)
    }
    /// [`RingMemory::write_u64`] at a checked offset.
    /// # Safety
    /// As [`RingMemory::read_u64_unchecked`].
    #[inline]
    unsafe fn write_u64_unchecked(&self, off: usize, v: u64) {
        self.write_u64(off, v)
    }
    /// [`RingMemory::read_u16_acquire`] at a checked offset.
    /// # Safety
    /// As [`RingMemory::read_u16_unchecked`].
    #[inline]
    unsafe fn read_u16_acquire_unchecked(&self, off: usize) -> u16 {
        self.read_u16_acquire(off)
    }
    /// [`RingMemory::write_u16_release`] at a checked offset.
    /// # Safety
    /// As [`RingMemory::read_u16_unchecked`].
    #[inline]
    unsafe fn write_u16_release_unchecked(&self, off: usize, v: u16) {
        self.write_u16_release(off, v)
    }
    /// [`RingMemory::write_u16_fenced`] at a checked offset.
    /// # Safety
    /// As [`RingMemory::read_u16_unchecked`].
    #[inline]
    unsafe fn write_u16_fenced_unchecked(&self, off: usize, v: u16) {
        self.write_u16_fenced(off, v)
    }
}

/// A ring in memory this side reaches through a pointer (the normal world's own pages).
pub struct RawRing {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: RawRing is a handle on pages owned by the queue's owner; all access is volatile.
unsafe impl Send for RawRing {}

impl RawRing {
    /// # Safety
    /// `base` must be 8-byte aligned and point to `len` bytes that stay valid for the life of
    /// this value, shared only with the ring's peer.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        RawRing { base, len }
    }

    /// The index word at `off` as an atomic, if it is inside the ring and aligned.
    #[inline]
    fn atomic_u16(&self, off: usize) -> Option<&AtomicU16> {
        let p = self.ptr::<u16>(off)?;
        // SAFETY: `p` is in bounds and 2-aligned (checked by `ptr`) and stays valid as long as
        // `self` (the contract of `new`). The peer that writes the same word concurrently is
        // another agent (the secure world, another VM) outside this program's memory model:
        // as with the volatile accesses, what is relied on is the hardware's single-copy
        // atomicity of an aligned 16-bit access and the ordering of the instructions the
        // atomic operations compile to (x86: `xchg`, a full barrier; AArch64: `stlrh`/`ldarh`).
        Some(unsafe { AtomicU16::from_ptr(p) })
    }

    /// The `T` at `off`, unchecked.
    /// # Safety
    /// `off + size_of::<T>() <= self.len` and `off` is a multiple of `align_of::<T>()`.
    #[inline]
    unsafe fn at<T>(&self, off: usize) -> *mut T {
        debug_assert!(
            off.checked_add(core::mem::size_of::<T>()).is_some_and(|end| end <= self.len)
                && off % core::mem::align_of::<T>() == 0,
            "unchecked ring access out of layout"
        );
        // SAFETY: in bounds (the caller's contract), so the result stays inside the allocation.
        unsafe { self.base.as_ptr().add(off) }.cast()
    }

    /// [`RawRing::atomic_u16`] unchecked.
    /// # Safety
    /// As [`RawRing::at`] for a u16.
    #[inline]
    unsafe fn atomic_u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: in bounds and 2-aligned (the caller's contract, and `base` is 8-aligned); the
        // rest as in `atomic_u16`.
        unsafe { AtomicU16::from_ptr(self.at::<u16>(off)) }
    }

    #[inline]
    fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        let end = off.checked_add(core::mem::size_of::<T>())?;
        if end > self.len || off % core::mem::align_of::<T>() != 0 {
            debug_assert!(false, "ring access out of layout");
            return None;
        }
        // SAFETY: off + size_of::<T>() <= len, so the result stays inside the allocation.
        Some(unsafe { self.base.as_ptr().add(off) }.cast())
    }
}

macro_rules! raw_access {
    ($read:ident, $write:ident, $t:ty) => {
        #[inline]
        fn $read(&self, off: usize) -> $t {
            match self.ptr::<$t>(off) {
                // SAFETY: in bounds and aligned (checked by `ptr`); volatile because the peer
                // writes this memory concurrently.
                Some(p) => <$t>::from_le(unsafe { p.read_volatile() }),
                None => 0,
            }
        }
        #[inline]
        fn $write(&self, off: usize, v: $t) {
            if let Some(p) = self.ptr::<$t>(off) {
                // SAFETY: in bounds and aligned (checked by `ptr`).
                unsafe { p.write_volatile(v.to_le()) }
            }
        }
    };
    (unchecked $read:ident, $t:ty) => {
        #[inline]
        unsafe fn $read(&self, off: usize) -> $t {
            // SAFETY: in bounds and aligned (the caller's contract, `base` is 8-aligned);
            // volatile because the peer writes this memory concurrently.
            <$t>::from_le(unsafe { self.at::<$t>(off).read_volatile() })
        }
    };
    (unchecked $read:ident, $write:ident, $t:ty) => {
        raw_access!(unchecked $read, $t);
        #[inline]
        unsafe fn $write(&self, off: usize, v: $t) {
            // SAFETY: in bounds and aligned (the caller's contract, `base` is 8-aligned).
            unsafe { self.at::<$t>(off).write_volatile(v.to_le()) }
        }
    };
}

/// Asks the CPU to bring the cache line holding `p` close (a read hint: `prefetcht0` on
/// x86-64, `prfm pldl1keep` on AArch64, nothing elsewhere). A hint never faults and changes no
/// memory, whatever the address.
#[inline(always)]
pub fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it neither faults nor reads into the program,
    // so any address is fine; SSE (which the intrinsic requires) is part of x86-64.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above: `prfm` is a hint that never faults and writes nothing.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// Asks the CPU to bring the cache line holding `p` close for a write: the line is fetched for
/// ownership now, so that stores to it later need not wait for the other side's core to give it
/// up (`prfm pstl1keep` on AArch64; `prefetchw` on x86-64 where the CPU has it, else a read
/// prefetch; nothing elsewhere). A hint never faults and changes no memory, whatever the
/// address.
#[inline(always)]
pub fn prefetch_line_for_write(p: *const u8) {
    // (Not under Miri, which runs no inline assembly: there it is the empty hint.)
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        if x86_has_prefetchw() {
            // SAFETY: PREFETCHW (CPUID 8000_0001h ECX bit 8, checked above) only hints the
            // cache; it neither faults nor changes memory, so any address is fine.
            unsafe { core::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, readonly, preserves_flags)) };
        } else {
            prefetch_line(p);
        }
    }
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: `prfm` is a hint that never faults and writes nothing.
    unsafe {
        core::arch::asm!("prfm pstl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(any(miri, not(any(target_arch = "x86_64", target_arch = "aarch64"))))]
    let _ = p;
}

/// Whether this x86-64 CPU has PREFETCHW, asked once. (`_mm_prefetch` with `_MM_HINT_ET0`
/// emits no PREFETCHW unless the whole build targets the `prfchw` feature, which a generic
/// x86-64 build does not.)
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
fn x86_has_prefetchw() -> bool {
    // Both known answers are tested inline, so that a prefetch costs one load and two compares;
    // only the first asks the CPU.
    match X86_PREFETCHW.load(Ordering::Relaxed) {
        X86_PREFETCHW_YES => true,
        X86_PREFETCHW_NO => false,
        _ => x86_ask_prefetchw(),
    }
}

/// Whether the CPU has PREFETCHW: [`X86_PREFETCHW_YES`], [`X86_PREFETCHW_NO`], or 0 (not asked yet).
#[cfg(all(target_arch = "x86_64", not(miri)))]
static X86_PREFETCHW: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
#[cfg(all(target_arch = "x86_64", not(miri)))]
const X86_PREFETCHW_NO: u8 = 1;
#[cfg(all(target_arch = "x86_64", not(miri)))]
const X86_PREFETCHW_YES: u8 = 2;

/// Asks the CPU whether it has PREFETCHW (once; out of line, as it runs once).
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[cold]
#[inline(never)]
fn x86_ask_prefetchw() -> bool {
    // `__cpuid` is a safe function in newer Rust, unsafe in the rust-version (1.81).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU, and so does leaf 8000_0001h (it is where a CPU
    // says it has long mode at all).
    let leaf = unsafe { core::arch::x86_64::__cpuid(0x8000_0001) };
    let has = leaf.ecx & (1 << 8) != 0;
    X86_PREFETCHW.store(if has { X86_PREFETCHW_YES } else { X86_PREFETCHW_NO }, Ordering::Relaxed);
    has
}

impl RingMemory for RawRing {
    #[inline]
    fn len(&self) -> usize {
        self.len
    }
    // A hint never faults, whatever the address: no check.
    #[inline]
    fn prefetch(&self, off: usize) {
        prefetch_line(self.base.as_ptr().wrapping_add(off));
    }
    #[inline]
    fn prefetch_for_write(&self, off: usize) {
        prefetch_line_for_write(self.base.as_ptr().wrapping_add(off));
    }
    raw_access!(read_u16, write_u16, u16);
    raw_access!(read_u32, write_u32, u32);
    raw_access!(read_u64, write_u64, u64);
    raw_access!(unchecked read_u16_unchecked, write_u16_unchecked, u16);
    raw_access!(unchecked read_u32_unchecked, u32);
    raw_access!(unchecked read_u64_unchecked, write_u64_unchecked, u64);
    #[inline]
    unsafe fn read_u16_acquire_unchecked(&self, off: usize) -> u16 {
        // SAFETY: the caller's contract is `atomic_u16_at`'s.
        u16::from_le(unsafe { self.atomic_u16_at(off) }.load(Ordering::Acquire))
    }
    #[inline]
    unsafe fn write_u16_release_unchecked(&self, off: usize, v: u16) {
        // SAFETY: the caller's contract is `atomic_u16_at`'s.
        unsafe { self.atomic_u16_at(off) }.store(v.to_le(), Ordering::Release)
    }
    #[inline]
    unsafe fn write_u16_fenced_unchecked(&self, off: usize, v: u16) {
        // SAFETY: the caller's contract is `atomic_u16_at`'s.
        unsafe { self.atomic_u16_at(off) }.store(v.to_le(), Ordering::SeqCst)
    }

    // One ordered access instead of a plain access and a separate barrier: on AArch64 a
    // load-acquire (`ldarh`) instead of `ldrh` + `dmb ishld`, a store-release (`stlrh`)
    // instead of `dmb ish` + `strh`; on x86 (TSO) both are plain moves.
    #[inline]
    fn read_u16_acquire(&self, off: usize) -> u16 {
        self.atomic_u16(off).map_or(0, |a| u16::from_le(a.load(Ordering::Acquire)))
    }
    #[inline]
    fn write_u16_release(&self, off: usize, v: u16) {
        if let Some(a) = self.atomic_u16(off) {
            a.store(v.to_le(), Ordering::Release);
        }
    }
    // A sequentially consistent store: on AArch64 `stlrh`, which a later `ldarh` (every
    // `read_u16_acquire`) cannot pass (release-acquire is RCsc there), so no `dmb ish` is
    // needed; on x86 `xchg`, itself a full barrier (Linux `smp_store_mb()` on x86), where a
    // store followed by `mfence` costs more.
    #[inline]
    fn write_u16_fenced(&self, off: usize, v: u16) {
        if let Some(a) = self.atomic_u16(off) {
            a.store(v.to_le(), Ordering::SeqCst);
        }
    }
}

/// Why a ring's size or alignment cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// `num` must be a power of two from 1 to 32768.
    BadNum(u32),
    /// `align` must be a power of two of at least 4.
    BadAlign(u32),
    /// The memory given is smaller than the layout.
    TooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes given.
        have: usize,
    },
}

/// Offsets of the parts of a legacy split ring (spec §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    num: u16,
    used_off: usize,
}

impl Layout {
    /// The layout of a ring of `num` descriptors whose used ring is aligned to `align`.
    pub fn new(num: u32, align: u32) -> Result<Self, LayoutError> {
        if num == 0 || num > 32768 || !num.is_power_of_two() {
            return Err(LayoutError::BadNum(num));
        }
        if align < 4 || !align.is_power_of_two() {
            return Err(LayoutError::BadAlign(align));
        }
        let n = num as usize;
        let used_off = (16 * n + 2 * (3 + n)).next_multiple_of(align as usize);
        Ok(Layout { num: num as u16, used_off })
    }
    /// Number of descriptors.
    #[inline]
    pub fn num(&self) -> u16 {
        self.num
    }
    /// Bytes the ring occupies.
    #[inline]
    pub fn size(&self) -> usize {
        self.used_off + 6 + 8 * usize::from(self.num)
    }
    #[inline]
    fn desc(&self, i: u16) -> usize {
        16 * usize::from(i)
    }
    #[inline]
    fn avail_flags(&self) -> usize {
        16 * usize::from(self.num)
    }
    #[inline]
    fn avail_idx(&self) -> usize {
        self.avail_flags() + 2
    }
    #[inline]
    fn avail_ring(&self, slot: u16) -> usize {
        // `num` is a power of two (checked by `new`): the mask is `slot % num`.
        self.avail_flags() + 4 + 2 * usize::from(slot & (self.num - 1))
    }
    #[inline]
    fn used_flags(&self) -> usize {
        self.used_off
    }
    #[inline]
    fn used_idx(&self) -> usize {
        self.used_off + 2
    }
    #[inline]
    fn used_ring(&self, slot: u16) -> usize {
        self.used_off + 4 + 8 * usize::from(slot & (self.num - 1))
    }
}

/// The byte offsets a [`DriverQueue`] uses, worked out once from its [`Layout`]. Every access
/// made through them is inside the ring's memory: [`DriverQueue::new`] checks that the memory
/// holds the whole layout, and the ring slots are taken modulo `num` (`mask`). See
/// [`DriverQueue::new`] for the alignment.
#[derive(Clone, Copy)]
struct Offsets {
    /// `num - 1` (`num` is a power of two).
    mask: u16,
    avail_idx: usize,
    /// The avail ring's slot 0.
    avail_ring: usize,
    used_flags: usize,
    used_idx: usize,
    /// The used ring's entry 0.
    used_ring: usize,
}

impl Offsets {
    fn of(l: &Layout) -> Self {
        Offsets {
            mask: l.num - 1,
            avail_idx: l.avail_idx(),
            avail_ring: l.avail_ring(0),
            used_flags: l.used_flags(),
            used_idx: l.used_idx(),
            used_ring: l.used_ring(0),
        }
    }
    /// Descriptor `i` (taken modulo `num`).
    #[inline]
    fn desc(&self, i: u16) -> usize {
        16 * usize::from(i & self.mask)
    }
    #[inline]
    fn avail_slot(&self, idx: u16) -> usize {
        self.avail_ring + 2 * usize::from(idx & self.mask)
    }
    #[inline]
    fn used_entry(&self, idx: u16) -> usize {
        self.used_ring + 8 * usize::from(idx & self.mask)
    }
}

/// A used entry as the device reported it, after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The descriptor (head) index the device returned.
    pub desc: u16,
    /// The raw `used.len` word (a status on Trusty's normal-to-secure ring).
    pub len: u32,
}

/// Something the device wrote that breaks the ring protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// used.idx moved by more than the ring size since we last looked.
    UsedIndexJump {
        /// The index we saw last.
        last_seen: u16,
        /// The index now.
        now: u16,
    },
    /// A used entry names a descriptor that is out of range or not in flight (consumed).
    BadUsedId {
        /// The descriptor id found.
        id: u32,
    },
    /// Every descriptor is in flight.
    Full,
}

/// The driver (normal-world) end of one ring.
///
/// Its trusted state is kept in fixed tables of the ring's size, made once: a stack of free
/// descriptor indices and an in-flight mark per descriptor. Every index the device hands back
/// is checked against them before use.
pub struct DriverQueue<M: RingMemory> {
    mem: M,
    layout: Layout,
    /// Where the words this end touches are, from `layout`.
    at: Offsets,
    avail_idx: u16,
    last_used: u16,
    /// Used entries announced by the last [`DriverQueue::used_pending`] (behind an index read
    /// with acquire ordering) and not taken yet: [`DriverQueue::pop_pending`] takes them without
    /// reading `used.idx` again.
    announced: u16,
    /// `free[..n_free]`: the descriptors not in flight.
    free: Box<[u16]>,
    /// What this side wrote in each avail slot (a trusted copy: only a prefetch hint reads it).
    avail_shadow: Box<[u16]>,
    n_free: u16,
    in_flight: Box<[bool]>,
}

impl<M: RingMemory> DriverQueue<M> {
    /// A queue over zeroed memory `mem` laid out as `layout`.
    ///
    /// The check here is what every later access relies on: with `mem.len() >= layout.size()`,
    /// each offset in [`Offsets`] (a descriptor, an avail slot or a used entry modulo `num`, the
    /// index and flag words) is inside `mem`, the layout's arithmetic (spec §5.3) being
    /// `desc[num]` (16 B each) at 0, then `avail` {flags, idx, ring[num]}, then `used` {flags,
    /// idx, ring[num] of 8 B} at `used_off` >= the end of `avail`. Aligned too: descriptors at
    /// multiples of 16, avail words at even offsets, and `used_off` a multiple of `align` >= 4,
    /// so the used words are even and the used entries' u32 words multiples of 4.
    pub fn new(mem: M, layout: Layout) -> Result<Self, LayoutError> {
        if mem.len() < layout.size() {
            return Err(LayoutError::TooSmall { needed: layout.size(), have: mem.len() });
        }
        let num = layout.num();
        // Highest first, so `add` hands out 0, 1, 2, ... A plain loop: at opt-level 3 the
        // collected range became a vectorised fill several times its size, for a cold path.
        let mut free = Vec::with_capacity(usize::from(num));
        let mut i = num;
        while i > 0 {
            i -= 1;
            free.push(i);
        }
        Ok(DriverQueue {
            mem,
            layout,
            at: Offsets::of(&layout),
            avail_idx: 0,
            last_used: 0,
            announced: 0,
            free: free.into_boxed_slice(),
            avail_shadow: alloc::vec![0; usize::from(num)].into_boxed_slice(),
            n_free: num,
            in_flight: alloc::vec![false; usize::from(num)].into_boxed_slice(),
        })
    }

    /// The ring's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Descriptors not in flight.
    pub fn free_count(&self) -> usize {
        usize::from(self.n_free)
    }

    /// Publishes one single-descriptor buffer (Trusty takes one descriptor per message, spec
    /// §5.7): `addr` is the buffer's memory id, `len` its valid bytes (device-readable) or its
    /// capacity (device-writable). Returns the descriptor index, the buffer's token.
    #[inline]
    pub fn add(&mut self, addr: u64, len: u32, device_writable: bool) -> Result<u16, RingError> {
        let Some(top) = self.n_free.checked_sub(1) else { return Err(RingError::Full) };
        let Some(&idx) = self.free.get(usize::from(top)) else { return Err(RingError::Full) };
        // `free` holds only indices below `num` (it starts as 0..num and takes back only
        // descriptors checked in flight); `desc` takes it modulo `num` all the same.
        let d = self.at.desc(idx);
        // len (bytes 8..12), flags (12..14) and next (14..16, 0: no chain) as one 8-aligned
        // little-endian word.
        let flags = if device_writable { DESC_F_WRITE } else { 0 };
        let word = u64::from(len) | u64::from(flags) << 32;
        // A descriptor that already says exactly this (the same buffer re-posted at the same
        // length: the free stack hands the last returned descriptor out first) is left
        // unwritten. The device only reads descriptors, so the line stays shared in both
        // caches instead of moving to this core and back on every message; the words are
        // compared in shared memory, not in a copy of ours, so whatever is there is what the
        // device reads.
        // SAFETY: a descriptor's two words and an avail slot, inside the memory (see `Offsets`).
        unsafe {
            if self.mem.read_u64_unchecked(d) != addr {
                self.mem.write_u64_unchecked(d, addr);
            }
            if self.mem.read_u64_unchecked(d + 8) != word {
                self.mem.write_u64_unchecked(d + 8, word);
            }
            self.mem.write_u16_unchecked(self.at.avail_slot(self.avail_idx), idx);
        }
        if let Some(slot) = self.avail_shadow.get_mut(usize::from(self.avail_idx & self.at.mask)) {
            *slot = idx;
        }
        self.n_free = top;
        if let Some(f) = self.in_flight.get_mut(usize::from(idx)) {
            *f = true;
        }
        // The descriptor and ring slot must be visible before the index that publishes them
        // (virtio 1.2 §2.7.13.3; Linux virtqueue_add_split(): virtio_wmb() before avail->idx).
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the avail index word (see `Offsets`).
        unsafe { self.mem.write_u16_release_unchecked(self.at.avail_idx, self.avail_idx) };
        Ok(idx)
    }

    /// Whether the device wants a kick (it clears NO_NOTIFY before it sleeps, spec §4).
    ///
    /// Between publishing `avail.idx` and reading `used.flags` the driver needs a store-load
    /// barrier (virtio 1.2 §2.7.13.4; Linux virtqueue_kick_prepare_split(): "expose
    /// available array entries before checking" with virtio_mb()); the device does the mirror
    /// image (Trusty clears the flag, full barrier, re-checks `avail.idx`), so at least one of
    /// the two sees the other's word and no kick is lost. Here the barrier is the index stored
    /// again (same value, harmless to the device) with a fenced store, and the flags read with
    /// acquire ordering: one `stlrh` + `ldarh` on AArch64, `xchg` + `mov` on x86, instead of a
    /// full `dmb ish` / `mfence`.
    ///
    /// The barrier only matters for the answer "no kick": a kick is a call into the peer,
    /// which publishes everything written before it (an SMC runs on this CPU; a mailbox call
    /// stores its sequence word with release ordering), so when the flag already asks for a
    /// kick the answer is given without the barrier, and the barrier (on x86 a wait for every
    /// store still on its way to the other core) is paid only before skipping one.
    #[inline]
    pub fn needs_kick(&self) -> bool {
        if self.device_wants_kick() {
            return true;
        }
        // SAFETY: the avail index word (see `Offsets`).
        unsafe { self.mem.write_u16_fenced_unchecked(self.at.avail_idx, self.avail_idx) };
        // SAFETY: the used flags word (see `Offsets`).
        let flags = unsafe { self.mem.read_u16_acquire_unchecked(self.at.used_flags) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Used entries the device has published and the driver not yet taken: the size of the
    /// batch a scan may take now (at most the ring size). A driver that re-posts buffers while it
    /// walks a batch should take exactly this many entries and re-post only afterwards, so that
    /// a used id the device repeats later in the same batch can never name a descriptor that was
    /// handed out again meanwhile (Linux virtqueue_get_buf() detaches each id once; the TIPC
    /// driver re-adds buffers one by one inside `_rxvq_cb()`, which a hostile device could
    /// exploit if ids were checked only against the current in-flight set).
    ///
    /// The index is read with acquire ordering, so the batch can be taken with
    /// [`DriverQueue::pop_pending`] without reading it again.
    #[inline]
    pub fn used_pending(&mut self) -> Result<u16, RingError> {
        // SAFETY: the used index word (see `Offsets`).
        let now = unsafe { self.mem.read_u16_acquire_unchecked(self.at.used_idx) };
        let n = now.wrapping_sub(self.last_used);
        if n > self.layout.num() {
            self.announced = 0;
            return Err(RingError::UsedIndexJump { last_seen: self.last_used, now });
        }
        self.announced = n;
        Ok(n)
    }

    /// Whether the device asks for kicks now (VRING_USED_F_NO_NOTIFY clear), read without a
    /// barrier: a hint for when to publish, not the kick decision ([`DriverQueue::needs_kick`]).
    #[inline]
    pub fn device_wants_kick(&self) -> bool {
        // SAFETY: the used flags word (see `Offsets`).
        let flags = unsafe { self.mem.read_u16_acquire_unchecked(self.at.used_flags) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Starts fetching the line of `used.idx` (and the first used entries beside it), to be
    /// read soon by [`DriverQueue::used_pending`]: a driver about to look at several rings
    /// after a call returns lets their lines come in together.
    #[inline]
    pub fn prefetch_used(&self) {
        self.mem.prefetch(self.at.used_idx);
    }

    /// Starts fetching for ownership the lines the next [`DriverQueue::add`] writes: `avail.idx`
    /// and the avail slot it fills (its descriptor is usually left as it is, see `add`). Worth
    /// it when the device's core read them last: their stores then do not hold up the kick
    /// that follows them. Only for a ring this side is about to add to: the device reads
    /// these lines on every look at the ring, and a line taken from it comes back at a cost.
    #[inline]
    pub fn prefetch_next_add(&self) {
        self.mem.prefetch_for_write(self.at.avail_idx);
        self.mem.prefetch_for_write(self.at.avail_slot(self.avail_idx));
    }

    /// The descriptor a device that returns buffers in the order it took them (Trusty does)
    /// will return next, if one is in flight: a hint for prefetching its buffer, never trusted
    /// (what the device really returns is checked by the pops).
    #[inline]
    pub fn next_in_order(&self) -> Option<u16> {
        if self.last_used == self.avail_idx {
            return None;
        }
        self.avail_shadow.get(usize::from(self.last_used & self.at.mask)).copied()
    }

    /// Takes the next used entry, if any, validating everything the device wrote.
    pub fn pop_used(&mut self) -> Result<Option<Used>, RingError> {
        // Read the entry only after seeing the index that published it (acquire).
        // SAFETY: the used index word (see `Offsets`).
        let now = unsafe { self.mem.read_u16_acquire_unchecked(self.at.used_idx) };
        if now == self.last_used {
            return Ok(None);
        }
        if now.wrapping_sub(self.last_used) > self.layout.num() {
            return Err(RingError::UsedIndexJump { last_seen: self.last_used, now });
        }
        // The oldest entry is taken: it leaves the announced batch, if it was in it.
        self.announced = self.announced.saturating_sub(1);
        self.take_entry().map(Some)
    }

    /// Takes the next entry of the batch the last [`DriverQueue::used_pending`] announced, or
    /// `None` once the batch is taken, without reading `used.idx` again (its acquire read
    /// ordered the entries). Validates everything the device wrote, as
    /// [`DriverQueue::pop_used`].
    #[inline]
    pub fn pop_pending(&mut self) -> Result<Option<Used>, RingError> {
        let Some(left) = self.announced.checked_sub(1) else { return Ok(None) };
        self.announced = left;
        self.take_entry().map(Some)
    }

    /// Reads the used entry at `last_used` (published: the caller checked the index) and
    /// checks the id against the trusted in-flight table.
    #[inline]
    fn take_entry(&mut self) -> Result<Used, RingError> {
        let e = self.at.used_entry(self.last_used);
        // SAFETY: a used entry's two words (see `Offsets`).
        let (id, len) = unsafe { (self.mem.read_u32_unchecked(e), self.mem.read_u32_unchecked(e + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        let slot = usize::try_from(id).ok().and_then(|i| self.in_flight.get_mut(i));
        match slot {
            Some(f) if *f => {
                *f = false;
                // In flight means not free, so the free stack has room (n_free < num).
                let desc = id as u16;
                if let Some(top) = self.free.get_mut(usize::from(self.n_free)) {
                    *top = desc;
                    self.n_free += 1;
                }
                Ok(Used { desc, len })
            }
            _ => Err(RingError::BadUsedId { id }),
        }
    }

    /// Descriptors the device still holds.
    pub fn in_flight(&self) -> impl Iterator<Item = u16> + '_ {
        self.in_flight.iter().enumerate().filter(|(_, &f)| f).map(|(i, _)| i as u16)
    }
}

/// One descriptor as the device read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
}

/// A chain taken from the avail ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor's index (returned in the used ring).
    pub head: u16,
    /// The descriptors, in chain order.
    pub descs: Vec<Desc>,
}

/// Driver errors the device end detects (spec §5.7: the first two make Trusty panic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRingError {
    /// avail.idx moved by more than the ring size since we last looked.
    AvailIndexJump {
        /// The index we saw last.
        last_seen: u16,
        /// The index now.
        now: u16,
    },
    /// An avail entry names a descriptor out of range.
    HeadOutOfRange {
        /// The head found.
        head: u16,
    },
    /// A chain link out of range, or a loop: the head is returned with an error status.
    BadChain {
        /// The chain's head.
        head: u16,
    },
}

/// The device (secure-side) end of one ring: consumes avail, produces used. Its methods take
/// the ring's memory as any [`RingMemory`], `dyn` included (generic so that a data path over
/// a concrete memory type inlines the accesses).
pub struct DeviceQueue {
    layout: Layout,
    last_avail: u16,
    used_idx: u16,
}

impl DeviceQueue {
    /// The device end of a ring laid out as `layout`, at index 0.
    pub fn new(layout: Layout) -> Self {
        DeviceQueue { layout, last_avail: 0, used_idx: 0 }
    }

    /// The ring's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The head of the next available chain, checked as Trusty's `vqueue_get_avail_buf()`
    /// checks it (an index jump or a head out of range is fatal there), left on the ring.
    #[inline(always)]
    fn next_avail_head<M: RingMemory + ?Sized>(&self, mem: &M) -> Result<Option<u16>, DeviceRingError> {
        // Acquire: the slot and descriptor the index publishes are read after it.
        let now = mem.read_u16_acquire(self.layout.avail_idx());
        if now == self.last_avail {
            return Ok(None);
        }
        if now.wrapping_sub(self.last_avail) > self.layout.num() {
            return Err(DeviceRingError::AvailIndexJump { last_seen: self.last_avail, now });
        }
        let head = mem.read_u16(self.layout.avail_ring(self.last_avail));
        if head >= self.layout.num() {
            return Err(DeviceRingError::HeadOutOfRange { head });
        }
        Ok(Some(head))
    }

    /// [`DeviceQueue::next_avail_head`], taken off the avail ring.
    #[inline]
    fn pop_avail_head<M: RingMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<u16>, DeviceRingError> {
        let head = self.next_avail_head(mem)?;
        if head.is_some() {
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        Ok(head)
    }

    #[inline]
    fn read_desc<M: RingMemory + ?Sized>(&self, mem: &M, i: u16) -> Desc {
        let d = self.layout.desc(i);
        // len, flags (and next) in one 8-aligned little-endian word.
        let w = mem.read_u64(d + 8);
        Desc { addr: mem.read_u64(d), len: w as u32, flags: (w >> 32) as u16 }
    }

    /// Takes the next available buffer when it is a single descriptor, which is all TIPC puts
    /// on its rings (spec §5.7), without allocating: for a device end on a data path. A longer
    /// chain is taken too but reported as [`DeviceRingError::BadChain`], so that its head can
    /// be returned with an error status.
    pub fn pop_avail_one<M: RingMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<(u16, Desc)>, DeviceRingError> {
        let Some(head) = self.pop_avail_head(mem)? else { return Ok(None) };
        let desc = self.read_desc(mem, head);
        if desc.flags & DESC_F_NEXT != 0 {
            return Err(DeviceRingError::BadChain { head });
        }
        Ok(Some((head, desc)))
    }

    /// Takes the next available chain's head and reads its first descriptor, without
    /// following the chain: one look at `avail.idx` when the ring is empty, nothing allocated.
    /// A first descriptor with `DESC_F_NEXT` set starts a longer chain, which
    /// [`DeviceQueue::read_chain`] collects (the head is taken either way, and is to be
    /// returned with a used entry as after [`DeviceQueue::pop_avail_into`]). The checks are
    /// those of [`DeviceQueue::pop_avail`].
    #[inline(always)]
    pub fn pop_avail_first<M: RingMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<(u16, Desc)>, DeviceRingError> {
        let Some(head) = self.pop_avail_head(mem)? else { return Ok(None) };
        Ok(Some((head, self.read_desc(mem, head))))
    }

    /// The whole chain that starts at `head` with the descriptor `first` (as
    /// [`DeviceQueue::pop_avail_first`] returned them) into `descs` (cleared first): at most
    /// `num` links, each in range, else [`DeviceRingError::BadChain`].
    pub fn read_chain<M: RingMemory + ?Sized>(&self, mem: &M, head: u16, first: Desc, descs: &mut Vec<Desc>) -> Result<(), DeviceRingError> {
        descs.clear();
        let mut i = head;
        let mut desc = first;
        loop {
            descs.push(desc);
            if desc.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            i = mem.read_u16(self.layout.desc(i) + 14);
            if i >= self.layout.num() || descs.len() >= usize::from(self.layout.num()) {
                return Err(DeviceRingError::BadChain { head });
            }
            desc = self.read_desc(mem, i);
        }
    }

    /// Takes the next available chain (at most `num` links).
    pub fn pop_avail<M: RingMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<Chain>, DeviceRingError> {
        let mut descs = Vec::new();
        Ok(self.pop_avail_into(mem, &mut descs)?.map(|head| Chain { head, descs }))
    }

    /// [`DeviceQueue::pop_avail`] into a caller's vector (cleared first, its capacity reused):
    /// returns the head, the descriptors are in `descs`. A device end that keeps one vector
    /// takes chains without allocating.
    pub fn pop_avail_into<M: RingMemory + ?Sized>(&mut self, mem: &M, descs: &mut Vec<Desc>) -> Result<Option<u16>, DeviceRingError> {
        descs.clear();
        let Some((head, first)) = self.pop_avail_first(mem)? else { return Ok(None) };
        self.read_chain(mem, head, first, descs)?;
        Ok(Some(head))
    }

    /// Returns a chain with the 32-bit `len` word.
    #[inline(always)]
    pub fn push_used<M: RingMemory + ?Sized>(&mut self, mem: &M, head: u16, len: u32) {
        let e = self.layout.used_ring(self.used_idx);
        mem.write_u32(e, u32::from(head));
        mem.write_u32(e + 4, len);
        // Release: the entry is visible before the index that publishes it.
        self.used_idx = self.used_idx.wrapping_add(1);
        mem.write_u16_release(self.layout.used_idx(), self.used_idx);
    }

    /// Sets or clears VRING_USED_F_NO_NOTIFY, with a store-load barrier: a later look at
    /// `avail.idx` ([`DeviceQueue::has_avail`], the pops) is ordered after it, so a device that
    /// clears the flag and then finds the ring empty can sleep without missing a kick (the
    /// mirror of [`DriverQueue::needs_kick`]).
    pub fn set_no_notify<M: RingMemory + ?Sized>(&self, mem: &M, no_notify: bool) {
        mem.write_u16_fenced(self.layout.used_flags(), if no_notify { USED_F_NO_NOTIFY } else { 0 });
    }

    /// The next available chain's head and first descriptor, left on the ring: for a device
    /// end that prepares for the buffer it takes next (a cache matter), never a substitute for
    /// the pop, which checks and takes it. `None` when the ring is empty or what the driver
    /// published would fail the pop's checks.
    pub fn peek_avail_first<M: RingMemory + ?Sized>(&self, mem: &M) -> Option<(u16, Desc)> {
        let head = self.next_avail_head(mem).ok().flatten()?;
        Some((head, self.read_desc(mem, head)))
    }

    /// Starts fetching the lines of `avail.idx` and of the next avail slot (see
    /// [`RingMemory::prefetch`]), to be read soon by a pop.
    #[inline]
    pub fn prefetch_avail<M: RingMemory + ?Sized>(&self, mem: &M) {
        mem.prefetch(self.layout.avail_idx());
        mem.prefetch(self.layout.avail_ring(self.last_avail));
    }

    /// How many chains the driver has published and this end not yet taken (0 also for an
    /// index that jumped further than the ring, which a pop reports).
    pub fn avail_count<M: RingMemory + ?Sized>(&self, mem: &M) -> u16 {
        let n = mem.read_u16_acquire(self.layout.avail_idx()).wrapping_sub(self.last_avail);
        if n > self.layout.num() {
            0
        } else {
            n
        }
    }

    /// Whether the driver has published chains not yet taken.
    #[inline]
    pub fn has_avail<M: RingMemory + ?Sized>(&self, mem: &M) -> bool {
        mem.read_u16_acquire(self.layout.avail_idx()) != self.last_avail
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;
    use std::vec;

    /// Ring memory for the tests. Every view is derived from one raw base pointer taken once
    /// with `Box::into_raw`, so a second view does not invalidate the first (re-borrowing the
    /// box for each view would, under Stacked and Tree Borrows alike).
    struct Mem {
        base: NonNull<[u64]>,
    }
    impl Mem {
        fn new(bytes: usize) -> Self {
            let boxed = vec![0u64; bytes / 8].into_boxed_slice();
            Mem { base: NonNull::new(Box::into_raw(boxed)).unwrap() }
        }
        fn raw(&mut self) -> RawRing {
            // SAFETY: the allocation is 8-aligned, lives until `Mem` is dropped (after every ring
            // view in these tests), and all views share the one base pointer's provenance.
            unsafe { RawRing::new(self.base.cast(), self.base.len() * 8) }
        }
    }
    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: `base` came from `Box::into_raw` in `new` and is freed only here.
            drop(unsafe { Box::from_raw(self.base.as_ptr()) });
        }
    }

    #[test]
    fn layout_for_trusty_default_ring() {
        let l = Layout::new(32, 4096).unwrap();
        assert_eq!(l.avail_flags(), 512);
        assert_eq!(l.used_flags(), 4096);
        assert_eq!(l.size(), 4358);
        assert_eq!(Layout::new(33, 4096), Err(LayoutError::BadNum(33)));
        assert_eq!(Layout::new(0, 4096), Err(LayoutError::BadNum(0)));
        assert_eq!(Layout::new(32, 3), Err(LayoutError::BadAlign(3)));
    }

    /// What the driver's unchecked accesses rely on: for every ring size and alignment, each
    /// offset `Offsets` gives (any slot index, wrapped) is the layout's, inside `size()` and
    /// aligned for the word read there.
    #[test]
    fn every_offset_the_driver_uses_is_inside_the_layout_and_aligned() {
        let mut num = 1u32;
        while num <= 32768 {
            for align in [4u32, 8, 16, 64, 4096] {
                let l = Layout::new(num, align).unwrap();
                let at = Offsets::of(&l);
                let size = l.size();
                let fits = |off: usize, n: usize| off % n == 0 && off + n <= size;
                assert!(fits(at.avail_idx, 2) && fits(at.used_flags, 2) && fits(at.used_idx, 2));
                assert_eq!((at.avail_idx, at.used_flags, at.used_idx), (l.avail_idx(), l.used_flags(), l.used_idx()));
                for i in [0u16, 1, (num - 1) as u16, num as u16, u16::MAX] {
                    assert!(fits(at.desc(i), 8) && fits(at.desc(i) + 8, 8), "desc {i} of {num}");
                    assert!(fits(at.avail_slot(i), 2), "avail slot {i} of {num}");
                    assert!(fits(at.used_entry(i), 4) && fits(at.used_entry(i) + 4, 4), "used entry {i} of {num}");
                    assert_eq!(at.avail_slot(i), l.avail_ring(i));
                    assert_eq!(at.used_entry(i), l.used_ring(i));
                }
            }
            num *= 2;
        }
    }

    #[test]
    fn driver_and_device_round_trip() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let dev_mem = m.raw();
        let mut dev = DeviceQueue::new(l);
        for round in 0..10u64 {
            let a = drv.add(0x1000 + round, 100, false).unwrap();
            let b = drv.add(0x2000 + round, 4096, true).unwrap();
            let c1 = dev.pop_avail(&dev_mem).unwrap().unwrap();
            assert_eq!(c1.head, a);
            assert_eq!(c1.descs, vec![Desc { addr: 0x1000 + round, len: 100, flags: 0 }]);
            let c2 = dev.pop_avail(&dev_mem).unwrap().unwrap();
            assert_eq!(c2.descs[0].flags, DESC_F_WRITE);
            assert_eq!(dev.pop_avail(&dev_mem).unwrap(), None);
            dev.push_used(&dev_mem, c2.head, 20);
            dev.push_used(&dev_mem, c1.head, (-9i32) as u32);
            assert_eq!(drv.pop_used().unwrap(), Some(Used { desc: b, len: 20 }));
            assert_eq!(drv.pop_used().unwrap(), Some(Used { desc: a, len: (-9i32) as u32 }));
            assert_eq!(drv.pop_used().unwrap(), None);
        }
        assert_eq!(drv.free_count(), 4);
    }

    /// The cache hints change nothing anyone reads, whatever the address, and a queue that
    /// asked for its next add's lines adds exactly as one that did not.
    #[test]
    fn write_hints_change_nothing_and_never_fault() {
        for p in [core::ptr::null(), 1 as *const u8, usize::MAX as *const u8] {
            prefetch_line_for_write(p);
            prefetch_line(p);
        }
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let a = drv.add(0x7000, 64, false).unwrap();
        let ring = m.raw();
        let words = |r: &RawRing| (0..r.len()).step_by(8).map(|off| r.read_u64(off)).collect::<Vec<u64>>();
        let before = words(&ring);
        drv.prefetch_next_add();
        ring.prefetch_for_write(0);
        ring.prefetch_for_write(usize::MAX);
        assert_eq!(words(&ring), before, "a hint wrote to the ring");
        let b = drv.add(0x8000, 32, false).unwrap();
        let mut dev = DeviceQueue::new(l);
        assert_eq!(dev.pop_avail_one(&ring), Ok(Some((a, Desc { addr: 0x7000, len: 64, flags: 0 }))));
        assert_eq!(dev.pop_avail_one(&ring), Ok(Some((b, Desc { addr: 0x8000, len: 32, flags: 0 }))));
    }

    #[test]
    fn pop_avail_one_takes_single_descriptors_and_refuses_chains() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        assert_eq!(dev.pop_avail_one(&ring), Ok(None));
        let a = drv.add(0x7000, 64, true).unwrap();
        assert_eq!(dev.pop_avail_one(&ring), Ok(Some((a, Desc { addr: 0x7000, len: 64, flags: DESC_F_WRITE }))));
        // A chain (the driver end never makes one: written by hand) is taken and refused.
        let b = drv.add(0x8000, 32, false).unwrap();
        ring.write_u16(l.desc(b) + 12, DESC_F_NEXT);
        assert_eq!(dev.pop_avail_one(&ring), Err(DeviceRingError::BadChain { head: b }));
        assert_eq!(dev.pop_avail_one(&ring), Ok(None));
        // An index jump is reported as pop_avail reports it.
        ring.write_u16(l.avail_idx(), 100);
        assert!(matches!(dev.pop_avail_one(&ring), Err(DeviceRingError::AvailIndexJump { .. })));
    }

    #[test]
    fn a_peek_shows_what_the_next_pop_takes_and_takes_nothing() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        assert_eq!(dev.peek_avail_first(&ring), None);
        let a = drv.add(0x7000, 64, true).unwrap();
        let b = drv.add(0x8000, 32, true).unwrap();
        for _ in 0..2 {
            assert_eq!(dev.peek_avail_first(&ring), Some((a, Desc { addr: 0x7000, len: 64, flags: DESC_F_WRITE })));
        }
        assert_eq!(dev.pop_avail_one(&ring), Ok(Some((a, Desc { addr: 0x7000, len: 64, flags: DESC_F_WRITE }))));
        assert_eq!(dev.peek_avail_first(&ring).map(|(h, _)| h), Some(b));
        assert_eq!(dev.pop_avail_one(&ring).unwrap().map(|(h, _)| h), Some(b));
        assert_eq!(dev.peek_avail_first(&ring), None);
        // What the pop would refuse is not shown: a head out of range, an index jump.
        drv.add(0x9000, 16, true).unwrap();
        let slot = l.avail_ring(2);
        let good = ring.read_u16(slot);
        ring.write_u16(slot, 4);
        assert_eq!(dev.peek_avail_first(&ring), None);
        ring.write_u16(slot, good);
        ring.write_u16(l.avail_idx(), 100);
        assert_eq!(dev.peek_avail_first(&ring), None);
        assert!(matches!(dev.pop_avail_one(&ring), Err(DeviceRingError::AvailIndexJump { .. })));
    }

    #[test]
    fn pop_avail_first_takes_one_head_and_read_chain_checks_every_link() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        let mut descs = vec![Desc { addr: 1, len: 1, flags: 0 }];
        assert_eq!(dev.pop_avail_first(&ring), Ok(None));
        let a = drv.add(0x7000, 64, true).unwrap();
        let (head, first) = dev.pop_avail_first(&ring).unwrap().unwrap();
        assert_eq!((head, first), (a, Desc { addr: 0x7000, len: 64, flags: DESC_F_WRITE }));
        dev.read_chain(&ring, head, first, &mut descs).unwrap();
        assert_eq!(descs, [first], "a single descriptor is its own chain (the vector cleared first)");
        assert_eq!(dev.pop_avail_first(&ring), Ok(None), "taken once");
        // A chain b -> c (the driver end never makes one: linked by hand).
        let b = drv.add(0x8000, 32, false).unwrap();
        let c = drv.add(0x9000, 16, true).unwrap();
        ring.write_u16(l.desc(b) + 12, DESC_F_NEXT);
        ring.write_u16(l.desc(b) + 14, c);
        let (head, first) = dev.pop_avail_first(&ring).unwrap().unwrap();
        assert_eq!((head, first.flags), (b, DESC_F_NEXT), "only the head is read, the link is left to read_chain");
        dev.read_chain(&ring, head, first, &mut descs).unwrap();
        assert_eq!(descs, [first, Desc { addr: 0x9000, len: 16, flags: DESC_F_WRITE }]);
        // c was published on its own too.
        assert_eq!(dev.pop_avail_first(&ring).unwrap().map(|t| t.0), Some(c));
        // A loop and a link out of range are BadChain of the head.
        let first = Desc { addr: 0, len: 0, flags: DESC_F_NEXT };
        ring.write_u16(l.desc(b) + 14, b);
        assert_eq!(dev.read_chain(&ring, b, first, &mut descs), Err(DeviceRingError::BadChain { head: b }));
        ring.write_u16(l.desc(b) + 14, 4);
        assert_eq!(dev.read_chain(&ring, b, first, &mut descs), Err(DeviceRingError::BadChain { head: b }));
        // The avail checks are pop_avail's: a head out of range, an index jump.
        let before = ring.read_u16(l.avail_idx());
        ring.write_u16(l.avail_ring(before), 4);
        ring.write_u16(l.avail_idx(), before.wrapping_add(1));
        assert_eq!(dev.pop_avail_first(&ring), Err(DeviceRingError::HeadOutOfRange { head: 4 }));
        ring.write_u16(l.avail_idx(), before.wrapping_add(9));
        assert!(matches!(dev.pop_avail_first(&ring), Err(DeviceRingError::AvailIndexJump { .. })));
    }

    #[test]
    fn pop_avail_first_reads_one_word_on_an_empty_ring_and_four_for_a_buffer() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = Counting::new(m.raw());
        let mut dev = DeviceQueue::new(l);
        assert_eq!(dev.pop_avail_first(&ring), Ok(None));
        assert_eq!(ring.reads.get(), 1, "avail.idx only");
        drv.add(0x7000, 64, true).unwrap();
        ring.reads.set(0);
        assert!(dev.pop_avail_first(&ring).unwrap().is_some());
        assert_eq!(ring.reads.get(), 4, "avail.idx, the ring slot, the descriptor's two words");
    }

    #[test]
    fn hostile_device_cannot_panic_the_driver() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let peer = m.raw();
        let d = drv.add(0x1000, 10, false).unwrap();
        // Used entry naming a descriptor that is not in flight.
        peer.write_u32(l.used_ring(0), 3);
        peer.write_u16(l.used_idx(), 1);
        assert_eq!(drv.pop_used(), Err(RingError::BadUsedId { id: 3 }));
        // Out of range id.
        peer.write_u32(l.used_ring(1), 70_000);
        peer.write_u16(l.used_idx(), 2);
        assert_eq!(drv.pop_used(), Err(RingError::BadUsedId { id: 70_000 }));
        // Index jump.
        peer.write_u16(l.used_idx(), 200);
        assert!(matches!(drv.pop_used(), Err(RingError::UsedIndexJump { .. })));
        // A correct entry still works afterwards.
        peer.write_u32(l.used_ring(2), u32::from(d));
        peer.write_u16(l.used_idx(), 3);
        assert_eq!(drv.pop_used().unwrap().unwrap().desc, d);
        // Double completion of the same descriptor is refused.
        peer.write_u32(l.used_ring(3), u32::from(d));
        peer.write_u16(l.used_idx(), 4);
        assert!(drv.pop_used().is_err());
    }

    #[test]
    fn a_batch_taken_before_reposting_refuses_a_repeated_id() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let peer = m.raw();
        let d = drv.add(0x1000, 64, true).unwrap();
        drv.add(0x2000, 64, true).unwrap();
        // The device returns descriptor d twice in one batch.
        peer.write_u32(l.used_ring(0), u32::from(d));
        peer.write_u32(l.used_ring(1), u32::from(d));
        peer.write_u16(l.used_idx(), 2);
        assert_eq!(drv.used_pending(), Ok(2));
        let mut reposts = Vec::new();
        let mut errors = 0;
        for _ in 0..drv.used_pending().unwrap() {
            match drv.pop_used() {
                Ok(Some(u)) => reposts.push(u.desc),
                Ok(None) => break,
                Err(_) => errors += 1,
            }
        }
        assert_eq!((reposts.as_slice(), errors), (&[d][..], 1), "the repeat is refused, not delivered twice");
        assert_eq!(drv.used_pending(), Ok(0));
        // A jump beyond the ring size is reported, not trusted.
        peer.write_u16(l.used_idx(), 200);
        assert!(matches!(drv.used_pending(), Err(RingError::UsedIndexJump { .. })));
    }

    #[test]
    fn pop_pending_takes_only_the_announced_batch_and_checks_every_id() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        assert_eq!(drv.pop_pending(), Ok(None), "nothing announced yet");
        let a = drv.add(0x1000, 8, true).unwrap();
        let b = drv.add(0x2000, 8, true).unwrap();
        let c = drv.add(0x3000, 8, true).unwrap();
        for _ in 0..3 {
            dev.pop_avail_one(&ring).unwrap().unwrap();
        }
        dev.push_used(&ring, a, 1);
        dev.push_used(&ring, b, 2);
        assert_eq!(drv.used_pending(), Ok(2));
        // Published after the batch was announced: not taken until the next announcement.
        dev.push_used(&ring, c, 3);
        assert_eq!(drv.pop_pending(), Ok(Some(Used { desc: a, len: 1 })));
        assert_eq!(drv.pop_pending(), Ok(Some(Used { desc: b, len: 2 })));
        assert_eq!(drv.pop_pending(), Ok(None), "taken beyond the announced batch");
        assert_eq!(drv.used_pending(), Ok(1));
        assert_eq!(drv.pop_pending(), Ok(Some(Used { desc: c, len: 3 })));
        // A pop_used takes the oldest entry of an announced batch out of it.
        let d = drv.add(0x4000, 8, true).unwrap();
        let e = drv.add(0x5000, 8, true).unwrap();
        dev.pop_avail_one(&ring).unwrap().unwrap();
        dev.pop_avail_one(&ring).unwrap().unwrap();
        dev.push_used(&ring, d, 4);
        dev.push_used(&ring, e, 5);
        assert_eq!(drv.used_pending(), Ok(2));
        assert_eq!(drv.pop_used(), Ok(Some(Used { desc: d, len: 4 })));
        assert_eq!(drv.pop_pending(), Ok(Some(Used { desc: e, len: 5 })));
        assert_eq!(drv.pop_pending(), Ok(None));
        // Ids in an announced batch are checked like any other: a repeat and an id out of
        // range are refused, and the accounting holds.
        let f = drv.add(0x6000, 8, true).unwrap();
        let slot = |i: u16| l.used_ring(i);
        ring.write_u32(slot(5), u32::from(f));
        ring.write_u32(slot(6), u32::from(f));
        ring.write_u32(slot(7), 9);
        ring.write_u16(l.used_idx(), 8);
        assert_eq!(drv.used_pending(), Ok(3));
        assert_eq!(drv.pop_pending().unwrap().map(|u| u.desc), Some(f));
        assert_eq!(drv.pop_pending(), Err(RingError::BadUsedId { id: u32::from(f) }));
        assert_eq!(drv.pop_pending(), Err(RingError::BadUsedId { id: 9 }));
        assert_eq!(drv.pop_pending(), Ok(None));
        assert_eq!(drv.free_count() + drv.in_flight().count(), 4);
        assert_eq!(drv.free_count(), 4);
    }

    #[test]
    fn needs_kick_leaves_the_published_index_alone() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        drv.add(0x1000, 8, false).unwrap();
        drv.add(0x2000, 8, false).unwrap();
        assert!(drv.needs_kick());
        assert_eq!(ring.read_u16(l.avail_idx()), 2, "the fenced store wrote back the same index");
        assert!(dev.pop_avail_one(&ring).unwrap().is_some());
        assert!(dev.pop_avail_one(&ring).unwrap().is_some());
        assert_eq!(dev.pop_avail_one(&ring), Ok(None));
        dev.set_no_notify(&ring, true);
        assert!(!drv.needs_kick());
        assert!(!dev.has_avail(&ring));
    }

    /// Ring memory that counts the words read and written and the fenced stores made through it.
    struct Counting {
        inner: RawRing,
        reads: std::cell::Cell<usize>,
        writes: std::cell::Cell<usize>,
        fenced: std::cell::Cell<usize>,
    }
    impl Counting {
        fn new(inner: RawRing) -> Self {
            let zero = || std::cell::Cell::new(0);
            Counting { inner, reads: zero(), writes: zero(), fenced: zero() }
        }
        fn count(c: &std::cell::Cell<usize>) {
            c.set(c.get() + 1);
        }
    }
    impl RingMemory for Counting {
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn read_u16(&self, off: usize) -> u16 {
            Self::count(&self.reads);
            self.inner.read_u16(off)
        }
        fn write_u16(&self, off: usize, v: u16) {
            Self::count(&self.writes);
            self.inner.write_u16(off, v)
        }
        fn read_u32(&self, off: usize) -> u32 {
            Self::count(&self.reads);
            self.inner.read_u32(off)
        }
        fn write_u32(&self, off: usize, v: u32) {
            Self::count(&self.writes);
            self.inner.write_u32(off, v)
        }
        fn read_u64(&self, off: usize) -> u64 {
            Self::count(&self.reads);
            self.inner.read_u64(off)
        }
        fn write_u64(&self, off: usize, v: u64) {
            Self::count(&self.writes);
            self.inner.write_u64(off, v)
        }
        fn write_u16_fenced(&self, off: usize, v: u16) {
            Self::count(&self.fenced);
            self.inner.write_u16_fenced(off, v)
        }
    }

    #[test]
    fn a_descriptor_that_already_says_it_is_not_written_again_and_a_tampered_one_is() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let ring = m.raw();
        let mut drv = DriverQueue::new(Counting::new(m.raw()), l).unwrap();
        let mut dev = DeviceQueue::new(l);
        // First use of descriptor 0: address and len/flags word written, then the slot and
        // the index (release store, counted as a plain write here).
        let d = drv.add(0x1000, 8, true).unwrap();
        assert_eq!(drv.mem.writes.get(), 4);
        let (head, _) = dev.pop_avail_one(&ring).unwrap().unwrap();
        dev.push_used(&ring, head, 8);
        assert_eq!(drv.pop_used().unwrap().unwrap().desc, d);
        // The same buffer re-posted: the free stack hands descriptor 0 out again, and only the
        // avail slot and index are written.
        drv.mem.writes.set(0);
        assert_eq!(drv.add(0x1000, 8, true).unwrap(), d);
        assert_eq!(drv.mem.writes.get(), 2);
        let (head, desc) = dev.pop_avail_one(&ring).unwrap().unwrap();
        assert_eq!((desc.addr, desc.len, desc.flags), (0x1000, 8, DESC_F_WRITE));
        // A device that scribbles on its descriptor gets it written again; a new length too.
        ring.write_u64(l.desc(head), 0xdead_0000);
        dev.push_used(&ring, head, 8);
        drv.pop_used().unwrap().unwrap();
        drv.mem.writes.set(0);
        drv.add(0x1000, 16, true).unwrap();
        assert_eq!(drv.mem.writes.get(), 4);
        let (_, desc) = dev.pop_avail_one(&ring).unwrap().unwrap();
        assert_eq!((desc.addr, desc.len, desc.flags), (0x1000, 16, DESC_F_WRITE));
    }

    #[test]
    fn needs_kick_pays_the_barrier_only_before_skipping_a_kick() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let ring = m.raw();
        let mut drv = DriverQueue::new(Counting::new(m.raw()), l).unwrap();
        let dev = DeviceQueue::new(l);
        drv.add(0x1000, 8, false).unwrap();
        // The device asks for kicks: yes, without the store-load barrier.
        assert!(drv.needs_kick());
        assert_eq!(drv.mem.fenced.get(), 0);
        // The device says it is not sleeping: the barrier, then the flag read again.
        dev.set_no_notify(&ring, true);
        assert!(!drv.needs_kick());
        assert_eq!(drv.mem.fenced.get(), 1);
        assert_eq!(ring.read_u16(l.avail_idx()), 1, "the fenced store wrote back the same index");
    }

    #[test]
    fn next_in_order_names_the_oldest_buffer_in_flight() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let ring = m.raw();
        let mut dev = DeviceQueue::new(l);
        assert_eq!(drv.next_in_order(), None);
        let a = drv.add(0x1000, 8, true).unwrap();
        let b = drv.add(0x2000, 8, true).unwrap();
        assert_eq!(drv.next_in_order(), Some(a));
        let (head, _) = dev.pop_avail_one(&ring).unwrap().unwrap();
        dev.push_used(&ring, head, 0);
        drv.pop_used().unwrap().unwrap();
        assert_eq!(drv.next_in_order(), Some(b));
        // Round the ring several times: the hint follows the avail order.
        for i in 0..9u64 {
            let c = drv.add(0x3000 + i * 0x1000, 8, true).unwrap();
            let (head, _) = dev.pop_avail_one(&ring).unwrap().unwrap();
            dev.push_used(&ring, head, 0);
            drv.pop_used().unwrap().unwrap();
            assert_eq!(drv.next_in_order(), Some(c));
        }
        let (head, _) = dev.pop_avail_one(&ring).unwrap().unwrap();
        dev.push_used(&ring, head, 0);
        drv.pop_used().unwrap().unwrap();
        assert_eq!(drv.next_in_order(), None);
    }

    #[test]
    fn device_detects_driver_violations() {
        let mut m = Mem::new(8192);
        let l = Layout::new(4, 4096).unwrap();
        let drv_side = m.raw();
        let mut dev = DeviceQueue::new(l);
        drv_side.write_u16(l.avail_idx(), 9);
        assert!(matches!(dev.pop_avail(&drv_side), Err(DeviceRingError::AvailIndexJump { .. })));
        drv_side.write_u16(l.avail_idx(), 1);
        drv_side.write_u16(l.avail_ring(0), 4);
        assert_eq!(dev.pop_avail(&drv_side), Err(DeviceRingError::HeadOutOfRange { head: 4 }));
        drv_side.write_u16(l.avail_ring(0), 0);
        drv_side.write_u16(l.desc(0) + 12, DESC_F_NEXT);
        drv_side.write_u16(l.desc(0) + 14, 0); // a loop onto itself
        assert_eq!(dev.pop_avail(&drv_side), Err(DeviceRingError::BadChain { head: 0 }));
    }

    #[test]
    fn full_queue_and_kick_suppression() {
        let mut m = Mem::new(8192);
        let l = Layout::new(2, 4096).unwrap();
        let mut drv = DriverQueue::new(m.raw(), l).unwrap();
        let dev = DeviceQueue::new(l);
        drv.add(1, 1, false).unwrap();
        drv.add(2, 1, false).unwrap();
        assert_eq!(drv.add(3, 1, false), Err(RingError::Full));
        assert!(drv.needs_kick());
        dev.set_no_notify(&m.raw(), true);
        assert!(!drv.needs_kick());
    }
}
