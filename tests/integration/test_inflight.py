"""Requests in flight when a reload retires the old generation complete (issue 11).

OMERO.web serves long downloads (archived files, exports). A small app on
the daemon's PYTHONPATH streams a response a line a second; a reload
replaces the generation serving it, through a real nginx that is reloaded
too. The download finishes, up to the graceful timeout (by default
omero.web.wsgi_timeout), and is cut at a shorter one the TOML sets.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, http_get, wait_for
from integration.test_nginx_serving import answers, front, need_nginx, site_config  # noqa: F401 (fixtures)

from omerowebd.generation import DEFAULT_GRACEFUL_TIMEOUT, plan_gunicorn
from omerowebd.venv import VenvInfo

pytestmark = pytest.mark.omeroweb

VIEWS = '''\
import time

from django.http import StreamingHttpResponse


def stream(request):
    """A line a second for ?seconds=N seconds, then "done": a slow download."""
    seconds = int(request.GET.get("seconds", "60"))

    def lines():
        for i in range(seconds):
            yield b"%d\\n" % i
            time.sleep(1)
        yield b"done\\n"

    return StreamingHttpResponse(lines(), content_type="text/plain")
'''
URLS = 'from django.urls import path\nfrom . import views\nurlpatterns = [path("stream/", views.stream)]\n'


@pytest.fixture
def stream_app(tmp_path: Path) -> Path:
    root = tmp_path / "apps"
    (root / "slow_stream").mkdir(parents=True)
    (root / "slow_stream" / "__init__.py").write_text("")
    (root / "slow_stream" / "views.py").write_text(VIEWS)
    (root / "slow_stream" / "urls.py").write_text(URLS)
    return root


class Download(threading.Thread):
    """One streamed response, read line by line as it arrives: what came, when, and how it ended."""

    def __init__(self, port: int, seconds: int) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds = port, seconds
        self.status: int | None = None
        self.lines: list[tuple[float, bytes]] = []
        self.error: str | None = None
        self.started = time.monotonic()
        self.ended: float | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", f"/slow_stream/stream/?seconds={self.seconds}")
            response = conn.getresponse()
            self.status = response.status
            while True:
                line = response.readline()
                if not line:
                    break
                self.lines.append((time.monotonic(), line))
        except Exception as e:  # a cut download: the test looks at what arrived
            self.error = repr(e)
        finally:
            self.ended = time.monotonic()
            conn.close()

    @property
    def complete(self) -> bool:
        return [line for _, line in self.lines] == [b"%d\n" % i for i in range(self.seconds)] + [b"done\n"]


def generations(daemon: Daemon) -> dict[int, str]:
    return {g["number"]: g["state"] for g in daemon.status()["generations"]}


def test_a_download_in_flight_finishes_across_a_reload(daemon, front, stream_app):
    daemon.extra_env["PYTHONPATH"] = str(stream_app)
    # No graceful_timeout: the default is omero.web.wsgi_timeout, which a site serving long downloads
    # raises (a sync worker busy past it is killed by gunicorn itself, reload or not).
    def config(workers: int, body: str) -> str:
        text = site_config(daemon, front, 'apps = ["slow_stream"]\nwsgi_timeout = 120\n',
                           f'max_body_size = "{body}"\n')
        return text.replace("graceful_timeout = 10\n", "watch_config = false\n").replace(
            "wsgi_workers = 2", f"wsgi_workers = {workers}")

    daemon.save(config(2, "0"))
    front.start()
    daemon.start()
    wait_for(lambda: answers(front.port, "/webclient/login/"), 30, "the site through nginx")
    first = daemon.status()["generation"]

    download = Download(front.port, 60)
    download.start()
    wait_for(lambda: len(download.lines) >= 2, 60, "the download to start")
    # A new generation (workers) and new nginx files (max_body_size): nginx is reloaded during the download too.
    daemon.save(config(3, "1m"))
    out = daemon.ctl("reload")
    assert out.returncode == 0, out.stdout + out.stderr
    state = daemon.status()
    assert state["generation"]["number"] != first["number"]
    assert generations(daemon).get(first["number"]) == "retiring"  # still sending the download
    assert state["nginx"]["reload"]["ok"] is True
    assert answers(front.port, "/webclient/login/") is not None  # the new generation serves meanwhile
    assert len(download.lines) < 60  # the download was still going when its generation was told to stop

    download.join(120)
    assert not download.is_alive()
    assert download.error is None, download.error
    assert download.status == 200 and download.complete, download.lines[-3:]
    assert download.ended - download.started >= 60
    # Its generation goes once the download is done, not before and not much later.
    wait_for(lambda: first["number"] not in generations(daemon), 30, "the old generation to be retired")
    assert "did not stop in time" not in daemon.log()
    assert http_get(daemon.port)[0] == 200


def test_a_download_longer_than_the_graceful_timeout_is_cut_at_it(daemon, stream_app):
    daemon.extra_env["PYTHONPATH"] = str(stream_app)
    settings = "watch_config = false"
    daemon.write_config(workers=1, daemon=settings, omero='apps = ["slow_stream"]\n')
    daemon.save(daemon.config_path.read_text().replace("graceful_timeout = 10", "graceful_timeout = 3"))
    daemon.start()
    first = daemon.status()["generation"]["number"]
    download = Download(daemon.port, 300)
    download.start()
    wait_for(lambda: len(download.lines) >= 2, 60, "the download to start")
    daemon.write_config(workers=2, daemon=settings, omero='apps = ["slow_stream"]\n')
    daemon.save(daemon.config_path.read_text().replace("graceful_timeout = 10", "graceful_timeout = 3"))
    out = daemon.ctl("reload")
    assert out.returncode == 0, out.stdout + out.stderr
    told = time.monotonic()  # the old master had its TERM by the time the reload answered
    download.join(60)
    assert not download.is_alive()
    assert not download.complete
    # gunicorn kills the worker at graceful_timeout; the daemon would kill the master 5 s later.
    assert download.ended - told < 3 + 5 + 10
    wait_for(lambda: first not in generations(daemon), 30, "the old generation to be retired")
    assert daemon.status()["serving"]


def _info(catalogue_timeout: str | None = None) -> VenvInfo:
    catalogue = {"omero.web.wsgi_timeout": {"default": catalogue_timeout}} if catalogue_timeout else {}
    return VenvInfo(venv=Path("/venv"), versions={}, omeroweb_dir=Path("/venv/omeroweb"), catalogue=catalogue)


@pytest.mark.parametrize("properties, graceful, expected", [
    ({}, None, 60),  # OMERO.web's wsgi_timeout
    ({"omero.web.wsgi_timeout": "300"}, None, 300),  # a site serving long downloads raised it
    ({"omero.web.wsgi_timeout": "0"}, None, DEFAULT_GRACEFUL_TIMEOUT),  # no worker timeout: still bounded
    ({"omero.web.wsgi_timeout": "300"}, 20.0, 20),  # the TOML's says
    ({}, 2.5, 3),
])
def test_the_graceful_timeout_defaults_to_the_worker_timeout(properties, graceful, expected):
    plan = plan_gunicorn(properties, _info("60"), omerodir=Path("/o"), app="omeroweb.wsgi:application",
                         graceful_timeout=graceful, health_path=None)
    assert plan.settings["graceful_timeout"] == expected and plan.graceful_timeout == expected
