"""The caches OMERO.web uses and whether they answer (omerowebd/store_health.py), without a venv.

The probes run against real sockets on 127.0.0.1: a listener that never
answers (as a paused redis-server: the kernel accepts, nobody speaks), a
closed port, and a tiny scripted server for the replies of Redis and memcached.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from omerowebd import status_lines, store_health
from omerowebd.store_health import ANSWERS, ERROR, REFUSED, TIMEOUT_STATE, Endpoint, StoreHealth, redis_endpoint

INFO = type("Info", (), {"default": staticmethod(lambda name: None)})()
PW = "canary-s3cret/pw@x"


@pytest.mark.parametrize("location, expected", [
    ("redis://127.0.0.1:6380/1", Endpoint("redis", "tcp", ("127.0.0.1", 6380), db=1)),
    ("redis://cache.example", Endpoint("redis", "tcp", ("cache.example", 6379))),
    ("rediss://cache.example:6390/0", Endpoint("redis", "tcp", ("cache.example", 6390), tls=True)),
    ("rediss://cache.example?ssl_cert_reqs=none", Endpoint("redis", "tcp", ("cache.example", 6379), tls=True, verify=False)),
    ("redis://[::1]:7000", Endpoint("redis", "tcp", ("::1", 7000))),
    ("redis://h:1/0?db=3", Endpoint("redis", "tcp", ("h", 1), db=3)),
    ("unix:///run/redis/redis.sock?db=2", Endpoint("redis", "unix", "/run/redis/redis.sock", db=2)),
])
def test_redis_locations(location, expected):
    assert redis_endpoint(location) == expected


@pytest.mark.parametrize("location, options, username, password", [
    (f"redis://:{PW.replace('/', '%2F').replace('@', '%40')}@h:1/0", {}, None, PW),
    (f"redis://omero:{PW.replace('/', '%2F').replace('@', '%40')}@h:1/0", {}, "omero", PW),
    (f"redis://h:1/0?password={PW.replace('/', '%2F').replace('@', '%40')}", {}, None, PW),
    ("redis://h:1/0", {"PASSWORD": PW}, None, PW),  # django-redis
    ("redis://h:1/0", {"password": PW, "username": "u"}, "u", PW),  # Django's RedisCache hands OPTIONS to redis-py
    ("redis://h:1/0", {}, None, None),
])
def test_the_password_is_found_where_redis_py_finds_it_and_never_shown(location, options, username, password):
    e = redis_endpoint(location, options)
    assert (e.username, e.password) == (username, password)
    assert e.describe() == "redis at h:1" and PW not in repr(e)


@pytest.mark.parametrize("location", ["http://h:1", "h:6379", "redis://h:notaport", "redis://h:1/zero", "unix://"])
def test_a_location_redis_py_cannot_read_is_one_line_without_the_url(location):
    with pytest.raises(ValueError) as e:
        redis_endpoint(location.replace("h:", f":{PW}@h:") if "redis://" in location else location)
    assert PW not in str(e.value) and "\n" not in str(e.value)


def caches_of(table: object) -> list[store_health.Cache]:
    found, problem = store_health.caches({"omero.web.caches": json.dumps(table)}, INFO)
    assert problem is None
    return found


def test_every_cache_of_omero_web_caches_and_what_is_asked():
    found = caches_of({
        "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": ["redis://a:1", "redis://b:2"]},
        "django": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://a:1,redis://c:3"},
        "mem": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache", "LOCATION": "127.0.0.1:11211;unix:/m.sock"},
        "local": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "files": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": "/var/tmp/c"},
        "bad": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "http://x"},
    })
    by = {c.alias: c for c in found}
    assert [e.describe() for e in by["default"].endpoints] == ["redis at a:1", "redis at b:2"]
    assert [e.describe() for e in by["django"].endpoints] == ["redis at a:1", "redis at c:3"]
    assert [e.describe() for e in by["mem"].endpoints] == ["memcached at 127.0.0.1:11211", "memcached at unix:/m.sock"]
    assert (by["local"].kind, by["local"].endpoints) == ("locmem", ())
    assert by["files"].kind == "file" and by["bad"].endpoints == () and "http://" in (by["bad"].problem or "")


def test_omero_webs_defaults_when_unset_and_a_value_that_is_not_json():
    defaults = {"omero.web.session_engine": "django.contrib.sessions.backends.file",
                "omero.web.caches": '{"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}'}
    info = type("Info", (), {"default": staticmethod(defaults.get)})()
    assert store_health.session_engine({}, info) == "django.contrib.sessions.backends.file"
    assert [(c.alias, c.kind) for c in store_health.caches({}, info)[0]] == [("default", "dummy")]
    assert store_health.caches({"omero.web.caches": "{nope"}, INFO) == ([], "omero.web.caches is not JSON")


def test_the_session_cache_alias_follows_django_additional_settings():
    assert store_health.session_cache_alias({}) == "default"
    extra = json.dumps([["SESSION_CACHE_ALIAS", "sessions"], ["SESSION_FILE_PATH", "/x"]])
    assert store_health.session_cache_alias({"omero.web.django_additional_settings": extra}) == "sessions"


# -- asking real sockets ------------------------------------------------------------------


class Scripted:
    """A TCP server on 127.0.0.1 that answers each line it reads with the next reply (None: says nothing)."""

    def __init__(self, replies: dict[bytes, bytes | None]) -> None:
        self.replies, self.heard = replies, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    for key, reply in self.replies.items():
                        if key in data:
                            self.heard.append(key)
                            data = b""
                            if reply is None:
                                time.sleep(5)
                                return
                            conn.sendall(reply)

    def close(self) -> None:
        self.server.close()


def ask(endpoint: Endpoint, timeout: float = 2.0) -> store_health.Answer:
    return asyncio.run(store_health.probe(endpoint, timeout))


def test_redis_answers_with_auth_and_select_and_a_round_trip():
    server = Scripted({b"AUTH": b"+OK\r\n", b"SELECT": b"+OK\r\n", b"PING": b"+PONG\r\n"})
    try:
        answer = ask(Endpoint("redis", "tcp", ("127.0.0.1", server.port), db=2, username="u", password="pw"))
        assert answer.state == ANSWERS and answer.ms is not None and answer.ms >= 0
        assert server.heard == [b"AUTH", b"SELECT", b"PING"]
    finally:
        server.close()


@pytest.mark.parametrize("replies, why", [
    ({b"AUTH": b"-WRONGPASS invalid username-password pair\r\n"}, "refuses the password (WRONGPASS)"),
    ({b"PING": b"-NOAUTH Authentication required.\r\n"}, "wants a password the site does not give"),
    ({b"PING": b"HTTP/1.1 400 Bad Request\r\n"}, "not a Redis server"),
])
def test_redis_that_answers_but_not_as_omero_web_needs(replies, why):
    server = Scripted(replies)
    try:
        password = "pw" if b"AUTH" in replies else None
        answer = ask(Endpoint("redis", "tcp", ("127.0.0.1", server.port), password=password))
        assert (answer.state, answer.why) == (ERROR, why)
    finally:
        server.close()


def test_memcached_version():
    server = Scripted({b"version": b"VERSION 1.6.18\r\n"})
    try:
        assert ask(Endpoint("memcached", "tcp", ("127.0.0.1", server.port))).state == ANSWERS
    finally:
        server.close()


def test_refused_timeout_and_no_socket_are_told_apart():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never speaks
        port = silent.getsockname()[1]
        started = time.monotonic()
        answer = ask(Endpoint("redis", "tcp", ("127.0.0.1", port)), timeout=0.3)
        assert (answer.state, answer.why) == (TIMEOUT_STATE, "no answer within 0.3 s")
        assert time.monotonic() - started < 10  # it does not hang (not a speed test)
    answer = ask(Endpoint("redis", "tcp", ("127.0.0.1", port)))
    assert (answer.state, answer.why) == (REFUSED, "connection refused")
    assert ask(Endpoint("redis", "unix", "/nonexistent/redis.sock")).state == REFUSED


def test_several_down_are_asked_at_once():
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        endpoints = [Endpoint("redis", "tcp", ("127.0.0.1", s.getsockname()[1])) for s in (a, b)]
        started = time.monotonic()
        answers = asyncio.run(store_health.probe_all(endpoints, timeout=2.0))
        elapsed = time.monotonic() - started
    assert [x.state for x in answers] == [TIMEOUT_STATE, TIMEOUT_STATE]
    assert elapsed < 3.9  # one after the other would take 4 s at least: this is concurrency, not speed


def test_a_status_flood_asks_once_per_fresh_period():
    server = Scripted({b"PING": b"+PONG\r\n"})
    health = StoreHealth(timeout=2.0, fresh=60.0)
    table = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": f"redis://127.0.0.1:{server.port}"}}
    health.update(None, {"omero.web.caches": json.dumps(table),
                         "omero.web.session_engine": "django.contrib.sessions.backends.cache"}, INFO)

    async def flood() -> None:
        await asyncio.gather(*(health.refresh() for _ in range(50)))
        await health.refresh()

    try:
        asyncio.run(flood())
        assert server.heard == [b"PING"]
        assert health.session_store_reachable() is True
        endpoint = health.status()["caches"][0]["endpoints"][0]
        assert endpoint["state"] == ANSWERS and endpoint["where"] == f"redis at 127.0.0.1:{server.port}"
        lines = status_lines.store_health(health.status())
        assert lines[0] == "session engine: django.contrib.sessions.backends.cache, in cache 'default'"
        assert lines[1] == "caches:      'default' django_redis.cache.RedisCache"
        assert lines[2].startswith(f"               redis at 127.0.0.1:{server.port}: answers, ") and " ms" in lines[2]
        assert status_lines.answered(health.status(), f"redis at 127.0.0.1:{server.port}")
    finally:
        server.close()


def test_render_takes_any_shape_without_a_traceback():
    for odd in (None, [], {"engine": 3}, {"engine": "e", "caches": "x"}, {"engine": "e", "caches": [{"endpoints": [1]}]},
                {"engine": "e", "caches": [{"alias": "a", "endpoints": [{"state": "timeout", "ms": "x"}]}]}):
        status_lines.store_health(odd)


def test_an_address_nothing_can_connect_to_is_an_error_not_a_traceback():
    assert ask(Endpoint("redis", "tcp", ("a" * 80 + ".example", 6379))).state == ERROR  # a label over 63 characters
