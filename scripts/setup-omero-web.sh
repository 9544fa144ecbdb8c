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
# relative, and the venv is built on that copy.
#
# zeroc-ice is compiled once per machine, into a wheel kept in WHEELHOUSE
# (default /var/cache/omerowebd/wheels); every venv installs it from there in
# seconds. (pip 23.0 in a Python 3.10 venv installs a source package with
# `setup.py install` when `wheel` is missing, which caches nothing: each venv
# would compile it again, for minutes.)
#
# Idempotent: an existing, complete venv built from the same REQUIREMENTS is
# left as it is; one this script built from other REQUIREMENTS is updated in
# place (pip installs what they add or change, e.g. an extra such as
# omero-web[redis]), so that the processes running from it keep their files;
# a pin dropped from REQUIREMENTS stays installed (remove the venv to drop it). Each long step prints a line before and after; pip's output
# goes to a log file, named if it fails (see scripts/steps.sh).
set -euo pipefail

VENV=${1:-${OMERO_WEB_VENV:-/opt/omero/web/venv3}}
PY310_HOME=${PY310_HOME:-/opt/omero/python3.10}
WHEELHOUSE=${OMERO_WEB_WHEELHOUSE:-/var/cache/omerowebd/wheels}
ICE=zeroc-ice==3.6.5  # what omero-py needs (>=3.6.5,<3.7): the one release of 3.6.5
here=$(cd "$(dirname "$0")" && pwd)
requirements=${2:-"$here/omero-web-requirements.txt"}
# shellcheck source=scripts/steps.sh
. "$here/steps.sh"
name=$(basename "$VENV")

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import omeroweb, gunicorn' 2>/dev/null \
   && cmp -s "$requirements" "$VENV/.omerowebd-requirements"; then
    exit 0
fi
if [ ! -r "$requirements" ]; then
    echo "setup-omero-web: cannot read the requirements file $requirements" >&2
    exit 1
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
    step_begin python3.10 "copying Python 3.10 from $src to $PY310_HOME, readable by every user" "seconds"
    command -v patchelf >/dev/null || step_run apt-get install -y -q patchelf
    mkdir -p "$(dirname "$PY310_HOME")"
    rm -rf "$PY310_HOME.tmp"
    step_run cp -a "$src" "$PY310_HOME.tmp"
    # pyenv links python against its own libpython by absolute path under
    # root's home; make it relative so the copy stands on its own.
    step_run patchelf --set-rpath '$ORIGIN/../lib' "$PY310_HOME.tmp/bin/python3.10"
    chmod -R a+rX "$PY310_HOME.tmp"
    mv "$PY310_HOME.tmp" "$PY310_HOME"
    step_end
fi

ice_wheel() { compgen -G "$WHEELHOUSE/zeroc_ice-3.6.5-*.whl" >/dev/null; }
if ! ice_wheel; then
    step_begin zeroc-ice "compiling zeroc-ice into a wheel in $WHEELHOUSE, once for this machine" "5-8 minutes"
    build=$(mktemp -d /var/tmp/omerowebd-ice.XXXXXX)
    trap 'rm -rf "$build"' EXIT
    step_run "$PY310_HOME/bin/python3.10" -m venv "$build/venv"
    step_run "$build/venv/bin/pip" install --disable-pip-version-check wheel
    step_run "$build/venv/bin/pip" wheel --disable-pip-version-check --no-deps -w "$build/wheels" "$ICE"
    mkdir -p "$WHEELHOUSE"
    # Complete or not there: another run may be looking for it.
    for w in "$build"/wheels/zeroc_ice-*.whl; do
        cp "$w" "$WHEELHOUSE/.$(basename "$w").tmp" && mv "$WHEELHOUSE/.$(basename "$w").tmp" "$WHEELHOUSE/$(basename "$w")"
    done
    rm -rf "$build"
    trap - EXIT
    ice_wheel || { echo "setup-omero-web: pip built no zeroc-ice wheel (see $step_log)" >&2; exit 1; }
    step_end
fi

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import omeroweb, gunicorn' 2>/dev/null \
   && [ -f "$VENV/.omerowebd-requirements" ]; then
    step_begin "venv-$name" "updating the OMERO.web venv $VENV to $(basename "$requirements")" "under a minute"
    step_run "$VENV/bin/pip" install --disable-pip-version-check --find-links "$WHEELHOUSE" "$ICE" -r "$requirements"
    chmod -R a+rX "$VENV"
    cp "$requirements" "$VENV/.omerowebd-requirements"
    step_end
else
    step_begin "venv-$name" "building the OMERO.web venv $VENV from $(basename "$requirements")" "1-3 minutes"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    step_run "$PY310_HOME/bin/python3.10" -m venv "$VENV"
    step_run "$VENV/bin/pip" install --disable-pip-version-check --find-links "$WHEELHOUSE" "$ICE" -r "$requirements"
    chmod -R a+rX "$VENV"
    cp "$requirements" "$VENV/.omerowebd-requirements"
    step_end
fi
echo "setup-omero-web: $VENV ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("omero-web", m.version("omero-web"), "gunicorn", m.version("gunicorn"))'))"
