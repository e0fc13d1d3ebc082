//! A scriptable secure side for the device's unit tests: just enough of Trusty's virtio bus and
//! TIPC device (GET_DESCR, START, kicks, NOPs) to bring a [`TipcDevice`] up, plus hooks that let
//! a test misbehave in ways the model never would (answer every call with a frame, repeat used
//! ids, hold frames back, send late answers).
//!
//! Memory ids are host addresses: the allocator's "physical" address of a page is its address,
//! and the sharer hands that out as the id. The peer only touches memory through ids the sharer
//! currently has live, with the length that was shared.

extern crate std;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::alloc::Layout as AllocLayout;
use core::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use trusty_platform::clock::Clock;
use trusty_platform::mem::{Access, DmaRegion, MemoryId, PageAllocator, PhysRange, SharedMemory, Sharer, PAGE_SIZE};
use trusty_platform::smc::{call, Conduit};
use trusty_platform::trusty::{CallPolicy, Trusty};
use trusty_virtio::rsc;
use trusty_virtio::vring::{DeviceQueue, Layout, RawRing};
use trusty_virtio::Bus;

use crate::wire::{self, Ctrl, Header};
use crate::{Config, TipcDevice};

/// Page-aligned heap pages whose "physical" address is their address.
struct HeapPages;

impl PageAllocator for HeapPages {
    fn alloc_zeroed(&mut self, pages: usize) -> Option<DmaRegion> {
        let layout = AllocLayout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        // SAFETY: `p` points to `pages` fresh pages, owned by the region until `free`.
        Some(unsafe { DmaRegion::new(p, p.as_ptr() as u64, pages) })
    }
    unsafe fn free(&mut self, region: DmaRegion) {
        let layout = AllocLayout::from_size_align(region.len(), PAGE_SIZE).expect("layout of an allocated region");
        // SAFETY: the region came from `alloc_zeroed` with this layout (the caller's contract).
        unsafe { alloc::alloc::dealloc(region.vaddr().as_ptr(), layout) };
    }
}

/// Live shares: id (= address) -> length in bytes.
type Shares = Arc<Mutex<BTreeMap<u64, usize>>>;

struct IdSharer {
    live: Shares,
}

impl Sharer for IdSharer {
    fn mechanism(&self) -> &'static str {
        "test-address"
    }
    fn share(&mut self, ranges: &[PhysRange], _access: Access) -> Result<MemoryId, trusty_platform::Error> {
        let r = ranges.first().ok_or(trusty_platform::Error::InvalidArgument("no range"))?;
        lock(&self.live).insert(r.addr, r.pages as usize * PAGE_SIZE);
        Ok(MemoryId(r.addr))
    }
    fn reclaim(&mut self, id: MemoryId) -> Result<(), trusty_platform::Error> {
        lock(&self.live).remove(&id.0);
        Ok(())
    }
    fn live_shares(&self) -> usize {
        lock(&self.live).len()
    }
    fn budget(&self) -> Option<usize> {
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wall-clock time; `relax` yields.
pub struct TestClock(Instant);

impl Clock for TestClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&self, ns: u64) {
        std::thread::sleep(std::time::Duration::from_nanos(ns));
    }
    fn relax(&self) {
        std::thread::yield_now();
    }
}

/// What the peer does with a CONN_REQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConnect {
    /// CONN_RSP status 0 at once, remote 1000 + n.
    Accept,
    /// Never answer.
    Swallow,
}

/// Misbehaviour a test adds: runs after the peer's own work on every call.
pub type Hook = Box<dyn FnMut(&mut Peer) + Send>;

/// A frame the normal world sent, as the peer read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub header: Header,
    pub ctrl: Option<Ctrl>,
    pub payload: Vec<u8>,
}

struct PeerRing {
    queue: DeviceQueue,
    mem: RawRing,
}

/// The peer's state; tests reach it through [`Harness::peer`].
pub struct Peer {
    live: Shares,
    table: Vec<u8>,
    /// Trusty's tx ring: vring 0, secure to normal world.
    to_ns: Option<PeerRing>,
    /// Trusty's rx ring: vring 1, normal world to secure.
    from_ns: Option<PeerRing>,
    /// Frames waiting for a normal-world rx buffer: bytes, and the used length to report
    /// (`None`: the bytes written).
    pub outbox: VecDeque<(Vec<u8>, Option<u32>)>,
    /// Everything the normal world sent, in order.
    pub sent: Vec<Sent>,
    /// Stop taking frames from the normal world (its tx buffers stay in flight).
    pub stall_from_ns: bool,
    pub on_connect: OnConnect,
    /// Echo data messages back to their sender.
    pub echo: bool,
    /// Endpoint counter for Accept.
    next_remote: u32,
    /// Every call from the normal world.
    pub calls: u64,
    /// Kicks (SC_VDEV_KICK_VQ).
    pub kicks: u64,
    /// Lowest and highest address of a local variable of `Conduit::call` seen since the last
    /// reset: how far the caller's stack moved between calls.
    pub stack_span: Option<(usize, usize)>,
    /// Runs after the peer's own work on every call.
    pub hook: Option<Hook>,
    /// Descriptor heads of rx buffers used, with the frame written, most recent last.
    pub filled: Vec<(u16, u32)>,
    /// Sent instead of the plain GO_ONLINE at START, if set.
    pub go_online_frame: Option<Vec<u8>>,
    /// Behave as Trusty's tx thread with vring 0's notifications: VRING_USED_F_NO_NOTIFY set
    /// while frames find buffers, cleared when one waits for a buffer (off: the flag stays
    /// clear, every re-post is kicked).
    pub rx_notify_when_waiting: bool,
}

impl Peer {
    fn read_id(&self, id: u64, len: usize) -> Option<Vec<u8>> {
        let shared = *lock(&self.live).get(&id)?;
        if len > shared {
            return None;
        }
        let mut out = alloc::vec![0u8; len];
        // SAFETY: `id` is the address of a live share of at least `len` bytes (checked above);
        // the normal world keeps it allocated while shared.
        unsafe { core::ptr::copy_nonoverlapping(id as *const u8, out.as_mut_ptr(), len) };
        Some(out)
    }

    fn write_id(&self, id: u64, data: &[u8]) -> bool {
        let Some(&shared) = lock(&self.live).get(&id) else { return false };
        if data.len() > shared {
            return false;
        }
        // SAFETY: as in `read_id`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), id as *mut u8, data.len()) };
        true
    }

    fn ring(&self, id: u64, layout: Layout) -> Option<PeerRing> {
        let shared = *lock(&self.live).get(&id)?;
        if shared < layout.size() {
            return None;
        }
        let base = NonNull::new(id as *mut u8)?;
        // SAFETY: the ring's pages are a live share of `shared` bytes, page-aligned, and stay
        // allocated until the normal world stops the bus (after which the peer drops the ring).
        let mem = unsafe { RawRing::new(base, shared) };
        Some(PeerRing { queue: DeviceQueue::new(layout), mem })
    }

    fn start(&mut self, descr_id: u64) -> i32 {
        let Some(bytes) = self.read_id(descr_id, self.table.len()) else { return -1 };
        let Ok(vdevs) = rsc::parse(&bytes) else { return -1 };
        let Some(v) = vdevs.first() else { return -1 };
        let mut rings = Vec::new();
        for r in &v.vrings {
            let Ok(layout) = Layout::new(r.num, r.align) else { return -1 };
            let Some(ring) = self.ring(r.memory_id(), layout) else { return -1 };
            rings.push(ring);
        }
        let mut rings = rings.into_iter();
        self.to_ns = rings.next();
        self.from_ns = rings.next();
        match self.go_online_frame.clone() {
            Some(frame) => self.outbox.push_back((frame, None)),
            None => self.queue_ctrl(&Ctrl::GoOnline),
        }
        0
    }

    /// Queues a control message for the normal world.
    pub fn queue_ctrl(&mut self, msg: &Ctrl) {
        let mut frame = [0u8; 512];
        let n = wire::encode_ctrl(msg, wire::CTRL_ADDR, &mut frame).expect("control frame fits");
        self.outbox.push_back((frame[..n].to_vec(), None));
    }

    /// Queues a data message for normal-world address `dst`.
    pub fn queue_data(&mut self, dst: u32, data: &[u8]) {
        self.outbox.push_back((data_frame(dst, data), None));
    }

    /// Writes `frame` into the next rx buffer now, if one is posted; returns its descriptor.
    pub fn put_frame(&mut self, frame: &[u8], used: Option<u32>) -> Option<u16> {
        let ring = self.to_ns.as_mut()?;
        let chain = ring.queue.pop_avail(&ring.mem).ok()??;
        let d = *chain.descs.first()?;
        let n = frame.len().min(d.len as usize);
        let ok = self.write_id(d.addr, &frame[..n]);
        let len = used.unwrap_or(n as u32);
        let ring = self.to_ns.as_mut()?;
        ring.queue.push_used(&ring.mem, chain.head, if ok { len } else { u32::MAX });
        self.filled.push((chain.head, len));
        Some(chain.head)
    }

    /// Publishes a used entry on vring 0 without taking a buffer (a lie about descriptor `head`).
    pub fn push_raw_used(&mut self, head: u16, len: u32) {
        if let Some(ring) = self.to_ns.as_mut() {
            ring.queue.push_used(&ring.mem, head, len);
        }
    }

    /// Whether the normal world has an rx buffer posted.
    pub fn rx_available(&self) -> bool {
        self.to_ns.as_ref().is_some_and(|r| r.queue.has_avail(&r.mem))
    }

    fn drain_from_ns(&mut self) {
        if self.stall_from_ns {
            return;
        }
        loop {
            let Some(ring) = self.from_ns.as_mut() else { return };
            let Ok(Some(chain)) = ring.queue.pop_avail(&ring.mem) else { return };
            let d = chain.descs[0];
            let frame = self.read_id(d.addr, d.len as usize).unwrap_or_default();
            let status = self.handle_from_ns(&frame);
            if let Some(ring) = self.from_ns.as_mut() {
                ring.queue.push_used(&ring.mem, chain.head, status as u32);
            }
        }
    }

    fn handle_from_ns(&mut self, frame: &[u8]) -> i32 {
        let Some(header) = Header::decode(frame) else { return -7 };
        let payload = frame.get(wire::HEADER_LEN..).unwrap_or_default().to_vec();
        let ctrl = (header.dst == wire::CTRL_ADDR).then(|| wire::parse_ctrl(&payload, 0, false).ok()).flatten();
        self.sent.push(Sent { header, ctrl: ctrl.clone(), payload: payload.clone() });
        match ctrl {
            Some(Ctrl::ConnReq { .. }) => {
                if self.on_connect == OnConnect::Accept {
                    let remote = 1000 + self.next_remote;
                    self.next_remote += 1;
                    self.queue_ctrl(&Ctrl::ConnRsp {
                        target: header.src,
                        status: 0,
                        remote,
                        max_msg_size: 4096,
                        max_msg_cnt: 1,
                    });
                }
                0
            }
            Some(_) => 0,
            None if header.dst == wire::CTRL_ADDR => -7,
            None => {
                if self.echo {
                    let data_len = payload.len() - usize::from(header.shm_cnt) * wire::SHM_DESC_LEN;
                    self.queue_data(header.src, &payload[..data_len]);
                }
                payload.len() as i32
            }
        }
    }

    fn flush_to_ns(&mut self) {
        while self.rx_available() {
            let Some((frame, used)) = self.outbox.pop_front() else { break };
            self.put_frame(&frame, used);
        }
        if self.rx_notify_when_waiting {
            let waiting = !self.outbox.is_empty();
            if let Some(r) = &self.to_ns {
                r.queue.set_no_notify(&r.mem, !waiting);
            }
        }
    }

    /// Rx buffers the normal world has posted on vring 0 and the peer not yet taken.
    pub fn rx_posted(&self) -> u16 {
        self.to_ns.as_ref().map_or(0, |r| r.queue.avail_count(&r.mem))
    }

    /// Control messages the normal world sent, with their header's src.
    pub fn ctrl_sent(&self) -> Vec<(u32, Ctrl)> {
        self.sent.iter().filter_map(|s| s.ctrl.clone().map(|c| (s.header.src, c))).collect()
    }
}

/// A data frame for normal-world address `dst` (src 0, as Trusty sends it).
pub fn data_frame(dst: u32, data: &[u8]) -> Vec<u8> {
    let header = Header { src: 0, dst, shm_cnt: 0, len: data.len() as u16, flags: 0 };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(data);
    frame
}

/// A control frame with an arbitrary body (for bodies the encoder does not produce).
pub fn raw_ctrl_frame(ctrl_type: u32, body: &[u8]) -> Vec<u8> {
    let len = (wire::CTRL_HEADER_LEN + body.len()) as u16;
    let header = Header { src: wire::CTRL_ADDR, dst: wire::CTRL_ADDR, shm_cnt: 0, len, flags: 0 };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&ctrl_type.to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

struct PeerConduit {
    peer: Arc<Mutex<Peer>>,
}

impl Conduit for PeerConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        let marker = 0u8;
        let sp = core::hint::black_box(&marker) as *const u8 as usize;
        let mut p = lock(&self.peer);
        p.calls += 1;
        p.stack_span = Some(match p.stack_span {
            Some((lo, hi)) => (lo.min(sp), hi.max(sp)),
            None => (sp, sp),
        });
        let id = regs[1] | (regs[2] << 32);
        let result: i32 = match regs[0] as u32 {
            call::SC_VIRTIO_GET_DESCR => {
                let table = p.table.clone();
                if p.write_id(id, &table) {
                    table.len() as i32
                } else {
                    -1
                }
            }
            call::SC_VIRTIO_START => p.start(id),
            call::SC_VIRTIO_STOP => {
                p.to_ns = None;
                p.from_ns = None;
                0
            }
            call::SC_VDEV_KICK_VQ => {
                p.kicks += 1;
                0
            }
            _ => 0,
        };
        p.drain_from_ns();
        p.flush_to_ns();
        if let Some(mut hook) = p.hook.take() {
            hook(&mut p);
            if p.hook.is_none() {
                p.hook = Some(hook);
            }
        }
        [result as u32 as u64, 0, 0, 0, 0, 0, 0, 0]
    }
}

/// A device brought up on the fake peer.
pub struct Harness {
    pub dev: TipcDevice,
    pub peer: Arc<Mutex<Peer>>,
}

impl Harness {
    /// Brings a device up on Trusty's default table with rings of `ring_num` entries.
    pub fn new(cfg: Config, ring_num: u32) -> Harness {
        let rings = [
            rsc::VringDecl { align: 4096, num: ring_num, notifyid: 1 },
            rsc::VringDecl { align: 4096, num: ring_num, notifyid: 2 },
        ];
        let table = rsc::TableBuilder::new().vdev(rsc::VIRTIO_ID_TIPC, 0, &rings, &rsc::tipc_config(4096, 4096, "dev0")).build();
        Harness::with_table(cfg, table, |_| {}).unwrap_or_else(|e| panic!("bring-up on the fake peer: {e}"))
    }

    /// Brings a device up on Trusty's default table with 8-entry rings, reading `clock`.
    pub fn with_clock(cfg: Config, clock: Arc<dyn Clock>) -> Harness {
        let rings = [rsc::VringDecl { align: 4096, num: 8, notifyid: 1 }, rsc::VringDecl { align: 4096, num: 8, notifyid: 2 }];
        let table = rsc::TableBuilder::new().vdev(rsc::VIRTIO_ID_TIPC, 0, &rings, &rsc::tipc_config(4096, 4096, "dev0")).build();
        Harness::with_table_clock(cfg, table, clock, |_| {}).unwrap_or_else(|e| panic!("bring-up on the fake peer: {e}"))
    }

    /// Brings a device up on `table`, after `prepare` has set the peer up.
    pub fn with_table(cfg: Config, table: Vec<u8>, prepare: impl FnOnce(&mut Peer)) -> Result<Harness, crate::Error> {
        Harness::with_table_clock(cfg, table, Arc::new(TestClock(Instant::now())), prepare)
    }

    fn with_table_clock(
        cfg: Config,
        table: Vec<u8>,
        clock: Arc<dyn Clock>,
        prepare: impl FnOnce(&mut Peer),
    ) -> Result<Harness, crate::Error> {
        let live: Shares = Arc::default();
        let mut peer = Peer {
            live: live.clone(),
            table,
            to_ns: None,
            from_ns: None,
            outbox: VecDeque::new(),
            sent: Vec::new(),
            stall_from_ns: false,
            on_connect: OnConnect::Accept,
            echo: false,
            next_remote: 0,
            calls: 0,
            kicks: 0,
            stack_span: None,
            hook: None,
            filled: Vec::new(),
            go_online_frame: None,
            rx_notify_when_waiting: false,
        };
        prepare(&mut peer);
        let peer = Arc::new(Mutex::new(peer));
        let trusty = Trusty::new(Arc::new(PeerConduit { peer: peer.clone() }), clock, CallPolicy::default());
        let mem = SharedMemory::new(Box::new(HeapPages), Box::new(IdSharer { live }));
        let dev = TipcDevice::probe(Bus::new(trusty, mem), cfg)?;
        Ok(Harness { dev, peer })
    }

    pub fn peer(&self) -> MutexGuard<'_, Peer> {
        lock(&self.peer)
    }
}
