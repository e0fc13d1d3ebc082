//! The IPC scheduler's ready lists: per app, the handles that have something to report, so
//! that [`super::Ipc::run`] never rescans idle ports and channels.
//!
//! A handle (port or channel) has something to report when its `signal` flag is set. Every
//! place that raises a flag also queues the handle for its owner ([`Ready::raise`]), and a
//! handle whose owner changes while raised is queued for the new owner: the lists are driven
//! by events only, nothing is scanned to find them. The scheduler takes handles from an app's
//! list lowest id first, ports before channels (the order in which the model's earlier full
//! scan met them, so runs stay deterministic and unchanged); an entry whose flag was cleared,
//! or whose owner changed, since it was queued is dropped when met. Debug builds check after
//! every scheduler run that no raised handle is missing from its owner's list.

use alloc::vec::Vec;

use super::{ChanId, PortId};

/// A handle that may have events for its owner. Ports sort before channels, each by id: the
/// order in which the scheduler has always offered them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Handle {
    Port(PortId),
    Chan(ChanId),
}

/// Per app, the handles that may have events.
#[derive(Default)]
pub(super) struct Ready {
    /// Sorted highest first, so the next handle to offer is the last (taken in O(1)).
    lists: Vec<Vec<Handle>>,
    /// Entries in all lists together.
    queued: usize,
    /// Bit `app` is set while the list of app `app` (below 64) is not empty: the scheduler
    /// finds the next app with work without looking at idle ones. Apps from 64 on are looked
    /// at one by one.
    busy: u64,
    /// Entries taken by [`Ready::take_next`] (valid or stale): the
    /// scheduler's work, which stays proportional to events, not to open handles.
    visits: u64,
}

impl Ready {
    /// Queues `h` for `owner`, once (a handle already queued stays where it is).
    #[inline(always)]
    pub(super) fn raise(&mut self, apps: usize, owner: usize, h: Handle) {
        // The usual case, inline: an app with nothing queued and room in its list.
        if owner < apps && owner < 64 {
            if let Some(list) = self.lists.get_mut(owner).filter(|l| l.is_empty() && l.capacity() > 0) {
                list.push(h);
                self.queued += 1;
                self.busy |= 1 << owner;
                return;
            }
        }
        self.raise_any(apps, owner, h);
    }

    /// [`Ready::raise`] in every case.
    #[inline(never)]
    fn raise_any(&mut self, apps: usize, owner: usize, h: Handle) {
        // An owner that is no app (a placeholder record) is never scheduled.
        if owner >= apps {
            return;
        }
        if self.lists.len() < apps {
            self.lists.resize_with(apps, Vec::new);
        }
        let list = &mut self.lists[owner];
        // Most lists hold zero or one entry: a handle lower than all needs no search.
        if list.last().map_or(true, |last| h < *last) {
            list.push(h);
            self.queued += 1;
        } else if let Err(at) = list.binary_search_by(|x| h.cmp(x)) {
            list.insert(at, h);
            self.queued += 1;
        }
        if owner < 64 {
            self.busy |= 1 << owner;
        }
    }

    /// The lowest app numbered `from` or above with something queued.
    #[inline]
    pub(super) fn next_busy(&self, from: usize) -> Option<usize> {
        if from < 64 {
            let bits = self.busy & (u64::MAX << from);
            if bits != 0 {
                return Some(bits.trailing_zeros() as usize);
            }
        }
        (from.max(64)..self.lists.len()).find(|&app| !self.idle(app))
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

    /// Whether `h` is queued for `owner` (the debug check and the tests).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn contains(&self, owner: usize, h: Handle) -> bool {
        self.lists.get(owner).is_some_and(|l| l.binary_search_by(|x| h.cmp(x)).is_ok())
    }

    /// Whether `busy` names exactly the apps below 64 whose lists are not empty (the debug
    /// check and the tests).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn busy_matches_lists(&self) -> bool {
        (0..64).all(|app| (self.busy >> app) & 1 == u64::from(!self.idle(app)))
    }

    /// Entries looked at so far (see the field).
    pub(super) fn visits(&self) -> u64 {
        self.visits
    }

    /// Takes the next handle queued for `app`: its lowest port, else its lowest channel (the
    /// list is sorted so that this is its last entry). The caller checks that the handle is
    /// still raised and this app's, and drops it otherwise (a stale entry).
    #[inline]
    pub(super) fn take_next(&mut self, app: usize) -> Option<Handle> {
        let list = self.lists.get_mut(app)?;
        let h = list.pop()?;
        self.visits += 1;
        self.queued -= 1;
        if list.is_empty() && app < 64 {
            self.busy &= !(1 << app);
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raised handles come out lowest id first, ports before channels, each once (a stale
    /// entry too: the scheduler drops it); an owner that is no app is never queued.
    #[test]
    fn raised_handles_come_out_in_scan_order_once() {
        let mut r = Ready::default();
        assert!(r.all_idle());
        r.raise(2, 0, Handle::Chan(ChanId(3)));
        r.raise(2, 0, Handle::Chan(ChanId(1)));
        r.raise(2, 0, Handle::Chan(ChanId(3)));
        r.raise(2, 0, Handle::Port(PortId(7)));
        r.raise(2, 1, Handle::Chan(ChanId(9)));
        r.raise(2, usize::MAX, Handle::Chan(ChanId(5)));
        assert!(r.contains(0, Handle::Chan(ChanId(3))));
        assert!(!r.contains(1, Handle::Chan(ChanId(5))));
        assert_eq!(r.take_next(0), Some(Handle::Port(PortId(7))));
        assert_eq!(r.take_next(0), Some(Handle::Chan(ChanId(1))));
        assert_eq!(r.take_next(0), Some(Handle::Chan(ChanId(3))));
        assert_eq!(r.take_next(0), None);
        assert!(r.idle(0));
        assert!(!r.all_idle());
        assert_eq!(r.take_next(1), Some(Handle::Chan(ChanId(9))));
        assert!(r.all_idle());
        assert_eq!(r.visits(), 4);
        assert_eq!(r.next_busy(0), None);
    }

    /// `next_busy` names exactly the apps with something queued, lowest first from where it
    /// is asked, below 64 (the bit set) and above; an app leaves it when its list empties.
    #[test]
    fn next_busy_follows_the_lists() {
        let mut r = Ready::default();
        let apps = 200;
        for app in [3usize, 63, 64, 130, 199] {
            r.raise(apps, app, Handle::Chan(ChanId(app as u32)));
        }
        r.raise(apps, 3, Handle::Port(PortId(1)));
        let mut seen = Vec::new();
        let mut from = 0;
        while let Some(app) = r.next_busy(from) {
            seen.push(app);
            from = app + 1;
        }
        assert_eq!(seen, [3, 63, 64, 130, 199]);
        assert_eq!(r.next_busy(4), Some(63));
        assert_eq!(r.next_busy(65), Some(130));
        assert_eq!(r.next_busy(200), None);
        // App 3 holds a port and a channel: busy until both are taken.
        assert_eq!(r.take_next(3), Some(Handle::Port(PortId(1))));
        assert_eq!(r.next_busy(0), Some(3));
        assert_eq!(r.take_next(3), Some(Handle::Chan(ChanId(3))));
        assert_eq!(r.next_busy(0), Some(63));
        // Taking the last entry empties the list, whatever the caller makes of it.
        assert_eq!(r.take_next(63), Some(Handle::Chan(ChanId(63))));
        assert_eq!(r.take_next(64), Some(Handle::Chan(ChanId(64))));
        assert_eq!(r.next_busy(0), Some(130));
        for app in 0..apps {
            assert_eq!(r.next_busy(app) == Some(app), !r.idle(app), "app {app}");
        }
        assert!(r.busy_matches_lists());
    }
}
