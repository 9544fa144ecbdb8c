"""The core daemon against real OMERO.web and real gunicorn (issue 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import Load, free_port, http_get, wait_for

pytestmark = pytest.mark.omeroweb


def test_ready_only_once_the_login_page_answers(daemon):
    daemon.write_config(workers=2)
    daemon.start(wait=False)
    ready = daemon.notify.wait("READY", "1", timeout=120)
    # READY means served: the page answers now, with every worker up.
    status, body = http_get(daemon.port)
    assert status == 200 and b"OMERO.web - Login" in body
    state = daemon.status()
    assert state["serving"] and len(state["generation"]["worker_pids"]) == 2
    assert "generation 1" in ready["STATUS"] and f"127.0.0.1:{daemon.port}" in ready["STATUS"]
    # Nothing claimed readiness before: the first READY is the one that counts.
    readies = [f for _, f in daemon.notify.messages if f.get("READY") == "1"]
    assert len(readies) == 1
    # Gunicorn never saw the daemon's notify socket: it would have sent its own READY.
    for pid in daemon.gunicorn_pids():
        assert b"NOTIFY_SOCKET" not in open(f"/proc/{pid}/environ", "rb").read()


def test_status_and_check_commands(daemon):
    daemon.write_config(workers=2)
    daemon.start()
    out = daemon.ctl("status")
    assert out.returncode == 0, out.stderr
    assert "serving" in out.stdout and f"127.0.0.1:{daemon.port}" in out.stdout
    state = daemon.ctl("status", "--json")
    assert '"master_pid"' in state.stdout and '"worker_pids"' in state.stdout
    check = daemon.ctl("check")
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout


def test_config_xml_is_what_omero_py_reads(daemon):
    daemon.write_config(omero="""
        prefix = "/omero"
        "application_server.max_requests" = 100
        public.enabled = true
        ui.top_links = [["Data", "webindex", {title = "Browse Data via Projects, Tags etc"}]]
        login_redirect = {redirect = ["webindex"], viewname = "load_template", args = ["userdata"]}
        """)
    daemon.start()
    path = daemon.omerodir / "etc" / "grid" / "config.xml"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    read = subprocess.run(
        [str(daemon.venv / "bin" / "python"), "-c",
         "import json, sys, omero.config; c = omero.config.ConfigXml(sys.argv[1], read_only=True);"
         " print(json.dumps(c.as_map())); c.close()", str(path)],
        capture_output=True, text=True, check=True,
    )
    props = __import__("json").loads(read.stdout)
    assert props["omero.web.prefix"] == "/omero"
    assert props["omero.web.application_server.max_requests"] == "100"
    assert props["omero.web.public.enabled"] == "true"
    assert props["omero.web.ui.top_links"] == '[["Data", "webindex", {"title": "Browse Data via Projects, Tags etc"}]]'
    assert props["omero.web.login_redirect"] == '{"redirect": ["webindex"], "viewname": "load_template", "args": ["userdata"]}'
    assert props["omero.web.wsgi_workers"] == "2"
    # Sessions are pinned to the state dir, so they survive a restart under PrivateTmp=.
    assert str(daemon.root / "state" / "sessions") in props["omero.web.django_additional_settings"]
    # SCRIPT_NAME follows the prefix: the login page is served under it.
    assert http_get(daemon.port, "/omero/webclient/login/")[0] == 200


def test_collectstatic_runs_only_when_the_venv_changed(daemon):
    daemon.write_config()
    daemon.start()
    assert (daemon.omerodir / "var" / "static" / "webclient").is_dir()
    assert daemon.log().count("collecting static files") == 1
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.log().count("collecting static files") == 1  # same venv, same settings: not again


def test_socket_activation(daemon):
    daemon.write_config()
    activate = ["systemd-socket-activate", "-l", f"127.0.0.1:{daemon.port}", "--fdname=web",
                "-E", "NOTIFY_SOCKET", "-E", "PYTHONUNBUFFERED",
                sys.executable, "-m", "omerowebd", "--config", str(daemon.config_path)]
    # The daemon's own bind is ignored when systemd passes sockets: point it elsewhere to prove it.
    text = daemon.config_path.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{free_port()}")
    daemon.save(text)
    daemon.start(command=activate, wait=False)
    wait_for(lambda: _listening(daemon.port), 30, "systemd-socket-activate to listen")
    # It starts the daemon on the first connection, which waits in the backlog and is then served.
    status, _ = http_get(daemon.port, timeout=120)
    assert status == 200
    state = daemon.wait_serving()
    assert state["sockets"] == [{"address": f"127.0.0.1:{daemon.port}", "origin": "systemd", "name": "web"}]


def test_killed_master_is_replaced_without_refusing_connections(daemon):
    daemon.write_config(workers=2)
    daemon.start()
    first = daemon.status()["generation"]
    with Load(daemon.port, clients=3) as load:
        load.wait_requests(20)
        os.kill(first["master_pid"], signal.SIGKILL)
        state = wait_for(lambda: (s := daemon.status())["serving"] and s["generation"]["number"] != first["number"] and s,
                         60, "a new generation after the crash")
        load.wait_requests(20)
    assert load.refused == 0
    assert state["crashes"] == 1
    assert state["generation"]["master_pid"] != first["master_pid"]
    # Orphaned workers of the dead master finish and leave.
    wait_for(lambda: not any(_alive(p) for p in first["worker_pids"]), 60, "the old workers to exit")


def test_a_master_that_keeps_dying_is_restarted_with_backoff(daemon, tmp_path):
    flag = tmp_path / "break-it"
    (tmp_path / "apps" / "flaky_app").mkdir(parents=True)
    (tmp_path / "apps" / "flaky_app" / "__init__.py").write_text(
        f"import os, sys\nif sys.argv[0].endswith('gunicorn/__main__.py') and os.path.exists({str(flag)!r}):\n"
        "    raise RuntimeError('broken on purpose')\n")
    daemon.extra_env["PYTHONPATH"] = str(tmp_path / "apps")
    daemon.write_config(workers=1, omero='apps = ["flaky_app"]\n')
    daemon.start()
    first = daemon.status()["generation"]
    flag.touch()
    mark = len(daemon.notify.messages)
    os.kill(first["master_pid"], signal.SIGKILL)
    # Each new master fails to boot; the waits between attempts double.
    daemon.notify.wait("STATUS", contains="restarting in 1s", after=mark, timeout=60)
    daemon.notify.wait("STATUS", contains="restarting in 2s", after=mark, timeout=60)
    failing = daemon.status()
    assert not failing["serving"] and failing["state"] == "restarting"
    assert failing["last_crash"]["exit_status"] == -9 and "after a failed attempt" in failing["last_crash"]["restart"]
    assert "exited with status -9, restart in" in daemon.ctl("status").stdout
    flag.unlink()
    state = wait_for(lambda: (s := daemon.status())["serving"] and s, 60, "serving again")
    assert state["generation"]["number"] > first["number"] + 2
    assert http_get(daemon.port)[0] == 200
    assert "restarted after gunicorn exited" in daemon.notify.wait("STATUS", contains="restarted", after=mark)["STATUS"]


def test_a_reload_can_fix_what_keeps_the_master_dying(daemon, tmp_path):
    (tmp_path / "apps" / "flaky_app").mkdir(parents=True)
    (tmp_path / "apps" / "flaky_app" / "__init__.py").write_text(
        f"import os, sys\nif sys.argv[0].endswith('gunicorn/__main__.py') and os.path.exists({str(tmp_path / 'x')!r}):\n"
        "    raise RuntimeError('broken on purpose')\n")
    (tmp_path / "x").touch()  # broken from the next boot on
    daemon.extra_env["PYTHONPATH"] = str(tmp_path / "apps")
    daemon.write_config(workers=1, omero='apps = ["flaky_app"]\n', daemon="watch_config = false")
    with pytest.raises(AssertionError, match="exited with 1"):  # the first start fails: exit 1, no READY
        daemon.start()
    (tmp_path / "x").unlink()
    daemon.start()
    (tmp_path / "x").touch()
    mark = len(daemon.notify.messages)
    os.kill(daemon.status()["generation"]["master_pid"], signal.SIGKILL)
    daemon.notify.wait("STATUS", contains="restarting in 2s", after=mark, timeout=60)
    daemon.write_config(workers=1, daemon="watch_config = false")  # the admin drops the app
    out = daemon.ctl("reload")
    assert out.returncode == 0, out.stdout + out.stderr
    state = daemon.status()
    assert state["serving"] and http_get(daemon.port)[0] == 200
    time.sleep(5)  # past the next backoff attempt: the crash loop must have stood down
    assert daemon.status()["generation"]["number"] == state["generation"]["number"]


def test_sigterm_stops_everything_and_exits_0(daemon):
    daemon.write_config(workers=2)
    daemon.start()
    assert daemon.gunicorn_pids()
    assert daemon.stop() == 0
    assert daemon.gunicorn_pids() == []
    assert any(f.get("STOPPING") == "1" for _, f in daemon.notify.messages)
    assert not (daemon.runtime_dir / "control.sock").exists()


def test_sigkill_of_the_daemon_leaves_no_gunicorn(daemon):
    daemon.write_config(workers=2)
    daemon.start()
    assert daemon.gunicorn_pids()
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: daemon.gunicorn_pids() == [], 60, "every gunicorn process to exit")


def test_restart_after_sigkill_reuses_the_runtime_dir(daemon):
    daemon.write_config()
    daemon.start()
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: daemon.gunicorn_pids() == [], 60, "gunicorn to exit")
    daemon.start()  # stale control and event sockets are replaced
    assert http_get(daemon.port)[0] == 200


def test_watchdog_pings_only_while_healthy(daemon):
    daemon.write_config(workers=1)
    daemon.extra_env["WATCHDOG_USEC"] = "1500000"
    daemon.start(wait=False)
    # WATCHDOG_PID must match the daemon; set after spawn is impossible, so none is given (all pids match).
    daemon.notify.wait("READY", "1", timeout=120)
    count = len(daemon.notify.messages)
    daemon.notify.wait("WATCHDOG", "1", timeout=10, after=count)
    generation = daemon.status()["generation"]
    hung = [generation["master_pid"], *generation["worker_pids"]]
    for pid in hung:  # a hung OMERO.web: nothing answers, so no ping
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # let a probe already under way finish
        mark = len(daemon.notify.messages)
        with pytest.raises(AssertionError):
            daemon.notify.wait("WATCHDOG", "1", timeout=3, after=mark)
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    mark = len(daemon.notify.messages)
    daemon.notify.wait("WATCHDOG", "1", timeout=10, after=mark)


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in f.readlines()[1:])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return ") Z " not in f.read()
    except OSError:
        return False
