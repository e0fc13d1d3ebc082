#!/usr/bin/env bash
# Builds static aarch64 Linux binaries of trusty-ipcd and tipc-test (aarch64-unknown-linux-musl,
# release) for a Linux guest's initramfs, e.g. a Linux DomU next to a Trusty VM.
#
#   scripts/build-musl.sh [OUT_DIR]
#
# OUT_DIR (default target/musl-bin) receives `trusty-ipcd` and `tipc-test`: statically linked,
# no interpreter, no shared libraries. Both are built with their default features (the
# embedded model is linked too, so `tipc-test -D sim` and `trusty-ipcd --platform native-api5`
# still work in the guest; `trusty-ipcd --platform linux` uses the real platform).
#
# Build time from scratch on two cores: about 3 minutes; each binary is about 1.5 MB.
#
# Linker: rust-lld, which rustup ships with every toolchain; the musl target is
# self-contained (its crt objects and libc.a come with the rust-std component), so no
# cross C toolchain is needed. Installs the rustup target when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
TARGET=aarch64-unknown-linux-musl
need_rust_target "$TARGET"
out=${1:-target/musl-bin}
mkdir -p "$out"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
# Static, self-contained: what the musl target does by default, stated so that a user's own
# RUSTFLAGS cannot turn it into a dynamic link.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static ${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS:-}"
# No debug info, symbols stripped: about a fifth of the size, for an initramfs.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
cargo build --locked --release --target "$TARGET" -p trusty-ipcd --bin trusty-ipcd -p tipc-test --bin tipc-test
for b in trusty-ipcd tipc-test; do
    cp "target/$TARGET/release/$b" "$out/$b"
    # A static executable has no program interpreter (PT_INTERP) and no dynamic section.
    if command -v readelf >/dev/null && readelf -lW "$out/$b" | grep -q 'Requesting program interpreter'; then
        echo "build-musl.sh: $out/$b is not static" >&2
        exit 1
    fi
    printf 'build-musl.sh: %s (%s bytes)\n' "$out/$b" "$(stat -c %s "$out/$b")"
done
