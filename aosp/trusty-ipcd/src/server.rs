//! The serving loop: one thread owns the TIPC device and serves every client connection.
//!
//! Why one owner thread with a poll(2) loop rather than a thread per client: the device is
//! single-owner state (`&mut TipcDevice`), so per-client threads would all queue on one lock
//! or feed the owner through queues anyway; the loop never blocks on a client (every socket is
//! non-blocking, packets that cannot go out yet wait in a bounded per-connection queue), and it
//! never blocks on the device either (connects are started with `start_connect` and finished
//! by polling the channel's state, sends use `Timeout::NonBlocking` and park the message until
//! a tx buffer frees). So a client blocked in `read` is just a socket nobody writes to, and
//! cannot stall another. The cost is a 1 ms poll tick while channels are open: the polled
//! stack has no doorbell from Trusty (see the README).
//!
//! The client convention is that of Trusty's vsock bridge as AOSP's libtrusty uses it
//! (`tipc_vsock_connect()` in libtrusty's trusty.c): one connection per channel; the first
//! packet is the port name; the daemon answers one status byte ([`STATUS_CONNECTED`]) once
//! Trusty accepted, or closes the connection if the connect failed; then every packet is one
//! message in either direction. AOSP's libtrusty reads the status byte and ignores its value;
//! ours reads [`STATUS_NO_MEMREFS`] in it: this daemon cannot carry memory references, so its
//! `tipc_send` fails such a message with EOPNOTSUPP before it leaves the client. A client that
//! sends descriptors anyway has its connection ended (a clear log line and a prompt end of
//! file, never a message silently dropped while the client waits for its answer). A packet whose name starts with a NUL byte is a control
//! request instead (port names cannot contain NUL): [`CONTROL_STATUS`] answers one packet of
//! `key=value` counters and closes.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tipc::{ChannelId, ChannelState, Timeout, TipcDevice};

use crate::memref::{MemRefs, Owner};
use crate::sys::{self, Cred};

/// The byte the daemon sends once the channel is connected.
pub const STATUS_CONNECTED: u8 = 0;
/// Flag in the status byte: this daemon cannot carry memory references (its platform has no
/// way to share a client's descriptor with Trusty, e.g. gntalloc grants only pages it
/// allocated itself). AOSP's `tipc_vsock_connect()` reads the byte and ignores its value.
pub const STATUS_NO_MEMREFS: u8 = 0x40;
/// The first packet of a status query.
pub const CONTROL_STATUS: &[u8] = b"\0status";
/// Port names are shorter than this (spec §6.3).
pub const MAX_PORT_NAME: usize = 256;
/// How long a new connection may take to send its port name.
pub const NAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll tick while channels are open or connecting (the stack is polled, spec README).
const BUSY_TICK_MS: i32 = 1;
/// Poll tick with nothing open.
const IDLE_TICK_MS: i32 = 50;
/// Most packets taken from one client per loop round (fairness).
const PACKETS_PER_ROUND: usize = 16;

/// Per-client limits; a client is a process (SO_PEERCRED pid), or a single connection where
/// the socket family has no credentials (vsock).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Channels one client may have open or connecting.
    pub channels_per_client: usize,
    /// Bytes of messages from Trusty queued in the daemon for one client (beyond this, they
    /// stay in the TIPC device's queue until the client reads).
    pub queued_bytes_per_client: usize,
    /// Connections in all.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            channels_per_client: 64,
            queued_bytes_per_client: 1 << 20,
            max_connections: 1024,
        }
    }
}

/// A running stack for the server: the device and whatever it runs on.
pub struct Stack {
    /// The TIPC device the server drives (brought up).
    pub dev: TipcDevice,
    /// Extra `key=value` words for status answers (e.g. the model's open endpoints).
    pub status: Box<dyn FnMut() -> String + Send>,
    /// Kept alive as long as the device (the simulated machine under it); dropped after it.
    pub keep: Box<dyn std::any::Any + Send>,
    /// How this platform turns a client's fd into a memory reference (None: it cannot, and
    /// messages with descriptors are refused with EOPNOTSUPP).
    pub memref: Option<crate::memref::FdToMemRef>,
}

/// Counters of the serving loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Client connections accepted on a listening socket.
    pub accepted: u64,
    /// Channels Trusty accepted.
    pub connected: u64,
    /// Channels Trusty refused (or that failed to connect).
    pub refused: u64,
    /// Connects that ran out of time waiting for Trusty.
    pub timed_out: u64,
    /// Limits hit: connections, channels per client, bytes queued towards a client.
    pub over_limit: u64,
    /// Messages from a client larger than a TIPC buffer, dropped and logged.
    pub oversize_dropped: u64,
    /// Messages with memory references that could not be sent (refused by the platform); on a
    /// platform that cannot carry them at all, the connection was ended.
    pub memref_refused: u64,
    /// Sends to Trusty that failed for good.
    pub send_failed: u64,
    /// Connections ended by the client (closed or died).
    pub closed_by_client: u64,
    /// Connections ended because Trusty closed the channel.
    pub closed_by_trusty: u64,
    /// Rounds of the serving loop.
    pub rounds: u64,
    /// Rounds whose poll(2) ran out of time (the tick) with no socket ready.
    pub tick_rounds: u64,
}

enum Cmd {
    Add(OwnedFd, Cred, &'static str),
}

/// Talks to a running server from other threads.
#[derive(Clone)]
pub struct ServerHandle {
    tx: Sender<Cmd>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
}

impl ServerHandle {
    /// Gives the server a connected socket to serve (the server's end of a socket pair).
    pub fn add_client(&self, fd: OwnedFd, cred: Cred, via: &'static str) -> Result<(), i32> {
        sys::set_nonblocking(fd.as_raw_fd())?;
        self.tx
            .send(Cmd::Add(fd, cred, via))
            .map_err(|_| libc::ENODEV)?;
        sys::wake(self.wake.as_raw_fd());
        Ok(())
    }

    /// A new in-process connection: returns the client's end (blocking), which then follows
    /// the convention (port name, status byte, messages).
    pub fn connect_pair(&self) -> Result<OwnedFd, i32> {
        let (client, server) = sys::seqpacket_pair()?;
        let cred = own_cred();
        self.add_client(server, cred, "in-process")?;
        Ok(client)
    }

    /// Asks the loop to stop (it closes every channel and shuts the device down).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        sys::wake(self.wake.as_raw_fd());
    }

    /// The flag the loop checks; setting it and waking stops the loop (signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

fn own_cred() -> Cred {
    // SAFETY: plain system calls without arguments.
    unsafe {
        Cred {
            pid: libc::getpid(),
            uid: libc::getuid(),
            gid: libc::getgid(),
        }
    }
}

enum State {
    AwaitName { since: Instant },
    Connecting { id: ChannelId, deadline: Instant },
    Connected { id: ChannelId },
}

struct Conn {
    fd: OwnedFd,
    cred: Cred,
    via: &'static str,
    owner: Owner,
    port: String,
    state: State,
    /// Messages from Trusty the client's socket had no room for.
    to_client: VecDeque<Vec<u8>>,
    to_client_bytes: usize,
    /// A message for Trusty waiting for a free tx buffer (the client is not read meanwhile).
    to_trusty: Option<(Vec<u8>, Vec<OwnedFd>)>,
    /// Trusty closed the channel: flush `to_client`, then close.
    closing: bool,
    /// The queued-bytes limit was reported for this connection.
    limit_logged: bool,
}

impl Conn {
    fn channel(&self) -> Option<ChannelId> {
        match self.state {
            State::AwaitName { .. } => None,
            State::Connecting { id, .. } | State::Connected { id } => Some(id),
        }
    }
}

/// Why a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    ClientClosed,
    TrustyClosed,
    Refused,
    Failed,
    /// A control request was answered.
    Control,
}

/// The serving loop: one thread owns the device and serves every client connection with poll.
pub struct Server {
    stack: Option<Stack>,
    listeners: Vec<(OwnedFd, &'static str)>,
    conns: Vec<Option<Conn>>,
    next_owner: Owner,
    limits: Limits,
    counters: Counters,
    memrefs: MemRefs,
    cmds: Receiver<Cmd>,
    wake_rd: OwnedFd,
    handle: ServerHandle,
    /// One message buffer (the device's largest message plus one byte, to see oversize).
    buf: Vec<u8>,
    connect_timeout: Duration,
}

impl Server {
    /// A server for `stack` with `limits`; fails with the errno of its wake-up pipe.
    pub fn new(stack: Stack, limits: Limits) -> Result<Server, i32> {
        let (wake_rd, wake_wr) = sys::wake_pipe()?;
        let (tx, cmds) = mpsc::channel();
        let handle = ServerHandle {
            tx,
            wake: Arc::new(wake_wr),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let max = stack.dev.max_message_size();
        let connect_timeout = Duration::from_millis(stack.dev.config().connect_timeout_ms);
        Ok(Server {
            stack: Some(stack),
            listeners: Vec::new(),
            conns: Vec::new(),
            next_owner: 1,
            limits,
            counters: Counters::default(),
            memrefs: MemRefs::new(),
            cmds,
            wake_rd,
            handle,
            buf: vec![0; max + 1],
            connect_timeout,
        })
    }

    /// A handle other threads use to hand it connections or stop it.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves connections accepted on `fd` (a listening, non-blocking socket).
    pub fn add_listener(&mut self, fd: OwnedFd, what: &'static str) {
        self.listeners.push((fd, what));
    }

    /// Starts the loop on its own thread (the owner of the device from then on).
    pub fn spawn(self) -> std::io::Result<(ServerHandle, std::thread::JoinHandle<()>)> {
        let handle = self.handle();
        let join = std::thread::Builder::new()
            .name("trusty-ipcd".into())
            .spawn(move || self.run())?;
        Ok((handle, join))
    }

    fn dev(&mut self) -> &mut TipcDevice {
        // The stack is only taken in `finish`, after the loop.
        &mut self
            .stack
            .as_mut()
            .expect("stack present while serving")
            .dev
    }

    /// Serves until stopped; then closes every channel and shuts the device down.
    pub fn run(mut self) {
        let stop = self.handle.stop.clone();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            while let Ok(Cmd::Add(fd, cred, via)) = self.cmds.try_recv() {
                self.add_conn(fd, cred, via);
            }
            fds.clear();
            slots.clear();
            fds.push(libc::pollfd {
                fd: self.wake_rd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for (l, _) in &self.listeners {
                fds.push(libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let mut busy = false;
            for (i, c) in self.conns.iter().enumerate() {
                let Some(c) = c else { continue };
                let mut events = libc::POLLRDHUP;
                let read = match c.state {
                    State::AwaitName { .. } => true,
                    State::Connected { .. } => c.to_trusty.is_none() && !c.closing,
                    State::Connecting { .. } => false,
                };
                if read {
                    events |= libc::POLLIN;
                }
                if !c.to_client.is_empty() {
                    events |= libc::POLLOUT;
                }
                busy |= c.channel().is_some();
                fds.push(libc::pollfd {
                    fd: c.fd.as_raw_fd(),
                    events,
                    revents: 0,
                });
                slots.push(i);
            }
            let tick = if busy { BUSY_TICK_MS } else { IDLE_TICK_MS };
            self.counters.rounds += 1;
            match sys::poll(&mut fds, tick) {
                Ok(0) => self.counters.tick_rounds += 1,
                Ok(_) => {}
                Err(e) => {
                    log::error!("poll failed: errno {e}");
                    std::thread::sleep(Duration::from_millis(IDLE_TICK_MS as u64));
                    continue;
                }
            }
            if fds[0].revents != 0 {
                sys::drain(self.wake_rd.as_raw_fd());
            }
            for l in 0..self.listeners.len() {
                if fds[1 + l].revents != 0 {
                    self.accept_all(l);
                }
            }
            let base = 1 + self.listeners.len();
            for (k, &slot) in slots.iter().enumerate() {
                let revents = fds[base + k].revents;
                if revents != 0 {
                    self.client_event(slot, revents);
                }
            }
            for slot in 0..self.conns.len() {
                self.service(slot);
            }
            if let Some(s) = self.stack.as_mut() {
                self.memrefs.reap(&mut s.dev);
            }
        }
        self.finish();
    }

    fn finish(mut self) {
        log::info!("status at stop: {}", self.status());
        for slot in 0..self.conns.len() {
            self.end(slot, End::Failed, "the daemon is stopping");
        }
        if let Some(stack) = self.stack.take() {
            let Stack { dev, keep, .. } = stack;
            let (bus, result) = dev.shutdown();
            drop(bus);
            if let Err(e) = result {
                log::warn!("teardown of the TIPC device failed: {e}");
            }
            drop(keep);
        }
        log::info!("stopped");
    }

    fn accept_all(&mut self, l: usize) {
        loop {
            let (fd, what) = (&self.listeners[l].0, self.listeners[l].1);
            match sys::accept(fd.as_raw_fd()) {
                Ok(c) => {
                    let cred = sys::peer_cred(c.as_raw_fd());
                    self.add_conn(c, cred, what);
                }
                Err(libc::EAGAIN) => return,
                Err(libc::EINTR | libc::ECONNABORTED) => continue,
                Err(e) => {
                    log::warn!("accept on the {what} socket failed: errno {e}");
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, fd: OwnedFd, cred: Cred, via: &'static str) {
        self.counters.accepted += 1;
        let live = self.conns.iter().flatten().count();
        if live >= self.limits.max_connections {
            self.counters.over_limit += 1;
            log::warn!(
                "client {cred} ({via}): refused, {live} connections open (limit {})",
                self.limits.max_connections
            );
            return;
        }
        let owner = self.next_owner;
        self.next_owner += 1;
        let conn = Conn {
            fd,
            cred,
            via,
            owner,
            port: String::new(),
            state: State::AwaitName {
                since: Instant::now(),
            },
            to_client: VecDeque::new(),
            to_client_bytes: 0,
            to_trusty: None,
            closing: false,
            limit_logged: false,
        };
        log::debug!("client {cred} ({via}): connection accepted");
        match self.conns.iter().position(Option::is_none) {
            Some(s) => self.conns[s] = Some(conn),
            None => self.conns.push(Some(conn)),
        }
    }

    /// Ends connection `slot`: its channel is closed towards Trusty (DISC_REQ if it was
    /// connected or connecting), its references dropped, its socket closed.
    fn end(&mut self, slot: usize, why: End, detail: &str) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        match why {
            End::ClientClosed => self.counters.closed_by_client += 1,
            End::TrustyClosed => self.counters.closed_by_trusty += 1,
            End::Refused => self.counters.refused += 1,
            End::Failed | End::Control => {}
        }
        let level = match why {
            End::Failed => log::Level::Warn,
            End::Control => log::Level::Debug,
            _ => log::Level::Info,
        };
        log::log!(
            level,
            "client {} ({}) port '{}': {detail}",
            conn.cred,
            conn.via,
            conn.port
        );
        if let Some(id) = conn.channel() {
            if let Err(e) = self.dev().close(id) {
                log::warn!(
                    "client {} port '{}': closing the channel towards Trusty failed: {e}",
                    conn.cred,
                    conn.port
                );
            }
        }
        self.memrefs.client_gone(conn.owner);
        drop(conn);
    }

    fn client_event(&mut self, slot: usize, revents: i16) {
        if revents & libc::POLLOUT != 0 && !self.flush(slot) {
            return;
        }
        let hup = revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0;
        if revents & libc::POLLIN != 0 {
            for _ in 0..PACKETS_PER_ROUND {
                let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
                    return;
                };
                let reading = match conn.state {
                    State::AwaitName { .. } => true,
                    State::Connected { .. } => conn.to_trusty.is_none() && !conn.closing,
                    State::Connecting { .. } => false,
                };
                if !reading || !self.read_one(slot, hup) {
                    break;
                }
                // Replies go out as they come: the device queues only a few per channel
                // (rx_queue_limit), and a burst of requests can outrun a once-per-round drain.
                if let Some(State::Connected { id }) = self.conns.get(slot).and_then(Option::as_ref).map(|c| &c.state) {
                    let id = *id;
                    self.service_connected(slot, id);
                }
            }
        } else if hup {
            self.end(slot, End::ClientClosed, "client closed the connection");
        }
    }

    /// Reads and handles one packet; false when there is nothing more to read now.
    fn read_one(&mut self, slot: usize, hup: bool) -> bool {
        let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
            return false;
        };
        let fd = conn.fd.as_raw_fd();
        let mut buf = std::mem::take(&mut self.buf);
        let result = sys::recv_packet(fd, &mut buf);
        let more = match result {
            Err(libc::EAGAIN | libc::EINTR) => false,
            Err(e) => {
                self.end(
                    slot,
                    End::ClientClosed,
                    &format!("receive failed (errno {e}); connection closed"),
                );
                false
            }
            Ok(p) if p.len == 0 && p.fds.is_empty() && hup => {
                self.end(slot, End::ClientClosed, "client closed the connection");
                false
            }
            Ok(p) => self.packet(slot, &buf, p),
        };
        self.buf = buf;
        more
    }

    fn packet(&mut self, slot: usize, buf: &[u8], p: sys::Packet) -> bool {
        let max = buf.len() - 1;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        match conn.state {
            State::AwaitName { .. } => {
                let name = &buf[..p.len.min(buf.len())];
                if p.truncated || p.len >= MAX_PORT_NAME && name.first() != Some(&0) {
                    self.end(
                        slot,
                        End::Refused,
                        &format!("port name of {} bytes is too long (limit 255)", p.len),
                    );
                } else if name.first() == Some(&0) {
                    self.control(slot, name);
                } else {
                    let name = String::from_utf8_lossy(name).into_owned();
                    self.start_channel(slot, name);
                }
                false
            }
            State::Connecting { .. } => false,
            State::Connected { id } => {
                let (cred, owner) = (conn.cred, conn.owner);
                if p.fds_truncated {
                    self.counters.memref_refused += 1;
                    log::warn!("client {cred} port '{}': message dropped, it carried more than {} descriptors", conn.port, sys::MAX_FDS_PER_PACKET);
                    return true;
                }
                if p.truncated || p.len > max {
                    self.counters.oversize_dropped += 1;
                    log::warn!("client {cred} port '{}': message of {} bytes dropped: larger than the largest TIPC message ({max} bytes)", conn.port, p.len);
                    return true;
                }
                let data = &buf[..p.len];
                match self.send_to_trusty(slot, id, owner, data, &p.fds) {
                    Ok(()) => true,
                    Err(tipc::Error::Again) => {
                        if let Some(c) = self.conns[slot].as_mut() {
                            c.to_trusty = Some((data.to_vec(), p.fds));
                        }
                        false
                    }
                    Err(e) => self.send_failed(slot, e),
                }
            }
        }
    }

    /// One message to Trusty, with the client's descriptors as memory references (see
    /// [`crate::memref`]). Descriptors that cannot be shared drop the message (logged, counted):
    /// Ok, as the message is done with. On a platform that cannot carry memory references at
    /// all (the status byte said so, [`STATUS_NO_MEMREFS`]) the connection is ended instead: the
    /// client would otherwise wait for an answer to a message Trusty never got.
    fn send_to_trusty(&mut self, slot: usize, id: ChannelId, owner: Owner, data: &[u8], fds: &[OwnedFd]) -> Result<(), tipc::Error> {
        if fds.is_empty() {
            return self.dev().send(id, &[data], &[], Timeout::NonBlocking).map(|_| ());
        }
        let Some(stack) = self.stack.as_mut() else {
            return Err(tipc::Error::NoDevice);
        };
        let no_memrefs = stack.memref.is_none();
        match self.memrefs.attach(stack, owner, fds) {
            Ok(refs) => stack.dev.send_memrefs(id, &[data], refs, Timeout::NonBlocking).map(|_| ()),
            Err(e) if no_memrefs => {
                self.counters.memref_refused += 1;
                self.end(
                    slot,
                    End::Failed,
                    &format!(
                        "message with {} memory reference(s) refused: this platform cannot share a client's memory with Trusty (errno {e}, EOPNOTSUPP); connection closed",
                        fds.len()
                    ),
                );
                Ok(())
            }
            Err(e) => {
                self.counters.memref_refused += 1;
                if let Some(c) = self.conns[slot].as_ref() {
                    log::warn!("client {} port '{}': message dropped: its memory references cannot be shared (errno {e})", c.cred, c.port);
                }
                Ok(())
            }
        }
    }

    /// A send to Trusty failed for good: a closed channel or an offline device ends the
    /// connection; anything else drops the message.
    fn send_failed(&mut self, slot: usize, e: tipc::Error) -> bool {
        self.counters.send_failed += 1;
        match e {
            tipc::Error::NotConnected | tipc::Error::Shutdown => {
                if let Some(c) = self.conns[slot].as_mut() {
                    c.closing = true;
                }
                false
            }
            tipc::Error::NoDevice => {
                self.end(
                    slot,
                    End::Failed,
                    "the TIPC device is offline; connection closed",
                );
                false
            }
            e => {
                if let Some(c) = self.conns[slot].as_ref() {
                    log::warn!(
                        "client {} port '{}': message dropped: {e} (errno {})",
                        c.cred,
                        c.port,
                        e.errno()
                    );
                }
                true
            }
        }
    }

    fn control(&mut self, slot: usize, req: &[u8]) {
        let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
            return;
        };
        if req != CONTROL_STATUS {
            self.end(slot, End::Refused, "unknown control request");
            return;
        }
        let fd = conn.fd.as_raw_fd();
        let text = self.status();
        if let Err(e) = sys::send_packet(fd, text.as_bytes()) {
            log::warn!("status answer not sent: errno {e}");
        }
        self.end(slot, End::Control, "status query answered");
    }

    /// `key=value` words: the loop's counters, the device's open channels, the stack's extras.
    pub fn status(&mut self) -> String {
        let c = self.counters;
        let conns = self.conns.iter().flatten().count();
        let channels = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.channel().is_some())
            .count();
        let live_memrefs = self.stack.as_ref().map_or(0, |s| self.memrefs.live(&s.dev));
        let (open, kicks, extra) = match self.stack.as_mut() {
            Some(s) => (s.dev.open_channels(), s.dev.stats().kicks, (s.status)()),
            None => (0, 0, String::new()),
        };
        format!(
            "connections={conns} channels={channels} device_channels={open} live_memrefs={live_memrefs} accepted={} connected={} refused={} timed_out={} over_limit={} oversize_dropped={} memref_refused={} send_failed={} closed_by_client={} closed_by_trusty={} rounds={} tick_rounds={} kicks={kicks} {extra}",
            c.accepted, c.connected, c.refused, c.timed_out, c.over_limit, c.oversize_dropped, c.memref_refused, c.send_failed, c.closed_by_client, c.closed_by_trusty, c.rounds, c.tick_rounds
        )
        .trim_end()
        .to_owned()
    }

    /// Channels `cred`'s process has open or connecting (vsock peers have no pid: 0 here, and
    /// count alone).
    fn channels_of(&self, cred: Cred) -> usize {
        if cred.pid == 0 {
            return 0;
        }
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.cred.pid == cred.pid && c.channel().is_some())
            .count()
    }

    fn queued_of(&self, cred: Cred, slot: usize) -> usize {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(i, c)| {
                if cred.pid == 0 {
                    *i == slot
                } else {
                    c.cred.pid == cred.pid
                }
            })
            .map(|(_, c)| c.to_client_bytes)
            .sum()
    }

    fn start_channel(&mut self, slot: usize, port: String) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        conn.port = port.clone();
        let cred = conn.cred;
        let have = self.channels_of(cred);
        if have >= self.limits.channels_per_client {
            self.counters.over_limit += 1;
            let limit = self.limits.channels_per_client;
            self.end(
                slot,
                End::Failed,
                &format!("channel refused: this client has {have} channels open (limit {limit})"),
            );
            return;
        }
        let dev = self.dev();
        let id = match dev.open() {
            Ok(id) => id,
            Err(e) => {
                self.end(
                    slot,
                    End::Failed,
                    &format!("no channel: {e} (errno {})", e.errno()),
                );
                return;
            }
        };
        if let Err(e) = dev.start_connect(id, &port) {
            let _ = dev.close(id);
            self.end(
                slot,
                End::Refused,
                &format!("connect failed: {e} (errno {})", e.errno()),
            );
            return;
        }
        let deadline = Instant::now() + self.connect_timeout;
        if let Some(c) = self.conns[slot].as_mut() {
            c.state = State::Connecting { id, deadline };
        }
        self.service(slot);
    }

    /// Moves connection `slot` along: connect answers, parked sends, messages from Trusty.
    fn service(&mut self, slot: usize) {
        let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
            return;
        };
        match conn.state {
            State::AwaitName { since } => {
                if since.elapsed() > NAME_TIMEOUT {
                    self.end(
                        slot,
                        End::Failed,
                        "no port name within 10 s; connection closed",
                    );
                }
            }
            State::Connecting { id, deadline } => {
                // As the driver's dn_wait_for_reply() / TipcDevice::finish_connect(): a service
                // that accepted, sent and closed at once (the uuid service) counts as connected
                // while its messages are queued.
                let queued = self.dev().poll(id).is_ok_and(|f| f.readable);
                match self.dev().channel_state(id) {
                    Ok(ChannelState::Connected) | Ok(ChannelState::Disconnected) if queued => {
                        self.become_connected(slot, id);
                    }
                    Ok(ChannelState::Connected) => self.become_connected(slot, id),
                    Ok(ChannelState::Connecting) if Instant::now() < deadline => {}
                    Ok(ChannelState::Connecting) => {
                        self.counters.timed_out += 1;
                        let ms = self.connect_timeout.as_millis();
                        self.end(
                            slot,
                            End::Failed,
                            &format!("Trusty did not answer the connect within {ms} ms"),
                        );
                    }
                    Ok(_) | Err(_) => self.end(slot, End::Refused, "connect refused by Trusty"),
                }
            }
            State::Connected { id } => self.service_connected(slot, id),
        }
    }

    /// Trusty accepted: the status byte goes to the client.
    fn become_connected(&mut self, slot: usize, id: ChannelId) {
        let Some(conn) = self.conns[slot].as_mut() else { return };
        conn.state = State::Connected { id };
        self.counters.connected += 1;
        let fd = conn.fd.as_raw_fd();
        let (cred, via, port) = (conn.cred, conn.via, conn.port.clone());
        let no_memrefs = self.stack.as_ref().is_some_and(|s| s.memref.is_none());
        let status = if no_memrefs { STATUS_CONNECTED | STATUS_NO_MEMREFS } else { STATUS_CONNECTED };
        match sys::send_packet(fd, &[status]) {
            Ok(_) => log::info!("client {cred} ({via}) port '{port}': connected"),
            Err(e) => self.end(slot, End::ClientClosed, &format!("client gone before the status byte (errno {e})")),
        }
    }

    fn service_connected(&mut self, slot: usize, id: ChannelId) {
        // A message parked for a tx buffer goes first.
        if let Some((data, fds)) = self.conns[slot].as_mut().and_then(|c| c.to_trusty.take()) {
            let owner = self.conns[slot].as_ref().map_or(0, |c| c.owner);
            match self.send_to_trusty(slot, id, owner, &data, &fds) {
                Ok(()) => {}
                Err(tipc::Error::Again) => {
                    if let Some(c) = self.conns[slot].as_mut() {
                        c.to_trusty = Some((data, fds));
                    }
                }
                Err(e) => {
                    self.send_failed(slot, e);
                }
            }
        }
        let mut rx = std::mem::take(&mut self.buf);
        while let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) {
            let cred = conn.cred;
            let queued = self.queued_of(cred, slot);
            if queued >= self.limits.queued_bytes_per_client {
                let conn = self.conns[slot].as_mut().expect("checked above");
                if !conn.limit_logged {
                    conn.limit_logged = true;
                    self.counters.over_limit += 1;
                    log::warn!(
                        "client {cred} port '{}': {queued} bytes queued towards the client (limit {}); further messages wait in the TIPC device until it reads",
                        conn.port,
                        self.limits.queued_bytes_per_client
                    );
                }
                break;
            }
            match self
                .dev()
                .recv(id, &mut [&mut rx[..]], Timeout::NonBlocking)
            {
                Ok(n) => {
                    let conn = self.conns[slot].as_mut().expect("checked above");
                    if conn.to_client.is_empty() {
                        match sys::send_packet(conn.fd.as_raw_fd(), &rx[..n]) {
                            Ok(_) => continue,
                            Err(libc::EAGAIN) => {}
                            Err(e) => {
                                self.buf = rx;
                                self.end(
                                    slot,
                                    End::ClientClosed,
                                    &format!("client gone (errno {e})"),
                                );
                                return;
                            }
                        }
                    }
                    conn.to_client_bytes += n;
                    conn.to_client.push_back(rx[..n].to_vec());
                }
                Err(tipc::Error::Again) => break,
                Err(tipc::Error::NotConnected | tipc::Error::Shutdown) => {
                    if let Some(c) = self.conns[slot].as_mut() {
                        c.closing = true;
                    }
                    break;
                }
                Err(tipc::Error::NoDevice) => {
                    self.buf = rx;
                    self.end(
                        slot,
                        End::Failed,
                        "the TIPC device is offline; connection closed",
                    );
                    return;
                }
                Err(e) => {
                    log::warn!(
                        "port '{}': receive failed: {e}",
                        self.conns[slot]
                            .as_ref()
                            .map(|c| c.port.as_str())
                            .unwrap_or("")
                    );
                    break;
                }
            }
        }
        self.buf = rx;
        if let Some(c) = self.conns.get(slot).and_then(Option::as_ref) {
            if c.closing && c.to_client.is_empty() {
                self.end(slot, End::TrustyClosed, "channel closed by Trusty");
            }
        }
    }

    /// Sends what waits for the client; false if the connection ended.
    fn flush(&mut self, slot: usize) -> bool {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        while let Some(msg) = conn.to_client.front() {
            match sys::send_packet(conn.fd.as_raw_fd(), msg) {
                Ok(_) => {
                    conn.to_client_bytes -= msg.len();
                    conn.to_client.pop_front();
                    conn.limit_logged = false;
                }
                Err(libc::EAGAIN | libc::EINTR) => return true,
                Err(e) => {
                    self.end(slot, End::ClientClosed, &format!("client gone (errno {e})"));
                    return false;
                }
            }
        }
        true
    }
}
