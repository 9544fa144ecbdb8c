"""Do the caches OMERO.web uses answer right now, and how fast?

``omerowebctl status`` names every cache of ``omero.web.caches`` (OMERO.web's
default when unset) and, where that costs one round trip, asks it now:

* Redis (django-redis's ``django_redis.cache.RedisCache``, Django's own
  ``django.core.cache.backends.redis.RedisCache``; LOCATION as ``redis://``,
  ``rediss://`` (TLS) or ``unix://`` URLs, one, a list, or comma-separated):
  connect, AUTH when the site gives a password (in the URL, its query, or
  OPTIONS), SELECT a database other than 0, PING;
* memcached: connect and ``version``;
* anything else (this host's memory, a directory, a database): named, not asked.

Each answer is one of: answers (with the PING's round trip), refused (nothing
listens: a stopped server), timeout (something accepted the connection and
said nothing: a paused or overloaded server, a firewall that drops), error
(it answered, but not as OMERO.web needs: a password refused, not Redis, TLS
failed). Every endpoint is asked at once, each within TIMEOUT, so a status
with every backend down still returns within about TIMEOUT.

The daemon asks, as the service user OMERO.web runs as. A status flood must not
become a Redis flood: a result is reused for FRESH seconds, and requests that
arrive while a check runs wait for that one.

RESP over asyncio streams, not redis-py: a PING is three short lines, the
daemon's package then needs no client library for a status line, and one
deadline covers connect, TLS, AUTH and PING on the daemon's own event loop.

Addresses are shown as host:port or a socket path, never as the URL (which
may carry a password); a password is only ever sent to the server the site
named, as OMERO.web itself sends it.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import printable
from .sessions import DEFAULT_ENGINE
from .status_lines import ANSWERS
from .venv import VenvInfo, effective

DEFAULT_CACHES = '{"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}'  # OMERO.web's, when unset
TIMEOUT = 1.0  # seconds one endpoint has for connect, TLS, AUTH and PING together
FRESH = 1.0  # seconds a check's result is shown again instead of asking anew
SESSION_ENGINE = "omero.web.session_engine"
CACHES = "omero.web.caches"
CACHE_ENGINES = ("django.contrib.sessions.backends.cache", "django.contrib.sessions.backends.cached_db")
REFUSED, TIMEOUT_STATE, ERROR = "refused", "timeout", "error"  # and status_lines.ANSWERS


@dataclass(frozen=True)
class Endpoint:
    """One server a cache lives on: ("tcp", (host, port)) or ("unix", path)."""

    speaks: str  # "redis" or "memcached"
    how: str
    where: Any
    tls: bool = False
    verify: bool = True  # rediss://...?ssl_cert_reqs=none turns it off, as in redis-py
    db: int = 0
    # What OMERO.web would authenticate with; kept out of repr and describe().
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.how == "unix":
            return f"{self.speaks} at unix:{self.where}"
        host, port = self.where
        host = f"[{host}]" if ":" in host else host
        return f"{self.speaks}{' (TLS)' if self.tls else ''} at {host}:{port}"


@dataclass(frozen=True)
class Cache:
    """One entry of omero.web.caches."""

    alias: str
    backend: str
    kind: str  # "redis", "memcached", "locmem", "dummy", "file", "db" or "other"
    endpoints: tuple[Endpoint, ...] = ()
    problem: str | None = None  # a LOCATION that could not be read

    @property
    def note(self) -> str:
        return {
            "locmem": "this process's memory: each worker and each host has its own",
            "dummy": "keeps nothing",
            "file": "a directory on this host",
            "db": "a database table",
        }.get(self.kind, "not checked")


@dataclass(frozen=True)
class Answer:
    state: str  # ANSWERS, REFUSED, TIMEOUT_STATE or ERROR
    why: str  # a few words
    ms: float | None = None  # one round trip (PING, version), when it answered

    @property
    def ok(self) -> bool:
        return self.state == ANSWERS


# -- what the config names ---------------------------------------------------------------


def session_engine(properties: Mapping[str, str], info: VenvInfo) -> str:
    """The session engine OMERO.web runs with: set, else the venv's default."""
    return effective(properties, info, SESSION_ENGINE, DEFAULT_ENGINE) or DEFAULT_ENGINE


def caches(properties: Mapping[str, str], info: VenvInfo) -> tuple[list[Cache], str | None]:
    """(every cache of omero.web.caches, a problem with the value); the venv's default when unset."""
    raw = effective(properties, info, CACHES, DEFAULT_CACHES) or DEFAULT_CACHES
    try:
        table = json.loads(raw)
    except ValueError:
        return [], f"{CACHES} is not JSON"
    if not isinstance(table, dict):
        return [], f"{CACHES} is not a JSON object"
    return [cache(str(alias), spec) for alias, spec in table.items()], None


def cache(alias: str, spec: Any) -> Cache:
    if not isinstance(spec, dict):
        return Cache(alias, "", "other", problem="not a JSON object")
    backend = str(spec.get("BACKEND", ""))
    kind = kind_of(backend)
    if kind not in ("redis", "memcached"):
        return Cache(alias, backend, kind)
    options = spec.get("OPTIONS") if isinstance(spec.get("OPTIONS"), dict) else {}
    found, problems = [], []
    for location in _locations(spec.get("LOCATION")):
        try:
            found.append(redis_endpoint(location, options) if kind == "redis" else memcached_endpoint(location))
        except ValueError as e:
            problems.append(str(e))
    return Cache(alias, backend, kind, tuple(found), "; ".join(problems) or None)


def kind_of(backend: str) -> str:
    name = backend.lower()
    # locmem before memcache: "LocMemCache" holds both words.
    for word, kind in (("redis", "redis"), ("locmem", "locmem"), ("memcache", "memcached"), ("dummy", "dummy"),
                       ("filebased", "file"), ("db.databasecache", "db")):
        if word in name:
            return kind
    return "other"


def _locations(value: Any) -> list[str]:
    # Django and django-redis take a list, or one string split at commas (Django's memcached: ";" too).
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    if not isinstance(value, list):
        return []
    return [str(v).strip() for v in value if str(v).strip()]


def redis_endpoint(location: str, options: Mapping[str, Any] | None = None) -> Endpoint:
    """A redis://, rediss:// or unix:// URL (as redis-py's from_url reads it); ValueError names no secret."""
    options = options or {}
    try:
        url = urlsplit(location)
        port = url.port
    except ValueError:
        raise ValueError("a LOCATION is not a URL redis-py can read") from None
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    password = _text(url.password) or query.get("password") or _option(options, "password")
    username = _text(url.username) or query.get("username") or _option(options, "username")
    db = query.get("db") or url.path.strip("/") if url.scheme != "unix" else query.get("db")
    try:
        number = int(db or 0)
    except ValueError:
        raise ValueError(f"a LOCATION's database is not a number ({url.scheme}://{url.hostname or ''}...)") from None
    auth = {"username": username or None, "password": password or None, "db": number}
    if url.scheme == "unix":
        if not url.path:
            raise ValueError("a unix:// LOCATION names no socket path")
        return Endpoint("redis", "unix", unquote(url.path), **auth)
    if url.scheme not in ("redis", "rediss"):
        raise ValueError(f"a LOCATION starts with {url.scheme + '://' if url.scheme else 'no scheme'}, "
                         "not redis://, rediss:// or unix://")
    verify = (query.get("ssl_cert_reqs") or str(_option(options, "ssl_cert_reqs") or "")).lower() not in ("none",)
    return Endpoint("redis", "tcp", (url.hostname or "localhost", port or 6379), tls=url.scheme == "rediss",
                    verify=verify, **auth)


def memcached_endpoint(location: str) -> Endpoint:
    if location.startswith("unix:"):
        return Endpoint("memcached", "unix", location[5:].removeprefix("//"))
    host, _, port = location.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a LOCATION is not HOST:PORT or unix:/path ({location[:40]})")
    return Endpoint("memcached", "tcp", (host.strip("[]"), int(port)))


def _text(value: str | None) -> str | None:
    return unquote(value) if value else None


def _option(options: Mapping[str, Any], name: str) -> str | None:
    # django-redis reads OPTIONS["PASSWORD"]; Django's RedisCache hands OPTIONS to redis-py ("password").
    for key in (name.upper(), name):
        if isinstance(options.get(key), str) and options[key]:
            return options[key]
    return None


def session_cache_alias(properties: Mapping[str, str]) -> str:
    """SESSION_CACHE_ALIAS: Django's "default" unless omero.web.django_additional_settings sets it."""
    try:
        pairs = json.loads(properties.get("omero.web.django_additional_settings", "[]"))
    except ValueError:
        return "default"
    for pair in pairs if isinstance(pairs, list) else ():
        if isinstance(pair, list) and len(pair) == 2 and pair[0] == "SESSION_CACHE_ALIAS" and isinstance(pair[1], str):
            return pair[1]
    return "default"


# -- asking ------------------------------------------------------------------------------


async def probe(endpoint: Endpoint, timeout: float = TIMEOUT) -> Answer:
    """Ask one endpoint, within ``timeout`` seconds all told."""
    try:
        return await asyncio.wait_for(_ask(endpoint), timeout)
    except asyncio.TimeoutError:
        return Answer(TIMEOUT_STATE, f"no answer within {timeout:g} s")
    except ConnectionRefusedError:
        return Answer(REFUSED, "connection refused")
    except FileNotFoundError:
        return Answer(REFUSED, "no such socket")
    except socket.gaierror:
        return Answer(ERROR, "host name not found")
    except ssl.SSLError as e:
        return Answer(ERROR, f"TLS failed ({e.reason or 'handshake'})".lower())
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return Answer(ERROR, "closed the connection without answering")
    except OSError as e:
        return Answer(ERROR, (e.strerror or str(e) or type(e).__name__).lower())
    except ValueError:  # a host name IDNA cannot encode, a port out of range
        return Answer(ERROR, "not an address to connect to")
    except _Refused as e:
        return Answer(ERROR, str(e))


async def probe_all(endpoints: list[Endpoint], timeout: float = TIMEOUT) -> list[Answer]:
    """Every endpoint at once: the whole check takes about the slowest one, never more than ``timeout``."""
    return list(await asyncio.gather(*(probe(e, timeout) for e in endpoints)))


class _Refused(Exception):
    """It answered, but not as OMERO.web needs (the words are shown)."""


async def _ask(endpoint: Endpoint) -> Answer:
    context = None
    if endpoint.tls:
        context = ssl.create_default_context()
        if not endpoint.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if endpoint.how == "unix":
        reader, writer = await asyncio.open_unix_connection(endpoint.where)
    else:
        reader, writer = await asyncio.open_connection(*endpoint.where, ssl=context)
    try:
        if endpoint.speaks == "memcached":
            started = time.perf_counter()
            writer.write(b"version\r\n")
            reply = await reader.readline()
            ms = (time.perf_counter() - started) * 1000
            if not reply.startswith(b"VERSION "):
                raise _Refused("not a memcached server")
            return Answer(ANSWERS, "answers", round(ms, 2))
        if endpoint.password:
            words = [endpoint.username, endpoint.password] if endpoint.username else [endpoint.password]
            reply = await _command(reader, writer, b"AUTH", *words)
            if not reply.startswith(b"+"):
                raise _Refused(f"refuses the password ({_error_word(reply)})")
        if endpoint.db:
            reply = await _command(reader, writer, b"SELECT", str(endpoint.db))
            if not reply.startswith(b"+"):
                raise _Refused(f"refuses database {endpoint.db} ({_error_word(reply)})")
        started = time.perf_counter()
        reply = await _command(reader, writer, b"PING")
        ms = (time.perf_counter() - started) * 1000
        if reply.startswith(b"-NOAUTH"):
            raise _Refused("wants a password the site does not give")
        if reply.startswith(b"-"):
            raise _Refused(f"refuses PING ({_error_word(reply)})")
        if not reply.startswith(b"+PONG"):
            raise _Refused("not a Redis server")
        return Answer(ANSWERS, "answers", round(ms, 2))
    finally:
        writer.close()


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: bytes, *args: str) -> bytes:
    parts = [name, *(a.encode() for a in args)]
    writer.write(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise asyncio.IncompleteReadError(b"", None)
    return line


def _error_word(reply: bytes) -> str:
    # "-WRONGPASS invalid username-password pair ..." -> "WRONGPASS"; a server's words never carry the password.
    word = reply[1:].split(None, 1)[0] if reply[1:].strip() else b"no reason"
    return printable.text(word[:32].decode("ascii", "replace"))


# -- the daemon's side -------------------------------------------------------------------


class StoreHealth:
    """A Service of the daemon: the caches of the applied config, asked when someone wants to know.

    Nothing runs on a clock (the session store's own watch, store_watch.py, does
    that and logs changes); :meth:`refresh` asks at most once per FRESH seconds,
    and a request that arrives while a check runs waits for that one.
    """

    def __init__(self, timeout: float = TIMEOUT, fresh: float = FRESH) -> None:
        self.timeout = timeout
        self.fresh = fresh
        self.engine: str | None = None
        self.engine_set = False  # False: OMERO.web's default
        self.session_alias: str | None = None  # the cache the session engine keeps sessions in
        self.caches: list[Cache] = []
        self.problem: str | None = None
        self.answers: dict[Endpoint, Answer] = {}
        self.checked_at: float | None = None  # time.time() of the last check
        self._checked_mono = -math.inf
        self._running: asyncio.Task[None] | None = None
        self._generation = 0  # bumped by update(): a check of an older config is not shown

    def update(self, config: Any, properties: Mapping[str, str], info: VenvInfo) -> None:
        self.engine = session_engine(properties, info)
        self.engine_set = SESSION_ENGINE in properties
        self.session_alias = session_cache_alias(properties) if self.engine in CACHE_ENGINES else None
        self.caches, self.problem = caches(properties, info)
        self.answers, self.checked_at, self._checked_mono = {}, None, -math.inf
        self._generation += 1

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing on a clock: see the class's doc

    async def refresh(self) -> None:
        """Ask every endpoint, unless a result younger than FRESH seconds is there; never raises."""
        if time.monotonic() - self._checked_mono < self.fresh:
            return
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._check())
        try:
            await asyncio.shield(self._running)
        except Exception:  # a bug here must never fail a status
            pass

    async def _check(self) -> None:
        generation = self._generation
        endpoints = list(dict.fromkeys(e for c in self.caches for e in c.endpoints))
        answers = await probe_all(endpoints, self.timeout)
        if generation == self._generation:
            self.answers = dict(zip(endpoints, answers))
            self.checked_at, self._checked_mono = time.time(), time.monotonic()

    def session_store_reachable(self) -> bool | None:
        """For a metric: do all the session cache's servers answer (last check)? None: not a cache that is asked."""
        session = next((c for c in self.caches if c.alias == self.session_alias), None)
        if session is None or not session.endpoints or not self.answers:
            return None
        return all(self.answers.get(e, Answer(ERROR, "")).ok for e in session.endpoints)

    def status(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "engine_default": not self.engine_set,
            "session_cache": self.session_alias,
            "problem": self.problem,
            "timeout": self.timeout,
            "checked_at": self.checked_at,
            "caches": [{
                "alias": c.alias, "backend": c.backend, "kind": c.kind, "note": c.note, "problem": c.problem,
                "endpoints": [
                    {"where": e.describe(), **({"state": a.state, "why": a.why, "ms": a.ms}
                                               if (a := self.answers.get(e)) else {"state": None})}
                    for e in c.endpoints
                ],
            } for c in self.caches],
        }
