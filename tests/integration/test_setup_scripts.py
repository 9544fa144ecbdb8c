"""First set-up says what it does (issue 12): scripts/bootstrap.sh and scripts/setup-omero-web.sh run
without a terminal or standard input (as under CI), print one line before and after each long step and
nothing of pip's, name the log file when a step fails, and do nothing (quietly) when all is there."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.omeroweb


def run(argv: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "CI": "true", "OMEROWEBD_SETUP_LOGS": str(tmp_path / "logs"), **env}
    return subprocess.run(argv, cwd=REPO, env=environ, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=1800)


def test_setup_omero_web_leaves_a_ready_venv_alone_and_says_nothing(omero_venv, tmp_path):
    stamp = omero_venv / ".omerowebd-requirements"
    before = stamp.stat().st_mtime_ns
    result = run(["scripts/setup-omero-web.sh", str(omero_venv)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert stamp.stat().st_mtime_ns == before


def test_setup_omero_web_failing_step_says_what_failed_and_names_its_log(omero_venv, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("omero-web==5.33.2\nthis is not a requirement (at all)\n")
    # A wheelhouse that holds (a stand-in for) zeroc-ice: the once-per-machine compile is not this test's.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "zeroc_ice-3.6.5-cp310-cp310-linux_x86_64.whl").write_bytes(b"")
    venv = tmp_path / "venv"
    result = run(["scripts/setup-omero-web.sh", str(venv), str(requirements)], tmp_path,
                 OMERO_WEB_WHEELHOUSE=str(wheels))
    assert result.returncode != 0
    assert re.fullmatch(rf"==> building the OMERO\.web venv {venv} from requirements\.txt \(usually .+ the first time\)\n",
                        result.stdout), result.stdout
    log = tmp_path / "logs" / "venv-venv.log"
    assert "==> FAILED after " in result.stderr and f"all of it: {log}" in result.stderr, result.stderr
    assert "this is not a requirement" in log.read_text()  # pip's words, in the log and in the tail shown
    assert "| " in result.stderr


def test_bootstrap_with_everything_in_place_prints_nothing_and_reads_no_input(omero_venv, tmp_path):
    result = run(["scripts/bootstrap.sh"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_setup_omero_web_updates_a_venv_it_built_in_place_when_the_requirements_change(tmp_path):
    """A changed requirements file (an extra such as omero-web[redis]) is installed into the venv
    that is there, never by removing it: processes running from it keep their files. The venv here
    stands in for one (its python and pip record what they are asked); pip's work is not this test's."""
    venv, wheels, py310 = tmp_path / "venv", tmp_path / "wheels", tmp_path / "python3.10"
    (venv / "bin").mkdir(parents=True)
    (py310 / "bin").mkdir(parents=True)
    wheels.mkdir()
    (wheels / "zeroc_ice-3.6.5-cp310-cp310-linux_x86_64.whl").write_bytes(b"")
    asked = tmp_path / "asked"
    for tool, body in (("python", 'case "$*" in *importlib.metadata*) echo "omero-web 5.33.2 gunicorn 27.0.1";; esac'),
                       ("pip", 'echo "$*" >> ' + str(asked))):
        script = venv / "bin" / tool
        script.write_text(f"#!/bin/sh\n{body}\nexit 0\n")
        script.chmod(0o755)
    (py310 / "bin" / "python3.10").write_text("#!/bin/sh\nexit 1\n")  # building a venv anew would fail
    (py310 / "bin" / "python3.10").chmod(0o755)
    (venv / "kept").write_text("a file the running processes use")
    (venv / ".omerowebd-requirements").write_text("omero-web==5.33.2\n")
    requirements = REPO / "scripts" / "omero-web-requirements.txt"
    result = run(["scripts/setup-omero-web.sh", str(venv), str(requirements)], tmp_path,
                 OMERO_WEB_WHEELHOUSE=str(wheels), PY310_HOME=str(py310))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"==> updating the OMERO.web venv {venv} to omero-web-requirements.txt" in result.stdout
    assert (venv / "kept").exists()  # not rebuilt
    assert f"-r {requirements}" in asked.read_text()
    assert (venv / ".omerowebd-requirements").read_text() == requirements.read_text()
    assert "omero-web[redis]==" in requirements.read_text()  # sessions in Redis need django-redis
