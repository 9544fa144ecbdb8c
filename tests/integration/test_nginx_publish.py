"""The root publisher (omerowebd.nginx_publish) with the real OMERO.web venv,
a real omerowebd and real nginx: root renders, from the TOML and the venv,
the same files the daemon renders for itself (in root's own directories);
nginx -t passes with them; a request through nginx reaches the daemon's
gunicorn; a reload of the daemon reaches nginx through the daemon's marker;
the maintenance page comes from root's directory; and what the service user
writes in its nginx directory never reaches nginx."""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from omerowebd import nginx, nginx_publish
from omerowebd.nginx_publish import EXIT_OK, Options

from conftest import Daemon, wait_for

from .test_nginx_serving import STATIC_FILE, Nginx, answers, get

pytestmark = pytest.mark.omeroweb

if os.geteuid() != 0:
    pytest.skip("the publisher runs as root", allow_module_level=True)


def site_config(daemon: Daemon, port: int, nginx_table: str = "") -> str:
    # No validate or reload command: the daemon only renders into its own
    # directory, as under the packaged units, where root publishes. The test
    # says when the daemon reloads (a publisher run settles for a second: a
    # reload of its own could land in it, and be published by that run).
    return textwrap.dedent(f"""\
        [daemon]
        omerodir = "{daemon.omerodir}"
        venv = "{daemon.venv}"
        runtime_dir = "{daemon.runtime_dir}"
        state_dir = "{daemon.root / 'state'}"
        bind = ["127.0.0.1:{daemon.port}"]
        graceful_timeout = 10
        watch_config = false

        [nginx]
        listen = "127.0.0.1:{port}"
        server_name = "localhost"
        """) + textwrap.dedent(nginx_table) + "\n[omero.web]\nwsgi_workers = 2\n"


def test_root_publishes_what_the_daemon_serves_and_nginx_serves_it(daemon: Daemon, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    front = Nginx(tmp_path / "nginx", f"include {dest}/*.conf;")
    options = Options(config=daemon.config_path, dest=dest, socket_unit=None,
                      test_command=tuple(front.argv("-t", "-q")), reload_command=tuple(front.argv("-s", "reload")))
    own = daemon.root / "state" / "nginx"
    try:
        daemon.save(site_config(daemon, front.port))
        front.start()  # with nothing to include yet
        daemon.start()
        # Written once the generation is promoted, in a thread: status may say serving a moment before.
        wait_for((own / nginx.APPLIED_MARKER).exists, 30, "the daemon to mark its TOML applied")

        code, lines = nginx_publish.run(options)
        assert code == EXIT_OK and lines[0].startswith("published"), lines
        # The daemon's rendering code, root's directories.
        for name in ("omero-web.conf", "omero-web-location.include"):
            daemons = (own / name).read_text().replace(str(daemon.root / "state" / "maintenance"),
                                                       str(dest / "maintenance"))
            assert (dest / name).read_text() == daemons, name
            assert stat.S_IMODE(os.stat(dest / name).st_mode) == 0o600
        assert front.test().returncode == 0, front.test().stderr

        login = wait_for(lambda: answers(front.port, "/webclient/login/"), 30, "the login page through nginx")
        assert b"OMERO.web - Login" in login.body
        assert get(front.port, f"/static/{STATIC_FILE}").status == 200

        # The service user rewrites its own files: nothing of it reaches nginx.
        before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
        for name in ("omero-web.conf", "planted.conf"):
            (own / name).write_text(f"access_log {tmp_path}/pwned;\nserver {{ listen 127.0.0.1:{front.port + 1}; }}\n")
        code, lines = nginx_publish.run(options)
        assert code == EXIT_OK and "up to date" in lines[0], lines
        assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == before
        dump = subprocess.run(front.argv("-T"), capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "pwned" not in dump.stdout and "planted" not in dump.stdout

        # The admin edits the TOML: nothing until the daemon serves it; then nginx follows.
        daemon.save(site_config(daemon, front.port, '[nginx.redirects]\n"/pub/x" = "/webclient/"\n'))
        code, lines = nginx_publish.run(options)
        assert code == EXIT_OK and "does not serve" in lines[0], lines
        assert get(front.port, "/pub/x").status != 307
        done = daemon.ctl("reload")
        assert done.returncode == 0, done.stdout + done.stderr
        code, lines = nginx_publish.run(options)
        assert code == EXIT_OK and lines[0].startswith("published"), lines
        redirect = wait_for(lambda: answers(front.port, "/pub/x", 307), 30, "nginx to answer the new redirect")
        assert redirect.headers["location"].endswith("/webclient/")

        # OMERO.web down: root's maintenance page.
        assert daemon.stop() == 0
        down = wait_for(lambda: answers(front.port, "/webclient/login/", 502), 30, "nginx to see OMERO.web down")
        assert down.body == (dest / "maintenance" / "maintainance.html").read_bytes()
        assert b"OMERO.web is restarting" in down.body
    finally:
        front.stop()
