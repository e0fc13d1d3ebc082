#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/fuzz_targets for a bounded time, starting from the
# committed seeds in fuzz/seeds, and fails on any crash. Installs what it needs itself: the
# nightly toolchain (cargo-fuzz builds with sanitizers) and cargo-fuzz.
#
#   scripts/fuzz.sh              every target, FUZZ_SECONDS (default 15) each
#   scripts/fuzz.sh rsc_parse    one target
#
# The committed seeds are only read: new inputs go to a scratch corpus that is thrown away.
# A crash leaves its input under fuzz/artifacts/<target>/ (git-ignored) and the script stops
# with libFuzzer's status.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${FUZZ_SECONDS:-15}

step() { printf '\n==> %s\n' "$*"; }

# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
# A dated nightly (cargo-fuzz builds with sanitizer flags only nightly takes), the same one
# scripts/miri.sh uses.
NIGHTLY=${NIGHTLY:-$(cat scripts/nightly-toolchain)}

step "toolchain: $NIGHTLY and cargo-fuzz"
need_toolchain "$NIGHTLY"
need_cargo_tool cargo-fuzz cargo-fuzz

cd fuzz
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$NIGHTLY" fuzz list)
fi
[ "${#targets[@]}" -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }

step "build every target once (release, address sanitizer)"
cargo "+$NIGHTLY" fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    if [ ! -d "seeds/$t" ]; then
        echo "fuzz target $t has no committed seeds (fuzz/seeds/$t)" >&2
        exit 1
    fi
    step "fuzz $t for ${SECONDS_PER_TARGET}s from fuzz/seeds/$t"
    mkdir -p "$scratch/$t"
    # First corpus directory: where libFuzzer writes new inputs (scratch); the seeds are read.
    if ! cargo "+$NIGHTLY" fuzz run "$t" "$scratch/$t" "seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1; then
        echo "FUZZ FAILURE: $t (the crashing input is under fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz targets that crashed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} target(s), ${SECONDS_PER_TARGET}s each, no crash"
