#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs
# the unit tests on Debian 12's library versions and everything on the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
export OMEROWEBD_TEST_VENV=${OMEROWEBD_TEST_VENV:-/opt/omero/web/venv3}
echo "== unit tests and the core daemon on Debian 12's python3-systemd, -watchdog, -tomlkit, -structlog"
.venv-debian/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration/test_daemon.py "$@"
echo "== the whole suite on the newest releases"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
