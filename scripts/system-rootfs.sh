#!/bin/bash
# Build (once) and print the path of the Debian 12 root filesystem that the
# system tests boot with systemd-nspawn.
#
#   scripts/system-rootfs.sh            print the cached rootfs, building it if needed
#   scripts/system-rootfs.sh --rebuild  throw the cache away first
#
# The rootfs is cached under $OMEROWEBD_TEST_CACHE (default
# /var/cache/omerowebd-tests), in a directory named after a hash of this
# script, so editing the package list below builds a new one and the old
# one is removed. Tests never boot the cached tree itself: they boot an
# overlay on top of it and throw the overlay away.
#
# Needs root, debootstrap and systemd-container (installed if missing).
set -euo pipefail

# What the container needs beyond minbase: systemd as PID 1, and the
# runtime dependencies of the omerowebd .deb, so that installing the .deb
# inside the container needs no network. nginx for the nginx reload units,
# rpm to run the RPM's scriptlets under real systemd.
PACKAGES=(
    systemd systemd-sysv dbus
    python3 python3-systemd python3-watchdog python3-tomlkit python3-structlog
    nginx-light rpm
)
SUITE=bookworm

cache=${OMEROWEBD_TEST_CACHE:-/var/cache/omerowebd-tests}
key=$(sha256sum "$0" | cut -c1-12)
rootfs=$cache/rootfs-$SUITE-$key

if [[ ${1:-} == --rebuild ]]; then
    rm -rf --one-file-system "$rootfs"
fi

if [[ -f $rootfs/.complete ]]; then
    echo "$rootfs"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    echo "system-rootfs.sh: must run as root (debootstrap)" >&2
    exit 1
fi

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if ((${#need[@]})); then
    echo "system-rootfs.sh: installing ${need[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Someone else may have built it while we waited for the lock.
if [[ -f $rootfs/.complete ]]; then
    echo "$rootfs"
    exit 0
fi

# Use the mirror this machine's apt already uses, so the build goes where
# apt goes; without one, debootstrap picks its own default.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v s="$SUITE" '$2 == s && $1 !~ /security/ { print $1; exit }' || true)

tmp=$cache/.build-$$
rm -rf --one-file-system "$tmp"
trap 'rm -rf --one-file-system "$tmp"' EXIT
include=$(IFS=,; echo "${PACKAGES[*]}")
echo "system-rootfs.sh: debootstrap $SUITE into $tmp (about a minute)" >&2
debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" ${mirror:+"$mirror"} >&2

# The container shares the host's network: nginx must not grab port 80 at
# boot. Tests start it on a loopback port of their choosing.
rm -f "$tmp/etc/nginx/sites-enabled/default"
systemctl --root="$tmp" disable nginx.service >&2 || true
# Nothing in the container needs a login prompt or the network set up.
systemctl --root="$tmp" mask console-getty.service getty@tty1.service \
    systemd-networkd.service systemd-networkd.socket systemd-resolved.service \
    apt-daily.timer apt-daily-upgrade.timer >&2 || true
# Keep the journal small and in memory.
mkdir -p "$tmp/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' >"$tmp/etc/systemd/journald.conf.d/test.conf"
echo omerowebd-test >"$tmp/etc/hostname"
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
touch "$tmp/.complete"

for old in "$cache"/rootfs-*; do
    [[ $old == "$rootfs" ]] || rm -rf --one-file-system "$old"
done
mv "$tmp" "$rootfs"
trap - EXIT
echo "$rootfs"
