#!/usr/bin/env bash
# The project's test command: installs what it needs, then builds and runs everything.
# CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh

step "toolchain: aarch64-unknown-none target and clippy"
need_rust_target aarch64-unknown-none
need_rust_component clippy

step "unit, integration and conformance tests (host)"
cargo test --workspace --locked

step "no_std crates build for aarch64-unknown-none"
cargo build --locked -p trusty-platform -p trusty-virtio -p tipc -p trusty-stack -p trusty-model -p tipc-test-cases --target aarch64-unknown-none
cargo clippy --locked -p baremetal -p baremetal-hello -p qemu-images --target aarch64-unknown-none -- -D warnings

step "clippy, warnings are errors"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "Miri over the ring and raw-memory unit tests (installs a dated nightly with miri)"
scripts/miri.sh

step "fuzz every parser of peer-written memory for a bounded time from the committed seeds"
FUZZ_SECONDS=${FUZZ_SECONDS:-15} scripts/fuzz.sh

step "Android: every Android.bp through real Blueprint/Soong, with negative controls"
scripts/soong-check.sh

step "Android: AOSP's default lint set (Soong rust/config/lints.go) on every shipped crate"
scripts/aosp-lints.sh

step "Android: the shipped crates with the oldest supported AOSP release's Rust (rust-version)"
scripts/aosp-rust.sh

step "emulation: the bare-metal runtime, the stack as a Xen DomU and at NS-EL1, and in a Linux DomU next to the Trusty VM, under QEMU"
tests/baremetal/hello/run.sh
tests/qemu/run.sh xen-trusty-vm-broken linux-domu-rendezvous
tests/qemu/run.sh all

step "trusty-ipcd end to end: the daemon, tipc-test through its socket, the bench"
cargo build --locked --release -p trusty-ipcd -p tipc-test
sock=$(mktemp -u /tmp/trusty-ipcd-test.XXXXXX.sock)
TRUSTY_IPCD_LOG=warn ./target/release/trusty-ipcd --socket "$sock" --vsock-port 0 --foreground &
ipcd=$!
trap 'kill $ipcd 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
./target/release/tipc-test -D "$sock" -t all -s
kill "$ipcd"
wait "$ipcd"
trap - EXIT
./target/release/ipcd-bench -n 2000

step "the main job: tipc-test -t all, model inside the call and on its own thread"
cargo build --locked --release -p tipc-test
./target/release/tipc-test -D sim-threaded -t all -s
./target/release/tipc-test -t echo -r 1000 -m 4000 -s
./target/release/tipc-test --platform xen-domu-ffa-mediator -D sim-threaded -t all -s
./target/release/tipc-test --platform xen-domu-trusty-vm -t all -s
./target/release/tipc-test -D sim-cores -t all -s
./target/release/tipc-test --platform xen-domu-trusty-vm -D sim-cores -t all -s

step "bench smoke run (checks that it runs and its JSON keys, not timings)"
cargo build --locked --release -p tipc-bench
bench_json=$(./target/release/tipc-bench --quick --json)
for key in reference.cacheline_rtt_ns reference.memcpy_ns.4000 echo.sim.16.p50_ns echo.cores.4000.p99_ns \
    stream.cores.4000.mb_s echo.stack.16.p50_ns echo.stack.4000.p99_ns stream.stack.4000.mb_s \
    echo.stack-cores.16.p50_ns stream.stack-cores.4000.mb_s echo.cores.16.ratio echo.cores.16.ref_rtt_ns \
    echo.cores.16.stable echo.cores.16.chunks_kept echo.cores.16.split.request_ns \
    echo.stack-cores.4000.split.serve_ns transport.mailbox_call_ns reference.echo_floor_ns calls_per_echo \
    allocs_per_message; do
    grep -q "\"$key\"" <<<"$bench_json" || { echo "tipc-bench --json lacks $key" >&2; exit 1; }
done
./target/release/tipc-test -D sim -t all

