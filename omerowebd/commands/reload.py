"""omerowebctl reload: apply the config file now and report the outcome."""

from __future__ import annotations

import argparse

from .. import control
from . import socket_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reload", help="apply the config file; wait for the outcome",
        description="Ask the daemon to apply the config file. A new gunicorn generation must serve before "
        "the old one is retired; a broken config or app changes nothing. "
        "Exit: 0 applied or nothing to do, 1 rejected, 2 rolled back, 3 daemon not reachable, 4 restart required.",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the daemon has accepted the request")
    p.add_argument("--dry-run", action="store_true", help="print what changed and what would be done")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reply = control.request(socket_path(args), {"cmd": "reload", "wait": not args.no_wait, "dry_run": args.dry_run},
                            timeout=None)
    if "exit_code" not in reply:
        print(f"omerowebctl: {reply.get('error', 'unexpected reply')}")
        return 1
    print(f"{reply['outcome']}: {reply['message']}")
    for change in reply.get("changes") or []:
        print(f"  changed: {change}")
    return int(reply["exit_code"])
