"""Is the session store there?

OMERO.web without its session store still serves what needs no session (the
login page, static files: the daemon's own health probe passes), but every
signed-in user gets an error. Nothing the daemon could do to gunicorn helps:
restarting OMERO.web would only drop the requests that still work. So the
daemon keeps serving and says so: one line in the log when the store goes
away and one when it is back, and the state in ``omerowebctl status``.

What is checked, every CHECK_INTERVAL seconds and after every applied config:
* a cache store (Redis, memcached): every server of the cache the sessions
  live in, asked as ``omerowebctl status`` asks it (store_health.probe: for
  Redis AUTH with the password the site gives, SELECT, PING; for memcached
  ``version``), within CHECK_TIMEOUT: one Redis check in the package, so the
  watch and the status never disagree on a password the server refuses;
* Django's file store: the directory exists and the daemon can write it;
* anything else (a database store, an in-process cache): not checked.

Addresses are shown as host:port or a socket path, never as the URL, which
may carry a password.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import store_health
from .config import Config
from .errors import one_line, os_error_text
from .sessions import Target, target_for
from .threads import Looks, NoAnswer
from .venv import VenvInfo

CHECK_INTERVAL = 10.0
CHECK_TIMEOUT = 3.0  # seconds one server has for connect, AUTH and PING: a log line is worth a patient ask


@dataclass(frozen=True)
class Directory:
    """Django's file store: the directory the sessions are files in."""

    path: Path

    def describe(self) -> str:
        return f"file store {self.path}"


Endpoint = store_health.Endpoint | Directory  # a cache's server, or the file store's directory


def endpoints(target: Target, properties: Mapping[str, str], info: VenvInfo) -> tuple[str, list[Endpoint]]:
    """(what the store is, where to check it); no endpoints: not checked."""
    if target.kind == "file" and target.store is not None:
        return "file", [Directory(target.store)]
    if not target.engine.startswith("django.contrib.sessions.backends.cache"):
        return target.kind, []
    alias = store_health.session_cache_alias(properties)
    cache = next((c for c in store_health.caches(properties, info)[0] if c.alias == alias), None)
    if cache is None or cache.kind not in ("redis", "memcached"):
        return "cache", []
    return cache.kind, list(cache.endpoints)


def directory_problem(path: Path) -> str | None:
    """None when the daemon's user can write the store; else why not. Blocks on a hung mount."""
    if not path.is_dir():
        return "missing"
    if os.access(path, os.W_OK | os.X_OK):
        return None
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return "on a read-only file system"
    return "not writable by the daemon's user"


# A check every 10 s for the daemon's life, each in a kept thread of its store's: a store on a
# hung mount must not stop the event loop (reloads, status, systemd's watchdog) nor hold a
# thread of its pool, and a check that hangs is waited on again, never joined by a second.
_directory_looks: Looks[Path, str | None] = Looks(
    "store-check", lambda path: directory_problem(path),
    on_error=lambda e: os_error_text(e) if isinstance(e, OSError) else one_line(e))


async def check(endpoint: Endpoint, timeout: float = CHECK_TIMEOUT) -> str | None:
    """None when it answers; else why not, in a few words."""
    if isinstance(endpoint, Directory):
        try:
            return await _directory_looks.answer(endpoint.path, within=timeout)
        except NoAnswer as e:
            return f"no answer for {e.seconds:.0f}s (a hung mount?)"
    answer = await store_health.probe(endpoint, timeout)
    return None if answer.ok else answer.why


class StoreWatch:
    """A Service beside the sweeper: checks the store on its own clock, reports changes once."""

    def __init__(self, log: Any, interval: float = CHECK_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self.kind: str | None = None
        self.endpoints: list[Endpoint] = []
        self.problems: dict[str, str] = {}  # endpoint -> why it does not answer
        self.since: float | None = None  # unreachable since
        self.checked_at: float | None = None
        self._changed = asyncio.Event()

    def update(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> None:
        self.kind, self.endpoints = endpoints(target_for(config, properties, info), properties, info)
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed.clear()
            await self.check_now()
            try:
                await asyncio.wait_for(self._changed.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def check_now(self) -> None:
        endpoints = list(self.endpoints)
        whys = await asyncio.gather(*(check(e) for e in endpoints))  # at once: about the slowest one's time
        found = {e.describe(): why for e, why in zip(endpoints, whys) if why}
        self.checked_at = time.time()
        if found and found != self.problems:
            self.since = self.since or self.checked_at
            self.log.warning("session store unavailable; OMERO.web keeps serving, signed-in users get errors "
                             "until it is back", problems="; ".join(f"{where}: {why}" for where, why in found.items()))
        elif not found and self.problems:
            self.log.info("session store available again", store=", ".join(self.problems))
            self.since = None
        self.problems = found

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "checked": [e.describe() for e in self.endpoints],
            "available": not self.problems if self.endpoints else None,
            "problems": dict(self.problems),
            "unavailable_since": self.since,
            "checked_at": self.checked_at,
        }

