"""omerowebctl check: every validation the daemon does at start, nothing started."""

from __future__ import annotations

import argparse

from .. import checks
from .. import config as config_module
from ..errors import ConfigErrors, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate the config and the venv; exit 0 or 1",
                       description="Run every check the daemon runs at start (file, types, paths, the venv) "
                       "without starting anything. One line per problem.")
    p.add_argument("file", nargs="?", help="the TOML file (default: --config, $OMEROWEBD_CONFIG, or the packaged path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = config_module.config_path(args.file or args.config)
    try:
        config = config_module.load(path)
    except ConfigErrors as e:
        for problem in e.problems:
            print(f"error: {problem}")
        return 1
    except UserError as e:
        print(f"error: {e}")
        return 1
    problems, warnings, info = checks.run_sync(config)
    for problem in problems:
        print(f"error: {problem}")
    for warning in warnings:
        print(f"warning: {warning}")
    if problems:
        return 1
    assert info is not None
    print(f"ok: {path} (omero-web {info.versions.get('omero-web', '?')}, gunicorn {info.versions.get('gunicorn', '?')})")
    return 0
