//! Channel records by id, looked up in a few instructions on the data path.
//!
//! The records live in a slab (slots reused after removal) with an ordered index by id, so
//! iteration still goes lowest id first; a direct-mapped cache of recent look-ups names the
//! slot of an id without a tree search. A cache entry is only a hint: it counts only while its
//! slot still holds that very id (ids are never reused), so a removed record is never found
//! through it.

use alloc::collections::btree_map::{self, BTreeMap};
use alloc::vec::Vec;

use super::ChanId;

/// Buckets of the look-up cache (ids are handed out in sequence, so the live ones spread).
const RECENT: usize = 64;

/// No slot.
const NONE: u32 = u32::MAX;

pub(super) struct IdMap<V> {
    slots: Vec<Option<(ChanId, V)>>,
    /// Empty slots, reused by the next insertion.
    free: Vec<usize>,
    index: BTreeMap<ChanId, usize>,
    recent: [u32; RECENT],
}

impl<V> IdMap<V> {
    pub(super) fn new() -> Self {
        IdMap { slots: Vec::new(), free: Vec::new(), index: BTreeMap::new(), recent: [NONE; RECENT] }
    }

    #[inline]
    fn bucket(id: ChanId) -> usize {
        id.0 as usize % RECENT
    }

    /// The slot holding `id`: the cached one if it still holds `id`, else the index's.
    #[inline]
    fn slot_of(&self, id: ChanId) -> Option<usize> {
        let hint = self.recent[Self::bucket(id)] as usize;
        if matches!(self.slots.get(hint), Some(Some((held, _))) if *held == id) {
            return Some(hint);
        }
        self.index.get(&id).copied()
    }

    #[inline]
    pub(super) fn get(&self, id: &ChanId) -> Option<&V> {
        let slot = self.slot_of(*id)?;
        self.slots.get(slot)?.as_ref().map(|(_, v)| v)
    }

    /// The record of `id`: on a cache hit without touching the cache or the index.
    #[inline(always)]
    pub(super) fn get_mut(&mut self, id: &ChanId) -> Option<&mut V> {
        let hint = self.recent[Self::bucket(*id)] as usize;
        if matches!(self.slots.get(hint), Some(Some((held, _))) if held == id) {
            return self.slots.get_mut(hint)?.as_mut().map(|(_, v)| v);
        }
        self.get_mut_slow(id)
    }

    /// [`IdMap::get_mut`] on a cache miss: the index, and the cache updated.
    #[inline(never)]
    fn get_mut_slow(&mut self, id: &ChanId) -> Option<&mut V> {
        let slot = self.index.get(id).copied()?;
        self.recent[Self::bucket(*id)] = slot as u32;
        self.slots.get_mut(slot)?.as_mut().map(|(_, v)| v)
    }

    pub(super) fn insert(&mut self, id: ChanId, v: V) -> Option<V> {
        if let Some(slot) = self.slot_of(id) {
            let old = self.slots.get_mut(slot).and_then(|e| e.replace((id, v)));
            return old.map(|(_, v)| v);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Some(e) = self.slots.get_mut(slot) {
            *e = Some((id, v));
        }
        self.index.insert(id, slot);
        self.recent[Self::bucket(id)] = slot as u32;
        None
    }

    pub(super) fn remove(&mut self, id: &ChanId) -> Option<V> {
        let slot = self.index.remove(id)?;
        let taken = self.slots.get_mut(slot)?.take();
        self.free.push(slot);
        taken.map(|(_, v)| v)
    }

    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Records lowest id first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&ChanId, &V)> {
        self.index.iter().filter_map(|(id, &slot)| self.slots.get(slot)?.as_ref().map(|(_, v)| (id, v)))
    }

    /// Ids, lowest first.
    pub(super) fn keys(&self) -> btree_map::Keys<'_, ChanId, usize> {
        self.index.keys()
    }

    /// Records, lowest id first.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removed id is not found, even through its cache entry, and its slot serves the next
    /// record; ids sharing a cache bucket stay apart; iteration goes lowest id first.
    #[test]
    fn removed_ids_stay_gone_and_shared_buckets_stay_apart() {
        let mut m = IdMap::new();
        for i in [5u32, 5 + RECENT as u32, 1] {
            assert!(m.insert(ChanId(i), i * 10).is_none());
        }
        assert_eq!(m.get(&ChanId(5)), Some(&50));
        assert_eq!(m.get(&ChanId(5 + RECENT as u32)), Some(&((5 + RECENT as u32) * 10)));
        assert_eq!(m.remove(&ChanId(5)), Some(50));
        assert_eq!(m.get(&ChanId(5)), None);
        assert_eq!(m.get_mut(&ChanId(5)), None);
        m.insert(ChanId(200), 2000);
        assert_eq!(m.get(&ChanId(5)), None, "the reused slot holds another id");
        assert_eq!(m.get(&ChanId(200)), Some(&2000));
        assert_eq!(m.insert(ChanId(1), 11), Some(10));
        let ids: Vec<u32> = m.keys().map(|k| k.0).collect();
        assert_eq!(ids, [1, 5 + RECENT as u32, 200]);
        let vals: Vec<u32> = m.values().copied().collect();
        assert_eq!(vals, [11, (5 + RECENT as u32) * 10, 2000]);
        assert_eq!(m.len(), 3);
    }
}
