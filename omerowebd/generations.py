"""The gunicorn generations the daemon runs: bring one up, make it the serving one, retire, restart after a crash.

Each generation moves along generation.TRANSITIONS (a wrong move raises).
Every way a spawn can fail (the view or collectstatic failing, exec
failing, the master exiting while it boots, a worker that never loads the
app, a probe that gets no answer) is one failed attempt: the generation is
killed and leaves the status at once, and the caller hears one line why.
After a crash of the serving master the same bring-up runs again, waiting
longer after each failed attempt (supervisord's BACKOFF, gunicorn's arbiter).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import signal
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Generic, TypeVar

from . import log, spawn_record
from .errors import UserError, one_line, os_error_text
from .generation import BadTransition, Generation, GenerationFailed, State
from .procs import signal_group
from .sockets import HeldSocket

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# Reports for a generation not registered yet, kept until it is: the early start's master boots while the
# daemon still checks and derives (spawn_record.py), and its workers' worker_ready must not be lost.
PENDING_MAX = 256

T = TypeVar("T")  # the target a generation is made for (desired.Desired in the daemon)

# (number, target) -> a new Generation, no process yet.
Make = Callable[[int, T], Generation]
# Prepare and start the generation's master on these sockets (its view, static files, the exec).
Launch = Callable[[Generation, T, Sequence[HeldSocket]], Awaitable[None]]


class Generations(Generic[T]):
    """Owns every generation: numbering, the serving one, exits, crash restarts."""

    def __init__(self, make: Make[T], launch: Launch[T], *, backoff_first: float = BACKOFF_FIRST,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.log = log.get()
        self._make = make
        self._launch = launch
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.all: dict[int, Generation] = {}  # live generations, by number: what status lists
        self.current: Generation | None = None  # the one that serves
        self.next_number = 1
        self.crashes = 0
        self.last_crash: dict[str, Any] = {}
        self.last_boot_seconds: float | None = None  # spawn -> serving, of the newest generation
        self.stopping = False
        self._sleep = asyncio.sleep  # the backoff's wait (a test counts the waits instead)
        self._events: tuple[asyncio.BaseTransport, Path] | None = None
        self._pending: list[tuple[int, Mapping[str, Any]]] = []  # (number, report) for numbers not registered yet
        # Told when the serving master is lost ("crashed") or back ("restarted"): the supervisor's effects.
        self.on_change: Callable[[str, Generation], None] = lambda what, generation: None

    def __iter__(self) -> Iterator[int]:
        return iter(self.all)

    # -- bring up ------------------------------------------------------------

    async def bring_up(self, target: T, sockets: Sequence[HeldSocket], *, ready_timeout: float,
                       on_slow: Callable[[float], None] | None = None) -> Generation:
        """Start a generation for ``target`` and wait until it serves; it does not serve traffic yet
        (``promote`` makes it the serving one). Any failure: it is killed, gone from the status, and
        GenerationFailed says why in one line."""
        number = self.next_number
        self.next_number += 1
        generation = self._make(number, target)
        generation.on_exit = self._exited
        self.all[number] = generation
        self._replay(number)  # what its master's workers said before it was registered (the early start)
        spawned = time.monotonic()
        try:
            await self._launch(generation, target, sockets)
            self.log.info("gunicorn started", generation=number, pid=generation.pid, workers=generation.plan.workers)
            await generation.wait_ready(ready_timeout, on_slow)
        except BaseException as e:
            self.all.pop(number, None)
            await generation.kill()
            if not isinstance(e, Exception):  # cancelled: the daemon stops
                raise
            if isinstance(e, (GenerationFailed, UserError)):
                reason = str(e)
            elif isinstance(e, OSError):  # e.g. the venv gone in an upgrade: say which file
                reason = os_error_text(e)
            else:  # a bug: the traceback goes to the log, the attempt fails like any other
                self.log.exception("starting a generation failed unexpectedly", generation=number)
                reason = one_line(e)
            raise GenerationFailed(reason) from None
        self.last_boot_seconds = round(time.monotonic() - spawned, 3)
        return generation

    def promote(self, generation: Generation) -> Generation | None:
        """``generation`` serves from now on; returns the one it replaces (to retire), if any."""
        if generation.state != State.SERVING:
            raise BadTransition(f"generation {generation.number} is {generation.state.value}: it cannot serve")
        replaced, self.current = self.current, generation
        return replaced

    async def discard(self, generation: Generation) -> None:
        """A generation that came up but will not serve (nginx could not follow it)."""
        self.all.pop(generation.number, None)
        await generation.kill()

    async def retire(self, generation: Generation) -> None:
        """Graceful: its requests in flight get the plan's graceful_timeout."""
        await generation.stop(generation.plan.graceful_timeout + 5)
        self.all.pop(generation.number, None)
        self.log.info("generation retired", generation=generation.number)

    async def stop_all(self) -> None:
        self.stopping = True
        await asyncio.gather(*(g.stop(g.plan.graceful_timeout + 5, state=State.STOPPING)
                               for g in list(self.all.values())), return_exceptions=True)

    # -- events --------------------------------------------------------------

    async def listen(self, path: Path, sock: socket.socket | None = None, heard: Sequence[bytes] = ()) -> None:
        """Hear the generations' gunicorn hooks (gunicorn_conf.py) on a datagram socket at ``path``
        (``sock``: already bound there by the early start, with what it heard meanwhile queued; ``heard``:
        what it read off the socket already, in order, heard first)."""
        if sock is None:
            sock = spawn_record.bind_events(path)
        for data in heard:
            self._heard(data)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Events(self._heard), sock=sock)
        self._events = (transport, path)

    def close(self) -> None:
        if self._events is not None:
            transport, path = self._events
            transport.close()
            path.unlink(missing_ok=True)
            self._events = None

    def _heard(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes: not our hooks
            return
        if isinstance(message, dict):
            self.on_event(message)

    def on_event(self, message: Mapping[str, Any]) -> None:
        """A report from a generation's gunicorn hooks (gunicorn_conf.py)."""
        try:
            number = int(message["gen"])
        except (ValueError, KeyError, TypeError, OverflowError):
            return
        generation = self.all.get(number)
        if generation is not None:
            generation.on_event(message)
        elif number >= self.next_number and len(self._pending) < PENDING_MAX:
            self._pending.append((number, message))  # not registered yet: replayed once it is

    async def heard_all(self) -> None:
        """Return once the loop has read every report already queued on the events socket.

        A master that has exited said its last before it did; its workers' late reports
        (worker_exit, from the early master the start did not adopt) must reach the
        generation they name while it is not booting yet, never a later boot of that
        number, where a worker's exit means the boot failed."""
        if self._events is None:
            return
        sock = self._events[0].get_extra_info("socket")
        for _ in range(100_000):  # each turn of the loop reads one datagram; bounded all the same
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                return
            if not queued:
                return
            await asyncio.sleep(0)

    def forget_pending(self, number: int) -> None:
        """Reports kept for ``number`` came from a master that will not be it (the early one, stopped)."""
        self._pending = [(n, m) for n, m in self._pending if n != number]

    def _replay(self, number: int) -> None:
        pending, self._pending = self._pending, []
        for n, message in pending:
            if n == number:
                self.all[number].on_event(message)
            elif n > number:
                self._pending.append((n, message))

    def _exited(self, generation: Generation) -> None:
        self.all.pop(generation.number, None)
        if generation is not self.current or self.stopping or generation.state != State.EXITED:
            return
        # The serving master died (killed, OOM, a bug). Its workers may live on
        # as orphans; they finish what they are doing and go.
        self.crashes += 1
        self.last_crash = {"at": time.time(), "generation": generation.number, "exit_status": generation.exit_status,
                           "restart": "now"}
        self.log.error("gunicorn master exited", generation=generation.number, status=generation.exit_status)
        signal_group(generation.pid, signal.SIGTERM)
        shutil.rmtree(generation.directory, ignore_errors=True)  # its OMERODIR view goes with it
        self.current = None
        self.on_change("crashed", generation)

    # -- crash restart -------------------------------------------------------

    async def restart_after_crash(self, dead: Generation, lock: AbstractAsyncContextManager[Any],
                                  target: Callable[[], T], sockets: Callable[[], Sequence[HeldSocket]],
                                  ready_timeout: Callable[[], float], say: Callable[[str], None]) -> Generation | None:
        """Bring a generation back, waiting longer after each failed attempt.

        ``lock`` is taken per attempt, not for the whole loop: a reload that
        fixes what keeps the app from booting must be able to get in (and a
        generation it brings up ends this loop).
        """
        delay = 0.0
        while not self.stopping:
            if delay:
                say(f"gunicorn master exited with status {dead.exit_status}; restarting in {delay:.0f}s")
                self.last_crash["restart"] = f"in {delay:.0f}s, after a failed attempt"
                await self._sleep(delay)
            async with lock:
                if self.current is not None or self.stopping:
                    return None  # a reload brought a generation up meanwhile
                say(f"gunicorn master exited with status {dead.exit_status}; restarting")
                try:
                    generation = await self.bring_up(target(), sockets(), ready_timeout=ready_timeout())
                except GenerationFailed as e:
                    delay = min(self.backoff_max, delay * 2 if delay else self.backoff_first)
                    self.log.error("restart failed", reason=str(e), retry_in=delay)
                    continue
                self.promote(generation)
                self.last_crash["restart"] = f"done, generation {generation.number}"
                self.log.info("serving again", generation=generation.number)
                self.on_change("restarted", generation)
                return generation
        return None

    # -- status --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "generation": self.current.describe() if self.current else None,
            "generations": [g.describe() for g in self.all.values()],
            "crashes": self.crashes,
            "last_crash": self.last_crash or None,
        }


class _Events(asyncio.DatagramProtocol):
    """Reports from gunicorn_conf.py's hooks (a worker has loaded the app, a worker exited)."""

    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.handle(data)
