//! How the model reaches normal-world memory: only through what was shared with it.
//!
//! [`PhysMem`] is the machine's RAM as the secure side sees it. It is private to this module:
//! the rest of the model gets a [`Mapping`] from the [`ShareTable`] for an id that was really
//! shared, with the access it was shared with, and every access outside that is a [`Fault`].

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use trusty_platform::ffa;
use trusty_platform::mem::{PhysRange, PAGE_SIZE};
use trusty_virtio::vring::RingMemory;

/// Physical memory as the secure side reaches it (bytes and naturally aligned words).
pub trait PhysMem: Send + Sync {
    /// Whether `[pa, pa + len)` is RAM.
    fn contains(&self, pa: u64, len: usize) -> bool;
    /// Copies out; `false` if the range is not RAM.
    fn read(&self, pa: u64, out: &mut [u8]) -> bool;
    /// Copies in; `false` if the range is not RAM.
    fn write(&self, pa: u64, data: &[u8]) -> bool;
    fn read_u16(&self, pa: u64) -> Option<u16>;
    fn write_u16(&self, pa: u64, v: u16) -> bool;
    fn read_u32(&self, pa: u64) -> Option<u32>;
    fn write_u32(&self, pa: u64, v: u32) -> bool;
    fn read_u64(&self, pa: u64) -> Option<u64>;
    fn write_u64(&self, pa: u64, v: u64) -> bool;
}

/// An access the model made, or was asked to make, to memory it was never given. A run with a
/// fault has failed: a wrong sharing decision shows up here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The sharing mechanism through which the access was attempted.
    pub mechanism: &'static str,
    /// The id or address the normal world handed over.
    pub addr: u64,
    pub what: String,
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "secure-side fault: {} at {:#x} ({})", self.what, self.addr, self.mechanism)
    }
}

/// One FF-A share as the secure side recorded it.
#[derive(Clone, Debug)]
struct Share {
    ranges: Vec<PhysRange>,
    writable: bool,
    /// Mappings the secure side holds (a mapped share cannot be reclaimed).
    mapped: u32,
}

/// Counters about shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareStats {
    pub live: usize,
    pub max_live: usize,
    pub shared_total: u64,
    pub reclaimed: u64,
    pub denied_reclaims: u64,
    /// MEM_SHARE refused because the share cap was reached.
    pub over_cap: u64,
}

/// The FF-A memory-sharing stand-in: handles issued on MEM_SHARE, retrieved (mapped) by the
/// secure side, given back on MEM_RECLAIM unless still mapped.
pub struct ShareTable {
    phys: Arc<dyn PhysMem>,
    shares: BTreeMap<u64, Share>,
    next_handle: u64,
    cap: Option<usize>,
    stats: ShareStats,
    faults: Vec<Fault>,
    /// FFA_RXTX_MAP: the normal world's TX buffer (the secure side reads descriptors there).
    tx_buffer: Option<u64>,
    /// Test switch: deny the next N reclaims as if still mapped.
    pub deny_reclaims: u32,
}

/// Why MEM_SHARE was refused, as an FF-A error code.
pub type FfaErr = i32;

impl ShareTable {
    pub fn new(phys: Arc<dyn PhysMem>, cap: Option<usize>) -> Self {
        ShareTable {
            phys,
            shares: BTreeMap::new(),
            // Handles look nothing like addresses, so a confused normal world is caught.
            next_handle: 0x5EC0_0000_0001,
            cap,
            stats: ShareStats::default(),
            faults: Vec::new(),
            tx_buffer: None,
            deny_reclaims: 0,
        }
    }

    pub fn stats(&self) -> ShareStats {
        self.stats
    }

    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    pub fn fault(&mut self, mechanism: &'static str, addr: u64, what: String) {
        log::error!("secure-side fault: {what} at {addr:#x} ({mechanism})");
        self.faults.push(Fault { mechanism, addr, what });
    }

    /// FFA_RXTX_MAP: remembers the TX buffer (one page) if it is RAM.
    pub fn rxtx_map(&mut self, tx: u64, rx: u64, pages: u64) -> Result<(), FfaErr> {
        if pages != 1 || !self.phys.contains(tx, PAGE_SIZE) || !self.phys.contains(rx, PAGE_SIZE) {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        self.tx_buffer = Some(tx);
        Ok(())
    }

    /// FFA_MEM_SHARE of a single-fragment descriptor of `len` bytes in the TX buffer.
    pub fn mem_share(&mut self, total: u64, fragment: u64, sender: u16) -> Result<u64, FfaErr> {
        let tx = self.tx_buffer.ok_or(ffa::err::DENIED)?;
        if total != fragment || total as usize > PAGE_SIZE || total == 0 {
            // Fragmented descriptors are not served by this model.
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        let mut desc = alloc::vec![0u8; total as usize];
        if !self.phys.read(tx, &mut desc) {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        let tx_desc = ffa::decode_descriptor(&desc, 256).map_err(|_| ffa::err::INVALID_PARAMETERS)?;
        if tx_desc.sender != sender || tx_desc.receiver != ffa::TRUSTY_ENDPOINT_ID {
            return Err(ffa::err::INVALID_PARAMETERS);
        }
        for r in &tx_desc.ranges {
            if r.addr % PAGE_SIZE as u64 != 0 || !self.phys.contains(r.addr, r.pages as usize * PAGE_SIZE) {
                return Err(ffa::err::INVALID_PARAMETERS);
            }
        }
        if let Some(cap) = self.cap {
            if self.shares.len() >= cap {
                self.stats.over_cap += 1;
                return Err(ffa::err::NO_MEMORY);
            }
        }
        let writable = match tx_desc.permissions {
            ffa::PERM_RO => false,
            ffa::PERM_RW => true,
            _ => return Err(ffa::err::INVALID_PARAMETERS),
        };
        let handle = self.next_handle;
        self.next_handle += 2;
        self.shares.insert(handle, Share { ranges: tx_desc.ranges, writable, mapped: 0 });
        self.stats.shared_total += 1;
        self.stats.live = self.shares.len();
        self.stats.max_live = self.stats.max_live.max(self.stats.live);
        Ok(handle)
    }

    /// FFA_MEM_RECLAIM: DENIED while the secure side still maps it.
    pub fn mem_reclaim(&mut self, handle: u64) -> Result<(), FfaErr> {
        let share = self.shares.get(&handle).ok_or(ffa::err::INVALID_PARAMETERS)?;
        if share.mapped > 0 || self.deny_reclaims > 0 {
            self.deny_reclaims = self.deny_reclaims.saturating_sub(1);
            self.stats.denied_reclaims += 1;
            return Err(ffa::err::DENIED);
        }
        self.shares.remove(&handle);
        self.stats.reclaimed += 1;
        self.stats.live = self.shares.len();
        Ok(())
    }

    /// Retrieves (maps) `len` bytes of share `id` with the given access; a fault if `id` was
    /// never shared, is too small, or was shared read-only and `write` is asked.
    pub fn map(&mut self, id: u64, len: usize, write: bool, purpose: &str) -> Option<Mapping> {
        let Some(share) = self.shares.get_mut(&id) else {
            self.fault("ffa-handle", id, format!("{purpose}: memory id was never shared"));
            return None;
        };
        let size: usize = share.ranges.iter().map(|r| r.pages as usize * PAGE_SIZE).sum();
        if len > size {
            self.fault("ffa-handle", id, format!("{purpose}: {len} bytes wanted, {size} shared"));
            return None;
        }
        if write && !share.writable {
            self.fault("ffa-handle", id, format!("{purpose}: write to a read-only share"));
            return None;
        }
        share.mapped += 1;
        Some(Mapping { id, ranges: share.ranges.clone(), len, writable: write, phys: self.phys.clone() })
    }

    /// Gives a mapping back.
    pub fn unmap(&mut self, m: Mapping) {
        if let Some(share) = self.shares.get_mut(&m.id) {
            share.mapped = share.mapped.saturating_sub(1);
        }
    }

    /// Live shares.
    pub fn live(&self) -> usize {
        self.shares.len()
    }
}

/// A mapped share: bounded access to exactly the bytes that were shared.
pub struct Mapping {
    id: u64,
    ranges: Vec<PhysRange>,
    len: usize,
    writable: bool,
    phys: Arc<dyn PhysMem>,
}

impl Mapping {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The physical address of byte `off`, if the run `[off, off + n)` stays in one range.
    fn pa(&self, off: usize, n: usize) -> Option<u64> {
        if off.checked_add(n)? > self.len {
            return None;
        }
        let mut start = 0usize;
        for r in &self.ranges {
            let size = r.pages as usize * PAGE_SIZE;
            if off >= start && off + n <= start + size {
                return Some(r.addr + (off - start) as u64);
            }
            start += size;
        }
        None
    }

    /// Copies `out.len()` bytes from offset `off`; false if out of the mapping.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            let chunk = (PAGE_SIZE - (off + done) % PAGE_SIZE).min(out.len() - done);
            match self.pa(off + done, chunk) {
                Some(pa) if self.phys.read(pa, &mut out[done..done + chunk]) => done += chunk,
                _ => return false,
            }
        }
        true
    }

    /// Copies `data` to offset `off`; false if out of the mapping or read-only.
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        if !self.writable {
            return false;
        }
        let mut done = 0;
        while done < data.len() {
            let chunk = (PAGE_SIZE - (off + done) % PAGE_SIZE).min(data.len() - done);
            match self.pa(off + done, chunk) {
                Some(pa) if self.phys.write(pa, &data[done..done + chunk]) => done += chunk,
                _ => return false,
            }
        }
        true
    }
}

impl RingMemory for Mapping {
    fn len(&self) -> usize {
        self.len
    }
    fn read_u16(&self, off: usize) -> u16 {
        self.pa(off, 2).and_then(|pa| self.phys.read_u16(pa)).unwrap_or(0)
    }
    fn write_u16(&self, off: usize, v: u16) {
        if let Some(pa) = self.pa(off, 2).filter(|_| self.writable) {
            self.phys.write_u16(pa, v);
        }
    }
    fn read_u32(&self, off: usize) -> u32 {
        self.pa(off, 4).and_then(|pa| self.phys.read_u32(pa)).unwrap_or(0)
    }
    fn write_u32(&self, off: usize, v: u32) {
        if let Some(pa) = self.pa(off, 4).filter(|_| self.writable) {
            self.phys.write_u32(pa, v);
        }
    }
    fn read_u64(&self, off: usize) -> u64 {
        self.pa(off, 8).and_then(|pa| self.phys.read_u64(pa)).unwrap_or(0)
    }
    fn write_u64(&self, off: usize, v: u64) {
        if let Some(pa) = self.pa(off, 8).filter(|_| self.writable) {
            self.phys.write_u64(pa, v);
        }
    }
}
