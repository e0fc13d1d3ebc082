//! The tests of AOSP's tipc-test (spec §9.1), ported to Rust. Where the C original only prints
//! what went wrong and still returns success, these fail: a test passes only if the secure side
//! behaved as §9.2 says it must.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use crate::backend::{Errno, Handle, TipcBackend, Transfer};
use crate::env::{elapsed_us, TestEnv};
use tipc::errno::{ENOTCONN, ETIMEDOUT};

/// Port of the unittest app's echo service.
pub const ECHO: &str = "com.android.ipc-unittest.srv.echo";
/// Port of the service that consumes whatever it is sent.
pub const DATASINK: &str = "com.android.ipc-unittest.srv.datasink";
/// Port of the service that answers with the caller's UUID.
pub const UUID: &str = "com.android.ipc-unittest.srv.uuid";
/// Port only other trusted apps may connect to.
pub const TA_ONLY: &str = "com.android.ipc-unittest.srv.ta_only";
/// Port only the normal world may connect to.
pub const NS_ONLY: &str = "com.android.ipc-unittest.srv.ns_only";
/// Port of the service that accepts a channel and then closes it.
pub const CLOSER1: &str = "com.android.ipc-unittest.srv.closer1";
/// Port of the service that closes a channel without accepting it.
pub const CLOSER2: &str = "com.android.ipc-unittest.srv.closer2";
/// Port of the service that closes its channels once they have connected and written.
pub const CLOSER3: &str = "com.android.ipc-unittest.srv.closer3";
/// Port of ipc-unittest's control service (the unittest lib's `ctrl` channel).
pub const MAIN_CTRL: &str = "com.android.ipc-unittest.ctrl";
/// Port of the service that takes memory references and writes into them (send-fd's peer).
pub const MEMREF_RECEIVER: &str = "com.android.trusty.memref.receiver";

/// Size of one chunk of send-fd's object (tipc_test.c `memref_chunk_size`).
pub const MEMREF_CHUNK_SIZE: usize = 4096;
/// Chunks in send-fd's object (`num_chunks`).
pub const MEMREF_CHUNKS: usize = 10;

/// The options the tests read (tipc-test's `struct tipc_test_params`).
#[derive(Clone, Debug)]
pub struct Params {
    /// Times to repeat a test (`-r`).
    pub repeat: u32,
    /// Message size in bytes (`-m`).
    pub msgsize: usize,
    /// Messages per burst (`-b`).
    pub burst: u32,
    /// Vary message sizes below `msgsize` (`-v`).
    pub variable: bool,
    /// Print less (`-s`).
    pub silent: bool,
    /// A port to use instead of the test's own (`-S`).
    pub srv: Option<String>,
    /// How long blocked_read waits for a message that never comes.
    pub blocked_read_timeout: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            repeat: 1,
            msgsize: 32,
            burst: 32,
            variable: false,
            silent: false,
            srv: None,
            blocked_read_timeout: Duration::from_millis(500),
        }
    }
}

/// One test's outcome: Ok, or what went wrong.
pub type Outcome = Result<(), String>;

/// A test: its name and body.
pub struct TestCase {
    /// Its name (`-t`).
    pub name: &'static str,
    /// Its body.
    pub run: fn(&mut dyn TipcBackend, &dyn TestEnv, &Params, &mut Rng) -> Outcome,
}

/// The tests `-t all` runs, in tipc-test's order.
pub const ALL: &[TestCase] = &[
    TestCase { name: "connect", run: connect },
    TestCase { name: "connect_foo", run: connect_foo },
    TestCase { name: "burst_write", run: burst_write },
    TestCase { name: "echo", run: echo },
    TestCase { name: "select", run: select },
    TestCase { name: "blocked_read", run: blocked_read },
    TestCase { name: "closer1", run: closer1 },
    TestCase { name: "closer2", run: closer2 },
    TestCase { name: "closer3", run: closer3 },
    TestCase { name: "dev-uuid", run: dev_uuid },
    TestCase { name: "ta-access", run: ta_access },
    TestCase { name: "writev", run: writev },
    TestCase { name: "readv", run: readv },
    TestCase { name: "ta2ta-ipc", run: ta2ta_ipc },
    TestCase { name: "send-fd", run: send_fd },
];

/// tipc-test's tests this port cannot run (none left).
pub const UNSUPPORTED: &[(&str, &str)] = &[];

/// The test called `name`.
pub fn find(name: &str) -> Option<&'static TestCase> {
    ALL.iter().find(|t| t.name == name)
}

/// A small xorshift generator for `-v` (message sizes below msgsize), seeded per run.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (forced odd, never zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    /// The next number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            (self.0 % n as u64) as usize
        }
    }
}

fn msg_len(p: &Params, rng: &mut Rng) -> usize {
    if p.variable && p.msgsize > 0 {
        rng.below(p.msgsize)
    } else {
        p.msgsize
    }
}

/// One line of progress, unless silent.
macro_rules! say {
    ($env:expr, $p:expr, $($arg:tt)*) => { if !$p.silent { $env.println(format_args!($($arg)*)); } };
}

fn connect_to(b: &mut dyn TipcBackend, port: &str) -> Result<Handle, String> {
    b.connect(port).map_err(|e| format!("failed to connect to '{port}': {e}"))
}

fn expect_refused(b: &mut dyn TipcBackend, port: &str) -> Outcome {
    match b.connect(port) {
        Ok(h) => {
            let _ = b.close(h);
            Err(format!("connected to '{port}', which must refuse"))
        }
        // Every refusal reaches the normal world as ENOTCONN (spec §6.4, §11 subtlety 7).
        Err(Errno(ENOTCONN)) => Ok(()),
        Err(e) => Err(format!("connect to '{port}' failed with {e}, expected ENOTCONN")),
    }
}

fn close(b: &mut dyn TipcBackend, h: Handle) -> Outcome {
    b.close(h).map_err(|e| format!("close failed: {e}"))
}

fn connect(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "connect: repeat = {}", p.repeat);
    for _ in 0..p.repeat {
        match &p.srv {
            Some(srv) => {
                let h = connect_to(b, srv)?;
                close(b, h)?;
            }
            None => {
                let echo = connect_to(b, ECHO)?;
                let sink = connect_to(b, DATASINK)?;
                close(b, echo)?;
                close(b, sink)?;
            }
        }
    }
    say!(env, p, "connect: done");
    Ok(())
}

fn connect_foo(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "connect_foo: repeat = {}", p.repeat);
    for _ in 0..p.repeat {
        expect_refused(b, "foo")?;
    }
    say!(env, p, "connect_foo: done");
    Ok(())
}

fn write_all(b: &mut dyn TipcBackend, h: Handle, data: &[u8], what: &str) -> Outcome {
    match b.write(h, data) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(n) => Err(format!("{what}: write returned {n}, expected {}", data.len())),
        Err(e) => Err(format!("{what}: write failed: {e}")),
    }
}

fn burst_write(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, rng: &mut Rng) -> Outcome {
    say!(env, p, "burst_write: repeat {}: burst {}: msgsize {}: variable {}", p.repeat, p.burst, p.msgsize, p.variable);
    for i in 0..p.repeat {
        let h = connect_to(b, DATASINK)?;
        for _ in 0..p.burst {
            let len = msg_len(p, rng);
            let tx = vec![(i + 1) as u8; len];
            if let Err(e) = write_all(b, h, &tx, "burst_write") {
                let _ = b.close(h);
                return Err(e);
            }
        }
        close(b, h)?;
    }
    say!(env, p, "burst_write: done");
    Ok(())
}

/// `d` in whole microseconds (saturating), the unit of [`TestEnv::now_us`].
fn as_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How long a test waits for a reply that must come.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn echo(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, rng: &mut Rng) -> Outcome {
    say!(env, p, "echo: repeat {}: msgsize {}: variable {}", p.repeat, p.msgsize, p.variable);
    let h = connect_to(b, ECHO)?;
    let result = (|| {
        let mut rx = vec![0u8; p.msgsize.max(1)];
        for i in 0..p.repeat {
            let len = msg_len(p, rng);
            let tx = vec![(i + 1) as u8; len];
            write_all(b, h, &tx, "echo")?;
            let n = b.read(h, &mut rx, Some(REPLY_TIMEOUT)).map_err(|e| format!("echo: read failed: {e}"))?;
            if n != len {
                return Err(format!("echo: data truncated ({n} vs. {len})"));
            }
            if rx[..n] != tx[..] {
                return Err("echo: data mismatch".into());
            }
        }
        Ok(())
    })();
    close(b, h)?;
    say!(env, p, "echo: done");
    result
}

/// select() for up to `timeout` in total, reading every message that arrives; returns the count.
fn wait_for_msgs(b: &mut dyn TipcBackend, env: &dyn TestEnv, h: Handle, timeout: Duration, p: &Params) -> Result<u32, String> {
    say!(env, p, "waiting ({}) for msg", timeout.as_secs_f32());
    let end = env.now_us().saturating_add(as_us(timeout));
    let mut count = 0;
    let mut rx = vec![0u8; p.msgsize.max(1)];
    loop {
        let left = Duration::from_micros(end.saturating_sub(env.now_us()));
        if left.is_zero() || !b.wait_readable(h, left).map_err(|e| format!("select: {e}"))? {
            say!(env, p, "select timedout");
            break;
        }
        match b.read(h, &mut rx, Some(Duration::ZERO)) {
            Ok(n) if n > 0 => count += 1,
            Ok(_) => {}
            Err(e) => return Err(format!("select: read failed: {e}")),
        }
    }
    say!(env, p, "got {count} messages");
    Ok(count)
}

fn select(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "select: repeat {}", p.repeat);
    let h = connect_to(b, ECHO)?;
    let result = (|| {
        let mut received = 0;
        let mut sent = 0;
        for i in 0..p.repeat {
            received += wait_for_msgs(b, env, h, Duration::from_secs(1), p)?;
            say!(env, p, "sending burst: {} msg", p.burst);
            for j in 0..p.burst {
                let tx = vec![(i + j) as u8; p.msgsize];
                write_all(b, h, &tx, "select")?;
                sent += 1;
            }
        }
        received += wait_for_msgs(b, env, h, Duration::from_secs(1), p)?;
        // Echo's queue is 8 deep, so a burst may lose messages (spec §9.2), but replies to what
        // it accepted must arrive, and never more than was sent.
        if sent > 0 && received == 0 {
            return Err(format!("select: no reply to {sent} messages"));
        }
        if received > sent {
            return Err(format!("select: {received} replies to {sent} messages"));
        }
        Ok(())
    })();
    close(b, h)?;
    say!(env, p, "select: done");
    result
}

fn blocked_read(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "blocked_read: repeat {}", p.repeat);
    let h = connect_to(b, ECHO)?;
    let result = (|| {
        let mut rx = [0u8; 512];
        for _ in 0..p.repeat {
            // Nothing was sent, so the read must block until its bound runs out.
            let start = env.now_us();
            match b.read(h, &mut rx, Some(p.blocked_read_timeout)) {
                Err(Errno(ETIMEDOUT)) if elapsed_us(env, start) >= as_us(p.blocked_read_timeout) => {}
                Err(Errno(ETIMEDOUT)) => return Err("blocked_read: timed out early".into()),
                Err(e) => return Err(format!("blocked_read: read failed: {e}")),
                Ok(n) => return Err(format!("blocked_read: got {n} bytes nobody sent")),
            }
        }
        Ok(())
    })();
    close(b, h)?;
    say!(env, p, "blocked_read: done");
    result
}

fn closer1(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "closer1: repeat = {}", p.repeat);
    for _ in 0..p.repeat {
        match b.connect(CLOSER1) {
            Ok(h) => {
                say!(env, p, "closer1: connected");
                close(b, h)?;
            }
            // AOSP tipc-test closer1_test() reports a failed connect and goes on: Trusty's
            // closer1 (ipc-unittest srv.c) closes every second channel right after accepting
            // it, so the close can come with the accept, and the driver's dn_wait_for_reply()
            // then finds the channel disconnected with nothing queued: ENOTCONN.
            Err(Errno(ENOTCONN)) => say!(env, p, "Failed to connect to 'closer1' service"),
            Err(e) => return Err(format!("failed to connect to '{CLOSER1}': {e}")),
        }
    }
    say!(env, p, "closer1: done");
    Ok(())
}

fn closer2(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "closer2: repeat = {}", p.repeat);
    for _ in 0..p.repeat {
        expect_refused(b, CLOSER2)?;
        say!(env, p, "failed to connect to 'closer2' service");
    }
    say!(env, p, "closer2: done");
    Ok(())
}

fn closer3(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "closer3: repeat = {}", p.repeat);
    for i in 0..p.repeat {
        let mut fds = Vec::new();
        let opened = (|| {
            for j in 0..4u32 {
                let h = connect_to(b, CLOSER3)?;
                fds.push(h);
                say!(env, p, "closer3: fd[{j}]={h}: connected");
                write_all(b, h, &[(i + j) as u8; 64], "closer3")?;
            }
            Ok::<(), String>(())
        })();
        let result = opened.and_then(|()| {
            env.sleep(Duration::from_secs(1));
            // The service closed all four (spec §9.2): writes must now fail.
            for &h in &fds {
                match b.write(h, &[0u8; 64]) {
                    Err(Errno(ENOTCONN)) => {}
                    Err(e) => return Err(format!("closer3: write after remote close failed with {e}, expected ENOTCONN")),
                    Ok(_) => return Err("closer3: write succeeded on a channel the service closed".into()),
                }
            }
            Ok(())
        });
        for h in fds {
            close(b, h)?;
        }
        result?;
    }
    say!(env, p, "closer3: done");
    Ok(())
}

fn dev_uuid(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    let h = connect_to(b, UUID)?;
    let mut uuid = [0u8; 16];
    let result = b.read(h, &mut uuid, Some(REPLY_TIMEOUT)).map_err(|e| format!("dev-uuid: read failed: {e}"));
    close(b, h)?;
    let n = result?;
    if n != 16 {
        return Err(format!("unexpected uuid size ({n} vs. 16)"));
    }
    let w = |r: core::ops::Range<usize>| uuid[r].iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    say!(
        env,
        p,
        "uuid: {:08x}-{:04x}-{:04x}-{}",
        w(0..4),
        w(4..6),
        w(6..8),
        uuid[8..].iter().enumerate().map(|(i, x)| if i == 2 { format!("-{x:02x}") } else { format!("{x:02x}") }).collect::<String>()
    );
    // A normal-world client is the all-zero UUID (spec §6.4 step 5).
    if uuid != [0u8; 16] {
        return Err("dev-uuid: the normal world's UUID is not all zeros".into());
    }
    Ok(())
}

fn ta_access(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    say!(env, p, "ta-access:");
    expect_refused(b, TA_ONLY)?;
    let h = connect_to(b, NS_ONLY)?;
    close(b, h)?;
    say!(env, p, "ta-access: done");
    Ok(())
}

fn writev(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, rng: &mut Rng) -> Outcome {
    say!(env, p, "writev: repeat {}: msgsize {}: variable {}", p.repeat, p.msgsize, p.variable);
    let h = connect_to(b, ECHO)?;
    let result = (|| {
        for i in 0..p.repeat {
            let len = msg_len(p, rng);
            let (l0, l1) = (len / 3, len - len / 3);
            let tx0 = vec![(i + 1) as u8; l0];
            let tx1 = vec![(i + 2) as u8; l1];
            let mut rx = vec![(i + 3) as u8; p.msgsize.max(1)];
            let n = b.writev(h, &[&tx0, &tx1]).map_err(|e| format!("writev: writev failed: {e}"))?;
            if n != len {
                return Err(format!("writev: data size mismatch ({n} vs. {len})"));
            }
            let n = b.read(h, &mut rx, Some(REPLY_TIMEOUT)).map_err(|e| format!("writev: read failed: {e}"))?;
            if n != len {
                return Err(format!("writev: read size mismatch ({n} vs. {len})"));
            }
            if rx[..l0] != tx0[..] {
                return Err("writev: data mismatch: buf 0".into());
            }
            if rx[l0..len] != tx1[..] {
                return Err("writev: data mismatch: buf 1".into());
            }
        }
        Ok(())
    })();
    close(b, h)?;
    say!(env, p, "writev: done");
    result
}

fn readv(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, rng: &mut Rng) -> Outcome {
    say!(env, p, "readv: repeat {}: msgsize {}: variable {}", p.repeat, p.msgsize, p.variable);
    let h = connect_to(b, ECHO)?;
    let result = (|| {
        for i in 0..p.repeat {
            let len = msg_len(p, rng);
            let (l0, l1) = (len / 3, len - len / 3);
            let tx: Vec<u8> = (0..len).map(|k| (i as usize + 1 + k) as u8).collect();
            let mut rx0 = vec![(i + 2) as u8; l0];
            let mut rx1 = vec![(i + 3) as u8; l1];
            write_all(b, h, &tx, "readv")?;
            let n = b
                .readv(h, &mut [&mut rx0, &mut rx1], Some(REPLY_TIMEOUT))
                .map_err(|e| format!("readv: readv failed: {e}"))?;
            if n != len {
                return Err(format!("readv: data size mismatch ({n} vs. {len})"));
            }
            if rx0[..] != tx[..l0] {
                return Err("readv: data mismatch: buf 0".into());
            }
            if rx1[..] != tx[l0..] {
                return Err("readv: data mismatch: buf 1".into());
            }
        }
        Ok(())
    })();
    close(b, h)?;
    say!(env, p, "readv: done");
    result
}

/// tipc_test.c `ta2ta_ipc_test()`: the TA-side unittest app (lib/unittest `unittest_main()`
/// behind `com.android.ipc-unittest.ctrl`) runs its suite when connected, sends each log line
/// as a TEST_MESSAGE (or TEST_TEXT) message, then TEST_PASSED or TEST_FAILED.
fn ta2ta_ipc(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    const TEST_PASSED: u8 = 0;
    const TEST_FAILED: u8 = 1;
    const TEST_MESSAGE: u8 = 2;
    const TEST_TEXT: u8 = 3;
    /// How long the suite may take (the C test blocks in read without limit).
    const SUITE_TIMEOUT: Duration = Duration::from_secs(60);
    say!(env, p, "ta2ta_ipc_test:");
    let h = connect_to(b, MAIN_CTRL)?;
    let result = (|| {
        let mut rx = [0u8; 256];
        loop {
            let n = match b.read(h, &mut rx, Some(SUITE_TIMEOUT)) {
                Ok(n) if n > 0 && n < rx.len() => n,
                Ok(n) => return Err(format!("ta2ta_ipc_test: Read failed: {n}")),
                Err(e) => return Err(format!("ta2ta_ipc_test: Read failed: {e}")),
            };
            match rx[0] {
                TEST_PASSED => return Ok(()),
                TEST_FAILED => return Err("ta2ta_ipc_test: the TA-side suite reported TEST_FAILED".into()),
                TEST_MESSAGE | TEST_TEXT => {
                    if !p.silent {
                        let text = String::from_utf8_lossy(&rx[1..n]);
                        env.println(format_args!("{}", text.trim_end_matches('\n')));
                    }
                }
                other => return Err(format!("ta2ta_ipc_test: Bad message header: {other}")),
            }
        }
    })();
    close(b, h)?;
    result
}

/// tipc_test.c `send_fd_test()`: a 10-page object (a dma-buf from the system heap; a memfd
/// where there is none) with "From NS" at its start goes to the memref receiver as the only
/// content of a message (TRUSTY_SHARE); after its 1-byte "sync" reply every page must start
/// with "Hello from Trusty!", read through the test's own mapping.
fn send_fd(b: &mut dyn TipcBackend, env: &dyn TestEnv, p: &Params, _: &mut Rng) -> Outcome {
    const EXPECTED: &[u8] = b"Hello from Trusty!\0";
    say!(env, p, "send_fd_test:");
    let h = b.connect(MEMREF_RECEIVER).map_err(|e| format!("Failed to connect to test support TA - is it missing? ({e})"))?;
    let size = MEMREF_CHUNK_SIZE * MEMREF_CHUNKS;
    let result = (|| {
        let mut obj = b.alloc_shm(size).map_err(|e| format!("Failed to create dma-buf fd of size {size}: {e}"))?;
        if !obj.write(0, b"From NS\0") {
            return Err(format!("Failed to write into the {}", obj.kind()));
        }
        let sent = b
            .send_shm(h, &[], &[(&*obj, Transfer::Share)])
            .map_err(|e| format!("tipc_send failed: {e}"))?;
        if sent != 0 {
            return Err(format!("tipc_send returned {sent} for a message of no data"));
        }
        // The sync byte says the receiver is done with the pages (the C test reads it without
        // checking; a reply that never comes is a failure here).
        let mut c = [0u8; 1];
        match b.read(h, &mut c, Some(REPLY_TIMEOUT)) {
            Ok(1) => {}
            Ok(n) => return Err(format!("send-fd: sync reply of {n} bytes")),
            Err(e) => return Err(format!("send-fd: no sync reply: {e}")),
        }
        Ok(obj)
    })();
    close(b, h)?;
    let obj = result?;
    let mut bad = Vec::new();
    for skip in 0..MEMREF_CHUNKS {
        let mut got = [0u8; EXPECTED.len()];
        if !obj.read(skip * MEMREF_CHUNK_SIZE, &mut got) || got != EXPECTED {
            bad.push(skip);
        }
    }
    if let Some(first) = bad.first() {
        return Err(format!("Failed: Unexpected content at page {first} in {} ({} of {MEMREF_CHUNKS} pages)", obj.kind(), bad.len()));
    }
    say!(env, p, "send_fd_test: done");
    Ok(())
}
