//! What the tests talk to: a libtrusty-like interface (connect / read / write / close on
//! small handles), plus errno values as tipc-test reports them.

use alloc::boxed::Box;
use alloc::string::String;
use core::any::Any;
use core::fmt;
use core::time::Duration;

/// An errno value with its name, as tipc-test reports failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use tipc::errno::*;
        let name = match self.0 {
            ENOENT => "ENOENT",
            EIO => "EIO",
            E2BIG => "E2BIG",
            EBADF => "EBADF",
            EAGAIN => "EAGAIN",
            ENOMEM => "ENOMEM",
            EACCES => "EACCES",
            ENODEV => "ENODEV",
            EINVAL => "EINVAL",
            ENOTTY => "ENOTTY",
            ENAMETOOLONG => "ENAMETOOLONG",
            EMSGSIZE => "EMSGSIZE",
            EISCONN => "EISCONN",
            ENOTCONN => "ENOTCONN",
            ESHUTDOWN => "ESHUTDOWN",
            ETIMEDOUT => "ETIMEDOUT",
            EALREADY => "EALREADY",
            ENODATA => "ENODATA",
            EOPNOTSUPP => "EOPNOTSUPP",
            _ => return write!(f, "errno {}", self.0),
        };
        write!(f, "{name}")
    }
}

impl From<tipc::Error> for Errno {
    fn from(e: tipc::Error) -> Self {
        Errno(e.errno())
    }
}

/// A channel handle.
pub type Handle = i32;

/// How a memory object goes to Trusty with a message (AOSP `trusty/ipc.h` `enum
/// transfer_kind`; the numbers are the ABI of `struct trusty_shm.transfer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Transfer {
    /// Shared: both worlds keep access (FF-A MEM_SHARE).
    Share = 0,
    /// Lent: the normal world loses access while Trusty holds it (FF-A MEM_LEND).
    Lend = 1,
    /// A buffer that already has a platform-assigned memory id (secure dma-buf heaps).
    SendSecure = 2,
    /// The platform-assigned id if the buffer has one, else shared.
    SendSecureOrShare = 3,
}

impl Transfer {
    /// Whether a transfer of this kind can be honoured for memory that this stack shares
    /// itself (no platform-assigned id), with the errno of the Linux driver's refusal:
    /// TRUSTY_SHARE and TRUSTY_SEND_SECURE_OR_SHARE share; TRUSTY_LEND needs FF-A MEM_LEND,
    /// which this stack's sharers do not do, so EOPNOTSUPP (as `trusty_transfer_memory()` where
    /// the platform cannot transfer memory that way) rather than a share that would leave the
    /// normal world its access; TRUSTY_SEND_SECURE needs a buffer that owns a platform memory
    /// id: ENODATA, what `trusty_dma_buf_get_shared_mem_id()` reports for one that has none.
    pub fn check_shareable(self) -> Result<(), Errno> {
        match self {
            Transfer::Share | Transfer::SendSecureOrShare => Ok(()),
            Transfer::Lend => Err(Errno(tipc::errno::EOPNOTSUPP)),
            Transfer::SendSecure => Err(Errno(tipc::errno::ENODATA)),
        }
    }
}

/// A memory object the test allocated (a dma-buf, or a memfd where no dma-buf heap exists),
/// reached through the test's own mapping of it.
pub trait ShmObject: Any {
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether it has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What it is ("memfd", "dma-buf"), for messages.
    fn kind(&self) -> &'static str;
    /// Stores `data` at `off` through the test's mapping; false outside the object.
    fn write(&mut self, off: usize, data: &[u8]) -> bool;
    /// Loads `out.len()` bytes at `off` through the test's mapping; false outside the object.
    fn read(&self, off: usize, out: &mut [u8]) -> bool;
    /// For the backend that made it, to reach its fd.
    fn as_any(&self) -> &dyn Any;
}

/// The operations tipc-test needs: those of libtrusty plus read/write/select on the handle.
pub trait TipcBackend {
    /// A one-line description of what is under test.
    fn describe(&self) -> String;
    /// Connects to `port`; the new channel's handle (libtrusty's `tipc_connect`).
    fn connect(&mut self, port: &str) -> Result<Handle, Errno>;
    /// Sends the concatenation of `iov` as one message; the bytes sent.
    fn writev(&mut self, h: Handle, iov: &[&[u8]]) -> Result<usize, Errno>;
    /// Sends `data` as one message; the bytes sent.
    fn write(&mut self, h: Handle, data: &[u8]) -> Result<usize, Errno> {
        self.writev(h, &[data])
    }
    /// Reads one message, waiting at most `timeout` (`None`: without limit).
    fn readv(&mut self, h: Handle, bufs: &mut [&mut [u8]], timeout: Option<Duration>) -> Result<usize, Errno>;
    /// Reads one message into `buf`, waiting at most `timeout` (`None`: without limit).
    fn read(&mut self, h: Handle, buf: &mut [u8], timeout: Option<Duration>) -> Result<usize, Errno> {
        self.readv(h, &mut [buf], timeout)
    }
    /// Waits until the handle is readable (or in error); false on timeout (what select does).
    fn wait_readable(&mut self, h: Handle, timeout: Duration) -> Result<bool, Errno>;
    /// Closes the channel (libtrusty's `tipc_close`).
    fn close(&mut self, h: Handle) -> Result<(), Errno>;
    /// A memory object of `len` bytes that [`TipcBackend::send_shm`] can send (tipc-test's
    /// dma-buf heap allocation). Err says why this backend has none.
    fn alloc_shm(&mut self, len: usize) -> Result<Box<dyn ShmObject>, String> {
        let _ = len;
        Err(String::from("this backend cannot send memory references"))
    }
    /// libtrusty's `tipc_send(fd, iov, iovcnt, shm, shmcnt)`: one message of the data in `iov`
    /// with a memory reference to each object; returns the data length.
    fn send_shm(&mut self, h: Handle, iov: &[&[u8]], shm: &[(&dyn ShmObject, Transfer)]) -> Result<usize, Errno> {
        let _ = (h, iov, shm);
        Err(Errno(tipc::errno::EOPNOTSUPP))
    }
    /// Anything the secure side saw go wrong (a fault, a panic); checked after every test.
    fn health(&mut self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn errno_names() {
        assert_eq!(Errno(tipc::errno::ENOTCONN).to_string(), "ENOTCONN");
        assert_eq!(Errno(tipc::errno::ETIMEDOUT).to_string(), "ETIMEDOUT");
        assert_eq!(Errno(4242).to_string(), "errno 4242");
        assert_eq!(Errno::from(tipc::Error::BadHandle), Errno(tipc::errno::EBADF));
    }
}
