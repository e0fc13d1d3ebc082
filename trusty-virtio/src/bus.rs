//! The normal world's side of Trusty's virtio bus (spec §5.5, §5.6): fetching the descriptor
//! into a shared page, patching the fields the driver owns, START, STOP, VDEV_RESET and kicks.

use alloc::vec::Vec;
use core::fmt;

use trusty_platform::mem::{Access, MemoryId, SharedBuf, SharedMemory, PAGE_SIZE};
use trusty_platform::smc::{api, call, SmError};
use trusty_platform::trusty::Trusty;

use crate::rsc::{self, field, RscError, VdevInfo};
use crate::vring::LayoutError;

/// The status byte Trusty requires at START: ACKNOWLEDGE | DRIVER | DRIVER_OK, and *not*
/// FEATURES_OK, because VERSION_1 is never negotiated (spec §5.5 step 5e, §11 subtlety 3).
/// virtio-drivers' own init path always sets FEATURES_OK, so it cannot drive this bus.
pub const STATUS_AT_START: u8 = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK;
/// ACKNOWLEDGE | DRIVER: the status while the driver sets the device up.
pub const STATUS_DRIVER: u8 = status::ACKNOWLEDGE | status::DRIVER;

/// Device status bits, virtio 1.2 §2.1 "Device Status Field" (the same values as Linux's
/// `VIRTIO_CONFIG_S_*` in include/uapi/linux/virtio_config.h).
///
/// Our own constants rather than the `virtio-drivers` crate's `DeviceStatus`: these bits are
/// all this bus needs from it, and AOSP's `libvirtio_drivers` is a device-only no_std rlib with
/// no host or vendor variant, so depending on it would keep this crate out of host tests and
/// vendor code.
pub mod status {
    /// The guest has found the device and recognised it.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged the features it understands (never set on Trusty's bus).
    pub const FEATURES_OK: u8 = 8;
    /// The device has hit an error from which it cannot recover.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// Something went wrong in the guest and it has given up on the device.
    pub const FAILED: u8 = 128;
}

/// Failures of the bus layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// A call into Trusty or a memory operation failed.
    Platform(trusty_platform::Error),
    /// The descriptor (resource table) was refused.
    Descriptor(RscError),
    /// Trusty answered GET_DESCR with a size outside 1..=the page.
    DescriptorSize(i64),
    /// A vring's size or alignment cannot be laid out.
    Layout(LayoutError),
    /// A call was made in a state that does not allow it.
    State(&'static str),
}

impl From<trusty_platform::Error> for BusError {
    fn from(e: trusty_platform::Error) -> Self {
        BusError::Platform(e)
    }
}
impl From<RscError> for BusError {
    fn from(e: RscError) -> Self {
        BusError::Descriptor(e)
    }
}
impl From<LayoutError> for BusError {
    fn from(e: LayoutError) -> Self {
        BusError::Layout(e)
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Platform(e) => write!(f, "{e}"),
            BusError::Descriptor(e) => write!(f, "bad virtio descriptor: {e}"),
            BusError::DescriptorSize(s) => write!(f, "Trusty returned a descriptor size of {s}"),
            BusError::Layout(e) => write!(f, "unusable vring: {e:?}"),
            BusError::State(s) => write!(f, "virtio bus: {s}"),
        }
    }
}

/// Index of a vdev in the parsed descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VdevHandle(usize);

/// The bus: owns the call discipline and the shared memory for everything above it.
pub struct Bus {
    trusty: Trusty,
    mem: SharedMemory,
    descr: Option<SharedBuf>,
    /// The descriptor page's id as GET_DESCR/START/STOP pass it: with memory attributes even
    /// below API 4 ([`trusty_platform::mem::Sharer::attributed_id`]).
    descr_arg: MemoryId,
    descr_size: u32,
    vdevs: Vec<VdevInfo>,
    started: bool,
}

impl Bus {
    /// A bus over `trusty`, sharing memory through `mem`; nothing is fetched or started yet.
    pub fn new(trusty: Trusty, mem: SharedMemory) -> Self {
        Bus { trusty, mem, descr: None, descr_arg: MemoryId(0), descr_size: 0, vdevs: Vec::new(), started: false }
    }

    /// The Trusty call interface.
    pub fn trusty(&mut self) -> &mut Trusty {
        &mut self.trusty
    }
    /// The Trusty call interface, shared.
    pub fn trusty_ref(&self) -> &Trusty {
        &self.trusty
    }
    /// The shared-memory manager.
    pub fn mem(&mut self) -> &mut SharedMemory {
        &mut self.mem
    }
    /// The shared-memory manager, shared.
    pub fn mem_ref(&self) -> &SharedMemory {
        &self.mem
    }
    /// Both halves at once, for code that shares memory while making calls.
    pub fn parts(&mut self) -> (&mut Trusty, &mut SharedMemory) {
        (&mut self.trusty, &mut self.mem)
    }

    /// Shares a zeroed page, asks Trusty to describe its devices into it, and parses the result
    /// into a trusted copy (spec §5.5 steps 3-5).
    pub fn fetch_descriptor(&mut self) -> Result<Vec<VdevHandle>, BusError> {
        if self.descr.is_some() {
            return Err(BusError::State("descriptor already fetched"));
        }
        let page = self.mem.alloc_shared(PAGE_SIZE, Access::ReadWrite)?;
        // Linux trusty_virtio_probe: the descriptor page is shared with trusty_share_memory, so
        // its id keeps the memory attributes at API < 4 (vrings and buffers do not).
        let id = self.mem.sharer().attributed_id(page.id(), Access::ReadWrite);
        let get_descr = |trusty: &mut Trusty| trusty.std_call(call::SC_VIRTIO_GET_DESCR, id.lo(), id.hi(), PAGE_SIZE as u32);
        let mut answer = get_descr(&mut self.trusty);
        if answer == Err(trusty_platform::Error::Sm(SmError::NotAllowed)) {
            // Upstream Trusty keeps one bus per client from GET_DESCR until VIRTIO_STOP
            // (lib/trusty/trusty_virtio.c virtio_get_description(): ERR_NOT_ALLOWED while the
            // client's bus exists). A normal world that restarted without tearing down (a DomU
            // reboot, a crashed driver) finds its previous bus still there: VIRTIO_STOP resets
            // its devices and removes it whatever its state (virtio_stop(); ERR_BAD_STATE if it
            // was not active, which is expected here), then GET_DESCR is asked once more. The
            // STOP's descriptor arguments are only logged by Trusty.
            log::warn!("Trusty still has a virtio bus from a previous start: stopping it");
            let _ = self.trusty.std_call(call::SC_VIRTIO_STOP, id.lo(), id.hi(), PAGE_SIZE as u32);
            answer = get_descr(&mut self.trusty);
        }
        let size = match answer {
            Ok(size) => size,
            Err(e) => {
                let _ = self.give_back(page);
                return Err(e.into());
            }
        };
        if size == 0 || size as usize > PAGE_SIZE {
            let _ = self.mem.release(page);
            return Err(BusError::DescriptorSize(i64::from(size)));
        }
        let mut copy = alloc::vec![0u8; size as usize];
        page.read(0, &mut copy)?;
        let vdevs = match rsc::parse(&copy) {
            Ok(v) => v,
            Err(e) => {
                let _ = self.mem.release(page);
                return Err(e.into());
            }
        };
        self.descr = Some(page);
        self.descr_arg = id;
        self.descr_size = size;
        self.vdevs = vdevs;
        Ok((0..self.vdevs.len()).map(VdevHandle).collect())
    }

    /// The trusted copy of a vdev entry.
    pub fn vdev(&self, h: VdevHandle) -> Option<&VdevInfo> {
        self.vdevs.get(h.0)
    }

    fn write_field(&mut self, offset: usize, bytes: &[u8]) -> Result<(), BusError> {
        let page = self.descr.as_ref().ok_or(BusError::State("no descriptor"))?;
        if offset + bytes.len() > self.descr_size as usize {
            return Err(BusError::State("field outside the descriptor"));
        }
        page.write(offset, bytes)?;
        Ok(())
    }

    fn vdev_info(&self, h: VdevHandle) -> Result<&VdevInfo, BusError> {
        self.vdevs.get(h.0).ok_or(BusError::State("no such vdev"))
    }

    /// VDEV_RESET. Before START Trusty answers ERR_BAD_STATE, which the caller may ignore
    /// (spec §5.5 step 5a).
    pub fn reset_vdev(&mut self, h: VdevHandle) -> Result<(), BusError> {
        let notifyid = self.vdev_info(h)?.notifyid;
        self.trusty.std_call(call::SC_VDEV_RESET, notifyid, 0, 0)?;
        Ok(())
    }

    /// Writes device `h`'s status byte into the shared descriptor page (Trusty reads it at START).
    pub fn set_status(&mut self, h: VdevHandle, status: u8) -> Result<(), BusError> {
        let off = self.vdev_info(h)?.offset + field::STATUS;
        self.write_field(off, &[status])?;
        if let Some(v) = self.vdevs.get_mut(h.0) {
            v.status = status;
        }
        Ok(())
    }

    /// Writes the features the driver accepts (`gfeatures`) for device `h` into the shared
    /// descriptor page.
    pub fn set_features(&mut self, h: VdevHandle, gfeatures: u32) -> Result<(), BusError> {
        let off = self.vdev_info(h)?.offset + field::GFEATURES;
        self.write_field(off, &gfeatures.to_le_bytes())?;
        if let Some(v) = self.vdevs.get_mut(h.0) {
            v.gfeatures = gfeatures;
        }
        Ok(())
    }

    /// Records a vring's memory id: low half in `da`, high half in `pa` (spec §5.1).
    pub fn set_vring_id(&mut self, h: VdevHandle, ring: usize, id: MemoryId) -> Result<(), BusError> {
        let v = self.vdev_info(h)?;
        if ring >= v.vrings.len() {
            return Err(BusError::State("no such vring"));
        }
        let da = v.vring_field_offset(ring, field::VRING_DA);
        let pa = v.vring_field_offset(ring, field::VRING_PA);
        self.write_field(da, &id.lo().to_le_bytes())?;
        self.write_field(pa, &id.hi().to_le_bytes())?;
        if let Some(r) = self.vdevs.get_mut(h.0).and_then(|v| v.vrings.get_mut(ring)) {
            r.da = id.lo();
            r.pa = id.hi();
        }
        Ok(())
    }

    /// VIRTIO_START with the exact size GET_DESCR returned (spec §5.5 step 6). The caller
    /// rescans its rings afterwards: Trusty sends GO_ONLINE inside this call.
    pub fn start(&mut self) -> Result<(), BusError> {
        if self.descr.is_none() {
            return Err(BusError::State("start before descriptor"));
        }
        let id = self.descr_arg;
        if self.started {
            return Err(BusError::State("already started"));
        }
        self.trusty.std_call(call::SC_VIRTIO_START, id.lo(), id.hi(), self.descr_size)?;
        self.started = true;
        Ok(())
    }

    /// VIRTIO_START succeeded and no STOP followed.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Tells Trusty that vring `vring_notifyid` of a vdev has new buffers (spec §4): a NOP with
    /// arguments from API 3, a standard call before.
    #[inline]
    pub fn kick(&mut self, h: VdevHandle, vring_notifyid: u32) -> Result<(), BusError> {
        let notifyid = self.vdev_info(h)?.notifyid;
        if self.trusty.api_version() >= api::SMP_NOP {
            self.trusty.nop(call::NC_VDEV_KICK_VQ, notifyid, vring_notifyid)?;
        } else {
            self.trusty.std_call(call::SC_VDEV_KICK_VQ, notifyid, vring_notifyid, 0)?;
        }
        Ok(())
    }

    /// VIRTIO_STOP, then reclaims the descriptor page (spec §5.6), then closes the sharer (FF-A
    /// unmaps and frees its RX/TX pair, as Linux's arm_ffa driver does at teardown). Devices must
    /// have been reset and their memory reclaimed first. This ends the bus's life: nothing can be
    /// shared through it afterwards.
    pub fn stop(&mut self) -> Result<(), BusError> {
        let stop = self.stop_bus();
        let close = self.mem.close().map_err(BusError::from);
        stop.and(close)
    }

    fn stop_bus(&mut self) -> Result<(), BusError> {
        let Some(page) = self.descr.take() else { return Ok(()) };
        let id = self.descr_arg;
        let stop = if self.started {
            self.trusty.std_call(call::SC_VIRTIO_STOP, id.lo(), id.hi(), self.descr_size).map(|_| ())
        } else {
            Ok(())
        };
        self.started = false;
        self.vdevs.clear();
        // Even when STOP failed the page is offered back; a denied reclaim leaks it, and so
        // does a STOP that Trusty still holds (it may still use the page).
        let reclaim = self.give_back(page);
        stop?;
        reclaim?;
        Ok(())
    }

    /// Reclaims and frees a page the bus shared, unless a standard call that refers to it is
    /// still pending in Trusty after a timeout: then the page is leaked (and counted), because
    /// Trusty may still write it when it finishes the call.
    fn give_back(&mut self, page: SharedBuf) -> Result<(), BusError> {
        if let Some(p) = self.trusty.pending_call() {
            log::warn!("Trusty still holds standard call {:#x}; leaking {} instead of freeing it", p.fid, page.id());
            self.mem.leak(page);
            return Ok(());
        }
        self.mem.release(page)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values virtio 1.2 §2.1 gives, so that a typo in [`status`] cannot go unnoticed
    /// (spec §5.5 step 5e: exactly ACKNOWLEDGE | DRIVER | DRIVER_OK at START).
    #[test]
    fn status_bits_are_the_virtio_spec_values() {
        assert_eq!(STATUS_AT_START, 0x07);
        assert_eq!(STATUS_DRIVER, 0x03);
        assert_eq!(status::FEATURES_OK, 0x08);
        assert_eq!(status::DEVICE_NEEDS_RESET, 0x40);
        assert_eq!(status::FAILED, 0x80);
    }
}
