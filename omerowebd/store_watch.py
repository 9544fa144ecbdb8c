"""Is the session store there?

OMERO.web without its session store still serves what needs no session (the
login page, static files: the daemon's own health probe passes), but every
signed-in user gets an error. Nothing the daemon could do to gunicorn helps:
restarting OMERO.web would only drop the requests that still work. So the
daemon keeps serving and says so: one line in the log when the store goes
away and one when it is back, and the state in ``omerowebctl status``.

What is checked, every CHECK_INTERVAL seconds and after every applied config:
* a Redis cache (Django's own RedisCache, django-redis): connect to each
  LOCATION and PING (any Redis reply counts: a password the URL carries is
  never sent, so "NOAUTH" means reachable);
* a memcached cache: connect to each LOCATION;
* Django's file store: the directory exists and the daemon can write it;
* anything else (a database store, an in-process cache): not checked.

Addresses are shown as host:port or a socket path, never as the URL, which
may carry a password.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .sessions import Target, target_for
from .venv import VenvInfo, effective

CHECK_INTERVAL = 10.0
CONNECT_TIMEOUT = 3.0
DEFAULT_CACHES = '{"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}'


@dataclass(frozen=True)
class Endpoint:
    """One place the store lives: ("tcp", (host, port)), ("unix", path) or ("dir", path)."""

    how: str
    where: Any
    ping: bool = False  # speak Redis

    def describe(self) -> str:
        if self.how == "tcp":
            host, port = self.where
            return f"{'redis' if self.ping else 'memcached'} at {host}:{port}"
        if self.how == "unix":
            return f"{'redis' if self.ping else 'memcached'} at unix:{self.where}"
        return f"file store {self.where}"


def endpoints(target: Target, properties: Mapping[str, str], info: VenvInfo) -> tuple[str, list[Endpoint]]:
    """(what the store is, where to check it); no endpoints: not checked."""
    if target.kind == "file" and target.store is not None:
        return "file", [Endpoint("dir", target.store)]
    if not target.engine.startswith("django.contrib.sessions.backends.cache"):
        return target.kind, []
    try:
        caches = json.loads(effective(properties, info, "omero.web.caches", DEFAULT_CACHES) or DEFAULT_CACHES)
        cache = caches.get("default") or {}
        backend = str(cache.get("BACKEND", ""))
        locations = cache.get("LOCATION") or []
    except (ValueError, AttributeError):
        return "cache", []
    if isinstance(locations, str):
        locations = [part for part in locations.replace(";", ",").split(",") if part.strip()]
    if "redis" in backend.lower():
        return "redis", [e for e in (_redis_endpoint(str(loc).strip()) for loc in locations) if e]
    if "memcache" in backend.lower():
        return "memcached", [e for e in (_memcached_endpoint(str(loc).strip()) for loc in locations) if e]
    return "cache", []


def _redis_endpoint(location: str) -> Endpoint | None:
    try:
        url = urlsplit(location)
        if url.scheme == "unix":
            return Endpoint("unix", url.path, ping=True)
        if url.scheme in ("redis", "rediss"):
            return Endpoint("tcp", (url.hostname or "localhost", url.port or 6379), ping=True)
    except ValueError:
        pass
    return None


def _memcached_endpoint(location: str) -> Endpoint | None:
    if location.startswith("unix:"):
        return Endpoint("unix", location[5:])
    host, _, port = location.rpartition(":")
    if host and port.isdigit():
        return Endpoint("tcp", (host.strip("[]"), int(port)))
    return None


async def check(endpoint: Endpoint) -> str | None:
    """None when it answers; else why not, in a few words."""
    if endpoint.how == "dir":
        path = Path(endpoint.where)
        if not path.is_dir():
            return "missing"
        if os.access(path, os.W_OK | os.X_OK):
            return None
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only file system"
        return "not writable by the daemon's user"
    try:
        if endpoint.how == "unix":
            connect = asyncio.open_unix_connection(endpoint.where)
        else:
            connect = asyncio.open_connection(*endpoint.where)
        reader, writer = await asyncio.wait_for(connect, CONNECT_TIMEOUT)
    except asyncio.TimeoutError:
        return "no answer"
    except OSError as e:
        return _why(e)
    try:
        if not endpoint.ping:
            return None
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        reply = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT)
        return None if reply[:1] in (b"+", b"-") else "not a Redis server"
    except asyncio.TimeoutError:
        return "no answer to PING"
    except OSError as e:
        return _why(e)
    finally:
        writer.close()


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
        found = {}
        for endpoint in self.endpoints:
            why = await check(endpoint)
            if why:
                found[endpoint.describe()] = why
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


def _why(error: OSError) -> str:
    # asyncio's connect error text is "Connect call failed (host, port)": the errno says more.
    return (os.strerror(error.errno) if error.errno else str(error)).lower()
