//! A first-in first-out queue for the IPC core's data path (a channel's inbound messages, the
//! events towards the normal world): a power-of-two ring of slots whose pushes and pops are a
//! few inlined instructions, growing (rarely, never in steady state) when full.
//!
//! `VecDeque` does the same, but its push is an out-of-line call on every message.

use alloc::vec::Vec;

/// Slots of the first growth.
const FIRST_CAPACITY: usize = 4;

pub(super) struct Fifo<T> {
    /// `slots.len()` is 0 or a power of two; the items are the `len` slots from `head` on
    /// (modulo the length), each `Some`; every other slot is `None`.
    slots: Vec<Option<T>>,
    head: usize,
    len: usize,
}

impl<T> Fifo<T> {
    pub(super) const fn new() -> Self {
        Fifo { slots: Vec::new(), head: 0, len: 0 }
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    #[inline(always)]
    pub(super) fn push_back(&mut self, v: T) {
        if self.len == self.slots.len() {
            self.grow();
        }
        let i = (self.head + self.len) & self.mask();
        if let Some(s) = self.slots.get_mut(i) {
            // The slot is free (`None`, the invariant above): nothing to drop.
            core::mem::forget(s.replace(v));
            self.len += 1;
        }
    }

    pub(super) fn push_front(&mut self, v: T) {
        if self.len == self.slots.len() {
            self.grow();
        }
        let i = self.head.wrapping_sub(1) & self.mask();
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(v);
            self.head = i;
            self.len += 1;
        }
    }

    #[inline(always)]
    pub(super) fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.slots.get_mut(self.head)?.take();
        self.head = (self.head + 1) & self.mask();
        self.len -= 1;
        v
    }

    /// The `i`th item from the front.
    pub(super) fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        self.slots.get((self.head + i) & self.mask())?.as_ref()
    }

    /// The `i`th item from the front.
    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        let at = (self.head + i) & self.mask();
        self.slots.get_mut(at)?.as_mut()
    }

    /// Every item, front first, the queue left empty (its slots kept).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        core::iter::from_fn(move || self.pop_front())
    }

    pub(super) fn clear(&mut self) {
        while self.pop_front().is_some() {}
    }

    /// Keeps the items `keep` accepts, in order.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for _ in 0..self.len {
            if let Some(v) = self.pop_front() {
                if keep(&v) {
                    self.push_back(v);
                }
            }
        }
    }

    /// Twice the slots (the first time [`FIRST_CAPACITY`]), the items moved to the front in
    /// order.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(FIRST_CAPACITY);
        let mut slots: Vec<Option<T>> = (0..cap).map(|_| None).collect();
        for (i, s) in slots.iter_mut().enumerate().take(self.len) {
            let at = (self.head + i) & self.mask();
            *s = self.slots.get_mut(at).and_then(Option::take);
        }
        self.slots = slots;
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Order is kept across growth, wrap-around, pushes at the front, retain and drain; an
    /// index past the items reaches nothing.
    #[test]
    fn keeps_order_across_growth_and_wrap() {
        let mut q = Fifo::new();
        assert_eq!(q.pop_front(), None);
        let mut model = alloc::collections::VecDeque::new();
        for round in 0..50u32 {
            for i in 0..(round % 7) {
                q.push_back(round * 10 + i);
                model.push_back(round * 10 + i);
            }
            if round % 5 == 0 {
                q.push_front(round);
                model.push_front(round);
            }
            for _ in 0..(round % 4) {
                assert_eq!(q.pop_front(), model.pop_front());
            }
            assert_eq!(q.len(), model.len());
            for i in 0..q.len() + 2 {
                assert_eq!(q.get(i), model.get(i));
            }
            if let Some(v) = q.get_mut(0) {
                *v += 1;
                *model.get_mut(0).unwrap() += 1;
            }
        }
        q.retain(|v| v % 3 != 0);
        model.retain(|v| v % 3 != 0);
        assert_eq!(q.drain().collect::<Vec<_>>(), model.drain(..).collect::<Vec<_>>());
        assert!(q.is_empty());
        q.push_back(1);
        q.clear();
        assert_eq!((q.len(), q.get(0)), (0, None));
        assert_eq!(vec![q.pop_front()], [None]);
    }
}
