"""A start with the config and venv unchanged since the last successful one runs on the venv's remembered answer
(issue 14): it serves, and asks the venv once it does; a venv changed since makes it ask before it starts; a
remembered answer the venv contradicts is replaced, without a moment of not serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, Load, NotifyListener, free_port, shadow_venv, wait_for

from omerowebd import config as config_module
from omerowebd.venv import fingerprint
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
