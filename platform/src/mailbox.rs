//! The Xen inter-domain call transport to a Trusty VM: one page, granted to the Trusty domain,
//! carries a call's registers; a static event channel tells Trusty a call is waiting; the
//! answer comes back in the same page. The normal world polls for the answer (it polls its
//! rings too: Trusty's stack never relies on interrupts, spec trusty-protocol §4).
//!
//! Page layout (little-endian, this project's own; see the README):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MAILBOX_MAGIC`, written once by the guest |
//! | 4 | 4 | request sequence number, written last by the guest |
//! | 8 | 4 | response sequence number, written last by the Trusty VM |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 64 | request: x0..x7 |
//! | 80 | 64 | response: x0..x7 |
//!
//! The page is granted with reference [`MAILBOX_GREF`], so both sides know it without a
//! handshake; every other grant comes after it.

use alloc::sync::Arc;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};

use crate::clock::{Clock, Deadline};
use crate::smc::{Conduit, SmError};

/// "TIPC" in little-endian ASCII.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"TIPC");
/// The grant reference of the mailbox page: the first one after Xen's reserved entries.
pub const MAILBOX_GREF: u32 = 8;
pub const OFF_MAGIC: usize = 0;
pub const OFF_REQ_SEQ: usize = 4;
pub const OFF_RSP_SEQ: usize = 8;
pub const OFF_REQUEST: usize = 16;
pub const OFF_RESPONSE: usize = 80;
/// Bytes of the page the protocol uses.
pub const MAILBOX_LEN: usize = 144;

/// Sends an event on a channel (EVTCHNOP_send on Xen; a model on the host).
pub trait EventChannel: Send + Sync {
    fn notify(&self, port: u32);
}

/// A [`Conduit`] whose calls go through the mailbox.
pub struct MailboxConduit {
    page: NonNull<u8>,
    events: Arc<dyn EventChannel>,
    clock: Arc<dyn Clock>,
    call_port: u32,
    timeout_ms: u64,
    seq: AtomicU32,
    busy: AtomicBool,
}

// SAFETY: the page is owned by this conduit for its lifetime; access is volatile and one call at
// a time (`busy`).
unsafe impl Send for MailboxConduit {}
// SAFETY: as above.
unsafe impl Sync for MailboxConduit {}

impl MailboxConduit {
    /// # Safety
    /// `page` must point to a page-aligned 4 KiB page that stays valid for the conduit's life,
    /// already granted to the Trusty domain with [`MAILBOX_GREF`], and used by nothing else.
    pub unsafe fn new(
        page: NonNull<u8>,
        events: Arc<dyn EventChannel>,
        clock: Arc<dyn Clock>,
        call_port: u32,
        timeout_ms: u64,
    ) -> Self {
        let c = MailboxConduit { page, events, clock, call_port, timeout_ms, seq: AtomicU32::new(0), busy: AtomicBool::new(false) };
        c.write_u32(OFF_MAGIC, MAILBOX_MAGIC);
        c.write_u32(OFF_REQ_SEQ, 0);
        c
    }

    fn word<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + core::mem::size_of::<T>() <= MAILBOX_LEN);
        // SAFETY: every offset used is a constant inside the first MAILBOX_LEN bytes of the page.
        unsafe { self.page.as_ptr().add(off).cast() }
    }

    fn write_u32(&self, off: usize, v: u32) {
        // SAFETY: aligned, in the page (see `word`); volatile because the peer reads it.
        unsafe { self.word::<u32>(off).write_volatile(v.to_le()) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: as in `write_u32`.
        u32::from_le(unsafe { self.word::<u32>(off).read_volatile() })
    }

    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: as in `write_u32`.
        unsafe { self.word::<u64>(off).write_volatile(v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: as in `write_u32`.
        u64::from_le(unsafe { self.word::<u64>(off).read_volatile() })
    }
}

impl Conduit for MailboxConduit {
    fn call(&self, regs: [u64; 8]) -> [u64; 8] {
        let busy = SmError::Busy.code() as u32 as u64;
        if self.busy.swap(true, Ordering::Acquire) {
            return [busy, 0, 0, 0, 0, 0, 0, 0];
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        for (i, r) in regs.iter().enumerate() {
            self.write_u64(OFF_REQUEST + 8 * i, *r);
        }
        // The registers must be visible before the sequence number that publishes them.
        fence(Ordering::Release);
        self.write_u32(OFF_REQ_SEQ, seq);
        fence(Ordering::SeqCst);
        self.events.notify(self.call_port);
        let deadline = Deadline::after_ms(&*self.clock, self.timeout_ms);
        let mut out = [0u64; 8];
        loop {
            if self.read_u32(OFF_RSP_SEQ) == seq {
                fence(Ordering::Acquire);
                for (i, r) in out.iter_mut().enumerate() {
                    *r = self.read_u64(OFF_RESPONSE + 8 * i);
                }
                break;
            }
            if deadline.expired(&*self.clock) {
                log::error!("Trusty VM did not answer call {:#x} within {} ms", regs[0], self.timeout_ms);
                // A VM that does not answer is as good as a busy secure side: the discipline's
                // own deadline turns this into a timeout error.
                out = [busy, 0, 0, 0, 0, 0, 0, 0];
                break;
            }
            self.clock.relax();
        }
        self.busy.store(false, Ordering::Release);
        out
    }
}
