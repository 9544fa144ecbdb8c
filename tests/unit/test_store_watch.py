"""Where the session store lives and whether it answers (omerowebd/store_watch.py), without a venv."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from omerowebd import store_watch
from omerowebd.sessions import Target
from omerowebd.store_health import Endpoint
from omerowebd.store_watch import Directory, endpoints

INFO = type("Info", (), {"default": staticmethod(lambda name: None)})()


def target(engine: str, kind: str, store: Path | None = None) -> Target:
    return Target(engine=engine, kind=kind, store=store, omerodir=Path("/o"), python=Path("/p"), manage=Path("/m"),
                  settings=None)  # type: ignore[arg-type]


def cache(backend: str, location: object) -> dict[str, str]:
    return {"omero.web.caches": json.dumps({"default": {"BACKEND": backend, "LOCATION": location}})}


CACHE_ENGINE = "django.contrib.sessions.backends.cache"


def redis(where, **kw) -> Endpoint:
    return Endpoint("redis", "tcp" if isinstance(where, tuple) else "unix", where, **kw)


@pytest.mark.parametrize("backend, location, expected", [
    ("django.core.cache.backends.redis.RedisCache", "redis://:pw@10.0.0.5:6380/1",
     [redis(("10.0.0.5", 6380), db=1, password="pw")]),  # the password is sent, as OMERO.web sends it
    ("django_redis.cache.RedisCache", "rediss://cache.example", [redis(("cache.example", 6379), tls=True)]),
    ("django.core.cache.backends.redis.RedisCache", ["redis://a:1", "redis://b:2"], [redis(("a", 1)), redis(("b", 2))]),
    ("django.core.cache.backends.redis.RedisCache", "redis://a:1,redis://b:2", [redis(("a", 1)), redis(("b", 2))]),
    ("django_redis.cache.RedisCache", "unix:///run/redis/redis.sock", [redis("/run/redis/redis.sock")]),
    ("django.core.cache.backends.memcached.PyMemcacheCache", "127.0.0.1:11211",
     [Endpoint("memcached", "tcp", ("127.0.0.1", 11211))]),
    ("django.core.cache.backends.memcached.PyMemcacheCache", "unix:/tmp/m.sock",
     [Endpoint("memcached", "unix", "/tmp/m.sock")]),
    ("django.core.cache.backends.locmem.LocMemCache", "", []),
])
def test_cache_locations(backend, location, expected):
    kind, found = endpoints(target(CACHE_ENGINE, "cache"), cache(backend, location), INFO)
    assert found == expected


def test_the_cache_the_sessions_live_in_is_the_one_checked():
    properties = {
        "omero.web.caches": json.dumps({
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "sessions": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://r:7",
                         "OPTIONS": {"PASSWORD": "pw"}}}),
        "omero.web.django_additional_settings": json.dumps([["SESSION_CACHE_ALIAS", "sessions"]]),
    }
    assert endpoints(target(CACHE_ENGINE, "cache"), properties, INFO) == ("redis", [redis(("r", 7), password="pw")])
    del properties["omero.web.django_additional_settings"]  # Django's "default": this process's memory
    assert endpoints(target(CACHE_ENGINE, "cache"), properties, INFO) == ("cache", [])


def test_the_password_never_reaches_the_description():
    _, found = endpoints(target(CACHE_ENGINE, "cache"),
                         cache("django.core.cache.backends.redis.RedisCache", "redis://u:s3cret@h:1/0"), INFO)
    assert found[0].describe() == "redis at h:1" and "s3cret" not in repr(found[0])


def test_file_store_database_store_and_a_broken_caches_value(tmp_path):
    assert endpoints(target("django.contrib.sessions.backends.file", "file", tmp_path), {}, INFO) == (
        "file", [Directory(tmp_path)])
    assert endpoints(target("django.contrib.sessions.backends.db", "db"), {}, INFO) == ("db", [])
    assert endpoints(target(CACHE_ENGINE, "cache"), {"omero.web.caches": "{not json"}, INFO) == ("cache", [])


class FakeRedis:
    """A Redis on 127.0.0.1 that wants PASSWORD: AUTH with it, then PING, answers as Redis 7 does."""

    PASSWORD = "canary-watch-pw"

    async def __aenter__(self) -> FakeRedis:
        self.heard: list[bytes] = []
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authed = False
        try:
            while True:
                count = await reader.readline()
                if not count.startswith(b"*"):
                    return
                words = []
                for _ in range(int(count[1:])):
                    await reader.readline()  # $length
                    words.append((await reader.readline()).rstrip(b"\r\n"))
                self.heard.append(words[0])
                if words[0] == b"AUTH":
                    authed = words[-1] == self.PASSWORD.encode()
                    writer.write(b"+OK\r\n" if authed else b"-WRONGPASS invalid username-password pair\r\n")
                elif words[0] == b"PING":
                    writer.write(b"+PONG\r\n" if authed else b"-NOAUTH Authentication required.\r\n")
                await writer.drain()
        finally:
            writer.close()


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, event, **kw):
        self.lines.append(("warning", event, kw))

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))


def test_redis_is_asked_with_the_sites_password_and_a_refused_one_is_unavailable():
    async def main():
        async with FakeRedis() as server:
            where = ("127.0.0.1", server.port)
            assert await store_watch.check(redis(where, password=FakeRedis.PASSWORD)) is None
            assert server.heard == [b"AUTH", b"PING"]
            # Reachable is not enough: OMERO.web's every session request would fail as this one does.
            assert await store_watch.check(redis(where)) == "wants a password the site does not give"
            assert await store_watch.check(redis(where, password="old")) == "refuses the password (WRONGPASS)"

            log = Log()
            watch = store_watch.StoreWatch(log)
            watch.endpoints = [redis(where, password="old")]
            await watch.check_now()
            assert watch.status()["available"] is False
            assert watch.status()["problems"] == {f"redis at 127.0.0.1:{server.port}": "refuses the password (WRONGPASS)"}
            assert log.lines[-1][:2] == ("warning", "session store unavailable; OMERO.web keeps serving, signed-in "
                                                    "users get errors until it is back")
            assert "old" not in str(log.lines) and FakeRedis.PASSWORD not in str(log.lines)
            watch.endpoints = [redis(where, password=FakeRedis.PASSWORD)]  # the password fixed in the config
            await watch.check_now()
            assert watch.status()["available"] is True and watch.status()["unavailable_since"] is None
            assert log.lines[-1] == ("info", "session store available again",
                                     {"store": f"redis at 127.0.0.1:{server.port}"})
        return where

    where = asyncio.run(main())
    # the port is closed now
    assert asyncio.run(store_watch.check(redis(where))) == "connection refused"


def test_a_directory(tmp_path):
    assert asyncio.run(store_watch.check(Directory(tmp_path))) is None
    assert asyncio.run(store_watch.check(Directory(tmp_path / "gone"))) == "missing"


def test_a_store_on_a_hung_mount_stops_neither_the_loop_nor_its_thread_pool(monkeypatch, tmp_path):
    import threading

    release = threading.Event()
    calls = []

    def hangs(path):
        calls.append(path)
        release.wait()
        return None

    monkeypatch.setattr(store_watch, "directory_problem", hangs)

    async def main():
        endpoint = store_watch.Directory(tmp_path)
        answers = [await store_watch.check(endpoint, timeout=0.05) for _ in range(5)]
        # The loop's pool still serves everyone else.
        done = await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(lambda: 1) for _ in range(32))), 30)
        return answers, done

    try:
        answers, done = asyncio.run(main())
    finally:
        release.set()
    assert all(a.startswith("no answer for") for a in answers), answers
    assert len(calls) == 1  # never a second check beside the one that hangs
    assert done == [1] * 32


def test_a_directory_check_that_raises_is_an_answer(monkeypatch, tmp_path):
    def raises(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(store_watch, "directory_problem", raises)
    answer = asyncio.run(store_watch.check(store_watch.Directory(tmp_path), timeout=10))
    assert answer == f"No such file or directory: {tmp_path}"


def test_the_directory_checks_take_turns_in_one_kept_thread(monkeypatch, tmp_path):
    """A check every 10 s for the daemon's life: each in a thread started for it was an idle cost."""
    import threading

    threads = []

    def answers(path):
        threads.append(threading.current_thread())
        return None

    monkeypatch.setattr(store_watch, "directory_problem", answers)

    async def main():
        return [await store_watch.check(store_watch.Directory(tmp_path)) for _ in range(5)]

    assert asyncio.run(main()) == [None] * 5
    assert len(threads) == 5 and len(set(threads)) == 1 and threads[0] is not threading.main_thread()
