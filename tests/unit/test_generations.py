"""The generations' state machine (generations.py, generation.State), with a stand-in for gunicorn.

In the manner of gunicorn's tests/test_arbiter.py: the real owner and the real
Generation, in-process; only the master is a stand-in (a sleeping Python
process in its own session), whose workers "load the app" when the test says
so and whose probe socket answers 200. No venv; each test takes a second or so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from omerowebd.generation import BadTransition, Generation, GenerationFailed, GunicornPlan, State
from omerowebd.generations import Generations


def plan(tmp_path: Path, workers: int = 2) -> GunicornPlan:
    return GunicornPlan(venv=tmp_path / "venv", app="app", omeroweb_dir=tmp_path, settings={
        "workers": workers, "graceful_timeout": 1}, args=(), env={"OMERODIR": str(tmp_path)}, health_path="/",
        health_host="localhost")


class FakeGunicorn:
    """How each spawn goes, in order: "ok", "exec fails", "exits while booting", "never ready", or an exception."""

    def __init__(self, tmp_path: Path, *script: Any) -> None:
        self.tmp_path = tmp_path
        self.script = list(script)
        self.servers: list[asyncio.AbstractServer] = []
        self.procs: list[asyncio.subprocess.Process] = []

    def make(self, number: int, target: str) -> Generation:
        return Generation(number=number, plan=plan(self.tmp_path), directory=self.tmp_path / f"gen-{number}")

    async def launch(self, generation: Generation, target: str, sockets: Sequence[Any]) -> None:
        how = self.script.pop(0) if self.script else "ok"
        if isinstance(how, BaseException):
            raise how
        if how == "exec fails":
            raise OSError(8, "Exec format error")
        generation.directory.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(600)",
                                                    start_new_session=True)
        self.procs.append(proc)
        generation.attach(proc)
        if how == "exits while booting":
            proc.send_signal(signal.SIGKILL)
            return
        self.servers.append(await asyncio.start_unix_server(_answer_200, path=str(generation.probe_path)))
        if how == "ok":  # "heard before": its workers reported before it was registered (the early start)
            for worker in range(generation.plan.workers):
                generation.on_event({"gen": generation.number, "event": "worker_ready", "pid": 10_000 + worker})

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for proc in self.procs:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def _answer_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
    await writer.drain()
    writer.close()


def run(tmp_path: Path, *script: Any, test: Any, **options: Any) -> Any:
    async def main() -> Any:
        fake = FakeGunicorn(tmp_path, *script)
        gens: Generations[str] = Generations(fake.make, fake.launch, **options)
        try:
            return await asyncio.wait_for(test(gens, fake), 60)
        finally:
            await gens.stop_all()
            await fake.close()

    return asyncio.run(main())


def test_bring_up_promote_retire(tmp_path: Path) -> None:
    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        first = await gens.bring_up("config 1", [], ready_timeout=10)
        assert first.state is State.SERVING and gens.promote(first) is None and gens.current is first
        second = await gens.bring_up("config 2", [], ready_timeout=10)
        assert gens.current is first, "a generation serves only once promoted"
        assert gens.promote(second) is first
        await gens.retire(first)
        assert first.state is State.RETIRING and not first.alive
        assert [g["number"] for g in gens.describe()["generations"]] == [2]
        assert gens.describe()["generation"]["state"] == "serving"

    run(tmp_path, test=test)


@pytest.mark.parametrize("how, why", [
    ("exec fails", "Exec format error"),
    ("exits while booting", "gunicorn master exited with status -9 while booting"),
    ("never ready", "not ready after 1s (0 of 2 workers had loaded the app"),
    (RuntimeError("a bug"), "RuntimeError: a bug"),
])
def test_a_spawn_that_fails_for_any_reason_is_one_failed_attempt_and_leaves_the_status(tmp_path: Path, how: Any,
                                                                                         why: str) -> None:
    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        with pytest.raises(GenerationFailed) as failed:
            await gens.bring_up("config", [], ready_timeout=1)
        assert why in str(failed.value) and "\n" not in str(failed.value)
        assert gens.describe()["generations"] == [] and gens.current is None
        assert all(p.returncode is not None for p in fake.procs), "nothing of it runs on"
        serving = await gens.bring_up("config", [], ready_timeout=10)  # the next attempt starts afresh
        assert serving.number == 2 and [g["number"] for g in gens.describe()["generations"]] == [2]

    run(tmp_path, how, test=test)


def test_a_crash_of_the_serving_master_restarts_it_waiting_longer_after_each_failed_attempt(tmp_path: Path) -> None:
    """Whatever a spawn raises, the waits double (1, 2, 4, 8 ...) up to the limit."""
    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        waits: list[float] = []
        said: list[str] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        gens._sleep = sleep
        crashed: asyncio.Queue[Generation] = asyncio.Queue()
        gens.on_change = lambda what, g: crashed.put_nowait(g) if what == "crashed" else None
        first = await gens.bring_up("config", [], ready_timeout=10)
        gens.promote(first)
        os.killpg(first.pid, signal.SIGKILL)
        dead = await crashed.get()
        assert dead is first and gens.current is None and gens.crashes == 1
        assert gens.describe()["last_crash"]["exit_status"] == -9
        fake.script = [OSError(2, "No such file or directory"), PermissionError(13, "Permission denied"),
                       RuntimeError("a bug"), "exec fails", "exits while booting", "never ready", "ok"]
        back = await gens.restart_after_crash(dead, asyncio.Lock(), lambda: "config", lambda: [], lambda: 1.0,
                                              said.append)
        assert back is not None and gens.current is back and back.state is State.SERVING
        assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
        assert gens.last_crash["restart"] == f"done, generation {back.number}"
        assert "restarting in 10s" in said[-2]

    run(tmp_path, test=test, backoff_max=10.0)


def test_a_restart_stops_once_a_reload_has_brought_a_generation_up(tmp_path: Path) -> None:
    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        lock = asyncio.Lock()
        first = await gens.bring_up("config", [], ready_timeout=10)
        gens.promote(first)
        os.killpg(first.pid, signal.SIGKILL)
        await asyncio.wait_for(first._changed.wait(), 10)
        while gens.current is not None:
            await asyncio.sleep(0.01)
        async with lock:  # a reload holds the lock and brings one up
            restart = asyncio.ensure_future(gens.restart_after_crash(first, lock, lambda: "config", lambda: [],
                                                                     lambda: 10.0, lambda line: None))
            gens.promote(await gens.bring_up("fixed config", [], ready_timeout=10))
        assert await restart is None and gens.current is not None and gens.current.number == 2

    run(tmp_path, test=test)


def test_a_wrong_transition_raises(tmp_path: Path) -> None:
    g = Generation(number=1, plan=plan(tmp_path), directory=tmp_path / "gen-1")
    with pytest.raises(BadTransition, match="new -> serving"):
        g._move(State.SERVING)
    g._move(State.FAILED)
    with pytest.raises(BadTransition, match="failed -> booting"):
        g._move(State.BOOTING)

    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        task = asyncio.ensure_future(gens.bring_up("config", [], ready_timeout=30))
        while not gens.all or next(iter(gens.all.values())).state is not State.BOOTING:
            await asyncio.sleep(0.01)
        booting = next(iter(gens.all.values()))
        with pytest.raises(BadTransition, match="booting: it cannot serve"):
            gens.promote(booting)  # only a generation that serves can become the serving one
        with pytest.raises(BadTransition, match="booting -> retiring"):
            booting._move(State.RETIRING)
        task.cancel()  # the daemon stops: the booting generation is killed, and the cancel goes on
        with pytest.raises(asyncio.CancelledError):
            await task
        assert booting.state is State.FAILED and gens.all == {}

    run(tmp_path, "never ready", test=test)


def test_a_hostile_datagram_is_dropped_and_the_next_one_heard(tmp_path: Path) -> None:
    # Anyone who can reach the events socket may send JSON nested past what the parser takes (RecursionError).
    gens: Generations[str] = Generations(lambda number, target: None, lambda generation, target, sockets: None)  # type: ignore[arg-type,return-value]
    heard: list[Any] = []
    gens.on_event = heard.append  # type: ignore[method-assign]
    for data in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 200_000, b"\xff", b"[1]"):
        gens._heard(data)
    gens._heard(b'{"gen": 1, "event": "worker_ready", "pid": 7}')
    assert heard == [{"gen": 1, "event": "worker_ready", "pid": 7}]


def test_reports_for_a_generation_not_registered_yet_are_replayed_once_it_is(tmp_path: Path) -> None:
    """The early start's master boots while the daemon still checks and derives: its worker_ready is kept, not lost."""
    async def test(gens: Generations[str], fake: FakeGunicorn) -> None:
        for worker in range(2):
            gens.on_event({"gen": 1, "event": "worker_booting", "pid": 10_000 + worker})
            gens.on_event({"gen": 1, "event": "worker_ready", "pid": 10_000 + worker})
        gens.on_event({"gen": 2, "event": "worker_ready", "pid": 20_000})  # kept for 2, not given to 1
        first = await gens.bring_up("config 1", [], ready_timeout=5)
        assert first.state is State.SERVING and first.ready_workers == {10_000, 10_001}
        gens.on_event({"gen": 1, "event": "worker_ready", "pid": 10_002})  # registered: applied at once
        assert 10_002 in first.ready_workers
        gens.on_event({"gen": 2, "event": "worker_ready", "pid": 20_001})
        gens.forget_pending(2)  # the early master was stopped: what it said is not the next one's
        gens.on_event({"gen": 2, "event": "worker_ready", "pid": 20_002})
        with pytest.raises(GenerationFailed, match="1 of 2 workers"):
            await gens.bring_up("config 2", [], ready_timeout=1)
        gens.on_event({"gen": 2, "event": "worker_ready", "pid": 20_003})  # gone: a number already used
        for pid in range(1000):  # bounded
            gens.on_event({"gen": 9, "event": "worker_ready", "pid": pid})
        assert len(gens._pending) == 256

    run(tmp_path, "heard before", "heard before", test=test)


class SaidLog:
    def __init__(self) -> None:
        self.said: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.said.append((event, fields))


@pytest.mark.parametrize("reaped", [True, False])
def test_an_early_master_not_adopted_is_signalled_only_while_its_pid_is_its_own(tmp_path: Path, reaped: bool,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # running.drop_early: a master the daemon's own poll() already reaped may have a reused pid: never signalled.
    import subprocess

    from omerowebd import running as running_module
    from omerowebd.spawn_record import Early
    signalled: list[tuple[int, int, bool]] = []
    real = running_module.signal_group

    def record(pid: int, sig: int, *, group: bool = True) -> None:
        signalled.append((pid, sig, group))
        real(pid, sig, group=group)

    monkeypatch.setattr(running_module, "signal_group", record)
    master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    if reaped:
        master.kill()
        master.wait()
    early = Early()
    early.master = master
    running = object.__new__(running_module.Running)
    running.log = SaidLog()
    running.early = early
    running.gens = Generations(lambda number, target: None, lambda generation, target, sockets: None)  # type: ignore[arg-type,return-value]
    try:
        asyncio.run(running.drop_early("the config was refused"))
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()
    assert master.returncode is not None and running.early is None
    event, fields = running.log.said[0]
    assert fields == {"why": "the config was refused"}
    if reaped:
        assert signalled == [] and "exited with status -9" in event
    else:
        assert signalled == [(master.pid, signal.SIGTERM, False)] and "stopping it" in event


def test_heard_all_returns_once_every_queued_report_was_read(tmp_path: Path) -> None:
    """An early master not adopted has exited; what its workers said before is in the socket's queue.
    heard_all lets the loop read it all, so none of it reaches the boot that follows."""
    import socket

    async def main() -> list[int]:
        gens: Generations[str] = Generations(lambda number, target: None, lambda generation, target, sockets: None)  # type: ignore[arg-type,return-value]
        path = tmp_path / "events.sock"
        await gens.listen(path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                for pid in range(8):  # (the kernel queues about 10 datagrams before sendto waits)
                    s.sendto(json.dumps({"gen": 1, "event": "worker_exit", "pid": pid}).encode(), str(path))
            await gens.heard_all()
            return [m["pid"] for _, m in gens._pending]
        finally:
            gens.close()

    assert asyncio.run(main()) == list(range(8))
