/*
 * Boot stubs for the EL3 scenarios, assembled by tests/qemu/run.sh (GNU as, aarch64). They run
 * at EL3 out of reset, with the MMU and caches off, copy memory, then jump. Two uses:
 *
 * PAYLOAD (given to QEMU as -bios, i.e. the secure flash at 0x0, where the CPU starts):
 *   for an EL3 firmware linked entirely in secure RAM (secram, 0x0e000000). secram exists only
 *   in the secure address space and QEMU's loaders (-device loader, -kernel) write through the
 *   non-secure one, so an ELF loaded there never arrives. This stub carries the firmware's raw
 *   image (.incbin "el3-payload.bin", found with -I DIR) and copies it to LOAD.
 *
 * COPY (loaded into normal-world RAM; a `-device loader,addr=...,cpu-num=0` makes the CPU start
 *   here instead of at 0x0): copies COPY_LEN bytes from COPY_SRC to COPY_DST. Used for el3-native,
 *   where the normal-world image belongs at 0x40000000 but QEMU puts its own 1 MiB DTB there
 *   and refuses to load another image over it ("ROM regions are overlapping"): the image is
 *   staged elsewhere and put in place before the firmware starts, as if from reset at 0x0.
 *
 * Then both jump to ENTRY with x0..x4 zero. Symbols come from --defsym.
 */
	.text
	.global	_start
_start:
.ifdef COPY
	ldr	x0, =COPY_SRC
	ldr	x1, =COPY_DST
	ldr	x2, =COPY_SRC + COPY_LEN
	bl	copy
.endif
.ifdef PAYLOAD
	adr	x0, payload
	ldr	x1, =LOAD
	adr	x2, payload_end
	bl	copy
.endif
	dsb	sy
	ic	iallu
	dsb	sy
	isb
	mov	x0, xzr
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	mov	x4, xzr
	ldr	x5, =ENTRY
	br	x5

/* copy [x0, x2) to x1, 16 bytes at a time (the tail is rounded up to 16) */
copy:
	cmp	x0, x2
	b.hs	1f
	ldp	x3, x4, [x0], #16
	stp	x3, x4, [x1], #16
	b	copy
1:	ret
	.ltorg

.ifdef PAYLOAD
	.balign	16
payload:
	.incbin	"el3-payload.bin"
	.balign	16
payload_end:
.endif
