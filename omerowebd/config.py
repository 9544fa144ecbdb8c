"""Where the config is read: one TOML file -> frozen, typed settings.

The file has the daemon's own tables (``[daemon]``, ``[nginx]``,
``[sessions]``) and the ``[omero]`` tree of OMERO properties. The daemon's
tables are checked strictly here (unknown keys, types, ranges); the OMERO
properties are flattened to dotted names here and checked against the
installed OMERO.web by :mod:`omerowebd.venv`, which alone knows them.

Every error is one line naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import config_file, limits, redact
from .errors import ConfigError, ConfigErrors
from .names import did_you_mean, shown
from .nginx_syntax import address_problem, settings_problems
from .omero_config import flatten_omero_tree
from .toml_values import plain

# Where the file is: said in config_file (omerowebctl finds the daemon without this module).
CONFIG_ENV, DEFAULT_CONFIG, config_path = config_file.CONFIG_ENV, config_file.DEFAULT_CONFIG, config_file.config_path


def _doc(text: str, *, number_as_text: bool = False, **kwargs: Any) -> Any:
    # number_as_text: a text field that also takes a bare integer (`listen = 8080`).
    return field(metadata={"doc": text, "number_as_text": number_as_text}, **kwargs)


@dataclass(frozen=True)
class DaemonSettings:
    omerodir: Path = _doc("OMERODIR of the OMERO.web install; config.xml is written below it")
    venv: Path = _doc("the OMERO.web virtualenv; gunicorn runs as VENV/bin/python -m gunicorn")
    app: str = _doc("WSGI application", default="omeroweb.wsgi:application")
    runtime_dir: Path = _doc("control socket and per-generation files", default=config_file.DEFAULT_RUNTIME_DIR)
    state_dir: Path = _doc("sessions, nginx files, collectstatic record", default=Path("/var/lib/omerowebd"))
    bind: tuple[str, ...] | None = _doc(
        "HOST:PORT or unix:/path, used only without systemd sockets;"
        " default from omero.web.application_server.host/.port",
        default=None,
    )
    ready_timeout: float = _doc("seconds a new generation may take to serve", default=limits.READY_TIMEOUT)
    graceful_timeout: float | None = _doc(
        "seconds requests in flight may take to finish when a generation retires or the service stops;"
        " default omero.web.wsgi_timeout (60)",
        default=None,
    )
    watch_config: bool = _doc("reload when the config file changes on disk", default=True)
    health_path: str | None = _doc("path probed for health; default PREFIX/webclient/login/", default=None)
    log_format: Literal["auto", "console", "json", "journal"] = _doc("log output", default="auto")
    admin_group: str | None = _doc(
        "group whose members may reload and sweep over the control socket, besides root and the daemon's user",
        default=None,
    )
    settle_seconds: float = _doc(
        "seconds a new generation is watched after a reload's cutover; a crash loop or a failing health probe"
        " in that time brings the previous config back (0: off)",
        default=limits.SETTLE_SECONDS,
    )
    settle_worker_deaths: int = _doc(
        "worker deaths within settle_seconds that are tolerated; one more is a crash loop", default=2
    )
    metrics: str | None = _doc(
        "HOST:PORT to serve Prometheus metrics on (/metrics), e.g. 127.0.0.1:9449; default: off", default=None
    )


@dataclass(frozen=True)
class NginxSettings:
    enabled: bool = _doc("write the nginx server config and location include", default=True)
    output_dir: Path | None = _doc("where the files go; default STATE_DIR/nginx", default=None)
    server_file: str = _doc("file name of the server config", default="omero-web.conf")
    location_file: str = _doc("file name of the location include", default="omero-web-location.include")
    listen: str = _doc("port (or address:port) nginx listens on", default="80", number_as_text=True)
    server_name: str = _doc("nginx server_name", default="$hostname")
    max_body_size: str = _doc("nginx client_max_body_size", default="0")
    redirects: dict[str, str] = _doc(
        "exact path -> target, answered with 307 (location = PATH { return 307 TARGET; })", default_factory=dict
    )
    upstreams: tuple[str, ...] = _doc(
        "the other hosts' gunicorn addresses (HOST:PORT or unix:/path), served beside this one's", default=()
    )
    # Used only with several backends (nginx.upstreams, or several daemon.bind
    # addresses): one backend alone keeps omero-web's own server line.
    max_fails: int = _doc("failed attempts after which nginx stops sending to a backend for fail_timeout",
                          default=1)
    fail_timeout: str = _doc("how long nginx leaves a failed backend out (nginx time: 10s, 1m)", default="10s",
                             number_as_text=True)
    connect_timeout: str = _doc("how long nginx waits to connect to a backend before trying the next",
                                default="5s", number_as_text=True)
    maintenance_template: Path | None = _doc(
        "HTML template of the maintenance page ($prefix, $webclient_url); written to STATE_DIR/maintenance/",
        default=None,
    )
    validate_command: tuple[str, ...] | None = _doc("run with the new files in place, e.g. nginx -t", default=None)
    reload_command: tuple[str, ...] | None = _doc("run after a change, e.g. systemctl reload nginx", default=None)


@dataclass(frozen=True)
class SessionsSettings:
    enabled: bool = _doc("sweep expired sessions", default=True)
    schedule: str = _doc('an interval ("6h", "30m", "1d") or a daily time ("03:30")', default="6h")
    at_start: bool = _doc("sweep once after start (never delays READY)", default=True)
    timeout: float = _doc("seconds a sweep may run", default=3600.0)
    nice: int = _doc("CPU niceness of the sweep (0-19)", default=19)
    ionice_idle: bool = _doc("run the sweep in the idle I/O class", default=True)


TABLES: dict[str, type] = {"daemon": DaemonSettings, "nginx": NginxSettings, "sessions": SessionsSettings}


@dataclass(frozen=True)
class Config:
    path: Path
    digest: str  # sha256 of the file's bytes: what `status` shows, what reloads compare
    daemon: DaemonSettings
    nginx: NginxSettings
    sessions: SessionsSettings
    # Every OMERO property as `omero config` would store it: dotted name -> text.
    properties: Mapping[str, str]
    # Where each property is set, for error messages: dotted name -> line.
    property_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, name: str) -> str:
        line = self.property_lines.get(name)
        return f"{self.path}:{line}" if line else str(self.path)

    def bind_addresses(self) -> tuple[str, ...]:
        """Where gunicorn listens without systemd's sockets: daemon.bind, else where `omero web start` binds."""
        return self.daemon.bind or (derived_bind(self.properties),)


HOST_PROPERTY = "omero.web.application_server.host"
PORT_PROPERTY = "omero.web.application_server.port"


def derived_bind(properties: Mapping[str, str]) -> str:
    """omero.web.application_server.host:port, with OMERO.web's defaults."""
    host = properties.get(HOST_PROPERTY, "127.0.0.1")
    port = properties.get(PORT_PROPERTY, "4080")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check the file; raise ConfigError with one line per problem."""
    path = Path(path)
    try:
        data = config_file.read(path)
    except config_file.Problem as e:
        raise ConfigError(str(e)) from None
    return parse(data, path)


def parse(data: bytes, path: Path) -> Config:
    try:
        text = config_file.decode(data, path)
        doc = config_file.parse(text, path)
    except config_file.Problem as e:
        raise ConfigError(str(e)) from None

    lines = _KeyLines(text)
    problems: list[str] = []
    for name in doc:
        if name not in TABLES and name != "omero":
            problems.append(
                f"{path}:{lines.find((), name)}: unknown table [{shown(name)}]{did_you_mean(name, [*TABLES, 'omero'])}"
            )
    sections: dict[str, Any] = {}
    for name, cls in TABLES.items():
        table = doc.get(name, {})
        if not isinstance(table, Mapping):
            problems.append(f"{path}:{lines.find((), name)}: {name} must be a table")
            table = {}
        sections[name] = _build(cls, name, table, path, lines, problems)

    omero = doc.get("omero", {})
    properties: dict[str, str] = {}
    where: dict[str, int] = {}
    if not isinstance(omero, Mapping):
        problems.append(f"{path}:{lines.find((), 'omero')}: omero must be a table")
    else:
        for problem, key_path in flatten_omero_tree(omero, properties):
            problems.append(f"{path}:{lines.find(key_path[:-1], key_path[-1])}: {problem}")
        for name in properties:
            where[name] = lines.find_property(name)
    # Every message from here on (an error, a reload result, a log line) may
    # quote a value: the scrubber must know this file's secrets.
    redact.remember(properties)
    if sections["daemon"] is not None and not sections["daemon"].bind and isinstance(omero, Mapping):
        # getaddrinfo takes port 70000 as 4464 and fails on a host label over 63
        # characters with UnicodeError: what gunicorn would bind is checked here.
        problem = address_problem(derived_bind(properties))
        if problem:
            name = PORT_PROPERTY if PORT_PROPERTY in properties and "port" in problem else HOST_PROPERTY
            line = where.get(name) or lines.find((), "omero")
            problems.append(f"{path}:{line}: {name} makes gunicorn bind {problem}: fix it, or set daemon.bind")
    if problems:
        raise ConfigErrors(problems)
    return Config(
        path=path,
        digest=hashlib.sha256(data).hexdigest(),
        properties=properties,
        property_lines=where,
        **sections,
    )


def _build(cls: type, table: str, values: Mapping[str, Any], path: Path, lines: _KeyLines, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(problems)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        where = f"{path}:{lines.find((table,), key)}"
        if key not in fields:
            problems.append(f"{where}: unknown key {table}.{shown(key)}{did_you_mean(key, list(fields))}")
            continue
        value = plain(raw)
        if fields[key].metadata.get("number_as_text") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            kwargs[key] = _coerce(value, hints[key])
        except ValueError as e:
            problems.append(f"{where}: {table}.{key} {e}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}: missing required key {table}.{name} ({f.metadata['doc']})")
            kwargs[name] = None
    if len(problems) > before:
        return None
    return _check(cls(**kwargs), table, path, lines, problems)


def _coerce(value: Any, hint: Any) -> Any:
    """Check one TOML value against a field's type; raise ValueError('must be ...')."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return _coerce(value, options[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of strings, not {_tname(value)}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"must be a table of strings, not {_tname(value)}")
        return dict(value)
    if hint in _SCALARS:
        accepts, wanted = _SCALARS[hint]
        if isinstance(value, bool) is not (hint is bool) or not isinstance(value, accepts):
            raise ValueError(f"must be {wanted}, not {_tname(value)}")
        if hint is float:
            # TOML has inf and nan (a wait that never ends, or compares false) and integers of any size.
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise ValueError(f"must be a finite number of seconds, not {str(value)[:20]}")
        return hint(value)  # float(3) -> 3.0; the others give the value back
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a path string, not {_tname(value)}")
        if not os.path.isabs(value):
            raise ValueError(f"must be an absolute path, not {value!r}")
        if "\0" in value:  # no file system takes one; every later use would be a traceback
            raise ValueError("must be a path without a NUL character (\\u0000)")
        return Path(value)
    raise TypeError(hint)  # a field type this module does not know: a bug


# A scalar field's type -> (the TOML values it takes, what the error says it must be).
# A boolean is an int to Python: only a bool field takes one.
_SCALARS: dict[type, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number of seconds"),
    str: (str, "a string"),
}


def _tname(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _check(settings: Any, table: str, path: Path, lines: _KeyLines, problems: list[str]) -> Any:
    """Range and shape checks that a type alone cannot say."""

    def bad(key: str, message: str) -> None:
        problems.append(f"{path}:{lines.find((table,), key)}: {table}.{key} {message}")

    if isinstance(settings, DaemonSettings):
        for address in settings.bind or ():
            problem = address_problem(address)
            if problem:
                bad("bind", f"has {problem}")
        if settings.bind == ():
            bad("bind", "must name at least one address")
        for key in ("ready_timeout", "graceful_timeout"):
            value = getattr(settings, key)
            if value is not None and value <= 0:
                bad(key, "must be more than 0")
        if settings.settle_seconds < 0:
            bad("settle_seconds", "must be 0 (off) or more")
        if settings.settle_worker_deaths < 0:
            bad("settle_worker_deaths", "must be 0 or more")
        if settings.metrics is not None:
            problem = address_problem(settings.metrics)
            if settings.metrics.startswith("unix:"):
                problem = f"{settings.metrics!r}: use HOST:PORT or [IPV6]:PORT (Prometheus scrapes over TCP)"
            if problem:
                bad("metrics", f"has {problem}")
        if settings.health_path is not None and not settings.health_path.startswith("/"):
            bad("health_path", f"must start with '/', not {settings.health_path!r}")
        if settings.admin_group is not None:
            try:
                grp.getgrnam(settings.admin_group)
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                bad("admin_group", f"names no group on this system ({settings.admin_group!r}): create it "
                    "(groupadd --system NAME) or remove the setting")
    if isinstance(settings, SessionsSettings):
        from .schedule import parse_schedule  # one parser, shared with the sweeper

        try:
            parse_schedule(settings.schedule)
        except ValueError as e:
            bad("schedule", str(e))
        if not 0 <= settings.nice <= 19:
            bad("nice", "must be between 0 and 19")
        if settings.timeout <= 0:
            bad("timeout", "must be more than 0")
    if isinstance(settings, NginxSettings):
        for key, message in settings_problems(settings):
            bad(key, message)
    return settings


class _KeyLines:
    """Finds the line a key is set on, for error messages.

    TOML parsers do not keep positions; a light scan of the text is enough to
    point a person at the right line (table headers, plain, quoted and dotted
    keys). When in doubt it returns the table's header line, or 1.
    """

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")

    def __init__(self, text: str) -> None:
        self.entries: list[tuple[tuple[str, ...], int]] = []
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            header = self._HEADER.match(line)
            if header:
                table = _split_key(header.group(1))
                self.entries.append((table, number))
                continue
            key = self._KEY.match(line)
            if key:
                self.entries.append((table + _split_key(key.group(1)), number))

    def find(self, table: tuple[str, ...], key: str) -> int:
        want = (*table, key)
        for path, number in self.entries:
            if path == want:
                return number
        for path, number in self.entries:
            if path[: len(want)] == want:
                return number
        return self.find(table[:-1], table[-1]) if table else 1

    def find_property(self, dotted: str) -> int:
        for path, number in self.entries:
            if ".".join(path) == dotted:
                return number
        return 0


def _split_key(key: str) -> tuple[str, ...]:
    parts = re.findall(r"""\s*("[^"]*"|'[^']*'|[^.\s]+)\s*(?:\.|$)""", key)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)
