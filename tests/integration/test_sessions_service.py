"""SessionService as the supervisor drives it: update() on start and reload,
run() after READY, sweep_now() for omerowebctl, status() for status. Real
venv, real store, real child processes; waits for events, never a fixed time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from omerowebd import config as config_module
from omerowebd.omero_config import with_session_path, write_config_xml
from omerowebd.sessions import SessionService
from omerowebd.status_lines import sessions as render_status
from omerowebd.venv import VenvInfo

from .test_sessions_store import DAY, Site, omeroweb_dir

pytestmark = pytest.mark.omeroweb


class Log:
    """Collects the structured events the service logs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def swept(self) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.events if event in ("sessions swept", "sessions sweep (dry run)")]


def make_config(site: Site, root: Path, sessions: str = "", omero: str = "") -> config_module.Config:
    text = textwrap.dedent(f"""\
        [daemon]
        omerodir = "{site.omerodir}"
        venv = "{site.venv}"
        runtime_dir = "{root / 'run'}"
        state_dir = "{root / 'state'}"

        [sessions]
        """) + textwrap.dedent(sessions) + "\n" + textwrap.dedent(omero)
    return config_module.parse(text.encode(), root / "omerowebd.toml")


def venv_info(venv: Path) -> VenvInfo:
    return VenvInfo(venv=venv, versions={}, omeroweb_dir=omeroweb_dir(venv), catalogue={})


def update(service: SessionService, site: Site, config: config_module.Config) -> None:
    service.update(config, with_session_path(config.properties, site.store), venv_info(site.venv))


async def until(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def fill(site: Site, model: str, count: int, old_every: int) -> None:
    """Many copies of one Django-written session; every ``old_every``-th one aged past the cookie."""
    text = (site.store / model).read_text()
    now = time.time()
    for i in range(count):
        path = site.store / f"sessionid{i:032d}"
        path.write_text(text)
        if i % old_every == 0:
            os.utime(path, (now - 2 * DAY, now - 2 * DAY))


@pytest.fixture
def site(tmp_path: Path, omero_venv: Path) -> Site:
    return Site(tmp_path, omero_venv, "site")


def test_schedule_fires_and_each_sweep_is_one_event(site: Site, tmp_path: Path) -> None:
    made = site.make(["live", "expired"])
    log = Log()
    service = SessionService(log)
    update(service, site, make_config(site, tmp_path, 'schedule = "0.2s"\nat_start = false'))

    async def scenario() -> None:
        task = asyncio.create_task(service.run())
        try:
            await until(lambda: service.sweeps >= 3, what="three scheduled sweeps")
            assert service.status()["next"] is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    events = log.swept()
    assert len(events) >= 3 and all(e["trigger"] == "schedule" for e in events)
    assert events[0]["deleted"] == 1 and all(e["deleted"] == 0 for e in events[1:])
    assert not (site.store / made["expired"]).exists() and (site.store / made["live"]).exists()
    last = service.status()["last"]
    assert {"at", "scanned", "deleted", "kept", "errors", "duration"} <= set(last)


def test_at_start_sweeps_at_once_and_run_stops_cleanly(site: Site, tmp_path: Path) -> None:
    site.make(["expired"])
    log = Log()
    service = SessionService(log)
    update(service, site, make_config(site, tmp_path, 'schedule = "1d"'))

    async def scenario() -> None:
        task = asyncio.create_task(service.run())
        await until(lambda: service.sweeps >= 1, what="the start sweep")
        status = service.status()
        assert status["last"]["trigger"] == "start" and status["last"]["deleted"] == 1
        assert status["next"] > time.time() + DAY - 60
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    text = "\n".join(render_status(service.status()))
    assert "deleted 1" in text and "next:" in text


def test_sweep_during_a_reload_is_not_disturbed(site: Site, tmp_path: Path) -> None:
    made = site.make(["live"])
    fill(site, made["live"], 20000, old_every=4)
    log = Log()
    service = SessionService(log)
    update(service, site, make_config(site, tmp_path, 'schedule = "6h"\nat_start = false'))

    async def scenario() -> dict[str, Any]:
        sweep = asyncio.create_task(service.sweep_now())
        await until(lambda: service.running is not None, what="the sweep to start")
        # The reload: a new [sessions] table is applied while the sweep runs.
        update(service, site, make_config(site, tmp_path, 'schedule = "03:30"\nat_start = false'))
        assert service.status()["running"] is not None
        return await sweep

    result = asyncio.run(scenario())
    assert result.get("error") is None and result["deleted"] == 5000 and result["kept"] == 15001
    assert service.status()["schedule"] == "03:30"


def test_second_sweep_waits_for_the_first(site: Site, tmp_path: Path) -> None:
    made = site.make(["live"])
    fill(site, made["live"], 5000, old_every=2)
    service = SessionService(Log())
    update(service, site, make_config(site, tmp_path, "at_start = false"))

    async def scenario() -> list[dict[str, Any]]:
        return list(await asyncio.gather(service.sweep_now(), service.sweep_now(dry_run=True)))

    first, second = asyncio.run(scenario())
    assert first["deleted"] == 2500 and second["deleted"] == 0 and not second.get("busy")


def test_cache_engine_needs_no_sweep(site: Site, tmp_path: Path) -> None:
    service = SessionService(Log())
    config = make_config(site, tmp_path, omero='[omero.web]\nsession_engine = "django.contrib.sessions.backends.cache"\n')
    update(service, site, config)
    status = service.status()
    assert status["sweeper"] is None and "nothing to sweep" in status["note"]
    result = asyncio.run(service.sweep_now())
    assert "nothing to sweep" in result["skipped"]


def test_database_engine_runs_clearsessions(site: Site, tmp_path: Path) -> None:
    database = tmp_path / "sessions.sqlite3"
    extra = [["SESSION_FILE_PATH", str(site.store)],
             ["DATABASES", {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}}]]
    properties = {"omero.web.session_engine": "django.contrib.sessions.backends.db",
                  "omero.web.django_additional_settings": json.dumps(extra)}
    write_config_xml(site.omerodir, properties)
    manage = [str(site.venv / "bin" / "python"), str(omeroweb_dir(site.venv) / "manage.py")]
    env = {**os.environ, "OMERODIR": str(site.omerodir)}
    done = subprocess.run([*manage, "migrate", "sessions"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = site.make(["live", "shorter_custom_fresh"])
    assert len(made) == 2

    def rows() -> int:
        count = subprocess.run([*manage, "shell", "-c",
                                "from django.contrib.sessions.models import Session; print(Session.objects.count())"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert count.returncode == 0, count.stderr
        return int(count.stdout.strip().splitlines()[-1])

    assert rows() == 2
    (tmp_path / "state").mkdir()  # the daemon makes it; clearsessions runs as its owner (here root)
    service = SessionService(Log())
    config = make_config(site, tmp_path, omero='[omero.web]\nsession_engine = "django.contrib.sessions.backends.db"\n')
    service.update(config, properties, venv_info(site.venv))
    assert service.status()["sweeper"] == "clearsessions"
    result = asyncio.run(service.sweep_now())
    assert result.get("error") is None and result["exit_status"] == 0, result
    assert rows() == 1


def test_config_change_moves_the_next_sweep(site: Site, tmp_path: Path) -> None:
    service = SessionService(Log())
    update(service, site, make_config(site, tmp_path, 'schedule = "1d"\nat_start = false'))

    async def scenario() -> None:
        task = asyncio.create_task(service.run())
        await until(lambda: service.next_at is not None, what="the first schedule")
        first = service.next_at
        assert first is not None and first > time.time() + DAY - 60
        update(service, site, make_config(site, tmp_path, 'schedule = "0.1s"\nat_start = false'))
        await until(lambda: service.sweeps >= 1, what="a sweep on the new schedule")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_restarted_daemon_sweeps_without_importing_omeroweb_settings(site: Site, tmp_path: Path) -> None:
    """The settings the first daemon's sweep learnt (importing omeroweb.settings) are remembered in the state
    dir: the next daemon's first sweep decides from them, as every later sweep of the first daemon did."""
    (tmp_path / "state").mkdir()
    config = make_config(site, tmp_path, 'schedule = "1d"')
    reports = []
    for _ in ("first daemon", "second daemon"):
        made = site.make(["expired"])
        service = SessionService(Log())  # a daemon's life: nothing in memory from the last one
        update(service, site, config)
        reports.append(asyncio.run(service.sweep_now()))
        assert not (site.store / made["expired"]).exists()
    assert reports[0]["django_settings"] == "omeroweb.settings" and reports[0]["deleted"] == 1
    assert reports[1].get("django_settings") is None and reports[1]["deleted"] == 1
    assert (tmp_path / "state" / "sweep-settings.json").stat().st_mode & 0o777 == 0o600
