//! The Trusty model as a Xen DomU: it serves the guest's calls from the granted mailbox page
//! and reaches the guest's memory only through grant mappings.

use alloc::sync::Arc;

use trusty_model::model::Path;
use trusty_model::raw::RawPhysMem;
use trusty_model::{Model, ModelConfig};
use trusty_platform::clock::Clock;
use core::sync::atomic::{fence, Ordering};

use trusty_platform::mem::PAGE_SIZE;
use trusty_platform::xen::hypercall::{self, Hypercall, XenError};

use core::alloc::Layout;
use core::ptr::NonNull;

use trusty_platform::xen::grant::{GrantError, GrantTable};
use trusty_platform::xen::rendezvous::{Offer, RendezvousPage, RENDEZVOUS_GREF, STATUS_MAP_FAILED, STATUS_SERVING};

use crate::xen::XenGrantMapper;
use trusty_stack::backend::bare::{grant_table_frame, GRANT_WINDOW};

/// Where grants are mapped: inside the first extended region Xen gives a 64 MiB DomU.
pub const GRANT_MAP_WINDOW: u64 = 0x8000_0000;
/// Pages of that window.
pub const GRANT_MAP_SLOTS: usize = 1024;

/// A Trusty VM: the model, its memory (`own_ram` plus the grant window) and grant mapper.
///
/// # Safety
/// `own_ram` must be this domain's RAM as `(base, len)`, and the grant window must be unused
/// guest-physical space, for the program's whole life.
pub unsafe fn trusty_vm(domid: u16, guest: u16, own_ram: (u64, u64), h: Arc<dyn Hypercall>, clock: Arc<dyn Clock>) -> Model {
    let window = (GRANT_MAP_WINDOW, (GRANT_MAP_SLOTS * trusty_platform::mem::PAGE_SIZE) as u64);
    // SAFETY: the caller guarantees both ranges (own RAM; the window, mapped by Xen on demand).
    let phys = unsafe { RawPhysMem::new(alloc::vec![own_ram, window]) };
    let cfg = ModelConfig { path: Path::XenVm { domid }, ..Default::default() };
    let mut model = Model::new(cfg, Arc::new(phys), clock);
    model.set_grant_mapper(alloc::boxed::Box::new(XenGrantMapper::new(h, guest, GRANT_MAP_WINDOW, GRANT_MAP_SLOTS)));
    model
}

/// Where the VM maps its shared_info page (unused guest-physical space; qemu-xen.md §4).
pub const SHARED_INFO: u64 = 0x3910_0000;
/// Offset of `evtchn_pending[]` in shared_info on Arm: one 48-byte vcpu_info precedes it
/// (qemu-xen.md §4).
const EVTCHN_PENDING: u64 = 48;

/// Sleeping until the guest signals the call event channel.
pub struct CallEvent {
    h: Arc<dyn Hypercall>,
    port: u32,
    /// Signal the port after each answer (a guest that sleeps on its event-channel fd, as a
    /// Linux DomU's userspace does, waits for it).
    signal_answers: bool,
}

impl CallEvent {
    /// Maps shared_info at [`SHARED_INFO`] (to clear the port's pending bit before sleeping).
    pub fn new(h: Arc<dyn Hypercall>, port: u32) -> Result<CallEvent, XenError> {
        hypercall::add_to_physmap(&*h, hypercall::XENMAPSPACE_SHARED_INFO, 0, SHARED_INFO / PAGE_SIZE as u64)?;
        Ok(CallEvent { h, port, signal_answers: false })
    }

    /// Signals the port (EVTCHNOP_send) when answers are to be signalled.
    fn answered(&self) {
        if self.signal_answers {
            if let Err(e) = hypercall::evtchn_send(&*self.h, self.port) {
                log::warn!("EVTCHNOP_send({}) failed: {e:?}", self.port);
            }
        }
    }

    /// Clears the port's pending bit. A plain read-modify-write: exclusives do not work with the
    /// MMU off (qemu-xen.md gotcha 5); a bit Xen sets meanwhile for this port is caught by the
    /// caller's re-check of the mailbox, and no other port is waited on.
    fn clear(&self) {
        let word = (SHARED_INFO + EVTCHN_PENDING + u64::from(self.port / 64) * 8) as usize as *mut u64;
        // SAFETY: shared_info is mapped at SHARED_INFO for good (`new`); the word lies in it.
        unsafe { word.write_volatile(word.read_volatile() & !(1u64 << (self.port % 64))) };
        fence(Ordering::SeqCst);
    }

    fn wait(&self) {
        let mut ports = [self.port];
        if let Err(e) = hypercall::sched_poll(&*self.h, &mut ports) {
            log::warn!("SCHEDOP_poll failed: {e:?}");
        }
    }
}

/// How long the VM keeps polling its mailbox after its last answer before it sleeps in
/// SCHEDOP_poll (a wake-up costs milliseconds under a loaded TCG host).
const LINGER_NS: u64 = 2_000_000;

/// What the serving loop did, reported every 256 calls.
#[derive(Default)]
struct ServeStats {
    served: u64,
    serve_ns: u64,
    background_ns: u64,
    sleeps: u64,
    sleep_ns: u64,
}

/// Serves calls for ever. With service timers armed (or work pending) it keeps running; when
/// idle for [`LINGER_NS`] after its last answer it clears the call event, checks the mailbox
/// once more, and sleeps in SCHEDOP_poll until
/// the guest signals the next call. Faults are reported once each.
pub fn serve(model: &mut Model, event: Option<&CallEvent>, clock: &dyn Clock, report: fn(core::fmt::Arguments<'_>)) -> ! {
    serve_with(model, event, clock, report, |_| {})
}

/// [`serve`], calling `each_wake` whenever it wakes or serves (the rendezvous checks for a
/// new answer there).
fn serve_with(
    model: &mut Model,
    event: Option<&CallEvent>,
    clock: &dyn Clock,
    report: fn(core::fmt::Arguments<'_>),
    mut each_wake: impl FnMut(&mut Model),
) -> ! {
    let mut reported = 0;
    let mut st = ServeStats::default();
    let mut last_active = 0u64;
    loop {
        each_wake(model);
        let t0 = clock.now_ns();
        let mut served = model.serve_mailbox();
        let t1 = clock.now_ns();
        if served {
            last_active = t1;
            st.served += 1;
            st.serve_ns += t1.saturating_sub(t0);
            if let Some(ev) = event {
                ev.answered();
            }
        }
        if !served {
            model.run_background();
            st.background_ns += clock.now_ns().saturating_sub(t1);
        }
        if served && st.served % 256 == 0 {
            report(format_args!(
                "trusty-vm: {} calls: serve {} us, background {} us, sleeps {} ({} us)",
                st.served,
                st.serve_ns / 1000,
                st.background_ns / 1000,
                st.sleeps,
                st.sleep_ns / 1000
            ));
        }
        let faults = model.faults();
        for f in &faults[reported..] {
            report(format_args!("trusty-vm: {f}"));
        }
        reported = faults.len();
        if served {
            continue;
        }
        match event {
            // Calls come in bursts (a kick, then the rx kick after the reply): keep polling a
            // while, so the next one needs no wake-up from SCHEDOP_poll.
            Some(_) if clock.now_ns().saturating_sub(last_active) < LINGER_NS => clock.relax(),
            Some(ev) if !model.has_pending_work() && model.next_deadline().is_none() => {
                ev.clear();
                served = model.serve_mailbox();
                if served {
                    ev.answered();
                } else {
                    let t = clock.now_ns();
                    ev.wait();
                    st.sleeps += 1;
                    st.sleep_ns += clock.now_ns().saturating_sub(t);
                }
            }
            // Timers need time to pass, not events: keep running.
            _ => clock.relax(),
        }
    }
}

/// Rendezvous mode (`trusty-vm.rendezvous=1`): for a guest that picks its own grant
/// references (a Linux DomU's userspace through `/dev/xen/gntalloc`). The VM grants one of its
/// own pages to the guest at [`RENDEZVOUS_GREF`], allocates an unbound event-channel port for
/// it, offers both there ([`RendezvousPage::offer`]), and serves the mailbox at the grant
/// reference the guest answers with; it signals the port after each answer.
pub struct Rendezvous {
    page: RendezvousPage,
    event: CallEvent,
    /// The mailbox reference being served (0: none yet; references below 8 are reserved).
    serving: u32,
}

/// Why the rendezvous could not be offered.
#[derive(Debug)]
pub enum RendezvousSetupError {
    /// A hypercall failed (`EVTCHNOP_alloc_unbound` needs `xsm=dummy` between two DomUs).
    Xen(&'static str, XenError),
    /// The grant-table entry could not be written.
    Grant(GrantError),
    /// The grant-table frame is unusable, or no page was left for the rendezvous page.
    Memory(&'static str),
}

impl core::fmt::Display for RendezvousSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RendezvousSetupError::Xen(what, e) => write!(f, "{what}: {e}"),
            RendezvousSetupError::Grant(e) => write!(f, "granting the rendezvous page: {e:?}"),
            RendezvousSetupError::Memory(what) => f.write_str(what),
        }
    }
}

impl Rendezvous {
    /// Grants a fresh page of this domain (`domid`) to `guest` at [`RENDEZVOUS_GREF`],
    /// allocates an unbound port for `guest`, maps shared_info (to sleep on that port) and
    /// publishes the offer.
    pub fn offer(h: Arc<dyn Hypercall>, domid: u16, guest: u16) -> Result<Rendezvous, RendezvousSetupError> {
        let (table, len) = grant_table_frame(&*h, GRANT_WINDOW)
            .map_err(|e| RendezvousSetupError::Xen("mapping grant-table frame 0 (XENMEM_add_to_physmap)", e))?;
        // SAFETY: frame 0 of this domain's grant table is mapped at GRANT_WINDOW for good, and
        // nothing else in this image writes it.
        let mut table = unsafe { GrantTable::new(table, len) }
            .map_err(|_| RendezvousSetupError::Memory("the grant-table frame holds no usable entry"))?;
        let layout = Layout::from_size_align(PAGE_SIZE, PAGE_SIZE)
            .map_err(|_| RendezvousSetupError::Memory("no page layout for the rendezvous page"))?;
        // SAFETY: a non-zero size; the page is leaked (granted to the guest for the VM's life).
        let page = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })
            .ok_or(RendezvousSetupError::Memory("out of heap for the rendezvous page"))?;
        // The MMU is off: the page's address is its guest-physical address.
        let frame = (page.as_ptr() as u64 / PAGE_SIZE as u64) as u32;
        table.grant_access(RENDEZVOUS_GREF, guest, frame, false).map_err(RendezvousSetupError::Grant)?;
        let port = hypercall::evtchn_alloc_unbound(&*h, guest)
            .map_err(|e| RendezvousSetupError::Xen("EVTCHNOP_alloc_unbound (needs xsm=dummy)", e))?;
        let mut event =
            CallEvent::new(h, port).map_err(|e| RendezvousSetupError::Xen("mapping shared_info (XENMEM_add_to_physmap)", e))?;
        event.signal_answers = true;
        // SAFETY: the page is 4 KiB, page-aligned, leaked above, and only the guest (through
        // the grant) and this value touch it.
        let page = unsafe { RendezvousPage::new(page) };
        page.offer(Offer { vm_domid: domid, port });
        Ok(Rendezvous { page, event, serving: 0 })
    }

    /// The port offered to the guest.
    pub fn port(&self) -> u32 {
        self.event.port
    }

    /// Sleeps on the port until the guest has answered (no timeout: a Trusty VM waits for its
    /// guest as long as it lives, as it waits for calls), then starts serving that mailbox.
    pub fn wait_for_guest(&mut self, model: &mut Model, report: fn(core::fmt::Arguments<'_>)) {
        loop {
            self.event.clear();
            if self.page.read_answer().is_some() {
                break;
            }
            self.event.wait();
        }
        take_answer(&self.page, &self.event, &mut self.serving, model, report);
    }

    /// Serves for ever (see [`serve`]); a new answer in the page switches the mailbox.
    pub fn serve(self, model: &mut Model, clock: &dyn Clock, report: fn(core::fmt::Arguments<'_>)) -> ! {
        let Rendezvous { page, event, mut serving } = self;
        serve_with(model, Some(&event), clock, report, |m| take_answer(&page, &event, &mut serving, m, report))
    }
}

/// Switches to the mailbox the guest named, if it names one not served yet (a restarted guest
/// program answers again), says so in the status word and signals the guest.
fn take_answer(page: &RendezvousPage, event: &CallEvent, serving: &mut u32, model: &mut Model, report: fn(core::fmt::Arguments<'_>)) {
    let Some(gref) = page.read_answer() else { return };
    if gref == *serving {
        return;
    }
    *serving = gref;
    if model.set_mailbox_gref(gref) {
        report(format_args!("trusty-vm: serving the mailbox at the guest's grant reference {gref}"));
        page.set_status(STATUS_SERVING);
    } else {
        report(format_args!("trusty-vm: cannot map the guest's mailbox grant reference {gref}"));
        page.set_status(STATUS_MAP_FAILED);
    }
    event.answered();
}
