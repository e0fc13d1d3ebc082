//! The ipc-unittest services (spec §9.2; SAMPLE `ipc-unittest/srv/srv.c`) as trusted apps.
//!
//! Each service is its own [`TrustedApp`], so one service sleeping does not block another (in
//! Trusty they share one app thread; the model keeps them independent so that tests of one
//! service do not depend on timing of another). Within a service, `nanosleep` is modelled
//! faithfully with [`Ctx::sleep`]: the service handles nothing else until it wakes.
//!
//! `com.android.ipc-unittest.ctrl` (the TA-side suite runner) and
//! `com.android.trusty.memref.receiver` live in [`super::apps`].

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{
    lk, ChanId, Ctx, Events, PortId, TrustedApp, IPC_PORT_ALLOW_ALL, IPC_PORT_ALLOW_NS_CONNECT,
    IPC_PORT_ALLOW_TA_CONNECT,
};

/// Common prefix of the ipc-unittest ports.
pub const SRV_PATH_BASE: &str = "com.android.ipc-unittest";

/// How long closer1/2/3 sleep (100 ms, in nanoseconds).
pub const CLOSER_SLEEP_NS: u64 = 100_000_000;

/// How many channels closer3 holds before closing them all.
pub const CLOSER3_MAX_CHANS: usize = 4;

/// Full port name of service `name`: `com.android.ipc-unittest.srv.<name>`.
pub fn srv_port_name(name: &str) -> String {
    format!("{SRV_PATH_BASE}.srv.{name}")
}

/// One port of the service table in spec §9.2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Full port name.
    pub name: String,
    /// Receive queue depth per channel.
    pub msg_num: u32,
    /// Maximum message size.
    pub msg_size: u32,
    /// Access flags.
    pub flags: u32,
}

impl ServiceConfig {
    fn srv(name: &str, msg_num: u32, msg_size: u32, flags: u32) -> Self {
        ServiceConfig {
            name: srv_port_name(name),
            msg_num,
            msg_size,
            flags,
        }
    }
}

/// A service's port, re-creatable (srv.c `restart_service`).
struct ServicePort {
    config: ServiceConfig,
    port: Option<PortId>,
}

impl ServicePort {
    fn new(config: ServiceConfig) -> Self {
        ServicePort { config, port: None }
    }

    fn create(&mut self, ctx: &mut Ctx<'_>) {
        let c = &self.config;
        // A failure leaves the service without a port, as in srv.c (which only logs it).
        self.port = ctx
            .create_port(&c.name, c.msg_num, c.msg_size, c.flags)
            .ok();
    }

    /// Close the port (pending connections get DISC_REQ) and create it again.
    fn restart(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(port) = self.port.take() {
            let _ = ctx.close_port(port);
        }
        self.create(ctx);
    }

    /// srv.c `handle_port_errors`: anything but READY on a port restarts the service.
    fn handle_errors(&mut self, ctx: &mut Ctx<'_>, events: Events) -> bool {
        if events.intersects(
            Events::ERROR
                .union(Events::HUP)
                .union(Events::MSG)
                .union(Events::SEND_UNBLOCKED),
        ) {
            self.restart(ctx);
            return true;
        }
        false
    }
}

/// srv.c `datasink_handle_chan`: drop every message, close on HUP or error.
fn datasink_chan(ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
    if events.intersects(Events::ERROR.union(Events::SEND_UNBLOCKED)) {
        let _ = ctx.close(chan);
        return;
    }
    if events.intersects(Events::MSG) {
        loop {
            // srv.c's datasink gets and puts without reading the bytes.
            match ctx.get_msg_len(chan) {
                Ok(_) => {
                    if ctx.put_msg(chan).is_err() {
                        let _ = ctx.close(chan);
                        return;
                    }
                }
                Err(lk::ERR_NO_MSG) => break,
                Err(_) => {
                    let _ = ctx.close(chan);
                    return;
                }
            }
        }
    }
    if events.intersects(Events::HUP) {
        let _ = ctx.close(chan);
    }
}

/// closer1: accept; on odd-numbered connections sleep 100 ms; close the channel.
pub struct Closer1 {
    port: ServicePort,
    conn_cnt: u32,
    /// Channel to close when the sleep ends.
    to_close: Option<ChanId>,
}

impl Closer1 {
    /// The service with its §9.2 port (2 × 64, NS+TA).
    pub fn new() -> Self {
        Closer1 {
            port: ServicePort::new(ServiceConfig::srv("closer1", 2, 64, IPC_PORT_ALLOW_ALL)),
            conn_cnt: 0,
            to_close: None,
        }
    }
}

impl Default for Closer1 {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Closer1 {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        self.conn_cnt = self.conn_cnt.wrapping_add(1);
        let Ok((chan, _uuid)) = ctx.accept(port) else {
            return;
        };
        if self.conn_cnt & 1 == 1 {
            self.to_close = Some(chan);
            ctx.sleep(CLOSER_SLEEP_NS);
        } else {
            let _ = ctx.close(chan);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, _events: Events) {
        // srv.c sets no channel handler: dispatch_event closes a handle without one.
        let _ = ctx.close(chan);
    }

    fn on_wake(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(chan) = self.to_close.take() {
            let _ = ctx.close(chan);
        }
    }
}

/// closer2: on a connection request (odd ones after sleeping 100 ms), close and re-create the
/// port without accepting, so every pending connection is refused with DISC_REQ.
///
/// The connection counter survives the restart (the older srv.c keeps it in a static; in the
/// newer one it lives in port state freed by the restart, which makes every request sleep).
pub struct Closer2 {
    port: ServicePort,
    conn_cnt: u32,
    restart_on_wake: bool,
}

impl Closer2 {
    /// The service with its §9.2 port (2 × 64, NS+TA).
    pub fn new() -> Self {
        Closer2 {
            port: ServicePort::new(ServiceConfig::srv("closer2", 2, 64, IPC_PORT_ALLOW_ALL)),
            conn_cnt: 0,
            restart_on_wake: false,
        }
    }
}

impl Default for Closer2 {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Closer2 {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, _port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        self.conn_cnt = self.conn_cnt.wrapping_add(1);
        if self.conn_cnt & 1 == 1 {
            self.restart_on_wake = true;
            ctx.sleep(CLOSER_SLEEP_NS);
        } else {
            self.port.restart(ctx);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, _events: Events) {
        let _ = ctx.close(chan);
    }

    fn on_wake(&mut self, ctx: &mut Ctx<'_>) {
        if core::mem::take(&mut self.restart_on_wake) {
            self.port.restart(ctx);
        }
    }
}

/// closer3: accept and hold up to 4 channels (datasink behaviour on them); once 4 are held, sleep
/// 100 ms and close all of them.
///
/// As in srv.c, a held channel the NS closes is closed on HUP but still counts towards the 4.
pub struct Closer3 {
    port: ServicePort,
    chans: Vec<ChanId>,
    close_on_wake: bool,
}

impl Closer3 {
    /// The service with its §9.2 port (2 × 64, NS+TA).
    pub fn new() -> Self {
        Closer3 {
            port: ServicePort::new(ServiceConfig::srv("closer3", 2, 64, IPC_PORT_ALLOW_ALL)),
            chans: Vec::new(),
            close_on_wake: false,
        }
    }
}

impl Default for Closer3 {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Closer3 {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if events.intersects(
            Events::ERROR
                .union(Events::HUP)
                .union(Events::MSG)
                .union(Events::SEND_UNBLOCKED),
        ) {
            // srv.c (older) closes the held channels too before restarting.
            for chan in self.chans.drain(..) {
                let _ = ctx.close(chan);
            }
            self.port.restart(ctx);
            return;
        }
        if !events.intersects(Events::READY) {
            return;
        }
        let Ok((chan, _uuid)) = ctx.accept(port) else {
            return;
        };
        self.chans.push(chan);
        if self.chans.len() >= CLOSER3_MAX_CHANS {
            self.close_on_wake = true;
            ctx.sleep(CLOSER_SLEEP_NS);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        datasink_chan(ctx, chan, events);
    }

    fn on_wake(&mut self, ctx: &mut Ctx<'_>) {
        if core::mem::take(&mut self.close_on_wake) {
            // Channels already closed on HUP just fail with ERR_BAD_HANDLE, as in srv.c.
            for chan in self.chans.drain(..) {
                let _ = ctx.close(chan);
            }
        }
    }
}

/// datasink, ns_only and ta_only: accept; consume and discard every message.
pub struct DataSink {
    port: ServicePort,
}

impl DataSink {
    /// `datasink` (2 × 64, NS+TA).
    pub fn new() -> Self {
        DataSink {
            port: ServicePort::new(ServiceConfig::srv("datasink", 2, 64, IPC_PORT_ALLOW_ALL)),
        }
    }

    /// `ns_only` (8 × 64, NS only).
    pub fn ns_only() -> Self {
        DataSink {
            port: ServicePort::new(ServiceConfig::srv(
                "ns_only",
                8,
                64,
                IPC_PORT_ALLOW_NS_CONNECT,
            )),
        }
    }

    /// `ta_only` (8 × 64, TA only: NS connects are refused).
    pub fn ta_only() -> Self {
        DataSink {
            port: ServicePort::new(ServiceConfig::srv(
                "ta_only",
                8,
                64,
                IPC_PORT_ALLOW_TA_CONNECT,
            )),
        }
    }
}

impl Default for DataSink {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for DataSink {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        let _ = ctx.accept(port);
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        datasink_chan(ctx, chan, events);
    }
}

/// connect (2 × 64, TA only): accept and close. The TA-side connect storm that follows in srv.c
/// is not modelled (there are no TA clients); NS connects are refused by the access flags.
pub struct Connect {
    port: ServicePort,
}

impl Connect {
    /// The service with its §9.2 port.
    pub fn new() -> Self {
        Connect {
            port: ServicePort::new(ServiceConfig::srv(
                "connect",
                2,
                64,
                IPC_PORT_ALLOW_TA_CONNECT,
            )),
        }
    }
}

impl Default for Connect {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Connect {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        if let Ok((chan, _uuid)) = ctx.accept(port) {
            let _ = ctx.close(chan);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, _events: Events) {
        let _ = ctx.close(chan);
    }
}

/// echo (8 × 4096, NS+TA): send every message back unchanged.
///
/// srv.c: get up to msg_num messages into a local queue, then send them in order, retiring each
/// one only after its send succeeded; on ERR_NOT_ENOUGH_BUFFER stop and resume on SEND_UNBLOCKED.
/// Un-retired messages keep their receive slots, so a stalled NS makes the inbound queue fill up
/// and further NS messages are dropped (spec §6.5 step 8, §9.2).
pub struct Echo {
    port: ServicePort,
    /// Per channel: messages got but not yet echoed.
    chans: BTreeMap<ChanId, VecDeque<Vec<u8>>>,
    /// Messages held in all of `chans` together.
    held: usize,
    /// Buffers of echoed messages, reused (srv.c's are static): no allocation per message.
    spare: Vec<Vec<u8>>,
}

impl Echo {
    /// The service with its §9.2 port.
    pub fn new() -> Self {
        Echo {
            port: ServicePort::new(ServiceConfig::srv("echo", 8, 4096, IPC_PORT_ALLOW_ALL)),
            chans: BTreeMap::new(),
            held: 0,
            spare: Vec::new(),
        }
    }

    fn handle_msgs(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) -> Result<(), i32> {
        // Nothing held back: each message can go straight back (get, read, send, put) while
        // the NS queue has room; the first one that cannot takes the general path below.
        // With nothing held on any channel this needs no look-up here: `echo_queued` refuses
        // (ERR_BAD_HANDLE) a channel that is not this app's open one, and every open channel
        // of this app is in `chans` (entered at accept, removed at close).
        let nothing_held = self.held == 0;
        if nothing_held && ctx.echo_queued(chan).is_ok() {
            return Ok(());
        }
        let queue = self.chans.get_mut(&chan).ok_or(lk::ERR_BAD_HANDLE)?;
        if !nothing_held && queue.is_empty() && ctx.echo_queued(chan).is_ok() {
            return Ok(());
        }
        let max = self.port.config.msg_num as usize;
        while queue.len() < max {
            let mut buf = self.spare.pop().unwrap_or_default();
            match ctx.get_msg_into(chan, &mut buf) {
                Ok(_) => {
                    queue.push_back(buf);
                    self.held += 1;
                }
                Err(lk::ERR_NO_MSG) => {
                    self.spare.push(buf);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        while let Some(msg) = queue.front() {
            match ctx.send_msg(chan, msg) {
                Ok(_) => {}
                Err(lk::ERR_NOT_ENOUGH_BUFFER) => break,
                Err(e) => return Err(e),
            }
            ctx.put_msg(chan)?;
            if let Some(buf) = queue.pop_front() {
                self.held -= 1;
                if self.spare.len() < max {
                    self.spare.push(buf);
                }
            }
        }
        Ok(())
    }

    fn close_chan(&mut self, ctx: &mut Ctx<'_>, chan: ChanId) {
        if let Some(queue) = self.chans.remove(&chan) {
            self.held -= queue.len();
        }
        let _ = ctx.close(chan);
    }
}

impl Default for Echo {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Echo {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        if let Ok((chan, _uuid)) = ctx.accept(port) {
            self.chans.insert(chan, VecDeque::new());
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, events: Events) {
        if events.intersects(Events::ERROR) {
            self.close_chan(ctx, chan);
            return;
        }
        if events.intersects(Events::MSG.union(Events::SEND_UNBLOCKED))
            && self.handle_msgs(ctx, chan).is_err()
        {
            self.close_chan(ctx, chan);
            return;
        }
        if events.intersects(Events::HUP) {
            self.close_chan(ctx, chan);
        }
    }
}

/// uuid (2 × 64, NS+TA): accept, send the peer's 16-byte UUID, close.
pub struct Uuid {
    port: ServicePort,
}

impl Uuid {
    /// The service with its §9.2 port.
    pub fn new() -> Self {
        Uuid {
            port: ServicePort::new(ServiceConfig::srv("uuid", 2, 64, IPC_PORT_ALLOW_ALL)),
        }
    }
}

impl Default for Uuid {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustedApp for Uuid {
    fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.port.create(ctx);
    }

    fn on_port_event(&mut self, ctx: &mut Ctx<'_>, port: PortId, events: Events) {
        if self.port.handle_errors(ctx, events) || !events.intersects(Events::READY) {
            return;
        }
        if let Ok((chan, peer_uuid)) = ctx.accept(port) {
            let _ = ctx.send_msg(chan, &peer_uuid);
            let _ = ctx.close(chan);
        }
    }

    fn on_chan_event(&mut self, ctx: &mut Ctx<'_>, chan: ChanId, _events: Events) {
        let _ = ctx.close(chan);
    }
}

/// One trusted app per ipc-unittest service of spec §9.2.
pub fn unittest_services() -> Vec<Box<dyn TrustedApp>> {
    Vec::from([
        Box::new(Closer1::new()) as Box<dyn TrustedApp>,
        Box::new(Closer2::new()),
        Box::new(Closer3::new()),
        Box::new(Connect::new()),
        Box::new(DataSink::new()),
        Box::new(DataSink::ns_only()),
        Box::new(DataSink::ta_only()),
        Box::new(Echo::new()),
        Box::new(Uuid::new()),
    ])
}
