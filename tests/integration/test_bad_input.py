"""Bad input gets one clear line and a non-zero exit, never a traceback (issue 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.omeroweb


def run_daemon(config: Path | None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "omerowebd"] + (["--config", str(config)] if config else [])
    full_env = {k: v for k, v in os.environ.items() if k != "OMEROWEBD_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def write(tmp_path: Path, body: str, *, venv: Path, port: int | None = None, omerodir: Path | None = None) -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{omerodir or tmp_path / 'omerodir'}"
        venv = "{venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{tmp_path / 'state'}"
        bind = ["127.0.0.1:{port or free_port()}"]
        """) + textwrap.dedent(body))
    return path


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("omerowebd: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_missing_config(tmp_path):
    result = run_daemon(tmp_path / "nope.toml")
    assert_one_line(result, 78, "nope.toml", "not found")


def test_default_config_path_comes_from_the_environment(tmp_path):
    result = run_daemon(None, env={"OMEROWEBD_CONFIG": str(tmp_path / "env.toml")})
    assert_one_line(result, 78, "env.toml", "not found")


def test_unreadable_config(tmp_path, omero_venv):
    path = write(tmp_path, "", venv=omero_venv)
    path.chmod(0)
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-m", "omerowebd", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    tmp_path.chmod(0o755)
    assert_one_line(result, 78, "cannot read")


def test_toml_syntax_error_has_line_and_column(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nprefix = /omero\n", venv=omero_venv)
    line = assert_one_line(run_daemon(path), 78, "TOML syntax error")
    assert f"{path}:8:10:" in line  # the "/" of "prefix = /omero"


def test_wrong_type_of_daemon_setting(tmp_path, omero_venv):
    path = write(tmp_path, "ready_timeout = \"soon\"\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, f"{path}:7:", "daemon.ready_timeout", "must be a number")


def test_unknown_key_suggests_the_right_one(tmp_path, omero_venv):
    path = write(tmp_path, "ready_timout = 10\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, "unknown key daemon.ready_timout", "did you mean 'ready_timeout'")


def test_wrong_type_of_omero_property(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_workers = \"many\"\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, f"{path}:8:", "omero.web.wsgi_workers", "must be an integer")


def test_unknown_omero_property_is_a_warning_with_a_suggestion(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_worker = 2\n", venv=omero_venv)
    out = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "warning:" in out.stdout and "did you mean omero.web.wsgi_workers" in out.stdout


def test_venv_without_omero_web(tmp_path):
    fake = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fake)], check=True)
    path = write(tmp_path, "", venv=fake)
    result = run_daemon(path)
    assert result.returncode == 78 and "Traceback" not in result.stderr
    assert "has no omero-web: run" in result.stderr and "has no gunicorn: run" in result.stderr


def test_venv_that_does_not_exist(tmp_path):
    path = write(tmp_path, "", venv=tmp_path / "missing")
    assert_one_line(run_daemon(path), 78, "does not exist", "daemon.venv")


def test_omerodir_that_cannot_be_written(tmp_path, omero_venv):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write(tmp_path, "", venv=omero_venv, omerodir=blocker / "omerodir")
    assert_one_line(run_daemon(path), 78, "daemon.omerodir", "is not a directory")


def test_address_already_in_use(tmp_path, omero_venv):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write(tmp_path, "", venv=omero_venv, port=taken.getsockname()[1])
        assert_one_line(run_daemon(path), 78, "address already in use")


def test_check_lists_every_problem_and_starts_nothing(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_workers = \"x\"\ndebug = \"maybe\"\n", venv=omero_venv)
    out = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "wsgi_workers" in out.stdout and "debug" in out.stdout
    assert not (tmp_path / "run").exists()
