//! The normal world's TIPC device (spec §5.5 step 5d, §6): buffer pools on the two vrings, the
//! channel table, dispatch of received frames, and waiting by donating time to Trusty.
//!
//! Trusty never interrupts the normal world for ring activity, so every entry into the secure
//! side is followed by a scan of both rings ([`TipcDevice::scan`]), and every wait is a loop of
//! NOP calls and scans against a deadline (spec §4, §11 subtlety 1).

use alloc::boxed::Box;
use alloc::collections::btree_map::Entry;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;

use trusty_platform::clock::{Clock, Deadline};
use trusty_platform::mem::{Access, MemoryId, SharedBuf, SharedMemory, PAGE_SIZE};
use trusty_virtio::bus::{STATUS_AT_START, STATUS_DRIVER};
use trusty_virtio::rsc::VIRTIO_ID_TIPC;
use trusty_virtio::vring::{DriverQueue, Layout, RawRing, RingError};
use trusty_virtio::{Bus, BusError, VdevHandle};

use crate::wire::{self, heapless_name::Name, Ctrl, FrameError, Header, ShmDesc};
use crate::Error;

/// Rounds of "take a batch from each ring, re-post, kick" one [`TipcDevice::scan`] makes at
/// most. Each kick is a call into the secure side that may bring more frames; the bound keeps a
/// peer that always has more from holding the caller (the owed kick is made by the next scan).
pub const MAX_SCAN_ROUNDS: usize = 4;

/// Tunables of one device. The defaults are the Linux driver's (spec §6.11).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How long a connect waits for CONN_RSP (REPLY_TIMEOUT).
    pub connect_timeout_ms: u64,
    /// How long a sender waits for a free tx buffer (TXBUF_TIMEOUT).
    pub txbuf_timeout_ms: u64,
    /// How long bring-up waits for GO_ONLINE after START.
    pub online_timeout_ms: u64,
    /// Rx buffers posted on vring 0; `None` = the ring size.
    pub rx_buffers: Option<usize>,
    /// Tx buffers allocated at most; `None` = the ring size.
    pub tx_buffers: Option<usize>,
    /// Extra shared rx buffers that replace a filled one in the ring while its message waits
    /// in a channel queue (zero-copy receive). With none, the message is copied out instead.
    pub rx_spare_buffers: usize,
    /// Trusty gets CPU time only when the normal world calls it (a polled driver has no
    /// doorbell interrupt, spec §4, §10.2): an operation that finds the secure side untouched
    /// for this long first donates a NOP, so that its timers and services catch up.
    pub idle_pump_ms: u64,
    /// Largest message buffer, in pages, the sharing mechanism can make visible (a mediator
    /// that translates only a buffer's first page allows 1).
    pub max_buffer_pages: Option<usize>,
    /// Messages one channel may hold unread; `None` = the rx pool (the rx buffers posted on
    /// vring 0). A message arriving on a full channel is discarded and counted in
    /// [`DeviceStats::rx_queue_overflows`], its buffer going straight back to the ring (as
    /// Linux's dn_handle_msg() discards a message when it cannot get a replacement buffer).
    pub rx_queue_limit: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout_ms: 5000,
            txbuf_timeout_ms: 15000,
            online_timeout_ms: 5000,
            rx_buffers: None,
            tx_buffers: None,
            rx_spare_buffers: 8,
            idle_pump_ms: 10,
            max_buffer_pages: None,
            rx_queue_limit: None,
        }
    }
}

/// How long an operation may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Fail with [`Error::Again`] rather than wait (O_NONBLOCK).
    NonBlocking,
    /// Wait at most this many milliseconds.
    Ms(u64),
    /// Wait until the condition holds.
    Forever,
}

/// Device state (spec §6.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Not brought up, or Trusty sent GO_OFFLINE: no channel can connect.
    Offline,
    /// Trusty sent GO_ONLINE: channels may connect.
    Online,
    /// Being removed (shutdown, or tear-down after a failed start).
    Dead,
}

/// Channel state (spec §6.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Not connected (closed, refused, or disconnected by the peer).
    Disconnected,
    /// CONN_REQ sent, waiting for CONN_RSP.
    Connecting,
    /// Connected: messages flow.
    Connected,
    /// The device went offline under the channel, or the channel was closed: nothing more
    /// passes on it.
    Stale,
}

/// A channel handle: slot and generation, so a closed handle never reaches a reused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId {
    slot: u32,
    generation: u32,
}

/// What `poll` reports (spec §7.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollFlags {
    /// A message is waiting.
    pub readable: bool,
    /// A message can be sent now.
    pub writable: bool,
    /// The channel is disconnected or the device is gone.
    pub error: bool,
}

/// Counters, mostly of what the peer did wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames dropped because they failed validation (their buffers were re-posted).
    pub malformed_frames: u64,
    /// Well-formed frames for no open channel, or for a channel not connected.
    pub undeliverable_frames: u64,
    /// Used entries on either ring that broke the ring protocol.
    pub ring_errors: u64,
    /// Messages Trusty reported as dropped (negative used length on vring 1, spec §6.7).
    pub dropped_by_peer: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Received messages copied out because no spare rx buffer was free.
    pub rx_copies: u64,
    /// Kicks issued.
    pub kicks: u64,
    /// Messages discarded because their channel already held `rx_queue_limit` unread ones.
    pub rx_queue_overflows: u64,
    /// Answers (CONN_RSP, DISC_REQ) that arrived for a channel whose connect had already
    /// timed out; they are only used to address the DISC_REQ that close sends.
    pub late_answers: u64,
    /// Memory references sent with `send_memrefs` that were released and reclaimed.
    pub memrefs_reclaimed: u64,
}

/// A message buffer: its index in [`TipcDevice`]'s table of every buffer it shared. The
/// rings' records, the channel queues and the free pools hold these 4-byte indices, so the
/// data path never moves a buffer handle; no index ever comes from the peer.
type BufId = u32;
/// An empty slot in a table of [`BufId`]s.
const NO_BUF: BufId = BufId::MAX;

enum RxMsg {
    /// A filled rx buffer taken off the ring (its payload starts after the header).
    Buffer { buf: BufId, len: usize },
    Copied(Vec<u8>),
}

impl RxMsg {
    /// The payload's length.
    fn len(&self) -> usize {
        match self {
            RxMsg::Buffer { len, .. } => *len,
            RxMsg::Copied(v) => v.len(),
        }
    }
}

struct Channel {
    generation: u32,
    local: u32,
    remote: u32,
    state: ChannelState,
    name: Option<Name>,
    queue: VecDeque<RxMsg>,
    /// The connect timed out while Trusty may still hold an endpoint for it: the channel is
    /// stale for its user, but on the wire it is still connecting (Linux dn_wait_for_reply()
    /// sets only the file's state to STALE, `chan->state` stays CONNECTING), so close must
    /// send DISC_REQ (tipc_chan_shutdown()). Cleared when Trusty's late answer says it holds
    /// nothing (refusal, DISC_REQ) or when the device goes offline.
    disc_on_close: bool,
}

struct Ring {
    queue: DriverQueue<RawRing>,
    // Backs `queue`; released only after the queue is gone.
    mem: SharedBuf,
    notifyid: u32,
}

impl Ring {
    fn new(shared: &mut SharedMemory, num: u32, align: u32, notifyid: u32) -> Result<Ring, Error> {
        let layout = Layout::new(num, align).map_err(BusError::from)?;
        let mem = shared.alloc_shared(layout.size(), Access::ReadWrite)?;
        let base = NonNull::new(mem.as_ptr()).ok_or(Error::NoMemory)?;
        // SAFETY: `mem` is page-aligned, `mem.len()` bytes long, and stays allocated as long as
        // this Ring (it is released in `TipcDevice::release_all` after the queue is dropped).
        let raw = unsafe { RawRing::new(base, mem.len()) };
        match DriverQueue::new(raw, layout) {
            Ok(queue) => Ok(Ring { queue, mem, notifyid }),
            Err(e) => {
                let _ = shared.release(mem);
                Err(BusError::from(e).into())
            }
        }
    }
}


/// How long after the last progress a wait keeps polling the rings between secure calls
/// instead of pausing ([`Clock::relax`]): a peer on another core answers within microseconds;
/// an idle wait then stops burning the core.
pub const SPIN_NS: u64 = 50_000;
/// Ring scans between two secure calls while polling.
pub const SPIN_SCANS: u32 = 32;
/// Most polling rounds between two pauses, whatever the clock says.
pub const MAX_SPIN_ROUNDS: u32 = 256;

/// One TIPC virtio device, brought up on a [`Bus`].
pub struct TipcDevice {
    bus: Bus,
    vdev: VdevHandle,
    cfg: Config,
    clock: alloc::sync::Arc<dyn Clock>,
    dev_name: String,
    buf_size: usize,
    state: DeviceState,
    rx: Ring,
    tx: Ring,
    /// Every message buffer the device shared (posted rx buffers, spares, tx buffers), by
    /// [`BufId`]. Buffers are only added, and all released together at teardown.
    bufs: Vec<SharedBuf>,
    /// Rx buffers on vring 0, by descriptor index (the trusted record of what we posted), or
    /// [`NO_BUF`].
    rx_posted: Box<[BufId]>,
    rx_spare: Vec<BufId>,
    /// Tx buffers on vring 1, by descriptor index, or [`NO_BUF`].
    tx_posted: Box<[BufId]>,
    /// By tx descriptor: the shm ids the message in it carried (emptied, its allocation kept,
    /// when the buffer comes back).
    tx_shm: Box<[Vec<u64>]>,
    tx_free: Vec<BufId>,
    tx_allocated: usize,
    tx_limit: usize,
    channels: Vec<Option<Channel>>,
    next_generation: u32,
    by_addr: BTreeMap<u32, u32>,
    /// The slot `by_addr` last gave: checked first (see `route`).
    route_hint: u32,
    /// Where the search for the next local address starts (cyclic allocation, see `open`).
    next_local: u32,
    /// Messages one channel may hold unread: `rx_queue_limit`, or the rx pool (the rx buffers
    /// posted at start). Set at start.
    rx_limit: usize,
    /// Held rx buffers that go back on the ring together: a quarter of the rx pool, at least
    /// one (see `repost_rx`). Set at start.
    rx_batch: usize,
    /// `idle_pump_ms` in ns (see `catch_up_then`).
    pump_ns: u64,
    /// Buffers waiting to go back on vring 0: the first [`TipcDevice::rx_held`] of a table of
    /// the ring's size (each took the place of a posted buffer, so they never outnumber the
    /// rx pool). They go back in batches (see [`TipcDevice::repost_rx`]).
    rx_repost: Box<[BufId]>,
    rx_held: usize,
    /// Re-posted rx buffers Trusty has not been told about yet (the kick was cut short by the
    /// bound on rounds per scan). A kick that failed is not repeated: the next call into the
    /// secure side gives Trusty the CPU anyway.
    rx_kick_pending: bool,
    /// A secure call was made that no scan has followed yet (the last kick of a scan cut short
    /// by [`MAX_SCAN_ROUNDS`]): frames it brought may wait in the rings.
    scan_owed: bool,
    /// Memory ids sent in messages that Trusty has not released yet.
    shm_outstanding: BTreeMap<u64, u32>,
    /// Memory ids Trusty released (or whose message was dropped): the owner may reclaim them.
    shm_released: VecDeque<u64>,
    /// Memory the stack shared for [`TipcDevice::send_memrefs`], by id: the slot of
    /// `foreign_holds` holding what keeps it alive until Trusty releases the reference and the
    /// share is reclaimed. (A map of plain integers, like `shm_outstanding`: one copy of the
    /// map's code serves both, where a map of holds was a second copy, 7.5 KB of aarch64 code.)
    foreign: BTreeMap<u64, u32>,
    /// What keeps each object of `foreign` alive, by slot; `None` in a free slot.
    foreign_holds: Vec<Option<ForeignHold>>,
    /// The free slots of `foreign_holds`.
    foreign_free: Vec<u32>,
    /// Foreign memory whose reclaim Trusty refused: kept alive for good (spec §3.3).
    foreign_leaked: Vec<ForeignHold>,
    /// When the secure side last had the CPU (ns), or earlier: a call made without a clock read
    /// of its own is stamped with the device's latest read (`clock_seen`), so the idle time
    /// [`TipcDevice::catch_up`] computes is overestimated rather than under, beyond the lag of
    /// a coarse reading (see `catch_up_then`).
    last_secure_call: u64,
    /// The latest clock value this device read (ns).
    clock_seen: u64,
    /// When a scan last found something (clock ns): a wait polls the rings without pausing
    /// while this is within [`SPIN_NS`].
    last_progress: u64,
    /// Polling rounds since the last progress or pause.
    spin_rounds: u32,
    stats: DeviceStats,
}

/// Pages the stack does not own (a client's memfd or dma-buf, mapped into the normal world),
/// to be sent as one memory reference with [`TipcDevice::send_memrefs`].
pub struct ForeignMemRef {
    /// The pages, as the sharer takes them (guest-physical addresses).
    pub ranges: Vec<trusty_platform::mem::PhysRange>,
    /// Size of the object in bytes, as Trusty is told (Linux: `dma_buf->size`).
    pub size: u64,
    /// Read-write when the client's fd is writable, read-only otherwise (Linux `dn_share_fd()`).
    pub access: Access,
    /// FF-A tag (0 unless the platform provides one).
    pub tag: u64,
    /// What keeps the pages alive and mapped where the ranges say; dropped once the share has
    /// been reclaimed.
    pub keep: alloc::boxed::Box<dyn core::any::Any + Send>,
}

impl core::fmt::Debug for ForeignMemRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ForeignMemRef").field("ranges", &self.ranges).field("size", &self.size).field("access", &self.access).finish()
    }
}

/// A table of `n` empty [`BufId`] slots.
// Out of line: bring-up makes three, and each inlined allocation and fill was a copy.
#[inline(never)]
fn no_bufs(n: usize) -> Box<[BufId]> {
    alloc::vec![NO_BUF; n].into_boxed_slice()
}

/// What keeps one sent foreign object alive.
struct ForeignHold {
    _keep: alloc::boxed::Box<dyn core::any::Any + Send>,
}

impl TipcDevice {
    /// Brings the first TIPC device of the bus up (spec §5.5 steps 3-7): fetches the descriptor,
    /// resets the vdev, negotiates no features, shares both vrings and posts rx buffers, sets
    /// status 0x07, starts the bus, and waits for GO_ONLINE.
    /// On failure everything shared so far has been reclaimed (or leaked where refused) and the
    /// bus stopped.
    pub fn probe(mut bus: Bus, cfg: Config) -> Result<TipcDevice, Error> {
        let clock = bus.trusty_ref().clock().clone();
        let handles = bus.fetch_descriptor()?;
        let Some(vdev) = handles.into_iter().find(|&h| bus.vdev(h).is_some_and(|v| v.id == VIRTIO_ID_TIPC)) else {
            let _ = bus.stop();
            return Err(Error::NoDevice);
        };
        // Once both rings exist, every failure goes through the device's one teardown.
        let setup = match Self::setup(&mut bus, vdev, cfg.max_buffer_pages) {
            Ok(setup) => setup,
            Err(e) => {
                let _ = bus.stop();
                return Err(e);
            }
        };
        let mut dev = TipcDevice::from_setup(bus, vdev, cfg, clock, setup);
        match dev.start() {
            Ok(()) => Ok(dev),
            Err(e) => {
                dev.into_bus();
                Err(e)
            }
        }
    }

    /// Negotiates the vdev and makes its two rings (released again if the second fails).
    fn setup(bus: &mut Bus, vdev: VdevHandle, max_buffer_pages: Option<usize>) -> Result<(Ring, Ring, usize, String), Error> {
        // Trusty's bus is not active yet, so it answers ERR_BAD_STATE; that is expected
        // (spec §5.5 step 5a).
        let _ = bus.reset_vdev(vdev);
        bus.set_status(vdev, 1)?;
        bus.set_status(vdev, STATUS_DRIVER)?;
        // TIPC offers no features and we accept none (spec §5.4).
        bus.set_features(vdev, 0)?;
        // Read in place (no copy of the vdev's config and vring tables).
        let info = bus.vdev(vdev).ok_or(Error::NoDevice)?;
        if info.vrings.len() != 2 || info.config.len() < 40 {
            return Err(Error::Protocol(FrameError::BadLength { used: info.config.len() as u32 }));
        }
        let max_size = u32::from_le_bytes([info.config[0], info.config[1], info.config[2], info.config[3]]) as usize;
        // A message buffer is whole pages (spec §6.11); refuse sizes that cannot hold a header or
        // that would make every buffer huge.
        if !(wire::HEADER_LEN + 1..=64 * 1024).contains(&max_size) {
            return Err(Error::Protocol(FrameError::BadLength { used: max_size as u32 }));
        }
        let buf_size = max_size.next_multiple_of(PAGE_SIZE);
        if max_buffer_pages.is_some_and(|max| buf_size > max * PAGE_SIZE) {
            log::error!("message buffers of {buf_size} bytes exceed what the sharing mechanism can make visible");
            return Err(Error::Unsupported("message buffers larger than the sharing mechanism allows"));
        }
        // Linux tipc_virtio_probe(): strncpy into a 32-byte field, then the last byte forced to
        // NUL, so at most 31 bytes of the name survive.
        let name_field = &info.config[8..39];
        let name_len = wire::nul_at(name_field).unwrap_or(name_field.len());
        let dev_name = String::from_utf8_lossy(&name_field[..name_len]).into_owned();
        let (r0, r1) = (info.vrings[0], info.vrings[1]);
        let rx = Ring::new(bus.mem(), r0.num, r0.align, r0.notifyid)?;
        match Ring::new(bus.mem(), r1.num, r1.align, r1.notifyid) {
            Ok(tx) => Ok((rx, tx, buf_size, dev_name)),
            Err(e) => {
                let _ = bus.mem().release(rx.mem);
                Err(e)
            }
        }
    }

    fn from_setup(
        bus: Bus,
        vdev: VdevHandle,
        cfg: Config,
        clock: alloc::sync::Arc<dyn Clock>,
        (rx, tx, buf_size, dev_name): (Ring, Ring, usize, String),
    ) -> TipcDevice {
        let rx_num = usize::from(rx.queue.layout().num());
        let tx_num = usize::from(tx.queue.layout().num());
        TipcDevice {
            bus,
            vdev,
            clock,
            dev_name,
            buf_size,
            state: DeviceState::Offline,
            bufs: Vec::new(),
            rx_posted: no_bufs(rx_num),
            rx_spare: Vec::new(),
            tx_posted: no_bufs(tx_num),
            tx_shm: (0..tx_num).map(|_| Vec::new()).collect(),
            tx_free: Vec::new(),
            tx_allocated: 0,
            tx_limit: cfg.tx_buffers.unwrap_or(tx_num).clamp(1, tx_num),
            rx,
            tx,
            cfg,
            channels: Vec::new(),
            next_generation: 1,
            by_addr: BTreeMap::new(),
            route_hint: 0,
            next_local: wire::MIN_LOCAL_ADDR,
            rx_limit: 1,
            rx_batch: 1,
            pump_ns: cfg.idle_pump_ms.saturating_mul(trusty_platform::clock::NS_PER_MS),
            rx_repost: no_bufs(rx_num),
            rx_held: 0,
            rx_kick_pending: false,
            scan_owed: true,
            shm_outstanding: BTreeMap::new(),
            shm_released: VecDeque::new(),
            foreign: BTreeMap::new(),
            foreign_holds: Vec::new(),
            foreign_free: Vec::new(),
            foreign_leaked: Vec::new(),
            last_secure_call: 0,
            clock_seen: 0,
            last_progress: 0,
            spin_rounds: 0,
            stats: DeviceStats::default(),
        }
    }

    fn start(&mut self) -> Result<(), Error> {
        let ids = [self.rx.mem.id(), self.tx.mem.id()];
        for (i, id) in ids.into_iter().enumerate() {
            self.bus.set_vring_id(self.vdev, i, id)?;
        }
        let rx_num = usize::from(self.rx.queue.layout().num());
        let posted = self.cfg.rx_buffers.unwrap_or(rx_num).clamp(1, rx_num);
        // Rx buffers must be on vring 0 before START: Trusty sends GO_ONLINE inside START
        // (spec §11 subtlety 3).
        for _ in 0..posted {
            let buf = self.bus.mem().alloc_shared(self.buf_size, Access::ReadWrite)?;
            let b = self.add_buf(buf);
            self.post_rx(b);
        }
        self.rx_limit = self.cfg.rx_queue_limit.unwrap_or(posted).max(1);
        self.rx_batch = (posted / 4).max(1);
        for _ in 0..self.cfg.rx_spare_buffers {
            match self.bus.mem().alloc_shared(self.buf_size, Access::ReadWrite) {
                Ok(buf) => {
                    let b = self.add_buf(buf);
                    self.rx_spare.push(b);
                }
                // Spares are an optimisation; a tight share budget simply means copying.
                Err(_) => break,
            }
        }
        self.bus.set_status(self.vdev, STATUS_AT_START)?;
        self.bus.start()?;
        self.scan();
        let deadline = Deadline::after_ms(&*self.clock, self.cfg.online_timeout_ms);
        if !self.wait_until(Some(deadline), &|d| d.state != DeviceState::Offline)? {
            log::error!("TIPC device {}: no GO_ONLINE within {} ms", self.dev_name, self.cfg.online_timeout_ms);
            return Err(Error::TimedOut);
        }
        Ok(())
    }

    /// Takes a newly shared buffer into the device's table.
    fn add_buf(&mut self, buf: SharedBuf) -> BufId {
        self.bufs.push(buf);
        // At most two rings' worth of buffers (2 x 32768) plus the spares: far below NO_BUF.
        (self.bufs.len() - 1) as BufId
    }

    fn post_rx(&mut self, b: BufId) {
        let Some(buf) = self.bufs.get(b as usize) else { return };
        match self.rx.queue.add(buf.id().0, self.buf_size as u32, true) {
            Ok(desc) => {
                if let Some(slot) = self.rx_posted.get_mut(usize::from(desc)) {
                    *slot = b;
                }
            }
            // Cannot happen while posted + in-queue buffers <= ring size; keep the buffer.
            Err(_) => self.rx_spare.push(b),
        }
    }

    /// The device's state.
    pub fn state(&self) -> DeviceState {
        self.state
    }
    /// The device's name (as in `/dev/trusty-ipc-<name>`).
    pub fn dev_name(&self) -> &str {
        &self.dev_name
    }
    /// Largest payload of one message, shm descriptors included (spec §6.11).
    pub fn max_message_size(&self) -> usize {
        self.buf_size - wire::HEADER_LEN
    }
    /// The counters so far.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }
    /// The configuration the device was made with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The virtio bus under the device.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
    /// The virtio bus under the device, mutably.
    pub fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    // ----- scanning ------------------------------------------------------------------------

    /// Processes everything Trusty returned on both rings. Called after every return from the
    /// secure side. Returns whether anything was found.
    ///
    /// Iterative and bounded whatever the peer does: each round takes at most one batch per
    /// ring (the entries published when the round began, at most the ring size), re-posts rx
    /// buffers only after the batch, and then tells Trusty about them with one kick (Linux
    /// `_rxvq_cb()` kicks once after its loop). A kick is a call into the secure side, which
    /// may return more frames; those are taken by the next round, up to [`MAX_SCAN_ROUNDS`]. A
    /// kick still owed after the last round is made by the next scan, so a peer that answers
    /// every kick with a frame costs each scan a bounded number of calls and no stack.
    pub fn scan(&mut self) -> bool {
        self.prefetch_returns();
        let mut any = false;
        for _ in 0..MAX_SCAN_ROUNDS {
            let tx = self.scan_tx();
            let rx = self.scan_rx();
            // Everything the calls so far returned is taken; a kick below owes a scan again.
            self.scan_owed = false;
            any |= tx || rx;
            if !self.rx_kick_pending {
                break;
            }
            self.rx_kick_pending = false;
            // Re-posted buffers may be what a blocked Trusty sender waits for.
            if !self.rx.queue.needs_kick() || self.notify(true).is_err() {
                break;
            }
        }
        self.prefetch_next_send();
        any
    }

    /// Starts fetching for ownership the lines the next send writes: the tx ring's avail index
    /// and slot, and the first line (the header's) of the tx buffer it takes. A peer on another
    /// core (a Trusty VM) read them last, so each store would otherwise have to take its line
    /// back while the kick's request word waits behind it; asked for here, right after a call,
    /// the lines move while the caller does whatever it does before it sends. Not the rx
    /// ring's: re-posts are batched, and Trusty reads its avail lines on every message.
    #[inline]
    fn prefetch_next_send(&self) {
        self.tx.queue.prefetch_next_add();
        if let Some(buf) = self.tx_free.last().and_then(|&b| self.bufs.get(b as usize)) {
            trusty_virtio::vring::prefetch_line_for_write(buf.as_ptr());
        }
    }

    /// Starts fetching together the lines the other side of a call wrote and this scan is
    /// about to read, so that they cross from the other core in parallel instead of one after
    /// the other: both used lines and the rx buffer Trusty fills next (it returns rx buffers
    /// in the order it took them).
    #[inline]
    fn prefetch_returns(&self) {
        self.tx.queue.prefetch_used();
        self.rx.queue.prefetch_used();
        let next = self.rx.queue.next_in_order().and_then(|d| self.rx_posted.get(usize::from(d)));
        if let Some(buf) = next.and_then(|&b| self.bufs.get(b as usize)) {
            trusty_virtio::vring::prefetch_line(buf.as_ptr());
        }
    }

    /// Takes back the tx buffers Trusty returned. Inlined into `scan` (every echo: a call of its
    /// own cost ~20 instructions) and into `wait_tx_buffer`.
    #[inline(always)]
    fn scan_tx(&mut self) -> bool {
        let pending = match self.tx.queue.used_pending() {
            Ok(n) => n,
            Err(e) => {
                self.ring_error("tx", e);
                return true;
            }
        };
        let mut any = false;
        for _ in 0..pending {
            match self.tx.queue.pop_pending() {
                Ok(None) => break,
                Ok(Some(used)) => {
                    any = true;
                    let d = usize::from(used.desc);
                    let Some(b) = self.tx_posted.get_mut(d).map(|s| core::mem::replace(s, NO_BUF)).filter(|&b| b != NO_BUF)
                    else {
                        self.stats.ring_errors += 1;
                        continue;
                    };
                    // used.len on this ring is a status (spec §6.7): negative means dropped, and
                    // the references the message carried are ours to release (Linux
                    // _txvq_cb() -> handle_dropped_mb()).
                    if (used.len as i32) < 0 {
                        self.tx_dropped(d, used.len as i32);
                    } else if let Some(ids) = self.tx_shm.get_mut(d) {
                        ids.clear();
                    }
                    self.tx_free.push(b);
                }
                Err(e) => {
                    any = true;
                    self.ring_error("tx", e);
                }
            }
        }
        any
    }

    /// Trusty dropped the message in tx descriptor `d`: the references it carried are released.
    #[cold]
    #[inline(never)]
    fn tx_dropped(&mut self, d: usize, status: i32) {
        self.stats.dropped_by_peer += 1;
        log::debug!("Trusty dropped a message: status {status}");
        let Some(slot) = self.tx_shm.get_mut(d) else { return };
        let mut ids = core::mem::take(slot);
        for &id in &ids {
            self.release_shm(id);
        }
        ids.clear();
        if let Some(slot) = self.tx_shm.get_mut(d) {
            *slot = ids;
        }
    }

    // Cold and out of line: a broken ring is rare, and the rx/tx scans share one copy.
    #[cold]
    #[inline(never)]
    fn ring_error(&mut self, ring: &str, e: RingError) {
        self.stats.ring_errors += 1;
        log::warn!("TIPC {ring} ring: peer broke the ring protocol: {e:?}");
    }

    fn scan_rx(&mut self) -> bool {
        // The batch `used_pending` announces (at most the ring size) is what `pop_pending`
        // hands out, one entry per call, good or bad, then `None`.
        if let Err(e) = self.rx.queue.used_pending() {
            self.ring_error("rx", e);
            return false;
        }
        let mut processed = 0usize;
        let mut n = self.rx_held;
        loop {
            match self.rx.queue.pop_pending() {
                Ok(None) => break,
                Ok(Some(used)) => {
                    processed += 1;
                    let posted = self.rx_posted.get_mut(usize::from(used.desc)).map(|s| core::mem::replace(s, NO_BUF));
                    match posted.filter(|&b| b != NO_BUF) {
                        Some(b) => {
                            let back = self.handle_rx(b, used.len);
                            // At most `pending` <= ring size entries: the table has room.
                            if let Some(slot) = self.rx_repost.get_mut(n) {
                                *slot = back;
                                n += 1;
                            }
                        }
                        None => self.stats.ring_errors += 1,
                    }
                }
                // A repeated or unknown id (BadUsedId) is counted and skipped.
                Err(e) => self.ring_error("rx", e),
            }
        }
        self.rx_held = n;
        // Only now do the buffers go back: a used entry later in the batch that repeats an id
        // finds it no longer in flight (a ring error) instead of an old message in a buffer
        // that was just re-posted.
        if processed > 0 {
            self.repost_rx();
        }
        processed > 0
    }

    /// Puts the held rx buffers back on vring 0 once a quarter of the pool (at least one) is
    /// held, or at once when Trusty waits for a buffer, and then owes Trusty a kick check.
    /// Trusty's vqueue sets VRING_USED_F_NO_NOTIFY while it drains a ring and clears it (full
    /// barrier, re-check) just before it sleeps on an empty one (spec §4 "Kick suppression";
    /// its tx thread waiting in `vqueue_get_avail_buf()` for an rx buffer): a clear flag on
    /// vring 0 means it waits.
    ///
    /// Linux's `_rxvq_cb()` re-adds each buffer as it takes it. Batching keeps three quarters
    /// of the pool posted and saves, on most messages, the avail line's trip to this core and
    /// back and the store-load barrier of the kick check (`needs_kick`), each a cross-core
    /// transfer on a Trusty polling on another core. It cannot leave Trusty waiting: Trusty
    /// can only run dry after taking every posted buffer, and the scan that takes their used
    /// entries holds at least the batch; a flag read too early (Trusty clears it just after)
    /// is caught the same way by the next scan, which every call and every wait step makes.
    fn repost_rx(&mut self) {
        if self.rx_held < self.rx_batch && !self.rx.queue.device_wants_kick() {
            return;
        }
        for i in 0..core::mem::take(&mut self.rx_held) {
            if let Some(&b) = self.rx_repost.get(i) {
                self.post_rx(b);
            }
        }
        self.rx_kick_pending = true;
    }

    /// Validates one received frame (spec §6.6 steps 6-9) and routes it (Linux
    /// `_handle_rxbuf()`). Returns the buffer to re-post: the same one, unless it moved to a
    /// channel queue, in which case a spare takes its place.
    fn handle_rx(&mut self, b: BufId, used: u32) -> BufId {
        let Some(buf) = self.bufs.get(b as usize) else { return b };
        let header = match Self::validate_rx(buf, used, self.buf_size) {
            Ok(h) => h,
            Err(e) => {
                self.malformed_frame(e);
                return b;
            }
        };
        let payload_len = usize::from(header.len);
        if header.dst == wire::CTRL_ADDR {
            self.handle_ctrl_frame(b, payload_len, used);
            return b;
        }
        // Data: route by dst only; Trusty leaves src 0 (spec §11 subtlety 5).
        let limit = self.rx_limit;
        // One address lookup and one slot look-up per message.
        let chan = match Self::route(&mut self.channels, &self.by_addr, &mut self.route_hint, header.dst) {
            Some(c) if c.state == ChannelState::Connected => c,
            _ => {
                self.stats.undeliverable_frames += 1;
                return b;
            }
        };
        let queued = chan.queue.len();
        if queued >= limit {
            Self::rx_queue_full(&mut self.stats, header.dst, queued);
            return b;
        }
        self.stats.messages_received += 1;
        let (msg, repost) = match self.rx_spare.pop() {
            Some(spare) => (RxMsg::Buffer { buf: b, len: payload_len }, spare),
            None => (RxMsg::Copied(Self::copy_out(&self.bufs, &mut self.stats, b, payload_len)), b),
        };
        chan.queue.push_back(msg);
        repost
    }

    /// A control message in rx buffer `b` (its header validated): parsed and handled.
    // Out of line: rare next to data, and its parse buffers would widen every scan's frame.
    #[inline(never)]
    fn handle_ctrl_frame(&mut self, b: BufId, payload_len: usize, used: u32) {
        let Some(buf) = self.bufs.get(b as usize) else { return };
        // Most control messages fit on the stack; Linux accepts longer bodies for some types
        // (GO_ONLINE, RELEASE), which are read into the heap.
        let mut small = [0u8; wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
        let mut large = Vec::new();
        let p: &mut [u8] = match small.get_mut(..payload_len) {
            Some(p) => p,
            None => {
                large.resize(payload_len, 0);
                &mut large
            }
        };
        let parsed = buf
            .read(wire::HEADER_LEN, p)
            .map_err(|_| FrameError::BadLength { used })
            // shm_cnt is not written by Trusty on what it sends (spec §11 5): ignore it.
            .and_then(|()| wire::parse_ctrl(p, 0, false));
        match parsed {
            Ok(msg) => self.handle_ctrl(msg),
            Err(e) => {
                self.stats.malformed_frames += 1;
                log::warn!("dropping malformed control message: {e:?}");
            }
        }
    }

    // Cold and out of line: the scan's code stays small.
    #[cold]
    #[inline(never)]
    fn rx_queue_full(stats: &mut DeviceStats, addr: u32, queued: usize) {
        stats.rx_queue_overflows += 1;
        log::warn!("channel {addr}: {queued} messages unread, discarding an incoming one");
    }

    /// No spare buffer was free: the payload of rx buffer `b` is copied out so the buffer can
    /// go back on the ring at once.
    #[cold]
    #[inline(never)]
    fn copy_out(bufs: &[SharedBuf], stats: &mut DeviceStats, b: BufId, payload_len: usize) -> Vec<u8> {
        let mut data = alloc::vec![0u8; payload_len];
        if let Some(buf) = bufs.get(b as usize) {
            let _ = buf.read(wire::HEADER_LEN, &mut data);
        }
        stats.rx_copies += 1;
        data
    }

    #[cold]
    #[inline(never)]
    fn malformed_frame(&mut self, e: FrameError) {
        self.stats.malformed_frames += 1;
        log::warn!("dropping malformed frame from Trusty: {e:?}");
    }

    /// The open channel whose local address is `addr`. The slot `by_addr` gave last
    /// (`route_hint`) is tried first: it is the answer while the channel in it has that address,
    /// as local addresses are unique among open channels and `by_addr` holds exactly the open
    /// ones; so a stream of messages for one channel skips the map. (Fields, not `self`: the
    /// caller goes on using the device's other fields.)
    #[inline]
    fn route<'a>(
        channels: &'a mut [Option<Channel>],
        by_addr: &BTreeMap<u32, u32>,
        route_hint: &mut u32,
        addr: u32,
    ) -> Option<&'a mut Channel> {
        let hint = *route_hint as usize;
        if channels.get(hint).and_then(Option::as_ref).is_some_and(|c| c.local == addr) {
            // The same look-up again: the compiler folds the two into one.
            return channels.get_mut(hint).and_then(Option::as_mut);
        }
        let slot = *by_addr.get(&addr)?;
        *route_hint = slot;
        channels.get_mut(slot as usize).and_then(Option::as_mut)
    }

    #[inline]
    fn validate_rx(buf: &SharedBuf, used: u32, buf_size: usize) -> Result<Header, FrameError> {
        // Also catches Trusty's negative errors, which read as huge lengths (spec §6.6 step 6).
        if (used as usize) < wire::HEADER_LEN || used as usize > buf_size {
            return Err(FrameError::BadLength { used });
        }
        let mut raw = [0u8; wire::HEADER_LEN];
        buf.read(0, &mut raw).map_err(|_| FrameError::BadLength { used })?;
        let header = Header::decode(&raw).ok_or(FrameError::BadLength { used })?;
        if used as usize - wire::HEADER_LEN != usize::from(header.len) {
            return Err(FrameError::LengthMismatch { used, hdr_len: header.len });
        }
        Ok(header)
    }

    fn handle_ctrl(&mut self, msg: Ctrl) {
        match msg {
            Ctrl::GoOnline => {
                if self.state == DeviceState::Offline {
                    log::info!("TIPC device {} online", self.dev_name);
                    self.state = DeviceState::Online;
                }
            }
            Ctrl::GoOffline => {
                if self.state == DeviceState::Online {
                    log::warn!("TIPC device {} went offline", self.dev_name);
                    self.state = DeviceState::Offline;
                    // Every channel becomes stale (spec §6.10; Linux _go_offline() sets
                    // `chan->state` STALE too, so closing one sends nothing). Waiters see it at
                    // their next round: a connect ends with WentOffline, a sender or a close
                    // waiting for a tx buffer with NoDevice, a reader with Shutdown.
                    for chan in self.channels.iter_mut().flatten() {
                        chan.state = ChannelState::Stale;
                        chan.remote = 0;
                        chan.disc_on_close = false;
                    }
                }
            }
            Ctrl::ConnRsp { target, status, remote, .. } => match self.channel_by_addr(target) {
                // Linux _handle_conn_rsp(): only a channel still CONNECTING takes the answer.
                Some(chan) if chan.state == ChannelState::Connecting => {
                    if status == 0 {
                        chan.state = ChannelState::Connected;
                        chan.remote = remote;
                    } else {
                        // Every refusal looks alike on the wire (spec §11 subtlety 7).
                        log::debug!("connect refused with status {status}");
                        chan.state = ChannelState::Disconnected;
                    }
                }
                // The connect timed out but on the wire it was still connecting: Linux moves
                // `chan->state` on (CONNECTED with the remote, or DISCONNECTED). The channel stays
                // stale here; what is kept is whether close owes Trusty a DISC_REQ, and for
                // which endpoint.
                Some(chan) if chan.disc_on_close => {
                    if status == 0 {
                        chan.remote = remote;
                    } else {
                        chan.disc_on_close = false;
                    }
                    self.stats.late_answers += 1;
                }
                _ => self.stats.undeliverable_frames += 1,
            },
            Ctrl::DiscReq { target } => match self.channel_by_addr(target) {
                // Linux _handle_disc_req().
                Some(chan) if matches!(chan.state, ChannelState::Connected | ChannelState::Connecting) => {
                    chan.state = ChannelState::Disconnected;
                    chan.remote = 0;
                }
                // Trusty freed the endpoint of a timed-out connect itself: nothing owed.
                Some(chan) if chan.disc_on_close => {
                    chan.disc_on_close = false;
                    chan.remote = 0;
                    self.stats.late_answers += 1;
                }
                _ => self.stats.undeliverable_frames += 1,
            },
            Ctrl::Release { id } => self.release_shm(id),
            // Only sent in answer to requests this stack never makes (spec §6.12).
            Ctrl::ReuseMsgBufRsp | Ctrl::UnmapRsp { .. } => self.stats.undeliverable_frames += 1,
            // Messages that only travel towards Trusty.
            Ctrl::ConnReq { .. } | Ctrl::ReuseMsgBufReq | Ctrl::UnmapReq { .. } => self.stats.malformed_frames += 1,
        }
    }

    /// One message's reference to `id` is over (a RELEASE, or its message was dropped). The id
    /// becomes reclaimable only when no message sent with it is outstanding: Trusty sends one
    /// RELEASE per reference it was given (each descriptor of each message), so the count is
    /// per message, not per id. (Linux shares a fresh handle per message, `dn_share_fd()`, and
    /// drops it on its one RELEASE in `_handle_release()`; here the caller may send one id in
    /// several messages.)
    // Out of line: a RELEASE and a dropped message share one copy of the map work.
    #[inline(never)]
    fn release_shm(&mut self, id: u64) {
        // One search: the entry both counts down and, at zero, goes.
        match self.shm_outstanding.entry(id) {
            Entry::Occupied(mut count) => {
                *count.get_mut() = count.get().saturating_sub(1);
                if *count.get() == 0 {
                    count.remove();
                    // Ours (send_memrefs) are reclaimed; the caller's are handed back.
                    if !self.reclaim_foreign(id) {
                        self.shm_released.push_back(id);
                    }
                }
            }
            Entry::Vacant(_) => log::warn!("RELEASE of unknown memory id {id:#x}"),
        }
    }

    /// Takes back memory the stack shared for [`TipcDevice::send_memrefs`] and drops what kept
    /// it alive (Linux `_handle_release()` -> `tipc_shared_handle_drop()`: reclaim, then
    /// `dma_buf_put()`). A refused reclaim keeps the memory alive for good: Trusty may still map
    /// it. Returns whether `id` was such memory.
    fn reclaim_foreign(&mut self, id: u64) -> bool {
        let Some(slot) = self.foreign.remove(&id) else { return false };
        let hold = self.foreign_holds.get_mut(slot as usize).and_then(Option::take);
        self.foreign_free.push(slot);
        match self.bus.mem().sharer_mut().reclaim(MemoryId(id)) {
            Ok(()) => {
                self.stats.memrefs_reclaimed += 1;
                drop(hold);
            }
            Err(e) => {
                log::warn!("cannot reclaim memory reference {id:#x}: {e}; keeping it alive");
                if let Some(hold) = hold {
                    self.foreign_leaked.push(hold);
                }
            }
        }
        true
    }

    /// Keeps `hold` alive for memory id `id` until [`TipcDevice::reclaim_foreign`] takes it.
    fn hold_foreign(&mut self, id: u64, hold: ForeignHold) {
        let slot = match self.foreign_free.pop() {
            Some(slot) => slot,
            None => {
                self.foreign_holds.push(None);
                // At most one slot per id held, and ids held are bounded by what the sharer
                // hands out: far below u32::MAX.
                (self.foreign_holds.len() - 1) as u32
            }
        };
        if let Some(free) = self.foreign_holds.get_mut(slot as usize) {
            *free = Some(hold);
        }
        // `send_memrefs` refuses an id still in use (`id_in_use`) before it holds anything.
        let replaced = self.foreign.insert(id, slot);
        debug_assert!(replaced.is_none(), "memory id {id:#x} held twice");
    }

    /// Memory references sent with [`TipcDevice::send_memrefs`] that Trusty still holds.
    pub fn memrefs_outstanding(&self) -> usize {
        self.foreign.len()
    }

    /// Memory references whose reclaim Trusty refused (kept alive for good).
    pub fn memrefs_leaked(&self) -> usize {
        self.foreign_leaked.len()
    }

    /// Memory ids whose messages Trusty is done with (released, or the message was dropped):
    /// their owner may now reclaim them.
    pub fn take_released(&mut self) -> Option<u64> {
        self.shm_released.pop_front()
    }

    /// Tells Trusty that a ring has new buffers; does not scan (the caller does, or is the scan).
    fn notify(&mut self, rx: bool) -> Result<(), Error> {
        let notifyid = if rx { self.rx.notifyid } else { self.tx.notifyid };
        self.stats.kicks += 1;
        self.scan_owed = true;
        let r = self.bus.kick(self.vdev, notifyid);
        // No clock read here: see `last_secure_call`.
        self.last_secure_call = self.clock_seen;
        r.map_err(Error::from)
    }

    /// Kicks a ring and takes what Trusty returned during the call.
    fn kick_ring(&mut self, rx: bool) -> Result<(), Error> {
        let r = self.notify(rx);
        self.scan();
        r
    }

    /// Donates one slice of CPU time to Trusty (a NOP) and scans. Returns whether the scan found
    /// anything.
    // Out of line: the NOP's world switch dwarfs a call, and seven callers share one copy.
    #[inline(never)]
    pub fn pump(&mut self) -> Result<bool, Error> {
        let r = self.bus.trusty().nop(0, 0, 0);
        self.clock_seen = self.clock.now_ns();
        self.last_secure_call = self.clock_seen;
        let found = self.scan();
        r?;
        if found {
            self.last_progress = self.last_secure_call;
        }
        Ok(found)
    }

    /// Gives Trusty a NOP (and scans) if it has not run for `idle_pump_ms`; otherwise only
    /// scans when `scan` says so.
    ///
    /// The clock read is the coarse one ([`Clock::now_coarse_ns`]): the threshold is
    /// milliseconds, and this read is on every send. A coarse reading is up to `lag` behind, and
    /// so are the stamps taken from one (`clock_seen`), so the idle time seen is within `lag` of
    /// the true one either way: the NOP comes once Trusty has been idle between
    /// `idle_pump_ms - lag` and `idle_pump_ms + lag`. The lag allowed is under half the
    /// threshold; a precise clock (lag 0) decides at exactly `idle_pump_ms`.
    fn catch_up_then(&mut self, scan: bool) -> Result<(), Error> {
        let pump_ns = self.pump_ns;
        let (now, _lag) = self.clock.now_coarse_ns(pump_ns.saturating_sub(1) / 2);
        self.clock_seen = now;
        if now.saturating_sub(self.last_secure_call) >= pump_ns {
            self.pump()?;
        } else if scan {
            self.scan();
        }
        Ok(())
    }

    /// Scans, and first gives Trusty a NOP if it has not run for `idle_pump_ms`.
    // Out of line: one copy for its callers (recv's empty queue, poll, readiness); send has its
    // own inlined `catch_up_then(false)`.
    #[inline(never)]
    fn catch_up(&mut self) -> Result<(), Error> {
        self.catch_up_then(true)
    }

    /// After a NOP that found nothing: a Trusty running on another core (a Trusty VM, a model
    /// thread) finishes the work the NOP started after it returned, so poll the rings a while
    /// (no secure call, no clock read) while the last progress is recent, then pause.
    /// Returns whether a scan found something.
    fn idle_after_pump(&mut self, now_ns: u64) -> bool {
        // A clock that does not move by itself (a test's) ends the spinning too.
        if now_ns.saturating_sub(self.last_progress) < SPIN_NS && self.spin_rounds < MAX_SPIN_ROUNDS {
            self.spin_rounds += 1;
            // An opaque bound: the loop is not unrolled into 32 copies of the scan call (a
            // wait's idle path, where a few instructions per round do not matter).
            for _ in 0..core::hint::black_box(SPIN_SCANS) {
                if self.scan() {
                    self.last_progress = now_ns;
                    self.spin_rounds = 0;
                    return true;
                }
                core::hint::spin_loop();
            }
            false
        } else {
            self.spin_rounds = 0;
            self.clock.relax();
            false
        }
    }

    /// Runs NOP+scan rounds until `done` holds or `deadline` passes (`None`: no deadline).
    /// Returns whether `done` held. One clock read per round (the NOP's).
    // Cold (bring-up, connect, wait_any) and out of line: one copy for every condition.
    #[inline(never)]
    fn wait_until(&mut self, deadline: Option<Deadline>, done: &dyn Fn(&TipcDevice) -> bool) -> Result<bool, Error> {
        if done(self) {
            return Ok(true);
        }
        if deadline.is_some_and(|d| d.expired(&*self.clock)) {
            return Ok(false);
        }
        loop {
            let found = self.pump()?;
            if done(self) {
                return Ok(true);
            }
            let now = self.last_secure_call;
            if deadline.is_some_and(|d| d.passed_at(now)) {
                return Ok(false);
            }
            if !found {
                self.idle_after_pump(now);
                if done(self) {
                    return Ok(true);
                }
            }
        }
    }

    /// One round of a blocking wait: fail at once without blocking, or when the deadline has
    /// passed; otherwise donate a NOP and scan, and if nothing happened poll a while or pause.
    /// Reads the clock once (when the NOP returns).
    fn wait_step(&mut self, timeout: Timeout, deadline: Option<Deadline>) -> Result<(), Error> {
        if timeout == Timeout::NonBlocking {
            return Err(Error::Again);
        }
        if self.pump()? {
            return Ok(());
        }
        let now = self.last_secure_call;
        if deadline.is_some_and(|d| d.passed_at(now)) {
            return Err(Error::TimedOut);
        }
        self.idle_after_pump(now);
        Ok(())
    }

    fn deadline(&self, t: Timeout) -> Option<Deadline> {
        match t {
            Timeout::NonBlocking => Some(Deadline::now()),
            Timeout::Ms(ms) => Some(Deadline::after_ms(&*self.clock, ms)),
            Timeout::Forever => None,
        }
    }

    // ----- tx buffers --------------------------------------------------------------------------

    /// A free tx buffer: recycled, newly shared while under the pool limit, or waited for
    /// (spec §6.5 step 1). The device must be online, checked on every round, so GO_OFFLINE
    /// ends the wait at once (Linux `_get_txbuf_locked()` -> ENODEV, and `_go_offline()` wakes
    /// `sendq`).
    #[inline]
    fn get_tx_buffer(&mut self, timeout: Timeout) -> Result<BufId, Error> {
        // The common case inline: online, with a buffer free (the first round below).
        if self.state == DeviceState::Online {
            if let Some(buf) = self.tx_free.pop() {
                return Ok(buf);
            }
        }
        self.wait_tx_buffer(timeout)
    }

    /// [`TipcDevice::get_tx_buffer`] when none is free at once (or the device is not online).
    // Out of line: shared by the senders, and it scans, shares or waits.
    #[inline(never)]
    fn wait_tx_buffer(&mut self, timeout: Timeout) -> Result<BufId, Error> {
        // Read from the clock only when a wait is needed: a free buffer costs no clock read.
        let mut deadline = None;
        loop {
            if self.state != DeviceState::Online {
                return Err(Error::NoDevice);
            }
            // Only when none is free: buffers Trusty returned since the last scan (every secure
            // call is followed by a full scan, so usually none).
            if self.tx_free.is_empty() {
                self.scan_tx();
            }
            if let Some(buf) = self.tx_free.pop() {
                return Ok(buf);
            }
            if self.tx_allocated < self.tx_limit {
                // Tx buffers are shared read-only: Trusty only reads them (spec §3.3).
                match self.bus.mem().alloc_shared(self.buf_size, Access::ReadOnly) {
                    Ok(buf) => {
                        self.tx_allocated += 1;
                        return Ok(self.add_buf(buf));
                    }
                    Err(e) => {
                        // Out of pages or shares: wait for a buffer in flight, if there is one.
                        if self.tx_allocated == 0 {
                            return Err(e.into());
                        }
                        self.tx_limit = self.tx_allocated;
                    }
                }
            }
            let d = *deadline.get_or_insert_with(|| self.deadline(timeout));
            self.wait_step(timeout, d)?;
        }
    }

    /// Puts a filled tx buffer on vring 1 (with the shm ids its message carries) and kicks if
    /// Trusty wants it (spec §6.5 step 4).
    fn queue_tx(&mut self, b: BufId, frame_len: usize, shm: &[ShmDesc]) -> Result<(), Error> {
        let added = match self.bufs.get(b as usize) {
            Some(buf) => self.tx.queue.add(buf.id().0, frame_len as u32, false).ok(),
            None => None,
        };
        let Some(desc) = added else {
            // Unreachable while tx buffers <= ring size; never lose the buffer.
            self.tx_free.push(b);
            return Err(Error::Again);
        };
        let d = usize::from(desc);
        if let Some(slot) = self.tx_posted.get_mut(d) {
            *slot = b;
        }
        if !shm.is_empty() {
            if let Some(ids) = self.tx_shm.get_mut(d) {
                ids.extend(shm.iter().map(|s| s.obj_id));
            }
        }
        self.stats.messages_sent += 1;
        if self.tx.queue.needs_kick() {
            self.kick_ring(false)?;
        }
        Ok(())
    }

    fn send_ctrl(&mut self, msg: &Ctrl, src: u32) -> Result<(), Error> {
        let b = self.get_tx_buffer(Timeout::Ms(self.cfg.txbuf_timeout_ms))?;
        self.send_ctrl_with(b, msg, src)
    }

    /// Sends a control message in a tx buffer the caller already holds.
    fn send_ctrl_with(&mut self, b: BufId, msg: &Ctrl, src: u32) -> Result<(), Error> {
        let mut frame = [0u8; wire::HEADER_LEN + wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
        let Some(len) = wire::encode_ctrl(msg, src, &mut frame) else {
            self.tx_free.push(b);
            return Err(Error::InvalidArgument);
        };
        let written = match self.bufs.get(b as usize) {
            Some(buf) => buf.write(0, &frame[..len]).map_err(Error::from),
            None => Err(Error::NoMemory),
        };
        if let Err(e) = written {
            self.tx_free.push(b);
            return Err(e);
        }
        self.queue_tx(b, len, &[])
    }

    // ----- channels ----------------------------------------------------------------------------

    // Out of line: the control messages' two look-ups share one copy of the search.
    #[inline(never)]
    fn channel_by_addr(&mut self, addr: u32) -> Option<&mut Channel> {
        Self::route(&mut self.channels, &self.by_addr, &mut self.route_hint, addr)
    }

    fn channel(&mut self, id: ChannelId) -> Result<&mut Channel, Error> {
        self.channels
            .get_mut(id.slot as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == id.generation)
            .ok_or(Error::BadHandle)
    }

    /// Opens a channel with a fresh local address (spec §6.1). The device must be online
    /// (spec §6.4 step 1; Linux `vds_add_channel()` answers EINVAL otherwise).
    ///
    /// Addresses are handed out cyclically, the first free one after the last given out
    /// (wrapping from i32::MAX back to 1024), where Linux's `idr_alloc()` takes the lowest free
    /// one. A closed channel's address is thus not reused until about 2^31 opens later, so a
    /// late CONN_RSP, DISC_REQ or data message for it finds no channel and is dropped instead of
    /// landing on an unrelated new one.
    pub fn open(&mut self) -> Result<ChannelId, Error> {
        if self.state != DeviceState::Online {
            return Err(Error::InvalidArgument);
        }
        let local = self.alloc_local().ok_or(Error::InvalidArgument)?;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let chan = Channel {
            generation,
            local,
            remote: 0,
            state: ChannelState::Disconnected,
            name: None,
            queue: VecDeque::new(),
            disc_on_close: false,
        };
        // Into the first free slot, or a new one: nothing is overwritten, so nothing dropped.
        let slot = match self.channels.iter().position(Option::is_none) {
            Some(s) => {
                if let Some(free) = self.channels.get_mut(s) {
                    free.get_or_insert(chan);
                }
                s
            }
            None => {
                self.channels.push(Some(chan));
                self.channels.len() - 1
            }
        };
        self.by_addr.insert(local, slot as u32);
        Ok(ChannelId { slot: slot as u32, generation })
    }

    /// The first address from `next_local` on that no open channel holds, wrapping in
    /// 1024..=i32::MAX; `None` when every one is taken.
    fn alloc_local(&mut self) -> Option<u32> {
        const MAX: u32 = i32::MAX as u32;
        let mut candidate = self.next_local.clamp(wire::MIN_LOCAL_ADDR, MAX);
        // Each step skips a run of taken addresses; at most one wrap.
        for _ in 0..2 {
            candidate = Self::first_unheld(&self.by_addr, candidate)?;
            if candidate <= MAX {
                self.next_local = if candidate == MAX { wire::MIN_LOCAL_ADDR } else { candidate + 1 };
                return Some(candidate);
            }
            candidate = wire::MIN_LOCAL_ADDR;
        }
        None
    }

    /// The first address from `candidate` on that `by_addr` does not hold; `None` past u32::MAX.
    // Out of line: `alloc_local`'s two passes (its loop is unrolled) share one copy of the walk.
    #[inline(never)]
    fn first_unheld(by_addr: &BTreeMap<u32, u32>, mut candidate: u32) -> Option<u32> {
        for (&addr, _) in by_addr.range(candidate..) {
            if addr != candidate {
                break;
            }
            candidate = addr.checked_add(1)?;
        }
        Some(candidate)
    }

    /// Sends CONN_REQ for `port` (spec §6.4 steps 2-3) without waiting for the answer.
    ///
    /// Order of checks as Linux `tipc_chan_connect()`: the name first, then a tx buffer (device
    /// offline -> NoDevice, none within the tx-buffer timeout -> TimedOut), then the channel's
    /// state (same name -> done, other name -> Already / IsConnected, stale -> Shutdown); the
    /// buffer goes back unused when nothing is sent.
    pub fn start_connect(&mut self, id: ChannelId, port: &str) -> Result<(), Error> {
        let name = port.as_bytes();
        if name.len() >= wire::PORT_NAME_FIELD {
            return Err(Error::NameTooLong);
        }
        if name.is_empty() || wire::nul_at(name).is_some() {
            return Err(Error::InvalidArgument);
        }
        let name = Name::new(name).ok_or(Error::NameTooLong)?;
        self.channel(id)?;
        self.catch_up()?;
        let buf = self.get_tx_buffer(Timeout::Ms(self.cfg.txbuf_timeout_ms))?;
        let chan = match self.channel(id) {
            Ok(c) => c,
            Err(e) => {
                self.tx_free.push(buf);
                return Err(e);
            }
        };
        let early = match chan.state {
            ChannelState::Connecting | ChannelState::Connected
                if chan.name.as_ref().is_some_and(|n| n.as_bytes() == name.as_bytes()) =>
            {
                Some(Ok(()))
            }
            ChannelState::Connecting => Some(Err(Error::Already)),
            ChannelState::Connected => Some(Err(Error::IsConnected)),
            ChannelState::Stale => Some(Err(Error::Shutdown)),
            ChannelState::Disconnected => None,
        };
        if let Some(result) = early {
            self.tx_free.push(buf);
            return result;
        }
        let local = chan.local;
        // CONNECTING before the request leaves: the answer can come back inside the kick.
        chan.state = ChannelState::Connecting;
        chan.name = Some(name.clone());
        if let Err(e) = self.send_ctrl_with(buf, &Ctrl::ConnReq { name }, local) {
            let chan = self.channel(id)?;
            chan.state = ChannelState::Disconnected;
            chan.name = None;
            return Err(e);
        }
        Ok(())
    }

    /// Waits for a connect to finish (spec §6.4 steps 8-9, Linux `dn_wait_for_reply()`):
    /// connected -> Ok; refused or closed before accept -> NotConnected (unless messages already
    /// arrived); GO_OFFLINE meanwhile -> WentOffline (EIO); no answer within the connect timeout
    /// -> TimedOut, and the channel is stale for good. Trusty may still hold an endpoint for a
    /// timed-out connect, so closing the channel sends it DISC_REQ.
    pub fn finish_connect(&mut self, id: ChannelId) -> Result<(), Error> {
        let was_connecting = self.channel(id)?.state == ChannelState::Connecting;
        let deadline = Deadline::after_ms(&*self.clock, self.cfg.connect_timeout_ms);
        let answered =
            self.wait_until(Some(deadline), &|d| d.peek(id).map_or(true, |c| c.state != ChannelState::Connecting))?;
        let chan = self.channel(id)?;
        if !answered {
            chan.state = ChannelState::Stale;
            chan.disc_on_close = true;
            return Err(Error::TimedOut);
        }
        match chan.state {
            ChannelState::Connected => Ok(()),
            ChannelState::Disconnected if !chan.queue.is_empty() => Ok(()),
            // Only GO_OFFLINE takes a connecting channel to stale.
            ChannelState::Stale if was_connecting => Err(Error::WentOffline),
            ChannelState::Stale => Err(Error::Shutdown),
            _ => Err(Error::NotConnected),
        }
    }

    fn peek(&self, id: ChannelId) -> Option<&Channel> {
        self.channels.get(id.slot as usize)?.as_ref().filter(|c| c.generation == id.generation)
    }

    /// Opens a channel and connects it to `port`; on failure the channel is closed again.
    pub fn connect(&mut self, port: &str) -> Result<ChannelId, Error> {
        let id = self.open()?;
        let result = self.start_connect(id, port).and_then(|()| self.finish_connect(id));
        match result {
            Ok(()) => Ok(id),
            Err(e) => {
                let _ = self.close(id);
                Err(e)
            }
        }
    }

    /// The state of channel `id` (`BadHandle` when it is not open).
    pub fn channel_state(&self, id: ChannelId) -> Result<ChannelState, Error> {
        self.peek(id).map(|c| c.state).ok_or(Error::BadHandle)
    }

    /// Sends one message: the concatenation of `iov`, followed by `shm` references (spec §6.5,
    /// §6.9). Returns the data length. Delivery is not confirmed: Trusty may still drop it.
    ///
    /// Errors come in Linux's order (`tipc_write_iter()`, `filp_send_ioctl()`): too many
    /// references (TooBig); with references, a channel not connected (NotConnected, as
    /// `dn_share_fd()`); then the tx buffer (NoDevice when offline, Again without blocking,
    /// TimedOut); then the size (MessageSize); then the channel's state (NotConnected /
    /// Shutdown, `tipc_chan_queue_msg()`).
    pub fn send(&mut self, id: ChannelId, iov: &[&[u8]], shm: &[ShmDesc], timeout: Timeout) -> Result<usize, Error> {
        if shm.len() > usize::from(u16::MAX) {
            return Err(Error::TooBig);
        }
        // A closed handle is refused before anything else.
        let state = self.channel(id)?.state;
        if !shm.is_empty() && state != ChannelState::Connected {
            return Err(Error::NotConnected);
        }
        // Saturating sums: a length past usize::MAX is refused (MessageSize) as usize::MAX is.
        // `shm.len()` is at most 65535 here, so its product cannot overflow.
        let data_len = iov.iter().fold(0usize, |acc, s| acc.saturating_add(s.len()));
        let payload_len = data_len.saturating_add(shm.len() * wire::SHM_DESC_LEN);
        // A Trusty idle for `idle_pump_ms` gets a NOP first: it runs only when called, so what
        // it would have done meanwhile (a service closing the channel, AOSP's closer3) must be
        // seen before the send, as Linux sees it through Trusty's own interrupts. This is the
        // echo's one clock read. No scan otherwise: every secure call was followed by one, the
        // tx ring is scanned when no buffer is free, and the kick below scans what Trusty
        // returns.
        self.catch_up_then(false)?;
        let b = self.get_tx_buffer(timeout)?;
        if payload_len > self.max_message_size() {
            self.tx_free.push(b);
            return Err(Error::MessageSize);
        }
        // The wait may have let the peer close the channel or take the device offline.
        let (local, remote) = match self.channel(id) {
            Ok(c) if c.state == ChannelState::Connected => (c.local, c.remote),
            Ok(c) => {
                let e = Self::require_connected(c.state).err().unwrap_or(Error::NotConnected);
                self.tx_free.push(b);
                return Err(e);
            }
            Err(e) => {
                self.tx_free.push(b);
                return Err(e);
            }
        };
        let header = Header { src: local, dst: remote, shm_cnt: shm.len() as u16, len: payload_len as u16, flags: 0 };
        let written = match self.bufs.get(b as usize) {
            Some(buf) => Self::write_frame(buf, &header, iov, shm).map_err(Error::from),
            None => Err(Error::NoMemory),
        };
        if let Err(e) = written {
            self.tx_free.push(b);
            return Err(e);
        }
        // Registered before queuing: the RELEASE may come back inside the kick (spec §6.9).
        for d in shm {
            *self.shm_outstanding.entry(d.obj_id).or_insert(0) += 1;
        }
        self.queue_tx(b, wire::HEADER_LEN + payload_len, shm)?;
        Ok(data_len)
    }

    /// Writes a message (header, data, shm descriptors) into tx buffer `buf`.
    // Inlined into `send`, its one caller: a call of its own cost an echo ~20 instructions.
    #[inline(always)]
    fn write_frame(buf: &SharedBuf, header: &Header, iov: &[&[u8]], shm: &[ShmDesc]) -> Result<(), trusty_platform::Error> {
        buf.write(0, &header.encode())?;
        let mut at = wire::HEADER_LEN;
        for part in iov {
            buf.write(at, part)?;
            at += part.len();
        }
        for d in shm {
            buf.write(at, &d.encode())?;
            at += wire::SHM_DESC_LEN;
        }
        Ok(())
    }

    /// Sends one message with memory references to pages the stack does not own (spec §6.9;
    /// Linux `filp_send_ioctl()` with `dn_share_fd()`): each object is shared with the
    /// platform's sharer (a fresh id per message, as Linux shares a fresh handle per message),
    /// described after the data, and kept alive (its `keep`) until Trusty's RELEASE for it, or
    /// until the message is dropped, after which it is reclaimed and `keep` dropped. Returns the
    /// data length.
    ///
    /// Errors in Linux's order: more than 65535 references (TooBig); a channel not connected
    /// (NotConnected); a share the platform refuses (its error); then as [`TipcDevice::send`].
    /// On any error nothing stays shared.
    pub fn send_memrefs(
        &mut self,
        id: ChannelId,
        iov: &[&[u8]],
        refs: Vec<ForeignMemRef>,
        timeout: Timeout,
    ) -> Result<usize, Error> {
        if refs.len() > usize::from(u16::MAX) {
            return Err(Error::TooBig);
        }
        if self.channel(id)?.state != ChannelState::Connected {
            return Err(Error::NotConnected);
        }
        // What is shared so far, in order: each descriptor's obj_id is the id to take back.
        let mut descs: Vec<ShmDesc> = Vec::with_capacity(refs.len());
        let mut failure = None;
        for r in refs {
            if r.ranges.is_empty() {
                failure = Some(Error::InvalidArgument);
                drop(r);
                break;
            }
            match self.bus.mem().sharer_mut().share(&r.ranges, r.access) {
                Ok(mid) if self.id_in_use(mid.0) => {
                    // An id still in use cannot name a second object.
                    let _ = self.bus.mem().sharer_mut().reclaim(mid);
                    failure = Some(Error::Unsupported("the sharer returned a memory id that is still in use"));
                    break;
                }
                Ok(mid) => {
                    descs.push(ShmDesc { obj_id: mid.0, size: r.size, tag: r.tag });
                    // Registered before the message goes out: the RELEASE may come back inside
                    // the kick (Linux tipc_shared_handle_register() before queuing).
                    self.hold_foreign(mid.0, ForeignHold { _keep: r.keep });
                }
                Err(e) => {
                    failure = Some(e.into());
                    break;
                }
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => self.send(id, iov, &descs, timeout),
        };
        if result.is_err() {
            // Never sent: take every share back (Linux `shm_share_failed` / `get_txbuf_failed`).
            for d in &descs {
                self.shm_outstanding.remove(&d.obj_id);
                self.reclaim_foreign(d.obj_id);
            }
        }
        result
    }

    /// Whether memory id `id` is still held for a message (sent by send_memrefs, or counted
    /// outstanding by send). Out of line: two map searches, on the cold memref path.
    #[inline(never)]
    fn id_in_use(&self, id: u64) -> bool {
        self.foreign.contains_key(&id) || self.shm_outstanding.contains_key(&id)
    }

    fn require_connected(state: ChannelState) -> Result<(), Error> {
        match state {
            ChannelState::Connected => Ok(()),
            ChannelState::Stale => Err(Error::Shutdown),
            ChannelState::Disconnected | ChannelState::Connecting => Err(Error::NotConnected),
        }
    }

    /// Receives one whole message into `bufs` (scattered in order), waiting up to `timeout`
    /// (spec §6.6 step 10). A message larger than the buffers stays queued: MessageSize.
    pub fn recv(&mut self, id: ChannelId, bufs: &mut [&mut [u8]], timeout: Timeout) -> Result<usize, Error> {
        // A message already queued (or found by the first scan) is returned without a clock
        // read or a call, as Linux's read returns a queued message; only then does the secure
        // side get a catch-up NOP if it was idle, and the deadline start.
        let mut caught_up = false;
        let mut deadline = None;
        // A message already queued is returned without a scan when every secure call so far
        // was followed by one: what a peer on another core published since is taken by the
        // next scan, and frames are judged (a full queue discards) in the order they came. An
        // empty queue is scanned before it is judged empty.
        let mut scan = self.scan_owed;
        if scan {
            // A closed handle is refused before anything else.
            self.channel(id)?;
        }
        loop {
            if scan {
                self.scan();
            }
            let chan = self.channel(id)?;
            if let Some(msg) = chan.queue.pop_front() {
                let len = msg.len();
                // Whether the message fits whole; the sum stops as soon as it does. (Lengths of
                // distinct `&mut [u8]` cannot add up past isize::MAX.)
                let mut capacity = 0usize;
                if len > 0 && !bufs.iter().any(|b| {
                    capacity += b.len();
                    capacity >= len
                }) {
                    // Back where it was: the slot it left is free, so this cannot allocate.
                    chan.queue.push_front(msg);
                    return Err(Error::MessageSize);
                }
                let mut at = 0usize;
                for out in bufs.iter_mut() {
                    if at >= len {
                        break;
                    }
                    let n = out.len().min(len - at);
                    // n <= out.len() and at + n <= len: the look-ups cannot fail.
                    let Some(out) = out.get_mut(..n) else { break };
                    match &msg {
                        RxMsg::Buffer { buf, .. } => {
                            if let Some(buf) = self.bufs.get(*buf as usize) {
                                let _ = buf.read(wire::HEADER_LEN + at, out);
                            }
                        }
                        RxMsg::Copied(v) => {
                            if let Some(src) = v.get(at..at + n) {
                                out.copy_from_slice(src);
                            }
                        }
                    }
                    at += n;
                }
                if let RxMsg::Buffer { buf, .. } = msg {
                    self.rx_spare.push(buf);
                }
                return Ok(len);
            }
            if !scan {
                scan = true;
                continue;
            }
            Self::require_connected(chan.state)?;
            if !caught_up {
                caught_up = true;
                self.catch_up()?;
                continue;
            }
            let d = *deadline.get_or_insert_with(|| self.deadline(timeout));
            self.wait_step(timeout, d)?;
        }
    }

    /// Current readiness of a channel (spec §7.2), after a catch-up NOP if Trusty has been idle: always writable,
    /// readable with a queued message, error unless connected.
    pub fn poll(&mut self, id: ChannelId) -> Result<PollFlags, Error> {
        self.catch_up()?;
        let chan = self.channel(id)?;
        Ok(PollFlags { readable: !chan.queue.is_empty(), writable: true, error: chan.state != ChannelState::Connected })
    }

    /// Waits until any of `ids` is readable or in error, up to `timeout`; returns their flags
    /// (what select/poll would report).
    pub fn wait_any(&mut self, ids: &[ChannelId], timeout: Timeout) -> Result<Vec<PollFlags>, Error> {
        let deadline = self.deadline(timeout);
        let ready = |d: &TipcDevice| {
            ids.iter().any(|&id| d.peek(id).map_or(true, |c| !c.queue.is_empty() || c.state != ChannelState::Connected))
        };
        self.wait_until(deadline, &ready)?;
        ids.iter().map(|&id| self.poll(id)).collect()
    }

    /// Closes a channel (spec §6.8, Linux `tipc_release()` -> `tipc_chan_shutdown()`): queued
    /// messages are dropped, and DISC_REQ {target = Trusty's address, 0 if it never answered}
    /// is sent if the channel was connected or connecting on the wire, which includes a connect
    /// that timed out. The local address is free at once, but `open` hands out others first.
    /// Waiting for a tx buffer ends with NoDevice if the device goes offline; the channel is
    /// gone in any case.
    pub fn close(&mut self, id: ChannelId) -> Result<(), Error> {
        self.channel(id)?;
        let Some(chan) = self.channels.get_mut(id.slot as usize).and_then(Option::take) else {
            return Err(Error::BadHandle);
        };
        let Channel { local, remote, state: was, disc_on_close, queue, .. } = chan;
        self.by_addr.remove(&local);
        Self::discard_queue(&mut self.rx_spare, queue);
        let on_wire = matches!(was, ChannelState::Connected | ChannelState::Connecting) || disc_on_close;
        if on_wire && self.state == DeviceState::Online {
            // target = Trusty's address, 0 while still connecting (spec §6.8 step 2).
            let target = remote;
            if let Err(e) = self.send_ctrl(&Ctrl::DiscReq { target }, local) {
                log::warn!("could not send DISC_REQ for channel {local}: {e}");
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drops a closed channel's queue: the rx buffers of its messages go back to the spares.
    // Out of line, and the queue moved here: a channel kept whole in close was dropped on each
    // of its returns, each with a copy of the queue's drop glue (unrolled at opt-level 3).
    #[inline(never)]
    fn discard_queue(rx_spare: &mut Vec<BufId>, mut queue: VecDeque<RxMsg>) {
        while let Some(msg) = queue.pop_front() {
            if let RxMsg::Buffer { buf, .. } = msg {
                rx_spare.push(buf);
            }
        }
    }

    /// Open channels.
    pub fn open_channels(&self) -> usize {
        self.channels.iter().flatten().count()
    }

    // ----- teardown ----------------------------------------------------------------------------

    /// Removes the device (spec §5.6): DEAD, VDEV_RESET, every buffer and both rings reclaimed
    /// (or leaked where Trusty refuses), then VIRTIO_STOP and the descriptor page. Returns the
    /// bus for reuse; the first error met, if any, is returned alongside.
    pub fn shutdown(mut self) -> (Bus, Result<(), Error>) {
        self.state = DeviceState::Dead;
        let reset = self.bus.reset_vdev(self.vdev).map_err(Error::from);
        let release = self.release_all();
        let mut bus = self.into_bus_only();
        let stop = bus.stop().map_err(Error::from);
        (bus, reset.and(release).and(stop))
    }

    fn release_all(&mut self) -> Result<(), Error> {
        // Every buffer is in the table, wherever its index is (posted, spare, free, queued).
        self.rx_posted.fill(NO_BUF);
        self.tx_posted.fill(NO_BUF);
        self.rx_spare.clear();
        self.rx_repost.fill(NO_BUF);
        self.rx_held = 0;
        self.tx_free.clear();
        let bufs = core::mem::take(&mut self.bufs);
        for chan in self.channels.iter_mut() {
            *chan = None;
        }
        self.by_addr.clear();
        // After the reset Trusty holds no reference any more; what it still maps is refused and
        // kept alive.
        // reclaim_foreign takes each id out of `foreign`, whether the reclaim succeeds or not.
        while let Some(id) = self.foreign.keys().next().copied() {
            self.shm_outstanding.remove(&id);
            self.reclaim_foreign(id);
        }
        let mut first_err = Ok(());
        for buf in bufs {
            if let Err(e) = self.bus.mem().release(buf) {
                first_err = first_err.and(Err(e.into()));
            }
        }
        first_err
    }

    /// Tears down after a failed start.
    fn into_bus(mut self) -> Bus {
        self.state = DeviceState::Dead;
        if self.bus.started() {
            let _ = self.bus.reset_vdev(self.vdev);
        }
        let _ = self.release_all();
        let mut bus = self.into_bus_only();
        let _ = bus.stop();
        bus
    }

    /// Releases the ring memory and hands back the bus.
    fn into_bus_only(self) -> Bus {
        let TipcDevice { mut bus, rx, tx, .. } = self;
        Self::release_ring(&mut bus, rx);
        Self::release_ring(&mut bus, tx);
        bus
    }

    /// Drops a ring's queue, then releases the memory under it.
    // Out of line: one copy for both rings (a loop over the two was unrolled into two).
    #[inline(never)]
    fn release_ring(bus: &mut Bus, ring: Ring) {
        let Ring { queue, mem, .. } = ring;
        drop(queue);
        let _ = bus.mem().release(mem);
    }
}
