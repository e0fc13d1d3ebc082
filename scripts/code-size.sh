#!/usr/bin/env bash
# Code size of the stack crates (trusty-platform, trusty-virtio, tipc, trusty-stack) as linked into the stack
# DomU image (tests/qemu-images, bin stack-domu, release, aarch64-unknown-none): the sizes of
# their text symbols (`aarch64-linux-gnu-nm --size-sort`), summed by crate.
# Usage: scripts/code-size.sh [ELF]   (default: builds and measures the stack DomU image)
#
# The bare-metal images are built for size: .cargo/config.toml gives aarch64-unknown-none
# `-C opt-level=s` (host builds, the bench among them, keep the release profile's opt-level 3).
# OPT_LEVEL=3 (or any level) measures the same image built at that level instead, in a target
# directory of its own (target/code-size-opt<N>) so that the images of the scenarios stay as
# they are. A RUSTFLAGS in the environment would replace the config's flags: refused.
#
# GENERICS=1 builds the image with v0 symbol mangling (target/code-size-v0[-opt<N>]), whose
# names carry generic arguments: a generic of another crate instantiated with a stack crate's
# type (`BTreeMap<u64, tipc::device::ForeignHold>`'s node code, `drop_in_place::<Bus>`) then
# counts for that stack crate. The default (legacy) names have no generic arguments, so there
# that code counts as "other", as nm's crate-by-path tally has always put it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/setup.sh
source "$ROOT/scripts/lib/setup.sh"
need_debs aarch64-linux-gnu-nm:binutils-aarch64-linux-gnu
TARGET=aarch64-unknown-none
ELF=${1:-}
if [[ -z $ELF ]]; then
    [[ -z ${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-} ]] || setup_die "RUSTFLAGS is set: it would replace .cargo/config.toml's opt-level for $TARGET"
    need_rust_target "$TARGET"
    dir=${CARGO_TARGET_DIR:-$ROOT/target}
    config_level=$(sed -n 's/^rustflags = .*"opt-level=\([^"]*\)".*/\1/p' "$ROOT/.cargo/config.toml")
    if [[ -n ${OPT_LEVEL:-} || -n ${GENERICS:-} ]]; then
        flags="-C opt-level=${OPT_LEVEL:-$config_level}"
        dir=$ROOT/target/code-size
        [[ -n ${GENERICS:-} ]] && flags+=" -C symbol-mangling-version=v0" && dir+=-v0
        [[ -n ${OPT_LEVEL:-} ]] && dir+=-opt$OPT_LEVEL
        export CARGO_TARGET_AARCH64_UNKNOWN_NONE_RUSTFLAGS=$flags
    fi
    (cd "$ROOT" && CARGO_TARGET_DIR=$dir cargo build --release --locked --target "$TARGET" -p qemu-images --bin stack-domu) >&2
    ELF=$dir/$TARGET/release/stack-domu
    echo "opt-level: ${OPT_LEVEL:-$config_level}${GENERICS:+, v0 names: generic code instantiated with a type of a stack crate counts for that crate} ($ELF)"
fi
[[ -f $ELF ]] || setup_die "no such image: $ELF"
# Which sharers and call conduits the image links (trusty-stack's per-mechanism features decide).
syms=$(aarch64-linux-gnu-nm --demangle "$ELF")
linked=()
for what in "FfaSharer:ffa-handle" "FfaCallConduit:ffa-direct" "GrantSharer:xen-grant" "MailboxConduit:xen-grant mailbox" "AddressSharer:phys"; do
    grep -q "trusty_platform::.*::${what%%:*} as " <<<"$syms" && linked+=("${what#*:} (${what%%:*})")
done
echo "linked: ${linked[*]:-none}"
# Demangled names start with the crate path; generic code instantiated elsewhere still carries
# the crate of its definition. t/T/w/W: text symbols.
aarch64-linux-gnu-nm --size-sort --demangle --print-size "$ELF" |
    awk '
    function hex(s,    i, n) {
        n = 0; s = tolower(s)
        for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
        return n
    }
    $3 ~ /^[tTwW]$/ {
        size = hex($2)
        name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
        # A trait impl `<Type as Trait>::f` is code of the crate defining Type (the image'"'"'s
        # clock or page allocator implementing a stack trait is not stack code): match Type only.
        if (name ~ /^<.* as /) { name = substr(name, 2); sub(/ as .*/, "", name) }
        sub(/^</, "", name); sub(/^&/, "", name)
        crate = "other"
        if (name ~ /trusty_platform::/) crate = "trusty-platform"
        else if (name ~ /trusty_virtio::/) crate = "trusty-virtio"
        else if (name ~ /trusty_stack::/) crate = "trusty-stack"
        else if (name ~ /^tipc::|[<&( ]tipc::/) crate = "tipc"
        total[crate] += size; all += size
    }
    END {
        stack = total["trusty-platform"] + total["trusty-virtio"] + total["tipc"] + total["trusty-stack"]
        printf "%-16s %9s\n", "crate", "text B"
        for (c in total) printf "%-16s %9d\n", c, total[c]
        printf "%-16s %9d (%.1f KiB)\n", "stack total", stack, stack / 1024
        printf "%-16s %9d\n", "image total", all
    }'
