"""Settle and revert, and the Prometheus metrics, on real OMERO.web and gunicorn (issue 13).

A reload brings up a generation with an app whose workers die after every response once armed (see
apps/omerowebd_crash_after_response); the test arms it as soon as that generation serves. The daemon,
watching the new generation for daemon.settle_seconds, sees the crash loop, brings the previous config
back (a new generation from it), and reports the reload as reverted; not one request of a steady load
fails meanwhile. The metrics, scraped over HTTP, move with what happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import Load, free_port, wait_for

from omerowebd.omero_config import config_xml_path, read_config_xml

pytestmark = pytest.mark.omeroweb

APP = "omerowebd_crash_after_response"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_a_crash_looping_reload_is_reverted_with_no_failed_request_and_the_metrics_follow(daemon, tmp_path):
    apps = tmp_path / "apps"
    shutil.copytree(Path(__file__).with_name("apps") / APP, apps / APP)
    armed = apps / APP / "armed"
    daemon.extra_env["PYTHONPATH"] = str(apps)
    mport = free_port()
    settings = f'watch_config = false\nsettle_seconds = 30\nmetrics = "127.0.0.1:{mport}"'
    daemon.write_config(workers=2, daemon=settings)
    daemon.start()
    good_digest = daemon.status()["config"]["digest"]
    before = scrape(mport)
    assert before["omerowebd_generation"] == 1 and before["omerowebd_workers"] == 2
    assert before['omerowebd_reloads_total{outcome="reverted"}'] == 0
    assert f"metrics:     http://127.0.0.1:{mport}/metrics\n" in daemon.ctl("status").stdout

    # Clients wait as long as a revert may take: the point is that none fails, not how fast.
    with Load(daemon.port, clients=4, timeout=120) as load:
        load.wait_requests(20)
        daemon.write_config(workers=2, daemon=settings, omero=f'apps = ["{APP}"]\n')
        reply: dict[str, subprocess.CompletedProcess[str]] = {}
        asking = threading.Thread(target=lambda: reply.setdefault("out", daemon.ctl("reload")))
        asking.start()
        # The crash loop begins once the new generation serves (the reload is still settling).
        wait_for(lambda: (daemon.status().get("generation") or {}).get("number") == 2, 180,
                 "the new generation to serve")
        armed.touch()
        asking.join(300)
        out = reply["out"]
        assert out.returncode == 5, out.stdout + out.stderr
        assert out.stdout.startswith("reverted: "), out.stdout
        # A crash loop shows as deaths, or (while the replacements still boot) as probes nothing answers.
        assert "gunicorn workers died" in out.stdout or "health probe failed" in out.stdout, out.stdout
        assert "previous config serves again" in out.stdout, out.stdout
        load.wait_requests(20)  # and the site serves on, from the previous config
    assert load.refused == 0 and load.failed == [], load.failed

    status = daemon.status()
    assert status["last_reload"]["outcome"] == "reverted" and status["last_reload"]["exit_code"] == 5
    assert status["generation"]["number"] == 3 and status["generation"]["worker_faults"] == 0
    assert status["config"]["digest"] == good_digest  # what runs is the previous config; the TOML is as edited
    assert APP not in read_config_xml(config_xml_path(daemon.omerodir)).get("omero.web.apps", "")
    assert "did not settle" in daemon.log() and "reverted" in daemon.log()
    assert "reverted (omerowebctl, " in daemon.ctl("status").stdout
    # The TOML still holds the change: a reload of it would try again.
    dry = daemon.ctl("reload", "--dry-run")
    assert dry.returncode == 0 and "would start a new gunicorn generation" in dry.stdout, dry.stdout

    after = scrape(mport)
    assert after['omerowebd_reloads_total{outcome="reverted"}'] == 1
    assert after['omerowebd_reloads_total{outcome="applied"}'] == 0
    assert after["omerowebd_worker_deaths_total"] >= 2
    assert after["omerowebd_generation"] == 3 and after["omerowebd_serving"] == 1
    assert after["omerowebd_last_reload_duration_seconds"] > 0

    # A killed worker moves the death count; a sweep moves the sweep metrics.
    deaths = after["omerowebd_worker_deaths_total"]
    os.kill(status["generation"]["worker_pids"][0], signal.SIGKILL)
    wait_for(lambda: scrape(mport)["omerowebd_worker_deaths_total"] == deaths + 1, 60, "the death to be counted")
    # The start's own sweep ([sessions] at_start) may still run, under load long after the start:
    # counted from when it is done, so the clear below is the one sweep more.
    def start_sweep_done() -> bool:
        sweeper = daemon.status().get("sessions") or {}
        return sweeper.get("sweeps", 0) >= 1 and sweeper.get("running") is None
    wait_for(start_sweep_done, 180, "the start's session sweep to end")
    sweeps = scrape(mport).get("omerowebd_session_sweeps_total", 0)
    swept = daemon.ctl("sessions", "clear")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    now = scrape(mport)
    assert now["omerowebd_session_sweeps_total"] == sweeps + 1
    assert "omerowebd_last_session_sweep_duration_seconds" in now
    assert 'omerowebd_last_session_sweep_sessions{result="deleted"}' in now

    # A reload that settles is applied (and says how it settled); the root publisher is told only then.
    settled = f'watch_config = false\nsettle_seconds = 2\nmetrics = "127.0.0.1:{mport}"'
    daemon.write_config(workers=2, daemon=settled, omero='login_logo = "/static/settled.png"\n')
    applied = daemon.ctl("reload")
    assert applied.returncode == 0 and applied.stdout.startswith("applied: new generation serving"), applied.stdout
    assert daemon.status()["last_reload"]["settle"]["settled"] is True
    settled_metrics = scrape(mport)
    assert settled_metrics['omerowebd_reloads_total{outcome="applied"}'] == 1
    # A window that settles has probed at least once (a crash loop may end the window before
    # its first probe), and every probe is timed.
    assert (settled_metrics["omerowebd_health_probe_duration_seconds_count"]
            > after["omerowebd_health_probe_duration_seconds_count"])

    # A killed master is restarted, and counted.
    os.kill(daemon.status()["generation"]["master_pid"], signal.SIGKILL)
    wait_for(lambda: scrape(mport)["omerowebd_master_restarts_total"] == 1, 60, "the crash to be counted")
    daemon.wait_serving()

    # A reload that changes only daemon settings applies at once: counted, and the endpoint moves with it.
    mport2 = free_port()
    daemon.write_config(workers=2, daemon=f'watch_config = false\nsettle_seconds = 2\nmetrics = "127.0.0.1:{mport2}"',
                        omero='login_logo = "/static/settled.png"\n')
    live = daemon.ctl("reload")
    assert live.returncode == 0 and "applied without a new generation" in live.stdout, live.stdout
    assert scrape(mport2)['omerowebd_reloads_total{outcome="applied"}'] == 2
    with pytest.raises(OSError):
        scrape(mport)
