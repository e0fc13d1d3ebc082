//! A minimal secure side for measuring the normal-world stack alone: it answers the Trusty calls
//! the stack makes (API and version negotiation, GET_DESCR, START, STOP, VDEV_RESET, kicks,
//! NOPs) and serves the TIPC device's two vrings from their device end, with just enough of
//! TIPC's control protocol for two ports: an echo port (every message comes back) and a sink
//! (every message is taken and dropped). There is no IPC core, no scheduler and no heap use per
//! message. It runs inside [`Conduit::call`] on the caller's thread (like `-D sim`), so the
//! time of an echo is the stack's own plus this peer's few ring operations and its one copy;
//! or on its own thread on the other core behind the Xen Trusty VM's mailbox protocol (like
//! `-D sim-cores`), which measures the stack and its cross-core transport against a peer as
//! lean as a polling virtio echo peer, the model's work left out ([`Placement`]).
//!
//! It follows upstream Trusty's `lib/trusty/tipc_virtio_dev.c` where it implements something
//! (cited per function). It is strict about memory the way the model is: it reaches the normal
//! world's memory only through the ids the stack's sharer handed out, with the length and
//! access shared (tx buffers are read-only to it), and drops its ring views when their shares
//! go. Mappings are cached and refreshed only when the share table changes.
//!
//! Test and bench code only: no shipped crate links it.

use std::alloc::{alloc_zeroed, dealloc, Layout as AllocLayout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tipc::wire::{self, Ctrl, Header};
use tipc::{Config, TipcDevice};
use trusty_platform::clock::Clock;
use trusty_platform::mem::{Access, DmaRegion, MemoryId, PageAllocator, PhysRange, SharedMemory, Sharer, PAGE_SIZE};
use trusty_platform::smc::{api, call, Conduit, SmError};
use trusty_platform::trusty::{CallPolicy, Trusty};
use trusty_virtio::rsc;
use trusty_virtio::vring::{DeviceQueue, DeviceRingError, Layout, RawRing};
use trusty_virtio::Bus;
use trusty_model::host::{move_to_last_core, HostMailbox, MailboxServer, StopFlag, Unpark};

/// The port whose messages come back to their sender.
pub const ECHO_PORT: &str = "com.android.ipc-unittest.srv.echo";
/// The port whose messages are taken and dropped.
pub const SINK_PORT: &str = "com.android.ipc-unittest.srv.datasink";

/// Trusty's `lk/err.h` codes this peer answers with.
mod lk {
    pub const NO_ERROR: i32 = 0;
    pub const ERR_NOT_FOUND: i32 = -2;
    pub const ERR_NOT_VALID: i32 = -7;
    pub const ERR_INVALID_ARGS: i32 = -8;
    pub const ERR_NOT_ENOUGH_BUFFER: i32 = -9;
    pub const ERR_NO_RESOURCES: i32 = -41;
}

/// Largest message a channel takes (Trusty's IPC_CHAN_MAX_BUF_SIZE, sent in CONN_RSP).
const MAX_MSG_SIZE: u32 = 4096;
/// The TIPC message buffer size in the resource table.
const MSG_BUF_SIZE: usize = 4096;
/// Trusty endpoints this peer can hold (addresses 1000.., spec §6.2).
const ENDPOINTS: usize = 16;
/// Frames held for the normal world while it has no rx buffer posted.
const OUTBOX_FRAMES: usize = 32;
const VERSION: &[u8] = b"tipc-bench stack peer";
/// First id the sharer hands out; ids are `ID_BASE + slot * ID_STRIDE`, opaque to the stack.
const ID_BASE: u64 = 0x5eed_0000_0000;
const ID_STRIDE: u64 = 0x1000;

// ----- memory: pages and the share table ---------------------------------------------------------

/// Page-aligned heap pages; the "physical" address of a page is its host address.
struct HeapPages;

impl PageAllocator for HeapPages {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        let layout = AllocLayout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let p = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // SAFETY: `p` points to `pages` fresh zeroed pages owned by the region until `free`.
        Some(unsafe { DmaRegion::new(p, p.as_ptr() as u64, pages) })
    }
    unsafe fn free(&mut self, region: DmaRegion) {
        let Ok(layout) = AllocLayout::from_size_align(region.len(), PAGE_SIZE) else {
            return;
        };
        // SAFETY: the region came from `alloc_zeroed` with this layout (the caller's contract).
        unsafe { dealloc(region.vaddr().as_ptr(), layout) };
    }
}

/// One live share: what the peer may touch through its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Share {
    id: u64,
    addr: usize,
    len: usize,
    writable: bool,
}

/// The shares the stack made, by slot; `generation` moves on every change so the peer knows
/// when its cached copy is stale.
#[derive(Default)]
struct ShareTable {
    slots: Mutex<Vec<Option<Share>>>,
    generation: AtomicU64,
}

impl ShareTable {
    fn slots(&self) -> MutexGuard<'_, Vec<Option<Share>>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn slot_of(id: u64) -> Option<usize> {
    let off = id.checked_sub(ID_BASE)?;
    (off % ID_STRIDE == 0).then(|| usize::try_from(off / ID_STRIDE).ok()).flatten()
}

/// Hands the peer opaque ids (as FF-A handles are), one per share of contiguous pages.
struct PeerSharer {
    table: Arc<ShareTable>,
}

impl Sharer for PeerSharer {
    fn mechanism(&self) -> &'static str {
        "stack-peer handle"
    }
    fn share(&mut self, ranges: &[PhysRange], access: Access) -> Result<MemoryId, trusty_platform::Error> {
        let [r] = ranges else {
            return Err(trusty_platform::Error::InvalidArgument("the stack peer takes one contiguous range per share"));
        };
        let len = (r.pages as usize)
            .checked_mul(PAGE_SIZE)
            .ok_or(trusty_platform::Error::InvalidArgument("share too large"))?;
        let addr =
            usize::try_from(r.addr).map_err(|_| trusty_platform::Error::InvalidArgument("address out of range"))?;
        let mut slots = self.table.slots();
        let slot = match slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        let id = ID_BASE + slot as u64 * ID_STRIDE;
        slots[slot] = Some(Share { id, addr, len, writable: access == Access::ReadWrite });
        self.table.generation.fetch_add(1, Ordering::Release);
        Ok(MemoryId(id))
    }
    fn reclaim(&mut self, id: MemoryId) -> Result<(), trusty_platform::Error> {
        let mut slots = self.table.slots();
        match slot_of(id.0).and_then(|s| slots.get_mut(s)) {
            Some(entry) if entry.is_some_and(|s| s.id == id.0) => {
                *entry = None;
                self.table.generation.fetch_add(1, Ordering::Release);
                Ok(())
            }
            _ => Err(trusty_platform::Error::InvalidArgument("reclaim of an id that is not shared")),
        }
    }
    fn live_shares(&self) -> usize {
        self.table.slots().iter().flatten().count()
    }
    fn budget(&self) -> Option<usize> {
        None
    }
}

/// Wall-clock time for the stack's deadlines: the Linux backend's clock (what trusty-ipcd
/// runs on), counting its reads, precise and coarse alike; `relax` yields.
struct HostClock {
    inner: trusty_stack::backend::linux::StdClock,
    reads: Arc<AtomicU64>,
}

impl HostClock {
    /// Counted without a read-modify-write (a locked instruction would add to every read what
    /// the stack's own clock does not cost): one device, on one thread, reads it.
    fn count(&self) {
        self.reads.store(self.reads.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.count();
        self.inner.now_ns()
    }
    fn sleep_ns(&self, ns: u64) {
        self.inner.sleep_ns(ns);
    }
    fn relax(&self) {
        self.inner.relax();
    }
    fn now_coarse_ns(&self, max_lag_ns: u64) -> (u64, u64) {
        self.count();
        self.inner.now_coarse_ns(max_lag_ns)
    }
}

// ----- the peer ------------------------------------------------------------------------------------

/// What the peer counted; read with [`PeerHandle::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Every call the stack made (fast, standard and NOP).
    pub calls: u64,
    /// Frames taken from the normal world's tx ring.
    pub frames_in: u64,
    /// Frames written into the normal world's rx buffers.
    pub frames_out: u64,
    /// Data messages echoed.
    pub echoed: u64,
    /// Data messages taken by the sink.
    pub sunk: u64,
    /// Payload bytes this peer copied between shared buffers.
    pub bytes_copied: u64,
    /// Accesses refused: an id not shared, too short, or written while shared read-only.
    pub refused: u64,
    /// Frames the normal world sent that were malformed (answered with an error status).
    pub malformed: u64,
    /// Frames lost because the normal world posted no usable rx buffer and the outbox was full.
    pub lost: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PortKind {
    Echo,
    Sink,
}

#[derive(Clone, Copy)]
struct Endpoint {
    /// The normal world's address of the channel.
    remote: u32,
    kind: PortKind,
}

struct PeerRing {
    queue: DeviceQueue,
    mem: RawRing,
    id: u64,
}

/// Frames waiting for an rx buffer, in fixed slots allocated once.
struct Outbox {
    frames: Vec<Box<[u8]>>,
    lens: [usize; OUTBOX_FRAMES],
    head: usize,
    count: usize,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            frames: (0..OUTBOX_FRAMES).map(|_| vec![0u8; MSG_BUF_SIZE].into_boxed_slice()).collect(),
            lens: [0; OUTBOX_FRAMES],
            head: 0,
            count: 0,
        }
    }
    /// A free slot to fill, or `None` when full.
    fn slot(&mut self) -> Option<&mut [u8]> {
        (self.count < OUTBOX_FRAMES).then(|| &mut self.frames[(self.head + self.count) % OUTBOX_FRAMES][..])
    }
    fn commit(&mut self, len: usize) {
        self.lens[(self.head + self.count) % OUTBOX_FRAMES] = len;
        self.count += 1;
    }
    fn front(&self) -> Option<&[u8]> {
        (self.count > 0).then(|| &self.frames[self.head][..self.lens[self.head]])
    }
    fn pop(&mut self) {
        self.head = (self.head + 1) % OUTBOX_FRAMES;
        self.count -= 1;
    }
}

struct Peer {
    shares: Arc<ShareTable>,
    /// A copy of the share table, valid while `cache_gen` is the table's generation.
    cache: Vec<Option<Share>>,
    cache_gen: u64,
    /// The share-table generation the ring views were last checked against.
    rings_checked_gen: u64,
    table: Vec<u8>,
    /// Trusty's tx ring (vring 0): secure to normal world.
    to_ns: Option<PeerRing>,
    /// Trusty's rx ring (vring 1): normal world to secure.
    from_ns: Option<PeerRing>,
    endpoints: [Option<Endpoint>; ENDPOINTS],
    outbox: Outbox,
    /// The used flags last written on (from_ns, to_ns): VRING_USED_F_NO_NOTIFY.
    no_notify: Option<(bool, bool)>,
    /// A ring error Trusty panics on (lib/trusty vqueue): every later call answers PANIC.
    panicked: bool,
    stats: PeerStats,
    /// How far the last frame written to each rx buffer reached (0 once its lines were taken
    /// back), by the buffer's id (direct-mapped on its share slot; a slot names its id), and
    /// the id of the last one filled: for [`Peer::prepare_next_rx_write`].
    rx_reach: [(u64, usize); RX_REACH_SLOTS],
    rx_last: u64,
    /// Where the last frame from the normal world lay (0: unknown): a guess at the next one's
    /// place (the driver hands its last freed tx buffer out first), a cache hint only.
    ns_buf_hint: usize,
}

/// Slots of [`Peer::rx_reach`] (a power of two above the ring size).
const RX_REACH_SLOTS: usize = 64;

/// A mapping the peer was allowed: `len` bytes at `ptr`.
struct Mapped {
    ptr: *mut u8,
    len: usize,
}

impl Peer {
    /// The share `id` names, from the cached copy of the share table (refreshed when the
    /// table has changed since).
    fn share_of(&mut self, id: u64) -> Option<Share> {
        let generation = self.shares.generation.load(Ordering::Acquire);
        if generation != self.cache_gen {
            self.cache.clone_from(&self.shares.slots());
            self.cache_gen = generation;
        }
        slot_of(id).and_then(|s| self.cache.get(s).copied().flatten()).filter(|s| s.id == id)
    }

    /// Looks `id` up (through the cache) and grants `len` bytes of it, writable only if it was
    /// shared read-write. Refused accesses are counted.
    fn map(&mut self, id: u64, len: usize, write: bool) -> Option<Mapped> {
        match self.share_of(id) {
            Some(s) if len <= s.len && (s.writable || !write) => Some(Mapped { ptr: s.addr as *mut u8, len }),
            _ => {
                self.stats.refused += 1;
                None
            }
        }
    }

    /// Drops ring views whose shares are gone (the stack reclaimed them). Only after the share
    /// table changed: otherwise the views were checked against it already.
    fn check_rings(&mut self) {
        let generation = self.shares.generation.load(Ordering::Acquire);
        if generation == self.rings_checked_gen {
            return;
        }
        self.rings_checked_gen = generation;
        for which in [0, 1] {
            let ring = if which == 0 { &self.to_ns } else { &self.from_ns };
            let Some((id, size)) = ring.as_ref().map(|r| (r.id, r.queue.layout().size())) else {
                continue;
            };
            if self.map(id, size, true).is_none() {
                if which == 0 {
                    self.to_ns = None;
                } else {
                    self.from_ns = None;
                }
            }
        }
    }

    fn call(&mut self, regs: [u64; 8]) -> i64 {
        self.stats.calls += 1;
        if self.panicked {
            return i64::from(SmError::Panic.code());
        }
        let [fid, a1, a2, a3, ..] = regs;
        let id = (a1 & 0xffff_ffff) | (a2 << 32);
        let r = match fid as u32 {
            // lib/sm/sm.c smc_get_api_version / smc_get_version_str.
            call::FC_API_VERSION => i64::from((a1 as u32).min(api::CURRENT)),
            call::FC_GET_VERSION_STR => match a1 as u32 {
                u32::MAX => VERSION.len() as i64,
                i => VERSION.get(i as usize).map_or(i64::from(SmError::InvalidParameters.code()), |&b| i64::from(b)),
            },
            call::SC_VIRTIO_GET_DESCR => self.get_descr(id, a3 as usize),
            call::SC_VIRTIO_START => self.start(id, a3 as usize),
            // tipc_dev_reset(): rings, endpoints and queued frames go.
            call::SC_VIRTIO_STOP | call::SC_VDEV_RESET => {
                self.to_ns = None;
                self.from_ns = None;
                self.endpoints = [None; ENDPOINTS];
                self.outbox.head = 0;
                self.outbox.count = 0;
                0
            }
            call::SC_NOP | call::SC_LOCKED_NOP => {
                self.serve();
                i64::from(SmError::NopDone.code())
            }
            call::SC_VDEV_KICK_VQ => {
                self.serve();
                0
            }
            call::SC_RESTART_LAST => i64::from(SmError::UnexpectedRestart.code()),
            _ => i64::from(SmError::UndefinedSmc.code()),
        };
        if self.panicked {
            return i64::from(SmError::Panic.code());
        }
        r
    }

    /// lib/trusty/trusty_virtio.c virtio_get_description(): the table into the shared page.
    fn get_descr(&mut self, id: u64, size: usize) -> i64 {
        let n = self.table.len();
        if size < n {
            return i64::from(lk::ERR_NOT_ENOUGH_BUFFER);
        }
        let Some(m) = self.map(id, n, true) else {
            return i64::from(lk::ERR_INVALID_ARGS);
        };
        // SAFETY: `m` grants `n` writable bytes of a live share (checked by `map`); the stack
        // keeps it allocated while shared and reads it only after this call returns.
        unsafe { std::ptr::copy_nonoverlapping(self.table.as_ptr(), m.ptr, m.len.min(n)) };
        n as i64
    }

    /// virtio_start(): reads the table back (vring ids filled in by the normal world), maps the
    /// rings, and the TIPC device goes online (`_go_online()`).
    fn start(&mut self, id: u64, size: usize) -> i64 {
        let n = self.table.len();
        if size < n {
            return i64::from(lk::ERR_INVALID_ARGS);
        }
        let Some(m) = self.map(id, n, false) else {
            return i64::from(lk::ERR_INVALID_ARGS);
        };
        let mut copy = vec![0u8; n];
        // SAFETY: `m` grants `n` readable bytes of a live share.
        unsafe { std::ptr::copy_nonoverlapping(m.ptr, copy.as_mut_ptr(), n) };
        let Ok(vdevs) = rsc::parse(&copy) else {
            return i64::from(lk::ERR_INVALID_ARGS);
        };
        let Some(v) = vdevs.iter().find(|v| v.id == rsc::VIRTIO_ID_TIPC) else {
            return i64::from(lk::ERR_INVALID_ARGS);
        };
        let mut rings = Vec::new();
        for r in v.vrings.iter().take(2) {
            let Ok(layout) = Layout::new(r.num, r.align) else {
                return i64::from(lk::ERR_INVALID_ARGS);
            };
            let Some(m) = self.map(r.memory_id(), layout.size(), true) else {
                return i64::from(lk::ERR_INVALID_ARGS);
            };
            let Some(base) = NonNull::new(m.ptr) else {
                return i64::from(lk::ERR_INVALID_ARGS);
            };
            // SAFETY: the ring's pages are a live read-write share of at least `layout.size()`
            // bytes, page-aligned; the view is dropped at STOP/VDEV_RESET or as soon as the
            // share is gone (`check_rings`, before every use).
            let mem = unsafe { RawRing::new(base, m.len) };
            rings.push(PeerRing { queue: DeviceQueue::new(layout), mem, id: r.memory_id() });
        }
        if rings.len() != 2 {
            return i64::from(lk::ERR_INVALID_ARGS);
        }
        let mut rings = rings.into_iter();
        self.to_ns = rings.next();
        self.from_ns = rings.next();
        self.no_notify = None;
        self.rings_checked_gen = u64::MAX;
        self.queue_ctrl(&Ctrl::GoOnline);
        self.flush();
        self.update_notify_flags();
        0
    }

    /// The TIPC device's work after a call: every frame the normal world sent, then whatever
    /// waits for its rx buffers.
    fn serve(&mut self) {
        self.check_rings();
        self.drain_from_ns();
        self.flush();
        self.update_notify_flags();
    }

    /// vqueue_get_avail_buf() clears VRING_USED_F_NO_NOTIFY only while a thread waits for a
    /// buffer: the rx thread always does between calls (its ring is drained), the tx side only
    /// while frames wait for an rx buffer (spec §4).
    /// Only the device writes the used flags, so they are written (with their full fence)
    /// only when they change.
    fn update_notify_flags(&mut self) {
        let want = (false, self.outbox.count == 0);
        if self.no_notify == Some(want) {
            return;
        }
        if let Some(r) = &self.from_ns {
            r.queue.set_no_notify(&r.mem, want.0);
        }
        if let Some(r) = &self.to_ns {
            r.queue.set_no_notify(&r.mem, want.1);
        }
        self.no_notify = Some(want);
    }

    /// On the other core, as a request arrives: asks for the lines the call reads first
    /// together, as the model's thread does ([`trusty_model::mem::prefetch_call_lines`]).
    fn prefetch_rings(&self) {
        let rings = [&self.from_ns, &self.to_ns].into_iter().flatten().map(|r| (&r.queue, &r.mem));
        trusty_model::mem::prefetch_call_lines(rings, self.ns_buf_hint);
    }

    /// tipc_rx_thread_func(): take each available buffer, handle it, return it with the status.
    fn drain_from_ns(&mut self) {
        loop {
            let Some(ring) = self.from_ns.as_mut() else {
                return;
            };
            let (head, desc) = match ring.queue.pop_avail_one(&ring.mem) {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(DeviceRingError::BadChain { head }) => {
                    self.stats.malformed += 1;
                    ring.queue.push_used(&ring.mem, head, lk::ERR_INVALID_ARGS as u32);
                    continue;
                }
                // vqueue_get_avail_buf() panics on these.
                Err(_) => {
                    self.panicked = true;
                    return;
                }
            };
            self.stats.frames_in += 1;
            let status = self.handle_rx_msg(desc.addr, desc.len as usize);
            if let Some(ring) = self.from_ns.as_mut() {
                ring.queue.push_used(&ring.mem, head, status as u32);
            }
        }
    }

    /// handle_rx_msg(): map the buffer read-only, check the header, route by dst.
    fn handle_rx_msg(&mut self, id: u64, len: usize) -> i32 {
        if !(wire::HEADER_LEN..=MSG_BUF_SIZE).contains(&len) {
            self.stats.malformed += 1;
            return lk::ERR_INVALID_ARGS;
        }
        let Some(m) = self.map(id, len, false) else {
            return lk::ERR_INVALID_ARGS;
        };
        self.ns_buf_hint = m.ptr as usize;
        let mut raw = [0u8; wire::HEADER_LEN];
        // SAFETY: `m` grants `len` >= HEADER_LEN readable bytes.
        unsafe { std::ptr::copy_nonoverlapping(m.ptr, raw.as_mut_ptr(), wire::HEADER_LEN) };
        let Some(h) = Header::decode(&raw) else {
            return lk::ERR_INVALID_ARGS;
        };
        let data_len = usize::from(h.len);
        if data_len + wire::HEADER_LEN != len {
            self.stats.malformed += 1;
            return lk::ERR_INVALID_ARGS;
        }
        // SAFETY: HEADER_LEN <= len, inside the mapping.
        let data = unsafe { m.ptr.add(wire::HEADER_LEN) };
        if h.dst == wire::CTRL_ADDR {
            self.handle_ctrl_msg(h.src, data, data_len)
        } else {
            self.handle_chan_msg(h.src, h.dst, data, data_len)
        }
    }

    /// handle_ctrl_msg(): CONN_REQ and DISC_REQ; anything else is ERR_NOT_VALID.
    fn handle_ctrl_msg(&mut self, remote: u32, data: *const u8, len: usize) -> i32 {
        let mut body = [0u8; wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
        let Some(body) = body.get_mut(..len) else {
            self.stats.malformed += 1;
            return lk::ERR_NOT_VALID;
        };
        // SAFETY: `data` has `len` readable bytes (the frame was mapped whole).
        unsafe { std::ptr::copy_nonoverlapping(data, body.as_mut_ptr(), len) };
        match wire::parse_ctrl(body, 0, false) {
            Ok(Ctrl::ConnReq { name }) => {
                self.handle_conn_req(remote, name.as_bytes());
                lk::NO_ERROR
            }
            Ok(Ctrl::DiscReq { target }) => {
                self.handle_disc_req(remote, target);
                lk::NO_ERROR
            }
            _ => {
                self.stats.malformed += 1;
                lk::ERR_NOT_VALID
            }
        }
    }

    /// handle_conn_req() + handle_ready(): a known port gets an endpoint and CONN_RSP with
    /// IPC_CHAN_MAX_BUF_SIZE and one message; anything else CONN_RSP ERR_NO_RESOURCES.
    fn handle_conn_req(&mut self, remote: u32, name: &[u8]) {
        let kind = if name == ECHO_PORT.as_bytes() {
            Some(PortKind::Echo)
        } else if name == SINK_PORT.as_bytes() {
            Some(PortKind::Sink)
        } else {
            None
        };
        let slot = kind.and_then(|_| self.endpoints.iter().position(Option::is_none));
        let rsp = match (kind, slot) {
            (Some(kind), Some(slot)) => {
                self.endpoints[slot] = Some(Endpoint { remote, kind });
                Ctrl::ConnRsp {
                    target: remote,
                    status: 0,
                    remote: wire::TRUSTY_ADDR_BASE + slot as u32,
                    max_msg_size: MAX_MSG_SIZE,
                    max_msg_cnt: 1,
                }
            }
            _ => Ctrl::ConnRsp {
                target: remote,
                status: lk::ERR_NO_RESOURCES,
                remote: 0,
                max_msg_size: 0,
                max_msg_cnt: 0,
            },
        };
        self.queue_ctrl(&rsp);
    }

    /// handle_disc_req(): frees the endpoint (by target, else by remote); no answer.
    fn handle_disc_req(&mut self, remote: u32, target: u32) {
        let by_target = target
            .checked_sub(wire::TRUSTY_ADDR_BASE)
            .map(|s| s as usize)
            .filter(|&s| self.endpoints.get(s).copied().flatten().is_some_and(|e| e.remote == remote));
        let slot = by_target.or_else(|| self.endpoints.iter().position(|e| e.is_some_and(|e| e.remote == remote)));
        if let Some(s) = slot {
            self.endpoints[s] = None;
        }
    }

    /// handle_chan_msg(): deliver to the endpoint; the status is the bytes taken. The echo
    /// answers at once (handle_tx_msg() -> tipc_send_data(), src 0 as Trusty leaves it).
    fn handle_chan_msg(&mut self, remote: u32, local: u32, data: *const u8, len: usize) -> i32 {
        let ep = local
            .checked_sub(wire::TRUSTY_ADDR_BASE)
            .and_then(|s| self.endpoints.get(s as usize).copied().flatten())
            .filter(|e| e.remote == remote);
        let Some(ep) = ep else {
            return lk::ERR_NOT_FOUND;
        };
        match ep.kind {
            PortKind::Sink => {
                self.stats.sunk += 1;
                len as i32
            }
            PortKind::Echo => {
                let header = Header { src: 0, dst: remote, shm_cnt: 0, len: len as u16, flags: 0 }.encode();
                // SAFETY: `data` has `len` readable bytes of the mapped tx buffer.
                let payload = unsafe { std::slice::from_raw_parts(data, len) };
                if self.send_frame(&header, payload) {
                    self.stats.echoed += 1;
                    len as i32
                } else {
                    lk::ERR_NOT_ENOUGH_BUFFER
                }
            }
        }
    }

    fn queue_ctrl(&mut self, msg: &Ctrl) {
        let mut frame = [0u8; wire::HEADER_LEN + wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
        let Some(n) = wire::encode_ctrl(msg, wire::CTRL_ADDR, &mut frame) else {
            return;
        };
        let (h, body) = frame[..n].split_at(wire::HEADER_LEN);
        if !self.send_frame(h, body) {
            self.stats.lost += 1;
        }
    }

    /// tipc_send_buf(): into the next rx buffer now if the outbox is empty and one is posted,
    /// else into the outbox. Returns false when neither can take it.
    fn send_frame(&mut self, header: &[u8], payload: &[u8]) -> bool {
        if self.outbox.count == 0 && self.put_rx(header, payload) {
            return true;
        }
        let n = header.len() + payload.len();
        let Some(slot) = self.outbox.slot().filter(|s| s.len() >= n) else {
            return false;
        };
        slot[..header.len()].copy_from_slice(header);
        slot[header.len()..n].copy_from_slice(payload);
        self.outbox.commit(n);
        true
    }

    /// Writes one frame into the next posted rx buffer. False when none is posted; an rx buffer
    /// too small or not shared read-write comes back with ERR_NOT_ENOUGH_BUFFER and the frame is
    /// lost (counted).
    fn put_rx(&mut self, header: &[u8], payload: &[u8]) -> bool {
        let n = header.len() + payload.len();
        let Some(ring) = self.to_ns.as_mut() else {
            return false;
        };
        let (head, desc) = match ring.queue.pop_avail_one(&ring.mem) {
            Ok(Some(d)) => d,
            Ok(None) => return false,
            Err(DeviceRingError::BadChain { head }) => {
                ring.queue.push_used(&ring.mem, head, lk::ERR_NOT_ENOUGH_BUFFER as u32);
                self.stats.lost += 1;
                return true;
            }
            Err(_) => {
                self.panicked = true;
                return false;
            }
        };
        let used = match self.map(desc.addr, n, true).filter(|_| n <= desc.len as usize) {
            Some(m) => {
                // SAFETY: `m` grants `n` writable bytes of a live read-write share; the header
                // and payload are disjoint from it (the payload is a read-only tx buffer or
                // the outbox).
                unsafe {
                    std::ptr::copy_nonoverlapping(header.as_ptr(), m.ptr, header.len());
                    std::ptr::copy_nonoverlapping(payload.as_ptr(), m.ptr.add(header.len()), payload.len());
                }
                self.stats.frames_out += 1;
                self.stats.bytes_copied += payload.len() as u64;
                if let Some(slot) = slot_of(desc.addr) {
                    self.rx_reach[slot % RX_REACH_SLOTS] = (desc.addr, n);
                }
                self.rx_last = desc.addr;
                n as u32
            }
            None => {
                self.stats.lost += 1;
                lk::ERR_NOT_ENOUGH_BUFFER as u32
            }
        };
        if let Some(ring) = self.to_ns.as_mut() {
            ring.queue.push_used(&ring.mem, head, used);
        }
        true
    }

    /// Between calls, on the other core: takes for writing the lines of the rx buffer the
    /// next frame goes to (the next one on vring 0), as far as the last frame written there
    /// reached, by storing back the byte each line starts with (memory keeps what it holds).
    /// The stack has read those lines since, and the next frame's copy would otherwise wait for
    /// each of them to come back from its core (the model does the same:
    /// `TipcDev::prepare_next_rx_write`). Not for the buffer just filled (a stack with a single
    /// rx buffer posted reads it now), and quiet: a buffer not (or no longer) shared
    /// read-write that long is left alone and not counted as refused.
    fn prepare_next_rx_write(&mut self) {
        let Some(ring) = self.to_ns.as_ref() else { return };
        let Some((_, desc)) = ring.queue.peek_avail_first(&ring.mem) else { return };
        let Some(slot) = slot_of(desc.addr) else { return };
        let (id, reach) = self.rx_reach[slot % RX_REACH_SLOTS];
        let reach = reach.min(desc.len as usize);
        if id != desc.addr || id == self.rx_last || reach == 0 {
            return;
        }
        let Some(share) = self.share_of(id).filter(|s| s.writable && reach <= s.len) else { return };
        // SAFETY: `reach <= share.len` bytes of a live read-write share (as `map` grants); the
        // stack does not write an rx buffer it has posted.
        unsafe { trusty_model::mem::touch_lines_for_write(share.addr as *mut u8, reach) };
        // Once is enough until the next frame there.
        self.rx_reach[slot % RX_REACH_SLOTS].1 = 0;
    }

    /// Moves outbox frames into rx buffers while both last.
    fn flush(&mut self) {
        while self.outbox.count > 0 {
            let Some(frame) = self.outbox.front() else {
                return;
            };
            // The frame is copied out of the outbox slot first so `put_rx` may borrow `self`;
            // only in the slow path (no rx buffer was posted when it was made).
            let mut tmp = [0u8; MSG_BUF_SIZE];
            let n = frame.len();
            tmp[..n].copy_from_slice(frame);
            let (h, p) = tmp[..n].split_at(wire::HEADER_LEN.min(n));
            if !self.put_rx(h, p) {
                return;
            }
            self.outbox.pop();
        }
    }
}

struct PeerConduit {
    peer: Arc<Mutex<Peer>>,
    timing: Arc<PeerTiming>,
}

/// Time spent inside the peer's calls, measured only while switched on (it costs two clock
/// reads per call, which [`PeerHandle::peer_ns`] users subtract).
#[derive(Default)]
struct PeerTiming {
    on: AtomicBool,
    ns: AtomicU64,
}

fn lock(p: &Mutex<Peer>) -> MutexGuard<'_, Peer> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The registers of the peer's answer: w0 only (every call this peer serves returns one word).
fn answer(r: i64) -> [u64; 8] {
    [r as u64 & 0xffff_ffff, 0, 0, 0, 0, 0, 0, 0]
}

impl Conduit for PeerConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        let start = self.timing.on.load(Ordering::Relaxed).then(Instant::now);
        let r = lock(&self.peer).call(regs);
        if let Some(t) = start {
            self.timing.ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        answer(r)
    }
}

/// How long the peer's thread (`Placement::OtherCore`) spins without a request before it
/// sleeps until the stack's event unparks it, as the model's thread does.
const PEER_SPIN_NS: u64 = 200_000;
/// Longest sleep of an idle peer thread.
const PEER_PARK_NS: u64 = 10_000_000;
/// Timeout of the stack's mailbox calls to the peer's thread.
const PEER_MAILBOX_TIMEOUT_MS: u64 = 5_000;

/// The peer's own thread on the other core; stopped and joined when the last handle goes.
struct PeerThread {
    stop: Arc<StopFlag>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PeerThread {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// The peer's thread: serves each request of the host mailbox, spinning while requests come
/// and sleeping after [`PEER_SPIN_NS`] without one until the stack's event unparks it.
fn peer_thread(peer: Arc<Mutex<Peer>>, mut server: MailboxServer, stop: &StopFlag) {
    move_to_last_core();
    server.serve_until_stopped(stop, PEER_SPIN_NS, PEER_PARK_NS, |regs| {
        let mut p = lock(&peer);
        p.prefetch_rings();
        answer(p.call(regs))
    }, || {
        lock(&peer).prepare_next_rx_write()
    });
}

/// The test's view of the peer.
#[derive(Clone)]
pub struct PeerHandle {
    peer: Arc<Mutex<Peer>>,
    shares: Arc<ShareTable>,
    clock_reads: Arc<AtomicU64>,
    timing: Arc<PeerTiming>,
    /// The peer's thread when it runs on the other core.
    _thread: Option<Arc<PeerThread>>,
}

impl PeerHandle {
    /// What the peer counted so far.
    pub fn stats(&self) -> PeerStats {
        lock(&self.peer).stats
    }
    /// Switches the timing of the peer's calls on or off (off at bring-up). Only calls made
    /// inside the stack's thread (`Placement::InCall`) are timed.
    pub fn time_calls(&self, on: bool) {
        self.timing.on.store(on, Ordering::Relaxed);
    }
    /// Nanoseconds spent inside the peer's calls while timing was on, timer cost included.
    pub fn peer_ns(&self) -> u64 {
        self.timing.ns.load(Ordering::Relaxed)
    }
    /// How often the stack read its clock.
    pub fn clock_reads(&self) -> u64 {
        self.clock_reads.load(Ordering::Relaxed)
    }
    /// Shares the stack holds now.
    pub fn live_shares(&self) -> usize {
        self.shares.slots().iter().flatten().count()
    }
}

/// A stack brought up against the peer.
pub struct StackRig {
    /// The stack: TIPC device over the Trusty virtio bus and the call discipline. Declared
    /// first, so that it is dropped (and makes its last calls) while the peer still answers.
    pub dev: TipcDevice,
    /// The peer.
    pub peer: PeerHandle,
}

/// Where the peer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside each call, on the stack's thread (as `-D sim` runs the model).
    InCall,
    /// On its own thread on the other core, serving the Xen Trusty VM's mailbox protocol
    /// (`trusty_platform::mailbox`) as `-D sim-cores` runs the model: the stack's calls go
    /// through the same `MailboxConduit` it uses with a Trusty VM.
    OtherCore,
}

/// Brings the stack up (version string, API negotiation, GET_DESCR, START, GO_ONLINE) against
/// a fresh peer with Trusty's default table (two 32-entry rings, 4096-byte buffers), run
/// inside each call.
pub fn bring_up(cfg: Config) -> Result<StackRig, String> {
    bring_up_at(cfg, Placement::InCall)
}

/// As [`bring_up`], with the peer where `placement` says.
pub fn bring_up_at(cfg: Config, placement: Placement) -> Result<StackRig, String> {
    let shares: Arc<ShareTable> = Arc::default();
    let peer = Arc::new(Mutex::new(Peer {
        shares: shares.clone(),
        cache: Vec::new(),
        cache_gen: u64::MAX,
        rings_checked_gen: u64::MAX,
        table: rsc::default_tipc_table("dev0"),
        to_ns: None,
        from_ns: None,
        endpoints: [None; ENDPOINTS],
        outbox: Outbox::new(),
        no_notify: None,
        panicked: false,
        stats: PeerStats::default(),
        rx_reach: [(0, 0); RX_REACH_SLOTS],
        rx_last: 0,
        ns_buf_hint: 0,
    }));
    let clock_reads = Arc::new(AtomicU64::new(0));
    let clock: Arc<dyn Clock> = Arc::new(HostClock { inner: trusty_stack::backend::linux::StdClock::new(), reads: clock_reads.clone() });
    let timing: Arc<PeerTiming> = Arc::default();
    let (conduit, thread): (Arc<dyn Conduit>, _) = match placement {
        Placement::InCall => (Arc::new(PeerConduit { peer: peer.clone(), timing: timing.clone() }), None),
        Placement::OtherCore => {
            let mailbox = HostMailbox::new();
            let server = mailbox.server();
            let stop: Arc<StopFlag> = Arc::default();
            let (p, s) = (peer.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name("stack-peer-core".into())
                .spawn(move || peer_thread(p, server, &s))
                .map_err(|e| format!("spawn the peer's thread: {e}"))?;
            let events = Arc::new(Unpark(handle.thread().clone()));
            let conduit = mailbox.conduit(events, clock.clone(), PEER_MAILBOX_TIMEOUT_MS);
            (conduit, Some(Arc::new(PeerThread { stop, handle: Some(handle) })))
        }
    };
    let mut trusty = Trusty::new(conduit, clock, CallPolicy::default());
    trusty.version_string_or_log().map_err(|e| format!("version string: {e}"))?;
    trusty.negotiate_api(api::CURRENT).map_err(|e| format!("API version: {e}"))?;
    let mem = SharedMemory::new(Box::new(HeapPages), Box::new(PeerSharer { table: shares.clone() }));
    let dev = TipcDevice::probe(Bus::new(trusty, mem), cfg).map_err(|e| format!("bring-up on the stack peer: {e}"))?;
    Ok(StackRig { dev, peer: PeerHandle { peer, shares, clock_reads, timing, _thread: thread } })
}
