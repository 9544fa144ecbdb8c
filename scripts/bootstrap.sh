#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh Debian 12 machine (as root):
# Debian packages, the daemon's venvs, and the OMERO.web venv; with --tests
# also the other OMERO.web venvs the tests use (gunicorn 20.1, an earlier
# omero-web) and the Debian 12 and 13 root filesystems the system tests boot. Idempotent and quick when all is there.
#   .venv           the daemon on the newest PyPI releases of its libraries, plus pytest
#   .venv-debian    the daemon on Debian 12's own python3-systemd/-watchdog/-tomlkit/-structlog/-prometheus-client
#   .venv-debian13  (--tests) the daemon on Debian 13's versions of them, pinned from PyPI
#
# Each long step prints one line before it starts (what, and how long it
# usually takes the first time) and one when done; the tools' own output goes
# to log files, named when a step fails (scripts/steps.sh). Nothing reads
# standard input: it runs the same under CI, cron or ssh without a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/steps.sh
. scripts/steps.sh
tests=false
[ "${1:-}" = "--tests" ] && tests=true

APT_PACKAGES=(
    python3-venv python3-dev gcc pkg-config libsystemd-dev patchelf curl
    python3-systemd python3-watchdog python3-tomlkit python3-structlog
    python3-prometheus-client
    nginx-light redis-server
)
if [ "${1:-}" = "--tests" ]; then
    # tests/browser: Debian's chromium, driven by Playwright (nothing downloads a browser build).
    # tests/integration/test_rollout.py: a real sshd on loopback for `rollout --ssh`.
    APT_PACKAGES+=(chromium openssh-server)
fi

missing=()
for p in "${APT_PACKAGES[@]}" ${EXTRA_APT_PACKAGES:-}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Installing a daemon must not start it as a service on this machine.
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    export DEBIAN_FRONTEND=noninteractive
    step_begin apt "installing ${#missing[@]} Debian packages: ${missing[*]}" "1-3 minutes"
    step_run apt-get update -q
    step_run apt-get install -y -q --no-install-recommends "${missing[@]}"
    step_end
fi

# What each venv installs from PyPI. A venv is rebuilt when its stamp (pyproject.toml and its own list here)
# no longer matches: a library added to a list, or to pyproject's extras, reaches venvs made before it.
VENV_PIP=(-e '.[test]')  # the newest releases pyproject allows; the test extra has pytest, prometheus-client
VENV_DEBIAN_PIP=(pytest hypothesis)  # the rest, prometheus-client 0.16.0 included, from Debian (APT_PACKAGES)
VENV_DEBIAN13_PIP=(systemd-python==235 watchdog==6.0.0 tomlkit==0.13.2 structlog==25.3.0 prometheus-client==0.21.1
                   pytest hypothesis)

pip_install() { "$1/bin/pip" install --disable-pip-version-check "${@:2}"; }
stamp() { { sha256sum pyproject.toml; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1; }
fresh() { [ -x "$1/bin/pytest" ] && [ "$(cat "$1/.stamp" 2>/dev/null)" = "$(stamp "${@:2}")" ]; }

if ! fresh .venv "${VENV_PIP[@]}"; then
    step_begin venv "the daemon's venv .venv: its libraries' newest releases, pytest, hypothesis, playwright, prometheus-client" "1-2 minutes"
    step_run /usr/bin/python3 -m venv .venv
    step_run pip_install .venv "${VENV_PIP[@]}"
    stamp "${VENV_PIP[@]}" > .venv/.stamp
    step_end
fi
if ! fresh .venv-debian "${VENV_DEBIAN_PIP[@]}"; then
    step_begin venv-debian "the daemon's venv .venv-debian: Debian 12's python3-systemd, -watchdog, -tomlkit, -structlog, -prometheus-client" "under a minute"
    step_run /usr/bin/python3 -m venv --system-site-packages .venv-debian
    step_run pip_install .venv-debian --no-deps -e .
    step_run pip_install .venv-debian "${VENV_DEBIAN_PIP[@]}"
    stamp "${VENV_DEBIAN_PIP[@]}" > .venv-debian/.stamp
    step_end
fi
if $tests && ! fresh .venv-debian13 "${VENV_DEBIAN13_PIP[@]}"; then
    # Debian 13's releases of the five libraries, on this machine's Python
    # (the system tests run the packaged daemon on Debian 13's own Python).
    step_begin venv-debian13 "the daemon's venv .venv-debian13: Debian 13's systemd-python 235, watchdog 6.0, tomlkit 0.13.2, structlog 25.3, prometheus-client 0.21.1" "under a minute"
    step_run /usr/bin/python3 -m venv .venv-debian13
    step_run pip_install .venv-debian13 "${VENV_DEBIAN13_PIP[@]}"
    step_run pip_install .venv-debian13 --no-deps -e .
    stamp "${VENV_DEBIAN13_PIP[@]}" > .venv-debian13/.stamp
    step_end
fi

# Each prints its own lines, and only when it has work to do.
scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV:-/opt/omero/web/venv3}"
if $tests; then
    # Debian 12 packages gunicorn 20.1: the core daemon is tested on it too.
    scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV_GUNICORN20:-/opt/omero/web/venv-gunicorn20}" \
        scripts/omero-web-requirements-gunicorn20.txt
    # An earlier omero-web: the static-files test upgrades a running site from it.
    scripts/setup-omero-web.sh "${OMEROWEBD_TEST_VENV_PREVIOUS:-/opt/omero/web/venv-previous}" \
        scripts/omero-web-requirements-previous.txt
    # The system tests boot these; built once, then cached.
    for suite in bookworm trixie; do
        scripts/system-rootfs.sh "$suite" >/dev/null
    done
fi
