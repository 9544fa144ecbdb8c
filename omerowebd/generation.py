"""One gunicorn master on the held sockets: spawn, wait until it serves, retire.

A generation is ready when every worker has loaded the app (each reports
from gunicorn's ``post_worker_init``) and an HTTP probe through a socket that
only this generation listens on gets an answer. Until then the previous
generation keeps serving on the shared sockets.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import log, metrics, spawn_record
from .errors import ConfigErrors
from .http_probe import http_probe
from .procs import signal_group as _signal_group
from .sockets import HeldSocket
from .venv import VenvInfo, effective, python_of

CONF = Path(__file__).with_name("gunicorn_conf.py")
PROBE_TIMEOUT = 10.0
# gunicorn's own exit statuses (Arbiter.WORKER_BOOT_ERROR, APP_LOAD_ERROR), in words.
GUNICORN_EXITS = {
    3: "a worker could not boot: the venv or the app is broken, see gunicorn's log above",
    4: "the app could not be loaded, see gunicorn's log above",
}
# daemon.graceful_timeout when neither it nor omero.web.wsgi_timeout bounds a request (wsgi_timeout = 0).
DEFAULT_GRACEFUL_TIMEOUT = 60


class Master(Protocol):
    """A gunicorn master as a generation sees it: asyncio's Process, or an AdoptedMaster."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class AdoptedMaster:
    """A master spawned before the loop ran (spawn_record.py), waited for like asyncio's own.

    Its exit is heard through a pidfd on the loop, and reaped by the Popen
    that made it (kept here, so subprocess never reaps it behind our back):
    the status is Popen's, which is asyncio's (negative: the signal).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:  # an old kernel: a thread waits instead
                asyncio.ensure_future(self._wait_in_thread(self._exited))
            else:
                def exited() -> None:
                    if self._popen.poll() is None:
                        return
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
                    if not self._exited.done():  # type: ignore[union-attr]
                        self._exited.set_result(self._popen.returncode)  # type: ignore[union-attr]
                loop.add_reader(pidfd, exited)
        return await asyncio.shield(self._exited)

    async def _wait_in_thread(self, done: asyncio.Future[int]) -> None:
        status = await asyncio.to_thread(self._popen.wait)
        if not done.done():
            done.set_result(status)


class GenerationFailed(Exception):
    """The new generation did not come up; the message says why, in one line."""


class State(str, enum.Enum):
    """Where a generation is in its life; a str, so status and comparisons read the word."""

    NEW = "new"  # numbered, no process yet
    BOOTING = "booting"  # the master runs; its workers load the app
    SERVING = "serving"  # every worker loaded the app and the probe answered
    RETIRING = "retiring"  # replaced: TERMed, its requests in flight finish
    STOPPING = "stopping"  # the daemon stops
    EXITED = "exited"  # the master died on its own (a crash, or a boot that failed)
    FAILED = "failed"  # killed by the daemon: it did not come up, or nginx could not follow it


# Every move a generation may make; any other is a bug, and raises.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.BOOTING, State.FAILED, State.STOPPING}),
    State.BOOTING: frozenset({State.SERVING, State.EXITED, State.FAILED, State.STOPPING}),
    State.SERVING: frozenset({State.RETIRING, State.EXITED, State.FAILED, State.STOPPING}),
    State.RETIRING: frozenset({State.STOPPING}),
    State.EXITED: frozenset({State.FAILED, State.STOPPING}),
    State.STOPPING: frozenset(),
    State.FAILED: frozenset(),
}


class BadTransition(RuntimeError):
    """A generation was moved where it cannot go from where it is: a bug in the daemon."""


@dataclass(frozen=True)
class GunicornPlan:
    """Everything that decides how a generation is started; equal plans need no new generation."""

    venv: Path
    app: str
    omeroweb_dir: Path
    settings: Mapping[str, Any]
    args: tuple[str, ...]
    env: Mapping[str, str]
    health_path: str
    health_host: str

    @property
    def workers(self) -> int:
        return int(self.settings["workers"])

    @property
    def graceful_timeout(self) -> float:
        """Seconds requests in flight get when this generation retires or the service stops."""
        return float(self.settings["graceful_timeout"])

    def command(self, conf: Path) -> list[str]:
        return [str(python_of(self.venv)), "-m", "gunicorn", "-c", str(conf), *self.args, self.app]


# The worker classes `omero web start` accepts (omero-py's plugins/web.py,
# _build_run_cmd): anything else it refuses with "Invalid omero.web.wsgi_worker_class".
WORKER_CLASSES = ("sync", "gevent")

# gunicorn options omerowebd sets itself, from the properties named: the same
# option in omero.web.wsgi_args would override them behind the daemon's back
# (it counts workers to know a generation is ready), or break the generation
# (--daemon forks away from the daemon, --bind/--config replace its sockets
# and hooks). Long option -> the property to set instead (None: not settable).
OWN_OPTIONS = {
    "--workers": "omero.web.wsgi_workers",
    "--worker-class": "omero.web.wsgi_worker_class",
    "--threads": "omero.web.wsgi_threads",
    "--worker-connections": "omero.web.wsgi_worker_connections",
    "--timeout": "omero.web.wsgi_timeout",
    "--max-requests": "omero.web.application_server.max_requests",
    "--graceful-timeout": "daemon.graceful_timeout",
    "--bind": "daemon.bind",
    "--config": None,
    "--daemon": None,
    "--pid": None,
}
OWN_SHORT = {"-w": "--workers", "-k": "--worker-class", "-t": "--timeout", "-b": "--bind", "-c": "--config",
             "-D": "--daemon", "-p": "--pid"}


class PlanError(ConfigErrors):
    """Properties gunicorn cannot be started with; ``names`` says which, for the checks."""

    def __init__(self, problems: list[str], names: list[str]) -> None:
        super().__init__(problems)
        self.names = names


def plan_gunicorn(
    properties: Mapping[str, str],
    info: VenvInfo,
    *,
    omerodir: Path,
    app: str,
    graceful_timeout: float | None,
    health_path: str | None,
    where: Callable[[str], str] | None = None,
) -> GunicornPlan:
    """The gunicorn options ``omero web start`` derives from the same properties.

    Raises PlanError (one line per property, placed by ``where``) for values
    gunicorn or ``omero web start`` would refuse: ``omerowebctl check``, the
    start and every reload call this one function, so they never disagree.
    """
    found: dict[str, str] = {}

    def prop(name: str, fallback: str) -> str:
        value = effective(properties, info, name, fallback)
        return fallback if value is None else value

    def number(name: str, fallback: str, least: int, meaning: str = "") -> int:
        text = prop(name, fallback)
        try:
            value = int(text)
        except ValueError:
            found[name] = f"must be an integer, not {text!r}"
            return int(fallback)
        if value < least:
            found[name] = f"must be at least {least}{meaning}, not {value}"
            return int(fallback)
        return value

    worker_class = prop("omero.web.wsgi_worker_class", "sync")
    if worker_class not in WORKER_CLASSES:
        found["omero.web.wsgi_worker_class"] = (
            f"must be one of {', '.join(map(repr, WORKER_CLASSES))} (what omero web start accepts), not {worker_class!r}")
    elif worker_class == "gevent" and "gevent" not in info.versions:
        found["omero.web.wsgi_worker_class"] = f"is 'gevent', which is not installed: run {info.venv}/bin/pip install gevent"
    settings: dict[str, Any] = {
        "workers": number("omero.web.wsgi_workers", "5", 1),
        "worker_class": worker_class,
        "timeout": number("omero.web.wsgi_timeout", "60", 0, " (0: no timeout)"),
        "max_requests": number("omero.web.application_server.max_requests", "0", 0, " (0: never recycle)"),
    }
    # Unset: as long as a request may run (wsgi_timeout), so a reload or a stop
    # never cuts a download that the worker timeout would have let finish.
    settings["graceful_timeout"] = math.ceil(graceful_timeout if graceful_timeout is not None
                                             else settings["timeout"] or DEFAULT_GRACEFUL_TIMEOUT)
    if worker_class == "gevent":
        settings["worker_connections"] = number("omero.web.wsgi_worker_connections", "1000", 1)
    else:
        settings["threads"] = number("omero.web.wsgi_threads", "1", 1)
    args = _wsgi_args(properties.get("omero.web.wsgi_args") or "", found)
    if found:
        place = where or (lambda name: "")
        names = sorted(found)
        raise PlanError([f"{place(n) + ': ' if place(n) else ''}{n} {found[n]}" for n in names], names)
    prefix = (properties.get("omero.web.prefix") or "").rstrip("/")
    env = {"OMERODIR": str(omerodir)}
    if prefix:
        env["SCRIPT_NAME"] = prefix
    hosts = _json_list(prop("omero.web.allowed_hosts", '["*"]'))
    host = next((h.lstrip(".") for h in hosts if isinstance(h, str) and "*" not in h), "localhost")
    return GunicornPlan(
        venv=info.venv,
        app=app,
        omeroweb_dir=info.omeroweb_dir,
        settings=settings,
        args=args,
        env=env,
        health_path=health_path or f"{prefix}/webclient/login/",
        health_host=host,
    )


def _wsgi_args(text: str, found: dict[str, str]) -> tuple[str, ...]:
    name = "omero.web.wsgi_args"
    try:
        args = shlex.split(text)
    except ValueError as e:  # "No closing quotation", "No escaped character"
        found[name] = f"cannot be split into arguments as a shell would: {str(e).lower()} in {text!r}"
        return ()
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            # gunicorn's argparse takes unambiguous abbreviations (--work for --workers)
            owned = [o for o in OWN_OPTIONS if len(option) > 3 and o.startswith(option)]
        else:
            owned = [OWN_SHORT[arg[:2]]] if arg[:2] in OWN_SHORT else []
        if owned:
            instead = OWN_OPTIONS[owned[0]]
            fix = f"set {instead} instead" if instead else "omerowebd runs gunicorn in the foreground with its own"
            said = owned[0] if option == owned[0] else f"{arg!r} ({owned[0]})"
            found[name] = f"sets {said}, which omerowebd sets itself: remove it ({fix})"
            break
    return tuple(args)


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


@dataclass
class Generation:
    number: int
    plan: GunicornPlan
    directory: Path
    proc: Master | None = None
    state: State = State.NEW  # moved only by _move, along TRANSITIONS
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    ready_workers: set[int] = field(default_factory=set)
    exit_status: int | None = None
    on_exit: Callable[[Generation], None] | None = None
    # This generation's config.xml: it reads its own copy, in its own OMERODIR
    # view, for its whole life (see prepare_view). None: the site's OMERODIR.
    config_xml: bytes | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _boot_failure: str | None = None
    # Workers that died or hung while serving (gunicorn replaces them): a count and the last one.
    worker_faults: int = 0
    last_worker_fault: dict[str, Any] | None = None
    _leaving: set[int] = field(default_factory=set)  # workers that said they exit on their own
    _booting: dict[int, float] = field(default_factory=dict)  # worker -> when it was forked (monotonic)
    _hung_booting: set[int] = field(default_factory=set)  # workers omerowebd killed for never loading the app
    _boot_watch: asyncio.Task[None] | None = None
    spawned_with: dict[str, Any] | None = None  # spec(): what the master was spawned with

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _move(self, to: State) -> None:
        if to == self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise BadTransition(f"generation {self.number}: {self.state.value} -> {to.value} is not a move it can make")
        self.state = to

    @property
    def omerodir(self) -> Path:
        """What OMERODIR this generation's processes get."""
        return self.directory / "omerodir" if self.config_xml is not None else Path(self.plan.env["OMERODIR"])

    def prepare_view(self) -> Path:
        """Build this generation's OMERODIR: its own etc/grid/config.xml, the site's var/.

        gunicorn respawns a worker (max_requests, timeout, a kill) by forking
        the master, and the new worker reads OMERODIR/etc/grid/config.xml as
        it is then. A shared file would hand the old generation's new workers
        the config of a reload still in progress, and one that cannot boot
        halts the old master. Below OMERODIR, OMERO.web reads that file and
        uses var/ (log/, django_secret_key, static/ by default): var/ is the
        site's, through a link, so logs and the secret key stay shared.
        """
        view = self.omerodir
        if self.config_xml is None:
            return view
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        spawn_record.prepare_view(view, Path(self.plan.env["OMERODIR"]), self.config_xml)
        return view

    @property
    def probe_path(self) -> Path:
        return self.directory / "probe.sock"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.exit_status is None

    def worker_pids(self) -> list[int]:
        """The master's children, read from /proc: exact, whatever gunicorn did since."""
        if not self.alive:
            return []
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return sorted(int(p) for p in text.split())

    def spec(self, sockets: list[HeldSocket], events_path: Path) -> dict[str, Any]:
        """Everything the master is spawned with (JSON): start spawns it, the spawn record remembers it."""
        snapshot = {
            "generation": self.number,
            "events": str(events_path),
            "settings": {
                **self.plan.settings,
                "proc_name": f"omerowebd-gen{self.number}",
                # gunicorn >= 25.1 opens a control socket by default; two
                # generations must not share it, and /run is read-only to us.
                "control_socket": str(self.directory / "gunicorn.ctl"),
            },
        }
        return json.loads(json.dumps({  # as it reads back from the record: lists, not tuples
            "argv": self.plan.command(CONF),
            "cwd": str(self.plan.omeroweb_dir),
            "env": {**self.plan.env, "OMERODIR": str(self.omerodir),
                    "OMEROWEBD_SNAPSHOT": str(self.directory / "snapshot.json")},
            "snapshot": json.dumps(snapshot),
            "config_xml": None if self.config_xml is None else self.config_xml.decode(),
            "site_omerodir": self.plan.env["OMERODIR"],
            "directory": str(self.directory),
            "runtime_dir": str(self.directory.parent),
            "events": str(events_path),
            "sockets": [s.record() for s in sockets],
        }))

    async def start(self, sockets: list[HeldSocket], events_path: Path) -> None:
        """Spawn the master on duplicates of ``sockets`` plus a probe socket of its own."""
        # Anything heard for this number so far came from the early start's master (stopped before this one
        # starts, running.py): its workers are not this master's.
        self.ready_workers.clear()
        self._booting.clear()
        self._leaving.clear()
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.prepare_view()
        self.spawned_with = spec = self.spec(sockets, events_path)
        probe = spawn_record.bind_probe(self.probe_path)
        try:
            fds = [s.fileno() for s in sockets] + [probe.fileno()]
            (self.directory / "snapshot.json").write_text(spec["snapshot"])
            proc = await asyncio.create_subprocess_exec(
                *spec["argv"],
                cwd=spec["cwd"],
                env=spawn_record.child_env(spec["env"], fds),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's ^C reaches the daemon only; it stops gunicorn in order
            )
        finally:
            probe.close()  # the master holds it now
        self.attach(proc)

    def adopt(self, master: subprocess.Popen[bytes], spec: dict[str, Any]) -> None:
        """A master the early start spawned (spawn_record.py) with exactly ``spec``: this generation's from now on."""
        self.spawned_with = spec
        self.attach(AdoptedMaster(master))

    def attach(self, proc: Master) -> None:
        """The master runs: boot from here, and hear when it exits."""
        self._move(State.BOOTING)
        self.proc = proc
        asyncio.get_running_loop().create_task(self._watch_exit())

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        self.exit_status = await self.proc.wait()
        if self.state == State.BOOTING:
            why = GUNICORN_EXITS.get(self.exit_status or 0, "see gunicorn's log above")
            self._boot_failure = self._boot_failure or (
                f"gunicorn master exited with status {self.exit_status} while booting ({why})")
        if self.state in (State.BOOTING, State.SERVING):
            self._move(State.EXITED)
        self._changed.set()
        if self.on_exit is not None:
            self.on_exit(self)

    def on_event(self, message: Mapping[str, Any]) -> None:
        event = message.get("event")
        pid = message.get("pid")
        if event == "worker_booting" and isinstance(pid, int):
            self._booting[pid] = time.monotonic()
        elif event == "worker_ready" and isinstance(pid, int):
            self.ready_workers.add(pid)
            self._booting.pop(pid, None)
        elif event == "worker_leaving" and isinstance(pid, int):
            self._leaving.add(pid)  # max_requests, a graceful stop: nothing wrong
        elif event == "worker_exit" and isinstance(pid, int):
            if self.state == State.BOOTING and pid not in self.ready_workers:
                self._boot_failure = "a worker exited before it had loaded the app (see gunicorn's log above)"
            elif self.state == State.SERVING and pid not in self._hung_booting and (
                    message.get("timeout") or pid not in self._leaving):
                self._worker_fault(pid, hung=bool(message.get("timeout")))
            self.ready_workers.discard(pid)
            self._leaving.discard(pid)
            self._hung_booting.discard(pid)
            self._booting.pop(pid, None)
        self._changed.set()

    def _worker_fault(self, pid: int, *, hung: bool = False, why: str | None = None) -> None:
        # gunicorn's master starts another worker at once; the requests the
        # lost one held are lost with it. Said once, here, in the daemon's words.
        self.worker_faults += 1
        metrics.worker_died()
        if why is None and hung:
            why = "hung past omero.web.wsgi_timeout and was killed by gunicorn"
        elif why is None:
            why = "died (killed, or crashed: out of memory?)"
        self.last_worker_fault = {"at": time.time(), "pid": pid, "why": why}
        log.get().warning(f"gunicorn worker {why}; gunicorn starts another", generation=self.number, pid=pid)

    async def wait_ready(self, timeout: float, on_slow: Any = None) -> None:
        """Return once every worker has loaded the app and the probe answers; else raise."""
        deadline = time.monotonic() + timeout
        while len(self.ready_workers) < self.plan.workers:
            if self._boot_failure:
                raise GenerationFailed(self._boot_failure)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GenerationFailed(
                    f"not ready after {timeout:.0f}s ({len(self.ready_workers)} of {self.plan.workers} workers"
                    " had loaded the app; raise daemon.ready_timeout if the app is slow to load)"
                )
            self._changed.clear()
            if on_slow is not None:
                on_slow(remaining)
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 5.0))
            except asyncio.TimeoutError:
                pass
        if self._boot_failure:
            raise GenerationFailed(self._boot_failure)
        status = await http_probe(
            (socket.AF_UNIX, str(self.probe_path)), self.plan.health_path, self.plan.health_host, timeout=PROBE_TIMEOUT
        )
        if status is None or status >= 500:
            what = "no answer" if status is None else f"HTTP {status}"
            raise GenerationFailed(f"health probe GET {self.plan.health_path} got {what}")
        if self.state != State.BOOTING:  # the master exited (or was stopped) while the probe ran
            raise GenerationFailed(self._boot_failure or f"the master is {self.state.value}, not booting")
        self._move(State.SERVING)
        self.ready_at = time.time()
        self._boot_watch = asyncio.get_running_loop().create_task(self._watch_boots(timeout))

    async def _watch_boots(self, timeout: float) -> None:
        """Kill a worker of this serving generation that never finishes loading the app.

        gunicorn's own timeout does not cover a booting worker (its heartbeat
        file starts with a wall-clock time the master compares with a
        monotonic one), so a respawned worker stuck importing OMERO.web (a
        hung NFS mount, an app waiting on the network) would stay for good and
        the generation would serve with one worker fewer, silently. It gets
        what a new generation gets: daemon.ready_timeout.
        """
        while self.state == State.SERVING and self.alive:
            await asyncio.sleep(max(0.5, min(5.0, timeout / 2)))
            children = self.worker_pids()
            for pid, forked in list(self._booting.items()):
                if pid not in children:  # gone without a word (its exit report was lost)
                    self._booting.pop(pid, None)
                    continue
                if time.monotonic() - forked <= timeout or pid in self._hung_booting or self.state != State.SERVING:
                    continue
                self._hung_booting.add(pid)
                self._worker_fault(pid, why=f"hung while loading OMERO.web for more than {timeout:.0f}s "
                                            "(daemon.ready_timeout) and was killed by omerowebd")
                _signal_group(pid, signal.SIGKILL, group=False)

    async def stop(self, timeout: float, *, state: State = State.RETIRING) -> None:
        """Graceful stop: TERM lets in-flight requests finish; KILL the group after ``timeout``."""
        if state in TRANSITIONS[self.state]:  # else it has ended already (exited, failed): only clean up
            self._move(state)
        if self.alive:
            assert self.proc is not None
            _signal_group(self.proc.pid, signal.SIGTERM, group=False)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
            except asyncio.TimeoutError:
                log.get().warning("gunicorn master did not stop in time; killing it", generation=self.number)
                _signal_group(self.proc.pid, signal.SIGKILL, group=True)
                await self.proc.wait()
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL, group=True)  # stragglers of the session, if any
        shutil.rmtree(self.directory, ignore_errors=True)

    async def kill(self) -> None:
        """A generation that failed to boot: nothing in it is worth waiting for."""
        if self.state != State.STOPPING:  # the daemon's stop got to it first: it goes either way
            self._move(State.FAILED)
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL, group=True)
            await self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state.value,
            "master_pid": self.pid,
            "worker_pids": self.worker_pids(),
            "workers": self.plan.workers,
            "ready_workers": len(self.ready_workers),  # have loaded the app (omerowebctl reload's progress)
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "worker_faults": self.worker_faults,
            "last_worker_fault": self.last_worker_fault,
        }


