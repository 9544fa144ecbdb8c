"""omerowebctl config: get, set, append, unset, import, export -- `omero config`'s verbs, on the TOML file."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import config as config_module
from .. import control_client, edit, migrate, printable, progress, redact, venv
from ..errors import UserError
from ..exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..files import write_atomic
from . import reload as reload_command
from . import daemon, socket_path

EXIT_NOT_SET = EXIT_FAILURE

EPILOG = """\
KEY is an OMERO property (omero.web.prefix, as with `omero config`) or a
daemon setting (daemon.venv, nginx.listen, sessions.schedule). A value gets
the TOML type OMERO.web parses it as (asked from the venv): booleans,
integers, lists and tables; text otherwise. Comments and layout of the file
stay as they are. Every edit is checked (the daemon's parser, and OMERO.web's
in the venv) before it is written: a refused edit changes nothing. The
running daemon applies a saved file by itself; --reload waits for it and
reports the outcome. Secrets (names with password, secret, token, key...; the
passwords inside omero.web.django_additional_settings) are hidden in what
config prints unless --show-password; set them with --stdin or --file FILE so
they stay out of shell history and the process list.

examples:
  omerowebctl config get
  omerowebctl config get omero.web.prefix
  omerowebctl config set omero.web.prefix /omero --reload
  omerowebctl config set omero.web.secret_key --stdin < secret.txt
  omerowebctl config set omero.web.public.enabled true
  omerowebctl config append omero.web.apps '"omero_iviewer"'
  omerowebctl config append omero.web.ui.top_links '["Figure", "figure_index"]'
  omerowebctl config unset omero.web.prefix
  omerowebctl config set nginx.listen 8080
  omero config get --show-password > backup.txt   # on the old site
  omerowebctl config import backup.txt
  omerowebctl config import /opt/omero/web/omero-web/etc/grid/config.xml --dry-run
  omerowebctl config export --show-password > backup.txt; omero config load backup.txt

exit codes:
  0  done (get: the key is set)
  1  edit refused, nothing written; get: the key is not set; import: the source cannot be imported
  2  usage error (unknown key, bad arguments)
  3  --reload: written, but the daemon is not reachable
  78 the config file is missing or not TOML (a person must fix it)
  with --reload, a reload that fails exits as `omerowebctl reload` does (1 rejected, 2 rolled back, 4 restart required, 5 reverted)
"""


VERB_EXAMPLES = {
    "get": ["config get", "config get omero.web.prefix", "config get omero.web.public", "config get daemon",
            "config get --json --show-password"],
    "set": ["config set omero.web.prefix /omero --reload", "config set omero.web.wsgi_workers 8",
            "config set omero.web.secret_key --stdin < secret.txt   # a secret never on the command line",
            "config set omero.web.django_additional_settings --file mail-settings.json",
            "config set daemon.bind 127.0.0.1:4080", "config set nginx.validate_command 'nginx -t'"],
    "append": ["config append omero.web.apps '\"omero_iviewer\"'",
               "config append omero.web.ui.top_links '[\"Figure\", \"figure_index\"]' --set",
               "config append nginx.upstreams 127.0.0.1:4081"],
    "unset": ["config unset omero.web.prefix", "config unset daemon.ready_timeout --reload"],
    "import": ["config import backup.txt   # from: omero config get --show-password > backup.txt",
               "config import /opt/omero/web/omero-web/etc/grid/config.xml --dry-run",
               "config import backup.txt --merge --skip 'omero.db.*'"],
    "export": ["config export --show-password -o backup.txt   # then: omero config load backup.txt"],
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="get, set, append, unset, import or export settings (as `omero config` does)",
        description="Read and edit the config file; import an existing OMERO.web site; export for `omero config load`.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    get = verbs.add_parser("get", help="print all properties, one, a group (omero.web.public) or a table (daemon)",
                           description="Print OMERO properties as KEY=VALUE, like `omero config get`; one KEY "
                           "prints its value alone. A daemon table name (daemon, nginx, sessions) prints its "
                           "settings with their effective values. Exit 1 if KEY is not set.")
    get.add_argument("key", nargs="?", metavar="KEY")
    get.add_argument("--show-password", action="store_true", help="show secrets (passwords, keys, tokens)")
    get.add_argument("--json", action="store_true", help="print one JSON object")
    get.set_defaults(func=run_get)

    set_ = verbs.add_parser("set", help="set KEY to VALUE", description="Set KEY to VALUE, typed as OMERO.web parses it.")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", nargs="?", metavar="VALUE")
    source = set_.add_mutually_exclusive_group()
    source.add_argument("--file", metavar="FILE", help="read the value from FILE ('-': standard input), as "
                        "`omero config set --file` does; keeps secrets off the command line")
    source.add_argument("--stdin", action="store_true",
                        help="read the value from standard input (one value; trailing white space and the newline are "
                        "dropped, as with --file)")
    set_.add_argument("--text", action="store_true", help="store VALUE as text, whatever the property's type")
    _edit_options(set_)
    set_.set_defaults(func=run_set)

    append = verbs.add_parser("append", help="append a JSON VALUE to a list property",
                              description="Append VALUE (JSON, as with `omero config append`) to a list. An "
                              "unset omero.web list starts from OMERO.web's default, as `omero config append` does.")
    append.add_argument("key", metavar="KEY")
    append.add_argument("value", metavar="VALUE")
    append.add_argument("--set", action="store_true", dest="unique", help="append only if not already in the list")
    _edit_options(append)
    append.set_defaults(func=run_append)

    unset = verbs.add_parser("unset", help="remove KEY (a setting falls back to its default)",
                             description="Remove KEY from the file: OMERO.web then uses its default for a "
                             "property, the daemon its own for a setting.")
    unset.add_argument("key", metavar="KEY")
    _edit_options(unset)
    unset.set_defaults(func=run_unset)

    imp = verbs.add_parser(
        "import", help="take over an existing site's properties",
        description="Write the [omero] tree from FILE: the output of `omero config get --show-password` or "
        "an etc/grid/config.xml (its active profile). The tree ends up holding exactly those properties "
        "(--merge keeps the ones only the TOML has). Values are typed only where the TOML gives back the "
        "very same text, so the config.xml the daemon writes is what omero-py read from the original.")
    imp.add_argument("file", metavar="FILE", type=Path)
    imp.add_argument("--merge", action="store_true", help="keep properties the TOML has and FILE has not")
    imp.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                     help="leave out properties matching PATTERN (shell-style, e.g. 'omero.db.*'); repeatable")
    imp.add_argument("--only", action="append", default=[], metavar="PATTERN",
                     help="take only properties matching PATTERN, removing those FILE does not have; the rest of "
                     "the TOML stays (how edits made with `omero config set` are taken over); repeatable")
    imp.add_argument("--dry-run", action="store_true", help="report what would be written; write nothing")
    _edit_options(imp)
    imp.set_defaults(func=run_import)

    exp = verbs.add_parser("export", help="print the properties for `omero config load`",
                           description="Print the [omero] properties as KEY=VALUE lines, the format "
                           "`omero config load` reads. Secrets are left out (as comments) unless --show-password.")
    exp.add_argument("--show-password", action="store_true", help="include secrets (passwords, keys, tokens)")
    exp.add_argument("-o", "--output", metavar="FILE", type=Path, help="write to FILE (mode 0600) instead of stdout")
    exp.set_defaults(func=run_export)

    for verb, parser in verbs.choices.items():
        examples = "\n".join(f"  omerowebctl {example}" for example in VERB_EXAMPLES[verb])
        parser.epilog = f"examples:\n{examples}\n\nexit codes: see `omerowebctl config --help`"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines
        if parser.description:
            parser.description = textwrap.fill(parser.description, 79)


def _edit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reload", action="store_true", help="then ask the daemon to apply the file; report the outcome")
    p.add_argument("--skip-venv-check", action="store_true",
                   help="do not refuse values OMERO.web would refuse (e.g. an app not installed yet)")
    p.add_argument("--show-password", action="store_true", help="show secrets in the report")


def _path(args: argparse.Namespace) -> Path:
    return config_module.config_path(args.config)


# -- get -----------------------------------------------------------------------


def run_get(args: argparse.Namespace) -> int:
    config = config_module.load(_path(args))
    key = args.key
    if key in config_module.TABLES:
        values = {f"{key}.{f.name}": edit.render_setting(getattr(getattr(config, key), f.name))
                  for f in dataclasses.fields(config_module.TABLES[key])}
        return _print(values, args)
    if key is None:
        return _print(dict(config.properties), args)
    parsed = edit.parse_key(key)
    if not parsed.is_property:
        value = getattr(getattr(config, parsed.table), parsed.field)  # type: ignore[arg-type]
        if value is None:
            print(f"{key} is not set and has no fixed default (see `omerowebctl config get {parsed.table}`)",
                  file=sys.stderr)
            return EXIT_NOT_SET
        return _print({key: edit.render_setting(value)}, args, single=True)
    if key in config.properties:
        return _print({key: config.properties[key]}, args, single=True)
    group = {n: v for n, v in config.properties.items() if n.startswith(key + ".")}
    if group:
        return _print(group, args)
    print(f"{key} is not set{_default_note(config, key)}", file=sys.stderr)
    return EXIT_NOT_SET


def _default_note(config: config_module.Config, name: str) -> str:
    try:
        info = venv.probe_sync(config.daemon.venv, config.properties, config.daemon.omerodir)
    except UserError:
        return ""
    if name not in info.catalogue:
        return " (OMERO.web does not know it)" if name.startswith("omero.web.") else ""
    default = info.default(name)
    return f" (OMERO.web's default: {edit.shown(name, default, False)})" if default is not None else ""


def _print(values: dict[str, str], args: argparse.Namespace, *, single: bool = False) -> int:
    shown = {n: edit.shown(n, v, args.show_password) for n, v in sorted(values.items())}
    if args.json:
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    elif single:
        print(next(iter(shown.values())))
    else:
        for name, value in shown.items():
            print(f"{name}={value}")
    return EXIT_OK


# -- edits ------------------------------------------------------------------------


def run_set(args: argparse.Namespace) -> int:
    key = edit.parse_key(args.key)
    from_file = "-" if args.stdin else args.file
    if (args.value is None) == (from_file is None):
        raise UserError("give VALUE, --stdin or --file FILE (to remove a key: config unset KEY)", exit_code=EXIT_USAGE)
    text = args.value if from_file is None else _read_value(from_file)
    if from_file is None:
        _warn_secret_on_command_line(key.name, text)
    return _edit(args, lambda doc, k: [edit.set_key(doc, key, text, k, as_text=args.text)])


def _warn_secret_on_command_line(name: str, text: str, *, element: bool = False) -> None:
    """A secret given as an argument is in shell history and /proc/PID/cmdline, for every local user to read."""
    if redact.hides_anything(name, f"[{text}]" if element else text):
        print(f"warning: the value of {name} holds a secret and was given on the command line, where other "
              f"users can read it and shell history keeps it: use --stdin (or --file FILE) next time",
              file=sys.stderr)


def _read_value(name: str) -> str:
    try:
        raw = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{name}: cannot read the value: {e.strerror}", exit_code=EXIT_USAGE) from None
    return raw.rstrip()  # as `omero config set --file`


def run_append(args: argparse.Namespace) -> int:
    key = edit.parse_key(args.key)
    _warn_secret_on_command_line(key.name, args.value, element=True)
    return _edit(args, lambda doc, k: [edit.append_key(doc, key, args.value, k, unique=args.unique)])


def run_unset(args: argparse.Namespace) -> int:
    key = edit.parse_key(args.key)
    return _edit(args, lambda doc, k: [edit.unset_key(doc, key)])


def _edit(args: argparse.Namespace, mutate: edit.Mutation, *, dry_run: bool = False,
          describe: Callable[[edit.Change, edit.Outcome, bool], str] | None = None,
          meter: progress.Progress | None = None) -> int:
    try:
        with meter or progress.Progress("", enabled=False):
            outcome = edit.edit(_path(args), mutate, venv_check=not args.skip_venv_check, dry_run=dry_run)
    except edit.EditRefused as e:
        print(f"omerowebctl: {e}", file=sys.stderr)
        for problem in e.problems[1:]:
            print(f"omerowebctl:   and: {problem}", file=sys.stderr)
        return e.exit_code
    for change in outcome.changes:
        print((describe or _describe)(change, outcome, args.show_password))
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if dry_run:
        print(f"dry run: {outcome.path} is unchanged")
    elif not outcome.written:
        print(f"{outcome.path} is unchanged")
    if args.reload and not dry_run:
        return _reload(args, outcome.path)
    return EXIT_OK


def _describe(change: edit.Change, outcome: edit.Outcome, show: bool) -> str:
    before, after = (edit.shown(change.key, v, show) for v in (change.before, change.after))
    if change.after is None:
        if change.before is None:
            return f"{change.key}: was not set"
        return f"{change.key}: removed (was {before})"
    if not change.changed:
        return f"{change.key}: unchanged ({after})"
    where = outcome.line(change.key) if change.key.startswith("omero.") else str(outcome.path)
    note = f"; {change.note}" if change.note else ""
    return f"{change.key}: {before} -> {after} ({change.written_as}, {where}{note})"


def _reload(args: argparse.Namespace, path: Path) -> int:
    found = daemon(args)  # the config file read once: where the daemon is, how long to wait
    try:
        reply = reload_command.request(found.socket, {"cmd": "reload", "wait": True},
                                       timeout=reload_command.wait_for(found))
    except (control_client.DaemonUnreachable, control_client.PermissionDenied) as e:
        print(f"not applied: {e}", file=sys.stderr)
        return e.exit_code
    code = printable.field(reply, "exit_code", int)
    if code is None:
        print(f"reload: {printable.field(reply, 'error', str, 'unexpected reply')}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"reload: {printable.field(reply, 'outcome', str, '?')}: {printable.field(reply, 'message', str, '')}")
    if code == 0:
        live = _live_digest(args)
        mine = hashlib.sha256(path.read_bytes()).hexdigest()
        if live == mine:
            print(f"the daemon runs {path} (sha256:{mine[:12]})")
        elif live is not None:
            print(f"warning: the daemon runs sha256:{live[:12]}, the file is sha256:{mine[:12]} "
                  "(changed again meanwhile?)", file=sys.stderr)
    return code


def _live_digest(args: argparse.Namespace) -> str | None:
    try:
        status: dict[str, Any] = control_client.request(socket_path(args), {"cmd": "status"})
    except control_client.DaemonUnreachable:
        return None
    return printable.field(printable.field(status, "config", dict), "digest", str)


# -- import / export ----------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    source = migrate.read_source(args.file)
    for name in migrate.withhold_nginx_properties(source):
        print(f"withheld {name}: {source.path} is not root's alone, and this property's lines go into the nginx "
              f"files root renders; read the value there and set it with `omerowebctl config set {name} --stdin`",
              file=sys.stderr)
    report: list[migrate.Imported] = []
    count = len(source.properties)
    # OMERO.web is asked (in the venv) for the types before, and for its verdict after.
    meter = progress.Progress(f"importing {count} properties: asking OMERO.web for their types")

    def mutate(doc: edit.Document, knowledge: edit.Knowledge) -> list[edit.Change]:
        if knowledge.info is None:
            meter.echo(f"warning: every value is written as text: OMERO.web could not be asked for the types "
                       f"({knowledge.why_not})", file=sys.stderr)
        meter.set(f"importing {count} properties: typing and writing them into the TOML")
        result = migrate.import_properties(doc, source, knowledge, merge=args.merge, skip=args.skip, only=args.only)
        report.append(result)
        meter.set(f"importing {count} properties: checking the result with OMERO.web")
        return result.changes

    where = f" (profile {source.profile})" if source.profile else ""
    print(f"importing {count} properties from {source.path}, {source.format}{where}")
    code = _edit(args, mutate, dry_run=args.dry_run, describe=_describe_import, meter=meter)
    if report:
        result = report[0]
        typed = sum(1 for c in result.changes if c.after is not None and c.written_as != "text")
        kept = sum(1 for c in result.changes if c.after is not None) - typed
        print(f"took {kept + typed} properties ({typed} typed, {kept} as text), removed {len(result.removed)}, "
              f"skipped {len(result.skipped)}" + (f": {', '.join(result.skipped)}" if result.skipped else ""))
    return code


def _describe_import(change: edit.Change, outcome: edit.Outcome, show: bool) -> str:
    if change.after is None:
        return f"  removed  {change.key}"
    verb = "kept" if not change.changed else "set"
    return f"  {verb:<7}  {change.key} ({change.written_as})"


def run_export(args: argparse.Namespace) -> int:
    config = config_module.load(_path(args))
    text, warnings = migrate.export_text(dict(config.properties), show_secrets=args.show_password,
                                         source=str(config.path))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        write_atomic(args.output, text.encode("utf-8"), mode=0o600)  # secrets: for the admin only
    except OSError as e:
        raise UserError(f"{args.output}: cannot write it: {e.strerror}", exit_code=EXIT_FAILURE) from None
    print(f"wrote {len(config.properties)} properties to {args.output}", file=sys.stderr)
    return EXIT_OK
