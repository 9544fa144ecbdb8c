"""Reading the config file and parsing its TOML: one way, one error format.

Where it is (:func:`config_path`), and its reading: ``config.load`` (the
daemon, ``check``, every command that needs the whole config), omerowebctl's
look-up of the daemon's socket and deadlines (``omerowebd.commands``),
``omerowebctl config set|append|unset|import`` (edit.py) and ``config
import`` (migrate.py) read through here, so the same broken file gives the same line everywhere:
``FILE:LINE:COLUMN: TOML syntax error: WHAT`` (the column counted from 1, as
editors count it). A leaf module: it imports nothing of omerowebd but the
other leaves; the callers turn :class:`Problem` into their own error.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from .names import shown

CONFIG_ENV = "OMEROWEBD_CONFIG"
DEFAULT_CONFIG = Path("/etc/omerowebd/omerowebd.toml")
# daemon.runtime_dir's default: where omerowebctl looks for the daemon's socket.
DEFAULT_RUNTIME_DIR = Path("/run/omerowebd")


def config_path(arg: str | os.PathLike[str] | None = None) -> Path:
    """``--config``, else ``$OMEROWEBD_CONFIG``, else the packaged default."""
    if arg:
        return Path(arg)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_CONFIG


class Problem(ValueError):
    """The file cannot be read or parsed; the message is one line a person can act on."""


def read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise Problem(f"{path}: config file not found (pass --config or set ${CONFIG_ENV})") from None
    except OSError as e:
        raise Problem(f"{path}: cannot read the config file: {e.strerror}") from None


def decode(data: bytes, path: str | os.PathLike[str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Problem(f"{path}: not UTF-8 text (byte {e.start})") from None


def parse(text: str, path: str | os.PathLike[str]) -> Any:
    """The tomlkit document (comments and layout kept), or Problem with one line: file:line:column: what.

    The standard library's parser judges first (:func:`parse_plain`): it
    follows the TOML spec and names the line and column of every error, where
    tomlkit raises some (a key set twice) without a position and counts
    columns from 0. tomlkit then builds the tree the callers read (it tells
    inline tables from namespaces, and keeps the layout for edits).
    """
    parse_plain(text, path)
    # Imported here: omerowebctl's commands that only look for the daemon never load it (a reload's share).
    import tomlkit
    import tomlkit.exceptions

    try:
        return tomlkit.parse(text)
    except (tomlkit.exceptions.TOMLKitError, ValueError, RecursionError) as e:
        # Only where the two parsers disagree: one line, never a traceback.
        raise Problem(f"{path}: TOML error: {_tomlkit_message(e) or type(e).__name__}") from None


def parse_plain(text: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The standard library's reading (plain dicts and values), or Problem with one line, as :func:`parse`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Problem(_toml_error(text, path, str(e))) from None
    except RecursionError:
        raise Problem(f"{path}: TOML error: values nested too deeply") from None


_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\Z")


def _toml_error(text: str, path: str | os.PathLike[str], message: str) -> str:
    position = _POSITION.search(message)
    what = message[: position.start()] if position else message
    if position and position.group(1):
        line, column = position.group(1), position.group(2)
    else:  # end of document: just after the last line's text, where the missing part belongs
        lines = text.splitlines() or [""]
        line, column = str(len(lines)), str(len(lines[-1]) + 1)
    # For a key or table given twice the line is right, the column is not (it is
    # past the value): name the line only.
    declared = re.fullmatch(r"Cannot declare \((.*?),?\) twice", what)
    if declared:
        table = ".".join(part.strip().strip("'\"") for part in declared.group(1).split(","))
        return f"{path}:{line}: table [{table}] is declared twice: merge the two into one"
    if what.startswith(("Cannot overwrite a value", "Cannot mutate")):
        return f"{path}:{line}: {_duplicate(text, what)}"
    return f"{path}:{line}:{column}: TOML syntax error: {what}"


def _duplicate(text: str, what: str) -> str:
    """A key or table given twice, named the way the file writes it."""
    import tomlkit
    import tomlkit.exceptions

    try:
        tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as e:
        named = re.match(r'Key "(.*)" already exists', str(e))
        if named:
            return f"{shown(named.group(1))} is set twice: keep one (TOML allows each key and table once)"
    except (ValueError, RecursionError):
        pass
    return f"a key or table is set twice: keep one (TOML allows each once; {what})"


def _tomlkit_message(e: Exception) -> str:
    # tomlkit appends " at line L col C" to its messages; the prefix says it already.
    return re.sub(r"\s+at line \d+ col \d+\Z", "", str(e))
