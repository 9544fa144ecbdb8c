"""Two omerowebd hosts (127.0.0.2 and 127.0.0.3, same port) behind one real
nginx rendered from ``nginx.upstreams``: killing host A (daemon and gunicorn,
SIGKILL) under load fails no GET through nginx, nginx leaves A out once it
has failed, and the maintenance page shows only when every host is down."""

from __future__ import annotations

import time

import pytest

from conftest import wait_for
from integration.multihost import LOGIN, Traffic, TwoHosts, get, need_nginx, two_hosts  # noqa: F401 (fixtures)
from integration.test_nginx_serving import answers

pytestmark = pytest.mark.omeroweb


def test_killing_host_a_under_load_fails_no_get_and_only_every_host_down_shows_maintenance(
        two_hosts: TwoHosts) -> None:
    pair = two_hosts
    a, b = pair.a, pair.b
    pair.start()
    server_a = (a.root / "state" / "nginx" / "omero-web.conf").read_text()
    assert (f"    server {a.backend} max_fails=1 fail_timeout=10s;\n"
            f"    server {b.backend} max_fails=1 fail_timeout=10s;\n") in server_a
    assert "proxy_next_upstream error timeout http_502 http_503;" in server_a
    # Host B renders the same site from its side: itself first, then A.
    server_b = (b.root / "state" / "nginx" / "omero-web.conf").read_text()
    assert f"    server {b.backend} max_fails=1 fail_timeout=10s;\n    server {a.backend} " in server_b

    with Traffic(pair.front.port, clients=4) as load:
        start = time.time()
        wait_for(lambda: {a.backend, b.backend} <= {u for r in pair.front.logged() if r.at >= start
                                                    for u in r.upstreams},
                 120, "nginx to send requests to both hosts")
        load.wait_ok(20)
        killed = time.monotonic()
        a.kill()
        assert a.killed_at is not None
        gone = a.killed_at  # time.time() of the last SIGKILL: what A answered before it is A's to answer
        # nginx says when it leaves a server out (max_fails=1: its first failure).
        wait_for(lambda: pair.front.disabled(a.backend), 60, "nginx to leave host A out")
        marked = time.monotonic()
        load.wait_ok(80)

    tried_a = pair.front.tried(a.backend, gone)
    before = load.counts(before=killed)
    during = load.counts(after=killed, before=marked)
    after = load.counts(after=marked)
    print(f"\nthrough nginx: before the kill {dict(before)}; kill -> A left out ({marked - killed:.2f}s)"
          f" {dict(during)}; after {dict(after)}; requests nginx tried on dead A: {len(tried_a)}"
          f" (each retried on B: {[r.status for r in tried_a]})")
    assert before["200"] >= 20
    assert after["200"] >= 80
    assert not load.failures(after=marked), load.counts(after=marked)
    # proxy_next_upstream: a GET that met dead A was served by B.
    assert not load.failures(), load.counts()
    assert tried_a and all(r.status == 200 for r in tried_a), tried_a
    assert any(r.upstreams[-2:] == (a.backend, b.backend) for r in tried_a), tried_a  # A failed, B answered
    # Nothing but B answered once A was gone (a second's margin: nginx logs a request
    # A answered just before the kill a little later; a look at A after fail_timeout goes on to B).
    assert all(r.upstreams[-1] == b.backend for r in pair.front.logged() if r.at >= gone + 1.0)

    # One host left: still the site, never the maintenance page.
    status, body = get("127.0.0.1", pair.front.port)
    assert status == 200 and b"OMERO.web - Login" in body
    # Every host down: nginx shows the maintenance page host A's daemon wrote.
    assert b.stop() == 0
    down = wait_for(lambda: answers(pair.front.port, LOGIN, 502), 60, "nginx to see every host down")
    assert down.body == (a.root / "state" / "maintenance" / "maintainance.html").read_bytes()
    assert b"OMERO.web is restarting" in down.body
