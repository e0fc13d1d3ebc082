use core::fmt;

use trusty_virtio::BusError;

use crate::wire::FrameError;

/// Linux errno values, as AOSP's trusty-ipc driver returns them (spec §7.3).
pub mod errno {
    /// No such file or directory (no such port).
    pub const ENOENT: i32 = 2;
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Argument list too long.
    pub const E2BIG: i32 = 7;
    /// Bad file descriptor (handle).
    pub const EBADF: i32 = 9;
    /// Try again.
    pub const EAGAIN: i32 = 11;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Permission denied.
    pub const EACCES: i32 = 13;
    /// No such device.
    pub const ENODEV: i32 = 19;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Inappropriate ioctl.
    pub const ENOTTY: i32 = 25;
    /// Name too long.
    pub const ENAMETOOLONG: i32 = 36;
    /// Message too long.
    pub const EMSGSIZE: i32 = 90;
    /// Already connected.
    pub const EISCONN: i32 = 106;
    /// Not connected.
    pub const ENOTCONN: i32 = 107;
    /// The endpoint has shut down.
    pub const ESHUTDOWN: i32 = 108;
    /// Timed out.
    pub const ETIMEDOUT: i32 = 110;
    /// Already in progress.
    pub const EALREADY: i32 = 114;
    /// `trusty_dma_buf_get_shared_mem_id()`: the buffer owns no platform memory id.
    pub const ENODATA: i32 = 61;
    /// The platform cannot transfer memory this way (Linux `trusty_transfer_memory()`).
    pub const EOPNOTSUPP: i32 = 95;
}

/// Every failure of the TIPC layer; each maps onto the errno AOSP's driver reports for the same
/// condition, so a C API can pass it through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The device is not online (never came up, went offline, or was removed).
    NoDevice,
    /// The handle does not name an open channel.
    BadHandle,
    /// The port name is 256 bytes or longer.
    NameTooLong,
    /// An argument is invalid (empty port name, bad shm count, ...).
    InvalidArgument,
    /// The channel is connecting to another name.
    Already,
    /// The channel is connected to another name.
    IsConnected,
    /// Not connected: refused, closed by the peer, or still connecting.
    NotConnected,
    /// The channel is stale (closed locally, timed out, or the device went offline).
    Shutdown,
    /// A reply or a free buffer did not come within its timeout.
    TimedOut,
    /// A connect was ended by GO_OFFLINE before Trusty answered (Linux dn_wait_for_reply():
    /// woken with the channel neither connected nor disconnected -> EIO).
    WentOffline,
    /// The message does not fit a buffer, or the caller's buffer is smaller than the message.
    MessageSize,
    /// Nothing to do without blocking.
    Again,
    /// Too many shared-memory references.
    TooBig,
    /// No memory for a buffer.
    NoMemory,
    /// A frame from the peer that breaks the protocol, where it cannot simply be dropped.
    Protocol(FrameError),
    /// The bus or platform below failed.
    Bus(BusError),
    /// The secure side needs something this stack cannot do here.
    Unsupported(&'static str),
}

impl Error {
    /// The errno value (positive) the Linux driver returns for this condition.
    pub fn errno(&self) -> i32 {
        use errno::*;
        match self {
            Error::NoDevice => ENODEV,
            Error::BadHandle => EBADF,
            Error::NameTooLong => ENAMETOOLONG,
            Error::InvalidArgument => EINVAL,
            Error::Already => EALREADY,
            Error::IsConnected => EISCONN,
            Error::NotConnected => ENOTCONN,
            Error::Shutdown => ESHUTDOWN,
            Error::TimedOut => ETIMEDOUT,
            Error::WentOffline => EIO,
            Error::MessageSize => EMSGSIZE,
            Error::Again => EAGAIN,
            Error::TooBig => E2BIG,
            Error::NoMemory => ENOMEM,
            Error::Protocol(_) | Error::Bus(_) | Error::Unsupported(_) => EIO,
        }
    }
}

impl From<BusError> for Error {
    fn from(e: BusError) -> Self {
        Error::Bus(e)
    }
}

impl From<trusty_platform::Error> for Error {
    // Out of line: only failures convert, and many `?`s share one copy.
    #[cold]
    #[inline(never)]
    fn from(e: trusty_platform::Error) -> Self {
        match e {
            trusty_platform::Error::OutOfMemory => Error::NoMemory,
            e => Error::Bus(BusError::Platform(e)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Error::NoDevice => "TIPC device is not online",
            Error::BadHandle => "no such channel",
            Error::NameTooLong => "port name too long",
            Error::InvalidArgument => "invalid argument",
            Error::Already => "channel is already connecting",
            Error::IsConnected => "channel is already connected",
            Error::NotConnected => "channel is not connected",
            Error::Shutdown => "channel is shut down",
            Error::TimedOut => "timed out",
            Error::WentOffline => "the TIPC device went offline before the connect was answered",
            Error::MessageSize => "message too long",
            Error::Again => "operation would block",
            Error::TooBig => "too many shared-memory references",
            Error::NoMemory => "out of memory for message buffers",
            Error::Protocol(e) => return write!(f, "protocol violation by the peer: {e:?}"),
            Error::Bus(e) => return write!(f, "{e}"),
            Error::Unsupported(what) => return write!(f, "unsupported: {what}"),
        };
        write!(f, "{text} (errno {})", self.errno())
    }
}
