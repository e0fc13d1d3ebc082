//! The Linux backend against a fake `/dev/xen` (grants, foreign mappings and event channels in
//! process memory) and a Trusty VM played by a thread.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use trusty_platform::facts::{read_device_tree, PORTS_FROM_RENDEZVOUS};
use trusty_platform::mailbox::{self, MailboxConduit};
use trusty_platform::mem::{Access, PageAllocator, PhysRange, Sharer, PAGE_SIZE};
use trusty_platform::plan::Hypervisor;
use trusty_platform::smc::Conduit;
use trusty_platform::xen::grant::{decode_grant_id, grant_id};
use trusty_platform::xen::rendezvous::{Offer, RendezvousPage, RENDEZVOUS_GREF, STATUS_MAP_FAILED, STATUS_SERVING};

use super::dev::{ForeignPage, GrantedPages, XenDevices};
use super::facts::LinuxRoot;
use super::pool::{GntallocAllocator, GntallocPool, GntallocSharer, PageAddresses};
use super::rendezvous::RendezvousLink;
use super::{access_with, LinuxOptions};
use crate::{bring_up_platform, BringUpError, StackConfig, TrustyVm, TrustyVmLink};

const VM: u16 = 1;
const VM_PORT: u32 = 5;
const LOCAL_PORT: u32 = 3;

fn page_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap()
}

/// Zeroed pages on the heap, freed on drop.
struct Pages {
    ptr: NonNull<u8>,
    pages: usize,
}
// SAFETY: plain memory.
unsafe impl Send for Pages {}
// SAFETY: accessed volatile / atomically by the protocol code.
unsafe impl Sync for Pages {}
impl Pages {
    fn new(pages: usize) -> Pages {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(page_layout(pages)) };
        Pages { ptr: NonNull::new(p).unwrap(), pages }
    }
}
impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), page_layout(self.pages)) }
    }
}

#[derive(Default)]
struct Events {
    /// Events for the guest (local ports), as /dev/xen/evtchn would deliver them.
    to_guest: VecDeque<u32>,
    /// Notifies the guest sent (local ports).
    to_vm: VecDeque<u32>,
    bound: Option<(u16, u32)>,
}

/// A fake `/dev/xen`.
struct FakeXen {
    /// The Trusty VM's rendezvous page (what gntdev maps for (VM, RENDEZVOUS_GREF)).
    vm_page: Pages,
    /// Grant references handed out by "gntalloc", in order; `gaps` skips one after each page.
    next_gref: AtomicU32,
    gaps: bool,
    /// Live gntalloc allocations: first gref -> (pointer, pages).
    granted: Mutex<BTreeMap<u32, (usize, usize)>>,
    freed: AtomicU32,
    events: Mutex<Events>,
    cv: Condvar,
    mapped_rendezvous: AtomicBool,
    /// Mappings of the rendezvous page refused before one succeeds (a VM still booting).
    refuse_maps: std::sync::atomic::AtomicI32,
}

impl FakeXen {
    fn new(gaps: bool) -> Arc<FakeXen> {
        Arc::new(FakeXen {
            vm_page: Pages::new(1),
            next_gref: AtomicU32::new(8),
            gaps,
            granted: Mutex::new(BTreeMap::new()),
            freed: AtomicU32::new(0),
            events: Mutex::new(Events::default()),
            cv: Condvar::new(),
            mapped_rendezvous: AtomicBool::new(false),
            refuse_maps: std::sync::atomic::AtomicI32::new(0),
        })
    }

    fn vm_view(&self) -> RendezvousPage {
        // SAFETY: the page lives as long as the fake; the protocol accesses it volatile.
        unsafe { RendezvousPage::new(self.vm_page.ptr) }
    }

    /// The VM signals its end of the bound channel.
    fn vm_signal(&self) {
        let mut ev = self.events.lock().unwrap();
        if ev.bound.is_some() {
            ev.to_guest.push_back(LOCAL_PORT);
            self.cv.notify_all();
        }
    }

    /// The VM waits for a notify from the guest, up to `ms`.
    fn vm_wait(&self, ms: u64) -> bool {
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut ev = self.events.lock().unwrap();
        loop {
            if ev.to_vm.pop_front().is_some() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ev = self.cv.wait_timeout(ev, deadline - now).unwrap().0;
        }
    }

    /// What the Trusty VM maps for grant `gref` of the guest: the page's address, if granted.
    fn vm_map(&self, gref: u32) -> Option<usize> {
        let g = self.granted.lock().unwrap();
        g.iter().find_map(|(first, (ptr, pages))| (gref >= *first && gref < first + *pages as u32).then(|| ptr + (gref - first) as usize * PAGE_SIZE))
    }
}

impl XenDevices for FakeXen {
    fn alloc_granted(&self, domid: u16, count: u32) -> io::Result<GrantedPages> {
        assert_eq!(domid, VM, "granted to the Trusty VM");
        let pages = Pages::new(count as usize);
        let grefs: Vec<u32> = (0..count)
            .map(|_| self.next_gref.fetch_add(if self.gaps { 2 } else { 1 }, Ordering::SeqCst))
            .collect();
        let ptr = pages.ptr;
        self.granted.lock().unwrap().insert(grefs[0], (ptr.as_ptr() as usize, count as usize));
        std::mem::forget(pages);
        Ok(GrantedPages { ptr, grefs, index: 0x1000 })
    }

    fn free_granted(&self, pages: GrantedPages) -> io::Result<()> {
        let (ptr, n) = self.granted.lock().unwrap().remove(&pages.grefs[0]).expect("freed what was allocated");
        assert_eq!(ptr, pages.ptr.as_ptr() as usize);
        drop(Pages { ptr: pages.ptr, pages: n });
        self.freed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn map_foreign(&self, domid: u16, gref: u32) -> io::Result<ForeignPage> {
        if domid != VM || gref != RENDEZVOUS_GREF || self.refuse_maps.load(Ordering::SeqCst) > 0 {
            self.refuse_maps.fetch_sub(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.mapped_rendezvous.store(true, Ordering::SeqCst);
        Ok(ForeignPage { ptr: self.vm_page.ptr, index: 0x2000 })
    }

    fn unmap_foreign(&self, page: ForeignPage) {
        assert_eq!(page.ptr, self.vm_page.ptr);
        self.mapped_rendezvous.store(false, Ordering::SeqCst);
    }

    fn bind_interdomain(&self, domid: u16, remote_port: u32) -> io::Result<u32> {
        if domid != VM || remote_port != VM_PORT {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut ev = self.events.lock().unwrap();
        ev.bound = Some((domid, remote_port));
        // Xen marks the new local port pending at once (linux-domu.md §7, gotcha 4).
        ev.to_guest.push_back(LOCAL_PORT);
        Ok(LOCAL_PORT)
    }

    fn notify(&self, port: u32) -> io::Result<()> {
        assert_eq!(port, LOCAL_PORT);
        let mut ev = self.events.lock().unwrap();
        ev.to_vm.push_back(port);
        self.cv.notify_all();
        Ok(())
    }

    fn wait_events(&self, timeout_ms: i32) -> io::Result<Vec<u32>> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(0) as u64);
        let mut ev = self.events.lock().unwrap();
        loop {
            if !ev.to_guest.is_empty() {
                return Ok(ev.to_guest.drain(..).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            ev = self.cv.wait_timeout(ev, deadline - now).unwrap().0;
        }
    }

    fn guest_physical(&self, vaddr: usize) -> io::Result<u64> {
        // A made-up frame per page, as pagemap would give for root.
        Ok(0x4000_0000 + ((vaddr / PAGE_SIZE) as u64 & 0xffff) * PAGE_SIZE as u64)
    }
}

/// How the played Trusty VM behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vm {
    /// Offers, maps the guest's mailbox, serves calls (answers x0 = request fid + 1).
    Serves,
    /// Offers, then cannot map the mailbox.
    MapFails,
    /// Offers with another domain id.
    WrongDomid,
}

/// Plays the Trusty VM on a thread until `stop`.
fn play(x: Arc<FakeXen>, how: Vm, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let page = x.vm_view();
        match how {
            Vm::WrongDomid => page.offer(Offer { vm_domid: VM + 1, port: VM_PORT }),
            _ => page.offer(Offer { vm_domid: VM, port: VM_PORT }),
        }
        // The guest's answer and its notify.
        let mut mailbox = None;
        while !stop.load(Ordering::SeqCst) && mailbox.is_none() {
            x.vm_wait(20);
            if let Some(gref) = page.read_answer() {
                mailbox = Some(gref);
            }
        }
        let Some(gref) = mailbox else { return };
        match (how, x.vm_map(gref)) {
            (Vm::Serves, Some(addr)) => {
                page.set_status(STATUS_SERVING);
                x.vm_signal();
                serve(&x, addr, &stop);
            }
            _ => {
                page.set_status(STATUS_MAP_FAILED);
                x.vm_signal();
            }
        }
    })
}

fn word(addr: usize, off: usize) -> *mut u32 {
    (addr + off) as *mut u32
}

/// Serves the mailbox at `addr`: answers each request with x0 = fid + 1, then signals.
fn serve(x: &FakeXen, addr: usize, stop: &AtomicBool) {
    let mut last = 0u32;
    while !stop.load(Ordering::SeqCst) {
        x.vm_wait(20);
        // SAFETY: `addr` is the guest's granted mailbox page, alive while the test runs.
        let seq = unsafe { word(addr, mailbox::OFF_REQ_SEQ).read_volatile() };
        if seq == last {
            continue;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: as above.
        let fid = unsafe { word(addr, mailbox::OFF_REQUEST).read_volatile() };
        // SAFETY: as above; response x0, then the sequence word last.
        unsafe {
            ((addr + mailbox::OFF_RESPONSE) as *mut u64).write_volatile(u64::from(fid) + 1);
            std::sync::atomic::fence(Ordering::Release);
            word(addr, mailbox::OFF_RSP_SEQ).write_volatile(seq);
        }
        last = seq;
        x.vm_signal();
    }
}

fn link(x: &Arc<FakeXen>, addresses: PageAddresses) -> (RendezvousLink, GntallocAllocator, Arc<GntallocPool>) {
    let pool = GntallocPool::new(x.clone(), VM, addresses);
    let mut l = RendezvousLink::new(x.clone(), pool.clone());
    l.offer_timeout_ms = 300;
    l.serve_timeout_ms = 300;
    (l, GntallocAllocator(pool.clone()), pool)
}

const RDV: TrustyVm = TrustyVm { backend_domid: VM, call_evtchn: PORTS_FROM_RENDEZVOUS, kick_evtchn: PORTS_FROM_RENDEZVOUS };

#[test]
fn the_rendezvous_meets_a_trusty_vm_and_calls_wake_on_its_event() {
    let x = FakeXen::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let vm = play(x.clone(), Vm::Serves, stop.clone());
    let (mut l, mut alloc, pool) = link(&x, PageAddresses::Virtual);
    let link = l.connect(RDV, &mut alloc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(link.call_port, LOCAL_PORT);
    assert!(!x.mapped_rendezvous.load(Ordering::SeqCst), "the rendezvous page is unmapped after the meeting");
    // The guest answered with the grant of its mailbox page (the first gntalloc grant).
    assert_eq!(x.vm_view().read_answer(), Some(8));
    assert_eq!(x.vm_map(8), Some(link.mailbox.as_ptr() as usize));
    // SAFETY: the mailbox page is allocated in the pool for the rest of the test.
    let magic = unsafe { word(link.mailbox.as_ptr() as usize, mailbox::OFF_MAGIC).read_volatile() };
    assert_eq!(magic, mailbox::MAILBOX_MAGIC, "the mailbox is marked before the VM maps it");
    assert_eq!(link.sharer.live_shares(), 1, "the mailbox is a live share");
    assert_eq!(pool.allocations(), 1);
    // Calls through the mailbox: the VM answers and signals; the conduit blocks in poll, not
    // for its whole timeout.
    let clock = Arc::new(super::StdClock::new());
    // SAFETY: the mailbox page stays allocated in the pool for the rest of the test.
    let c = unsafe { MailboxConduit::new(link.mailbox, link.events, clock, link.call_port, 5000) };
    let t = Instant::now();
    for fid in [0x3200_0001u32, 0x3200_0005] {
        assert_eq!(c.call([u64::from(fid), 0, 0, 0, 0, 0, 0, 0])[0], u64::from(fid) + 1);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "answers came with their events: {:?}", t.elapsed());
    stop.store(true, Ordering::SeqCst);
    vm.join().unwrap();
}

#[test]
fn a_rendezvous_page_not_granted_yet_is_mapped_when_it_is() {
    let x = FakeXen::new(false);
    x.refuse_maps.store(3, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let vm = play(x.clone(), Vm::Serves, stop.clone());
    let (mut l, mut alloc, _) = link(&x, PageAddresses::Virtual);
    let link = l.connect(RDV, &mut alloc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(link.call_port, LOCAL_PORT);
    assert!(x.refuse_maps.load(Ordering::SeqCst) <= 0, "retried past the refusals");
    stop.store(true, Ordering::SeqCst);
    vm.join().unwrap();
}

#[test]
fn a_rendezvous_page_never_granted_is_an_error_in_bounded_time() {
    let x = FakeXen::new(false);
    x.refuse_maps.store(i32::MAX, Ordering::SeqCst);
    let (mut l, mut alloc, _) = link(&x, PageAddresses::Virtual);
    let t = Instant::now();
    let e = l.connect(RDV, &mut alloc).err().expect("must fail");
    assert!(e.contains("rendezvous page (grant 8), retried for 300 ms"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn a_silent_trusty_vm_is_an_error_in_bounded_time() {
    let x = FakeXen::new(false);
    let (mut l, mut alloc, pool) = link(&x, PageAddresses::Virtual);
    let t = Instant::now();
    let e = l.connect(RDV, &mut alloc).err().expect("must fail");
    assert!(e.contains("no offer") && e.contains("300 ms"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(pool.allocations(), 0, "nothing allocated before an offer");
}

#[test]
fn a_trusty_vm_that_cannot_map_the_mailbox_is_an_error() {
    let x = FakeXen::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let vm = play(x.clone(), Vm::MapFails, stop.clone());
    let (mut l, mut alloc, _) = link(&x, PageAddresses::Virtual);
    let e = l.connect(RDV, &mut alloc).err().expect("must fail");
    assert!(e.contains("STATUS_MAP_FAILED") && e.contains("grant 8"), "{e}");
    stop.store(true, Ordering::SeqCst);
    vm.join().unwrap();
}

#[test]
fn an_offer_from_another_domain_id_is_refused() {
    let x = FakeXen::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let vm = play(x.clone(), Vm::WrongDomid, stop.clone());
    let (mut l, mut alloc, _) = link(&x, PageAddresses::Virtual);
    let e = l.connect(RDV, &mut alloc).err().expect("must fail");
    assert!(e.contains("says it is domain 2"), "{e}");
    stop.store(true, Ordering::SeqCst);
    vm.join().unwrap();
}

#[test]
fn static_ports_are_refused_with_the_form_that_works() {
    let x = FakeXen::new(false);
    let (mut l, mut alloc, _) = link(&x, PageAddresses::Virtual);
    let e = l.connect(TrustyVm { backend_domid: VM, call_evtchn: 10, kick_evtchn: 11 }, &mut alloc).err().unwrap();
    assert!(e.contains("trusty-ipc-stack.trusty-vm=1 alone"), "{e}");
    assert!(!x.mapped_rendezvous.load(Ordering::SeqCst));
}

#[test]
fn the_pool_shares_only_what_it_allocated() {
    let x = FakeXen::new(false);
    let pool = GntallocPool::new(x.clone(), VM, PageAddresses::Virtual);
    let mut a = GntallocAllocator(pool.clone());
    let mut s = GntallocSharer(pool.clone());
    assert!(!s.takes_read_only(), "gntalloc grants are writable, fixed at allocation");
    let r = a.alloc_zeroed(3).unwrap();
    let id = s.share(&[r.range()], Access::ReadWrite).unwrap();
    assert_eq!(id.0, grant_id(8), "Linux's grant-DMA encoding of the first reference");
    assert_eq!(decode_grant_id(id.0), Some(8));
    assert_eq!(s.live_shares(), 1);
    // Anything else is refused, with a message that says why.
    for bad in [
        vec![PhysRange { addr: 0x4000_0000, pages: 1 }],
        vec![PhysRange { addr: r.paddr(), pages: 2 }],
        vec![r.range(), r.range()],
    ] {
        let e = s.share(&bad, Access::ReadWrite).expect_err("refused");
        assert!(matches!(e, trusty_platform::Error::InvalidArgument(_)), "{e:?}");
    }
    let e = format!("{}", s.share(&[PhysRange { addr: 0x1000, pages: 1 }], Access::ReadWrite).err().unwrap());
    assert!(e.contains("gntalloc grants only the pages it allocated"), "{e}");
    assert!(s.share(&[r.range()], Access::ReadWrite).is_err(), "shared once");
    s.reclaim(id).unwrap();
    assert!(s.reclaim(id).is_err(), "reclaimed once");
    assert_eq!(s.live_shares(), 0);
    // SAFETY: from this allocator, no longer shared.
    unsafe { a.free(r) };
    assert_eq!(x.freed.load(Ordering::SeqCst), 1);
    assert_eq!(pool.allocations(), 0);
}

#[test]
fn references_that_are_not_consecutive_cannot_be_one_id() {
    let x = FakeXen::new(true);
    let pool = GntallocPool::new(x.clone(), VM, PageAddresses::Virtual);
    let mut a = GntallocAllocator(pool.clone());
    assert!(a.alloc_zeroed(2).is_none(), "refs 8 and 10 cannot be named by one grant id");
    assert_eq!(x.freed.load(Ordering::SeqCst), 1, "given back at once");
    assert!(a.alloc_zeroed(1).is_some(), "a single page is always one id");
}

#[test]
fn guest_physical_addresses_for_a_forced_phys_decision() {
    let x = FakeXen::new(false);
    let pool = GntallocPool::new(x.clone(), VM, PageAddresses::GuestPhysical);
    let mut a = GntallocAllocator(pool.clone());
    let r = a.alloc_zeroed(1).unwrap();
    assert_eq!(r.paddr(), x.guest_physical(r.vaddr().as_ptr() as usize).unwrap());
    assert_ne!(r.paddr(), r.vaddr().as_ptr() as u64);
    // The grant sharer still finds the pages by that address.
    let id = GntallocSharer(pool).share(&[r.range()], Access::ReadWrite).unwrap();
    assert_eq!(decode_grant_id(id.0), Some(8));
}

/// A directory laid out like `/proc` and `/sys` of a Linux DomU.
struct FakeRoot(PathBuf);

impl FakeRoot {
    fn new(tag: &str) -> FakeRoot {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "trusty-stack-linux-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc/device-tree")).unwrap();
        FakeRoot(dir)
    }
    fn file(&self, rel: &str, bytes: &[u8]) -> &Self {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        self
    }
    /// What Xen writes for a dom0less DomU with `xen,enhanced`, as Linux shows it.
    fn xen_domu(&self, cmdline: &str) -> &Self {
        self.file("proc/device-tree/compatible", b"xen,xenvm-4.17\0xen,xenvm\0")
            .file("proc/device-tree/#address-cells", &2u32.to_be_bytes())
            .file("proc/device-tree/name", b"\0")
            .file("proc/device-tree/hypervisor/compatible", b"xen,xen-4.17\0xen,xen\0")
            .file("proc/device-tree/hypervisor/reg", &[0u8; 32])
            .file("proc/device-tree/chosen/bootargs", b"console=ttyAMA0\0")
            .file("proc/cmdline", format!("{cmdline}\n").as_bytes())
            .file("sys/hypervisor/type", b"xen\n")
            .file("sys/hypervisor/properties/features", b"000129f1\n")
    }
    fn root(&self) -> LinuxRoot {
        LinuxRoot(self.0.clone())
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn facts_from_proc_device_tree_and_the_command_line() {
    let r = FakeRoot::new("facts");
    r.xen_domu("console=ttyAMA0 quiet trusty-ipc-stack.trusty-vm=1");
    let root = r.root();
    let blob = root.device_tree().unwrap();
    let dt = read_device_tree(&blob).unwrap();
    assert_eq!(dt.hypervisor, Hypervisor::Xen { version: Some((4, 17)), domid: None });
    assert!(dt.grant_table);
    assert!(!dt.trusty_node);
    // From /proc/cmdline (the device tree's own bootargs do not name the VM).
    assert_eq!(dt.trusty_vm, Some((1, PORTS_FROM_RENDEZVOUS, PORTS_FROM_RENDEZVOUS)));
    assert_eq!(root.xen_features(), Some(0x129f1));
    assert_eq!(root.hypervisor_type().as_deref(), Some("xen"));
    // Without a /chosen directory the command line still counts.
    let r2 = FakeRoot::new("nochosen");
    r2.file("proc/device-tree/hypervisor/compatible", b"xen,xen-4.19\0xen,xen\0")
        .file("proc/cmdline", b"trusty-ipc-stack.trusty-vm=3,10,11\n");
    let dt = read_device_tree(&r2.root().device_tree().unwrap()).unwrap();
    assert_eq!(dt.trusty_vm, Some((3, 10, 11)));
    assert_eq!(dt.hypervisor, Hypervisor::Xen { version: Some((4, 19)), domid: None });
    // No device tree at all: an error naming the path.
    let r3 = FakeRoot::new("nodt");
    std::fs::remove_dir_all(r3.0.join("proc/device-tree")).unwrap();
    let e = r3.root().device_tree().err().unwrap();
    assert!(e.contains("proc/device-tree"), "{e}");
    assert_eq!(r3.root().xen_features(), None);
}

#[test]
fn a_device_tree_with_a_trusty_vm_node_and_a_native_one() {
    let r = FakeRoot::new("node");
    r.xen_domu("console=ttyAMA0")
        .file("proc/device-tree/trusty-vm/compatible", b"trusty-ipc-stack,trusty-vm-v1\0")
        .file("proc/device-tree/trusty-vm/backend-domid", &4u32.to_be_bytes())
        .file("proc/device-tree/trusty-vm/call-evtchn", &12u32.to_be_bytes())
        .file("proc/device-tree/trusty-vm/kick-evtchn", &13u32.to_be_bytes());
    let dt = read_device_tree(&r.root().device_tree().unwrap()).unwrap();
    assert_eq!(dt.trusty_vm, Some((4, 12, 13)));
    let native = FakeRoot::new("native");
    native.file("proc/device-tree/trusty/compatible", b"android,trusty-smc-v1\0").file("proc/cmdline", b"quiet\n");
    let dt = read_device_tree(&native.root().device_tree().unwrap()).unwrap();
    assert_eq!(dt.hypervisor, Hypervisor::None);
    assert!(dt.trusty_node);
    assert_eq!(dt.trusty_vm, None);
}

/// A Linux DomU with no Trusty VM on its command line and no mediator: bring-up fails at the
/// decision, at once, naming the missing path, and never opens `/dev/xen`.
#[test]
fn no_trusty_vm_and_no_ffa_refuses_quickly_without_touching_dev_xen() {
    let r = FakeRoot::new("nopath");
    r.xen_domu("console=ttyAMA0 quiet");
    let opts = LinuxOptions { root: r.root(), ..Default::default() };
    let t = Instant::now();
    let access = access_with(&opts, |_| panic!("/dev/xen opened without a Trusty VM")).unwrap();
    let e = bring_up_platform(access, StackConfig::default()).err().expect("must fail");
    assert!(matches!(e, BringUpError::NoSafeSharing(_)), "{e}");
    let text = e.to_string();
    assert!(text.contains("missing a path to Trusty") && text.contains("Trusty VM"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// The whole bring-up through the Linux backend as far as the fake VM goes: facts from the fake
/// `/proc`, the decision (a Trusty VM: the mailbox transport), the rendezvous, and the first
/// calls (the version string, the API version) through the mailbox; the fake VM answers no
/// Trusty protocol, so bring-up stops at the API negotiation.
#[test]
fn bring_up_reaches_the_trusty_vm_through_the_rendezvous() {
    let r = FakeRoot::new("bringup");
    r.xen_domu("console=ttyAMA0 trusty-ipc-stack.trusty-vm=1");
    let x = FakeXen::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let vm = play(x.clone(), Vm::Serves, stop.clone());
    let opts = LinuxOptions { root: r.root(), offer_timeout_ms: 2000, serve_timeout_ms: 2000, ..Default::default() };
    let access = access_with(&opts, |_| Ok(x.clone() as Arc<dyn XenDevices>)).unwrap();
    let cfg = StackConfig { mailbox_timeout_ms: 200, ..Default::default() };
    let e = bring_up_platform(access, cfg).err().expect("the fake VM is not Trusty");
    stop.store(true, Ordering::SeqCst);
    vm.join().unwrap();
    // It got past the rendezvous: the mailbox grant was answered and served.
    assert_eq!(x.vm_view().status(), STATUS_SERVING);
    // Calls went through the mailbox: the fake answers SMC_FC_API_VERSION with fid + 1, which
    // negotiation refuses.
    assert!(e.to_string().contains("Trusty selected API version"), "{e}");
}

#[test]
fn the_no_monitor_conduit_answers_not_supported() {
    let r = super::NoMonitor.call([0x8400_0063, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r[0] as u32 as i32, -1);
    let _ = Sharer::budget(&GntallocSharer(GntallocPool::new(FakeXen::new(false), VM, PageAddresses::Virtual)));
}

#[test]
fn the_coarse_clock_is_never_ahead_and_at_most_its_lag_behind() {
    use trusty_platform::clock::Clock;
    let clock = super::StdClock::new();
    let lag = clock.coarse_lag_ns();
    // Linux ticks at 100 to 1000 Hz: the coarse clock's resolution is 1 to 10 ms.
    assert!((1_000..=10_000_000).contains(&lag), "CLOCK_MONOTONIC_COARSE resolution {lag} ns");
    // Allowed: a coarse reading, lagging by at most the resolution.
    for _ in 0..1000 {
        let before = clock.now_ns();
        let (coarse, l) = clock.now_coarse_ns(lag);
        let after = clock.now_ns();
        assert_eq!(l, lag);
        assert!(coarse <= after, "coarse {coarse} ahead of {after}");
        assert!(coarse.saturating_add(lag) >= before, "coarse {coarse} more than {lag} ns behind {before}");
    }
    // Not allowed that much lag: the precise clock, no lag.
    let before = clock.now_ns();
    let (now, l) = clock.now_coarse_ns(lag - 1);
    assert_eq!(l, 0);
    assert!(now >= before && now <= clock.now_ns());
}
