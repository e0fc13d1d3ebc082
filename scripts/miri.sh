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

# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
# A dated nightly, so that a fresh machine gets the same Miri (a nightly without the miri
# component would otherwise fail on the day it is published).
NIGHTLY=${NIGHTLY:-$(cat scripts/nightly-toolchain)}

step "toolchain: $NIGHTLY with miri"
need_toolchain "$NIGHTLY"
need_rust_component miri "$NIGHTLY"
need_rust_component rust-src "$NIGHTLY"
cargo "+$NIGHTLY" miri setup

# The tests hand Miri integer "physical" addresses that are really pointers (the host stands in
# for DMA): permissive provenance accepts those casts without a warning per test.
export MIRIFLAGS="${MIRIFLAGS:-} -Zmiri-permissive-provenance"
# Miri keeps its own target directory, so the normal build is left alone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri-$NIGHTLY"

step "miri: trusty-virtio vrings (driver and device ends, hostile indices)"
# trusty-virtio/tests/ring_memory.rs: both ends of a ring on one allocation, a hostile device
# writing raw used entries, a full queue and kick suppression.
cargo "+$NIGHTLY" miri test --locked -p trusty-virtio --test ring_memory
# vring.rs's own unit tests: both ends, hostile indices, a full queue and kick suppression.
cargo "+$NIGHTLY" miri test --locked -p trusty-virtio --lib vring::

step "miri: platform raw-memory helpers (shared buffers, FF-A RX/TX, grant table)"
# Leaks are expected here: the FF-A tests drop sharers without closing them (their RX/TX pages
# belong to the test's allocator; an unclosed sharer leaks them by design) and forget sharers on
# purpose to play a run that never tore down. Undefined behaviour still fails the step.
MIRIFLAGS="$MIRIFLAGS -Zmiri-ignore-leaks" \
    cargo "+$NIGHTLY" miri test --locked -p trusty-platform --lib -- mem::tests ffa::tests xen::grant::tests

step "miri: the model's raw physical memory, its direct mappings of guest RAM, its ready queue"
cargo "+$NIGHTLY" miri test --locked -p trusty-model --features std --lib -- raw:: mem::tests ipc::ready

echo "miri: no undefined behaviour found"
