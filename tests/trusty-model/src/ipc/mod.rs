//! The Trusty IPC core (ports, channels, message queues, sleeps) and the trusted apps running on it.
//!
//! This is a pure, deterministic state machine: it owns no memory shared with the normal world,
//! no rings, no threads and no clock. The TIPC device model (the caller) turns normal-world
//! control/data messages into [`Ipc::connect_ns`], [`Ipc::deliver`] and [`Ipc::ns_close`], gives
//! the trusted apps CPU time with [`Ipc::run`], and drains [`IpcEvent`]s towards the normal world
//! with [`Ipc::pop_event`] (spec §6.4–§6.8). Time is always passed in as monotonic nanoseconds.
//!
//! Trusted apps implement [`TrustedApp`] and see the core only through [`Ctx`], a small version
//! of Trusty's handle API (`port_create`, `accept`, `get_msg`/`read_msg`/`put_msg`, `send_msg`,
//! `close`, `nanosleep`). Events are delivered like Trusty's `wait_any`: READY on a port with a
//! pending connection, MSG/HUP/SEND_UNBLOCKED on a channel. The ipc-unittest services of spec §9.2
//! live in [`services`].
//!
//! Only normal-world clients exist in this model (peer UUID [`NS_CLIENT_UUID`]); port access flags
//! are still recorded and checked.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::cell::Cell;

use trusty_platform::clock::Clock;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

pub mod apps;
mod fifo;
mod idmap;
use fifo::Fifo;
mod ready;
use ready::Handle;
pub mod services;

#[cfg(test)]
mod tests;

/// UUID of every normal-world client: all zeros (spec §6.4 step 5).
pub const NS_CLIENT_UUID: [u8; 16] = [0; 16];

/// Maximum number of normal-world channels open at once (256 endpoint slots, spec §6.11).
pub const MAX_CHANNELS: usize = 256;

/// Longest port name Trusty accepts (IPC_PORT_PATH_MAX 64 including the NUL, spec §6.4 step 5).
pub const MAX_PORT_NAME_LEN: usize = 63;

/// Largest message a port may be created for (IPC_CHAN_MAX_BUF_SIZE, spec §6.3).
pub const MAX_PORT_BUF_SIZE: u32 = 4096;

/// Most receive buffers a port may be created with (a model limit that keeps memory bounded).
pub const MAX_PORT_BUFS: u32 = 256;

/// `max_msg_size` Trusty reports in every successful CONN_RSP, whatever the port (spec §6.3).
pub const CONN_RSP_MAX_MSG_SIZE: u32 = 4096;

/// `max_msg_cnt` Trusty reports in every successful CONN_RSP, whatever the port (spec §6.3).
pub const CONN_RSP_MAX_MSG_CNT: u32 = 1;

/// Port flag: trusted apps may connect (Trusty `IPC_PORT_ALLOW_TA_CONNECT`).
pub const IPC_PORT_ALLOW_TA_CONNECT: u32 = 0x1;

/// Port flag: the normal world may connect (Trusty `IPC_PORT_ALLOW_NS_CONNECT`).
pub const IPC_PORT_ALLOW_NS_CONNECT: u32 = 0x2;

/// Both access flags.
pub const IPC_PORT_ALLOW_ALL: u32 = IPC_PORT_ALLOW_TA_CONNECT | IPC_PORT_ALLOW_NS_CONNECT;

/// Connect flag: return at once with the channel; READY (or HUP) reports the outcome (Trusty
/// `IPC_CONNECT_ASYNC`). This model supports only asynchronous TA-to-TA connects.
pub const IPC_CONNECT_ASYNC: u32 = 0x2;

/// Connect flag: wait for the port to be created instead of failing with ERR_NOT_FOUND (Trusty
/// `IPC_CONNECT_WAIT_FOR_PORT`).
pub const IPC_CONNECT_WAIT_FOR_PORT: u32 = 0x1;

/// Upper bound on channel records (open, waiting for the TA to close, or waiting for the NS to
/// see DISC_REQ), so that a normal world that never drains events cannot grow memory forever.
const MAX_CHANNEL_RECORDS: usize = 4 * MAX_CHANNELS;

/// LK error numbers (spec §2.3), as i32.
pub mod lk {
    /// Success.
    pub const NO_ERROR: i32 = 0;
    /// Generic failure.
    pub const ERR_GENERIC: i32 = -1;
    /// No such object (port, channel, endpoint).
    pub const ERR_NOT_FOUND: i32 = -2;
    /// Channel not accepted yet.
    pub const ERR_NOT_READY: i32 = -3;
    /// No message to get.
    pub const ERR_NO_MSG: i32 = -4;
    /// Out of memory.
    pub const ERR_NO_MEMORY: i32 = -5;
    /// Already started.
    pub const ERR_ALREADY_STARTED: i32 = -6;
    /// Malformed request.
    pub const ERR_NOT_VALID: i32 = -7;
    /// Invalid argument.
    pub const ERR_INVALID_ARGS: i32 = -8;
    /// Receive queue full.
    pub const ERR_NOT_ENOUGH_BUFFER: i32 = -9;
    /// Timed out.
    pub const ERR_TIMED_OUT: i32 = -13;
    /// Object (e.g. port name) already exists.
    pub const ERR_ALREADY_EXISTS: i32 = -14;
    /// Channel closed by the peer or closing.
    pub const ERR_CHANNEL_CLOSED: i32 = -15;
    /// Operation not allowed.
    pub const ERR_NOT_ALLOWED: i32 = -17;
    /// Operation not supported.
    pub const ERR_NOT_SUPPORTED: i32 = -24;
    /// Message larger than the queue's item size.
    pub const ERR_TOO_BIG: i32 = -25;
    /// Object in the wrong state.
    pub const ERR_BAD_STATE: i32 = -31;
    /// Busy.
    pub const ERR_BUSY: i32 = -33;
    /// Bad address.
    pub const ERR_FAULT: i32 = -40;
    /// No free resource (e.g. endpoint slot); also every connect failure on the wire (spec §6.4).
    pub const ERR_NO_RESOURCES: i32 = -41;
    /// Handle does not exist or belongs to someone else.
    pub const ERR_BAD_HANDLE: i32 = -42;
    /// Port does not allow this client.
    pub const ERR_ACCESS_DENIED: i32 = -43;
}

/// Most memory references one message may carry (Trusty `MAX_MSG_HANDLES`, spec §6.9).
pub const MAX_MSG_HANDLES: usize = 8;

/// A memory reference that arrived with a normal-world message (Trusty's memref handle, made
/// in `handle_chan_msg()` from a retrieved memory object). It reaches exactly the bytes that
/// were shared, through the model's mapping. A trusted app gives it back with
/// [`Ctx::close_memref`]; its last drop makes the device send RELEASE (spec §6.9).
pub struct MemRef {
    map: crate::mem::Mapping,
}

impl core::fmt::Debug for MemRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemRef").field("obj_id", &self.map.id()).field("len", &self.map.len()).finish()
    }
}

impl MemRef {
    /// Wraps the mapping of one retrieved memory object.
    pub fn new(map: crate::mem::Mapping) -> Self {
        MemRef { map }
    }
    /// The memory id the normal world sent (the FF-A handle / address / grant reference).
    pub fn obj_id(&self) -> u64 {
        self.map.id()
    }
    /// Size of the object in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Whether the object may be mapped writable (Trusty `memref_mmap()` refuses
    /// `MMAP_FLAG_PROT_WRITE` on a read-only object: ERR_ACCESS_DENIED).
    pub fn writable(&self) -> bool {
        self.map.writable()
    }
    /// Stores `data` at `off` (ERR_INVALID_ARGS outside the object, ERR_ACCESS_DENIED if
    /// read-only).
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), i32> {
        if !self.writable() {
            return Err(lk::ERR_ACCESS_DENIED);
        }
        if self.map.write(off, data) { Ok(()) } else { Err(lk::ERR_INVALID_ARGS) }
    }
    /// Loads `out.len()` bytes at `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), i32> {
        if self.map.read(off, out) { Ok(()) } else { Err(lk::ERR_INVALID_ARGS) }
    }
    /// The mapping, for the device to give back to the share table.
    pub fn into_mapping(self) -> crate::mem::Mapping {
        self.map
    }
}

/// One message from the normal world waiting in a channel's queue.
struct InMsg {
    data: Vec<u8>,
    handles: Vec<MemRef>,
}

/// The peer UUID `accept` reports for a TA client: the model gives app number `app` the UUID
/// whose last four bytes are `app + 1` (big-endian) and the rest zero; the NS is all zero.
pub fn ta_uuid(app: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    let n = u32::try_from(app).unwrap_or(u32::MAX - 1).saturating_add(1);
    u[12..].copy_from_slice(&n.to_be_bytes());
    u
}

/// Opaque id of one NS<->TA channel inside the IPC core (never reused within one Ipc instance).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct ChanId(pub u32);

/// Opaque id of one port (never reused; a re-created port gets a new id).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// Something the IPC core wants the TIPC device (the caller) to do towards the normal world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpcEvent {
    /// The TA accepted the NS connection: the device sends CONN_RSP(status 0, max_msg_size, max_msg_cnt).
    Accepted {
        /// The channel.
        chan: ChanId,
        /// Value for CONN_RSP.max_msg_size (always [`CONN_RSP_MAX_MSG_SIZE`], spec §6.3).
        max_msg_size: u32,
        /// Value for CONN_RSP.max_msg_cnt (always [`CONN_RSP_MAX_MSG_CNT`], spec §6.3).
        max_msg_cnt: u32,
    },
    /// The channel was closed by the TA side (before or after accept): the device sends DISC_REQ.
    Closed {
        /// The channel.
        chan: ChanId,
    },
    /// The TA sent a message to the NS side of the channel.
    Message {
        /// The channel.
        chan: ChanId,
        /// The message payload.
        data: Vec<u8>,
    },
}

impl IpcEvent {
    /// The channel this event is about.
    pub fn chan(&self) -> ChanId {
        match self {
            IpcEvent::Accepted { chan, .. }
            | IpcEvent::Closed { chan }
            | IpcEvent::Message { chan, .. } => *chan,
        }
    }
}

/// A set of handle events, as Trusty's `uevent.event` bit mask.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Events(pub u32);

impl Events {
    /// No event.
    pub const NONE: Events = Events(0);
    /// Port: a connection is pending (IPC_HANDLE_POLL_READY).
    pub const READY: Events = Events(0x1);
    /// Handle in an error state (IPC_HANDLE_POLL_ERROR; never raised by this model).
    pub const ERROR: Events = Events(0x2);
    /// Channel: the peer closed it (IPC_HANDLE_POLL_HUP).
    pub const HUP: Events = Events(0x4);
    /// Channel: unread messages (IPC_HANDLE_POLL_MSG).
    pub const MSG: Events = Events(0x8);
    /// Channel: a send that failed with ERR_NOT_ENOUGH_BUFFER may now succeed
    /// (IPC_HANDLE_POLL_SEND_UNBLOCKED).
    pub const SEND_UNBLOCKED: Events = Events(0x10);

    /// Whether any bit of `other` is set.
    pub fn intersects(self, other: Events) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union of both sets.
    #[must_use]
    pub fn union(self, other: Events) -> Events {
        Events(self.0 | other.0)
    }
}

/// Per-port statistics (kept by port name, so they survive a port being re-created).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Port name.
    pub name: String,
    /// NS connect requests that reached this port (pending channels created).
    pub connects: u64,
    /// Connections accepted by the TA.
    pub accepted: u64,
    /// NS messages queued for the TA.
    pub delivered: u64,
    /// NS messages dropped because the TA's receive queue was full (spec §6.5 step 8).
    pub dropped_queue_full: u64,
    /// Messages the TA sent towards the NS.
    pub sent: u64,
}

/// Statistics for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpcStats {
    /// Calls of [`Ipc::connect_ns`].
    pub connect_requests: u64,
    /// Connect requests that failed immediately.
    pub connect_rejected: u64,
    /// Connections accepted by a TA.
    pub accepted: u64,
    /// Channels closed by the TA side while the NS side was open (DISC_REQ to send).
    pub closed_by_ta: u64,
    /// Channels closed by the NS side ([`Ipc::ns_close`] / [`Ipc::reset`]).
    pub closed_by_ns: u64,
    /// NS messages queued for a TA.
    pub delivered: u64,
    /// NS messages dropped because the TA's receive queue was full.
    pub dropped_queue_full: u64,
    /// NS messages rejected for any other reason (unknown/closed/not accepted channel, too big).
    pub rejected: u64,
    /// Messages sent by TAs towards the NS.
    pub sent_to_ns: u64,
    /// Channels the NS side currently holds (pending, connected, or DISC_REQ not yet taken).
    pub ns_channels: usize,
    /// Channel records alive in the core (including ones a TA has not closed yet).
    pub channel_records: usize,
    /// Per-port counters, sorted by port name.
    pub ports: Vec<PortStats>,
}

/// A trusted app running on the IPC core. Handlers run inside [`Ipc::run`] (and `start` inside
/// [`Ipc::add_app`]) and act only through `ctx`.
///
/// Delivery follows Trusty's `wait_any`: one handle's events per call, never while the app
/// sleeps. READY and MSG are level-triggered as long as the app keeps making progress (accepting,
/// getting or putting messages); a handler that makes none is not called again for that handle
/// until its state changes, so a misbehaving app cannot stall [`Ipc::run`].
pub trait TrustedApp: Send {
    /// Called once when the app is added: create ports here.
    fn start(&mut self, ctx: &mut Ctx<'_>);
    /// Events on one of the app's ports (READY: a connection is pending).
    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events);
    /// Events on one of the app's channels (MSG, HUP, SEND_UNBLOCKED).
    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events);
    /// The sleep requested with [`Ctx::sleep`] is over.
    fn on_wake(&mut self, _ctx: &mut Ctx<'_>) {}
    /// The timer armed with [`Ctx::set_timer`] expired with no event for the app before it
    /// (the timeout of a Trusty `wait()` / `wait_any()`).
    fn on_timer(&mut self, _ctx: &mut Ctx<'_>) {}
}

/// TA side of a channel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TaSide {
    /// On the port's pending list, not accepted yet.
    Pending,
    /// Accepted; the TA holds a handle.
    Open,
    /// The TA closed its handle (or the port was closed before accepting).
    Closed,
}

/// NS side of a channel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NsSide {
    /// The NS holds the channel.
    Open,
    /// The TA side closed; the Closed event has not been taken by the device yet.
    Closing,
    /// The NS side is gone (ns_close, reset, or Closed event taken).
    Gone,
}

struct Port {
    name: String,
    msg_num: u32,
    msg_size: u32,
    flags: u32,
    owner: usize,
    pending: VecDeque<ChanId>,
    /// READY must be (re-)reported to the owner.
    signal: bool,
    /// Index of this port's counters in [`Core::port_stats`] (kept after the port closes).
    stats_slot: usize,
}

struct Channel {
    owner: usize,
    /// Index of its port's counters in [`Core::port_stats`]: per-message counting without a
    /// lookup by name.
    stats_slot: Option<usize>,
    /// Item size of both queues (the port's msg_size).
    max_msg_size: u32,
    /// Depth of both queues (the port's msg_num).
    msg_num: u32,
    ta: TaSide,
    ns: NsSide,
    /// NS->TA queue; the first `gotten` entries were got by the TA but not yet put.
    inbound: Fifo<InMsg>,
    gotten: usize,
    /// Message events of this channel still waiting in the event queue (TA->NS queue fill).
    outbound: usize,
    /// A send failed with ERR_NOT_ENOUGH_BUFFER; raise SEND_UNBLOCKED when a slot frees.
    send_blocked: bool,
    /// The NS closed the channel; HUP not reported yet / reported.
    hup: bool,
    hup_reported: bool,
    unblocked: bool,
    /// Something must be reported to the owner.
    signal: bool,
    /// Count of successful get/put calls: evidence that a handler made progress.
    progress: u64,
    /// TA-to-TA channel: the other end's record (None for an NS channel). A missing record means
    /// the peer end is gone.
    ta_peer: Option<ChanId>,
    /// TA-to-TA client end: READY (connection accepted) not reported yet.
    ready: bool,
    /// TA-to-TA client end still waiting for its port to be created (IPC_CONNECT_WAIT_FOR_PORT).
    waiting_for: Option<String>,
}

impl Channel {
    fn new(owner: usize, port: &Port) -> Self {
        Channel {
            owner,
            stats_slot: Some(port.stats_slot),
            max_msg_size: port.msg_size,
            msg_num: port.msg_num,
            ta: TaSide::Pending,
            ns: NsSide::Open,
            inbound: Fifo::new(),
            gotten: 0,
            outbound: 0,
            send_blocked: false,
            hup: false,
            hup_reported: false,
            unblocked: false,
            signal: false,
            progress: 0,
            ta_peer: None,
            ready: false,
            waiting_for: None,
        }
    }

    /// Record of a channel whose DISC_REQ was handed back with [`Ipc::unpop_event`].
    fn closing_record(owner: usize) -> Self {
        Channel {
            owner,
            stats_slot: None,
            max_msg_size: 0,
            msg_num: 0,
            ta: TaSide::Closed,
            ns: NsSide::Closing,
            inbound: Fifo::new(),
            gotten: 0,
            outbound: 0,
            send_blocked: false,
            hup: false,
            hup_reported: false,
            unblocked: false,
            signal: false,
            progress: 0,
            ta_peer: None,
            ready: false,
            waiting_for: None,
        }
    }

    fn unread(&self) -> usize {
        self.inbound.len().saturating_sub(self.gotten)
    }

    /// Whether a message from the normal world can be queued now (spec §6.5 step 8).
    fn accepts_from_ns(&self) -> Result<(), i32> {
        match self.ns {
            NsSide::Gone => return Err(lk::ERR_NOT_FOUND),
            NsSide::Closing => return Err(lk::ERR_CHANNEL_CLOSED),
            NsSide::Open => {}
        }
        match self.ta {
            TaSide::Pending => return Err(lk::ERR_NOT_READY),
            TaSide::Closed => return Err(lk::ERR_CHANNEL_CLOSED),
            TaSide::Open => {}
        }
        if self.inbound.len() >= self.msg_num as usize {
            return Err(lk::ERR_NOT_ENOUGH_BUFFER);
        }
        Ok(())
    }
}

/// What a delivery from the normal world came to: the bytes queued, or the error with the
/// references handed back.
type Delivery = Result<usize, (i32, Vec<MemRef>)>;

/// Everything except the apps themselves, so that an app can be borrowed next to it.
struct Core {
    /// The latest time seen; read through [`Core::now`], which asks `clock` first when time
    /// has moved on since the last read.
    now: Cell<u64>,
    /// The secure side's clock, when the core has one ([`Ipc::set_clock`]).
    clock: Option<Arc<dyn Clock>>,
    /// Time has moved on since `now` was last read from `clock` ([`Ipc::time_passed`]).
    stale: Cell<bool>,
    ports: BTreeMap<PortId, Port>,
    next_port: u32,
    chans: idmap::IdMap<Channel>,
    next_chan: u32,
    /// Handles that may have events, per app (the scheduler never rescans idle ones).
    ready: ready::Ready,
    events: Fifo<IpcEvent>,
    /// Per app: sleeping until this time.
    sleep_until: Vec<Option<u64>>,
    /// Per app: a timed wait ends at this time unless an event comes first ([`Ctx::set_timer`]).
    timer_at: Vec<Option<u64>>,
    /// The earliest of `sleep_until` and `timer_at`, recomputed on every change of either
    /// ([`Core::deadlines_changed`]) rather than on every scheduler pass.
    next_deadline: Option<u64>,
    stats: IpcStats,
    /// Counters per port name, in creation order; a name keeps its slot for the model's life.
    port_stats: Vec<PortStats>,
    /// Slot in `port_stats` by port name (the order [`Ipc::stats`] reports them in).
    port_stats_by_name: BTreeMap<String, usize>,
    /// Memory references whose last holder let go: the device unmaps them and sends RELEASE.
    released: VecDeque<MemRef>,
    /// Message buffers to reuse, so that a message in steady state allocates nothing.
    spare: Vec<Vec<u8>>,
}

/// A scheduler pass of [`Ipc::run`] under way: the next app to look at, and whether an app
/// has acted in it so far.
#[derive(Clone, Copy)]
struct Pass {
    from: usize,
    stepped: bool,
}

/// Most message buffers kept for reuse.
const SPARE_BUFFERS: usize = 64;

/// A copy of `data` in a reused buffer when one is spare.
fn pooled(spare: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    let mut v = spare.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(data);
    v
}

/// Keeps `buf` for reuse (up to [`SPARE_BUFFERS`]).
fn recycle(spare: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spare.len() < SPARE_BUFFERS && buf.capacity() > 0 {
        spare.push(buf);
    }
}

impl Core {
    fn new() -> Self {
        Core {
            now: Cell::new(0),
            clock: None,
            stale: Cell::new(false),
            ports: BTreeMap::new(),
            next_port: 0,
            chans: idmap::IdMap::new(),
            next_chan: 0,
            ready: ready::Ready::default(),
            events: Fifo::new(),
            sleep_until: Vec::new(),
            timer_at: Vec::new(),
            next_deadline: None,
            stats: IpcStats::default(),
            port_stats: Vec::new(),
            port_stats_by_name: BTreeMap::new(),
            released: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Recomputes [`Core::next_deadline`]; called after every write to `sleep_until` or
    /// `timer_at`.
    fn deadlines_changed(&mut self) {
        let sleeps = self.sleep_until.iter().flatten();
        self.next_deadline = sleeps.chain(self.timer_at.iter().flatten()).copied().min();
    }

    /// Time never goes backwards, whatever the caller passes.
    fn advance(&mut self, now: u64) {
        self.now.set(self.now.get().max(now));
    }

    /// The current time: the clock is read here, at most once per [`Ipc::time_passed`], and
    /// only when something needs the time (a timer to check, an app asking).
    #[inline]
    fn now(&self) -> u64 {
        if self.stale.get() {
            self.stale.set(false);
            if let Some(c) = &self.clock {
                self.now.set(self.now.get().max(c.now_ns()));
            }
        }
        self.now.get()
    }

    /// The slot of the counters of port `name`, created on first use.
    fn port_stats_slot(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.port_stats_by_name.get(name) {
            return slot;
        }
        let slot = self.port_stats.len();
        self.port_stats.push(PortStats {
            name: String::from(name),
            ..PortStats::default()
        });
        self.port_stats_by_name.insert(String::from(name), slot);
        slot
    }

    /// The counters in `slot` (every slot handed out by [`Core::port_stats_slot`] exists).
    fn port_stats_at(&mut self, slot: usize) -> Option<&mut PortStats> {
        self.port_stats.get_mut(slot)
    }

    fn ns_channel_count(&self) -> usize {
        self.chans.values().filter(|c| c.ns != NsSide::Gone).count()
    }

    fn is_sleeping(&self, app: usize) -> bool {
        matches!(self.sleep_until.get(app), Some(Some(_)))
    }

    fn find_port(&self, name: &[u8]) -> Option<PortId> {
        self.ports
            .iter()
            .find(|(_, p)| p.name.as_bytes() == name)
            .map(|(id, _)| *id)
    }

    fn connect_ns(&mut self, name: &[u8]) -> Result<ChanId, i32> {
        // Spec §6.4 step 5: names are at most 63 bytes and NUL-terminated (no NUL inside).
        if name.is_empty() || name.len() > MAX_PORT_NAME_LEN || name.contains(&0) {
            return Err(lk::ERR_INVALID_ARGS);
        }
        let port_id = self.find_port(name).ok_or(lk::ERR_NOT_FOUND)?;
        let ns_count = self.ns_channel_count();
        let records = self.chans.len();
        let port = self.ports.get_mut(&port_id).ok_or(lk::ERR_NOT_FOUND)?;
        if port.flags & IPC_PORT_ALLOW_NS_CONNECT == 0 {
            return Err(lk::ERR_ACCESS_DENIED);
        }
        if ns_count >= MAX_CHANNELS || records >= MAX_CHANNEL_RECORDS {
            return Err(lk::ERR_NO_RESOURCES);
        }
        let id = ChanId(self.next_chan);
        // Ids are never reused: once exhausted, no more channels.
        self.next_chan = self.next_chan.checked_add(1).ok_or(lk::ERR_NO_RESOURCES)?;
        let chan = Channel::new(port.owner, port);
        port.pending.push_back(id);
        port.signal = true;
        self.ready.raise(self.sleep_until.len(), port.owner, Handle::Port(port_id));
        let stats_slot = port.stats_slot;
        self.chans.insert(id, chan);
        if let Some(s) = self.port_stats_at(stats_slot) {
            s.connects += 1;
        }
        Ok(id)
    }

    /// A TA connects to a port (Trusty lib/trusty/ipc.c `ipc_port_connect_async()`): the name is
    /// checked (ERR_INVALID_ARGS), then looked up: missing is ERR_NOT_FOUND unless
    /// IPC_CONNECT_WAIT_FOR_PORT (the connection then waits for the port's creation); a port
    /// without IPC_PORT_ALLOW_TA_CONNECT is ERR_ACCESS_DENIED. Two records are made: the
    /// client's end (its handle, returned) and the server's end, pending on the port until
    /// `accept`. Only IPC_CONNECT_ASYNC is modelled: a blocking connect would need this
    /// handler to wait while other apps run, so it is ERR_NOT_SUPPORTED once the port lookup
    /// has passed.
    fn connect_ta(&mut self, app: usize, name: &str, flags: u32) -> Result<ChanId, i32> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_PORT_NAME_LEN || bytes.contains(&0) {
            return Err(lk::ERR_INVALID_ARGS);
        }
        let port_id = self.find_port(bytes);
        if port_id.is_none() && flags & IPC_CONNECT_WAIT_FOR_PORT == 0 {
            return Err(lk::ERR_NOT_FOUND);
        }
        if let Some(p) = port_id.and_then(|id| self.ports.get(&id)) {
            if p.flags & IPC_PORT_ALLOW_TA_CONNECT == 0 {
                return Err(lk::ERR_ACCESS_DENIED);
            }
        }
        if flags & IPC_CONNECT_ASYNC == 0 {
            return Err(lk::ERR_NOT_SUPPORTED);
        }
        if self.chans.len().saturating_add(2) > MAX_CHANNEL_RECORDS {
            return Err(lk::ERR_NO_RESOURCES);
        }
        let client_id = ChanId(self.next_chan);
        self.next_chan = self.next_chan.checked_add(1).ok_or(lk::ERR_NO_RESOURCES)?;
        let blank = Port {
            name: String::from(name),
            msg_num: 1,
            msg_size: 1,
            flags: 0,
            owner: app,
            pending: VecDeque::new(),
            signal: false,
            stats_slot: 0, // replaced below
        };
        let mut client = Channel::new(app, &blank);
        // Counters of a port of that name, if one ever existed (set again once attached).
        client.stats_slot = self.port_stats_by_name.get(name).copied();
        client.ta = TaSide::Open;
        client.ns = NsSide::Gone;
        match port_id {
            Some(pid) => {
                let server_id = ChanId(self.next_chan);
                self.next_chan = self.next_chan.checked_add(1).ok_or(lk::ERR_NO_RESOURCES)?;
                let port = self.ports.get_mut(&pid).ok_or(lk::ERR_NOT_FOUND)?;
                let mut server = Channel::new(port.owner, port);
                server.ns = NsSide::Gone;
                server.ta_peer = Some(client_id);
                // Both directions get the port's queue geometry (Trusty `ipc_port_accept()`
                // and `ipc_port_connect_async()` size both ends' message queues from the port).
                client.max_msg_size = port.msg_size;
                client.msg_num = port.msg_num;
                client.stats_slot = Some(port.stats_slot);
                client.ta_peer = Some(server_id);
                port.pending.push_back(server_id);
                port.signal = true;
                self.ready.raise(self.sleep_until.len(), port.owner, Handle::Port(pid));
                self.chans.insert(server_id, server);
            }
            None => client.waiting_for = Some(String::from(name)),
        }
        self.chans.insert(client_id, client);
        Ok(client_id)
    }

    /// A port was created: connections waiting for its name become pending on it (Trusty
    /// `ipc_port_publish()` walks the waiting-for-port list and attaches them).
    fn attach_waiting(&mut self, pid: PortId) {
        let Some(port) = self.ports.get(&pid) else { return };
        let name = port.name.clone();
        let allowed = port.flags & IPC_PORT_ALLOW_TA_CONNECT != 0;
        let waiting: Vec<ChanId> = self
            .chans
            .iter()
            .filter(|(_, c)| c.waiting_for.as_deref() == Some(name.as_str()))
            .map(|(id, _)| *id)
            .collect();
        let apps = self.sleep_until.len();
        for client_id in waiting {
            let Some(client) = self.chans.get_mut(&client_id) else { continue };
            client.waiting_for = None;
            if !allowed {
                // Not allowed to connect: the client sees HUP.
                client.hup = true;
                client.signal = true;
                self.ready.raise(apps, client.owner, Handle::Chan(client_id));
                continue;
            }
            let server_id = ChanId(self.next_chan);
            let Some(next) = self.next_chan.checked_add(1) else {
                client.hup = true;
                client.signal = true;
                self.ready.raise(apps, client.owner, Handle::Chan(client_id));
                continue;
            };
            self.next_chan = next;
            let Some(port) = self.ports.get_mut(&pid) else { return };
            let mut server = Channel::new(port.owner, port);
            server.ns = NsSide::Gone;
            server.ta_peer = Some(client_id);
            port.pending.push_back(server_id);
            port.signal = true;
            self.ready.raise(apps, port.owner, Handle::Port(pid));
            let (size, num, slot) = (port.msg_size, port.msg_num, port.stats_slot);
            if let Some(client) = self.chans.get_mut(&client_id) {
                client.max_msg_size = size;
                client.msg_num = num;
                client.stats_slot = Some(slot);
                client.ta_peer = Some(server_id);
            }
            self.chans.insert(server_id, server);
        }
    }

    /// The peer of TA-to-TA end `id` lost its end: report HUP to it (Trusty `ipc_chan_close()`
    /// -> the peer's `chan_shutdown()` sets IPC_HANDLE_POLL_HUP).
    fn hup_ta_peer(&mut self, peer: Option<ChanId>) {
        let Some(p) = peer else { return };
        if let Some(c) = self.chans.get_mut(&p) {
            c.ta_peer = None;
            if c.ta == TaSide::Open {
                c.hup = true;
                c.signal = true;
                self.ready.raise(self.sleep_until.len(), c.owner, Handle::Chan(p));
            }
        }
    }

    /// A TA-to-TA end's own pending events, taken (the model's `wait()` on one channel handle
    /// with nothing else running: READY once accepted, HUP once the peer is gone, MSG while
    /// unread messages wait).
    fn poll_chan(&mut self, app: usize, id: ChanId) -> Result<Events, i32> {
        let chan = self.open_chan(app, id)?;
        let mut ev = Events::NONE;
        if chan.ready {
            chan.ready = false;
            ev = ev.union(Events::READY);
        }
        if chan.hup && !chan.hup_reported {
            chan.hup_reported = true;
            ev = ev.union(Events::HUP);
        }
        if chan.unread() > 0 {
            ev = ev.union(Events::MSG);
        }
        if chan.unblocked {
            chan.unblocked = false;
            ev = ev.union(Events::SEND_UNBLOCKED);
        }
        Ok(ev)
    }

    /// On failure the references come back to the caller (Trusty's `handle_chan_msg()`: a
    /// failed message's references are dropped without RELEASE, spec §6.9). Also returns the
    /// channel's port-counter slot (one look-up for both).
    /// `fill` writes the message (cut to the queue's item size) into the queue's buffer; if it
    /// fails, nothing is queued and the answer is ERR_NOT_VALID.
    #[inline(always)]
    fn deliver(&mut self, id: ChanId, len: usize, fill: impl FnOnce(&mut [u8]) -> bool, handles: Vec<MemRef>) -> (Delivery, Option<usize>) {
        let Some(chan) = self.chans.get_mut(&id) else { return (Err((lk::ERR_NOT_FOUND, handles)), None) };
        let slot = chan.stats_slot;
        if let Err(e) = chan.accepts_from_ns() {
            return (Err((e, handles)), slot);
        }
        if handles.len() > MAX_MSG_HANDLES {
            return (Err((lk::ERR_INVALID_ARGS, handles)), slot);
        }
        // ipc_msg.c kern_msg_write_locked() -> iovec.c kern_iovec_to_membuf(): the message is
        // cut to the queue's item size and delivered; the length written is the result.
        let n = len.min(chan.max_msg_size as usize);
        let mut buf = self.spare.pop().unwrap_or_default();
        // Every byte is written by `fill` (or the buffer goes back unused): no need to zero.
        if buf.len() != n {
            buf.truncate(n);
            buf.resize(n, 0);
        }
        if !fill(&mut buf) {
            recycle(&mut self.spare, buf);
            return (Err((lk::ERR_NOT_VALID, handles)), slot);
        }
        chan.inbound.push_back(InMsg { data: buf, handles });
        chan.signal = true;
        self.ready.raise(self.sleep_until.len(), chan.owner, Handle::Chan(id));
        (Ok(n), slot)
    }

    fn ns_close(&mut self, id: ChanId) {
        // Nothing more goes to the NS for this channel.
        self.events.retain(|e| e.chan() != id);
        let Some(chan) = self.chans.get_mut(&id) else {
            return;
        };
        if chan.ns == NsSide::Gone {
            return;
        }
        chan.ns = NsSide::Gone;
        self.stats.closed_by_ns += 1;
        match chan.ta {
            TaSide::Pending => {
                // Never accepted: just vanish from the port's pending list.
                for port in self.ports.values_mut() {
                    port.pending.retain(|c| *c != id);
                    if port.pending.is_empty() {
                        port.signal = false;
                    }
                }
                self.chans.remove(&id);
            }
            TaSide::Open => {
                // The TA sees HUP and is expected to close its handle (spec §6.8).
                chan.hup = true;
                chan.signal = true;
                self.ready.raise(self.sleep_until.len(), chan.owner, Handle::Chan(id));
                chan.outbound = 0;
                chan.send_blocked = false;
            }
            TaSide::Closed => {
                self.chans.remove(&id);
            }
        }
    }

    #[inline]
    fn pop_event(&mut self) -> Option<IpcEvent> {
        let ev = self.events.pop_front()?;
        // A message, the usual event, is told apart with one test of the variant.
        if let IpcEvent::Message { chan, .. } = &ev {
            if let Some(c) = self.chans.get_mut(chan) {
                c.outbound = c.outbound.saturating_sub(1);
                if c.send_blocked {
                    c.send_blocked = false;
                    c.unblocked = true;
                    c.signal = true;
                    self.ready.raise(self.sleep_until.len(), c.owner, Handle::Chan(*chan));
                }
            }
            return Some(ev);
        }
        match &ev {
            IpcEvent::Message { .. } => {}
            IpcEvent::Closed { chan } => {
                if let Some(c) = self.chans.get_mut(chan) {
                    if c.ns == NsSide::Closing {
                        c.ns = NsSide::Gone;
                    }
                    if c.ns == NsSide::Gone && c.ta == TaSide::Closed {
                        self.chans.remove(chan);
                    }
                }
            }
            IpcEvent::Accepted { .. } => {}
        }
        Some(ev)
    }

    fn unpop_event(&mut self, ev: IpcEvent) {
        let id = ev.chan();
        match &ev {
            IpcEvent::Message { .. } => match self.chans.get_mut(&id) {
                // Undo the slot freed by pop_event; any SEND_UNBLOCKED already raised stays (harmless:
                // the TA retries and blocks again).
                Some(c) if c.ns != NsSide::Gone => c.outbound += 1,
                _ => return,
            },
            IpcEvent::Accepted { .. } => match self.chans.get(&id) {
                Some(c) if c.ns != NsSide::Gone => {}
                _ => return,
            },
            IpcEvent::Closed { .. } => match self.chans.get_mut(&id) {
                Some(c) => {
                    if c.ns == NsSide::Gone && c.ta == TaSide::Closed {
                        c.ns = NsSide::Closing;
                    }
                }
                None => {
                    // pop_event dropped the record; restore it so deliver() reports CHANNEL_CLOSED.
                    if id.0 >= self.next_chan {
                        return;
                    }
                    self.chans.insert(id, Channel::closing_record(usize::MAX));
                }
            },
        }
        self.events.push_front(ev);
    }

    // ----- operations on behalf of a TA (through Ctx) -----

    fn owned_port(&mut self, app: usize, id: PortId) -> Result<&mut Port, i32> {
        match self.ports.get_mut(&id) {
            Some(p) if p.owner == app => Ok(p),
            _ => Err(lk::ERR_BAD_HANDLE),
        }
    }

    fn open_chan(&mut self, app: usize, id: ChanId) -> Result<&mut Channel, i32> {
        match self.chans.get_mut(&id) {
            Some(c) if c.owner == app && c.ta == TaSide::Open => Ok(c),
            _ => Err(lk::ERR_BAD_HANDLE),
        }
    }

    fn create_port(
        &mut self,
        app: usize,
        name: &str,
        msg_num: u32,
        msg_size: u32,
        flags: u32,
    ) -> Result<PortId, i32> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_PORT_NAME_LEN || bytes.contains(&0) {
            return Err(lk::ERR_INVALID_ARGS);
        }
        // Trusty `ipc_port_create()`: zero or too many buffers, and a zero or oversized buffer
        // (> IPC_CHAN_MAX_BUF_SIZE), are all ERR_INVALID_ARGS ("Invalid buffer sizes").
        if msg_num == 0 || msg_num > MAX_PORT_BUFS || msg_size == 0 || msg_size > MAX_PORT_BUF_SIZE {
            return Err(lk::ERR_INVALID_ARGS);
        }
        if self.find_port(bytes).is_some() {
            return Err(lk::ERR_ALREADY_EXISTS);
        }
        let id = PortId(self.next_port);
        self.next_port = self.next_port.checked_add(1).ok_or(lk::ERR_NO_RESOURCES)?;
        let stats_slot = self.port_stats_slot(name);
        self.ports.insert(
            id,
            Port {
                name: String::from(name),
                msg_num,
                msg_size,
                flags,
                owner: app,
                pending: VecDeque::new(),
                signal: false,
                stats_slot,
            },
        );
        self.attach_waiting(id);
        Ok(id)
    }

    fn close_port(&mut self, app: usize, id: PortId) -> Result<(), i32> {
        self.owned_port(app, id)?;
        let Some(port) = self.ports.remove(&id) else {
            return Err(lk::ERR_BAD_HANDLE);
        };
        // Connections never accepted are closed: the NS gets DISC_REQ instead of CONN_RSP (§6.4 step 7).
        for chan_id in port.pending {
            if let Some(chan) = self.chans.get_mut(&chan_id) {
                chan.ta = TaSide::Closed;
                if let Some(peer) = chan.ta_peer {
                    // TA-to-TA connection never accepted: the client sees HUP.
                    self.chans.remove(&chan_id);
                    self.hup_ta_peer(Some(peer));
                } else if chan.ns == NsSide::Open {
                    chan.ns = NsSide::Closing;
                    self.events.push_back(IpcEvent::Closed { chan: chan_id });
                    self.stats.closed_by_ta += 1;
                } else {
                    self.chans.remove(&chan_id);
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, app: usize, id: PortId) -> Result<(ChanId, [u8; 16]), i32> {
        let port = self.owned_port(app, id)?;
        let chan_id = port.pending.pop_front().ok_or(lk::ERR_NO_MSG)?;
        let stats_slot = port.stats_slot;
        let chan = self.chans.get_mut(&chan_id).ok_or(lk::ERR_CHANNEL_CLOSED)?;
        if let Some(peer) = chan.ta_peer {
            // TA-to-TA (Trusty `ipc_port_accept()`): a connection whose client already closed
            // its end is dropped with ERR_CHANNEL_CLOSED; otherwise the client gets READY.
            let client_open = matches!(self.chans.get(&peer), Some(c) if c.ta == TaSide::Open && c.ta_peer == Some(chan_id));
            if !client_open {
                self.chans.remove(&chan_id);
                return Err(lk::ERR_CHANNEL_CLOSED);
            }
            if let Some(server) = self.chans.get_mut(&chan_id) {
                server.ta = TaSide::Open;
                server.owner = app;
                if server.signal {
                    // Raised before the owner changed: queued for the new one.
                    self.ready.raise(self.sleep_until.len(), app, Handle::Chan(chan_id));
                }
            }
            let client_app = match self.chans.get_mut(&peer) {
                Some(client) => {
                    client.ready = true;
                    client.signal = true;
                    self.ready.raise(self.sleep_until.len(), client.owner, Handle::Chan(peer));
                    client.owner
                }
                None => return Err(lk::ERR_CHANNEL_CLOSED),
            };
            self.stats.accepted += 1;
            if let Some(s) = self.port_stats_at(stats_slot) {
            s.accepted += 1;
        }
            return Ok((chan_id, ta_uuid(client_app)));
        }
        chan.ta = TaSide::Open;
        chan.owner = app;
        if chan.signal {
            // Raised before the owner changed: queued for the new one.
            self.ready.raise(self.sleep_until.len(), app, Handle::Chan(chan_id));
        }
        // The device answers with Trusty's fixed CONN_RSP limits (spec §6.3, §6.4 step 7).
        self.events.push_back(IpcEvent::Accepted {
            chan: chan_id,
            max_msg_size: CONN_RSP_MAX_MSG_SIZE,
            max_msg_cnt: CONN_RSP_MAX_MSG_CNT,
        });
        self.stats.accepted += 1;
        if let Some(s) = self.port_stats_at(stats_slot) {
            s.accepted += 1;
        }
        Ok((chan_id, NS_CLIENT_UUID))
    }

    fn close_chan(&mut self, app: usize, id: ChanId) -> Result<(), i32> {
        let chan = self.open_chan(app, id)?;
        chan.ta = TaSide::Closed;
        // Unread messages go with the handle, and with them their memory references (Trusty
        // `ipc_chan_close()` frees the message queue; each reference's last put sends RELEASE).
        let dropped: Vec<MemRef> = chan.inbound.drain().flat_map(|m| m.handles).collect();
        chan.gotten = 0;
        chan.signal = false;
        let ns = chan.ns;
        let ta_peer = chan.ta_peer.take();
        let was_waiting = chan.waiting_for.take().is_some();
        self.released.extend(dropped);
        if ta_peer.is_some() || was_waiting {
            // TA-to-TA end (Trusty `ipc_chan_close()` -> peer shutdown): the record goes; an
            // accepted peer sees HUP; a server end still pending stays on the port so that
            // `accept` reports ERR_CHANNEL_CLOSED for it.
            self.chans.remove(&id);
            if let Some(p) = ta_peer {
                if let Some(c) = self.chans.get_mut(&p) {
                    if c.ta == TaSide::Pending {
                        c.ta_peer = Some(id);
                        return Ok(());
                    }
                }
            }
            self.hup_ta_peer(ta_peer);
            return Ok(());
        }
        let Some(chan) = self.chans.get_mut(&id) else { return Ok(()) };
        match ns {
            NsSide::Open => {
                // Queued messages go out first, then DISC_REQ (spec §6.6 step 1, §6.8).
                chan.ns = NsSide::Closing;
                self.events.push_back(IpcEvent::Closed { chan: id });
                self.stats.closed_by_ta += 1;
            }
            NsSide::Closing => {}
            NsSide::Gone => {
                self.chans.remove(&id);
            }
        }
        Ok(())
    }

    fn get_msg(&mut self, app: usize, id: ChanId) -> Result<Vec<u8>, i32> {
        let mut out = Vec::new();
        self.get_msg_with(app, id, |data| out.extend_from_slice(data))?;
        Ok(out)
    }

    /// Gets the oldest message not got yet and shows its bytes to `read` (Trusty `get_msg`,
    /// then `read_msg` into the app's own buffer). Returns the length.
    fn get_msg_with(&mut self, app: usize, id: ChanId, read: impl FnOnce(&[u8])) -> Result<usize, i32> {
        let chan = self.open_chan(app, id)?;
        let msg = chan.inbound.get(chan.gotten).ok_or(lk::ERR_NO_MSG)?;
        read(&msg.data);
        let len = msg.data.len();
        chan.gotten += 1;
        chan.progress += 1;
        Ok(len)
    }

    fn put_msg(&mut self, app: usize, id: ChanId) -> Result<(), i32> {
        let chan = self.open_chan(app, id)?;
        if chan.gotten == 0 {
            return Err(lk::ERR_INVALID_ARGS);
        }
        let msg = chan.inbound.pop_front();
        chan.gotten -= 1;
        chan.progress += 1;
        // References the app did not take with the message are dropped with it (Trusty
        // `msg_queue_put_msg()` puts the message's handles).
        let peer = chan.ta_peer;
        if let Some(msg) = msg {
            if !msg.handles.is_empty() {
                self.released.extend(msg.handles);
            }
            recycle(&mut self.spare, msg.data);
        }
        // A TA-to-TA sender blocked on this queue may go on (IPC_HANDLE_POLL_SEND_UNBLOCKED).
        if let Some((pid, p)) = peer.and_then(|p| Some(p).zip(self.chans.get_mut(&p))) {
            if p.send_blocked {
                p.send_blocked = false;
                p.unblocked = true;
                p.signal = true;
                self.ready.raise(self.sleep_until.len(), p.owner, Handle::Chan(pid));
            }
        }
        Ok(())
    }

    /// The echo fast path ([`Ctx::echo_queued`]): get + read + send back + put of each
    /// waiting message of an NS channel, all under one look-up, each buffer moved into the
    /// outgoing event. Stops before the first message for which not all four calls would
    /// succeed, leaving it untouched.
    #[inline(always)]
    fn echo_queued(&mut self, app: usize, id: ChanId) -> Result<usize, i32> {
        let (echoed, stop, slot) = self.echo_queued_inner(app, id);
        if echoed > 0 {
            self.stats.sent_to_ns += echoed as u64;
            if let Some(s) = slot.and_then(|i| self.port_stats.get_mut(i)) {
                s.sent += echoed as u64;
            }
        }
        match stop {
            None => Ok(echoed),
            Some(e) => Err(e),
        }
    }

    /// [`Core::echo_queued`]'s work: how many went back, why it stopped early (None: no
    /// message left), and the channel's port-counter slot.
    #[inline(always)]
    fn echo_queued_inner(&mut self, app: usize, id: ChanId) -> (usize, Option<i32>, Option<usize>) {
        // open_chan()'s check, on the field alone (the queues below are other fields).
        let chan = match self.chans.get_mut(&id) {
            Some(c) if c.owner == app && c.ta == TaSide::Open => c,
            _ => return (0, Some(lk::ERR_BAD_HANDLE), None),
        };
        let slot = chan.stats_slot;
        // put_msg() retires the oldest got message: with one already got it would not be
        // the one just got.
        if chan.gotten != 0 {
            return (0, Some(lk::ERR_BAD_STATE), slot);
        }
        let mut echoed = 0;
        loop {
            if chan.inbound.is_empty() {
                return (echoed, None, slot);
            }
            // send_msg()'s conditions for a message to the NS (see there; ipc_msg.c
            // msg_write_locked(): a connected peer and a free item in its queue): an NS channel
            // still open on both sides, with room in its outgoing queue. Anything else goes the
            // long way, which also marks the sender blocked (IPC_CHAN_AUX_STATE_PEER_SEND_BLOCKED).
            if chan.ta_peer.is_some() || chan.ns != NsSide::Open || chan.outbound >= chan.msg_num as usize {
                return (echoed, Some(lk::ERR_NOT_ENOUGH_BUFFER), slot);
            }
            let Some(InMsg { mut data, handles }) = chan.inbound.pop_front() else { return (echoed, None, slot) };
            // get_msg + put_msg: two calls' progress.
            chan.progress += 2;
            chan.outbound += 1;
            // ipc_msg.c user_msg_write_locked(): cut to the item size (a queued message
            // already fits).
            data.truncate(chan.max_msg_size as usize);
            // ipc_msg.c msg_put_read_locked(): the put item's handles are let go with it.
            if handles.capacity() != 0 {
                self.released.extend(handles);
            } else {
                // Nothing was ever allocated: nothing to free (skips the drop glue).
                core::mem::forget(handles);
            }
            self.events.push_back(IpcEvent::Message { chan: id, data });
            echoed += 1;
        }
    }

    fn take_handles(&mut self, app: usize, id: ChanId) -> Result<Vec<MemRef>, i32> {
        let chan = self.open_chan(app, id)?;
        let last = chan.gotten.checked_sub(1).ok_or(lk::ERR_NO_MSG)?;
        let msg = chan.inbound.get_mut(last).ok_or(lk::ERR_NO_MSG)?;
        Ok(core::mem::take(&mut msg.handles))
    }

    fn send_msg(&mut self, app: usize, id: ChanId, data: &[u8]) -> Result<usize, i32> {
        let chan = self.open_chan(app, id)?;
        // TA-to-TA ends have no NS side (an NS channel after HUP answers the same way there).
        if (chan.ta_peer.is_some() || chan.waiting_for.is_some() || chan.hup) && chan.ns == NsSide::Gone {
            return self.send_ta(id, data);
        }
        if chan.ns != NsSide::Open {
            return Err(lk::ERR_CHANNEL_CLOSED);
        }
        // The NS side's queue has the port's depth; the device drains it (spec §6.6 step 2).
        if chan.outbound >= chan.msg_num as usize {
            chan.send_blocked = true;
            return Err(lk::ERR_NOT_ENOUGH_BUFFER);
        }
        // ipc_msg.c user_msg_write_locked() -> iovec.c user_iovec_to_membuf(): cut to the item
        // size, not refused.
        let data = &data[..data.len().min(chan.max_msg_size as usize)];
        chan.outbound += 1;
        let stats_slot = chan.stats_slot;
        self.events.push_back(IpcEvent::Message {
            chan: id,
            data: pooled(&mut self.spare, data),
        });
        self.stats.sent_to_ns += 1;
        // The port's counters exist from its creation: no allocation here.
        if let Some(s) = stats_slot.and_then(|i| self.port_stats.get_mut(i)) {
            s.sent += 1;
        }
        Ok(data.len())
    }

    /// TA-to-TA send (Trusty `ipc_send_msg()`): ERR_NOT_READY before the server accepted,
    /// ERR_CHANNEL_CLOSED once the peer is gone, ERR_NOT_ENOUGH_BUFFER when the peer's queue is
    /// full (SEND_UNBLOCKED follows when the peer puts a message). Cut to the item size, as the
    /// NS path.
    fn send_ta(&mut self, id: ChanId, data: &[u8]) -> Result<usize, i32> {
        let chan = self.chans.get_mut(&id).ok_or(lk::ERR_BAD_HANDLE)?;
        if chan.hup {
            return Err(lk::ERR_CHANNEL_CLOSED);
        }
        if chan.waiting_for.is_some() {
            return Err(lk::ERR_NOT_READY);
        }
        let peer_id = chan.ta_peer.ok_or(lk::ERR_CHANNEL_CLOSED)?;
        let peer = self.chans.get(&peer_id).ok_or(lk::ERR_CHANNEL_CLOSED)?;
        // A client end may send only once the server accepted.
        if peer.ta == TaSide::Pending {
            return Err(lk::ERR_NOT_READY);
        }
        if peer.ta != TaSide::Open {
            return Err(lk::ERR_CHANNEL_CLOSED);
        }
        if peer.inbound.len() >= peer.msg_num as usize {
            if let Some(c) = self.chans.get_mut(&id) {
                c.send_blocked = true;
            }
            return Err(lk::ERR_NOT_ENOUGH_BUFFER);
        }
        let peer = self.chans.get_mut(&peer_id).ok_or(lk::ERR_CHANNEL_CLOSED)?;
        let data = &data[..data.len().min(peer.max_msg_size as usize)];
        peer.inbound.push_back(InMsg { data: data.to_vec(), handles: Vec::new() });
        peer.signal = true;
        self.ready.raise(self.sleep_until.len(), peer.owner, Handle::Chan(peer_id));
        Ok(data.len())
    }

    /// Debug builds: every raised handle of an app is on that app's ready list (a raise that
    /// forgot to queue would leave an event unseen).
    #[cfg(debug_assertions)]
    fn check_ready_lists(&self) {
        debug_assert!(self.ready.busy_matches_lists(), "the busy set lost step with the ready lists");
        let apps = self.sleep_until.len();
        for (id, p) in &self.ports {
            debug_assert!(!p.signal || p.owner >= apps || self.ready.contains(p.owner, Handle::Port(*id)), "port {id:?} raised but not queued");
        }
        for (id, c) in self.chans.iter() {
            debug_assert!(!c.signal || c.owner >= apps || self.ready.contains(c.owner, Handle::Chan(*id)), "channel {id:?} raised but not queued");
        }
    }

}

/// A trusted app's view of the IPC core during one handler call.
pub struct Ctx<'a> {
    core: &'a mut Core,
    app: usize,
}

impl Ctx<'_> {
    /// Current time in nanoseconds.
    pub fn now(&self) -> u64 {
        self.core.now()
    }

    /// Create a port (Trusty `port_create`): `msg_num` receive buffers of `msg_size` bytes per
    /// channel, access `flags` ([`IPC_PORT_ALLOW_TA_CONNECT`], [`IPC_PORT_ALLOW_NS_CONNECT`]).
    /// Errors: ERR_INVALID_ARGS (bad name, or sizes: zero, or msg_size > 4096, as Trusty's
    /// `ipc_port_create()`), ERR_ALREADY_EXISTS (name taken).
    pub fn create_port(
        &mut self,
        name: &str,
        msg_num: u32,
        msg_size: u32,
        flags: u32,
    ) -> Result<PortId, i32> {
        self.core
            .create_port(self.app, name, msg_num, msg_size, flags)
    }

    /// Close a port: every connection still pending on it is closed (the NS gets DISC_REQ).
    pub fn close_port(&mut self, port: PortId) -> Result<(), i32> {
        self.core.close_port(self.app, port)
    }

    /// Accept the oldest pending connection (Trusty `accept`): returns the channel and the
    /// peer's UUID. ERR_NO_MSG when nothing is pending, ERR_BAD_HANDLE for a foreign port.
    pub fn accept(&mut self, port: PortId) -> Result<(ChanId, [u8; 16]), i32> {
        self.core.accept(self.app, port)
    }

    /// Close a channel handle (Trusty `close`): unread messages are discarded; if the NS side is
    /// still open it gets DISC_REQ after the messages already sent.
    pub fn close(&mut self, chan: ChanId) -> Result<(), i32> {
        self.core.close_chan(self.app, chan)
    }

    /// Get (and read) the oldest message not got yet (Trusty `get_msg` + `read_msg`). It keeps its
    /// receive-queue slot until [`Ctx::put_msg`]. ERR_NO_MSG when there is none.
    pub fn get_msg(&mut self, chan: ChanId) -> Result<Vec<u8>, i32> {
        self.core.get_msg(self.app, chan)
    }

    /// Get the oldest message not got yet and copy it into the app's own buffer `out`
    /// (Trusty `get_msg` + `read_msg`): `out` is cleared and its capacity reused, so a steady
    /// stream of messages allocates nothing. Returns the length. ERR_NO_MSG when there is none.
    pub fn get_msg_into(&mut self, chan: ChanId, out: &mut Vec<u8>) -> Result<usize, i32> {
        out.clear();
        self.core.get_msg_with(self.app, chan, |data| out.extend_from_slice(data))
    }

    /// Get the oldest message not got yet without reading it (Trusty `get_msg` alone, which
    /// reports the length). It keeps its slot until [`Ctx::put_msg`]. ERR_NO_MSG when none.
    pub fn get_msg_len(&mut self, chan: ChanId) -> Result<usize, i32> {
        self.core.get_msg_with(self.app, chan, |_| ())
    }

    /// Echo every waiting message of an NS channel back to its sender, oldest first: for each,
    /// Trusty `get_msg`, `read_msg`, `send_msg` of the bytes read and `put_msg`, done at once
    /// (the message's buffer becomes the outgoing message: no copy). `Ok(n)`: all `n` waiting
    /// messages went back. An error means the next message was left untouched (those before
    /// it went back) and the separate calls are to be used for it, which give the precise
    /// answer: a channel that is not this app's (ERR_BAD_HANDLE), a message already got
    /// (ERR_BAD_STATE), or one that `send_msg` would refuse (ERR_NOT_ENOUGH_BUFFER: a full NS
    /// queue, a closing channel or a TA-to-TA one).
    #[inline]
    pub fn echo_queued(&mut self, chan: ChanId) -> Result<usize, i32> {
        self.core.echo_queued(self.app, chan)
    }

    /// Take the memory references of the message got last (Trusty `read_msg()` with
    /// `num_handles`: the handles move into the app's handle table). References not taken are
    /// dropped at [`Ctx::put_msg`]. ERR_NO_MSG when no message is got.
    pub fn take_handles(&mut self, chan: ChanId) -> Result<Vec<MemRef>, i32> {
        self.core.take_handles(self.app, chan)
    }

    /// Close a memory-reference handle (Trusty `close()` on a memref): the reference is dropped
    /// and Trusty tells the normal world with RELEASE.
    pub fn close_memref(&mut self, m: MemRef) {
        self.core.released.push_back(m);
    }

    /// Retire the oldest got message, freeing its slot (Trusty `put_msg`).
    pub fn put_msg(&mut self, chan: ChanId) -> Result<(), i32> {
        self.core.put_msg(self.app, chan)
    }

    /// Send a message to the NS (Trusty `send_msg`). ERR_NOT_ENOUGH_BUFFER when the NS side's
    /// queue is full (SEND_UNBLOCKED follows once it drains), ERR_CHANNEL_CLOSED after HUP,
    /// A message above the port's message size is cut to it (Trusty `user_msg_write_locked`).
    pub fn send_msg(&mut self, chan: ChanId, data: &[u8]) -> Result<usize, i32> {
        self.core.send_msg(self.app, chan, data)
    }

    /// Connect to another app's port, or to one of this app's own (Trusty `connect()`, lib/trusty
    /// ipc.c `ipc_port_connect_async()`). `flags` must hold [`IPC_CONNECT_ASYNC`]: the channel
    /// comes back at once, READY follows when the server accepts, HUP when it closes or refuses.
    /// With [`IPC_CONNECT_WAIT_FOR_PORT`] a missing port is waited for. Errors:
    /// ERR_INVALID_ARGS (name empty, over 63 bytes, or with NUL), ERR_NOT_FOUND (no such port),
    /// ERR_ACCESS_DENIED (port without [`IPC_PORT_ALLOW_TA_CONNECT`]), ERR_NOT_SUPPORTED (a
    /// blocking connect, not modelled), ERR_NO_RESOURCES.
    pub fn connect(&mut self, name: &str, flags: u32) -> Result<ChanId, i32> {
        self.core.connect_ta(self.app, name, flags)
    }

    /// Take the pending events of one of this app's channels without waiting (the model's
    /// `wait(chan, 0)`: other apps do not run inside a handler, so an empty set is what a
    /// timed-out wait would see when only this app could act). ERR_BAD_HANDLE for a handle
    /// this app does not hold.
    pub fn poll(&mut self, chan: ChanId) -> Result<Events, i32> {
        self.core.poll_chan(self.app, chan)
    }

    /// Whether a connection is pending on one of this app's ports (the model's `wait(port, 0)`
    /// reporting READY). ERR_BAD_HANDLE for a port this app does not own.
    pub fn port_ready(&mut self, port: PortId) -> Result<bool, i32> {
        self.core.owned_port(self.app, port).map(|p| !p.pending.is_empty())
    }

    /// Arm (Some) or cancel (None) the app's timer: unlike [`Ctx::sleep`], events keep coming;
    /// [`TrustedApp::on_timer`] runs once `deadline_ns` has passed and the app has no event
    /// waiting (events come first; an app whose wait an event ended cancels its timer). This
    /// is how an app waits with a timeout (Trusty
    /// `wait(handle, &ev, timeout)`: the event, or ERR_TIMED_OUT). A deadline not after the
    /// current time fires at the next later time, so a timer never keeps [`Ipc::run`] busy.
    pub fn set_timer(&mut self, deadline_ns: Option<u64>) {
        let now = self.core.now();
        if let Some(slot) = self.core.timer_at.get_mut(self.app) {
            *slot = deadline_ns.map(|d| d.max(now.saturating_add(1)));
        }
        self.core.deadlines_changed();
    }

    /// Sleep (Trusty `nanosleep`): the app gets no events until `duration_ns` has passed, then
    /// [`TrustedApp::on_wake`] runs. A zero duration still yields until the next time step.
    pub fn sleep(&mut self, duration_ns: u64) {
        let deadline = self.core.now().saturating_add(duration_ns.max(1));
        if let Some(slot) = self.core.sleep_until.get_mut(self.app) {
            *slot = Some(deadline);
        }
        self.core.deadlines_changed();
    }
}

struct App {
    ta: Box<dyn TrustedApp>,
}

/// The IPC core with its trusted apps.
pub struct Ipc {
    core: Core,
    apps: Vec<App>,
    /// Tests: how often [`Ipc::run`] ended after its first step alone, and how often it went
    /// on with the general loop after that step.
    #[cfg(test)]
    first_step: (u64, u64),
}

impl Default for Ipc {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Ipc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ipc")
            .field("now", &self.core.now.get())
            .field("apps", &self.apps.len())
            .field("ports", &self.core.ports.len())
            .field("channels", &self.core.chans.len())
            .field("events", &self.core.events.len())
            .finish()
    }
}

impl Ipc {
    /// An IPC core with no apps.
    pub fn new() -> Self {
        Ipc {
            core: Core::new(),
            apps: Vec::new(),
            #[cfg(test)]
            first_step: (0, 0),
        }
    }

    /// The standard ipc-unittest service set of §9.2 registered.
    pub fn with_unittest_services() -> Self {
        let mut ipc = Ipc::new();
        for ta in services::unittest_services() {
            ipc.add_app(ta);
        }
        // The other test apps AOSP's tipc-test talks to (send-fd, ta2ta-ipc).
        ipc.add_app(Box::new(apps::MemrefReceiver::new()));
        ipc.add_app(Box::new(apps::UnittestCtrl::new()));
        ipc
    }

    /// The secure side's clock: from now on the current time is read from it lazily, at most
    /// once after each [`Ipc::time_passed`], and only when a timer or an app needs it. Times
    /// passed to the other calls still count (time never goes backwards).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.core.clock = Some(clock);
        self.core.stale.set(true);
    }

    /// Time has moved on (a new call from the normal world): the next look at the current time
    /// reads the clock ([`Ipc::set_clock`]). A pass with no timer armed and no app asking the
    /// time reads no clock at all.
    pub fn time_passed(&mut self) {
        self.core.stale.set(true);
    }

    /// Add a trusted app and run its `start` (port creation) at the current time.
    pub fn add_app(&mut self, ta: Box<dyn TrustedApp>) {
        let app = self.apps.len();
        self.core.sleep_until.push(None);
        self.core.timer_at.push(None);
        self.apps.push(App { ta });
        if let Some(slot) = self.apps.get_mut(app) {
            let mut ctx = Ctx {
                core: &mut self.core,
                app,
            };
            slot.ta.start(&mut ctx);
        }
    }

    /// NS asks to connect to `port` (the name as received, without the NUL padding). Ok(chan) means
    /// "pending": the TA will accept (-> IpcEvent::Accepted) or close (-> IpcEvent::Closed) later.
    /// Err(lk error) for immediate failure: no such port (ERR_NOT_FOUND), port does not allow NS
    /// (ERR_ACCESS_DENIED), invalid name (empty, longer than 63 bytes or containing NUL:
    /// ERR_INVALID_ARGS), no free channel (ERR_NO_RESOURCES). (The device maps all of these to
    /// CONN_RSP -41 on the wire, spec §6.4 step 6.)
    pub fn connect_ns(&mut self, port: &[u8], now: u64) -> Result<ChanId, i32> {
        self.core.advance(now);
        self.core.stats.connect_requests += 1;
        let result = self.core.connect_ns(port);
        if result.is_err() {
            self.core.stats.connect_rejected += 1;
        }
        result
    }

    /// NS sent a message on chan. Returns Ok(len) when queued for the TA; Err: ERR_NOT_READY if the
    /// TA has not accepted yet, ERR_NOT_ENOUGH_BUFFER if the TA's receive queue is full (message
    /// dropped, no retry), ERR_TOO_BIG if larger than the port's max message size,
    /// ERR_CHANNEL_CLOSED if the channel is closing/closed, ERR_NOT_FOUND for unknown chan
    /// (including one the NS already closed) (spec §6.5 step 8).
    pub fn deliver(&mut self, chan: ChanId, data: &[u8], now: u64) -> Result<usize, i32> {
        self.deliver_with_handles(chan, data, Vec::new(), now).map_err(|(e, _)| e)
    }

    /// [`Ipc::deliver`] with memory references attached (spec §6.9): at most
    /// [`MAX_MSG_HANDLES`] (else ERR_INVALID_ARGS). On failure the references come back
    /// unreleased: a failed message sends no RELEASE.
    pub fn deliver_with_handles(
        &mut self,
        chan: ChanId,
        data: &[u8],
        handles: Vec<MemRef>,
        now: u64,
    ) -> Result<usize, (i32, Vec<MemRef>)> {
        let fill = |buf: &mut [u8]| {
            buf.copy_from_slice(&data[..buf.len()]);
            true
        };
        self.deliver_counted(chan, data.len(), fill, handles, now)
    }

    /// [`Ipc::deliver`] of a message of `len` bytes that `fill` writes into the queue's buffer
    /// (cut to the item size: `fill` gets the slice to fill, and copies the message's first
    /// bytes into it), so the device can copy straight from the normal world's buffer. A
    /// `fill` that fails (returns false) queues nothing: ERR_NOT_VALID.
    #[inline(always)]
    pub fn deliver_from(&mut self, chan: ChanId, len: usize, fill: impl FnOnce(&mut [u8]) -> bool, now: u64) -> Result<usize, i32> {
        self.deliver_counted(chan, len, fill, Vec::new(), now).map_err(|(e, _)| e)
    }

    #[inline(always)]
    fn deliver_counted(
        &mut self,
        chan: ChanId,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> bool,
        handles: Vec<MemRef>,
        now: u64,
    ) -> Result<usize, (i32, Vec<MemRef>)> {
        self.core.advance(now);
        let (result, stats_slot) = self.core.deliver(chan, len, fill, handles);
        let result_code = result.as_ref().map(|n| *n).map_err(|(e, _)| *e);
        match result_code {
            Ok(_) => self.core.stats.delivered += 1,
            Err(lk::ERR_NOT_ENOUGH_BUFFER) => self.core.stats.dropped_queue_full += 1,
            Err(_) => self.core.stats.rejected += 1,
        }
        // The port's counters exist from its creation (`create_port`): the channel keeps their
        // slot, so no lookup by name per message.
        if let Some(s) = stats_slot.and_then(|i| self.core.port_stats.get_mut(i)) {
            match result_code {
                Ok(_) => s.delivered += 1,
                Err(lk::ERR_NOT_ENOUGH_BUFFER) => s.dropped_queue_full += 1,
                Err(_) => {}
            }
        }
        result
    }

    /// NS closed the channel (DISC_REQ from NS, or device reset): the TA sees HUP. No event is
    /// produced for this channel afterwards (queued ones are discarded). Unknown ids are ignored.
    pub fn ns_close(&mut self, chan: ChanId, now: u64) {
        self.core.advance(now);
        self.core.ns_close(chan);
    }

    /// The next memory reference a trusted app let go of: the device unmaps it and, unless the
    /// device is being reset, sends RELEASE (spec §6.9).
    pub fn take_released_memref(&mut self) -> Option<MemRef> {
        self.core.released.pop_front()
    }

    /// Close every channel (device reset / VDEV_RESET): no events produced.
    pub fn reset(&mut self, now: u64) {
        self.core.advance(now);
        let ids: Vec<ChanId> = self.core.chans.keys().copied().collect();
        for id in ids {
            self.core.ns_close(id);
        }
        self.core.events.clear();
    }

    /// Run every TA until nothing more can happen at time `now` (process queued messages, due
    /// sleeps, pending accepts). Returns whether anything happened. A `now` earlier than one seen
    /// before is treated as that earlier-seen maximum (time is monotonic).
    pub fn run(&mut self, now: u64) -> bool {
        self.run_inline(now)
    }

    /// [`Ipc::run`], inlined into the device's round.
    #[inline(always)]
    pub(crate) fn run_inline(&mut self, now: u64) -> bool {
        self.core.advance(now);
        // The data path's usual case: no timer armed, a handle just queued. The general loop
        // below would start its first pass with the lowest app that has work; that step is
        // taken here, and when it leaves nothing queued and no timer armed the loop's rest (a
        // look for a next app, a second pass that finds everything idle) is known to do
        // nothing. Otherwise the loop goes on exactly where its first pass would be.
        let mut resume = None;
        if self.core.next_deadline.is_none() {
            if let Some(app) = self.core.ready.next_busy(0).filter(|&a| a < self.apps.len()) {
                let stepped = self.step_app(app);
                if stepped && self.core.ready.all_idle() && self.core.next_deadline.is_none() {
                    #[cfg(debug_assertions)]
                    self.core.check_ready_lists();
                    #[cfg(test)]
                    {
                        self.first_step.0 += 1;
                    }
                    return true;
                }
                #[cfg(test)]
                {
                    self.first_step.1 += 1;
                }
                resume = Some(Pass { from: app + 1, stepped });
            }
        }
        self.run_passes(resume)
    }

    /// [`Ipc::run`]'s scheduler loop, from the start of a pass or from `resume` (a first pass,
    /// begun with no timer due, to go on with).
    fn run_passes(&mut self, mut resume: Option<Pass>) -> bool {
        let mut any = false;
        loop {
            let (timer_due, mut from, mut pass) = match resume.take() {
                Some(Pass { from, stepped }) => (false, from, stepped),
                None => {
                    // An app acts only on a queued handle (every raise queues it, see [`ready`])
                    // or a due timer; with neither, a pass would do nothing. The clock is read
                    // only when a timer is armed.
                    let timer_due = self.timer_due();
                    if self.core.ready.all_idle() && !timer_due {
                        #[cfg(debug_assertions)]
                        self.core.check_ready_lists();
                        return any;
                    }
                    (timer_due, 0, false)
                }
            };
            // Round-robin, one handler call per app per pass: deterministic and fair.
            // With a timer due every app is stepped; otherwise an app is skipped only when its
            // step would find nothing: no handle queued for it (an earlier handler's raise is
            // queued at once, so an app after it raised during this pass is still met in it).
            // The ready lists name those apps without a look at each idle one.
            loop {
                let next = if timer_due { Some(from) } else { self.core.ready.next_busy(from) };
                let Some(app) = next.filter(|&a| a < self.apps.len()) else { break };
                pass |= self.step_app(app);
                from = app + 1;
            }
            if !pass {
                #[cfg(debug_assertions)]
                self.core.check_ready_lists();
                return any;
            }
            any = true;
        }
    }

    /// Whether some app's timer (sleep or timed wait) is due now.
    fn timer_due(&self) -> bool {
        self.core.next_deadline.is_some_and(|d| d <= self.core.now())
    }

    /// Whether [`Ipc::run`] has anything to do: a handle queued for an app, a due timer, or a
    /// released memory reference for the device.
    pub fn has_work(&self) -> bool {
        !self.core.ready.all_idle() || !self.core.released.is_empty() || self.timer_due()
    }

    /// Handles the scheduler has looked at so far (each one queued by an event): its work is
    /// proportional to events, never to the handles that are open.
    pub fn scheduler_visits(&self) -> u64 {
        self.core.ready.visits()
    }

    /// Give one app one handler call if it has something to do. Returns whether it did.
    #[inline(always)]
    fn step_app(&mut self, app: usize) -> bool {
        let Some(slot) = self.apps.get_mut(app) else {
            return false;
        };
        let core = &mut self.core;
        match core.sleep_until.get(app).copied() {
            None => return false,
            Some(Some(deadline)) if deadline > core.now() => return false,
            Some(Some(_)) => {
                if let Some(s) = core.sleep_until.get_mut(app) {
                    *s = None;
                }
                core.deadlines_changed();
                slot.ta.on_wake(&mut Ctx { core, app });
                return true;
            }
            Some(None) => {}
        }

        // Skip stale signals (state changed since they were raised) without counting them as
        // activity; every iteration clears one flag, so this ends.
        loop {
            let chan_id = match core.ready.take_next(app) {
                Some(Handle::Port(port_id)) => {
                    // A stale entry (flag cleared, port closed or handed on since it was
                    // queued) is dropped.
                    let before = match core.ports.get_mut(&port_id) {
                        Some(port) if port.owner == app && port.signal => {
                            port.signal = false;
                            port.pending.len()
                        }
                        _ => continue,
                    };
                    if before == 0 {
                        continue;
                    }
                    slot.ta.on_port_event(
                        &mut Ctx {
                            core: &mut *core,
                            app,
                        },
                        port_id,
                        Events::READY,
                    );
                    // Level-triggered while the app makes progress (or sleeps, and acts after waking).
                    let sleeping = core.is_sleeping(app);
                    if let Some(port) = core.ports.get_mut(&port_id) {
                        let remaining = port.pending.len();
                        if remaining > 0 && (remaining < before || sleeping) {
                            port.signal = true;
                            core.ready.raise(core.sleep_until.len(), port.owner, Handle::Port(port_id));
                        }
                    }
                    return true;
                }
                Some(Handle::Chan(chan_id)) => chan_id,
                None => {
                    // No event: a due timer (Ctx::set_timer) ends the app's timed wait.
                    match core.timer_at.get(app).copied().flatten() {
                        Some(at) if at <= core.now() => {
                            if let Some(t) = core.timer_at.get_mut(app) {
                                *t = None;
                            }
                            core.deadlines_changed();
                            slot.ta.on_timer(&mut Ctx { core, app });
                            return true;
                        }
                        _ => return false,
                    }
                }
            };
            // A stale entry (flag cleared, channel gone or handed to another app since it was
            // queued) is dropped.
            let Some(chan) = core.chans.get_mut(&chan_id).filter(|c| c.owner == app && c.signal) else {
                continue;
            };
            chan.signal = false;
            if chan.ta != TaSide::Open {
                continue;
            }
            let mut events = Events::NONE;
            if chan.ready {
                chan.ready = false;
                events = events.union(Events::READY);
            }
            if chan.unread() > 0 {
                events = events.union(Events::MSG);
            }
            if chan.hup && !chan.hup_reported {
                chan.hup_reported = true;
                events = events.union(Events::HUP);
            }
            if chan.unblocked {
                chan.unblocked = false;
                events = events.union(Events::SEND_UNBLOCKED);
            }
            if events.is_empty() {
                continue;
            }
            let progress_before = chan.progress;
            slot.ta.on_chan_event(
                &mut Ctx {
                    core: &mut *core,
                    app,
                },
                chan_id,
                events,
            );
            // Whether the app sleeps (`Core::is_sleeping`) is asked only when it decides.
            if let Some(chan) = core.chans.get_mut(&chan_id) {
                if chan.ta == TaSide::Open
                    && chan.unread() > 0
                    && (chan.progress != progress_before || matches!(core.sleep_until.get(app), Some(Some(_))))
                {
                    chan.signal = true;
                    core.ready.raise(core.sleep_until.len(), chan.owner, Handle::Chan(chan_id));
                }
            }
            return true;
        }
    }

    /// Take the next event for the NS side, in order. The device calls this; if it cannot deliver
    /// an Event::Message because the NS has no free rx buffer, it calls `unpop_event` to put it back
    /// at the front (Trusty blocks its tx thread, spec §6.6 step 2). Taking a Message frees a slot
    /// in the channel's TA->NS queue (a blocked sender gets SEND_UNBLOCKED at the next `run`).
    #[inline]
    pub fn pop_event(&mut self) -> Option<IpcEvent> {
        self.core.pop_event()
    }

    /// Gives back the buffer of a [`IpcEvent::Message`] the device has sent, for reuse (a
    /// message in steady state then allocates nothing).
    #[inline]
    pub fn recycle(&mut self, buf: Vec<u8>) {
        recycle(&mut self.core.spare, buf);
    }

    /// Put an event just taken with [`Ipc::pop_event`] back at the front of the queue, undoing its
    /// bookkeeping. Events of channels the NS has closed meanwhile are dropped.
    pub fn unpop_event(&mut self, ev: IpcEvent) {
        self.core.unpop_event(ev);
    }

    /// Number of events waiting for the NS side.
    pub fn pending_events(&self) -> usize {
        self.core.events.len()
    }

    /// Earliest time at which a timer (a sleeping app's wake-up, a timed wait's end) fires
    /// (None when none is armed).
    pub fn next_deadline(&self) -> Option<u64> {
        self.core.next_deadline
    }

    /// The latest time seen by the core.
    pub fn now(&self) -> u64 {
        self.core.now()
    }

    /// Limits of the currently open port called `name`: (msg_num, msg_size, flags).
    pub fn port_info(&self, name: &[u8]) -> Option<(u32, u32, u32)> {
        let id = self.core.find_port(name)?;
        self.core
            .ports
            .get(&id)
            .map(|p| (p.msg_num, p.msg_size, p.flags))
    }

    /// Statistics for tests: messages delivered per port, dropped because queue full, etc.
    pub fn stats(&self) -> IpcStats {
        let mut stats = self.core.stats.clone();
        stats.ns_channels = self.core.ns_channel_count();
        stats.channel_records = self.core.chans.len();
        let by_slot = &self.core.port_stats;
        stats.ports = self.core.port_stats_by_name.values().filter_map(|&i| by_slot.get(i)).cloned().collect();
        stats
    }
}
