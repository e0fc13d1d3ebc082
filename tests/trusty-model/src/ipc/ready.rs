//! The IPC scheduler's ready queue: which handles may have something to report, per app, so
//! that [`super::Ipc::run`] never rescans idle ports and channels.
//!
//! A handle (port or channel) has something to report when its `signal` flag is set. Rather
//! than track every place that sets it, the maps that hold ports and channels ([`Tracked`])
//! remember which keys were handed out mutably (or inserted) since the scheduler last looked:
//! a flag can only have been raised on one of those. Before it picks the next handle, the
//! scheduler moves the touched handles whose flag is set into their owner's ready list
//! ([`Ready`]), in id order (ports first), which is exactly the order a full scan visited them
//! in. An entry whose flag was cleared, or whose owner changed, since it was queued is dropped
//! when met; a handle whose owner changes is touched, so it is queued again for the new owner.

use alloc::collections::btree_map::{self, BTreeMap};
use alloc::vec::Vec;

use super::{ChanId, PortId};

/// Most distinct keys remembered between two looks; past that, the next look scans them all
/// once (bounded memory whatever a burst touches).
const TOUCHED_MAX: usize = 32;

/// A map that records the keys whose values may have changed: every mutable access and every
/// insertion. Removal needs no record (a queued entry for a missing handle is dropped).
pub(super) struct Tracked<K, V> {
    map: BTreeMap<K, V>,
    touched: Vec<K>,
    /// Too many keys (or a mutable walk over all values): look at every value.
    all: bool,
}

impl<K: Ord + Copy, V> Tracked<K, V> {
    pub(super) fn new() -> Self {
        Tracked { map: BTreeMap::new(), touched: Vec::new(), all: false }
    }

    fn touch(&mut self, k: K) {
        Self::record(&mut self.touched, &mut self.all, k);
    }

    #[inline]
    fn record(touched: &mut Vec<K>, all: &mut bool, k: K) {
        if *all || touched.contains(&k) {
            return;
        }
        if touched.len() >= TOUCHED_MAX {
            *all = true;
            touched.clear();
            return;
        }
        touched.push(k);
    }

    /// Nothing touched since the last look.
    #[inline]
    pub(super) fn is_clean(&self) -> bool {
        !self.all && self.touched.is_empty()
    }

    pub(super) fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    #[inline]
    pub(super) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let v = self.map.get_mut(k)?;
        Self::record(&mut self.touched, &mut self.all, *k);
        Some(v)
    }

    pub(super) fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.touch(k);
        self.map.insert(k, v)
    }

    pub(super) fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn iter(&self) -> btree_map::Iter<'_, K, V> {
        self.map.iter()
    }

    pub(super) fn keys(&self) -> btree_map::Keys<'_, K, V> {
        self.map.keys()
    }

    pub(super) fn values(&self) -> btree_map::Values<'_, K, V> {
        self.map.values()
    }

    /// Every value, mutably: all of them count as touched.
    pub(super) fn values_mut(&mut self) -> btree_map::ValuesMut<'_, K, V> {
        self.all = true;
        self.touched.clear();
        self.map.values_mut()
    }

    /// Moves the keys touched since the last call into `out` (emptied first). `true` means
    /// "all of them": `out` is left empty and the caller must look at every value.
    fn take_touched(&mut self, out: &mut Vec<K>) -> bool {
        out.clear();
        let all = core::mem::replace(&mut self.all, false);
        if !all {
            out.append(&mut self.touched);
        }
        self.touched.clear();
        all
    }
}

/// A handle that may have events for its owner. Ports sort before channels, each by id: the
/// order in which the scheduler has always offered them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Handle {
    Port(PortId),
    Chan(ChanId),
}

/// Per app, the handles that may have events, sorted; with scratch space so that a look
/// allocates nothing once warm.
#[derive(Default)]
pub(super) struct Ready {
    lists: Vec<Vec<Handle>>,
    /// Entries in all lists together.
    queued: usize,
    ports_scratch: Vec<PortId>,
    chans_scratch: Vec<ChanId>,
}

impl Ready {
    fn add(&mut self, apps: usize, owner: usize, h: Handle) {
        // An owner that is no app (a placeholder record) is never scheduled.
        if owner >= apps {
            return;
        }
        if self.lists.len() < apps {
            self.lists.resize_with(apps, Vec::new);
        }
        let list = &mut self.lists[owner];
        if let Err(at) = list.binary_search(&h) {
            list.insert(at, h);
            self.queued += 1;
        }
    }

    /// Whether nothing is queued for any app.
    #[inline]
    pub(super) fn all_idle(&self) -> bool {
        self.queued == 0
    }

    /// Whether nothing is queued for `app`.
    #[inline]
    pub(super) fn idle(&self, app: usize) -> bool {
        self.lists.get(app).map_or(true, Vec::is_empty)
    }

    /// Queues every touched handle whose flag is set, for its current owner (the caller checks
    /// first that something was touched: [`Tracked::is_clean`]).
    #[inline(never)]
    pub(super) fn collect<P, C>(
        &mut self,
        apps: usize,
        ports: &mut Tracked<PortId, P>,
        chans: &mut Tracked<ChanId, C>,
        port_signal: impl Fn(&P) -> Option<usize>,
        chan_signal: impl Fn(&C) -> Option<usize>,
    ) {
        let mut scratch = core::mem::take(&mut self.ports_scratch);
        if ports.take_touched(&mut scratch) {
            for (id, p) in ports.iter() {
                if let Some(owner) = port_signal(p) {
                    self.add(apps, owner, Handle::Port(*id));
                }
            }
        } else {
            for id in scratch.drain(..) {
                if let Some(owner) = ports.get(&id).and_then(&port_signal) {
                    self.add(apps, owner, Handle::Port(id));
                }
            }
        }
        self.ports_scratch = scratch;
        let mut scratch = core::mem::take(&mut self.chans_scratch);
        if chans.take_touched(&mut scratch) {
            for (id, c) in chans.iter() {
                if let Some(owner) = chan_signal(c) {
                    self.add(apps, owner, Handle::Chan(*id));
                }
            }
        } else {
            for id in scratch.drain(..) {
                if let Some(owner) = chans.get(&id).and_then(&chan_signal) {
                    self.add(apps, owner, Handle::Chan(id));
                }
            }
        }
        self.chans_scratch = scratch;
    }

    /// The first queued port of `app` that `valid` confirms; entries it refutes are dropped.
    pub(super) fn first_port(&mut self, app: usize, valid: impl Fn(PortId) -> bool) -> Option<PortId> {
        let list = self.lists.get_mut(app)?;
        while let Some(&Handle::Port(id)) = list.first() {
            if valid(id) {
                return Some(id);
            }
            list.remove(0);
            self.queued -= 1;
        }
        None
    }

    /// The first queued channel of `app` that `valid` confirms; entries it refutes are dropped.
    pub(super) fn first_chan(&mut self, app: usize, valid: impl Fn(ChanId) -> bool) -> Option<ChanId> {
        let list = self.lists.get_mut(app)?;
        let start = list.partition_point(|h| matches!(h, Handle::Port(_)));
        while let Some(&Handle::Chan(id)) = list.get(start) {
            if valid(id) {
                return Some(id);
            }
            list.remove(start);
            self.queued -= 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct H {
        owner: usize,
        signal: bool,
    }

    fn signal(h: &H) -> Option<usize> {
        h.signal.then_some(h.owner)
    }

    /// Only touched handles are looked at, they come out lowest id first (ports before
    /// channels, as a full scan met them), stale entries are dropped, and a handle whose owner
    /// changed is offered to the new owner only.
    #[test]
    fn touched_handles_come_out_in_scan_order_for_their_current_owner() {
        let mut ports: Tracked<PortId, H> = Tracked::new();
        let mut chans: Tracked<ChanId, H> = Tracked::new();
        let mut r = Ready::default();
        for i in 0..4 {
            chans.insert(ChanId(i), H { owner: 0, signal: false });
        }
        ports.insert(PortId(7), H { owner: 0, signal: false });
        r.collect(2, &mut ports, &mut chans, signal, signal);
        assert!(r.all_idle(), "nothing raised");
        assert!(ports.is_clean() && chans.is_clean());
        chans.get_mut(&ChanId(3)).unwrap().signal = true;
        chans.get_mut(&ChanId(1)).unwrap().signal = true;
        ports.get_mut(&PortId(7)).unwrap().signal = true;
        r.collect(2, &mut ports, &mut chans, signal, signal);
        let valid_port = |id: PortId| ports.get(&id).is_some_and(|h| h.signal && h.owner == 0);
        assert_eq!(r.first_port(0, valid_port), Some(PortId(7)));
        let valid_chan = |id: ChanId| chans.get(&id).is_some_and(|h| h.signal && h.owner == 0);
        assert_eq!(r.first_chan(0, valid_chan), Some(ChanId(1)));
        // Channel 1 handled (flag cleared) and channel 3 handed to app 1.
        chans.get_mut(&ChanId(1)).unwrap().signal = false;
        chans.get_mut(&ChanId(3)).unwrap().owner = 1;
        r.collect(2, &mut ports, &mut chans, signal, signal);
        let valid0 = |id: ChanId| chans.get(&id).is_some_and(|h| h.signal && h.owner == 0);
        assert_eq!(r.first_chan(0, valid0), None, "stale entries of app 0 dropped");
        let valid1 = |id: ChanId| chans.get(&id).is_some_and(|h| h.signal && h.owner == 1);
        assert_eq!(r.first_chan(1, valid1), Some(ChanId(3)));
        // A burst past the remembered keys: everything is looked at once, nothing is missed.
        for i in 0..100 {
            chans.insert(ChanId(100 + i), H { owner: 1, signal: i == 99 });
        }
        chans.remove(&ChanId(3));
        r.collect(2, &mut ports, &mut chans, signal, signal);
        let valid1 = |id: ChanId| chans.get(&id).is_some_and(|h| h.signal && h.owner == 1);
        assert_eq!(r.first_chan(1, valid1), Some(ChanId(199)));
        // An app that is not (a placeholder owner) is never queued.
        chans.insert(ChanId(500), H { owner: usize::MAX, signal: true });
        r.collect(2, &mut ports, &mut chans, signal, signal);
        let valid1 = |id: ChanId| chans.get(&id).is_some_and(|h| h.signal && h.owner == 1);
        assert_eq!(r.first_chan(1, valid1), Some(ChanId(199)));
    }
}
