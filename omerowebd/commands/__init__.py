"""omerowebctl's commands, one module each (see omerowebd/ctl.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .. import config as config_module
from ..config import Config, DaemonSettings
from ..errors import ConfigError

DEFAULT_RUNTIME_DIR = DaemonSettings.__dataclass_fields__["runtime_dir"].default


def load_config(args: argparse.Namespace) -> Config:
    return config_module.load(config_module.config_path(args.config))


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the runtime dir of the config, else the packaged default."""
    if args.socket:
        return Path(args.socket)
    try:
        runtime_dir = load_config(args).daemon.runtime_dir
    except ConfigError:
        # A broken file must not hide the running daemon: `reload` has to
        # reach it to be told the file is broken.
        runtime_dir = _runtime_dir_from_text(config_module.config_path(args.config)) or DEFAULT_RUNTIME_DIR
    return Path(runtime_dir) / "control.sock"


def _runtime_dir_from_text(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
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
