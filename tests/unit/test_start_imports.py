"""What a start imports before gunicorn is spawned: nothing only needed later (each costs the first 200 time)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from omerowebd import omero_config
from omerowebd.config_xml import SiteConfigXml
from omerowebd.desired import derive
from unit.test_nginx import Log, info, make_config  # noqa: F401 (info is a fixture)

ROOT = Path(__file__).resolve().parents[2]

# Imported where they are used, after READY or on a rare path: the metrics endpoint's
# WSGI server (http.server, email), the config watcher's watchdog, a misspelt name's difflib.
LATER = ["wsgiref.simple_server", "http.server", "watchdog.observers", "difflib"]


def test_the_daemon_module_leaves_what_comes_later_unimported():
    script = ("import sys\nimport omerowebd.supervisor\n"
              f"print(' '.join(m for m in {LATER!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_the_logging_library_waits_for_the_first_event_that_is_logged():
    # A start logs nothing before gunicorn is spawned (a debug event below the level is dropped as structlog
    # would drop it): structlog and its set-up come after the spawn; the first event gets them, as configured.
    script = """if True:
        import json, sys
        from omerowebd import log
        log.configure("json")
        logger = log.get()
        logger.debug("below the level")
        print("before:", "structlog" in sys.modules, file=sys.stderr)
        logger.info("first event", answer=42)
        print("after:", "structlog" in sys.modules, file=sys.stderr)
        log.configure("console")  # in use already: from the next event on
        logger.warning("second event")
    """
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "before: False" and lines[2] == "after: True", lines
    assert json.loads(lines[1])["event"] == "first event" and json.loads(lines[1])["answer"] == 42
    assert "below the level" not in done.stderr
    assert "second event" in lines[3] and not lines[3].startswith("{"), lines


def test_config_xml_is_watched_once_the_first_generation_serves_and_an_edit_meanwhile_is_seen(tmp_path, info):  # noqa: F811
    config = make_config(tmp_path)
    config.daemon.state_dir.mkdir(parents=True)
    site = SiteConfigXml(Log(), config, lambda: None)

    async def scenario() -> None:
        try:
            assert await site.stage(derive(config, info, "A")) is not None
            assert site._watcher is None, "staging starts no watcher thread: it would delay gunicorn's spawn"
            path = omero_config.config_xml_path(config.daemon.omerodir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('<icegrid><properties id="default"><property name="omero.web.debug" value="true"/>'
                            '</properties></icegrid>')  # while gunicorn boots
            site.follow()
            assert site._watcher is not None and site.foreign is not None and "omero.web.debug" in site.foreign.names
        finally:
            site.stop()

    asyncio.run(scenario())


def test_the_early_start_leaves_a_config_that_can_be_read_once_unread(tmp_path):
    # --config /dev/stdin, a FIFO, <(...): the normal start's config.load must get the bytes, not an empty read.
    from omerowebd import spawn_record
    text = f'[daemon]\nstate_dir = "{tmp_path}"\n'.encode()
    r, w = os.pipe()
    try:
        os.write(w, text)
        os.close(w)
        early = spawn_record.Early()
        spawn_record._start(early, Path(f"/proc/self/fd/{r}"))
        assert early.master is None and early.note is None and early.lock is None
        assert os.read(r, 4096) == text
    finally:
        os.close(r)


def keep_record(state_dir: Path, config: Path, spec: dict, bind: list[str]) -> None:
    """A spawn record as the daemon keeps it for ``config``'s bytes and the venv ``spec`` runs (0600, its own)."""
    import hashlib

    from omerowebd import spawn_record
    venv = Path(spec["argv"][0]).parent.parent  # VENV/bin/python, as the early start reads it
    record = {"format": spawn_record.FORMAT, "bind": bind, "spec": spec,
              "key": spawn_record.key(hashlib.sha256(config.read_bytes()).hexdigest(), str(venv))}
    (state_dir / spawn_record.NAME).write_text(json.dumps(record))
    (state_dir / spawn_record.NAME).chmod(0o600)


@pytest.mark.parametrize("host, binds", [("127.0.0.1", True), ("[::1]", True), ("localhost", False)])
def test_the_early_start_binds_only_what_resolves_to_itself(tmp_path, host, binds):
    # The record keeps the addresses a host name resolved to last time; the normal start resolves it now.
    from omerowebd import spawn_record, sockets
    config = tmp_path / "omerowebd.toml"
    config.write_bytes(f'[daemon]\nstate_dir = "{tmp_path}"\n'.encode())
    venv = tmp_path / "venv"
    run = tmp_path / "run"
    family, sockaddr = (socket.AF_INET6, ["::1", 0, 0, 0]) if host == "[::1]" else (socket.AF_INET, ["127.0.0.1", 0])
    spec = {"argv": [str(venv / "bin" / "python")], "runtime_dir": str(run), "directory": str(run / "gen-1"),
            "sockets": [{"address": f"{host}:0", "origin": "bound", "family": int(family), "sockaddr": sockaddr}]}
    keep_record(tmp_path, config, spec, [f"{host}:0"])
    early = spawn_record.Early()
    try:
        spawn_record._start(early, config)  # bound, then it stops: the port bound is not the recorded ":0"
        assert early.note is None and early.master is None and early.lock is not None, early.note
        assert [s.address.rpartition(":")[0] for s in early.sockets] == ([host] if binds else [])
    finally:
        sockets.release(early.sockets)
        early.lock.release()


@pytest.mark.parametrize("systemd", [True, False])
def test_an_early_start_for_another_runtime_dir_lets_go_of_all_but_systemds_sockets(tmp_path, systemd):
    # __main__: the lock was taken for another runtime dir than the config's. systemd's sockets cannot be had
    # again (LISTEN_* were read and cleared): the normal start takes them, not an EADDRINUSE of its own bind.
    from omerowebd import runlock, sockets, spawn_record
    early = spawn_record.Early()
    early.lock = runlock.acquire(tmp_path / "run")
    early.sockets, early.systemd = sockets.bind(("127.0.0.1:0",)), systemd
    held = list(early.sockets)
    early.events_path = tmp_path / "events.sock"
    early.events = spawn_record.bind_events(early.events_path)
    try:
        early.let_go()
        assert early.lock is None and early.events is None and not early.events_path.exists()
        assert early.sockets == (held if systemd else [])
        assert all((s.sock.fileno() != -1) == systemd for s in held)
    finally:
        sockets.release(held)


def test_the_last_resort_kill_of_an_early_master_takes_its_view_too(tmp_path):
    # __main__'s finally (the daemon failed before adopting or stopping it): no gunicorn left, and no view, whose
    # config.xml holds the site's secrets.
    from omerowebd import spawn_record
    view = tmp_path / "run" / "gen-1"
    (view / "etc" / "grid").mkdir(parents=True)
    (view / "etc" / "grid" / "config.xml").write_text("<secret/>")
    early = spawn_record.Early()
    early.spec = {"directory": str(view)}
    early.master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        early.kill()
        assert early.master.returncode == -9 and not view.exists()
    finally:
        if early.master.returncode is None:
            early.master.kill()
            early.master.wait()


LOOK_FOR_THE_RECORD = """
import json, sys
from pathlib import Path
import omerowebd.__main__  # what runs first, as the console script and -m run it
from omerowebd import spawn_record, sockets
early = spawn_record.Early()
spawn_record._start(early, Path(sys.argv[1]))
# What the spawn does not need, which would delay it (the record's path found by $STATE_DIRECTORY: no TOML parse).
heavy = [m for m in ("tomllib", "typing", "tempfile", "shutil", "ast", "asyncio") if m in sys.modules]
print(json.dumps({"found": early.lock is not None, "tomllib": "tomllib" in sys.modules, "note": early.note,
                  "heavy": heavy}))
sockets.release(early.sockets)
if early.lock is not None:
    early.lock.release()
"""


def write_record(state_dir: Path, config: Path, run: Path) -> None:
    venv = state_dir / "venv"
    spec = {"argv": [str(venv / "bin" / "python")], "runtime_dir": str(run), "directory": str(run / "gen-1"),
            "sockets": [{"address": "127.0.0.1:0", "origin": "bound", "family": int(socket.AF_INET),
                         "sockaddr": ["127.0.0.1", 0]}]}
    state_dir.mkdir(exist_ok=True)
    keep_record(state_dir, config, spec, ["127.0.0.1:0"])


@pytest.mark.parametrize("where", ["systemd's state dir", "another config's record there", "not there"])
def test_the_record_is_looked_for_in_systemds_state_dir_before_the_toml_parser_is_imported(tmp_path, where):
    """Under the unit $STATE_DIRECTORY is the state_dir (StateDirectory=): a record there written for these
    config bytes is used without parsing the TOML. One written for other bytes is not, nor does it hide the
    config's own."""
    state, other = tmp_path / "state", tmp_path / "other"
    config = tmp_path / "omerowebd.toml"
    config.write_bytes(f'[daemon]\nstate_dir = "{state}"\n'.encode())
    write_record(state, config, tmp_path / "run")
    env = dict(os.environ, STATE_DIRECTORY=str(state))
    if where == "another config's record there":
        foreign = tmp_path / "foreign.toml"
        foreign.write_bytes(f'[daemon]\nstate_dir = "{other}"\n'.encode())
        write_record(other, foreign, tmp_path / "run-other")
        env["STATE_DIRECTORY"] = str(other)
    elif where == "not there":
        env["STATE_DIRECTORY"] = str(other)
    done = subprocess.run([sys.executable, "-c", LOOK_FOR_THE_RECORD, str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["found"] and result["note"] is None, result  # the config's own record, wherever it was looked up
    assert result["tomllib"] == (where != "systemd's state dir"), result
    if where == "systemd's state dir":
        assert result["heavy"] == [], result


FAKE_MASTER = """
import json, os, socket, sys, time
snapshot = json.load(open(os.environ["OMEROWEBD_SNAPSHOT"]))
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(json.dumps({"gen": 1, "event": "worker_ready", "pid": os.getpid()}).encode(), snapshot["events"])
time.sleep(600)
"""

WHOLE_EARLY_START = """
import json, signal, sys
from pathlib import Path
import omerowebd.__main__  # what runs first, as the console script and -m run it
from omerowebd import spawn_record, sockets
early = spawn_record.Early()
try:
    spawn_record._start(early, Path(sys.argv[1]))
    heavy = [m for m in ("tomllib", "typing", "tempfile", "shutil", "ast", "asyncio") if m in sys.modules]
    handlers = [signal.getsignal(s) == early.hold for s in (signal.SIGTERM, signal.SIGHUP)]
    print(json.dumps({"spawned": early.master is not None, "waited": early.waited, "heard": len(early.heard),
                      "heavy": heavy, "held_by_early": handlers, "note": early.note}), flush=True)
finally:
    early.kill()
    early.close()
"""


def test_the_whole_early_start_spawns_waits_and_holds_signals_with_nothing_heavy_imported(tmp_path):
    """The early path end to end, with a stand-in master that reports its worker ready: before the daemon's
    own imports it binds, spawns, waits for the boot and holds SIGTERM and SIGHUP for the daemon's loop, having
    imported none of what would delay the spawn."""
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    config = tmp_path / "omerowebd.toml"
    config.write_bytes(f'[daemon]\nstate_dir = "{state}"\n'.encode())
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    web = f"unix:{tmp_path / 'web.sock'}"
    directory = run / "gen-1"
    spec = {"argv": [str(venv / "bin" / "python"), "-c", FAKE_MASTER], "cwd": str(tmp_path),
            "env": {"OMERODIR": str(directory / "omerodir"), "OMEROWEBD_SNAPSHOT": str(directory / "snapshot.json")},
            "snapshot": json.dumps({"generation": 1, "events": str(run / "events.sock"),
                                    "settings": {"workers": 1}}),
            "config_xml": None, "site_omerodir": str(tmp_path / "omerodir"), "directory": str(directory),
            "runtime_dir": str(run), "events": str(run / "events.sock"),
            "sockets": [{"address": web, "origin": "bound"}]}
    keep_record(state, config, spec, [web])
    done = subprocess.run([sys.executable, "-c", WHOLE_EARLY_START, str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, STATE_DIRECTORY=str(state)))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["spawned"] and result["note"] is None, result
    assert result["heard"] == 1 and result["waited"] is not None, result  # it waited for its worker, and heard it
    assert result["heavy"] == [] and result["held_by_early"] == [True, True], result
    assert not directory.exists()  # early.kill took the view


def test_a_record_that_cannot_be_trusted_in_systemds_state_dir_is_named_once(tmp_path):
    """The config's own state dir is systemd's: looked at once, and why its record is ignored is said of it."""
    from omerowebd import spawn_record
    state = tmp_path / "state"
    config = tmp_path / "omerowebd.toml"
    config.write_bytes(f'[daemon]\nstate_dir = "{state}"\n'.encode())
    write_record(state, config, tmp_path / "run")
    (state / spawn_record.NAME).chmod(0o620)  # others may write it: never what says what to run
    done = subprocess.run([sys.executable, "-c", LOOK_FOR_THE_RECORD, str(config)], cwd=ROOT,
                          env=dict(os.environ, STATE_DIRECTORY=str(state)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert not result["found"], result
    assert result["note"] == (f"ignoring the remembered spawn {state / spawn_record.NAME}: others may write it "
                              "(mode 0620)"), result
