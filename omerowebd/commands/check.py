"""omerowebctl check: every validation the daemon does at start, nothing started."""

from __future__ import annotations

import argparse
import os

from .. import checks, control_client, desired, omero_config, printable, trust
from .. import config as config_module
from ..config import Config
from ..errors import ConfigErrors, UserError
from ..exits import EXIT_FAILURE, EXIT_OK


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
        return EXIT_FAILURE
    except UserError as e:
        print(f"error: {e}")
        return EXIT_FAILURE
    problems, warnings, info = checks.run_sync(config)
    foreign, note = foreign_edits(config)
    problems += foreign
    warnings += note
    for problem in problems:
        print(f"error: {problem}")
    for warning in warnings:
        print(f"warning: {warning}")
    if problems:
        return EXIT_FAILURE
    assert info is not None
    print(f"ok: {path} (omero-web {info.versions.get('omero-web', '?')}, gunicorn {info.versions.get('gunicorn', '?')})")
    return EXIT_OK


def foreign_edits(config: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings): edits of the site's config.xml that a reload of ``config`` would stop at.

    The file is the service user's: root reads it only where root owns the
    whole path (else whatever that user links there would be read and named
    by root), and otherwise asks the running daemon, which reads it as that user.
    """
    d = config.daemon
    path = omero_config.config_xml_path(d.omerodir)
    if not os.path.lexists(path):
        return [], []  # nothing there to lose
    if os.geteuid() == 0 and trust.path_problems(path, "config.xml"):
        return _foreign_edits_from_daemon(config)
    wanted = desired.properties_of(config)
    try:
        found = omero_config.foreign_edits(d.omerodir, d.state_dir, wanted, config.properties)
    except OSError as e:
        return [], [f"{path}: not compared with what omerowebd wrote: {e.strerror}"]
    if found is None or not found.lost_by(wanted, config.properties):
        return [], []
    return [f"{found.describe()}; a reload of {config.path} would stop: {found.ways_out(config.path)}"], []


def _foreign_edits_from_daemon(config: Config) -> tuple[list[str], list[str]]:
    try:
        status = control_client.request(config.daemon.runtime_dir / "control.sock", {"cmd": "status"}, timeout=10)
    except UserError:
        return [], [f"{omero_config.config_xml_path(config.daemon.omerodir)}: not compared with what omerowebd wrote"
                    " (root does not read the service user's files, and the daemon does not answer): run"
                    " `omerowebctl check` as the service user, or start the daemon"]
    # The daemon is the service user's process: its words are checked for type, never trusted to have one.
    foreign = printable.field(printable.field(status, "config_xml", dict), "foreign_edits", dict)
    if not foreign:
        return [], []
    message = printable.field(foreign, "message", str, "config.xml was edited outside omerowebd")
    fix = printable.field(foreign, "fix", str, f"see `omerowebctl status` (config file {config.path})")
    return [], [f"{message} (the daemon says); a reload stops unless {config.path} has taken them over: {fix}"]
