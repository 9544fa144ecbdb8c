"""Safe reload under load, with real OMERO.web and real gunicorn (issue 3)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Load, free_port, http_get, wait_for

pytestmark = pytest.mark.omeroweb

LOGO = "/static/webclient/image/custom_login_logo.png"


@pytest.fixture
def apps(tmp_path):
    """Apps on the daemon's PYTHONPATH that break in gunicorn's workers (and one that breaks everywhere)."""
    root = tmp_path / "apps"
    in_gunicorn = "import sys, time\nif sys.argv[0].endswith('gunicorn/__main__.py'):\n"
    for name, body in {
        "broken_app": in_gunicorn + "    raise RuntimeError('this app is broken on purpose')\n",
        "stuck_app": in_gunicorn + "    time.sleep(3600)\n",
        "broken_everywhere_app": "raise RuntimeError('this app is broken on purpose')\n",
    }.items():
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(body)
    return root


def reload(daemon, *args):
    out = daemon.ctl("reload", *args)
    return out.returncode, out.stdout + out.stderr


def test_reloads_under_load_lose_no_request(daemon):
    daemon.write_config(workers=2, daemon="watch_config = false")
    daemon.start()
    with Load(daemon.port, clients=6) as load:
        load.wait_requests(30)
        for i, workers in enumerate([3, 1, 4, 2]):
            logo = f"/static/logo-{i}.png"
            daemon.write_config(workers=workers, daemon="watch_config = false", omero=f'login_logo = "{logo}"\n')
            code, out = reload(daemon)
            assert code == 0, out
            assert "applied" in out
            state = daemon.status()
            assert len(state["generation"]["worker_pids"]) == workers
            # The change is what the page shows now, on every worker.
            for _ in range(workers * 3):
                assert logo.encode() in http_get(daemon.port)[1]
            load.wait_requests(30)
    assert load.refused == 0
    assert load.failed == []
    assert load.ok > 100
    assert daemon.status()["generation"]["number"] == 5


def test_rejected_configs_leave_the_running_generation_alone(daemon):
    daemon.write_config(workers=2, daemon="watch_config = false")
    daemon.start()
    before = daemon.status()["generation"]
    good = daemon.config_path.read_text()
    with Load(daemon.port, clients=4) as load:
        load.wait_requests(10)
        for broken in (
            good + "[omero.web.x\n",  # TOML syntax
            good + 'debug = "sometimes"\n',  # a wrong type for OMERO.web
            good + 'apps = ["no_such_app"]\n',  # an app that is not installed
            good.replace("graceful_timeout", "graceful_timout"),  # not a daemon setting
        ):
            daemon.save(broken)
            code, out = reload(daemon)
            assert code == 1, out
            assert "rejected" in out
            assert daemon.status()["generation"]["master_pid"] == before["master_pid"]
            load.wait_requests(5)
    assert load.refused == 0 and load.failed == []


@pytest.mark.parametrize("app, why", [
    ("broken_app", "exited"),  # a worker fails to boot
    ("stuck_app", "not ready after"),  # workers never finish loading
    ("broken_everywhere_app", "collectstatic failed"),  # caught before gunicorn starts
])
def test_a_generation_that_fails_is_rolled_back(daemon, apps, app, why):
    daemon.extra_env["PYTHONPATH"] = str(apps)
    daemon.write_config(workers=2, daemon="ready_timeout = 8\nwatch_config = false")
    daemon.start()
    before = daemon.status()["generation"]
    xml = (daemon.omerodir / "etc" / "grid" / "config.xml").read_bytes()
    with Load(daemon.port, clients=4) as load:
        load.wait_requests(10)
        daemon.write_config(workers=2, daemon="ready_timeout = 8\nwatch_config = false", omero=f'apps = ["{app}"]\n')
        code, out = reload(daemon)
        assert code == 2, out
        assert "rolled back" in out and why in out
        load.wait_requests(10)
    assert load.refused == 0 and load.failed == []
    state = daemon.status()
    assert state["generation"]["master_pid"] == before["master_pid"]
    assert state["last_reload"]["outcome"] == "rolled back"
    if app == "stuck_app":  # systemd was told, while it waited, that the reload is still under way
        assert any("EXTEND_TIMEOUT_USEC" in f for _, f in daemon.notify.messages)
    assert (daemon.omerodir / "etc" / "grid" / "config.xml").read_bytes() == xml
    # The failed generation is gone: only the serving master and its workers remain.
    wait_for(lambda: len(daemon.gunicorn_pids()) == 3, 30, "the failed generation's processes to go")


def _wait_reloads(daemon, n):
    return wait_for(lambda: (s := daemon.status())["reloads"] >= n and s["state"] == "serving" and s, 60,
                    f"{n} reload(s)")


def _settled(daemon, n):
    """After the debounce, nothing more happens: exactly ``n`` reloads ran."""
    time.sleep(1.5)  # several debounce periods: a second reload would have started by now
    assert daemon.status()["reloads"] == n


def test_editor_save_delete_recreate_and_bursts_each_reload_once(daemon):
    daemon.write_config(workers=1)
    daemon.start()
    assert daemon.status()["reloads"] == 0

    daemon.write_config(workers=2)  # editor-style: temp file + rename
    state = _wait_reloads(daemon, 1)
    assert state["last_reload"]["source"] == "file change"
    _settled(daemon, 1)
    assert len(daemon.status()["generation"]["worker_pids"]) == 2

    text = daemon.config_path.read_text().replace("wsgi_workers = 2", "wsgi_workers = 1")
    daemon.config_path.unlink()  # delete and recreate
    daemon.config_path.write_text(text)
    _wait_reloads(daemon, 2)
    _settled(daemon, 2)

    for i in range(10):  # a burst of saves: only the final content is applied
        daemon.config_path.write_text(text.replace("wsgi_workers = 1", f"wsgi_workers = {2 + i % 3}"))
    state = _wait_reloads(daemon, 3)
    _settled(daemon, 3)
    assert state["last_reload"]["changes"] == ["omero.web.wsgi_workers"]
    assert len(daemon.status()["generation"]["worker_pids"]) == 2 + 9 % 3

    daemon.save(daemon.config_path.read_text())  # same bytes: nothing to do, no reload
    _settled(daemon, 3)


def test_sighup_reloads(daemon):
    # The watcher is off: only the SIGHUP can apply the change (and the reload says it was the SIGHUP).
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    daemon.save(daemon.config_path.read_text() + 'login_logo = "/static/hup.png"\n')
    assert b"/static/hup.png" not in http_get(daemon.port)[1]
    os.kill(daemon.proc.pid, signal.SIGHUP)
    state = wait_for(lambda: (s := daemon.status())["reloads"] >= 1 and s["state"] == "serving" and s, 60,
                     "the SIGHUP reload")
    assert state["reloads"] == 1 and state["last_reload"]["source"] == "SIGHUP", state["last_reload"]
    assert state["last_reload"]["exit_code"] == 0 and state["last_reload"]["changes"] == ["omero.web.login_logo"]
    assert b"/static/hup.png" in http_get(daemon.port)[1]


def test_dry_run_says_what_would_change_and_changes_nothing(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    master = daemon.status()["generation"]["master_pid"]
    code, out = reload(daemon, "--dry-run")
    assert code == 0 and "nothing to do" in out
    daemon.write_config(workers=2, daemon="watch_config = false")
    code, out = reload(daemon, "--dry-run")
    assert code == 0, out
    assert "would start a new gunicorn generation" in out and "changed: omero.web.wsgi_workers" in out
    assert daemon.status()["generation"]["master_pid"] == master
    assert daemon.status()["reloads"] == 0


def test_a_change_that_needs_a_restart_is_refused(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    master = daemon.status()["generation"]["master_pid"]
    daemon.save(daemon.config_path.read_text().replace(str(daemon.root / "state"), str(daemon.root / "state2")))
    code, out = reload(daemon)
    assert code == 4, out
    assert "restart required" in out and "daemon.state_dir" in out
    assert daemon.status()["generation"]["master_pid"] == master


def test_no_wait_returns_at_once_and_the_reload_still_happens(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    daemon.config_path.write_text(daemon.config_path.read_text().replace("wsgi_workers = 1", "wsgi_workers = 2"))
    out = daemon.ctl("reload", "--no-wait")
    assert out.returncode == 0 and "accepted" in out.stdout
    wait_for(lambda: len(daemon.status()["generation"]["worker_pids"]) == 2 and daemon.status()["state"] == "serving",
             60, "the new generation")


def test_rebind_when_the_daemon_owns_its_sockets(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    new_port = free_port()
    daemon.save(daemon.config_path.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{new_port}"))
    code, out = reload(daemon)
    assert code == 0, out
    assert http_get(new_port)[0] == 200
    wait_for(lambda: _refused(daemon.port), 30, "the old address to be released")


def test_reload_is_reported_to_systemd(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    mark = len(daemon.notify.messages)
    daemon.save(daemon.config_path.read_text().replace("wsgi_workers = 1", "wsgi_workers = 2"))
    code, _ = reload(daemon)
    assert code == 0
    reloading = daemon.notify.wait("RELOADING", "1", after=mark)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    ready = daemon.notify.wait("READY", "1", after=mark)
    assert "last reload: applied" in ready["STATUS"]


def _refused(port: int) -> bool:
    try:
        http_get(port, timeout=2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # queued on the socket as it was closed
        return False
    except TimeoutError:  # queued while the retiring master no longer accepts: not released yet
        return False
    return False


def test_upgrade_of_the_venv_reruns_collectstatic(daemon, tmp_path):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    assert daemon.log().count("collecting static files") == 1
    # What `pip install -U` does to the venv, as far as the daemon can tell: a
    # dist-info changes. Touching one is that, without changing the shared venv.
    site = next(daemon.venv.glob("lib/python3*/site-packages"))
    marker = site / "omerowebd_test_marker-1.0.dist-info"
    marker.mkdir()
    try:
        code, out = reload(daemon)
        assert code == 0 and "new generation" in out, out
        assert daemon.log().count("collecting static files") == 2
    finally:
        marker.rmdir()

