#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run all of it.
# Debian packages listed in scripts/debian-packages.txt are installed when missing (as root or via sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

# QEMU 7.2 (Debian bookworm's) loses pages when it migrates a TCG guest that keeps writing: its fast
# dirty-bitmap sync leaves the vCPU's cached mappings alone (fixed in QEMU 9.0, commit 03bfc2188f). On
# bookworm, QEMU comes from bookworm-backports (10.0); elsewhere from the distribution.
qemu_from=()
if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    list=/etc/apt/sources.list.d/secmig-bookworm-backports.list
    if [ ! -f "$list" ]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee "$list" >/dev/null
        $sudo apt-get update -qq
    fi
    qemu_from=(-t bookworm-backports)
fi
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
if [ "${qemu_major:-0}" -lt 9 ]; then
    echo "installing QEMU ≥ 9 ${qemu_from[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" \
        qemu-system-x86 qemu-utils
fi

mapfile -t debs < <(grep -v '^\s*#' scripts/debian-packages.txt | sed '/^\s*$/d')
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'
python3 -m ruff check src tests benchmarks
python3 -m mypy
lint-imports
python3 -m pytest -q "$@"
