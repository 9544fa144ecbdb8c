"""The daemon: start, ready, reload, crash restart, watchdog, stop.

One asyncio loop. Signal handlers and the file watcher only post requests;
what changes state is a handful of methods named after the event they
handle. A reload is a transaction: the new generation must serve before the
old one is retired, and anything short of that puts everything back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from . import access, checks, log, omero_config, redact, sockets
from . import config as config_module
from .config import Config
from .control import ControlServer
from .errors import ConfigError, UserError
from .exits import EXIT_FAILURE, RELOAD_APPLIED, RELOAD_REJECTED, RELOAD_RESTART_REQUIRED, RELOAD_ROLLED_BACK
from .generation import Generation, GenerationFailed, GunicornPlan, http_probe, plan_gunicorn
from .nginx import NginxOutput, Switch, mark_applied
from .sessions import SessionService
from .sockets import HeldSocket
from .store_health import StoreHealth
from .static import StaticFiles, release_for
from .store_watch import StoreWatch
from .systemd import Notifier
from .venv import Prober, VenvInfo, fingerprint
from .watch import ConfigWatcher

# Settings that a running daemon cannot take over: they name its own sockets and files.
RESTART_KEYS = ("daemon.runtime_dir", "daemon.state_dir")
# Daemon settings a reload applies without a new gunicorn generation.
LIVE_DAEMON_KEYS = ("daemon.ready_timeout", "daemon.watch_config", "daemon.log_format", "daemon.admin_group")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0

Undo = Callable[[], Awaitable[None]]


class Output(Protocol):
    """A file the daemon derives from the config (the nginx includes)."""

    async def stage(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> Switch | None:
        """Render and check, changing nothing live; the switch runs once the new generation serves."""
        ...

    def status(self) -> dict[str, Any]: ...


class Service(Protocol):
    """Something that runs beside gunicorn on its own schedule (the session sweeper)."""

    def update(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> None: ...

    async def run(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Applied:
    """What is running: the config and everything derived from it."""

    config: Config
    info: VenvInfo
    properties: Mapping[str, str]  # as written to config.xml
    plan: GunicornPlan
    packages: str  # venv fingerprint


class Supervisor:
    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.log = log.get()
        self.notifier = notifier
        self.config_path = config.path
        self.initial = config
        self.applied: Applied | None = None
        self.state = "starting"
        self.started_at = time.time()
        self.sockets: list[HeldSocket] = []
        self.current: Generation | None = None
        self.generations: dict[int, Generation] = {}
        self.next_number = 1
        self.last_reload: dict[str, Any] | None = None
        self.crashes = 0
        self.last_crash: dict[str, Any] = {}
        self.reloads = 0  # reloads that ran (requests that shared one count once)
        self.last_boot_seconds: float | None = None  # spawn -> serving, of the newest generation
        self.outputs: dict[str, Output] = {"nginx": NginxOutput(self.log, addresses=self._upstream_addresses)}
        self.services: dict[str, Service] = {"sessions": SessionService(self.log), "session_store": StoreWatch(self.log)}
        self.store_health = StoreHealth()  # the caches, asked live by status (and the metrics)
        self.services["store_health"] = self.store_health
        self.prober = Prober()
        self.static = StaticFiles(config.daemon.state_dir)  # one collected directory per release
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()  # the first generation serves
        self._reload_lock = asyncio.Lock()
        self._pending_reload: asyncio.Task[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_transport: asyncio.DatagramTransport | None = None
        self._control: ControlServer | None = None
        self._watcher: ConfigWatcher | None = None
        self._startup: asyncio.Task[None] | None = None
        # The site's config.xml: who else wrote it (omerowebd writes it only once a generation serves).
        self.foreign: omero_config.ForeignEdits | None = None
        self.foreign_since: float | None = None
        self.config_xml_written_at: float | None = None
        self._discard_foreign = False  # the next reload may overwrite edits made outside omerowebd
        self._xml_watcher: ConfigWatcher | None = None

    # -- paths -------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        return self.initial.daemon.runtime_dir

    @property
    def state_dir(self) -> Path:
        return self.initial.daemon.state_dir

    @property
    def session_dir(self) -> Path:
        return omero_config.default_session_dir(self.state_dir)

    # -- life cycle --------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.handle_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.handle_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        self._startup = asyncio.create_task(self._start())
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
        for directory, mode in ((self.runtime_dir, 0o750), (self.state_dir, 0o750), (self.session_dir, 0o700)):
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
        self.sockets = self._acquire_sockets(config)
        await self._open_event_socket()
        self._control = ControlServer(self.runtime_dir / "control.sock", self.handle_request,
                                      policy=access.policy(config.daemon.admin_group))
        await self._control.start()
        self.notifier.status("checking the config and the OMERO.web venv")
        info, warnings = await checks.run(config, self.prober)
        for warning in warnings:
            self.log.warning(warning)
        try:
            target = self._target(config, info, fingerprint(config.daemon.venv))
        except UserError:
            raise
        except Exception as e:  # exit 78 with one line, not a traceback and a restart loop
            self.log.debug("planning failed", exc_info=True)
            raise ConfigError(f"{config.path}: cannot work out how to run gunicorn from it: {_one_line(e)}") from None
        switches = [s for s in [await o.stage(config, target.properties, info) for o in self.outputs.values()] if s]
        self.notifier.status("starting gunicorn")
        generation = await self._spawn(target)
        try:
            await generation.wait_ready(config.daemon.ready_timeout, self._extend_timeout)
        except GenerationFailed as e:
            await generation.kill()
            raise UserError(f"OMERO.web did not start: {e}", exit_code=EXIT_FAILURE) from None
        for switch in switches:
            await switch()
        self.applied = target
        await self._publish_config_xml(target, at_start=True)
        mark_applied(config, self.log)  # serving now: the root publisher may render this TOML for nginx
        self.current = generation
        self.static.cut_over(generation.number)
        self._spawn_task(self.static.prune(self.generations))  # what an earlier run left, but the previous release
        self.state = "serving"
        self._started.set()
        for service in self.services.values():
            service.update(config, target.properties, info)
            self._spawn_task(service.run())
        self._follow_config_file(config)
        if self.notifier.watchdog_usec:
            self._spawn_task(self._watchdog_loop(self.notifier.watchdog_usec / 1e6))
        self.notifier.ready(self._status_line())
        self.log.info("serving", generation=generation.number, workers=generation.plan.workers,
                      sockets=[s.address for s in self.sockets])

    def _acquire_sockets(self, config: Config) -> list[HeldSocket]:
        held = sockets.from_systemd()
        if held:
            self.log.debug("using sockets from systemd", sockets=[s.address for s in held])
            return held
        return sockets.bind(self._bind_addresses(config))

    @staticmethod
    def _bind_addresses(config: Config) -> tuple[str, ...]:
        return config.bind_addresses()  # the one derivation, which config.py checks

    async def _open_event_socket(self) -> None:
        path = self.runtime_dir / "events.sock"
        if path.is_socket():
            path.unlink()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _GenerationEvents(self.handle_generation_event), local_addr=str(path), family=socket.AF_UNIX
        )
        os.chmod(path, 0o600)
        self._events_transport = transport  # type: ignore[assignment]

    async def _shutdown(self) -> None:
        started = self.applied is not None or bool(self.generations)  # else the error says it all
        self.state = "stopping"
        self.notifier.stopping("stopping gunicorn")
        if started:
            self.log.info("stopping")
        if self._watcher:
            self._watcher.stop()
        if self._xml_watcher:
            self._xml_watcher.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(g.stop(g.plan.graceful_timeout + 5, state="stopping")
                               for g in list(self.generations.values())),
                             return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._control:
            await self._control.close()
        if self._events_transport:
            self._events_transport.close()
            try:
                (self.runtime_dir / "events.sock").unlink()
            except FileNotFoundError:
                pass
        sockets.release(self.sockets)
        self.sockets = []
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

    def handle_generation_event(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            generation = self.generations.get(int(message["gen"]))
        except (ValueError, KeyError, TypeError):
            return
        if generation is not None:
            generation.on_event(message)

    def handle_generation_exit(self, generation: Generation) -> None:
        self.generations.pop(generation.number, None)
        if generation is not self.current or self._stopping.is_set() or generation.state != "exited":
            return
        # The serving master died (killed, OOM, a bug). Its workers may live on
        # as orphans; they finish what they are doing and go.
        self.crashes += 1
        self.last_crash = {"at": time.time(), "generation": generation.number, "exit_status": generation.exit_status,
                           "restart": "now"}
        self.log.error("gunicorn master exited", generation=generation.number, status=generation.exit_status)
        _signal_group(generation.pid, signal.SIGTERM)
        shutil.rmtree(generation.directory, ignore_errors=True)  # its OMERODIR view goes with it
        self.current = None
        self.state = "restarting"
        self._spawn_task(self._restart_after_crash(generation))

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            await self.store_health.refresh()  # within its timeout; one check serves a status flood
            return {"ok": True, **redact.structure(self.status())}  # no secret in a reply, whoever wrote the text
        if cmd == "reload":
            if request.get("dry_run"):
                return await self.dry_run()
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
            return _result(RELOAD_REJECTED, "cancelled", "the daemon is stopping")

    async def _reload_when_free(self, source: str) -> dict[str, Any]:
        await self._started.wait()  # a reload asked for during start is applied right after it
        async with self._reload_lock:
            self._pending_reload = None  # from here on, a new change needs a new reload
            if self._stopping.is_set() or self.applied is None:
                return _result(RELOAD_REJECTED, "cancelled", "the daemon is stopping")
            started = time.monotonic()
            self.reloads += 1
            self.state = "reloading"
            self.notifier.reloading(f"reloading ({source})")
            result = _result(RELOAD_REJECTED, "cancelled", "the daemon is stopping")
            try:
                try:
                    result = await self._reload(source)
                except UserError as e:  # one a check did not foresee: still the person's to fix
                    result = _result(RELOAD_REJECTED, "rejected", str(e))
                except Exception as e:  # a bug or an unforeseen fault: refused, the serving generation untouched
                    self.log.exception("reload failed unexpectedly", source=source)
                    result = _result(RELOAD_REJECTED, "rejected", f"the reload failed unexpectedly: {_one_line(e)}")
                result["source"] = source
                result["seconds"] = round(time.monotonic() - started, 3)
                result["at"] = time.time()
                self.last_reload = result
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

    def _assess(self, config: Config) -> tuple[list[str], str, dict[str, Any] | None]:
        """(what changed, the venv's fingerprint, the outcome if it is already decided)."""
        assert self.applied is not None
        changes = _changes(self.applied.config, config)
        restart = [c for c in changes if c in RESTART_KEYS]
        if restart:
            return changes, "", _result(RELOAD_RESTART_REQUIRED, "restart required",
                                        f"{', '.join(restart)} changed: run systemctl restart omerowebd", changes=changes)
        packages = fingerprint(config.daemon.venv)
        if not changes and packages == self.applied.packages:
            return changes, packages, _result(RELOAD_APPLIED, "nothing to do", "the config is unchanged", changes=[])
        return changes, packages, None

    async def dry_run(self) -> dict[str, Any]:
        try:
            config = config_module.load(self.config_path)
        except ConfigError as e:
            return _result(RELOAD_REJECTED, "rejected", str(e))
        foreign = self._check_config_xml(self._properties(config), config.properties)
        if foreign:
            return _result(RELOAD_REJECTED, "rejected", foreign)
        changes, packages, decided = self._assess(config)
        if decided:
            return decided
        assert self.applied is not None
        packages_changed = packages != self.applied.packages
        generation = packages_changed or any(
            c.startswith(("omero.", "daemon.")) and c not in LIVE_DAEMON_KEYS for c in changes
        )
        action = "start a new gunicorn generation" if generation else "apply it without a new generation"
        return _result(RELOAD_APPLIED, "dry run", f"would {action}", changes=changes,
                       packages_changed=packages_changed)

    async def _reload(self, source: str) -> dict[str, Any]:
        assert self.applied is not None
        old = self.applied
        discard, self._discard_foreign = self._discard_foreign, False
        try:
            config = self._load_new_config()
        except ConfigError as e:
            return _result(RELOAD_REJECTED, "rejected", str(e))
        # Someone ran `omero config set`: a reload would overwrite it. Say so and stop, unless told to drop it.
        foreign = self._check_config_xml(self._properties(config), config.properties)
        if foreign and not discard:
            return _result(RELOAD_REJECTED, "rejected", foreign)
        changes, packages, decided = self._assess(config)
        if decided:
            if discard and self.foreign is not None and decided["exit_code"] == RELOAD_APPLIED:
                dropped = ", ".join(self.foreign.names) or self.foreign.path.name
                await self._publish_config_xml(self.applied, discard=True)
                return _result(RELOAD_APPLIED, "applied", f"edits made outside omerowebd dropped ({dropped});"
                               " config.xml holds the running config again", changes=[])
            return decided
        t0 = time.monotonic()
        try:
            info, warnings = await checks.run(config, self.prober)
        except ConfigError as e:
            return _result(RELOAD_REJECTED, "rejected", str(e), changes=changes)
        self.log.debug("reload checked", seconds=round(time.monotonic() - t0, 3))
        for warning in warnings:
            self.log.warning(warning)
        target = self._target(config, info, packages)

        switches: list[Switch] = []
        try:
            for output in self.outputs.values():
                switch = await output.stage(config, target.properties, info)
                if switch:
                    switches.append(switch)
        except Exception as e:  # UserError, or disk full, or a bug: nothing live has changed
            if not isinstance(e, UserError):
                self.log.exception("preparing the derived files failed", source=source)
            return _result(RELOAD_REJECTED, "rejected", str(e) if isinstance(e, UserError) else _one_line(e),
                           changes=changes)
        undo: list[Undo] = []

        new_sockets: list[HeldSocket] | None = None
        needs_generation = (
            target.plan != old.plan or target.properties != old.properties or packages != old.packages
            or config.daemon.omerodir != old.config.daemon.omerodir
            or self.current is None  # crashed and not back yet: this reload brings it back
        )
        if self._owns_sockets() and self._bind_addresses(config) != self._bind_addresses(old.config):
            try:
                new_sockets = sockets.bind(self._bind_addresses(config))
            except Exception as e:  # UserError (in use, refused), or anything getaddrinfo raises
                return _result(RELOAD_REJECTED, "rejected", str(e) if isinstance(e, UserError) else _one_line(e),
                               changes=changes)
            needs_generation = True

        if needs_generation:
            failure = await self._replace_generation(old, target, new_sockets, switches)
            if failure:
                if new_sockets:
                    sockets.release(new_sockets)
                return _result(RELOAD_ROLLED_BACK, "rolled back", failure, changes=changes)
        else:
            failure = await self._switch_outputs(switches, undo)
            if failure:
                return _result(RELOAD_REJECTED, "rejected", failure, changes=changes)
        self.applied = target
        await self._publish_config_xml(target, discard=discard)
        mark_applied(config, self.log)  # the new generation serves: the root publisher may follow
        for service in self.services.values():
            service.update(config, target.properties, info)
        self._follow_config_file(config)
        if config.daemon.log_format != old.config.daemon.log_format:
            log.configure(config.daemon.log_format)
        if config.daemon.admin_group != old.config.daemon.admin_group and self._control:
            self._control.policy = access.policy(config.daemon.admin_group)
        if not needs_generation:
            return _result(RELOAD_APPLIED, "applied", "applied without a new generation", changes=changes)
        return _result(RELOAD_APPLIED, "applied", "new generation serving", changes=changes,
                       generation=self.current.number if self.current else None, boot_seconds=self.last_boot_seconds)

    async def _replace_generation(self, old: Applied, target: Applied, new_sockets: list[HeldSocket] | None,
                                  switches: list[Switch]) -> str | None:
        """Bring up a generation for ``target``; switch nginx to it and retire the current one only once it serves.

        The serving generation is not touched before that: it reads its own
        config.xml (its OMERODIR view), and nginx's files stay as they are.
        Returns None on success, else why it failed (everything put back)."""
        generation: Generation | None = None
        try:
            spawned = time.monotonic()
            generation = await self._spawn(target, new_sockets)
            await generation.wait_ready(target.config.daemon.ready_timeout, self._extend_timeout)
            self.last_boot_seconds = round(time.monotonic() - spawned, 3)
        except Exception as e:  # GenerationFailed, UserError, OSError, or a bug: all put back the same way
            reason = str(e)
            if not isinstance(e, (GenerationFailed, UserError, OSError)):
                self.log.exception("starting the new generation failed unexpectedly")
                reason = _one_line(e)
            if generation is not None:
                await generation.kill()
            self.log.error("new generation failed; the running one keeps serving", reason=reason)
            return reason
        failure = await self._switch_outputs(switches, [])
        if failure:  # nginx could not follow: the new generation goes, the old one never stopped
            await generation.kill()
            return failure
        retiring = self.current
        self.current = generation
        self.static.cut_over(generation.number)  # the unversioned static names: the new release's files from now
        if new_sockets is not None:
            replaced, self.sockets = self.sockets, new_sockets
        else:
            replaced = None
        if retiring is not None:
            self._spawn_task(self._retire(retiring, retiring.plan.graceful_timeout, replaced))
        elif replaced:
            sockets.release(replaced)
        return None

    async def _switch_outputs(self, switches: list[Switch], undo: list[Undo]) -> str | None:
        """Make the staged files live; on failure put back what was switched and say why."""
        try:
            for switch in switches:
                undo.append(await switch())
        except Exception as e:  # disk full, or a bug
            await _run_undo(undo)
            self.log.exception("switching the derived files failed")
            return str(e) if isinstance(e, UserError) else _one_line(e)
        return None

    async def _retire(self, generation: Generation, grace: float, replaced_sockets: list[HeldSocket] | None) -> None:
        await generation.stop(grace + 5)
        if replaced_sockets:
            sockets.release(replaced_sockets)
        self.log.info("generation retired", generation=generation.number)
        await self.static.prune(n for n in self.generations if n != generation.number)

    async def _restart_after_crash(self, dead: Generation) -> None:
        """Bring a generation back, waiting longer after each failed attempt.

        The reload lock is taken per attempt, not for the whole loop: a reload
        that fixes what keeps the app from booting must be able to get in.
        """
        delay = 0.0
        while not self._stopping.is_set():
            if delay:
                self.notifier.status(f"gunicorn master exited with status {dead.exit_status}; restarting in {delay:.0f}s")
                self.last_crash["restart"] = f"in {delay:.0f}s, after a failed attempt"
                await asyncio.sleep(delay)
            async with self._reload_lock:
                if self.current is not None or self._stopping.is_set():
                    return  # a reload brought a generation up meanwhile
                assert self.applied is not None
                self.notifier.status(f"gunicorn master exited with status {dead.exit_status}; restarting")
                generation: Generation | None = None
                try:
                    generation = await self._spawn(self.applied)
                    await generation.wait_ready(self.applied.config.daemon.ready_timeout)
                except Exception as e:  # not only GenerationFailed: spawning raises OSError while the venv is replaced
                    if generation is not None:
                        await generation.kill()
                    delay = min(BACKOFF_MAX, delay * 2 if delay else BACKOFF_FIRST)
                    self.log.error("restart failed", reason=str(e) if isinstance(e, GenerationFailed) else _one_line(e),
                                   retry_in=delay)
                    continue
                self.current = generation
                self.static.cut_over(generation.number)
                self.state = "serving"
                self.last_crash["restart"] = f"done, generation {generation.number}"
                self.notifier.status(f"{self._status_line()}; restarted after gunicorn exited with status {dead.exit_status}")
                self.log.info("serving again", generation=generation.number)
                return

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

    def _properties(self, config: Config) -> dict[str, str]:
        """The properties OMERO.web gets for ``config``: the TOML's, with the session store pinned."""
        return omero_config.with_session_path(config.properties, self.session_dir)

    def _check_config_xml(self, properties: Mapping[str, str], toml: Mapping[str, str]) -> str | None:
        """Why writing ``properties`` to the site's config.xml would lose someone's edit; None if it would not."""
        self._look_at_config_xml()
        if self.foreign is None or not self.foreign.lost_by(properties, toml):
            return None
        return f"{self.foreign.describe()}; a reload would overwrite them: {self.foreign.ways_out(self.config_path)}"

    def _look_at_config_xml(self) -> None:
        """Compare the site's config.xml with what omerowebd wrote; report a change of what is found."""
        applied = self.applied
        config = applied.config if applied else self.initial
        wanted = applied.properties if applied else self._properties(config)
        try:
            found = omero_config.foreign_edits(config.daemon.omerodir, self.state_dir, wanted, config.properties)
        except Exception as e:  # a bug must not stop a reload or a status: report it, assume nothing foreign
            self.log.warning("cannot compare config.xml with what omerowebd wrote", error=_one_line(e))
            found = None
        before = self.foreign
        self.foreign = found
        if found is None:
            if before is not None:
                self.foreign_since = None
                self.log.info("config.xml holds what omerowebd wrote again", path=str(before.path))
                self.notifier.status(self._status_line())
            return
        if before is None or (before.names, before.problem) != (found.names, found.problem):
            self.foreign_since = self.foreign_since or time.time()
            self.log.warning("config.xml edited outside omerowebd; the running generations do not read it",
                             path=str(found.path), properties=list(found.names), problem=found.problem,
                             fix=found.ways_out(self.config_path))
            self.notifier.status(self._status_line())

    async def _publish_config_xml(self, target: Applied, *, at_start: bool = False, discard: bool = False) -> None:
        """Write the site's config.xml (what `omero config get` shows) for the generation that now serves.

        Never over someone else's edit unless told to: at start the file is
        left as it is (and reported); a reload got here only if the edit is
        kept by the new config, or dropped on purpose.
        """
        config = target.config
        self._follow_config_xml(config)
        self._look_at_config_xml()
        if self.foreign is not None and not discard and self.foreign.lost_by(target.properties, config.properties):
            if at_start:
                self.log.warning("config.xml left as it is: it holds edits made outside omerowebd",
                                 path=str(self.foreign.path), fix=self.foreign.ways_out(self.config_path))
            return
        data = omero_config.render_config_xml(target.properties, str(config.path))
        path = omero_config.config_xml_path(config.daemon.omerodir)
        if self._xml_watcher is not None:
            self._xml_watcher.seen(hashlib.sha256(data).hexdigest())
        try:
            # In a thread: it waits (up to 10 s) for the lock `omero config` holds while it edits.
            changed = await asyncio.to_thread(omero_config.write_site_config_xml, config.daemon.omerodir,
                                              self.state_dir, data)
        except OSError as e:  # disk full, permissions: the generations have their own copies and serve on
            self.log.error("cannot write config.xml; OMERO.web serves on from its own copy", path=str(path),
                           error=e.strerror)
            return
        if changed:
            self.config_xml_written_at = time.time()
            self.log.info("config.xml written", path=str(path))
        self._look_at_config_xml()

    def _follow_config_xml(self, config: Config) -> None:
        """Notice an edit of the site's config.xml when it happens, not at the next reload."""
        path = omero_config.config_xml_path(config.daemon.omerodir)
        if self._xml_watcher is not None and self._xml_watcher.path == path:
            return
        if self._xml_watcher is not None:
            self._xml_watcher.stop()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._xml_watcher = ConfigWatcher(path, self._look_at_config_xml)
        self._xml_watcher.start()

    def _target(self, config: Config, info: VenvInfo, packages: str) -> Applied:
        properties = self._properties(config)
        plan = plan_gunicorn(
            properties, info,
            omerodir=config.daemon.omerodir, app=config.daemon.app,
            graceful_timeout=config.daemon.graceful_timeout, health_path=config.daemon.health_path,
            where=config.where,
        )
        return Applied(config=config, info=info, properties=properties, plan=plan, packages=packages)

    async def _spawn(self, target: Applied, held: list[HeldSocket] | None = None) -> Generation:
        number = self.next_number
        self.next_number += 1
        plan = target.plan
        # The generation's own STATIC_ROOT and STATIC_URL: its release's directory (static.py says why).
        release = release_for(target.info, target.properties, target.packages, target.config.daemon.omerodir)
        view = {**target.properties, **release.properties()}
        generation = Generation(number=number, plan=plan, directory=self.runtime_dir / f"gen-{number}",
                                on_exit=self.handle_generation_exit,
                                config_xml=omero_config.render_config_xml(view, str(target.config.path)))
        self.generations[number] = generation
        try:
            await asyncio.to_thread(generation.prepare_view)
            # collectstatic reads the settings from the new generation's view: the site's file is still the old one.
            await self.static.collect(number, release, target.info, generation.omerodir)
            await generation.start(held or self.sockets, self.runtime_dir / "events.sock")
        except BaseException:
            self.generations.pop(number, None)  # never started: nothing to watch or stop
            await generation.kill()
            raise
        self.log.info("gunicorn started", generation=number, pid=generation.pid, workers=plan.workers)
        return generation

    def _extend_timeout(self, remaining: float) -> None:
        # Tell systemd we are still at it, so a slow app does not time the start or reload out.
        self.notifier.extend_timeout(min(remaining, 5.0) + 10.0)

    def _upstream_addresses(self, config: Config) -> list[str]:
        """Where nginx reaches gunicorn: the sockets systemd passed, else what the config binds."""
        if self.sockets and not self._owns_sockets():
            return [s.address for s in self.sockets]
        return list(self._bind_addresses(config))

    def _owns_sockets(self) -> bool:
        return all(s.origin == "bound" for s in self.sockets)

    def _spawn_task(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed", error=repr(task.exception()))

    async def _watchdog_loop(self, interval: float) -> None:
        """WATCHDOG=1 only while the serving master lives and answers over the held socket."""
        period = interval / 3
        while True:
            await asyncio.sleep(period)
            generation = self.current
            if generation is None or not generation.alive or self.applied is None or not self.sockets:
                continue
            status = await http_probe(self.sockets[0].probe_target(), generation.plan.health_path,
                                      generation.plan.health_host, timeout=period)
            if status is not None and status < 500:
                self.notifier.watchdog()
            else:
                self.log.warning("health probe failed", status=status)

    def _status_line(self) -> str:
        g = self.current
        if g is None:
            return self.state
        addresses = ", ".join(s.address for s in self.sockets)
        line = f"serving on {addresses}: generation {g.number}, {g.plan.workers} workers, master {g.pid}"
        if self.foreign is not None:
            line += f"; config.xml edited outside omerowebd ({', '.join(self.foreign.names) or self.foreign.problem})"
        return line

    def status(self) -> dict[str, Any]:
        applied = self.applied
        return {
            "state": self.state,
            "serving": self.current is not None and self.current.state == "serving",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 1),
            "generation": self.current.describe() if self.current else None,
            "generations": [g.describe() for g in self.generations.values()],
            "sockets": [s.describe() for s in self.sockets],
            "config": {"path": str(self.config_path), "digest": applied.config.digest if applied else None,
                       "problem": self._watcher.problem if self._watcher else None},
            "config_xml": self._config_xml_status(),
            "last_reload": self.last_reload,
            "crashes": self.crashes,
            "last_crash": self.last_crash or None,
            "reloads": self.reloads,
            "versions": dict(applied.info.versions) if applied else {},
            "static": self.static.status(),
            **{name: output.status() for name, output in self.outputs.items()},
            **{name: service.status() for name, service in self.services.items()},
        }


    def _config_xml_status(self) -> dict[str, Any]:
        config = self.applied.config if self.applied else self.initial
        found = self.foreign
        return {
            "path": str(omero_config.config_xml_path(config.daemon.omerodir)),
            "written_at": self.config_xml_written_at,
            # Names only: the values may be secrets, and they are someone else's.
            "foreign_edits": None if found is None else {
                "properties": list(found.names), "problem": found.problem, "since": self.foreign_since,
                "message": found.describe(), "fix": found.ways_out(self.config_path),
            },
        }


class _GenerationEvents(asyncio.DatagramProtocol):
    """Reports from gunicorn_conf.py's hooks (a worker has loaded the app, a worker exited)."""

    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.handle(data)


def _changes(old: Config, new: Config) -> list[str]:
    """Dotted names of what differs: daemon.x, nginx.x, sessions.x, omero.… properties."""
    changed = []
    for table in config_module.TABLES:
        a, b = dataclasses.asdict(getattr(old, table)), dataclasses.asdict(getattr(new, table))
        changed += [f"{table}.{k}" for k in a if a[k] != b[k]]
    names = set(old.properties) | set(new.properties)
    changed += sorted(n for n in names if old.properties.get(n) != new.properties.get(n))
    return changed


def _one_line(error: BaseException) -> str:
    """An unforeseen exception as one line: its type and its words."""
    words = " ".join(str(error).split())
    return f"{type(error).__name__}: {words}" if words else type(error).__name__


def _result(exit_code: int, outcome: str, message: str, **extra: Any) -> dict[str, Any]:
    # The message may quote a value the venv or gunicorn refused: it goes to
    # status, the log and omerowebctl, so no secret stays in it. Changes are names only.
    message = redact.scrub_known(message)
    return {"ok": exit_code == RELOAD_APPLIED, "exit_code": exit_code, "outcome": outcome, "message": message, **extra}


async def _run_undo(steps: list[Undo]) -> None:
    for step in reversed(steps):
        try:
            await step()
        except Exception as e:  # keep undoing the rest
            log.get().error("could not undo a step of a failed reload", error=str(e))


def _signal_group(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
