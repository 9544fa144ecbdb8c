"""omerowebctl diagnostics against the real venv and a real daemon (issue 7)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omerowebd import venv
from omerowebd.commands import diagnostics
from omerowebd.generation import CONF

pytestmark = pytest.mark.omeroweb


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def toml(tmp_path: Path, omero_venv: Path) -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{tmp_path / 'omerodir'}"
        venv = "{omero_venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{tmp_path / 'state'}"

        [omero.web]
        prefix = "/omero"
        wsgi_workers = 3
        secret_key = "do-not-print-me"
        """))
    path.chmod(0o644)
    return path


def entry(report: dict, what: str) -> dict:
    return next(p for p in report["paths"] if p["what"] == what)


def test_without_a_daemon_it_reports_versions_paths_logs_and_the_gunicorn_command(toml, tmp_path, omero_venv):
    out = ctl(toml, "diagnostics", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    versions = venv.probe_sync(omero_venv, {}).versions
    for dist in ("omero-web", "omero-py", "Django", "gunicorn", "python"):
        assert report["venv"][dist] == versions[dist]
    assert report["omerowebd"]["tomlkit"] and report["omerowebd"]["python"] == sys.version.split()[0]
    assert report["daemon"]["reachable"] is False and "not running" in report["daemon"]["why"]
    config_xml = entry(report, "config.xml")
    assert config_xml["path"] == str(tmp_path / "omerodir" / "etc" / "grid" / "config.xml")
    assert config_xml["exists"] is False and config_xml["writable"] is True
    assert entry(report, "sessions")["path"] == str(tmp_path / "state" / "sessions")
    assert entry(report, "venv python")["exists"] and entry(report, "config file")["mode"] == "0644"
    assert report["logs"]["OMERO.web"] == str(tmp_path / "omerodir" / "var" / "log" / "OMEROweb.log")
    g = report["gunicorn"]
    assert shlex.split(g["command"]) == [str(omero_venv / "bin" / "python"), "-m", "gunicorn", "-c", str(CONF),
                                         "omeroweb.wsgi:application"]
    assert g["settings"]["workers"] == 3 and g["env"]["SCRIPT_NAME"] == "/omero"
    assert "do-not-print-me" not in out.stdout
    text = ctl(toml, "diagnostics")
    assert text.returncode == 0
    for heading in ("omerowebd:", "OMERO.web venv:", "paths (access judged for", "logs:", "systemd:", "daemon:",
                    "gunicorn (a new generation):", "problems:"):
        assert heading in text.stdout
    assert "none found" in text.stdout and "do-not-print-me" not in text.stdout


def test_paths_are_judged_for_the_service_user(toml, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("judging for another user is what root does")
    tmp_path.chmod(0o700)  # pytest's directory: nobody cannot enter it
    report = json.loads(ctl(toml, "diagnostics", "--json", "--user", "nobody").stdout)
    assert report["judged_for"] == "nobody"
    assert entry(report, "state dir")["writable"] is False
    assert entry(report, "config file")["readable"] is False
    assert "state dir" in ctl(toml, "diagnostics", "--user", "nobody").stdout
    assert "CANNOT be created" in ctl(toml, "diagnostics", "--user", "nobody").stdout
    report = json.loads(ctl(toml, "diagnostics", "--json", "--user", "root").stdout)
    assert entry(report, "state dir")["writable"] is True


def test_a_broken_config_is_a_problem_not_a_traceback(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[daemon]\nomerodir = \n")
    out = ctl(path, "diagnostics")
    assert out.returncode == 1
    assert "TOML syntax error" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert "omerowebd:" in out.stdout and str(path) in out.stdout


def test_with_a_running_daemon_it_shows_what_runs_and_the_same_command_line(daemon):
    daemon.write_config(workers=2)
    daemon.start()
    status = daemon.status()
    out = daemon.ctl("diagnostics", "--json")
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    d = report["daemon"]
    assert d["reachable"] and d["serving"] and d["generation"] == status["generation"]["number"]
    assert d["master_pid"] == status["generation"]["master_pid"]
    assert d["config_sha256"] == report["config"]["sha256"]
    # The command line diagnostics prints is the one the daemon runs.
    running = Path(f"/proc/{d['master_pid']}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert [a.decode() for a in running] == shlex.split(report["gunicorn"]["command"])
    assert entry(report, "control socket")["kind"] == "socket"
    assert "the file as it is" in daemon.ctl("diagnostics").stdout


def test_systemd_units_are_shown_when_systemd_runs(tmp_path, monkeypatch):
    """No systemd here: a stand-in systemctl answers `show` as the real one does."""
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text("#!/bin/sh\n"
                    'case "$2" in\n'
                    '  omerowebd.service) printf "LoadState=loaded\\nActiveState=active\\nSubState=running\\n'
                    'MainPID=4242\\nUser=omero-web\\nNRestarts=0\\n" ;;\n'
                    '  *) printf "LoadState=loaded\\nActiveState=active\\nListen=127.0.0.1:4080 (Stream)\\n" ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    monkeypatch.setattr(diagnostics, "SYSTEMD_BOOTED", booted)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    state = diagnostics.systemd_state()
    assert state["running"] is True
    assert state["units"]["omerowebd.service"]["MainPID"] == "4242"
    assert state["units"]["omerowebd.socket"]["Listen"] == "127.0.0.1:4080 (Stream)"
    assert diagnostics._unit_user(state) == "omero-web"
    report = {"problems": [], "warnings": [], "omerowebd": {}, "config": {"path": "x", "valid": False},
              "paths": [], "systemd": state, "judged_for": "omero-web", "daemon": {"reachable": False, "why": "-"}}
    assert "omerowebd.service:     LoadState=loaded, ActiveState=active, SubState=running" in diagnostics.render(report)
    monkeypatch.setattr(diagnostics, "SYSTEMD_BOOTED", tmp_path / "absent")
    assert diagnostics.systemd_state()["running"] is False
