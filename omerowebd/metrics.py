"""Prometheus metrics: what the daemon exposes on ``[daemon] metrics`` (off by default).

OME's own infrastructure watches OMERO with Prometheus; a fleet of
omerowebd hosts is watched the same way. The exporter is prometheus_client
(Debian: python3-prometheus-client, a Recommends of the package): its own
text format and WSGI app, served from a thread by the standard library's
WSGI server (metrics_http.py), so a scrape never waits on the daemon's
event loop and a slow client never stalls it.

Values come from two places. Events the daemon only sees as they happen
(a reload's outcome, a worker's death, a health probe) are counted here by
small hooks (:data:`COUNTS`), on the event loop; plain ints and a dict that
is never resized, so the scrape thread reads them whole. Everything else
(the serving generation, its workers, the last sweep, the session store) is
read from the daemon at scrape time by :class:`_Collector`, which only reads
attributes that the loop replaces whole, never iterates the loop's own
containers.

No process or platform collectors: the registry holds the daemon's metrics
only (a scrape of the daemon's RSS belongs to node_exporter or systemd).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import math
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Config
from .http_probe import http_probe
from .nginx_syntax import host_and_port

if TYPE_CHECKING:
    from . import metrics_http

# Every outcome a reload reports (supervisor's results); each series exists from the start at 0.
OUTCOMES = ("applied", "nothing to do", "rejected", "rolled back", "reverted", "revert failed",
            "restart required", "cancelled")
PROBE_INTERVAL = 15.0  # a health probe this often while metrics are on (a scrape then reads the last)
PROBE_TIMEOUT = 10.0
INSTALL_HINT = "apt install python3-prometheus-client (dnf install python3-prometheus_client; pip install prometheus-client)"


@dataclass
class Counts:
    """What the hooks count, since the daemon started."""

    reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    worker_deaths: int = 0
    probes: int = 0
    probe_failures: int = 0
    probe_seconds: float = 0.0  # the sum of every probe's latency (a summary's _sum)
    last_probe_seconds: float | None = None
    last_probe_ok: bool | None = None


COUNTS = Counts()


# -- hooks (called on the event loop) ----------------------------------------


def reload_done(result: Mapping[str, Any]) -> None:
    outcome = str(result.get("outcome"))
    if outcome in COUNTS.reloads:
        COUNTS.reloads[outcome] += 1  # an unknown outcome is a bug elsewhere: never resize the dict


def worker_died() -> None:
    COUNTS.worker_deaths += 1


def probed(seconds: float, status: int | None) -> None:
    ok = status is not None and status < 500
    COUNTS.probes += 1
    COUNTS.probe_seconds += seconds
    COUNTS.last_probe_seconds = seconds
    COUNTS.last_probe_ok = ok
    if not ok:
        COUNTS.probe_failures += 1


# -- the settings -------------------------------------------------------------


def available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


def config_problems(config: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings) of ``daemon.metrics``, for the checks the daemon and `check` run."""
    address = config.daemon.metrics
    if address is None:
        return [], []
    if not available():
        return [f"{config.path}: daemon.metrics is set, but prometheus_client is not installed: {INSTALL_HINT},"
                " or remove daemon.metrics"], []
    host, _ = host_and_port(address)
    if not _is_loopback(host):
        return [], [f"{config.path}: daemon.metrics {address!r} is not a loopback address: the metrics (no secrets,"
                    " but the site's generations, reloads and session counts) are open to whoever reaches it;"
                    " prefer 127.0.0.1 and a Prometheus on this host or an authenticating proxy"]
    return [], []


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> tuple[int, str]:
    """(address family, numeric host) to bind: a lookup for a name, none for an address."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, str(sockaddr[0])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to may change


# -- what a scrape reads --------------------------------------------------------


class _Collector:
    """Reads the daemon at scrape time (in the server's thread)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def describe(self) -> list[Any]:
        return []  # the registry need not collect to learn the names; they are fixed

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        d = self.daemon
        g = getattr(d, "current", None)  # one read: the loop may replace it meanwhile
        serving = g is not None and getattr(g, "state", None) == "serving"
        yield GaugeMetricFamily("omerowebd_serving", "1 while a gunicorn generation serves", value=int(serving))
        yield GaugeMetricFamily("omerowebd_generation", "number of the serving gunicorn generation (0: none)",
                                value=g.number if g is not None else 0)
        yield GaugeMetricFamily("omerowebd_workers", "worker processes of the serving generation, now",
                                value=len(g.worker_pids()) if g is not None else 0)
        yield GaugeMetricFamily("omerowebd_workers_configured", "workers the serving generation runs (wsgi_workers)",
                                value=g.plan.workers if g is not None else 0)
        if g is not None and g.ready_at is not None:
            yield GaugeMetricFamily("omerowebd_app_boot_seconds",
                                    "seconds the serving generation took from its start until it served",
                                    value=max(0.0, g.ready_at - g.started_at))
        reloads = CounterMetricFamily("omerowebd_reloads", "reloads that ran, by outcome", labels=["outcome"])
        for outcome, n in dict(COUNTS.reloads).items():
            reloads.add_metric([outcome], n)
        yield reloads
        last = getattr(d, "last_reload", None)
        if isinstance(last, Mapping) and isinstance(last.get("seconds"), (int, float)):
            yield GaugeMetricFamily("omerowebd_last_reload_duration_seconds", "how long the last reload took",
                                    value=last["seconds"])
            yield GaugeMetricFamily("omerowebd_last_reload_timestamp_seconds", "when the last reload ended",
                                    value=last.get("at") or 0)
        crashes = getattr(getattr(d, "gens", None), "crashes", None)  # the generations' owner counts them
        yield CounterMetricFamily("omerowebd_master_restarts", "gunicorn masters that exited and were started again",
                                  value=crashes if isinstance(crashes, int) else getattr(d, "crashes", 0))
        yield CounterMetricFamily("omerowebd_worker_deaths", "gunicorn workers that died or hung while serving",
                                  value=COUNTS.worker_deaths)
        yield SummaryMetricFamily("omerowebd_health_probe_duration_seconds",
                                  "health probes (GET daemon.health_path) and the time they took",
                                  count_value=COUNTS.probes, sum_value=COUNTS.probe_seconds)
        yield CounterMetricFamily("omerowebd_health_probe_failures", "health probes with no answer or an HTTP 5xx",
                                  value=COUNTS.probe_failures)
        if COUNTS.last_probe_seconds is not None:
            yield GaugeMetricFamily("omerowebd_last_health_probe_seconds", "the last health probe's latency",
                                    value=COUNTS.last_probe_seconds)
        yield from self._sweeps()
        yield from self._store()

    def _sweeps(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = getattr(self.daemon, "services", {}).get("sessions")
        if service is None:
            return
        yield CounterMetricFamily("omerowebd_session_sweeps", "session sweeps run (dry runs included)",
                                  value=getattr(service, "sweeps", 0))
        last = getattr(service, "last", None)
        if not isinstance(last, Mapping):
            return
        if isinstance(last.get("duration"), (int, float)):
            yield GaugeMetricFamily("omerowebd_last_session_sweep_duration_seconds", "how long the last sweep took",
                                    value=last["duration"])
        if isinstance(last.get("at"), (int, float)):
            yield GaugeMetricFamily("omerowebd_last_session_sweep_timestamp_seconds", "when the last sweep ran",
                                    value=last["at"])
        sessions = GaugeMetricFamily("omerowebd_last_session_sweep_sessions",
                                     "sessions the last sweep deleted, kept, could not judge (errors), scanned",
                                     labels=["result"])
        for key in ("deleted", "kept", "errors", "scanned"):
            if isinstance(last.get(key), int):
                sessions.add_metric([key], last[key])
        yield sessions
        yield GaugeMetricFamily("omerowebd_last_session_sweep_failed", "1 when the last sweep failed as a whole",
                                value=int(bool(last.get("error"))))

    def _store(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up, latency = store_state(self.daemon)
        if up is not None:  # unknown (not checked, nothing to check): no sample rather than a guess
            yield GaugeMetricFamily("omerowebd_session_store_up", "1 when the session store answers", value=int(up))
        if latency is not None:
            yield GaugeMetricFamily("omerowebd_session_store_latency_seconds",
                                    "one round trip to the session store", value=latency)


def store_state(daemon: Any) -> tuple[bool | None, float | None]:
    """(answers?, round trip seconds), None where unknown.

    A cache session store (Redis, memcached): the live check's last answer
    (store_health.py), with its round trip. Any other store (files, a
    database): the store watch's last verdict (store_watch.py), no round trip.
    """
    services = getattr(daemon, "services", {})
    up: bool | None = None
    latency: float | None = None
    health = services.get("store_health")
    if health is not None:
        up = health.session_store_reachable()
        if up is not None:
            latency = _session_round_trip(health.status())
    watch = services.get("session_store")
    if up is None and watch is not None:
        available = watch.status().get("available")
        up = available if isinstance(available, bool) else None
    return up, latency


def _session_round_trip(status: Mapping[str, Any]) -> float | None:
    """The slowest answer of the session cache's servers, in seconds (None: none answered with a time)."""
    times = [e.get("ms") for c in status.get("caches") or [] if c.get("alias") == status.get("session_cache")
             for e in c.get("endpoints") or []]
    times = [t for t in times if isinstance(t, (int, float)) and math.isfinite(t)]
    return max(times) / 1000 if times else None


class MetricsService:
    """A service beside gunicorn (the supervisor's ``services``): serves the metrics while
    ``daemon.metrics`` is set, moves with it on a reload, probes the site's health now and then."""

    def __init__(self, log: Any, daemon: Any) -> None:
        self.log = log
        self.daemon = daemon
        self.address: str | None = None
        self.problem: str | None = None
        self._server: metrics_http.Server | None = None
        self._registry: Any = None
        self._lookup: asyncio.Future[Any] | None = None  # a host name being resolved for self.address

    def update(self, config: Config, properties: Mapping[str, str], info: Any) -> None:
        """Serve on ``daemon.metrics``, move or stop (on the event loop: nothing here waits).

        The old server stops listening at once and its thread ends by itself;
        a host name is resolved in a thread (a DNS lookup can take seconds)
        and served once it answers."""
        wanted = config.daemon.metrics
        if wanted == self.address and (self._server is not None or self._lookup is not None or wanted is None):
            return
        self.close()
        self.address = wanted
        if wanted is None:
            return
        host, port = host_and_port(wanted)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no loop to hold up (a test, a tool): resolve here
        if loop is not None and not _is_numeric(host):
            lookup = loop.run_in_executor(None, _resolve, host, port)
            self._lookup = lookup
            lookup.add_done_callback(lambda done: self._resolved(done, wanted))
            return
        try:
            found = _resolve(host, port)  # a numeric host: no lookup
        except OSError as e:
            self._failed(wanted, f"cannot listen on {wanted}: {e.strerror or e}")
            return
        self._start(wanted, found)

    def _resolved(self, lookup: asyncio.Future[Any], wanted: str) -> None:
        if lookup is not self._lookup:  # moved or stopped meanwhile
            if not lookup.cancelled():
                lookup.exception()  # a failure nobody waits for any more: not logged as never retrieved
            return
        self._lookup = None
        error = lookup.exception()
        if error is not None:
            reason = getattr(error, "strerror", None) or error
            self._failed(wanted, f"cannot listen on {wanted}: {reason}")
            return
        self._start(wanted, lookup.result())

    def _start(self, wanted: str, found: tuple[int, str]) -> None:
        try:
            self._serve(*found, host_and_port(wanted)[1])
        except ImportError:
            self._failed(wanted, f"prometheus_client is not installed: {INSTALL_HINT}")
        except OSError as e:  # the address in use, not on this host: the site serves on all the same
            self._failed(wanted, f"cannot listen on {wanted}: {e.strerror or e}")
        else:
            self.log.info("metrics served", address=wanted, path="/metrics")

    def _failed(self, wanted: str, problem: str) -> None:
        self.problem = problem
        self.log.error("metrics not served", address=wanted, problem=problem)

    def _serve(self, family: int, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        from . import metrics_http  # here: its http.server and email would add to every start, metrics or none

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self.daemon))
        self._server = metrics_http.serve(family, host, port, make_wsgi_app(self._registry))

    def close(self) -> None:
        """Stop serving (and any lookup), without waiting for the server's thread."""
        server, lookup = self._server, self._lookup
        self._server = self._lookup = None
        self.problem = None
        if lookup is not None:
            lookup.cancel()  # the thread's answer, when it comes, is dropped
        if server is not None:
            server.stop()

    async def run(self) -> None:
        """Probe the site's health now and then while metrics are on; stop serving when cancelled."""
        try:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                if self._server is not None:
                    await probe_site(self.daemon)
                    health = getattr(self.daemon, "services", {}).get("store_health")
                    if health is not None:
                        await health.refresh()  # nothing else asks the caches on a clock
        finally:
            self.close()  # never waits: on the loop, which also owns a pending lookup

    def status(self) -> dict[str, Any]:
        return {"address": self.address, "serving": self._server is not None, "problem": self.problem}


async def probe_site(daemon: Any) -> int | None:
    """One health probe through the socket the site is served on, counted and timed."""
    g = getattr(daemon, "current", None)
    held = getattr(daemon, "sockets", None)
    if g is None or not held:
        return None
    started = time.monotonic()
    status = await http_probe(held[0].probe_target(), g.plan.health_path, g.plan.health_host, timeout=PROBE_TIMEOUT)
    probed(time.monotonic() - started, status)
    return status
