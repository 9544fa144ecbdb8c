"""omerowebctl reload: apply the config file now and report the outcome."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import control_client, limits, printable, progress, redact
from ..errors import UserError
from ..exits import EXIT_FAILURE
from . import Daemon, daemon


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reload", help="apply the config file; wait for the outcome",
        description="Ask the daemon to apply the config file. A new gunicorn generation must serve before "
        "the old one is retired; a broken config or app changes nothing. "
        "Exit: 0 applied or nothing to do, 1 rejected, 2 rolled back, 3 daemon not reachable, 4 restart required, "
        "5 reverted (the new generation did not settle within daemon.settle_seconds: the previous config serves again).",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the daemon has accepted the request")
    p.add_argument("--dry-run", action="store_true", help="print what changed and what would be done")
    p.add_argument("--json", action="store_true",
                   help="print the outcome as one JSON line, a daemon that does not answer too (what rollout reads)")
    p.add_argument("--discard-foreign-edits", action="store_true",
                   help="overwrite edits someone made to OMERODIR/etc/grid/config.xml (`omero config set`); without "
                   "it such a reload stops and names them (take them over with `omerowebctl config import --only`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    payload = {"cmd": "reload", "wait": not args.no_wait, "dry_run": args.dry_run}
    if args.discard_foreign_edits:
        payload["discard_foreign_edits"] = True
    found = daemon(args)  # the config file read once: where the daemon is, how long to wait
    try:
        reply = request(found.socket, payload, show_progress=not (args.no_wait or args.dry_run or args.json),
                        timeout=ACCEPT_TIMEOUT if args.no_wait else wait_for(found))
    except UserError as e:
        if not args.json:
            raise
        reply = {"ok": False, "exit_code": e.exit_code, "message": redact.scrub_known(str(e)),
                 "outcome": "unreachable" if isinstance(e, control_client.DaemonUnreachable) else "refused"}
    exit_code = printable.field(reply, "exit_code", int)
    if args.json:
        print(json.dumps(reply))  # ASCII: whatever the daemon wrote, escaped
        return exit_code if exit_code is not None and 0 <= exit_code <= 255 else EXIT_FAILURE
    if exit_code is None:
        print(f"omerowebctl: {printable.field(reply, 'error', str, 'unexpected reply')}")
        return EXIT_FAILURE
    print(f"{printable.field(reply, 'outcome', str, '?')}: {printable.field(reply, 'message', str, '')}")
    for change in printable.strings(reply, "changes"):
        print(f"  changed: {change}")
    return exit_code if 0 <= exit_code <= 255 else EXIT_FAILURE


# A reload that is not waited for is answered at once; a dry run checks the config and the venv.
ACCEPT_TIMEOUT = limits.VENV_PROBE_TIMEOUT + 30.0


def wait_limit(args: argparse.Namespace) -> float:
    """How long `reload` waits for its outcome, by the config file: see :func:`wait_for`."""
    return wait_for(daemon(args))


def wait_for(found: Daemon) -> float:
    """How long `reload` waits for its outcome: longer than any reload can take, yet finite.

    Whatever answers on the socket is the service user's process; one that
    never answers must not hold root's `omerowebctl reload` (and with it
    `systemctl reload`) forever. A reload is at most: the venv probe,
    collectstatic, nginx's check and reload, and the new generation's
    daemon.ready_timeout (limits.reload_wait); one already running may be
    ahead of it. A file the daemon would reject gives the defaults: it is
    rejected quickly anyway."""
    return limits.reload_wait(found.ready_timeout, found.settle_seconds)


def request(path: Path, payload: dict[str, Any], *, show_progress: bool = True,
            timeout: float = ACCEPT_TIMEOUT) -> dict[str, Any]:
    """The reload request; on a terminal, a line of what the daemon is doing while it works.

    The progress comes from status requests on a second connection: the
    reload request and its one-line reply stay what they always were."""
    def poll() -> str | None:
        return describe(control_client.request(path, {"cmd": "status"}, timeout=5))

    with progress.Progress("reloading: waiting for the daemon", poll=poll, enabled=None if show_progress else False):
        return control_client.request(path, payload, timeout=timeout)


def describe(status: dict[str, Any]) -> str | None:
    """What a reload in progress is at, from the daemon's status; None when it cannot tell."""
    state = printable.field(status, "state", str)
    if state == "settling":
        serving = printable.field(printable.field(status, "generation", dict, {}), "number", int)
        return f"reloading: generation {serving} serves; watching that it stays up (daemon.settle_seconds)"
    if state != "reloading":
        return f"reloading: waiting for the daemon (it is {state})" if state else None
    serving = printable.field(printable.field(status, "generation", dict, {}), "number", int)
    generations = [g for g in printable.field(status, "generations", list, []) or [] if isinstance(g, dict)]
    booting = [g for g in generations if g.get("state") in ("new", "booting") and g.get("number") != serving]
    retiring = [g for g in generations if g.get("state") == "retiring"]
    if booting:
        g = booting[-1]
        ready, workers = g.get("ready_workers"), g.get("workers")
        loaded = f", {ready} of {workers} workers have loaded OMERO.web" if isinstance(ready, int) else ""
        return f"reloading: generation {g.get('number')} is starting{loaded}"
    if retiring:
        return f"reloading: generation {serving} serves, retiring generation {retiring[-1].get('number')}"
    return "reloading: checking the new config"
