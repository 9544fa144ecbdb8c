"""omerowebctl: the operator's command line. Thin: each command is a module
in omerowebd/commands/ with ``register(subparsers)``; the command sets
``func(args) -> exit code``. Only the chosen command's module is imported
(each pulls in its own share of omerowebd, up to a fifth of a second): the
others are listed from COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, redact
from .errors import UserError

# Each command module and its one-line help (the module's own add_parser help,
# a unit test holds them equal); the order is the order of --help.
COMMANDS = {
    "status": "show the daemon's state (exit 0 when serving)",
    "check": "validate the config and the venv; exit 0 or 1",
    "reload": "apply the config file; wait for the outcome",
    "rollout": "reload several hosts in turn; stop at the first that fails",
    "nginx": "print the nginx config for this site (as `omero web config nginx` does)",
    "config": "get, set, append, unset, import or export settings (as `omero config` does)",
    "diagnostics": "versions, paths, logs, systemd state, the gunicorn command line",
    "sessions": "sweep expired OMERO.web sessions now, or show the sweeper",
}
ALL = object()  # build_parser(only=ALL): every command module imported and registered

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


def build_parser(only: str | None | object = ALL) -> argparse.ArgumentParser:
    """The parser with command `only` registered by its module, every other one
    a stand-in that lists it in --help (None: none imported; ALL: all)."""
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
    for name, help_line in COMMANDS.items():
        if only is ALL or name == only:
            importlib.import_module(f"{__package__}.commands.{name}").register(sub)
        else:
            # Lists it; its arguments (--help too) are parsed once its module is registered.
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def chosen_command(argv: list[str] | None) -> str:
    """The command argv names, found by the parser without a command module
    (a usage error, --help or --version exits here, as it would later)."""
    return build_parser(only=None).parse_known_args(argv)[0].command


def main(argv: list[str] | None = None) -> int:
    args = build_parser(only=chosen_command(argv)).parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"omerowebctl: {redact.scrub_known(str(e))}", file=sys.stderr)  # no secret of a config it read
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
