#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh Debian 12 machine (as root):
# Debian packages, the daemon's venvs, and the OMERO.web venv (with --tests, a
# second one on gunicorn 20.1 and a third with an earlier omero-web). Idempotent and quick when all is already there.
#   .venv         the daemon on the newest PyPI releases of its libraries, plus pytest
#   .venv-debian  the daemon on Debian 12's own python3-systemd/-watchdog/-tomlkit/-structlog
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-venv python3-dev gcc pkg-config libsystemd-dev patchelf curl
    python3-systemd python3-watchdog python3-tomlkit python3-structlog
    nginx-light redis-server
)
if [ "${1:-}" = "--tests" ]; then
    # tests/browser: Debian's chromium, driven by Playwright (nothing downloads a browser build).
    APT_PACKAGES+=(chromium)
fi

missing=()
for p in "${APT_PACKAGES[@]}" ${EXTRA_APT_PACKAGES:-}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Installing a daemon must not start it as a service on this machine.
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp() { sha256sum pyproject.toml | cut -d' ' -f1; }
if [ ! -x .venv/bin/pytest ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$(stamp)" ]; then
    /usr/bin/python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    stamp > .venv/.stamp
fi
if [ ! -x .venv-debian/bin/pytest ] || [ "$(cat .venv-debian/.stamp 2>/dev/null)" != "$(stamp)" ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv-debian
    .venv-debian/bin/pip install -q --disable-pip-version-check --no-deps -e .
    .venv-debian/bin/pip install -q --disable-pip-version-check pytest
    stamp > .venv-debian/.stamp
fi

scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV:-/opt/omero/web/venv3}"
if [ "${1:-}" = "--tests" ]; then
    # Debian 12 packages gunicorn 20.1: the core daemon is tested on it too.
    scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV_GUNICORN20:-/opt/omero/web/venv-gunicorn20}" \
        scripts/omero-web-requirements-gunicorn20.txt
    # An earlier omero-web: the static-files test upgrades a running site from it.
    scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV_PREVIOUS:-/opt/omero/web/venv-previous}" \
        scripts/omero-web-requirements-previous.txt
fi
