"""omerowebctl sessions clear: through the running daemon, or directly when none runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Daemon, wait_for

from omerowebd.omero_config import with_session_path, write_config_xml

from .test_sessions_store import MAKE_SESSIONS

pytestmark = pytest.mark.omeroweb


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)


def make(venv: Path, omerodir: Path, names: list[str]) -> dict[str, str]:
    env = {"OMERODIR": str(omerodir), "DJANGO_SETTINGS_MODULE": "omeroweb.settings", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", MAKE_SESSIONS, json.dumps(names)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_clear_without_a_daemon_sweeps_directly(tmp_path: Path, omero_venv: Path) -> None:
    omerodir, state = tmp_path / "omerodir", tmp_path / "state"
    store = state / "sessions"
    store.mkdir(parents=True)
    (omerodir / "var").mkdir(parents=True)
    # config.xml as the daemon last wrote it: the store pinned under state_dir.
    write_config_xml(omerodir, with_session_path({}, store))
    config = tmp_path / "omerowebd.toml"
    config.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{omerodir}"
        venv = "{omero_venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{state}"
        """))
    made = make(omero_venv, omerodir, ["live", "expired", "shorter_custom_fresh"])

    dry = ctl(config, "sessions", "clear", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr + dry.stdout
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["deleted"] == 2 and report["store"] == str(store)
    assert all((store / name).exists() for name in made.values())

    done = ctl(config, "sessions", "clear")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "deleted 2, kept 1, errors 0" in done.stdout and str(store) in done.stdout
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("sessionid")) == [made["live"]]


def test_daemon_sweeps_at_start_and_on_request(daemon: Daemon) -> None:
    daemon.write_config(extra='\n[sessions]\nschedule = "1h"\n')
    store = daemon.root / "state" / "sessions"
    store.mkdir(parents=True)
    write_config_xml(daemon.omerodir, with_session_path({}, store))  # so the sessions can be made first
    (daemon.omerodir / "var").mkdir(parents=True, exist_ok=True)
    made = make(daemon.venv, daemon.omerodir, ["live", "expired"])
    daemon.start()
    assert "sessions" in daemon.status(), "the daemon runs the sweeper (SessionService) and shows it in status"

    status = wait_for(lambda: (daemon.status()["sessions"].get("last") and daemon.status()), 120, "the start sweep")
    last = status["sessions"]["last"]
    assert last["trigger"] == "start" and last["deleted"] == 1 and status["sessions"]["next"]
    assert not (store / made["expired"]).exists() and (store / made["live"]).exists()

    more = make(daemon.venv, daemon.omerodir, ["expired", "negative_int_expiry"])
    done = daemon.ctl("sessions", "clear")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "deleted 2" in done.stdout
    assert not any((store / name).exists() for name in more.values())
    shown = daemon.ctl("sessions", "status")
    assert "deleted 2" in shown.stdout and "next:" in shown.stdout
    assert "sessions swept" in daemon.log()
    # Who holds the store's lock (another host's sweep, on a shared store): nobody, between sweeps.
    lock = wait_for(lambda: daemon.status()["sessions"].get("lock"), 60, "the lock's state in status")
    assert lock["held"] is False and "lock:      free" in daemon.ctl("sessions", "status").stdout
