#!/usr/bin/env bash
# Checks every Android.bp with real Blueprint/Soong (../shared/tools/soong-check) in its
# AOSP_SHAPES mode (every AOSP crate we name must exist in AOSP and is stubbed with its real
# shape: host/device variants, no_std), then proves the check bites: copies of the project with
# a missing source file, a missing dependency, a misspelt property, and a host module depending
# on a device-only AOSP crate must each fail it. Also that no shipped module links test code
# (scripts/lib/shipped-deps.pl), with its own negative control.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
# The check installs its own Debian packages (Go, Soong and Blueprint sources); the negative
# controls need git, sed and perl.
need_debs git:git sed:sed perl:perl-base
# ../shared beside the repository (or beside a worktree's parent directory).
CHECK=${SOONG_CHECK:-$(cd .. && pwd)/shared/tools/soong-check/check}
[ -x "$CHECK" ] || [ -n "${SOONG_CHECK:-}" ] || CHECK=$(cd ../.. && pwd)/shared/tools/soong-check/check
[ -x "$CHECK" ] || { echo "soong-check.sh: $CHECK not found" >&2; exit 1; }
set -a
# shellcheck source=../aosp/soong-stubs.env
. aosp/soong-stubs.env
set +a
export AOSP_SHAPES=1
# Properties newer than the 2020 Soong the check runs: `stdlibs` (how no_std crates name core
# and alloc) and the license properties (2021). Their values go unchecked.
export DROP_PROPS=vendor_available,product_available,export_include_dirs,apex_available,min_sdk_version,prefer_rlib,stdlibs,default_applicable_licenses,license_kinds,license_text

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A copy of the project as the check sees it. 2020 Soong has no `license` module type, so the
# copy's license module becomes a filegroup of the same name and visibility (its kinds and text
# are dropped above): the rest of every file is analysed as written.
copy() {
    local proj=$1
    mkdir -p "$proj"
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$proj"
    grep -q '^license {' "$proj/Android.bp" || { echo "soong-check.sh: no license module in Android.bp" >&2; exit 1; }
    sed -i 's/^license {/filegroup {/' "$proj/Android.bp"
}
copy "$tmp/ok/trusty-ipc"
"$CHECK" "$tmp/ok/trusty-ipc"

# Soong cannot see Cargo features: that the shipped modules (built without `sim`) link no test
# code (the model, the platform profiles, the test crates) is checked on the module graph.
shipped=(libtrusty_platform libtrusty_virtio libtipc libtrusty_stack libtrusty_capi libtrusty_ipcd trusty-ipcd)
test_code=(libtrusty_model libplatforms libtipc_test libtipc_test_cases)
perl scripts/lib/shipped-deps.pl "$tmp/ok/trusty-ipc" "${shipped[@]}" -- "${test_code[@]}"
echo "shipped-deps: no shipped module (${shipped[*]}) links test code (${test_code[*]})"
proj=$tmp/shipped-model/trusty-ipc
copy "$proj"
FROM='"liblibc",' perl -0pi -e 's/\Q$ENV{FROM}\E/"liblibc",\n        "libtrusty_model",/' "$proj/aosp/trusty-ipcd/Android.bp"
grep -q '"libtrusty_model"' "$proj/aosp/trusty-ipcd/Android.bp" || { echo "soong-check.sh: control not applied" >&2; exit 1; }
if perl scripts/lib/shipped-deps.pl "$proj" "${shipped[@]}" -- "${test_code[@]}" 2>"$proj.log"; then
    echo "soong-check.sh: shipped-deps passed a copy where trusty-ipcd links the model" >&2
    exit 1
fi
echo "shipped-deps: a copy where trusty-ipcd links the model fails, as it must: $(head -1 "$proj.log")"

broken() {
    local name=$1 file=$2 from=$3 to=$4 proj="$tmp/${1// /-}/trusty-ipc"
    copy "$proj"
    grep -qF -- "$from" "$proj/$file" || { echo "soong-check.sh: '$from' not in $file" >&2; exit 1; }
    # Literal text, first occurrence on each line (perl's \Q: no regex characters in `from`).
    cp "$proj/$file" "$proj.before"
    FROM=$from TO=$to perl -pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$proj/$file"
    ! cmp -s "$proj.before" "$proj/$file" || { echo "soong-check.sh: '$from' not replaced in $file" >&2; exit 1; }
    if "$CHECK" "$proj" >"$proj.log" 2>&1; then
        echo "soong-check.sh: the check passed a copy with $name" >&2
        exit 1
    fi
    echo "soong-check: a copy with $name fails, as it must: $(grep -m1 -i error "$proj.log")"
}
broken "a missing source" tipc/Android.bp '"src/lib.rs"' '"src/no_such_file.rs"'
broken "a missing dependency" tipc/Android.bp '"libtrusty_virtio",' '"libtrusty_virtio_typo",'
broken "an unknown property" trusty-virtio/Android.bp 'crate_name:' 'crate_nam:'
# libtipc is host_supported; AOSP's liblog_rust_nostd has no host variant.
broken "a host module on a device-only AOSP crate" tipc/Android.bp '"liblog_rust",' '"liblog_rust_nostd",'
# Visibility is enforced: with every module private to its own directory, the modules that use
# the (project-private) Trusty model from other directories fail.
broken "private test crates" Android.bp 'default_visibility: [":__subpackages__"]' 'default_visibility: ["//visibility:private"]'
