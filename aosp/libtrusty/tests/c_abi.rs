//! The C API through its C names only: these declarations bind by symbol name, so the test
//! fails to link if an export is renamed or loses `#[no_mangle]`. Also exercises the API from
//! several threads at once.

use std::ffi::{c_char, c_int, c_void};
use std::time::{Duration, Instant};

// Links the library; everything below goes through the C symbols.
use trusty_capi as _;

#[repr(C)]
struct IoVec {
    iov_base: *const c_void,
    iov_len: usize,
}

#[repr(C)]
struct TrustyShm {
    fd: i32,
    transfer: u32,
}

extern "C" {
    fn tipc_init(platform: *const c_char) -> c_int;
    fn tipc_shutdown();
    fn tipc_connect(dev_name: *const c_char, srv_name: *const c_char) -> c_int;
    fn tipc_send(fd: c_int, iov: *const IoVec, iovcnt: c_int, shm: *mut TrustyShm, shmcnt: c_int) -> isize;
    fn tipc_write(fd: c_int, buf: *const c_void, len: usize) -> isize;
    fn tipc_recv(fd: c_int, buf: *mut c_void, len: usize, timeout_ms: c_int) -> isize;
    fn tipc_poll(fd: c_int, timeout_ms: c_int) -> c_int;
    fn tipc_close(fd: c_int) -> c_int;
}

const EBADF: isize = 9;
const ENOTCONN: c_int = 107;

fn connect(port: &std::ffi::CStr) -> c_int {
    // SAFETY: both arguments are NUL-terminated strings.
    unsafe { tipc_connect(c"/dev/trusty-ipc-dev0".as_ptr(), port.as_ptr()) }
}

fn write(fd: c_int, data: &[u8]) -> isize {
    // SAFETY: `data` is readable for its length.
    unsafe { tipc_write(fd, data.as_ptr().cast(), data.len()) }
}

fn recv(fd: c_int, buf: &mut [u8], timeout_ms: c_int) -> isize {
    // SAFETY: `buf` is writable for its length and borrowed exclusively.
    unsafe { tipc_recv(fd, buf.as_mut_ptr().cast(), buf.len(), timeout_ms) }
}

fn poll(fd: c_int, timeout_ms: c_int) -> c_int {
    // SAFETY: takes no pointers.
    unsafe { tipc_poll(fd, timeout_ms) }
}

fn close(fd: c_int) -> c_int {
    // SAFETY: takes no pointers.
    unsafe { tipc_close(fd) }
}

#[test]
fn c_symbols_from_several_threads() {
    // SAFETY: NULL selects the default platform.
    assert_eq!(unsafe { tipc_init(std::ptr::null()) }, 0);

    // A thread blocked without limit on a channel that never receives anything must not keep
    // the others from working; closing its handle from here ends its wait with EBADF.
    let sink = connect(c"com.android.ipc-unittest.srv.datasink");
    assert!(sink >= 0);
    let blocked = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        recv(sink, &mut buf, -1)
    });

    let workers: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                let fd = connect(c"com.android.ipc-unittest.srv.echo");
                assert!(fd >= 0, "connect: {fd}");
                for i in 0..50u8 {
                    let a = [t, i, 1];
                    let b = [t, i, 2, 3];
                    let iov = [
                        IoVec { iov_base: a.as_ptr().cast(), iov_len: a.len() },
                        IoVec { iov_base: b.as_ptr().cast(), iov_len: b.len() },
                    ];
                    // SAFETY: both iovecs point to live arrays of their lengths; no shm.
                    let n = unsafe { tipc_send(fd, iov.as_ptr(), 2, std::ptr::null_mut(), 0) };
                    assert_eq!(n, 7);
                    let mut reply = [0u8; 16];
                    assert_eq!(recv(fd, &mut reply, 2000), 7);
                    assert_eq!(&reply[..7], &[t, i, 1, t, i, 2, 3]);
                }
                assert_eq!(close(fd), 0);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }

    assert_eq!(poll(sink, 0), 0);
    let start = Instant::now();
    assert_eq!(close(sink), 0);
    assert_eq!(blocked.join().expect("blocked reader"), -EBADF);
    assert!(start.elapsed() < Duration::from_secs(5));

    // A refused connect, and an echo after that.
    assert_eq!(connect(c"foo"), -ENOTCONN);
    let fd = connect(c"com.android.ipc-unittest.srv.echo");
    assert_eq!(write(fd, b"ping"), 4);
    assert_eq!(poll(fd, 1000), 1);
    let mut buf = [0u8; 8];
    assert_eq!(recv(fd, &mut buf, 0), 4);
    assert_eq!(&buf[..4], b"ping");

    // SAFETY: no arguments.
    unsafe { tipc_shutdown() };
    assert_eq!(write(fd, b"x"), -EBADF);
}
