/*
 * semihost-exit CODE: ends QEMU with exit status CODE through Arm semihosting SYS_EXIT
 * (SYS_EXIT_EXTENDED's parameter block: ADP_Stopped_ApplicationExit, CODE) issued from Linux
 * userspace. Needs `-semihosting-config enable=on,userspace=on` (without userspace=on the
 * instruction is an undefined instruction at EL0: SIGILL). Returns 1 if QEMU went on.
 * See ../../../shared/spec/linux-domu.md section 5.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	uint64_t block[2] = { 0x20026 /* ADP_Stopped_ApplicationExit */, argc > 1 ? strtoul(argv[1], 0, 0) : 0 };
	register uint64_t x0 asm("x0") = 0x18; /* SYS_EXIT */
	register uint64_t x1 asm("x1") = (uint64_t)block;
	asm volatile("hlt #0xf000" : "+r"(x0) : "r"(x1) : "memory");
	fprintf(stderr, "semihost-exit: QEMU did not stop (no -semihosting-config userspace=on?)\n");
	return 1;
}
