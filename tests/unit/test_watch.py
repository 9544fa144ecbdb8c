"""The config file watcher (omerowebd/watch.py) on a real watchdog observer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from omerowebd.watch import ConfigWatcher, is_change


def test_only_a_change_of_the_file_counts() -> None:
    for kind in ("created", "modified", "deleted", "closed", "attrib"):
        assert is_change(SimpleNamespace(event_type=kind, src_path="/etc/x/omerowebd.toml"), "omerowebd.toml")
    assert is_change(SimpleNamespace(event_type="moved", src_path="/etc/x/.tmp1", dest_path=b"/etc/x/omerowebd.toml"),
                     "omerowebd.toml")  # an editor's save: a new file renamed over the old one
    assert not is_change(SimpleNamespace(event_type="modified", src_path="/etc/x/other.toml"), "omerowebd.toml")
    for kind in ("opened", "closed_no_write"):  # a read (watchdog >= 5)
        assert not is_change(SimpleNamespace(event_type=kind, src_path="/etc/x/omerowebd.toml"), "omerowebd.toml")


def test_the_watchers_own_read_starts_no_other_read(tmp_path: Path) -> None:
    """It reads the file once things are quiet; with watchdog >= 5 that read is an event of the file
    too, and taking it for a change read the file again every 0.3 s for ever (the idle daemon's CPU)."""
    from watchdog.events import FileSystemEventHandler

    path = tmp_path / "config.xml"
    path.write_text("<icegrid/>")

    async def main() -> tuple[int, int, list[str]]:
        loop = asyncio.get_running_loop()
        changed, seen_barrier = asyncio.Event(), asyncio.Event()
        contents: list[str] = []
        pokes = 0

        def on_change() -> None:
            contents.append(path.read_text())
            changed.set()

        watcher = ConfigWatcher(path, on_change, debounce=0.05)
        poke = watcher._poke

        def counted_poke() -> None:  # what each event of the file starts
            nonlocal pokes
            pokes += 1
            poke()

        watcher._poke = counted_poke  # type: ignore[method-assign]
        watcher.start()
        try:
            class Barrier(FileSystemEventHandler):  # on the same watch: its events come after the read's
                def on_any_event(self, event: object) -> None:
                    if os.path.basename(os.fsdecode(getattr(event, "src_path", ""))) == "barrier":
                        loop.call_soon_threadsafe(seen_barrier.set)

            assert watcher._observer is not None
            watcher._observer.schedule(Barrier(), str(tmp_path), recursive=False)
            # A change (one event: written aside and renamed over, so no read lands between a truncate
            # and a write): read once, after the debounce.
            (tmp_path / "config.xml.new").write_text("<icegrid><properties/></icegrid>")
            os.replace(tmp_path / "config.xml.new", path)
            await asyncio.wait_for(changed.wait(), 30)
            after_read = pokes
            (tmp_path / "barrier").write_text("")  # once it is seen, so is every event the read made
            await asyncio.wait_for(seen_barrier.wait(), 30)
            return after_read, pokes, contents
        finally:
            watcher.stop()

    after_read, later, contents = asyncio.run(main())
    assert contents == ["<icegrid><properties/></icegrid>"]
    assert after_read >= 1 and later == after_read, "the watcher's own read of the file was taken for a change"
