"""omerowebctl: the operator's command line. Thin: each command is a module
in omerowebd/commands/ with ``register(subparsers)``; the command sets
``func(args) -> exit code``."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, redact
from .errors import UserError

# One line per command module; the order is the order of --help.
COMMANDS = [
    "status",
    "check",
    "reload",
    "rollout",
    "nginx",
    "config",
    "diagnostics",
    "sessions",
]

EPILOG = """\
exit codes:
  0  done (status: serving)
  1  failed, or config rejected (status: not serving)
  2  usage error; reload: new generation failed and was rolled back
  3  the daemon is not reachable
  4  reload: the change needs a daemon restart (systemctl restart omerowebd)
  5  reload: reverted: the new generation served but did not settle (daemon.settle_seconds);
     the previous config serves again
 6  rollout: a canary did not stay healthy for --settle seconds (rollout stops
    at the first failing host with its code: 1, 2, 3, 4, ...)
 77  the daemon refused the caller (who may do what: man omerowebctl)
 78  the config file cannot be used (a person must fix it)

examples:
  omerowebctl status
  omerowebctl check /etc/omerowebd/omerowebd.toml
  omerowebctl reload --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omerowebctl",
        description="Drive omerowebd, the OMERO.web supervisor.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"omerowebctl {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the TOML file (default: $OMEROWEBD_CONFIG, else /etc/omerowebd/omerowebd.toml)")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's control socket (default: RUNTIME_DIR/control.sock)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"omerowebctl: {redact.scrub_known(str(e))}", file=sys.stderr)  # no secret of a config it read
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
