#!/usr/bin/env bash
# Clippy with exactly the lint set AOSP applies to Rust code outside external/ and vendor/
# (Soong's rust/config/lints.go: defaultRustcLints, then defaultClippyLints on top of them), on
# every crate this project ships, and on the test crates that have Android.bp modules too (Soong
# picks the lint set by directory, so in a tree they get the same set). Test targets included:
# AOSP builds the rust_test modules with these lints as well.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
need_rust_component clippy
need_rust_target aarch64-unknown-none

# lints.go defaultRustcLints.
rustc_lints=(-A deprecated -D missing-docs -D warnings)
# lints.go defaultClippyLints ("any warning lint will be promoted to a deny" by -D warnings).
clippy_lints=(-A clippy::type-complexity -A clippy::unnecessary-wraps -A clippy::unusual-byte-groupings
    -A clippy::upper-case-acronyms)
shipped=(-p trusty-platform -p trusty-virtio -p tipc -p trusty-stack -p tipc-test-cases -p tipc-test -p libtrusty-capi -p trusty-ipcd)
in_android_bp=("${shipped[@]}" -p trusty-model -p platforms)

echo "aosp-lints.sh: cargo clippy ${in_android_bp[*]} -- ${rustc_lints[*]} ${clippy_lints[*]}"
# What Soong's rust_library/rust_ffi/rust_test modules compile: libraries, binaries, unit tests.
cargo clippy --locked "${in_android_bp[@]}" --lib --bins --tests -- "${rustc_lints[@]}" "${clippy_lints[@]}"
# libtrusty_capi, libtrusty_ipcd and trusty-ipcd as Android.bp builds them: without the `sim`
# feature (no model, no platform profiles linked; cargo would unify it on above).
cargo clippy --locked -p libtrusty-capi -p trusty-ipcd --no-default-features --lib --bins \
    -- "${rustc_lints[@]}" "${clippy_lints[@]}"
# The no_std crates as the bare-metal (nostd) modules build them.
cargo clippy --locked -p trusty-platform -p trusty-virtio -p tipc -p trusty-stack -p tipc-test-cases \
    --target aarch64-unknown-none -- "${rustc_lints[@]}" "${clippy_lints[@]}"
