//! Trusted apps beyond the ipc-unittest services that AOSP's tipc-test talks to:
//!
//! * [`MemrefReceiver`]: Trusty's `memref-test/receiver` app (port
//!   `com.android.trusty.memref.receiver`), the peer of tipc-test's `send-fd` case;
//! * [`UnittestCtrl`]: the control port of Trusty's ipc-unittest `main` app
//!   (`com.android.ipc-unittest.ctrl`), run by lib/unittest's `unittest_main()`, the peer of
//!   tipc-test's `ta2ta-ipc` case.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{
    lk, ChanId, Ctx, Events, MemRef, PortId, TrustedApp, IPC_CONNECT_ASYNC, IPC_CONNECT_WAIT_FOR_PORT,
    IPC_PORT_ALLOW_ALL, IPC_PORT_ALLOW_NS_CONNECT, IPC_PORT_ALLOW_TA_CONNECT, MAX_PORT_BUF_SIZE,
    MAX_PORT_NAME_LEN,
};

/// Port of the memref receiver (memref-test `receiver.c`).
pub const MEMREF_RECEIVER_PORT: &str = "com.android.trusty.memref.receiver";

/// Pages the receiver expects in the object it is sent (`num_pages` in `receiver.c`).
pub const MEMREF_RECEIVER_PAGES: usize = 10;

/// What the receiver writes at the start of every page, with its NUL (`strcpy` in
/// `receiver_on_message()`).
pub const MEMREF_RECEIVER_TEXT: &[u8] = b"Hello from Trusty!\0";

/// Trusty's page size as the receiver reads it (`getauxval(AT_PAGESZ)` on arm64 Trusty).
const TRUSTY_PAGE_SIZE: usize = 4096;

/// Trusty's memref-test receiver app. Its port takes 1-byte messages, one queued, from the
/// normal world only; the tipc_srv library serves one channel at a time
/// (`tipc_add_service(hset, &receiver_port, 1, 1, ...)`: max_chan_cnt 1; lib/tipc
/// `tipc_srv.c` masks the port's events while `server_at_max_chan_cnt()`,
/// `set_ports_event_mask()`, so further connections wait until that channel is closed). For
/// every message
/// (`receiver_on_message()`):
/// * exactly one handle, else the message is refused and the channel closed (on_message's error
///   makes tipc_srv close it);
/// * the handle is mapped read-write for [`MEMREF_RECEIVER_PAGES`] pages; if that fails (an
///   object too small or read-only) the channel is closed and, as in `receiver.c`, the handle is
///   never closed (so Trusty never sends RELEASE for it);
/// * [`MEMREF_RECEIVER_TEXT`] is written at the start of each page, the handle closed (RELEASE),
///   and one byte 0 sent back "for sync".
pub struct MemrefReceiver {
    port: Option<PortId>,
    chan: Option<ChanId>,
    /// Handles the app never closes (the mmap failure path of `receiver.c`).
    leaked: Vec<MemRef>,
}

impl MemrefReceiver {
    /// The service before its port is published.
    pub fn new() -> Self {
        MemrefReceiver { port: None, chan: None, leaked: Vec::new() }
    }

    /// Handles the app holds forever (tests check that no RELEASE comes for them).
    pub fn leaked(&self) -> usize {
        self.leaked.len()
    }

    fn accept_next(&mut self, ctx: &mut Ctx<'_>) {
        if self.chan.is_some() {
            return;
        }
        if let Some(port) = self.port {
            if let Ok((chan, _uuid)) = ctx.accept(port) {
                self.chan = Some(chan);
            }
        }
    }

    fn close_chan(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) {
        let _ = ctx.close(chan);
        if self.chan == Some(chan) {
            self.chan = None;
        }
        self.accept_next(ctx);
    }

    /// `receiver_on_message()`; Err closes the channel.
    fn on_message(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) -> Result<(), i32> {
        ctx.get_msg(chan)?;
        let mut handles = ctx.take_handles(chan)?;
        ctx.put_msg(chan)?;
        if handles.len() != 1 {
            // "Message had no handles": the handles the message did carry go with it.
            for h in handles {
                ctx.close_memref(h);
            }
            return Err(lk::ERR_GENERIC);
        }
        let Some(handle) = handles.pop() else { return Err(lk::ERR_GENERIC) };
        let size = TRUSTY_PAGE_SIZE * MEMREF_RECEIVER_PAGES;
        // mmap(PROT_READ | PROT_WRITE) of the whole span: refused for a smaller or read-only
        // object (Trusty `memref_mmap()`).
        if handle.len() < size || !handle.writable() {
            self.leaked.push(handle);
            return Err(lk::ERR_INVALID_ARGS);
        }
        for page in 0..MEMREF_RECEIVER_PAGES {
            if let Err(e) = handle.write(page * TRUSTY_PAGE_SIZE, MEMREF_RECEIVER_TEXT) {
                self.leaked.push(handle);
                return Err(e);
            }
        }
        ctx.close_memref(handle);
        // "Send a message for sync"; its result is not checked in receiver.c.
        let _ = ctx.send_msg(chan, &[0]);
        Ok(())
    }
}

impl Default for MemrefReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for MemrefReceiver {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        // receiver_port: msg_max_size 1, msg_queue_len 1, IPC_PORT_ALLOW_NS_CONNECT.
        self.port = ctx.create_port(MEMREF_RECEIVER_PORT, 1, 1, IPC_PORT_ALLOW_NS_CONNECT).ok();
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, _port: PortId, events: Events) {
        if events.intersects(Events::READY) {
            self.accept_next(ctx);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::MSG) && self.on_message(ctx, chan).is_err() {
            self.close_chan(ctx, chan);
            return;
        }
        if events.intersects(Events::HUP.union(Events::ERROR)) {
            self.close_chan(ctx, chan);
        }
    }
}

/// Port of the ipc-unittest main app's test runner.
pub const UNITTEST_CTRL_PORT: &str = "com.android.ipc-unittest.ctrl";

/// First byte of every message on the control channel (lib/unittest `enum
/// test_message_header`).
pub const TEST_PASSED: u8 = 0;
/// The test failed.
pub const TEST_FAILED: u8 = 1;
/// Text for the test log follows.
pub const TEST_MESSAGE: u8 = 2;

/// Longest message `_tlog()` sends: a 256-byte buffer, header included.
const TLOG_MAX: usize = 256;

/// The ipc-unittest `main` app as lib/unittest's `unittest_main()` runs it: a port
/// (1 buffer of 4096 bytes, NS and TA may connect); for every connection accepted, the tests
/// run, every log line goes to the client as a TEST_MESSAGE, then one byte TEST_PASSED or
/// TEST_FAILED, and the channel is closed. `send_msg_wait()` waits for SEND_UNBLOCKED when the
/// client's queue is full; here the queued lines go out as the queue drains.
///
/// The tests are the part of ipc-unittest `main.c` that runs on this app's own handles:
/// `run_port_create_negative_test`, `run_port_create_test`, `run_connect_negative_test`,
/// `run_async_connect_test`, `run_connect_selfie_test` (TA-to-TA connects to this app's own
/// ports) and `accept` with nothing pending. The tests that connect to the srv app's services
/// must wait while that app runs, which a handler in this model cannot do; they are not run
/// (each is named in the log as skipped).
pub struct UnittestCtrl {
    port: Option<PortId>,
    /// Per connection: lines still to send (the last is the status byte).
    out: Vec<(ChanId, VecDeque<Vec<u8>>)>,
    /// Runs so far (port names of the tests are made unique per run).
    runs: u32,
}

impl UnittestCtrl {
    /// The control service before its port is published.
    pub fn new() -> Self {
        UnittestCtrl { port: None, out: Vec::new(), runs: 0 }
    }

    /// Runs the suite; returns the log messages (one per test: its lines together, as one
    /// `_tlog()` call may carry several lines) and whether every check passed.
    fn run_tests(&mut self, ctx: &mut Ctx<'_>) -> (Vec<String>, bool) {
        self.runs = self.runs.wrapping_add(1);
        let mut t = Tally { lines: Vec::new(), all_ok: true, total: 0, failed: 0 };
        let mut messages = Vec::new();
        let tests: [SuiteTest; 6] = [
            port_create_negative,
            port_create,
            connect_negative,
            async_connect,
            connect_selfie,
            accept_negative,
        ];
        for test in tests {
            test(ctx, &mut t, self.runs);
            messages.push(t.lines.concat());
            t.lines.clear();
        }
        // These connect to the srv app's services and wait for them to answer; a handler here
        // cannot wait while other apps run, so they stay out.
        let mut summary = String::from(
            "SKIPPED (need to wait while the srv app runs): connect_close, connect_close_by_peer, echo\n",
        );
        summary.push_str(&format!("Conditions checked: {}\nConditions failed: {}\n", t.total, t.failed));
        messages.push(summary);
        (messages, t.all_ok)
    }

    /// Sends what is queued for `chan`; closes the channel once the status byte is out.
    fn flush(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) {
        let Some(pos) = self.out.iter().position(|(c, _)| *c == chan) else { return };
        let queue = &mut self.out[pos].1;
        while let Some(msg) = queue.front() {
            match ctx.send_msg(chan, msg) {
                Ok(_) => {
                    queue.pop_front();
                }
                // Waits for SEND_UNBLOCKED (send_msg_wait()).
                Err(lk::ERR_NOT_ENOUGH_BUFFER) => return,
                Err(_) => break,
            }
        }
        self.out.remove(pos);
        let _ = ctx.close(chan);
    }
}

impl Default for UnittestCtrl {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for UnittestCtrl {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        // unittest_main(): port_create(name, 1, MAX_PORT_BUF_SIZE, NS | TA connect).
        self.port = ctx.create_port(UNITTEST_CTRL_PORT, 1, MAX_PORT_BUF_SIZE, IPC_PORT_ALLOW_ALL).ok();
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if !events.intersects(Events::READY) {
            return;
        }
        let Ok((chan, _uuid)) = ctx.accept(port) else { return };
        let (lines, ok) = self.run_tests(ctx);
        let mut queue: VecDeque<Vec<u8>> = lines
            .into_iter()
            .map(|l| {
                let mut m = Vec::with_capacity(l.len() + 1);
                m.push(TEST_MESSAGE);
                // _tlog(): at most 254 characters of text per message.
                m.extend_from_slice(&l.as_bytes()[..l.len().min(TLOG_MAX - 2)]);
                m
            })
            .collect();
        queue.push_back(Vec::from([if ok { TEST_PASSED } else { TEST_FAILED }]));
        self.out.push((chan, queue));
        self.flush(ctx, chan);
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::HUP.union(Events::ERROR)) {
            self.out.retain(|(c, _)| *c != chan);
            let _ = ctx.close(chan);
            return;
        }
        if events.intersects(Events::SEND_UNBLOCKED) {
            self.flush(ctx, chan);
        }
        if events.intersects(Events::MSG) {
            // The client is not expected to send; messages are discarded.
            while ctx.get_msg(chan).is_ok() {
                let _ = ctx.put_msg(chan);
            }
        }
    }
}

/// One test of the suite: the app's context, the tally, and the run number.
type SuiteTest = fn(&mut Ctx<'_>, &mut Tally, u32);

/// main.c's TEST_BEGIN / EXPECT_* / TEST_END bookkeeping.
struct Tally {
    lines: Vec<String>,
    all_ok: bool,
    total: u32,
    failed: u32,
}

impl Tally {
    fn expect_eq(&mut self, test_ok: &mut bool, expected: i32, actual: i32, msg: &str) {
        self.total += 1;
        if expected != actual {
            self.lines.push(format!("{msg}: expected {expected} actual {actual}\n"));
            self.failed += 1;
            *test_ok = false;
            self.all_ok = false;
        }
    }
    fn expect_ok<T>(&mut self, test_ok: &mut bool, r: &Result<T, i32>, msg: &str) {
        self.total += 1;
        if let Err(e) = r {
            self.lines.push(format!("{msg}: expected >= 0 actual ({e})\n"));
            self.failed += 1;
            *test_ok = false;
            self.all_ok = false;
        }
    }
    fn begin(&mut self, name: &str) -> bool {
        self.lines.push(format!("{name}:\n"));
        true
    }
    fn end(&mut self, name: &str, ok: bool) {
        self.lines.push(format!("{name}: {}\n", if ok { "PASSED" } else { "FAILED" }));
    }
}

fn code<T>(r: Result<T, i32>) -> i32 {
    match r {
        Ok(_) => lk::NO_ERROR,
        Err(e) => e,
    }
}

const SRV_PATH_BASE: &str = "com.android.ipc-unittest";

/// main.c `run_port_create_negative_test`: every malformed port_create is ERR_INVALID_ARGS.
fn port_create_negative(ctx: &mut Ctx<'_>, t: &mut Tally, _run: u32) {
    const NAME: &str = "run_port_create_negative_test";
    let mut ok = t.begin(NAME);
    let path = format!("{SRV_PATH_BASE}.port");
    let r = ctx.create_port("", 2, 64, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "empty path srv");
    let r = ctx.create_port(&path, 0, 64, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "no buffers");
    let r = ctx.create_port(&path, 2, 0, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "zero buf size");
    let r = ctx.create_port(&path, 32 * 100, 64, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "large buf num");
    let r = ctx.create_port(&path, 2, MAX_PORT_BUF_SIZE * 100, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "large buf size");
    let mut long = path.clone();
    while long.len() < MAX_PORT_NAME_LEN + 16 {
        long.push('a');
    }
    let r = ctx.create_port(&long, 2, MAX_PORT_BUF_SIZE, 0);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "path is too long");
    t.end(NAME, ok);
}

/// main.c `run_port_create_test`: ports are created, a colliding name is ERR_ALREADY_EXISTS,
/// and each closes once (the handle-table limit part does not apply: the model has no
/// per-app handle table).
fn port_create(ctx: &mut Ctx<'_>, t: &mut Tally, run: u32) {
    const NAME: &str = "run_port_create_test";
    let mut ok = t.begin(NAME);
    let mut ports = Vec::new();
    for i in 2..10 {
        let path = format!("{SRV_PATH_BASE}.port.test{run}.{i}");
        let r = ctx.create_port(&path, 2, MAX_PORT_BUF_SIZE, 0);
        t.expect_ok(&mut ok, &r, "create ports");
        if let Ok(p) = r {
            ports.push(p);
        }
        let r = ctx.create_port(&path, 2, MAX_PORT_BUF_SIZE, 0);
        t.expect_eq(&mut ok, lk::ERR_ALREADY_EXISTS, code(r), "create existing port");
    }
    for p in ports {
        let r = ctx.close_port(p);
        t.expect_eq(&mut ok, lk::NO_ERROR, code(r), "closing port");
        let r = ctx.close_port(p);
        t.total += 1;
        if r.is_ok() {
            t.lines.push(String::from("closing closed port: succeeded\n"));
            t.failed += 1;
            ok = false;
            t.all_ok = false;
        }
    }
    t.end(NAME, ok);
}

/// Trusty `ipc_port_accept()` on a port with no pending connection: ERR_NO_MSG.
fn accept_negative(ctx: &mut Ctx<'_>, t: &mut Tally, run: u32) {
    const NAME: &str = "run_accept_negative_test";
    let mut ok = t.begin(NAME);
    let path = format!("{SRV_PATH_BASE}.main.accept{run}");
    let r = ctx.create_port(&path, 1, 64, super::IPC_PORT_ALLOW_TA_CONNECT);
    t.expect_ok(&mut ok, &r, "create port");
    if let Ok(port) = r {
        let r = ctx.accept(port);
        t.expect_eq(&mut ok, lk::ERR_NO_MSG, code(r), "accept with nothing pending");
        let r = ctx.close_port(port);
        t.expect_eq(&mut ok, lk::NO_ERROR, code(r), "close port");
    }
    t.end(NAME, ok);
}

/// main.c `sync_connect()`: connect with IPC_CONNECT_ASYNC | IPC_CONNECT_WAIT_FOR_PORT, then
/// wait on the channel for READY (HUP: ERR_CHANNEL_CLOSED). In the model nothing else runs
/// during this handler, so the wait sees only what this app's own calls caused; no READY is
/// ERR_TIMED_OUT and the channel is closed, as the C code does.
fn sync_connect(ctx: &mut Ctx<'_>, path: &str) -> Result<ChanId, i32> {
    let chan = ctx.connect(path, IPC_CONNECT_ASYNC | IPC_CONNECT_WAIT_FOR_PORT)?;
    let ev = ctx.poll(chan)?;
    if ev.intersects(Events::READY) {
        return Ok(chan);
    }
    let rc = if ev.intersects(Events::HUP) { lk::ERR_CHANNEL_CLOSED } else { lk::ERR_TIMED_OUT };
    let _ = ctx.close(chan);
    Err(rc)
}

/// main.c `run_connect_negative_test`: empty and over-long names are ERR_INVALID_ARGS, a
/// missing port without IPC_CONNECT_WAIT_FOR_PORT is ERR_NOT_FOUND (blocking and async).
/// (The C test's final `close()` of the negative result has no counterpart: the model's
/// handles are typed ids, not integers.)
fn connect_negative(ctx: &mut Ctx<'_>, t: &mut Tally, _run: u32) {
    const NAME: &str = "run_connect_negative_test";
    let mut ok = t.begin(NAME);
    let r = sync_connect(ctx, "");
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "empty path");
    let path = format!("{SRV_PATH_BASE}.conn.blah-blah");
    let r = ctx.connect(&path, 0);
    t.expect_eq(&mut ok, lk::ERR_NOT_FOUND, code(r), "non-existing path");
    let r = ctx.connect(&path, IPC_CONNECT_ASYNC);
    t.expect_eq(&mut ok, lk::ERR_NOT_FOUND, code(r), "non-existing path");
    let mut long = format!("{SRV_PATH_BASE}.conn.");
    while long.len() < MAX_PORT_NAME_LEN + 15 {
        long.push('a');
    }
    let r = sync_connect(ctx, &long);
    t.expect_eq(&mut ok, lk::ERR_INVALID_ARGS, code(r), "long path");
    t.end(NAME, ok);
}

/// main.c `run_async_connect_test`: a connect waiting for a missing port times out and closes;
/// once the port is created the waiting connection is pending on it (READY), and after the
/// server accepts and closes its end, the client sees READY | HUP.
fn async_connect(ctx: &mut Ctx<'_>, t: &mut Tally, _run: u32) {
    const NAME: &str = "run_async_connect_test";
    let mut ok = t.begin(NAME);
    let path = format!("{SRV_PATH_BASE}.main.async");
    let r = ctx.connect(&path, 0);
    t.expect_eq(&mut ok, lk::ERR_NOT_FOUND, code(r), "async");
    let r = ctx.connect(&path, IPC_CONNECT_ASYNC);
    t.expect_eq(&mut ok, lk::ERR_NOT_FOUND, code(r), "async");
    let r = ctx.connect(&path, IPC_CONNECT_ASYNC | IPC_CONNECT_WAIT_FOR_PORT);
    t.expect_ok(&mut ok, &r, "async");
    if let Ok(chan) = r {
        let ev = ctx.poll(chan).unwrap_or(Events::ERROR);
        t.expect_eq(&mut ok, 0, ev.0 as i32, "async: nothing before the port exists");
        let r = ctx.close(chan);
        t.expect_eq(&mut ok, lk::NO_ERROR, code(r), "async");
    }
    let r = ctx.connect(&path, IPC_CONNECT_ASYNC | IPC_CONNECT_WAIT_FOR_PORT);
    t.expect_ok(&mut ok, &r, "async");
    if let Ok(chan) = r {
        let ev = ctx.poll(chan).unwrap_or(Events::ERROR);
        t.expect_eq(&mut ok, 0, ev.0 as i32, "async: nothing before the port exists");
        let r = ctx.create_port(&path, 1, 64, IPC_PORT_ALLOW_TA_CONNECT);
        t.expect_ok(&mut ok, &r, "async");
        if let Ok(port) = r {
            let r = ctx.port_ready(port);
            t.expect_eq(&mut ok, 1, i32::from(r == Ok(true)), "async: port READY");
            let r = ctx.accept(port);
            t.expect_ok(&mut ok, &r, "async");
            if let Ok((srv_chan, _)) = r {
                let _ = ctx.close(srv_chan);
                let ev = ctx.poll(chan).unwrap_or(Events::ERROR);
                t.expect_eq(&mut ok, Events::READY.union(Events::HUP).0 as i32, ev.0 as i32, "async");
            }
            let _ = ctx.close_port(port);
        }
        let _ = ctx.close(chan);
    }
    t.end(NAME, ok);
}

/// main.c `run_connect_selfie_test`: this app connects to its own port; it cannot accept while
/// connecting, so each `sync_connect` times out and closes its end. The port stays READY with
/// the closed connections, each accept is ERR_CHANNEL_CLOSED, then ERR_NO_MSG; closing the port
/// with two more such connections pending succeeds.
fn connect_selfie(ctx: &mut Ctx<'_>, t: &mut Tally, _run: u32) {
    const NAME: &str = "run_connect_selfie_test";
    let mut ok = t.begin(NAME);
    let path = format!("{SRV_PATH_BASE}.main.selfie");
    let r = ctx.create_port(&path, 2, MAX_PORT_BUF_SIZE, IPC_PORT_ALLOW_TA_CONNECT);
    t.expect_ok(&mut ok, &r, "selfie");
    if let Ok(port) = r {
        for _ in 0..2 {
            let r = sync_connect(ctx, &path);
            t.expect_eq(&mut ok, lk::ERR_TIMED_OUT, code(r), "selfie");
        }
        let r = ctx.port_ready(port);
        t.expect_eq(&mut ok, 1, i32::from(r == Ok(true)), "wait on port");
        for _ in 0..2 {
            let r = ctx.accept(port);
            t.expect_eq(&mut ok, lk::ERR_CHANNEL_CLOSED, code(r), "accept");
        }
        let r = ctx.accept(port);
        t.expect_eq(&mut ok, lk::ERR_NO_MSG, code(r), "accept");
        for _ in 0..2 {
            let r = sync_connect(ctx, &path);
            t.expect_eq(&mut ok, lk::ERR_TIMED_OUT, code(r), "selfie");
        }
        let r = ctx.close_port(port);
        t.expect_eq(&mut ok, lk::NO_ERROR, code(r), "close selfie");
    }
    t.end(NAME, ok);
}
