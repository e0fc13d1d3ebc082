//! The stack as a guest: read the platform from the device tree and probes, bring the stack up,
//! run the tipc-test suite, and say how it went with an exit code.

use alloc::boxed::Box;
use alloc::format;
use alloc::sync::Arc;
use core::fmt;
use core::time::Duration;

use trusty_stack::backend::bare;
use trusty_stack::{bring_up_platform, BringUpError, StackConfig};
use tipc_test_cases::device::{Mutex, SharedPageAllocator, ShmPages};
use tipc_test_cases::{cases, runner, DeviceBackend, Params, Rng, TestEnv};
use trusty_platform::clock::Clock;
use trusty_platform::plan::Mechanism;

use crate::args;

/// Exit code: bring-up failed after a plan was made (a fault, a refused call, ...).
pub const EXIT_BRINGUP_FAILED: u32 = 2;
/// Exit code: no safe way to reach Trusty or share memory on this platform.
pub const EXIT_NO_PATH: u32 = 3;

/// The tests' environment on bare metal: the counter clock, busy sleeps, the console.
pub struct BareEnv {
    pub clock: Arc<dyn Clock>,
    pub print: fn(fmt::Arguments<'_>),
}

impl TestEnv for BareEnv {
    fn now_us(&self) -> u64 {
        self.clock.now_ns() / 1000
    }
    fn sleep(&self, d: Duration) {
        self.clock.sleep_ns(d.as_nanos() as u64);
    }
    fn println(&self, args: fmt::Arguments<'_>) {
        (self.print)(args);
    }
}

/// `trusty-ipc-stack.force-sharing=MECH` on the command line: share memory wrongly on purpose.
fn forced_mechanism(bootargs: &str, facts_backend: u16) -> Option<Mechanism> {
    Mechanism::from_name(args::value(bootargs, "trusty-ipc-stack.force-sharing")?, facts_backend)
}

/// Brings the stack up from the device tree `fdt` and runs every tipc-test case. Returns the
/// exit code: the number of failed tests, or [`EXIT_BRINGUP_FAILED`] / [`EXIT_NO_PATH`].
pub fn run(fdt: &[u8], m: bare::Machine, env: &BareEnv) -> u32 {
    let say = |a: fmt::Arguments<'_>| env.println(a);
    let bootargs = args::bootargs(fdt).unwrap_or("");
    // One pool for the stack's buffers and the memory objects send-fd sends.
    let pages: ShmPages = Arc::new(Mutex::new(m.allocator));
    let clock = m.clock.clone();
    let machine = bare::Machine { allocator: Box::new(SharedPageAllocator(pages.clone())), ..m };
    let access = bare::access(machine, fdt.to_vec());
    let grant_backend = trusty_platform::facts::trusty_vm_from_bootargs(bootargs).ok().flatten().map_or(0, |vm| vm.0);
    let cfg = StackConfig { force_mechanism: forced_mechanism(bootargs, grant_backend), ..Default::default() };
    let (dev, info) = match bring_up_platform(access, cfg) {
        Ok(up) => up,
        Err(e) => {
            if let Some(plan) = e.plan() {
                say(format_args!("{plan}"));
            }
            say(format_args!("tipc-stack: bring-up failed: {e}"));
            return match e {
                BringUpError::NoSafeSharing(_) | BringUpError::Unusable { .. } => EXIT_NO_PATH,
                // Ports not named on the command line are a configuration this image cannot use.
                BringUpError::TrustyVm(_) => EXIT_NO_PATH,
                _ => EXIT_BRINGUP_FAILED,
            };
        }
    };
    say(format_args!("{}", info.plan));
    say(format_args!("tipc-stack: Trusty '{}', API {}", info.version.as_deref().unwrap_or("unknown"), info.api_version));
    let mut backend = DeviceBackend::new(dev, format!("bare metal, {}", info.plan)).with_shm_pages(pages);
    let params = Params { silent: true, ..Default::default() };
    let mut rng = Rng::new(clock.now_ns() | 1);
    let tests: alloc::vec::Vec<_> = cases::ALL.iter().collect();
    let summary = runner::run_tests(&mut backend, env, &tests, &params, &mut rng);
    if let Err(e) = backend.shutdown() {
        say(format_args!("tipc-stack: teardown: {e}"));
    }
    summary.failed
}
