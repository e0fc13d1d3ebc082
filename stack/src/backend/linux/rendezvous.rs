//! Meeting the Trusty VM from Linux userspace, where there is no xenstore and no way to bind a
//! static event channel (Linux 6.1 has no IOCTL_EVTCHN_BIND_STATIC; linux-domu.md §4): the
//! rendezvous page the Trusty VM offers at [`RENDEZVOUS_GREF`]
//! ([`trusty_platform::xen::rendezvous`]).
//!
//! 1. Map the Trusty VM's page at [`RENDEZVOUS_GREF`] through `/dev/xen/gntdev` (retried until
//!    the offer's deadline: the Trusty VM may not have granted it yet).
//! 2. Wait (bounded) for its offer: its domain id and an unbound port.
//! 3. Bind that port (IOCTL_EVTCHN_BIND_INTERDOMAIN) and drain the one event Xen raises on
//!    the new local port right away (linux-domu.md §7 gotcha 4).
//! 4. Allocate the mailbox page from the gntalloc pool (granted at allocation), answer with its
//!    grant reference, notify.
//! 5. Wait (bounded) for the Trusty VM's status: [`STATUS_SERVING`], or
//!    [`STATUS_MAP_FAILED`] (an error).

use std::sync::Arc;
use std::time::{Duration, Instant};

use trusty_platform::facts::PORTS_FROM_RENDEZVOUS;
use trusty_platform::mailbox::{MAILBOX_MAGIC, OFF_MAGIC as MAILBOX_OFF_MAGIC};
use trusty_platform::mem::{Access, PageAllocator, Sharer};
use trusty_platform::xen::grant::decode_grant_id;
use trusty_platform::xen::rendezvous::{
    RendezvousError, RendezvousPage, RENDEZVOUS_GREF, STATUS_MAP_FAILED, STATUS_SERVING,
};

use super::dev::XenDevices;
use super::pool::{EvtchnEvents, GntallocPool, GntallocSharer};
use crate::{TrustyVm, TrustyVmLink, VmLink};

/// How long to wait for the Trusty VM's offer by default (it may still be booting).
pub const DEFAULT_OFFER_TIMEOUT_MS: u64 = 10_000;
/// How long to wait for the Trusty VM to map the mailbox and say so, by default.
pub const DEFAULT_SERVE_TIMEOUT_MS: u64 = 5_000;
/// How long the spurious event after the bind may take to show (it is raised by the bind
/// hypercall itself, so it is normally there at once).
const DRAIN_MS: i32 = 20;
/// Polls of the rendezvous page while no event channel is bound yet.
const OFFER_POLL: Duration = Duration::from_millis(10);
/// Pause between two attempts to map the rendezvous page.
const MAP_RETRY: Duration = Duration::from_millis(50);
/// Longest single block while waiting for the status (the Trusty VM signals when it sets it).
const STATUS_SLICE_MS: u64 = 50;

/// The Linux backend's way to a Trusty VM.
pub struct RendezvousLink {
    dev: Arc<dyn XenDevices>,
    pool: Arc<GntallocPool>,
    /// Wait for the offer at most this long.
    pub offer_timeout_ms: u64,
    /// Wait for the status at most this long.
    pub serve_timeout_ms: u64,
}

impl RendezvousLink {
    /// A link through `dev`, with the mailbox and every later share from `pool`.
    pub fn new(dev: Arc<dyn XenDevices>, pool: Arc<GntallocPool>) -> Self {
        RendezvousLink {
            dev,
            pool,
            offer_timeout_ms: DEFAULT_OFFER_TIMEOUT_MS,
            serve_timeout_ms: DEFAULT_SERVE_TIMEOUT_MS,
        }
    }

    /// Steps 2 to 5; the offer must come before `offer_deadline` (the one the mapping had).
    fn meet(
        &self,
        vm: TrustyVm,
        page: &RendezvousPage,
        allocator: &mut dyn PageAllocator,
        offer_deadline: Instant,
    ) -> Result<VmLink, String> {
        let domid = vm.backend_domid;
        // 2. The offer.
        let start = Instant::now();
        let offer = loop {
            match page.read_offer() {
                Ok(o) => break o,
                Err(RendezvousError::NoOffer) if Instant::now() < offer_deadline => std::thread::sleep(OFFER_POLL),
                Err(RendezvousError::NoOffer) => {
                    return Err(format!(
                        "no offer on domain {domid}'s rendezvous page (grant {RENDEZVOUS_GREF}) within {} ms",
                        self.offer_timeout_ms
                    ))
                }
                Err(e) => return Err(format!("domain {domid}'s rendezvous page: {e}")),
            }
        };
        if offer.vm_domid != domid {
            return Err(format!(
                "the rendezvous page of domain {domid} says it is domain {}: the command line names the wrong domain",
                offer.vm_domid
            ));
        }
        // 3. The event channel.
        let port = self
            .dev
            .bind_interdomain(domid, offer.port)
            .map_err(|e| format!("binding domain {domid}'s port {}: {e}", offer.port))?;
        let mut drained = 0;
        loop {
            let got = self.dev.wait_events(DRAIN_MS).map_err(|e| format!("draining event channel {port}: {e}"))?;
            if got.is_empty() || drained > 8 {
                break;
            }
            drained += got.len();
        }
        log::debug!("bound domain {domid}'s port {} as local port {port}; {drained} event(s) drained", offer.port);
        // 4. The mailbox, granted at allocation; its grant reference goes on the page.
        let mailbox = allocator.alloc_zeroed(1).ok_or("no gntalloc page for the mailbox (see the log)")?;
        let mut sharer = GntallocSharer(self.pool.clone());
        let id = sharer.share(&[mailbox.range()], Access::ReadWrite).map_err(|e| format!("granting the mailbox: {e}"))?;
        let gref = decode_grant_id(id.0).ok_or("granting the mailbox gave no grant id")?;
        // The mailbox carries its magic before the Trusty VM may map it (the conduit writes it
        // again when it takes the page over).
        // SAFETY: the page is ours, mapped and 4 KiB; offset 0 is 4-aligned.
        unsafe {
            mailbox.vaddr().as_ptr().add(MAILBOX_OFF_MAGIC).cast::<u32>().write_volatile(MAILBOX_MAGIC.to_le());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        page.answer(gref);
        self.dev.notify(port).map_err(|e| format!("notifying domain {domid}: {e}"))?;
        // 5. The status.
        let deadline = Instant::now() + Duration::from_millis(self.serve_timeout_ms);
        loop {
            match page.status() {
                STATUS_SERVING => break,
                STATUS_MAP_FAILED => {
                    return Err(format!("domain {domid} could not map our mailbox (grant {gref}); it says STATUS_MAP_FAILED"))
                }
                0 => {}
                other => return Err(format!("domain {domid}'s rendezvous page has an unknown status {other}")),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "domain {domid} did not say it serves our mailbox (grant {gref}) within {} ms",
                    self.serve_timeout_ms
                ));
            }
            let left = (deadline - now).as_millis().min(u128::from(STATUS_SLICE_MS)).max(1) as i32;
            self.dev.wait_events(left).map_err(|e| format!("waiting on event channel {port}: {e}"))?;
        }
        log::info!(
            "Trusty VM domain {domid}: mailbox grant {gref}, event channel {port} (its port {}), {} ms",
            offer.port,
            start.elapsed().as_millis()
        );
        Ok(VmLink {
            sharer: Box::new(sharer),
            mailbox: mailbox.vaddr(),
            events: Arc::new(EvtchnEvents(self.dev.clone())),
            call_port: port,
        })
    }
}

impl TrustyVmLink for RendezvousLink {
    fn connect(&mut self, vm: TrustyVm, allocator: &mut dyn PageAllocator) -> Result<VmLink, String> {
        if vm.call_evtchn != PORTS_FROM_RENDEZVOUS {
            return Err(format!(
                "static event channels ({}, {}) cannot be bound from Linux userspace (no IOCTL_EVTCHN_BIND_STATIC); \
                 name the Trusty VM with trusty-ipc-stack.trusty-vm={} alone: its ports come from its rendezvous page",
                vm.call_evtchn, vm.kick_evtchn, vm.backend_domid
            ));
        }
        if vm.backend_domid != self.pool.domid() {
            return Err(format!(
                "the pages are granted to domain {}, not to the Trusty VM's domain {}",
                self.pool.domid(),
                vm.backend_domid
            ));
        }
        // 1. The rendezvous page. The Trusty VM may not have granted it yet (still booting):
        // Xen refuses the mapping then, so it is retried until the offer's deadline.
        let deadline = Instant::now() + Duration::from_millis(self.offer_timeout_ms);
        let map = loop {
            match self.dev.map_foreign(vm.backend_domid, RENDEZVOUS_GREF) {
                Ok(m) => break m,
                Err(e) if Instant::now() < deadline => {
                    log::debug!("domain {}'s rendezvous page not mappable yet: {e}", vm.backend_domid);
                    std::thread::sleep(MAP_RETRY);
                }
                Err(e) => {
                    return Err(format!(
                        "mapping domain {}'s rendezvous page (grant {RENDEZVOUS_GREF}), retried for {} ms: {e} \
                         (is that domain a Trusty VM? grants between DomUs need xsm=dummy)",
                        vm.backend_domid, self.offer_timeout_ms
                    ))
                }
            }
        };
        // SAFETY: a mapping of one whole page, page-aligned, kept until the unmap below; the
        // Trusty VM writes it concurrently, which RendezvousPage reads and writes volatile.
        let page = unsafe { RendezvousPage::new(map.ptr) };
        let r = self.meet(vm, &page, allocator, deadline);
        // The page is not needed once the mailbox is served (or the meeting failed).
        self.dev.unmap_foreign(map);
        r
    }

    fn grant_sharer(&mut self, backend_domid: u16, _allocator: &mut dyn PageAllocator) -> Result<Box<dyn Sharer>, String> {
        if backend_domid != self.pool.domid() {
            return Err(format!("the gntalloc pool grants to domain {}, not {backend_domid}", self.pool.domid()));
        }
        Ok(Box::new(GntallocSharer(self.pool.clone())))
    }
}
