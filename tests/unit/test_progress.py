"""omerowebctl's progress line: shown on a terminal (a real pty), never when
piped or with --json; the command's own output is the same either way.

A stand-in daemon on a unix socket answers like omerowebd does (one JSON line
per request) and holds the long request's reply until the client has seen
the progress it reports."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_in_pty as conftest_run_in_pty

from omerowebd import progress
from omerowebd.commands import reload as reload_command

REPO = Path(__file__).resolve().parents[2]

BOOTING = {
    "state": "reloading",
    "serving": True,
    "generation": {"number": 6, "state": "serving", "workers": 2},
    "generations": [
        {"number": 6, "state": "serving", "workers": 2, "ready_workers": 2},
        {"number": 7, "state": "booting", "workers": 2, "ready_workers": 1},
    ],
    "sessions": {"engine": "file", "store": "/var/lib/omerowebd/sessions", "sweeper": "omerowebd",
                 "running": {"since": 0, "trigger": "omerowebctl", "dry_run": False},
                 "last": {"scanned": 144000, "deleted": 10, "duration": 12.4}},
}
APPLIED = {"ok": True, "exit_code": 0, "outcome": "applied", "message": "generation 7 serves", "changes": []}
SWEPT = {"ok": True, "engine": "file", "store": "/var/lib/omerowebd/sessions", "sweeper": "omerowebd",
         "dry_run": False, "scanned": 3, "deleted": 1, "kept": 2, "errors": 0, "duration": 0.5}


class FakeDaemon:
    """Answers status at once; a long request after ``status_wanted`` status requests (or ``hold`` seconds)."""

    def __init__(self, path: Path, replies: dict[str, dict[str, Any]], status_wanted: int, hold: float) -> None:
        self.path = path
        self.replies = replies
        self.status_wanted = status_wanted
        self.hold = hold
        self.statuses = 0
        self.polled = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            line = conn.makefile("rb").readline()
            if not line:
                return  # omerowebctl sessions clear first checks that someone listens
            cmd = json.loads(line)["cmd"]
            if cmd == "status":
                self.statuses += 1
                if self.statuses >= self.status_wanted:
                    self.polled.set()
                reply = BOOTING
            else:
                self.polled.wait(self.hold)
                reply = self.replies[cmd]
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake(tmp_path):
    daemons: list[FakeDaemon] = []

    def make(status_wanted: int = 2, hold: float = 60.0) -> FakeDaemon:
        d = FakeDaemon(tmp_path / f"control{len(daemons)}.sock", {"reload": APPLIED, "sessions_clear": SWEPT},
                       status_wanted, hold)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.close()


def ctl_argv(sock: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "omerowebd.ctl", "--config", "/nonexistent/omerowebd.toml", "--socket", str(sock), *args]


def ctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(REPO)
    env["TERM"] = "xterm"
    return env


def run_in_pty(argv: list[str]) -> tuple[int, str]:
    return conftest_run_in_pty(argv, ctl_env())


def test_reload_on_a_terminal_shows_what_the_daemon_is_doing(fake):
    d = fake(status_wanted=2)
    code, out = run_in_pty(ctl_argv(d.path, "reload"))
    assert code == 0, out
    assert d.polled.is_set()
    assert "reloading: generation 7 is starting, 1 of 2 workers have loaded OMERO.web (" in out, out
    # Redrawn in place, and erased before the command's own line.
    assert "\r\x1b[K" in out
    assert out.rstrip().endswith("applied: generation 7 serves"), repr(out[-300:])
    final = out.rsplit("\r\x1b[K", 1)[-1]
    assert final.strip() == "applied: generation 7 serves", repr(final)


def test_reload_piped_prints_only_its_result_and_never_polls(fake):
    # Held long enough that a progress line would have been drawn and polled twice.
    d = fake(status_wanted=1, hold=2 * (progress.DELAY + progress.POLL))
    result = subprocess.run(ctl_argv(d.path, "reload"), capture_output=True, text=True, env=ctl_env(), timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "applied: generation 7 serves\n"
    assert result.stderr == ""
    assert d.statuses == 0


def test_sessions_clear_on_a_terminal_shows_the_store_and_the_last_sweep(fake):
    d = fake(status_wanted=2)
    code, out = run_in_pty(ctl_argv(d.path, "sessions", "clear"))
    assert code == 0, out
    assert "sweeping expired sessions in /var/lib/omerowebd/sessions; the last sweep scanned 144000 files in 12s (" in out, out
    final = out.rsplit("\r\x1b[K", 1)[-1]
    assert final.splitlines()[0].strip() == "file /var/lib/omerowebd/sessions", repr(final)


def test_sessions_clear_json_on_a_terminal_is_only_json(fake):
    d = fake(status_wanted=1, hold=2 * (progress.DELAY + progress.POLL))
    code, out = run_in_pty(ctl_argv(d.path, "sessions", "clear", "--json"))
    assert code == 0, out
    assert "\x1b" not in out and "\r\n" in out  # the pty turns \n into \r\n; nothing else moves the cursor
    assert json.loads(out.replace("\r\n", "\n"))["scanned"] == 3
    assert d.statuses == 0


def test_progress_writes_nothing_when_disabled_and_erases_what_it_drew():
    quiet = io.StringIO()
    with progress.Progress("working", enabled=False, stream=quiet, delay=0):
        time.sleep(0)
    assert quiet.getvalue() == ""

    shown = io.StringIO()
    drawn = threading.Event()
    with progress.Progress("working", enabled=True, stream=shown, delay=0, redraw=0.01, poll_interval=0,
                           poll=lambda: (drawn.set(), "working: 3 of 4\nfiles")[1]) as p:
        assert drawn.wait(30)
        p.echo("a warning", file=shown)
        deadline = time.monotonic() + 30
        while "working" not in shown.getvalue().split("a warning\n")[-1]:  # drawn again under it
            assert time.monotonic() < deadline, shown.getvalue()
            time.sleep(0.01)
    text = shown.getvalue()
    assert "working: 3 of 4 files (" in text  # one row, whatever the poll returned
    assert "a warning\n" in text
    assert text.endswith(progress.ERASE)


def test_a_failing_poll_keeps_the_last_line_and_the_command_going():
    shown = io.StringIO()
    calls = threading.Event()

    def poll() -> str:
        calls.set()
        raise OSError("daemon gone")

    with progress.Progress("reloading", enabled=True, stream=shown, delay=0, redraw=0.01, poll_interval=0, poll=poll):
        assert calls.wait(30)
    assert "reloading (" in shown.getvalue()


@pytest.mark.parametrize(
    ("status", "line"),
    [
        ({"state": "starting"}, "reloading: waiting for the daemon (it is starting)"),
        ({"state": "reloading", "generation": {"number": 3}, "generations": [{"number": 3, "state": "serving"}]},
         "reloading: checking the new config"),
        (BOOTING, "reloading: generation 7 is starting, 1 of 2 workers have loaded OMERO.web"),
        ({"state": "reloading", "generation": {"number": 8},
          "generations": [{"number": 7, "state": "retiring"}, {"number": 8, "state": "serving"}]},
         "reloading: generation 8 serves, retiring generation 7"),
        ({"state": ["odd"]}, None),
    ],
)
def test_reload_progress_reads_the_status(status, line):
    assert reload_command.describe(status) == line


def test_elapsed_reads_like_a_person_would_say_it():
    assert [progress.elapsed(s) for s in (0, 59.9, 60, 125)] == ["0s", "59s", "1m00s", "2m05s"]
