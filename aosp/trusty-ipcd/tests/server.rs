//! The serving loop in this process (socket pairs through `ServerHandle::connect_pair`): the
//! convention, the per-client limits, the memory-reference seam and non-blocking service.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use trusty_ipcd::server::CONTROL_STATUS;
use trusty_ipcd::{sim, sys, Limits, Server, ServerHandle};

const ECHO: &str = "com.android.ipc-unittest.srv.echo";

fn start(limits: Limits) -> (ServerHandle, std::thread::JoinHandle<()>) {
    let (stack, _) = sim::bring_up(sim::DEFAULT_PLATFORM, false).expect("bring-up");
    Server::new(stack, limits).expect("server").spawn().expect("spawn")
}

fn send(fd: &OwnedFd, data: &[u8]) {
    let iov = [libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() }];
    assert_eq!(sys::send_iov_fds(fd.as_raw_fd(), &iov, &[]), Ok(data.len()));
}

/// Reads one packet, waiting at most 5 s; None at end of file.
fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    assert!(unsafe { libc::poll(&mut p, 1, 5000) } > 0, "nothing to read within 5 s");
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "read failed: errno {}", sys::errno());
    if n == 0 && p.revents & libc::POLLHUP != 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// A channel to `port`: Some(fd) after the status byte, None if the daemon closed instead.
fn open(h: &ServerHandle, port: &str) -> Option<OwnedFd> {
    let fd = h.connect_pair().expect("socket pair");
    send(&fd, port.as_bytes());
    let st = recv(&fd)?;
    assert_eq!(st, [0u8]);
    Some(fd)
}

fn status(h: &ServerHandle, key: &str) -> u64 {
    let fd = h.connect_pair().expect("socket pair");
    send(&fd, CONTROL_STATUS);
    let text = String::from_utf8(recv(&fd).expect("status")).expect("text");
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in '{text}'"))
}

fn wait_for(h: &ServerHandle, key: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(h, key) != want {
        assert!(Instant::now() < deadline, "{key} did not reach {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn echo_refusal_and_disconnect_on_close() {
    let (h, join) = start(Limits::default());
    let fd = open(&h, ECHO).expect("echo connects");
    for i in 0..10u8 {
        send(&fd, &[i; 100]);
        assert_eq!(recv(&fd).expect("reply"), vec![i; 100]);
    }
    assert!(open(&h, "no.such.port").is_none(), "an unknown port must be refused by closing");
    assert_eq!(status(&h, "model_endpoints"), 1);
    drop(fd);
    // The client's close reaches Trusty as DISC_REQ: the model's endpoint goes.
    wait_for(&h, "model_endpoints", 0);
    wait_for(&h, "channels", 0);
    h.stop();
    join.join().expect("loop");
}

#[test]
fn the_channel_limit_per_client_is_enforced() {
    let (h, join) = start(Limits { channels_per_client: 2, ..Limits::default() });
    let a = open(&h, ECHO).expect("first");
    let b = open(&h, ECHO).expect("second");
    assert!(open(&h, ECHO).is_none(), "a third channel must be refused");
    assert_eq!(status(&h, "over_limit"), 1);
    drop(a);
    wait_for(&h, "channels", 1);
    let c = open(&h, ECHO).expect("room again after a close");
    drop((b, c));
    h.stop();
    join.join().expect("loop");
}

#[test]
fn an_oversized_message_is_dropped_and_the_channel_goes_on() {
    let (h, join) = start(Limits::default());
    let fd = open(&h, ECHO).expect("echo");
    send(&fd, &[7u8; 5000]);
    send(&fd, b"after");
    assert_eq!(recv(&fd).expect("reply"), b"after");
    assert_eq!(status(&h, "oversize_dropped"), 1);
    h.stop();
    join.join().expect("loop");
}

#[test]
fn memory_references_are_refused_until_supported() {
    let (h, join) = start(Limits::default());
    let fd = open(&h, ECHO).expect("echo");
    let (x, _y) = sys::seqpacket_pair().expect("a descriptor to pass");
    let data = b"with fd";
    let iov = [libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() }];
    assert_eq!(sys::send_iov_fds(fd.as_raw_fd(), &iov, &[x.as_raw_fd()]), Ok(data.len()));
    send(&fd, b"plain");
    assert_eq!(recv(&fd).expect("reply"), b"plain");
    assert_eq!(status(&h, "memref_refused"), 1);
    h.stop();
    join.join().expect("loop");
}

#[test]
fn a_client_that_never_reads_does_not_stall_another() {
    let (h, join) = start(Limits { queued_bytes_per_client: 64 * 1024, ..Limits::default() });
    // Same process, so the same client for the limits: give the hog its own budget by
    // checking the other channel still gets its replies at once.
    let hog = open(&h, ECHO).expect("hog");
    let raw = hog.as_raw_fd();
    sys::set_nonblocking(raw).expect("non-blocking");
    let big = [1u8; 4000];
    let iov = [libc::iovec { iov_base: big.as_ptr().cast_mut().cast(), iov_len: big.len() }];
    let mut sent = 0;
    while sent < 400 {
        match sys::send_iov_fds(raw, &iov, &[]) {
            Ok(_) => sent += 1,
            Err(libc::EAGAIN) => break,
            Err(e) => panic!("hog write: errno {e}"),
        }
    }
    assert!(sent > 10, "the hog could write only {sent} messages");
    let other = open(&h, "com.android.ipc-unittest.srv.datasink").expect("second client");
    let start = Instant::now();
    for i in 0..50u8 {
        send(&other, &[i; 64]);
    }
    let echo = open(&h, ECHO).expect("third channel");
    send(&echo, b"ping");
    assert_eq!(recv(&echo).expect("reply"), b"ping");
    assert!(start.elapsed() < Duration::from_secs(2), "served in {:?}", start.elapsed());
    drop((hog, other, echo));
    h.stop();
    join.join().expect("loop");
}

#[test]
fn a_burst_of_requests_gets_every_reply_with_the_threaded_model() {
    // A 32-share platform: the device keeps at most a dozen unread messages per channel, so
    // the loop must pass replies on as they come, not once per round.
    let (stack, _) = sim::bring_up("xen-domu-ffa-mediator", true).expect("bring-up");
    let (h, join) = Server::new(stack, Limits::default()).expect("server").spawn().expect("spawn");
    let fd = open(&h, ECHO).expect("echo");
    for round in 0..5u8 {
        for i in 0..32u8 {
            send(&fd, &[round, i]);
        }
        for i in 0..32u8 {
            assert_eq!(recv(&fd).expect("reply"), [round, i], "round {round}");
        }
    }
    h.stop();
    join.join().expect("loop");
}

/// A platform that cannot carry memory references (the Linux grant platform: memref None)
/// says so in the status byte, and a client that sends descriptors anyway has its connection
/// ended at once (end of file), not its message dropped while it waits for an answer.
#[test]
fn without_memory_references_the_status_byte_says_so_and_a_message_with_fds_ends_the_connection() {
    use trusty_ipcd::server::{STATUS_CONNECTED, STATUS_NO_MEMREFS};
    let (mut stack, _) = sim::bring_up(sim::DEFAULT_PLATFORM, false).expect("bring-up");
    stack.memref = None;
    let (h, join) = Server::new(stack, Limits::default()).expect("server").spawn().expect("spawn");
    let fd = h.connect_pair().expect("socket pair");
    send(&fd, ECHO.as_bytes());
    assert_eq!(recv(&fd).expect("status byte"), [STATUS_CONNECTED | STATUS_NO_MEMREFS]);
    // Plain messages go on as usual.
    send(&fd, b"plain");
    assert_eq!(recv(&fd).expect("reply"), b"plain");
    let (x, _y) = sys::seqpacket_pair().expect("a descriptor to pass");
    let data = b"with fd";
    let iov = [libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() }];
    assert_eq!(sys::send_iov_fds(fd.as_raw_fd(), &iov, &[x.as_raw_fd()]), Ok(data.len()));
    let start = Instant::now();
    assert_eq!(recv(&fd), None, "the connection ends instead of the message vanishing");
    assert!(start.elapsed() < Duration::from_secs(2), "ended promptly: {:?}", start.elapsed());
    assert_eq!(status(&h, "memref_refused"), 1);
    // Another client is not affected.
    let other = h.connect_pair().expect("socket pair");
    send(&other, ECHO.as_bytes());
    assert_eq!(recv(&other).expect("status byte"), [STATUS_CONNECTED | STATUS_NO_MEMREFS]);
    send(&other, b"still here");
    assert_eq!(recv(&other).expect("reply"), b"still here");
    h.stop();
    join.join().expect("loop");
}

/// A platform that carries memory references sends the plain status byte.
#[test]
fn with_memory_references_the_status_byte_is_plain() {
    let (h, join) = start(Limits::default());
    let fd = h.connect_pair().expect("socket pair");
    send(&fd, ECHO.as_bytes());
    assert_eq!(recv(&fd).expect("status byte"), [trusty_ipcd::server::STATUS_CONNECTED]);
    h.stop();
    join.join().expect("loop");
}
