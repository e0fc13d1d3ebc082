//! Physical memory reached through plain pointers: the model running on the machine itself (at
//! EL3 with the MMU off, or as a Xen DomU whose addresses are its IPAs). Every access is checked
//! against the ranges the model was told are memory, and made with volatile reads and writes
//! (another CPU, or a grant mapping fresh from the hypervisor, is on the other side; qemu-xen.md
//! gotcha 5).

use alloc::vec::Vec;

use crate::mem::PhysMem;

/// Memory the model may reach, as `(base, length)` ranges of addresses it can dereference.
pub struct RawPhysMem {
    ranges: Vec<(u64, u64)>,
}

impl RawPhysMem {
    /// # Safety
    /// Every range must be memory this program may read and write for its whole life (the
    /// normal world's RAM seen from EL3, or the model's own RAM and grant window in a VM).
    pub unsafe fn new(ranges: Vec<(u64, u64)>) -> Self {
        RawPhysMem { ranges }
    }

    fn ok(&self, pa: u64, len: usize) -> bool {
        let Some(end) = pa.checked_add(len as u64) else { return false };
        self.ranges.iter().any(|&(b, l)| pa >= b && end <= b.saturating_add(l))
    }
}

macro_rules! word {
    ($read:ident, $write:ident, $t:ty) => {
        fn $read(&self, pa: u64) -> Option<$t> {
            if !self.ok(pa, core::mem::size_of::<$t>()) || pa % core::mem::size_of::<$t>() as u64 != 0 {
                return None;
            }
            // SAFETY: inside a range that is memory for our whole life (`new`), aligned.
            Some(<$t>::from_le(unsafe { (pa as usize as *const $t).read_volatile() }))
        }
        fn $write(&self, pa: u64, v: $t) -> bool {
            if !self.ok(pa, core::mem::size_of::<$t>()) || pa % core::mem::size_of::<$t>() as u64 != 0 {
                return false;
            }
            // SAFETY: as above.
            unsafe { (pa as usize as *mut $t).write_volatile(v.to_le()) };
            true
        }
    };
}

impl PhysMem for RawPhysMem {
    fn contains(&self, pa: u64, len: usize) -> bool {
        self.ok(pa, len)
    }
    fn guest_to_phys(&self, ipa: u64) -> Option<u64> {
        // No hypervisor stand-in runs here: whatever translation exists is the real one.
        Some(ipa)
    }
    fn read(&self, pa: u64, out: &mut [u8]) -> bool {
        if !self.ok(pa, out.len()) {
            return false;
        }
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: pa..pa+len is inside a range (checked above); byte reads need no alignment.
            *b = unsafe { ((pa as usize + i) as *const u8).read_volatile() };
        }
        true
    }
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        if !self.ok(pa, data.len()) {
            return false;
        }
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { ((pa as usize + i) as *mut u8).write_volatile(*b) };
        }
        true
    }
    word!(read_u16, write_u16, u16);
    word!(read_u32, write_u32, u32);
    word!(read_u64, write_u64, u64);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn accesses_outside_the_ranges_are_refused() {
        let mut buf = std::vec![0u64; 512];
        let base = buf.as_mut_ptr() as u64;
        // SAFETY: the vector outlives the test's accesses.
        let m = unsafe { RawPhysMem::new(std::vec![(base, 4096)]) };
        assert!(m.write_u32(base + 8, 0xdead_beef));
        assert_eq!(m.read_u32(base + 8), Some(0xdead_beef));
        assert!(!m.write_u32(base + 4094, 1));
        assert_eq!(m.read_u16(base + 4096), None);
        assert_eq!(m.read_u32(base + 2), None, "misaligned");
        let mut out = [0u8; 4];
        assert!(m.read(base + 8, &mut out));
        assert_eq!(out, 0xdead_beefu32.to_le_bytes());
        assert!(!m.read(base + 4094, &mut out));
        assert!(!m.contains(u64::MAX - 1, 4));
    }
}
