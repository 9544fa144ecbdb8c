"""The early start waits for gunicorn's boot before the daemon loads (spawn_record.wait_for_boot).

The stand-in master is a Python process that sends the reports gunicorn_conf.py's hooks send, in the
order a test gives, to the events socket; the daemon's side is the real function."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from omerowebd import spawn_record
from omerowebd.generations import Generations

from conftest import wait_for
from unit.test_nginx import info  # noqa: F401 (a fixture)

# Sends each report given (JSON, one per argument) to the events socket; "wait" reads a line from stdin first,
# "exit" ends the process there; then it stays until it is killed.
MASTER = """
import socket, sys
path = sys.argv[1]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    for step in sys.argv[2:]:
        if step == "wait":
            sys.stdin.readline()
        elif step == "exit":
            sys.exit(0)
        else:
            s.sendto(step.encode(), path)
sys.stdin.read()
"""


def report(event: str, pid: int, gen: int = 1) -> str:
    return json.dumps({"pid": pid, "gen": gen, "event": event})


def early_with_master(tmp_path: Path, *steps: str) -> spawn_record.Early:
    early = spawn_record.Early()
    early.events_path = tmp_path / "events.sock"
    early.events = spawn_record.bind_events(early.events_path)
    early.master = subprocess.Popen([sys.executable, "-c", MASTER, str(early.events_path), *steps],
                                    stdin=subprocess.PIPE, text=True, start_new_session=True)
    return early


def snapshot(workers: int = 2) -> dict[str, Any]:
    return {"generation": 1, "settings": {"workers": workers}}


@pytest.fixture
def cleanup() -> Any:
    made: list[spawn_record.Early] = []
    yield made.append
    for early in made:
        if early.master is not None and early.master.poll() is None:
            os.killpg(early.master.pid, signal.SIGKILL)
            early.master.wait()
        early.close()


def test_the_daemon_loads_once_every_worker_has_loaded_the_app(tmp_path: Path, cleanup: Any) -> None:
    steps = [report("worker_booting", 11), report("worker_booting", 12), report("worker_ready", 11),
             report("worker_ready", 13, gen=2)]  # another generation's report does not count
    early = early_with_master(tmp_path, *steps, "wait", report("worker_ready", 12))
    cleanup(early)
    returned = threading.Event()
    waiting_after_one: list[bool] = []

    def second_worker_when_the_first_was_heard() -> None:
        wait_for(lambda: len(early.heard) == 4 or returned.is_set(), 60, "the first four reports to be read")
        waiting_after_one.append(not returned.is_set())  # one worker of two ready: still waiting
        assert early.master is not None and early.master.stdin is not None
        early.master.stdin.write("go\n")
        early.master.stdin.flush()

    helper = threading.Thread(target=second_worker_when_the_first_was_heard)
    helper.start()
    spawn_record.wait_for_boot(early, snapshot(2), limit=60)
    returned.set()
    helper.join()
    assert waiting_after_one == [True]
    # Every report read is kept for the daemon, as sent and in order.
    assert [json.loads(d) for d in early.heard] == [json.loads(s) for s in steps + [report("worker_ready", 12)]]
    assert early.waited is not None and early.waited < 60
    assert early.master is not None and early.master.poll() is None  # the wait never stops the master


def test_a_worker_that_exits_while_booting_ends_the_wait(tmp_path: Path, cleanup: Any) -> None:
    # A failed boot: the daemon's own start says so (wait_ready), sooner than the limit.
    early = early_with_master(tmp_path, report("worker_booting", 11), report("worker_exit", 11))
    cleanup(early)
    spawn_record.wait_for_boot(early, snapshot(2), limit=60)
    assert early.waited is not None and early.waited < 60
    assert [json.loads(d)["event"] for d in early.heard] == ["worker_booting", "worker_exit"]


def test_a_master_that_exits_ends_the_wait(tmp_path: Path, cleanup: Any) -> None:
    early = early_with_master(tmp_path, report("worker_booting", 11), "exit")
    cleanup(early)
    spawn_record.wait_for_boot(early, snapshot(2), limit=60)
    assert early.master is not None and early.master.poll() == 0
    assert early.waited is not None and early.waited < 60


def test_the_wait_ends_at_its_limit(tmp_path: Path, cleanup: Any) -> None:
    # A worker that never finishes loading: the daemon loads anyway; its own ready wait goes on from there.
    early = early_with_master(tmp_path, report("worker_booting", 11))
    cleanup(early)
    spawn_record.wait_for_boot(early, snapshot(1), limit=0.3)
    assert early.waited is not None and early.waited >= 0.3
    assert early.master is not None and early.master.poll() is None


def test_the_signal_handlers_are_given_back(tmp_path: Path, cleanup: Any) -> None:
    early = early_with_master(tmp_path, report("worker_ready", 11))
    cleanup(early)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    spawn_record.wait_for_boot(early, snapshot(1), limit=60)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_an_ignored_signal_stays_ignored(tmp_path: Path, cleanup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Started with SIGINT ignored (nohup, a shell's &): a Ctrl-C meant for the shell does not stop the wait.
    early = early_with_master(tmp_path, "wait", report("worker_ready", 11))
    cleanup(early)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen: list[Any] = []

        def interrupt_while_waiting(*args: Any) -> Any:
            seen.append(signal.getsignal(signal.SIGINT))
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the wait goes on, and hears the worker
            assert early.master is not None and early.master.stdin is not None
            early.master.stdin.write("go\n")
            early.master.stdin.flush()
            return real_poll(*args)

        import select
        real_poll = select.poll
        monkeypatch.setattr(select, "poll", interrupt_while_waiting)
        spawn_record.wait_for_boot(early, snapshot(1), limit=60)
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert [json.loads(d)["event"] for d in early.heard] == ["worker_ready"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_report_not_shaped_as_the_hooks_send_it_is_kept_but_never_counts(tmp_path: Path, cleanup: Any) -> None:
    # Only the service user can send to the socket (0600); still, an odd report must not end the early start.
    odd = [json.dumps({"gen": 1, "event": "worker_ready", "pid": [1]}), "[1, 2]", "not json", report("worker_ready", 12)]
    early = early_with_master(tmp_path, *odd)
    cleanup(early)
    spawn_record.wait_for_boot(early, snapshot(1), limit=60)
    assert [d.decode() for d in early.heard] == odd
    assert early.master is not None and early.master.poll() is None


DAEMON = """
import json, select, signal, subprocess, sys
from pathlib import Path
from omerowebd import spawn_record
tmp = Path(sys.argv[1])
real_poll = select.poll
def poll():  # called once the wait's handlers are set: the test signals only then
    (tmp / "waiting").touch()
    return real_poll()
select.poll = poll
early = spawn_record.Early()
early.events_path = tmp / "events.sock"
early.events = spawn_record.bind_events(early.events_path)
view = tmp / "run" / "gen-1"
(view / "etc" / "grid").mkdir(parents=True)
(view / "etc" / "grid" / "config.xml").write_text("<secret/>")
early.spec = {"directory": str(view)}
early.master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
(tmp / "master.pid").write_text(str(early.master.pid))
if sys.argv[2] == "held":  # a SIGTERM that came during the spawn (Early.hold)
    early.held.append(signal.SIGTERM)
spawn_record.wait_for_boot(early, {"generation": 1, "settings": {"workers": 2}}, limit=600)
print("the wait returned")
"""


def caught(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


@pytest.mark.parametrize("sig, when", [(signal.SIGTERM, "waiting"), (signal.SIGINT, "waiting"),
                                       (signal.SIGTERM, "held")])
def test_a_stop_while_waiting_stops_the_master_and_takes_its_view(tmp_path: Path, sig: int, when: str) -> None:
    """systemctl stop during the boot (or during the spawn, held until the wait): no gunicorn left, no view
    (its config.xml has the site's secrets), and the daemon ends by that signal."""
    root = Path(__file__).resolve().parents[2]
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(tmp_path), when], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    master_pid = None
    try:
        if when == "waiting":
            wait_for(lambda: (tmp_path / "waiting").exists(), 60, "the daemon to wait, its handlers set")
            assert caught(daemon.pid, sig)
            daemon.send_signal(sig)
        assert daemon.wait(60) == -sig
        master_pid = int((tmp_path / "master.pid").read_text())  # written before the wait began
        assert daemon.stdout is not None and daemon.stdout.read() == ""
        assert not (tmp_path / "run" / "gen-1").exists()
        assert not (tmp_path / "events.sock").exists()
        with pytest.raises(ProcessLookupError):  # killed and reaped by the daemon, before it ended
            os.kill(master_pid, 0)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if master_pid is not None:
            try:
                os.killpg(master_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_what_the_wait_read_is_heard_first_by_the_daemon(tmp_path: Path) -> None:
    """Generations.listen takes the reports read during the wait, then what is still queued, in order."""

    async def main() -> list[int]:
        gens: Generations[str] = Generations(lambda number, target: None, lambda generation, target, sockets: None)  # type: ignore[arg-type,return-value]
        path = tmp_path / "events.sock"
        sock = spawn_record.bind_events(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(report("worker_ready", 3).encode(), str(path))
        await gens.listen(path, sock, [report("worker_booting", 1).encode(), report("worker_ready", 2).encode()])
        try:
            await gens.heard_all()
            return [m["pid"] for _, m in gens._pending]
        finally:
            gens.close()

    assert asyncio.run(main()) == [1, 2, 3]


HELD = """
import json, os, signal, sys
from omerowebd import spawn_record
if sys.argv[1] == "ignored":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
early = spawn_record.Early()
spawn_record._hold_signals(early)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGHUP)
os.kill(os.getpid(), signal.SIGTERM)
print(json.dumps({"held": early.held}))
"""


@pytest.mark.parametrize("sighup", ["default", "ignored"])
def test_a_stop_or_reload_before_the_daemons_loop_is_held_for_it(tmp_path: Path, sighup: str) -> None:
    """From the spawn until asyncio takes them, Python's default would end the daemon outright on SIGTERM or
    SIGHUP, leaving the early master's view (config.xml, the site's secrets) behind: each is kept instead,
    once; one ignored where the daemon was started stays ignored."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", HELD, sighup], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"held": [signal.SIGTERM] + ([signal.SIGHUP] if sighup == "default" else [])}


def test_the_daemon_stops_at_once_in_order_on_a_held_stop(tmp_path: Path, info: Any) -> None:  # noqa: F811
    """Supervisor.run: a SIGTERM held while the daemon loaded stops it before the start runs: the early master
    gets SIGTERM (in order, not killed), its view goes, and the daemon exits 0; a held reload is dropped."""
    from omerowebd import supervisor as supervisor_module
    from unit.test_desired import _Quiet, write

    sup = supervisor_module.Supervisor(write(tmp_path, {}), _Quiet())
    sup.services = {}
    view = tmp_path / "run" / "gen-1"
    (view / "etc" / "grid").mkdir(parents=True)
    (view / "etc" / "grid" / "config.xml").write_text("<secret/>")
    early = spawn_record.Early()
    early.spec = {"directory": str(view), "snapshot": json.dumps({"generation": 1})}
    early.master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    early.held = [signal.SIGHUP, signal.SIGTERM]  # a reload asked for, then a stop: the stop wins
    sup.running.early = early
    started: list[bool] = []

    async def start() -> None:
        started.append(True)

    sup._start = start  # type: ignore[method-assign]
    try:
        assert asyncio.run(asyncio.wait_for(sup.run(), 60)) == 0
        assert early.master.returncode == -signal.SIGTERM and not view.exists() and started == []
    finally:
        if early.master.poll() is None:
            early.master.kill()
            early.master.wait()
