#!/bin/bash
# Install the Debian tools the system tests (tests/system/) use: the .deb
# build and lintian, rpmbuild, systemd-analyze, systemd-nspawn and
# debootstrap, and the daemon's Debian dependencies (so that the package's
# Python code can be imported by the system python3 too). Idempotent: does
# nothing when all are there.
set -euo pipefail

packages=(
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
    python3-build python3-installer python3-wheel
    lintian rpm fakeroot
    systemd systemd-container debootstrap
    python3-systemd python3-watchdog python3-tomlkit python3-structlog
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) != 0 ]]; then
    echo "system-deps.sh: missing ${missing[*]}; run as root to install them" >&2
    exit 1
fi
echo "system-deps.sh: installing ${missing[*]}" >&2
apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
