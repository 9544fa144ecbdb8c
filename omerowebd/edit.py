"""Editing the config file the way a person would, for ``omerowebctl config``.

tomlkit keeps every comment and the layout; a change touches one line, or
adds one where a reader would look for it (below the commented-out example
of the same key, else after the table's last setting). Every edit is a
transaction (:func:`edit`): under a lock beside the file, re-read, change,
check the new text with the daemon's own parser (and OMERO.web's, through
the venv, when it can be asked), then replace the file atomically, keeping
its mode and owner. A refused edit leaves the file byte for byte as it was.

Where an OMERO property goes (``config.parse`` flattens it back to exactly
the same name; :func:`edit` verifies that for every edit):

* into the deepest table or dotted-key group that already holds a prefix of
  the name, else into a new ``[omero.X]`` table (``[omero.web]``);
* as a bare key (``prefix``), or a dotted key for the rest of the name
  (``public.enabled``), unless part of the rest is itself a property (a
  value in the file, or a name OMERO.web knows, such as
  ``omero.web.application_server``): then one quoted key
  (``"application_server.host"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
import tomlkit.items
from tomlkit.container import Container

from . import config as config_module
from . import config_file, redact
from . import venv as venv_module
from .errors import ConfigError, ConfigErrors, UserError
from .exits import EXIT_FAILURE, EXIT_USAGE
from .files import write_atomic
from .locks import flock_within
from .names import did_you_mean
from .omero_config import encode_value, flatten_omero_tree
from .toml_values import is_namespace
from .toml_values import plain as plain_value
from .venv import VenvInfo

LOCK_TIMEOUT = 30.0
HIDDEN = redact.HIDDEN  # what `omero config get` prints for a secret
_INT64 = range(-(2**63), 2**63)
_BARE = re.compile(r"^[A-Za-z0-9_-]+\Z")  # \Z: "$" would let a final newline through
_NAME = re.compile(r"^omero(\.[A-Za-z0-9_-]+)+\Z")


class EditRefused(UserError):
    """The edit would make the file invalid; nothing was written."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


is_secret = redact.is_secret  # the one rule, in redact.py


def shown(name: str, text: str | None, show_secrets: bool) -> str:
    """A value as `config get` and the edit reports print it: secrets hidden unless asked for."""
    if text is None:
        return "(not set)"
    return text if show_secrets else redact.value(name, text) or text


# -- keys ----------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """What ``config set KEY`` names: an OMERO property or a daemon setting (``table.field``)."""

    name: str
    table: str | None = None
    field: str | None = None

    @property
    def is_property(self) -> bool:
        return self.table is None

    def hint(self) -> Any:
        assert self.table and self.field
        return typing.get_type_hints(config_module.TABLES[self.table])[self.field]


def setting_names() -> list[str]:
    return [f"{t}.{f.name}" for t, cls in config_module.TABLES.items() for f in dataclasses.fields(cls)]


def parse_key(text: str) -> Key:
    """The key of a command line, or a usage error saying what keys look like."""
    first, _, rest = text.partition(".")
    if first in config_module.TABLES:
        if rest in {f.name for f in dataclasses.fields(config_module.TABLES[first])}:
            return Key(text, first, rest)
        raise UserError(f"unknown setting {text}{did_you_mean(text, setting_names())}", exit_code=EXIT_USAGE)
    if first == "omero":
        if not _NAME.match(text):
            raise UserError(
                f"{text!r} is not an OMERO property name: letters, digits, '_', '-' between dots (omero.web.prefix)",
                exit_code=EXIT_USAGE,
            )
        return Key(text)
    raise UserError(
        f"unknown key {text!r}: use an OMERO property (omero.web.prefix) or a daemon setting "
        f"(daemon.venv, nginx.listen, sessions.schedule){did_you_mean(text, setting_names())}",
        exit_code=EXIT_USAGE,
    )


# -- what is known about properties ---------------------------------------


@dataclass(frozen=True)
class Knowledge:
    """What the venv said about the properties, or why it could not be asked."""

    info: VenvInfo | None = None
    why_not: str | None = None

    def kind(self, name: str) -> str | None:
        if self.info is None:
            return None
        entry = self.info.catalogue.get(name)
        return entry.get("kind") if entry else None

    def default(self, name: str) -> str | None:
        return self.info.default(name) if self.info else None

    def value_names(self) -> set[str]:
        return set(self.info.catalogue) if self.info else set()


# -- values ----------------------------------------------------------------


def toml_item(value: Any) -> Any:
    """A JSON-like value as a tomlkit item (lists inline, objects as inline tables); None if TOML cannot hold it."""
    if isinstance(value, bool) or isinstance(value, str):
        return tomlkit.item(value)
    if isinstance(value, int):
        return tomlkit.item(value) if value in _INT64 else None
    if isinstance(value, float):
        return tomlkit.item(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, list):
        array = tomlkit.array()
        for element in value:
            item = toml_item(element)
            if item is None:
                return None
            array.append(item)
        return array
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        for key, element in value.items():
            item = toml_item(element)
            if item is None or not isinstance(key, str):
                return None
            table.append(key, item)
        return table
    return None  # null: TOML has none


def _stores_as(build: Callable[[], Any], text: str) -> bool:
    """Does the item ``build()`` makes come back from a TOML file as exactly ``text``?"""
    item = build()
    if item is None:
        return False
    try:
        back = tomlkit.parse(tomlkit.dumps({"v": item}))["v"]
        return encode_value(plain_value(back)) == text
    except (ValueError, tomlkit.exceptions.TOMLKitError):
        return False


def _layout(item: Any) -> Any:
    """Long lists one element a line: easier to read and to diff."""
    if isinstance(item, tomlkit.items.Array) and len(item) > 1 and len(item.as_string()) > 72:
        item.multiline(True)
    return item


def written_as(item: Any) -> str:
    names = {
        tomlkit.items.Bool: "boolean", tomlkit.items.Integer: "integer", tomlkit.items.Float: "number",
        tomlkit.items.Array: "list", tomlkit.items.InlineTable: "table", tomlkit.items.Table: "table",
    }
    return next((label for cls, label in names.items() if isinstance(item, cls)), "text")


def property_item(name: str, text: str, kind: str | None, *, exact: bool) -> Any:
    """The TOML item for a property value, typed by ``kind`` (the venv's catalogue).

    ``exact``: type the value only if the file gives back the very same text
    (an import must lose nothing); else a valid value may be normalised the
    way ``omero config`` itself would store it (``True`` -> ``true``,
    ``["a","b"]`` -> ``["a", "b"]``). Anything else stays text.
    """
    candidates: list[Callable[[], Any]] = []
    if kind == "bool" and text.strip().lower() in ("true", "false"):
        candidates.append(lambda: tomlkit.item(text.strip().lower() == "true"))
    elif kind == "int" and re.fullmatch(r"\s*[-+]?\d+\s*", text):
        candidates.append(lambda: toml_item(int(text)))
    elif kind in ("list", "object", "json"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        wanted = {"list": list, "object": dict, "json": (list, dict)}[kind]
        if isinstance(parsed, wanted):
            candidates.append(lambda: toml_item(parsed))
    for build in candidates:
        if _stores_as(build, text) or (not exact and build() is not None):
            return _layout(build())
    return tomlkit.item(text)


def _kind_of_item(item: Any) -> str | None:
    """The kind an existing value in the file suggests, when the venv cannot say."""
    value = plain_value(item)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return None


def setting_item(key: Key, text: str) -> Any:
    """A daemon setting's value from command-line text, typed by its field in config.py."""
    hint = key.hint()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise EditRefused(f"{key.name} must be true or false, not {text!r}")
        return tomlkit.item(lowered in ("true", "yes", "on", "1"))
    if hint in (int, float):
        try:
            number: float = int(text) if re.fullmatch(r"\s*[-+]?\d+\s*", text) else float(text)
        except ValueError:
            raise EditRefused(f"{key.name} must be a number, not {text!r}") from None
        if hint is int and not isinstance(number, int):
            raise EditRefused(f"{key.name} must be an integer, not {text!r}")
        return tomlkit.item(number)
    if origin is tuple:
        if text.lstrip().startswith("["):
            words = _json(key.name, text)
        else:
            words = shlex.split(text)  # "nginx -t" -> ["nginx", "-t"]; "127.0.0.1:4080" -> one address
        return _layout(toml_item(words) or tomlkit.item(text))
    if origin is dict:
        value = _json(key.name, text)
        if not isinstance(value, dict):
            raise EditRefused(f"{key.name} must be a JSON object, e.g. '{{\"/\": \"/webclient/\"}}'")
        return toml_item(value) or tomlkit.item(text)
    return tomlkit.item(text)  # str, Path, Literal: config.parse checks the choice


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise EditRefused(f"{name}: the value is not valid JSON ({e})") from None


def json_argument(text: str) -> Any:
    """A value for ``config append``: JSON as with ``omero config append``; a bare word is taken as text."""
    try:
        return json.loads(text)
    except ValueError as e:
        if text.lstrip()[:1] in ('"', "[", "{"):
            raise EditRefused(f"the value is not valid JSON ({e}): quote strings as JSON, e.g. '\"omero_iviewer\"'") from None
        return text


# -- the document ------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One key changed by an edit; texts as ``omero config`` stores them (None: not set)."""

    key: str
    before: str | None
    after: str | None
    written_as: str = "text"  # the TOML type written: text, boolean, integer, number, list, table, removed
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.before != self.after


class Document:
    """A TOML config file opened for editing."""

    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        try:
            self.doc = config_file.parse(text, path)
        except config_file.Problem as e:
            raise ConfigError(f"{e}; fix it by hand first") from None

    def text(self) -> str:
        return self.doc.as_string()

    def properties(self) -> dict[str, str]:
        """The flattened [omero] tree, even when the daemon's tables are broken."""
        out: dict[str, str] = {}
        omero = self.doc.get("omero")
        if isinstance(omero, Mapping):
            list(flatten_omero_tree(omero, out))
        return out

    # -- changes ---------------------------------------------------------------
    # tomlkit's tree is not always consistent after a structural change (a
    # dotted key inserted, then the table walked again raises NonExistentKey
    # on tomlkit 0.15): after each change the text is parsed anew, which
    # tomlkit gives back byte for byte.

    def set_property(self, name: str, item: Any, value_names: Collection[str] = ()) -> None:
        """Set ``name`` to ``item``: in place if it is set, else where :mod:`edit` says it goes."""
        self._set_property(name, item, value_names)
        self._settle()

    def unset_property(self, name: str) -> Any:
        """Remove ``name``; the item it had, or None."""
        item = self._unset_property(name)
        self._settle()
        return item

    def set_setting(self, key: Key, item: Any) -> None:
        self._set_setting(key, item)
        self._settle()

    def unset_setting(self, key: Key) -> Any:
        item = self._unset_setting(key)
        self._settle()
        return item

    def _settle(self) -> None:
        self.doc = tomlkit.parse(self.doc.as_string())

    # -- OMERO properties ----------------------------------------------------

    def _values(self) -> Iterator[tuple[str, Any, str, Any]]:
        """(dotted name, container, key, item) of every value in the [omero] tree."""

        def walk(prefix: str, container: Any) -> Iterator[tuple[str, Any, str, Any]]:
            for key, item in list(container.items()):
                name = f"{prefix}.{key}"
                if is_namespace(item):
                    yield from walk(name, item)
                else:
                    yield name, container, str(key), item

        omero = self.doc.get("omero")
        if isinstance(omero, Mapping):
            yield from walk("omero", omero)

    def find(self, name: str) -> tuple[Any, str, Any] | None:
        for dotted, container, key, item in self._values():
            if dotted == name:
                return container, key, item
        return None

    def _set_property(self, name: str, item: Any, value_names: Collection[str]) -> None:
        found = self.find(name)
        if found:
            container, key, _ = found
            container[key] = item
            return
        parts = name.split(".")
        container: Any = self.doc
        depth = 0
        while depth < len(parts) and parts[depth] in container and is_namespace(container[parts[depth]]):
            container = container[parts[depth]]
            depth += 1
        if depth == len(parts):
            raise EditRefused(
                f"{name} is a table in {self.path} (its keys are other properties): to set it too, write them "
                f"as quoted keys one level up, e.g. \"{parts[-1]}.NAME\" = ... instead of {parts[-1]}.NAME, "
                f"then set {name} again"
            )
        if depth < 2 and len(parts) > 2:
            container = self._section(parts[:2], container, depth)
            depth = 2
        rest = parts[depth:]
        here = ".".join(parts[:depth])
        values = set(value_names) | set(self.properties())
        if len(rest) == 1:
            key: Any = tomlkit.key(rest[0])
        elif rest[0] in container or any(f"{here}.{'.'.join(rest[:k])}" in values for k in range(1, len(rest))):
            key = tomlkit.key(".".join(rest))  # a quoted key: part of the rest is a property itself
        else:
            key = tomlkit.key(rest)  # a dotted key: public.enabled
        _insert(container, key, item)

    def _section(self, head: list[str], container: Any, depth: int) -> Any:
        """The [omero.X] table for a new name, created at the end of the file."""
        if depth == 0:
            self.doc.append("omero", tomlkit.table(is_super_table=True))
            container = self.doc["omero"]
        # Not left to tomlkit: 0.11 writes no [header] for a table whose first key is dotted.
        container[head[1]] = tomlkit.table(is_super_table=False)
        return container[head[1]]

    def _unset_property(self, name: str) -> Any:
        found = self.find(name)
        if not found:
            return None
        container, key, item = found
        del container[key]
        return item

    # -- daemon settings -----------------------------------------------------

    def setting(self, key: Key) -> Any:
        table = self.doc.get(key.table)
        if isinstance(table, Mapping) and key.field in table:
            return table[key.field]
        return None

    def _set_setting(self, key: Key, item: Any) -> None:
        assert key.table and key.field
        table = self.doc.get(key.table)
        if table is None:
            self.doc.append(key.table, tomlkit.table())
            table = self.doc[key.table]
        if not isinstance(table, Mapping):
            raise EditRefused(f"{key.table} in {self.path} is not a table: fix it by hand first")
        current = table.get(key.field)
        if isinstance(current, tomlkit.items.Table) and isinstance(item, tomlkit.items.InlineTable):
            # A [nginx.redirects] section stays a section (and keeps its comments).
            for name in list(current):
                del current[name]
            for name, value in item.items():
                current[name] = value
            return
        if key.field in table:
            table[key.field] = item
        else:
            _insert(table, tomlkit.key(key.field), item)

    def _unset_setting(self, key: Key) -> Any:
        table = self.doc.get(key.table)
        if isinstance(table, Mapping) and key.field in table:
            item = table[key.field]
            del table[key.field]
            return item
        return None


def _body(container: Any) -> Container | None:
    """The tomlkit Container holding a table's lines (None for a table split across the file)."""
    if isinstance(container, Container):
        return container
    if isinstance(container, tomlkit.items.Table):
        return container.value
    return None


def _is_section(item: Any) -> bool:
    """A child that is written under its own [header]: keys must not follow it in the body."""
    if isinstance(item, tomlkit.items.AoT):
        return True
    return isinstance(item, tomlkit.items.Table) and item.as_string().lstrip().startswith("[")


def _insert(container: Any, key: Any, item: Any) -> None:
    """Add a new key where a reader looks for it: under its commented-out example, else after the last setting."""
    body = _body(container)
    if body is None:
        container[key] = item
        return
    entries = body.body
    end = next((i for i, (_, it) in enumerate(entries) if _is_section(it)), len(entries))
    written = key.as_string().strip()
    example = re.compile(r"^#\s*" + re.escape(written) + r"\s*=")
    index = None
    for i in range(end):
        entry_key, entry = entries[i]
        if entry_key is None and isinstance(entry, tomlkit.items.Comment) and example.match(entry.as_string().strip()):
            index = i + 1
    if index is None:
        settings = [i for i in range(end) if entries[i][0] is not None]
        lines = [i for i in range(end) if not isinstance(entries[i][1], tomlkit.items.Whitespace)]
        index = (settings[-1] + 1) if settings else (lines[-1] + 1 if lines else 0)
    if index >= len(entries):
        body.append(key, item)
    else:
        body._insert_at(index, key, item)


# -- the transaction ------------------------------------------------------------


@dataclass
class Outcome:
    path: Path
    changes: list[Change]
    written: bool
    config: config_module.Config | None = None
    warnings: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        if self.config is None:
            return str(self.path)
        return self.config.where(name)


Mutation = Callable[[Document, Knowledge], list[Change]]


def edit(
    path: Path,
    mutate: Mutation,
    *,
    venv_check: bool = True,
    dry_run: bool = False,
    probe: Callable[..., VenvInfo] = venv_module.probe_sync,
) -> Outcome:
    """Apply ``mutate`` to the file at ``path`` as one checked, atomic, locked edit."""
    real = Path(os.path.realpath(path))  # a symlinked config stays a symlink
    with _locked(real):
        try:
            data = config_file.read(real)  # the file the lock is for, even if the link changes meanwhile
            st = real.stat()
        except config_file.Problem as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
        try:
            text = config_file.decode(data, path)
        except config_file.Problem as e:
            raise ConfigError(f"{e}; fix it by hand first") from None
        doc = Document(text, path)
        old_props = doc.properties()
        old_config, old_problems = _parse(data, path)
        knowledge = _ask_venv(old_config, doc, old_props, probe)

        changes = mutate(doc, knowledge)
        new_data = doc.text().encode("utf-8")
        outcome = Outcome(path=path, changes=changes, written=False, config=old_config)
        if new_data == data:
            return outcome
        new_config, new_problems = _parse(new_data, path)
        # Lines of the refused text exist nowhere: the problems name the key, not the line.
        fresh = [_unplaced(p) for p in new_problems if _unplaced(p) not in {_unplaced(q) for q in old_problems}]
        if fresh:
            raise EditRefused(f"refused, {path} is unchanged: {fresh[0]}", fresh)
        if new_problems:
            outcome.warnings += [f"still to fix: {p}" for p in new_problems]
        _verify_layout(old_props, changes, doc, new_config)
        if venv_check and new_config is not None:
            outcome.warnings += _venv_problems(new_config, knowledge, probe)
        elif not venv_check:
            outcome.warnings.append("the venv was not asked (--skip-venv-check): `omerowebctl check` before a reload")
        outcome.config = new_config
        if not dry_run:
            _replace(real, new_data, st)
            outcome.written = True
        return outcome


def _parse(data: bytes, path: Path) -> tuple[config_module.Config | None, list[str]]:
    try:
        return config_module.parse(data, path), []
    except ConfigErrors as e:
        return None, list(e.problems)
    except ConfigError as e:
        return None, [str(e)]


def _unplaced(problem: str) -> str:
    """A problem without its line number: an edit moves lines, the problem stays the same."""
    return re.sub(r"^(\S+?):\d+(:\d+)?: ", r"\1: ", problem)


def _ask_venv(config: config_module.Config | None, doc: Document, props: dict[str, str],
              probe: Callable[..., VenvInfo]) -> Knowledge:
    if config is not None:
        venv, omerodir = config.daemon.venv, config.daemon.omerodir
    else:
        daemon = doc.doc.get("daemon")
        raw = daemon.get("venv") if isinstance(daemon, Mapping) else None
        if not isinstance(raw, str) or not os.path.isabs(raw):
            return Knowledge(why_not=f"{doc.path} names no usable daemon.venv")
        venv, omerodir = Path(raw), None
    try:
        return Knowledge(info=probe(venv, props, omerodir))
    except UserError as e:
        return Knowledge(why_not=redact.scrub(str(e), props))


def _verify_layout(old: dict[str, str], changes: list[Change], doc: Document, new: config_module.Config | None) -> None:
    """The file must give back exactly the old properties plus the changes: never anything else."""
    expected = dict(old)
    for change in changes:
        if change.key.startswith("omero."):
            if change.after is None:
                expected.pop(change.key, None)
            else:
                expected[change.key] = change.after
    got = dict(new.properties) if new is not None else doc.properties()
    if got != expected:
        diff = sorted(n for n in set(got) | set(expected) if got.get(n) != expected.get(n))
        raise EditRefused(f"refused, {doc.path} is unchanged: the edit would also change {', '.join(diff)} (a bug: please report it)")


def _venv_problems(config: config_module.Config, knowledge: Knowledge, probe: Callable[..., VenvInfo]) -> list[str]:
    """Refuse what OMERO.web would refuse and the file did not already have; warn when it cannot be asked."""
    # OMERO.web's parsers quote the value they refuse: never a secret's.
    secrets = redact.for_properties(config.properties)

    def clean(message: str) -> str:
        return redact.scrub_known(secrets.scrub(message))

    try:
        info = probe(config.daemon.venv, config.properties, config.daemon.omerodir)
    except UserError as e:
        if knowledge.info is not None:  # it answered before this edit: the edit broke it (daemon.venv)
            raise EditRefused(f"refused, {config.path} is unchanged: {clean(str(e))}") from None
        return [f"OMERO.web was not asked about the values ({clean(str(e))})"]
    before = knowledge.info.errors if knowledge.info else {}
    errors = {n: clean(m) for n, m in info.errors.items()}
    fresh = [f"{config.path}: {n}: {errors[n]}" for n, m in sorted(info.errors.items()) if before.get(n) != m]
    if fresh:
        raise EditRefused(f"refused, {config.path} is unchanged: {fresh[0]}", fresh)
    return [f"still to fix: {config.where(n)}: {n}: {m}" for n, m in sorted(errors.items())]


class _locked:
    """flock on FILE.lock beside the config: two editors take turns, each re-reads under the lock.

    The lock file stays: removing it would let a third editor lock a new
    inode while the second still holds the old one.
    """

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.timeout = LOCK_TIMEOUT if timeout is None else timeout
        self.fd = -1

    def __enter__(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                raise UserError(
                    f"cannot edit {self.path.with_suffix('')}: no permission to create {self.path} "
                    "(run as root or as the file's owner)", exit_code=EXIT_FAILURE) from None
        except FileNotFoundError:
            raise ConfigError(f"{self.path.with_suffix('')}: config file not found (its directory is missing)") from None
        if not flock_within(self.fd, self.timeout):
            os.close(self.fd)
            raise UserError(f"another edit holds {self.path} for over {self.timeout:.0f}s; try again",
                            exit_code=EXIT_FAILURE)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock


def _replace(path: Path, data: bytes, st: os.stat_result) -> None:
    """Atomically replace ``path``, keeping mode and owner (0640 root:omero-web must stay readable to the service)."""
    owner = (st.st_uid, st.st_gid)
    try:
        write_atomic(path, data, mode=st.st_mode & 0o7777,
                     owner=owner if owner != (os.geteuid(), os.getegid()) else None)
    except PermissionError as e:
        raise UserError(f"cannot write {path}: {e.strerror} (run as root or as the file's owner)",
                        exit_code=EXIT_FAILURE) from None


# -- the verbs -------------------------------------------------------------------


def set_key(doc: Document, key: Key, text: str, knowledge: Knowledge, *, as_text: bool = False) -> Change:
    """``config set KEY VALUE``."""
    if not key.is_property:
        before = doc.setting(key)
        item = tomlkit.item(text) if as_text else setting_item(key, text)
        doc.set_setting(key, item)
        return Change(key.name, _setting_text(before), _setting_text(item), written_as(item))
    found = doc.find(key.name)
    before_text = encode_value(plain_value(found[2])) if found else None
    kind = None if as_text else (knowledge.kind(key.name) or (_kind_of_item(found[2]) if found else None))
    item = property_item(key.name, text, kind, exact=False)
    doc.set_property(key.name, item, knowledge.value_names())
    after = encode_value(plain_value(item))
    note = "" if after == text else f"given as {redact.value(key.name, text)!r}"
    return Change(key.name, before_text, after, written_as(item), note)


def append_key(doc: Document, key: Key, text: str, knowledge: Knowledge, *, unique: bool = False) -> Change:
    """``config append KEY VALUE``: add one JSON value to a list (``omero config append``)."""
    value = json_argument(text)
    if not key.is_property:
        if typing.get_origin(key.hint()) is not tuple and not _optional_tuple(key.hint()):
            raise EditRefused(f"{key.name} is not a list: use config set")
        current_item = doc.setting(key)
        current = list(plain_value(current_item)) if current_item is not None else list(_default_list(key))
        if not (unique and value in current):
            current.append(value)
        item = _layout(toml_item(current) or tomlkit.item(json.dumps(current)))
        doc.set_setting(key, item)
        return Change(key.name, _setting_text(current_item), _setting_text(item), written_as(item))
    found = doc.find(key.name)
    before = encode_value(plain_value(found[2])) if found else None
    if before is not None:
        try:
            current = json.loads(before)
        except ValueError:
            raise EditRefused(f"{key.name} is not JSON ({redact.value(key.name, before)!r}): "
                              "set the whole list with config set") from None
        start = "its value"
    elif key.name.startswith("omero.web."):
        default = knowledge.default(key.name)
        if default is None and knowledge.info is None:
            raise EditRefused(
                f"{key.name} is not set and OMERO.web cannot be asked for its default list ({knowledge.why_not}): "
                "set the whole list with config set")
        try:
            current = json.loads(default) if default is not None else []
        except ValueError:
            current = None
        start = "OMERO.web's default"
    else:
        current, start = [], "an empty list"
    if not isinstance(current, list):
        raise EditRefused(f"{key.name} is not a list ({start} is {redact.value(key.name, before or default)!r}): "
                          "use config set")
    if not (unique and value in current):
        current.append(value)
    after = json.dumps(current)
    item = property_item(key.name, after, "list", exact=True)
    doc.set_property(key.name, item, knowledge.value_names())
    note = "" if found else f"started from {start}"
    return Change(key.name, before, after, written_as(item), note)


def unset_key(doc: Document, key: Key) -> Change:
    """``config unset KEY``: the property goes away; a setting falls back to its default."""
    if key.is_property:
        item = doc.unset_property(key.name)
        return Change(key.name, encode_value(plain_value(item)) if item is not None else None, None, "removed")
    item = doc.unset_setting(key)
    return Change(key.name, _setting_text(item), None, "removed")


def _optional_tuple(hint: Any) -> bool:
    return any(typing.get_origin(h) is tuple for h in typing.get_args(hint))


def _default_list(key: Key) -> tuple[str, ...]:
    assert key.table and key.field
    f = {f.name: f for f in dataclasses.fields(config_module.TABLES[key.table])}[key.field]
    default = f.default if f.default is not dataclasses.MISSING else None
    return tuple(default or ())


def _setting_text(item: Any) -> str | None:
    if item is None:
        return None
    return render_setting(plain_value(item))


def render_setting(value: Any) -> str:
    """A daemon setting as ``config get`` prints it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
