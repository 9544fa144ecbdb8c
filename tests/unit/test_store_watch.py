"""Where the session store lives and whether it answers (omerowebd/store_watch.py), without a venv."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from omerowebd import store_watch
from omerowebd.sessions import Target
from omerowebd.store_watch import Endpoint, endpoints

INFO = type("Info", (), {"default": staticmethod(lambda name: None)})()


def target(engine: str, kind: str, store: Path | None = None) -> Target:
    return Target(engine=engine, kind=kind, store=store, omerodir=Path("/o"), python=Path("/p"), manage=Path("/m"),
                  settings=None)  # type: ignore[arg-type]


def cache(backend: str, location: object) -> dict[str, str]:
    return {"omero.web.caches": json.dumps({"default": {"BACKEND": backend, "LOCATION": location}})}


CACHE_ENGINE = "django.contrib.sessions.backends.cache"


@pytest.mark.parametrize("backend, location, expected", [
    ("django.core.cache.backends.redis.RedisCache", "redis://:pw@10.0.0.5:6380/1",
     [Endpoint("tcp", ("10.0.0.5", 6380), ping=True)]),
    ("django_redis.cache.RedisCache", "rediss://cache.example", [Endpoint("tcp", ("cache.example", 6379), ping=True)]),
    ("django.core.cache.backends.redis.RedisCache", ["redis://a:1", "redis://b:2"],
     [Endpoint("tcp", ("a", 1), ping=True), Endpoint("tcp", ("b", 2), ping=True)]),
    ("django.core.cache.backends.redis.RedisCache", "redis://a:1,redis://b:2",
     [Endpoint("tcp", ("a", 1), ping=True), Endpoint("tcp", ("b", 2), ping=True)]),
    ("django_redis.cache.RedisCache", "unix:///run/redis/redis.sock", [Endpoint("unix", "/run/redis/redis.sock", ping=True)]),
    ("django.core.cache.backends.memcached.PyMemcacheCache", "127.0.0.1:11211", [Endpoint("tcp", ("127.0.0.1", 11211))]),
    ("django.core.cache.backends.memcached.PyMemcacheCache", "unix:/tmp/m.sock", [Endpoint("unix", "/tmp/m.sock")]),
    ("django.core.cache.backends.locmem.LocMemCache", "", []),
])
def test_cache_locations(backend, location, expected):
    kind, found = endpoints(target(CACHE_ENGINE, "cache"), cache(backend, location), INFO)
    assert found == expected


def test_the_password_never_reaches_the_description():
    _, found = endpoints(target(CACHE_ENGINE, "cache"),
                         cache("django.core.cache.backends.redis.RedisCache", "redis://u:s3cret@h:1/0"), INFO)
    assert found[0].describe() == "redis at h:1"


def test_file_store_database_store_and_a_broken_caches_value(tmp_path):
    assert endpoints(target("django.contrib.sessions.backends.file", "file", tmp_path), {}, INFO) == (
        "file", [Endpoint("dir", tmp_path)])
    assert endpoints(target("django.contrib.sessions.backends.db", "db"), {}, INFO) == ("db", [])
    assert endpoints(target(CACHE_ENGINE, "cache"), {"omero.web.caches": "{not json"}, INFO) == ("cache", [])


def test_check_a_redis_that_answers_one_that_does_not_and_a_directory(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        async def fake_redis() -> str | None:
            loop = asyncio.get_running_loop()
            server.setblocking(False)

            async def answer() -> None:
                conn, _ = await loop.sock_accept(server)
                await loop.sock_recv(conn, 64)
                await loop.sock_sendall(conn, b"-NOAUTH Authentication required.\r\n")  # reachable all the same
                conn.close()

            task = asyncio.ensure_future(answer())
            result = await store_watch.check(Endpoint("tcp", ("127.0.0.1", port), ping=True))
            await task
            return result

        assert asyncio.run(fake_redis()) is None
    # the port is closed now
    assert asyncio.run(store_watch.check(Endpoint("tcp", ("127.0.0.1", port), ping=True))) == "connection refused"
    assert asyncio.run(store_watch.check(Endpoint("dir", tmp_path))) is None
    assert asyncio.run(store_watch.check(Endpoint("dir", tmp_path / "gone"))) == "missing"
