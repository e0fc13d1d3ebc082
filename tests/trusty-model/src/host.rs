//! The host harness: simulated guest RAM that both worlds share, a page allocator over it for
//! the normal world, a clock, and two conduits into the model: synchronous (the model runs
//! inside the call, as Trusty does on the calling CPU) and threaded (the model runs on its own
//! thread and does the work a NOP asked for after the NOP has returned).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::boxed::Box;
use std::sync::mpsc;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::Duration;
#[cfg(not(target_os = "linux"))]
use std::time::Instant;
use std::vec::Vec;

use trusty_platform::clock::Clock;
use trusty_platform::mem::{DmaRegion, PageAllocator, PAGE_SIZE};
use trusty_platform::mailbox::EventChannel;
use trusty_platform::smc::Conduit;

use crate::mem::PhysMem;
use crate::model::{Model, ModelConfig};
use crate::timeline::CallTimeline;

/// Size of a stage-2 block: guest RAM is mapped to physical memory in 2 MiB blocks.
pub const STAGE2_BLOCK: u64 = 2 * 1024 * 1024;

/// How the normal world's addresses (IPAs) map to physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2 {
    /// IPA == PA (no hypervisor, dom0, a direct-mapped DomU).
    Identity,
    /// A DomU's RAM: the 2 MiB blocks of guest RAM lie, in reverse order, at `pa_base`, an
    /// address range that is not guest RAM, so an IPA read as a PA misses.
    Translated {
        /// Where the blocks lie in physical address space.
        pa_base: u64,
    },
}

/// Guest RAM: one page-aligned host allocation that stands for the normal world's RAM at
/// `ipa_base`, and for machine memory at the physical addresses `stage2` gives it. The normal
/// world reaches it by IPA (through [`RamAllocator`]); the secure side and the hypervisor
/// stand-ins by PA ([`PhysMem`]), and the model only through what was shared.
pub struct GuestRam {
    ipa_base: u64,
    stage2: Stage2,
    ptr: *mut u8,
    len: usize,
    pages_used: Mutex<Vec<bool>>,
    /// Pages from outside this allocation attached at fresh guest addresses (a client's
    /// memfd mapped by the stack): readers hold the lock while they touch them, so detaching
    /// (under the write lock) never races an access.
    foreign: RwLock<ForeignTable>,
}

/// Guest address of the first page attached with [`GuestRam::attach_foreign`]: far above any
/// guest RAM this harness makes, so the two never overlap.
pub const FOREIGN_IPA_BASE: u64 = 0x80_0000_0000;

/// Under a translating stage-2, foreign pages lie at `ipa + FOREIGN_PA_SHIFT`: an IPA read as a
/// PA misses, as for guest RAM.
const FOREIGN_PA_SHIFT: u64 = 0x40_0000_0000;

#[derive(Default)]
struct ForeignTable {
    regions: Vec<ForeignRegion>,
    /// Next free guest address (addresses are never reused, with a guard page between regions).
    next_ipa: u64,
    next_id: u64,
}

struct ForeignRegion {
    id: u64,
    ipa: u64,
    ptr: *mut u8,
    len: usize,
    keep: Box<dyn Send + Sync>,
}

// SAFETY: the RAM is plain memory that both worlds access with copies and volatile word
// accesses, exactly as two CPUs share physical memory; the page map is behind a mutex.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// `pages` pages of zeroed RAM at guest address `ipa_base` (page-aligned), mapped by `stage2`.
    pub fn new(ipa_base: u64, pages: usize, stage2: Stage2) -> Arc<GuestRam> {
        let len = pages.max(1) * PAGE_SIZE;
        let layout = Layout::from_size_align(len, PAGE_SIZE).expect("page-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of host memory for guest RAM");
        Arc::new(GuestRam {
            ipa_base,
            stage2,
            ptr,
            len,
            pages_used: Mutex::new(vec_false(pages.max(1))),
            foreign: RwLock::new(ForeignTable { next_ipa: FOREIGN_IPA_BASE, ..ForeignTable::default() }),
        })
    }

    /// Attaches `pages` pages of memory this RAM does not own (for example a client's memfd,
    /// mapped by the stack) at a fresh guest address, so that the normal world can share them
    /// with its sharer like any other guest page and the secure side reaches them only through
    /// that share. They stay attached until the returned guard is dropped; `keep` (what keeps
    /// the memory alive, such as the mapping) is dropped after they are detached.
    ///
    /// # Safety
    /// `ptr` must point to `pages * PAGE_SIZE` bytes, page-aligned, that stay valid for reads
    /// and writes until `keep` is dropped. Both worlds may access them concurrently (byte
    /// copies and volatile word accesses, as for guest RAM).
    pub unsafe fn attach_foreign(
        self: &Arc<Self>,
        ptr: std::ptr::NonNull<u8>,
        pages: usize,
        keep: Box<dyn Send + Sync>,
    ) -> Option<ForeignPages> {
        if pages == 0 || (ptr.as_ptr() as usize) % PAGE_SIZE != 0 {
            return None;
        }
        let len = pages.checked_mul(PAGE_SIZE)?;
        let mut t = self.foreign.write().ok()?;
        let ipa = t.next_ipa;
        t.next_ipa = ipa.checked_add(len as u64 + PAGE_SIZE as u64)?;
        let id = t.next_id;
        t.next_id += 1;
        t.regions.push(ForeignRegion { id, ipa, ptr: ptr.as_ptr(), len, keep });
        Some(ForeignPages { ram: self.clone(), id, ipa, ptr, pages })
    }

    /// Regions attached with [`GuestRam::attach_foreign`] and not yet detached.
    pub fn foreign_attached(&self) -> usize {
        self.foreign.read().map(|t| t.regions.len()).unwrap_or(0)
    }

    fn detach_foreign(&self, id: u64) {
        let region = match self.foreign.write() {
            Ok(mut t) => t.regions.iter().position(|r| r.id == id).map(|i| t.regions.swap_remove(i)),
            Err(_) => None,
        };
        // Dropped outside the lock: no reader can be inside the pages any more.
        drop(region.map(|r| r.keep));
    }

    /// The physical address of a foreign guest address under this RAM's stage-2.
    fn foreign_ipa_to_pa(&self, ipa: u64) -> u64 {
        match self.stage2 {
            Stage2::Identity => ipa,
            Stage2::Translated { .. } => ipa + FOREIGN_PA_SHIFT,
        }
    }

    /// Runs `f` on a pointer to `[pa, pa + len)`, if that is memory of this guest (its RAM or
    /// attached foreign pages), holding what keeps foreign pages attached meanwhile.
    fn with_pa<R>(&self, pa: u64, len: usize, f: impl FnOnce(*mut u8) -> R) -> Option<R> {
        if let Some(off) = self.pa_offset(pa, len) {
            // SAFETY: off + len <= self.len (checked by `pa_offset`).
            return Some(f(unsafe { self.ptr.add(off) }));
        }
        let t = self.foreign.read().ok()?;
        for r in &t.regions {
            let start = self.foreign_ipa_to_pa(r.ipa);
            let Some(off) = pa.checked_sub(start) else { continue };
            let Ok(off) = usize::try_from(off) else { continue };
            if off.checked_add(len).is_some_and(|end| end <= r.len) {
                // SAFETY: off + len <= r.len, and the region stays attached (so its memory
                // valid) while the read lock is held.
                return Some(f(unsafe { r.ptr.add(off) }));
            }
        }
        None
    }

    /// The guest address of the first page.
    pub fn ipa_base(&self) -> u64 {
        self.ipa_base
    }

    /// How guest addresses map to physical ones.
    pub fn stage2(&self) -> Stage2 {
        self.stage2
    }

    /// Pages currently handed out.
    pub fn pages_in_use(&self) -> usize {
        self.pages_used.lock().map(|p| p.iter().filter(|&&u| u).count()).unwrap_or(0)
    }

    fn blocks(&self) -> u64 {
        (self.len as u64).div_ceil(STAGE2_BLOCK)
    }

    /// Offset into the allocation of guest address `ipa`, if `[ipa, ipa + len)` is guest RAM.
    fn ipa_offset(&self, ipa: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(ipa.checked_sub(self.ipa_base)?).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// The stage-2 translation of one guest address.
    pub fn ipa_to_pa(&self, ipa: u64) -> Option<u64> {
        let Some(off) = self.ipa_offset(ipa, 1) else {
            let t = self.foreign.read().ok()?;
            let hit = t.regions.iter().any(|r| ipa >= r.ipa && ipa - r.ipa < r.len as u64);
            return hit.then(|| self.foreign_ipa_to_pa(ipa));
        };
        let off = off as u64;
        Some(match self.stage2 {
            Stage2::Identity => ipa,
            Stage2::Translated { pa_base } => {
                let block = off / STAGE2_BLOCK;
                pa_base + (self.blocks() - 1 - block) * STAGE2_BLOCK + off % STAGE2_BLOCK
            }
        })
    }

    /// Offset into the allocation of physical address `pa`, if `[pa, pa + len)` is RAM of this
    /// guest and does not cross a stage-2 block (physically adjacent blocks are not adjacent in
    /// the guest).
    fn pa_offset(&self, pa: u64, len: usize) -> Option<usize> {
        match self.stage2 {
            Stage2::Identity => self.ipa_offset(pa, len),
            Stage2::Translated { pa_base } => {
                let rel = pa.checked_sub(pa_base)?;
                let block = rel / STAGE2_BLOCK;
                if block >= self.blocks() || (rel % STAGE2_BLOCK) + len as u64 > STAGE2_BLOCK {
                    return None;
                }
                let off = (self.blocks() - 1 - block) * STAGE2_BLOCK + rel % STAGE2_BLOCK;
                let off = usize::try_from(off).ok()?;
                (off.checked_add(len)? <= self.len).then_some(off)
            }
        }
    }

    /// Runs `f` on an aligned pointer to the word at `pa`.
    fn with_word<T, R>(&self, pa: u64, f: impl FnOnce(*mut T) -> R) -> Option<R> {
        if pa % std::mem::align_of::<T>() as u64 != 0 {
            return None;
        }
        self.with_pa(pa, std::mem::size_of::<T>(), |p| f(p.cast()))
    }
}

fn vec_false(n: usize) -> Vec<bool> {
    std::vec![false; n]
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, PAGE_SIZE).expect("page-aligned layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, layout) };
    }
}

macro_rules! word_access {
    ($read:ident, $write:ident, $t:ty) => {
        fn $read(&self, pa: u64) -> Option<$t> {
            // SAFETY: in bounds and aligned (checked by `with_word`, which keeps the memory
            // attached meanwhile); volatile: the other world writes concurrently.
            self.with_word::<$t, _>(pa, |p| <$t>::from_le(unsafe { p.read_volatile() }))
        }
        fn $write(&self, pa: u64, v: $t) -> bool {
            // SAFETY: in bounds and aligned (checked by `with_word`).
            self.with_word::<$t, _>(pa, |p| unsafe { p.write_volatile(v.to_le()) }).is_some()
        }
    };
}

impl PhysMem for GuestRam {
    fn contains(&self, pa: u64, len: usize) -> bool {
        self.with_pa(pa, len, |_| ()).is_some()
    }
    fn guest_to_phys(&self, ipa: u64) -> Option<u64> {
        self.ipa_to_pa(ipa)
    }
    fn read(&self, pa: u64, out: &mut [u8]) -> bool {
        let n = out.len();
        // SAFETY: `with_pa` checked that n bytes from p are this guest's memory and keeps them
        // attached during the copy; bytes are copied, not referenced.
        self.with_pa(pa, n, |p| unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), n) }).is_some()
    }
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        // SAFETY: as in `read`.
        self.with_pa(pa, data.len(), |p| unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) })
            .is_some()
    }
    word_access!(read_u16, write_u16, u16);
    word_access!(read_u32, write_u32, u32);
    word_access!(read_u64, write_u64, u64);
    fn direct(&self, pa: u64, len: usize) -> Option<crate::mem::DirectSpan> {
        // Guest RAM only: foreign pages can be detached while a mapping lives, so they keep
        // going through `with_pa` (and its lock) on every access.
        let off = self.pa_offset(pa, len)?;
        // SAFETY: off + len <= self.len (`pa_offset`); the allocation lives, in place, until
        // this RAM is dropped, and a mapping holds it alive through its `Arc<dyn PhysMem>`.
        let ptr = std::ptr::NonNull::new(unsafe { self.ptr.add(off) })?;
        // SAFETY: as above; both worlds access it with copies and volatile words only.
        Some(unsafe { crate::mem::DirectSpan::new(ptr, len) })
    }
}

/// Foreign pages attached to a [`GuestRam`] at a fresh guest address; detached (and what keeps
/// them alive dropped) when this guard is dropped.
pub struct ForeignPages {
    ram: Arc<GuestRam>,
    id: u64,
    ipa: u64,
    ptr: std::ptr::NonNull<u8>,
    pages: usize,
}

// SAFETY: the guard only names the region; the memory is shared by design (see attach_foreign).
unsafe impl Send for ForeignPages {}
// SAFETY: as above; the guard has no interior mutability.
unsafe impl Sync for ForeignPages {}

impl ForeignPages {
    /// Guest address of the first page.
    pub fn ipa(&self) -> u64 {
        self.ipa
    }
    /// Where the normal world reaches the pages.
    pub fn vaddr(&self) -> std::ptr::NonNull<u8> {
        self.ptr
    }
    /// How many pages are attached.
    pub fn pages(&self) -> usize {
        self.pages
    }
    /// The run of guest pages, as a sharer takes it.
    pub fn range(&self) -> trusty_platform::mem::PhysRange {
        trusty_platform::mem::PhysRange { addr: self.ipa, pages: self.pages as u32 }
    }
}

impl Drop for ForeignPages {
    fn drop(&mut self) {
        self.ram.detach_foreign(self.id);
    }
}

/// The normal world's page allocator over [`GuestRam`] (first fit).
pub struct RamAllocator {
    ram: Arc<GuestRam>,
}

impl RamAllocator {
    /// Allocates pages of `ram`.
    pub fn new(ram: Arc<GuestRam>) -> Self {
        RamAllocator { ram }
    }
}

impl PageAllocator for RamAllocator {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        if pages == 0 {
            return None;
        }
        let mut used = self.ram.pages_used.lock().ok()?;
        let mut run = 0usize;
        let mut start = None;
        for (i, &u) in used.iter().enumerate() {
            run = if u { 0 } else { run + 1 };
            if run == pages {
                start = Some(i + 1 - pages);
                break;
            }
        }
        let start = start?;
        used[start..start + pages].iter_mut().for_each(|u| *u = true);
        let off = start * PAGE_SIZE;
        // SAFETY: the pages start..start+pages lie inside the allocation and were free.
        let vaddr = unsafe { self.ram.ptr.add(off) };
        // SAFETY: as above; zeroing memory nobody else holds.
        unsafe { std::ptr::write_bytes(vaddr, 0, pages * PAGE_SIZE) };
        let vaddr = std::ptr::NonNull::new(vaddr)?;
        // SAFETY: the region is owned by the caller until it is freed back here.
        Some(unsafe { DmaRegion::new(vaddr, self.ram.ipa_base + off as u64, pages) })
    }

    unsafe fn free(&mut self, region: DmaRegion) {
        let Some(off) = self.ram.ipa_offset(region.paddr(), region.len()) else { return };
        if let Ok(mut used) = self.ram.pages_used.lock() {
            let first = off / PAGE_SIZE;
            used[first..first + region.pages()].iter_mut().for_each(|u| *u = false);
        }
    }
}

/// Monotonic time: CLOCK_MONOTONIC on Linux (read directly, beside its coarse twin), `Instant`
/// elsewhere.
pub struct StdClock {
    #[cfg(not(target_os = "linux"))]
    origin: Instant,
    /// CLOCK_MONOTONIC at the start.
    #[cfg(target_os = "linux")]
    origin_ns: u64,
    /// The tick of CLOCK_MONOTONIC_COARSE, if the kernel has it.
    #[cfg(target_os = "linux")]
    coarse_tick_ns: Option<u64>,
}

impl StdClock {
    /// A clock starting now.
    pub fn new() -> Arc<StdClock> {
        Arc::new(StdClock {
            #[cfg(not(target_os = "linux"))]
            origin: Instant::now(),
            #[cfg(target_os = "linux")]
            origin_ns: linux_clock::read(libc::CLOCK_MONOTONIC),
            #[cfg(target_os = "linux")]
            coarse_tick_ns: linux_clock::coarse_tick_ns(),
        })
    }
}

/// Linux's clocks read directly (`Instant` offers no coarse one).
#[cfg(target_os = "linux")]
mod linux_clock {
    /// Nanoseconds of `clock`, 0 if it cannot be read.
    pub(super) fn read(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec into `ts`, which lives across the call.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return 0;
        }
        (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
    }

    /// The tick of CLOCK_MONOTONIC_COARSE (its resolution), if the kernel has that clock.
    pub(super) fn coarse_tick_ns() -> Option<u64> {
        let mut res = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_getres writes one timespec into `res`, which lives across the call.
        if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
            return None;
        }
        Some((res.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(res.tv_nsec as u64)).filter(|&t| t > 0)
    }
}

impl Clock for StdClock {
    fn now_ns(&self) -> u64 {
        #[cfg(target_os = "linux")]
        return linux_clock::read(libc::CLOCK_MONOTONIC).saturating_sub(self.origin_ns);
        #[cfg(not(target_os = "linux"))]
        return self.origin.elapsed().as_nanos() as u64;
    }
    fn sleep_ns(&self, ns: u64) {
        thread::sleep(Duration::from_nanos(ns));
    }
    fn relax(&self) {
        // Between polls of a peer that needs time to pass (service timers): short sleeps keep
        // an idle wait from burning a core.
        thread::sleep(Duration::from_micros(50));
    }
    fn now_coarse_ns(&self, max_lag_ns: u64) -> (u64, u64) {
        // Stale by up to a kernel tick, so every run on the model (AOSP's closer3 among them)
        // has the stack's idle catch-up decide on a coarse reading as it does on Linux: on a
        // Linux host the kernel's own CLOCK_MONOTONIC_COARSE (a few ns from the vDSO, as the
        // stack's Linux clock reads it; a precise reading costs tens of ns in a VM, which the
        // benchmarks would count as the stack's), elsewhere a precise reading rounded down to
        // a 4 ms tick (Linux at `CONFIG_HZ=250`).
        // The coarse clock is CLOCK_MONOTONIC as of the last tick: never ahead of `now_ns`,
        // at most one tick behind it.
        #[cfg(target_os = "linux")]
        if let Some(tick) = self.coarse_tick_ns {
            if tick <= max_lag_ns {
                return (linux_clock::read(libc::CLOCK_MONOTONIC_COARSE).saturating_sub(self.origin_ns), tick);
            }
            return (self.now_ns(), 0);
        }
        let now = self.now_ns();
        if COARSE_TICK_NS > max_lag_ns {
            return (now, 0);
        }
        (now - now % COARSE_TICK_NS, COARSE_TICK_NS)
    }
}

/// The tick of [`StdClock`]'s coarse reading where the host has no coarse clock.
const COARSE_TICK_NS: u64 = 4_000_000;

/// The model runs inside each call, on the caller's thread.
pub struct SyncConduit {
    model: Arc<Mutex<Model>>,
}

impl Conduit for SyncConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        match self.model.lock() {
            Ok(mut m) => m.smc(regs),
            // A poisoned model (a bug in it) looks like a panicked Trusty.
            Err(_) => [(-11i32) as u32 as u64, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

enum Request {
    Call([u64; 8], mpsc::SyncSender<[u64; 8]>),
    /// An event on a channel to the Trusty VM: a call waits in the mailbox.
    Event,
    Stop,
}

/// Event channels from the guest to a Trusty VM model: a notification makes the VM serve its
/// mailbox, inside the call (sync) or on the model's thread (threaded).
pub struct HostEvents {
    model: Arc<Mutex<Model>>,
    thread: Option<mpsc::Sender<Request>>,
}

impl EventChannel for HostEvents {
    fn notify(&self, _port: u32) {
        match &self.thread {
            Some(tx) => {
                let _ = tx.send(Request::Event);
            }
            None => {
                if let Ok(mut m) = self.model.lock() {
                    m.serve_mailbox();
                }
            }
        }
    }
}

/// The model runs on its own thread; calls are messages to it.
pub struct ThreadedConduit {
    requests: mpsc::Sender<Request>,
}

impl Conduit for ThreadedConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        if self.requests.send(Request::Call(regs, reply_tx)).is_err() {
            return [(-11i32) as u32 as u64, 0, 0, 0, 0, 0, 0, 0];
        }
        reply_rx.recv().unwrap_or([(-11i32) as u32 as u64, 0, 0, 0, 0, 0, 0, 0])
    }
}

/// How the model is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelMode {
    /// Inside each call (`-D sim`).
    Sync,
    /// On its own thread (`-D sim-threaded`).
    Threaded,
    /// On its own thread pinned to another core, polling a mailbox page (`-D sim-cores`): the
    /// cross-core case of a Trusty VM on another CPU. Calls travel through
    /// [`trusty_platform::mailbox::MailboxConduit`], the Xen Trusty VM's transport, with no
    /// lock, channel or allocation on their path.
    Cores,
}

/// A simulated machine: guest RAM, the model, a clock and a conduit into the model.
pub struct Sim {
    ram: Arc<GuestRam>,
    clock: Arc<StdClock>,
    model: Arc<Mutex<Model>>,
    conduit: Arc<dyn Conduit>,
    thread: Option<(mpsc::Sender<Request>, thread::JoinHandle<()>)>,
    cores: Option<Box<CoresThread>>,
}

/// Physical address of simulated guest RAM (as in QEMU's `virt` machine).
pub const RAM_BASE: u64 = 0x4000_0000;
/// Pages of simulated guest RAM (16 MiB).
pub const RAM_PAGES: usize = 4096;

impl Sim {
    /// A machine whose guest RAM is mapped 1:1 (no hypervisor, or a direct-mapped domain).
    pub fn new(mode: ModelMode, cfg: ModelConfig) -> Sim {
        Sim::with_stage2(mode, cfg, Stage2::Identity)
    }

    /// A machine whose guest RAM is mapped by `stage2`.
    pub fn with_stage2(mode: ModelMode, mut cfg: ModelConfig, stage2: Stage2) -> Sim {
        let ram = GuestRam::new(RAM_BASE, RAM_PAGES, stage2);
        let clock = StdClock::new();
        // Only the threaded mode leaves a call's work for after the call: in `Cores` mode the
        // model thread finishes it before it answers, as the Trusty VM image does under QEMU
        // (its NOP answers when Trusty is idle, lib/sm's sm_wait_for_smcall()), so an echo is
        // one call and its answer is in the ring when the call returns.
        cfg.deferred = mode == ModelMode::Threaded;
        let model = Arc::new(Mutex::new(Model::new(cfg, ram.clone(), clock.clone())));
        match mode {
            ModelMode::Sync => {
                let conduit = Arc::new(SyncConduit { model: model.clone() });
                Sim { ram, clock, model, conduit, thread: None, cores: None }
            }
            ModelMode::Cores => {
                let (conduit, cores) = CoresThread::spawn(model.clone(), clock.clone());
                Sim { ram, clock, model, conduit, thread: None, cores: Some(Box::new(cores)) }
            }
            ModelMode::Threaded => {
                let (tx, rx) = mpsc::channel();
                let m = model.clone();
                let c = clock.clone();
                let handle = thread::Builder::new()
                    .name("trusty-model".into())
                    .spawn(move || model_thread(m, c, rx))
                    .expect("spawn the model thread");
                let conduit = Arc::new(ThreadedConduit { requests: tx.clone() });
                Sim { ram, clock, model, conduit, thread: Some((tx, handle)), cores: None }
            }
        }
    }

    /// The conduit the stack calls through.
    pub fn conduit(&self) -> Arc<dyn Conduit> {
        self.conduit.clone()
    }
    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }
    /// A page allocator over the guest RAM.
    pub fn allocator(&self) -> Box<dyn PageAllocator> {
        Box::new(RamAllocator::new(self.ram.clone()))
    }
    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    /// Event channels to the model (when it plays a Trusty VM).
    pub fn events(&self) -> Arc<dyn EventChannel> {
        if let Some(c) = &self.cores {
            return Arc::new(Unpark(c.handle.thread().clone()));
        }
        Arc::new(HostEvents { model: self.model.clone(), thread: self.thread.as_ref().map(|(tx, _)| tx.clone()) })
    }
    /// What the simulated hypervisor answers to XENVER_get_features (None: there is no Xen).
    pub fn xen_features(&self) -> Option<u32> {
        self.model().config().xen_features
    }
    /// A hook for the stack's bring-up: a page of guest RAM for the grant table, registered with
    /// the simulated hypervisor (on Xen the guest maps the table's frames instead).
    #[allow(clippy::type_complexity)]
    pub fn grant_table_provider(
        &self,
    ) -> Box<dyn FnMut() -> Result<(std::ptr::NonNull<u8>, usize), trusty_platform::Error> + Send> {
        let model = self.model.clone();
        let mut allocator = RamAllocator::new(self.ram.clone());
        Box::new(move || {
            let page = allocator.alloc_zeroed(1).ok_or(trusty_platform::Error::OutOfMemory)?;
            let mut m = model.lock().map_err(|_| trusty_platform::Error::InvalidArgument("simulated hypervisor is gone"))?;
            m.set_grant_table(page.paddr(), (PAGE_SIZE / 8) as u32);
            // The page now belongs to the grant table for good.
            Ok((page.vaddr(), PAGE_SIZE))
        })
    }
    /// The simulated hypervisor learns where the guest's grant table is (on Xen, the guest maps
    /// the table's frames with XENMEM_add_to_physmap).
    pub fn register_grant_table(&self, ipa: u64, entries: u32) {
        self.model().set_grant_table(ipa, entries);
    }
    /// The model, for inspection and fault injection between calls.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        match self.model.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(c) = self.cores.take() {
            c.stop.stop();
            c.handle.thread().unpark();
            let _ = c.handle.join();
        }
        if let Some((tx, handle)) = self.thread.take() {
            let _ = tx.send(Request::Stop);
            let _ = handle.join();
        }
    }
}

fn model_thread(model: Arc<Mutex<Model>>, clock: Arc<StdClock>, rx: mpsc::Receiver<Request>) {
    loop {
        let wait = {
            let m = match model.lock() {
                Ok(m) => m,
                Err(_) => return,
            };
            if m.has_pending_work() {
                Duration::ZERO
            } else {
                let now = clock.now_ns();
                let until = m.next_deadline().map_or(u64::MAX, |d| d.saturating_sub(now));
                Duration::from_nanos(until.min(10_000_000))
            }
        };
        match rx.recv_timeout(wait) {
            Ok(Request::Call(regs, reply)) => {
                let out = match model.lock() {
                    Ok(mut m) => m.smc(regs),
                    Err(_) => return,
                };
                let _ = reply.send(out);
            }
            Ok(Request::Event) => {
                if let Ok(mut m) = model.lock() {
                    m.serve_mailbox();
                }
            }
            Ok(Request::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // The work a call asked for happens after it returned, on this thread.
        if let Ok(mut m) = model.lock() {
            m.run_background();
        }
    }
}

/// A page-aligned page of host memory: the mailbox of the `Cores` mode's SMC path.
#[repr(C, align(4096))]
struct MailboxPage(std::cell::UnsafeCell<[u8; PAGE_SIZE]>);

// SAFETY: the page is shared between exactly two threads (the conduit's caller and the serving
// thread), which access it only with volatile word accesses ordered by fences (the mailbox
// protocol), as two CPUs share memory.
unsafe impl Send for MailboxPage {}
// SAFETY: as above.
unsafe impl Sync for MailboxPage {}

impl MailboxPage {
    fn zeroed() -> Arc<MailboxPage> {
        Arc::new(MailboxPage(std::cell::UnsafeCell::new([0; PAGE_SIZE])))
    }
    fn ptr(&self) -> *mut u8 {
        self.0.get().cast()
    }
}

/// A mailbox page in host memory, shared by a normal-world [`MailboxConduit`] on one thread and
/// a [`MailboxServer`] on another: the Xen Trusty VM's mailbox protocol
/// (`trusty_platform::mailbox`) between two host threads, as between two CPUs.
///
/// [`MailboxConduit`]: trusty_platform::mailbox::MailboxConduit
pub struct HostMailbox {
    page: Arc<MailboxPage>,
    /// Its own timeline, if timelines were enabled when it was made ([`crate::timeline::enable`]).
    timeline: Option<Arc<CallTimeline>>,
}

impl Default for HostMailbox {
    fn default() -> Self {
        HostMailbox::new()
    }
}

impl HostMailbox {
    /// A fresh, zeroed page.
    pub fn new() -> HostMailbox {
        HostMailbox {
            page: MailboxPage::zeroed(),
            timeline: crate::timeline::for_new_mailbox(),
        }
    }

    /// A fresh page whose two ends stamp their calls on `timeline`.
    pub fn with_timeline(timeline: Arc<CallTimeline>) -> HostMailbox {
        HostMailbox { page: MailboxPage::zeroed(), timeline: Some(timeline) }
    }

    /// The normal world's end: a [`MailboxConduit`] over this page that signals the server
    /// through `events` and times calls with `clock`. It holds the page alive.
    ///
    /// [`MailboxConduit`]: trusty_platform::mailbox::MailboxConduit
    pub fn conduit(&self, events: Arc<dyn EventChannel>, clock: Arc<dyn Clock>, timeout_ms: u64) -> Arc<dyn Conduit> {
        let page_ptr = std::ptr::NonNull::new(self.page.ptr()).expect("an allocated page");
        // SAFETY: the page is page-aligned and 4 KiB, kept alive by the conduit (and the
        // server) for as long as either uses it, and nothing but these two touch it.
        let inner = unsafe { trusty_platform::mailbox::MailboxConduit::new(page_ptr, events, clock, 0, timeout_ms) };
        Arc::new(HostConduit { inner, _page: self.page.clone(), timeline: self.timeline.clone() })
    }

    /// The serving end (the Trusty VM's side), for another thread.
    pub fn server(&self) -> MailboxServer {
        MailboxServer { page: self.page.clone(), served: 0, timeline: self.timeline.clone() }
    }
}

/// The host mailbox conduit, holding the page it points into so the page outlives every user.
struct HostConduit {
    inner: trusty_platform::mailbox::MailboxConduit,
    _page: Arc<MailboxPage>,
    timeline: Option<Arc<CallTimeline>>,
}

impl Conduit for HostConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        match &self.timeline {
            None => self.inner.call(regs),
            Some(t) => {
                let n = t.next_call();
                if !t.is_recording() {
                    return self.inner.call(regs);
                }
                let entered = crate::timeline::ticks();
                let out = self.inner.call(regs);
                let returned = crate::timeline::ticks();
                t.record_call(n, entered, returned);
                out
            }
        }
    }
}

/// The Trusty VM's end of a [`HostMailbox`]: serves each request the conduit publishes once,
/// in order, as the Xen Trusty VM image does with the guest's mailbox.
pub struct MailboxServer {
    page: Arc<MailboxPage>,
    /// Sequence number of the last request served.
    served: u32,
    timeline: Option<Arc<CallTimeline>>,
}

impl MailboxServer {
    fn word32(&self, off: usize) -> u32 {
        // SAFETY: `off` is a protocol constant inside the 4 KiB page this server holds alive,
        // aligned for a u32.
        u32::from_le(unsafe { self.page.ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Serves the request published since the last one, if there is one: `serve` gets its
    /// registers and returns the answer's, which is published with its sequence number. True if
    /// a request was served. Reads one word of the page when there is none.
    pub fn poll(&mut self, serve: impl FnOnce([u64; 8]) -> [u64; 8]) -> bool {
        use trusty_platform::mailbox as mb;
        let req = self.word32(mb::OFF_REQ_SEQ);
        if req == self.served || self.word32(mb::OFF_MAGIC) != mb::MAILBOX_MAGIC {
            return false;
        }
        let timeline = self.timeline.as_ref().filter(|t| t.is_recording());
        let seen = timeline.map(|_| crate::timeline::ticks());
        let page = self.page.ptr();
        // Acquire pairs with the conduit's Release before it stores the request sequence word
        // (`MailboxConduit::publish`): the request registers are visible now.
        fence(Ordering::Acquire);
        let mut regs = [0u64; 8];
        for (i, r) in regs.iter_mut().enumerate() {
            // SAFETY: the request words are protocol constants inside the page, 8-byte aligned.
            *r = u64::from_le(unsafe { page.add(mb::OFF_REQUEST + 8 * i).cast::<u64>().read_volatile() });
        }
        let out = serve(regs);
        for (i, r) in out.iter().enumerate() {
            // Unchanged words stay unwritten (the conduit does the same with its requests): the
            // answers of a data path's NOPs are all alike, so only the sequence word's line goes
            // back to the caller's core.
            // SAFETY: the response words are protocol constants inside the page, 8-byte aligned.
            let word = unsafe { page.add(mb::OFF_RESPONSE + 8 * i).cast::<u64>() };
            // SAFETY: as above.
            if unsafe { word.read_volatile() } != r.to_le() {
                // SAFETY: as above.
                unsafe { word.write_volatile(r.to_le()) };
            }
        }
        // Release pairs with the conduit's Acquire after it sees the response sequence word
        // (`MailboxConduit::answered`): the answer registers are visible first.
        fence(Ordering::Release);
        let answered = timeline.map(|_| crate::timeline::ticks());
        // SAFETY: the response sequence word is a protocol constant inside the page, aligned.
        unsafe { page.add(mb::OFF_RSP_SEQ).cast::<u32>().write_volatile(req.to_le()) };
        if let (Some(t), Some(seen), Some(answered)) = (timeline, seen, answered) {
            t.record_serve(req, seen, answered);
        }
        self.served = req;
        true
    }

    /// Serves requests with `serve` until `stop` is raised, as a polling thread of its own: it
    /// spins while requests come, and after `spin_ns` without one sleeps (at most `park_ns` at
    /// a time) until the caller's event unparks it ([`IdleSpin`], [`Unpark`]). The stack peer's
    /// thread and the bench's transport reference serve this way; the model's thread, which
    /// also runs timers and left-over work, has its own loop. `between` runs after each
    /// answer, while the caller works on it (a peer's preparation for the next request).
    pub fn serve_until_stopped(
        &mut self,
        stop: &StopFlag,
        spin_ns: u64,
        park_ns: u64,
        mut serve: impl FnMut([u64; 8]) -> [u64; 8],
        mut between: impl FnMut(),
    ) {
        let start = std::time::Instant::now();
        let mut idle = IdleSpin::new(spin_ns);
        while !stop.stopped() {
            if self.poll(&mut serve) {
                between();
                idle.worked();
            } else if idle.spin() {
                idle.rest(start.elapsed().as_nanos() as u64, park_ns);
            }
        }
    }
}

/// A polling thread's stop flag, alone in its cache lines (128 bytes: a line and the one
/// fetched with it): the thread reads it on every poll, and a heap neighbour written by the
/// stack's core would otherwise pull that line away from it each time.
#[repr(C, align(128))]
#[derive(Default)]
pub struct StopFlag(AtomicBool);

impl StopFlag {
    /// Tells the thread to stop (it sees it at its next poll; unpark it if it may sleep).
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether the thread was told to stop.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The model's thread in [`ModelMode::Cores`].
struct CoresThread {
    stop: Arc<StopFlag>,
    handle: thread::JoinHandle<()>,
}

/// An event to a polling thread (the model's, a peer's): unparks it if it went to sleep after
/// spinning idle (an atomic store when it is spinning, a futex wake only when it sleeps).
pub struct Unpark(pub thread::Thread);

impl EventChannel for Unpark {
    fn notify(&self, _port: u32) {
        self.0.unpark();
    }
}

/// How long the model thread spins without work before it sleeps until an event or a timer.
const MODEL_SPIN_NS: u64 = 200_000;
/// Longest sleep of an idle model thread (it also wakes on every event).
const MODEL_PARK_NS: u64 = 10_000_000;
/// Timeout of the host mailbox's calls: generous (the model is local), and a fast call waits
/// at least `FAST_CALL_MIN_WAIT_MS` anyway.
const CORES_MAILBOX_TIMEOUT_MS: u64 = 5_000;

/// Pins the calling thread to CPU `cpu` (Linux `sched_setaffinity`); false if that failed or
/// is not supported here. Performance only: nothing depends on it.
pub fn pin_to_cpu(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
        }
        let mut mask = [0u64; 16];
        if cpu >= mask.len() * 64 {
            return false;
        }
        mask[cpu / 64] |= 1 << (cpu % 64);
        // SAFETY: pid 0 is the calling thread; the mask is 1024 bits (the size of glibc's
        // cpu_set_t), valid for the call, which only reads it.
        unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

/// Lets the calling thread run on every CPU (Linux `sched_setaffinity` with a full mask; the
/// kernel keeps only the CPUs the process's cpuset allows). False if that failed.
fn unpin() -> bool {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
        }
        let mask = [u64::MAX; 16];
        // SAFETY: as in `pin_to_cpu`: pid 0 is the calling thread, the mask is 1024 bits and
        // only read.
        unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// CPUs online on this machine (1 if unknown). Not the calling thread's affinity: a thread
/// pinned to one core (as a benchmark pins itself) must still learn that there is another one,
/// and a thread it spawns inherits that pin (`std::thread::available_parallelism` would say 1
/// in both).
pub fn cpu_count() -> usize {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn sysconf(name: i32) -> std::os::raw::c_long;
        }
        // glibc and musl both number it 84 on Linux.
        const SC_NPROCESSORS_ONLN: i32 = 84;
        // SAFETY: sysconf only reads its integer argument.
        let n = unsafe { sysconf(SC_NPROCESSORS_ONLN) };
        if n > 0 {
            return usize::try_from(n).unwrap_or(1);
        }
    }
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Moves the calling thread, a polling server, to the last core: a benchmark pins its own
/// thread to core 0. A thread is born with its creator's affinity; if the last core is not ours
/// to take, it at least must not stay pinned to the creator's core (where it would run only
/// while the stack sleeps: every call would wait out the stack's spin and one pause, ~160 us).
pub fn move_to_last_core() {
    let cpus = cpu_count();
    if cpus > 1 && !pin_to_cpu(cpus - 1) {
        unpin();
    }
}

impl CoresThread {
    fn spawn(model: Arc<Mutex<Model>>, clock: Arc<StdClock>) -> (Arc<dyn Conduit>, CoresThread) {
        let mailbox = HostMailbox::new();
        let server = mailbox.server();
        let stop: Arc<StopFlag> = Arc::default();
        let s = stop.clone();
        let c = clock.clone();
        let handle = thread::Builder::new()
            .name("trusty-model-core".into())
            .spawn(move || {
                move_to_last_core();
                cores_thread(model, c, server, &s)
            })
            .expect("spawn the model thread");
        let conduit = mailbox.conduit(Arc::new(Unpark(handle.thread().clone())), clock, CORES_MAILBOX_TIMEOUT_MS);
        (conduit, CoresThread { stop, handle })
    }
}

/// The model thread of [`ModelMode::Cores`]: spins on the host mailbox (SMC calls) and, for a
/// Trusty VM profile, the guest's mailbox page; runs the work calls left; sleeps after
/// [`MODEL_SPIN_NS`] idle until an event unparks it or a service timer is due.
fn cores_thread(model: Arc<Mutex<Model>>, clock: Arc<StdClock>, mut server: MailboxServer, stop: &StopFlag) {
    let mut idle = IdleSpin::new(MODEL_SPIN_NS);
    // A Trusty VM profile also has the guest's own mailbox to watch on every poll; otherwise
    // the spin touches only the host mailbox words, and the model (its lock) only when a
    // request came or every 64 polls (timers, work left by a call).
    let vm = match model.lock() {
        Ok(m) => matches!(m.config().path, crate::model::Path::XenVm { .. }),
        Err(_) => return,
    };
    while !stop.stopped() {
        // Work a served call left behind (seen under the call's own lock: no second lock
        // per call when there is none, which is always outside threaded mode).
        let mut left_work = false;
        let mut poisoned = false;
        let mut worked = server.poll(|regs| match model.lock() {
            Ok(mut m) => {
                m.prefetch_rings();
                let out = m.smc(regs);
                left_work = m.has_pending_work();
                out
            }
            Err(_) => {
                poisoned = true;
                // The model panicked under its lock: the caller hears what Trusty says after a
                // panic, and this thread ends.
                [u64::from(trusty_platform::smc::SmError::Panic.code() as u32), 0, 0, 0, 0, 0, 0, 0]
            }
        });
        if poisoned {
            return;
        }
        if worked || vm || left_work {
            let Ok(mut m) = model.lock() else { return };
            if worked {
                // The answer is out: while the caller works, the next frame out gets its lines.
                m.prepare_next_rx_write();
            }
            if vm || left_work {
                // A Trusty VM profile: the guest's own mailbox (granted page), the same protocol.
                worked |= m.serve_mailbox();
                if m.has_pending_work() {
                    m.run_background();
                    worked = true;
                }
            }
        }
        if worked {
            idle.worked();
            continue;
        }
        if !idle.spin() {
            continue;
        }
        let now = clock.now_ns();
        let Ok(mut m) = model.lock() else { return };
        let next = m.next_deadline();
        if next.is_some_and(|d| d <= now) || m.has_pending_work() {
            m.run_background();
            idle.worked();
            continue;
        }
        drop(m);
        idle.rest(now, next.map_or(MODEL_PARK_NS, |d| d.saturating_sub(now)).min(MODEL_PARK_NS));
    }
}

/// The idle side of a polling thread (the model's, a peer's): it spins, looks at the clock once
/// per [`IdleSpin::POLLS`] polls, and after a stretch of idle spinning sleeps until an event
/// ([`Unpark`]) or a deadline. A token from an unpark that came before the park makes the park
/// return at once, so no request is missed.
pub struct IdleSpin {
    spin_ns: u64,
    polls: u32,
    idle_since: Option<u64>,
}

impl IdleSpin {
    /// Polls between two clock reads.
    pub const POLLS: u32 = 64;

    /// Spins for `spin_ns` of idleness before it sleeps.
    pub fn new(spin_ns: u64) -> IdleSpin {
        IdleSpin { spin_ns, polls: 0, idle_since: None }
    }
    /// The poll found work: idleness starts again from zero.
    pub fn worked(&mut self) {
        self.polls = 0;
        self.idle_since = None;
    }
    /// One idle poll (a spin-loop hint); true once every [`IdleSpin::POLLS`]: time to read the
    /// clock and call [`IdleSpin::rest`].
    pub fn spin(&mut self) -> bool {
        std::hint::spin_loop();
        self.polls += 1;
        if self.polls < Self::POLLS {
            return false;
        }
        self.polls = 0;
        true
    }
    /// Nothing to do at `now` (ns, any monotonic clock): sleeps for at most `max_sleep_ns` once
    /// idle for the spin time.
    pub fn rest(&mut self, now: u64, max_sleep_ns: u64) {
        let since = *self.idle_since.get_or_insert(now);
        if now.saturating_sub(since) >= self.spin_ns {
            thread::park_timeout(Duration::from_nanos(max_sleep_ns));
            self.idle_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Both ends of a host mailbox stamp each call on its timeline, and a round trip of one
    /// call splits into parts that add up to it.
    #[test]
    fn a_host_mailbox_splits_its_calls_on_its_timeline() {
        let timeline = Arc::new(CallTimeline::new());
        let mailbox = HostMailbox::with_timeline(timeline.clone());
        let mut server = mailbox.server();
        let stop = Arc::new(StopFlag::default());
        let stop2 = stop.clone();
        let peer = thread::spawn(move || {
            while !stop2.stopped() {
                if !server.poll(|regs| [regs[0] + 1, 0, 0, 0, 0, 0, 0, 0]) {
                    std::hint::spin_loop();
                }
            }
        });
        let conduit = mailbox.conduit(Arc::new(Unpark(peer.thread().clone())), StdClock::new(), 1_000);
        assert_eq!(conduit.call([41, 0, 0, 0, 0, 0, 0, 0])[0], 42, "unrecorded calls still go through");
        let mut x = 0;
        let (s, counted) = crate::timeline::split_round_trips(&timeline, 200, || {
            x += 2;
            let out = conduit.call([x, 0, 0, 0, 0, 0, 0, 0]);
            if out[0] == x + 1 {
                Ok(())
            } else {
                Err(out[0])
            }
        })
        .expect("every call answered");
        stop.stop();
        peer.join().unwrap();
        assert_eq!(counted, 200, "every round trip was one matched call");
        for v in [s.before, s.request, s.serve, s.answer, s.after] {
            assert!(v.is_finite() && v >= 0.0, "{s:?}");
        }
        assert_eq!(timeline.calls(), 201);
    }

    /// The coarse reading the stack's idle catch-up uses is stale by at most the lag it
    /// reports and never ahead of the precise one; asked for less lag, the clock answers
    /// precisely.
    #[test]
    fn the_coarse_reading_is_never_ahead_and_at_most_its_lag_behind() {
        let clock = StdClock::new();
        let (_, lag) = clock.now_coarse_ns(10_000_000);
        // A kernel ticks at 100 to 1000 Hz; elsewhere the clock's own 4 ms tick.
        assert!((1_000_000..=10_000_000).contains(&lag), "coarse lag {lag} ns");
        for _ in 0..1000 {
            let before = clock.now_ns();
            let (coarse, l) = clock.now_coarse_ns(lag);
            let after = clock.now_ns();
            assert_eq!(l, lag);
            assert!(coarse <= after, "coarse {coarse} ahead of {after}");
            assert!(coarse + lag >= before, "coarse {coarse} more than {lag} ns behind {before}");
        }
        let before = clock.now_ns();
        let (now, l) = clock.now_coarse_ns(lag - 1);
        assert_eq!(l, 0);
        assert!(now >= before && now <= clock.now_ns());
    }

    /// The CPUs a thread of this process may run on, from /proc (Linux), e.g. "0-1".
    #[cfg(target_os = "linux")]
    fn allowed_cpus(tid: &str) -> std::string::String {
        use std::string::ToString;
        let status = std::fs::read_to_string(std::format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
        line.split_whitespace().nth(1).unwrap().to_string()
    }

    /// A caller pinned to core 0 (as tipc-bench pins itself) still learns every core, and the
    /// `Cores` model thread it starts does not stay on core 0 with it: pinned there, the model
    /// ran only while the stack slept, and every call waited ~160 us.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_caller_pinned_to_core_0_gets_the_model_thread_on_another_core() {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            std::eprintln!("one core only: nothing to check");
            return;
        }
        thread::spawn(move || {
            assert!(pin_to_cpu(0));
            assert_eq!(cpu_count(), cpus, "a pinned thread still sees every core");
            let sim = Sim::new(ModelMode::Cores, ModelConfig::default());
            // The thread names and pins itself as it starts: give it up to 5 s.
            let start = Instant::now();
            let model_cpus = loop {
                let found = std::fs::read_dir("/proc/self/task")
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|tid| {
                        std::fs::read_to_string(std::format!("/proc/self/task/{tid}/comm"))
                            .is_ok_and(|c| c.trim_end() == "trusty-model-co")
                    })
                    .map(|tid| allowed_cpus(&tid));
                match found {
                    Some(c) if c != "0" => break c,
                    _ if start.elapsed() > Duration::from_secs(5) => break found.unwrap_or_default(),
                    _ => thread::sleep(Duration::from_millis(1)),
                }
            };
            assert!(!model_cpus.is_empty(), "no model thread found");
            assert_ne!(model_cpus, "0", "the model thread shares the caller's core");
            drop(sim);
        })
        .join()
        .unwrap();
    }

    /// Pages from outside guest RAM, attached at a fresh guest address: reachable by the secure
    /// side only at their physical address under the stage-2 (an IPA read as a PA misses when
    /// translated), writes land in the foreign memory itself, and after the guard is dropped
    /// nothing is reachable any more and what kept the memory alive is dropped.
    #[test]
    fn foreign_pages_attach_translate_and_detach() {
        for stage2 in [Stage2::Identity, Stage2::Translated { pa_base: 0x8000_0000 }] {
            let ram = GuestRam::new(0x4000_0000, 16, stage2);
            let layout = Layout::from_size_align(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
            // SAFETY: non-zero size.
            let mem = unsafe { alloc_zeroed(layout) };
            let ptr = std::ptr::NonNull::new(mem).unwrap();
            struct Keep(*mut u8, Layout, Arc<std::sync::atomic::AtomicBool>);
            // SAFETY: test memory, only freed here.
            unsafe impl Send for Keep {}
            // SAFETY: as above.
            unsafe impl Sync for Keep {}
            impl Drop for Keep {
                fn drop(&mut self) {
                    self.2.store(true, std::sync::atomic::Ordering::SeqCst);
                    // SAFETY: allocated above with this layout; detached before this drop.
                    unsafe { dealloc(self.0, self.1) };
                }
            }
            let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            // SAFETY: 2 pages, page-aligned, freed only by `Keep` after detaching.
            let guard = unsafe { ram.attach_foreign(ptr, 2, Box::new(Keep(mem, layout, freed.clone()))) }.unwrap();
            assert_eq!(guard.ipa(), FOREIGN_IPA_BASE);
            assert_eq!(ram.foreign_attached(), 1);
            let pa = ram.ipa_to_pa(guard.ipa() + 4096).unwrap();
            assert_eq!(pa == guard.ipa() + 4096, stage2 == Stage2::Identity);
            assert!(PhysMem::write(&*ram, pa, b"secure"));
            // SAFETY: reading the test's own memory, still attached.
            assert_eq!(unsafe { std::slice::from_raw_parts(mem.add(4096), 6) }, b"secure");
            assert!(!PhysMem::contains(&*ram, pa, 4097), "not past the end");
            if stage2 != Stage2::Identity {
                assert!(!PhysMem::contains(&*ram, guard.ipa(), 1), "an IPA is not a PA");
            }
            assert_eq!(PhysMem::read_u32(&*ram, pa), Some(u32::from_le_bytes(*b"secu")));
            drop(guard);
            assert!(freed.load(std::sync::atomic::Ordering::SeqCst));
            assert_eq!(ram.foreign_attached(), 0);
            assert!(!PhysMem::contains(&*ram, pa, 1));
            assert_eq!(ram.ipa_to_pa(FOREIGN_IPA_BASE), None);
            // Addresses are not reused: a second region gets a fresh one.
            let mem2 = {
                // SAFETY: non-zero size.
                let m = unsafe { alloc_zeroed(layout) };
                std::ptr::NonNull::new(m).unwrap()
            };
            // SAFETY: as above.
            let g2 = unsafe { ram.attach_foreign(mem2, 1, Box::new(Keep(mem2.as_ptr(), layout, Arc::new(Default::default())))) }.unwrap();
            assert!(g2.ipa() > FOREIGN_IPA_BASE + 2 * PAGE_SIZE as u64);
        }
    }

    /// A Trusty VM told by a rendezvous that the guest's mailbox is at another grant
    /// reference serves it there, and no longer looks at `MAILBOX_GREF`.
    #[test]
    fn a_vm_serves_the_mailbox_at_the_reference_a_rendezvous_named() {
        use crate::mem::{GrantMapError, GrantMapper};
        use crate::model::{Model, Path};
        use trusty_platform::mailbox as mb;
        /// Grants only reference 20, as the page at `pa`.
        struct OneGrant(u64);
        impl GrantMapper for OneGrant {
            fn map(&mut self, gref: u32, _write: bool) -> Result<(u64, u32), GrantMapError> {
                if gref == 20 {
                    Ok((self.0, gref))
                } else {
                    Err(GrantMapError::NotGranted)
                }
            }
            fn unmap(&mut self, _addr: u64, _handle: u32) {}
        }
        let ram = GuestRam::new(0x4000_0000, 4, Stage2::Identity);
        let page = 0x4000_1000;
        let cfg = crate::ModelConfig { path: Path::XenVm { domid: 1 }, ..Default::default() };
        let mut model = Model::new(cfg, ram.clone(), StdClock::new());
        model.set_grant_mapper(Box::new(OneGrant(page)));
        // A request in the page: the API version fast call.
        let mut req = [0u8; 64];
        req[..8].copy_from_slice(&u64::from(trusty_platform::smc::call::FC_API_VERSION).to_le_bytes());
        req[8..16].copy_from_slice(&3u64.to_le_bytes());
        assert!(PhysMem::write(&*ram, page + mb::OFF_REQUEST as u64, &req));
        assert!(PhysMem::write_u32(&*ram, page + mb::OFF_MAGIC as u64, mb::MAILBOX_MAGIC));
        assert!(PhysMem::write_u32(&*ram, page + mb::OFF_REQ_SEQ as u64, 1));
        assert!(!model.serve_mailbox(), "reference 8 was never granted");
        assert!(model.faults().is_empty(), "not granted yet is not a fault");
        assert!(!model.set_mailbox_gref(21), "reference 21 cannot be mapped");
        assert!(model.set_mailbox_gref(20));
        assert!(model.serve_mailbox());
        assert_eq!(PhysMem::read_u32(&*ram, page + mb::OFF_RSP_SEQ as u64), Some(1));
        assert_eq!(PhysMem::read_u64(&*ram, page + mb::OFF_RESPONSE as u64), Some(3));
        assert!(!model.serve_mailbox(), "one request, one answer");
    }
}
