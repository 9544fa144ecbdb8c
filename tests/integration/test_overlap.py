"""A reload cannot hurt the generation that serves (issue 11).

Each generation reads its own OMERODIR view, so an old worker that its
master respawns during a reload boots on the old config; the site's
config.xml and nginx's files follow only once the new generation serves.
Real OMERO.web, real gunicorn, real nginx, load from looping clients.
"""

from __future__ import annotations

import threading

import pytest
from conftest import Load, http_get, wait_for
from integration.test_nginx_serving import answers, front, need_nginx, site_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.omeroweb

OLD_LOGO = "/static/old-generation-logo.png"
NEW_LOGO = "/static/new-generation-logo.png"
# Passes every check (the venv probe imports the settings, not the middleware);
# Django imports it when a worker loads the app, and that worker fails to boot.
MISSING_MIDDLEWARE = ('middleware = \'[{"index": 1, "class": "omeroweb.no_such_module.NoSuchMiddleware"}]\'\n')


def view_xml(daemon, number):
    return daemon.runtime_dir / f"gen-{number}" / "omerodir" / "etc" / "grid" / "config.xml"


def site_xml(daemon):
    return daemon.omerodir / "etc" / "grid" / "config.xml"


@pytest.fixture
def slow_app(tmp_path):
    """An app that takes a while to load in gunicorn's workers (and loads at once elsewhere)."""
    root = tmp_path / "apps"
    (root / "slow_app").mkdir(parents=True)
    (root / "slow_app" / "__init__.py").write_text(
        "import sys, time\nif sys.argv[0].endswith('gunicorn/__main__.py'):\n    time.sleep(10)\n")
    return root


def test_old_workers_recycling_during_a_failed_reload_keep_the_old_config(daemon, slow_app):
    # Every request recycles a worker: the old master respawns workers all
    # through the reload, and each new one reads the config as it is then.
    daemon.extra_env["PYTHONPATH"] = str(slow_app)
    settings = "watch_config = false\nready_timeout = 90"
    recycle = '"application_server.max_requests" = 1\n'
    daemon.write_config(workers=2, daemon=settings, omero=f'login_logo = "{OLD_LOGO}"\n' + recycle)
    daemon.start()
    before = daemon.status()["generation"]
    assert OLD_LOGO in view_xml(daemon, before["number"]).read_text()
    site_before = site_xml(daemon).read_bytes()
    # A worker that loads OMERO.web for every request is slow on a loaded machine: a slow answer is not a failure.
    with Load(daemon.port, clients=2, timeout=180) as load:
        load.wait_requests(3, timeout=120)
        # The new generation loads slow_app (10 s) before Django imports the
        # middleware and the worker fails: a long overlap, old workers recycling all through it.
        daemon.write_config(workers=2, daemon=settings, omero=f'login_logo = "{NEW_LOGO}"\n' + recycle
                            + 'apps = ["slow_app"]\n' + MISSING_MIDDLEWARE)
        served = load.ok
        out = daemon.ctl("reload")
        respawned = load.ok - served  # each request served ended its worker, and the old master forked another
        assert out.returncode == 2, out.stdout + out.stderr
        assert "rolled back" in out.stdout
        load.wait_requests(3, timeout=120)  # the old master is alive and keeps respawning workers
    assert load.refused == 0
    assert load.failed == []
    # max_requests = 1: every answer came from a worker the old master had just forked.
    assert respawned >= 2, "the old generation served nothing while the new one was booting"
    state = daemon.status()
    assert state["serving"] and state["generation"]["master_pid"] == before["master_pid"]
    # Fresh workers (max_requests = 1: each of these requests is served by one) show the old config.
    for _ in range(3):
        status, body = http_get(daemon.port, timeout=60)
        assert status == 200 and OLD_LOGO.encode() in body and NEW_LOGO.encode() not in body
    # The failed generation's view is gone with it; the site's file was never touched.
    assert sorted(p.name for p in daemon.runtime_dir.glob("gen-*")) == [f"gen-{before['number']}"]
    assert site_xml(daemon).read_bytes() == site_before


def test_each_generation_has_its_own_view_and_the_site_file_follows_at_cutover(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false", omero=f'login_logo = "{OLD_LOGO}"\n')
    daemon.start()
    first = daemon.status()["generation"]["number"]
    view = view_xml(daemon, first).parent.parent.parent
    assert (view / "var").resolve() == (daemon.omerodir / "var").resolve()  # logs and the secret key are the site's
    assert OLD_LOGO in site_xml(daemon).read_text()

    daemon.write_config(workers=1, daemon="watch_config = false", omero=f'login_logo = "{NEW_LOGO}"\n')
    out = daemon.ctl("reload")
    assert out.returncode == 0, out.stdout + out.stderr
    second = daemon.status()["generation"]["number"]
    assert NEW_LOGO in view_xml(daemon, second).read_text()
    assert NEW_LOGO in site_xml(daemon).read_text()  # what `omero config get` shows is what serves
    assert NEW_LOGO.encode() in http_get(daemon.port)[1]
    wait_for(lambda: not view.exists(), 60, "the retired generation's view to be removed")
    assert (daemon.omerodir / "var").is_dir()  # removing the view left the site's var alone


def test_nginx_follows_a_prefix_change_only_once_the_new_generation_serves(daemon, front, slow_app):
    daemon.extra_env["PYTHONPATH"] = str(slow_app)
    old = 'prefix = "/omero"\nstatic_url = "/omero/static/"\n'
    daemon.save(site_config(daemon, front, old))
    front.start()
    daemon.start()
    wait_for(lambda: answers(front.port, "/omero/webclient/login/"), 30, "the login page under /omero")
    location = daemon.root / "state" / "nginx" / "omero-web-location.include"
    written = location.read_bytes()
    first = daemon.status()["generation"]["number"]

    daemon.save(site_config(daemon, front, 'prefix = "/web"\nstatic_url = "/web/static/"\napps = ["slow_app"]\n'))
    result = {}
    reloading = threading.Thread(target=lambda: result.setdefault("out", daemon.ctl("reload")))
    reloading.start()
    try:
        wait_for(lambda: any(g["state"] == "booting" for g in daemon.status()["generations"]), 120,
                 "the new generation to boot")
        # nginx -t has passed on the new files, but nginx still has the old ones and routes the old prefix.
        assert location.read_bytes() == written
        for _ in range(5):
            assert answers(front.port, "/omero/webclient/login/") is not None
        assert daemon.status()["generation"]["number"] == first
    finally:
        reloading.join(300)
    out = result["out"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "location /web {" in location.read_text()
    wait_for(lambda: answers(front.port, "/web/webclient/login/"), 30, "the login page under /web")
    assert answers(front.port, "/omero/webclient/login/", 404) is not None

