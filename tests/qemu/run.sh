#!/usr/bin/env bash
# QEMU scenario runner: boots the bare-metal images under qemu-system-aarch64 (TCG) with Debian's
# Xen 4.17 arm64 (dom0less, no dom0) and/or an EL3 firmware, and checks console markers plus
# QEMU's exit status. See tests/qemu/README.md.
#
#   tests/qemu/run.sh SCENARIO...     SCENARIO: xen-trusty-vm | el3-native | xen-no-path |
#                                               xen-trusty-vm-broken | linux-domu-trusty-vm |
#                                               linux-domu-no-path | linux-domu-forced-phys |
#                                               linux-domu-rendezvous | all
#   all = xen-trusty-vm el3-native xen-no-path linux-domu-trusty-vm linux-domu-no-path
#         linux-domu-forced-phys (the first three only with IMAGES=hello)
#
# Environment:
#   IMAGES=real|hello   real (default): the qemu-images crate (stack-domu, trusty-vm, el3-trusty);
#                       hello: tests/baremetal/hello (hello-el1 stands in for both DomUs and the
#                       NS payload, hello-el3 for the firmware); checks boot mechanics only.
#   IMAGE_DIR=DIR       take the ELF images from DIR instead of building them.
#   QEMU_TIMEOUT=S      hard limit per boot (default 60).
#   VERBOSE=1           also stream the console while booting.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR = /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
QDIR=$TARGET_DIR/qemu
IMAGES=${IMAGES:-real}
QEMU_TIMEOUT=${QEMU_TIMEOUT:-60}
VERBOSE=${VERBOSE:-0}
RUST_TARGET=aarch64-unknown-none
QEMU=qemu-system-aarch64
OBJCOPY=aarch64-linux-gnu-objcopy
READELF=aarch64-linux-gnu-readelf
AS=aarch64-linux-gnu-as
XEN_PKG=xen-hypervisor-4.17-arm64
XEN=$QDIR/xen/boot/xen-4.17-arm64

# Machine layout shared with the images (see README.md).
RAM_BASE=$((0x40000000))
QEMU_DTB_ROM_END=$((0x40100000)) # with no -kernel, QEMU puts its own 1 MiB DTB at the base of RAM
SECRAM_BASE=$((0x0e000000))      # secure-only RAM of virt,secure=on: where the EL3 firmware lives
SECRAM_END=$((0x0f000000))
FLASH_SIZE=$((0x04000000))       # secure flash at 0x0: -bios
NS_STAGE_STUB_ADDR=0x4f000000    # el3-native: the stub that puts a staged NS image in place
NS_STAGING_ADDR=0x50000000       # el3-native: where a NS image that overlaps QEMU's DTB is staged
NS_DTB_ADDR=0x48000000           # EL3 scenarios: the DTB the firmware hands to the next stage (x0)
XEN_IMAGE_ADDR=0x40200000        # xen-no-path: where the firmware enters Xen (EL2)
MOD1_ADDR=0x50000000             # dom0less modules: domU1 (and the only DomU of xen-no-path)
MOD2_ADDR=0x51000000             # domU2
MOD_GAP=$((0x01000000))          # so a DomU image may be at most 16 MiB
XEN_BOOTARGS_BASE="console=dtuart dtuart=/pl011@9000000 bootscrub=0 guest_loglvl=all"

COMMON_QEMU=(-cpu cortex-a57 -m 2G -nographic -no-reboot -semihosting -nic none)

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

log() { printf '%s\n' "qemu-run: $*" >&2; }
die() { printf '%s\n' "qemu-run: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# 1. Tools, rustup target, Xen (cached under target/qemu/, never installed)

# shellcheck source=../../scripts/lib/setup.sh
. "$ROOT/scripts/lib/setup.sh"

ensure_packages() { need_qemu_tools; }

ensure_rust_target() {
    if [[ -n ${IMAGE_DIR:-} ]]; then return; fi
    (cd "$ROOT" && need_rust_target "$RUST_TARGET")
}

ensure_xen() {
    [[ -s $XEN ]] && return
    local got
    got=$(need_xen "$QDIR")
    [[ $got = "$XEN" ]] || die "Xen unpacked at $got, expected $XEN"
}

# ---------------------------------------------------------------------------------------------
# 2. Images

declare -A ELF     # role -> ELF path   (roles: stack, tvm, el3)
declare -A BIN     # role -> raw binary (DomU / NS images)
declare -A BASE    # role -> link (load) address of the raw binary

build_images() {
    local elfdir pkg
    if [[ -n ${IMAGE_DIR:-} ]]; then
        elfdir=$IMAGE_DIR
    else
        case $IMAGES in
            real) pkg=qemu-images ;;
            hello) pkg=baremetal-hello ;;
        esac
        log "cargo build --release --locked --target $RUST_TARGET -p $pkg"
        (cd "$ROOT" && cargo build --release --locked --target "$RUST_TARGET" -p "$pkg") >&2
        elfdir=$TARGET_DIR/$RUST_TARGET/release
    fi
    case $IMAGES in
        real) ELF[stack]=$elfdir/stack-domu ELF[tvm]=$elfdir/trusty-vm ELF[el3]=$elfdir/el3-trusty ;;
        hello) ELF[stack]=$elfdir/hello-el1 ELF[tvm]=$elfdir/hello-el1 ELF[el3]=$elfdir/hello-el3 ;;
    esac
    local role
    for role in stack tvm el3; do
        [[ -s ${ELF[$role]} ]] || die "missing image ${ELF[$role]}"
    done
    rm -rf "$QDIR/img"
    mkdir -p "$QDIR/img"
    for role in stack tvm; do
        to_raw_image "$role"
    done
    make_el3_boot
}

# The EL3 firmware boots from -bios: QEMU virt (secure=on) starts the CPU at EL3 at 0x0, the
# secure flash. Secure RAM (secram) exists only in the secure address space and QEMU's loaders
# (-device loader, -kernel) write through the non-secure one, so:
# - an image linked to run from flash (code at 0, .data copied to secram by the image itself, as
#   tests/baremetal/rt/ld/baremetal-el3.ld does) is given to -bios as its raw binary;
# - an image linked entirely in secram is wrapped by el3-boot.s, which carries its raw image and
#   copies it to its link address, then jumps to its ELF entry point.
EL3_BOOT=$QDIR/img/el3-boot.bin
make_el3_boot() {
    local elf=${ELF[el3]} dir=$QDIR/img/el3 entry lo hi size
    entry=$(("$("$READELF" -hW "$elf" | sed -n 's/^ *Entry point address: *//p')"))
    # lo: the lowest load address of file contents (where `objcopy -O binary` starts);
    # hi: the end of the highest segment (incl. .bss etc.).
    read -r lo hi < <("$READELF" -lW "$elf" | {
        lo="" hi=0
        while read -r type _ _ pa filesz memsz _; do
            [[ $type = LOAD ]] || continue
            if ((filesz > 0)) && { [[ -z $lo ]] || ((pa < lo)); }; then lo=$((pa)); fi
            if ((pa + memsz > hi)); then hi=$((pa + memsz)); fi
        done
        echo "${lo:-0} $hi"
    })
    mkdir -p "$dir"
    "$OBJCOPY" -O binary "$elf" "$dir/el3-payload.bin"
    size=$(file_size "$dir/el3-payload.bin")
    if ((lo == 0)); then
        ((entry == 0)) || die "$(printf '%s: linked at 0 (flash) but its entry point is %#x; with -bios the CPU starts at 0' "$elf" "$entry")"
        ((size <= FLASH_SIZE)) || die "$elf: $size bytes do not fit in the 64 MiB secure flash"
        cp "$dir/el3-payload.bin" "$EL3_BOOT"
    elif ((lo >= SECRAM_BASE && hi <= SECRAM_END && entry >= lo && entry < hi)); then
        assemble_stub "$EL3_BOOT" -I "$dir" --defsym PAYLOAD=1 --defsym "LOAD=$lo" --defsym "ENTRY=$entry"
    else
        die "$(printf '%s: an EL3 image must be linked at 0 (secure flash, entry 0) or in secram %#x-%#x; found %#x-%#x, entry %#x' \
            "$elf" $SECRAM_BASE $SECRAM_END "$lo" "$hi" "$entry")"
    fi
}

# assemble_stub OUT.bin AS_ARGS...: el3-boot.s as a raw binary
assemble_stub() {
    local out=$1
    shift
    "$AS" "$@" -o "${out%.bin}.o" "$HERE/el3-boot.s"
    "$OBJCOPY" -O binary -j .text "${out%.bin}.o" "$out"
}

# ELF -> raw arm64 Image; checks the header and that the link address is what Xen will use.
to_raw_image() {
    local role=$1 elf=${ELF[$1]} bin base magic text_offset
    bin=$QDIR/img/$(basename "$elf")-$role.bin
    "$OBJCOPY" -O binary "$elf" "$bin"
    base=$("$READELF" -lW "$elf" | while read -r type _ _ pa filesz _; do
        if [[ $type = LOAD ]] && ((filesz > 0)); then printf '%d\n' "$pa"; fi
    done | sort -n | head -n 1)
    [[ -n $base ]] || die "$elf has no loadable segment"
    magic=$(od -An -tx4 -j56 -N4 "$bin" | tr -d ' ')
    [[ $magic = 644d5241 ]] ||
        die "$elf: no arm64 Image header (magic 'ARM\\x64' at offset 56); Xen cannot load it"
    text_offset=$(od -An -tu8 -j8 -N8 "$bin" | tr -d ' ')
    if ((base != RAM_BASE + text_offset)); then
        die "$(printf '%s: linked at %#x but its Image header says text_offset=%#x: Xen (and the EL3 firmware) will load it at %#x' \
            "$elf" "$base" "$text_offset" $((RAM_BASE + text_offset)))"
    fi
    BIN[$role]=$bin
    BASE[$role]=$base
}

file_size() { stat -c %s "$1"; }

# module reg size: the file size rounded up to 4 KiB (Xen copies exactly this many bytes);
# the file must fit its slot of $2 bytes (default MOD_GAP, the spacing of the images' modules)
module_size() {
    local s slot=${2:-$MOD_GAP}
    s=$(file_size "$1")
    ((s <= slot)) || die "$1 is $s bytes; its slot holds $slot"
    printf '%#x' $(((s + 0xfff) & ~0xfff))
}

# ---------------------------------------------------------------------------------------------
# 3. Device trees: QEMU's own (dumpdtb with the exact machine of the boot) + a dtc fragment

# make_dtb OUT.dtb FRAGMENT_FILE QEMU_MACHINE_ARGS...
make_dtb() {
    local out=$1 frag=$2
    shift 2
    local base=${out%.dtb}
    "$QEMU" "$@" "${COMMON_QEMU[@]}" -machine "dumpdtb=$base.qemu.dtb" </dev/null >/dev/null 2>&1 ||
        die "qemu dumpdtb failed for $out"
    dtc -q -I dtb -O dts -o "$base.qemu.dts" "$base.qemu.dtb"
    cat "$base.qemu.dts" "$frag" >"$base.dts"
    dtc -q -I dts -O dtb -o "$out" "$base.dts" || die "dtc failed on $base.dts"
}

# Xen dom0less fragment for the Trusty-VM scenarios: domU1 = trusty-vm, domU2 = stack-domu.
trusty_vm_fragment() {
    local stack_extra=$1 tvm_size stack_size
    tvm_size=$(module_size "${BIN[tvm]}")
    stack_size=$(module_size "${BIN[stack]}")
    cat <<EOF

/* ---- appended by tests/qemu/run.sh ---- */
&{/chosen} {
	xen,xen-bootargs = "$XEN_BOOTARGS_BASE xsm=dummy";
	#address-cells = <1>;
	#size-cells = <1>;

	domU1 {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0x0 0x10000>;		/* KiB: 64 MiB */
		cpus = <1>;
		xen,enhanced = "no-xenstore";

		module@${MOD1_ADDR#0x} {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <$MOD1_ADDR $tvm_size>;
			bootargs = "trusty-vm.guest-domid=2 trusty-vm.call-evtchn=11";
		};

		tvm_call: evtchn@11 {
			compatible = "xen,evtchn-v1";
			xen,evtchn = <11 &stack_call>;
		};

		tvm_kick: evtchn@13 {
			compatible = "xen,evtchn-v1";
			xen,evtchn = <13 &stack_kick>;
		};
	};

	domU2 {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0x0 0x10000>;		/* KiB: 64 MiB */
		cpus = <1>;
		xen,enhanced = "no-xenstore";

		module@${MOD2_ADDR#0x} {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <$MOD2_ADDR $stack_size>;
			bootargs = "trusty-ipc-stack.trusty-vm=1,10,12$stack_extra";
		};

		stack_call: evtchn@10 {
			compatible = "xen,evtchn-v1";
			xen,evtchn = <10 &tvm_call>;
		};

		stack_kick: evtchn@12 {
			compatible = "xen,evtchn-v1";
			xen,evtchn = <12 &tvm_kick>;
		};
	};
};
EOF
}

# What the EL3 scenarios change in QEMU's secure=on tree: secram is secure-only memory, and QEMU
# leaves PSCI to the firmware, so it writes no /psci node.
el3_common_fragment() {
    local next_addr=$1 next_el=$2
    cat <<EOF

/* ---- appended by tests/qemu/run.sh ---- */
/delete-node/ &{/secram@e000000};

/ {
	/delete-node/ psci;
	psci {
		compatible = "arm,psci-1.0", "arm,psci-0.2";
		method = "smc";
	};
};

&{/chosen} {
	/* where the EL3 firmware enters the normal world: 64-bit address, exception level */
	trusty-ipc-stack,el3-next = <0x0 $(printf '%#x' "$next_addr") $next_el>;
};
EOF
}

# ---------------------------------------------------------------------------------------------
# 4. Scenarios. Each sets QEMU_ARGS, and the expectations EXPECT_STATUS and MARKERS (each
#    "re:REGEX" must match a console line; "count:N:REGEX" must match exactly N lines). Xen's
#    "(dN) " prefix is stripped from guest lines before matching.

QEMU_ARGS=()
EXPECT_STATUS=0
MARKERS=()

# IMAGES=hello: tests/baremetal/hello's images print no scenario markers; they only have to
# boot and exit as tests/baremetal/hello/run.sh expects. hello-el1 reads its console and exit
# status from its bootargs (default: Xen console, exit 0); hello-el3 ignores el3-next: it copies
# the payload staged at 0x50000000 to 0x40000000 and enters NS-EL1, or Xen at 0x40200000 at
# NS-EL2 when /chosen says hello-el3,next = "el2".
hello_expect() {
    EXPECT_STATUS=$1
    MARKERS=("re:^hello-el1: PASS, exiting with status $1$")
}

# hello_chosen PROPERTIES: a /chosen fragment, only for IMAGES=hello
hello_chosen() {
    [[ $IMAGES = hello ]] || return 0
    printf '\n&{/chosen} {\n\t%s\n};\n' "$1"
}

scenario_xen_trusty_vm() {
    local sc=$1 extra=""
    [[ $sc = xen-trusty-vm-broken ]] && extra=" trusty-ipc-stack.force-sharing=phys"
    local machine=(-machine "virt,virtualization=on,gic-version=3" -smp 2)
    local dir=$QDIR/$sc
    mkdir -p "$dir"
    trusty_vm_fragment "$extra" >"$dir/fragment.dtsi"
    make_dtb "$dir/$sc.dtb" "$dir/fragment.dtsi" "${machine[@]}"
    QEMU_ARGS=("${machine[@]}" "${COMMON_QEMU[@]}"
        -kernel "$XEN" -dtb "$dir/$sc.dtb"
        -device "loader,file=${BIN[tvm]},addr=$MOD1_ADDR,force-raw=on"
        -device "loader,file=${BIN[stack]},addr=$MOD2_ADDR,force-raw=on")
    if [[ $IMAGES = hello ]]; then
        hello_expect 0 # whichever DomU finishes first ends the run
    elif [[ $sc = xen-trusty-vm-broken ]]; then
        EXPECT_STATUS=2
        MARKERS=("re:secure-side fault")
    else
        EXPECT_STATUS=0
        MARKERS=("re:^sharing: xen-grant to domain 1" "count:15:^PASS " "re:^15 passed, 0 failed$")
    fi
}

scenario_el3_native() {
    local sc=$1
    local machine=(-machine "virt,secure=on,gic-version=3" -smp 1 -bios "$EL3_BOOT")
    local dir=$QDIR/$sc entry=${BASE[stack]} size
    size=$(file_size "${BIN[stack]}")
    mkdir -p "$dir"
    {
        el3_common_fragment "$entry" 1
        hello_chosen 'bootargs = "console=pl011 exit=smc";'
    } >"$dir/fragment.dtsi"
    make_dtb "$dir/$sc.dtb" "$dir/fragment.dtsi" "${machine[@]}"
    QEMU_ARGS=("${machine[@]}" "${COMMON_QEMU[@]}"
        -device "loader,file=$dir/$sc.dtb,addr=$NS_DTB_ADDR,force-raw=on")
    if ((entry < QEMU_DTB_ROM_END && entry + size > RAM_BASE)); then
        # With -bios, QEMU itself puts its DTB at the base of RAM (a 1 MiB ROM blob, 0x40000000
        # to 0x40100000) and refuses to start when another image overlaps it. So the image is
        # staged at NS_STAGING_ADDR, and the CPU starts in a stub (el3-boot.s, COPY) that puts
        # it in place and then jumps to 0x0, where the firmware starts as if from reset.
        assemble_stub "$dir/stage.bin" --defsym COPY=1 --defsym "COPY_SRC=$NS_STAGING_ADDR" \
            --defsym "COPY_DST=$entry" --defsym "COPY_LEN=$size" --defsym ENTRY=0
        QEMU_ARGS+=(-device "loader,file=${BIN[stack]},addr=$NS_STAGING_ADDR,force-raw=on"
            -device "loader,file=$dir/stage.bin,addr=$NS_STAGE_STUB_ADDR,force-raw=on"
            -device "loader,addr=$NS_STAGE_STUB_ADDR,cpu-num=0")
    else
        QEMU_ARGS+=(-device "loader,file=${BIN[stack]},addr=$(printf '%#x' "$entry"),force-raw=on")
    fi
    if [[ $IMAGES = hello ]]; then
        hello_expect 9 # the status hello-el3's monitor hands out by SMC
    else
        EXPECT_STATUS=0
        MARKERS=("re:^sharing: ffa-handle" "count:15:^PASS " "re:^15 passed, 0 failed$")
    fi
}

scenario_xen_no_path() {
    local sc=$1
    local machine=(-machine "virt,secure=on,virtualization=on,gic-version=3" -smp 1 -bios "$EL3_BOOT")
    local dir=$QDIR/$sc stack_size domu_args=""
    stack_size=$(module_size "${BIN[stack]}")
    [[ $IMAGES = hello ]] && domu_args="exit=3"
    mkdir -p "$dir"
    {
        el3_common_fragment "$XEN_IMAGE_ADDR" 2
        hello_chosen 'hello-el3,next = "el2";'
        cat <<EOF

&{/chosen} {
	xen,xen-bootargs = "$XEN_BOOTARGS_BASE";
	#address-cells = <1>;
	#size-cells = <1>;

	domU1 {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0x0 0x10000>;		/* KiB: 64 MiB */
		cpus = <1>;
		xen,enhanced = "no-xenstore";

		module@${MOD1_ADDR#0x} {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <$MOD1_ADDR $stack_size>;
			bootargs = "$domu_args";
		};
	};
};
EOF
    } >"$dir/fragment.dtsi"
    make_dtb "$dir/$sc.dtb" "$dir/fragment.dtsi" "${machine[@]}"
    QEMU_ARGS=("${machine[@]}" "${COMMON_QEMU[@]}"
        -device "loader,file=$XEN,addr=$XEN_IMAGE_ADDR,force-raw=on"
        -device "loader,file=$dir/$sc.dtb,addr=$NS_DTB_ADDR,force-raw=on"
        -device "loader,file=${BIN[stack]},addr=$MOD1_ADDR,force-raw=on")
    if [[ $IMAGES = hello ]]; then
        hello_expect 3
    else
        EXPECT_STATUS=3
        MARKERS=("re:missing a path to Trusty")
    fi
}

# ---------------------------------------------------------------------------------------------
# 4b. Linux DomU scenarios (shared/spec/linux-domu.md): Debian's arm64 kernel, its three Xen
#     modules and busybox, downloaded and unpacked under $QDIR/linux (never installed), and a
#     busybox initramfs with the guest programs (tests/qemu/linux/). The Trusty VM is domU1
#     (domid 1) in rendezvous mode; Linux is the next domain.

LINUX_DIR=$QDIR/linux
LINUX_KERNEL_ADDR=0x50000000   # the Image is ~31 MiB: 32 MiB slot
LINUX_INITRD_ADDR=0x52000000
LINUX_INITRD_MAX=$((0x04000000))
LINUX_TVM_ADDR=0x56000000      # the Trusty VM beside a Linux DomU
GUEST_CC=aarch64-linux-gnu-gcc
GUEST_RUST_TARGET=aarch64-unknown-linux-musl
LINUX_XEN_MODULES=(xen-evtchn xen-gntalloc xen-gntdev)

ensure_linux_tools() {
    need_debs "$GUEST_CC:gcc-aarch64-linux-gnu" cpio:cpio
    # The C library and the kernel's UAPI headers (<xen/gntalloc.h> ...) for aarch64; no
    # command tells they are there.
    if [[ ! -e /usr/aarch64-linux-gnu/include/stdio.h || ! -e /usr/aarch64-linux-gnu/include/xen/gntalloc.h ]]; then
        setup_need_root "installing libc6-dev-arm64-cross linux-libc-dev-arm64-cross"
        setup_apt_update
        setup_log "apt-get install libc6-dev-arm64-cross linux-libc-dev-arm64-cross"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            libc6-dev-arm64-cross linux-libc-dev-arm64-cross >&2
    fi
    (cd "$ROOT" && need_rust_target "$GUEST_RUST_TARGET")
}

# The kernel package linux-image-arm64:arm64 points at now (e.g. linux-image-6.1.0-57-arm64).
linux_kernel_pkg() {
    apt-cache depends linux-image-arm64:arm64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^:]*\).*/\1/p' | head -n 1
}

# Kernel Image, the three Xen modules and busybox under $LINUX_DIR/x (cached).
ensure_linux() {
    local debs=$LINUX_DIR/deb x=$LINUX_DIR/x kdeb bdeb kpkg kv m
    [[ -s $x/Image && -s $x/busybox && -s $x/xen-gntdev.ko ]] && return
    bdeb=$(need_arm64_deb busybox-static "$debs") # also adds dpkg's arm64 architecture
    kdeb=$(find "$debs" -maxdepth 1 -name 'linux-image-[0-9]*-arm64_*_arm64.deb' | sort | tail -n 1)
    if [[ -z $kdeb ]]; then
        kpkg=$(linux_kernel_pkg)
        if [[ -z $kpkg ]]; then
            setup_apt_update
            kpkg=$(linux_kernel_pkg)
        fi
        [[ -n $kpkg ]] || die "apt-cache cannot tell which kernel linux-image-arm64:arm64 depends on"
        kdeb=$(need_arm64_deb "$kpkg" "$debs")
    fi
    kpkg=$(basename "$kdeb")
    kpkg=${kpkg%%_*}
    kv=${kpkg#linux-image-}
    rm -rf "$x.tmp"
    mkdir -p "$x.tmp"
    local want=("./boot/vmlinuz-$kv")
    for m in "${LINUX_XEN_MODULES[@]}"; do want+=("./lib/modules/$kv/kernel/drivers/xen/$m.ko"); done
    log "unpacking the kernel and its Xen modules from $(basename "$kdeb")"
    dpkg --fsys-tarfile "$kdeb" | tar -x -C "$x.tmp" "${want[@]}" || die "$kdeb lacks one of ${want[*]}"
    dpkg --fsys-tarfile "$bdeb" | tar -x -C "$x.tmp" ./bin/busybox || die "$bdeb has no bin/busybox"
    # Debian's arm64 vmlinuz is already a raw Image (linux-domu.md section 1).
    [[ $(od -An -tx4 -j56 -N4 "$x.tmp/boot/vmlinuz-$kv" | tr -d ' ') = 644d5241 ]] ||
        die "vmlinuz-$kv is not a raw arm64 Image"
    mv "$x.tmp/boot/vmlinuz-$kv" "$x.tmp/Image"
    mv "$x.tmp/bin/busybox" "$x.tmp/busybox"
    for m in "${LINUX_XEN_MODULES[@]}"; do mv "$x.tmp/lib/modules/$kv/kernel/drivers/xen/$m.ko" "$x.tmp/"; done
    rm -rf "$x.tmp/boot" "$x.tmp/bin" "$x.tmp/lib"
    echo "$kv" >"$x.tmp/version"
    rm -rf "$x"
    mv "$x.tmp" "$x"
    log "Linux $kv for the DomU: $x"
}

# The guest programs, static for aarch64 Linux: the probe and the exit helper (C), and unless
# $1 is 0 trusty-ipcd and tipc-test (Rust, musl) and the C test clients linked against libtrusty.
build_linux_programs() {
    local with_stack=$1 out=$LINUX_DIR/bin rel
    rm -rf "$out"
    mkdir -p "$out"
    "$GUEST_CC" -O2 -static -Wall -Wextra -Werror -o "$out/rv-probe" "$HERE/linux/rv-probe.c"
    "$GUEST_CC" -O2 -static -Wall -Wextra -Werror -o "$out/semihost-exit" "$HERE/linux/semihost-exit.c"
    if ((with_stack == 0)); then
        "${OBJCOPY%objcopy}strip" "$out"/*
        return
    fi
    # trusty-ipcd and tipc-test: scripts/build-musl.sh (static, rust-lld). libtrusty for the C
    # clients with the same target, linker and flags (so nothing is built twice).
    "$ROOT/scripts/build-musl.sh" "$out" >&2
    log "cargo build --release --locked --target $GUEST_RUST_TARGET -p libtrusty-capi"
    (cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target "$GUEST_RUST_TARGET" -p libtrusty-capi --lib) >&2
    rel=$TARGET_DIR/$GUEST_RUST_TARGET/release
    local c
    for c in tipc_client_test tipc_stress tipc_send_fd; do
        link_c_client "$c" "$rel/libtrusty_capi.a" "$out/$c"
    done
    "${OBJCOPY%objcopy}strip" "$out"/*
}

# link_c_client NAME LIBTRUSTY.a OUT: aosp/libtrusty/tests/c/NAME.c, static, against the musl
# build of libtrusty, with musl's own start files and C library from Rust's musl target.
link_c_client() {
    local name=$1 lib=$2 out=$3 sc
    sc=$(cd "$ROOT" && rustc --print sysroot)/lib/rustlib/$GUEST_RUST_TARGET/lib/self-contained
    "$GUEST_CC" -std=c99 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -O1 -Wall -Wextra -Werror \
        -static -nostdlib -nostartfiles -I "$ROOT/aosp/libtrusty/include" \
        -o "$out" "$sc/crt1.o" "$sc/crti.o" "$ROOT/aosp/libtrusty/tests/c/$name.c" "$lib" \
        "$sc/libunwind.a" "$sc/libc.a" "$("$GUEST_CC" -print-libgcc-file-name)" "$sc/crtn.o"
}

# An uncompressed newc initramfs (Linux unpacks it faster under TCG than a gzip'd one).
make_initramfs() {
    local r=$LINUX_DIR/rootfs x=$LINUX_DIR/x m size
    rm -rf "$r"
    mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/lib/modules"
    cp "$x/busybox" "$r/bin/busybox"
    for m in "${LINUX_XEN_MODULES[@]}"; do cp "$x/$m.ko" "$r/lib/modules/"; done
    install -m 0755 "$HERE/linux/init" "$r/init"
    install -m 0755 "$LINUX_DIR/bin"/* "$r/bin/"
    (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$LINUX_DIR/initrd.cpio"
    size=$(file_size "$LINUX_DIR/initrd.cpio")
    ((size <= LINUX_INITRD_MAX)) || die "the initramfs is $size bytes; its slot holds $LINUX_INITRD_MAX"
}

# prepare_linux WITH_STACK: everything the Linux DomU boots (the stack's programs unless 0).
prepare_linux() {
    [[ $IMAGES = real ]] || die "the linux-domu scenarios need IMAGES=real"
    ensure_linux_tools
    ensure_linux
    build_linux_programs "$1"
    make_initramfs
}

scenario_linux_domu() {
    local sc=$1 mode with_vm=1 xsm=" xsm=dummy" linux_dom=2
    case $sc in
        linux-domu-trusty-vm) mode=trusty-vm ;;
        linux-domu-rendezvous) mode=probe ;;
        linux-domu-forced-phys) mode=forced-phys ;;
        linux-domu-no-path) mode=no-path with_vm=0 xsm="" linux_dom=1 ;;
    esac
    local machine=(-machine "virt,virtualization=on,gic-version=3" -smp 2)
    local dir=$QDIR/$sc ksize isize tsize vm_args=""
    ksize=$(module_size "$LINUX_DIR/x/Image" $((0x02000000)))
    isize=$(module_size "$LINUX_DIR/initrd.cpio" "$LINUX_INITRD_MAX")
    tsize=$(module_size "${BIN[tvm]}")
    ((with_vm == 0)) || vm_args=" trusty-ipc-stack.trusty-vm=1 tq_vm=1"
    mkdir -p "$dir"
    {
        cat <<EOF

/* ---- appended by tests/qemu/run.sh ---- */
&{/chosen} {
	xen,xen-bootargs = "$XEN_BOOTARGS_BASE$xsm";
	#address-cells = <1>;
	#size-cells = <1>;
EOF
        ((with_vm == 0)) || cat <<EOF

	domU1 {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0x0 0x10000>;		/* KiB: 64 MiB */
		cpus = <1>;
		xen,enhanced = "no-xenstore";

		module@${LINUX_TVM_ADDR#0x} {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <$LINUX_TVM_ADDR $tsize>;
			bootargs = "trusty-vm.guest-domid=$linux_dom trusty-vm.rendezvous=1";
		};
	};
EOF
        cat <<EOF

	domU$linux_dom {
		compatible = "xen,domain";
		#address-cells = <1>;
		#size-cells = <1>;
		memory = <0x0 0x40000>;		/* KiB: 256 MiB */
		cpus = <1>;
		vpl011;				/* console: ttyAMA0 (no PV console without xenstore) */
		xen,enhanced = "no-xenstore";	/* the /hypervisor node: Linux finds Xen */

		module@${LINUX_KERNEL_ADDR#0x} {
			compatible = "multiboot,kernel", "multiboot,module";
			reg = <$LINUX_KERNEL_ADDR $ksize>;
			bootargs = "console=ttyAMA0 earlycon=xenboot nokaslr quiet tq_mode=$mode$vm_args";
		};

		module@${LINUX_INITRD_ADDR#0x} {
			compatible = "multiboot,ramdisk", "multiboot,module";
			reg = <$LINUX_INITRD_ADDR $isize>;
		};
	};
};
EOF
    } >"$dir/fragment.dtsi"
    make_dtb "$dir/$sc.dtb" "$dir/fragment.dtsi" "${machine[@]}"
    QEMU_ARGS=("${machine[@]}" -cpu cortex-a57 -m 2G -nographic -no-reboot -nic none
        -semihosting-config enable=on,userspace=on
        -kernel "$XEN" -dtb "$dir/$sc.dtb"
        -device "loader,file=$LINUX_DIR/x/Image,addr=$LINUX_KERNEL_ADDR,force-raw=on"
        -device "loader,file=$LINUX_DIR/initrd.cpio,addr=$LINUX_INITRD_ADDR,force-raw=on")
    ((with_vm == 0)) || QEMU_ARGS+=(-device "loader,file=${BIN[tvm]},addr=$LINUX_TVM_ADDR,force-raw=on")
    case $mode in
        probe)
            EXPECT_STATUS=0
            MARKERS=("re:^trusty-vm: cannot map the guest's mailbox grant reference 4095"
                "re:^trusty-vm: serving the mailbox at the guest's grant reference" "re:^rv-probe: PASS$")
            ;;
        trusty-vm)
            EXPECT_STATUS=0
            MARKERS=("re:^trusty-ipcd: sharing: xen-grant to domain 1" "count:14:^PASS "
                "re:^14 passed, 1 failed$" "re:^FAIL send-fd \\([0-9]+ ms\\): tipc_send failed: EOPNOTSUPP$"
                "re:^linux-domu: echo bench \\(30 runs, us\\): min [0-9]+ avg [0-9]+ max [0-9]+" "re:^[0-9]+ passed, 0 failed$"
                "re:^4 processes x 2 channels x 10 rounds: 0 failed$" "re:^linux-domu: done at .*, result 0$")
            ;;
        no-path)
            EXPECT_STATUS=2
            MARKERS=("re:^linux-domu: trusty-ipcd exited with status 2$"
                "re:^linux-domu: because: no safe way to share memory with Trusty: missing a path to Trusty")
            ;;
        forced-phys)
            EXPECT_STATUS=2
            MARKERS=("re:^trusty-vm: secure-side fault: .*not a grant reference" "re:^linux-domu: trusty-ipcd exited with status 2$"
                "re:^linux-domu: because: secure side returned")
            ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# 5. Boot and check

PASSED=0
FAILED=0

run_scenario() {
    local sc=$1
    case $sc in
        xen-trusty-vm | xen-trusty-vm-broken) scenario_xen_trusty_vm "$sc" ;;
        el3-native) scenario_el3_native "$sc" ;;
        xen-no-path) scenario_xen_no_path "$sc" ;;
        linux-domu-*) scenario_linux_domu "$sc" ;;
    esac
    local logf=$QDIR/$sc.log status=0 t0 t1 secs
    printf '%s\n' "$QEMU ${QEMU_ARGS[*]}" >"$QDIR/$sc.cmd"
    log "booting $sc (log: $logf)"
    t0=$(date +%s.%N)
    if [[ $VERBOSE = 1 ]]; then
        timeout -k 5 "$QEMU_TIMEOUT" "$QEMU" "${QEMU_ARGS[@]}" </dev/null 2>&1 | tee "$logf" >&2 ||
            status=${PIPESTATUS[0]}
    else
        timeout -k 5 "$QEMU_TIMEOUT" "$QEMU" "${QEMU_ARGS[@]}" </dev/null >"$logf" 2>&1 || status=$?
    fi
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    log "$sc: QEMU exited with status $status after $secs s"

    # Console lines without CRs, Xen's "(dN) " guest prefix stripped.
    local console why=()
    console=$(tr -d '\r' <"$logf" | sed -E 's/^\(d[0-9]+\) //; s/^\(XEN\) DOM[0-9]+: //')
    if ((status == 124 || status == 137)); then
        why+=("timed out after ${QEMU_TIMEOUT} s")
    elif ((status != EXPECT_STATUS)); then
        why+=("QEMU exit status $status, expected $EXPECT_STATUS")
    fi
    local m re n got
    for m in "${MARKERS[@]}"; do
        case $m in
            re:*)
                re=${m#re:}
                grep -Eq -- "$re" <<<"$console" || why+=("no console line matching /$re/")
                ;;
            count:*)
                n=${m#count:}
                re=${n#*:}
                n=${n%%:*}
                got=$(grep -Ec -- "$re" <<<"$console" || true)
                ((got == n)) || why+=("$got console lines matching /$re/, expected $n")
                ;;
        esac
    done
    if ((${#why[@]} == 0)); then
        echo "PASS $sc ($secs s)"
    else
        local joined
        joined=$(printf '%s; ' "${why[@]}")
        echo "FAIL $sc: ${joined%; } (after $secs s; log: $logf)"
        echo "---- last 40 console lines of $sc ----"
        tr -d '\r' <"$logf" | tail -n 40
        echo "----"
    fi
}

SCENARIOS=()
setup_failed() {
    local rc=$? sc
    ((rc != 0)) || return 0
    for sc in "${SCENARIOS[@]}"; do echo "FAIL $sc: set-up failed before the boot (see above)"; done
    echo "0 passed, ${#SCENARIOS[@]} failed"
    exit "$rc"
}

main() {
    (($#)) || usage
    local scenarios=() a
    for a in "$@"; do
        case $a in
            all)
                scenarios+=(xen-trusty-vm el3-native xen-no-path)
                # The Linux DomU runs the stack's own programs: nothing to check with IMAGES=hello.
                [[ $IMAGES = hello ]] || scenarios+=(linux-domu-trusty-vm linux-domu-no-path linux-domu-forced-phys)
                ;;
            xen-trusty-vm | el3-native | xen-no-path | xen-trusty-vm-broken) scenarios+=("$a") ;;
            linux-domu-trusty-vm | linux-domu-no-path | linux-domu-forced-phys | linux-domu-rendezvous)
                scenarios+=("$a") ;;
            -h | --help) usage ;;
            *) log "unknown scenario '$a'"; usage ;;
        esac
    done
    case $IMAGES in real | hello) ;; *) die "IMAGES must be real or hello, not '$IMAGES'" ;; esac

    # If the common set-up (packages, Xen, build) fails, still report every scenario as failed.
    SCENARIOS=("${scenarios[@]}")
    trap setup_failed EXIT
    mkdir -p "$QDIR"
    ensure_packages
    ensure_rust_target
    local sc need_xen=0
    for sc in "${scenarios[@]}"; do [[ $sc = el3-native ]] || need_xen=1; done
    ((need_xen == 0)) || ensure_xen
    build_images
    local need_linux=0 linux_stack=0
    for sc in "${scenarios[@]}"; do
        [[ $sc != linux-domu-* ]] || need_linux=1
        [[ $sc != linux-domu-* || $sc = linux-domu-rendezvous ]] || linux_stack=1
    done
    ((need_linux == 0)) || prepare_linux "$linux_stack"
    trap - EXIT

    for sc in "${scenarios[@]}"; do
        # Each scenario runs in a subshell with errexit, so one that cannot even be set up
        # (missing file, dtc error, ...) counts as failed and the others still run.
        local res=$QDIR/$sc.result rc
        set +e
        (
            set -e
            run_scenario "$sc"
        ) | tee "$res"
        rc=${PIPESTATUS[0]}
        set -e
        if ((rc != 0)); then
            echo "FAIL $sc: could not set up the boot (see the error above)"
            FAILED=$((FAILED + 1))
        elif grep -q "^PASS $sc " "$res"; then
            PASSED=$((PASSED + 1))
        else
            FAILED=$((FAILED + 1))
        fi
    done
    echo "$PASSED passed, $FAILED failed"
    ((FAILED == 0))
}

main "$@"
