//! Memory references from file descriptors on the embedded machine (libtrusty `tipc_send` with
//! `struct trusty_shm`): the fd's own pages are shared, the model's writes are seen through the
//! client's mapping, and everything is detached and unmapped after Trusty's RELEASE.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tipc_test::backend::{ShmObject, SimBackend, TipcBackend, Transfer};
use tipc_test::cases::{MEMREF_CHUNKS, MEMREF_CHUNK_SIZE, MEMREF_RECEIVER};
use tipc_test::shm::FdObject;
use trusty_model::host::ModelMode;

const SIZE: usize = MEMREF_CHUNK_SIZE * MEMREF_CHUNKS;

/// The fd reopened with other access flags (through /proc/self/fd, as another process would
/// get it).
fn reopen(fd: i32, flags: i32) -> OwnedFd {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).unwrap();
    // SAFETY: a valid path; the returned fd is ours.
    let raw = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(raw >= 0, "reopen: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn hello_on_every_page(obj: &dyn ShmObject) -> bool {
    (0..MEMREF_CHUNKS).all(|p| {
        let mut got = [0u8; 19];
        obj.read(p * MEMREF_CHUNK_SIZE, &mut got) && &got == b"Hello from Trusty!\0"
    })
}

#[test]
fn a_memfd_is_shared_in_place_and_detached_after_release() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let mut b = SimBackend::native(mode).unwrap();
        let h = b.connect(MEMREF_RECEIVER).unwrap();
        let base_shares = b.sim().model().live_shares();
        let obj = FdObject::memfd(SIZE).unwrap();
        assert_eq!(b.send_shm(h, &[], &[(&obj, Transfer::Share)]), Ok(0));
        let mut c = [1u8];
        assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))), Ok(1));
        // The receiver wrote into the memfd itself: the client's own mapping shows it.
        assert!(hello_on_every_page(&obj));
        // RELEASE came first: the share is reclaimed, the pages detached and unmapped.
        assert_eq!(b.sim().model().live_shares(), base_shares);
        assert_eq!(b.sim().ram().foreign_attached(), 0);
        assert_eq!(b.device().memrefs_outstanding(), 0);
        b.close(h).unwrap();
        b.shutdown().unwrap();
        assert_eq!(b.sim().model().live_shares(), 0);
    }
}

/// Linux dn_share_fd(): a write-only fd is EACCES; a read-only one is shared read-only, so the
/// receiver cannot map it writable, closes the channel, and (as memref-test's receiver.c does
/// on that path) never closes the handle: no RELEASE, the share stays live and the memfd stays
/// untouched.
#[test]
fn access_modes_follow_the_fd() {
    let mut b = SimBackend::native(ModelMode::Sync).unwrap();
    let obj = FdObject::memfd(SIZE).unwrap();
    let wronly = reopen(obj.fd(), libc::O_WRONLY);
    let rdonly = reopen(obj.fd(), libc::O_RDONLY);
    let h = b.connect(MEMREF_RECEIVER).unwrap();
    assert_eq!(b.send_fds(h, &[], &[(wronly.as_raw_fd(), Transfer::Share)]).map_err(|e| e.0), Err(libc::EACCES));
    assert_eq!(b.sim().ram().foreign_attached(), 0);
    let base_shares = b.sim().model().live_shares();
    assert_eq!(b.send_fds(h, &[], &[(rdonly.as_raw_fd(), Transfer::Share)]), Ok(0));
    let mut c = [0u8];
    // The receiver closed the channel instead of answering.
    assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))).map_err(|e| e.0), Err(libc::ENOTCONN));
    assert!(!hello_on_every_page(&obj));
    let mut first = [0u8; 4];
    assert!(obj.read(0, &mut first) && first == [0; 4], "nothing was written through a read-only share");
    assert_eq!(b.device().memrefs_outstanding(), 1, "Trusty still holds the reference");
    assert_eq!(b.sim().model().live_shares(), base_shares + 1);
    assert!(b.sim().model().faults().is_empty(), "{:?}", b.sim().model().faults());
    b.close(h).unwrap();
}

/// The transfer kinds this stack cannot honour, refused before anything is shared.
#[test]
fn unsupported_transfer_kinds_are_refused_with_the_driver_errno() {
    let mut b = SimBackend::native(ModelMode::Sync).unwrap();
    let obj = FdObject::memfd(SIZE).unwrap();
    let h = b.connect(MEMREF_RECEIVER).unwrap();
    let base = b.sim().model().live_shares();
    assert_eq!(b.send_shm(h, &[], &[(&obj, Transfer::Lend)]).map_err(|e| e.0), Err(tipc::errno::EOPNOTSUPP));
    assert_eq!(b.send_shm(h, &[], &[(&obj, Transfer::SendSecure)]).map_err(|e| e.0), Err(tipc::errno::ENODATA));
    assert_eq!((b.sim().model().live_shares(), b.sim().ram().foreign_attached()), (base, 0));
    // TRUSTY_SEND_SECURE_OR_SHARE: a memfd owns no platform id, so it is shared.
    assert_eq!(b.send_shm(h, &[], &[(&obj, Transfer::SendSecureOrShare)]), Ok(0));
    let mut c = [1u8];
    assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))), Ok(1));
    assert!(hello_on_every_page(&obj));
    b.close(h).unwrap();
}

/// The client may close its fd and unmap right after sending: the reference keeps the memory
/// (Linux holds the dma-buf), and the receiver's writes still reach the memfd.
#[test]
fn the_reference_keeps_the_memory_alive_after_the_client_lets_go() {
    let mut b = SimBackend::native(ModelMode::Threaded).unwrap();
    let obj = FdObject::memfd(SIZE).unwrap();
    let other = reopen(obj.fd(), libc::O_RDWR);
    let h = b.connect(MEMREF_RECEIVER).unwrap();
    assert_eq!(b.send_fds(h, &[], &[(other.as_raw_fd(), Transfer::Share)]), Ok(0));
    drop(other);
    let mut c = [1u8];
    assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))), Ok(1));
    assert!(hello_on_every_page(&obj));
    b.close(h).unwrap();
}

/// Linux filp_send_ioctl(): the transfer kind is checked first, then dn_share_fd() checks the
/// channel (ENOTCONN) before the fd (EACCES). A message without a handle makes the receiver
/// close the channel ("Message had no handles").
#[test]
fn errors_come_in_the_driver_s_order() {
    let mut b = SimBackend::native(ModelMode::Sync).unwrap();
    let obj = FdObject::memfd(SIZE).unwrap();
    let wronly = reopen(obj.fd(), libc::O_WRONLY);
    let h = b.connect(MEMREF_RECEIVER).unwrap();
    assert_eq!(b.write(h, &[1]), Ok(1));
    let mut c = [0u8];
    assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))).map_err(|e| e.0), Err(libc::ENOTCONN));
    assert_eq!(b.send_fds(h, &[], &[(wronly.as_raw_fd(), Transfer::Lend)]).map_err(|e| e.0), Err(tipc::errno::EOPNOTSUPP));
    assert_eq!(b.send_fds(h, &[], &[(wronly.as_raw_fd(), Transfer::Share)]).map_err(|e| e.0), Err(libc::ENOTCONN));
    assert_eq!(b.sim().ram().foreign_attached(), 0);
    b.close(h).unwrap();
}
