#!/usr/bin/env bash
# omerowebd serving real OMERO.web on http://127.0.0.1:4080/webclient/login/,
# in the foreground (Ctrl-C stops it cleanly). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p /opt/omero/web/omero-web
echo "omerowebd: serving on http://127.0.0.1:4080/webclient/login/ once READY is logged (Ctrl-C to stop)"
exec .venv/bin/omerowebd --config examples/demo.toml
