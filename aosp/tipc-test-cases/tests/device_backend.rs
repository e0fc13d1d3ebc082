//! The cases through `DeviceBackend` over the in-process stack and the embedded model, in an
//! environment that records what the runner prints.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tipc::errno::{EBADF, ENODEV};
use trusty_stack::{bring_up_platform, StackConfig};
use tipc_test_cases::{cases, runner, DeviceBackend, Errno, Params, Rng, TestEnv, TipcBackend};
use tipc_test_cases::device::ShmPages;
use trusty_model::host::{ModelMode, RamAllocator, Sim};

struct Recorder {
    origin: Instant,
    lines: Mutex<Vec<String>>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder { origin: Instant::now(), lines: Mutex::new(Vec::new()) }
    }
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl TestEnv for Recorder {
    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
    fn println(&self, args: fmt::Arguments<'_>) {
        self.lines.lock().unwrap().push(args.to_string());
    }
}

/// A device on the default machine, with the model's faults as its health.
fn backend(mode: ModelMode) -> (DeviceBackend, Arc<Sim>) {
    let profile = platforms::by_name("native-api5").unwrap();
    let sim = Arc::new(profile.boot(mode));
    let (dev, _) = bring_up_platform(profile.access(&sim), StackConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let model = sim.clone();
    // send-fd's objects: pages of the same guest RAM, from their own allocator.
    let pages: ShmPages = Arc::new(tipc_test_cases::device::Mutex::new(Box::new(RamAllocator::new(sim.ram().clone()))));
    let b = DeviceBackend::new(dev, "model")
        .with_health(move || match model.model().faults().first() {
            Some(f) => Err(f.to_string()),
            None => Ok(()),
        })
        .with_shm_pages(pages);
    (b, sim)
}

#[test]
fn all_fifteen_pass_and_print_what_tipc_test_prints() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let (mut b, sim) = backend(mode);
        let env = Recorder::new();
        let all: Vec<_> = cases::ALL.iter().collect();
        let s = runner::run_tests(&mut b, &env, &all, &Params::default(), &mut Rng::new(7));
        let lines = env.lines();
        assert_eq!(s, runner::Summary { passed: 15, failed: 0 }, "{lines:#?}");
        assert_eq!(lines.last().map(String::as_str), Some("15 passed, 0 failed"));
        assert_eq!(lines[..2], ["connect: repeat = 1", "connect: done"]);
        assert!(lines[2].starts_with("PASS connect (") && lines[2].ends_with(" ms)"), "{}", lines[2]);
        for line in ["select timedout", "uuid: 00000000-0000-0000-0000-000000000000", "closer3: fd[3]=3: connected"] {
            assert!(lines.iter().any(|l| l == line), "{line} missing in {lines:#?}");
        }
        for t in cases::ALL {
            assert_eq!(lines.iter().filter(|l| l.starts_with(&format!("PASS {} (", t.name))).count(), 1, "{}", t.name);
        }
        assert_eq!(b.shutdown(), Ok(()));
        assert_eq!(sim.model().live_shares(), 0);
    }
}

#[test]
fn handles_are_the_smallest_free_slot_and_die_with_the_device() {
    let (mut b, _sim) = backend(ModelMode::Sync);
    assert_eq!(b.describe(), "model");
    let h0 = b.connect(cases::ECHO).unwrap();
    let h1 = b.connect(cases::ECHO).unwrap();
    assert_eq!((h0, h1), (0, 1));
    b.close(h0).unwrap();
    assert_eq!(b.close(h0), Err(Errno(EBADF)));
    assert_eq!(b.write(-1, b"x"), Err(Errno(EBADF)));
    assert_eq!(b.connect(cases::ECHO), Ok(0));
    assert_eq!(b.write(1, b"ping"), Ok(4));
    let mut rx = [0u8; 8];
    assert_eq!(b.read(1, &mut rx, Some(Duration::from_secs(5))), Ok(4));
    assert_eq!(&rx[..4], b"ping");
    assert!(b.device().is_some());
    assert_eq!(b.shutdown(), Ok(()));
    assert!(b.device().is_none());
    assert_eq!(b.write(1, b"x"), Err(Errno(EBADF)));
    assert_eq!(b.connect(cases::ECHO), Err(Errno(ENODEV)));
    assert_eq!(b.shutdown(), Ok(()));
}

#[test]
fn the_health_hook_fails_a_test_that_passed() {
    let (b, _sim) = backend(ModelMode::Sync);
    let mut b = b.with_health(|| Err("the secure side saw something".into()));
    let env = Recorder::new();
    let echo = cases::find("echo").unwrap();
    let p = Params { silent: true, ..Params::default() };
    assert_eq!(runner::run_one(&mut b, &env, echo, &p, &mut Rng::new(1)), Err("the secure side saw something".into()));
    assert!(env.lines().is_empty());
}

/// Memory references (spec §6.9): the object's pages are shared with the platform's sharer for
/// as long as Trusty holds the reference, the receiver's writes land in them, and after the
/// RELEASE the share is gone and the pages are freed once the test lets go. Transfer kinds the
/// stack cannot honour are refused with the driver's errno, leaving nothing shared.
#[test]
fn memrefs_are_shared_until_release_then_freed() {
    use tipc::errno::{ENODATA, ENOTCONN, EOPNOTSUPP};
    use tipc_test_cases::backend::Transfer;
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        let (mut b, sim) = backend(mode);
        let h = b.connect(cases::MEMREF_RECEIVER).unwrap();
        // The stack's own buffers (the connect's tx buffer included) are the baseline.
        let base_pages = sim.ram().pages_in_use();
        let base_shares = sim.model().live_shares();
        let size = cases::MEMREF_CHUNK_SIZE * cases::MEMREF_CHUNKS;
        let mut obj = b.alloc_shm(size).unwrap();
        assert_eq!(sim.ram().pages_in_use(), base_pages + cases::MEMREF_CHUNKS);
        assert!(obj.write(0, b"From NS\0"));
        assert_eq!(b.send_shm(h, &[], &[(&*obj, Transfer::Lend)]), Err(Errno(EOPNOTSUPP)));
        assert_eq!(b.send_shm(h, &[], &[(&*obj, Transfer::SendSecure)]), Err(Errno(ENODATA)));
        assert_eq!(sim.model().live_shares(), base_shares, "a refused send leaves nothing shared");
        assert_eq!(b.send_shm(h, &[], &[(&*obj, Transfer::SendSecureOrShare)]), Ok(0));
        let mut c = [9u8; 1];
        assert_eq!(b.read(h, &mut c, Some(Duration::from_secs(5))), Ok(1));
        assert_eq!(c, [0]);
        for page in 0..cases::MEMREF_CHUNKS {
            let mut got = [0u8; 19];
            assert!(obj.read(page * cases::MEMREF_CHUNK_SIZE, &mut got));
            assert_eq!(&got, b"Hello from Trusty!\0", "page {page}");
        }
        // Trusty's RELEASE came before the sync byte: reclaimed, nothing outstanding.
        assert_eq!(sim.model().live_shares(), base_shares);
        let dev = b.device().unwrap();
        assert_eq!((dev.memrefs_outstanding(), dev.memrefs_leaked(), dev.stats().memrefs_reclaimed), (0, 0, 1));
        b.close(h).unwrap();
        // A closed channel takes no references.
        assert_eq!(b.send_shm(h, &[], &[(&*obj, Transfer::Share)]), Err(Errno(EBADF)));
        drop(obj);
        assert_eq!(sim.ram().pages_in_use(), base_pages, "the object's pages are freed");
        // Not connected: ENOTCONN before anything is shared (Linux dn_share_fd()).
        let obj = b.alloc_shm(4096).unwrap();
        let h = b.connect(cases::CLOSER2).err();
        assert_eq!(h, Some(Errno(ENOTCONN)));
        drop(obj);
        assert_eq!(b.shutdown(), Ok(()));
        assert_eq!(sim.model().live_shares(), 0);
        assert!(sim.model().faults().is_empty(), "{:?}", sim.model().faults());
    }
}

/// A message Trusty drops (negative used length) gives its references back to the normal
/// world, which reclaims them itself (spec §6.7; Linux handle_dropped_mb()): no RELEASE comes.
#[test]
fn a_dropped_message_releases_its_references() {
    use tipc_test_cases::backend::Transfer;
    let (mut b, sim) = backend(ModelMode::Sync);
    let h = b.connect(cases::MEMREF_RECEIVER).unwrap();
    let base_shares = sim.model().live_shares();
    let obj = b.alloc_shm(4096 * 10).unwrap();
    sim.model().drop_messages(1);
    assert_eq!(b.send_shm(h, &[], &[(&*obj, Transfer::Share)]), Ok(0));
    let mut c = [0u8; 1];
    assert_eq!(b.read(h, &mut c, Some(Duration::from_millis(200))), Err(Errno(tipc::errno::ETIMEDOUT)));
    assert_eq!(sim.model().live_shares(), base_shares);
    let dev = b.device().unwrap();
    assert_eq!((dev.memrefs_outstanding(), dev.stats().dropped_by_peer), (0, 1));
    b.close(h).unwrap();
    assert_eq!(b.shutdown(), Ok(()));
}
