"""omerowebctl sessions clear|status: sweep expired sessions now, or show the sweeper."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .. import control_client, desired, printable, progress, sessions, status_lines, trust
from ..config import SessionsSettings
from ..errors import UserError
from ..exits import EXIT_FAILURE, EXIT_OK
from ..venv import probe_sync
from . import load_config, socket_path

EXIT_SWEEP_FAILED = EXIT_FAILURE
DEFAULT_SWEEP_TIMEOUT = SessionsSettings.__dataclass_fields__["timeout"].default


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sessions", help="sweep expired OMERO.web sessions now, or show the sweeper",
        description="Sessions of Django's file store are swept by omerowebd itself (exactly what Django's "
        "clearsessions deletes, much faster); database stores by Django's clearsessions; cache stores need "
        "nothing.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    clear = verbs.add_parser(
        "clear", help="sweep now and print scanned / deleted / kept / errors / duration",
        description="Ask the running daemon to sweep now (after a sweep in progress, if any); without a "
        "running daemon, sweep directly with the config's venv. Exit 0 done, 1 failed or locked out, "
        "3 daemon not reachable.",
    )
    clear.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    clear.add_argument("--json", action="store_true", help="print the full report as JSON")
    clear.set_defaults(func=run_clear)
    status = verbs.add_parser("status", help="engine, store, last and next sweep")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=run_status)


def run_clear(args: argparse.Namespace) -> int:
    path = socket_path(args)
    show = progress.wanted(json=args.json)
    what = "dry run: counting expired sessions" if args.dry_run else "sweeping expired sessions"
    if daemon_listens(path):
        with progress.Progress(f"{what}: asking the daemon", enabled=show,
                               poll=lambda: sweep_progress(path, what)):
            reply = control_client.request(path, {"cmd": "sessions_clear", "dry_run": args.dry_run},
                                           timeout=wait_limit(args))
        if reply.get("ok") is False:
            print(f"omerowebctl: {printable.field(reply, 'error', str, 'unexpected reply')}")
            return EXIT_SWEEP_FAILED
        result = reply
    else:
        with progress.Progress(f"{what} (no daemon runs: sweeping here)", enabled=show):
            result = sweep_here(args)
    result = printable.structure(result)  # the daemon's reply, or the report of a child run as the service user
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("ok", "snapshot")}, indent=2, sort_keys=True))
    else:
        print(render(result))
    return EXIT_SWEEP_FAILED if result.get("error") else EXIT_OK


def wait_limit(args: argparse.Namespace) -> float:
    """How long `sessions clear` waits for the daemon: finite, and longer than two sweeps (one may be running).

    A sweep runs at most sessions.timeout, plus the grace to report after
    SIGTERM and the time to read what is left (sessions.py)."""
    try:
        timeout = load_config(args).sessions.timeout
    except UserError:
        timeout = DEFAULT_SWEEP_TIMEOUT
    one = timeout + sessions.TERM_GRACE + sessions.EXIT_DRAIN + sessions.KILL_WAIT
    return 2 * one + 60.0


def sweep_progress(path: Path, what: str) -> str | None:
    """The line shown while the daemon sweeps: the store, and what the last sweep took as a guide."""
    s = printable.field(control_client.request(path, {"cmd": "status"}, timeout=5), "sessions", dict, {})
    running = printable.field(s, "running", dict)
    if running is None:
        return None
    store = printable.field(s, "store", str)
    line = f"{what} in {store}" if store else what
    trigger = printable.field(running, "trigger", str)
    if trigger != "omerowebctl":
        line += f" (after the {trigger} sweep in progress)"
    last = printable.field(s, "last", dict, {})
    scanned, took = printable.field(last, "scanned", int), printable.field(last, "duration", (int, float), 0)
    if scanned is not None:
        line += f"; the last sweep scanned {scanned} files in {took:.0f}s"
    return line


def run_status(args: argparse.Namespace) -> int:
    status = control_client.request(socket_path(args), {"cmd": "status"})
    s = printable.field(status, "sessions", dict)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        print("\n".join(status_lines.sessions(s)))
    return EXIT_OK


def daemon_listens(path: Path) -> bool:
    """False only when no daemon runs (no socket, or nobody on it); other trouble is the request's to report."""
    try:
        control_client.connect(path).close()
    except control_client.DaemonNotRunning:
        return False
    except (control_client.DaemonUnreachable, control_client.PermissionDenied):
        return True  # something is there (maybe not the daemon): the request says what; no sweep behind its back
    return True


def sweep_here(args: argparse.Namespace) -> dict[str, Any]:
    """No daemon: the same sweep, on the store the daemon would pin, with the settings it would write.

    Both come from the TOML alone, never from a config.xml on disk (the service
    user can write that one); as root the sweep runs as the store's owner
    (sessions.runner_for)."""
    config = load_config(args)
    if os.geteuid() == 0:
        # The TOML names the store and the cookie that say which files go: root
        # acts on it only if nobody but root can have written it.
        problems = trust.file_problems(config.path, "config")
        if problems:
            raise UserError(f"refusing to sweep as root: {problems[0]}; the config and every directory above it "
                            "must be root's and writable by root alone", exit_code=EXIT_SWEEP_FAILED)
    properties = desired.properties_of(config)
    info = probe_sync(config.daemon.venv, properties, config.daemon.omerodir)
    target = sessions.target_for(config, properties, info)
    if target.sweeper is None:
        return {"engine": target.engine, "store": None, "sweeper": None, "dry_run": args.dry_run,
                "skipped": target.note}
    return sessions.sweep_sync(target, dry_run=args.dry_run)


def render(r: dict[str, Any]) -> str:
    """The report as lines; whatever type a field has, never a traceback (it may come from the service user)."""
    r = printable.structure(r)
    store = printable.field(r, "store", str)
    head = f"{'dry run: ' if r.get('dry_run') is True else ''}{printable.field(r, 'engine', str, '?')}" \
        + (f" {store}" if store else "")
    lines = [head, f"  {status_lines.sweep(r)}"]
    if r.get("sweeper") == "omerowebd" and not r.get("error"):
        counts = {name: printable.field(r, name, int, 0) for name in ("ignored", "read", "ledger_hits")}
        lines.append(f"  ({counts['ignored']} other entries ignored, {counts['read']} files read, "
                     f"{counts['ledger_hits']} known from the last sweep)")
    for sample in printable.strings(r, "error_samples"):
        lines.append(f"  error: {sample}")
    return "\n".join(lines)
