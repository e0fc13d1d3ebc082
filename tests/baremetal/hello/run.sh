#!/usr/bin/env bash
# Builds the baremetal runtime's smoke-test images and boots them under qemu-system-aarch64 (TCG):
#
#  1. hello-el1 as a Xen 4.17 dom0less DomU, no dom0 (shared/spec/qemu-xen.md §3): it prints
#     through Xen's console_io, uses the heap and the counter, and exits QEMU with status 7
#     through semihosting.
#  2. hello-el3 as the EL3 firmware of virt,secure=on (booted with -bios: QEMU's generic loader
#     cannot write secure RAM), once without and once with virtualization=on: it prints on the
#     PL011, registers an SMC handler and drops to NS-EL1 into hello-el1, whose SMCs it answers;
#     hello-el1 exits with the status the monitor gave it, 9.
#  3. The failure paths: an undefined instruction at NS-EL1 (exit 101) and a panic (exit 100)
#     through the EL3 boot, and a DomU whose module node is smaller than the file (exit 102).
#  4. hello-el3 at EL3 dropping to Xen at NS-EL2 (qemu-xen.md §5), which runs hello-el1 as a
#     DomU: Xen's PSCI/SMCCC calls get the runtime's standard answers; exit status 7.
#
# Each boot runs under `timeout 30`; the script checks QEMU's exit status and a marker line, and
# prints the wall time of each boot. Needs qemu-system-aarch64 (qemu-system-arm), dtc
# (device-tree-compiler), an objcopy for AArch64 (binutils-aarch64-linux-gnu), the
# aarch64-unknown-none target and the Debian package xen-hypervisor-4.17-arm64; all of them are
# installed by scripts/lib/setup.sh when missing (the Xen package is downloaded with
# `apt-get download`, after adding dpkg's arm64 architecture if needed, and only unpacked under
# target/qemu/, never installed; $XEN_DEB overrides it).
#
# Env: XEN_DEB (path of the .deb), BAREMETAL_WORK (work directory; default: a new temp dir, kept
# only on failure or with KEEP=1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
OUT="$TARGET_DIR/aarch64-unknown-none/release"
WORK=${BAREMETAL_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/baremetal-hello.XXXXXX")}
mkdir -p "$WORK"
failed=0
cleanup() {
    if [[ $failed -eq 0 && -z "${KEEP:-}" && -z "${BAREMETAL_WORK:-}" ]]; then
        rm -rf "$WORK"
    else
        echo "work directory kept: $WORK"
    fi
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }
die() { echo "run.sh: $*" >&2; failed=1; exit 1; }
now() { date +%s.%N; }

# shellcheck source=../../../scripts/lib/setup.sh
. "$ROOT/scripts/lib/setup.sh"
step "tools: QEMU, dtc, AArch64 binutils, the aarch64-unknown-none target"
need_qemu_tools
(cd "$ROOT" && need_rust_target aarch64-unknown-none)

step "build (release, aarch64-unknown-none)"
(cd "$ROOT" && cargo build --release --target aarch64-unknown-none -p baremetal-hello)

# rustup's rust-objcopy is broken on this machine (missing libLLVM); use binutils.
OBJCOPY=aarch64-linux-gnu-objcopy
for img in hello-el1 hello-el3; do
    "$OBJCOPY" -O binary "$OUT/$img" "$WORK/$img.bin"
done
EL1_SIZE=$(stat -c %s "$WORK/hello-el1.bin")
echo "hello-el1.bin: $EL1_SIZE bytes, hello-el3.bin: $(stat -c %s "$WORK/hello-el3.bin") bytes"
# hello-el3 copies 1 MiB from the staging address (STAGING_COPY).
((EL1_SIZE <= 1048576)) || die "hello-el1.bin is larger than hello-el3's 1 MiB staging copy"

step "Xen 4.17 from the Debian package"
if [[ -n ${XEN_DEB:-} ]]; then
    dpkg -x "$XEN_DEB" "$WORK/xen"
    XEN="$WORK/xen/boot/xen-4.17-arm64"
    [[ -f $XEN ]] || die "$XEN_DEB has no boot/xen-4.17-arm64"
else
    XEN=$(need_xen "$TARGET_DIR/qemu")
fi
echo "Xen: $XEN"

declare -a SUMMARY=()

# boot NAME EXPECTED_RC MARKER QEMU-ARGS...: runs QEMU under timeout 30, checks the status and
# that MARKER appears in the output (saved in $WORK/NAME.log and printed).
boot() {
    local name=$1 want=$2 marker=$3
    shift 3
    local log="$WORK/$name.log" rc=0 t0 t1 secs
    printf '%s\n' "qemu-system-aarch64 $*" >"$WORK/$name.cmd"
    t0=$(now)
    timeout 30 qemu-system-aarch64 "$@" </dev/null >"$log" 2>&1 || rc=$?
    t1=$(now)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    sed 's/\r$//' "$log"
    if [[ $rc -ne $want ]]; then
        SUMMARY+=("FAIL $name: exit status $rc, expected $want (${secs} s)")
        failed=1
    elif ! grep -qF -- "$marker" "$log"; then
        SUMMARY+=("FAIL $name: status $rc but no line with '$marker' (${secs} s)")
        failed=1
    else
        SUMMARY+=("ok   $name: exit status $rc, '$marker' (${secs} s)")
    fi
    echo "--- $name: exit status $rc in ${secs} s"
}

# dom0less_fragment FILE MODULE_SIZE BOOTARGS [EXTRA /chosen LINES]: the DomU node of
# qemu-xen.md §3, appended to QEMU's own DTS (dtc path reference, so QEMU's /chosen is kept).
dom0less_fragment() {
    cat >"$1" <<EOF

&{/chosen} {
	${4:-}
	xen,xen-bootargs = "console=dtuart dtuart=/pl011@9000000 bootscrub=0 guest_loglvl=all";
	#address-cells = <1>;
	#size-cells = <1>;
	domU1 {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0 0x4000>;	/* KiB: 16 MiB at 0x40000000; Xen puts the DTB at 0x40e00000 */
		cpus = <1>;
		module@50000000 {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <0x50000000 $2>;	/* Xen copies this many bytes: >= the file */
			bootargs = "$3";
		};
	};
};
EOF
}

MODULE_SIZE=$(printf '0x%x' $(((EL1_SIZE + 0xfff) & ~0xfff)))
MACH=virt,virtualization=on,gic-version=3
COMMON=(-cpu cortex-a57 -smp 2 -m 2G -nographic -net none)
# The DTB to extend must come from the same -machine/-cpu/-smp/-m as the real boot.
qemu-system-aarch64 -machine "$MACH,dumpdtb=$WORK/virt.dtb" "${COMMON[@]}" >/dev/null 2>&1
dtc -q -I dtb -O dts -o "$WORK/virt.dts" "$WORK/virt.dtb"

# xen_boot NAME MODULE_SIZE EXPECTED_RC MARKER: Xen from QEMU's -kernel, hello-el1 as domU1.
xen_boot() {
    dom0less_fragment "$WORK/$1-fragment.dts" "$2" "console=xen exit=7"
    cat "$WORK/virt.dts" "$WORK/$1-fragment.dts" >"$WORK/$1.dts"
    dtc -q -I dts -O dtb -o "$WORK/$1.dtb" "$WORK/$1.dts"
    boot "$1" "$3" "$4" \
        -machine "$MACH" "${COMMON[@]}" -no-reboot -semihosting \
        -kernel "$XEN" -dtb "$WORK/$1.dtb" \
        -device "loader,file=$WORK/hello-el1.bin,addr=0x50000000,force-raw=on"
}

step "1. hello-el1 as a Xen dom0less DomU ($MACH)"
xen_boot xen-domu "$MODULE_SIZE" 7 "(d1) hello-el1: PASS, exiting with status 7"

# The non-secure payload's DTB: hello-el1 reads only /chosen/bootargs.
ns_dtb() {
    cat >"$WORK/$1.dts" <<EOF
/dts-v1/;
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	compatible = "linux,dummy-virt";
	chosen {
		bootargs = "$2";
		stdout-path = "/pl011@9000000";
	};
	memory@40000000 {
		device_type = "memory";
		reg = <0x0 0x40000000 0x0 0x80000000>;
	};
	pl011@9000000 {
		compatible = "arm,pl011", "arm,primecell";
		reg = <0x0 0x09000000 0x0 0x1000>;
	};
};
EOF
    dtc -q -I dts -O dtb -o "$WORK/$1.dtb" "$WORK/$1.dts"
}

# el3_boot NAME MACHINE DTB EXPECTED_RC MARKER: hello-el3 from the secure flash, hello-el1
# staged at 0x50000000 (hello-el3 copies it to 0x40000000, where QEMU's own DTB sits, so it
# cannot be loaded there directly), its DTB at 0x48000000.
el3_boot() {
    boot "$1" "$4" "$5" \
        -machine "$2" -cpu cortex-a57 -smp 1 -m 2G -nographic -net none -no-reboot -semihosting \
        -bios "$WORK/hello-el3.bin" \
        -device "loader,file=$WORK/$3.dtb,addr=0x48000000,force-raw=on" \
        -device "loader,file=$WORK/hello-el1.bin,addr=0x50000000,force-raw=on"
}

ns_dtb ns-smc "console=pl011 exit=smc"
step "2a. hello-el3 at EL3 -> hello-el1 at NS-EL1 (virt,secure=on,gic-version=3)"
el3_boot el3-ns-el1 virt,secure=on,gic-version=3 ns-smc 9 "hello-el1: PASS, exiting with status 9"
step "2b. the same with EL2 present (virt,secure=on,virtualization=on,gic-version=3)"
el3_boot el3-el2-ns-el1 virt,secure=on,virtualization=on,gic-version=3 ns-smc 9 \
    "hello-el1: PASS, exiting with status 9"

step "3. failure paths: an undefined instruction (101), a panic (100), a truncated DomU (102)"
ns_dtb ns-udf "console=pl011 crash=udf"
el3_boot crash-udf virt,secure=on,gic-version=3 ns-udf 101 "baremetal: unhandled synchronous exception taken to EL1"
ns_dtb ns-panic "console=pl011 crash=panic"
el3_boot crash-panic virt,secure=on,gic-version=3 ns-panic 100 "baremetal: PANIC at EL1"

# A module node smaller than the file: the runtime's trailer check must stop the DomU (102).
xen_boot xen-domu-truncated "$(printf '0x%x' $((EL1_SIZE - 16)))" 102 "Loading d1 kernel from boot module"

step "4. hello-el3 at EL3 -> Xen at NS-EL2 -> hello-el1 as a DomU (virt,secure=on,virtualization=on)"
# As in qemu-xen.md §5: the DTB comes from the same command line with -bios; the secure-only
# memory node goes, a PSCI node (QEMU makes none with secure=on) and the DomU come in.
SMACH=virt,secure=on,virtualization=on,gic-version=3
SCOMMON=(-cpu cortex-a57 -smp 1 -m 2G -nographic -net none)
qemu-system-aarch64 -machine "$SMACH,dumpdtb=$WORK/secure.dtb" "${SCOMMON[@]}" -bios "$WORK/hello-el3.bin" \
    >/dev/null 2>&1
dtc -q -I dtb -O dts -o "$WORK/secure.dts" "$WORK/secure.dtb"
dom0less_fragment "$WORK/el3-xen-fragment.dts" "$MODULE_SIZE" "console=xen exit=7" 'hello-el3,next = "el2";'
cat >>"$WORK/el3-xen-fragment.dts" <<'EOF'
/delete-node/ &{/secram@e000000};
/ {
	psci {
		compatible = "arm,psci-1.0", "arm,psci-0.2";
		method = "smc";
	};
};
EOF
cat "$WORK/secure.dts" "$WORK/el3-xen-fragment.dts" >"$WORK/el3-xen.dts"
dtc -q -I dts -O dtb -o "$WORK/el3-xen.dtb" "$WORK/el3-xen.dts"
# Xen is loaded at 0x40200000: QEMU's own DTB occupies 0x40000000..0x40100000.
boot el3-xen-domu 7 "(d1) hello-el1: PASS, exiting with status 7" \
    -machine "$SMACH" "${SCOMMON[@]}" -no-reboot -semihosting \
    -bios "$WORK/hello-el3.bin" \
    -device "loader,file=$XEN,addr=0x40200000,force-raw=on" \
    -device "loader,file=$WORK/el3-xen.dtb,addr=0x48000000,force-raw=on" \
    -device "loader,file=$WORK/hello-el1.bin,addr=0x50000000,force-raw=on"

step "summary"
printf '%s\n' "${SUMMARY[@]}"
[[ $failed -eq 0 ]] || die "some boots failed (command lines and logs in $WORK)"
echo "all baremetal boots passed"
