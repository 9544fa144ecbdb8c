"""omerowebctl rollout: reload several hosts one at a time, stopping at the first that fails."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import rollout
from ..errors import UserError
from ..exits import EXIT_USAGE
from .reload import wait_limit

DEFAULT_SETTLE = 10.0
SHOWN_CHANGES = 20  # per host in the table


class _Target(argparse.Action):
    """--socket and --ssh into one list, in the order given: the order hosts are reloaded in."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        kind = "ssh" if option_string == "--ssh" else "socket"
        if kind == "ssh":
            problem = rollout.ssh_target_problem(value)
            if problem:
                parser.error(f"--ssh {problem}")
        targets = list(getattr(namespace, "targets", None) or [])
        targets.append((kind, value))
        namespace.targets = targets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollout", help="reload several hosts in turn; stop at the first that fails",
        description="Apply each host's config file with its own reload, one host after the other, each\n"
        "waited for before the next. The first host whose reload is rejected, rolled back or reverted\n"
        "(or that cannot be reached) stops the rollout: the hosts before it run the change, it and the\n"
        "hosts after it run what they ran, all serving.\n\n"
        "Exit: 0 every host applied; else the code of the host it stopped at: its reload's code\n"
        "(1 rejected, 2 rolled back, 4 restart required, ...), 3 not reachable, 6 a canary did not\n"
        "stay healthy for --settle seconds.",
        epilog="examples:\n  omerowebctl rollout --socket /run/omerowebd/control.sock --ssh web2 --ssh web3\n"
        "  omerowebctl rollout --canary 1 --settle 30 --ssh web1 --ssh web2 --ssh web3\n"
        "  omerowebctl rollout --dry-run --ssh web1 --ssh web2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", dest="targets", metavar="PATH", action=_Target,
                   help="a daemon on this machine, by its control socket")
    p.add_argument("--ssh", dest="targets", metavar="[USER@]HOST", action=_Target,
                   help="a host where ssh (BatchMode: keys only) runs `omerowebctl reload --json`")
    p.add_argument("--ssh-config", metavar="FILE", type=Path,
                   help="ssh's config file (ssh -F): ports, keys, users for the hosts")
    p.add_argument("--dry-run", action="store_true", help="run each host's reload --dry-run; change nothing")
    p.add_argument("--canary", metavar="N", type=_count, default=0,
                   help="reload the first N hosts, watch them for --settle seconds, then the rest")
    p.add_argument("--settle", metavar="SECONDS", type=_seconds, default=DEFAULT_SETTLE,
                   help=f"how long the canaries must stay healthy (default {DEFAULT_SETTLE:.0f})")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                   help="the longest one host's reload may take (default: what `omerowebctl reload` waits, "
                   "from this machine's config file)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run, targets=None)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def hosts_of(args: argparse.Namespace) -> list[rollout.Host]:
    if not args.targets:
        raise UserError("rollout needs at least one host: --socket PATH or --ssh [USER@]HOST, in the order to "
                        "reload them", exit_code=EXIT_USAGE)
    timeout = args.timeout if args.timeout else wait_limit(args)
    hosts: list[rollout.Host] = []
    for kind, value in args.targets:
        if kind == "socket":
            hosts.append(rollout.SocketHost(Path(value), timeout))
        else:
            hosts.append(rollout.SshHost(value, timeout, args.ssh_config))
    return hosts


def run(args: argparse.Namespace) -> int:
    hosts = hosts_of(args)
    if args.canary > len(hosts):
        raise UserError(f"--canary {args.canary}: there are only {len(hosts)} host(s)", exit_code=EXIT_USAGE)
    width = rollout.width(h.name for h in hosts)

    def show(step: rollout.Step) -> None:
        if not args.json:
            print(rollout.row(step, width), flush=True)
            for change in step.changes[:SHOWN_CHANGES]:
                print(f"{'':{width}}  changed: {change}")
            if len(step.changes) > SHOWN_CHANGES:
                print(f"{'':{width}}  ... {len(step.changes) - SHOWN_CHANGES} more (--json lists them all)")

    if not args.json:
        print(rollout.header(width), flush=True)
    def settling(canaries: Any, seconds: float) -> None:
        if not args.json:
            print(f"watching the canaries for {seconds:g}s before the other hosts: {', '.join(canaries)}", flush=True)

    result = rollout.run(hosts, dry_run=args.dry_run, canary=args.canary, settle=args.settle, on_step=show,
                         on_settle=settling)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for step in result.steps:
            if step.exit_code is None:
                print(rollout.row(step, width))
        print(rollout.summary(result), file=sys.stdout if result.exit_code == 0 else sys.stderr)
    return result.exit_code
