"""Faults an OMERO.web host meets, each with a defined outcome (issue 11).

For each: what is done to the running daemon, what must hold after (the site
serves, or comes back by itself), the one line the daemon logs about it and
what `omerowebctl status` shows. Faults already covered elsewhere are not
repeated here: a killed master and crash-restart backoff (test_daemon.py), a
venv that vanishes as the master dies (test_bad_input.py), a generation that
fails to boot (test_reload.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import Load, free_port, http_get, wait_for

pytestmark = pytest.mark.omeroweb


def reload(daemon, *args):
    out = daemon.ctl("reload", *args)
    return out.returncode, out.stdout + out.stderr


# -- the daemon itself --------------------------------------------------------


def test_a_second_daemon_on_the_same_runtime_dir_is_refused_and_the_first_is_untouched(daemon):
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


def test_a_daemon_killed_with_sigkill_is_reported_by_the_next_one(daemon):
    daemon.write_config(workers=1)
    daemon.start()
    killed = daemon.proc.pid
    daemon.proc.kill()
    daemon.proc.wait()
    # Its gunicorns follow it (PR_SET_PDEATHSIG): nothing outlives the daemon.
    wait_for(lambda: daemon.gunicorn_pids() == [], 60, "the orphaned gunicorns to exit")
    daemon.start()
    assert http_get(daemon.port)[0] == 200
    assert daemon.log().count("did not stop cleanly") == 1
    line = next(line for line in daemon.log().splitlines() if "did not stop cleanly" in line)
    assert str(killed) in line
    assert daemon.stop() == 0
    daemon.start()  # after a clean stop: nothing to report
    assert daemon.log().count("did not stop cleanly") == 1
