#!/usr/bin/env bash
# Builds an OMERO.web virtualenv the way the OMERO install walkthroughs lay it
# out: VENV (default /opt/omero/web/venv3) with omero-web and gunicorn, as
# pinned in REQUIREMENTS (default scripts/omero-web-requirements.txt).
# Usage: setup-omero-web.sh [VENV [REQUIREMENTS]]
#
# OMERO.web needs zeroc-ice 3.6.5, which builds only on Python 3.10. The
# machines this project targets have pyenv's 3.10 under root's home, which a
# service user cannot reach; so a copy of it is made world-readable at
# PY310_HOME (default /opt/omero/python3.10), with its library path made
# relative, and the venv is built on that copy. Idempotent: an existing,
# complete venv is left as it is.
set -euo pipefail

VENV=${1:-${OMERO_WEB_VENV:-/opt/omero/web/venv3}}
PY310_HOME=${PY310_HOME:-/opt/omero/python3.10}
here=$(cd "$(dirname "$0")" && pwd)
requirements=${2:-"$here/omero-web-requirements.txt"}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import omeroweb, gunicorn' 2>/dev/null \
   && cmp -s "$requirements" "$VENV/.omerowebd-requirements"; then
    exit 0
fi

if [ ! -x "$PY310_HOME/bin/python3.10" ]; then
    src=""
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.* "$(command -v pyenv >/dev/null && pyenv root)"/versions/3.10.*; do
        [ -x "$candidate/bin/python3.10" ] && src=$candidate
    done
    if [ -z "$src" ]; then
        echo "setup-omero-web: no Python 3.10 found (pyenv install 3.10)" >&2
        exit 1
    fi
    command -v patchelf >/dev/null || apt-get install -y -q patchelf >/dev/null
    mkdir -p "$(dirname "$PY310_HOME")"
    rm -rf "$PY310_HOME.tmp"
    cp -a "$src" "$PY310_HOME.tmp"
    # pyenv links python against its own libpython by absolute path under
    # root's home; make it relative so the copy stands on its own.
    patchelf --set-rpath '$ORIGIN/../lib' "$PY310_HOME.tmp/bin/python3.10"
    chmod -R a+rX "$PY310_HOME.tmp"
    mv "$PY310_HOME.tmp" "$PY310_HOME"
fi

rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY310_HOME/bin/python3.10" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$requirements"
chmod -R a+rX "$VENV"
cp "$requirements" "$VENV/.omerowebd-requirements"
echo "setup-omero-web: $VENV ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("omero-web", m.version("omero-web"), "gunicorn", m.version("gunicorn"))'))"
