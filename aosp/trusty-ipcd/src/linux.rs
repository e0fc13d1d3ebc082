//! The real platform: trusty-ipcd in Linux userspace, next to a Trusty VM (`--platform linux`).
//! Facts from `/proc/device-tree`, `/proc/cmdline` and `/sys/hypervisor`; the stack up through
//! `trusty_stack::backend::linux` (`/dev/xen/{gntalloc,gntdev,evtchn}`); the sharing line
//! logged as the bare-metal image prints it.
//!
//! Memory references (a client's memfd or dma-buf sent with a message) are refused here with
//! EOPNOTSUPP: `/dev/xen/gntalloc` grants only pages it allocates itself, and the other way to
//! grant existing memory from userspace, gntdev's dma-buf export/import
//! (IOCTL_GNTDEV_DMABUF_IMP_TO_REFS), needs CONFIG_XEN_GNTDEV_DMABUF, which Debian's arm64
//! kernel (6.1, config-6.1.0-57-arm64) does not set (nor CONFIG_XEN_GRANT_DMA_ALLOC it depends
//! on, nor CONFIG_DMABUF_HEAPS for /dev/dma_heap); even there its references would not be
//! consecutive, which one grant id needs for more than one page.

use trusty_platform::plan::Mechanism;
use trusty_stack::backend::linux::pool::PageAddresses;
use trusty_stack::backend::linux::{self, LinuxOptions};
use trusty_stack::{bring_up_platform, BringUpError, StackConfig};

use crate::server::Stack;

/// The `--platform` value that selects the real platform.
pub const PLATFORM_NAME: &str = "linux";

/// The idle pump here. From Linux userspace Trusty is only reachable as a Trusty VM, which runs
/// its work on its own vCPU and writes answers into the shared rings without being called: a
/// NOP donates it no time, and each one is a mailbox round trip (two cross-domain wake-ups,
/// 1-100 ms under TCG) that stalls the serving loop. The device scans the rings on every
/// loop tick without a call; this slow pump is only a safety net for a lost kick.
pub const VM_IDLE_PUMP_MS: u64 = 1000;

/// How the daemon brings the stack up on the real platform.
#[derive(Clone, Debug, Default)]
pub struct LinuxArgs {
    /// `--force-sharing`: a mechanism to use whatever the facts say (to show it fails).
    pub force_sharing: Option<String>,
    /// How long to wait for the Trusty VM's rendezvous offer (ms).
    pub rendezvous_timeout_ms: Option<u64>,
}

/// Brings the stack up on this Linux. Errors are one message naming what failed (and the plan
/// that was tried, when bring-up got that far).
pub fn bring_up(args: &LinuxArgs) -> Result<Stack, String> {
    let force = match &args.force_sharing {
        None => None,
        Some(name) => {
            // A forced grant goes to the Trusty VM the command line names (the pool grants to it).
            let backend = std::fs::read_to_string("/proc/cmdline")
                .ok()
                .and_then(|c| trusty_platform::facts::trusty_vm_from_bootargs(&c).ok().flatten())
                .map_or(0, |vm| vm.0);
            Some(Mechanism::from_name(name, backend).ok_or_else(|| {
                format!("--force-sharing {name}: not a mechanism (phys, phys-attr, ffa-handle, mediated-ipa, xen-grant)")
            })?)
        }
    };
    // Addresses handed to Trusty must be guest-physical ones: /proc/self/pagemap (root).
    let addresses = match force {
        Some(Mechanism::Phys | Mechanism::PhysAttr | Mechanism::MediatedIpa) => PageAddresses::GuestPhysical,
        _ => PageAddresses::Virtual,
    };
    let mut opts = LinuxOptions { addresses, ..Default::default() };
    if let Some(ms) = args.rendezvous_timeout_ms {
        opts.offer_timeout_ms = ms;
    }
    let access = linux::access(&opts).map_err(|e| format!("platform linux: {e}"))?;
    let mut cfg = StackConfig { force_mechanism: force, ..Default::default() };
    cfg.tipc.idle_pump_ms = VM_IDLE_PUMP_MS;
    match bring_up_platform(access, cfg) {
        Ok((dev, info)) => {
            log::info!("{}", info.plan);
            log::info!(
                "Trusty '{}', API {}; memory references from clients: not supported on this platform \
                 (EOPNOTSUPP: gntalloc grants only its own pages; no CONFIG_XEN_GNTDEV_DMABUF)",
                info.version.as_deref().unwrap_or("unknown"),
                info.api_version
            );
            Ok(Stack { dev, status: Box::new(|| format!(
                    "platform=linux {} event_waits_empty={}",
                    trusty_platform::mailbox::MAILBOX_STATS.summary(),
                    trusty_stack::backend::linux::pool::EMPTY_WAITS.load(std::sync::atomic::Ordering::Relaxed)
                )), keep: Box::new(()), memref: None })
        }
        Err(e) => {
            let mut msg = String::new();
            if let Some(plan) = e.plan() {
                msg.push_str(&format!("{plan}\n"));
            }
            msg.push_str(&format!("bringing the stack up on platform linux failed: {e}"));
            if matches!(e, BringUpError::NoSafeSharing(_)) {
                msg.push_str(
                    "\n  (from Linux userspace the only path is a Trusty VM: name it on the kernel command line \
                     with trusty-ipc-stack.trusty-vm=<domid>; a Trusty reached by SMC or FF-A belongs to the \
                     kernel's trusty driver, /dev/trusty-ipc-dev0)",
                );
            }
            Err(msg)
        }
    }
}
