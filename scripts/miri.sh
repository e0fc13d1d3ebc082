#!/usr/bin/env bash
# Runs Miri (nightly) over the unit tests of the code that touches raw memory: the driver and
# device ends of the vrings (trusty-virtio's vring tests), the platform's shared-buffer, FF-A
# RX/TX and grant-table helpers, and the model's raw physical-memory accessor. Installs the
# nightly toolchain and its miri component itself.
#
#   scripts/miri.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain: nightly with miri"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    rustup component add --toolchain nightly miri rust-src
fi
cargo +nightly miri setup

# The tests hand Miri integer "physical" addresses that are really pointers (the host stands in
# for DMA): permissive provenance accepts those casts without a warning per test.
export MIRIFLAGS="${MIRIFLAGS:-} -Zmiri-permissive-provenance"
# Miri keeps its own target directory, so the normal build is left alone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri"

step "miri: trusty-virtio vrings (driver and device ends, hostile indices)"
cargo +nightly miri test --locked -p trusty-virtio --lib vring::

step "miri: platform raw-memory helpers (shared buffers, FF-A RX/TX, grant table)"
cargo +nightly miri test --locked -p trusty-platform --lib -- mem::tests ffa::tests xen::grant::tests

step "miri: the model's raw physical memory"
cargo +nightly miri test --locked -p trusty-model --lib raw::

echo "miri: no undefined behaviour found"
