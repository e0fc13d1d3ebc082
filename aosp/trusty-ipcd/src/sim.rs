//! Bringing the stack up on a simulated platform (the embedded Trusty model and a platform
//! profile): test code, built only with the `sim` feature.

use std::sync::Arc;

use trusty_stack::{bring_up_platform, BringUpError, StackConfig};
use trusty_model::host::ModelMode;

use crate::memref::{map_client_fd, FdMapping};
use crate::server::Stack;
use tipc::ForeignMemRef;
use trusty_model::host::{ForeignPages, GuestRam};
use trusty_platform::mem::{Access, PAGE_SIZE};

/// The profile used when none is named: no hypervisor, Trusty API 5 with FF-A.
pub const DEFAULT_PLATFORM: &str = "native-api5";

/// Boots the machine of profile `platform` (model threads per `mode`) and brings the stack up
/// on it. The status words add the model's open TIPC endpoints and live shares. Errors: the
/// message and an errno (ENOENT unknown profile, ENODEV no safe path, or the failed step's).
pub fn bring_up(platform: &str, threaded: bool) -> Result<(Stack, String), (String, i32)> {
    let mode = if threaded { ModelMode::Threaded } else { ModelMode::Sync };
    bring_up_with(platform, mode, StackConfig::default())
}

/// [`bring_up`] with a model mode and a stack configuration of the caller's.
pub fn bring_up_with(platform: &str, mode: ModelMode, cfg: StackConfig) -> Result<(Stack, String), (String, i32)> {
    let profile = platforms::by_name(platform).ok_or_else(|| {
        (
            format!(
                "unknown platform '{platform}' (known: {})",
                platforms::names().join(", ")
            ),
            libc::ENOENT,
        )
    })?;
    let sim = Arc::new(profile.boot(mode));
    match bring_up_platform(profile.access(&sim), cfg) {
        Ok((dev, info)) => {
            let sharing = info.plan.to_string();
            let status_sim = sim.clone();
            let status = Box::new(move || {
                let m = status_sim.model();
                // foreign_attached: client pages still attached to the guest RAM (shared, or
                // kept because Trusty refused to give them back).
                format!(
                    "model_endpoints={} live_shares={} foreign_attached={}",
                    m.open_endpoints(),
                    m.live_shares(),
                    status_sim.ram().foreign_attached()
                )
            });
            let ram = sim.ram().clone();
            let memref: crate::memref::FdToMemRef = Box::new(move |fd| fd_memref(&ram, fd));
            Ok((
                Stack {
                    dev,
                    status,
                    keep: Box::new(sim),
                    memref: Some(memref),
                },
                sharing,
            ))
        }
        Err(e) => {
            let mut msg = format!("bringing the stack up on platform {platform} failed: {e}");
            for f in sim.model().faults() {
                msg.push_str(&format!("\n  {f}"));
            }
            let errno = match e {
                BringUpError::Stack(e) | BringUpError::AfterPlan { error: e, .. } => e.errno(),
                BringUpError::DeviceTree(_)
                | BringUpError::NoSafeSharing(_)
                | BringUpError::Unusable { .. }
                | BringUpError::TrustyVm(_) => libc::ENODEV,
            };
            Err((msg, errno))
        }
    }
}

/// What keeps a client fd's pages alive while Trusty may use them: detached from the guest
/// RAM first (the guard), then unmapped (the mapping the guard owns).
struct FdPages {
    _pages: ForeignPages,
}

/// One client fd as a memory reference of the embedded machine: mapped here (as
/// [`map_client_fd`] checks it) and attached to the simulated guest RAM at a fresh address, so
/// that the platform's sharer shares exactly the fd's own pages and the model reaches them only
/// through that share; the model's writes land in the client's memfd.
pub fn fd_memref(ram: &Arc<GuestRam>, fd: std::os::fd::RawFd) -> Result<ForeignMemRef, i32> {
    let (map, size, writable): (FdMapping, usize, bool) = map_client_fd(fd, PAGE_SIZE)?;
    let pages = map.len() / PAGE_SIZE;
    let ptr = map.ptr();
    // SAFETY: `map` maps pages * PAGE_SIZE bytes at `ptr` (page-aligned, as every mmap) and is
    // moved into the guard, which keeps it until the pages are detached.
    let guard = unsafe { ram.attach_foreign(ptr, pages, Box::new(map)) }.ok_or(libc::ENOMEM)?;
    Ok(ForeignMemRef {
        ranges: vec![guard.range()],
        size: size as u64,
        access: if writable { Access::ReadWrite } else { Access::ReadOnly },
        tag: 0,
        keep: Box::new(FdPages { _pages: guard }),
    })
}
