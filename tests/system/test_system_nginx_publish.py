"""The nginx hand-over under real systemd, from the .deb, in a Debian 12
container: root renders nginx's files itself (omerowebd-nginx.path ->
omerowebd-nginx.service -> /usr/libexec/omerowebd-nginx-publish) once the
daemon serves the config; what the service user writes in its own nginx
directory changes nothing that nginx includes; nginx -t refusing keeps the
previous files and nginx serving; a flood of path events hits the start
limit, not a root reload storm, and stops only the publishing.

One container for the module, its tests in order (each a step of an admin's
life with the package)."""

from __future__ import annotations

import socket
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from .helpers import OMERO_ROOT
from .nspawn import Container, wait_for

pytestmark = pytest.mark.system

HOST_OPT_OMERO = "/mnt/host-opt-omero"
OMERODIR = "/opt/omero/web/omero-web"
TOML = "/etc/omerowebd/omerowebd.toml"
OWN = "/var/lib/omerowebd/nginx"  # the service user's
PUBLISHED = "/var/lib/omerowebd-nginx"  # root's, what nginx includes
PUBLISHER = "omerowebd-nginx.service"
PATH_UNIT = "omerowebd-nginx.path"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Site:
    def __init__(self, container: Container, port: int, nginx_port: int) -> None:
        self.c = container
        self.port = port
        self.nginx_port = nginx_port

    def config(self, extra: str = "", nginx: str = "") -> str:
        return textwrap.dedent(f"""\
            [daemon]
            omerodir = "{OMERODIR}"
            venv = "/opt/omero/web/venv3"

            [nginx]
            listen = "127.0.0.1:{self.nginx_port}"
            """) + nginx + "\n[omero.web]\nwsgi_workers = 2\n" + extra

    def write_config(self, text: str) -> None:
        self.c.write(TOML, text, mode=0o640)
        self.c.run(["chgrp", "omero-web", TOML])

    def get(self, path: str = "/webclient/login/", timeout: float = 10) -> tuple[int, dict[str, str], str]:
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(f"http://127.0.0.1:{self.nginx_port}{path}", timeout=timeout) as r:
                return r.status, dict(r.headers), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode(errors="replace")

    def as_service_user(self, script: str) -> None:
        self.c.run(["runuser", "-u", "omero-web", "--", "sh", "-c", script])

    def published(self) -> str:
        """Names, owners, modes and hashes of everything nginx may include (and the page)."""
        return self.c.sh(f"cd {PUBLISHED} && find . -type f ! -name '.published.json' -printf '%p %u %m ' "
                         "-exec sha256sum {} \\; | sort").stdout

    def publisher(self, *props: str) -> dict[str, str]:
        return self.c.show(PUBLISHER, *(props or ("ActiveState", "Result", "ExecMainStatus")))

    def runs(self) -> int:
        """How many times the publisher has started: one journal line per run, from systemd."""
        return self.c.journal("-u", PUBLISHER, "-o", "cat").count("Starting ")

    def publish_now(self) -> None:
        """Start the publisher as the path unit would, and wait for it to finish."""
        self.c.systemctl("start", PUBLISHER, check=False, timeout=400)

    def journal(self, lines: int = 30) -> str:
        return self.c.journal("-u", PUBLISHER, "-n", str(lines))


@pytest.fixture(scope="module")
def site(built_deb, rootfs, omero_venv):
    port, nginx_port = free_port(), free_port()
    container = Container(rootfs, binds_ro=[(str(OMERO_ROOT), HOST_OPT_OMERO), (str(built_deb.deb.parent), "/srv/debs")])
    with container:
        s = Site(container, port, nginx_port)
        container.write("/etc/systemd/system/omerowebd.socket.d/test-port.conf",
                        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
        installed = container.run(["apt-get", "install", "-y", f"/srv/debs/{built_deb.deb.name}"], check=False,
                                  timeout=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        # The walkthrough's venv, root's and read-only, and an OMERODIR for the service.
        for path in ("python3.10", "web/venv3"):
            container.sh(f"mkdir -p /opt/omero/{path} && mount --bind {HOST_OPT_OMERO}/{path} /opt/omero/{path}"
                         f" && mount -o remount,bind,ro /opt/omero/{path}")
        container.sh(f"install -d -o omero-web -g omero-web -m 0755 {OMERODIR}")
        s.write_config(s.config())
        container.systemctl("reset-failed", "omerowebd.service", check=False)
        started = container.systemctl("restart", "omerowebd.service", check=False, timeout=400)
        assert started.returncode == 0, started.stderr + container.journal("-u", "omerowebd.service", "-n", "40")
        container.write("/etc/nginx/conf.d/omero-web.conf", f"include {PUBLISHED}/omero-web*.conf;\n")
        yield s


@pytest.fixture(autouse=True)
def fresh_start_limit(site: Site) -> None:
    """Each test starts with the publisher's start counter at zero (reset-failed resets it):
    the tests run in quick succession, faster than any admin."""
    site.c.systemctl("reset-failed", PUBLISHER, PATH_UNIT, check=False)


def test_root_publishes_once_the_daemon_serves_and_nginx_serves_the_site(site: Site) -> None:
    c = site.c
    wait_for(f"{PUBLISHED}/omero-web.conf", lambda: c.run(["test", "-s", f"{PUBLISHED}/omero-web.conf"],
                                                          check=False).returncode == 0, 120)
    # Config for nginx's master (root) only; the page for its workers.
    modes = c.run(["stat", "-c", "%n %U %a", f"{PUBLISHED}/omero-web.conf", f"{PUBLISHED}/omero-web-location.include",
                   f"{PUBLISHED}/maintenance", PUBLISHED]).stdout.split("\n")
    assert modes[:4] == [f"{PUBLISHED}/omero-web.conf root 600", f"{PUBLISHED}/omero-web-location.include root 600",
                         f"{PUBLISHED}/maintenance root 755", f"{PUBLISHED} root 755"], modes
    server = c.run(["cat", f"{PUBLISHED}/omero-web.conf"]).stdout
    assert f"server 127.0.0.1:{site.port} " in server  # the socket unit's address, asked of systemd
    assert f"root {PUBLISHED}/maintenance;" in server
    assert site.publisher()["Result"] == "success"
    started = c.systemctl("start", "nginx.service", check=False)
    assert started.returncode == 0, started.stderr + c.journal("-u", "nginx.service", "-n", "20")
    status, _, body = wait_for("the site through nginx", lambda: (r := site.get(timeout=60))[0] == 200 and r, 60)
    assert "OMERO.web - Login" in body


def test_what_the_service_user_writes_changes_nothing_nginx_includes(site: Site) -> None:
    c = site.c
    before = site.published()
    first = site.runs()
    digest = c.run(["sha256sum", TOML]).stdout.split()[0]
    pwned = "/etc/omerowebd-test-pwned"
    hostile = f"access_log {pwned};\\ninclude /etc/shadow;\\nserver {{ listen 127.0.0.1:{free_port()}; }}\\n"
    # Its own files, a planted one, and every kind of marker: garbage, a
    # link, a FIFO, and the right digest (it can read the TOML: that makes
    # root publish what the admin wrote, nothing else).
    steps = [
        f"printf '{hostile}' > {OWN}/omero-web.conf.tmp && mv {OWN}/omero-web.conf.tmp {OWN}/omero-web.conf",
        f"printf '{hostile}' > {OWN}/planted.conf",
        f"printf 'garbage{{{{' > {OWN}/applied.json",
        f"rm -f {OWN}/applied.json && ln -s /etc/shadow {OWN}/applied.json",
        f"rm -f {OWN}/applied.json && mkfifo {OWN}/applied.json",
        f"rm -f {OWN}/applied.json && printf '{{\"digest\": \"{digest}\"}}' > {OWN}/applied.json",
    ]
    for step in steps:
        runs = site.runs()
        site.as_service_user(step)
        if "applied.json" in step:  # the path unit starts the publisher
            wait_for("the path unit to start the publisher", lambda: site.runs() > runs, 30)
            wait_for("the publisher to finish", lambda: site.publisher()["ActiveState"] != "activating", 60)
        else:  # not watched: run it anyway, as the next event would
            site.publish_now()
        assert site.published() == before, step
        assert site.publisher()["Result"] == "success", step + site.journal()
    assert site.runs() >= first + len(steps)
    assert c.run(["test", "-e", pwned], check=False).returncode != 0
    dump = c.run(["nginx", "-T"], check=False)
    assert dump.returncode == 0 and pwned not in dump.stdout and "planted" not in dump.stdout
    journal = site.journal(100)
    assert "Traceback" not in journal and "garbage" not in journal
    assert site.get()[0] == 200


def test_a_reload_of_the_daemon_reaches_nginx(site: Site) -> None:
    site.write_config(site.config(nginx='[nginx.redirects]\n"/omerowebd-test-redirect" = "/webclient/"\n'))
    reloaded = site.c.systemctl("reload", "omerowebd.service", check=False, timeout=400)
    assert reloaded.returncode == 0, reloaded.stderr
    # The daemon's new marker starts the path unit; root renders, tests, reloads nginx.
    status, headers, _ = wait_for("nginx to answer the new redirect",
                                  lambda: (r := site.get("/omerowebd-test-redirect"))[0] == 307 and r, 60)
    assert headers["Location"].endswith("/webclient/")
    assert site.publisher()["Result"] == "success"


def test_nginx_refusing_keeps_the_previous_files_and_nginx_serving(site: Site) -> None:
    before = site.published()
    site.write_config(site.config(extra='nginx_server_extra_config = ["no_such_directive on;"]\n',
                                  nginx='[nginx.redirects]\n"/omerowebd-test-redirect" = "/webclient/"\n'))
    # The daemon itself validates nothing here (no validate_command): it
    # applies the config and says so; root's nginx -t refuses the files.
    assert site.c.systemctl("reload", "omerowebd.service", check=False, timeout=400).returncode == 0

    def refused() -> bool:
        return site.publisher()["Result"] == "exit-code"

    wait_for("the publisher to report nginx's refusal", refused, 60)
    assert 'unknown directive "no_such_directive"' in site.journal()
    assert site.published() == before
    assert site.c.systemctl("is-active", "nginx.service", check=False).stdout.strip() == "active"
    assert site.get()[0] == 200 and site.get("/omerowebd-test-redirect")[0] == 307
    # Fixed: published again.
    site.write_config(site.config())
    assert site.c.systemctl("reload", "omerowebd.service", check=False, timeout=400).returncode == 0
    wait_for("the redirect to go", lambda: site.get("/omerowebd-test-redirect")[0] != 307, 60)
    assert site.publisher()["Result"] == "success"


def test_a_flood_of_marker_changes_hits_the_start_limit_and_stops_only_the_publishing(site: Site) -> None:
    c = site.c
    before = site.published()

    def stopped() -> bool:
        # Each rewrite after the previous run finished is one more start.
        site.as_service_user(f"echo '{{}}' > {OWN}/applied.json.tmp && mv {OWN}/applied.json.tmp {OWN}/applied.json")
        time.sleep(0.1)  # not a wait for an outcome: the pace of a flood
        return c.show(PATH_UNIT, "ActiveState")["ActiveState"] == "failed"

    wait_for("the start limit to stop the path unit", stopped, 120, interval=0)
    assert c.show(PATH_UNIT, "Result")["Result"] == "unit-start-limit-hit"
    assert site.publisher("Result")["Result"] == "start-limit-hit"
    # Nothing else stopped: nginx and OMERO.web serve what was last published.
    assert site.published() == before
    assert site.get()[0] == 200
    assert c.systemctl("is-active", "omerowebd.service", check=False).stdout.strip() == "active"
    # What the unit's comment tells the admin to run brings it back.
    c.systemctl("reset-failed", PUBLISHER, PATH_UNIT)
    c.systemctl("start", PATH_UNIT, PUBLISHER, timeout=400)
    assert c.show(PATH_UNIT, "ActiveState")["ActiveState"] == "active"
    assert site.publisher()["Result"] == "success"
