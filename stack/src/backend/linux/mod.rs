//! Linux userspace in a Xen DomU (a daemon such as trusty-ipcd), next to a Trusty VM.
//!
//! The same parts as every backend, from what Linux gives a process:
//! - facts: `/proc/device-tree` written back into a blob, `/proc/cmdline` as its bootargs,
//!   Xen's feature bits from `/sys/hypervisor` ([`facts`]); the same reader, probes and
//!   decision as bare metal decide;
//! - conduit: none. A process cannot make SMCs or FF-A calls (a Trusty reached that way belongs
//!   to the kernel's trusty driver, `/dev/trusty-ipc-dev0`), so [`NoMonitor`] answers every
//!   probe NOT_SUPPORTED and the decision names what is missing;
//! - pages and sharer: one [`pool::GntallocPool`] (`/dev/xen/gntalloc` grants at allocation);
//! - events: `/dev/xen/evtchn` ([`pool::EvtchnEvents`]): notify, and block in poll(2);
//! - the way to the Trusty VM: its rendezvous page through `/dev/xen/gntdev`
//!   ([`rendezvous::RendezvousLink`]);
//! - clock: `CLOCK_MONOTONIC`, and `CLOCK_MONOTONIC_COARSE` for the reads that allow a tick of
//!   staleness ([`StdClock`]).
//!
//! `/dev/xen` is opened only when the command line names a Trusty VM
//! (`trusty-ipc-stack.trusty-vm=<domid>`): without one, bring-up fails at the decision, at
//! once, naming the missing path.

pub mod dev;
pub mod facts;
pub mod pool;
pub mod rendezvous;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use trusty_platform::clock::Clock;
use trusty_platform::facts::read_device_tree;
use trusty_platform::mem::{DmaRegion, PageAllocator};
use trusty_platform::smc::{Conduit, SmError};

use crate::PlatformAccess;
use dev::{LinuxXen, XenDevices};
use facts::LinuxRoot;
use pool::{GntallocAllocator, GntallocPool, PageAddresses};
use rendezvous::RendezvousLink;

/// A monotonic clock: `CLOCK_MONOTONIC` (what `std::time::Instant` reads) in nanoseconds from
/// the clock's creation, and `CLOCK_MONOTONIC_COARSE` (the same clock as of the last tick: a few
/// ns from the vDSO instead of tens) for [`Clock::now_coarse_ns`]. Sleeps sleep, relax yields.
pub struct StdClock {
    /// `CLOCK_MONOTONIC` at creation (ns).
    origin_ns: u64,
    /// How far a coarse reading may lag: `clock_getres(CLOCK_MONOTONIC_COARSE)`, the tick
    /// (u64::MAX when the clock is not there: never used).
    coarse_lag_ns: u64,
}

/// Reads `clock` in nanoseconds (0 if the clock is not there, which a Linux kernel since 2.6.32
/// never says for the monotonic clocks).
#[inline]
fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives across the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    // Both fields are non-negative for the monotonic clocks; plain wrapping arithmetic (no
    // u128 as in `Duration::as_nanos`): u64 nanoseconds last 584 years of uptime.
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

impl StdClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let mut res = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_getres writes one timespec into `res`, which lives across the call.
        let coarse_lag_ns = if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0 {
            u64::try_from(res.tv_sec)
                .ok()
                .and_then(|s| s.checked_mul(1_000_000_000))
                .and_then(|n| n.checked_add(u64::try_from(res.tv_nsec).ok()?))
                .unwrap_or(u64::MAX)
        } else {
            u64::MAX
        };
        StdClock { origin_ns: read_clock(libc::CLOCK_MONOTONIC), coarse_lag_ns }
    }

    /// How far [`Clock::now_coarse_ns`] may lag when it reads the coarse clock (the tick).
    pub fn coarse_lag_ns(&self) -> u64 {
        self.coarse_lag_ns
    }
}

impl Default for StdClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for StdClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        read_clock(libc::CLOCK_MONOTONIC).saturating_sub(self.origin_ns)
    }
    fn sleep_ns(&self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }
    fn relax(&self) {
        std::thread::yield_now();
    }
    #[inline]
    fn now_coarse_ns(&self, max_lag_ns: u64) -> (u64, u64) {
        // The coarse clock is CLOCK_MONOTONIC as of the timekeeper's last update (every tick):
        // never ahead of it, at most one tick behind it.
        if self.coarse_lag_ns <= max_lag_ns {
            (read_clock(libc::CLOCK_MONOTONIC_COARSE).saturating_sub(self.origin_ns), self.coarse_lag_ns)
        } else {
            (self.now_ns(), 0)
        }
    }
}

/// The conduit of a process: there is no secure monitor to call. Every call is answered
/// SM_ERR_UNDEFINED_SMC (-1, also FF-A's NOT_SUPPORTED), so the probes find neither Trusty's
/// SMCs nor FF-A, as a DomU without a mediator would.
pub struct NoMonitor;

impl Conduit for NoMonitor {
    fn call(&self, _regs: [u64; 8]) -> [u64; 8] {
        [u64::from(SmError::UndefinedSmc.code() as u32), 0, 0, 0, 0, 0, 0, 0]
    }
}

/// An allocator with no pages (no Trusty VM named: nothing may be shared with anyone).
struct NoPages;

impl PageAllocator for NoPages {
    fn alloc_zeroed(&mut self, _pages: usize) -> Option<DmaRegion> {
        None
    }
    unsafe fn free(&mut self, _region: DmaRegion) {}
}

/// How the Linux backend is set up.
#[derive(Clone, Debug)]
pub struct LinuxOptions {
    /// Where `/proc` and `/sys` are (`/`).
    pub root: LinuxRoot,
    /// What the pages' addresses are ([`PageAddresses::GuestPhysical`] for a forced `phys`
    /// decision: `/proc/self/pagemap`, root only).
    pub addresses: PageAddresses,
    /// Wait for the Trusty VM's offer at most this long.
    pub offer_timeout_ms: u64,
    /// Wait for the Trusty VM to serve the mailbox at most this long.
    pub serve_timeout_ms: u64,
}

impl Default for LinuxOptions {
    fn default() -> Self {
        LinuxOptions {
            root: LinuxRoot::default(),
            addresses: PageAddresses::Virtual,
            offer_timeout_ms: rendezvous::DEFAULT_OFFER_TIMEOUT_MS,
            serve_timeout_ms: rendezvous::DEFAULT_SERVE_TIMEOUT_MS,
        }
    }
}

/// What this Linux gives the stack, with the real `/dev/xen` devices.
pub fn access(opts: &LinuxOptions) -> Result<PlatformAccess, String> {
    access_with(opts, |addresses| {
        LinuxXen::open(addresses == PageAddresses::GuestPhysical).map(|d| Arc::new(d) as Arc<dyn XenDevices>).map_err(|e| e.to_string())
    })
}

/// [`access`] with the devices from `open_devices` (called only when a Trusty VM is named).
pub fn access_with(
    opts: &LinuxOptions,
    open_devices: impl FnOnce(PageAddresses) -> Result<Arc<dyn XenDevices>, String>,
) -> Result<PlatformAccess, String> {
    let fdt = opts.root.device_tree()?;
    let features = opts.root.xen_features();
    // The Trusty VM the facts name, if any (the decision reads the same blob again).
    let vm = read_device_tree(&fdt).ok().and_then(|dt| dt.trusty_vm);
    let clock: Arc<dyn Clock> = Arc::new(StdClock::new());
    let (allocator, trusty_vm): (Box<dyn PageAllocator>, Option<Box<dyn crate::TrustyVmLink>>) = match vm {
        None => (Box::new(NoPages), None),
        Some((domid, _, _)) => {
            let dev = open_devices(opts.addresses)?;
            let pool = GntallocPool::new(dev.clone(), domid, opts.addresses);
            let mut link = RendezvousLink::new(dev, pool.clone());
            link.offer_timeout_ms = opts.offer_timeout_ms;
            link.serve_timeout_ms = opts.serve_timeout_ms;
            (Box::new(GntallocAllocator(pool)), Some(Box::new(link)))
        }
    };
    Ok(PlatformAccess {
        conduit: Arc::new(NoMonitor),
        clock,
        allocator,
        fdt,
        xen_features: Box::new(move || features),
        trusty_vm,
    })
}
