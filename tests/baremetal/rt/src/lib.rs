//! A bare-metal AArch64 runtime for this project's emulation images: a Xen DomU (or plain
//! NS-EL1 payload) linked at 0x4000_0000, and an EL3 monitor that runs from QEMU virt's secure
//! flash and secure RAM. Everything runs with the MMU off, on one core.
//!
//! On any other architecture this crate is empty, so `cargo build --workspace` on the host still
//! works; every module below is compiled only for `target_arch = "aarch64"`.
//!
//! # What it provides
//! - [`entry!`]: the image's entry. The runtime puts an arm64 Linux `Image` header at the very
//!   start of the binary (Xen's dom0less loader insists on it), parks every CPU but the primary,
//!   installs the exception vectors, enables FP/SIMD (`CPACR_EL1`, and `CPTR_EL3`/`CPTR_EL2` at
//!   those levels), copies `.data` when it is linked in flash, then hands over to `aarch64-rt`,
//!   which zeroes `.bss`, sets the stack and calls the runtime, which sets up the heap and calls
//!   `main(dtb)` (`dtb` = the boot `x0`).
//! - Exception vectors at EL1, EL2 and EL3: anything unexpected prints ESR/ELR/FAR/SPSR and the
//!   EL it came from, then exits QEMU with status 101 ([`EXIT_EXCEPTION`]). A panic prints its
//!   message and exits with 100 ([`EXIT_PANIC`]). An image whose last 16 bytes (a trailer) are
//!   missing at boot, because the loader copied less than the file, exits with 102
//!   ([`EXIT_TRUNCATED`]) before `main`.
//! - [`console`]: a [`console::Console`] trait, the Xen `console_io` and PL011 backends,
//!   [`console::set_console`], and `print!`/`println!`.
//! - [`exit()`]: semihosting `SYS_EXIT`, so QEMU's exit status becomes the code (needs
//!   `-semihosting`).
//! - [`clock::CounterClock`]: `trusty_platform::clock::Clock` from the generic timer.
//! - A `#[global_allocator]` over a region the image sizes in [`entry!`] ([`heap`]).
//! - [`el3`]: monitor support: SMC handler registration, dropping to NS-EL1/EL2, GICv3 set-up
//!   for the non-secure side, PSCI/SMCCC constants.
//!
//! # How an image crate uses it
//! `Cargo.toml`: depend on `baremetal` (path `tests/baremetal/rt`). `build.rs` picks the linker
//! script per binary; the runtime's build script puts the scripts on the link search path, so the
//! name alone is enough. Guard on the target, or host builds would get an AArch64 script:
//!
//! ```text
//! fn main() {
//!     if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
//!         // DomU / NS-EL1 image linked at 0x4000_0000, Image header first:
//!         println!("cargo:rustc-link-arg-bin=my-domu=-Tbaremetal-domu.ld");
//!         // EL3 firmware: code in secure flash at 0 (`-bios`), data in secure RAM 0x0e00_0000:
//!         println!("cargo:rustc-link-arg-bin=my-el3=-Tbaremetal-el3.ld");
//!     }
//!     println!("cargo:rerun-if-changed=build.rs");
//! }
//! ```
//!
//! The binary:
//!
//! ```text
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! use baremetal::{console, println};
//!
//! baremetal::entry!(main);                                   // 64 KiB stack, 8 MiB heap
//! // baremetal::entry!(main, stack_pages = 32, heap_size = 1 << 20);
//!
//! fn main(dtb: usize) -> ! {
//!     console::set_console(&console::XEN);                  // or &console::PL011_QEMU_VIRT
//!     println!("hello, dtb at {dtb:#x}");
//!     baremetal::exit(0)
//! }
//! ```
//!
//! The runtime defines the `#[panic_handler]`, the `#[global_allocator]` and the
//! `critical-section` implementation (interrupt masking, single core), so an image must not
//! define its own.
#![no_std]

#[cfg(target_arch = "aarch64")]
extern crate alloc;

#[cfg(target_arch = "aarch64")]
pub mod clock;
#[cfg(target_arch = "aarch64")]
pub mod console;
#[cfg(target_arch = "aarch64")]
pub mod el3;
#[cfg(target_arch = "aarch64")]
mod entry;
#[cfg(target_arch = "aarch64")]
pub mod exceptions;
#[cfg(target_arch = "aarch64")]
mod exit;
#[cfg(target_arch = "aarch64")]
pub mod heap;
#[cfg(target_arch = "aarch64")]
pub mod sysreg;

#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
pub use aarch64_rt as __aarch64_rt;
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
pub use entry::__rt_start;
#[cfg(target_arch = "aarch64")]
pub use exit::{exit, halt, EXIT_EXCEPTION, EXIT_PANIC, EXIT_TRUNCATED};
