//! The image's first bytes and the way into Rust.
//!
//! Boot path: `_start` (the arm64 `Image` header, whose first word branches over the rest of the
//! header) -> `__baremetal_pre_entry` (below) -> `entry` (aarch64-rt: `CPACR_EL1.FPEN`, zero
//! `.bss`, stack) -> aarch64-rt's `rust_entry` -> the `__main` that [`crate::entry!`] defines ->
//! [`__rt_start`] (heap) -> the image's `main(dtb)`.
//!
//! # Why aarch64-rt, and what is done here instead
//! aarch64-rt 0.4 is used, with its default features off (no `initial-pagetable`: everything
//! runs with the MMU off, which Xen DomUs and the EL3 image need; no `exceptions`; no `psci`),
//! for the entry proper: `.bss` zeroing, the boot stack (its `entry!` macro), FP enable at EL1,
//! and passing x0..x3 through. It cannot do, so this module does:
//! - the 64-byte arm64 `Image` header at the very start of the binary, which Xen's dom0less
//!   loader requires: aarch64-rt's own `image.ld` puts its `entry` first, so the runtime ships
//!   its own linker scripts (which keep aarch64-rt's symbol contract: `.init.entry`,
//!   `bss_begin`/`bss_end`, `.stack.boot_stack`, `boot_stack_end`);
//! - `CPTR_EL3.TFP` / `CPTR_EL2.TFP` (it only sets `CPACR_EL1`, which does not stop FP traps to
//!   EL3/EL2), done here before any Rust code runs;
//! - installing vectors before the first Rust instruction, so early faults are reported;
//! - parking secondary CPUs;
//! - copying `.data` from flash to RAM for the EL3 image (aarch64-rt assumes it is loaded where
//!   it runs; QEMU can only put code into virt's secure memory through `-bios`, i.e. flash);
//! - the exception vectors ([`crate::exceptions`]): aarch64-rt's exception glue saves only the
//!   caller-saved general registers, but a monitor that returns to a lower EL after an SMC must
//!   preserve that EL's FP/SIMD registers too (SMCCC), and the Rust handler may use q0..q31
//!   (the target enables NEON); the runtime's vectors save x0..x30, q0..q31, FPSR/FPCR,
//!   ELR/SPSR/ESR/FAR.

use core::arch::global_asm;

use crate::heap;

global_asm!(
    r#"
    .section .text.head, "ax"
    .global _start
_start:
    b       __baremetal_pre_entry       // code0
    .word   0                           // code1
    .quad   0                           // text_offset: Xen loads at GUEST_RAM0_BASE + 0
    .quad   __baremetal_image_size      // image_size (linker script)
    .quad   0xa                         // flags: little-endian, 4 KiB pages, place anywhere
    .quad   0                           // res2
    .quad   0                           // res3
    .quad   0                           // res4
    .word   0x644d5241                  // magic "ARM\x64"
    .word   0                           // res5 (no PE header)

    .global __baremetal_pre_entry
__baremetal_pre_entry:
    // x0..x3 are the boot arguments: only x9..x15 are used here.
    // Park every CPU whose affinity is not 0.0.0.0 (QEMU starts all CPUs at the reset vector
    // for -bios; a DomU's secondary vCPUs only start through PSCI CPU_ON).
    mrs     x9, mpidr_el1
    mov     x10, #0xffffff
    movk    x10, #0xff, lsl #32
    tst     x9, x10
    b.ne    __baremetal_park

    mrs     x9, CurrentEL
    ubfx    x9, x9, #2, #2
    cmp     x9, #3
    b.eq    3f
    cmp     x9, #2
    b.eq    2f
    // EL1: FP/SIMD on (the vectors save q0..q31), then the vectors.
    mov     x10, #(3 << 20)
    msr     cpacr_el1, x10
    isb
    adrp    x10, __baremetal_vectors_el1
    add     x10, x10, :lo12:__baremetal_vectors_el1
    msr     vbar_el1, x10
    b       4f
2:  // EL2 (E2H=0): CPTR_EL2 = RES1 bits | TZ, TFP=0.
    mov     x10, #0x33ff
    msr     cptr_el2, x10
    mov     x10, #(3 << 20)
    msr     cpacr_el1, x10
    isb
    adrp    x10, __baremetal_vectors_el2
    add     x10, x10, :lo12:__baremetal_vectors_el2
    msr     vbar_el2, x10
    b       4f
3:  // EL3: CPTR_EL3 = 0: no FP/SIMD (TFP), trace (TTA) or CPACR (TCPAC) traps.
    msr     cptr_el3, xzr
    mov     x10, #(3 << 20)
    msr     cpacr_el1, x10
    isb
    adrp    x10, __baremetal_vectors_el3
    add     x10, x10, :lo12:__baremetal_vectors_el3
    msr     vbar_el3, x10
4:  isb
    // Copy .data to RAM if it is linked to load elsewhere (EL3 image: flash -> secure RAM).
    adrp    x10, __data_lma
    add     x10, x10, :lo12:__data_lma
    adrp    x11, __data_start
    add     x11, x11, :lo12:__data_start
    adrp    x12, __data_end
    add     x12, x12, :lo12:__data_end
    cmp     x10, x11
    b.eq    6f
5:  cmp     x11, x12
    b.hs    6f
    ldp     x13, x14, [x10], #16
    stp     x13, x14, [x11], #16
    b       5b
6:  b       entry                       // aarch64-rt

    .global __baremetal_park
__baremetal_park:
    wfe
    b       __baremetal_park

    // The last 16 bytes of the image file (the linker scripts put this section last in .data).
    .section .baremetal_trailer, "aw"
    .balign 16
    .global __baremetal_trailer
__baremetal_trailer:
    .quad   {trailer0}
    .quad   {trailer1}
"#,
    trailer0 = const TRAILER[0],
    trailer1 = const TRAILER[1],
);

/// The image's last 16 bytes: "baremetal-image\0" (checked by [`__rt_start`]).
const TRAILER: [u64; 2] = [u64::from_le_bytes(*b"baremeta"), u64::from_le_bytes(*b"l-image\0")];

extern "C" {
    /// The first byte of the image (the `Image` header), from the assembly above.
    static _start: u8;
    /// The image's trailer, from the assembly above.
    static __baremetal_trailer: [u64; 2];
}

/// The address the image runs at (the start of its `Image` header).
pub fn image_base() -> usize {
    // Only the address is taken (safe for an extern static); nothing is read.
    &raw const _start as usize
}

/// Runs once on the boot stack with `.bss` zeroed: sets up the heap and calls `main`.
/// Called by the code [`crate::entry!`] generates; not for direct use.
///
/// # Safety
/// `heap..heap + heap_size` must be memory that nothing else uses, for the rest of the program,
/// and this must be called only once.
#[doc(hidden)]
pub unsafe fn __rt_start(x0: u64, main: fn(usize) -> !, heap: *mut u8, heap_size: usize) -> ! {
    // Referencing `_start` also keeps the object with the header and vectors in the link.
    let _ = image_base();
    // A loader that copied less than the whole file (e.g. a Xen dom0less module node whose
    // `reg` size is smaller than the file) leaves the end of .rodata zero, which shows up as
    // wrong behaviour much later; stop at once instead. The console is not set up yet.
    // SAFETY: the trailer is a 16-byte, 16-aligned static placed by the linker script; it is
    // only read.
    let trailer = unsafe { core::ptr::read_volatile(&raw const __baremetal_trailer) };
    if trailer != TRAILER {
        crate::exit(crate::EXIT_TRUNCATED);
    }
    // SAFETY: the caller hands over `heap..heap + heap_size` for good, and this runs once.
    unsafe { heap::init(heap as usize, heap_size) };
    main(x0 as usize)
}

/// Declares the image's `main` and sizes its boot stack and heap.
///
/// `main` has the type `fn(usize) -> !` and is called with the boot `x0` (the DTB address under
/// Xen, QEMU's `-kernel` boot or `el3::enter_lower_el`; whatever QEMU left for `-bios`).
///
/// ```text
/// baremetal::entry!(main);                                       // 16 pages (64 KiB), 8 MiB
/// baremetal::entry!(main, stack_pages = 32, heap_size = 1 << 20);
/// ```
///
/// The stack is placed after `.bss`, the heap after the stack (section `.heap`, not zeroed).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        $crate::entry!($main, stack_pages = 16, heap_size = 8 << 20);
    };
    ($main:path, stack_pages = $pages:expr, heap_size = $heap:expr) => {
        $crate::__aarch64_rt::entry!(__baremetal_aarch64_rt_main, $pages);

        fn __baremetal_aarch64_rt_main(x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
            const __BAREMETAL_HEAP_SIZE: usize = $heap;
            #[unsafe(link_section = ".heap")]
            static mut __BAREMETAL_HEAP: [::core::mem::MaybeUninit<u8>; __BAREMETAL_HEAP_SIZE] =
                [::core::mem::MaybeUninit::uninit(); __BAREMETAL_HEAP_SIZE];
            let main: fn(usize) -> ! = $main;
            // SAFETY: aarch64-rt calls this once; the heap static is private to this function
            // and handed to the allocator for good.
            unsafe {
                $crate::__rt_start(
                    x0,
                    main,
                    (&raw mut __BAREMETAL_HEAP).cast::<u8>(),
                    __BAREMETAL_HEAP_SIZE,
                )
            }
        }
    };
}
