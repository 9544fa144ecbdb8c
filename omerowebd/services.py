"""What runs beside gunicorn on its own schedule, each told of every config that serves.

The session sweeper, the session store's watch, the session and cache
stores' health (asked live by status and the metrics), the metrics
endpoint. The supervisor only tells them of a config, starts them and asks
their status; each decides what the config means for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from . import metrics
from .config import Config
from .sessions import SessionService
from .store_health import StoreHealth
from .store_watch import StoreWatch
from .venv import VenvInfo


class Service(Protocol):
    def update(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> None: ...

    async def run(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


def beside_gunicorn(log: Any, daemon: Any) -> dict[str, Service]:
    """By the name their status goes under; ``daemon`` is what the metrics read at scrape time."""
    return {
        "sessions": SessionService(log),
        "session_store": StoreWatch(log),
        "store_health": StoreHealth(),
        "metrics": metrics.MetricsService(log, daemon),  # on daemon.metrics, when set
    }
