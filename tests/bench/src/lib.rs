//! Library half of `tipc-bench`: the minimal secure-side peer that lets the bench and the tests
//! measure the normal-world stack alone, the counting allocator they count heap allocations
//! with, the choice of an echo series' chunks by the cache-line round trips around them, and
//! the echo floor (an echo's cache lines moved with no work, a machine reference).

pub mod alloc_count;
pub mod chunks;
pub mod floor;
pub mod stack_peer;

/// Spins until `done` holds, calling `wait` between looks, for at most `limit_s` seconds (the
/// clock is read only every 65536 looks, so a quick answer costs no clock read): false if the
/// time ran out. A bench thread waiting on another thread that cannot run fails instead of
/// hanging.
#[inline(always)]
pub fn spin_until(mut done: impl FnMut() -> bool, mut wait: impl FnMut(), limit_s: u64) -> bool {
    let mut spins = 0u32;
    let mut since: Option<std::time::Instant> = None;
    while !done() {
        wait();
        spins = spins.wrapping_add(1);
        if spins & 0xffff == 0 && since.get_or_insert_with(std::time::Instant::now).elapsed().as_secs() >= limit_s {
            return false;
        }
    }
    true
}
