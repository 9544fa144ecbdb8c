"""The site's config.xml (what `omero config get` shows): one writer, and who else wrote it.

The running generations never read this file (each has its own copy in its
OMERODIR view): it is written for people and tools, once a generation of
the config serves. Like the nginx files it is an Output: staged, switched
(written in a thread: it may wait up to 10 s for the lock `omero config`
holds while it edits), and put back by the switch's undo, in a thread too:
the file and omerowebd's ledger of it as they were, and what it is measured
against, so an undone reload leaves nothing that looks edited by someone else.
An edit made outside omerowebd is never overwritten unless the person said so.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import omero_config
from .config import Config
from .desired import Desired, properties_of
from .errors import one_line
from .files import write_atomic
from .watch import ConfigWatcher

Undo = Callable[[], Awaitable[None]]
Switch = Callable[[], Awaitable[Undo]]


class SiteConfigXml:
    def __init__(self, log: Any, config: Config, on_change: Callable[[], None]) -> None:
        self.log = log
        self.config_path = config.path
        self._config = config  # what runs (or is about to): what "foreign" is measured against
        self._properties: Mapping[str, str] = properties_of(config)
        self._on_change = on_change  # the status line names a foreign edit
        self.foreign: omero_config.ForeignEdits | None = None
        self.foreign_since: float | None = None
        self.written_at: float | None = None
        self._watcher: ConfigWatcher | None = None

    @property
    def path(self) -> Path:
        return omero_config.config_xml_path(self._config.daemon.omerodir)

    def refusal(self, config: Config) -> str | None:
        """Why writing ``config``'s properties would lose someone's edit; None if it would not."""
        self.look()
        if self.foreign is None or not self.foreign.lost_by(properties_of(config), config.properties):
            return None
        return f"{self.foreign.describe()}; a reload would overwrite them: {self.foreign.ways_out(self.config_path)}"

    def look(self) -> None:
        """Compare the file with what omerowebd wrote; report a change of what is found."""
        config = self._config
        try:
            found = omero_config.foreign_edits(config.daemon.omerodir, config.daemon.state_dir, self._properties,
                                               config.properties)
        except Exception as e:  # a bug must not stop a reload or a status: report it, assume nothing foreign
            self.log.warning("cannot compare config.xml with what omerowebd wrote", error=one_line(e))
            found = None
        before, self.foreign = self.foreign, found
        if found is None:
            if before is not None:
                self.foreign_since = None
                self.log.info("config.xml holds what omerowebd wrote again", path=str(before.path))
                self._on_change()
            return
        if before is None or (before.names, before.problem) != (found.names, found.problem):
            self.foreign_since = self.foreign_since or time.time()
            self.log.warning("config.xml edited outside omerowebd; the running generations do not read it",
                             path=str(found.path), properties=list(found.names), problem=found.problem,
                             fix=found.ways_out(self.config_path))
            self._on_change()

    async def stage(self, desired: Desired, *, discard: bool = False) -> Switch | None:
        """The switch that writes ``desired``'s properties once its generation serves (None: leave the file).

        Never over someone else's edit unless ``discard``: a reload got here
        only if the edit is kept by the new config, or dropped on purpose; at
        start the file is left as it is, and reported.
        """
        config = desired.config
        self.look()
        if self.foreign is not None and not discard and self.foreign.lost_by(desired.properties, config.properties):
            self.log.warning("config.xml left as it is: it holds edits made outside omerowebd",
                             path=str(self.foreign.path), fix=self.foreign.ways_out(self.config_path))
            return None
        data = omero_config.render_config_xml(desired.properties, str(config.path))
        omerodir, state_dir = config.daemon.omerodir, config.daemon.state_dir

        async def switch() -> Undo:
            before = (self._config, self._properties)
            self.look()  # an edit made while the new generation booted is kept as one made before
            if self.foreign is not None and not discard and self.foreign.lost_by(desired.properties,
                                                                                 config.properties):
                self.log.warning("config.xml left as it is: it was edited outside omerowebd while the new "
                                 "generation started (that generation serves from its own copy)",
                                 path=str(self.foreign.path), fix=self.foreign.ways_out(self.config_path))

                async def nothing_to_undo() -> None:
                    pass

                return nothing_to_undo
            written, snapshot = await self._write(omerodir, state_dir, data)
            # Measured against this config only once its file is written: what omerowebd wrote is what the
            # ledger says, so a write that failed (or an undo) never makes our own file look edited by someone.
            if written:
                self._config, self._properties = config, desired.properties
                self._follow(config)
            self.look()

            async def undo() -> None:
                if snapshot is not None:
                    await self._put_back(omerodir, state_dir, snapshot)
                self._config, self._properties = before
                self._follow(before[0])
                self.look()

            return undo

        return switch

    async def _write(self, omerodir: Path, state_dir: Path, data: bytes) -> tuple[bool, _Snapshot | None]:
        """The one writer: whether the file holds ``data`` now, and what it and the ledger held before
        (None: nothing to put back)."""
        path = omero_config.config_xml_path(omerodir)
        if self._watcher is not None:
            self._watcher.seen(hashlib.sha256(data).hexdigest())
        try:
            snapshot, changed = await asyncio.to_thread(_replace, omerodir, state_dir, data)
        except OSError as e:  # disk full, permissions: the generations have their own copies and serve on
            self.log.error("cannot write config.xml; OMERO.web serves on from its own copy", path=str(path),
                           error=e.strerror)
            return False, None
        if changed:
            self.written_at = time.time()
            self.log.info("config.xml written", path=str(path))
        return True, snapshot if changed else None

    async def _put_back(self, omerodir: Path, state_dir: Path, snapshot: _Snapshot) -> None:
        """The undo's write, by the same writer: the file as it was (gone if we created it), and its ledger."""
        if self._watcher is not None and snapshot.xml is not None:
            self._watcher.seen(hashlib.sha256(snapshot.xml).hexdigest())
        try:
            await asyncio.to_thread(_restore, omerodir, state_dir, snapshot)
        except OSError as e:
            self.log.error("cannot put config.xml back; OMERO.web serves on from its own copy",
                           path=str(omero_config.config_xml_path(omerodir)), error=e.strerror)

    def follow(self) -> None:
        """Watch the file from the first generation's start on, even while it is left as it is.

        Called once that generation serves, not at its stage: the watcher's
        library and thread would delay gunicorn's spawn. An edit made
        meanwhile is seen here, and the switch that follows leaves it (stage's rule).
        """
        self._follow(self._config)
        self.look()

    def _follow(self, config: Config) -> None:
        """Notice an edit of the file when it happens, not at the next reload."""
        path = omero_config.config_xml_path(config.daemon.omerodir)
        if self._watcher is not None and self._watcher.path == path:
            return
        self.stop()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            watcher = ConfigWatcher(path, self.look)
            watcher.start()
        except OSError as e:  # no inotify watch left, a read-only OMERODIR: edits are seen at the next reload
            self.log.warning("cannot watch config.xml for edits; they are seen at the next reload",
                             path=str(path), error=e.strerror)
            return
        self._watcher = watcher

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def status(self) -> dict[str, Any]:
        found = self.foreign
        return {
            "path": str(self.path),
            "written_at": self.written_at,
            # Names only: the values may be secrets, and they are someone else's.
            "foreign_edits": None if found is None else {
                "properties": list(found.names), "problem": found.problem, "since": self.foreign_since,
                "message": found.describe(), "fix": found.ways_out(self.config_path),
            },
        }

    def summary(self) -> str | None:
        """For the status line: what was edited outside omerowebd, if anything."""
        if self.foreign is None:
            return None
        return f"config.xml edited outside omerowebd ({', '.join(self.foreign.names) or self.foreign.problem})"


@dataclass(frozen=True)
class _Snapshot:
    """The site's config.xml and omerowebd's ledger of it before a write (None: there was none)."""

    xml: bytes | None
    ledger: bytes | None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _replace(omerodir: Path, state_dir: Path, data: bytes) -> tuple[_Snapshot, bool]:
    snapshot = _Snapshot(_read(omero_config.config_xml_path(omerodir)), _read(state_dir / omero_config.LEDGER))
    return snapshot, omero_config.write_site_config_xml(omerodir, state_dir, data)


def _restore(omerodir: Path, state_dir: Path, snapshot: _Snapshot) -> None:
    path, ledger = omero_config.config_xml_path(omerodir), state_dir / omero_config.LEDGER
    if snapshot.xml is None:
        path.unlink(missing_ok=True)  # a file this write created goes with it
    else:
        omero_config.write_config_bytes(path, snapshot.xml)
    if snapshot.ledger is None:
        ledger.unlink(missing_ok=True)
    else:
        write_atomic(ledger, snapshot.ledger, mode=0o600)
