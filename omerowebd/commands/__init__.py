"""omerowebctl's commands, one module each (see omerowebd/ctl.py).

Most commands only talk to the daemon: they need where its socket is and how
long it may take, three values of the config's [daemon] table, and not the
whole config (config.py and what it checks with: tomlkit, the [omero] tree,
nginx's rules), whose import is most of omerowebctl's own start-up. So
:func:`daemon` reads those three, and :func:`load_config` the whole config
for the commands that use it.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import config_file, limits

if TYPE_CHECKING:
    from ..config import Config

DEFAULT_RUNTIME_DIR = config_file.DEFAULT_RUNTIME_DIR


def load_config(args: argparse.Namespace) -> Config:
    from .. import config as config_module  # here: the commands that only talk to the daemon never need it

    return config_module.load(config_module.config_path(args.config))


class Daemon(NamedTuple):
    """Where the daemon answers and what bounds the wait for a reload's outcome."""

    socket: Path
    ready_timeout: float  # daemon.ready_timeout
    settle_seconds: float  # daemon.settle_seconds


def daemon(args: argparse.Namespace) -> Daemon:
    """--socket, else the config's daemon.runtime_dir, else the packaged default; and the two timeouts.

    Not a check of the file (config.load is that, in the daemon too, which
    judges the file when asked to reload it): a file the daemon would reject
    must still name where it runs, so that `reload` reaches it and is told
    what is wrong. A value of the wrong type or range, or a file that cannot
    be read or parsed, gives the default; the runtime dir of a file that is
    not even TOML is looked for in its text.
    """
    path = config_file.config_path(args.config)
    table: dict[str, Any] = {}
    runtime_dir: Any = None
    try:
        data = config_file.read(path)
    except config_file.Problem:
        data = b""
    try:
        text = config_file.decode(data, path)
    except config_file.Problem:  # not UTF-8: still looked for in its text
        runtime_dir = _runtime_dir_from_text(data.decode(errors="replace"))
    else:
        try:
            found = config_file.parse_plain(text, path).get("daemon")
            table = found if isinstance(found, dict) else {}
            runtime_dir = table.get("runtime_dir")
        except config_file.Problem:
            runtime_dir = _runtime_dir_from_text(text)
    if args.socket:
        socket = Path(args.socket)
    else:
        usable = isinstance(runtime_dir, str) and runtime_dir.startswith("/") and "\0" not in runtime_dir
        socket = (Path(runtime_dir) if usable else DEFAULT_RUNTIME_DIR) / "control.sock"
    return Daemon(socket=socket, ready_timeout=_seconds(table.get("ready_timeout"), limits.READY_TIMEOUT),
                  settle_seconds=_seconds(table.get("settle_seconds"), limits.SETTLE_SECONDS))


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the runtime dir of the config, else the packaged default."""
    return Path(args.socket) if args.socket else daemon(args).socket


def _seconds(value: Any, default: float) -> float:
    """A finite number of seconds, else ``default`` (a wait must end; the daemon judges the value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    try:
        seconds = float(value)
    except OverflowError:  # TOML integers have no bound
        return default
    if not math.isfinite(seconds) or seconds < 0:
        return default
    return seconds


def _runtime_dir_from_text(text: str) -> str | None:
    in_daemon = False
    for line in text.splitlines():
        header = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            in_daemon = header.group(1) == "daemon"
            continue
        value = re.match(r"""\s*runtime_dir\s*=\s*["']([^"']+)["']""", line)
        if in_daemon and value:
            return value.group(1)
    return None
