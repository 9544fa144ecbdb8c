"""Settle: is a generation that just took over staying up, or must the previous config come back?

A new generation is cut over once every worker has loaded the app and one
probe answered. Some faults show only later: a plugin that kills its worker
after each request, a leak that gets workers OOM-killed, a dependency that
answers the first request and then hangs. For ``daemon.settle_seconds``
after the cutover the daemon watches the new generation: more than
``daemon.settle_worker_deaths`` worker deaths, its master exiting, or its
health probe failing twice in a row is a verdict against it, and the
supervisor brings the previous config back (a new generation for it, through
the same bring-up path as any reload) and reports the reload as reverted.

This module only judges: it is given the generation (anything with the few
attributes of :class:`Watched`) and a probe function, and returns a
:class:`Verdict`. It changes nothing.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from . import limits, metrics
from .config import Config
from .generation import Generation, http_probe

# Two failed probes in a row: one alone may be a worker that died holding it (counted as a death).
PROBES_IN_A_ROW = 2
PROBE_INTERVAL = 1.0
# As long as the boot probe waits: a sync worker busy with a long request delays it, and that is no fault.
PROBE_TIMEOUT = limits.SETTLE_PROBE_TIMEOUT
POLL = 0.1  # how often worker deaths and the master are looked at


class Watched(Protocol):
    """What the verdict needs of a generation (generation.Generation has it)."""

    number: int
    worker_faults: int  # workers that died or hung while serving, counted by the generation
    exit_status: int | None

    @property
    def alive(self) -> bool: ...


@dataclass(frozen=True)
class Rule:
    """How long to watch and what counts as a crash loop (from [daemon])."""

    seconds: float
    worker_deaths: int  # more than this many within the window is a crash loop
    probe_interval: float = PROBE_INTERVAL
    probe_timeout: float = PROBE_TIMEOUT

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    @classmethod
    def of(cls, config: Config) -> Rule:
        return cls(seconds=config.daemon.settle_seconds, worker_deaths=config.daemon.settle_worker_deaths)


@dataclass(frozen=True)
class Verdict:
    settled: bool
    reason: str  # why not; "" when settled
    seconds: float  # how long the watch took
    worker_deaths: int
    probes: int
    failed_probes: int

    def describe(self) -> dict[str, object]:
        return {"settled": self.settled, "reason": self.reason or None, "seconds": round(self.seconds, 3),
                "worker_deaths": self.worker_deaths, "probes": self.probes, "failed_probes": self.failed_probes}


Probe = Callable[[], Awaitable["int | None"]]  # an HTTP status, or None for no answer


def probe_of(generation: Generation) -> Probe:
    """The health probe through the generation's own socket (only it listens there), timed for the metrics."""
    async def probe() -> int | None:
        started = time.monotonic()
        status = await http_probe((socket.AF_UNIX, str(generation.probe_path)), generation.plan.health_path,
                                  generation.plan.health_host, timeout=PROBE_TIMEOUT)
        metrics.probed(time.monotonic() - started, status)
        return status

    return probe


async def watch(generation: Watched, rule: Rule, probe: Probe, *,
                clock: Callable[[], float] = time.monotonic) -> Verdict:
    """Watch ``generation`` for ``rule.seconds``; the verdict.

    A probe is healthy when it gets an answer below 500 within
    ``rule.probe_timeout``. Probes run one at a time, every
    ``rule.probe_interval``, the first one interval after the start (the
    generation has just answered one). The window never ends on a failed
    probe: one more decides. Deaths and the master are looked at between
    probes as well, so a crash loop ends the watch as soon as it shows.
    """
    start = clock()
    base = generation.worker_faults
    deadline = start + rule.seconds
    next_probe = start + min(rule.probe_interval, rule.seconds)
    probes = failed = in_a_row = 0
    pending: asyncio.Task[int | None] | None = None

    def verdict(reason: str = "") -> Verdict:
        if pending is not None and not pending.done():
            pending.cancel()
        return Verdict(settled=not reason, reason=reason, seconds=clock() - start,
                       worker_deaths=generation.worker_faults - base, probes=probes, failed_probes=failed)

    while True:
        if not generation.alive:
            return verdict(f"its gunicorn master exited (status {generation.exit_status})"
                           f" {clock() - start:.1f}s after the cutover")
        deaths = generation.worker_faults - base
        if deaths > rule.worker_deaths:
            return verdict(f"{deaths} gunicorn workers died within {clock() - start:.1f}s of the cutover"
                           f" (more than daemon.settle_worker_deaths = {rule.worker_deaths})")
        if pending is not None and pending.done():
            status = None if pending.cancelled() or pending.exception() else pending.result()
            pending = None
            probes += 1
            if status is not None and status < 500:
                in_a_row = 0
            else:
                failed += 1
                in_a_row += 1
                if in_a_row >= PROBES_IN_A_ROW:
                    what = "no answer" if status is None else f"HTTP {status}"
                    return verdict(f"its health probe failed {in_a_row} times in a row (last: {what})"
                                   f" within {clock() - start:.1f}s of the cutover")
        now = clock()
        if pending is None:
            if now >= deadline and in_a_row == 0 and probes > 0:
                return verdict()
            if now >= next_probe or now >= deadline:
                pending = asyncio.ensure_future(asyncio.wait_for(probe(), rule.probe_timeout))
                next_probe = now + rule.probe_interval
        await asyncio.sleep(POLL)
