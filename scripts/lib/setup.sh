# shellcheck shell=bash
# One install step for every script of the test command. Source it, then call the `need_*`
# functions for what the script uses. Each function checks first and installs only what is
# missing, from a fresh Debian machine upwards: it never relies on another script or an earlier
# session having installed something (Debian packages, a dpkg architecture, rustup targets or
# toolchains, a downloaded .deb).
#
#   need_debs CMD:PKG ...          each command CMD, else apt-get install PKG
#   need_rust_target TARGET [TC]   rustup target add (toolchain TC, default: the active one)
#   need_rust_component COMP [TC]  rustup component add
#   need_toolchain TC              rustup toolchain install --profile minimal
#   need_cargo_tool BIN CRATE [TC] cargo install --locked CRATE (with +TC when given)
#   need_arm64_deb PKG DIR         apt-get download PKG:arm64 into DIR (adds dpkg's arm64
#                                  architecture first when it is missing); prints the .deb path
#   need_xen DIR                   Xen 4.17 for arm64 unpacked under DIR (never installed);
#                                  prints the path of the hypervisor image
#
# Logs go to stderr, so that functions that print a path can be used in $(...).

SETUP_APT_FRESH=${SETUP_APT_FRESH:-0}
SETUP_XEN_PKG=xen-hypervisor-4.17-arm64

setup_log() { printf 'setup: %s\n' "$*" >&2; }
setup_die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

setup_need_root() {
    [[ $(id -u) = 0 ]] || setup_die "$1 needs root (CI runs as root); do it by hand or rerun as root"
}

setup_apt_update() {
    if [[ $SETUP_APT_FRESH = 0 ]]; then
        setup_log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        SETUP_APT_FRESH=1
    fi
}

need_debs() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    ((${#missing[@]})) || return 0
    setup_need_root "installing ${missing[*]}"
    setup_apt_update
    setup_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

need_toolchain() {
    command -v rustup >/dev/null || setup_die "rustup not found: install Rust with rustup first"
    if ! rustup toolchain list | grep -q "^$1"; then
        setup_log "rustup toolchain install $1"
        rustup toolchain install "$1" --profile minimal >&2
    fi
}

need_rust_target() {
    local target=$1 tc=${2:-}
    command -v rustup >/dev/null || setup_die "rustup not found (needed for the $target target)"
    if [[ -n $tc ]]; then
        need_toolchain "$tc"
        rustup target list --installed --toolchain "$tc" | grep -qx "$target" ||
            { setup_log "rustup target add $target ($tc)"; rustup target add --toolchain "$tc" "$target" >&2; }
    else
        rustup target list --installed | grep -qx "$target" ||
            { setup_log "rustup target add $target"; rustup target add "$target" >&2; }
    fi
}

need_rust_component() {
    local comp=$1 tc=${2:-}
    local args=()
    [[ -z $tc ]] || { need_toolchain "$tc"; args=(--toolchain "$tc"); }
    rustup component list --installed "${args[@]}" | grep -q "^$comp" ||
        { setup_log "rustup component add $comp ${tc:+($tc)}"; rustup component add "${args[@]}" "$comp" >&2; }
}

need_cargo_tool() {
    local bin=$1 crate=$2 tc=${3:-}
    command -v "$bin" >/dev/null 2>&1 && return 0
    setup_log "cargo install --locked $crate"
    if [[ -n $tc ]]; then
        need_toolchain "$tc"
        cargo "+$tc" install --locked "$crate" >&2
    else
        cargo install --locked "$crate" >&2
    fi
}

need_arm64_deb() {
    local pkg=$1 dir=$2 deb
    mkdir -p "$dir"
    deb=$(find "$dir" -maxdepth 1 -name "${pkg}_*_arm64.deb" | sort | tail -n 1)
    if [[ -z $deb ]]; then
        setup_need_root "downloading $pkg:arm64"
        if ! dpkg --print-foreign-architectures | grep -qx arm64; then
            setup_log "dpkg --add-architecture arm64"
            dpkg --add-architecture arm64
            SETUP_APT_FRESH=0
        fi
        apt-cache show "$pkg:arm64" >/dev/null 2>&1 || setup_apt_update
        setup_log "apt-get download $pkg:arm64 (into $dir)"
        if ! (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg:arm64" >&2); then
            setup_apt_update
            (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg:arm64" >&2)
        fi
        deb=$(find "$dir" -maxdepth 1 -name "${pkg}_*_arm64.deb" | sort | tail -n 1)
        [[ -n $deb ]] || setup_die "apt-get download $pkg:arm64 produced no .deb"
    fi
    printf '%s\n' "$deb"
}

need_xen() {
    local dir=$1 xen=$1/xen/boot/xen-4.17-arm64 deb
    if [[ ! -s $xen ]]; then
        deb=$(need_arm64_deb "$SETUP_XEN_PKG" "$dir/deb")
        rm -rf "$dir/xen.tmp"
        dpkg -x "$deb" "$dir/xen.tmp"
        [[ -s $dir/xen.tmp/boot/xen-4.17-arm64 ]] || setup_die "$deb has no boot/xen-4.17-arm64"
        rm -rf "$dir/xen"
        mv "$dir/xen.tmp" "$dir/xen"
        setup_log "Xen: $xen ($(basename "$deb"))"
    fi
    printf '%s\n' "$xen"
}

# The tools every QEMU script needs.
need_qemu_tools() {
    need_debs qemu-system-aarch64:qemu-system-arm dtc:device-tree-compiler \
        aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu timeout:coreutils
}
