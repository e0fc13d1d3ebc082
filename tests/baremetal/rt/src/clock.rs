//! A monotonic clock from the generic timer's physical counter, for EL1 (also under Xen), EL2
//! and EL3.

use trusty_platform::clock::Clock;

use crate::sysreg;

/// `trusty_platform::clock::Clock` over `CNTPCT_EL0` / `CNTFRQ_EL0`. Sleeping spins on the
/// counter; `relax` is a `yield` hint.
#[derive(Clone, Copy, Debug, Default)]
pub struct CounterClock;

impl CounterClock {
    /// The raw counter.
    pub fn ticks() -> u64 {
        sysreg::cntpct()
    }

    /// The counter frequency in Hz (0 if firmware never set `CNTFRQ_EL0`).
    pub fn frequency() -> u64 {
        sysreg::cntfrq()
    }

    /// `ticks` in nanoseconds at `freq` Hz (`ticks` itself if `freq` is 0).
    pub const fn ticks_to_ns(ticks: u64, freq: u64) -> u64 {
        if freq == 0 {
            return ticks;
        }
        let ns = ticks as u128 * 1_000_000_000 / freq as u128;
        if ns > u64::MAX as u128 {
            u64::MAX
        } else {
            ns as u64
        }
    }
}

impl Clock for CounterClock {
    fn now_ns(&self) -> u64 {
        Self::ticks_to_ns(Self::ticks(), Self::frequency())
    }

    fn sleep_ns(&self, ns: u64) {
        let end = self.now_ns().saturating_add(ns);
        while self.now_ns() < end {
            self.relax();
        }
    }

    fn relax(&self) {
        // SAFETY: `yield` is a hint with no architectural effect.
        unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) };
    }
}
