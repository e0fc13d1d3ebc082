//! The secure side's TIPC virtio device (spec §5.5 step 6, §5.7, §6): the two rings, the
//! endpoint table (addresses 1000..1255), CONN_REQ / DISC_REQ handling, routing of data to the
//! IPC core and of the core's events back to the normal world.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::vec::Vec;

use tipc::wire::{self, Ctrl, FrameError, Header};
use trusty_platform::mem::PAGE_SIZE;
use trusty_virtio::rsc::{VdevInfo, VIRTIO_ID_TIPC};
use trusty_virtio::vring::{DeviceQueue, DeviceRingError, Layout, DESC_F_WRITE};

use crate::ipc::{lk, ChanId, Ipc, IpcEvent, MemRef};
use crate::mem::{Mapping, ShareTable};

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
    pub frames_from_ns: u64,
    pub frames_to_ns: u64,
    pub refused_from_ns: u64,
    pub dropped_on_purpose: u64,
    pub releases_sent: u64,
    /// Messages lost because the normal world posted an unusable rx buffer.
    pub lost_to_bad_buffers: u64,
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
    pub inject: TipcInjection,
    stats: TipcDevStats,
    /// The device's virtio notifyids of its rings (1 and 2 for the default device).
    notifyids: [u32; 2],
}

impl TipcDev {
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
        }
    }

    pub fn devid(&self) -> u32 {
        self.devid
    }

    pub fn active(&self) -> bool {
        self.from_ns.is_some()
    }

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
    pub fn queue_malformed(&mut self, kind: Malformed) {
        self.outbox.push_back(Outgoing::Bad(kind));
    }

    /// Runs the device until nothing moves: normal-world messages in, the IPC core's work, and
    /// everything pending out (as far as rx buffers allow). `Err` carries a ring violation that
    /// makes Trusty panic (spec §5.7).
    pub fn run(&mut self, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> Result<bool, DeviceRingError> {
        let mut any = false;
        // Bounded: every round either makes progress or stops; the bound guards the model itself.
        for _ in 0..100_000 {
            let mut progress = self.drain_from_ns(shares, ipc, now)?;
            progress |= ipc.run(now);
            progress |= self.collect_released(shares, ipc);
            progress |= self.flush_to_ns(shares, ipc);
            if !progress {
                break;
            }
            any = true;
        }
        self.update_notify_flags(ipc);
        Ok(any)
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

    fn update_notify_flags(&self, ipc: &Ipc) {
        // Trusty's rx thread sleeps on an empty ring with notifications on (spec §4).
        if let Some(r) = &self.from_ns {
            r.queue.set_no_notify(&r.mem, false);
        }
        // Its tx thread only wants a kick when it is blocked waiting for an rx buffer.
        if let Some(r) = &self.to_ns {
            let waiting = !self.outbox.is_empty() || ipc.pending_events() > 0;
            r.queue.set_no_notify(&r.mem, !waiting);
        }
    }

    fn drain_from_ns(&mut self, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> Result<bool, DeviceRingError> {
        let mut any = false;
        if self.inject.stall_from_ns {
            return Ok(false);
        }
        loop {
            let Some(ring) = self.from_ns.as_mut() else { return Ok(any) };
            let chain = match ring.queue.pop_avail(&ring.mem) {
                Ok(None) => return Ok(any),
                Ok(Some(c)) => c,
                Err(DeviceRingError::BadChain { head }) => {
                    ring.queue.push_used(&ring.mem, head, lk::ERR_NOT_VALID as u32);
                    any = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            any = true;
            self.stats.frames_from_ns += 1;
            let status = match chain.descs.as_slice() {
                [d] if d.flags & DESC_F_WRITE == 0 => self.handle_ns_frame(d.addr, d.len, shares, ipc, now),
                // One readable descriptor per message (spec §5.7).
                [_, _, ..] => lk::ERR_TOO_BIG,
                _ => lk::ERR_NOT_VALID,
            };
            if status < 0 {
                self.stats.refused_from_ns += 1;
            }
            if let Some(ring) = self.from_ns.as_mut() {
                ring.queue.push_used(&ring.mem, chain.head, status as u32);
            }
        }
    }

    /// One frame from the normal world (spec §6.5 steps 6-9); returns the used-length status.
    fn handle_ns_frame(&mut self, id: u64, len: u32, shares: &mut ShareTable, ipc: &mut Ipc, now: u64) -> i32 {
        let len = len as usize;
        if !(wire::HEADER_LEN..=64 * 1024).contains(&len) {
            return lk::ERR_NOT_VALID;
        }
        // Trusty maps whole pages of the buffer, read-only, for this one message.
        let Some(m) = shares.map(id, len.next_multiple_of(PAGE_SIZE), false, "message buffer (NS to secure)") else {
            return lk::ERR_NOT_VALID;
        };
        let mut frame = alloc::vec![0u8; len];
        let ok = m.read(0, &mut frame);
        shares.unmap(m);
        if !ok {
            return lk::ERR_NOT_VALID;
        }
        let Some(header) = Header::decode(&frame) else { return lk::ERR_NOT_VALID };
        if wire::HEADER_LEN + usize::from(header.len) != len {
            return lk::ERR_NOT_VALID;
        }
        let payload = &frame[wire::HEADER_LEN..];
        if header.dst == wire::CTRL_ADDR {
            return match wire::parse_ctrl(payload, header.shm_cnt, true) {
                Ok(Ctrl::ConnReq { .. }) if self.inject.swallow_conn_req > 0 => {
                    self.inject.swallow_conn_req -= 1;
                    lk::NO_ERROR
                }
                Ok(Ctrl::ConnReq { name }) => {
                    self.handle_conn_req(header.src, name.as_bytes(), ipc, now);
                    lk::NO_ERROR
                }
                Ok(Ctrl::DiscReq { target }) => {
                    self.handle_disc_req(header.src, target, ipc, now);
                    lk::NO_ERROR
                }
                Err(FrameError::ControlWithShm) => lk::ERR_INVALID_ARGS,
                _ => lk::ERR_NOT_VALID,
            };
        }
        // Data: the endpoint must exist and belong to this sender (spec §6.5 step 7).
        let slot = header.dst.wrapping_sub(wire::TRUSTY_ADDR_BASE) as usize;
        let Some(ep) = self.endpoints.get(slot).copied().flatten().filter(|e| e.remote == header.src) else {
            return lk::ERR_NOT_FOUND;
        };
        if usize::from(header.shm_cnt) > MAX_MSG_HANDLES {
            return lk::ERR_INVALID_ARGS;
        }
        let Ok((data_len, descs)) = wire::split_shm(&header, payload) else { return lk::ERR_INVALID_ARGS };
        let descs: Vec<_> = descs.collect();
        // Retrieve every referenced object before delivery; a bad id fails the whole message
        // (Trusty `handle_chan_msg()`: ext_mem_obj retrieval per descriptor). An object is
        // mapped writable when the normal world shared it so, read-only otherwise.
        let mut refs = Vec::new();
        for d in &descs {
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
                    return lk::ERR_INVALID_ARGS;
                }
            }
        }
        if self.inject.drop_messages > 0 {
            self.inject.drop_messages -= 1;
            self.stats.dropped_on_purpose += 1;
            for r in refs {
                shares.unmap(r.into_mapping());
            }
            return lk::ERR_NOT_ENOUGH_BUFFER;
        }
        // The references now belong to the message (and then to the app that takes them); each
        // is released when its last holder lets go. A failed message releases nothing: the
        // normal world reclaims on the negative used length (spec §6.7, §6.9).
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

    fn handle_conn_req(&mut self, ns_addr: u32, name: &[u8], ipc: &mut Ipc, now: u64) {
        // Every failure looks the same on the wire (spec §6.4 step 6).
        let refuse = Ctrl::ConnRsp { target: ns_addr, status: lk::ERR_NO_RESOURCES, remote: 0, max_msg_size: 0, max_msg_cnt: 0 };
        let Some(slot) = self.endpoints.iter().position(Option::is_none) else {
            self.outbox.push_back(Outgoing::Ctrl(refuse));
            return;
        };
        match ipc.connect_ns(name, now) {
            Ok(chan) => self.endpoints[slot] = Some(Endpoint { remote: ns_addr, chan }),
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

    fn slot_of(&self, chan: ChanId) -> Option<usize> {
        self.endpoints.iter().position(|e| e.is_some_and(|e| e.chan == chan))
    }

    /// Sends what is pending, oldest first, while the normal world has rx buffers (Trusty's tx
    /// thread blocks on an empty ring, which is the flow control of spec §6.6 step 2).
    fn flush_to_ns(&mut self, shares: &mut ShareTable, ipc: &mut Ipc) -> bool {
        let mut any = false;
        loop {
            if self.to_ns.as_ref().is_none_or(|r| !r.queue.has_avail(&r.mem)) {
                return any;
            }
            if let Some(out) = self.outbox.pop_front() {
                any = true;
                self.send_outgoing(out, shares);
                continue;
            }
            let Some(ev) = ipc.pop_event() else { return any };
            any = true;
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
                IpcEvent::Message { chan, data } => {
                    if let Some(remote) = self.slot_of(chan).and_then(|s| self.endpoints[s]).map(|e| e.remote) {
                        self.send_data(remote, &data, shares);
                    }
                }
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
    fn send_data(&mut self, ns_addr: u32, data: &[u8], shares: &mut ShareTable) {
        let header = Header { src: 0, dst: ns_addr, shm_cnt: 0, len: data.len() as u16, flags: 0 };
        let mut frame = Vec::with_capacity(wire::HEADER_LEN + data.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(data);
        self.put_frame(&frame, None, shares);
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
    /// `used_len` (default: the bytes written). A buffer that is not one writable descriptor of
    /// at least 16 bytes is given up without being returned, as Trusty does (spec §5.7).
    fn put_frame(&mut self, frame: &[u8], used_len: Option<u32>, shares: &mut ShareTable) {
        let Some(ring) = self.to_ns.as_mut() else { return };
        let chain = match ring.queue.pop_avail(&ring.mem) {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => return,
        };
        let [d] = chain.descs.as_slice() else {
            self.stats.lost_to_bad_buffers += 1;
            return;
        };
        if d.flags & DESC_F_WRITE == 0 || (d.len as usize) < wire::HEADER_LEN {
            self.stats.lost_to_bad_buffers += 1;
            return;
        }
        let cap = d.len as usize;
        let Some(m) = shares.map(d.addr, cap.next_multiple_of(PAGE_SIZE), true, "rx buffer (secure to NS)") else {
            // A mapping failure is returned as a negative length (spec §6.6 step 5).
            ring.queue.push_used(&ring.mem, chain.head, lk::ERR_NOT_VALID as u32);
            return;
        };
        let n = frame.len().min(cap);
        if !m.write(0, &frame[..n]) {
            shares.fault("ffa-handle", d.addr, format!("write of {n} bytes to an rx buffer failed"));
        }
        shares.unmap(m);
        self.stats.frames_to_ns += 1;
        ring.queue.push_used(&ring.mem, chain.head, used_len.unwrap_or(n as u32));
    }
}
