//! The secure side's TIPC virtio device (spec §5.5 step 6, §5.7, §6): the two rings, the
//! endpoint table (addresses 1000..1255), CONN_REQ / DISC_REQ handling, routing of data to the
//! IPC core and of the core's events back to the normal world.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::vec::Vec;

use tipc::wire::{self, Ctrl, Header};
use trusty_platform::mem::PAGE_SIZE;
use trusty_virtio::rsc::{VdevInfo, VIRTIO_ID_TIPC};
use trusty_virtio::vring::{Desc, DeviceQueue, DeviceRingError, Layout, DESC_F_NEXT, DESC_F_WRITE};

use crate::ipc::{lk, ChanId, Ipc, IpcEvent, MemRef};
use crate::mem::{Mapping, ShareTable, Span};

/// Handles per message Trusty accepts (spec §6.9).
const MAX_MSG_HANDLES: usize = 8;
/// The status byte TIPC's probe requires (spec §5.5 step 6).
const STATUS_AT_START: u8 = 0x07;

/// A broken frame the model can be told to send, to drive the normal world's error paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// used.len below the header size.
    ShortUsedLen,
    /// hdr.len disagrees with used.len.
    LengthMismatch,
    /// A data frame for an address nobody has.
    UnknownDst,
    /// CONN_RSP with a 16-byte body.
    BadCtrlBody,
    /// Control type 77.
    UnknownCtrlType,
    /// A negative used length (a mapping error, as Trusty reports it).
    NegativeUsedLen,
    /// A used entry naming a descriptor index that was never posted.
    BadUsedId,
    /// Random bytes and a random used length, from a seed.
    Garbage(u64),
}

#[allow(clippy::large_enum_variant)] // short-lived queue entries; see wire::Ctrl
enum Outgoing {
    Ctrl(Ctrl),
    Bad(Malformed),
}

#[derive(Clone, Copy, Debug)]
struct Endpoint {
    /// The normal world's address of the channel.
    remote: u32,
    chan: ChanId,
}

struct Ring {
    queue: DeviceQueue,
    mem: Mapping,
}

/// What the device does to the normal world's messages, for fault injection.
#[derive(Clone, Copy, Debug, Default)]
pub struct TipcInjection {
    /// Answer the next N data messages with ERR_NOT_ENOUGH_BUFFER without delivering them.
    pub drop_messages: u32,
    /// Accept the next N CONN_REQs but never answer them (drives the connect timeout).
    pub swallow_conn_req: u32,
    /// Stop taking messages from the normal world (drives the tx-buffer timeout).
    pub stall_from_ns: bool,
}

/// Counters of the device side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TipcDevStats {
    /// Frames the normal world sent.
    pub frames_from_ns: u64,
    /// Frames sent to the normal world.
    pub frames_to_ns: u64,
    /// Frames from the normal world answered with an error status.
    pub refused_from_ns: u64,
    /// Messages dropped by injection.
    pub dropped_on_purpose: u64,
    /// RELEASE messages sent.
    pub releases_sent: u64,
    /// Messages lost because the normal world posted an unusable rx buffer.
    pub lost_to_bad_buffers: u64,
    /// Rounds of [`TipcDev::run`] (each: frames in, the IPC core, frames out), counting any
    /// that found nothing to do.
    pub rounds: u64,
}

/// One TIPC device, reset or active.
pub struct TipcDev {
    devid: u32,
    /// Trusty's "rx" ring: vring 1, normal world to secure.
    from_ns: Option<Ring>,
    /// Trusty's "tx" ring: vring 0, secure to normal world.
    to_ns: Option<Ring>,
    endpoints: Vec<Option<Endpoint>>,
    outbox: VecDeque<Outgoing>,
    /// Misbehaviour to inject.
    pub inject: TipcInjection,
    stats: TipcDevStats,
    /// The device's virtio notifyids of its rings (1 and 2 for the default device).
    notifyids: [u32; 2],
    /// A ring violation met while sending (Trusty panics on it): reported by `run`.
    violation: Option<DeviceRingError>,
    /// Reused space (a message in steady state allocates nothing): the descriptors of the
    /// chain being taken from vring 1 / vring 0, and a frame read from the normal world (frames
    /// to it are written in place, header and payload).
    in_descs: Vec<Desc>,
    out_descs: Vec<Desc>,
    in_frame: Vec<u8>,
    /// VRING_USED_F_NO_NOTIFY as last written on vring 1 / vring 0 (None: not yet, since the
    /// rings were set up): rewritten, with its fence, only when it changes.
    no_notify: [Option<bool>; 2],
    /// Endpoint slot by channel id (modulo [`SLOT_HINTS`]), set when the endpoint is made, so
    /// an event finds its endpoint without a search of the table.
    slot_hints: [u16; SLOT_HINTS],
    /// Where in this process the last message from the normal world lay (0: unknown): a guess
    /// at the next one's place (a driver reuses its last freed buffer first), used only as a
    /// cache hint by [`TipcDev::prefetch_rings`], never to reach memory.
    ns_buf_hint: usize,
    /// How far the last frame to the normal world written to each rx buffer reached (0 once
    /// its lines were taken back), by the buffer's id (direct-mapped on it; a slot names its
    /// id): for [`TipcDev::prepare_next_rx_write`].
    rx_reach: [(u64, usize); RX_REACH_SLOTS],
    /// The id of the rx buffer the last frame to the normal world went to.
    rx_last_written: u64,
}

/// Slots of [`TipcDev::rx_reach`] (a power of two, above the usual ring size of 32).
const RX_REACH_SLOTS: usize = 64;

fn rx_reach_slot(id: u64) -> usize {
    (id ^ id >> 12) as usize & (RX_REACH_SLOTS - 1)
}

/// `n.next_multiple_of(PAGE_SIZE)` in two instructions (the page size is a power of two),
/// overflowing where it does.
#[inline(always)]
fn whole_pages(n: usize) -> usize {
    const _: () = assert!(PAGE_SIZE.is_power_of_two());
    (n + (PAGE_SIZE - 1)) & !(PAGE_SIZE - 1)
}

/// Buckets of [`TipcDev`]'s slot hints (channel ids are handed out in sequence).
const SLOT_HINTS: usize = 64;

impl TipcDev {
    /// Device `devid`, reset.
    pub fn new(devid: u32) -> Self {
        TipcDev {
            devid,
            from_ns: None,
            to_ns: None,
            endpoints: (0..wire::TRUSTY_ADDR_SLOTS).map(|_| None).collect(),
            outbox: VecDeque::new(),
            inject: TipcInjection::default(),
            stats: TipcDevStats::default(),
            notifyids: [1, 2],
            violation: None,
            in_descs: Vec::new(),
            out_descs: Vec::new(),
            in_frame: Vec::new(),
            no_notify: [None; 2],
            slot_hints: [0; SLOT_HINTS],
            ns_buf_hint: 0,
            rx_reach: [(0, 0); RX_REACH_SLOTS],
            rx_last_written: 0,
        }
    }

    /// The device id.
    pub fn devid(&self) -> u32 {
        self.devid
    }

    /// The rings are set up.
    pub fn active(&self) -> bool {
        self.from_ns.is_some()
    }

    /// The counters so far.
    pub fn stats(&self) -> TipcDevStats {
        self.stats
    }

    /// Endpoints (normal-world channels) currently open on this device.
    pub fn open_endpoints(&self) -> usize {
        self.endpoints.iter().flatten().count()
    }

    /// Whether `vqid` names one of this device's rings (by notifyid, spec §4).
    pub fn has_vring(&self, vqid: u32) -> bool {
        self.notifyids.contains(&vqid)
    }

    /// TIPC probe on the normal world's copy of the descriptor (spec §5.5 step 6). Errors are
    /// returned, and ignored by the bus, as Trusty does.
    pub fn probe(&mut self, vdev: &VdevInfo, shares: &mut ShareTable) -> Result<(), i32> {
        if self.active() {
            return Err(lk::ERR_BAD_STATE);
        }
        if vdev.id != VIRTIO_ID_TIPC || vdev.vrings.len() != 2 {
            return Err(lk::ERR_NOT_VALID);
        }
        if vdev.status != STATUS_AT_START {
            log::warn!("TIPC probe: status {:#x}, not exactly 0x07; staying in reset", vdev.status);
            return Err(lk::ERR_NOT_VALID);
        }
        let mut rings = Vec::new();
        for (i, v) in vdev.vrings.iter().enumerate() {
            let layout = Layout::new(v.num, v.align).map_err(|_| lk::ERR_NOT_VALID)?;
            let len = layout.size().next_multiple_of(PAGE_SIZE);
            let Some(mem) = shares.map(v.memory_id(), len, true, if i == 0 { "vring 0" } else { "vring 1" }) else {
                for r in rings {
                    shares.unmap(r);
                }
                return Err(lk::ERR_NOT_VALID);
            };
            rings.push(mem);
        }
        let (Some(m1), Some(m0)) = (rings.pop(), rings.pop()) else { return Err(lk::ERR_NOT_VALID) };
        let l0 = Layout::new(vdev.vrings[0].num, vdev.vrings[0].align).map_err(|_| lk::ERR_NOT_VALID)?;
        let l1 = Layout::new(vdev.vrings[1].num, vdev.vrings[1].align).map_err(|_| lk::ERR_NOT_VALID)?;
        self.notifyids = [vdev.vrings[0].notifyid, vdev.vrings[1].notifyid];
        self.to_ns = Some(Ring { queue: DeviceQueue::new(l0), mem: m0 });
        self.from_ns = Some(Ring { queue: DeviceQueue::new(l1), mem: m1 });
        self.no_notify = [None; 2];
        // GO_ONLINE waits for the first rx buffer (spec §5.5 step 6).
        self.outbox.push_back(Outgoing::Ctrl(Ctrl::GoOnline));
        Ok(())
    }

    /// Device reset (VDEV_RESET, STOP): every channel closed without telling the normal world,
    /// rings unmapped, consumer indices forgotten (spec §5.6, with NXP's index fix).
    pub fn reset(&mut self, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) {
        ipc.reset(now);
        // References let go of before the reset are unmapped; nobody is left to tell.
        while let Some(m) = ipc.take_released_memref() {
            shares.unmap(m.into_mapping());
        }
        for e in self.endpoints.iter_mut() {
            *e = None;
        }
        self.outbox.clear();
        for ring in [self.from_ns.take(), self.to_ns.take()].into_iter().flatten() {
            shares.unmap(ring.mem);
        }
    }

    /// Queues a control message or a broken frame for the normal world.
    pub fn queue_ctrl(&mut self, msg: Ctrl) {
        self.outbox.push_back(Outgoing::Ctrl(msg));
    }
    /// Queues a malformed frame to send.
    pub fn queue_malformed(&mut self, kind: Malformed) {
        self.outbox.push_back(Outgoing::Bad(kind));
    }

    /// Runs the device until nothing moves: normal-world messages in, the IPC core's work, and
    /// everything pending out (as far as rx buffers allow), in rounds that go on only while a
    /// round could act ([`TipcDev::more_to_do`]). `Err` carries a ring violation that makes
    /// Trusty panic (spec §5.7).
    pub fn run(&mut self, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> Result<bool, DeviceRingError> {
        let mut any = false;
        // Bounded: every round either makes progress or stops; the bound guards the model itself.
        for _ in 0..100_000 {
            self.stats.rounds += 1;
            let mut progress = self.drain_from_ns(shares, ipc, now)?;
            progress |= ipc.run_inline(now);
            progress |= self.collect_released(shares, ipc);
            progress |= self.flush_to_ns(shares, ipc);
            if let Some(e) = self.violation.take() {
                return Err(e);
            }
            if !progress {
                break;
            }
            any = true;
            // Another round only when one has something to do; a round that could only
            // confirm that nothing moves is not run.
            if !self.more_to_do(ipc) {
                break;
            }
        }
        self.update_notify_flags(ipc);
        Ok(any)
    }

    /// Starts fetching both rings' avail lines (see [`Model::prefetch_rings`]).
    ///
    /// [`Model::prefetch_rings`]: crate::model::Model::prefetch_rings
    ///
    /// Also the first lines of where the last message from the normal world lay: a guess (a
    /// cache hint never faults and reads nothing into the model), right when a driver hands
    /// out its last freed buffer first, so that the message crosses with the ring indices
    /// instead of after them.
    pub fn prefetch_rings(&self) {
        let rings = [&self.from_ns, &self.to_ns].into_iter().flatten().map(|r| (&r.queue, &r.mem));
        crate::mem::prefetch_call_lines(rings, self.ns_buf_hint);
    }

    /// Between calls (a Trusty VM on another core): takes for writing, into this core's
    /// cache, the lines of the rx buffer the next frame to the normal world goes to (the next
    /// one on vring 0), as far as the last frame written there reached
    /// ([`ShareTable::touch_for_write`]: memory keeps what it holds). The driver has read those
    /// lines since, so the next frame's copy would otherwise wait for each of them to come
    /// back from its core. Nothing is done for the buffer just filled (a driver that keeps one
    /// rx buffer posted reads it now) or one never written. The frame itself still takes,
    /// maps and checks its buffer as always.
    pub fn prepare_next_rx_write(&mut self, shares: &mut ShareTable) {
        let Some(ring) = &self.to_ns else { return };
        let Some((_, d)) = ring.queue.peek_avail_first(&ring.mem) else { return };
        let slot = rx_reach_slot(d.addr);
        let (id, reach) = self.rx_reach[slot];
        if id != d.addr || id == self.rx_last_written || reach == 0 {
            return;
        }
        shares.touch_for_write(id, reach.min(d.len as usize));
        // Once is enough until the next frame there (calls that bring no frame out, a stream
        // into Trusty, find nothing to do).
        self.rx_reach[slot].1 = 0;
    }

    /// Whether a round of [`TipcDev::run`] could make progress: a chain waiting on vring 1
    /// (unless the ring is stalled on purpose), work for the IPC core or a released reference
    /// ([`Ipc::has_work`]), or something to send while vring 0 has an rx buffer. A superset of
    /// what a round acts on, so the device never stops with work it could do.
    fn more_to_do(&self, ipc: &Ipc) -> bool {
        let from_ns = !self.inject.stall_from_ns && self.from_ns.as_ref().is_some_and(|r| r.queue.has_avail(&r.mem));
        if from_ns || ipc.has_work() {
            return true;
        }
        let to_send = !self.outbox.is_empty() || ipc.pending_events() > 0;
        to_send && self.to_ns.as_ref().is_some_and(|r| r.queue.has_avail(&r.mem))
    }

    /// Memory references the trusted apps let go of: unmapped, and the normal world told with
    /// RELEASE {obj_id} from the control address (Trusty `tipc_shm_release()` path of
    /// `handle_chan_msg()`'s memrefs, spec §6.9).
    fn collect_released(&mut self, shares: &mut ShareTable, ipc: &mut Ipc) -> bool {
        let mut any = false;
        while let Some(m) = ipc.take_released_memref() {
            let id = m.obj_id();
            shares.unmap(m.into_mapping());
            self.stats.releases_sent += 1;
            self.outbox.push_back(Outgoing::Ctrl(Ctrl::Release { id }));
            any = true;
        }
        any
    }

    fn update_notify_flags(&mut self, ipc: &Ipc) {
        // Trusty's rx thread sleeps on an empty ring with notifications on (spec §4).
        if let Some(r) = &self.from_ns {
            if self.no_notify[0] != Some(false) {
                r.queue.set_no_notify(&r.mem, false);
                self.no_notify[0] = Some(false);
            }
        }
        // Its tx thread only wants a kick when it is blocked waiting for an rx buffer.
        if let Some(r) = &self.to_ns {
            let waiting = !self.outbox.is_empty() || ipc.pending_events() > 0;
            if self.no_notify[1] != Some(!waiting) {
                r.queue.set_no_notify(&r.mem, !waiting);
                self.no_notify[1] = Some(!waiting);
            }
        }
    }

    fn drain_from_ns(&mut self, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> Result<bool, DeviceRingError> {
        let mut any = false;
        if self.inject.stall_from_ns {
            return Ok(false);
        }
        loop {
            let Some(ring) = self.from_ns.as_mut() else { return Ok(any) };
            // An empty ring costs one look at avail.idx; a violation is fatal (`run`).
            let Some((head, first)) = ring.queue.pop_avail_first(&ring.mem)? else { return Ok(any) };
            any = true;
            // vqueue.c _vqueue_get_avail_buf_locked(): at most one readable and one writable
            // descriptor (MAX_RX_IOVS = 1 per list), more is ERR_TOO_BIG. tipc_virtio_dev.c
            // handle_rx_msg(): no readable descriptor is ERR_INVALID_ARGS; a writable one next to
            // it is only logged.
            // The usual chain is one readable descriptor: no chain to read, nothing to count.
            let status = if first.flags & (DESC_F_NEXT | DESC_F_WRITE) == 0 {
                self.stats.frames_from_ns += 1;
                self.handle_ns_frame(first.addr, first.len, shares, ipc, now)
            } else {
                if ring.queue.read_chain(&ring.mem, head, first, &mut self.in_descs).is_err() {
                    // A broken link or a loop: the head comes back with an error status.
                    ring.queue.push_used(&ring.mem, head, lk::ERR_NOT_VALID as u32);
                    continue;
                }
                self.stats.frames_from_ns += 1;
                let descs = self.in_descs.as_slice();
                let readable = descs.iter().filter(|d| d.flags & DESC_F_WRITE == 0).count();
                let writable = descs.len() - readable;
                let first_readable = descs.iter().find(|d| d.flags & DESC_F_WRITE == 0).copied();
                match first_readable {
                    _ if readable > 1 || writable > 1 => lk::ERR_TOO_BIG,
                    Some(d) => self.handle_ns_frame(d.addr, d.len, shares, ipc, now),
                    None => lk::ERR_INVALID_ARGS,
                }
            };
            if status < 0 {
                self.stats.refused_from_ns += 1;
            }
            if let Some(ring) = self.from_ns.as_mut() {
                ring.queue.push_used(&ring.mem, head, status as u32);
            }
        }
    }

    /// One frame from the normal world (spec §6.5 steps 6-9); returns the used-length status.
    /// Follows tipc_virtio_dev.c handle_rx_msg(): map the buffer read-only (a mapping failure is
    /// its error), shorter than the header or 16 + hdr.len != descriptor length is
    /// ERR_INVALID_ARGS, a control message carrying shm_cnt is ERR_INVALID_ARGS, then
    /// handle_ctrl_msg() or handle_chan_msg().
    #[inline(always)]
    fn handle_ns_frame(&mut self, id: u64, len: u32, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> i32 {
        let len = len as usize;
        // hdr.len is 16 bits, so a longer descriptor can never match it (ERR_INVALID_ARGS below);
        // the model refuses it before mapping a huge range.
        if len > wire::HEADER_LEN + usize::from(u16::MAX) {
            return lk::ERR_INVALID_ARGS;
        }
        let pages = whole_pages(len.max(1));
        // Trusty maps whole pages of the buffer, read-only, for this one message (a refused
        // mapping is its error). A data message without memory references goes from the
        // mapped buffer straight into the channel's queue (handle_rx_msg() -> ipc_send_msg()
        // copies from the mapping into the receiver's message buffer), after the same checks
        // on a trusted copy of its header.
        let direct = shares.with_mapped(id, pages, false, "message buffer (NS to secure)", #[inline(always)] |m| {
            self.ns_buf_hint = m.direct_at(0, 1).map_or(0, |p| p as usize);
            let mut raw = [0u8; wire::HEADER_LEN];
            if len < wire::HEADER_LEN || !m.read(0, &mut raw) {
                return None;
            }
            let header = Header::decode(&raw)?;
            if header.dst == wire::CTRL_ADDR || header.shm_cnt != 0 || wire::HEADER_LEN + usize::from(header.len) != len {
                return None;
            }
            Some(self.deliver_in_place(&header, #[inline(always)] |buf| m.read(wire::HEADER_LEN, buf), ipc, now))
        });
        match direct {
            None => return lk::ERR_NOT_VALID,
            Some(Some(status)) => return status,
            Some(None) => {}
        }
        // Anything else is copied whole into the device's own buffer (reused; taken out of
        // `self` while the handlers below borrow the device).
        // Only bytes beyond the previous length are zeroed: a successful read below overwrites
        // all `len` bytes, and a failed one leaves the copy unused.
        let mut frame = core::mem::take(&mut self.in_frame);
        frame.resize(len, 0);
        let read = shares.with_mapped(id, pages, false, "message buffer (NS to secure)", |m| m.read(0, &mut frame));
        let status = if read == Some(true) { self.handle_frame_copy(&frame, shares, ipc, now) } else { lk::ERR_NOT_VALID };
        self.in_frame = frame;
        status
    }

    /// The checks and dispatch of [`TipcDev::handle_ns_frame`] on the trusted copy of a frame.
    fn handle_frame_copy(&mut self, frame: &[u8], shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> i32 {
        let Some(header) = Header::decode(frame) else { return lk::ERR_INVALID_ARGS };
        if wire::HEADER_LEN + usize::from(header.len) != frame.len() {
            return lk::ERR_INVALID_ARGS;
        }
        let payload = &frame[wire::HEADER_LEN..];
        if header.dst == wire::CTRL_ADDR {
            if header.shm_cnt != 0 {
                return lk::ERR_INVALID_ARGS;
            }
            return self.handle_ctrl_msg(header.src, payload, ipc, now);
        }
        self.handle_chan_msg(&header, payload, shares, ipc, now)
    }

    /// tipc_virtio_dev.c handle_ctrl_msg(): shorter than the control header, or 8 + body_len !=
    /// length, or a type other than CONN_REQ / DISC_REQ, or a wrong body length: ERR_NOT_VALID.
    /// CONN_REQ goes to handle_conn_req() whatever its name holds (a name that is not
    /// NUL-terminated fails there and is answered with CONN_RSP -41).
    fn handle_ctrl_msg(&mut self, src: u32, payload: &[u8], ipc: &mut Ipc, now: u64) -> i32 {
        let word = |at: usize| payload.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let (Some(ctrl_type), Some(body_len)) = (word(0), word(4)) else { return lk::ERR_NOT_VALID };
        let body = &payload[wire::CTRL_HEADER_LEN..];
        if body.len() != body_len as usize {
            return lk::ERR_NOT_VALID;
        }
        match (ctrl_type, body.len()) {
            (wire::ctrl::CONN_REQ, wire::PORT_NAME_FIELD) => {
                if self.inject.swallow_conn_req > 0 {
                    self.inject.swallow_conn_req -= 1;
                    return lk::NO_ERROR;
                }
                // strncpy() into a 256-byte field, then ipc_port_connect_async() with that
                // length: a name without NUL is refused there.
                let name = match body.iter().position(|&b| b == 0) {
                    Some(end) => &body[..end],
                    None => body,
                };
                let terminated = name.len() < body.len();
                self.handle_conn_req(src, name, terminated, ipc, now);
                lk::NO_ERROR
            }
            (wire::ctrl::DISC_REQ, 4) => {
                let target = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                self.handle_disc_req(src, target, ipc, now);
                lk::NO_ERROR
            }
            _ => lk::ERR_NOT_VALID,
        }
    }

    /// [`TipcDev::handle_chan_msg`] for a data message without references whose payload is
    /// still in the normal world's buffer: `fill` copies it into the queue's buffer. The same
    /// checks in the same order (the endpoint by dst must belong to hdr.src, then the TA's
    /// queue).
    #[inline(always)]
    fn deliver_in_place(&mut self, header: &Header, fill: impl FnOnce(&mut [u8]) -> bool, ipc: &mut Ipc, now: u64) -> i32 {
        let slot = header.dst.wrapping_sub(wire::TRUSTY_ADDR_BASE) as usize;
        let Some(ep) = self.endpoints.get(slot).copied().flatten().filter(|e| e.remote == header.src) else {
            return lk::ERR_NOT_FOUND;
        };
        if self.inject.drop_messages > 0 {
            self.inject.drop_messages -= 1;
            self.stats.dropped_on_purpose += 1;
            return lk::ERR_NOT_ENOUGH_BUFFER;
        }
        match ipc.deliver_from(ep.chan, usize::from(header.len), fill, now) {
            Ok(n) => n as i32,
            Err(e) => e,
        }
    }

    /// tipc_virtio_dev.c handle_chan_msg(): more than MAX_MSG_HANDLES references is
    /// ERR_INVALID_ARGS; every reference is retrieved first (a failure fails the message);
    /// only then the endpoint is looked up by dst and must belong to hdr.src (ERR_NOT_FOUND);
    /// ipc_send_msg() gives the status (bytes queued, or ERR_NOT_ENOUGH_BUFFER when the TA's
    /// queue is full, ERR_NOT_READY, ERR_CHANNEL_CLOSED). References of a failed message are
    /// dropped quietly (suppress_handle()); of a delivered one, each is RELEASEd when Trusty lets
    /// it go (tipc_ext_mem_destroy()).
    fn handle_chan_msg(&mut self, header: &Header, payload: &[u8], shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> i32 {
        if usize::from(header.shm_cnt) > MAX_MSG_HANDLES {
            return lk::ERR_INVALID_ARGS;
        }
        let Ok((data_len, descs)) = wire::split_shm(header, payload) else { return lk::ERR_INVALID_ARGS };
        // Retrieve every referenced object before delivery; a bad id fails the whole message
        // (Trusty `handle_chan_msg()`: ext_mem_obj retrieval per descriptor). An object is
        // mapped writable when the normal world shared it so, read-only otherwise.
        let mut refs = Vec::new();
        for d in descs {
            let len = usize::try_from(d.size).unwrap_or(usize::MAX);
            let m = match shares.try_map(d.obj_id, len, true, "memory reference in a message") {
                Some(m) => Some(m),
                None => shares.map(d.obj_id, len, false, "memory reference in a message"),
            };
            match m {
                Some(m) => refs.push(MemRef::new(m)),
                None => {
                    for r in refs {
                        shares.unmap(r.into_mapping());
                    }
                    // ext_mem_get_vmm_obj()'s error; the model reports ERR_INVALID_ARGS.
                    return lk::ERR_INVALID_ARGS;
                }
            }
        }
        let slot = header.dst.wrapping_sub(wire::TRUSTY_ADDR_BASE) as usize;
        let Some(ep) = self.endpoints.get(slot).copied().flatten().filter(|e| e.remote == header.src) else {
            for r in refs {
                shares.unmap(r.into_mapping());
            }
            return lk::ERR_NOT_FOUND;
        };
        if self.inject.drop_messages > 0 {
            self.inject.drop_messages -= 1;
            self.stats.dropped_on_purpose += 1;
            for r in refs {
                shares.unmap(r.into_mapping());
            }
            return lk::ERR_NOT_ENOUGH_BUFFER;
        }
        // The references now belong to the message (and then to the app that takes them); each
        // is released when its last holder lets go (tipc_ext_mem_destroy()). A failed message
        // releases nothing: the normal world reclaims on the negative used length (spec §6.7,
        // §6.9).
        match ipc.deliver_with_handles(ep.chan, &payload[..data_len], refs, now) {
            Ok(n) => n as i32,
            Err((e, refs)) => {
                for r in refs {
                    shares.unmap(r.into_mapping());
                }
                e
            }
        }
    }

    /// tipc_virtio_dev.c handle_conn_req(): ipc_port_connect_async() as the NS client, then an
    /// endpoint slot (alloc_local_addr()); any failure is answered at once with CONN_RSP
    /// {status ERR_NO_RESOURCES, remote 0} (send_conn_rsp()); success waits for the TA's accept.
    fn handle_conn_req(&mut self, ns_addr: u32, name: &[u8], terminated: bool, ipc: &mut Ipc, now: u64) {
        // Every failure looks the same on the wire (spec §6.4 step 6).
        let refuse = Ctrl::ConnRsp { target: ns_addr, status: lk::ERR_NO_RESOURCES, remote: 0, max_msg_size: 0, max_msg_cnt: 0 };
        let Some(slot) = self.endpoints.iter().position(Option::is_none).filter(|_| terminated) else {
            self.outbox.push_back(Outgoing::Ctrl(refuse));
            return;
        };
        match ipc.connect_ns(name, now) {
            Ok(chan) => {
                self.endpoints[slot] = Some(Endpoint { remote: ns_addr, chan });
                self.slot_hints[Self::hint_bucket(chan)] = slot as u16;
            }
            Err(e) => {
                log::debug!("connect to {:?} refused: {e}", core::str::from_utf8(name));
                self.outbox.push_back(Outgoing::Ctrl(refuse));
            }
        }
    }

    fn handle_disc_req(&mut self, ns_addr: u32, target: u32, ipc: &mut Ipc, now: u64) {
        let by_target = target
            .checked_sub(wire::TRUSTY_ADDR_BASE)
            .map(|s| s as usize)
            .filter(|&s| self.endpoints.get(s).copied().flatten().is_some_and(|e| e.remote == ns_addr));
        // target is 0 when the normal world closes while connecting: search by sender (spec §6.8).
        let slot = by_target.or_else(|| self.endpoints.iter().position(|e| e.is_some_and(|e| e.remote == ns_addr)));
        if let Some(ep) = slot.and_then(|s| self.endpoints.get_mut(s)).and_then(Option::take) {
            ipc.ns_close(ep.chan, now);
        }
    }

    /// The endpoint slot of `chan`: the hinted slot when it still holds `chan` (a hint is
    /// only a hint: checked every time), else a search of the table.
    fn slot_of(&self, chan: ChanId) -> Option<usize> {
        let hint = usize::from(self.slot_hints[Self::hint_bucket(chan)]);
        if self.endpoints.get(hint).copied().flatten().is_some_and(|e| e.chan == chan) {
            return Some(hint);
        }
        self.endpoints.iter().position(|e| e.is_some_and(|e| e.chan == chan))
    }

    /// The endpoint of `chan` ([`TipcDev::slot_of`]'s, without a second index into the table
    /// on a hint hit).
    #[inline]
    fn endpoint_of(&self, chan: ChanId) -> Option<Endpoint> {
        let hint = usize::from(self.slot_hints[Self::hint_bucket(chan)]);
        match self.endpoints.get(hint).copied().flatten() {
            Some(e) if e.chan == chan => Some(e),
            _ => self.endpoints.iter().flatten().find(|e| e.chan == chan).copied(),
        }
    }

    fn hint_bucket(chan: ChanId) -> usize {
        chan.0 as usize % SLOT_HINTS
    }

    /// Sends what is pending, oldest first, while the normal world has rx buffers (Trusty's tx
    /// thread blocks on an empty ring, which is the flow control of spec §6.6 step 2).
    fn flush_to_ns(&mut self, shares: &mut ShareTable, ipc: &mut Ipc) -> bool {
        let mut any = false;
        loop {
            // Nothing to send: done, without looking at the ring.
            if self.outbox.is_empty() && ipc.pending_events() == 0 {
                return any;
            }
            if self.to_ns.as_ref().map_or(true, |r| !r.queue.has_avail(&r.mem)) {
                return any;
            }
            if let Some(out) = self.outbox.pop_front() {
                any = true;
                self.send_outgoing(out, shares);
                continue;
            }
            let Some(ev) = ipc.pop_event() else { return any };
            any = true;
            // The usual event first, told apart with one test of the variant.
            if let IpcEvent::Message { chan, data } = ev {
                if let Some(remote) = self.endpoint_of(chan).map(|e| e.remote) {
                    self.send_data(remote, &data, shares);
                }
                ipc.recycle(data);
                continue;
            }
            match ev {
                IpcEvent::Accepted { chan, max_msg_size, max_msg_cnt } => {
                    if let Some(slot) = self.slot_of(chan) {
                        let remote = self.endpoints[slot].map_or(0, |e| e.remote);
                        let rsp = Ctrl::ConnRsp {
                            target: remote,
                            status: 0,
                            remote: wire::TRUSTY_ADDR_BASE + slot as u32,
                            max_msg_size,
                            max_msg_cnt,
                        };
                        self.send_outgoing(Outgoing::Ctrl(rsp), shares);
                    }
                }
                IpcEvent::Closed { chan } => {
                    if let Some(slot) = self.slot_of(chan) {
                        let remote = self.endpoints[slot].take().map_or(0, |e| e.remote);
                        let src = wire::TRUSTY_ADDR_BASE + slot as u32;
                        self.send_frame_ctrl(&Ctrl::DiscReq { target: remote }, src, shares);
                    }
                }
                // Sent above.
                IpcEvent::Message { .. } => {}
            }
        }
    }

    fn send_outgoing(&mut self, out: Outgoing, shares: &mut ShareTable) {
        match out {
            Outgoing::Ctrl(msg) => self.send_frame_ctrl(&msg, wire::CTRL_ADDR, shares),
            Outgoing::Bad(kind) => self.send_malformed(kind, shares),
        }
    }

    fn send_frame_ctrl(&mut self, msg: &Ctrl, src: u32, shares: &mut ShareTable) {
        let mut frame = [0u8; 512];
        if let Some(n) = wire::encode_ctrl(msg, src, &mut frame) {
            self.put_frame(&frame[..n], None, shares);
        }
    }

    /// Data frame: src 0 and shm_cnt left as the normal world had it (spec §6.6 step 3). An
    /// oversize message is truncated to the buffer but keeps its full hdr.len (step 4).
    #[inline]
    fn send_data(&mut self, ns_addr: u32, data: &[u8], shares: &mut ShareTable) {
        let header = Header { src: 0, dst: ns_addr, shm_cnt: 0, len: data.len() as u16, flags: 0 };
        self.put_frame_parts_inline(&header.encode(), data, None, shares);
    }

    fn send_malformed(&mut self, kind: Malformed, shares: &mut ShareTable) {
        let mut frame = [0u8; 512];
        let ctrl = |msg: &Ctrl, out: &mut [u8]| wire::encode_ctrl(msg, wire::CTRL_ADDR, out).unwrap_or(0);
        match kind {
            Malformed::ShortUsedLen => {
                let n = ctrl(&Ctrl::GoOnline, &mut frame);
                self.put_frame(&frame[..n], Some(8), shares);
            }
            Malformed::LengthMismatch => {
                let n = ctrl(&Ctrl::GoOnline, &mut frame);
                frame[12] = 3; // hdr.len 3 instead of 8
                self.put_frame(&frame[..n], None, shares);
            }
            Malformed::UnknownDst => {
                let header = Header { src: 0, dst: 0x7777_7777, shm_cnt: 0, len: 4, flags: 0 };
                frame[..16].copy_from_slice(&header.encode());
                self.put_frame(&frame[..20], None, shares);
            }
            Malformed::BadCtrlBody => {
                let rsp = Ctrl::ConnRsp { target: 1024, status: 0, remote: 1000, max_msg_size: 0, max_msg_cnt: 0 };
                let n = ctrl(&rsp, &mut frame);
                frame[12] = 24; // hdr.len
                frame[20] = 16; // body_len
                self.put_frame(&frame[..n - 4], None, shares);
            }
            Malformed::UnknownCtrlType => {
                let n = ctrl(&Ctrl::GoOnline, &mut frame);
                frame[16] = 77;
                self.put_frame(&frame[..n], None, shares);
            }
            Malformed::NegativeUsedLen => {
                let n = ctrl(&Ctrl::GoOnline, &mut frame);
                self.put_frame(&frame[..n], Some(lk::ERR_NOT_VALID as u32), shares);
            }
            Malformed::Garbage(seed) => {
                let mut x = seed | 1;
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let len = (next() % 300) as usize;
                for b in frame.iter_mut().take(len) {
                    *b = next() as u8;
                }
                // Sometimes aim at the control address or a plausible channel, so that deeper
                // parsers see the garbage too.
                match next() % 3 {
                    0 => frame[4..8].copy_from_slice(&wire::CTRL_ADDR.to_le_bytes()),
                    1 => frame[4..8].copy_from_slice(&wire::MIN_LOCAL_ADDR.to_le_bytes()),
                    _ => {}
                }
                let used = match next() % 4 {
                    0 => next() as u32,
                    1 => len as u32,
                    _ => (wire::HEADER_LEN + (next() % 300) as usize) as u32,
                };
                self.put_frame(&frame[..len], Some(used), shares);
            }
            Malformed::BadUsedId => {
                if let Some(r) = &mut self.to_ns {
                    let bogus = r.queue.layout().num().saturating_add(5);
                    r.queue.push_used(&r.mem, bogus, 24);
                }
            }
        }
    }

    /// Takes one rx buffer from vring 0, writes `frame` into it and returns it with
    /// `used_len` (default: the bytes written). Follows tipc_virtio_dev.c tipc_send_data():
    /// - a chain with more than one writable (or readable) descriptor, or a broken link, is a
    ///   fetch error: the buffer is not returned and the frame is lost;
    /// - no writable descriptor, or one shorter than the 16-byte header, comes back with used.len
    ///   ERR_NOT_ENOUGH_BUFFER (negative) and the frame is lost;
    /// - a mapping failure comes back with that error as used.len;
    /// - otherwise the header fields src, dst, reserved, len and flags are written (shm_cnt,
    ///   bytes 10..12, is left as the normal world had it), the payload is cut to the buffer
    ///   (hdr.len keeps the full length), and used.len = 16 + bytes copied.
    fn put_frame(&mut self, frame: &[u8], used_len: Option<u32>, shares: &mut ShareTable) {
        self.put_frame_parts(frame, &[], used_len, shares);
    }

    /// [`TipcDev::put_frame`] of the frame `head` followed by `body` (a data frame's header
    /// and payload, written to the rx buffer in place: no frame assembled first).
    fn put_frame_parts(&mut self, head: &[u8], body: &[u8], used_len: Option<u32>, shares: &mut ShareTable) {
        self.put_frame_parts_inline(head, body, used_len, shares);
    }

    /// [`TipcDev::put_frame_parts`], inlined where a data frame is sent.
    #[inline(always)]
    fn put_frame_parts_inline(&mut self, head: &[u8], body: &[u8], used_len: Option<u32>, shares: &mut ShareTable) {
        let Some(ring) = self.to_ns.as_mut() else { return };
        let (head_id, first) = match ring.queue.pop_avail_first(&ring.mem) {
            Ok(Some(taken)) => taken,
            Ok(None) => return,
            Err(e) => {
                // Index jumps and heads out of range make Trusty panic (vqueue.c), which `run`
                // reports.
                self.stats.lost_to_bad_buffers += 1;
                self.violation.get_or_insert(e);
                return;
            }
        };
        // The usual rx buffer is one writable descriptor: no chain to read, nothing to count.
        let first_writable = if first.flags & (DESC_F_NEXT | DESC_F_WRITE) == DESC_F_WRITE {
            Some(first)
        } else {
            if ring.queue.read_chain(&ring.mem, head_id, first, &mut self.out_descs).is_err() {
                // A broken chain is given up without being returned.
                self.stats.lost_to_bad_buffers += 1;
                return;
            }
            let descs = self.out_descs.as_slice();
            let writable = descs.iter().filter(|d| d.flags & DESC_F_WRITE != 0).count();
            let readable = descs.len() - writable;
            if writable > 1 || readable > 1 {
                // _vqueue_get_avail_buf_locked() -> ERR_TOO_BIG: tipc_send_data() returns
                // early.
                self.stats.lost_to_bad_buffers += 1;
                return;
            }
            descs.iter().find(|d| d.flags & DESC_F_WRITE != 0).copied()
        };
        let usable = first_writable.filter(|d| d.len as usize >= wire::HEADER_LEN);
        let Some(d) = usable else {
            self.stats.lost_to_bad_buffers += 1;
            ring.queue.push_used(&ring.mem, head_id, lk::ERR_NOT_ENOUGH_BUFFER as u32);
            return;
        };
        let cap = d.len as usize;
        let n = (head.len() + body.len()).min(cap);
        // Bytes [from, to) of the frame `head` + `body`.
        let write_range = |m: &Span<'_>, from: usize, to: usize| {
            let head_end = to.min(head.len());
            let head_ok = from >= head_end || m.write(from, &head[from..head_end]);
            let body_ok = to <= head.len() || {
                let b = from.max(head.len()) - head.len();
                m.write(head.len() + b, &body[b..to - head.len()])
            };
            head_ok && body_ok
        };
        // Everything but shm_cnt (bytes 10..12 of the header); a frame too short for a header
        // (only the broken frames of fault injection) is written as it is.
        let written = shares.with_mapped(d.addr, whole_pages(cap), true, "rx buffer (secure to NS)", #[inline(always)] |m| {
            if n >= wire::HEADER_LEN && head.len() == wire::HEADER_LEN {
                // A data frame: the header's fields (fixed sizes, copied inline), then the payload.
                m.write_parts([(0, &head[..10]), (12, &head[12..16]), (16, &body[..n - wire::HEADER_LEN])])
            } else if n >= wire::HEADER_LEN {
                write_range(m, 0, 10) && write_range(m, 12, n)
            } else {
                write_range(m, 0, n)
            }
        });
        let Some(ok) = written else {
            // A mapping failure is returned as a negative length (spec §6.6 step 5).
            ring.queue.push_used(&ring.mem, head_id, lk::ERR_NOT_VALID as u32);
            return;
        };
        if !ok {
            shares.fault("ffa-handle", d.addr, format!("write of {n} bytes to an rx buffer failed"));
        }
        self.stats.frames_to_ns += 1;
        self.rx_reach[rx_reach_slot(d.addr)] = (d.addr, n);
        self.rx_last_written = d.addr;
        ring.queue.push_used(&ring.mem, head_id, used_len.unwrap_or(n as u32));
    }
}

#[cfg(test)]
mod tests {
    //! The device side against a hand-written normal world: raw ring memory, bare addresses.
    extern crate std;
    use std::sync::{Arc, Mutex};
    use std::vec;

    use super::*;
    use crate::mem::{IdScheme, PhysMem};
    use trusty_virtio::rsc::VringInfo;

    const BASE: u64 = 0x1000_0000;
    const RING0: u64 = BASE;
    const RING1: u64 = BASE + 0x2000;
    const BUFS: u64 = BASE + 0x4000;
    const NUM: u16 = 4;
    // Legacy layout of a 4-entry ring aligned to 4096 (spec §5.3).
    const AVAIL_IDX: u64 = 16 * NUM as u64 + 2;
    const AVAIL_RING: u64 = 16 * NUM as u64 + 4;
    const USED_IDX: u64 = 4096 + 2;
    const USED_RING: u64 = 4096 + 4;

    struct Ram(Mutex<Vec<u8>>);

    impl Ram {
        fn at(&self, pa: u64, len: usize) -> Option<usize> {
            let off = pa.checked_sub(BASE)? as usize;
            (off + len <= self.0.lock().unwrap().len()).then_some(off)
        }
    }

    impl PhysMem for Ram {
        fn contains(&self, pa: u64, len: usize) -> bool {
            self.at(pa, len).is_some()
        }
        fn guest_to_phys(&self, ipa: u64) -> Option<u64> {
            Some(ipa)
        }
        fn read(&self, pa: u64, out: &mut [u8]) -> bool {
            let Some(o) = self.at(pa, out.len()) else { return false };
            out.copy_from_slice(&self.0.lock().unwrap()[o..o + out.len()]);
            true
        }
        fn write(&self, pa: u64, data: &[u8]) -> bool {
            let Some(o) = self.at(pa, data.len()) else { return false };
            self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            true
        }
        fn read_u16(&self, pa: u64) -> Option<u16> {
            let mut b = [0; 2];
            self.read(pa, &mut b).then(|| u16::from_le_bytes(b))
        }
        fn write_u16(&self, pa: u64, v: u16) -> bool {
            self.write(pa, &v.to_le_bytes())
        }
        fn read_u32(&self, pa: u64) -> Option<u32> {
            let mut b = [0; 4];
            self.read(pa, &mut b).then(|| u32::from_le_bytes(b))
        }
        fn write_u32(&self, pa: u64, v: u32) -> bool {
            self.write(pa, &v.to_le_bytes())
        }
        fn read_u64(&self, pa: u64) -> Option<u64> {
            let mut b = [0; 8];
            self.read(pa, &mut b).then(|| u64::from_le_bytes(b))
        }
        fn write_u64(&self, pa: u64, v: u64) -> bool {
            self.write(pa, &v.to_le_bytes())
        }
    }

    /// A probed device on two 4-entry rings, with the normal world's side done by hand.
    struct Bench {
        ram: Arc<Ram>,
        dev: TipcDev,
        shares: ShareTable,
        ipc: Ipc,
        posted: [u16; 2],
    }

    impl Bench {
        fn new() -> Bench {
            let ram = Arc::new(Ram(Mutex::new(vec![0; 0x20000])));
            let mut shares = ShareTable::new(ram.clone(), None);
            shares.set_scheme(IdScheme::Bare);
            let ring = |da: u64, notifyid| VringInfo { align: 4096, num: u32::from(NUM), notifyid, da: da as u32, pa: 0 };
            let vdev = VdevInfo {
                offset: 0,
                id: VIRTIO_ID_TIPC,
                notifyid: 0,
                dfeatures: 0,
                gfeatures: 0,
                status: STATUS_AT_START,
                vrings: vec![ring(RING0, 1), ring(RING1, 2)],
                config: Vec::new(),
            };
            let mut dev = TipcDev::new(0);
            dev.probe(&vdev, &mut shares).expect("probe");
            Bench { ram, dev, shares, ipc: Ipc::with_unittest_services(), posted: [0, 0] }
        }

        /// Posts one descriptor (index = how many were posted) on vring `ring`.
        fn post(&mut self, ring: usize, addr: u64, len: u32, flags: u16) -> u16 {
            let base = if ring == 0 { RING0 } else { RING1 };
            let i = self.posted[ring];
            let d = base + 16 * u64::from(i);
            self.ram.write_u64(d, addr);
            self.ram.write_u32(d + 8, len);
            self.ram.write_u16(d + 12, flags);
            self.ram.write_u16(base + AVAIL_RING + 2 * u64::from(i % NUM), i);
            self.posted[ring] = i + 1;
            self.ram.write_u16(base + AVAIL_IDX, i + 1);
            i
        }

        fn run(&mut self) {
            self.dev.run(&mut self.shares, &mut self.ipc, 0).expect("no ring violation");
        }
        /// Posts a chain of descriptors `parts` (address, length, flags; linked with
        /// DESC_F_NEXT here) at descriptor indices `first..`, with its head as the next avail
        /// entry of vring `ring`. `next_of_last` links the last one on (a broken chain).
        fn post_chain(&mut self, ring: usize, first: u16, parts: &[(u64, u32, u16)], next_of_last: Option<u16>) -> u16 {
            let base = if ring == 0 { RING0 } else { RING1 };
            for (k, &(addr, len, flags)) in parts.iter().enumerate() {
                let i = first + k as u16;
                let last = k + 1 == parts.len();
                let next = if last { next_of_last } else { Some(i + 1) };
                let d = base + 16 * u64::from(i);
                self.ram.write_u64(d, addr);
                self.ram.write_u32(d + 8, len);
                self.ram.write_u16(d + 12, flags | if next.is_some() { DESC_F_NEXT } else { 0 });
                self.ram.write_u16(d + 14, next.unwrap_or(0));
            }
            let slot = self.posted[ring];
            self.ram.write_u16(base + AVAIL_RING + 2 * u64::from(slot % NUM), first);
            self.posted[ring] = slot + 1;
            self.ram.write_u16(base + AVAIL_IDX, slot + 1);
            first
        }


        /// (id, len) of used entry `slot` of vring `ring`, if the device returned that many.
        fn used(&self, ring: usize, slot: u16) -> Option<(u32, i32)> {
            let base = if ring == 0 { RING0 } else { RING1 };
            if self.ram.read_u16(base + USED_IDX)? <= slot {
                return None;
            }
            let e = base + USED_RING + 8 * u64::from(slot % NUM);
            Some((self.ram.read_u32(e)?, self.ram.read_u32(e + 4)? as i32))
        }

        fn bytes(&self, pa: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            assert!(self.ram.read(pa, &mut v));
            v
        }
    }

    #[test]
    fn unusable_rx_buffers_come_back_with_not_enough_buffer() {
        // tipc_send_data(): no writable descriptor, or one shorter than the header, is returned
        // with used.len ERR_NOT_ENOUGH_BUFFER (the frame it was meant for is lost).
        let mut b = Bench::new();
        let short = b.post(0, BUFS, 8, DESC_F_WRITE);
        let readable = b.post(0, BUFS + 0x1000, 4096, 0);
        b.run();
        assert_eq!(b.used(0, 0), Some((u32::from(short), lk::ERR_NOT_ENOUGH_BUFFER)));
        b.dev.queue_ctrl(Ctrl::GoOnline);
        b.run();
        assert_eq!(b.used(0, 1), Some((u32::from(readable), lk::ERR_NOT_ENOUGH_BUFFER)));
        assert_eq!(b.dev.stats().lost_to_bad_buffers, 2);
        assert!(b.shares.faults().is_empty());
    }

    #[test]
    fn chains_from_the_normal_world_leave_the_single_descriptor_path_with_trustys_answers() {
        // The one-readable-descriptor path stands aside for every other chain, which gets
        // _vqueue_get_avail_buf_locked() / handle_rx_msg()'s answers.
        let mut b = Bench::new();
        b.post(0, BUFS, 4096, DESC_F_WRITE);
        b.post(0, BUFS + 0x1000, 4096, DESC_F_WRITE);
        b.run();
        let req = conn_req(b"com.android.ipc-unittest.srv.echo");
        assert!(b.ram.write(BUFS + 0x2000, &req));
        // Readable + writable: taken (the writable one only logged), the CONN_REQ handled.
        let ok = b.post_chain(1, 0, &[(BUFS + 0x2000, 280, 0), (BUFS + 0x3000, 64, DESC_F_WRITE)], None);
        // Two readable: ERR_TOO_BIG.
        let two = b.post_chain(1, 2, &[(BUFS + 0x2000, 280, 0), (BUFS + 0x2000, 280, 0)], None);
        b.run();
        assert_eq!(b.used(1, 0), Some((u32::from(ok), lk::NO_ERROR)));
        assert_eq!(b.used(1, 1), Some((u32::from(two), lk::ERR_TOO_BIG)));
        assert_eq!(b.used(0, 1).map(|u| u.1), Some(44), "the chained CONN_REQ was answered");
        // A chain that loops back on itself: the head returned with ERR_NOT_VALID, not counted
        // as a frame.
        let frames = b.dev.stats().frames_from_ns;
        let looped = b.post_chain(1, 0, &[(BUFS + 0x2000, 280, 0)], Some(0));
        // A link out of range.
        let wild = b.post_chain(1, 1, &[(BUFS + 0x2000, 280, 0)], Some(NUM));
        // Writable only: ERR_INVALID_ARGS.
        let wo = b.post_chain(1, 2, &[(BUFS + 0x3000, 64, DESC_F_WRITE)], None);
        b.run();
        assert_eq!(b.used(1, 2), Some((u32::from(looped), lk::ERR_NOT_VALID)));
        assert_eq!(b.used(1, 3), Some((u32::from(wild), lk::ERR_NOT_VALID)));
        assert_eq!(b.used(1, 4), Some((u32::from(wo), lk::ERR_INVALID_ARGS)));
        assert_eq!(b.dev.stats().frames_from_ns, frames + 1);
        assert!(b.shares.faults().is_empty());
    }

    #[test]
    fn chained_rx_buffers_leave_the_single_descriptor_path_with_trustys_answers() {
        // tipc_send_data(): a readable descriptor next to the writable one is accepted, two
        // writable ones or a broken chain are a fetch error (the buffer is not returned).
        let mut b = Bench::new();
        let mixed = b.post_chain(0, 0, &[(BUFS + 0x1000, 64, 0), (BUFS, 4096, DESC_F_WRITE)], None);
        b.run();
        assert_eq!(b.used(0, 0), Some((u32::from(mixed), 24)), "GO_ONLINE written to the writable descriptor");
        assert_eq!(&b.bytes(BUFS + 16, 4), &1u32.to_le_bytes());
        b.post_chain(0, 2, &[(BUFS, 4096, DESC_F_WRITE), (BUFS + 0x1000, 4096, DESC_F_WRITE)], None);
        b.dev.queue_ctrl(Ctrl::GoOnline);
        b.run();
        assert_eq!(b.used(0, 1), None, "two writable: not returned");
        assert_eq!(b.dev.stats().lost_to_bad_buffers, 1);
        b.post_chain(0, 0, &[(BUFS, 4096, DESC_F_WRITE)], Some(0));
        b.dev.queue_ctrl(Ctrl::GoOnline);
        b.run();
        assert_eq!(b.used(0, 1), None, "a loop: not returned");
        assert_eq!(b.dev.stats().lost_to_bad_buffers, 2);
        assert_eq!(b.dev.stats().frames_to_ns, 1);
    }

    #[test]
    fn an_avail_index_jump_on_vring_0_is_a_panic() {
        // vqueue.c _vqueue_get_avail_buf_locked(): "new avail idx out of range" -> panic.
        let mut b = Bench::new();
        b.ram.write_u16(RING0 + AVAIL_IDX, NUM + 1);
        assert!(matches!(
            b.dev.run(&mut b.shares, &mut b.ipc, 0),
            Err(DeviceRingError::AvailIndexJump { last_seen: 0, now: 5 })
        ));
    }

    #[test]
    fn frames_to_the_normal_world_leave_shm_cnt_as_it_was() {
        // tipc_send_data() writes src, dst, reserved, len and flags; never shm_cnt.
        let mut b = Bench::new();
        assert!(b.ram.write(BUFS, &[0xAA; 32]));
        let d = b.post(0, BUFS, 4096, DESC_F_WRITE);
        b.run();
        assert_eq!(b.used(0, 0), Some((u32::from(d), 24)), "GO_ONLINE: header and 8-byte control header");
        let frame = b.bytes(BUFS, 24);
        assert_eq!(&frame[0..4], &53u32.to_le_bytes(), "src");
        assert_eq!(&frame[4..8], &53u32.to_le_bytes(), "dst");
        assert_eq!(&frame[8..10], &[0, 0], "reserved");
        assert_eq!(&frame[10..12], &[0xAA, 0xAA], "shm_cnt untouched");
        assert_eq!(&frame[12..14], &8u16.to_le_bytes(), "len");
        assert_eq!(&frame[16..20], &1u32.to_le_bytes(), "GO_ONLINE");
    }

    fn conn_req(name: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&1024u32.to_le_bytes());
        f.extend_from_slice(&53u32.to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&264u16.to_le_bytes());
        f.extend_from_slice(&[0; 2]);
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&256u32.to_le_bytes());
        let mut field = [0u8; 256];
        field[..name.len()].copy_from_slice(name);
        f.extend_from_slice(&field);
        f
    }

    #[test]
    fn conn_req_without_nul_is_answered_with_no_resources() {
        // handle_conn_req(): the name goes to ipc_port_connect_async(), which refuses one that
        // is not NUL-terminated; the refusal is CONN_RSP {status ERR_NO_RESOURCES}.
        let mut b = Bench::new();
        b.post(0, BUFS, 4096, DESC_F_WRITE);
        b.post(0, BUFS + 0x1000, 4096, DESC_F_WRITE);
        b.run();
        assert!(b.ram.write(BUFS + 0x2000, &conn_req(&[b'a'; 256])));
        let d = b.post(1, BUFS + 0x2000, 280, 0);
        b.run();
        assert_eq!(b.used(1, 0), Some((u32::from(d), lk::NO_ERROR)));
        assert_eq!(b.used(0, 1).map(|u| u.1), Some(44), "CONN_RSP sent");
        let rsp = b.bytes(BUFS + 0x1000, 44);
        assert_eq!(&rsp[16..20], &4u32.to_le_bytes(), "CONN_RSP");
        assert_eq!(&rsp[24..28], &1024u32.to_le_bytes(), "target");
        assert_eq!(&rsp[28..32], &lk::ERR_NO_RESOURCES.to_le_bytes(), "status -41");
    }

    #[test]
    fn frames_from_the_normal_world_get_trustys_error_codes() {
        let mut b = Bench::new();
        b.post(0, BUFS, 4096, DESC_F_WRITE);
        b.run();
        // handle_rx_msg(): 16 + hdr.len != descriptor length -> ERR_INVALID_ARGS.
        let mut f = conn_req(b"com.android.ipc-unittest.srv.echo");
        f[12] = 0x07;
        assert!(b.ram.write(BUFS + 0x2000, &f));
        b.post(1, BUFS + 0x2000, 280, 0);
        // handle_ctrl_msg(): a control type it does not take -> ERR_NOT_VALID.
        let mut g = conn_req(b"x");
        g[16] = 2;
        assert!(b.ram.write(BUFS + 0x3000, &g));
        b.post(1, BUFS + 0x3000, 280, 0);
        // No readable descriptor -> ERR_INVALID_ARGS.
        b.post(1, BUFS + 0x3000, 280, DESC_F_WRITE);
        b.run();
        assert_eq!(b.used(1, 0).map(|u| u.1), Some(lk::ERR_INVALID_ARGS));
        assert_eq!(b.used(1, 1).map(|u| u.1), Some(lk::ERR_NOT_VALID));
        assert_eq!(b.used(1, 2).map(|u| u.1), Some(lk::ERR_INVALID_ARGS));
    }
}
