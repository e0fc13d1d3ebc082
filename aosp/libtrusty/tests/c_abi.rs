//! The C API through its C names only: these declarations bind by symbol name, so the test
//! fails to link if an export is renamed or loses `#[no_mangle]`. The channels are file
//! descriptors, used from several threads at once with read/write/poll.

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
    fn tipc_connect(dev_name: *const c_char, srv_name: *const c_char) -> c_int;
    fn tipc_send(fd: c_int, iov: *const IoVec, iovcnt: c_int, shm: *mut TrustyShm, shmcnt: c_int) -> isize;
    fn tipc_close(fd: c_int) -> c_int;
}

fn connect(port: &std::ffi::CStr) -> c_int {
    // SAFETY: both arguments are NUL-terminated strings.
    unsafe { tipc_connect(c"sim".as_ptr(), port.as_ptr()) }
}

fn read(fd: c_int, buf: &mut [u8]) -> isize {
    // SAFETY: `buf` is writable for its length.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

fn poll_in(fd: c_int, ms: c_int) -> i16 {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc > 0 {
        p.revents
    } else {
        0
    }
}

#[test]
fn c_symbols_from_several_threads() {
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                let fd = connect(c"com.android.ipc-unittest.srv.echo");
                assert!(fd >= 0, "connect: {fd}");
                for i in 0..50u8 {
                    let a = [t, i, 1];
                    let b = [t, i, 2, 3];
                    let iov = [IoVec { iov_base: a.as_ptr().cast(), iov_len: 3 }, IoVec { iov_base: b.as_ptr().cast(), iov_len: 4 }];
                    // SAFETY: two iovecs over live arrays; no shm.
                    let n = unsafe { tipc_send(fd, iov.as_ptr(), 2, std::ptr::null_mut(), 0) };
                    assert_eq!(n, 7);
                    assert_ne!(poll_in(fd, 5000) & libc::POLLIN, 0, "no reply within 5 s");
                    let mut rx = [0u8; 16];
                    assert_eq!(read(fd, &mut rx), 7);
                    assert_eq!(&rx[..7], &[t, i, 1, t, i, 2, 3]);
                }
                // SAFETY: our fd.
                assert_eq!(unsafe { tipc_close(fd) }, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

#[test]
fn a_blocked_reader_does_not_stall_another_channel() {
    let idle = connect(c"com.android.ipc-unittest.srv.echo");
    assert!(idle >= 0);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        // Blocks until the channel is closed under it (read then fails or returns 0).
        read(idle, &mut buf)
    });
    std::thread::sleep(Duration::from_millis(50));
    let fd = connect(c"com.android.ipc-unittest.srv.echo");
    assert!(fd >= 0);
    let start = Instant::now();
    for i in 0..20u8 {
        // SAFETY: one byte from a local.
        assert_eq!(unsafe { libc::write(fd, std::ptr::addr_of!(i).cast(), 1) }, 1);
        let mut rx = [0u8; 4];
        assert_eq!(read(fd, &mut rx), 1);
        assert_eq!(rx[0], i);
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    // SAFETY: our fds; shutting down the idle one wakes its reader.
    unsafe {
        libc::shutdown(idle, libc::SHUT_RDWR);
        tipc_close(fd);
    }
    assert!(reader.join().expect("reader") <= 0);
    // SAFETY: our fd.
    unsafe { tipc_close(idle) };
}
