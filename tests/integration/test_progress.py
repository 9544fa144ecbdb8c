"""omerowebctl's progress against the real daemon and real OMERO.web (issue 12): on a terminal, a reload
shows what the daemon is doing while the new generation boots, and config import what it asks OMERO.web;
piped, each prints exactly its result."""

from __future__ import annotations

import sys

import pytest
from conftest import run_in_pty

pytestmark = pytest.mark.omeroweb


def ctl(daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "omerowebd.ctl", "--config", str(daemon.config_path), *args]


def test_reload_on_a_terminal_shows_progress_and_piped_only_the_result(daemon):
    manual = "watch_config = false"  # the reloads are omerowebctl's, not the watcher's
    daemon.write_config(workers=2, daemon=manual)
    daemon.start()

    daemon.write_config(workers=2, daemon=manual, omero='login_logo = "/static/progress-1.png"\n')
    code, out = run_in_pty(ctl(daemon, "reload"))
    assert code == 0, out
    # The reload takes seconds (the venv is asked, two workers load OMERO.web): long enough to be shown.
    assert "\r\x1b[Kreloading: " in out, out
    final = out.rsplit("\r\x1b[K", 1)[-1]
    assert final.lstrip().startswith("applied: "), repr(final)

    daemon.write_config(workers=2, daemon=manual, omero='login_logo = "/static/progress-2.png"\n')
    piped = daemon.ctl("reload")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("applied: ") and "\r" not in piped.stdout and "\x1b" not in piped.stdout
    assert piped.stderr == ""


def test_config_import_on_a_terminal_says_what_it_asks_omero_web(daemon, tmp_path):
    daemon.write_config(workers=1)
    backup = tmp_path / "backup.txt"
    backup.write_text("".join(f"omero.web.{name}\n" for name in sorted((
        "prefix=/omero", "wsgi_workers=3", "public.enabled=true", "login_logo=/static/logo.png",
        'ui.top_links=[["Data", "webindex"]]', "session_cookie_age=86400",
    ))))  # sorted, as `omero config get` prints them
    code, out = run_in_pty(ctl(daemon, "config", "import", str(backup), "--dry-run"))
    assert code == 0, out
    assert "\r\x1b[Kimporting 6 properties: " in out, out
    assert "dry run: " in out.rsplit("\r\x1b[K", 1)[-1]

    piped = daemon.ctl("config", "import", str(backup), "--dry-run")
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout + piped.stderr and "\r" not in piped.stdout + piped.stderr
    assert piped.stdout.startswith(f"importing 6 properties from {backup}"), piped.stdout
