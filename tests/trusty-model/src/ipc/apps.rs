//! Trusted apps beyond the ipc-unittest services that AOSP's tipc-test talks to:
//!
//! * [`MemrefReceiver`]: Trusty's `memref-test/receiver` app (port
//!   `com.android.trusty.memref.receiver`), the peer of tipc-test's `send-fd` case;
//! * [`UnittestCtrl`]: the control port of Trusty's ipc-unittest `main` app
//!   (`com.android.ipc-unittest.ctrl`), run by lib/unittest's `unittest_main()`, the peer of
//!   tipc-test's `ta2ta-ipc` case.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{
    lk, ChanId, Ctx, Events, MemRef, PortId, TrustedApp, IPC_CONNECT_ASYNC, IPC_CONNECT_WAIT_FOR_PORT,
    IPC_PORT_ALLOW_ALL, IPC_PORT_ALLOW_NS_CONNECT, IPC_PORT_ALLOW_TA_CONNECT, MAX_PORT_BUF_SIZE,
    MAX_PORT_NAME_LEN,
};

mod waiting;

use waiting::{Op, Resumed, WaitingTest};

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
/// run, every test's log lines go to the client as a TEST_MESSAGE, then one byte TEST_PASSED
/// or TEST_FAILED, and the channel is closed. `send_msg_wait()` waits for SEND_UNBLOCKED when
/// the client's queue is full; here the queued lines go out as the queue drains.
///
/// The tests, in main.c's `run_all_tests()` order, are those that run on this app's own
/// handles (`run_port_create_test`, `run_async_connect_test`, `run_connect_selfie_test`,
/// `run_port_create_negative_test`, `run_connect_negative_test`, `accept` with nothing
/// pending) and those that wait while the srv app acts: `run_connect_close_test`,
/// `run_end_to_end_msg_test` (echo) and `run_connect_close_by_peer_test` for closer1, closer2
/// and closer3 (see [`waiting`]). While one of those waits, this app's handler returns; the
/// IPC scheduler runs the other apps and resumes the test with the event (or with the timeout,
/// through [`Ctx::set_timer`]). A client that connects during a run is accepted once the run
/// is over (main.c's loop is busy in `run_all_tests()` meanwhile).
pub struct UnittestCtrl {
    port: Option<PortId>,
    /// Per client channel: lines still to send, and whether the status byte is among them.
    out: Vec<Outbox>,
    /// Runs so far (port names of the tests are made unique per run).
    runs: u32,
    /// The run in progress.
    run: Option<Run>,
}

/// What is still to go to one client.
struct Outbox {
    chan: ChanId,
    queue: VecDeque<Vec<u8>>,
    /// The status byte is queued: close the channel once the queue is empty.
    finished: bool,
}

/// One entry of the suite.
#[derive(Clone, Copy)]
enum SuiteEntry {
    /// Runs to its end inside one handler call.
    Now(SuiteTest),
    /// Waits for other apps (made fresh for every run).
    Waits(fn() -> Box<dyn WaitingTest>),
}

/// The suite, in main.c `run_all_tests()` order.
const SUITE: [SuiteEntry; 11] = [
    SuiteEntry::Now(port_create),
    SuiteEntry::Now(async_connect),
    SuiteEntry::Waits(|| Box::new(waiting::ConnectClose::new())),
    SuiteEntry::Waits(|| Box::new(waiting::EchoEndToEnd::new())),
    SuiteEntry::Waits(|| Box::new(waiting::ConnectCloseByPeer::new("closer1"))),
    SuiteEntry::Waits(|| Box::new(waiting::ConnectCloseByPeer::new("closer2"))),
    SuiteEntry::Waits(|| Box::new(waiting::ConnectCloseByPeer::new("closer3"))),
    SuiteEntry::Now(connect_selfie),
    SuiteEntry::Now(port_create_negative),
    SuiteEntry::Now(connect_negative),
    SuiteEntry::Now(accept_negative),
];

/// What the test in progress is blocked on.
enum Pending {
    /// `sync_connect()`'s wait on its new channel.
    Connect(ChanId),
    /// `wait(chan)`.
    Wait(ChanId),
    /// `wait_any()` over these channels.
    WaitAny(Vec<ChanId>),
    /// `nanosleep()`.
    Sleep,
}

/// After a test's step: go on with this outcome, wait, or take the next test.
enum Step {
    Now(Resumed),
    Blocked,
    Done,
}

/// One run of the suite for one client.
struct Run {
    /// The client's channel (None once the client hung up: the tests still run to their end,
    /// so that every channel they opened is closed).
    ns: Option<ChanId>,
    /// Next entry of [`SUITE`].
    next: usize,
    current: Option<Box<dyn WaitingTest>>,
    pending: Option<Pending>,
    tally: Tally,
    /// Events delivered for the tests' channels and not yet taken by a wait. As Trusty's
    /// `chan_poll()`: HUP stays while the peer is gone (IPC_CHAN_STATE_DISCONNECTING) until the
    /// channel is closed, READY and SEND_UNBLOCKED are taken by the wait that reports them,
    /// MSG is reported while a message is unread (asked of the core at each wait).
    seen: BTreeMap<ChanId, Events>,
}

impl Run {
    /// This channel's events for a wait: what was delivered before, what the core holds now.
    fn events_of(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) -> Events {
        match ctx.poll(chan) {
            Ok(ev) => {
                let kept = self.seen.entry(chan).or_default();
                *kept = kept.union(Events(ev.0 & !Events::MSG.0));
                kept.union(Events(ev.0 & Events::MSG.0))
            }
            Err(_) => {
                self.seen.remove(&chan);
                Events::NONE
            }
        }
    }

    /// A wait reported `chan`'s events: READY and SEND_UNBLOCKED are taken.
    fn taken(&mut self, chan: ChanId) {
        if let Some(ev) = self.seen.get_mut(&chan) {
            ev.0 &= Events::HUP.0;
            if ev.is_empty() {
                self.seen.remove(&chan);
            }
        }
    }

    /// The pending wait's outcome if one of its handles has an event.
    fn check(&mut self, ctx: &mut Ctx<'_>) -> Option<Resumed> {
        let chans = match self.pending.as_ref()? {
            Pending::Connect(c) | Pending::Wait(c) => Vec::from([*c]),
            Pending::WaitAny(v) => v.clone(),
            Pending::Sleep => return None,
        };
        for chan in chans {
            let ev = self.events_of(ctx, chan);
            if ev.is_empty() {
                continue;
            }
            self.taken(chan);
            ctx.set_timer(None);
            return match self.pending.take() {
                // main.c sync_connect(): READY is the channel; otherwise it is closed.
                Some(Pending::Connect(_)) if ev.intersects(Events::READY) => Some(Resumed::Connected(Ok(chan))),
                Some(Pending::Connect(_)) => {
                    let _ = ctx.close(chan);
                    self.seen.remove(&chan);
                    let rc = if ev.intersects(Events::HUP) { lk::ERR_CHANNEL_CLOSED } else { lk::ERR_BAD_STATE };
                    Some(Resumed::Connected(Err(rc)))
                }
                _ => Some(Resumed::Event(chan, ev)),
            };
        }
        None
    }

    /// The pending wait's timeout expired (ERR_TIMED_OUT; sync_connect() closes its channel).
    fn time_out(&mut self, ctx: &mut Ctx<'_>) -> Option<Resumed> {
        ctx.set_timer(None);
        Some(match self.pending.take()? {
            Pending::Connect(chan) => {
                let _ = ctx.close(chan);
                self.seen.remove(&chan);
                Resumed::Connected(Err(lk::ERR_TIMED_OUT))
            }
            Pending::Sleep => Resumed::Slept,
            Pending::Wait(_) | Pending::WaitAny(_) => Resumed::TimedOut,
        })
    }

    /// Start what `op` asks for; every wait has the timeout the test gave (`set_timer`).
    fn start(&mut self, ctx: &mut Ctx<'_>, op: Op) -> Step {
        let (pending, timeout_ms) = match op {
            Op::Done => return Step::Done,
            Op::Sleep { ns } => {
                self.pending = Some(Pending::Sleep);
                ctx.set_timer(Some(ctx.now().saturating_add(ns)));
                return Step::Blocked;
            }
            Op::SyncConnect { path, timeout_ms } => {
                match ctx.connect(&path, IPC_CONNECT_ASYNC | IPC_CONNECT_WAIT_FOR_PORT) {
                    Ok(chan) => (Pending::Connect(chan), timeout_ms),
                    Err(e) => return Step::Now(Resumed::Connected(Err(e))),
                }
            }
            Op::Wait { chan, timeout_ms } => (Pending::Wait(chan), timeout_ms),
            Op::WaitAny { chans, timeout_ms } => (Pending::WaitAny(chans), timeout_ms),
        };
        self.pending = Some(pending);
        if let Some(r) = self.check(ctx) {
            return Step::Now(r);
        }
        if timeout_ms == 0 {
            return match self.time_out(ctx) {
                Some(r) => Step::Now(r),
                None => Step::Blocked,
            };
        }
        ctx.set_timer(Some(ctx.now().saturating_add(timeout_ms.saturating_mul(MS))));
        Step::Blocked
    }
}

/// One millisecond in nanoseconds.
const MS: u64 = 1_000_000;

impl UnittestCtrl {
    /// The control service before its port is published.
    pub fn new() -> Self {
        UnittestCtrl { port: None, out: Vec::new(), runs: 0, run: None }
    }

    /// Queue one message of log lines for the client: a TEST_MESSAGE of at most 254
    /// characters of text, as one `_tlog()` call sends. The lines of one test go together (one
    /// message per line would outrun a small rx pool on the normal-world side, whose channel
    /// queue is bounded by it); when they do not fit, middle lines give way to "...", so the
    /// first (TEST_BEGIN) and the last (the verdict) are always there.
    fn emit(&mut self, ctx: &mut Ctx<'_>, lines: &[String]) {
        let Some(chan) = self.run.as_ref().and_then(|r| r.ns) else { return };
        let Some(o) = self.out.iter_mut().find(|o| o.chan == chan) else { return };
        let text = join_within(lines, TLOG_MAX - 2);
        let mut m = Vec::with_capacity(text.len() + 1);
        m.push(TEST_MESSAGE);
        m.extend_from_slice(text.as_bytes());
        o.queue.push_back(m);
        self.flush(ctx, chan);
    }

    /// The lines of the test just ended go out.
    fn emit_test(&mut self, ctx: &mut Ctx<'_>) {
        let Some(run) = self.run.as_mut() else { return };
        let lines = core::mem::take(&mut run.tally.lines);
        self.emit(ctx, &lines);
    }

    /// Accept a waiting client and start its run; false when none is waiting.
    fn start_run(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let Some(port) = self.port else { return false };
        let Ok((chan, _uuid)) = ctx.accept(port) else { return false };
        self.runs = self.runs.wrapping_add(1);
        self.out.push(Outbox { chan, queue: VecDeque::new(), finished: false });
        self.run = Some(Run {
            ns: Some(chan),
            next: 0,
            current: None,
            pending: None,
            tally: Tally { lines: Vec::new(), all_ok: true, total: 0, failed: 0 },
            seen: BTreeMap::new(),
        });
        self.advance(ctx, Resumed::Start);
        true
    }

    /// Run the suite from where it stopped until a test waits or the suite is over.
    fn advance(&mut self, ctx: &mut Ctx<'_>, mut how: Resumed) {
        loop {
            let runs = self.runs;
            let Some(run) = self.run.as_mut() else { return };
            let step = match run.current.as_mut() {
                Some(test) => {
                    let op = test.resume(ctx, &mut run.tally, how);
                    run.start(ctx, op)
                }
                None => match SUITE.get(run.next).copied() {
                    Some(SuiteEntry::Now(test)) => {
                        run.next += 1;
                        test(ctx, &mut run.tally, runs);
                        Step::Done
                    }
                    Some(SuiteEntry::Waits(make)) => {
                        run.next += 1;
                        run.current = Some(make());
                        Step::Now(Resumed::Start)
                    }
                    None => {
                        self.finish_run(ctx);
                        return;
                    }
                },
            };
            match step {
                Step::Now(r) => how = r,
                Step::Blocked => return,
                Step::Done => {
                    run.current = None;
                    run.seen.clear();
                    how = Resumed::Start;
                    self.emit_test(ctx);
                }
            }
        }
    }

    /// The summary and the status byte; the channel closes once they are out.
    fn finish_run(&mut self, ctx: &mut Ctx<'_>) {
        let Some(run) = self.run.as_ref() else { return };
        let t = &run.tally;
        // run_all_tests()'s closing lines.
        let summary = [
            format!("Conditions checked: {}\n", t.total),
            format!("Conditions failed: {}\n", t.failed),
            String::from(if t.failed == 0 { "All tests PASSED\n" } else { "Some tests FAILED\n" }),
        ];
        let status = if t.all_ok { TEST_PASSED } else { TEST_FAILED };
        self.emit(ctx, &summary);
        if let Some(chan) = self.run.take().and_then(|r| r.ns) {
            if let Some(o) = self.out.iter_mut().find(|o| o.chan == chan) {
                o.queue.push_back(Vec::from([status]));
                o.finished = true;
            }
            self.flush(ctx, chan);
        }
    }

    /// Go on with the run (with `how`, if a wait ended), then serve clients that connected
    /// meanwhile.
    fn pump(&mut self, ctx: &mut Ctx<'_>, how: Option<Resumed>) {
        if let Some(how) = how {
            self.advance(ctx, how);
        }
        while self.run.is_none() && self.start_run(ctx) {}
    }

    /// Sends what is queued for `chan`; closes the channel once the status byte is out.
    fn flush(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) {
        let Some(pos) = self.out.iter().position(|o| o.chan == chan) else { return };
        let o = &mut self.out[pos];
        while let Some(msg) = o.queue.front() {
            match ctx.send_msg(chan, msg) {
                Ok(_) => {
                    o.queue.pop_front();
                }
                // Waits for SEND_UNBLOCKED (send_msg_wait()).
                Err(lk::ERR_NOT_ENOUGH_BUFFER) => return,
                Err(_) => {
                    o.queue.clear();
                    o.finished = true;
                    break;
                }
            }
        }
        if o.finished {
            self.out.remove(pos);
            let _ = ctx.close(chan);
            if let Some(run) = self.run.as_mut() {
                if run.ns == Some(chan) {
                    run.ns = None;
                }
            }
        }
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

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, _port: PortId, events: Events) {
        if events.intersects(Events::READY) {
            self.pump(ctx, None);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if self.out.iter().any(|o| o.chan == chan) {
            // A client channel.
            if events.intersects(Events::HUP.union(Events::ERROR)) {
                self.out.retain(|o| o.chan != chan);
                let _ = ctx.close(chan);
                if let Some(run) = self.run.as_mut() {
                    if run.ns == Some(chan) {
                        run.ns = None;
                    }
                }
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
            return;
        }
        // A channel of the test in progress: remember the events; end its wait if they are
        // what it waits for.
        let Some(run) = self.run.as_mut() else { return };
        let kept = run.seen.entry(chan).or_default();
        *kept = kept.union(Events(events.0 & !Events::MSG.0));
        let resumed = run.check(ctx);
        if resumed.is_some() {
            self.pump(ctx, resumed);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>) {
        let resumed = self.run.as_mut().and_then(|run| run.time_out(ctx));
        if resumed.is_some() {
            self.pump(ctx, resumed);
        }
    }
}

/// `lines` joined into at most `max` bytes (ASCII): if they are longer, the last line is kept
/// and as many of the first ones as fit, with "...\n" where the others were.
fn join_within(lines: &[String], max: usize) -> String {
    let mut all = lines.concat();
    if all.len() > max {
        const GAP: &str = "...\n";
        let last = lines.last().map_or("", String::as_str);
        all.clear();
        for l in &lines[..lines.len().saturating_sub(1)] {
            if all.len() + l.len() + GAP.len() + last.len() > max {
                break;
            }
            all.push_str(l);
        }
        all.push_str(GAP);
        all.push_str(last);
    }
    let mut end = all.len().min(max);
    while !all.is_char_boundary(end) {
        end -= 1;
    }
    all.truncate(end);
    all
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
    /// A failed condition with its own message.
    fn fail(&mut self, test_ok: &mut bool, msg: &str) {
        self.total += 1;
        self.lines.push(format!("{msg}\n"));
        self.failed += 1;
        *test_ok = false;
        self.all_ok = false;
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
