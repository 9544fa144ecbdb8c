"""The nginx hand-over under real systemd, from the .deb, in a Debian 12
container: root renders nginx's files itself (omerowebd-nginx.path ->
omerowebd-nginx.service -> /usr/libexec/omerowebd-nginx-publish) once the
daemon serves the config; what the service user writes in its own nginx
directory changes nothing that nginx includes; nginx -t refusing keeps the
previous files and nginx serving; a flood of the service user's marker
writes leaves the path unit watching, starts the publisher a bounded number
of times, reloads nothing, and the next real change is still published.

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
        """Start the publisher as the path unit would, and wait for a run that started now to finish."""
        runs = self.runs()
        self.c.systemctl("start", PUBLISHER, check=False, timeout=400)
        if self.runs() == runs:  # it joined a run already under way (started before now): once more
            self.c.systemctl("start", PUBLISHER, check=False, timeout=400)

    def settled(self) -> bool:
        """The publisher is not running and the path unit watches."""
        return (self.publisher("ActiveState")["ActiveState"] == "inactive"
                and self.c.show(PATH_UNIT, "SubState")["SubState"] == "waiting")

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


def test_nginx_serves_static_files_but_no_link_the_service_user_plants(site: Site) -> None:
    """nginx's workers (www-data) serve STATIC_ROOT, the service user's: the daemon's release links
    answer, a link that user plants to a file of root's (world-readable) does not."""
    static_root = f"{OMERODIR}/var/static"
    assert site.c.run(["test", "-L", f"{static_root}/webgateway"], check=False).returncode == 0  # the daemon's link
    status, _, body = site.get("/static/webgateway/css/ome.body.css")
    assert status == 200 and body
    planted = {"omerowebd-test-passwd": "/etc/passwd", "omerowebd-test-etc": "/etc"}
    site.as_service_user(" && ".join(f"ln -s {target} {static_root}/{name}" for name, target in planted.items()))
    try:
        for path in ("/static/omerowebd-test-passwd", "/static/omerowebd-test-etc/passwd",
                     "/static/omerowebd-test-etc/os-release"):
            status, _, body = site.get(path)
            assert status in (403, 404) and "root:" not in body and "PRETTY_NAME" not in body, (path, status)
    finally:
        site.as_service_user("rm -f " + " ".join(f"{static_root}/{name}" for name in planted))


def test_what_the_service_user_writes_changes_nothing_nginx_includes(site: Site) -> None:
    c = site.c
    wait_for("the publisher to finish what the daemon's start began", site.settled, 300)
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
            wait_for(f"the path unit to start the publisher after {step!r}", lambda: site.runs() > runs, 30)
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


def test_a_flood_of_marker_writes_leaves_publishing_on_and_reloads_nothing(site: Site) -> None:
    c = site.c
    wait_for("the publisher to finish what the last test began", site.settled, 300)
    before = site.published()
    runs = site.runs()
    nginx_reloads = c.journal("-u", "nginx.service", "-o", "cat").count("Reloading")
    # Hundreds of rewrites over several seconds (so they land while the
    # publisher runs and while the path unit watches between runs),
    # alternating garbage and the daemon's own marker (the last one: what the
    # daemon applied stays true).
    flood = (f"cp {OWN}/applied.json {OWN}/.good && i=0 && while [ $i -lt 600 ]; do"
             f" if [ $((i % 2)) -eq 0 ]; then echo garbage > {OWN}/.next; else cp {OWN}/.good {OWN}/.next; fi;"
             f" mv {OWN}/.next {OWN}/applied.json; i=$((i + 1)); sleep 0.01; done; rm -f {OWN}/.good")
    started = time.monotonic()
    site.as_service_user(flood)
    elapsed = time.monotonic() - started

    wait_for("the publisher to finish and the path unit to watch again", site.settled, 300)
    path = c.show(PATH_UNIT, "ActiveState", "Result")
    assert path == {"ActiveState": "active", "Result": "success"}, f"{path} {site.journal()}"
    assert site.publisher()["Result"] == "success", site.journal()
    # Each run lasts at least a second: the flood started at most one a second, not one per write.
    started_runs = site.runs() - runs
    print(f"600 marker writes in {elapsed:.1f}s started the publisher {started_runs} times")
    assert 1 <= started_runs <= elapsed + 2, (started_runs, elapsed)
    assert c.journal("-u", "nginx.service", "-o", "cat").count("Reloading") == nginx_reloads
    assert site.published() == before
    assert "Traceback" not in site.journal(200)
    assert site.get()[0] == 200
    # Publishing is still on: the admin's next change reaches nginx once the daemon serves it.
    site.write_config(site.config(nginx='[nginx.redirects]\n"/omerowebd-after-flood" = "/webclient/"\n'))
    reloaded = c.systemctl("reload", "omerowebd.service", check=False, timeout=400)
    assert reloaded.returncode == 0, reloaded.stderr
    status, headers, _ = wait_for("nginx to answer the redirect set after the flood",
                                  lambda: (r := site.get("/omerowebd-after-flood"))[0] == 307 and r, 60)
    assert headers["Location"].endswith("/webclient/")
    assert c.journal("-u", "nginx.service", "-o", "cat").count("Reloading") > nginx_reloads
