#!/usr/bin/env bash
# Builds the shipped crates with the oldest Rust that a supported AOSP release builds with
# (README "AOSP releases and their Rust"; `rust-version` in Cargo.toml), with the committed
# Cargo.lock. Host builds only: the no_std crates are the same code (the aarch64 SMC module
# aside), and rustup offers no aarch64-unknown-none rust-std for 1.81.0 from this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
# The one place the version is written down is Cargo.toml's `rust-version`; rustup wants x.y.z.
msrv=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' Cargo.toml)
[[ -n $msrv ]] || { echo "aosp-rust.sh: no rust-version in Cargo.toml" >&2; exit 1; }
[[ $msrv == *.*.* ]] || msrv=$msrv.0
need_toolchain "$msrv"
echo "aosp-rust.sh: $(rustc "+$msrv" --version)"
# A target directory of its own: artifacts of different compilers do not mix.
export CARGO_TARGET_DIR=target/rust-$msrv
cargo "+$msrv" build --locked -p trusty-platform -p trusty-virtio -p tipc -p trusty-stack -p tipc-test-cases -p tipc-test -p libtrusty-capi -p trusty-ipcd
# As Android.bp builds libtrusty_capi and trusty-ipcd: without the `sim` feature.
cargo "+$msrv" build --locked -p libtrusty-capi -p trusty-ipcd --no-default-features --lib --bins
