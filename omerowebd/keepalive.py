"""systemd's watchdog: WATCHDOG=1 only while the serving master lives and answers over the held socket."""

from __future__ import annotations

import asyncio
from typing import Any

from .generation import http_probe
from .running import Running
from .systemd import Notifier


async def watchdog(notifier: Notifier, running: Running, interval: float, log: Any) -> None:
    period = interval / 3
    while True:
        await asyncio.sleep(period)
        generation = running.gens.current
        if generation is None or not generation.alive or running.applied is None or not running.sockets:
            continue
        status = await http_probe(running.sockets[0].probe_target(), generation.plan.health_path,
                                  generation.plan.health_host, timeout=period)
        if status is not None and status < 500:
            notifier.watchdog()
        else:
            log.warning("health probe failed", status=status)
