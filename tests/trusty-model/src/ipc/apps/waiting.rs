//! The ipc-unittest `main` tests that wait while the srv app runs (`run_connect_close_test`,
//! `run_connect_close_by_peer_test`, `run_end_to_end_msg_test`), written as resumable steps.
//!
//! In Trusty the ctrl app's thread blocks in `wait()` / `wait_any()` / `nanosleep()` while the
//! srv app (`app/ipc-unittest/srv/srv.c`) runs on its own thread. A model app's handler runs to
//! completion before any other app runs, so each of these tests is a small state machine: it
//! runs until it would block, returns an [`Op`] naming what it waits for (with the timeout the
//! C code gives), and [`super::UnittestCtrl`] resumes it with the outcome ([`Resumed`]) once the
//! IPC scheduler has delivered the event, or the app's timer (`Ctx::set_timer`) has expired.
//!
//! Where the C test would go on after a timed-out wait (and so wait again, possibly thousands of
//! times), these stop at the first timed-out wait after recording it as failed, so a broken srv
//! app costs one timeout, not hours; the verdict is the same (FAILED).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{code, Tally, SRV_PATH_BASE};
use crate::ipc::{lk, ChanId, Ctx, Events};

/// main.c `MAX_USER_HANDLES` (Trusty's per-app handle table: 64).
const MAX_USER_HANDLES: usize = 64;

/// First handle index main.c's loops start from (handles 0 and 1 are the ctrl port and channel).
const FIRST_FREE_HANDLE: usize = 2;

/// `handle_t chans[16]` in `run_connect_close_test` and `run_connect_close_by_peer_test`.
const CHANS: usize = 16;

/// Messages each half of `run_end_to_end_msg_test` sends (`tx_cnt = 10000`).
pub(super) const ECHO_MSGS: u32 = 10_000;

/// Size of the echo test's messages (`uint8_t tx_buf[64]`).
const ECHO_MSG_LEN: usize = 64;

/// One millisecond in nanoseconds (`MSEC` in srv.c / main.c).
const MSEC: u64 = 1_000_000;

/// What a waiting test blocks on next (each with main.c's timeout, in milliseconds).
pub(super) enum Op {
    /// main.c `sync_connect(path, timeout)`: connect with IPC_CONNECT_ASYNC |
    /// IPC_CONNECT_WAIT_FOR_PORT, then `wait()` on the channel: READY gives the channel, HUP
    /// ERR_CHANNEL_CLOSED, any other event ERR_BAD_STATE, no event ERR_TIMED_OUT (the channel
    /// is closed on every failure).
    SyncConnect { path: String, timeout_ms: u64 },
    /// `wait(chan, &ev, timeout)`.
    Wait { chan: ChanId, timeout_ms: u64 },
    /// `wait_any(&ev, timeout)` over the test's own channels.
    WaitAny { chans: Vec<ChanId>, timeout_ms: u64 },
    /// `nanosleep(0, 0, ns)`.
    Sleep { ns: u64 },
    /// The test is over (its TEST_END line is in the tally).
    Done,
}

/// How a waiting test is resumed.
pub(super) enum Resumed {
    /// First call.
    Start,
    /// The outcome of [`Op::SyncConnect`].
    Connected(Result<ChanId, i32>),
    /// A wait returned NO_ERROR with this handle's events.
    Event(ChanId, Events),
    /// A wait returned ERR_TIMED_OUT.
    TimedOut,
    /// The sleep is over.
    Slept,
}

/// A test that runs in steps (see the module comment).
pub(super) trait WaitingTest: Send {
    /// Runs the test from where it stopped until it must wait again or is done.
    fn resume(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, how: Resumed) -> Op;
}

/// A resume the test did not ask for: a failed condition (the runner never does this).
fn unexpected(t: &mut Tally, ok: &mut bool, name: &str) {
    t.fail(ok, &format!("{name}: resumed out of order"));
}

/// main.c `run_connect_close_test`: 16 `sync_connect(datasink, 1000)` then 16 `close()`, for
/// `j` in 2..MAX_USER_HANDLES (992 connections), so that no handle is lost. srv.c
/// `datasink_handle_port()` accepts each; `datasink_handle_chan()` closes on HUP.
pub(super) struct ConnectClose {
    path: String,
    j: usize,
    chans: Vec<Result<ChanId, i32>>,
    ok: bool,
}

impl ConnectClose {
    const NAME: &'static str = "run_connect_close_test";

    /// The test before its first step.
    pub(super) fn new() -> Self {
        ConnectClose {
            path: format!("{SRV_PATH_BASE}.srv.datasink"),
            j: FIRST_FREE_HANDLE,
            chans: Vec::new(),
            ok: true,
        }
    }

    fn connect(&self) -> Op {
        Op::SyncConnect { path: self.path.clone(), timeout_ms: 1000 }
    }
}

impl WaitingTest for ConnectClose {
    fn resume(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, how: Resumed) -> Op {
        match how {
            Resumed::Start => {
                self.ok = t.begin(Self::NAME);
                return self.connect();
            }
            Resumed::Connected(r) => {
                t.expect_ok(&mut self.ok, &r, "connect/close");
                self.chans.push(r);
            }
            _ => unexpected(t, &mut self.ok, Self::NAME),
        }
        if self.chans.len() < CHANS && self.ok {
            return self.connect();
        }
        for r in self.chans.drain(..) {
            // close() of a failed connect's negative result is ERR_BAD_HANDLE.
            let rc = match r {
                Ok(chan) => code(ctx.close(chan)),
                Err(_) => lk::ERR_BAD_HANDLE,
            };
            t.expect_eq(&mut self.ok, lk::NO_ERROR, rc, "connect/close");
        }
        self.j += 1;
        // The model stops at the first failed round (the C test would go on for 62 rounds).
        if self.j < MAX_USER_HANDLES && self.ok {
            return self.connect();
        }
        t.end(Self::NAME, self.ok);
        Op::Done
    }
}

/// Where `run_connect_close_by_peer_test` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PeerPhase {
    /// Opening connection `i` (with up to 10 tries on ERR_NOT_FOUND).
    Connecting,
    /// `while (wait_any(&event, 0) == NO_ERROR)` after connection `i`.
    Draining,
    /// `while (chan_cnt) wait_any(&event, 10000)`.
    Closing,
}

/// main.c `run_connect_close_by_peer_test(test)`: 16 connections to `srv.<test>`; each is
/// either a channel the srv app closes later (HUP, then this side closes it) or already
/// ERR_CHANNEL_CLOSED; after each connection the HUPs already there are taken
/// (`wait_any(0)`), then the rest within 10 s each. Every HUP must be exactly
/// IPC_HANDLE_POLL_HUP on one of the test's channels, and no channel may stay open.
///
/// The srv side (srv.c): `closer1_handle_port()` accepts, sleeps 100 ms on odd connections,
/// closes; `closer2_handle_port()` never accepts (sleeps 100 ms on odd requests, then closes
/// and re-creates its port: the pending connection sees HUP); `closer3_handle_port()` holds 4
/// accepted channels, sleeps 100 ms, closes all 4.
pub(super) struct ConnectCloseByPeer {
    name: String,
    path: String,
    i: usize,
    retry_cnt: u32,
    chans: [Option<ChanId>; CHANS],
    chan_cnt: usize,
    phase: PeerPhase,
    ok: bool,
}

impl ConnectCloseByPeer {
    /// The test against service `srv.<test>` (closer1, closer2 or closer3).
    pub(super) fn new(test: &str) -> Self {
        ConnectCloseByPeer {
            name: format!("run_connect_close_by_peer_test({test})"),
            path: format!("{SRV_PATH_BASE}.srv.{test}"),
            i: 0,
            retry_cnt: 10,
            chans: [None; CHANS],
            chan_cnt: 0,
            phase: PeerPhase::Connecting,
            ok: true,
        }
    }

    fn open(&self) -> Vec<ChanId> {
        self.chans.iter().flatten().copied().collect()
    }

    fn connect(&mut self) -> Op {
        self.phase = PeerPhase::Connecting;
        Op::SyncConnect { path: self.path.clone(), timeout_ms: 2000 }
    }

    fn wait_any(&mut self, phase: PeerPhase) -> Op {
        self.phase = phase;
        let timeout_ms = if phase == PeerPhase::Closing { 10_000 } else { 0 };
        Op::WaitAny { chans: self.open(), timeout_ms }
    }

    /// After the retry loop: the connection's outcome.
    fn connected(&mut self, t: &mut Tally, rc: Result<ChanId, i32>) -> Op {
        t.expect_eq(&mut self.ok, 1, i32::from(self.retry_cnt > 0), &self.name);
        match rc {
            Ok(chan) => {
                // set_cookie(chan, COOKIE_BASE + i): the model keeps the index itself.
                if let Some(slot) = self.chans.get_mut(self.i) {
                    *slot = Some(chan);
                }
                self.chan_cnt += 1;
            }
            // "depending on task scheduling": the srv app may have closed it already.
            Err(e) => t.expect_eq(&mut self.ok, lk::ERR_CHANNEL_CLOSED, e, &self.name),
        }
        self.wait_any(PeerPhase::Draining)
    }

    /// One `wait_any()` event: it must be HUP on one of the test's channels, which is closed.
    fn hup(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, chan: ChanId, events: Events) {
        t.expect_eq(&mut self.ok, Events::HUP.0 as i32, events.0 as i32, &self.name);
        let idx = self.chans.iter().position(|c| *c == Some(chan));
        // EXPECT_GT(countof(chans), idx): the event's cookie names one of ours.
        t.expect_eq(&mut self.ok, 1, i32::from(idx.is_some()), &self.name);
        if let Some(idx) = idx {
            let rc = code(ctx.close(chan));
            t.expect_eq(&mut self.ok, lk::NO_ERROR, rc, &self.name);
            self.chans[idx] = None;
        }
        self.chan_cnt = self.chan_cnt.saturating_sub(1);
    }

    fn finish(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally) -> Op {
        // Channels left open after a timed-out wait are closed (the test's handles go).
        for chan in self.chans.iter_mut().filter_map(Option::take) {
            let _ = ctx.close(chan);
        }
        let left = i32::try_from(self.chan_cnt).unwrap_or(i32::MAX);
        t.expect_eq(&mut self.ok, 0, left, &self.name);
        t.end(&self.name, self.ok);
        Op::Done
    }
}

impl WaitingTest for ConnectCloseByPeer {
    fn resume(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, how: Resumed) -> Op {
        match (self.phase, how) {
            (_, Resumed::Start) => {
                self.ok = t.begin(&self.name);
                self.connect()
            }
            (PeerPhase::Connecting, Resumed::Connected(Err(lk::ERR_NOT_FOUND))) => {
                // "wait a bit and retry"
                self.retry_cnt = self.retry_cnt.saturating_sub(1);
                Op::Sleep { ns: 100 * MSEC }
            }
            (PeerPhase::Connecting, Resumed::Slept) => {
                if self.retry_cnt > 0 {
                    self.connect()
                } else {
                    self.connected(t, Err(lk::ERR_NOT_FOUND))
                }
            }
            (PeerPhase::Connecting, Resumed::Connected(rc)) => self.connected(t, rc),
            (PeerPhase::Draining, Resumed::Event(chan, ev)) => {
                self.hup(ctx, t, chan, ev);
                self.wait_any(PeerPhase::Draining)
            }
            (PeerPhase::Draining, Resumed::TimedOut) => {
                self.i += 1;
                if self.i < CHANS {
                    self.retry_cnt = 10;
                    return self.connect();
                }
                if self.chan_cnt > 0 {
                    return self.wait_any(PeerPhase::Closing);
                }
                self.finish(ctx, t)
            }
            (PeerPhase::Closing, Resumed::Event(chan, ev)) => {
                self.hup(ctx, t, chan, ev);
                if self.chan_cnt > 0 {
                    return self.wait_any(PeerPhase::Closing);
                }
                self.finish(ctx, t)
            }
            (PeerPhase::Closing, Resumed::TimedOut) => {
                // EXPECT_EQ(NO_ERROR, rc): the srv app did not close within 10 s.
                t.expect_eq(&mut self.ok, lk::NO_ERROR, lk::ERR_TIMED_OUT, &self.name);
                self.finish(ctx, t)
            }
            _ => {
                unexpected(t, &mut self.ok, &self.name);
                self.finish(ctx, t)
            }
        }
    }
}

/// Where `run_end_to_end_msg_test` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EchoPhase {
    Connecting,
    /// One message out, waiting for its reply.
    Sync,
    /// Up to the queue's depth out, waiting for replies or room.
    Async,
}

/// main.c `run_end_to_end_msg_test` against srv.c's echo service (`echo_handle_port()`,
/// `echo_handle_chan()`: every message read and sent back): 10000 messages of 64 bytes one at
/// a time, each reply waited for (1 s); then 10000 sent as fast as the queues allow
/// (ERR_NOT_ENOUGH_BUFFER: wait for a reply or SEND_UNBLOCKED, 1 s) while every reply is
/// taken. Every send must take 64 bytes and every reply be 64 bytes long; the model also
/// compares each reply with what was sent (main.c checks the length only).
pub(super) struct EchoEndToEnd {
    chan: Option<ChanId>,
    phase: EchoPhase,
    tx_cnt: u32,
    rx_cnt: u32,
    ok: bool,
    total: u32,
}

impl EchoEndToEnd {
    const NAME: &'static str = "run_end_to_end_msg_test";
    /// `memset(tx_buf, 0x55, sizeof(tx_buf))`.
    const TX: [u8; ECHO_MSG_LEN] = [0x55; ECHO_MSG_LEN];

    /// The test before its first step, with main.c's 10000 messages per half.
    pub(super) fn new() -> Self {
        Self::with_count(ECHO_MSGS)
    }

    /// The test with `total` messages per half (unit tests use fewer).
    pub(super) fn with_count(total: u32) -> Self {
        EchoEndToEnd { chan: None, phase: EchoPhase::Connecting, tx_cnt: 0, rx_cnt: 0, ok: true, total }
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, chan: ChanId) -> Result<usize, i32> {
        let r = ctx.send_msg(chan, &Self::TX);
        if r != Err(lk::ERR_NOT_ENOUGH_BUFFER) || self.phase == EchoPhase::Sync {
            let rc = r.map_or_else(|e| e, |n| i32::try_from(n).unwrap_or(i32::MAX));
            t.expect_eq(&mut self.ok, ECHO_MSG_LEN as i32, rc, "sending msg to echo");
        }
        r
    }

    /// get_msg + read_msg + put_msg of one reply; Err(ERR_NO_MSG) when there is none.
    fn take_reply(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, chan: ChanId) -> Result<(), i32> {
        let data = ctx.get_msg(chan);
        if data == Err(lk::ERR_NO_MSG) && self.phase == EchoPhase::Async {
            return Err(lk::ERR_NO_MSG);
        }
        t.expect_ok(&mut self.ok, &data, "getting echo msg");
        let data = data?;
        let len = i32::try_from(data.len()).unwrap_or(i32::MAX);
        t.expect_eq(&mut self.ok, ECHO_MSG_LEN as i32, len, "reading echo msg");
        // Beyond main.c: the reply must be the bytes sent.
        t.expect_eq(&mut self.ok, 1, i32::from(data[..] == Self::TX[..]), "echo reply data");
        let r = ctx.put_msg(chan);
        t.expect_eq(&mut self.ok, lk::NO_ERROR, code(r), "putting echo msg");
        Ok(())
    }

    /// The wait's own checks: NO_ERROR on the test's channel.
    fn waited(&mut self, t: &mut Tally, chan: ChanId, how: &Resumed, msg: &str) {
        let rc = if let Resumed::Event(..) = how { lk::NO_ERROR } else { lk::ERR_TIMED_OUT };
        t.expect_eq(&mut self.ok, lk::NO_ERROR, rc, msg);
        if let Resumed::Event(h, _) = how {
            t.expect_eq(&mut self.ok, 1, i32::from(*h == chan), "wait on channel");
        }
    }

    /// Async half: send until the queue is full, then wait (for a reply or room).
    fn fill(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, chan: ChanId) -> Op {
        while self.tx_cnt > 0 {
            match self.send(ctx, t, chan) {
                Err(lk::ERR_NOT_ENOUGH_BUFFER) => break,
                Ok(ECHO_MSG_LEN) => self.tx_cnt -= 1,
                _ => return self.finish(ctx, t),
            }
        }
        Op::Wait { chan, timeout_ms: 1000 }
    }

    /// main.c's `abort_test:` label: both counts must be 0, then the channel is closed.
    fn finish(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally) -> Op {
        let tx = i32::try_from(self.tx_cnt).unwrap_or(i32::MAX);
        let rx = i32::try_from(self.rx_cnt).unwrap_or(i32::MAX);
        t.expect_eq(&mut self.ok, 0, tx, "tx_cnt");
        t.expect_eq(&mut self.ok, 0, rx, "rx_cnt");
        if let Some(chan) = self.chan.take() {
            let rc = code(ctx.close(chan));
            t.expect_eq(&mut self.ok, lk::NO_ERROR, rc, "close channel");
        }
        t.end(Self::NAME, self.ok);
        Op::Done
    }
}

impl WaitingTest for EchoEndToEnd {
    fn resume(&mut self, ctx: &mut Ctx<'_>, t: &mut Tally, how: Resumed) -> Op {
        if let Resumed::Start = how {
            self.ok = t.begin(Self::NAME);
            self.phase = EchoPhase::Connecting;
            return Op::SyncConnect { path: format!("{SRV_PATH_BASE}.srv.echo"), timeout_ms: 1000 };
        }
        if self.phase == EchoPhase::Connecting {
            let Resumed::Connected(r) = how else {
                unexpected(t, &mut self.ok, Self::NAME);
                t.end(Self::NAME, self.ok);
                return Op::Done;
            };
            t.expect_ok(&mut self.ok, &r, "connect to echo");
            let Ok(chan) = r else {
                t.end(Self::NAME, self.ok);
                return Op::Done;
            };
            self.chan = Some(chan);
            self.phase = EchoPhase::Sync;
            self.tx_cnt = self.total;
            let _ = self.send(ctx, t, chan);
            return Op::Wait { chan, timeout_ms: 1000 };
        }
        let Some(chan) = self.chan else {
            unexpected(t, &mut self.ok, Self::NAME);
            return self.finish(ctx, t);
        };
        if self.phase == EchoPhase::Sync {
            self.waited(t, chan, &how, "waiting on echo response");
            let _ = self.take_reply(ctx, t, chan);
            self.tx_cnt -= 1;
            // The model stops at the first failure (main.c's first half would go on).
            if !self.ok {
                return self.finish(ctx, t);
            }
            if self.tx_cnt > 0 {
                let _ = self.send(ctx, t, chan);
                return Op::Wait { chan, timeout_ms: 1000 };
            }
            self.phase = EchoPhase::Async;
            self.tx_cnt = self.total;
            self.rx_cnt = self.total;
            return self.fill(ctx, t, chan);
        }
        // Async half: "wait for reply msg or room", then "drain all messages".
        self.waited(t, chan, &how, "waiting for reply");
        while self.rx_cnt > 0 {
            if self.take_reply(ctx, t, chan) == Err(lk::ERR_NO_MSG) {
                break;
            }
            self.rx_cnt -= 1;
        }
        if !self.ok || (self.tx_cnt == 0 && self.rx_cnt == 0) {
            return self.finish(ctx, t);
        }
        self.fill(ctx, t, chan)
    }
}
