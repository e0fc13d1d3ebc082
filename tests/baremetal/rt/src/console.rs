//! The console: a [`Console`] trait, two backends, the current console ([`set_console`]) and
//! the `print!`/`println!` macros.
//!
//! - [`XenConsole`] ([`XEN`]): the `console_io` hypercall (`CONSOLEIO_write`). Xen only shows a
//!   DomU's output when its bootargs say `guest_loglvl=all`; each line appears as `(d1) ...`.
//! - [`Pl011`] ([`PL011_QEMU_VIRT`]): a PL011 UART by MMIO, QEMU virt's at 0x0900_0000 (also
//!   usable for Xen's vpl011 at 0x2200_0000 with [`Pl011::new`]).
//!
//! Until [`set_console`] is called, output goes nowhere (there is no safe default: a DomU has
//! no UART, and a hypercall without a hypervisor is an undefined instruction).

use core::cell::Cell;
use core::fmt::{self, Write};
use core::ptr::{read_volatile, write_volatile};

use critical_section::Mutex;
use trusty_platform::xen::hypercall::{console_write, HvcHypercall};

/// Somewhere bytes can be written. Implementations must not panic.
pub trait Console: Sync {
    /// Writes `bytes` (a whole line, or part of one).
    fn write_bytes(&self, bytes: &[u8]);
}

/// Xen's console, through `HYPERVISOR_console_io(CONSOLEIO_write)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct XenConsole;

impl Console for XenConsole {
    fn write_bytes(&self, bytes: &[u8]) {
        // Nothing useful can be done about a failure here.
        let _ = console_write(&HvcHypercall, bytes);
    }
}

/// The Xen console.
pub static XEN: XenConsole = XenConsole;

/// A PL011 UART, left as the firmware (or QEMU) set it up; this only transmits.
#[derive(Debug)]
pub struct Pl011 {
    base: usize,
}

const UARTDR: usize = 0x00;
const UARTFR: usize = 0x18;
const UARTFR_TXFF: u32 = 1 << 5;

impl Pl011 {
    /// A PL011 whose registers are at `base`.
    ///
    /// # Safety
    /// `base` must be the (identity-mapped, MMU off) address of a PL011's registers, which
    /// nothing else programs in a conflicting way.
    pub const unsafe fn new(base: usize) -> Self {
        Pl011 { base }
    }

    fn put(&self, byte: u8) {
        // SAFETY: `new`'s contract: `base` is a PL011; UARTFR and UARTDR are 32-bit registers
        // at these offsets, accessed with volatile 32-bit loads and stores.
        unsafe {
            while read_volatile((self.base + UARTFR) as *const u32) & UARTFR_TXFF != 0 {}
            write_volatile((self.base + UARTDR) as *mut u32, u32::from(byte));
        }
    }
}

impl Console for Pl011 {
    fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
    }
}

/// QEMU virt's UART0 (`/pl011@9000000`).
// SAFETY: QEMU's virt machine has a PL011 at 0x0900_0000 (in the secure and non-secure views),
// and nothing else in these images programs it.
pub static PL011_QEMU_VIRT: Pl011 = unsafe { Pl011::new(0x0900_0000) };

static CONSOLE: Mutex<Cell<Option<&'static dyn Console>>> = Mutex::new(Cell::new(None));

/// Makes `console` the one `print!`, `println!`, the panic handler and the exception handlers
/// write to.
pub fn set_console(console: &'static dyn Console) {
    critical_section::with(|cs| CONSOLE.borrow(cs).set(Some(console)));
}

/// The current console, if one was set.
pub fn console() -> Option<&'static dyn Console> {
    critical_section::with(|cs| CONSOLE.borrow(cs).get())
}

/// Collects output into lines (at most `N` bytes) so that a line is one hypercall or one burst.
struct LineWriter<const N: usize> {
    console: &'static dyn Console,
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> LineWriter<N> {
    fn flush(&mut self) {
        if self.len > 0 {
            self.console.write_bytes(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl<const N: usize> Write for LineWriter<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == N {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if let Some(console) = console() {
        let mut w = LineWriter::<256> { console, buf: [0; 256], len: 0 };
        let _ = w.write_fmt(args);
        w.flush();
    }
}

/// Prints to the current console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the current console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

pub use crate::{print, println};
