#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run all of it.
# Debian packages listed in scripts/debian-packages.txt are installed when missing (as root or via sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t debs < <(grep -v '^\s*#' scripts/debian-packages.txt | sed '/^\s*$/d')
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'
python3 -m ruff check src tests benchmarks
python3 -m mypy
lint-imports
python3 -m pytest -q "$@"
