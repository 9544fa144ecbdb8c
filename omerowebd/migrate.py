"""Moving a site's OMERO properties in and out: ``omerowebctl config import|export``.

In: the backup the OMERO upgrade guide tells admins to make
(``omero config get --show-password > backup.txt``), or an existing
``etc/grid/config.xml`` (its active profile). Nothing may be lost: after the
import, the config.xml the daemon writes holds exactly the property map
omero-py reads from the original. A value is typed in the TOML (boolean,
integer, list, table) only when the venv says what it is and the file gives
back the very same text; everything else stays text.

Out: the ``omero config load`` format (``KEY=VALUE`` lines), for going back.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from xml.etree.ElementTree import ParseError, fromstring

from . import config_file, omero_config, redact, trust
from .nginx import NGINX_DIRECTIVE_PROPERTIES
from .edit import Change, Document, Knowledge, property_item, written_as
from .redact import HIDDEN, is_secret
from .omero_config import encode_value
from .errors import UserError
from .exits import EXIT_FAILURE
from .toml_values import plain

# Bigger is neither a config.xml omero wrote nor a backup of one.
MAX_SOURCE = omero_config.MAX_CONFIG_XML
# A line of `omero config get` that starts a property (names as omero-py allows them).
_ENTRY = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+)=(.*)$", re.S)


class MigrationError(UserError):
    """The source cannot be imported as it is; nothing was written."""

    exit_code = EXIT_FAILURE


@dataclass
class Source:
    path: Path
    format: str  # "config.xml" or "omero config get"
    properties: dict[str, str]
    profile: str | None = None


@dataclass
class Imported:
    changes: list[Change] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def read_source(path: Path) -> Source:
    """The properties in ``path``, whichever of the two formats it is."""
    data = _read_file(path)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return _read_config_xml(path, data)
    try:
        text = config_file.decode(data, path)
    except config_file.Problem as e:
        raise MigrationError(str(e)) from None
    return Source(path, "omero config get", parse_config_get(text, path))


def withhold_nginx_properties(source: Source) -> list[str]:
    """As root, from a file root does not alone control: take out the nginx lines root would render.

    ``check`` names the service user's config.xml when someone edited it,
    and a site moving from ``omero web start`` imports a config.xml that
    user owns; importing omero.web.nginx_server_extra_config from it would
    let that user choose directives nginx's root master reads, through
    root's own hands. A person reads such a value and sets it with ``config
    set``. Returns the names withheld (the file itself is not changed)."""
    if os.geteuid() != 0 or not trust.file_problems(source.path):
        return []
    withheld = sorted(name for name in source.properties if name in NGINX_DIRECTIVE_PROPERTIES)
    for name in withheld:
        del source.properties[name]
    return withheld


def _read_file(path: Path) -> bytes:
    """The bytes of the regular file at ``path``: never through a link, never from a FIFO or a device.

    ``check`` tells root to import OMERODIR/etc/grid/config.xml, a file the
    service user can write, and so replace: with a FIFO (root's omerowebctl
    would wait forever), /dev/zero (its memory), or a link to a file only
    root may read (whose names an error would quote). A link is refused, not
    judged: the admin names the real file instead. A directory on the way
    that is itself a link is followed only where root alone controls the
    path (else its owner chose what root reads); a file with more than one
    name may be a hard link to anything, and is refused too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MigrationError(f"{path}: a symbolic link, not followed: name the file it leads to "
                                 f"({os.path.realpath(path)}) if that is the one") from None
        raise MigrationError(f"{path}: cannot read it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MigrationError(f"{path}: not a regular file: give the output of `omero config get "
                                 "--show-password` saved to a file, or an etc/grid/config.xml")
        if os.geteuid() == 0:
            _refuse_what_root_must_not_read(path, fd, st)
        data = f.read(MAX_SOURCE + 1)
    if len(data) > MAX_SOURCE:
        raise MigrationError(f"{path}: over {MAX_SOURCE >> 20} MiB, not a config omero wrote")
    return data


def _refuse_what_root_must_not_read(path: Path, fd: int, st: os.stat_result) -> None:
    if st.st_nlink > 1:
        raise MigrationError(f"{path}: has {st.st_nlink} names (hard links): name a file with one, e.g. a copy")
    given = os.path.abspath(path)
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")  # where the open went, directory links followed
    except OSError:
        opened = os.path.realpath(given)  # no /proc: where the path leads now
    if opened == given:
        return
    # A link on the way: harmless only if nobody but root can have placed it.
    problems = trust.path_problems(os.path.dirname(given), "directory")
    if problems:
        raise MigrationError(f"{path}: reached through a symbolic link, and {problems[0]}: name the file itself "
                             f"({os.path.realpath(given)})")


def _read_config_xml(path: Path, data: bytes) -> Source:
    try:
        root = fromstring(data)
    except ParseError as e:
        raise MigrationError(f"{path}: not a config.xml omero-py can read: {e}") from None
    if root.tag != "icegrid":
        raise MigrationError(f"{path}: not an OMERO config.xml (the root element is <{root.tag}>, not <icegrid>)")
    profile, block = omero_config.active_profile(root)
    if block is None:
        raise MigrationError(f"{path}: the active profile {profile!r} has no <properties id={profile!r}> block")
    version = next((p.get("value") for p in block.findall("./property") if p.get("name") == omero_config.VERSION_KEY), None)
    if version and not version.startswith("5."):
        raise MigrationError(
            f"{path}: written by OMERO {version}, which omero-py upgrades when it opens it: import the output of "
            "`omero config get --show-password` from the installed OMERO instead")
    properties = omero_config.block_properties(block)  # from the bytes read once: the file may have changed since
    return Source(path, "config.xml", properties, profile)


def parse_config_get(text: str, path: Path) -> dict[str, str]:
    """``omero config get --show-password`` output: ``KEY=VALUE`` lines, sorted by key.

    A value with line breaks spans several lines: a line that does not start
    a new property (a name, then ``=``, sorting after the one before) goes on
    the value above. Comment and blank lines before the first property are
    skipped (so a file in ``omero config load`` format works too).
    """
    properties: dict[str, str] = {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    name: str | None = None
    for number, line in enumerate(lines, 1):
        entry = _ENTRY.match(line)
        starts = entry is not None and (name is None or entry.group(1) > name)
        if starts:
            assert entry is not None
            name = entry.group(1)
            if name in properties:
                raise MigrationError(f"{path}:{number}: {name} appears twice")
            value = entry.group(2)
            properties[name] = value
            if is_secret(name) and properties[name] == HIDDEN:
                raise MigrationError(
                    f"{path}:{number}: the value of {name} is hidden ({HIDDEN}): make the backup with "
                    "`omero config get --show-password`")
        elif name is not None:
            properties[name] += "\n" + line
        elif line.strip() and not line.lstrip().startswith("#"):
            raise MigrationError(
                f"{path}:{number}: not a KEY=VALUE line: give the output of `omero config get --show-password` "
                "or an etc/grid/config.xml")
    for ignored in (omero_config.VERSION_KEY, omero_config.PROFILE_KEY):
        properties.pop(ignored, None)
    return properties


def import_properties(
    doc: Document, source: Source, knowledge: Knowledge, *, merge: bool = False, skip: Sequence[str] = (),
    only: Sequence[str] = (),
) -> Imported:
    """Write ``source``'s properties into the [omero] tree of ``doc``.

    Without ``merge`` the tree ends up holding exactly the imported
    properties: the ones only the TOML had are removed (their comments stay).
    With ``only`` (patterns), just the matching properties are taken: set as
    the source has them, removed where it has none (how the edits someone
    made with `omero config set|unset` in the site's config.xml are taken over).
    """
    result = Imported()
    wanted: dict[str, str] = {}
    for name, value in source.properties.items():
        if any(fnmatchcase(name, pattern) for pattern in skip):
            result.skipped.append(name)
        elif not only or any(fnmatchcase(name, pattern) for pattern in only):
            wanted[name] = value
    if only:
        for name, value in sorted(doc.properties().items()):
            if name not in wanted and any(fnmatchcase(name, p) for p in only) \
                    and not any(fnmatchcase(name, p) for p in skip):
                doc.unset_property(name)
                result.removed.append(name)
                result.changes.append(Change(name, value, None, "removed"))
        merge = True
    foreign = sorted(n for n in wanted if not n.startswith("omero."))
    if foreign:
        raise MigrationError(
            f"{source.path}: {', '.join(foreign)}: not OMERO properties (only omero.* reach OMERO.web's "
            "config.xml); leave them out with --skip 'NAME'")
    if not merge:
        for name, value in sorted(doc.properties().items()):
            if name not in wanted:
                doc.unset_property(name)
                result.removed.append(name)
                result.changes.append(Change(name, value, None, "removed"))
    names = set(wanted) | knowledge.value_names()
    for name in sorted(wanted):
        value = wanted[name]
        found = doc.find(name)
        before = encode_value(plain(found[2])) if found else None
        item = property_item(name, value, knowledge.kind(name), exact=True)
        doc.set_property(name, item, names)
        result.changes.append(Change(name, before, value, written_as(item)))
    return result


# -- export ----------------------------------------------------------------------


def export_text(properties: dict[str, str], *, show_secrets: bool, source: str) -> tuple[str, list[str]]:
    """The properties in the ``omero config load`` format, and warnings for what it cannot carry.

    What is left out is said in comments at the top, so that the rest is
    plain ``KEY=VALUE`` lines (``config import`` reads the file back too).
    """
    warnings: list[str] = []
    notes: list[str] = []
    entries: list[str] = []
    for name in sorted(properties):
        value = properties[name]
        hidden = redact.value(name, value)
        if hidden != value and not show_secrets:
            # Left out whole: a load must not set a password to "********". Shown
            # with the secrets hidden, so the reader still sees what is set.
            notes.append(f"# {name}={_one_line(hidden)} (hidden: export with --show-password to carry it)")
            warnings.append(f"{name} is hidden: export with --show-password to carry it")
            continue
        problem = load_problem(value)
        if problem:
            notes.append(f"# {name}: left out, {problem}; set it with: omero config set {name} VALUE")
            warnings.append(f"{name} left out: {problem}")
            continue
        entries.append(f"{name}={value}")
    head = [
        f"# OMERO properties exported by omerowebctl from {source} at {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "# Load them with: omero config load FILE",
    ]
    return "\n".join([*head, *notes, *entries]) + "\n", warnings


def _one_line(text: str | None) -> str:
    return (text or "").replace("\r", " ").replace("\n", " ")


def load_problem(value: str) -> str | None:
    """Why ``omero config load`` would not read ``value`` back as it is (it strips lines, joins on '\\')."""
    if "\n" in value or "\r" in value:
        return "the value has line breaks, which `omero config load` cannot read"
    if value != value.strip():
        return "`omero config load` would strip the spaces around the value"
    if value.endswith("\\"):
        return "`omero config load` would read the trailing '\\' as a line continuation"
    return None
