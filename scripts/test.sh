#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs
# the unit tests on Debian 12's and Debian 13's library versions and everything
# on the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
export OMEROWEBD_TEST_VENV=${OMEROWEBD_TEST_VENV:-/opt/omero/web/venv3}
echo "== unit tests and the core daemon on Debian 12's python3-systemd, -watchdog, -tomlkit, -structlog"
.venv-debian/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration/test_daemon.py "$@"
echo "== unit tests on Debian 13's python3-systemd 235, -watchdog 6.0, -tomlkit 0.13.2, -structlog 25.3"
.venv-debian13/bin/python -m pytest -q -p no:cacheprovider tests/unit "$@"
echo "== the whole suite on the newest releases"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
