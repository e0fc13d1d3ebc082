//! The resource table Trusty writes into the descriptor page (spec §5.1): typed wire structs, a
//! defensive parser (every offset and size checked against the bytes really returned; unknown
//! entries skipped) and a builder for the secure side.

use alloc::vec::Vec;

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Resource-table version this stack understands.
pub const RSC_TABLE_VERSION: u32 = 1;
/// Entry type of a virtio device.
pub const RSC_VDEV: u32 = 3;
/// Virtio device id of TIPC on Trusty's bus (not the mainline registry's 13, which is the
/// balloon; this bus is private, spec §5.1).
pub const VIRTIO_ID_TIPC: u32 = 13;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct TableHeader {
    ver: U32,
    num: U32,
    reserved: [U32; 2],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct FwRscVdev {
    id: U32,
    notifyid: U32,
    dfeatures: U32,
    gfeatures: U32,
    config_len: U32,
    status: u8,
    num_of_vrings: u8,
    reserved: [u8; 2],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Default, Debug)]
#[repr(C)]
struct FwRscVdevVring {
    da: U32,
    align: U32,
    num: U32,
    notifyid: U32,
    pa: U32,
}

const HEADER_LEN: usize = core::mem::size_of::<TableHeader>();
const VRING_LEN: usize = core::mem::size_of::<FwRscVdevVring>();

/// Byte offsets, inside a vdev entry (from the start of `fw_rsc_vdev`), of the fields the normal
/// world writes.
pub mod field {
    /// The `gfeatures` field (features the driver accepted).
    pub const GFEATURES: usize = 12;
    /// The `status` byte.
    pub const STATUS: usize = 20;
    /// Start of the vring array.
    pub const VRINGS: usize = 24;
    /// Size of one vring entry.
    pub const VRING_LEN: usize = 20;
    /// Offsets inside one vring entry.
    pub const VRING_DA: usize = 0;
    /// The `pa` field (high half of the vring's memory id).
    pub const VRING_PA: usize = 16;
}

/// Why a descriptor was refused (the whole parse fails, spec §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RscError {
    /// Fewer bytes than the header, or than the header plus its offset array.
    TooShort {
        /// The table's size in bytes.
        size: usize,
    },
    /// The version is not 1.
    BadVersion(u32),
    /// An entry offset points outside the table, or leaves no room for the entry type.
    BadOffset {
        /// The entry's index.
        entry: usize,
        /// Its offset.
        offset: u32,
    },
    /// A virtio-device entry does not fit its vrings and config space.
    VdevTooLarge {
        /// The entry's index.
        entry: usize,
    },
}

impl core::fmt::Display for RscError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RscError::TooShort { size } => write!(f, "resource table of {size} bytes is too short"),
            RscError::BadVersion(v) => write!(f, "resource table version {v} is not 1"),
            RscError::BadOffset { entry, offset } => {
                write!(f, "resource entry {entry} at offset {offset} lies outside the table")
            }
            RscError::VdevTooLarge { entry } => {
                write!(f, "virtio device entry {entry} does not fit in the table")
            }
        }
    }
}

/// One vring as described by a vdev entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringInfo {
    /// Alignment of the used ring.
    pub align: u32,
    /// Number of descriptors.
    pub num: u32,
    /// The id kicks of this vring carry.
    pub notifyid: u32,
    /// The memory id the normal world filled in (da = low half, pa = high half).
    pub da: u32,
    /// High half of the memory id (see `da`).
    pub pa: u32,
}

impl VringInfo {
    /// The memory id `da` and `pa` carry together.
    pub fn memory_id(&self) -> u64 {
        (u64::from(self.pa) << 32) | u64::from(self.da)
    }
}

/// One virtio device of the table, copied out of shared memory (a trusted copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdevInfo {
    /// Byte offset of the `fw_rsc_vdev` struct inside the table (after the 4-byte type).
    pub offset: usize,
    /// Virtio device id.
    pub id: u32,
    /// The id VDEV_RESET and kicks name the device by.
    pub notifyid: u32,
    /// Features the device offers.
    pub dfeatures: u32,
    /// Features the driver accepted.
    pub gfeatures: u32,
    /// Device status byte.
    pub status: u8,
    /// Its vrings.
    pub vrings: Vec<VringInfo>,
    /// Its config space.
    pub config: Vec<u8>,
}

impl VdevInfo {
    /// Offset in the table of a field of vring `index` (`field::VRING_DA` / `field::VRING_PA`).
    pub fn vring_field_offset(&self, index: usize, field_off: usize) -> usize {
        self.offset + field::VRINGS + index * field::VRING_LEN + field_off
    }
}

/// Parses a descriptor of `bytes.len()` bytes (the size Trusty returned, already bounded by the
/// page it was written into). Non-vdev entries are skipped.
pub fn parse(bytes: &[u8]) -> Result<Vec<VdevInfo>, RscError> {
    let size = bytes.len();
    let (header, rest) = TableHeader::read_from_prefix(bytes).map_err(|_| RscError::TooShort { size })?;
    if header.ver.get() != RSC_TABLE_VERSION {
        return Err(RscError::BadVersion(header.ver.get()));
    }
    let num = header.num.get() as usize;
    let offsets_len = num.checked_mul(4).ok_or(RscError::TooShort { size })?;
    let offsets = rest.get(..offsets_len).ok_or(RscError::TooShort { size })?;
    let mut vdevs = Vec::new();
    for (entry, raw) in offsets.chunks_exact(4).enumerate() {
        let offset = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let bad = RscError::BadOffset { entry, offset };
        let start = offset as usize;
        let type_bytes = bytes.get(start..start.checked_add(4).ok_or(bad)?).ok_or(bad)?;
        let rsc_type = u32::from_le_bytes([type_bytes[0], type_bytes[1], type_bytes[2], type_bytes[3]]);
        if rsc_type != RSC_VDEV {
            log::info!("resource entry {entry}: skipping type {rsc_type}");
            continue;
        }
        let vdev_off = start + 4;
        let too_large = RscError::VdevTooLarge { entry };
        let body = bytes.get(vdev_off..).ok_or(too_large)?;
        let (vdev, after) = FwRscVdev::read_from_prefix(body).map_err(|_| too_large)?;
        let nrings = usize::from(vdev.num_of_vrings);
        let config_len = vdev.config_len.get() as usize;
        let needed = nrings.checked_mul(VRING_LEN).and_then(|n| n.checked_add(config_len)).ok_or(too_large)?;
        if after.len() < needed {
            return Err(too_large);
        }
        let mut vrings = Vec::with_capacity(nrings);
        for chunk in after[..nrings * VRING_LEN].chunks_exact(VRING_LEN) {
            let (v, _) = FwRscVdevVring::read_from_prefix(chunk).map_err(|_| too_large)?;
            vrings.push(VringInfo {
                align: v.align.get(),
                num: v.num.get(),
                notifyid: v.notifyid.get(),
                da: v.da.get(),
                pa: v.pa.get(),
            });
        }
        let config = after[nrings * VRING_LEN..nrings * VRING_LEN + config_len].to_vec();
        vdevs.push(VdevInfo {
            offset: vdev_off,
            id: vdev.id.get(),
            notifyid: vdev.notifyid.get(),
            dfeatures: vdev.dfeatures.get(),
            gfeatures: vdev.gfeatures.get(),
            status: vdev.status,
            vrings,
            config,
        });
    }
    Ok(vdevs)
}

/// One vring of a vdev, as the secure side declares it.
#[derive(Clone, Copy, Debug)]
pub struct VringDecl {
    /// Alignment of the used ring.
    pub align: u32,
    /// Number of descriptors.
    pub num: u32,
    /// The id kicks of this vring carry.
    pub notifyid: u32,
}

/// Builds a resource table the way Trusty does (spec §5.1): entry offsets follow the header and
/// offset array, vdev notifyids are registration order.
#[derive(Default)]
pub struct TableBuilder {
    entries: Vec<Vec<u8>>,
}

impl TableBuilder {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a virtio device; its notifyid is its index.
    pub fn vdev(mut self, id: u32, dfeatures: u32, vrings: &[VringDecl], config: &[u8]) -> Self {
        let mut blob = Vec::new();
        blob.extend_from_slice(&RSC_VDEV.to_le_bytes());
        let vdev = FwRscVdev {
            id: id.into(),
            notifyid: (self.entries.len() as u32).into(),
            dfeatures: dfeatures.into(),
            gfeatures: 0.into(),
            config_len: (config.len() as u32).into(),
            status: 0,
            num_of_vrings: vrings.len() as u8,
            reserved: [0; 2],
        };
        blob.extend_from_slice(vdev.as_bytes());
        for v in vrings {
            let ring = FwRscVdevVring {
                da: 0.into(),
                align: v.align.into(),
                num: v.num.into(),
                notifyid: v.notifyid.into(),
                pa: 0.into(),
            };
            blob.extend_from_slice(ring.as_bytes());
        }
        blob.extend_from_slice(config);
        self.entries.push(blob);
        self
    }

    /// Adds an entry of another type (normal worlds must skip it).
    pub fn raw_entry(mut self, rsc_type: u32, body: &[u8]) -> Self {
        let mut blob = Vec::new();
        blob.extend_from_slice(&rsc_type.to_le_bytes());
        blob.extend_from_slice(body);
        self.entries.push(blob);
        self
    }

    /// The table's bytes: header, offset array, entries.
    pub fn build(&self) -> Vec<u8> {
        let header = TableHeader { ver: RSC_TABLE_VERSION.into(), num: (self.entries.len() as u32).into(), reserved: [0.into(); 2] };
        let mut out = Vec::new();
        out.extend_from_slice(header.as_bytes());
        let mut offset = HEADER_LEN + 4 * self.entries.len();
        for e in &self.entries {
            out.extend_from_slice(&(offset as u32).to_le_bytes());
            offset += e.len();
        }
        for e in &self.entries {
            out.extend_from_slice(e);
        }
        out
    }
}

/// The TIPC config space (spec §5.1): max message buffer size, alignment, device name.
pub fn tipc_config(msg_buf_max_size: u32, msg_buf_alignment: u32, dev_name: &str) -> [u8; 40] {
    let mut c = [0u8; 40];
    c[0..4].copy_from_slice(&msg_buf_max_size.to_le_bytes());
    c[4..8].copy_from_slice(&msg_buf_alignment.to_le_bytes());
    let name = dev_name.as_bytes();
    let n = name.len().min(31);
    c[8..8 + n].copy_from_slice(&name[..n]);
    c
}

/// Trusty's default table: one TIPC device with two 32-entry rings and 4096-byte messages.
pub fn default_tipc_table(dev_name: &str) -> Vec<u8> {
    let rings = [VringDecl { align: 4096, num: 32, notifyid: 1 }, VringDecl { align: 4096, num: 32, notifyid: 2 }];
    TableBuilder::new().vdev(VIRTIO_ID_TIPC, 0, &rings, &tipc_config(4096, 4096, dev_name)).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_spec_bytes() {
        let t = default_tipc_table("dev0");
        assert_eq!(t.len(), 128);
        assert_eq!(&t[16..20], &20u32.to_le_bytes());
        assert_eq!(&t[20..24], &3u32.to_le_bytes());
        assert_eq!(&t[24..28], &13u32.to_le_bytes());
        assert_eq!(&t[40..44], &40u32.to_le_bytes());
        assert_eq!(t[45], 2);
        assert_eq!(&t[52..56], &4096u32.to_le_bytes());
        assert_eq!(&t[60..64], &1u32.to_le_bytes());
        assert_eq!(&t[80..84], &2u32.to_le_bytes());
        assert_eq!(&t[88..92], &4096u32.to_le_bytes());
        assert_eq!(&t[96..100], b"dev0");
        let v = parse(&t).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].offset, 24);
        assert_eq!(v[0].vrings[1].notifyid, 2);
        assert_eq!(v[0].config.len(), 40);
        assert_eq!(v[0].vring_field_offset(0, field::VRING_DA), 48);
        assert_eq!(v[0].vring_field_offset(1, field::VRING_PA), 84);
    }

    #[test]
    fn malformed_tables_fail_cleanly() {
        let t = default_tipc_table("dev0");
        assert_eq!(parse(&t[..10]), Err(RscError::TooShort { size: 10 }));
        let mut bad = t.clone();
        bad[0] = 2;
        assert_eq!(parse(&bad), Err(RscError::BadVersion(2)));
        let mut bad = t.clone();
        bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(parse(&bad), Err(RscError::TooShort { .. })));
        let mut bad = t.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bad).is_err());
        let mut bad = t.clone();
        bad[16..20].copy_from_slice(&126u32.to_le_bytes());
        assert!(matches!(parse(&bad), Err(RscError::BadOffset { .. })));
        let mut bad = t.clone();
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&bad), Err(RscError::BadOffset { .. })));
        let mut bad = t.clone();
        bad[40..44].copy_from_slice(&41u32.to_le_bytes()); // config one byte too long
        assert_eq!(parse(&bad), Err(RscError::VdevTooLarge { entry: 0 }));
        let mut bad = t.clone();
        bad[45] = 255;
        assert_eq!(parse(&bad), Err(RscError::VdevTooLarge { entry: 0 }));
        assert!(matches!(parse(&t[..100]), Err(RscError::VdevTooLarge { .. })));
    }

    #[test]
    fn unknown_entries_are_skipped() {
        let rings = [VringDecl { align: 4096, num: 8, notifyid: 1 }];
        let t = TableBuilder::new().raw_entry(7, &[1, 2, 3, 4]).vdev(13, 0, &rings, &[]).build();
        let v = parse(&t).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].notifyid, 1);
        assert_eq!(v[0].vrings[0].num, 8);
    }

    #[test]
    fn parse_never_panics_on_any_prefix_or_byte_flip() {
        let t = default_tipc_table("dev0");
        for len in 0..t.len() {
            let _ = parse(&t[..len]);
        }
        for i in 0..t.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut bad = t.clone();
                bad[i] = v;
                let _ = parse(&bad);
            }
        }
    }
}
