//! The vrings over raw memory, both ends on one allocation, written so that Miri can check them
//! (scripts/miri.sh): every `RawRing` is derived from one base pointer that is never re-borrowed,
//! as the driver's and the device's views of shared pages are in the stack.

use std::ptr::NonNull;

use trusty_virtio::vring::{DeviceQueue, DriverQueue, Layout, RawRing, RingError, RingMemory, Used, DESC_F_WRITE};

/// Zeroed, 8-aligned memory reached only through the raw pointer it was made from.
struct Shared {
    base: NonNull<u64>,
    words: usize,
}

impl Shared {
    fn new(bytes: usize) -> Shared {
        let words = bytes / 8;
        let boxed = vec![0u64; words].into_boxed_slice();
        // SAFETY: Box::into_raw never returns null.
        let base = unsafe { NonNull::new_unchecked(Box::into_raw(boxed).cast::<u64>()) };
        Shared { base, words }
    }

    /// One view of the memory (the driver's or the device's).
    fn ring(&self) -> RawRing {
        // SAFETY: 8-aligned, `words * 8` bytes, alive until `self` drops, which the tests order
        // after every ring.
        unsafe { RawRing::new(self.base.cast(), self.words * 8) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.words);
        // SAFETY: made by Box::into_raw in `new` with this length; no ring outlives `self`.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// Offsets of the legacy layout (virtio 1.0 §2.6.2), computed here independently of the crate.
struct Offsets {
    used: usize,
}

impl Offsets {
    fn new(num: usize, align: usize) -> Offsets {
        Offsets { used: (16 * num + 2 * (3 + num)).next_multiple_of(align) }
    }
    fn used_idx(&self) -> usize {
        self.used + 2
    }
    fn used_slot(&self, slot: usize, num: usize) -> usize {
        self.used + 4 + 8 * (slot % num)
    }
}

#[test]
fn both_ends_round_trip_across_many_wraps() {
    let mem = Shared::new(8192);
    let l = Layout::new(4, 4096).unwrap();
    let mut drv = DriverQueue::new(mem.ring(), l).unwrap();
    let dev_mem = mem.ring();
    let mut dev = DeviceQueue::new(l);
    for round in 0..24u64 {
        let a = drv.add(0x1000 + round, 100, false).unwrap();
        let b = drv.add(0x2000 + round, 4096, true).unwrap();
        let c1 = dev.pop_avail(&dev_mem).unwrap().unwrap();
        let c2 = dev.pop_avail(&dev_mem).unwrap().unwrap();
        assert_eq!((c1.head, c1.descs[0].addr, c1.descs[0].len), (a, 0x1000 + round, 100));
        assert_eq!(c2.descs[0].flags, DESC_F_WRITE);
        assert_eq!(dev.pop_avail(&dev_mem).unwrap(), None);
        dev.push_used(&dev_mem, c2.head, 20);
        dev.push_used(&dev_mem, c1.head, (-9i32) as u32);
        assert_eq!(drv.pop_used().unwrap(), Some(Used { desc: b, len: 20 }));
        assert_eq!(drv.pop_used().unwrap(), Some(Used { desc: a, len: (-9i32) as u32 }));
        assert_eq!(drv.pop_used().unwrap(), None);
    }
    assert_eq!(drv.free_count(), 4);
    drop((drv, dev_mem));
}

#[test]
fn a_hostile_device_writing_raw_used_entries_cannot_break_the_driver() {
    let (num, align) = (4usize, 4096usize);
    let mem = Shared::new(8192);
    let l = Layout::new(num as u32, align as u32).unwrap();
    let o = Offsets::new(num, align);
    let mut drv = DriverQueue::new(mem.ring(), l).unwrap();
    let peer = mem.ring();
    let d = drv.add(0x1000, 10, false).unwrap();
    let entry = |slot: usize, id: u32, len: u32| {
        peer.write_u32(o.used_slot(slot, num), id);
        peer.write_u32(o.used_slot(slot, num) + 4, len);
    };
    // An id that is not in flight, one far out of range, an index far ahead.
    entry(0, 3, 16);
    peer.write_u16(o.used_idx(), 1);
    assert_eq!(drv.pop_used(), Err(RingError::BadUsedId { id: 3 }));
    entry(1, u32::MAX, 16);
    peer.write_u16(o.used_idx(), 2);
    assert_eq!(drv.pop_used(), Err(RingError::BadUsedId { id: u32::MAX }));
    peer.write_u16(o.used_idx(), 2 + 5 * num as u16);
    assert!(matches!(drv.pop_used(), Err(RingError::UsedIndexJump { .. })));
    // A correct entry still completes, with whatever length the device claims (the caller
    // bounds it by its buffer); the same id again is refused.
    peer.write_u16(o.used_idx(), 2);
    entry(2, u32::from(d), u32::MAX);
    peer.write_u16(o.used_idx(), 3);
    assert_eq!(drv.pop_used(), Ok(Some(Used { desc: d, len: u32::MAX })));
    entry(3, u32::from(d), 1);
    peer.write_u16(o.used_idx(), 4);
    assert_eq!(drv.pop_used(), Err(RingError::BadUsedId { id: u32::from(d) }));
    assert_eq!(drv.free_count(), num);
    drop((drv, peer));
}

#[test]
fn a_full_queue_refuses_and_the_device_can_suppress_kicks() {
    let mem = Shared::new(8192);
    let l = Layout::new(2, 4096).unwrap();
    let mut drv = DriverQueue::new(mem.ring(), l).unwrap();
    let dev_mem = mem.ring();
    let mut dev = DeviceQueue::new(l);
    drv.add(1, 1, false).unwrap();
    drv.add(2, 1, false).unwrap();
    assert_eq!(drv.add(3, 1, false), Err(RingError::Full));
    assert!(drv.needs_kick());
    dev.set_no_notify(&dev_mem, true);
    assert!(!drv.needs_kick());
    dev.set_no_notify(&dev_mem, false);
    assert!(drv.needs_kick());
    assert!(dev.has_avail(&dev_mem));
    let c = dev.pop_avail(&dev_mem).unwrap().unwrap();
    dev.push_used(&dev_mem, c.head, 0);
    assert_eq!(drv.pop_used().unwrap().map(|u| u.desc), Some(c.head));
    drop((drv, dev_mem));
}
