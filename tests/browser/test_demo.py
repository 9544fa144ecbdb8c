"""scripts/demo.sh as the README runs it, on a terminal: it prints nginx's
address last, the login page there is whole in a browser, Enter stops
omerowebd (the maintenance page) and starts it again, and Ctrl-C stops
everything it started.

The demo runs on a copy of examples/demo.toml with free ports and its own
directories (OMEROWEBD_DEMO_CONFIG), so it never meets a demo or another
server on the usual ports."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit

from conftest import REPO, free_port, processes_with_env, wait_for
from integration.test_nginx_serving import answers

from .conftest import Browser

pytestmark = pytest.mark.omeroweb

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
URL = re.compile(r"http://[^\s\"'<>]+")
DEMO_NGINX_CONF = "/var/lib/omerowebd-demo/demo-nginx/nginx.conf"  # as examples/demo.toml names it


class Terminal:
    """A program on a pseudo-terminal that is its controlling terminal: what it prints,
    and keys typed at it (Enter, Ctrl-C reach it the way they reach a person's shell)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

        def controlling_terminal() -> None:  # in the child: a new session, with the pty as its terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=controlling_terminal)
        os.close(slave)
        self._out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer on the terminal's side has gone
                return
            if not chunk:
                return
            self._out += chunk

    @property
    def output(self) -> str:
        return ANSI.sub("", bytes(self._out).decode(errors="replace")).replace("\r", "")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_for_line(self, needle: str, timeout: float, after: int = 0) -> int:
        """Wait until ``needle`` is printed (at or after offset ``after``); its offset in the output."""
        def printed() -> int | None:
            found = self.output.find(needle, after)
            if found >= 0:
                return found + 1  # never 0: wait_for wants a true value
            if self.proc.poll() is not None:
                raise AssertionError(f"the demo exited with {self.proc.returncode}:\n{self.output[-6000:]}")
            return None

        return wait_for(printed, timeout, f"the demo to print {needle!r}", interval=0.2) - 1

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        os.close(self.master)
        self._reader.join(5)


@pytest.fixture
def demo_root() -> Iterator[Path]:
    """The demo's directories. Not under pytest's tmp dir: nginx's workers run unprivileged, as
    in the demo, and must reach the static files and the maintenance page."""
    root = Path(tempfile.mkdtemp(prefix="omerowebd-demo-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def demo_config(root: Path, venv: Path, nginx_port: int, gunicorn_port: int) -> Path:
    """examples/demo.toml with free ports and the demo's directories under ``root``."""
    doc = tomlkit.parse((REPO / "examples" / "demo.toml").read_text())
    doc["daemon"]["omerodir"] = str(root / "omero-web")
    doc["daemon"]["venv"] = str(venv)
    doc["daemon"]["runtime_dir"] = str(root / "run")
    doc["daemon"]["state_dir"] = str(root / "state")
    doc["nginx"]["listen"] = f"127.0.0.1:{nginx_port}"
    conf = str(root / "state" / "demo-nginx" / "nginx.conf")
    for key in ("validate_command", "reload_command"):
        argv = list(doc["nginx"][key])
        assert DEMO_NGINX_CONF in argv, f"examples/demo.toml's nginx.{key} no longer names {DEMO_NGINX_CONF}"
        doc["nginx"][key] = [conf if a == DEMO_NGINX_CONF else a for a in argv]
    doc["omero"]["web"]["application_server.port"] = gunicorn_port
    path = root / "demo.toml"
    path.write_text(tomlkit.dumps(doc))
    return path


def status(config: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), "status", "--json"],
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout) if done.stdout.strip() else {}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes_naming(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the demo's nginx master and omerowebd name its dirs)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes() and running(int(entry)):
                found.append(int(entry))
    return found


def demo_processes(config: Path, root: Path) -> set[int]:
    """Every process the demo runs now: nginx's master and workers, omerowebd, gunicorn's masters and workers."""
    pids = set(processes_naming(str(root)))
    nginx_pid = root / "state" / "demo-nginx" / "nginx.pid"
    with contextlib.suppress(OSError, ValueError):
        master = int(nginx_pid.read_text())
        pids |= {master, *children(master)}
    s = status(config)
    if s:
        pids.add(s["pid"])
        g = s.get("generation") or {}
        pids |= {g.get("master_pid"), *g.get("worker_pids", [])} - {None}
    pids |= set(processes_with_env(f"OMEROWEBD_SNAPSHOT={root / 'run'}/"))
    return pids


def test_the_demo_shows_the_whole_site_and_ctrl_c_leaves_nothing_running(
        demo_root: Path, omero_venv: Path, browser: Browser, need_nginx: None, tmp_path: Path) -> None:
    nginx_port, gunicorn_port = free_port(), free_port()
    config = demo_config(demo_root, omero_venv, nginx_port, gunicorn_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
    env.update(OMEROWEBD_DEMO_CONFIG=str(config), TERM="xterm")
    term = Terminal([str(REPO / "scripts" / "demo.sh")], env, REPO)
    seen: set[int] = set()
    try:
        # Bootstrap is quick when everything is installed; the first start collects static files.
        at = term.wait_for_line("demo: open ", 900)
        term.wait_for_line("\n", 30, after=at)
        url = f"http://127.0.0.1:{nginx_port}/webclient/login/"
        urls = URL.findall(term.output)
        assert urls and urls[-1] == url, f"the last address the demo printed is not nginx's {url}:\n{term.output[-3000:]}"

        page = browser.visit(url, tmp_path / "screenshots" / "demo-login.png")
        page.assert_whole()
        assert page.title == "OMERO.web - Login", page.explain(f"title {page.title!r}")
        assert page.facts["bodyBackground"] == "rgb(224, 228, 234)", page.explain("OMERO.web's styles are not applied")
        redirect = answers(nginx_port, "/pub/demo-2024", 307)
        assert redirect is not None and redirect.headers["location"].endswith("/webclient/?show=project-1")
        seen |= demo_processes(config, demo_root)

        term.type(b"\n")  # Enter: omerowebd stops, nginx shows the maintenance page
        at = term.wait_for_line("demo: omerowebd stopped", 180)
        page = browser.visit(url, tmp_path / "screenshots" / "demo-maintenance.png")
        page.assert_whole(document_status=502)
        assert page.title == "OMERO.web is restarting", page.explain(f"title {page.title!r}")

        term.type(b"\n")  # Enter again: omerowebd serves again
        term.wait_for_line("demo: omerowebd (pid", 600, after=at)
        assert answers(nginx_port, "/webclient/login/") is not None
        seen |= demo_processes(config, demo_root)
        assert len(seen) >= 8, f"the demo's processes were not all found: {sorted(seen)}"

        term.type(b"\x03")  # Ctrl-C: the terminal sends SIGINT to the demo's process group
        code = term.proc.wait(180)
        assert code == 0, term.output[-3000:]
        assert "demo: stopped" in term.output
        left = sorted(pid for pid in seen | demo_processes(config, demo_root) if running(pid))
        assert not left, f"still running after Ctrl-C: {left}"
    finally:
        term.close()
        for pid in seen | set(processes_with_env(f"OMEROWEBD_SNAPSHOT={demo_root / 'run'}/")):
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
