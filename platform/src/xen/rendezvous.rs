//! The rendezvous page: how a guest without xenstore (a Linux DomU's userspace, where
//! `/dev/xen/gntalloc` picks grant references itself) finds a Trusty VM's event channel and
//! tells it where its mailbox page is. This project's own layout (see the README).
//!
//! The Trusty VM grants one of its own pages to the guest at [`RENDEZVOUS_GREF`], read-write,
//! allocates an unbound event-channel port for the guest (`EVTCHNOP_alloc_unbound`), writes
//! the fields below and, last, [`OFFER_MAGIC`]. The guest maps the page (`/dev/xen/gntdev`),
//! binds the port (`IOCTL_EVTCHN_BIND_INTERDOMAIN`), grants its mailbox page to the Trusty
//! VM (`/dev/xen/gntalloc`), writes that grant reference and, last, [`GUEST_MAGIC`], and
//! signals the port. The Trusty VM maps the mailbox and serves it
//! ([`crate::mailbox`]); it signals the same port when it has answered a call.
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | [`OFFER_MAGIC`], last | Trusty VM |
//! | 4 | 4 | layout version, [`VERSION`] | Trusty VM |
//! | 8 | 4 | the Trusty VM's domain id | Trusty VM |
//! | 12 | 4 | the unbound port the guest binds to | Trusty VM |
//! | 16 | 4 | grant reference of the guest's mailbox page | guest |
//! | 20 | 4 | [`GUEST_MAGIC`], last | guest |
//! | 24 | 4 | status: 0 while waiting, [`STATUS_SERVING`], or a [`STATUS_MAP_FAILED`] | Trusty VM |
//!
//! Each side writes its magic with Release after its other fields, and the reader reads the
//! magic with Acquire before them. Nothing the other side writes is trusted beyond its type:
//! the guest checks the port and domain id it is offered, and the Trusty VM maps only what the
//! guest granted, through the hypervisor.

use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

/// The grant reference of the rendezvous page in the Trusty VM's grant table: the first one
/// after Xen's reserved entries (`GNTTAB_NR_RESERVED_ENTRIES`, `xen/include/public/grant_table.h`).
pub const RENDEZVOUS_GREF: u32 = 8;
/// "TRVM" in little-endian ASCII: the Trusty VM's offer is complete.
pub const OFFER_MAGIC: u32 = u32::from_le_bytes(*b"TRVM");
/// "GUST" in little-endian ASCII: the guest's answer is complete.
pub const GUEST_MAGIC: u32 = u32::from_le_bytes(*b"GUST");
/// The layout described above.
pub const VERSION: u32 = 1;
/// Status: the Trusty VM mapped the mailbox and serves it.
pub const STATUS_SERVING: u32 = 1;
/// Status: the Trusty VM could not map the guest's mailbox grant.
pub const STATUS_MAP_FAILED: u32 = 2;

/// Byte offsets of the fields.
pub mod off {
    /// [`super::OFFER_MAGIC`].
    pub const OFFER_MAGIC: usize = 0;
    /// Layout version.
    pub const VERSION: usize = 4;
    /// The Trusty VM's domain id.
    pub const VM_DOMID: usize = 8;
    /// The unbound port offered to the guest.
    pub const PORT: usize = 12;
    /// The guest's mailbox grant reference.
    pub const MAILBOX_GREF: usize = 16;
    /// [`super::GUEST_MAGIC`].
    pub const GUEST_MAGIC: usize = 20;
    /// The Trusty VM's status.
    pub const STATUS: usize = 24;
}

/// Bytes of the page the protocol uses.
pub const RENDEZVOUS_LEN: usize = 28;

/// What the Trusty VM offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The Trusty VM's domain id, as it says.
    pub vm_domid: u16,
    /// The unbound event-channel port to bind to.
    pub port: u32,
}

/// Why an offer cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RendezvousError {
    /// The page does not (yet) carry [`OFFER_MAGIC`].
    NoOffer,
    /// A layout version this code does not know.
    Version(u32),
    /// A domain id at or above DOMID_FIRST_RESERVED.
    BadDomid(u32),
}

impl core::fmt::Display for RendezvousError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RendezvousError::NoOffer => write!(f, "the Trusty VM's rendezvous page carries no offer"),
            RendezvousError::Version(v) => write!(f, "rendezvous page layout version {v}, expected {VERSION}"),
            RendezvousError::BadDomid(d) => write!(f, "rendezvous page names domain {d}, a reserved id"),
        }
    }
}

/// One side's view of a mapped rendezvous page.
pub struct RendezvousPage {
    page: NonNull<u8>,
}

impl RendezvousPage {
    /// # Safety
    /// `page` must point to a 4-byte-aligned mapping of at least [`RENDEZVOUS_LEN`] bytes
    /// that stays valid while this value lives; the other side may write it at any time.
    pub unsafe fn new(page: NonNull<u8>) -> Self {
        RendezvousPage { page }
    }

    fn read(&self, off: usize) -> u32 {
        debug_assert!(off + 4 <= RENDEZVOUS_LEN);
        // SAFETY: every offset is a constant below RENDEZVOUS_LEN, 4-aligned (see `new`).
        u32::from_le(unsafe { self.page.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    fn write(&self, off: usize, v: u32) {
        debug_assert!(off + 4 <= RENDEZVOUS_LEN);
        // SAFETY: as in `read`.
        unsafe { self.page.as_ptr().add(off).cast::<u32>().write_volatile(v.to_le()) }
    }

    /// Trusty VM: publishes the offer (the guest may read it as soon as the magic lands).
    pub fn offer(&self, offer: Offer) {
        for off in [off::MAILBOX_GREF, off::GUEST_MAGIC, off::STATUS, off::OFFER_MAGIC] {
            self.write(off, 0);
        }
        self.write(off::VERSION, VERSION);
        self.write(off::VM_DOMID, u32::from(offer.vm_domid));
        self.write(off::PORT, offer.port);
        // Release: the fields above are visible before the magic (paired with `read_offer`).
        fence(Ordering::Release);
        self.write(off::OFFER_MAGIC, OFFER_MAGIC);
    }

    /// Guest: reads the offer, if complete and well-formed.
    pub fn read_offer(&self) -> Result<Offer, RendezvousError> {
        if self.read(off::OFFER_MAGIC) != OFFER_MAGIC {
            return Err(RendezvousError::NoOffer);
        }
        fence(Ordering::Acquire);
        let version = self.read(off::VERSION);
        if version != VERSION {
            return Err(RendezvousError::Version(version));
        }
        let domid = self.read(off::VM_DOMID);
        let vm_domid = u16::try_from(domid)
            .ok()
            .filter(|d| u32::from(*d) < crate::facts::DOMID_FIRST_RESERVED)
            .ok_or(RendezvousError::BadDomid(domid))?;
        Ok(Offer { vm_domid, port: self.read(off::PORT) })
    }

    /// Guest: names its mailbox grant (the Trusty VM may map it as soon as the magic lands).
    pub fn answer(&self, mailbox_gref: u32) {
        self.write(off::MAILBOX_GREF, mailbox_gref);
        fence(Ordering::Release);
        self.write(off::GUEST_MAGIC, GUEST_MAGIC);
    }

    /// Trusty VM: the guest's mailbox grant reference, once the guest has answered.
    pub fn read_answer(&self) -> Option<u32> {
        if self.read(off::GUEST_MAGIC) != GUEST_MAGIC {
            return None;
        }
        fence(Ordering::Acquire);
        Some(self.read(off::MAILBOX_GREF))
    }

    /// Trusty VM: says whether it serves the mailbox ([`STATUS_SERVING`], [`STATUS_MAP_FAILED`]).
    pub fn set_status(&self, status: u32) {
        fence(Ordering::Release);
        self.write(off::STATUS, status);
    }

    /// Guest: the Trusty VM's status word (0 while it has not looked at the answer).
    pub fn status(&self) -> u32 {
        let s = self.read(off::STATUS);
        fence(Ordering::Acquire);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zeroed page, leaked for the test: the view and the raw writes below share one pointer.
    fn page() -> (*mut u32, RendezvousPage) {
        let mem = alloc::boxed::Box::into_raw(alloc::boxed::Box::new([0u32; 1024])).cast::<u32>();
        // SAFETY: leaked, so valid for the whole test; 4-aligned.
        let view = unsafe { RendezvousPage::new(NonNull::new(mem.cast()).unwrap()) };
        (mem, view)
    }

    fn poke(mem: *mut u32, off: usize, v: u32) {
        // SAFETY: `off` is one of the protocol's offsets, inside the leaked page.
        unsafe { mem.add(off / 4).write_volatile(v) }
    }

    #[test]
    fn an_offer_and_an_answer_round_trip() {
        let (_mem, p) = page();
        assert_eq!(p.read_offer(), Err(RendezvousError::NoOffer));
        assert_eq!(p.read_answer(), None);
        p.offer(Offer { vm_domid: 1, port: 5 });
        assert_eq!(p.read_offer(), Ok(Offer { vm_domid: 1, port: 5 }));
        assert_eq!(p.read_answer(), None);
        p.answer(11);
        assert_eq!(p.read_answer(), Some(11));
        assert_eq!(p.status(), 0);
        p.set_status(STATUS_SERVING);
        assert_eq!(p.status(), STATUS_SERVING);
    }

    #[test]
    fn a_malformed_offer_is_refused() {
        let (mem, p) = page();
        p.offer(Offer { vm_domid: 1, port: 5 });
        poke(mem, off::VERSION, 2);
        assert_eq!(p.read_offer(), Err(RendezvousError::Version(2)));
        poke(mem, off::VERSION, VERSION);
        poke(mem, off::VM_DOMID, 0x7ff0);
        assert_eq!(p.read_offer(), Err(RendezvousError::BadDomid(0x7ff0)));
        poke(mem, off::VM_DOMID, 0x1_0001);
        assert_eq!(p.read_offer(), Err(RendezvousError::BadDomid(0x1_0001)));
    }

    #[test]
    fn a_new_offer_clears_a_stale_answer() {
        let (_mem, p) = page();
        p.offer(Offer { vm_domid: 1, port: 5 });
        p.answer(9);
        p.set_status(STATUS_MAP_FAILED);
        p.offer(Offer { vm_domid: 1, port: 6 });
        assert_eq!(p.read_answer(), None);
        assert_eq!(p.status(), 0);
    }
}
