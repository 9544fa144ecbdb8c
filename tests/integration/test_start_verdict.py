"""A start with the config and venv unchanged since the last successful one runs on the venv's remembered answer
(issue 14): it serves, and asks the venv once it does; a venv changed since makes it ask before it starts; a
remembered answer the venv contradicts is replaced, without a moment of not serving."""

from __future__ import annotations

import json
import pwd
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, Load, NotifyListener, free_port, shadow_venv, wait_for

from omerowebd import config as config_module
from omerowebd.venv import fingerprint
from omerowebd.spawn_record import NAME as SPAWN_RECORD
from omerowebd.verdicts import NAME, key

pytestmark = pytest.mark.omeroweb

REMEMBERED = "on the venv's remembered answer"


@pytest.fixture
def site(tmp_path: Path, omero_venv: Path, notify: NotifyListener) -> Iterator[Daemon]:
    d = Daemon(root=tmp_path, venv=shadow_venv(omero_venv, tmp_path / "venv"), port=free_port(), notify=notify)
    yield d
    d.cleanup()


def start_and_serve(d: Daemon) -> str:
    """Start, wait until it serves and has told systemd READY; the log lines of this start."""
    mark = len(d.log())
    after = len(d.notify.messages)
    d.start()
    d.notify.wait("READY", "1", timeout=120, after=after)
    return d.log()[mark:]


def test_a_second_start_runs_on_the_remembered_answer_and_a_venv_change_asks_again(site):
    site.write_config(workers=1)
    verdict = site.root / "state" / NAME
    first = start_and_serve(site)
    assert REMEMBERED not in first
    wait_for(verdict.exists, 60, "the venv's answer to be remembered")
    remembered = verdict.read_bytes()
    assert verdict.stat().st_mode & 0o777 == 0o600
    assert site.stop() == 0

    second = start_and_serve(site)
    assert REMEMBERED in second, second
    assert "differs" not in second and "refuses" not in second
    assert site.status()["serving"]
    assert verdict.read_bytes() == remembered  # the venv agreed: nothing to rewrite
    assert site.stop() == 0

    # pip install of one more package since: the fingerprint differs, so the venv is asked before the start.
    packages = next((site.root / "venv").glob("lib/python3*/site-packages"))
    (packages / "omerowebd_test_extra-1.0.dist-info").mkdir()
    third = start_and_serve(site)
    assert REMEMBERED not in third, third
    assert site.status()["serving"]
    wait_for(lambda: verdict.read_bytes() != remembered, 60, "the new answer to be remembered")


def test_a_remembered_answer_the_venv_contradicts_is_replaced_under_load(site):
    site.write_config(workers=1)
    verdict = site.root / "state" / NAME
    start_and_serve(site)
    wait_for(verdict.exists, 60, "the venv's answer to be remembered")
    assert site.stop() == 0
    # The same key, another answer: as if an app's settings module changed without any package change.
    record = json.loads(verdict.read_text())
    record["answer"]["catalogue"]["omero.web.login_logo"]["description"] = "REMEMBERED-ONLY"
    verdict.write_text(json.dumps(record))

    mark = len(site.log())
    start_and_serve(site)
    with Load(site.port, clients=2) as load:
        load.wait_requests(5)
        # The first generation serves until the one derived from the fresh answer does.
        state = wait_for(lambda: (s := site.status())["last_reload"] and s["generation"]["number"] == 2 and s, 180,
                         "a generation from the fresh answer")
        load.wait_requests(5)
    log = site.log()[mark:]
    assert REMEMBERED in log and "differs from the remembered one" in log and "omero.web.login_logo" in log, log
    assert state["last_reload"]["outcome"] == "applied", state["last_reload"]
    assert load.failed == [] and load.refused == 0
    wait_for(lambda: verdict.exists() and "REMEMBERED-ONLY" not in verdict.read_text(), 60, "the fresh answer to be remembered")
    assert site.stop() == 0

    # A value OMERO.web itself would take ("yes" reads as false) but its check refuses, with an answer that
    # accepted it under the very same key: the start serves on it, asks the venv, and fails as a first start would.
    record = json.loads(verdict.read_text())
    site.write_config(workers=1, omero='"public.enabled" = "yes"')
    config = config_module.load(site.config_path)
    record["key"] = key(config.daemon.venv, config.properties, config.daemon.omerodir, fingerprint(site.venv))
    verdict.write_text(json.dumps(record))
    mark = len(site.log())
    site.start(wait=False)
    assert site.proc is not None and site.proc.wait(180) == 78
    log = site.log()[mark:]
    assert REMEMBERED in log and "refuses the config" in log and "omero.web.public.enabled" in log, log
    assert site.gunicorn_pids() == [] and not verdict.exists()


EARLY = "gunicorn was spawned early, from the remembered spawn"
NOT_IT = "is not adopted; stopping it"


class ServiceDaemon(Daemon):
    """The daemon as the unit runs it: as the service user (here nobody). A root daemon never spawns early."""

    def start(self, *, wait: bool = True, args: list[str] | None = None, command: list[str] | None = None) -> None:
        user = pwd.getpwnam("nobody")
        super().start(wait=wait, command=command or [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
            sys.executable, "-m", "omerowebd", "--config", str(self.config_path), *(args or [])])


@pytest.fixture
def service_site(omero_venv: Path) -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="omerowebd-early-"))  # not pytest's tmp_path: nobody cannot enter it
    base.chmod(0o755)
    venv = shadow_venv(omero_venv, base / "venv")  # root's: nobody reads it
    home = base / "site"
    home.mkdir()
    shutil.chown(home, "nobody")
    d = ServiceDaemon(root=home, venv=venv, port=free_port())
    try:
        yield d
    finally:
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def serves_once(d: Daemon, workers: int) -> tuple[str, dict]:
    mark = len(d.log())
    d.start()
    log = d.log()[mark:]
    status = d.status()
    assert status["serving"] and status["generation"]["workers"] == workers, status
    masters = [p for p in d.gunicorn_pids() if p == status["generation"]["master_pid"]]
    assert masters, status
    return log, status


def test_a_start_spawns_gunicorn_from_the_remembered_spawn_before_loading_and_never_a_stale_one(service_site):
    site = service_site
    site.write_config(workers=1)
    record = site.root / "state" / SPAWN_RECORD
    first, _ = serves_once(site, 1)
    assert EARLY not in first
    wait_for(record.exists, 60, "the first generation's spawn to be remembered")
    assert record.stat().st_mode & 0o777 == 0o600
    assert site.stop() == 0
    assert site.gunicorn_pids() == []

    # The same config and venv: gunicorn is spawned before the daemon imports asyncio, and adopted.
    second, status = serves_once(site, 1)
    assert EARLY in second and "before_asyncio=True" in second, second
    # The daemon loaded once its worker had (spawn_record.wait_for_boot): the wait is timed, never skipped.
    assert re.search(r"waited_for_boot=[0-9.]+", second), second
    assert NOT_IT not in second
    assert status["generation"]["number"] == 1
    assert site.stop() == 0
    assert site.gunicorn_pids() == []

    # The venv's remembered answer lost, the spawn record kept: the venv is asked while the early master boots;
    # what its workers report meanwhile is kept until generation 1 is registered, which adopts it and serves.
    (site.root / "state" / NAME).unlink()
    missed, status = serves_once(site, 1)
    assert EARLY in missed and REMEMBERED not in missed, missed
    assert status["generation"]["number"] == 1
    assert site.stop() == 0

    # The config edited: the record's key no longer fits; nothing is spawned before the daemon has loaded.
    site.write_config(workers=2)
    third, _ = serves_once(site, 2)
    assert EARLY not in third and NOT_IT not in third, third
    wait_for(lambda: spawned_workers(record) == 2, 60, "the new spawn to be remembered")
    assert site.stop() == 0
    kept = json.loads(record.read_text())["key"]

    # A package installed since: the venv's stat differs; the venv is asked, and no early spawn happens.
    packages = next(site.venv.glob("lib/python3*/site-packages"))
    (packages / "omerowebd_test_extra-1.0.dist-info").mkdir()
    fourth, _ = serves_once(site, 2)
    assert EARLY not in fourth and REMEMBERED not in fourth, fourth
    wait_for(lambda: record.exists() and json.loads(record.read_text())["key"] != kept, 60,
             "the spawn to be remembered for the new venv")
    assert site.stop() == 0

    # A record whose key fits but which spawns something else than the config runs (a daemon upgrade that
    # changed how it spawns): the early master is stopped before the daemon starts the right one.
    data = json.loads(record.read_text())
    data["spec"]["env"]["OMEROWEBD_TEST_MARK"] = "early"
    record.write_text(json.dumps(data))
    fifth, status = serves_once(site, 2)
    assert NOT_IT in fifth and "what it runs is not what this config runs" in fifth and EARLY not in fifth, fifth
    assert len(site.gunicorn_pids()) == 1 + 2, site.gunicorn_pids()  # one master and its workers: never two
    assert b"OMEROWEBD_TEST_MARK" not in Path(f"/proc/{status['generation']['master_pid']}/environ").read_bytes()
    assert site.stop() == 0


def spawned_workers(record: Path) -> int | None:
    try:
        return json.loads(json.loads(record.read_text())["spec"]["snapshot"])["settings"]["workers"]
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("spoil", ["writable", "link"])
def test_a_spawn_record_that_cannot_be_trusted_is_ignored(service_site, spoil):
    site = service_site
    site.write_config(workers=1)
    record = site.root / "state" / SPAWN_RECORD
    serves_once(site, 1)
    wait_for(record.exists, 60, "the first generation's spawn to be remembered")
    assert site.stop() == 0
    if spoil == "writable":
        record.chmod(0o666)
        why = "others may write it"
    else:
        kept = record.with_name("elsewhere.json")
        record.rename(kept)
        record.symlink_to(kept)
        why = "symbolic link"
    log, _ = serves_once(site, 1)
    assert EARLY not in log and f"ignoring the remembered spawn {record}" in log and why in log, log
    assert site.stop() == 0


def test_a_root_daemon_neither_keeps_nor_uses_a_spawn_record(site):
    """Root walks the venv before it runs the venv's Python (trust.venv_refusal): no stat-level key stands in."""
    site.write_config(workers=1)
    start_and_serve(site)
    wait_for((site.root / "state" / NAME).exists, 60, "the venv's answer to be remembered")
    assert site.stop() == 0
    assert not (site.root / "state" / SPAWN_RECORD).exists()
    second = start_and_serve(site)
    assert REMEMBERED in second and EARLY not in second, second
    assert site.stop() == 0
