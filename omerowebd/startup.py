"""The start: the venv asked (or its remembered answer used), the config derived, the first generation brought up.

The same bring-up as every reload (running.py). What is particular to the
start is the venv's remembered answer (verdicts.py): gunicorn is spawned on
it at once, and the venv is asked afresh once the first generation serves,
before anything is published; a fresh answer that differs means a reload
replaces the first generation with one derived from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from typing import Any

from . import spawn_record
from . import verdicts as verdicts_module
from .config import Config
from .desired import Desired, session_dir
from .errors import ConfigError, UserError, one_line
from .exits import EXIT_FAILURE
from .running import Running
from .systemd import Notifier
from .venv import Prober, VenvInfo, fingerprint
from .verdicts import Verdicts


@dataclasses.dataclass(frozen=True)
class Started:
    target: Desired  # what the first generation was made for
    info: VenvInfo  # the venv's answer the checks ran on
    packages: str
    stale: bool  # the venv's fresh answer differs from the remembered one: a reload brings up one derived from it
    spawned: dict[str, Any] | None = None  # what generation 1 was spawned with (Generation.spec), when it serves

    def remember(self, verdicts: Verdicts) -> Awaitable[Any]:
        """Keep the venv's answer and generation 1's spawn for the next start (not for a stale one: it is replaced)."""
        return asyncio.to_thread(self._remember, verdicts)

    def _remember(self, verdicts: Verdicts) -> None:
        config = self.target.config
        if not verdicts.remember(config, self.packages, self.target.info) or self.spawned is None:
            return
        try:
            spawn_record.remember(config.daemon.state_dir, config.digest, config.daemon.venv,
                                  list(config.bind_addresses()), self.spawned)
        except OSError as e:  # a full disk: the next start spawns after loading, that is all
            verdicts.log.warning("cannot remember how gunicorn was spawned; the next start spawns it later",
                                 error=str(e))


def make_dirs(config: Config) -> None:
    for directory, mode in ((config.daemon.runtime_dir, 0o750), (config.daemon.state_dir, 0o750),
                            (session_dir(config), 0o700)):
        directory.mkdir(mode=mode, parents=True, exist_ok=True)


async def first_generation(config: Config, running: Running, verdicts: Verdicts, prober: Prober,
                           notifier: Notifier, log: Any) -> Started:
    """Bring the first generation up on the held sockets; UserError (one line) if it cannot."""
    try:
        return await _first_generation(config, running, verdicts, prober, notifier, log)
    except ConfigError:
        await running.drop_early("the config was refused")  # before any generation: the early master goes too
        raise
    finally:
        await running.drop_early("the start did not get as far as adopting it")  # stopped, or a bug


async def _first_generation(config: Config, running: Running, verdicts: Verdicts, prober: Prober,
                            notifier: Notifier, log: Any) -> Started:
    notifier.status("checking the config and the OMERO.web venv")
    # once per start: the checks, the plan and the static release
    packages = await asyncio.to_thread(fingerprint, config.daemon.venv)
    info, warnings = await verdicts.check(config, prober, packages)  # remembered, if it may be
    for warning in warnings:
        log.warning(warning)
    try:
        target = running.derive(config, info, packages)
    except UserError:
        raise
    except Exception as e:  # exit 78 with one line, not a traceback and a restart loop
        log.debug("planning failed", exc_info=True)
        raise ConfigError(f"{config.path}: cannot work out how to run gunicorn from it: {one_line(e)}") from None
    switches = await running.stage(target)
    notifier.status("starting gunicorn")
    fresh: VenvInfo | None = None

    async def confirm(target: Desired) -> Desired:
        # Now, not before the spawn: the file watcher's library and thread would delay gunicorn (config_xml.py).
        running.site_xml.follow()
        prober.site_serves = True
        # Started on a remembered answer: the venv is asked now, before anything is published (verdicts.py).
        nonlocal fresh
        fresh = await verdicts.confirm(config, prober, packages)
        return target if fresh is None else dataclasses.replace(target, info=fresh,
                                                               packages=verdicts_module.UNCONFIRMED)

    try:
        failure = await running.bring_up(target, running.sockets, switches, after_ready=confirm)
    finally:
        await running.drop_early("the first generation did not come up")  # stopped before the start goes on
    if failure:
        if verdicts.recalled is not None:  # never asked: say what the checks ran on
            log.info("this start ran on the venv's remembered answer", path=str(verdicts.path))
        raise UserError(f"OMERO.web did not start: {failure}", exit_code=EXIT_FAILURE)
    current = running.gens.current
    spawned = current.spawned_with if current is not None and current.number == 1 else None
    return Started(target, info, packages, stale=fresh is not None, spawned=spawned)
