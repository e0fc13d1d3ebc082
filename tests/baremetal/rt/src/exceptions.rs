//! Exception vectors for EL1, EL2 and EL3 (the boot code installs the one for the current EL).
//!
//! Every vector saves the whole interrupted context, x0..x30, ELR/SPSR/ESR/FAR, FPSR/FPCR and
//! q0..q31, in an [`ExceptionFrame`] on the current stack, and calls `handle_exception`. If
//! that returns, the (possibly edited) context is restored and the vector `eret`s. The only
//! exceptions that return are SMCs from a lower EL at EL3 ([`crate::el3`]); everything else
//! prints what happened and exits QEMU with [`crate::EXIT_EXCEPTION`] (101).
//!
//! FP/SIMD registers are saved because a monitor must give them back unchanged to the EL that
//! made the SMC (SMCCC), and the Rust handlers may use them.

use core::arch::global_asm;
use core::mem::{offset_of, size_of};

use crate::{el3, println, sysreg};

/// The context the vectors save. `#[repr(C)]`: the assembly below depends on the layout.
#[derive(Debug)]
#[repr(C)]
pub struct ExceptionFrame {
    /// x0..x30 of the interrupted context.
    pub x: [u64; 31],
    /// The vector's index 0..15: (current EL SP0, current EL SPx, lower EL AArch64, lower EL
    /// AArch32) x (synchronous, IRQ, FIQ, SError).
    pub kind: u64,
    /// `ELR_ELx`: where `eret` returns to.
    pub elr: u64,
    /// `SPSR_ELx`.
    pub spsr: u64,
    /// `ESR_ELx`: the syndrome.
    pub esr: u64,
    /// `FAR_ELx`: the faulting address (meaningful for aborts).
    pub far: u64,
    /// `FPSR`.
    pub fpsr: u64,
    /// `FPCR`.
    pub fpcr: u64,
    /// q0..q31.
    pub q: [u128; 32],
}

const FRAME_SIZE: usize = size_of::<ExceptionFrame>();
const _: () = {
    assert!(offset_of!(ExceptionFrame, kind) == 248);
    assert!(offset_of!(ExceptionFrame, elr) == 256);
    assert!(offset_of!(ExceptionFrame, esr) == 272);
    assert!(offset_of!(ExceptionFrame, fpsr) == 288);
    assert!(offset_of!(ExceptionFrame, q) == 304);
    assert!(FRAME_SIZE == 816); // a multiple of 16: SP stays aligned
};

global_asm!(
    r#"
.macro __baremetal_ventry el, idx
    .balign 0x80
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mov     x0, #\idx
    b       __baremetal_vec_common_\el
.endm

.macro __baremetal_vtable el
    .section .text.baremetal_vectors_\el, "ax"
    .balign 0x800
    .global __baremetal_vectors_\el
__baremetal_vectors_\el:
    __baremetal_ventry \el, 0
    __baremetal_ventry \el, 1
    __baremetal_ventry \el, 2
    __baremetal_ventry \el, 3
    __baremetal_ventry \el, 4
    __baremetal_ventry \el, 5
    __baremetal_ventry \el, 6
    __baremetal_ventry \el, 7
    __baremetal_ventry \el, 8
    __baremetal_ventry \el, 9
    __baremetal_ventry \el, 10
    __baremetal_ventry \el, 11
    __baremetal_ventry \el, 12
    __baremetal_ventry \el, 13
    __baremetal_ventry \el, 14
    __baremetal_ventry \el, 15

__baremetal_vec_common_\el:
    str     x0, [sp, #248]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    mrs     x0, elr_\el
    mrs     x1, spsr_\el
    stp     x0, x1, [sp, #256]
    mrs     x0, esr_\el
    mrs     x1, far_\el
    stp     x0, x1, [sp, #272]
    mrs     x0, fpsr
    mrs     x1, fpcr
    stp     x0, x1, [sp, #288]
    add     x0, sp, #304
    stp     q0, q1, [x0, #0]
    stp     q2, q3, [x0, #32]
    stp     q4, q5, [x0, #64]
    stp     q6, q7, [x0, #96]
    stp     q8, q9, [x0, #128]
    stp     q10, q11, [x0, #160]
    stp     q12, q13, [x0, #192]
    stp     q14, q15, [x0, #224]
    stp     q16, q17, [x0, #256]
    stp     q18, q19, [x0, #288]
    stp     q20, q21, [x0, #320]
    stp     q22, q23, [x0, #352]
    stp     q24, q25, [x0, #384]
    stp     q26, q27, [x0, #416]
    stp     q28, q29, [x0, #448]
    stp     q30, q31, [x0, #480]

    mov     x0, sp
    bl      {handler}

    add     x0, sp, #304
    ldp     q0, q1, [x0, #0]
    ldp     q2, q3, [x0, #32]
    ldp     q4, q5, [x0, #64]
    ldp     q6, q7, [x0, #96]
    ldp     q8, q9, [x0, #128]
    ldp     q10, q11, [x0, #160]
    ldp     q12, q13, [x0, #192]
    ldp     q14, q15, [x0, #224]
    ldp     q16, q17, [x0, #256]
    ldp     q18, q19, [x0, #288]
    ldp     q20, q21, [x0, #320]
    ldp     q22, q23, [x0, #352]
    ldp     q24, q25, [x0, #384]
    ldp     q26, q27, [x0, #416]
    ldp     q28, q29, [x0, #448]
    ldp     q30, q31, [x0, #480]
    ldp     x0, x1, [sp, #288]
    msr     fpsr, x0
    msr     fpcr, x1
    ldp     x0, x1, [sp, #256]
    msr     elr_\el, x0
    msr     spsr_\el, x1
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #240]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{frame}
    eret
.endm

__baremetal_vtable el1
__baremetal_vtable el2
__baremetal_vtable el3
.purgem __baremetal_vtable
.purgem __baremetal_ventry
"#,
    frame = const FRAME_SIZE,
    handler = sym handle_exception,
);

/// Called by every vector. Returns only for exceptions that were handled (SMCs at EL3).
extern "C" fn handle_exception(frame: &mut ExceptionFrame) {
    let el = sysreg::current_el();
    let lower = frame.kind >= 8;
    let sync = frame.kind & 3 == 0;
    if el == 3 && lower && sync && el3::handle_lower_sync(frame) {
        return;
    }
    report(el, frame);
    crate::exit(crate::EXIT_EXCEPTION)
}

fn report(el: u8, frame: &ExceptionFrame) {
    const TYPES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
    let ty = TYPES[(frame.kind % 4) as usize];
    let ec = (frame.esr >> 26) & 0x3f;
    let from = match frame.kind / 4 {
        0 => "this EL (SP_EL0)",
        1 => "this EL",
        2 => match (frame.spsr >> 2) & 3 {
            0 => "EL0 (AArch64)",
            1 => "EL1 (AArch64)",
            _ => "EL2 (AArch64)",
        },
        _ => "a lower EL (AArch32)",
    };
    let faulting_el = if frame.kind < 8 { el } else { ((frame.spsr >> 2) & 3) as u8 };
    println!(
        "\nbaremetal: unhandled {ty} exception taken to EL{el} from {from} (faulting EL{faulting_el}): \
         ESR={:#x} (EC={ec:#x} {}, ISS={:#x}) ELR={:#x} FAR={:#x} SPSR={:#x}",
        frame.esr,
        ec_name(ec),
        frame.esr & 0x1ff_ffff,
        frame.elr,
        frame.far,
        frame.spsr,
    );
    println!(
        "baremetal: x0={:#x} x1={:#x} x2={:#x} x3={:#x} x29={:#x} x30={:#x}",
        frame.x[0], frame.x[1], frame.x[2], frame.x[3], frame.x[29], frame.x[30]
    );
}

/// A name for an exception class (`ESR_ELx.EC`).
pub fn ec_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown/UNDEF",
        0x01 => "WFI/WFE",
        0x07 => "FP/SIMD access trapped",
        0x0e => "illegal execution state",
        0x13 => "SMC32",
        0x15 => "SVC64",
        0x16 => "HVC64",
        0x17 => "SMC64",
        0x18 => "MSR/MRS trapped",
        0x20 => "instruction abort, lower EL",
        0x21 => "instruction abort, same EL",
        0x22 => "PC alignment",
        0x24 => "data abort, lower EL",
        0x25 => "data abort, same EL",
        0x26 => "SP alignment",
        0x2c => "FP exception",
        0x2f => "SError",
        0x3c => "BRK",
        _ => "other",
    }
}
