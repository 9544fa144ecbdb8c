"""Two omerowebd hosts behind one real nginx, for the scale-out tests and bench/scaleout.py.

Host A listens on 127.0.0.2 and host B on 127.0.0.3, on the same port, each
with its own OMERODIR, runtime and state dir and TOML, running real
OMERO.web. Each host's ``nginx.upstreams`` names the other. The nginx in
front includes host A's server file (its upstream block lists A, then B),
and host A's TOML validates and reloads that nginx; host B renders its own
files as a second site would, but nothing includes them.

Use the ``two_hosts`` fixture in a test (import it with the fixture it needs:
``from integration.multihost import need_nginx, two_hosts``), or ``TwoHosts``
as a context manager in a bench. The hosts run with ``watch_config = false``:
a change reaches a host only through its reload (or a rollout).
``Traffic`` is the load generator: threads of GETs through nginx, every
outcome counted by status code or error, with the time it happened.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import Daemon, NotifyListener, wait_for
from integration.test_nginx_serving import NGINX, Nginx, answers, need_nginx  # noqa: F401 (fixture)

ADDRESS_A = "127.0.0.2"
ADDRESS_B = "127.0.0.3"
# The hosts must agree on it: a session signed on one is read on the other.
SECRET_KEY = "multihost-test-secret-key-0123456789abcdef"
LOGIN = "/webclient/login/"


def shared_port(*hosts: str, attempts: int = 50) -> int:
    """A port free on every one of ``hosts`` (the OS picks it on the first)."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            others = []
            try:
                for host in hosts[1:]:
                    s = socket.socket()
                    others.append(s)
                    s.bind((host, port))
            except OSError:
                continue
            finally:
                for s in others:
                    s.close()
            return port
    raise AssertionError(f"no port free on all of {hosts} after {attempts} tries")


def get(address: str, port: int, path: str = LOGIN, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Host(Daemon):
    """One omerowebd host: a Daemon bound to its own loopback address."""

    address: str = "127.0.0.1"
    name: str = "A"
    killed_at: float | None = None  # time.time() once kill() has sent its last SIGKILL

    @property
    def backend(self) -> str:
        return f"{self.address}:{self.port}"

    def get(self, path: str = LOGIN, timeout: float = 10.0) -> tuple[int, bytes]:
        """Straight to this host's gunicorn, not through nginx."""
        return get(self.address, self.port, path, timeout)

    def kill(self) -> None:
        """SIGKILL the daemon and every gunicorn process group it started, as a host that dies would."""
        groups = set()
        for pid in self.gunicorn_pids():
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())  # the daemon runs in the test's own group: never kill that
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for pid in self.gunicorn_pids():  # any left outside those groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed_at = time.time()
        if self.proc is not None:
            self.proc.wait(30)
        wait_for(lambda: not self.gunicorn_pids(), 30, f"host {self.name}'s gunicorn processes to be gone")


# $upstream_addr lists every server nginx tried for a request ("A:P, B:P" when it
# retried on B), which is how a test sees nginx still trying a dead host.
LOG_FORMAT = "'$msec $status $request_method \"$upstream_addr\" \"$upstream_status\" $uri'"


@dataclass(frozen=True)
class Logged:
    at: float  # time.time()
    status: int
    method: str
    upstreams: tuple[str, ...]
    upstream_statuses: tuple[str, ...]
    uri: str


class Front(Nginx):
    """nginx in front of the hosts: its access log names the upstreams each request tried."""

    def __init__(self, root: Path, include: str) -> None:
        super().__init__(root, include)
        text = self.conf.read_text()
        text = text.replace(f"access_log {root}/access.log;",
                            f"log_format multihost {LOG_FORMAT};\n    access_log {root}/access.log multihost;")
        # warn: nginx says when it takes a server out ("upstream server temporarily disabled").
        text = text.replace(f"error_log {self.error_log};", f"error_log {self.error_log} warn;")
        self.conf.write_text(text)
        self.access_log = root / "access.log"

    def disabled(self, backend: str) -> bool:
        """nginx has taken ``backend`` out of its upstream (max_fails reached) at least once."""
        return any("upstream server temporarily disabled" in line and f'upstream: "http://{backend}/' in line
                   for line in self.log().splitlines())

    def tried(self, backend: str, since: float) -> list[Logged]:
        """Requests logged since ``since`` (time.time()) for which nginx tried ``backend``."""
        return [r for r in self.logged() if r.at >= since and backend in r.upstreams]

    def logged(self) -> list[Logged]:
        out = []
        pattern = re.compile(r'^(\S+) (\d+) (\S+) "([^"]*)" "([^"]*)" (\S+)$')
        text = self.access_log.read_text(errors="replace") if self.access_log.exists() else ""
        for line in text.splitlines():
            m = pattern.match(line)
            if not m:
                continue
            upstreams = tuple(a.strip() for a in re.split(r"[,:]\s", m.group(4)) if a.strip() and a.strip() != "-")
            statuses = tuple(s.strip() for s in re.split(r"[,:]\s", m.group(5)) if s.strip() and s.strip() != "-")
            out.append(Logged(float(m.group(1)), int(m.group(2)), m.group(3), upstreams, statuses, m.group(6)))
        return out


def _toml_list(argv: list[str]) -> str:
    return "[" + ", ".join(f'"{a}"' for a in argv) + "]"


@dataclass
class TwoHosts:
    """Hosts A and B and the nginx in front; ``write()`` their TOMLs, ``start()``, ``close()``."""

    root: Path
    venv: Path
    port: int = 0
    a: Host = field(init=False)
    b: Host = field(init=False)
    front: Front = field(init=False)
    _notify: list[NotifyListener] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.port = self.port or shared_port(ADDRESS_A, ADDRESS_B)
        self.root.mkdir(parents=True, exist_ok=True)
        hosts = []
        for name, address in (("A", ADDRESS_A), ("B", ADDRESS_B)):
            root = self.root / name.lower()
            root.mkdir(parents=True, exist_ok=True)
            listener = NotifyListener(root / "notify.sock")
            self._notify.append(listener)
            hosts.append(Host(root=root, venv=self.venv, port=self.port, notify=listener, address=address, name=name))
        self.a, self.b = hosts
        self.front = Front(self.root / "nginx", f"include {self.a.root / 'state' / 'nginx'}/*.conf;")

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def other(self, host: Host) -> Host:
        return self.b if host is self.a else self.a

    def config(self, host: Host, omero: str = "", nginx: str = "", daemon: str = "", workers: int = 2,
               upstreams: Sequence[str] | None = None) -> str:
        """Host's TOML: bound to its address, the other host as an upstream, a shared secret_key.

        ``omero`` goes under [omero.web], ``nginx`` under [nginx] (after the
        keys written here, so it may open [nginx.redirects]), ``daemon`` under
        [daemon]; ``upstreams`` replaces the other host (``[]``: this host alone).
        ``watch_config = false``: a change reaches a host only through its
        reload (or a rollout), in the order the test chooses.
        """
        if upstreams is None:
            upstreams = [self.other(host).backend]
        commands = ""
        if host is self.a:
            commands = (f"validate_command = {_toml_list(self.front.argv('-t', '-q'))}\n"
                        f"reload_command = {_toml_list(self.front.argv('-s', 'reload'))}\n")
        return textwrap.dedent(f"""\
            [daemon]
            omerodir = "{host.omerodir}"
            venv = "{host.venv}"
            runtime_dir = "{host.runtime_dir}"
            state_dir = "{host.root / 'state'}"
            bind = ["{host.backend}"]
            graceful_timeout = 10
            watch_config = false
            """) + textwrap.dedent(daemon) + textwrap.dedent(f"""
            [nginx]
            listen = "127.0.0.1:{self.front.port}"
            server_name = "localhost"
            upstreams = [{", ".join(f'"{u}"' for u in upstreams)}]
            """) + commands + textwrap.dedent(nginx) + textwrap.dedent(f"""
            [omero.web]
            wsgi_workers = {workers}
            secret_key = "{SECRET_KEY}"
            """) + textwrap.dedent(omero)

    def write(self, omero: str = "", nginx: str = "", daemon: str = "", workers: int = 2,
              only: Host | None = None, upstreams: Sequence[str] | None = None) -> None:
        for host in ([only] if only else self.hosts):
            host.save(self.config(host, omero, nginx, daemon, workers, upstreams))

    def start(self, timeout: float = 240.0) -> None:
        """nginx first (an empty include), then both daemons at once; return once nginx serves the site."""
        for host in self.hosts:
            if not host.config_path.exists():
                self.write(only=host)
        self.front.start()
        for host in self.hosts:
            host.start(wait=False)
        for host in self.hosts:
            host.wait_serving(timeout)
        wait_for(lambda: answers(self.front.port, LOGIN), 60, "the login page through nginx")

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.cleanup()
        self.front.stop()
        for listener in self._notify:
            listener.close()

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def two_hosts(tmp_path: Path, omero_venv: Path, need_nginx: None) -> Iterator[TwoHosts]:
    """Two hosts and nginx, configured (``write()`` again to change) but not started."""
    pair = TwoHosts(tmp_path / "multihost", omero_venv)
    pair.write()
    try:
        yield pair
    finally:
        pair.close()


@dataclass(frozen=True)
class Outcome:
    at: float  # time.monotonic() when the answer (or the error) came
    wall: float  # time.time() of the same moment, to compare with nginx's log
    status: int | None  # None: no HTTP answer
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class Traffic:
    """Clients looping on GETs through nginx; every outcome kept, with when it happened.

    ``counts()`` gives them by status code ("200", "502") or error name
    ("ConnectionResetError"); ``failures(after=t)`` those not 200 since
    ``time.monotonic()`` t.
    """

    def __init__(self, port: int, clients: int = 4, path: str = LOGIN, timeout: float = 30.0,
                 address: str = "127.0.0.1") -> None:
        self.port, self.path, self.timeout, self.address = port, path, timeout, address
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        self.started: float | None = None
        self.stopped: float | None = None

    def __enter__(self) -> Traffic:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 30)
        self.stopped = time.monotonic()

    def _loop(self) -> None:
        deadline = time.monotonic() + 900  # bounded, whatever the caller does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, _ = get(self.address, self.port, self.path, self.timeout)
                outcome = Outcome(time.monotonic(), time.time(), status)
            except Exception as e:  # every other failure is a failed request
                outcome = Outcome(time.monotonic(), time.time(), None, type(e).__name__)
            with self._lock:
                self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    @property
    def ok(self) -> int:
        return sum(1 for o in self.snapshot() if o.ok)

    def counts(self, after: float = 0.0, before: float = float("inf")) -> Counter[str]:
        return Counter(str(o.status) if o.status is not None else str(o.error)
                       for o in self.snapshot() if after <= o.at < before)

    def failures(self, after: float = 0.0, before: float = float("inf")) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok and after <= o.at < before]

    def wait_ok(self, n: int, timeout: float = 120.0) -> None:
        start = self.ok
        wait_for(lambda: self.ok >= start + n, timeout, f"{n} more successful requests through nginx")

    def rate(self, after: float, before: float) -> float:
        """Successful requests per second between two time.monotonic() moments."""
        done = sum(1 for o in self.snapshot() if o.ok and after <= o.at < before)
        return done / (before - after) if before > after else 0.0
