//! The harness of the `driver_ring` and `driver_ring_wrap` targets: the driver end of a vring
//! against a hostile device.
//!
//! The device owns the shared ring memory: it may write the used ring, the used index, or any
//! other byte of the ring at any time. The driver publishes buffers with `add` and takes
//! completions with `pop_used`; whatever the device wrote, the queue must never panic, never
//! hand back a descriptor that was not in flight, and always account for every descriptor:
//! `free_count() + in_flight().count()` equals the ring size.
//!
//! Input: byte 0 picks the ring size (1 to 1024, or 32768 for 0xFF), byte 1 the used-ring
//! alignment (4 to 4096), byte 2 how many buffers to add first; the rest is a program of
//! operations (see [`op`]). After the program the driver drains the used ring.
//!
//! A reference model of the legacy split ring (spec §5.3: the next used entry is at slot
//! `last_used % num`, an index more than `num` ahead is an error) predicts every result.

use std::collections::BTreeSet;
use std::ptr::NonNull;

use trusty_virtio::vring::{DriverQueue, Layout, RawRing, RingError, RingMemory, Used};

/// A byte cursor over the fuzz input; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// The driver's view plus what the reference model expects.
struct Harness {
    q: DriverQueue<RawRing>,
    /// The device's handle on the same memory.
    peer: RawRing,
    num: u16,
    used_off: usize,
    /// Descriptors the harness saw `add` return and not yet come back.
    in_flight: BTreeSet<u16>,
    /// The reference model's last-seen used index.
    last_used: u16,
    next_addr: u64,
    ops: usize,
}

impl Harness {
    fn used_idx_off(&self) -> usize {
        self.used_off + 2
    }
    fn used_entry_off(&self, slot: u16) -> usize {
        self.used_off + 4 + 8 * usize::from(slot % self.num)
    }

    fn check_accounting(&self) {
        let in_flight = self.q.in_flight().count();
        assert_eq!(
            self.q.free_count() + in_flight,
            usize::from(self.num),
            "free {} + in flight {in_flight} != ring size {}",
            self.q.free_count(),
            self.num
        );
        assert_eq!(in_flight, self.in_flight.len(), "queue and harness disagree on what is in flight");
        assert!(self.q.in_flight().eq(self.in_flight.iter().copied()), "in-flight sets differ");
    }

    fn add(&mut self, len: u32, writable: bool) {
        let was_full = self.in_flight.len() == usize::from(self.num);
        self.next_addr += 0x1000;
        match self.q.add(self.next_addr, len, writable) {
            Ok(idx) => {
                assert!(!was_full, "add succeeded on a full ring");
                assert!(idx < self.num, "add returned descriptor {idx} of a {}-entry ring", self.num);
                assert!(self.in_flight.insert(idx), "add returned descriptor {idx}, already in flight");
            }
            Err(e) => {
                assert_eq!(e, RingError::Full);
                assert!(was_full, "add said Full with {} of {} in flight", self.in_flight.len(), self.num);
            }
        }
    }

    /// One `pop_used`, checked against the reference model. Returns whether it took an entry.
    fn pop(&mut self) -> bool {
        let now = self.peer.read_u16(self.used_idx_off());
        let expected = if now == self.last_used {
            Ok(None)
        } else if now.wrapping_sub(self.last_used) > self.num {
            Err(RingError::UsedIndexJump { last_seen: self.last_used, now })
        } else {
            let e = self.used_entry_off(self.last_used);
            let id = self.peer.read_u32(e);
            let len = self.peer.read_u32(e + 4);
            self.last_used = self.last_used.wrapping_add(1);
            match u16::try_from(id) {
                Ok(desc) if self.in_flight.contains(&desc) => Ok(Some(Used { desc, len })),
                _ => Err(RingError::BadUsedId { id }),
            }
        };
        let got = self.q.pop_used();
        if let Ok(Some(u)) = got {
            assert!(
                self.in_flight.contains(&u.desc),
                "pop_used returned descriptor {} which was not in flight (in flight: {:?})",
                u.desc,
                self.in_flight
            );
        }
        assert_eq!(got, expected, "pop_used disagrees with the ring model");
        match got {
            Ok(Some(u)) => {
                self.in_flight.remove(&u.desc);
                true
            }
            _ => false,
        }
    }

    /// An honest device completing `desc` as the next used entry.
    fn complete(&mut self, desc: u16, len: u32) {
        let slot = self.last_used;
        self.peer.write_u32(self.used_entry_off(slot), u32::from(desc));
        self.peer.write_u32(self.used_entry_off(slot) + 4, len);
        self.peer.write_u16(self.used_idx_off(), slot.wrapping_add(1));
    }

    fn after_op(&mut self) {
        self.ops += 1;
        // O(1) every time; the O(num) comparison of the in-flight sets every op on small
        // rings, every 64th op on large ones (and always at the end).
        assert_eq!(
            self.q.free_count() + self.in_flight.len(),
            usize::from(self.num),
            "free {} + in flight {} != ring size {}",
            self.q.free_count(),
            self.in_flight.len(),
            self.num
        );
        if self.num <= 64 || self.ops.is_multiple_of(64) {
            self.check_accounting();
        }
    }

    /// `count` rounds of honest traffic: add a buffer, the device completes it as the next used
    /// entry, the driver pops it. On a full ring the highest descriptor in flight is completed
    /// instead.
    fn honest_cycles(&mut self, count: u32) {
        for _ in 0..count {
            self.next_addr += 0x1000;
            let desc = match self.q.add(self.next_addr, 64, true) {
                Ok(idx) => {
                    assert!(idx < self.num && !self.in_flight.contains(&idx), "add returned {idx}");
                    idx
                }
                Err(e) => {
                    assert_eq!(e, RingError::Full);
                    assert_eq!(self.in_flight.len(), usize::from(self.num), "add said Full early");
                    match self.in_flight.pop_last() {
                        Some(d) => d,
                        None => return,
                    }
                }
            };
            self.complete(desc, 1);
            let want = Ok(Some(Used { desc, len: 1 }));
            assert_eq!(self.q.pop_used(), want, "an honest completion of {desc} was not taken");
            self.in_flight.remove(&desc);
            self.last_used = self.last_used.wrapping_add(1);
        }
    }
}

/// Operations of the program: the low 3 bits of an op byte, then its operands (little-endian).
pub mod op {
    /// Driver adds a buffer: len u32; bit 7 = device-writable.
    pub const ADD: u8 = 0;
    /// Device writes a used entry: slot u16 (bit 7: relative to the driver's next slot, mod 4),
    /// id u32 (bits 4..3 = 0: an in-flight descriptor picked by id, 1: id mod num+2, else
    /// as is), len u32.
    pub const WRITE_USED_ENTRY: u8 = 1;
    /// Device writes the used index: u16.
    pub const WRITE_USED_IDX: u8 = 2;
    /// Device sets the used index to the driver's last seen plus (bit 7: minus) a u8.
    pub const BUMP_USED_IDX: u8 = 3;
    /// Driver pops one used entry.
    pub const POP: u8 = 4;
    /// Driver pops until nothing (or an error) comes.
    pub const DRAIN: u8 = 5;
    /// Device writes a u16 anywhere in the ring: offset u32 (mod size, even), value u16.
    pub const WRITE_ANYWHERE: u8 = 6;
    /// Honest traffic: a u8 count of add / complete / pop rounds.
    pub const HONEST_CYCLES: u8 = 7;
}

/// Where the driver's indices start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At 0, as after `DriverQueue::new`.
    Zero,
    /// [`NEAR_WRAP`]: 64 short of the u16 wrap, reached by honest traffic before the program
    /// runs (65,472 rounds, some 40 ms instrumented).
    NearWrap,
}

/// Index at which [`Start::NearWrap`] programs begin.
pub const NEAR_WRAP: u16 = 0u16.wrapping_sub(64);

/// Runs one program (the fuzz input) against a fresh queue.
pub fn run(data: &[u8], start: Start) {
    let mut input = Input(data);
    let b0 = input.u8();
    let exp = if b0 == 0xFF { 15 } else { u32::from(b0 % 11) };
    let num = 1u32 << exp;
    let align = 4u32 << (input.u8() % 11);
    let layout = Layout::new(num, align).expect("valid layout");
    let size = layout.size();

    // 8-byte-aligned zeroed memory, reached only through the two RawRings below until the
    // queue is gone.
    let mut backing = vec![0u64; size.div_ceil(8)];
    let base = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
    // SAFETY: `backing` is 8-aligned, `size.div_ceil(8) * 8 >= size` bytes long and outlives both
    // rings (they are dropped with `h` before `backing`); nothing else touches it meanwhile.
    let (drv_mem, peer) = unsafe { (RawRing::new(base, backing.len() * 8), RawRing::new(base, backing.len() * 8)) };
    let q = DriverQueue::new(drv_mem, layout).expect("memory fits the layout");
    let num16 = layout.num();
    let mut h = Harness {
        q,
        peer,
        num: num16,
        used_off: size - 6 - 8 * usize::from(num16),
        in_flight: BTreeSet::new(),
        last_used: 0,
        next_addr: 0,
        ops: 0,
    };
    h.check_accounting();
    if start == Start::NearWrap {
        h.honest_cycles(u32::from(NEAR_WRAP));
        assert_eq!(h.last_used, NEAR_WRAP);
        h.check_accounting();
    }

    let initial = usize::from(input.u8()) % (usize::from(num16) + 1);
    for i in 0..initial {
        h.add(4096, i % 2 == 0);
    }
    h.after_op();

    while !input.is_empty() {
        let b = input.u8();
        match b & 7 {
            op::ADD => {
                let len = input.u32();
                h.add(len, b & 0x80 != 0);
            }
            op::WRITE_USED_ENTRY => {
                // Slot relative to what the driver reads next, or absolute.
                let slot = input.u16();
                let slot = if b & 0x80 != 0 { h.last_used.wrapping_add(slot % 4) } else { slot };
                // The id: a descriptor in flight, a small one, or any 32-bit value.
                let raw = input.u32();
                let id = match (b >> 3) & 3 {
                    0 => h.in_flight.iter().nth(raw as usize % h.in_flight.len().max(1)).map_or(raw, |&d| u32::from(d)),
                    1 => raw % (u32::from(h.num) + 2),
                    _ => raw,
                };
                let len = input.u32();
                let e = h.used_entry_off(slot);
                h.peer.write_u32(e, id);
                h.peer.write_u32(e + 4, len);
            }
            op::WRITE_USED_IDX => {
                let v = input.u16();
                h.peer.write_u16(h.used_idx_off(), v);
            }
            op::BUMP_USED_IDX => {
                // Usually within the ring size of the driver's position, sometimes just past it.
                let delta = u16::from(input.u8());
                let v = if b & 0x80 != 0 { h.last_used.wrapping_sub(delta) } else { h.last_used.wrapping_add(delta) };
                h.peer.write_u16(h.used_idx_off(), v);
            }
            op::POP => {
                h.pop();
            }
            op::DRAIN => {
                for _ in 0..=usize::from(h.num) + 1 {
                    if !h.pop() {
                        break;
                    }
                }
            }
            op::WRITE_ANYWHERE => {
                // The device may scribble on any part of the ring, descriptors and avail
                // ring included (the driver never reads those back).
                let off = (input.u32() as usize % (size / 2)) * 2;
                let v = input.u16();
                h.peer.write_u16(off, v);
            }
            op::HONEST_CYCLES => {
                // Runs the indices forward by up to 255 rounds.
                let count = input.u8();
                h.honest_cycles(u32::from(count));
            }
            _ => unreachable!(),
        }
        h.after_op();
    }

    // Finally the driver drains whatever the device left.
    for _ in 0..=usize::from(h.num) + 1 {
        let before = h.last_used;
        h.pop();
        if h.last_used == before {
            break;
        }
    }
    h.check_accounting();
    drop(h);
    drop(backing);
}
