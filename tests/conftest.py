"""Fixtures for real parts: the OMERO.web venv, free ports, a stand-in notify
socket, a running omerowebd, and a load of HTTP clients. Each starts the real
thing, waits for a real event, and always cleans up."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("OMEROWEBD_TEST_VENV", "/opt/omero/web/venv3"))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def end_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Ask a test's server to end with ``sig``; kill it if it has not within ``timeout``. Its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def shadow_venv(real: Path, where: Path, leave_out: frozenset[str] = frozenset()) -> Path:
    """A venv of links into ``real`` (but for the site-packages entries named in ``leave_out``): a package
    can be added or broken in it without touching ``real``."""
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "python").symlink_to(os.path.realpath(real / "bin" / "python"))
    (where / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    site = next(real.glob("lib/python3*/site-packages"))
    mine = where / site.relative_to(real)
    mine.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in leave_out:
            (mine / entry.name).symlink_to(entry)
    return where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url_or_port: int | str, path: str = "/webclient/login/", timeout: float = 10.0) -> tuple[int, bytes]:
    port = url_or_port if isinstance(url_or_port, int) else int(str(url_or_port))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def processes_with_env(needle: str) -> list[int]:
    """Pids whose environment mentions ``needle`` (how a test finds its gunicorns)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if needle.encode() in env and ") Z " not in stat:
            found.append(int(entry))
    return found


@pytest.fixture(scope="session")
def omero_venv() -> Path:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"no OMERO.web venv at {VENV} (scripts/setup-omero-web.sh builds it)")
    return VENV


class NotifyListener:
    """A stand-in for systemd's notify socket: collects every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except (socket.timeout, OSError):
                continue
            for level, kind, payload in ancdata:  # systemd-notify --barrier sends fds: close them
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for i in range(0, len(payload) - len(payload) % 4, 4):
                        os.close(int.from_bytes(payload[i:i + 4], sys.byteorder))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait(self, key: str, value: str | None = None, timeout: float = 60.0, after: int = 0,
             contains: str | None = None) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for _, fields in self.messages[after:]:
                if key in fields and (value is None or fields[key] == value) and (contains or "") in fields[key]:
                    return fields
            return None

        return wait_for(found, timeout, f"{key}={value or contains or '*'} on the notify socket")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


@dataclass
class Daemon:
    """One omerowebd under test, in its own directory."""

    root: Path
    venv: Path
    port: int
    notify: NotifyListener | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "daemon.log"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.root / "etc" / "omerowebd.toml"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def omerodir(self) -> Path:
        return self.root / "omerodir"

    def write_config(self, omero: str = "", daemon: str = "", extra: str = "", workers: int = 2) -> str:
        text = textwrap.dedent(
            f"""\
            [daemon]
            omerodir = "{self.omerodir}"
            venv = "{self.venv}"
            runtime_dir = "{self.runtime_dir}"
            state_dir = "{self.root / 'state'}"
            bind = ["127.0.0.1:{self.port}"]
            graceful_timeout = 10
            {daemon}

            [nginx]
            enabled = false

            [omero.web]
            wsgi_workers = {workers}
            """
        ) + textwrap.dedent(omero) + textwrap.dedent(extra)
        self.save(text)
        return text

    def save(self, text: str) -> None:
        """Editor-style: write a temp file and rename it over the config."""
        tmp = self.config_path.with_name(".omerowebd.toml.swp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def start(self, *, wait: bool = True, args: list[str] | None = None, command: list[str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.notify:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        cmd = command or [sys.executable, "-m", "omerowebd", "--config", str(self.config_path), *(args or [])]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root)
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = 120.0) -> dict[str, Any]:
        def serving() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"omerowebd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = self.status()
            except (OSError, ValueError, subprocess.CalledProcessError):
                return None
            return status if status.get("serving") else None

        return wait_for(serving, timeout, "omerowebd to serve")

    def ctl(self, *args: str, check: bool = False, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "omerowebd.ctl", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def status(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.runtime_dir / "control.sock"))
            s.sendall(b'{"cmd": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def gunicorn_pids(self) -> list[int]:
        return processes_with_env(f"OMEROWEBD_SNAPSHOT={self.runtime_dir}/")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        return end_process(self.proc, timeout=timeout)

    def cleanup(self) -> None:
        self.stop()
        for pid in self.gunicorn_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path: Path, omero_venv: Path, notify: NotifyListener) -> Iterator[Daemon]:
    d = Daemon(root=tmp_path, venv=omero_venv, port=free_port(), notify=notify)
    yield d
    d.cleanup()


class Load:
    """Several clients looping on a page; counts what went wrong, by kind."""

    def __init__(self, port: int, clients: int = 4, path: str = "/webclient/login/", timeout: float = 30) -> None:
        self.port, self.path, self.timeout = port, path, timeout  # timeout: per request
        self.ok = 0
        self.refused = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _loop(self) -> None:
        deadline = time.monotonic() + 600  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, _ = http_get(self.port, self.path, timeout=self.timeout)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                continue
            except Exception as e:  # every other failure is a failed request
                with self._lock:
                    self.failed.append(repr(e))
                continue
            with self._lock:
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"HTTP {status}")

    def wait_requests(self, n: int, timeout: float = 60) -> None:
        start = self.ok
        wait_for(lambda: self.ok >= start + n, timeout, f"{n} more successful requests")


def run_in_pty(argv: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str]:
    """Run a command on a terminal (a pty, 200 columns) as a person would: its exit code and all the
    terminal got (stdout and stderr, \\r and escape sequences included)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = dict(os.environ if env is None else env)
    env.pop("COLUMNS", None)
    env.setdefault("TERM", "xterm")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer on the terminal's side has gone
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace")
