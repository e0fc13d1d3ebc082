//! A hostile peer: a conduit between the stack and the model that can replace any answer and
//! write raw ring memory at chosen moments.
//!
//! The stack is brought up on [`Peer::conduit`] instead of the model's own conduit. Every call
//! goes through the peer's rules, in the order they were added:
//! - a *before* rule sees the registers of a call and may answer it itself, so that the model
//!   never sees the call ([`Peer::before`]);
//! - an *after* rule sees the call and the model's answer and may rewrite any register of it
//!   ([`Peer::after`]).
//!
//! Both get a [`Ctx`] that reaches the normal world's memory the way a peer that ignores every
//! rule would: the vrings (descriptor table, avail and used rings) and the buffers behind any
//! memory id that was shared. To find them the peer follows the bring-up as it goes through:
//! FFA_RXTX_MAP tells it where the TX buffer is, each FFA_MEM_SHARE's descriptor (read from
//! there) which pages a handle names, and VIRTIO_START's descriptor page where the vrings are.
//! Address ids (API < 5) are taken as addresses. The rings are found from a START made as a
//! plain standard call (the SMC transport); behind FF-A direct requests or a Xen mailbox the
//! peer still replaces answers but does not learn where the rings are.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use trusty_stack::{bring_up, StackConfig};
use trusty_model::host::{GuestRam, ModelMode, Sim};
use trusty_model::mem::PhysMem;
use trusty_model::ModelConfig;
use trusty_platform::ffa::{self, func};
use trusty_platform::mem::{PhysRange, PAGE_SIZE};
use trusty_platform::smc::{call, Conduit};
use trusty_virtio::rsc;

use crate::Rig;

/// Registers of one call, or of one answer.
pub type Regs = [u64; 8];

type Before = Box<dyn FnMut(&mut Ctx<'_>, &Regs) -> Option<Regs> + Send>;
type After = Box<dyn FnMut(&mut Ctx<'_>, &Regs, &mut Regs) + Send>;

enum Rule {
    Before(Before),
    After(After),
}

/// Names a rule, to remove it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleId(u64);

/// One vring of the TIPC device as the peer found it in the descriptor at START.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAt {
    /// Physical address of the ring's first byte.
    pub pa: u64,
    pub num: u16,
    /// Byte offset of the used ring (legacy layout: after descriptors and avail, aligned).
    pub used_off: u64,
}

impl RingAt {
    fn new(pa: u64, num: u32, align: u32) -> Option<RingAt> {
        if num == 0 || num > 32768 || !num.is_power_of_two() || align < 4 || !align.is_power_of_two() {
            return None;
        }
        let n = u64::from(num);
        let used_off = (16 * n + 2 * (3 + n)).next_multiple_of(u64::from(align));
        Some(RingAt { pa, num: num as u16, used_off })
    }
    pub fn desc(&self, i: u16) -> u64 {
        self.pa + 16 * u64::from(i)
    }
    pub fn avail_idx(&self) -> u64 {
        self.pa + 16 * u64::from(self.num) + 2
    }
    pub fn avail_slot(&self, slot: u16) -> u64 {
        self.pa + 16 * u64::from(self.num) + 4 + 2 * u64::from(slot % self.num)
    }
    pub fn used_idx(&self) -> u64 {
        self.pa + self.used_off + 2
    }
    pub fn used_slot(&self, slot: u16) -> u64 {
        self.pa + self.used_off + 4 + 8 * u64::from(slot % self.num)
    }
}

/// A descriptor as it sits in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[derive(Default)]
struct Track {
    tx_buffer: Option<u64>,
    /// FF-A handle -> pages, from the descriptors of successful FFA_MEM_SHAREs.
    shares: BTreeMap<u64, Vec<PhysRange>>,
    /// vring 0 (secure to normal world: the stack's rx ring) and vring 1 (normal to secure).
    rings: Option<[RingAt; 2]>,
}

struct State {
    rules: Vec<(RuleId, Rule)>,
    next_rule: u64,
    track: Track,
    calls: u64,
    replaced: u64,
}

struct Shared {
    inner: Arc<dyn Conduit>,
    ram: Arc<GuestRam>,
    state: Mutex<State>,
    sim: Mutex<Option<Sim>>,
}

/// What a rule can reach: the normal world's memory as the peer found it, and counters.
pub struct Ctx<'a> {
    ram: &'a GuestRam,
    track: &'a Track,
    /// Calls seen so far, this one included.
    pub call_no: u64,
}

impl Ctx<'_> {
    /// The TIPC device's vrings once START went through: `[vring 0 (to the normal world),
    /// vring 1 (from it)]`.
    pub fn rings(&self) -> Option<[RingAt; 2]> {
        self.track.rings
    }
    /// Writes raw bytes at a physical address of guest RAM; false outside RAM.
    pub fn write(&self, pa: u64, bytes: &[u8]) -> bool {
        self.ram.write(pa, bytes)
    }
    pub fn read(&self, pa: u64, out: &mut [u8]) -> bool {
        self.ram.read(pa, out)
    }
    pub fn read_u16(&self, pa: u64) -> u16 {
        self.ram.read_u16(pa).unwrap_or(0)
    }
    pub fn write_u16(&self, pa: u64, v: u16) -> bool {
        self.ram.write_u16(pa, v)
    }
    pub fn read_desc(&self, ring: RingAt, i: u16) -> RawDesc {
        let at = ring.desc(i % ring.num);
        RawDesc {
            addr: self.ram.read_u64(at).unwrap_or(0),
            len: self.ram.read_u32(at + 8).unwrap_or(0),
            flags: self.ram.read_u16(at + 12).unwrap_or(0),
            next: self.ram.read_u16(at + 14).unwrap_or(0),
        }
    }
    pub fn write_desc(&self, ring: RingAt, i: u16, d: RawDesc) {
        let at = ring.desc(i % ring.num);
        self.ram.write_u64(at, d.addr);
        self.ram.write_u32(at + 8, d.len);
        self.ram.write_u16(at + 12, d.flags);
        self.ram.write_u16(at + 14, d.next);
    }
    pub fn used_idx(&self, ring: RingAt) -> u16 {
        self.read_u16(ring.used_idx())
    }
    pub fn set_used_idx(&self, ring: RingAt, idx: u16) {
        self.ram.write_u16(ring.used_idx(), idx);
    }
    /// used.flags: bit 0 (VRING_USED_F_NO_NOTIFY) tells the driver not to kick.
    pub fn set_used_flags(&self, ring: RingAt, flags: u16) {
        self.ram.write_u16(ring.pa + ring.used_off, flags);
    }
    pub fn avail_idx(&self, ring: RingAt) -> u16 {
        self.read_u16(ring.avail_idx())
    }
    /// The descriptor index the driver put in avail slot `slot`.
    pub fn avail_entry(&self, ring: RingAt, slot: u16) -> u16 {
        self.read_u16(ring.avail_slot(slot))
    }
    /// Writes used entry `slot` without moving the index.
    pub fn write_used(&self, ring: RingAt, slot: u16, id: u32, len: u32) {
        self.ram.write_u32(ring.used_slot(slot), id);
        self.ram.write_u32(ring.used_slot(slot) + 4, len);
    }
    /// Appends a used entry and publishes it (used.idx + 1), as a device would.
    pub fn push_used(&self, ring: RingAt, id: u32, len: u32) {
        let idx = self.used_idx(ring);
        self.write_used(ring, idx, id, len);
        self.set_used_idx(ring, idx.wrapping_add(1));
    }
    /// The pages behind a memory id: a handle the peer saw shared, or else the id as an address.
    pub fn ranges_of(&self, id: u64) -> Option<Vec<PhysRange>> {
        if let Some(r) = self.track.shares.get(&id) {
            return Some(r.clone());
        }
        let pa = id & !(PAGE_SIZE as u64 - 1) & 0x0000_FFFF_FFFF_FFFF;
        self.ram.contains(pa, PAGE_SIZE).then(|| vec![PhysRange { addr: pa, pages: 1 }])
    }
    /// Reads from the buffer a memory id names (first range), at `offset`.
    pub fn read_buffer(&self, id: u64, offset: u64, out: &mut [u8]) -> bool {
        match self.ranges_of(id).and_then(|r| r.first().copied()) {
            Some(r) if offset + out.len() as u64 <= u64::from(r.pages) * PAGE_SIZE as u64 => {
                self.ram.read(r.addr + offset, out)
            }
            _ => false,
        }
    }
    /// Writes into the buffer a memory id names (first range), at `offset`.
    pub fn write_buffer(&self, id: u64, offset: u64, bytes: &[u8]) -> bool {
        match self.ranges_of(id).and_then(|r| r.first().copied()) {
            Some(r) if offset + bytes.len() as u64 <= u64::from(r.pages) * PAGE_SIZE as u64 => {
                self.ram.write(r.addr + offset, bytes)
            }
            _ => false,
        }
    }
}

/// The hostile peer. Clones share the same rules.
#[derive(Clone)]
pub struct Peer {
    shared: Arc<Shared>,
}

impl Peer {
    /// A machine with the model behind the hostile conduit.
    pub fn new(mode: ModelMode, model: ModelConfig) -> Peer {
        Peer::around(Sim::new(mode, model))
    }

    /// Puts the peer in front of `sim`'s model.
    pub fn around(sim: Sim) -> Peer {
        let shared = Shared {
            inner: sim.conduit(),
            ram: sim.ram().clone(),
            state: Mutex::new(State { rules: Vec::new(), next_rule: 0, track: Track::default(), calls: 0, replaced: 0 }),
            sim: Mutex::new(Some(sim)),
        };
        Peer { shared: Arc::new(shared) }
    }

    /// The conduit to hand to the stack.
    pub fn conduit(&self) -> Arc<dyn Conduit> {
        Arc::new(self.clone())
    }

    /// Brings the stack up through the peer (the API-5 FF-A path) and hands the machine to a
    /// [`Rig`]. Only once per peer: the rig owns the machine afterwards.
    pub fn bring_up(&self, cfg: StackConfig) -> Result<Rig, tipc::Error> {
        let sim = lock(&self.shared.sim).take().expect("the machine was already handed to a rig");
        match bring_up(self.conduit(), sim.clock(), sim.allocator(), cfg) {
            Ok((dev, _)) => Ok(Rig { dev: Some(dev), sim }),
            Err(e) => {
                *lock(&self.shared.sim) = Some(sim);
                Err(e)
            }
        }
    }

    /// The machine, while no rig owns it.
    pub fn sim(&self) -> MutexGuard<'_, Option<Sim>> {
        lock(&self.shared.sim)
    }

    /// Adds a rule that may answer a call before the model sees it (`Some(answer)`).
    pub fn before(&self, f: impl FnMut(&mut Ctx<'_>, &Regs) -> Option<Regs> + Send + 'static) -> RuleId {
        self.add(Rule::Before(Box::new(f)))
    }

    /// Adds a rule that may rewrite the model's answer to a call.
    pub fn after(&self, f: impl FnMut(&mut Ctx<'_>, &Regs, &mut Regs) + Send + 'static) -> RuleId {
        self.add(Rule::After(Box::new(f)))
    }

    /// Answers every call with `answer` from now on, without the model seeing any.
    pub fn answer_everything(&self, answer: Regs) -> RuleId {
        self.before(move |_, _| Some(answer))
    }

    fn add(&self, rule: Rule) -> RuleId {
        let mut st = lock(&self.shared.state);
        let id = RuleId(st.next_rule);
        st.next_rule += 1;
        st.rules.push((id, rule));
        id
    }

    pub fn remove(&self, id: RuleId) {
        lock(&self.shared.state).rules.retain(|(r, _)| *r != id);
    }

    /// Removes every rule: the model answers alone again.
    pub fn clear(&self) {
        lock(&self.shared.state).rules.clear();
    }

    /// Calls that went through the peer.
    pub fn calls(&self) -> u64 {
        lock(&self.shared.state).calls
    }

    /// Calls a before rule answered instead of the model.
    pub fn replaced(&self) -> u64 {
        lock(&self.shared.state).replaced
    }

    /// The TIPC vrings, once START went through.
    pub fn rings(&self) -> Option<[RingAt; 2]> {
        lock(&self.shared.state).track.rings
    }

    /// Runs `f` on the normal world's memory now (between calls), as a rule would.
    pub fn with_memory<R>(&self, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let st = lock(&self.shared.state);
        let mut ctx = Ctx { ram: &self.shared.ram, track: &st.track, call_no: st.calls };
        f(&mut ctx)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Track {
    /// Learns from a call before it goes to the model; returns what to learn from its answer.
    fn see_call(&mut self, ram: &GuestRam, regs: &Regs) -> Option<Vec<PhysRange>> {
        match regs[0] as u32 {
            func::RXTX_MAP64 => {
                self.tx_buffer = ram.ipa_to_pa(regs[1]).or(Some(regs[1]));
                None
            }
            func::RXTX_UNMAP => {
                self.tx_buffer = None;
                None
            }
            func::MEM_SHARE if regs[1] == regs[2] && regs[1] as usize <= PAGE_SIZE => {
                let mut desc = vec![0u8; regs[1] as usize];
                if !ram.read(self.tx_buffer?, &mut desc) {
                    return None;
                }
                ffa::decode_descriptor(&desc, 4096).ok().map(|d| d.ranges)
            }
            func::MEM_RECLAIM => {
                self.shares.remove(&((regs[1] & 0xFFFF_FFFF) | (regs[2] << 32)));
                None
            }
            f if f == call::SC_VIRTIO_START => {
                self.learn_rings(ram, regs[1] | (regs[2] << 32), regs[3] as usize);
                None
            }
            _ => None,
        }
    }

    fn learn_rings(&mut self, ram: &GuestRam, descr_id: u64, size: usize) {
        let ctx = Ctx { ram, track: self, call_no: 0 };
        let Some(page) = ctx.ranges_of(descr_id).and_then(|r| r.first().copied()) else { return };
        let mut bytes = vec![0u8; size.min(PAGE_SIZE)];
        if !ram.read(page.addr, &mut bytes) {
            return;
        }
        let Ok(vdevs) = rsc::parse(&bytes) else { return };
        let Some(v) = vdevs.iter().find(|v| v.id == rsc::VIRTIO_ID_TIPC && v.vrings.len() == 2) else { return };
        let ring = |i: usize| {
            let r = &v.vrings[i];
            let pa = ctx.ranges_of(r.memory_id())?.first()?.addr;
            RingAt::new(pa, r.num, r.align)
        };
        if let (Some(r0), Some(r1)) = (ring(0), ring(1)) {
            self.rings = Some([r0, r1]);
        }
    }
}

impl Conduit for Peer {
    fn call(&self, regs: Regs) -> Regs {
        let ram = &*self.shared.ram;
        let mut st = lock(&self.shared.state);
        st.calls += 1;
        let shared_ranges = st.track.see_call(ram, &regs);
        let mut rules = std::mem::take(&mut st.rules);
        let call_no = st.calls;
        let mut answer = None;
        for (_, rule) in rules.iter_mut() {
            if let Rule::Before(f) = rule {
                let mut ctx = Ctx { ram, track: &st.track, call_no };
                if let Some(a) = f(&mut ctx, &regs) {
                    answer = Some(a);
                    break;
                }
            }
        }
        let out = match answer {
            Some(a) => {
                st.replaced += 1;
                a
            }
            None => {
                // The model may take long (threaded mode): no lock is held across the call.
                let keep = std::mem::take(&mut rules);
                st.rules = keep;
                drop(st);
                let mut out = self.shared.inner.call(regs);
                st = lock(&self.shared.state);
                rules = std::mem::take(&mut st.rules);
                if let (Some(ranges), func::SUCCESS | func::SUCCESS64) = (shared_ranges, out[0] as u32) {
                    st.track.shares.insert((out[2] & 0xFFFF_FFFF) | ((out[3] & 0xFFFF_FFFF) << 32), ranges);
                }
                for (_, rule) in rules.iter_mut() {
                    if let Rule::After(f) = rule {
                        let mut ctx = Ctx { ram, track: &st.track, call_no };
                        f(&mut ctx, &regs, &mut out);
                    }
                }
                out
            }
        };
        // Rules added while this call ran come after the ones that were there.
        let added = std::mem::take(&mut st.rules);
        rules.extend(added);
        st.rules = rules;
        out
    }
}

/// A small seeded PRNG (xorshift64*), for tests that must be repeatable.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Runs `f` on a thread and waits at most `limit` for it: a hang is a failed test, not a hung
/// test run. Returns `f`'s result and how long it took.
pub fn within<T: Send + 'static>(
    limit: std::time::Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, std::time::Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, start.elapsed()),
        Err(_) => panic!("{what}: still running after {limit:?} (the operation hangs)"),
    }
}

/// Builds a rig behind a hostile peer with `model`'s switches.
pub fn rig(mode: ModelMode, model: ModelConfig, cfg: StackConfig) -> (Rig, Peer) {
    let peer = Peer::new(mode, model);
    let rig = peer.bring_up(cfg).unwrap_or_else(|e| panic!("bring-up through the hostile peer failed: {e}"));
    (rig, peer)
}
