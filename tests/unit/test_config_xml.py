"""The site's config.xml as an Output (config_xml.py): staged, written by one writer off the loop, undone."""

from __future__ import annotations

import asyncio
import fcntl
import threading
from pathlib import Path

from omerowebd import omero_config
from omerowebd.config_xml import SiteConfigXml
from omerowebd.desired import derive
from unit.test_nginx import Log, info, make_config  # noqa: F401 (info is a fixture)


def test_the_switch_writes_off_the_loop_and_its_undo_puts_the_file_back(tmp_path: Path, info) -> None:  # noqa: F811
    first = make_config(tmp_path, omero='prefix = "/first"\n')
    path = omero_config.config_xml_path(first.daemon.omerodir)
    first.daemon.state_dir.mkdir(parents=True)  # the daemon made it at start
    site = SiteConfigXml(Log(), first, lambda: None)

    async def scenario() -> None:
        try:
            switch = await site.stage(derive(first, info, "A"))
            assert switch is not None
            await switch()
            written = path.read_bytes()
            assert b"/first" in written and site.written_at is not None
            second = make_config(tmp_path, omero='prefix = "/second"\n')
            switch = await site.stage(derive(second, info, "A"))
            assert switch is not None and path.read_bytes() == written, "staging changes nothing"

            # `omero config` holds the lock: the write waits for it in a thread, and the loop runs on meanwhile.
            held, release = threading.Event(), threading.Event()

            def hold_the_lock() -> None:
                with open(f"{path}.lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    held.set()
                    release.wait(30)

            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            await asyncio.to_thread(held.wait, 30)
            writing = asyncio.ensure_future(switch())
            for _ in range(20):
                await asyncio.sleep(0)  # the loop turns while the write waits for the lock
            assert not writing.done()
            release.set()
            undo = await writing
            await asyncio.to_thread(holder.join, 30)
            assert b"/second" in path.read_bytes()
            await undo()
            assert path.read_bytes() == written
        finally:
            site.stop()

    asyncio.run(scenario())


def test_an_edit_made_outside_omerowebd_is_kept_unless_dropped_on_purpose(tmp_path: Path, info) -> None:  # noqa: F811
    config = make_config(tmp_path, omero='prefix = "/ours"\n')
    path = omero_config.config_xml_path(config.daemon.omerodir)
    config.daemon.state_dir.mkdir(parents=True)  # the daemon made it at start
    site = SiteConfigXml(Log(), config, lambda: None)

    async def scenario() -> None:
        try:
            switch = await site.stage(derive(config, info, "A"))
            assert switch is not None
            await switch()
            theirs = omero_config.properties_of(path.read_bytes())
            theirs["omero.web.debug"] = "true"  # `omero config set omero.web.debug true`
            omero_config.write_config_xml(config.daemon.omerodir, theirs)
            edited = path.read_bytes()
            assert site.refusal(config) is not None and "omero.web.debug" in site.refusal(config)
            assert await site.stage(derive(config, info, "A")) is None and path.read_bytes() == edited
            dropped = await site.stage(derive(config, info, "A"), discard=True)
            assert dropped is not None
            await dropped()
            assert b"omero.web.debug" not in path.read_bytes() and site.foreign is None
        finally:
            site.stop()

    asyncio.run(scenario())


def test_an_edit_made_while_the_new_generation_boots_is_left_by_its_switch(tmp_path: Path, info) -> None:  # noqa: F811
    """Between the stage (before the spawn) and the switch (once it serves) someone runs `omero config set`:
    the switch leaves the file, as the stage would have, and says so; the generation serves from its own copy."""
    config = make_config(tmp_path, omero='prefix = "/ours"\n')
    path = omero_config.config_xml_path(config.daemon.omerodir)
    config.daemon.state_dir.mkdir(parents=True)
    log = Log()
    site = SiteConfigXml(log, config, lambda: None)

    async def scenario() -> None:
        try:
            switch = await site.stage(derive(config, info, "A"))
            assert switch is not None
            await switch()
            second = make_config(tmp_path, omero='prefix = "/second"\n')
            switch = await site.stage(derive(second, info, "A"))
            assert switch is not None
            theirs = omero_config.properties_of(path.read_bytes())
            theirs["omero.web.debug"] = "true"  # while the new generation boots
            omero_config.write_config_xml(config.daemon.omerodir, theirs)
            edited = path.read_bytes()
            undo = await switch()
            assert path.read_bytes() == edited and site.foreign is not None
            await undo()
            assert path.read_bytes() == edited
        finally:
            site.stop()

    asyncio.run(scenario())
    assert any(level == "warning" and "while the new generation started" in event for level, event, _ in log.events)


def test_an_undo_puts_back_the_file_its_ledger_and_what_it_is_measured_against(tmp_path: Path, info) -> None:  # noqa: F811
    first = make_config(tmp_path, omero='prefix = "/first"\n')
    second = make_config(tmp_path, omero='prefix = "/second"\n')
    path = omero_config.config_xml_path(first.daemon.omerodir)
    ledger = first.daemon.state_dir / omero_config.LEDGER
    first.daemon.state_dir.mkdir(parents=True)  # the daemon made it at start
    site = SiteConfigXml(Log(), first, lambda: None)

    async def scenario() -> None:
        try:
            # A switch that created the file: its undo removes it, and the ledger it wrote.
            switch = await site.stage(derive(first, info, "A"))
            assert switch is not None
            undo = await switch()
            assert path.exists() and ledger.exists()
            await undo()
            assert not path.exists() and not ledger.exists()

            # Over a file omerowebd wrote: the file and the ledger byte for byte, and the first config's record.
            switch = await site.stage(derive(first, info, "A"))
            assert switch is not None
            await switch()
            file_before, ledger_before, record_before = path.read_bytes(), ledger.read_bytes(), site._properties
            switch = await site.stage(derive(second, info, "A"))
            assert switch is not None
            undo = await switch()
            assert b"/second" in path.read_bytes() and site._properties != record_before
            await undo()
            assert path.read_bytes() == file_before and ledger.read_bytes() == ledger_before
            assert site._properties == record_before and site._config is first
            # Nothing looks edited outside omerowebd, even measured without the ledger: the next reload goes on.
            assert site.foreign is None and site.refusal(first) is None and site.refusal(second) is None
            ledger.unlink()
            site.look()
            assert site.foreign is None
        finally:
            site.stop()

    asyncio.run(scenario())
