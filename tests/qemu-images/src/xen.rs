//! Grant mapping for the Trusty VM image (the event channels and the grant table's frames are
//! `trusty_stack::backend::bare`'s).

use alloc::sync::Arc;
use alloc::vec::Vec;

use trusty_model::mem::{GrantMapError, GrantMapper};
use trusty_platform::mem::PAGE_SIZE;
use trusty_platform::xen::hypercall::{self, gntmap, GnttabMapGrantRef, GnttabUnmapGrantRef, Hypercall, XenError};

/// GNTTABOP_map_grant_ref into page slots of an unused guest-physical window (one of the
/// "extended regions" Xen lists in `/hypervisor` reg).
pub struct XenGrantMapper {
    h: Arc<dyn Hypercall>,
    granter: u16,
    window: u64,
    slots: Vec<bool>,
}

impl XenGrantMapper {
    pub fn new(h: Arc<dyn Hypercall>, granter: u16, window: u64, slots: usize) -> Self {
        XenGrantMapper { h, granter, window, slots: alloc::vec![false; slots] }
    }
}

impl GrantMapper for XenGrantMapper {
    fn map(&mut self, gref: u32, write: bool) -> Result<(u64, u32), GrantMapError> {
        let slot = self.slots.iter().position(|&u| !u).ok_or(GrantMapError::Refused(-1))?;
        let host_addr = self.window + (slot * PAGE_SIZE) as u64;
        let mut op = [GnttabMapGrantRef {
            host_addr,
            flags: gntmap::HOST_MAP | if write { 0 } else { gntmap::READONLY },
            ref_: gref,
            dom: self.granter,
            ..Default::default()
        }];
        match hypercall::gnttab_map_grant_ref(&*self.h, &mut op) {
            Ok(()) => {
                self.slots[slot] = true;
                Ok((host_addr, op[0].handle))
            }
            Err(XenError::GrantStatus { status, .. }) if status == -8 || status == -4 => Err(GrantMapError::NotGranted),
            Err(XenError::GrantStatus { status, .. }) => Err(GrantMapError::Refused(i32::from(status))),
            Err(_) => Err(GrantMapError::Refused(-1)),
        }
    }

    fn unmap(&mut self, addr: u64, handle: u32) {
        let mut op = [GnttabUnmapGrantRef { host_addr: addr, handle, ..Default::default() }];
        if let Err(e) = hypercall::gnttab_unmap_grant_ref(&*self.h, &mut op) {
            log::warn!("GNTTABOP_unmap_grant_ref failed: {e:?}");
        }
        let slot = ((addr - self.window) as usize) / PAGE_SIZE;
        if let Some(s) = self.slots.get_mut(slot) {
            *s = false;
        }
    }
}
