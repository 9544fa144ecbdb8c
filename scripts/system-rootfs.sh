#!/bin/bash
# Build (once) and print the path of a Debian root filesystem that the
# system tests boot with systemd-nspawn.
#
#   scripts/system-rootfs.sh [SUITE]            print the cached rootfs, building it if needed
#   scripts/system-rootfs.sh --rebuild [SUITE]  throw the cache away first
#
# SUITE: bookworm (Debian 12, the default) or trixie (Debian 13).
#
# The rootfs is cached under $OMEROWEBD_TEST_CACHE (default
# /var/cache/omerowebd-tests), in a directory named after the suite and a
# hash of this script, so editing the package list below builds a new one
# and the old one of that suite is removed (unless a test run still boots
# it). Tests never boot the cached tree itself: they boot an overlay on top
# of it and throw the overlay away.
#
# Needs root, debootstrap and systemd-container (installed if missing).
# Progress and debootstrap's own output go to stderr; stdout is the path.
set -euo pipefail

rebuild=false
if [[ ${1:-} == --rebuild ]]; then
    rebuild=true
    shift
fi
SUITE=${1:-bookworm}

# What the container needs beyond minbase: systemd as PID 1, and the
# runtime dependencies of the omerowebd .deb, so that installing the .deb
# inside the container needs no network. nginx for the nginx reload units,
# rpm to run the RPM's scriptlets under real systemd.
PACKAGES=(
    systemd systemd-sysv dbus
    python3 python3-systemd python3-watchdog python3-tomlkit python3-structlog
    rpm
)
case $SUITE in
    # Debian 13 has one nginx package (nginx-light is only a transition to it).
    bookworm) PACKAGES+=(nginx-light); first_time="1-2 minutes" ;;
    trixie) PACKAGES+=(nginx); first_time="2-8 minutes" ;;
    *) echo "system-rootfs.sh: unknown suite '$SUITE' (bookworm or trixie)" >&2; exit 2 ;;
esac

cache=${OMEROWEBD_TEST_CACHE:-/var/cache/omerowebd-tests}
key=$(sha256sum "$0" | cut -c1-12)
rootfs=$cache/rootfs-$SUITE-$key

if $rebuild; then
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
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" </dev/null >/dev/null
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Someone else may have built it while we waited for the lock.
if [[ -f $rootfs/.complete ]]; then
    echo "$rootfs"
    exit 0
fi

# Use the Debian mirror this machine's apt already uses (for any suite: a
# mirror carries them all), so the build goes where apt goes; without one,
# debootstrap picks its own default.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 2>/dev/null |
    awk '$3 == "Debian" && $2 !~ /-(security|updates|backports)$/ && $1 !~ /security/ { print $1; exit }' || true)

tmp=$cache/.build-$$
rm -rf --one-file-system "$tmp"
trap 'rm -rf --one-file-system "$tmp"' EXIT
include=$(IFS=,; echo "${PACKAGES[*]}")
echo "system-rootfs.sh: debootstrap $SUITE into $tmp (usually $first_time the first time)" >&2
started=$SECONDS
log=$cache/debootstrap-$SUITE.log
if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" ${mirror:+"$mirror"} >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "system-rootfs.sh: debootstrap $SUITE failed; its whole output is in $log" >&2
    exit 1
fi

# The container shares the host's network: nginx must not grab port 80 at
# boot. Tests start it on a loopback port of their choosing.
rm -f "$tmp/etc/nginx/sites-enabled/default"
systemctl --root="$tmp" disable nginx.service >>"$log" 2>&1 || true
# Nothing in the container needs a login prompt or the network set up.
systemctl --root="$tmp" mask console-getty.service getty@tty1.service \
    systemd-networkd.service systemd-networkd.socket systemd-resolved.service \
    apt-daily.timer apt-daily-upgrade.timer >>"$log" 2>&1 || true
# Keep the journal small and in memory.
mkdir -p "$tmp/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' >"$tmp/etc/systemd/journald.conf.d/test.conf"
echo omerowebd-test >"$tmp/etc/hostname"
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
touch "$tmp/.complete"

# Older trees of this suite go, except one a test run still boots (the
# lower layer of a mounted overlay): that run would lose its container.
for old in "$cache"/rootfs-"$SUITE"-*; do
    [[ -d $old && $old != "$rootfs" ]] || continue
    if grep -qF "lowerdir=$old," /proc/self/mountinfo; then
        echo "system-rootfs.sh: keeping $old, a running test boots it (remove it later)" >&2
        continue
    fi
    rm -rf --one-file-system "$old"
done
mv "$tmp" "$rootfs"
trap - EXIT
echo "system-rootfs.sh: $SUITE ready in $((SECONDS - started))s: $rootfs" >&2
echo "$rootfs"
