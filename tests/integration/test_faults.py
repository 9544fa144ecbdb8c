"""Faults an OMERO.web host meets, each with a defined outcome (issue 11).

For each: what is done to the running daemon, what must hold after (the site
serves, or comes back by itself), the one line the daemon logs about it and
what `omerowebctl status` shows. Faults already covered elsewhere are not
repeated here: a killed master and crash-restart backoff (test_daemon.py), a
venv that vanishes as the master dies (test_bad_input.py), a generation that
fails to boot (test_reload.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import Daemon, Load, free_port, http_get, shadow_venv, wait_for

from integration.redis_server import Redis

pytestmark = pytest.mark.omeroweb


def reload(daemon, *args):
    out = daemon.ctl(*args, "reload")
    return out.returncode, out.stdout + out.stderr


# -- the daemon itself --------------------------------------------------------


def test_a_second_daemon_is_refused_and_a_killed_one_is_reported_by_the_next(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    before = daemon.status()
    sockets = {name: os.stat(daemon.runtime_dir / name).st_ino for name in ("control.sock", "events.sock")}
    other = daemon.root / "other.toml"
    for port in (free_port(), daemon.port):  # its own port, or the same one: refused before it binds either
        other.write_text(daemon.config_path.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{port}"))
        second = subprocess.run([sys.executable, "-m", "omerowebd", "--config", str(other)],
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert second.returncode == 75, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"another omerowebd (pid {daemon.proc.pid}) is already running on {daemon.runtime_dir}" in lines[0]
    # The first one's sockets are the ones it made, and it still hears its generations.
    assert {name: os.stat(daemon.runtime_dir / name).st_ino for name in sockets} == sockets
    daemon.save(daemon.config_path.read_text().replace("wsgi_workers = 1", "wsgi_workers = 2"))
    code, out = reload(daemon)
    assert code == 0 and "new generation serving" in out, out
    after = daemon.status()
    assert after["pid"] == before["pid"] and len(after["generation"]["worker_pids"]) == 2
    assert http_get(daemon.port)[0] == 200

    # Killed outright: its gunicorns follow it (PR_SET_PDEATHSIG), the kernel drops its
    # lock, and the next daemon says the last one did not stop cleanly.
    killed = daemon.proc.pid
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: daemon.gunicorn_pids() == [], 60, "the orphaned gunicorns to exit")
    daemon.start()
    assert http_get(daemon.port)[0] == 200
    lines = [line for line in daemon.log().splitlines() if "did not stop cleanly" in line]
    assert len(lines) == 1 and str(killed) in lines[0], lines
    assert daemon.stop() == 0
    daemon.start()  # after a clean stop: nothing to report
    assert daemon.log().count("did not stop cleanly") == 1


# -- gunicorn's workers ---------------------------------------------------------


def test_workers_that_die_or_hang_are_replaced_and_said_once_and_recycling_is_not_a_fault(daemon, tmp_path):
    flag = tmp_path / "hang-at-boot"
    (tmp_path / "apps" / "boot_hang_app").mkdir(parents=True)
    (tmp_path / "apps" / "boot_hang_app" / "__init__.py").write_text(
        f"import os, sys, time\nif sys.argv[0].endswith('gunicorn/__main__.py') and os.path.exists({str(flag)!r}):\n"
        "    time.sleep(3600)  # a hung NFS mount, an app waiting on the network at import\n")
    daemon.extra_env["PYTHONPATH"] = str(tmp_path / "apps")
    daemon.write_config(workers=2, daemon="watch_config = false\nready_timeout = 40",
                        omero='wsgi_timeout = 20\n"application_server.max_requests" = 30\napps = ["boot_hang_app"]\n')
    daemon.start()
    # No load until the end: no worker is on its way out (max_requests) when one is picked.
    _wait_all_ready(daemon)
    victim = daemon.status()["generation"]["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)  # the OOM killer, an admin's kill -9
    state = wait_for(lambda: (s := daemon.status())["generation"]["worker_faults"] == 1 and s, 60,
                     "the daemon to count the killed worker")
    assert state["generation"]["last_worker_fault"]["pid"] == victim

    _wait_all_ready(daemon)
    hung = daemon.status()["generation"]["worker_pids"][0]
    os.kill(hung, signal.SIGSTOP)  # stuck in a call that never returns
    try:
        state = wait_for(lambda: (s := daemon.status())["generation"]["worker_faults"] == 2 and s, 120,
                         "gunicorn to kill the hung worker after wsgi_timeout")
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert state["generation"]["last_worker_fault"]["pid"] == hung
    assert "hung past omero.web.wsgi_timeout" in state["generation"]["last_worker_fault"]["why"]

    # A worker that hangs while loading the app: gunicorn's timeout does not
    # cover it, so the daemon gives it daemon.ready_timeout and kills it.
    _wait_all_ready(daemon)
    flag.touch()
    os.kill(daemon.status()["generation"]["worker_pids"][0], signal.SIGKILL)  # fault 3; its replacement hangs
    try:
        state = wait_for(lambda: (s := daemon.status())["generation"]["worker_faults"] == 4 and s, 180,
                         "the daemon to kill the worker stuck loading the app")
    finally:
        flag.unlink()
    assert "hung while loading OMERO.web for more than 40s" in state["generation"]["last_worker_fault"]["why"]

    _wait_all_ready(daemon)
    with Load(daemon.port, clients=3) as load:
        load.wait_requests(100, timeout=180)  # every worker is recycled by max_requests at least once
    assert load.refused == 0 and load.failed == []
    state = daemon.status()
    assert state["generation"]["worker_faults"] == 4  # recycling is no fault
    # The master never left: the same generation served throughout.
    assert state["generation"]["number"] == 1 and state["crashes"] == 0
    lines = [line for line in daemon.log().splitlines() if "gunicorn worker" in line]
    assert len(lines) == 4, lines
    assert "died" in lines[0] and str(victim) in lines[0] and "gunicorn starts another" in lines[0]
    assert "hung past omero.web.wsgi_timeout" in lines[1] and str(hung) in lines[1]
    assert "died" in lines[2] and "hung while loading OMERO.web" in lines[3]
    shown = daemon.ctl("status").stdout
    assert "4 worker(s) lost and replaced" in shown and "hung while loading" in shown


def _wait_all_ready(daemon):
    """Every worker has loaded OMERO.web (gunicorn's timeout watches a worker only from then on)."""
    def ready():
        g = daemon.status()["generation"]
        return len(g["worker_pids"]) == g["workers"] == g["ready_workers"]
    wait_for(ready, 120, "every worker to have loaded the app")


# -- the config file --------------------------------------------------------------


def test_config_file_removed_or_replaced_by_a_directory_keeps_the_running_config(daemon):
    """Unreadable for the service user takes the same path as a directory (an OSError on
    read); as root no mode makes a file unreadable, so the directory stands for both here."""
    daemon.write_config(workers=1)
    daemon.start()
    master = daemon.status()["generation"]["master_pid"]
    text = daemon.config_path.read_text()

    # With the file gone omerowebctl cannot read where the socket is (under systemd it is the default).
    sock = ("--socket", str(daemon.runtime_dir / "control.sock"))
    daemon.config_path.unlink()
    state = wait_for(lambda: (s := daemon.status())["config"]["problem"] and s, 30, "status to say the file is gone")
    assert state["config"]["problem"] == "removed"
    assert "the file is removed: the running config keeps serving" in daemon.ctl(*sock, "status").stdout
    code, out = reload(daemon, *sock)
    assert code == 1 and "config file not found" in out, out

    daemon.config_path.mkdir()
    wait_for(lambda: daemon.status()["config"]["problem"] == "unreadable: Is a directory", 30,
             "status to say the file is a directory")
    code, out = reload(daemon, *sock)
    assert code == 1 and "cannot read the config file: Is a directory" in out, out

    daemon.config_path.rmdir()
    daemon.save(text)  # back as it was: nothing to apply
    wait_for(lambda: daemon.status()["config"]["problem"] is None, 30, "status to see the file back")
    state = daemon.status()
    assert state["generation"]["master_pid"] == master and state["serving"]
    assert http_get(daemon.port)[0] == 200
    log = daemon.log()
    assert log.count("config file removed; the running config keeps serving") == 1
    assert log.count("config file unreadable: Is a directory; the running config keeps serving") == 1
    assert log.count("config file readable again") == 1

    # A port already in use: the new address is refused, the old one keeps serving.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon.save(text.replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{taken.getsockname()[1]}"))
        state = wait_for(lambda: "address already in use" in (s := daemon.status())["last_reload"]["message"] and s,
                         60, "the reload to the taken port to be rejected")
    assert state["last_reload"]["outcome"] == "rejected"
    assert state["generation"]["master_pid"] == master and http_get(daemon.port)[0] == 200


# -- disk full ----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, size="1m", mode="0755"):
    """A small file system of its own at ``path``: filling it gives a real ENOSPC to everything writing there."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory):
    """Write until the file system says no: what is left is less than a block."""
    filler = directory / ".filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def leftovers(directory):
    """Temp files a failed write left behind (there must be none)."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_keeps_every_old_file_whole_and_the_site_serving(daemon):
    grid = daemon.omerodir / "etc" / "grid"
    sessions = daemon.root / "state" / "sessions"
    nginx_dir = daemon.root / "nginx"
    with contextlib.ExitStack() as mounts:
        mounts.callback(daemon.cleanup)  # stopped before the file systems go
        for path, mode in ((daemon.runtime_dir, "0750"), (grid, "0755"), (sessions, "0700"), (nginx_dir, "0755")):
            mounts.enter_context(tmpfs(path, mode=mode))
        nginx = f'[nginx]\nenabled = true\noutput_dir = "{nginx_dir}"\nserver_name = "a.example"\n'
        text = daemon.write_config(workers=1, daemon="watch_config = false").replace("[nginx]\nenabled = false\n", nginx)
        daemon.save(text)
        daemon.start()
        ledger = sessions / ".omerowebd-sweep.ledger"
        wait_for(lambda: ledger.exists() and daemon.status()["sessions"]["last"], 120, "the first sweep's ledger")
        master = daemon.status()["generation"]["master_pid"]
        before = {p: p.read_bytes() for p in [grid / "config.xml", ledger, *nginx_dir.glob("omero-web*")]}
        fillers = [fill(d) for d in (daemon.runtime_dir, grid, sessions, nginx_dir)]

        # An nginx-only change: refused, the old files stay.
        daemon.save(text.replace("a.example", "b.example"))
        code, out = reload(daemon)
        assert code == 1 and "No space left on device" in out and str(nginx_dir) in out, out
        # A new generation: its files cannot be written, so it never starts; the old one serves on.
        daemon.save(text.replace("[omero.web]\n", '[omero.web]\nlogin_logo = "/static/full.png"\n'))
        code, out = reload(daemon)
        assert code == 2 and "No space left on device" in out, out
        # The session sweep cannot write its ledger: it says so, the old ledger stays.
        out = daemon.ctl("sessions", "clear")
        assert "cannot write the ledger: No space left on device" in out.stdout + out.stderr, out
        assert daemon.status()["sessions"]["last"]["errors"] >= 1

        # Room in the runtime dir only: whatever the daemon does with the site's
        # full OMERODIR, the old config.xml stays whole and the log says why.
        fillers[0].unlink()
        mark = len(daemon.log())
        code, out = reload(daemon)
        assert "No space left on device" in daemon.log()[mark:], out

        for path, data in before.items():
            assert path.read_bytes() == data, f"{path} changed"
        for directory in (daemon.runtime_dir, grid, sessions, nginx_dir):
            assert leftovers(directory) == [], directory
        assert daemon.status()["serving"] and http_get(daemon.port)[0] == 200
        assert daemon.status()["generation"]["master_pid"] == master or code == 0  # rolled back, or applied

        for filler in fillers[1:]:
            filler.unlink()
        daemon.save(text.replace("a.example", "c.example")
                    .replace("[omero.web]\n", '[omero.web]\nlogin_logo = "/static/room.png"\n'))
        code, out = reload(daemon)
        assert code == 0, out
        assert b"/static/room.png" in (grid / "config.xml").read_bytes()
        assert b"c.example" in (nginx_dir / "omero-web.conf").read_bytes()
        assert b"/static/room.png" in http_get(daemon.port)[1]
        out = daemon.ctl("sessions", "clear")
        assert out.returncode == 0 and daemon.status()["sessions"]["last"]["errors"] == 0, out


# -- the session store ------------------------------------------------------------


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path, password="canary-redis-pw")
    r.start()
    yield r
    r.stop()


def test_redis_session_store_going_away_is_said_and_the_site_keeps_serving(daemon, redis):
    """What OMERO.web's docs suggest for sessions: Django's cache session engine on Redis.
    Without Redis the login page still answers (no session yet) and so does the daemon's
    probe; signed-in users get errors. Nothing a restart of OMERO.web would mend: the
    daemon keeps serving, says so once, and once more when Redis is back."""
    location = f"redis://:{redis.password}@127.0.0.1:{redis.port}/0"
    daemon.write_config(workers=1, daemon="watch_config = false", omero=f'''
        session_engine = "django.contrib.sessions.backends.cache"
        caches = {{default = {{BACKEND = "django.core.cache.backends.redis.RedisCache", LOCATION = "{location}"}}}}
        ''')
    daemon.start()
    where = f"redis at 127.0.0.1:{redis.port}"
    store = wait_for(lambda: (s := daemon.status()["session_store"])["checked_at"] and s, 60, "the first check")
    assert store["available"] is True and store["checked"] == [where]
    assert f"{where}: answers, " in daemon.ctl("status").stdout  # asked live (store_health.py)

    redis.stop()
    store = wait_for(lambda: (s := daemon.status()["session_store"])["available"] is False and s, 60,
                     "status to say the store is gone")
    assert "connection refused" in store["problems"][where]
    assert "session store: UNAVAILABLE since" in daemon.ctl("status").stdout
    assert http_get(daemon.port)[0] == 200  # the site serves what needs no session
    daemon.save(daemon.config_path.read_text() + 'login_logo = "/static/no-redis.png"\n')
    code, out = reload(daemon)  # and a reload still applies: its probe needs no session either
    assert code == 0, out
    assert b"/static/no-redis.png" in http_get(daemon.port)[1]

    redis.start()
    wait_for(lambda: daemon.status()["session_store"]["available"] is True, 60, "status to see the store back")
    log = daemon.log()
    assert log.count("session store unavailable") == 1 and log.count("session store available again") == 1
    line = next(line for line in log.splitlines() if "session store unavailable" in line)
    assert where in line and "OMERO.web keeps serving" in line
    assert redis.password not in log and redis.password not in daemon.ctl("status", "--json").stdout

    # A Redis that answers but refuses the site's password fails every signed-in request as surely:
    # the watch asks as the live status does (AUTH, then PING), and both say so.
    site_password, redis.password = redis.password, "rotated-redis-pw"
    redis.stop()
    redis.start()
    store = wait_for(lambda: (s := daemon.status()["session_store"])["available"] is False and s, 60,
                     "status to say the store refuses the password")
    assert store["problems"][where] == "refuses the password (WRONGPASS)"
    status = daemon.ctl("status").stdout
    assert f"{where}: ERROR (refuses the password (WRONGPASS))" in status and "session store: UNAVAILABLE" in status
    log = daemon.log()
    assert any("session store unavailable" in line and "refuses the password" in line for line in log.splitlines())
    assert site_password not in log and site_password not in daemon.ctl("status", "--json").stdout


# -- directories the daemon writes ------------------------------------------------


@contextlib.contextmanager
def read_only(path):
    """``path`` on a read-only bind mount: EROFS for everyone, root included (a disk remounted
    read-only after I/O errors, a ProtectSystem= that does not list it)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_omerodir_and_state_dir_read_only_refuse_changes_and_the_site_serves_on(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    _wait_all_ready(daemon)
    master = daemon.status()["generation"]["master_pid"]
    text = daemon.config_path.read_text()
    state_dir = daemon.root / "state"
    with read_only(daemon.omerodir), read_only(state_dir):
        daemon.save(text + 'login_logo = "/static/ro.png"\n')
        code, out = reload(daemon)
        assert code == 1 and "rejected" in out, out
        assert f"daemon.omerodir {daemon.omerodir}: is on a read-only file system" in out
        assert f"daemon.state_dir {state_dir}: is on a read-only file system" in out
        out = daemon.ctl("sessions", "clear")
        assert "Read-only file system" in out.stdout + out.stderr, out
        store = wait_for(lambda: (s := daemon.status()["session_store"])["available"] is False and s, 60,
                         "status to say the session store cannot be written")
        assert list(store["problems"].values()) == ["on a read-only file system"]
        # A worker lost now is replaced: OMERO.web boots without writing its log file.
        worker = daemon.status()["generation"]["worker_pids"][0]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: daemon.status()["generation"]["worker_faults"] == 1, 60, "the lost worker to be counted")
        _wait_all_ready(daemon)
        state = daemon.status()
        assert state["serving"] and state["generation"]["master_pid"] == master
        assert http_get(daemon.port)[0] == 200
    # Writable again.
    wait_for(lambda: daemon.status()["session_store"]["available"] is True, 60, "the store to be writable again")
    code, out = reload(daemon)
    assert code == 0, out
    assert b"/static/ro.png" in http_get(daemon.port)[1]


# -- the OMERO.web venv -------------------------------------------------------------


def half_upgraded(real, where):
    """A copy of ``real`` (links to its files) caught in the middle of `pip install -U django`:
    the new dist-info is there, the package is not usable yet."""
    shadow_venv(real, where, leave_out=frozenset({"django"}))
    mine = next(where.glob("lib/python3*/site-packages"))
    (mine / "django").mkdir()
    (mine / "django" / "__init__.py").write_text("raise ImportError('django is half installed (pip is upgrading it)')\n")
    return where


def test_a_venv_half_upgraded_under_the_running_site(tmp_path, omero_venv, notify):
    """The admin upgrades the venv in place while omerowebd serves. The serving generation has
    what it needs loaded; a reload is refused; a worker that must boot now cannot, so gunicorn
    halts its master; the daemon keeps the socket (connections wait, none is refused) and retries
    with its backoff, and serves again as soon as the upgrade is done. (gunicorn's log, in the
    daemon's output, has the ImportError.)"""
    link = tmp_path / "venv"
    link.symlink_to(omero_venv)
    broken = half_upgraded(omero_venv, tmp_path / "venv-half")
    d = Daemon(root=tmp_path / "site", venv=link, port=free_port(), notify=notify)

    def point_venv_at(target):
        swap = tmp_path / "venv.swap"
        swap.symlink_to(target)
        os.replace(swap, link)

    try:
        d.write_config(workers=1, daemon="watch_config = false")
        d.start()
        first = d.status()["generation"]
        with Load(d.port, clients=2) as load:
            load.wait_requests(10)
            point_venv_at(broken)
            d.save(d.config_path.read_text() + 'login_logo = "/static/half.png"\n')
            code, out = reload(d)
            assert code == 2 and "rolled back" in out and "a worker could not boot" in out, out
            assert d.status()["generation"]["master_pid"] == first["master_pid"]
            load.wait_requests(10)  # the serving generation serves on

            os.kill(first["worker_pids"][0], signal.SIGKILL)  # its replacement cannot import Django
            wait_for(lambda: "restart failed" in d.log(), 120, "a failed restart attempt")
            state = d.status()
            assert state["state"] == "restarting" and not state["serving"] and state["crashes"] == 1
            assert d.ctl("status").returncode == 1

            point_venv_at(omero_venv)  # the upgrade is done
            state = d.wait_serving(timeout=180)
            load.wait_requests(10, timeout=120)
        assert load.refused == 0  # the daemon held the socket throughout
        assert state["generation"]["number"] > first["number"]
        assert state["last_crash"]["restart"].startswith("done")
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.cleanup()
