"""Static files per release (issue 11): an upgrade of OMERO.web under load.

The site runs an earlier omero-web (scripts/omero-web-requirements-previous.txt,
built by scripts/bootstrap.sh --tests) behind a real nginx; daemon.venv is
pointed at the pinned one and the daemon reloaded, while clients keep
fetching the login page and every stylesheet and script it links. No
request fails, and each file a page links is that page's own release's file
(the bytes of the file Django finds in that release's venv), whichever
generation answered the page and whenever the file was fetched. After the
cutover the unversioned names serve the new release; older releases go.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, wait_for
from integration.test_nginx_serving import answers, front, need_nginx, site_config  # noqa: F401 (fixtures)

from omerowebd import static

pytestmark = pytest.mark.omeroweb

PREVIOUS = Path(os.environ.get("OMEROWEBD_TEST_VENV_PREVIOUS", "/opt/omero/web/venv-previous"))
LOGIN = "/webclient/login/"
ASSET = re.compile(r'(?:href|src)="(/static/[^"?]+\.(?:css|js))(?:\?[^"]*)?"')
# OMERO.web's own cache-busting suffix says which release rendered a page: "?_5.33.2".
PAGE_VERSION = re.compile(r'\.css\?_([0-9][0-9A-Za-z.+-]*)"')
FIND = """\
import hashlib, json, sys
import django
django.setup()
from django.contrib.staticfiles import finders
found = {}
for path in json.load(sys.stdin):
    where = finders.find(path)
    found[path] = hashlib.sha256(open(where, "rb").read()).hexdigest() if where else None
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def previous_venv() -> Path:
    if not (PREVIOUS / "bin" / "python").exists():
        pytest.fail(f"no OMERO.web venv with an earlier omero-web at {PREVIOUS}: run scripts/bootstrap.sh --tests")
    return PREVIOUS


def version_of(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('omero-web'))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def release_files(venv: Path, omerodir: Path, paths: set[str]) -> dict[str, str | None]:
    """sha256 of each path as that venv's Django finds it (its own files, not any collected copy)."""
    env = {"PATH": "/usr/bin:/bin", "OMERODIR": str(omerodir), "DJANGO_SETTINGS_MODULE": "omeroweb.settings"}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", FIND], input=json.dumps(sorted(paths)),
                         capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Browsers:
    """Clients that fetch the login page, then every stylesheet and script it links, over and over."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.failed: list[str] = []
        # (page's release, the URL it linked, sha256 of what came back, when the page came)
        self.fetched: list[tuple[str, str, str, float]] = []
        self.pages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Browsers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _loop(self) -> None:
        deadline = time.monotonic() + 900
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._visit()
            except Exception as e:  # every failure counts
                with self._lock:
                    self.failed.append(repr(e))

    def _visit(self) -> None:
        status, body = get(self.port, LOGIN)
        at = time.monotonic()
        if status != 200:
            raise AssertionError(f"{LOGIN}: HTTP {status}")
        page = body.decode(errors="replace")
        version = PAGE_VERSION.search(page)
        assets = ASSET.findall(page)
        if not version or not assets:
            raise AssertionError(f"{LOGIN}: no release or no stylesheets in the page")
        with self._lock:
            self.pages.append((at, version.group(1)))
        for url in assets:
            status, data = get(self.port, url)
            if status != 200:
                raise AssertionError(f"{url} (linked by a {version.group(1)} page): HTTP {status}")
            with self._lock:
                self.fetched.append((version.group(1), url, hashlib.sha256(data).hexdigest(), at))

    def wait_pages(self, n: int, timeout: float = 120) -> None:
        start = len(self.pages)
        wait_for(lambda: len(self.pages) >= start + n or self.failed, timeout, f"{n} more pages")


def relative(url: str) -> str:
    """/static/release-X/webclient/css/layout.css -> webclient/css/layout.css (what Django's finders take)."""
    parts = url[len("/static/"):].split("/", 1)
    assert static.RELEASE.fullmatch(parts[0]), f"{url} is not a release's URL"
    return parts[1]


def test_an_upgrade_gives_every_page_its_own_release_s_files(daemon: Daemon, front, previous_venv: Path,
                                                            omero_venv: Path, tmp_path: Path):
    old_version, new_version = version_of(previous_venv), version_of(omero_venv)
    assert old_version != new_version

    def config(venv: Path, omero: str = "") -> str:
        text = site_config(daemon, front, omero).replace(f'venv = "{daemon.venv}"', f'venv = "{venv}"')
        return text.replace("graceful_timeout = 10\n", "graceful_timeout = 10\nwatch_config = false\n")

    daemon.save(config(previous_venv))
    front.start()
    daemon.start()
    wait_for(lambda: answers(front.port, LOGIN), 60, "the site through nginx")
    static_root = daemon.omerodir / "var" / "static"
    [old_release] = [p.name for p in static_root.iterdir() if static.RELEASE.fullmatch(p.name)]
    first = daemon.status()["generation"]["number"]
    unversioned_before = get(front.port, "/static/webclient/css/layout.css")

    with Browsers(front.port) as browsers:
        browsers.wait_pages(10)
        daemon.save(config(omero_venv))  # the upgrade: a new venv with a newer omero-web
        out = daemon.ctl("reload")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: first not in {g["number"] for g in daemon.status()["generations"]}, 60,
                 "the old generation to be retired")
        browsers.wait_pages(10)
    assert browsers.failed == []

    versions = {v for _, v in browsers.pages}
    assert versions == {old_version, new_version}, versions
    # Every page's files: its release's URLs, and the bytes of its release's own files.
    wanted: dict[str, set[str]] = {old_version: set(), new_version: set()}
    for version, url, _, _ in browsers.fetched:
        wanted[version].add(relative(url))
    truth = {old_version: release_files(previous_venv, daemon.omerodir, wanted[old_version]),
             new_version: release_files(omero_venv, daemon.omerodir, wanted[new_version])}
    wrong = sorted({(version, url) for version, url, digest, _ in browsers.fetched
                    if truth[version][relative(url)] != digest})
    assert wrong == [], f"{len(wrong)} files not of their page's release: {wrong[:5]}"
    # The releases do differ in what the login page links, so the check above can tell them apart.
    layout = "webclient/css/layout.css"
    assert layout in wanted[old_version] and layout in wanted[new_version]
    assert truth[old_version][layout] != truth[new_version][layout]
    # Pages of the old release were fetched after the reload began, while the new one was coming up.
    assert any(v == old_version for v, _, _, _ in browsers.fetched)

    # After the cutover the unversioned names are the new release's files, not stale copies.
    assert hashlib.sha256(unversioned_before[1]).hexdigest() == truth[old_version][layout]
    status, body = get(front.port, "/static/webclient/css/layout.css")
    assert status == 200 and hashlib.sha256(body).hexdigest() == truth[new_version][layout]
    releases = sorted(p.name for p in static_root.iterdir() if static.RELEASE.fullmatch(p.name))
    assert old_release in releases and len(releases) == 2  # the previous one stays for open browser tabs
    assert daemon.status()["static"]["previous"] == old_release

    # Another release (a site's own static directory): the oldest one goes once its successor retires.
    custom = tmp_path / "custom-static"
    (custom / "site").mkdir(parents=True)
    (custom / "site" / "brand.css").write_text("body { color: teal }\n")
    second = daemon.status()["generation"]["number"]
    daemon.save(config(omero_venv, f'staticfile_dirs = ["{custom}"]\n'))
    out = daemon.ctl("reload")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: second not in {g["number"] for g in daemon.status()["generations"]}, 60,
             "the second generation to be retired")
    wait_for(lambda: not (static_root / old_release).exists(), 60, "the oldest release to be removed")
    assert len([p for p in static_root.iterdir() if static.RELEASE.fullmatch(p.name)]) == 2
    status, body = get(front.port, "/static/site/brand.css")
    assert status == 200 and b"teal" in body
