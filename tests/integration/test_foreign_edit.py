"""An admin's habit: `omero config set` on a site omerowebd runs (issue 11).

omerowebd owns OMERODIR/etc/grid/config.xml. An edit by anyone else is
noticed when it happens, named (the properties, never their values) in
status, check, the journal and STATUS=, and never overwritten silently: a
reload stops and says the two ways out. The serving generation never sees
the edit: it reads its own copy. Edits are made by omero-py itself (its
ConfigXml, from the venv) and by the real `omero config set`, run as an
unprivileged user since the omero CLI refuses root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, NotifyListener, free_port, http_get, wait_for

pytestmark = pytest.mark.omeroweb

TOML_LOGO = "/static/logo-from-the-toml.png"
ADMIN_LOGO = "/static/logo-from-omero-config-set.png"
LOGO = "omero.web.login_logo"


def edit_with_omero_py(daemon: Daemon, **changes: str | None) -> None:
    """What `omero config set|unset` does to the file, done by omero-py's own ConfigXml."""
    lines = ["from omero.config import ConfigXml", f"c = ConfigXml({str(site_xml(daemon))!r})"]
    for name, value in changes.items():
        name = name.replace("__", ".")
        lines.append(f"del c[{name!r}]" if value is None else f"c[{name!r}] = {value!r}")
    lines.append("c.close()")
    subprocess.run([str(daemon.venv / "bin" / "python"), "-c", "\n".join(lines)], check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(daemon.root)})


def site_xml(daemon: Daemon) -> Path:
    return daemon.omerodir / "etc" / "grid" / "config.xml"


def foreign(daemon: Daemon) -> dict | None:
    return daemon.status()["config_xml"]["foreign_edits"]


def start(daemon: Daemon, omero: str = f'login_logo = "{TOML_LOGO}"\n', workers: int = 1) -> None:
    daemon.write_config(workers=workers, daemon="watch_config = false", omero=omero)
    daemon.start()


def page(daemon: Daemon) -> bytes:
    status, body = http_get(daemon.port)
    assert status == 200
    return body


def test_an_edit_is_noticed_named_and_a_reload_stops_until_it_is_dropped(daemon):
    start(daemon)
    mark = len(daemon.notify.messages)
    edit_with_omero_py(daemon, omero__web__login_logo=ADMIN_LOGO, omero__web__debug="true")

    found = wait_for(lambda: foreign(daemon), 30, "the daemon to notice the edit")
    assert found["properties"] == ["omero.web.debug", LOGO]
    assert ADMIN_LOGO not in str(found)  # names, never values
    daemon.notify.wait("STATUS", contains=f"config.xml edited outside omerowebd (omero.web.debug, {LOGO})", after=mark)
    assert "config.xml edited outside omerowebd" in daemon.log() and LOGO in daemon.log()
    shown = daemon.ctl("status").stdout
    assert "edited outside omerowebd" in shown and LOGO in shown and "--discard-foreign-edits" in shown
    checked = daemon.ctl("check")
    assert checked.returncode == 1
    assert f"error: {site_xml(daemon)} was edited outside omerowebd: omero.web.debug, {LOGO}" in checked.stdout
    # The serving generation still runs on the config it started with.
    assert TOML_LOGO.encode() in page(daemon)

    generation = daemon.status()["generation"]["number"]
    edited = site_xml(daemon).read_bytes()
    daemon.write_config(workers=2, daemon="watch_config = false", omero=f'login_logo = "{TOML_LOGO}"\n')
    out = daemon.ctl("reload")
    assert out.returncode == 1, out.stdout + out.stderr
    said = out.stdout
    assert "rejected" in said and LOGO in said and "omero.web.debug" in said
    assert f"omerowebctl config import {site_xml(daemon)} --only omero.web.debug --only {LOGO}" in said
    assert "omerowebctl reload --discard-foreign-edits" in said
    assert site_xml(daemon).read_bytes() == edited
    assert daemon.status()["generation"]["number"] == generation

    out = daemon.ctl("reload", "--discard-foreign-edits")
    assert out.returncode == 0, out.stdout + out.stderr
    assert foreign(daemon) is None
    assert TOML_LOGO in site_xml(daemon).read_text() and ADMIN_LOGO not in site_xml(daemon).read_text()
    assert len(daemon.status()["generation"]["worker_pids"]) == 2
    assert daemon.ctl("check").returncode == 0
    # Nothing else to apply: the discard alone rewrites the file.
    edit_with_omero_py(daemon, omero__web__login_logo=None)
    wait_for(lambda: foreign(daemon), 30, "the daemon to notice the unset")
    out = daemon.ctl("reload", "--discard-foreign-edits")
    assert out.returncode == 0 and "dropped (omero.web.login_logo)" in out.stdout, out.stdout + out.stderr
    assert TOML_LOGO in site_xml(daemon).read_text()
    wait_for(lambda: foreign(daemon) is None, 30, "the edit to be forgotten")


@pytest.fixture
def shared_daemon(omero_venv: Path) -> Iterator[Daemon]:
    """A daemon in a directory an unprivileged user can reach (pytest's tmp dirs are root's alone)."""
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.fail("running as root needs runuser to run the omero CLI as nobody")
    base = Path(tempfile.mkdtemp(prefix="omerowebd-foreign-edit-"))
    base.chmod(0o755)
    listener = NotifyListener(base / "notify.sock")
    d = Daemon(root=base, venv=omero_venv, port=free_port(), notify=listener)
    try:
        yield d
    finally:
        d.cleanup()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


def omero_config_set(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `omero config`, as the admin would run it (as an unprivileged user: it refuses root)."""
    home = daemon.root / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "OMERODIR": str(daemon.omerodir), "HOME": str(home), "LC_ALL": "C.UTF-8"}
    command = [str(daemon.venv / "bin" / "omero"), "config", *args]
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody", str(daemon.omerodir / "etc"), str(home)], check=True)
        command = ["runuser", "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
        env = {}
    return subprocess.run(command, env=env or None, capture_output=True, text=True, timeout=180, cwd=home)


def test_omero_config_set_is_taken_into_the_toml_with_config_import_only(shared_daemon):
    daemon = shared_daemon
    start(daemon)
    done = omero_config_set(daemon, "set", LOGO, ADMIN_LOGO)
    assert done.returncode == 0, done.stderr
    found = wait_for(lambda: foreign(daemon), 30, "the daemon to notice `omero config set`")
    assert found["properties"] == [LOGO]
    assert TOML_LOGO.encode() in page(daemon)  # the serving generation never read it

    # The way out that keeps the edit: into the TOML, then the reload goes through.
    out = daemon.ctl("config", "import", str(site_xml(daemon)), "--only", LOGO, "--reload")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f'login_logo = "{ADMIN_LOGO}"' in daemon.config_path.read_text()
    assert ADMIN_LOGO.encode() in page(daemon)
    assert foreign(daemon) is None
    assert ADMIN_LOGO in site_xml(daemon).read_text()
    get = omero_config_set(daemon, "get", LOGO)  # what the admin sees is what serves
    assert get.returncode == 0 and get.stdout.strip() == ADMIN_LOGO, get.stdout + get.stderr


def test_an_edit_made_while_the_daemon_was_stopped_is_kept_and_reported_at_start(daemon):
    start(daemon)
    assert daemon.stop() == 0
    edit_with_omero_py(daemon, omero__web__login_logo=ADMIN_LOGO)
    edited = site_xml(daemon).read_bytes()
    daemon.start()
    assert TOML_LOGO.encode() in page(daemon)  # serves the TOML: the file is not read by any generation
    assert site_xml(daemon).read_bytes() == edited  # and not overwritten either
    assert foreign(daemon)["properties"] == [LOGO]
    assert "config.xml left as it is" in daemon.log()
