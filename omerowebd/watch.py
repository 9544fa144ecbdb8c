"""Watch the config file: its directory, because editors save by writing a new
file and renaming it over the old one (or deleting and recreating it).

Bursts of events are debounced; a save that leaves the bytes as they were
(or as they were at the last reload) triggers nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import log

if TYPE_CHECKING:
    from watchdog.observers import Observer

DEBOUNCE = 0.3  # seconds of quiet after the last event before the file is read

# What a write, a rename, a removal or a chmod makes. Not "opened" nor
# "closed_no_write": watchdog >= 5 reports every read (Debian 13 ships 6.0), and
# the watcher's own read of the file would start the next read, 0.3 s later, for ever.
CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed", "attrib"})


def is_change(event: object, name: str) -> bool:
    """Whether watchdog's ``event`` may have changed the file called ``name`` in the watched directory."""
    if getattr(event, "event_type", None) not in CHANGES:
        return False
    paths = (getattr(event, "src_path", ""), getattr(event, "dest_path", "") or "")
    return any(p and os.path.basename(os.fsdecode(p)) == name for p in paths)


class ConfigWatcher:
    def __init__(self, path: Path, on_change: Callable[[], None], debounce: float = DEBOUNCE) -> None:
        self.path = path
        self.on_change = on_change
        self.debounce = debounce
        self.digest: str | None = None  # of the content last handed to a reload
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._observer: Observer | None = None
        self.problem: str | None = None  # why the file cannot be read now, for status

    def seen(self, digest: str) -> None:
        """The supervisor loaded this content; saving it again is not a change."""
        self.digest = digest

    def start(self) -> None:
        # Here, not at the top: watchdog (and ctypes) would add to every start before gunicorn is spawned.
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._loop = asyncio.get_running_loop()
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:  # runs in watchdog's thread
                if is_change(event, watcher.path.name):
                    assert watcher._loop is not None
                    watcher._loop.call_soon_threadsafe(watcher._poke)

        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(Handler(), str(self.path.parent), recursive=False)
        self._observer.start()

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def _poke(self) -> None:
        if self._timer:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.debounce, self._settled)

    def _settled(self) -> None:
        self._timer = None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._trouble("removed")
            return
        except OSError as e:  # a directory in its place, no permission
            self._trouble(f"unreadable: {e.strerror}")
            return
        if self.problem is not None:
            log.get().info("config file readable again", path=str(self.path))
            self.problem = None
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return
        self.digest = digest
        self.on_change()

    def _trouble(self, problem: str) -> None:
        if problem != self.problem:
            log.get().warning(f"config file {problem}; the running config keeps serving until the file is back",
                              path=str(self.path))
        self.problem = problem
