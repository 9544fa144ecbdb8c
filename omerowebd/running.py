"""What runs, and the one way to change it: the held sockets, the gunicorn generations, the derived files.

A change is a cutover. The outputs (nginx's files, the site's config.xml)
are staged for the target and checked, a generation is brought up for it on
the held sockets, and only once it serves are the outputs switched, the
generation made the serving one and the previous one retired. Anything
short of that is put back: the serving generation, its own config view and
nginx's files are not touched before. The start, a reload and a revert all
come through ``bring_up``; a change that needs no generation, through
``apply_outputs``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from . import omero_config, sockets
from .config import Config
from .config_xml import SiteConfigXml
from .desired import BOUND, SYSTEMD, Desired, derive
from .errors import UserError, one_line
from .generation import AdoptedMaster, Generation, GenerationFailed
from .generations import Generations
from .nginx import NginxOutput, Switch, mark_applied
from .procs import signal_group
from .sockets import HeldSocket
from .spawn_record import Early
from .static import StaticFiles, release_for
from .venv import VenvInfo

Undo = Callable[[], Awaitable[None]]


class Output(Protocol):
    """A file the daemon derives from the config (the nginx includes; config.xml is one too, see config_xml.py)."""

    async def stage(self, desired: Desired) -> Switch | None:
        """Render and check, changing nothing live; the switch runs once the new generation serves."""
        ...

    def status(self) -> dict[str, Any]: ...


class Running:
    def __init__(self, log: Any, config: Config, *, on_status: Callable[[], None],
                 on_slow: Callable[[float], None], spawn_task: Callable[[Awaitable[Any]], Any]) -> None:
        self.log = log
        self.runtime_dir = config.daemon.runtime_dir  # a restart takes a new one (desired.RESTART_KEYS)
        self.applied: Desired | None = None  # what the serving generation and the outputs were made for
        self.sockets: list[HeldSocket] = []
        self.gens: Generations[Desired] = Generations(self._make, self._launch)
        self.outputs: dict[str, Output] = {"nginx": NginxOutput(log)}
        # The site's config.xml: staged last, written once a generation serves; who else wrote it.
        self.site_xml = SiteConfigXml(log, config, on_status)
        self.static = StaticFiles(config.daemon.state_dir)  # one collected directory per release
        self._on_slow = on_slow  # systemd hears that a start or reload is still at it
        self.early: Early | None = None  # what the early start spawned and holds, until adopted or dropped
        self._spawn_task = spawn_task

    def target(self) -> Desired:
        """What runs (once the start has brought its generation up)."""
        assert self.applied is not None
        return self.applied

    # -- sockets -------------------------------------------------------------

    async def open(self, config: Config) -> None:
        """The sockets systemd passed, else bind the config's (getaddrinfo may wait: not on the loop)."""
        early = self.early
        if early is not None and early.sockets and (early.systemd or early.bind == list(config.bind_addresses())):
            # What the early start bound (or took from systemd) for exactly this config: held from now on.
            self.sockets, early.sockets = early.sockets, []
        else:
            if early is not None:
                await self.drop_early("it was bound for other addresses")  # the master goes before its sockets do
            self.sockets = await asyncio.to_thread(self._acquire, config)
        events = self.runtime_dir / "events.sock"
        if early is not None and early.events is not None and early.events_path == events:
            sock, early.events = early.events, None
            heard, early.heard = early.heard, []
            await self.gens.listen(events, sock, heard)
        else:
            await self.gens.listen(events)

    async def drop_early(self, why: str) -> None:
        """The early start's master, not adopted (``why``, for the log): stopped in order, what it held released."""
        early, self.early = self.early, None
        if early is None:
            return
        if early.master is not None and not early.adopted:
            status = early.master.poll()
            if status is not None:  # reaped: its pid may be another process's by now, never signalled
                self.log.info(f"the gunicorn spawned from the remembered spawn exited with status {status}; not"
                              " adopted", why=why)
            else:  # not reaped, so its pid (and its group's) is still its own
                self.log.info("the gunicorn spawned from the remembered spawn is not adopted; stopping it", why=why)
                master = AdoptedMaster(early.master)
                signal_group(master.pid, signal.SIGTERM, group=False)
                try:
                    await asyncio.wait_for(master.wait(), 10)
                except asyncio.TimeoutError:
                    signal_group(master.pid, signal.SIGKILL, group=True)  # still unreaped: still its group
                    await master.wait()
            if early.spec is not None:
                await asyncio.to_thread(shutil.rmtree, early.spec["directory"], True)
        if early.master is not None and not early.adopted:
            await self.gens.heard_all()  # its last reports, read now: never by the boot that follows
        if early.spec is not None and not early.adopted:  # what its workers said, kept for its number: not heard
            self.gens.forget_pending(json.loads(early.spec["snapshot"])["generation"])
            early.spec = None  # its directory is gone (a generation of this start may use the name now)
        early.close()

    def _acquire(self, config: Config) -> list[HeldSocket]:
        held = sockets.from_systemd()
        if held:
            self.log.debug("using sockets from systemd", sockets=[s.address for s in held])
            return held
        return sockets.bind(config.bind_addresses())

    def close(self) -> None:
        self.gens.close()
        sockets.release(self.sockets)
        self.sockets = []

    @property
    def origin(self) -> str:
        """desired.BOUND when the daemon bound every socket itself, else desired.SYSTEMD."""
        return BOUND if all(s.origin == "bound" for s in self.sockets) else SYSTEMD

    def derive(self, config: Config, info: VenvInfo, packages: str) -> Desired:
        listening = [s.address for s in self.sockets] if self.origin == SYSTEMD else []
        return derive(config, info, packages, listening=listening)

    async def rebind(self, addresses: Sequence[str]) -> list[HeldSocket]:
        return await asyncio.to_thread(sockets.bind, tuple(addresses))

    def release(self, held: list[HeldSocket]) -> None:
        """Sockets bound for a change that did not go through."""
        if held is not self.sockets:
            sockets.release(held)

    # -- the cutover ---------------------------------------------------------

    async def stage(self, target: Desired, *, discard: bool = False) -> list[Switch]:
        """Render and check every output for ``target``; nothing live changes. config.xml goes last."""
        switches = [s for s in [await o.stage(target) for o in self.outputs.values()] if s]
        xml = await self.site_xml.stage(target, discard=discard)
        return switches + [xml] if xml else switches

    async def bring_up(self, target: Desired, held: list[HeldSocket], switches: list[Switch], *,
                       after_ready: Callable[[Desired], Awaitable[Desired]] | None = None,
                       publish: bool = True) -> str | None:
        """Bring up a generation for ``target`` on ``held``; switch the outputs and retire the current one once it serves.

        ``after_ready`` may replace the target once the generation serves,
        before anything is published; ``publish=False``: the caller tells
        root's nginx publisher later (once the generation has settled).
        Returns None on success, else why it failed (everything put back).
        """
        try:
            generation = await self.gens.bring_up(target, held, ready_timeout=target.config.daemon.ready_timeout,
                                                  on_slow=self._on_slow)
        except GenerationFailed as e:
            self.log.error("new generation failed; the running one keeps serving", reason=str(e))
            return str(e)
        if after_ready is not None:
            target = await after_ready(target)
        failure = await self.switch(switches)
        if failure:  # nginx could not follow: the new generation goes, the old one never stopped
            await self.gens.discard(generation)
            return failure
        retiring = self.gens.promote(generation)
        self.applied = target
        self.static.cut_over(generation.number)  # the unversioned static names: the new release's files from now
        replaced, self.sockets = (self.sockets, held) if held is not self.sockets else (None, self.sockets)
        if retiring is not None:
            self._spawn_task(self._retire(retiring, replaced))
        else:
            if replaced:
                sockets.release(replaced)
            self._spawn_task(self.static.prune(self.gens))  # what an earlier run left, but the previous release
        if publish:  # serving now: the root publisher may render this TOML for nginx (written and synced in a thread)
            await asyncio.to_thread(mark_applied, target.config, self.log)
        return None

    async def apply_outputs(self, target: Desired, switches: list[Switch]) -> str | None:
        """A change the serving generation takes as it is: only the outputs switch."""
        failure = await self.switch(switches)
        if failure:
            return failure
        self.applied = target
        await asyncio.to_thread(mark_applied, target.config, self.log)
        return None

    async def switch(self, switches: Sequence[Switch]) -> str | None:
        """Make the staged files live; on failure put back what was switched and say why."""
        undo: list[Undo] = []
        try:
            for switch in switches:
                undo.append(await switch())
        except Exception as e:  # disk full, or a bug
            for step in reversed(undo):
                try:
                    await step()
                except Exception as e2:  # keep undoing the rest
                    self.log.error("could not undo a step of a failed reload", error=one_line(e2))
            self.log.exception("switching the derived files failed")
            return str(e) if isinstance(e, UserError) else one_line(e)
        return None

    async def _retire(self, generation: Generation, replaced_sockets: list[HeldSocket] | None) -> None:
        await self.gens.retire(generation)
        if replaced_sockets:
            sockets.release(replaced_sockets)
        await self.static.prune(n for n in self.gens if n != generation.number)

    def _make(self, number: int, target: Desired) -> Generation:
        # The generation's own STATIC_ROOT and STATIC_URL: its release's directory (static.py says why).
        release = release_for(target.info, target.properties, target.packages, target.config.daemon.omerodir)
        view = {**target.properties, **release.properties()}
        return Generation(number=number, plan=target.plan, directory=self.runtime_dir / f"gen-{number}",
                          config_xml=omero_config.render_config_xml(view, str(target.config.path)))

    async def _launch(self, generation: Generation, target: Desired, held: Sequence[HeldSocket]) -> None:
        await asyncio.to_thread(generation.prepare_view)
        # collectstatic reads the settings from the new generation's view: the site's file is still the old one.
        release = release_for(target.info, target.properties, target.packages, target.config.daemon.omerodir)
        await self.static.collect(generation.number, release, target.info, generation.omerodir)
        events = self.runtime_dir / "events.sock"
        early = self.early
        if early is not None and early.master is not None and early.master.poll() is None and \
                early.spec == generation.spec(list(held), events):
            # Spawned from the spawn record before the daemon loaded, with exactly what it would spawn now.
            early.adopted = True
            generation.adopt(early.master, early.spec)
            self.early = None
            early.close()
            self.log.info("gunicorn was spawned early, from the remembered spawn; adopted as this generation",
                          generation=generation.number, pid=generation.pid, before_asyncio=early.before_asyncio,
                          waited_for_boot=early.waited)
            return
        if early is not None:
            exited = early.master is not None and early.master.poll() is not None
            await self.drop_early("it exited before it could be adopted" if exited else
                                  "what it runs is not what this config runs")
        await generation.start(list(held), events)

    # -- status --------------------------------------------------------------

    def status_line(self, state: str) -> str:
        g = self.gens.current
        if g is None:
            return state
        addresses = ", ".join(s.address for s in self.sockets)
        line = f"serving on {addresses}: generation {g.number}, {g.plan.workers} workers, master {g.pid}"
        foreign = self.site_xml.summary()
        return f"{line}; {foreign}" if foreign else line

    def status(self) -> dict[str, Any]:
        return {
            **self.gens.describe(),  # generation, generations, crashes, last_crash
            "sockets": [s.describe() for s in self.sockets],
            "config_xml": self.site_xml.status(),
            "static": self.static.status(),
            **{name: output.status() for name, output in self.outputs.items()},
        }
