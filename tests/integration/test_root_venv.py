"""Root runs the venv's Python only when root alone controls it.

A venv whose site-packages the service user (here ``nobody``) owns could hold
a ``sitecustomize.py`` that Python imports first: `omerowebctl check` as root
must refuse with one line before anything in it runs. The same venv owned by
root is run: that proves the planted file would have run."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests are about what root runs")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def planted_venv(tmp_path: Path, omero_venv: Path) -> tuple[Path, Path]:
    """A small venv on the OMERO.web venv's interpreter whose sitecustomize.py leaves a marker."""
    venv = tmp_path / "venv"
    subprocess.run([str(omero_venv / "bin" / "python"), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    marker = tmp_path / "ran-as-root"
    (site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for package in ("omeroweb", "gunicorn"):  # enough for the layout check; the probe itself then fails
        (site / package).mkdir()
        (site / package / "__init__.py").write_text("")
    os.chmod(tmp_path, 0o755)
    return venv, marker


def check(tmp_path: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "omerowebd.toml"
    config.write_text(f'[daemon]\nvenv = "{venv}"\nomerodir = "{tmp_path / "omerodir"}"\n'
                      f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.mark.parametrize("hostile", ["site-packages", "sitecustomize.py", "venv"])
def test_check_as_root_refuses_a_venv_the_service_user_controls(tmp_path: Path, planted_venv, hostile: str) -> None:
    venv, marker = planted_venv
    site = next(venv.glob("lib/python3*/site-packages"))
    target = {"site-packages": site, "sitecustomize.py": site / "sitecustomize.py", "venv": venv}[hostile]
    os.chown(target, NOBODY.pw_uid, NOBODY.pw_gid)

    result = check(tmp_path, venv)

    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refusing to run" in errors[0] and str(target) in errors[0], result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists(), "the planted sitecustomize.py ran as root"


def test_check_as_root_refuses_a_group_writable_site_packages(tmp_path: Path, planted_venv) -> None:
    venv, marker = planted_venv
    site = next(venv.glob("lib/python3*/site-packages"))
    os.chown(site, 0, NOBODY.pw_gid)
    os.chmod(site, 0o775)

    result = check(tmp_path, venv)

    assert result.returncode == 1 and "writable by group" in result.stdout, result.stdout
    assert not marker.exists()


def test_a_root_owned_venv_is_run(tmp_path: Path, planted_venv) -> None:
    """The control case: the same venv, root's, is run (so the refusals above are what kept it from running)."""
    venv, marker = planted_venv
    check(tmp_path, venv)
    assert marker.read_text() == "ran"


def test_root_import_withholds_what_nginx_reads_from_a_file_the_service_user_writes(tmp_path: Path, omero_venv: Path) -> None:
    """`check` points root at the service user's edited config.xml; importing it must not let that user
    choose the lines nginx's root master reads."""
    config = tmp_path / "omerowebd.toml"
    config.write_text(f'[daemon]\nvenv = "{omero_venv}"\nomerodir = "{tmp_path / "omerodir"}"\n'
                      f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    os.chown(hostile, NOBODY.pw_uid, NOBODY.pw_gid)
    backup = hostile / "backup.txt"
    backup.write_text("omero.web.login_logo=/static/logo.png\n"  # sorted, as omero config get prints them
                      'omero.web.nginx_server_extra_config=["access_log /etc/cron.d/x;"]\n')
    os.chown(backup, NOBODY.pw_uid, NOBODY.pw_gid)

    def run_import(source: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), "config", "import",
                               str(source)], capture_output=True, text=True, timeout=300)

    result = run_import(backup)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "withheld omero.web.nginx_server_extra_config" in result.stderr
    text = config.read_text()
    assert "login_logo" in text and "nginx_server_extra_config" not in text and "cron" not in text

    trusted = tmp_path / "backup.txt"  # the same file, root's: the admin's own backup is taken whole
    trusted.write_text(backup.read_text())
    result = run_import(trusted)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nginx_server_extra_config" in config.read_text()
