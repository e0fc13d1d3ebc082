//! Leaving QEMU: semihosting `SYS_EXIT`, the panic handler, and the exit codes the runtime uses.

use core::cell::Cell;
use core::panic::PanicInfo;

use critical_section::Mutex;

use crate::println;

/// The exit status after a panic.
pub const EXIT_PANIC: u32 = 100;
/// The exit status after an unexpected exception.
pub const EXIT_EXCEPTION: u32 = 101;
/// The exit status when the image's trailer is missing at boot: the loader copied only part of
/// the file (for a Xen dom0less DomU: the module node's `reg` size is smaller than the file).
pub const EXIT_TRUNCATED: u32 = 102;

static EXITING: Mutex<Cell<bool>> = Mutex::new(Cell::new(false));
static PANICKING: Mutex<Cell<bool>> = Mutex::new(Cell::new(false));

/// Ends the program: semihosting `SYS_EXIT` (0x18 with the block {ADP_Stopped_ApplicationExit
/// = 0x20026, code}), which makes QEMU exit with status `code` when it runs with
/// `-semihosting`. Works at EL1 (also as a Xen DomU), EL2 and EL3.
///
/// Without `-semihosting` the `hlt #0xf000` is an undefined instruction; the exception handler
/// reports it and calls `exit` again, which then [`halt`]s.
pub fn exit(code: u32) -> ! {
    if critical_section::with(|cs| EXITING.borrow(cs).replace(true)) {
        println!("baremetal: exit({code}) failed again (is QEMU running with -semihosting?); halting");
        halt()
    }
    semihosting::process::exit(code as i32)
}

/// Stops this core for good, with interrupts masked.
pub fn halt() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting for an event touch no memory.
        unsafe { core::arch::asm!("msr daifset, #0xf", "wfe", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if !critical_section::with(|cs| PANICKING.borrow(cs).replace(true)) {
        println!("\nbaremetal: PANIC at EL{}: {info}", crate::sysreg::current_el());
    }
    exit(EXIT_PANIC)
}
