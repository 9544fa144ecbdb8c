"""What `omerowebctl status` shows: the daemon's own state, what runs, and each service beside gunicorn."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .desired import Desired
from .running import Running
from .watch import ConfigWatcher


class _Service(Protocol):
    def status(self) -> dict[str, Any]: ...


def report(*, state: str, started_at: float, config_path: Path, watcher: ConfigWatcher | None,
           last_reload: Mapping[str, Any] | None, reloads: int, running: Running,
           services: Mapping[str, _Service]) -> dict[str, Any]:
    applied: Desired | None = running.applied
    current = running.gens.current
    return {
        "state": state,
        "serving": current is not None and current.state == "serving",
        "pid": os.getpid(),
        "started_at": started_at,
        "uptime": round(time.time() - started_at, 1),
        "config": {"path": str(config_path), "digest": applied.config.digest if applied else None,
                   "problem": watcher.problem if watcher else None},
        "last_reload": last_reload,
        "reloads": reloads,
        "versions": dict(applied.info.versions) if applied else {},
        **running.status(),  # generations, sockets, config.xml, static files, nginx files
        **{name: service.status() for name, service in services.items()},
    }
