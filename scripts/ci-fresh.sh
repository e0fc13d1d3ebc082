#!/usr/bin/env bash
# CI runs on a machine that earlier sessions used, so a missing install step can hide behind
# what they left. This undoes the machine-wide traces the test command's own installs leave,
# so that every run takes the fresh-machine path again:
#  - dpkg's arm64 architecture (needed to download Xen's arm64 package) is removed when no
#    arm64 package is installed (we only ever download and unpack them);
#  - cached or downloaded Xen packages outside the clone are removed;
# and it checks that every script the test command runs takes its tools from the shared install
# step (scripts/lib/setup.sh) rather than from what an earlier script installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) = 0 ]] && dpkg --print-foreign-architectures | grep -qx arm64; then
    if dpkg-query -W -f '${Architecture}\n' 2>/dev/null | grep -qx arm64; then
        echo "ci-fresh: arm64 packages are installed; leaving dpkg's arm64 architecture in place"
    else
        echo "ci-fresh: dpkg --remove-architecture arm64"
        dpkg --remove-architecture arm64
    fi
fi
rm -rf /tmp/xendl

# Every shell script the test command runs must source the shared install step.
scripts=$(grep -oE '(scripts|tests)/[A-Za-z0-9_/.-]+\.sh' scripts/test.sh | sort -u)
bad=0
for s in $scripts; do
    [[ -f $s ]] || { echo "ci-fresh: scripts/test.sh runs $s, which does not exist" >&2; bad=1; continue; }
    case $s in scripts/lib/*) continue ;; esac
    if ! grep -qE '^[^#]*\. .*scripts/lib/setup\.sh|^[^#]*\. lib/setup\.sh|^[^#]*\. "\$\(dirname "\$0"\)/lib/setup\.sh"' "$s"; then
        echo "ci-fresh: $s does not source scripts/lib/setup.sh (the shared install step)" >&2
        bad=1
    fi
done
((bad == 0)) || exit 1
echo "ci-fresh: $(wc -w <<<"$scripts") scripts of the test command use the shared install step"
