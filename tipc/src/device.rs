//! The normal world's TIPC device (spec §5.5 step 5d, §6): buffer pools on the two vrings, the
//! channel table, dispatch of received frames, and waiting by donating time to Trusty.
//!
//! Trusty never interrupts the normal world for ring activity, so every entry into the secure
//! side is followed by a scan of both rings ([`TipcDevice::scan`]), and every wait is a loop of
//! NOP calls and scans against a deadline (spec §4, §11 subtlety 1).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;

use trusty_platform::clock::{Clock, Deadline};
use trusty_platform::mem::{Access, SharedBuf, SharedMemory, PAGE_SIZE};
use trusty_virtio::bus::{STATUS_AT_START, STATUS_DRIVER};
use trusty_virtio::rsc::VIRTIO_ID_TIPC;
use trusty_virtio::vring::{DriverQueue, Layout, RawRing, RingError};
use trusty_virtio::{Bus, BusError, VdevHandle};

use crate::wire::{self, heapless_name::Name, Ctrl, FrameError, Header, ShmDesc};
use crate::Error;

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
    Offline,
    Online,
    Dead,
}

/// Channel state (spec §6.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    Disconnected,
    Connecting,
    Connected,
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
    pub readable: bool,
    pub writable: bool,
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
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Received messages copied out because no spare rx buffer was free.
    pub rx_copies: u64,
    /// Kicks issued.
    pub kicks: u64,
}

enum RxMsg {
    /// A filled rx buffer moved off the ring (its payload starts after the header).
    Buffer { buf: SharedBuf, len: usize },
    Copied(Vec<u8>),
}

struct Channel {
    generation: u32,
    local: u32,
    remote: u32,
    state: ChannelState,
    name: Option<Name>,
    queue: VecDeque<RxMsg>,
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
    /// Rx buffers on vring 0, by descriptor index (the trusted record of what we posted).
    rx_posted: Vec<Option<SharedBuf>>,
    rx_spare: Vec<SharedBuf>,
    /// Tx buffers on vring 1, by descriptor index, with the shm ids the message carried.
    tx_posted: Vec<Option<(SharedBuf, Vec<u64>)>>,
    tx_free: Vec<SharedBuf>,
    tx_allocated: usize,
    tx_limit: usize,
    channels: Vec<Option<Channel>>,
    next_generation: u32,
    by_addr: BTreeMap<u32, u32>,
    /// Memory ids sent in messages that Trusty has not released yet.
    shm_outstanding: BTreeMap<u64, u32>,
    /// Memory ids Trusty released (or whose message was dropped): the owner may reclaim them.
    shm_released: VecDeque<u64>,
    /// When the secure side last had the CPU (ns).
    last_secure_call: u64,
    stats: DeviceStats,
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
        match Self::setup(&mut bus, vdev, cfg.max_buffer_pages) {
            Ok(setup) => {
                let mut dev = TipcDevice::from_setup(bus, vdev, cfg, clock, setup);
                match dev.start() {
                    Ok(()) => Ok(dev),
                    Err(e) => {
                        dev.into_bus();
                        Err(e)
                    }
                }
            }
            Err((e, rings)) => {
                for r in rings {
                    let _ = bus.mem().release(r.mem);
                }
                let _ = bus.stop();
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn setup(
        bus: &mut Bus,
        vdev: VdevHandle,
        max_buffer_pages: Option<usize>,
    ) -> Result<(Ring, Ring, usize, String), (Error, Vec<Ring>)> {
        // Trusty's bus is not active yet, so it answers ERR_BAD_STATE; that is expected
        // (spec §5.5 step 5a).
        let _ = bus.reset_vdev(vdev);
        let fail = |e: Error| (e, Vec::new());
        bus.set_status(vdev, 1).map_err(|e| fail(e.into()))?;
        bus.set_status(vdev, STATUS_DRIVER).map_err(|e| fail(e.into()))?;
        // TIPC offers no features and we accept none (spec §5.4).
        bus.set_features(vdev, 0).map_err(|e| fail(e.into()))?;
        let info = bus.vdev(vdev).cloned().ok_or_else(|| fail(Error::NoDevice))?;
        if info.vrings.len() != 2 || info.config.len() < 40 {
            return Err(fail(Error::Protocol(FrameError::BadLength { used: info.config.len() as u32 })));
        }
        let max_size = u32::from_le_bytes([info.config[0], info.config[1], info.config[2], info.config[3]]) as usize;
        // A message buffer is whole pages (spec §6.11); refuse sizes that cannot hold a header or
        // that would make every buffer huge.
        if !(wire::HEADER_LEN + 1..=64 * 1024).contains(&max_size) {
            return Err(fail(Error::Protocol(FrameError::BadLength { used: max_size as u32 })));
        }
        let buf_size = max_size.next_multiple_of(PAGE_SIZE);
        if max_buffer_pages.is_some_and(|max| buf_size > max * PAGE_SIZE) {
            log::error!("message buffers of {buf_size} bytes exceed what the sharing mechanism can make visible");
            return Err(fail(Error::Unsupported("message buffers larger than the sharing mechanism allows")));
        }
        let name_field = &info.config[8..40];
        let name_len = name_field.iter().position(|&b| b == 0).unwrap_or(name_field.len());
        let dev_name = String::from_utf8_lossy(&name_field[..name_len]).into_owned();
        let (r0, r1) = (info.vrings[0], info.vrings[1]);
        let rx = Ring::new(bus.mem(), r0.num, r0.align, r0.notifyid).map_err(fail)?;
        let tx = match Ring::new(bus.mem(), r1.num, r1.align, r1.notifyid) {
            Ok(t) => t,
            Err(e) => return Err((e, alloc::vec![rx])),
        };
        let ids = [rx.mem.id(), tx.mem.id()];
        for (i, id) in ids.into_iter().enumerate() {
            if let Err(e) = bus.set_vring_id(vdev, i, id) {
                return Err((e.into(), alloc::vec![rx, tx]));
            }
        }
        Ok((rx, tx, buf_size, dev_name))
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
            rx_posted: (0..rx_num).map(|_| None).collect(),
            rx_spare: Vec::new(),
            tx_posted: (0..tx_num).map(|_| None).collect(),
            tx_free: Vec::new(),
            tx_allocated: 0,
            tx_limit: cfg.tx_buffers.unwrap_or(tx_num).clamp(1, tx_num),
            rx,
            tx,
            cfg,
            channels: Vec::new(),
            next_generation: 1,
            by_addr: BTreeMap::new(),
            shm_outstanding: BTreeMap::new(),
            shm_released: VecDeque::new(),
            last_secure_call: 0,
            stats: DeviceStats::default(),
        }
    }

    fn start(&mut self) -> Result<(), Error> {
        let rx_num = usize::from(self.rx.queue.layout().num());
        let posted = self.cfg.rx_buffers.unwrap_or(rx_num).clamp(1, rx_num);
        // Rx buffers must be on vring 0 before START: Trusty sends GO_ONLINE inside START
        // (spec §11 subtlety 3).
        for _ in 0..posted {
            let buf = self.bus.mem().alloc_shared(self.buf_size, Access::ReadWrite)?;
            self.post_rx(buf)?;
        }
        for _ in 0..self.cfg.rx_spare_buffers {
            match self.bus.mem().alloc_shared(self.buf_size, Access::ReadWrite) {
                Ok(buf) => self.rx_spare.push(buf),
                // Spares are an optimisation; a tight share budget simply means copying.
                Err(_) => break,
            }
        }
        self.bus.set_status(self.vdev, STATUS_AT_START)?;
        self.bus.start()?;
        self.scan();
        let deadline = Deadline::after_ms(&*self.clock, self.cfg.online_timeout_ms);
        if !self.wait_until(Some(deadline), |d| d.state != DeviceState::Offline)? {
            log::error!("TIPC device {}: no GO_ONLINE within {} ms", self.dev_name, self.cfg.online_timeout_ms);
            return Err(Error::TimedOut);
        }
        Ok(())
    }

    fn post_rx(&mut self, buf: SharedBuf) -> Result<(), Error> {
        match self.rx.queue.add(buf.id().0, self.buf_size as u32, true) {
            Ok(desc) => {
                if let Some(slot) = self.rx_posted.get_mut(usize::from(desc)) {
                    *slot = Some(buf);
                }
                Ok(())
            }
            Err(_) => {
                // Cannot happen while posted + in-queue buffers <= ring size; keep the buffer.
                self.rx_spare.push(buf);
                Ok(())
            }
        }
    }

    pub fn state(&self) -> DeviceState {
        self.state
    }
    pub fn dev_name(&self) -> &str {
        &self.dev_name
    }
    /// Largest payload of one message, shm descriptors included (spec §6.11).
    pub fn max_message_size(&self) -> usize {
        self.buf_size - wire::HEADER_LEN
    }
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
    pub fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    // ----- scanning ------------------------------------------------------------------------

    /// Processes everything Trusty returned on both rings. Called after every return from the
    /// secure side. Returns whether anything was found.
    pub fn scan(&mut self) -> bool {
        let tx = self.scan_tx();
        let rx = self.scan_rx();
        tx || rx
    }

    fn scan_tx(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.tx.queue.pop_used() {
                Ok(None) => break,
                Ok(Some(used)) => {
                    any = true;
                    let Some((buf, shm)) = self.tx_posted.get_mut(usize::from(used.desc)).and_then(Option::take) else {
                        self.stats.ring_errors += 1;
                        continue;
                    };
                    // used.len on this ring is a status (spec §6.7): negative means dropped, and
                    // the references the message carried are ours to release.
                    if (used.len as i32) < 0 {
                        self.stats.dropped_by_peer += 1;
                        log::debug!("Trusty dropped a message: status {}", used.len as i32);
                        for id in shm {
                            self.release_shm(id);
                        }
                    }
                    self.tx_free.push(buf);
                }
                Err(e) => {
                    any = true;
                    self.ring_error("tx", e);
                    if matches!(e, RingError::UsedIndexJump { .. }) {
                        break;
                    }
                }
            }
        }
        any
    }

    fn ring_error(&mut self, ring: &str, e: RingError) {
        self.stats.ring_errors += 1;
        log::warn!("TIPC {ring} ring: peer broke the ring protocol: {e:?}");
    }

    fn scan_rx(&mut self) -> bool {
        let mut processed = 0usize;
        loop {
            let used = match self.rx.queue.pop_used() {
                Ok(None) => break,
                Ok(Some(u)) => u,
                Err(e) => {
                    self.ring_error("rx", e);
                    if matches!(e, RingError::UsedIndexJump { .. }) {
                        break;
                    }
                    continue;
                }
            };
            processed += 1;
            match self.rx_posted.get_mut(usize::from(used.desc)).and_then(Option::take) {
                Some(buf) => self.handle_rx(buf, used.len),
                None => self.stats.ring_errors += 1,
            }
        }
        // Re-posted buffers may be what a blocked Trusty sender waits for.
        if processed > 0 && self.rx.queue.needs_kick() {
            let _ = self.kick_ring(true);
        }
        processed > 0
    }

    /// Validates one received frame (spec §6.6 steps 6-9) and routes it. The buffer is re-posted
    /// unless it moved to a channel queue, in which case a spare takes its place.
    fn handle_rx(&mut self, buf: SharedBuf, used: u32) {
        let header = match self.validate_rx(&buf, used) {
            Ok(h) => h,
            Err(e) => {
                self.stats.malformed_frames += 1;
                log::warn!("dropping malformed frame from Trusty: {e:?}");
                let _ = self.post_rx(buf);
                return;
            }
        };
        let payload_len = usize::from(header.len);
        if header.dst == wire::CTRL_ADDR {
            let mut payload = [0u8; wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
            let parsed = match payload.get_mut(..payload_len) {
                Some(p) => buf.read(wire::HEADER_LEN, p).map_err(|_| FrameError::BadLength { used }).and_then(|()| {
                    // shm_cnt is not written by Trusty on what it sends (spec §11 5): ignore it.
                    wire::parse_ctrl(p, 0, false)
                }),
                None => Err(FrameError::BadControl { ctrl_type: 0, body_len: header.len.into() }),
            };
            match parsed {
                Ok(msg) => self.handle_ctrl(msg),
                Err(e) => {
                    self.stats.malformed_frames += 1;
                    log::warn!("dropping malformed control message: {e:?}");
                }
            }
            let _ = self.post_rx(buf);
            return;
        }
        // Data: route by dst only; Trusty leaves src 0 (spec §11 subtlety 5).
        if !self.channel_by_addr(header.dst).is_some_and(|c| c.state == ChannelState::Connected) {
            self.stats.undeliverable_frames += 1;
            let _ = self.post_rx(buf);
            return;
        }
        self.stats.messages_received += 1;
        let (msg, repost) = match self.rx_spare.pop() {
            Some(spare) => (RxMsg::Buffer { buf, len: payload_len }, spare),
            None => {
                let mut data = alloc::vec![0u8; payload_len];
                let _ = buf.read(wire::HEADER_LEN, &mut data);
                self.stats.rx_copies += 1;
                (RxMsg::Copied(data), buf)
            }
        };
        if let Some(chan) = self.channel_by_addr(header.dst) {
            chan.queue.push_back(msg);
        }
        let _ = self.post_rx(repost);
    }

    fn validate_rx(&self, buf: &SharedBuf, used: u32) -> Result<Header, FrameError> {
        // Also catches Trusty's negative errors, which read as huge lengths (spec §6.6 step 6).
        if (used as usize) < wire::HEADER_LEN || used as usize > self.buf_size {
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
                    // Every channel becomes stale (spec §6.10).
                    for chan in self.channels.iter_mut().flatten() {
                        chan.state = ChannelState::Stale;
                        chan.remote = 0;
                    }
                }
            }
            Ctrl::ConnRsp { target, status, remote, .. } => match self.channel_by_addr(target) {
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
                _ => self.stats.undeliverable_frames += 1,
            },
            Ctrl::DiscReq { target } => match self.channel_by_addr(target) {
                Some(chan) if matches!(chan.state, ChannelState::Connected | ChannelState::Connecting) => {
                    chan.state = ChannelState::Disconnected;
                    chan.remote = 0;
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

    fn release_shm(&mut self, id: u64) {
        match self.shm_outstanding.get_mut(&id) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.shm_outstanding.remove(&id);
                }
                self.shm_released.push_back(id);
            }
            None => log::warn!("RELEASE of unknown memory id {id:#x}"),
        }
    }

    /// Memory ids whose messages Trusty is done with (released, or the message was dropped):
    /// their owner may now reclaim them.
    pub fn take_released(&mut self) -> Option<u64> {
        self.shm_released.pop_front()
    }

    fn kick_ring(&mut self, rx: bool) -> Result<(), Error> {
        let notifyid = if rx { self.rx.notifyid } else { self.tx.notifyid };
        self.stats.kicks += 1;
        let r = self.bus.kick(self.vdev, notifyid);
        self.last_secure_call = self.clock.now_ns();
        self.scan();
        r.map_err(Error::from)
    }

    /// Donates one slice of CPU time to Trusty (a NOP) and scans. Returns whether the scan found
    /// anything.
    pub fn pump(&mut self) -> Result<bool, Error> {
        let r = self.bus.trusty().nop(0, 0, 0);
        self.last_secure_call = self.clock.now_ns();
        let found = self.scan();
        r?;
        Ok(found)
    }

    /// Scans, and first gives Trusty a NOP if it has not run for `idle_pump_ms`.
    fn catch_up(&mut self) -> Result<(), Error> {
        let idle_ns = self.clock.now_ns().saturating_sub(self.last_secure_call);
        if idle_ns >= self.cfg.idle_pump_ms.saturating_mul(trusty_platform::clock::NS_PER_MS) {
            self.pump()?;
        } else {
            self.scan();
        }
        Ok(())
    }

    /// Runs NOP+scan rounds until `done` holds or `deadline` passes (`None`: no deadline).
    /// Returns whether `done` held.
    fn wait_until(&mut self, deadline: Option<Deadline>, done: impl Fn(&TipcDevice) -> bool) -> Result<bool, Error> {
        loop {
            if done(self) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| d.expired(&*self.clock)) {
                return Ok(false);
            }
            if !self.pump()? && !done(self) {
                self.clock.relax();
            }
        }
    }

    /// One round of a blocking wait: fail at once without blocking, or when the deadline has
    /// passed; otherwise donate a NOP and scan, and pause if nothing happened.
    fn wait_step(&mut self, timeout: Timeout, deadline: Option<Deadline>) -> Result<(), Error> {
        if timeout == Timeout::NonBlocking {
            return Err(Error::Again);
        }
        if deadline.is_some_and(|d| d.expired(&*self.clock)) {
            return Err(Error::TimedOut);
        }
        if !self.pump()? {
            self.clock.relax();
        }
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
    /// (spec §6.5 step 1).
    fn get_tx_buffer(&mut self, timeout: Timeout) -> Result<SharedBuf, Error> {
        let deadline = self.deadline(timeout);
        loop {
            self.scan_tx();
            if let Some(buf) = self.tx_free.pop() {
                return Ok(buf);
            }
            if self.tx_allocated < self.tx_limit {
                // Tx buffers are shared read-only: Trusty only reads them (spec §3.3).
                match self.bus.mem().alloc_shared(self.buf_size, Access::ReadOnly) {
                    Ok(buf) => {
                        self.tx_allocated += 1;
                        return Ok(buf);
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
            self.wait_step(timeout, deadline)?;
        }
    }

    /// Puts a filled tx buffer on vring 1 and kicks if Trusty wants it (spec §6.5 step 4).
    fn queue_tx(&mut self, buf: SharedBuf, frame_len: usize, shm: Vec<u64>) -> Result<(), Error> {
        match self.tx.queue.add(buf.id().0, frame_len as u32, false) {
            Ok(desc) => {
                if let Some(slot) = self.tx_posted.get_mut(usize::from(desc)) {
                    *slot = Some((buf, shm));
                }
            }
            Err(_) => {
                // Unreachable while tx buffers <= ring size; never lose the buffer.
                self.tx_free.push(buf);
                return Err(Error::Again);
            }
        }
        self.stats.messages_sent += 1;
        if self.tx.queue.needs_kick() {
            self.kick_ring(false)?;
        }
        Ok(())
    }

    fn send_ctrl(&mut self, msg: &Ctrl, src: u32) -> Result<(), Error> {
        let buf = self.get_tx_buffer(Timeout::Ms(self.cfg.txbuf_timeout_ms))?;
        let mut frame = [0u8; wire::HEADER_LEN + wire::CTRL_HEADER_LEN + wire::PORT_NAME_FIELD];
        let Some(len) = wire::encode_ctrl(msg, src, &mut frame) else {
            self.tx_free.push(buf);
            return Err(Error::InvalidArgument);
        };
        if let Err(e) = buf.write(0, &frame[..len]) {
            self.tx_free.push(buf);
            return Err(e.into());
        }
        self.queue_tx(buf, len, Vec::new())
    }

    // ----- channels ----------------------------------------------------------------------------

    fn channel_by_addr(&mut self, addr: u32) -> Option<&mut Channel> {
        let slot = *self.by_addr.get(&addr)?;
        self.channels.get_mut(slot as usize)?.as_mut()
    }

    fn channel(&mut self, id: ChannelId) -> Result<&mut Channel, Error> {
        self.channels
            .get_mut(id.slot as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == id.generation)
            .ok_or(Error::BadHandle)
    }

    /// Opens a channel with a fresh local address (the lowest free one >= 1024, spec §6.1).
    /// The device must be online (spec §6.4 step 1).
    pub fn open(&mut self) -> Result<ChannelId, Error> {
        if self.state != DeviceState::Online {
            return Err(Error::NoDevice);
        }
        let mut local = wire::MIN_LOCAL_ADDR;
        for &addr in self.by_addr.keys() {
            if addr == local {
                local += 1;
            } else if addr > local {
                break;
            }
        }
        if local > i32::MAX as u32 {
            return Err(Error::InvalidArgument);
        }
        let slot = match self.channels.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.channels.push(None);
                self.channels.len() - 1
            }
        };
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.channels[slot] = Some(Channel {
            generation,
            local,
            remote: 0,
            state: ChannelState::Disconnected,
            name: None,
            queue: VecDeque::new(),
        });
        self.by_addr.insert(local, slot as u32);
        Ok(ChannelId { slot: slot as u32, generation })
    }

    /// Sends CONN_REQ for `port` (spec §6.4 steps 2-3) without waiting for the answer.
    pub fn start_connect(&mut self, id: ChannelId, port: &str) -> Result<(), Error> {
        let name = port.as_bytes();
        if name.len() >= wire::PORT_NAME_FIELD {
            return Err(Error::NameTooLong);
        }
        if name.is_empty() || name.contains(&0) {
            return Err(Error::InvalidArgument);
        }
        let name = Name::new(name).ok_or(Error::NameTooLong)?;
        self.catch_up()?;
        if self.state != DeviceState::Online {
            return Err(Error::NoDevice);
        }
        let chan = self.channel(id)?;
        match chan.state {
            ChannelState::Connecting | ChannelState::Connected if chan.name.as_ref() == Some(&name) => return Ok(()),
            ChannelState::Connecting => return Err(Error::Already),
            ChannelState::Connected => return Err(Error::IsConnected),
            ChannelState::Stale => return Err(Error::Shutdown),
            ChannelState::Disconnected => {}
        }
        let local = chan.local;
        // CONNECTING before the request leaves: the answer can come back inside the kick.
        chan.state = ChannelState::Connecting;
        chan.name = Some(name.clone());
        if let Err(e) = self.send_ctrl(&Ctrl::ConnReq { name }, local) {
            let chan = self.channel(id)?;
            chan.state = ChannelState::Disconnected;
            chan.name = None;
            return Err(e);
        }
        Ok(())
    }

    /// Waits for a connect to finish (spec §6.4 steps 8-9): connected -> Ok; refused or closed
    /// before accept -> NotConnected (unless messages already arrived); no answer within the
    /// connect timeout -> TimedOut, and the channel is stale for good.
    pub fn finish_connect(&mut self, id: ChannelId) -> Result<(), Error> {
        let deadline = Deadline::after_ms(&*self.clock, self.cfg.connect_timeout_ms);
        let answered =
            self.wait_until(Some(deadline), |d| d.peek(id).is_none_or(|c| c.state != ChannelState::Connecting))?;
        let chan = self.channel(id)?;
        if !answered {
            chan.state = ChannelState::Stale;
            return Err(Error::TimedOut);
        }
        match chan.state {
            ChannelState::Connected => Ok(()),
            ChannelState::Disconnected if !chan.queue.is_empty() => Ok(()),
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

    pub fn channel_state(&self, id: ChannelId) -> Result<ChannelState, Error> {
        self.peek(id).map(|c| c.state).ok_or(Error::BadHandle)
    }

    /// Sends one message: the concatenation of `iov`, followed by `shm` references (spec §6.5,
    /// §6.9). Returns the data length. Delivery is not confirmed: Trusty may still drop it.
    pub fn send(&mut self, id: ChannelId, iov: &[&[u8]], shm: &[ShmDesc], timeout: Timeout) -> Result<usize, Error> {
        let data_len = iov.iter().try_fold(0usize, |acc, s| acc.checked_add(s.len())).ok_or(Error::MessageSize)?;
        if shm.len() > usize::from(u16::MAX) {
            return Err(Error::TooBig);
        }
        let payload_len = shm
            .len()
            .checked_mul(wire::SHM_DESC_LEN)
            .and_then(|n| n.checked_add(data_len))
            .ok_or(Error::MessageSize)?;
        self.catch_up()?;
        if self.state != DeviceState::Online {
            return Err(Error::NoDevice);
        }
        if payload_len > self.max_message_size() {
            return Err(Error::MessageSize);
        }
        Self::require_connected(self.channel(id)?.state)?;
        let buf = self.get_tx_buffer(timeout)?;
        // The wait may have let the peer close the channel or take the device offline.
        let chan = match self.channel(id) {
            Ok(c) if c.state == ChannelState::Connected => c,
            Ok(c) => {
                let e = Self::require_connected(c.state).err().unwrap_or(Error::NotConnected);
                self.tx_free.push(buf);
                return Err(e);
            }
            Err(e) => {
                self.tx_free.push(buf);
                return Err(e);
            }
        };
        let header = Header { src: chan.local, dst: chan.remote, shm_cnt: shm.len() as u16, len: payload_len as u16, flags: 0 };
        let written = (|| {
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
            Ok::<(), trusty_platform::Error>(())
        })();
        if let Err(e) = written {
            self.tx_free.push(buf);
            return Err(e.into());
        }
        // Registered before queuing: the RELEASE may come back inside the kick (spec §6.9).
        let ids: Vec<u64> = shm.iter().map(|d| d.obj_id).collect();
        for &obj in &ids {
            *self.shm_outstanding.entry(obj).or_insert(0) += 1;
        }
        self.queue_tx(buf, wire::HEADER_LEN + payload_len, ids)?;
        Ok(data_len)
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
        let deadline = self.deadline(timeout);
        self.channel(id)?;
        self.catch_up()?;
        loop {
            self.scan();
            let chan = self.channel(id)?;
            if let Some(msg) = chan.queue.front() {
                let len = match msg {
                    RxMsg::Buffer { len, .. } => *len,
                    RxMsg::Copied(v) => v.len(),
                };
                let capacity: usize = bufs.iter().map(|b| b.len()).sum();
                if capacity < len {
                    return Err(Error::MessageSize);
                }
                let Some(msg) = chan.queue.pop_front() else { return Err(Error::BadHandle) };
                let mut at = 0usize;
                for out in bufs.iter_mut() {
                    if at >= len {
                        break;
                    }
                    let n = out.len().min(len - at);
                    match &msg {
                        RxMsg::Buffer { buf, .. } => {
                            let _ = buf.read(wire::HEADER_LEN + at, &mut out[..n]);
                        }
                        RxMsg::Copied(v) => out[..n].copy_from_slice(&v[at..at + n]),
                    }
                    at += n;
                }
                if let RxMsg::Buffer { buf, .. } = msg {
                    self.rx_spare.push(buf);
                }
                return Ok(len);
            }
            Self::require_connected(chan.state)?;
            self.wait_step(timeout, deadline)?;
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
            ids.iter().any(|&id| d.peek(id).is_none_or(|c| !c.queue.is_empty() || c.state != ChannelState::Connected))
        };
        self.wait_until(deadline, ready)?;
        ids.iter().map(|&id| self.poll(id)).collect()
    }

    /// Closes a channel (spec §6.8): queued messages are dropped, DISC_REQ is sent if the channel
    /// was connected or connecting, and the local address is free at once.
    pub fn close(&mut self, id: ChannelId) -> Result<(), Error> {
        self.channel(id)?;
        let Some(mut chan) = self.channels.get_mut(id.slot as usize).and_then(Option::take) else {
            return Err(Error::BadHandle);
        };
        self.by_addr.remove(&chan.local);
        for msg in chan.queue.drain(..) {
            if let RxMsg::Buffer { buf, .. } = msg {
                self.rx_spare.push(buf);
            }
        }
        let was = chan.state;
        chan.state = ChannelState::Stale;
        if matches!(was, ChannelState::Connected | ChannelState::Connecting) && self.state == DeviceState::Online {
            // target = Trusty's address, 0 while still connecting (spec §6.8 step 2).
            let target = if was == ChannelState::Connected { chan.remote } else { 0 };
            if let Err(e) = self.send_ctrl(&Ctrl::DiscReq { target }, chan.local) {
                log::warn!("could not send DISC_REQ for channel {}: {e}", chan.local);
                return Err(e);
            }
        }
        Ok(())
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
        let mut bufs: Vec<SharedBuf> = Vec::new();
        bufs.extend(self.rx_posted.iter_mut().filter_map(Option::take));
        bufs.extend(self.tx_posted.iter_mut().filter_map(Option::take).map(|(b, _)| b));
        bufs.append(&mut self.rx_spare);
        bufs.append(&mut self.tx_free);
        for chan in self.channels.iter_mut().filter_map(Option::take) {
            for msg in chan.queue {
                if let RxMsg::Buffer { buf, .. } = msg {
                    bufs.push(buf);
                }
            }
        }
        self.by_addr.clear();
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
        for ring in [rx, tx] {
            let Ring { queue, mem, .. } = ring;
            drop(queue);
            let _ = bus.mem().release(mem);
        }
        bus
    }
}
