"""The daemon: start, ready, reload, crash restart, watchdog, stop.

One asyncio loop. Signal handlers and the file watcher only post requests;
what changes state is a handful of methods named after the event they
handle. A reload is a transaction: the new generation must serve before the
old one is retired, and anything short of that puts everything back.

The supervisor only sequences. What a config means and what a change
requires: desired.py (derive, decide); the start: startup.py; one reload:
reloader.py; what runs and the cutover that changes it: running.py; the
gunicorn generations, their states and crash restarts: generations.py; what
runs beside gunicorn: services.py; systemd's watchdog: keepalive.py; what
status shows: status_report.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable
from typing import Any

from . import access, keepalive, log, metrics, redact, services, startup, status_report
from . import config as config_module
from .config import Config
from .control import ControlServer
from .desired import Desired
from .errors import UserError, one_line
from .exits import RELOAD_APPLIED, RELOAD_REJECTED
from .generation import Generation
from .generations import Generations
from .reloader import Reloader, result as reply
from .running import Running
from .sessions import SessionService
from .sockets import HeldSocket
from .store_health import StoreHealth
from .systemd import Notifier
from .venv import Prober
from .verdicts import Verdicts
from .watch import ConfigWatcher


class Supervisor:
    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.log = log.get()
        self.notifier = notifier
        self.config_path = config.path
        self.initial = config
        self.state = "starting"
        self.started_at = time.time()
        # What runs (sockets, generations, nginx files, config.xml, static releases) and the cutover that changes it.
        self.running = Running(self.log, config, on_status=lambda: self.notifier.status(self._status_line()),
                               on_slow=self._extend_timeout, spawn_task=self._spawn_task)
        self.running.gens.on_change = self.handle_generations_change
        self.last_reload: dict[str, Any] | None = None
        self.reloads = 0  # reloads that ran (requests that shared one count once)
        self.services = services.beside_gunicorn(self.log, self)  # the sweeper, the stores' watch, the metrics
        self.prober = Prober()
        self.verdicts = Verdicts(config.daemon.state_dir)  # the venv's answer, remembered across starts
        self.reloader = Reloader(self.log, self.running, config_path=self.config_path, prober=self.prober,
                                 verdicts=self.verdicts, notifier=self.notifier, load=self._load_new_config,
                                 set_state=lambda state: setattr(self, "state", state), after=self._apply_live,
                                 spawn_task=self._spawn_task)
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()  # the first generation serves
        self._reload_lock = asyncio.Lock()
        self._pending_reload: asyncio.Task[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._control: ControlServer | None = None
        self._watcher: ConfigWatcher | None = None
        self._startup: asyncio.Task[None] | None = None
        self._discard_foreign = False  # the next reload may overwrite edits made outside omerowebd

    # What runs, as the status, the metrics and the tests read it.
    @property
    def current(self) -> Generation | None:
        return self.running.gens.current

    @property
    def gens(self) -> Generations[Desired]:
        return self.running.gens

    @property
    def sockets(self) -> list[HeldSocket]:
        return self.running.sockets

    @property
    def applied(self) -> Desired | None:
        return self.running.applied

    @applied.setter
    def applied(self, value: Desired | None) -> None:
        self.running.applied = value

    # -- life cycle --------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.handle_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.handle_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        self._startup = asyncio.create_task(self._start())
        early = self.running.early
        for held in early.held if early is not None else ():  # signals that came while the daemon loaded
            if held == signal.SIGTERM:
                self.handle_stop("SIGTERM")
            elif held == signal.SIGHUP:
                self.handle_hup()  # applied right after the start
        try:
            await self._startup
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
        except BaseException:
            await self._shutdown()
            raise
        await self._stopping.wait()
        await self._shutdown()
        return 0

    async def _start(self) -> None:
        config = self.initial
        startup.make_dirs(config)
        await self.running.open(config)
        self._control = ControlServer(config.daemon.runtime_dir / "control.sock", self.handle_request,
                                      policy=access.policy(config.daemon.admin_group))
        await self._control.start()
        started = await startup.first_generation(config, self.running, self.verdicts, self.prober, self.notifier,
                                                 self.log)
        self.state = "serving"
        self._started.set()
        for service in self.services.values():
            service.update(config, started.target.properties, started.info)
            self._spawn_task(service.run())
        self._follow_config_file(config)
        if self.notifier.watchdog_usec:
            self._spawn_task(keepalive.watchdog(self.notifier, self.running, self.notifier.watchdog_usec / 1e6,
                                                self.log))
        self.notifier.ready(self._status_line())
        assert self.current is not None
        self.log.info("serving", generation=self.current.number, workers=self.current.plan.workers,
                      sockets=[s.address for s in self.sockets])
        # A generation derived from the venv's fresh answer replaces this one; else the answer is kept.
        self._spawn_task(self.reload("the venv's fresh answer") if started.stale else started.remember(self.verdicts))

    async def _shutdown(self) -> None:
        started = self.applied is not None or bool(self.gens.all)  # else the error says it all
        self.state = "stopping"
        self.notifier.stopping("stopping gunicorn")
        if started:
            self.log.info("stopping")
        if self._watcher:
            self._watcher.stop()
        self.running.site_xml.stop()
        for task in list(self._tasks):
            task.cancel()
        await self.running.drop_early("the daemon is stopping")  # stopped before the start adopted it: in order
        await self.gens.stop_all()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._control:
            await self._control.close()
        self.running.close()
        await self.prober.close()
        if started:
            self.log.info("stopped")

    # -- events ------------------------------------------------------------

    def handle_stop(self, why: str) -> None:
        if self._stopping.is_set():
            return
        self.log.info("stop requested", by=why)
        self._stopping.set()
        if self._startup and not self._startup.done():
            self._startup.cancel()
        if self._pending_reload and not self._pending_reload.done():
            self._pending_reload.cancel()

    def handle_hup(self) -> None:
        self._spawn_task(self.reload("SIGHUP"))

    def handle_config_changed(self) -> None:
        self._spawn_task(self.reload("file change"))

    def handle_generations_change(self, what: str, generation: Generation) -> None:
        if what == "crashed":  # the serving master died: bring one back (the reload lock is taken per attempt)
            self.state = "restarting"
            self._spawn_task(self.gens.restart_after_crash(
                generation, self._reload_lock, self.running.target, lambda: self.sockets,
                lambda: self.running.target().config.daemon.ready_timeout, self.notifier.status))
        elif what == "restarted":
            self.running.static.cut_over(generation.number)
            self.state = "serving"
            self.notifier.status(f"{self._status_line()}; restarted after gunicorn exited with status"
                                 f" {self.gens.last_crash.get('exit_status')}")

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            health, sessions = self.services["store_health"], self.services["sessions"]
            assert isinstance(health, StoreHealth) and isinstance(sessions, SessionService)
            # Each within its timeout; one check serves a status flood; nothing of it runs on a clock.
            await asyncio.gather(health.refresh(), sessions.refresh_lock())
            return {"ok": True, **redact.structure(self.status())}  # no secret in a reply, whoever wrote the text
        if cmd == "reload":
            if request.get("dry_run"):
                return await self.reloader.dry_run()
            if request.get("discard_foreign_edits"):
                self._discard_foreign = True  # read by the reload that runs next (this one, or one it joins)
            task = self._spawn_task(self.reload("omerowebctl"))
            if not request.get("wait", True):
                return {"ok": True, "exit_code": RELOAD_APPLIED, "outcome": "accepted", "message": "reload accepted"}
            return await asyncio.shield(task)
        handler = getattr(self, f"request_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return await handler(request)

    async def request_sessions_clear(self, request: dict[str, Any]) -> dict[str, Any]:
        """``omerowebctl sessions clear``: sweep now, after any sweep in progress."""
        service = self.services["sessions"]
        assert isinstance(service, SessionService)
        result = await service.sweep_now(dry_run=bool(request.get("dry_run")))
        return {"ok": not result.get("error"), **result}

    # -- reload ------------------------------------------------------------

    async def reload(self, source: str) -> dict[str, Any]:
        """Serialized; requests that arrive while one waits to run share it."""
        task = self._pending_reload
        if task is None or task.done():
            task = self._pending_reload = asyncio.create_task(self._reload_when_free(source))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            return reply(RELOAD_REJECTED, "cancelled", "the daemon is stopping")

    async def _reload_when_free(self, source: str) -> dict[str, Any]:
        await self._started.wait()  # a reload asked for during start is applied right after it
        async with self._reload_lock:
            self._pending_reload = None  # from here on, a new change needs a new reload
            if self._stopping.is_set() or self.applied is None:
                return reply(RELOAD_REJECTED, "cancelled", "the daemon is stopping")
            started = time.monotonic()
            self.reloads += 1
            self.state = "reloading"
            self.notifier.reloading(f"reloading ({source})")
            result = reply(RELOAD_REJECTED, "cancelled", "the daemon is stopping")
            try:
                try:
                    result = await self._reload(source)
                except UserError as e:  # one a check did not foresee: still the person's to fix
                    result = reply(RELOAD_REJECTED, "rejected", str(e))
                except Exception as e:  # a bug or an unforeseen fault: refused, the serving generation untouched
                    self.log.exception("reload failed unexpectedly", source=source)
                    result = reply(RELOAD_REJECTED, "rejected", f"the reload failed unexpectedly: {one_line(e)}")
                result["source"] = source
                result["seconds"] = round(time.monotonic() - started, 3)
                result["at"] = time.time()
                self.last_reload = result
                metrics.reload_done(result)
                log_method = self.log.info if result["exit_code"] == RELOAD_APPLIED else self.log.error
                log_method("reload", **{k: v for k, v in result.items() if k not in ("ok", "at")})
                return result
            finally:
                # Whatever happened (even a cancel), systemd hears the reload end:
                # RELOADING=1 without READY=1 hangs `systemctl reload`.
                self.state = "serving" if self.current else "restarting"
                self.notifier.ready(f"{self._status_line()}; last reload: {result['outcome']}")

    def _load_new_config(self) -> Config:
        config = config_module.load(self.config_path)
        if self._watcher:
            self._watcher.seen(config.digest)
        return config

    async def _reload(self, source: str) -> dict[str, Any]:
        discard, self._discard_foreign = self._discard_foreign, False
        return await self.reloader.apply(source, discard=discard)

    def _apply_live(self, old: Desired, new: Desired) -> None:
        """The daemon's own settings and the services, after a reload went through."""
        config = new.config
        for service in self.services.values():
            service.update(config, new.properties, new.info)
        self._follow_config_file(config)
        if config.daemon.log_format != old.config.daemon.log_format:
            log.configure(config.daemon.log_format)
        if config.daemon.admin_group != old.config.daemon.admin_group and self._control:
            self._control.policy = access.policy(config.daemon.admin_group)

    # -- helpers -----------------------------------------------------------

    def _follow_config_file(self, config: Config) -> None:
        """Start or stop watching the file, as daemon.watch_config says."""
        if config.daemon.watch_config and self._watcher is None:
            self._watcher = ConfigWatcher(self.config_path, self.handle_config_changed)
            self._watcher.start()
        elif not config.daemon.watch_config and self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._watcher is not None:
            self._watcher.seen(config.digest)

    def _extend_timeout(self, remaining: float) -> None:
        # Tell systemd we are still at it, so a slow app does not time the start or reload out.
        self.notifier.extend_timeout(min(remaining, 5.0) + 10.0)

    def _spawn_task(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed", error=repr(task.exception()))

    def _status_line(self) -> str:
        return self.running.status_line(self.state)

    def status(self) -> dict[str, Any]:
        return status_report.report(state=self.state, started_at=self.started_at, config_path=self.config_path,
                                    watcher=self._watcher, last_reload=self.last_reload, reloads=self.reloads,
                                    running=self.running, services=self.services)
