"""The reload: read the file, ask desired.decide, then make what runs match, or say why not.

The reload and its dry run ask the same questions (the file, edits made
outside omerowebd in config.xml, the venv when the change needs it) of the
same ``decide``, so the dry run says what the reload does. What the reload
then does goes through running.py: a new generation (brought up, watched
while it settles, put back if it does not), or the outputs alone. The
supervisor serializes reloads and tells systemd; this module runs one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import checks, redact, settle
from . import config as config_module
from .config import Config
from .desired import Action, Decision, Desired, decide, decide_early
from .errors import ConfigError, UserError, one_line
from .exits import RELOAD_APPLIED, RELOAD_REJECTED, RELOAD_RESTART_REQUIRED, RELOAD_REVERTED, RELOAD_ROLLED_BACK
from .nginx import mark_applied
from .running import Running
from .systemd import Notifier
from .venv import Prober, fingerprint
from .verdicts import Verdicts


class Reloader:
    def __init__(self, log: Any, running: Running, *, config_path: Path, prober: Prober, verdicts: Verdicts,
                 notifier: Notifier, load: Callable[[], Config], set_state: Callable[[str], None],
                 after: Callable[[Desired, Desired], None], spawn_task: Callable[[Awaitable[Any]], Any]) -> None:
        self.log = log
        self.running = running
        self.config_path = config_path
        self.prober = prober
        self.verdicts = verdicts
        self.notifier = notifier
        self._load = load  # the file, read again (the watcher hears which digest that was)
        self._set_state = set_state
        self._after = after  # the daemon's own settings and the services, once the change went through
        self._spawn_task = spawn_task

    async def dry_run(self) -> dict[str, Any]:
        """What a reload would do now, changing nothing: the same questions as the reload, to the same decide."""
        if self.running.applied is None:
            return result(RELOAD_REJECTED, "rejected", "the daemon is starting")
        try:
            config = config_module.load(self.config_path)
            foreign = self.running.site_xml.refusal(config)
            if foreign:
                return result(RELOAD_REJECTED, "rejected", foreign)
            decision, _ = await self._propose(config)
        except ConfigError as e:
            return result(RELOAD_REJECTED, "rejected", str(e))
        return decided(decision, dry_run=True)


    async def _propose(self, config: Config) -> tuple[Decision, Desired | None]:
        """What a reload of ``config`` would do, and the target it brings up (None: decided without the venv)."""
        assert self.running.applied is not None
        packages = await asyncio.to_thread(fingerprint, config.daemon.venv)
        serving = self.running.gens.current is not None
        early = decide_early(self.running.applied, config, packages, serving=serving)
        if early is not None:
            return early, None
        t0 = time.monotonic()
        info, warnings = await checks.run(config, self.prober, packages)
        self.log.debug("reload checked", seconds=round(time.monotonic() - t0, 3))
        for warning in warnings:
            self.log.warning(warning)
        target = self.running.derive(config, info, packages)
        return decide(self.running.applied, target, self.running.origin, serving=serving), target


    async def apply(self, source: str, *, discard: bool = False) -> dict[str, Any]:
        """Read the file again and make what runs match it, or say why not (the reply omerowebctl gets).

        ``discard``: the person said to overwrite edits made outside omerowebd in config.xml.
        """
        old = self.running.target()
        try:
            config = self._load()
            # Someone ran `omero config set`: a reload would overwrite it. Say so and stop, unless told to drop it.
            foreign = self.running.site_xml.refusal(config)
            if foreign and not discard:
                return result(RELOAD_REJECTED, "rejected", foreign)
            decision, target = await self._propose(config)
        except ConfigError as e:
            return result(RELOAD_REJECTED, "rejected", str(e))
        if target is None:  # restart required, or nothing to do
            site_xml = self.running.site_xml
            if discard and site_xml.foreign is not None and decision.action is Action.NOTHING:
                dropped = ", ".join(site_xml.foreign.names) or site_xml.foreign.path.name
                xml = await site_xml.stage(old, discard=True)
                failure = await self.running.switch([xml] if xml else [])
                if failure:
                    return result(RELOAD_REJECTED, "rejected", failure, changes=[])
                return result(RELOAD_APPLIED, "applied", f"edits made outside omerowebd dropped ({dropped});"
                               " config.xml holds the running config again", changes=[])
            return decided(decision, dry_run=False)
        changes = list(decision.changes)
        held = self.running.sockets
        try:
            switches = await self.running.stage(target, discard=discard)
            if decision.action is Action.REBIND:
                held = await self.running.rebind(decision.bind)
        except Exception as e:  # UserError (nginx refused, address in use), disk full, a bug: nothing live changed
            if not isinstance(e, UserError):
                self.log.exception("preparing the reload failed", source=source)
            return result(RELOAD_REJECTED, "rejected", str(e) if isinstance(e, UserError) else one_line(e),
                           changes=changes)
        watch = False
        if decision.new_generation:
            # Watched once it serves, and published to root's nginx only once settled (a moved bind is not watched).
            watch = decision.action is Action.GENERATION and settle.Rule.of(config).enabled
            failure = await self.running.bring_up(target, held, switches, publish=not watch)
            if failure:
                self.running.release(held)
                return result(RELOAD_ROLLED_BACK, "rolled back", failure, changes=changes)
        else:
            failure = await self.running.apply_outputs(target, switches)
            if failure:
                return result(RELOAD_REJECTED, "rejected", failure, changes=changes)
        # The new config serves from here on: no step after the cutover may turn into "rejected".
        try:
            return await self._after_cutover(old, target, decision, changes, watch=watch)
        except Exception as e:  # a bug or an unforeseen fault
            return await self._serves_anyway(old, target, decision, changes, e)

    async def _after_cutover(self, old: Desired, target: Desired, decision: Decision, changes: list[str], *,
                             watch: bool) -> dict[str, Any]:
        """The settle window (if watched), the daemon's own settings and the services, the venv's answer kept."""
        verdict: settle.Verdict | None = None
        if watch:
            verdict, reverted = await self._settle(old, target, changes)
            if reverted is not None:
                return reverted
        self._after(old, target)
        self._spawn_task(asyncio.to_thread(self.verdicts.remember, target.config, target.packages, target.info))
        if not decision.new_generation:
            return result(RELOAD_APPLIED, "applied", "applied without a new generation", changes=changes)
        return result(RELOAD_APPLIED, "applied", "new generation serving", changes=changes,
                       generation=self.running.gens.current.number if self.running.gens.current else None,
                       boot_seconds=self.running.gens.last_boot_seconds, settle=verdict.describe() if verdict else None)

    async def _serves_anyway(self, old: Desired, target: Desired, decision: Decision, changes: list[str],
                             error: Exception) -> dict[str, Any]:
        """A step after the cutover failed: say what serves as it is, and publish it (root's nginx follows
        what serves, not what was last published)."""
        self.log.exception("a step after the cutover failed; the config that serves stays", error=one_line(error))
        serving = self.running.target()
        try:
            await asyncio.to_thread(mark_applied, serving.config, self.log)
        except Exception as e:  # the reply must still say what serves
            self.log.error("cannot tell root's nginx publisher what serves", error=one_line(e))
        current = self.running.gens.current
        number = current.number if current is not None else None
        warning = f"a step after the cutover failed ({one_line(error)}); see the journal"
        if serving is not target:  # put back by the settle window before the failure
            return result(RELOAD_REVERTED, "reverted", f"the previous config serves again (generation {number});"
                           f" {warning}", changes=changes, generation=number, warning=warning)
        what = "new generation serving" if decision.new_generation else "applied without a new generation"
        return result(RELOAD_APPLIED, "applied", f"{what}, with a warning: {warning}", changes=changes,
                       generation=number if decision.new_generation else None, warning=warning)


    async def _settle(self, old: Desired, target: Desired,
                      changes: list[str]) -> tuple[settle.Verdict, dict[str, Any] | None]:
        """Watch the generation that just took over (settle.py); if it does not settle, bring ``old`` back
        through the same bring-up as any reload. (The verdict, the reverted reply or None.)"""
        generation, rule = self.running.gens.current, settle.Rule.of(target.config)
        assert generation is not None
        self.notifier.status(f"generation {generation.number} serves; settling for {rule.seconds:g}s")
        self._set_state("settling")  # status and omerowebctl reload's progress say so
        # systemctl reload waits through the window (and a last probe) too, however long it is set.
        self.notifier.extend_timeout(rule.seconds + 2 * rule.probe_timeout + 10.0)
        verdict = await settle.watch(generation, rule, settle.probe_of(generation))
        self._set_state("reloading")
        if verdict.settled:  # settled: the root publisher may render this TOML for nginx (a file write: not on the loop)
            await asyncio.to_thread(mark_applied, target.config, self.log)
            return verdict, None
        self.log.error("new generation did not settle; bringing the previous config back",
                       generation=generation.number, reason=verdict.reason)
        try:
            failure = await self.running.bring_up(old, self.running.sockets, await self.running.stage(old), publish=False)
        except Exception as e:  # staging the previous files failed (disk full, a bug): the new config serves on
            failure = str(e) if isinstance(e, UserError) else one_line(e)
        said = f"the new generation did not settle: {verdict.reason}"
        if failure:
            return verdict, result(RELOAD_REVERTED, "revert failed", f"{said}; bringing the previous config back"
                                    f" failed too ({failure}): the new config serves on", changes=changes,
                                    settle=verdict.describe())
        number = self.running.gens.current.number if self.running.gens.current else None
        return verdict, result(RELOAD_REVERTED, "reverted", f"{said}; the previous config serves again (generation"
                                f" {number}); the config file is as edited: fix it and reload", changes=changes,
                                generation=number, settle=verdict.describe())


def result(exit_code: int, outcome: str, message: str, **extra: Any) -> dict[str, Any]:
    # The message may quote a value the venv or gunicorn refused: it goes to
    # status, the log and omerowebctl, so no secret stays in it. Changes are names only.
    message = redact.scrub_known(message)
    return {"ok": exit_code == RELOAD_APPLIED, "exit_code": exit_code, "outcome": outcome, "message": message, **extra}


def decided(decision: Decision, *, dry_run: bool) -> dict[str, Any]:
    """The reply for a decision made without applying anything (a dry run, or nothing to apply)."""
    changes = list(decision.changes)
    if decision.action is Action.RESTART:
        return result(RELOAD_RESTART_REQUIRED, "restart required", decision.reasons[0], changes=changes)
    if decision.action is Action.NOTHING:
        return result(RELOAD_APPLIED, "nothing to do", "the config is unchanged", changes=[])
    assert dry_run, decision
    return result(RELOAD_APPLIED, "dry run", f"would {decision.action.value}", changes=changes,
                   packages_changed=decision.packages_changed, reasons=list(decision.reasons))
