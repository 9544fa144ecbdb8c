"""Prometheus metrics (omerowebd/metrics.py): the settings, and a real scrape over HTTP of a stand-in daemon."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from omerowebd import metrics, metrics_http
from omerowebd.config import parse
from omerowebd.errors import ConfigErrors

# The settings are checked without the library; serving needs it. Every test venv has it (bootstrap.sh): a test
# that serves fails where it is missing, and the one about its absence fakes that.


def config(daemon: str = ""):
    text = textwrap.dedent("""\
        [daemon]
        omerodir = "/srv/o"
        venv = "/srv/v"
        """) + textwrap.dedent(daemon)
    return parse(text.encode(), Path("/etc/omerowebd/omerowebd.toml"))


def problems(daemon: str) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        config(daemon)
    return e.value.problems


def test_off_by_default_and_the_settle_defaults():
    c = config()
    assert c.daemon.metrics is None
    assert c.daemon.settle_seconds == 5.0 and c.daemon.settle_worker_deaths == 2
    assert metrics.config_problems(c) == ([], [])


@pytest.mark.parametrize("value, words", [
    ('"127.0.0.1"', "is not an address"),
    ('"127.0.0.1:70000"', "port must be a number"),
    ('"unix:/run/m.sock"', "Prometheus scrapes over TCP"),
    ("9449", "must be a string"),
])
def test_a_bad_address_is_one_line_naming_the_key(value, words):
    found = problems(f"metrics = {value}\n")
    assert len(found) == 1 and "omerowebd.toml:4: daemon.metrics" in found[0] and words in found[0]


def test_settle_values_are_checked():
    found = problems("settle_seconds = -1\nsettle_worker_deaths = -2\n")
    assert any("daemon.settle_seconds must be 0 (off) or more" in p for p in found)
    assert any("daemon.settle_worker_deaths must be 0 or more" in p for p in found)


def test_loopback_is_quiet_anything_else_is_a_warning(monkeypatch):
    monkeypatch.setattr(metrics, "available", lambda: True)
    for address in ("127.0.0.1:9449", "[::1]:9449", "localhost:9449", "127.0.0.2:9449"):
        assert metrics.config_problems(config(f'metrics = "{address}"\n')) == ([], []), address
    for address in ("0.0.0.0:9449", "[::]:9449", "192.0.2.7:9449", "metrics.example:9449"):
        found, warnings = metrics.config_problems(config(f'metrics = "{address}"\n'))
        assert not found and len(warnings) == 1 and "is not a loopback address" in warnings[0], address


def test_without_the_library_enabling_metrics_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(metrics, "available", lambda: False)
    found, _ = metrics.config_problems(config('metrics = "127.0.0.1:9449"\n'))
    assert len(found) == 1 and "prometheus_client is not installed" in found[0] and "apt install" in found[0]
    assert metrics.config_problems(config()) == ([], [])  # off: not needed
    # Gone after the check passed (uninstalled under a running daemon): reported, the site serves on.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # the import then fails, as if not installed
    log = Log()
    service = metrics.MetricsService(log, SimpleNamespace(services={}))
    service.update(config(f'metrics = "127.0.0.1:{free_port()}"\n'), {}, None)
    assert service.status()["serving"] is False and "prometheus_client is not installed" in service.status()["problem"]
    assert log.lines[-1][:2] == ("error", "metrics not served")


# -- a scrape --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))

    def error(self, event, **kw):
        self.lines.append(("error", event, kw))


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.fixture
def daemon():
    generation = SimpleNamespace(number=3, state="serving", ready_at=1000.0, started_at=994.5,
                                 plan=SimpleNamespace(workers=2), worker_pids=lambda: [11, 12])
    sessions = SimpleNamespace(sweeps=0, last=None)
    store = SimpleNamespace(status=lambda: {"available": None})
    d = SimpleNamespace(current=generation, crashes=0, last_reload=None,
                        services={"sessions": sessions, "session_store": store})
    saved = metrics.COUNTS
    metrics.COUNTS = metrics.Counts()
    yield d
    metrics.COUNTS = saved


def test_a_scrape_reads_what_happened(daemon):
    port = free_port()
    service = metrics.MetricsService(Log(), daemon)
    service.update(config(f'metrics = "127.0.0.1:{port}"\n'), {}, None)
    try:
        assert service.status() == {"address": f"127.0.0.1:{port}", "serving": True, "problem": None}
        before = scrape(port)
        assert before["omerowebd_generation"] == 3 and before["omerowebd_serving"] == 1
        assert before["omerowebd_workers"] == 2 and before["omerowebd_workers_configured"] == 2
        assert before["omerowebd_app_boot_seconds"] == 5.5
        assert before['omerowebd_reloads_total{outcome="reverted"}'] == 0
        assert before["omerowebd_master_restarts_total"] == 0 and before["omerowebd_worker_deaths_total"] == 0
        assert "omerowebd_session_store_up" not in before  # unknown: no sample
        assert not any(name.startswith(("process_", "python_")) for name in before)  # our registry only

        metrics.reload_done({"outcome": "reverted"})
        metrics.reload_done({"outcome": "applied"})
        metrics.reload_done({"outcome": "applied"})
        metrics.worker_died()
        metrics.probed(0.25, 200)
        metrics.probed(0.5, None)
        daemon.crashes = 1
        daemon.last_reload = {"seconds": 7.25, "at": 1234.0, "outcome": "applied"}
        daemon.services["sessions"].sweeps = 1
        daemon.services["sessions"].last = {"at": 99.0, "duration": 1.5, "deleted": 10, "kept": 90, "errors": 1,
                                            "scanned": 101}
        daemon.services["session_store"].status = lambda: {"available": False, "latency": None}
        after = scrape(port)
        assert after['omerowebd_reloads_total{outcome="reverted"}'] == 1
        assert after['omerowebd_reloads_total{outcome="applied"}'] == 2
        assert after["omerowebd_worker_deaths_total"] == 1 and after["omerowebd_master_restarts_total"] == 1
        assert after["omerowebd_health_probe_duration_seconds_count"] == 2
        assert after["omerowebd_health_probe_duration_seconds_sum"] == 0.75
        assert after["omerowebd_health_probe_failures_total"] == 1
        assert after["omerowebd_last_reload_duration_seconds"] == 7.25
        assert after["omerowebd_session_sweeps_total"] == 1
        assert after["omerowebd_last_session_sweep_duration_seconds"] == 1.5
        assert after['omerowebd_last_session_sweep_sessions{result="deleted"}'] == 10
        assert after['omerowebd_last_session_sweep_sessions{result="kept"}'] == 90
        assert after['omerowebd_last_session_sweep_sessions{result="errors"}'] == 1
        assert after["omerowebd_session_store_up"] == 0
        # A cache session store (Redis): the live check's answer and its round trip (the slowest server's).
        daemon.services["store_health"] = SimpleNamespace(
            session_store_reachable=lambda: True,
            status=lambda: {"session_cache": "default", "caches": [
                {"alias": "other", "endpoints": [{"ms": 900.0}]},
                {"alias": "default", "endpoints": [{"ms": 1.5}, {"ms": 3.0}]}]})
        redis = scrape(port)
        assert redis["omerowebd_session_store_up"] == 1 and redis["omerowebd_session_store_latency_seconds"] == 0.003
        daemon.current = None
        assert scrape(port)["omerowebd_serving"] == 0
    finally:
        service.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_reload_moves_or_ends_the_endpoint_and_a_taken_port_is_reported_not_fatal(daemon):
    first, second = free_port(), free_port()
    log = Log()
    service = metrics.MetricsService(log, daemon)
    try:
        service.update(config(f'metrics = "127.0.0.1:{first}"\n'), {}, None)
        scrape(first)
        service.update(config(f'metrics = "127.0.0.1:{second}"\n'), {}, None)
        scrape(second)
        with pytest.raises(urllib.error.URLError):
            scrape(first)
        other = metrics.MetricsService(Log(), daemon)
        other.update(config(f'metrics = "127.0.0.1:{second}"\n'), {}, None)  # taken by the first
        assert other.status()["serving"] is False and "cannot listen on" in other.status()["problem"]
        service.update(config(), {}, None)
        assert service.status() == {"address": None, "serving": False, "problem": None}
        with pytest.raises(urllib.error.URLError):
            scrape(second)
    finally:
        service.close()


def test_a_client_that_never_sends_its_request_does_not_stall_a_scrape(daemon):
    port = free_port()
    service = metrics.MetricsService(Log(), daemon)
    service.update(config(f'metrics = "127.0.0.1:{port}"\n'), {}, None)
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        scrape(port)
        assert time.monotonic() - started < metrics_http.QuietHandler.timeout  # not served after the idle one gave up
    finally:
        idle.close()
        service.close()


def test_many_slow_clients_hold_a_few_threads_for_a_bounded_time_and_scrapes_come_back(daemon, monkeypatch):
    # Every local user reaches a loopback address: a thread per connection, held while the client sends a
    # byte now and then, would let one exhaust the unit's tasks (and gunicorn could start no worker).
    monkeypatch.setattr(metrics_http.QuietHandler, "timeout", 2)
    port = free_port()
    service = metrics.MetricsService(Log(), daemon)
    service.update(config(f'metrics = "127.0.0.1:{port}"\n'), {}, None)

    def handlers() -> int:
        return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)

    clients, stop = [], threading.Event()

    def dribble():  # a byte every 0.5 s to every client: no single read ever times out
        while not stop.wait(0.5):
            for c in list(clients):
                try:
                    c.sendall(b"G")
                except OSError:
                    pass

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        for _ in range(3 * metrics_http.MAX_CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        deadline = time.monotonic() + 30
        most = 0
        while time.monotonic() < deadline:
            most = max(most, handlers())
            closed = 0
            for c in clients:  # the server closes the extra ones at once and the slow ones at the deadline
                c.setblocking(False)
                try:
                    closed += c.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            if closed == len(clients):
                break
            time.sleep(0.05)
        assert closed == len(clients), f"{len(clients) - closed} slow clients still held after 30 s"
        assert 0 < most <= metrics_http.MAX_CLIENTS
        stop.set()
        assert scrape(port)["omerowebd_serving"] == 1
    finally:
        stop.set()
        for c in clients:
            c.close()
        service.close()


# -- a reload that moves or ends the endpoint never holds the event loop ----------------------------------------------


class Stalled:
    """Holds the old server's close (its thread's last step) until the loop releases it: a reload that waited for it
    would never return to the loop, and the close would see no release."""

    def __init__(self, monkeypatch):
        self.closing, self.release, self.released = threading.Event(), threading.Event(), None
        real = metrics_http.Server.server_close

        def server_close(server):
            if not self.closing.is_set():
                self.closing.set()
                self.released = self.release.wait(60)
            real(server)

        monkeypatch.setattr(metrics_http.Server, "server_close", server_close)


def test_moving_the_endpoint_to_a_name_never_waits_for_the_old_server_nor_the_lookup(daemon, monkeypatch):
    port = free_port()
    stalled = Stalled(monkeypatch)
    asked, answer = [], threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # a slow DNS: answers once the loop says so
        if host == "metrics.test":
            asked.append(threading.current_thread())
            assert answer.wait(60), "the loop never ran while the name was looked up"
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    service = metrics.MetricsService(Log(), daemon)

    async def main():
        loop = asyncio.get_running_loop()
        service.update(config(f'metrics = "127.0.0.1:{port}"\n'), {}, None)
        # The same port under a name (resolving to the same address): the old server must let go of it at once.
        service.update(config(f'metrics = "metrics.test:{port}"\n'), {}, None)
        assert service.status() == {"address": f"metrics.test:{port}", "serving": False, "problem": None}
        assert await asyncio.to_thread(stalled.closing.wait, 60), "the old server never stopped"
        loop.call_soon(stalled.release.set)  # runs only if update() returned while the old server was closing
        loop.call_soon(answer.set)  # and while the name was being looked up
        while not service.status()["serving"]:
            await asyncio.sleep(0.01)
        assert service.status()["problem"] is None

    try:
        asyncio.run(main())
        assert stalled.released is True and asked and threading.main_thread() not in asked
        assert scrape(port)["omerowebd_serving"] == 1  # the new server, on the port the old one held
    finally:
        service.close()


def test_turning_the_endpoint_off_never_waits_for_the_old_server(daemon, monkeypatch):
    port = free_port()
    stalled = Stalled(monkeypatch)
    service = metrics.MetricsService(Log(), daemon)

    async def main():
        loop = asyncio.get_running_loop()
        service.update(config(f'metrics = "127.0.0.1:{port}"\n'), {}, None)
        await asyncio.to_thread(scrape, port)
        service.update(config(), {}, None)
        with pytest.raises(urllib.error.URLError):  # refused at once, while the old server's thread still closes
            await asyncio.to_thread(scrape, port)
        assert await asyncio.to_thread(stalled.closing.wait, 60), "the old server never stopped"
        loop.call_soon(stalled.release.set)

    try:
        asyncio.run(main())
        assert stalled.released is True
        assert service.status() == {"address": None, "serving": False, "problem": None}
    finally:
        service.close()


def test_a_name_that_does_not_resolve_is_reported_not_fatal(daemon, monkeypatch):
    def getaddrinfo(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    log = Log()
    service = metrics.MetricsService(log, daemon)

    async def main():
        service.update(config('metrics = "metrics.test:9449"\n'), {}, None)
        while service.status()["problem"] is None:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert service.status()["serving"] is False
    assert service.status()["problem"] == "cannot listen on metrics.test:9449: Name or service not known"
    assert log.lines[-1][:2] == ("error", "metrics not served")
