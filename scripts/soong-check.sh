#!/usr/bin/env bash
# Checks every Android.bp with real Blueprint/Soong (../shared/tools/soong-check), then proves
# the check bites: copies of the project with a missing source file, a missing dependency and a
# misspelt property must each fail it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/setup.sh
. scripts/lib/setup.sh
# The check installs its own Debian packages (Go, Soong and Blueprint sources); the negative
# controls need git and sed.
need_debs git:git sed:sed
CHECK=${SOONG_CHECK:-$(cd .. && pwd)/shared/tools/soong-check/check}
[ -x "$CHECK" ] || { echo "soong-check.sh: $CHECK not found" >&2; exit 1; }
set -a
# shellcheck source=../aosp/soong-stubs.env
. aosp/soong-stubs.env
set +a
# `stdlibs` (how no_std crates name core/alloc) is newer than the 2020 Soong the check runs.
export DROP_PROPS=vendor_available,product_available,export_include_dirs,apex_available,min_sdk_version,prefer_rlib,stdlibs

"$CHECK" .

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
broken() {
    local name=$1 file=$2 from=$3 to=$4 proj="$tmp/${1// /-}/trusty-ipc"
    mkdir -p "$proj"
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$proj"
    grep -qF -- "$from" "$proj/$file" || { echo "soong-check.sh: '$from' not in $file" >&2; exit 1; }
    sed -i "s|$from|$to|" "$proj/$file"
    if "$CHECK" "$proj" >"$proj.log" 2>&1; then
        echo "soong-check.sh: the check passed a copy with $name" >&2
        exit 1
    fi
    echo "soong-check: a copy with $name fails, as it must: $(grep -m1 -i error "$proj.log")"
}
broken "a missing source" tipc/Android.bp '"src/lib.rs"' '"src/no_such_file.rs"'
broken "a missing dependency" tipc/Android.bp '"libtrusty_virtio",' '"libtrusty_virtio_typo",'
broken "an unknown property" trusty-virtio/Android.bp 'crate_name:' 'crate_nam:'
