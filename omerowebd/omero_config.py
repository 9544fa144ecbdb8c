"""The ``[omero]`` tree <-> dotted OMERO properties <-> ``etc/grid/config.xml``.

Flattening rule (unambiguous, and it needs no knowledge of OMERO.web):

* a table (``[omero.web]``) or a dotted key (``web.prefix = ...``) is a
  *namespace*: its keys are joined to the name with dots;
* a quoted key containing dots (``"application_server.host" = ...``) is
  joined as it is, which is how a name that is both a value and the prefix of
  other names is written (``omero.web.application_server`` and
  ``omero.web.application_server.host``);
* an inline table (``{...}``) or an array is a *value*: stored as JSON, the
  way ``omero config set``/``append`` store lists and objects;
* strings are stored as they are, booleans as ``true``/``false``, numbers as
  their text.

config.xml is written in the format omero-py's ``ConfigXml`` reads and writes:
an ``__ACTIVE__`` block naming the profile plus a copy of it, then the
profile itself.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Comment, Element, ElementTree, ParseError, SubElement, fromstring

from .errors import ConfigError
from .files import write_atomic
from .locks import flock_within
from .toml_values import is_namespace, plain

PROFILE = "default"
VERSION_KEY = "omero.config.version"
VERSION = "5.1.0"
PROFILE_KEY = "omero.config.profile"
ACTIVE = "__ACTIVE__"
SESSION_FILE_PATH = "SESSION_FILE_PATH"
ADDITIONAL_SETTINGS = "omero.web.django_additional_settings"


def flatten_omero_tree(tree: Mapping[str, Any], out: dict[str, str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Fill ``out`` with ``omero.…`` -> text; yield (problem, key path) for what cannot be stored."""
    yield from _flatten(("omero",), tree, out, {})


def _flatten(
    prefix: tuple[str, ...], tree: Mapping[str, Any], out: dict[str, str], seen: dict[str, tuple[str, ...]]
) -> Iterator[tuple[str, tuple[str, ...]]]:
    for key, item in tree.items():
        path = (*prefix, str(key))
        if is_namespace(item):
            yield from _flatten(path, item, out, seen)
            continue
        name = ".".join(path)
        if not all(_NAME_PART.fullmatch(part) for part in name.split(".")):
            yield f"{name!r} is not an OMERO property name: letters, digits, '_' and '-' between dots", path
            continue
        if name in seen:
            first = ".".join(seen[name])
            yield f"{name} is set twice (also as {first}); keep one", path
            continue
        try:
            value = encode_value(plain(item))
        except ValueError as e:
            yield f"{name}: {e}", path
            continue
        problem = xml_problem(value)
        if problem:
            yield f"{name} {problem}", path
            continue
        out[name] = value
        seen[name] = path


# What `omero config` names are made of (and what omerowebctl config set takes).
_NAME_PART = re.compile(r"[A-Za-z0-9_-]+")


def encode_value(value: Any) -> str:
    """A TOML value as ``omero config set`` would store it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} cannot be stored as a property")
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_default)
    raise ValueError(f"unsupported TOML value {value!r}")


# What XML 1.0 can hold at all (not even as &#N;): the C0 controls but tab, LF
# and CR; U+FFFE and U+FFFF; lone surrogates. expat, and so omero-py, refuses
# a config.xml that has them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored in config.xml, or None."""
    bad = _NOT_XML.search(text)
    if bad:
        return f"contains the control character {bad.group()!r}, which config.xml cannot hold: remove it"
    return None


def _comment_text(text: str) -> str:
    """``text`` made safe inside <!-- -->: no "--", nothing XML cannot hold."""
    text = _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return re.sub("-{2,}", lambda m: "-" + "%2D" * (len(m.group()) - 1), text)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(value)


def default_session_dir(state_dir: Path) -> Path:
    """Where the daemon keeps Django's file sessions when the site named no SESSION_FILE_PATH."""
    return state_dir / "sessions"


def with_session_path(properties: Mapping[str, str], session_dir: Path) -> dict[str, str]:
    """Pin Django's file session store to ``session_dir`` unless the site chose a path.

    The default is ``tempfile.gettempdir()``: under a unit with PrivateTmp=
    every restart would log everyone out, and nothing could sweep it.
    """
    props = dict(properties)
    raw = props.get(ADDITIONAL_SETTINGS, "[]")
    try:
        pairs = json.loads(raw)
    except ValueError:
        return props  # not ours to fix: the venv check reports the bad JSON
    if not isinstance(pairs, list):
        return props
    if any(isinstance(p, list) and p and p[0] == SESSION_FILE_PATH for p in pairs):
        return props
    props[ADDITIONAL_SETTINGS] = json.dumps([*pairs, [SESSION_FILE_PATH, str(session_dir)]])
    return props


def session_file_path(properties: Mapping[str, str]) -> str | None:
    """The SESSION_FILE_PATH given in ``omero.web.django_additional_settings``, if any."""
    try:
        pairs = json.loads(properties.get(ADDITIONAL_SETTINGS, "[]"))
    except ValueError:
        return None
    for pair in pairs if isinstance(pairs, list) else ():
        if isinstance(pair, list) and len(pair) == 2 and pair[0] == SESSION_FILE_PATH:
            return str(pair[1])
    return None


def render_config_xml(properties: Mapping[str, str], source: str | None = None) -> bytes:
    """The bytes omero-py's ConfigXml would save for these properties (profile ``default``)."""
    icegrid = Element("icegrid")
    note = "Written by omerowebd" + (f" from {source}" if source else "") + "; edit that file, not this one."
    icegrid.append(Comment(f" {_comment_text(note)} "))
    active = SubElement(icegrid, "properties", id=ACTIVE)
    SubElement(active, "property", name=PROFILE_KEY, value=PROFILE)
    SubElement(active, "property", name=VERSION_KEY, value=VERSION)
    profile = Element("properties", id=PROFILE)
    SubElement(profile, "property", name=VERSION_KEY, value=VERSION)
    for name, value in properties.items():
        if name in (VERSION_KEY, PROFILE_KEY):
            continue
        problem = xml_problem(name) or xml_problem(value)
        if problem:  # config.py refuses these first; this keeps a bad file from ever being written
            raise ConfigError(f"{name}: {problem}")
        SubElement(active, "property", name=name, value=value)
        SubElement(profile, "property", name=name, value=value)
    icegrid.append(profile)
    SubElement(icegrid, "include", file="templates.xml")
    out = io.BytesIO()
    ElementTree(icegrid).write(out, encoding="UTF-8")
    return out.getvalue()


def write_config_xml(omerodir: Path, properties: Mapping[str, str], source: str | None = None) -> bool:
    """Write ``OMERODIR/etc/grid/config.xml`` atomically, mode 0600; True if it changed."""
    return write_config_bytes(config_xml_path(omerodir), render_config_xml(properties, source))


def write_config_bytes(path: Path, data: bytes) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    # `omero config` holds an flock on config.xml.lock while it edits; take
    # it too, so an admin's edit and ours never interleave.
    with open(f"{path}.lock", "a+") as lock:
        if not flock_within(lock, 10):
            raise BlockingIOError(f"{path}.lock: `omero config` (or another writer) holds it for over 10s")
        try:
            return write_atomic(path, data, mode=0o600)
        finally:
            try:
                os.unlink(f"{path}.lock")
            except FileNotFoundError:
                pass


def config_xml_path(omerodir: Path) -> Path:
    return omerodir / "etc" / "grid" / "config.xml"


def read_config_xml(path: Path) -> dict[str, str]:
    """The active profile's properties, as omero-py's ``ConfigXml.as_map()`` gives them."""
    return properties_of(path.read_bytes())


# -- the site's config.xml: written by omerowebd, and maybe by someone else ----------
#
# Every generation reads its own copy (generation.py's view); the site's file
# is for `omero config get` and the admins, written once a generation serves.
# Admins run `omero config set` out of habit: what the daemon wrote is
# remembered (a digest per property, no values) so an edit by anyone else is
# noticed, named, and never overwritten silently.

LEDGER = "config-xml.json"
MAX_CONFIG_XML = 4 * 1024 * 1024  # a bigger file is not one omero config wrote


class UnreadableConfigXml(Exception):
    """The site's config.xml cannot be read as omero-py would; the message says why."""


def _digest(name: str, value: str) -> str:
    return hashlib.sha256(json.dumps([name, value]).encode()).hexdigest()


def property_digests(properties: Mapping[str, str]) -> dict[str, str]:
    """name -> a digest of its value: enough to say which differ, and no secret on disk twice."""
    return {name: _digest(name, value) for name, value in properties.items()
            if name not in (VERSION_KEY, PROFILE_KEY)}


def read_site_properties(path: Path) -> dict[str, str] | None:
    """The active profile of the file at ``path`` (not following a link); None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UnreadableConfigXml(f"cannot read it: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableConfigXml("not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_CONFIG_XML + 1)
    if len(data) > MAX_CONFIG_XML:
        raise UnreadableConfigXml(f"over {MAX_CONFIG_XML // 1024 // 1024} MiB")
    try:
        return properties_of(data)
    except (ParseError, ValueError) as e:
        raise UnreadableConfigXml(f"not a config.xml omero-py can read: {e}") from None


def properties_of(data: bytes) -> dict[str, str]:
    root = fromstring(data)
    if root.tag != "icegrid":
        raise ValueError(f"the root element is <{root.tag}>, not <icegrid>")
    _, block = active_profile(root)
    return block_properties(block) if block is not None else {}


def active_profile(root: Element) -> tuple[str, Element | None]:
    """The profile omero-py reads (``__ACTIVE__``'s omero.config.profile, else ``default``) and its block, if any."""
    blocks = {p.get("id"): p for p in root.findall("./properties")}
    profile = PROFILE
    active = blocks.get(ACTIVE)
    for prop in active.findall("./property") if active is not None else ():
        if prop.get("name") == PROFILE_KEY:
            profile = prop.get("value") or PROFILE
    return profile, blocks.get(profile)


def block_properties(block: Element) -> dict[str, str]:
    """A profile's properties, as ``ConfigXml.as_map()`` gives them (its version and profile keys left out)."""
    return {
        str(p.get("name")): p.get("value", "")
        for p in block.findall("./property")
        if "name" in p.attrib and p.get("name") not in (VERSION_KEY, PROFILE_KEY)
    }


def read_ledger(state_dir: Path) -> dict[str, str] | None:
    """The digests of what omerowebd last wrote to the site's config.xml; None if it never did."""
    try:
        record = json.loads((state_dir / LEDGER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    digests = record.get("properties") if isinstance(record, dict) else None
    if not isinstance(digests, dict):
        return None
    return {str(k): str(v) for k, v in digests.items()}


@dataclass(frozen=True)
class ForeignEdits:
    """The site's config.xml holds what omerowebd did not write there."""

    path: Path
    names: tuple[str, ...]  # properties that differ from what omerowebd wrote (or would write)
    current: Mapping[str, str] = field(repr=False)  # the file's properties (values: never shown)
    problem: str | None = None  # the file cannot be read at all

    def lost_by(self, properties: Mapping[str, str], toml: Mapping[str, str]) -> list[str]:
        """The edited properties that writing ``properties`` would throw away.

        An edit is kept when the new config has the file's value (taken into
        the TOML, or the daemon's own addition to it, e.g. the session path).
        """
        if self.problem:
            return [self.path.name]
        def kept(name: str) -> bool:
            value = self.current.get(name)
            return value == properties.get(name) or (toml.get(name) is not None and value == toml.get(name))

        return [n for n in self.names if not kept(n)]

    def describe(self) -> str:
        if self.problem:
            return f"{self.path} was changed outside omerowebd: {self.problem}"
        names = ", ".join(self.names) if len(self.names) <= 8 else ", ".join(self.names[:8]) + f" and {len(self.names) - 8} more"
        return f"{self.path} was edited outside omerowebd: {names} differ from what omerowebd wrote"

    def ways_out(self, config_path: Path | str) -> str:
        only = " ".join(f"--only {n}" for n in self.names[:20])
        take = f"take the edits into {config_path} with `omerowebctl config import {self.path} {only}`"
        if self.problem:
            take = f"fix or remove {self.path}"
        return f"{take}, or drop them with `omerowebctl reload --discard-foreign-edits`"


def foreign_edits(omerodir: Path, state_dir: Path, wanted: Mapping[str, str], toml: Mapping[str, str]) -> ForeignEdits | None:
    """What someone else changed in the site's config.xml, or None.

    Compared with what omerowebd last wrote there; with no record of that
    (the first start, or a site moved over from `omero web start`), with what
    it would write now.
    """
    path = config_xml_path(omerodir)
    try:
        current = read_site_properties(path)
    except UnreadableConfigXml as e:
        return ForeignEdits(path, (), {}, str(e))
    if current is None:
        return None  # gone: writing it again loses nothing
    mine = read_ledger(state_dir)
    if mine is None:
        names = sorted(n for n in current if current[n] != wanted.get(n) and current[n] != toml.get(n))
    else:
        theirs = property_digests(current)
        names = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
    return ForeignEdits(path, tuple(names), current) if names else None


def write_site_config_xml(omerodir: Path, state_dir: Path, data: bytes) -> bool:
    """Write the site's config.xml and remember what it holds; True if the file changed."""
    changed = write_config_bytes(config_xml_path(omerodir), data)
    record = {"path": str(config_xml_path(omerodir)), "properties": property_digests(properties_of(data))}
    write_atomic(state_dir / LEDGER, json.dumps(record, sort_keys=True).encode() + b"\n", mode=0o600)
    return changed
