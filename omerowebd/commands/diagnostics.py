"""omerowebctl diagnostics: everything a person (or a bug report) needs, as `omero web diagnostics` gives it.

Versions, every path the daemon uses (exists, owner, mode, writable by the
service user), where the logs are, the systemd units when systemd runs, the
daemon's own state when it answers, and the gunicorn command line it runs.
It works with no daemon and with a broken config: it reports what it can.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__, access, checks, control_client, desired, nginx, omero_config, redact
from .. import config as config_module
from ..errors import UserError
from ..exits import EXIT_FAILURE, EXIT_OK
from ..generation import CONF
from ..venv import VenvInfo, effective, python_of
from . import socket_path

SERVICE_USER = "omero-web"  # the packaged unit's User=
SYSTEMD_BOOTED = Path("/run/systemd/system")  # sd_booted(): systemd runs this machine
UNITS = ("omerowebd.service", "omerowebd.socket")
UNIT_PROPERTIES = ("LoadState", "ActiveState", "SubState", "UnitFileState", "Result", "MainPID", "NRestarts",
                   "ExecMainStartTimestamp", "FragmentPath", "DropInPaths", "User", "Group", "Listen")
DAEMON_LIBRARIES = ("tomlkit", "structlog", "watchdog", "systemd-python")

EPILOG = """\
exit codes: 0 no problem found; 1 problems found (listed under "problems");
2 usage error.

examples:
  omerowebctl diagnostics
  omerowebctl diagnostics --json > diagnostics.json
  omerowebctl --config /etc/omerowebd/omerowebd.toml diagnostics --user omero-web
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnostics", help="versions, paths, logs, systemd state, the gunicorn command line",
        description="Report what omerowebd uses and how it stands, like `omero web diagnostics`. "
        "Needs no running daemon; secrets are never shown.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--user", metavar="NAME",
                   help=f"judge the paths for this user (default: the unit's User=, else {SERVICE_USER} if it exists)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A report is pasted into bug reports: every value under a secret-looking
    # name and every secret of the config it read is hidden (redact.py).
    report = redact.structure(gather(args))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(report))
    return EXIT_FAILURE if report["problems"] else EXIT_OK


# -- gathering -------------------------------------------------------------------


def gather(args: argparse.Namespace) -> dict[str, Any]:
    path = config_module.config_path(args.config)
    report: dict[str, Any] = {"problems": [], "warnings": []}
    report["omerowebd"] = {"version": __version__, "python": sys.version.split()[0], "executable": sys.executable,
                           **{lib: _dist_version(lib) for lib in DAEMON_LIBRARIES}}
    systemd = systemd_state()
    report["systemd"] = systemd
    user = args.user or _unit_user(systemd) or (SERVICE_USER if _user_exists(SERVICE_USER) else access.user_name(os.geteuid()))
    report["judged_for"] = user
    try:
        config = config_module.load(path)
    except UserError as e:
        problems = getattr(e, "problems", None) or [str(e)]
        report["problems"] += problems
        report["config"] = {"path": str(path), "valid": False}
        report["paths"] = [describe_path("config file", path, user, write=False)]
        report["daemon"] = _daemon_state(args)
        return report
    report["config"] = {"path": str(config.path), "valid": True, "sha256": config.digest,
                        "properties": len(config.properties)}
    problems, warnings, info = checks.run_sync(config)
    report["problems"] += problems
    report["warnings"] += warnings
    report["venv"] = {"path": str(config.daemon.venv), "python": str(python_of(config.daemon.venv)),
                      **(dict(info.versions) if info else {"error": "not usable (see problems)"})}
    report["paths"] = [describe_path(what, p, user, write=w) for what, p, w in daemon_paths(config, info)]
    report["logs"] = log_locations(config, info, systemd)
    report["daemon"] = _daemon_state(args)
    report["gunicorn"] = gunicorn_command(config, info) if info else None
    return report


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = {"systemd-python": "systemd"}.get(name, name)
        return getattr(sys.modules.get(module) or _try_import(module), "__version__", None)


def _try_import(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        return None


def daemon_paths(config: config_module.Config, info: VenvInfo | None) -> list[tuple[str, Path, bool]]:
    """(what, path, must the service write it) for every path the daemon and OMERO.web use."""
    d, props = config.daemon, config.properties
    omerodir = d.omerodir

    def prop(name: str, fallback: Path) -> Path:
        value = effective(props, info, name) if info else props.get(name)
        return Path(value) if value else fallback

    sessions = omero_config.session_file_path(props)
    paths: list[tuple[str, Path, bool]] = [
        ("config file", config.path, False),
        ("venv", d.venv, False),
        ("venv python", python_of(d.venv), False),
        ("omerodir", omerodir, True),
        ("config.xml", omero_config.config_xml_path(omerodir), True),
        ("OMERO.web logs", prop("omero.web.logdir", omerodir / "var" / "log"), True),
        ("static files", prop("omero.web.static_root", omerodir / "var" / "static"), True),
        ("runtime dir", d.runtime_dir, True),
        ("control socket", d.runtime_dir / "control.sock", True),
        ("state dir", d.state_dir, True),
        ("sessions", Path(sessions) if sessions else desired.session_dir(config), True),
        ("collectstatic record", d.state_dir / "collectstatic.json", True),
    ]
    if config.nginx.enabled:
        out = nginx.output_dir(config)
        paths += [
            ("nginx files", out, True),
            ("nginx server file", out / config.nginx.server_file, True),
            ("nginx location file", out / config.nginx.location_file, True),
            ("maintenance page", nginx.maintenance_dir(config), True),
        ]
        if config.nginx.maintenance_template:
            paths.append(("maintenance template", config.nginx.maintenance_template, False))
    return paths


def describe_path(what: str, path: Path, user: str, *, write: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"what": what, "path": os.path.abspath(path)}
    try:
        st = path.stat()
    except OSError as e:
        entry["exists"] = False
        if not isinstance(e, FileNotFoundError):
            entry["error"] = e.strerror
    else:
        entry.update(exists=True, kind=_kind(st.st_mode), owner=f"{access.user_name(st.st_uid)}:{access.group_name(st.st_gid)}",
                     mode=f"{stat.S_IMODE(st.st_mode):04o}")
    entry["readable"] = can_access(user, path, write=False)
    if write:
        entry["writable"] = can_access(user, path, write=True)
    return entry


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "other"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def can_access(user: str, path: Path, *, write: bool) -> bool:
    """Could ``user`` read (or write, or create) ``path``? Mode bits and groups; ACLs and MACs are not seen.

    For a path that does not exist yet: could it be created (the nearest
    existing directory is writable, every directory above it searchable).
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return False
    if entry.pw_uid == 0:
        return True
    gids = set(os.getgrouplist(user, entry.pw_gid))

    def allowed(p: Path, bits: int) -> bool:
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == entry.pw_uid:
            shift = 6
        elif st.st_gid in gids:
            shift = 3
        else:
            shift = 0
        return (st.st_mode >> shift) & bits == bits

    target = path
    while not target.exists() and target.parent != target:
        target = target.parent
    if not all(allowed(parent, 1) for parent in target.parents):
        return False
    if target != path:  # create it: write and search in the nearest existing directory
        return write and allowed(target, 3)
    bits = 2 if write else 4
    if target.is_dir():
        bits |= 1
    return allowed(target, bits)


def log_locations(config: config_module.Config, info: VenvInfo | None, systemd: dict[str, Any]) -> dict[str, str]:
    logdir = (effective(config.properties, info, "omero.web.logdir") if info else None) or str(
        config.daemon.omerodir / "var" / "log")
    daemon = "journalctl -u omerowebd" if systemd.get("running") else "the standard error of omerowebd"
    return {
        "omerowebd": daemon,
        "gunicorn": f"{daemon} (gunicorn writes to the daemon's standard error)",
        "OMERO.web": str(Path(logdir) / "OMEROweb.log"),
    }


def _unit_user(systemd: dict[str, Any]) -> str | None:
    unit = (systemd.get("units") or {}).get("omerowebd.service") or {}
    return unit.get("User") or None if unit.get("LoadState") == "loaded" else None


def systemd_state() -> dict[str, Any]:
    """`systemctl show` of the units, when systemd runs this machine."""
    if not SYSTEMD_BOOTED.is_dir():
        return {"running": False, "why": f"systemd is not running here (no {SYSTEMD_BOOTED})"}
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return {"running": True, "why": "systemctl not found"}
    units: dict[str, Any] = {}
    for unit in UNITS:
        try:
            done = subprocess.run([systemctl, "show", unit, "--no-pager", "-p", ",".join(UNIT_PROPERTIES)],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"running": True, "why": f"systemctl does not answer: {e}"}
        if done.returncode != 0:
            return {"running": True, "why": f"systemctl show failed: {done.stderr.strip()}"}
        units[unit] = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {"running": True, "units": units}


def _daemon_state(args: argparse.Namespace) -> dict[str, Any]:
    try:
        status = control_client.request(socket_path(args), {"cmd": "status"}, timeout=10)
    except UserError as e:
        return {"reachable": False, "why": str(e)}
    g = status.get("generation") or {}
    return {
        "reachable": True, "state": status.get("state"), "serving": status.get("serving"),
        "pid": status.get("pid"), "uptime": status.get("uptime"), "generation": g.get("number"),
        "master_pid": g.get("master_pid"), "worker_pids": g.get("worker_pids"),
        "config_sha256": (status.get("config") or {}).get("digest"),
    }


def gunicorn_command(config: config_module.Config, info: VenvInfo) -> dict[str, Any]:
    """The command line, settings and environment a new generation gets (secrets never appear here)."""
    try:
        wanted = desired.derive(config, info, "")  # the packages do not change the command line
    except ValueError as e:
        return {"error": f"cannot work it out: {e}"}
    plan = wanted.plan
    return {
        "command": shlex.join(redact.argv(plan.command(CONF))),  # wsgi_args may hold --env SECRET=...
        "cwd": str(plan.omeroweb_dir),
        "settings": dict(plan.settings),
        "env": redact.structure(dict(plan.env)),
        "listens on": ", ".join(wanted.bind) + " (unless systemd passes sockets: omerowebd.socket)",
        "health": f"GET {plan.health_path} (Host: {plan.health_host})",
    }


# -- rendering ------------------------------------------------------------------


@dataclass
class _Text:
    lines: list[str]

    def section(self, title: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(f"{title}:")

    def item(self, label: str, value: Any) -> None:
        self.lines.append(f"  {label + ':':<22} {value}")


def render(report: dict[str, Any]) -> str:
    out = _Text([])
    out.section("omerowebd")
    for key, value in report["omerowebd"].items():
        out.item(key, value if value is not None else "not installed")
    venv_info = report.get("venv")
    if venv_info:
        out.section("OMERO.web venv")
        for key, value in venv_info.items():
            out.item(key, value)
    config = report["config"]
    out.section("config")
    out.item("file", config["path"])
    out.item("valid", "yes" if config["valid"] else "no")
    if config.get("sha256"):
        out.item("sha256", config["sha256"])
        out.item("OMERO properties", config["properties"])
    out.section(f"paths (access judged for {report['judged_for']})")
    for p in report["paths"]:
        if p["exists"]:
            state = f"{p['kind']}, {p['owner']} {p['mode']}"
        else:
            state = "missing" + (f" ({p['error']})" if p.get("error") else "")
        access = "readable" if p["readable"] else "NOT readable"
        if "writable" in p:
            access = ("writable" if p["writable"] else "NOT writable") if p["exists"] else (
                "can be created" if p["writable"] else "CANNOT be created")
        out.item(p["what"], f"{p['path']} [{state}; {access}]")
    if report.get("logs"):
        out.section("logs")
        for key, value in report["logs"].items():
            out.item(key, value)
    systemd = report["systemd"]
    out.section("systemd")
    if systemd.get("units"):
        for unit, props in systemd["units"].items():
            shown = ", ".join(f"{k}={v}" for k, v in props.items() if v)
            out.item(unit, shown)
    else:
        out.item("state", systemd.get("why"))
    daemon = report["daemon"]
    out.section("daemon")
    if daemon["reachable"]:
        out.item("state", f"{daemon['state']} (pid {daemon['pid']}, up {daemon['uptime']}s)")
        out.item("generation", f"{daemon['generation']}, master {daemon['master_pid']}, workers "
                 f"{' '.join(map(str, daemon['worker_pids'] or [])) or 'none'}")
        live = daemon.get("config_sha256")
        if live and config.get("sha256"):
            out.item("config", "the file as it is" if live == config["sha256"] else
                     f"sha256 {live[:12]}: not the file as it is now (reload to apply it)")
    else:
        out.item("state", f"not reachable: {daemon['why']}")
    g = report.get("gunicorn")
    if g:
        out.section("gunicorn (a new generation)")
        for key in ("command", "cwd", "settings", "env", "listens on", "health", "error"):
            if key in g:
                value = g[key]
                out.item(key, " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value)
    if report["warnings"]:
        out.section("warnings")
        out.lines += [f"  {w}" for w in report["warnings"]]
    out.section("problems")
    out.lines += [f"  {p}" for p in report["problems"]] or ["  none found"]
    return "\n".join(out.lines)
