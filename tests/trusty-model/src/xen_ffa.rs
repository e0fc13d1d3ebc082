//! Xen's FF-A mediator as a DomU meets it, version by version (spec xen-ffa-mediator.md §4.3,
//! dma-decisions §4.3): what Xen answers itself, what it refuses and with which FF-A error,
//! and what it forwards to the SPMC. The functions named in comments are in
//! xen/arch/arm/tee/ffa.c and ffa_shm.c (4.20.4, and the development branch for `Newer`).
//!
//! Only the guest-visible rules live here; the forwarding itself (IPA -> PA translation of
//! RXTX_MAP and MEM_SHARE, the share count) is the share table's (`mem.rs`, mediator mode).

use trusty_platform::ffa::{self, func};

/// Which Xen's FF-A mediator stands between the DomU and the SPMC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XenFfa {
    /// Xen 4.20 (and 4.21, which behaves the same here): FF-A 1.1, no FFA_RUN, answers of a
    /// direct request other than a response, SUCCESS or ERROR become ABORTED, 255 pages per share.
    V4_20,
    /// The development branch (4.22): FF-A 1.2, FFA_RUN forwarded when the SPMC lists it,
    /// FFA_YIELD / FFA_INTERRUPT answers passed through, 256 pages, nothing before FFA_VERSION.
    #[default]
    Newer,
}

/// FFA_MSG_SEND_DIRECT_RESP_64 (the model's SPMC answers with the 32-bit one).
pub const MSG_SEND_DIRECT_RESP_64: u32 = 0xC400_0070;
/// FFA_YIELD.
pub const YIELD: u32 = 0x8400_006C;
/// `FFA_NORMAL_MEM_REG_ATTR`: the only memory attributes Xen shares (normal, write-back,
/// inner shareable).
pub const NORMAL_MEM_REG_ATTR: u8 = 0x2F;
/// Live shares per guest (`FFA_MAX_SHM_COUNT`).
pub const MAX_SHARES: usize = 32;

impl XenFfa {
    /// `profile` / DTB spelling.
    pub fn name(self) -> &'static str {
        match self {
            XenFfa::V4_20 => "4.20",
            XenFfa::Newer => "newer",
        }
    }

    /// The mediator [`XenFfa::name`] spells `name` (4.21 is 4.20's, 4.22 the newer branch's).
    pub fn from_name(name: &str) -> Option<XenFfa> {
        match name {
            "4.20" | "4.21" => Some(XenFfa::V4_20),
            "newer" | "4.22" => Some(XenFfa::Newer),
            _ => None,
        }
    }

    /// What FFA_VERSION answers (`ffa_handle_version()`: always Xen's own version).
    pub const fn version(self) -> u32 {
        match self {
            XenFfa::V4_20 => 0x1_0001,
            XenFfa::Newer => 0x1_0002,
        }
    }

    /// Pages one share may cover (`alloc_ffa_shm_mem()` refuses more with NO_MEMORY).
    pub const fn max_pages(self) -> usize {
        match self {
            XenFfa::V4_20 => 255,
            XenFfa::Newer => 256,
        }
    }

    /// Whether Xen handles `fid` from a guest at all (`ffa_handle_call()`'s switch); anything
    /// else is "unhandled fid" and FFA_ERROR(NOT_SUPPORTED).
    pub fn handles(self, fid: u32) -> bool {
        match fid {
            func::VERSION
            | func::FEATURES
            | func::ID_GET
            | func::RX_RELEASE
            | func::RXTX_MAP64
            | func::RXTX_UNMAP
            | func::PARTITION_INFO_GET
            | func::MSG_SEND_DIRECT_REQ
            | func::MEM_SHARE
            | func::MEM_RECLAIM => true,
            func::RUN => self == XenFfa::Newer,
            _ => false,
        }
    }

    /// FFA_FEATURES as Xen answers it from its own table (`ffa_handle_features()`): a call it
    /// forwards is there when the SPMC listed it at boot (`spmc_has`); what it answers itself
    /// is always there; FFA_RUN never on 4.20.
    pub fn feature(self, fid: u32, spmc_has: impl Fn(u32) -> bool) -> bool {
        match fid {
            func::VERSION | func::FEATURES | func::ID_GET | func::RX_RELEASE | func::RXTX_MAP64 | func::RXTX_UNMAP => true,
            func::RUN => self == XenFfa::Newer && spmc_has(fid),
            // 4.20 lists the memory ABIs whatever the SPMC said (xen-ffa-mediator.md §4.3).
            func::MEM_SHARE | func::MEM_RECLAIM if self == XenFfa::V4_20 => true,
            f if self.handles(f) => spmc_has(f),
            _ => false,
        }
    }

    /// What the guest gets back for the SPMC's answer `out` to its direct request
    /// (`handle_msg_send_direct_req()`): 4.20 passes FFA_ERROR, FFA_SUCCESS and direct responses
    /// and turns everything else (FFA_INTERRUPT, FFA_YIELD, FFA_MSG_WAIT) into ABORTED; the
    /// development branch passes FFA_INTERRUPT and FFA_YIELD as well.
    pub fn direct_answer(self, out: [u64; 8]) -> [u64; 8] {
        let passed = match out[0] as u32 {
            func::ERROR | func::SUCCESS | func::SUCCESS64 | func::MSG_SEND_DIRECT_RESP | MSG_SEND_DIRECT_RESP_64 => true,
            func::INTERRUPT | YIELD => self == XenFfa::Newer,
            _ => false,
        };
        if passed {
            out
        } else {
            error(ffa::err::ABORTED)
        }
    }

    /// The checks `ffa_handle_mem_share()` makes on the guest's FFA_MEM_SHARE before it
    /// translates anything, in its order, with its error codes. `regs` are the guest's, `desc`
    /// the bytes in its TX buffer (`frag_len` of them at most), `vm_id` its FF-A id, `live` its
    /// shares already held. The guest negotiated FF-A 1.0, so its descriptor has the 1.0
    /// layout (32-byte header, access array at 32), as Xen reads it for a 1.0 guest
    /// (`read_mem_transaction()`).
    pub fn check_mem_share(self, regs: &[u64; 8], desc: &[u8], vm_id: u16, live: usize) -> Result<(), i32> {
        use ffa::err::{INVALID_PARAMETERS, NOT_SUPPORTED, NO_MEMORY};
        let (tot_len, frag_len, addr) = (regs[1] as u32, regs[2] as u32, regs[3]);
        // Descriptors only in the RX/TX buffer, one fragment only.
        if addr != 0 {
            return Err(NOT_SUPPORTED);
        }
        if frag_len > tot_len {
            return Err(INVALID_PARAMETERS);
        }
        if frag_len != tot_len {
            return Err(NOT_SUPPORTED);
        }
        let desc = desc.get(..frag_len as usize).ok_or(ffa::err::DENIED)?;
        let u16_at = |o: usize| desc.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| desc.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        // read_mem_transaction(), 1.0 layout.
        let (Some(sender), Some(&attr), Some(count)) = (u16_at(0), desc.get(2), u32_at(28)) else {
            return Err(INVALID_PARAMETERS);
        };
        const ACCESS_OFFS: usize = 32;
        const ACCESS_SIZE: usize = 16;
        if count > 255 || ACCESS_OFFS + ACCESS_SIZE * count as usize > desc.len() {
            return Err(INVALID_PARAMETERS);
        }
        if attr != NORMAL_MEM_REG_ATTR {
            return Err(NOT_SUPPORTED);
        }
        // One borrower only.
        if count != 1 {
            return Err(NOT_SUPPORTED);
        }
        if sender != vm_id {
            return Err(INVALID_PARAMETERS);
        }
        // Read-write only: FFA_MEM_ACC_RW.
        if desc.get(ACCESS_OFFS + 2) != Some(&ffa::PERM_RW) {
            return Err(NOT_SUPPORTED);
        }
        let region_offs = u32_at(ACCESS_OFFS + 4).ok_or(INVALID_PARAMETERS)? as usize;
        if region_offs.saturating_add(16) > desc.len() {
            return Err(NOT_SUPPORTED);
        }
        let pages = u32_at(region_offs).ok_or(INVALID_PARAMETERS)? as usize;
        if pages == 0 {
            return Err(INVALID_PARAMETERS);
        }
        // alloc_ffa_shm_mem(): too many pages, or too many shares.
        if pages > self.max_pages() || live >= MAX_SHARES {
            return Err(NO_MEMORY);
        }
        Ok(())
    }
}

/// FFA_ERROR with `code`, as `ffa_set_regs_error()` writes it.
pub fn error(code: i32) -> [u64; 8] {
    [u64::from(func::ERROR), 0, code as u32 as u64, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use trusty_platform::ffa::{encode_descriptor, MemTransaction, PERM_RO};
    use trusty_platform::mem::PhysRange;

    fn desc(perm: u8, attr: u8, pages: u32) -> ([u64; 8], alloc::vec::Vec<u8>) {
        let ranges = [PhysRange { addr: 0x4000_0000, pages }];
        let tx = MemTransaction { sender: 3, receiver: 0x8000, attributes: attr, permissions: perm, tag: 0, ranges: &ranges[..] };
        let mut d = alloc::vec![0u8; 4096];
        let len = encode_descriptor(&tx, &mut d).unwrap();
        d.truncate(len);
        ([u64::from(func::MEM_SHARE), len as u64, len as u64, 0, 0, 0, 0, 0], d)
    }

    #[test]
    fn read_only_and_other_attributes_are_not_supported() {
        for v in [XenFfa::V4_20, XenFfa::Newer] {
            let (r, d) = desc(PERM_RO, NORMAL_MEM_REG_ATTR, 1);
            assert_eq!(v.check_mem_share(&r, &d, 3, 0), Err(ffa::err::NOT_SUPPORTED));
            let (r, d) = desc(ffa::PERM_RW, 0x24, 1);
            assert_eq!(v.check_mem_share(&r, &d, 3, 0), Err(ffa::err::NOT_SUPPORTED));
            let (r, d) = desc(ffa::PERM_RW, NORMAL_MEM_REG_ATTR, 1);
            assert_eq!(v.check_mem_share(&r, &d, 3, 0), Ok(()));
            assert_eq!(v.check_mem_share(&r, &d, 4, 0), Err(ffa::err::INVALID_PARAMETERS), "sender is the VM");
            assert_eq!(v.check_mem_share(&r, &d, 3, 32), Err(ffa::err::NO_MEMORY), "32 live shares");
            let mut two = r;
            two[2] -= 16;
            assert_eq!(v.check_mem_share(&two, &d, 3, 0), Err(ffa::err::NOT_SUPPORTED), "one fragment");
        }
    }

    #[test]
    fn page_limits_by_version() {
        let (r, d) = desc(ffa::PERM_RW, NORMAL_MEM_REG_ATTR, 256);
        assert_eq!(XenFfa::V4_20.check_mem_share(&r, &d, 3, 0), Err(ffa::err::NO_MEMORY));
        assert_eq!(XenFfa::Newer.check_mem_share(&r, &d, 3, 0), Ok(()));
        let (r, d) = desc(ffa::PERM_RW, NORMAL_MEM_REG_ATTR, 255);
        assert_eq!(XenFfa::V4_20.check_mem_share(&r, &d, 3, 0), Ok(()));
    }

    #[test]
    fn run_and_preemption_by_version() {
        assert!(!XenFfa::V4_20.handles(func::RUN));
        assert!(!XenFfa::V4_20.feature(func::RUN, |_| true));
        assert!(XenFfa::Newer.feature(func::RUN, |_| true));
        assert!(!XenFfa::Newer.feature(func::RUN, |_| false), "only when the SPMC lists it");
        let interrupt = [u64::from(func::INTERRUPT), 0x8000 << 16, 0, 0, 0, 0, 0, 0];
        assert_eq!(XenFfa::V4_20.direct_answer(interrupt), error(ffa::err::ABORTED));
        assert_eq!(XenFfa::Newer.direct_answer(interrupt), interrupt);
        let yielded = [u64::from(YIELD), 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(XenFfa::V4_20.direct_answer(yielded), error(ffa::err::ABORTED));
        assert_eq!(XenFfa::Newer.direct_answer(yielded), yielded);
        let resp = [u64::from(func::MSG_SEND_DIRECT_RESP), 0, 0, 7, 0, 0, 0, 0];
        assert_eq!(XenFfa::V4_20.direct_answer(resp), resp);
    }
}
