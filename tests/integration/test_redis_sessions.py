"""Sessions in Redis across two hosts, and what status says about Redis (issue 13).

Two omerowebd hosts on 127.0.0.2 and 127.0.0.3, the same port, each with its
own runtime and state dir, the same TOML properties: Django's cache session
engine on django-redis (omero-web[redis], installed by the set-up), one
real redis-server (with a password), the same secret_key.

A session saved through host A is loaded through host B: with
``CSRF_USE_SESSIONS`` Django keeps the login form's CSRF secret in the
session, so host A's login page saves a session (through A's own config.xml
and Django), and host B accepts that form's POST only if it loads the same
session (signed with the same secret_key) from Redis; without it, 403. The
POST then runs OMERO.web's real login view, which finds no OMERO server and
says so (no traffic leaves the loopback).
"""

from __future__ import annotations

import http.client
import re
import signal
import time
from urllib.parse import urlencode

import pytest
from conftest import Daemon, NotifyListener, wait_for

from integration.multihost import shared_port
from integration.redis_server import Redis

pytestmark = pytest.mark.omeroweb

PASSWORD = "canary-redis-pw-p5"
SECRET_KEY = "redis-sessions-test-secret-key-0123456789abcdef"
LOGIN = "/webclient/login/"


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path, PASSWORD)
    try:
        r.start()
        yield r
    finally:
        r.stop()


@pytest.fixture
def two_hosts(tmp_path, omero_venv):
    port = shared_port("127.0.0.2", "127.0.0.3")
    hosts = []
    try:
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            root = tmp_path / name
            root.mkdir()
            host = Daemon(root=root, venv=omero_venv, port=port, notify=NotifyListener(root / "notify.sock"))
            host.address = address  # type: ignore[attr-defined]
            hosts.append(host)
        yield hosts
    finally:
        for host in hosts:
            host.cleanup()
            assert host.notify is not None
            host.notify.close()


def configure(host: Daemon, redis: Redis) -> None:
    location = f"redis://:{redis.password}@127.0.0.1:{redis.port}/0"
    text = host.write_config(workers=1, daemon="watch_config = false", omero=f'''
        session_engine = "django.contrib.sessions.backends.cache"
        caches = {{default = {{BACKEND = "django_redis.cache.RedisCache", LOCATION = "{location}"}}}}
        secret_key = "{SECRET_KEY}"
        django_additional_settings = '[["CSRF_USE_SESSIONS", true]]'
        ''')
    host.save(text.replace(f'bind = ["127.0.0.1:{host.port}"]', f'bind = ["{host.address}:{host.port}"]'))


def request(host: Daemon, method: str, path: str, body: str | None = None,
            headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(host.address, host.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def status_text(host: Daemon) -> tuple[str, float]:
    started = time.monotonic()
    out = host.ctl("status", timeout=60)
    return out.stdout + out.stderr, time.monotonic() - started


def test_a_session_saved_through_host_a_is_loaded_through_host_b_and_status_says_whether_redis_answers(
        two_hosts, redis):
    a, b = two_hosts
    for host in (a, b):
        configure(host, redis)
        host.start(wait=False)
    for host in (a, b):
        host.wait_serving(240)

    # Host A's login page saves a session in Redis (the form's CSRF secret in it).
    page = request(a, "GET", LOGIN)
    assert page.status == 200
    cookie = re.search(r"sessionid=([^;]+)", page.getheader("Set-Cookie") or "")
    assert cookie, page.getheaders()
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body).group(1).decode()
    assert any(cookie.group(1).encode() in key for key in redis.keys())  # it is in Redis, not on host A
    form = urlencode({"csrfmiddlewaretoken": token, "username": "someone", "password": "x", "server": "1"})
    form_headers = {"Content-Type": "application/x-www-form-urlencoded"}

    # Host B loads it: the POST passes the CSRF check and reaches OMERO.web's login view.
    posted = request(b, "POST", LOGIN, form, {**form_headers, "Cookie": f"sessionid={cookie.group(1)}"})
    assert posted.status == 200, posted.body[:2000]
    assert b"Server is not responding" in posted.body  # the login view ran: it found no OMERO server
    # Without that session host B refuses the same form: what passed above was the session.
    unknown = request(b, "POST", LOGIN, form, {**form_headers, "Cookie": "sessionid=" + "x" * 32})
    assert unknown.status == 403

    # Status names the live session engine and the cache, and that Redis answers, with its round trip.
    where = f"redis at 127.0.0.1:{redis.port}"
    text, _ = status_text(a)
    assert "session engine: django.contrib.sessions.backends.cache, in cache 'default'" in text, text
    assert "caches:      'default' django_redis.cache.RedisCache" in text, text
    assert "session store: available" not in text  # the watch's older verdict: the live answer replaces it
    assert re.search(rf"{re.escape(where)}: answers, \d+\.\d ms", text), text
    health = a.status()["store_health"]
    endpoint = health["caches"][0]["endpoints"][0]
    assert (endpoint["where"], endpoint["state"]) == (where, "answers") and endpoint["ms"] >= 0

    # Paused (SIGSTOP: the kernel still accepts, nobody answers): status says timeout, and does not hang.
    redis.signal(signal.SIGSTOP)
    elapsed = []

    def says(words: str) -> str | None:
        text, took = status_text(a)
        elapsed.append(took)
        return text if f"{where}: {words}" in text else None

    wait_for(lambda: says("TIMEOUT (no answer within 1 s)"), 60, "status to say Redis does not answer")
    assert max(elapsed) < 10, elapsed  # never hangs on Redis (a bound, not a speed test)
    started = time.monotonic()
    assert a.status()["store_health"]["caches"][0]["endpoints"][0]["state"] == "timeout"
    assert time.monotonic() - started < 10

    # Resumed: it answers again.
    redis.signal(signal.SIGCONT)
    wait_for(lambda: says("answers, "), 60, "status to say Redis answers again")

    # Stopped: refused, which is not the same words as paused.
    redis.stop()
    wait_for(lambda: says("REFUSED (connection refused)"), 60, "status to say Redis refuses connections")
    assert max(elapsed) < 10, elapsed

    # The password is never shown.
    for host in (a, b):
        assert PASSWORD not in host.ctl("status", "--json").stdout + host.ctl("status").stdout + host.log()
