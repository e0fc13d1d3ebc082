#!/usr/bin/env bash
# Clippy with exactly the lint set AOSP applies to Rust code outside external/ and vendor/
# (Soong's rust/config/lints.go: defaultRustcLints, then defaultClippyLints on top of them), on
# every crate this project ships. The test-only crates under tests/ are not shipped and keep the
# workspace's own clippy run (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
need_rust_component clippy

# lints.go defaultRustcLints.
rustc_lints=(-A deprecated -D missing-docs -D warnings)
# lints.go defaultClippyLints ("any warning lint will be promoted to a deny" by -D warnings).
clippy_lints=(-A clippy::type-complexity -A clippy::unnecessary-wraps -A clippy::unusual-byte-groupings
    -A clippy::upper-case-acronyms)
shipped=(-p trusty-platform -p trusty-virtio -p tipc -p tipc-test-cases -p tipc-test -p libtrusty-capi)

echo "aosp-lints.sh: cargo clippy ${shipped[*]} -- ${rustc_lints[*]} ${clippy_lints[*]}"
# Libraries and binaries: what Soong's rust_library/rust_ffi/rust_binary modules compile.
cargo clippy --locked "${shipped[@]}" --lib --bins -- "${rustc_lints[@]}" "${clippy_lints[@]}"
# The no_std crates as the bare-metal (nostd) modules build them.
cargo clippy --locked -p trusty-platform -p trusty-virtio -p tipc -p tipc-test-cases \
    --target aarch64-unknown-none -- "${rustc_lints[@]}" "${clippy_lints[@]}"
