//! Xen's ARM hypercall ABI, the hypercall numbers and argument structs this stack uses, and
//! thin safe wrappers over a [`Hypercall`].
//!
//! Every number and layout below was checked against Xen's public headers (xen-project/xen,
//! `xen/include/public/`): `xen.h` (hypercall numbers, `CONSOLEIO_*`, `DOMID_SELF`),
//! `arch-arm.h` (calling convention, `XEN_HYPERCALL_TAG` 0xEA1, `xen_pfn_t` and `xen_ulong_t`
//! = `uint64_t`, guest handles 8 bytes and 8-aligned in structs), `version.h`
//! (`XENVER_*`, `struct xen_feature_info`), `features.h` (`XENFEAT_*`), `sched.h`
//! (`SCHEDOP_shutdown`, `struct sched_shutdown`, `SHUTDOWN_*`), `event_channel.h`
//! (`EVTCHNOP_send`, `struct evtchn_send`), `grant_table.h` (`GNTTABOP_*`, the op structs,
//! `GNTMAP_*`, `GNTCOPY_*`, `GNTST_*`) and `memory.h` (`XENMEM_add_to_physmap`,
//! `struct xen_add_to_physmap`, `XENMAPSPACE_*`). Structs are laid out per AAPCS64, as
//! arch-arm.h requires, and little-endian; the compile-time checks below pin sizes and offsets.
//!
//! The instruction (`HvcHypercall`) exists only on AArch64. Everything else runs on the host:
//! a fake [`Hypercall`] sees the op, the arguments and (through the pointer argument, while the
//! call lasts) the struct a wrapper passes.

use core::fmt;
use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One Xen hypercall: `op` in x16, `args` in x0..x4, the result from x0.
///
/// Like `smccc::hvc64`, this is a safe function: the instruction only moves registers, and what
/// Xen does with a pointer argument depends on the op. Callers outside this module should use
/// the typed wrappers, which pass only pointers to live structs of the layout the op expects.
pub trait Hypercall: Send + Sync {
    /// Issues hypercall `op` with `args`; Xen's result.
    fn hypercall(&self, op: u64, args: [u64; 5]) -> i64;
}

/// The HVC immediate Xen requires on ARM (`XEN_HYPERCALL_TAG`, arch-arm.h).
pub const XEN_HYPERCALL_TAG: u16 = 0xEA1;

/// `hvc #0xEA1` (arch-arm.h "Hypercall Calling Convention"). Compiled only for AArch64.
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvcHypercall;

#[cfg(target_arch = "aarch64")]
impl Hypercall for HvcHypercall {
    fn hypercall(&self, op: u64, args: [u64; 5]) -> i64 {
        let ret: u64;
        // SAFETY: the hypercall ABI (arch-arm.h) clobbers x16 and the argument registers x1..x4,
        // which are all declared as outputs here; no stack is used. Xen reads or writes only
        // guest memory named by the arguments, which the wrappers of this module point at live
        // structs of the layout the op expects, kept alive across the call; `asm!` without
        // `nomem` already tells the compiler that memory may change.
        unsafe {
            core::arch::asm!(
                "hvc #0xEA1",
                inlateout("x0") args[0] => ret,
                inlateout("x1") args[1] => _,
                inlateout("x2") args[2] => _,
                inlateout("x3") args[3] => _,
                inlateout("x4") args[4] => _,
                inlateout("x16") op => _,
                options(nostack),
            );
        }
        ret as i64
    }
}

/// Hypercall numbers (xen.h).
pub mod op {
    /// `__HYPERVISOR_memory_op`.
    pub const MEMORY_OP: u64 = 12;
    /// `__HYPERVISOR_xen_version`.
    pub const XEN_VERSION: u64 = 17;
    /// `__HYPERVISOR_console_io`.
    pub const CONSOLE_IO: u64 = 18;
    /// `__HYPERVISOR_grant_table_op`.
    pub const GRANT_TABLE_OP: u64 = 20;
    /// `__HYPERVISOR_sched_op`.
    pub const SCHED_OP: u64 = 29;
    /// `__HYPERVISOR_event_channel_op`.
    pub const EVENT_CHANNEL_OP: u64 = 32;
}

/// `XENVER_*` (version.h).
pub mod xenver {
    /// Returns major:minor (16:16); the argument is NULL.
    pub const VERSION: u64 = 0;
    /// Argument: `struct xen_feature_info`.
    pub const GET_FEATURES: u64 = 6;
}

/// `XENFEAT_*` bit numbers in submap 0 (features.h).
pub mod xenfeat {
    /// The guest's physmap is translated by Xen.
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = 2;
    /// The domain's own pages have gfn != mfn (set by Xen >= 4.15 on ARM).
    pub const NOT_DIRECT_MAPPED: u32 = 16;
    /// The domain's own pages have gfn == mfn.
    pub const DIRECT_MAPPED: u32 = 17;
}

/// `CONSOLEIO_write` (xen.h): args cmd, count, buffer.
pub const CONSOLEIO_WRITE: u64 = 0;
/// `SCHEDOP_shutdown` (sched.h): argument `struct sched_shutdown`.
pub const SCHEDOP_SHUTDOWN: u64 = 2;
/// `SCHEDOP_poll` (sched.h): argument `struct sched_poll`; returns when a port is pending.
pub const SCHEDOP_POLL: u64 = 3;
/// `EVTCHNOP_send` (event_channel.h): argument `struct evtchn_send`.
pub const EVTCHNOP_SEND: u64 = 4;
/// `EVTCHNOP_alloc_unbound` (event_channel.h): argument `struct evtchn_alloc_unbound`.
pub const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;
/// `XENMEM_add_to_physmap` (memory.h): argument `struct xen_add_to_physmap`.
pub const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
/// `XENMAPSPACE_*` (memory.h).
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
/// XENMAPSPACE_grant_table: grant-table frames.
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;
/// "Oneself" wherever a domid is asked for (xen.h).
pub const DOMID_SELF: u16 = 0x7FF0;

/// `GNTTABOP_*` (grant_table.h): args cmd, pointer to an array of op structs, count.
pub mod gnttabop {
    /// GNTTABOP_map_grant_ref.
    pub const MAP_GRANT_REF: u64 = 0;
    /// GNTTABOP_unmap_grant_ref.
    pub const UNMAP_GRANT_REF: u64 = 1;
    /// GNTTABOP_setup_table.
    pub const SETUP_TABLE: u64 = 2;
    /// GNTTABOP_copy.
    pub const COPY: u64 = 5;
    /// GNTTABOP_query_size.
    pub const QUERY_SIZE: u64 = 6;
}

/// `GNTMAP_*` flags of `struct gnttab_map_grant_ref` (grant_table.h).
pub mod gntmap {
    /// Map for device (bus) access.
    pub const DEVICE_MAP: u32 = 1 << 0;
    /// Map into the caller's address space.
    pub const HOST_MAP: u32 = 1 << 1;
    /// Map read-only.
    pub const READONLY: u32 = 1 << 2;
}

/// `GNTCOPY_*` flags of `struct gnttab_copy` (grant_table.h).
pub mod gntcopy {
    /// The source is a grant reference.
    pub const SOURCE_GREF: u16 = 1 << 0;
    /// The destination is a grant reference.
    pub const DEST_GREF: u16 = 1 << 1;
}

/// `GNTST_*` status codes (grant_table.h).
pub mod gntst {
    /// Success.
    pub const OKAY: i16 = 0;
    /// Unspecified error.
    pub const GENERAL_ERROR: i16 = -1;
    /// Unrecognised domain id.
    pub const BAD_DOMAIN: i16 = -2;
    /// Unrecognised or inappropriate grant reference.
    pub const BAD_GNTREF: i16 = -3;
    /// Unrecognised or inappropriate handle.
    pub const BAD_HANDLE: i16 = -4;
    /// Inappropriate virtual address to map.
    pub const BAD_VIRT_ADDR: i16 = -5;
    /// Inappropriate device address to unmap.
    pub const BAD_DEV_ADDR: i16 = -6;
    /// Out of space in the I/O MMU.
    pub const NO_DEVICE_SPACE: i16 = -7;
    /// Not enough privilege for the operation.
    pub const PERMISSION_DENIED: i16 = -8;
    /// The specified page was invalid.
    pub const BAD_PAGE: i16 = -9;
    /// The copy arguments cross a page boundary.
    pub const BAD_COPY_ARG: i16 = -10;
    /// The page address is too big.
    pub const ADDRESS_TOO_BIG: i16 = -11;
    /// The operation is not done yet; try again.
    pub const EAGAIN: i16 = -12;
}

/// Why a Xen call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenError {
    /// The hypercall returned a negative errno value (Xen's public errno.h).
    Errno {
        /// The operation.
        op: &'static str,
        /// The negative errno value.
        errno: i64,
    },
    /// A grant-table operation's per-op status (`GNTST_*`).
    GrantStatus {
        /// The operation.
        op: &'static str,
        /// Its `GNTST_*` status.
        status: i16,
    },
    /// The request cannot be expressed in the hypercall (e.g. a count above `u32::MAX`).
    TooLarge {
        /// The operation.
        op: &'static str,
    },
}

impl fmt::Display for XenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XenError::Errno { op, errno } => write!(f, "Xen {op} failed with errno {errno}"),
            XenError::GrantStatus { op, status } => write!(f, "Xen {op} failed with grant status {status}"),
            XenError::TooLarge { op } => write!(f, "Xen {op}: request too large for the hypercall"),
        }
    }
}

/// `struct xen_feature_info` (version.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct XenFeatureInfo {
    /// IN: which 32-bit submap to return.
    pub submap_idx: u32,
    /// OUT: the submap.
    pub submap: u32,
}

/// `struct sched_shutdown` (sched.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SchedShutdown {
    /// A `SHUTDOWN_*` reason.
    pub reason: u32,
}

/// `struct sched_poll` (sched.h): a guest handle (64 bits on Arm) to the ports, their count,
/// and an absolute timeout in Xen system time (0: none).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SchedPoll {
    /// Guest handle to the array of ports.
    pub ports: u64,
    /// Number of ports.
    pub nr_ports: u32,
    /// Padding.
    pub _pad: u32,
    /// Absolute timeout in Xen system time (0: none).
    pub timeout: u64,
}

/// `struct evtchn_send` (event_channel.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnSend {
    /// The port to signal.
    pub port: u32,
}

/// `struct evtchn_alloc_unbound` (event_channel.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnAllocUnbound {
    /// The domain the port is allocated in ([`DOMID_SELF`]).
    pub dom: u16,
    /// The domain that may bind to it.
    pub remote_dom: u16,
    /// OUT: the port.
    pub port: u32,
}

/// `struct xen_add_to_physmap` (memory.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct XenAddToPhysmap {
    /// The domain whose physmap changes ([`DOMID_SELF`]).
    pub domid: u16,
    /// Pages for `XENMAPSPACE_gmfn_range`; 0 otherwise.
    pub size: u16,
    /// `XENMAPSPACE_*`.
    pub space: u32,
    /// Index into the space (the grant-table frame number for `XENMAPSPACE_grant_table`).
    pub idx: u64,
    /// Guest frame where the page appears.
    pub gpfn: u64,
}

/// `struct gnttab_map_grant_ref` (grant_table.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabMapGrantRef {
    /// Where to map the page (with `GNTMAP_host_map`).
    pub host_addr: u64,
    /// `GNTMAP_*`.
    pub flags: u32,
    /// The grant reference.
    pub ref_: u32,
    /// The granting domain.
    pub dom: u16,
    /// OUT: `GNTST_*`.
    pub status: i16,
    /// OUT: tracking handle for the unmap.
    pub handle: u32,
    /// OUT: the bus address (with `GNTMAP_device_map`).
    pub dev_bus_addr: u64,
}

/// `struct gnttab_unmap_grant_ref` (grant_table.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabUnmapGrantRef {
    /// The address it was mapped at.
    pub host_addr: u64,
    /// The bus address it was mapped at.
    pub dev_bus_addr: u64,
    /// The handle the map returned.
    pub handle: u32,
    /// OUT: `GNTST_*`.
    pub status: i16,
    /// Padding.
    pub _pad: u16,
}

/// `struct gnttab_setup_table` (grant_table.h); `frame_list` is a guest handle to `u64`s.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabSetupTable {
    /// The domain whose table is set up ([`DOMID_SELF`]).
    pub dom: u16,
    /// Padding.
    pub _pad0: u16,
    /// Frames asked for.
    pub nr_frames: u32,
    /// OUT: `GNTST_*`.
    pub status: i16,
    /// Padding.
    pub _pad1: u16,
    /// Padding.
    pub _pad2: u32,
    /// Guest handle to the frame list (OUT).
    pub frame_list: u64,
}

/// One side of a `struct gnttab_copy` (grant_table.h): `u` is the union of a grant reference
/// (low 32 bits) and a `xen_pfn_t` frame, selected by the `GNTCOPY_*_gref` flags.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabCopyPtr {
    /// A grant reference or a frame number (see the flags).
    pub u: u64,
    /// The domain.
    pub domid: u16,
    /// Byte offset in the page.
    pub offset: u16,
    /// Padding.
    pub _pad: u32,
}

impl GnttabCopyPtr {
    /// A grant reference of domain `domid`.
    pub const fn gref(gref: u32, domid: u16, offset: u16) -> Self {
        GnttabCopyPtr { u: gref as u64, domid, offset, _pad: 0 }
    }
    /// A frame of the caller's own domain.
    pub const fn gmfn(gmfn: u64, offset: u16) -> Self {
        GnttabCopyPtr { u: gmfn, domid: DOMID_SELF, offset, _pad: 0 }
    }
}

/// `struct gnttab_copy` (grant_table.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabCopy {
    /// Where to copy from.
    pub source: GnttabCopyPtr,
    /// Where to copy to.
    pub dest: GnttabCopyPtr,
    /// Bytes to copy.
    pub len: u16,
    /// `GNTCOPY_*`.
    pub flags: u16,
    /// OUT: `GNTST_*`.
    pub status: i16,
    /// Padding.
    pub _pad: u16,
}

/// `struct gnttab_query_size` (grant_table.h).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabQuerySize {
    /// The domain whose table is asked about ([`DOMID_SELF`]).
    pub dom: u16,
    /// Padding.
    pub _pad0: u16,
    /// OUT.
    pub nr_frames: u32,
    /// OUT.
    pub max_nr_frames: u32,
    /// OUT: `GNTST_*`.
    pub status: i16,
    /// Padding.
    pub _pad1: u16,
}

// The public layouts, pinned (sizes and the offsets that padding could move).
const _: () = {
    assert!(size_of::<XenFeatureInfo>() == 8);
    assert!(size_of::<SchedShutdown>() == 4);
    assert!(size_of::<SchedPoll>() == 24);
    assert!(size_of::<EvtchnSend>() == 4);
    assert!(size_of::<EvtchnAllocUnbound>() == 8 && offset_of!(EvtchnAllocUnbound, port) == 4);
    assert!(size_of::<XenAddToPhysmap>() == 24);
    assert!(offset_of!(XenAddToPhysmap, space) == 4 && offset_of!(XenAddToPhysmap, idx) == 8);
    assert!(size_of::<GnttabMapGrantRef>() == 32);
    assert!(offset_of!(GnttabMapGrantRef, dom) == 16 && offset_of!(GnttabMapGrantRef, status) == 18);
    assert!(offset_of!(GnttabMapGrantRef, handle) == 20 && offset_of!(GnttabMapGrantRef, dev_bus_addr) == 24);
    assert!(size_of::<GnttabUnmapGrantRef>() == 24);
    assert!(offset_of!(GnttabUnmapGrantRef, handle) == 16 && offset_of!(GnttabUnmapGrantRef, status) == 20);
    assert!(size_of::<GnttabSetupTable>() == 24);
    assert!(offset_of!(GnttabSetupTable, nr_frames) == 4 && offset_of!(GnttabSetupTable, status) == 8);
    assert!(offset_of!(GnttabSetupTable, frame_list) == 16);
    assert!(size_of::<GnttabCopyPtr>() == 16);
    assert!(size_of::<GnttabCopy>() == 40);
    assert!(offset_of!(GnttabCopy, dest) == 16 && offset_of!(GnttabCopy, len) == 32);
    assert!(offset_of!(GnttabCopy, status) == 36);
    assert!(size_of::<GnttabQuerySize>() == 16);
    assert!(offset_of!(GnttabQuerySize, max_nr_frames) == 8 && offset_of!(GnttabQuerySize, status) == 12);
};

/// The reason code of `SCHEDOP_shutdown` (sched.h `SHUTDOWN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ShutdownReason {
    /// SHUTDOWN_poweroff.
    Poweroff = 0,
    /// SHUTDOWN_reboot.
    Reboot = 1,
    /// SHUTDOWN_crash.
    Crash = 3,
}

fn check(op: &'static str, rc: i64) -> Result<i64, XenError> {
    if rc < 0 {
        Err(XenError::Errno { op, errno: rc })
    } else {
        Ok(rc)
    }
}

fn ptr<T>(value: &mut T) -> u64 {
    value as *mut T as u64
}

/// `XENVER_version`: Xen's (major, minor).
pub fn xen_version(h: &dyn Hypercall) -> Result<(u16, u16), XenError> {
    let v = check("XENVER_version", h.hypercall(op::XEN_VERSION, [xenver::VERSION, 0, 0, 0, 0]))?;
    Ok(((v >> 16) as u16, v as u16))
}

/// `XENVER_get_features`: feature submap `submap_idx` (0 holds every `XENFEAT_*` defined so far).
pub fn xen_features(h: &dyn Hypercall, submap_idx: u32) -> Result<u32, XenError> {
    let mut info = XenFeatureInfo { submap_idx, submap: 0 };
    check("XENVER_get_features", h.hypercall(op::XEN_VERSION, [xenver::GET_FEATURES, ptr(&mut info), 0, 0, 0]))?;
    Ok(info.submap)
}

/// `CONSOLEIO_write`: `bytes` to Xen's console (visible with `guest_loglvl=all`).
pub fn console_write(h: &dyn Hypercall, bytes: &[u8]) -> Result<(), XenError> {
    let len = u32::try_from(bytes.len()).map_err(|_| XenError::TooLarge { op: "CONSOLEIO_write" })?;
    let args = [CONSOLEIO_WRITE, u64::from(len), bytes.as_ptr() as u64, 0, 0];
    check("CONSOLEIO_write", h.hypercall(op::CONSOLE_IO, args)).map(drop)
}

/// `EVTCHNOP_send`: notifies the remote end of local event channel `port`.
pub fn evtchn_send(h: &dyn Hypercall, port: u32) -> Result<(), XenError> {
    let mut send = EvtchnSend { port };
    check("EVTCHNOP_send", h.hypercall(op::EVENT_CHANNEL_OP, [EVTCHNOP_SEND, ptr(&mut send), 0, 0, 0])).map(drop)
}

/// `EVTCHNOP_alloc_unbound`: a fresh port of this domain that domain `remote_dom` may bind to
/// (`EVTCHNOP_bind_interdomain`, Linux's `IOCTL_EVTCHN_BIND_INTERDOMAIN`). Xen's default XSM
/// policy (SILO) refuses it between two DomUs (linux-domu.md §4).
pub fn evtchn_alloc_unbound(h: &dyn Hypercall, remote_dom: u16) -> Result<u32, XenError> {
    let mut arg = EvtchnAllocUnbound { dom: DOMID_SELF, remote_dom, port: 0 };
    check("EVTCHNOP_alloc_unbound", h.hypercall(op::EVENT_CHANNEL_OP, [EVTCHNOP_ALLOC_UNBOUND, ptr(&mut arg), 0, 0, 0]))?;
    Ok(arg.port)
}

/// `SCHEDOP_shutdown`. On success Xen stops the domain, so this returns only on failure (or, in
/// a host test, when the fake returns).
pub fn shutdown(h: &dyn Hypercall, reason: ShutdownReason) -> Result<(), XenError> {
    let mut arg = SchedShutdown { reason: reason as u32 };
    check("SCHEDOP_shutdown", h.hypercall(op::SCHED_OP, [SCHEDOP_SHUTDOWN, ptr(&mut arg), 0, 0, 0])).map(drop)
}

/// `SCHEDOP_poll`: blocks until one of `ports` is pending (returns at once if one already is).
/// No timeout: the caller clears the ports' pending bits, re-checks its condition, then polls.
pub fn sched_poll(h: &dyn Hypercall, ports: &mut [u32]) -> Result<(), XenError> {
    let nr_ports = u32::try_from(ports.len()).map_err(|_| XenError::TooLarge { op: "SCHEDOP_poll" })?;
    let mut arg = SchedPoll { ports: ports.as_mut_ptr() as u64, nr_ports, _pad: 0, timeout: 0 };
    check("SCHEDOP_poll", h.hypercall(op::SCHED_OP, [SCHEDOP_POLL, ptr(&mut arg), 0, 0, 0])).map(drop)
}

/// `XENMEM_add_to_physmap` for this domain: page `idx` of `space` appears at guest frame `gpfn`.
pub fn add_to_physmap(h: &dyn Hypercall, space: u32, idx: u64, gpfn: u64) -> Result<(), XenError> {
    let mut arg = XenAddToPhysmap { domid: DOMID_SELF, size: 0, space, idx, gpfn };
    check("XENMEM_add_to_physmap", h.hypercall(op::MEMORY_OP, [XENMEM_ADD_TO_PHYSMAP, ptr(&mut arg), 0, 0, 0]))
        .map(drop)
}

/// Maps grant-table frames `0..frames` at guest frames `gpfn_base..` (the region the
/// `/hypervisor` node's `reg[0]` names; 0x38000000 in a DomU's standard layout).
pub fn map_grant_table_frames(h: &dyn Hypercall, gpfn_base: u64, frames: u32) -> Result<(), XenError> {
    for i in 0..u64::from(frames) {
        add_to_physmap(h, XENMAPSPACE_GRANT_TABLE, i, gpfn_base + i)?;
    }
    Ok(())
}

/// `GNTTABOP_query_size` for this domain: (current frames, maximum frames).
pub fn gnttab_query_size(h: &dyn Hypercall) -> Result<(u32, u32), XenError> {
    let mut q = GnttabQuerySize { dom: DOMID_SELF, ..Default::default() };
    check("GNTTABOP_query_size", h.hypercall(op::GRANT_TABLE_OP, [gnttabop::QUERY_SIZE, ptr(&mut q), 1, 0, 0]))?;
    grant_status("GNTTABOP_query_size", q.status)?;
    Ok((q.nr_frames, q.max_nr_frames))
}

/// `GNTTABOP_setup_table` for this domain: grows the table to `frames.len()` frames and
/// writes their frame numbers into `frames`.
pub fn gnttab_setup_table(h: &dyn Hypercall, frames: &mut [u64]) -> Result<(), XenError> {
    const OP: &str = "GNTTABOP_setup_table";
    let nr_frames = u32::try_from(frames.len()).map_err(|_| XenError::TooLarge { op: OP })?;
    let mut s =
        GnttabSetupTable { dom: DOMID_SELF, nr_frames, frame_list: frames.as_mut_ptr() as u64, ..Default::default() };
    check(OP, h.hypercall(op::GRANT_TABLE_OP, [gnttabop::SETUP_TABLE, ptr(&mut s), 1, 0, 0]))?;
    grant_status(OP, s.status)
}

fn grant_status(op: &'static str, status: i16) -> Result<(), XenError> {
    if status == gntst::OKAY {
        Ok(())
    } else {
        Err(XenError::GrantStatus { op, status })
    }
}

/// Issues a batch of grant-table ops of type `T` in one hypercall. Ok only if the hypercall and
/// every op succeeded; the per-op results (statuses, handles) are left in `ops` either way.
fn gnttab_batch<T>(
    h: &dyn Hypercall,
    cmd: u64,
    name: &'static str,
    ops: &mut [T],
    status: impl Fn(&T) -> i16,
) -> Result<(), XenError> {
    let count = u32::try_from(ops.len()).map_err(|_| XenError::TooLarge { op: name })?;
    if count == 0 {
        return Ok(());
    }
    check(name, h.hypercall(op::GRANT_TABLE_OP, [cmd, ops.as_mut_ptr() as u64, u64::from(count), 0, 0]))?;
    ops.iter().try_for_each(|o| grant_status(name, status(o)))
}

/// `GNTTABOP_map_grant_ref` on a batch.
pub fn gnttab_map_grant_ref(h: &dyn Hypercall, ops: &mut [GnttabMapGrantRef]) -> Result<(), XenError> {
    gnttab_batch(h, gnttabop::MAP_GRANT_REF, "GNTTABOP_map_grant_ref", ops, |o| o.status)
}

/// `GNTTABOP_unmap_grant_ref` on a batch.
pub fn gnttab_unmap_grant_ref(h: &dyn Hypercall, ops: &mut [GnttabUnmapGrantRef]) -> Result<(), XenError> {
    gnttab_batch(h, gnttabop::UNMAP_GRANT_REF, "GNTTABOP_unmap_grant_ref", ops, |o| o.status)
}

/// `GNTTABOP_copy` on a batch.
pub fn gnttab_copy(h: &dyn Hypercall, ops: &mut [GnttabCopy]) -> Result<(), XenError> {
    gnttab_batch(h, gnttabop::COPY, "GNTTABOP_copy", ops, |o| o.status)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::Mutex;
    use std::vec::Vec;

    /// A simulated Xen: records each call and, while the call lasts, reads (and for OUT fields
    /// writes) the struct the pointer argument names, as Xen's copy_from/to_guest would.
    #[derive(Default)]
    struct FakeXen {
        calls: Mutex<Vec<(u64, [u64; 5])>>,
        seen: Mutex<Vec<Vec<u8>>>,
        ret: i64,
    }

    impl FakeXen {
        fn calls(&self) -> Vec<(u64, [u64; 5])> {
            self.calls.lock().unwrap().clone()
        }
        fn seen(&self) -> Vec<Vec<u8>> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Hypercall for FakeXen {
        fn hypercall(&self, op: u64, args: [u64; 5]) -> i64 {
            self.calls.lock().unwrap().push((op, args));
            let mut seen = self.seen.lock().unwrap();
            match (op, args[0]) {
                (op::XEN_VERSION, xenver::VERSION) => return (4 << 16) | 17,
                (op::XEN_VERSION, xenver::GET_FEATURES) => {
                    // SAFETY: xen_features passes a pointer to a live XenFeatureInfo that it does
                    // not touch until this call returns.
                    let info = unsafe { &mut *(args[1] as *mut XenFeatureInfo) };
                    seen.push(info.as_bytes().to_vec());
                    info.submap = 1 << xenfeat::NOT_DIRECT_MAPPED;
                }
                (op::CONSOLE_IO, CONSOLEIO_WRITE) => {
                    // SAFETY: console_write passes a pointer to `args[1]` bytes borrowed for the call.
                    let bytes = unsafe { core::slice::from_raw_parts(args[2] as *const u8, args[1] as usize) };
                    seen.push(bytes.to_vec());
                }
                (op::EVENT_CHANNEL_OP, EVTCHNOP_SEND) => {
                    // SAFETY: evtchn_send passes a pointer to a live EvtchnSend.
                    seen.push(unsafe { &*(args[1] as *const EvtchnSend) }.as_bytes().to_vec());
                }
                (op::EVENT_CHANNEL_OP, EVTCHNOP_ALLOC_UNBOUND) => {
                    // SAFETY: evtchn_alloc_unbound passes a pointer to a live EvtchnAllocUnbound.
                    let a = unsafe { &mut *(args[1] as *mut EvtchnAllocUnbound) };
                    seen.push(a.as_bytes().to_vec());
                    a.port = 5;
                }
                (op::SCHED_OP, SCHEDOP_SHUTDOWN) => {
                    // SAFETY: shutdown passes a pointer to a live SchedShutdown.
                    seen.push(unsafe { &*(args[1] as *const SchedShutdown) }.as_bytes().to_vec());
                }
                (op::MEMORY_OP, XENMEM_ADD_TO_PHYSMAP) => {
                    // SAFETY: add_to_physmap passes a pointer to a live XenAddToPhysmap.
                    seen.push(unsafe { &*(args[1] as *const XenAddToPhysmap) }.as_bytes().to_vec());
                }
                (op::GRANT_TABLE_OP, gnttabop::QUERY_SIZE) => {
                    // SAFETY: gnttab_query_size passes a pointer to a live GnttabQuerySize.
                    let q = unsafe { &mut *(args[1] as *mut GnttabQuerySize) };
                    seen.push(q.as_bytes().to_vec());
                    q.nr_frames = 1;
                    q.max_nr_frames = 64;
                }
                (op::GRANT_TABLE_OP, gnttabop::SETUP_TABLE) => {
                    // SAFETY: gnttab_setup_table passes a pointer to a live GnttabSetupTable whose
                    // frame_list points at `nr_frames` u64s borrowed mutably for the call.
                    let s = unsafe { &mut *(args[1] as *mut GnttabSetupTable) };
                    seen.push(s.as_bytes().to_vec());
                    // SAFETY: as above.
                    let frames = unsafe { core::slice::from_raw_parts_mut(s.frame_list as *mut u64, s.nr_frames as usize) };
                    for (i, f) in frames.iter_mut().enumerate() {
                        *f = 0x1000 + i as u64;
                    }
                }
                (op::GRANT_TABLE_OP, gnttabop::COPY) => {
                    // SAFETY: gnttab_copy passes a pointer to `args[2]` live GnttabCopy structs.
                    let ops = unsafe { core::slice::from_raw_parts_mut(args[1] as *mut GnttabCopy, args[2] as usize) };
                    for o in ops.iter_mut() {
                        seen.push(o.as_bytes().to_vec());
                        o.status = if o.len > 4096 { gntst::BAD_COPY_ARG } else { gntst::OKAY };
                    }
                }
                _ => {}
            }
            self.ret
        }
    }

    #[test]
    fn version_and_features() {
        let xen = FakeXen::default();
        assert_eq!(xen_version(&xen), Ok((4, 17)));
        assert_eq!(xen_features(&xen, 0), Ok(1 << xenfeat::NOT_DIRECT_MAPPED));
        assert_eq!(xen.calls()[1].0, 17);
        assert_eq!(xen.calls()[1].1[0], 6);
        assert_eq!(xen.seen()[0], [0, 0, 0, 0, 0, 0, 0, 0]); // submap_idx 0, submap 0 on entry
    }

    #[test]
    fn console_evtchn_shutdown_encodings() {
        let xen = FakeXen::default();
        console_write(&xen, b"hello").unwrap();
        evtchn_send(&xen, 10).unwrap();
        shutdown(&xen, ShutdownReason::Crash).unwrap();
        let calls = xen.calls();
        assert_eq!((calls[0].0, calls[0].1[0], calls[0].1[1]), (18, 0, 5));
        assert_eq!((calls[1].0, calls[1].1[0]), (32, 4));
        assert_eq!((calls[2].0, calls[2].1[0]), (29, 2));
        let seen = xen.seen();
        assert_eq!(seen[0], b"hello");
        assert_eq!(seen[1], 10u32.to_le_bytes());
        assert_eq!(seen[2], 3u32.to_le_bytes());
        assert_eq!(ShutdownReason::Poweroff as u32, 0);
        assert_eq!(ShutdownReason::Reboot as u32, 1);
    }

    #[test]
    fn alloc_unbound_names_the_remote_domain_and_returns_the_port() {
        let xen = FakeXen::default();
        assert_eq!(evtchn_alloc_unbound(&xen, 2), Ok(5));
        assert_eq!((xen.calls()[0].0, xen.calls()[0].1[0]), (32, 6));
        assert_eq!(xen.seen()[0], [0xF0, 0x7F, 2, 0, 0, 0, 0, 0]); // DOMID_SELF, remote 2, port 0
        let refused = FakeXen { ret: -1, ..Default::default() };
        assert_eq!(evtchn_alloc_unbound(&refused, 2), Err(XenError::Errno { op: "EVTCHNOP_alloc_unbound", errno: -1 }));
    }

    #[test]
    fn grant_table_frames_are_mapped_one_by_one() {
        let xen = FakeXen::default();
        map_grant_table_frames(&xen, 0x38000, 2).unwrap();
        let seen = xen.seen();
        assert_eq!(seen.len(), 2);
        let second = XenAddToPhysmap::read_from_bytes(&seen[1][..]).unwrap();
        assert_eq!(second, XenAddToPhysmap { domid: DOMID_SELF, size: 0, space: XENMAPSPACE_GRANT_TABLE, idx: 1, gpfn: 0x38001 });
        assert_eq!(&seen[0][..8], &[0xF0, 0x7F, 0, 0, 1, 0, 0, 0]); // domid, size, space
        assert!(xen.calls().iter().all(|(op, a)| *op == 12 && a[0] == 7));
    }

    #[test]
    fn grant_ops_report_status() {
        let xen = FakeXen::default();
        assert_eq!(gnttab_query_size(&xen), Ok((1, 64)));
        let mut frames = [0u64; 3];
        gnttab_setup_table(&xen, &mut frames).unwrap();
        assert_eq!(frames, [0x1000, 0x1001, 0x1002]);
        let good = GnttabCopy {
            source: GnttabCopyPtr::gref(8, 1, 0),
            dest: GnttabCopyPtr::gmfn(0x40010, 0),
            len: 64,
            flags: gntcopy::SOURCE_GREF,
            ..Default::default()
        };
        let mut ops = [good, GnttabCopy { len: 8192, ..good }];
        assert_eq!(
            gnttab_copy(&xen, &mut ops),
            Err(XenError::GrantStatus { op: "GNTTABOP_copy", status: gntst::BAD_COPY_ARG })
        );
        assert_eq!(ops[0].status, gntst::OKAY);
        let raw = &xen.seen()[2];
        assert_eq!(raw.len(), 40);
        assert_eq!(&raw[0..4], &8u32.to_le_bytes()); // source.u.ref
        assert_eq!(&raw[8..10], &1u16.to_le_bytes()); // source.domid
        assert_eq!(&raw[24..26], &DOMID_SELF.to_le_bytes()); // dest.domid
        assert_eq!(&raw[32..36], &[64, 0, 1, 0]); // len, flags
        assert_eq!(gnttab_map_grant_ref(&xen, &mut []), Ok(()));
    }

    #[test]
    fn negative_results_are_errors() {
        let xen = FakeXen { ret: -22, ..Default::default() };
        assert_eq!(evtchn_send(&xen, 1), Err(XenError::Errno { op: "EVTCHNOP_send", errno: -22 }));
        assert!(gnttab_query_size(&xen).is_err());
    }
}
