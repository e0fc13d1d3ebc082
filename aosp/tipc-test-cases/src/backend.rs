//! What the tests talk to: a libtrusty-like interface (connect / read / write / close on
//! small handles), plus errno values as tipc-test reports them.

use alloc::string::String;
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
