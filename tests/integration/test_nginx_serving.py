"""Real nginx (Debian's package, a plain process on a free loopback port) in
front of omerowebd running real OMERO.web: the daemon's own files pass
`nginx -t`, serve the site with and without a prefix, answer redirects, show
the maintenance page when OMERO.web is down, and follow a change of prefix;
a change nginx rejects leaves the old files and the old site."""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd import nginx, venv
from omerowebd.venv import VenvInfo

from conftest import Daemon, end_process, free_port, wait_for

pytestmark = pytest.mark.omeroweb

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STATIC_FILE = "webgateway/css/ome.body.css"

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def get(port: int, path: str, timeout: float = 10.0) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def answers(port: int, path: str, status: int = 200) -> Response | None:
    try:
        r = get(port, path)
    except OSError:
        return None
    return r if r.status == status else None


class Nginx:
    """One nginx master in its own prefix directory, including the daemon's server file."""

    def __init__(self, root: Path, include: str) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "nginx.conf"
        self.error_log = root / "error.log"
        # As root the workers would run as nobody, who cannot enter pytest's
        # private tmp dir; the files' own modes (0644/0755) are asserted in the unit tests.
        user = "user root;" if os.geteuid() == 0 else ""
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "".join(f"    {kind}_temp_path {root}/{kind};\n" for kind in kinds)
        mime = "    include /etc/nginx/mime.types;\n" if Path("/etc/nginx/mime.types").exists() else ""
        self.conf.write_text(
            f"{user}\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {self.error_log};\n"
            f"events {{ worker_connections 64; }}\n"
            f"http {{\n{mime}    default_type application/octet-stream;\n    access_log {root}/access.log;\n{temp}"
            f"    {include}\n}}\n"
        )

    def argv(self, *args: str) -> list[str]:
        return [NGINX, "-c", str(self.conf), "-p", str(self.root), "-e", str(self.error_log), *args]

    def test(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv("-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def running() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}: {self.log()}")
            # The master writes its pid once it has read the config and bound its ports.
            pid = self.root / "nginx.pid"
            return pid.exists() and pid.read_text().strip() == str(self.proc.pid if self.proc else "")

        wait_for(running, 30, "nginx to start")

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def stop(self) -> None:
        end_process(self.proc, signal.SIGQUIT)  # graceful: the master waits for its workers


@pytest.fixture(scope="module")
def need_nginx() -> None:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (scripts/bootstrap.sh installs nginx-light)")


@pytest.fixture
def front(tmp_path: Path, need_nginx: None) -> Iterator[Nginx]:
    """nginx including every *.conf the daemon writes: none at first (an empty glob is fine)."""
    server = Nginx(tmp_path / "nginx", f"include {tmp_path / 'state' / 'nginx'}/*.conf;")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def info(omero_venv: Path) -> VenvInfo:
    return venv.probe_sync(omero_venv, {})


def site_config(daemon: Daemon, front: Nginx, omero: str = "", nginx_table: str = "") -> str:
    commands = (f"validate_command = {_toml_list(front.argv('-t', '-q'))}\n"
                f"reload_command = {_toml_list(front.argv('-s', 'reload'))}\n")
    return textwrap.dedent(f"""\
        [daemon]
        omerodir = "{daemon.omerodir}"
        venv = "{daemon.venv}"
        runtime_dir = "{daemon.runtime_dir}"
        state_dir = "{daemon.root / 'state'}"
        bind = ["127.0.0.1:{daemon.port}"]
        graceful_timeout = 10

        [nginx]
        listen = "127.0.0.1:{front.port}"
        server_name = "localhost"
        """) + commands + textwrap.dedent(nginx_table) + "\n[omero.web]\nwsgi_workers = 2\n" + textwrap.dedent(omero)


def _toml_list(argv: list[str]) -> str:
    return "[" + ", ".join(f'"{a}"' for a in argv) + "]"


# -- nginx -t ------------------------------------------------------------------------


@pytest.mark.parametrize("omero, table", [
    ("", ""),
    ('prefix = "/omero"\nstatic_url = "/omero/static/"\n', ""),
    ('nginx_server_extra_config = ["client_body_timeout 60s;"]\n',
     'upstreams = ["127.0.0.1:4999", "unix:/run/omerowebd-test.sock"]\n'
     'max_fails = 3\nfail_timeout = "1m30s"\nconnect_timeout = "750ms"\n'
     '[nginx.redirects]\n"/" = "/webclient/"\n"/pub/schleicher-et-al-2017" = "/webclient/?show=project-27936"\n'),
], ids=["no-prefix", "prefix", "redirects-upstreams-extra"])
def test_nginx_t_passes_with_the_server_file_and_with_the_location_include(
        tmp_path: Path, front: Nginx, info: VenvInfo, omero_venv: Path, omero: str, table: str) -> None:
    daemon = Daemon(root=tmp_path, venv=omero_venv, port=free_port())
    daemon.save(site_config(daemon, front, omero, table))
    config = config_module.load(daemon.config_path)
    output = nginx.NginxOutput(_NullLog())
    asyncio.run(output.apply(config, config.properties, info))  # runs nginx -t itself (validate_command)
    assert output.status()["validation"]["ok"] is True
    server_file = Path(output.status()["files"]["server"])
    location_file = Path(output.status()["files"]["location"])
    assert server_file.exists() and location_file.exists()
    assert front.test().returncode == 0, front.test().stderr
    if "upstreams" in table:  # real nginx takes every backend's timing and the retry lines
        server_text = server_file.read_text()
        assert server_text.count(" max_fails=3 fail_timeout=1m30s;") == 3
        assert "proxy_next_upstream error timeout http_502 http_503;" in server_text
        assert "proxy_connect_timeout 750ms;" in server_text

    inside = Nginx(tmp_path / "nginx-location",
                   f"server {{\n        listen 127.0.0.1:{free_port()};\n        include {location_file};\n    }}")
    checked = inside.test()
    assert checked.returncode == 0, checked.stderr
    # The same check fails on a broken include: it can tell.
    location_file.write_text(location_file.read_text() + "no_such_directive on;\n")
    assert "unknown directive" in inside.test().stderr


class _NullLog:
    def __getattr__(self, level: str):
        return lambda *a, **k: None


# -- the site through nginx ----------------------------------------------------------


def test_site_redirect_and_maintenance_page_through_nginx(daemon: Daemon, front: Nginx) -> None:
    daemon.save(site_config(daemon, front, nginx_table=textwrap.dedent("""\
        [nginx.redirects]
        "/pub/schleicher-et-al-2017" = "/webclient/?show=project-27936"
        """)))
    front.start()  # before the daemon: its reload after writing the files brings the site in
    daemon.start()
    status = daemon.status()["nginx"]
    assert status["validation"]["ok"] is True and status["reload"]["ok"] is True, status

    login = wait_for(lambda: answers(front.port, "/webclient/login/"), 30, "the login page through nginx")
    assert b"OMERO.web - Login" in login.body
    static = get(front.port, f"/static/{STATIC_FILE}")
    assert static.status == 200 and static.headers["content-type"].startswith("text/css")
    assert static.body == (daemon.omerodir / "var" / "static" / STATIC_FILE).read_bytes()

    redirect = get(front.port, "/pub/schleicher-et-al-2017")
    assert redirect.status == 307
    assert redirect.headers["location"].endswith("/webclient/?show=project-27936")
    assert get(front.port, "/pub/schleicher-et-al-2017/more").status != 307  # an exact path, not a prefix

    assert daemon.stop() == 0
    down = wait_for(lambda: answers(front.port, "/webclient/login/", 502), 30, "nginx to see OMERO.web down")
    assert down.headers["content-type"].startswith("text/html")
    assert b"OMERO.web is restarting" in down.body and b"will be" in down.body
    page = daemon.root / "state" / "maintenance" / "maintainance.html"
    assert down.body == page.read_bytes()


def test_prefix_change_is_followed_and_a_rejected_change_keeps_the_old_site(daemon: Daemon, front: Nginx) -> None:
    omero = 'prefix = "/omero"\nstatic_url = "/omero/static/"\n'
    daemon.save(site_config(daemon, front, omero))
    front.start()
    daemon.start()
    wait_for(lambda: answers(front.port, "/omero/webclient/login/"), 30, "the login page under /omero")
    assert get(front.port, f"/omero/static/{STATIC_FILE}").status == 200
    location = daemon.root / "state" / "nginx" / "omero-web-location.include"
    server = daemon.root / "state" / "nginx" / "omero-web.conf"
    assert "location /omero {" in location.read_text()
    first_write = daemon.status()["nginx"]["written_at"]

    daemon.save(site_config(daemon, front, 'prefix = "/web"\nstatic_url = "/web/static/"\n'))
    done = daemon.ctl("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "location /web {" in location.read_text() and "location /omero {" not in location.read_text()
    status = daemon.status()["nginx"]
    assert status["written_at"] > first_write and status["reload"]["ok"] is True
    wait_for(lambda: answers(front.port, "/web/webclient/login/"), 30, "the login page under /web")
    assert get(front.port, f"/web/static/{STATIC_FILE}").status == 200
    assert get(front.port, "/omero/webclient/login/").status == 404

    before = server.read_bytes(), location.read_bytes()
    generation = daemon.status()["generation"]["number"]
    daemon.save(site_config(daemon, front, 'prefix = "/web"\nstatic_url = "/web/static/"\n'
                            'nginx_server_extra_config = ["no_such_directive on;"]\n'))
    done = daemon.ctl("reload")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nginx rejected the new config" in done.stdout + done.stderr
    assert 'unknown directive "no_such_directive"' in done.stdout + done.stderr
    assert (server.read_bytes(), location.read_bytes()) == before
    assert daemon.status()["generation"]["number"] == generation
    assert answers(front.port, "/web/webclient/login/") is not None
    assert front.test().returncode == 0
