//! Memory references a client attaches to a message: the seam between the serving loop and the
//! code that turns file descriptors (memfd, dma-buf) into TIPC shm descriptors (spec §6.9).
//!
//! Today no descriptor can be turned into shared memory here, so [`MemRefs::attach`] refuses
//! every one with `EOPNOTSUPP` and the serving loop drops that message (logged, counted). The
//! code that maps and shares the fds replaces `attach`, keeps each fd until Trusty's RELEASE
//! comes back through [`tipc::TipcDevice::take_released`] (see [`MemRefs::reap`]), and drops a
//! dead client's references in [`MemRefs::client_gone`].

use std::os::fd::OwnedFd;

use tipc::wire::ShmDesc;
use tipc::TipcDevice;

/// Identifies the connection that owns references (its slot and a generation).
pub type Owner = u64;

/// The memory references the daemon holds for its clients.
#[derive(Default)]
pub struct MemRefs {
    _private: (),
}

impl MemRefs {
    pub fn new() -> MemRefs {
        MemRefs::default()
    }

    /// Turns the descriptors of one message from `owner` into shm descriptors to send with it.
    /// `fds` are dropped (closed) on error.
    pub fn attach(
        &mut self,
        _dev: &mut TipcDevice,
        _owner: Owner,
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<ShmDesc>, i32> {
        drop(fds);
        Err(libc::EOPNOTSUPP)
    }

    /// Drops the references whose messages Trusty is done with.
    pub fn reap(&mut self, dev: &mut TipcDevice) {
        while let Some(id) = dev.take_released() {
            log::debug!("memory reference {id:#x} released by Trusty");
        }
    }

    /// `owner` went away: what it still holds goes once Trusty releases it.
    pub fn client_gone(&mut self, _owner: Owner) {}

    /// References shared and not yet released.
    pub fn live(&self) -> usize {
        0
    }
}
