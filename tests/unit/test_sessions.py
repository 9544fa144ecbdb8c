"""The sweeper's parts that need no venv: the schedule, the engine rules, the
decode shortcut, the ledger, the report and its rendering."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from omerowebd import config as config_module
from omerowebd import session_sweep as sweep_script
from omerowebd import sessions, status_lines
from omerowebd.errors import ConfigError
from omerowebd.omero_config import with_session_path
from omerowebd.schedule import Schedule, parse_schedule
from omerowebd.venv import VenvInfo


# -- schedule -----------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("6h", 21600), ("30m", 1800), ("1d", 86400), ("90s", 90), (" 0.5s ", 0.5)])
def test_intervals(text: str, seconds: float) -> None:
    assert parse_schedule(text) == Schedule(interval=seconds)


@pytest.mark.parametrize("text", ["03:30", "3:30", "23:59", "00:00"])
def test_daily_times(text: str) -> None:
    hour, minute = (int(x) for x in text.split(":"))
    assert parse_schedule(text) == Schedule(daily=(hour, minute))


@pytest.mark.parametrize("text", ["", "6", "0s", "3h30m", "24:00", "12:60", "daily", "-1h", "1w"])
def test_bad_schedules_say_what_is_wanted(text: str) -> None:
    with pytest.raises(ValueError, match='"6h"|positive'):
        parse_schedule(text)


def test_daily_next_is_today_or_tomorrow() -> None:
    daily = parse_schedule("03:30")
    assert daily.next_after(datetime(2026, 5, 1, 2, 0)) == datetime(2026, 5, 1, 3, 30)
    assert daily.next_after(datetime(2026, 5, 1, 3, 30)) == datetime(2026, 5, 2, 3, 30)
    assert daily.next_after(datetime(2026, 5, 1, 12, 0)) == datetime(2026, 5, 2, 3, 30)


def test_interval_next() -> None:
    now = datetime(2026, 5, 1, 12, 0)
    assert parse_schedule("6h").next_after(now) == now + timedelta(hours=6)


# -- config --------------------------------------------------------------------------


def parse(sessions_table: str, omero: str = "") -> config_module.Config:
    text = textwrap.dedent("""\
        [daemon]
        omerodir = "/srv/omero"
        venv = "/opt/omero/web/venv3"

        [sessions]
        """) + textwrap.dedent(sessions_table) + "\n" + omero
    return config_module.parse(text.encode(), Path("/etc/omerowebd/omerowebd.toml"))


def test_sessions_defaults() -> None:
    s = parse("").sessions
    assert (s.enabled, s.schedule, s.at_start, s.nice, s.ionice_idle) == (True, "6h", True, 19, True)


@pytest.mark.parametrize("line, message", [
    ('schedule = "sometimes"', ':6: sessions.schedule must be an interval'),
    ("nice = 20", ":6: sessions.nice must be between 0 and 19"),
    ("timeout = 0", ":6: sessions.timeout must be more than 0"),
    ("at_start = 1", ":6: sessions.at_start must be true or false"),
    ("schedul = \"6h\"", "did you mean 'schedule'"),
])
def test_bad_sessions_settings_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(line)


# -- engines and targets -------------------------------------------------------------


def info(catalogue: dict | None = None) -> VenvInfo:
    return VenvInfo(venv=Path("/opt/omero/web/venv3"), versions={}, omeroweb_dir=Path("/x/omeroweb"),
                    catalogue=catalogue or {})


@pytest.mark.parametrize("engine, kind", [
    ("django.contrib.sessions.backends.file", "file"),
    ("omeroweb.filesessionstore", "file"),
    ("django.contrib.sessions.backends.db", "db"),
    ("django.contrib.sessions.backends.cached_db", "db"),
    ("django.contrib.sessions.backends.cache", "cache"),
    ("django.contrib.sessions.backends.signed_cookies", "cache"),
    ("myapp.sessions", "unknown"),
])
def test_engine_kinds(engine: str, kind: str) -> None:
    assert sessions.classify(engine) == kind


def test_default_engine_sweeps_the_pinned_store() -> None:
    config = parse("")
    properties = with_session_path(config.properties, Path("/var/lib/omerowebd/sessions"))
    target = sessions.target_for(config, properties, info())
    assert (target.kind, target.sweeper, target.store) == ("file", "omerowebd", Path("/var/lib/omerowebd/sessions"))
    assert target.manage == Path("/x/omeroweb/manage.py") and target.python == Path("/opt/omero/web/venv3/bin/python")


def test_engine_default_comes_from_the_venv() -> None:
    config = parse("")
    catalogue = {"omero.web.session_engine": {"default": "django.contrib.sessions.backends.cache"}}
    target = sessions.target_for(config, config.properties, info(catalogue))
    assert target.sweeper is None and "nothing to sweep" in target.note


def test_site_session_path_wins() -> None:
    extra = json.dumps([["SESSION_FILE_PATH", "/srv/sessions"]])
    config = parse("", f'[omero.web]\ndjango_additional_settings = {json.dumps(extra)}\n')
    properties = with_session_path(config.properties, Path("/var/lib/omerowebd/sessions"))
    assert sessions.target_for(config, properties, info()).store == Path("/srv/sessions")


def test_database_engine_runs_clearsessions() -> None:
    config = parse("", '[omero.web]\nsession_engine = "django.contrib.sessions.backends.db"\n')
    target = sessions.target_for(config, config.properties, info())
    request = json.loads(sessions._request(target, False, None))
    assert target.sweeper == "clearsessions" and request["mode"] == "clearsessions"
    assert request["manage"] == "/x/omeroweb/manage.py" and request["nice"] == 19


# -- the script's rules ----------------------------------------------------------------


def signed(payload: bytes, compress: bool = False) -> str:
    """Shaped like TimestampSigner output; the signature is not checked by the shortcut."""
    if compress:
        payload = zlib.compress(payload)
    b64 = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    return f"{'.' if compress else ''}{b64}:1xVtTi:{'s' * 43}"


@pytest.mark.parametrize("text, may", [
    (signed(b'{"_auth_user_id":"1"}'), False),
    (signed(b'{"_auth_user_id":"1","_session_expiry":"2030-01-01T00:00:00+00:00"}'), True),
    (signed(b'{"a":"' + b"x" * 3000 + b'","_session_expiry":5}', compress=True), True),
    (signed(b'{"a":"' + b"x" * 3000 + b'"}', compress=True), False),
    (signed(b'{"user":"J\\u00fcrgen"}'), True),  # an escape could spell the key: let Django decode
    ("no colons at all", False),
    ("garbage:with:colons!!", False),
    ("." + "A" * 40 + ":ts:sig", False),  # not zlib: Django's decode fails too, an empty session
])
def test_what_needs_django_to_decode(text: str, may: bool) -> None:
    assert sweep_script.Sweep.may_carry_expiry(text) is may


def test_a_zip_bomb_is_left_to_django_to_verify_first() -> None:
    bomb = zlib.compress(b'{"a":"' + b"x" * (2 * sweep_script.MAX_PAYLOAD) + b'"}')
    assert sweep_script.Sweep.may_carry_expiry(signed_raw(bomb)) is True


def signed_raw(compressed: bytes) -> str:
    return "." + base64.urlsafe_b64encode(compressed).rstrip(b"=").decode() + ":ts:sig"


@pytest.mark.parametrize("name, ok", [
    ("sessionid" + "a" * 32, True),
    ("sessionid" + "a1b2c3d4", True),
    ("sessionidabc", False),
    ("sessionid" + "A" * 32, False),
    ("sessionid" + "a" * 32 + "_out_x", False),
    ("other" + "a" * 32, False),
    (sweep_script.LOCK_NAME, False),
    (sweep_script.LEDGER_NAME, False),
])
def test_session_names_are_djangos(name: str, ok: bool) -> None:
    valid = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
    assert sweep_script.is_session_name(name, "sessionid", valid) is ok


def sweep_with(use_tz: bool = True, age: int = 86400) -> sweep_script.Sweep:
    snapshot = {"use_tz": use_tz, "cookie_age": age, "serializer": sweep_script.JSON_SERIALIZERS[0]}
    return sweep_script.Sweep(-1, snapshot, None, dry_run=True, use_ledger=False)


@contextlib.contextmanager
def store_fd(path: Path) -> Iterator[int]:
    dfd = sweep_script.open_store(str(path))
    try:
        yield dfd
    finally:
        os.close(dfd)


def django_says_expired(mtime: float, age: int) -> bool:
    """FileSessionStore._expiry_date + SessionBase.get_expiry_age, written out."""
    expiry = datetime.fromtimestamp(mtime, tz=timezone.utc) + timedelta(seconds=age)
    delta = expiry - datetime.now(tz=timezone.utc)
    return delta.days * 86400 + delta.seconds <= 0


@pytest.mark.parametrize("offset", [-86400, -5, -1.5, -0.2, 0.5, 3, 86400])
def test_mtime_rule_is_djangos(offset: float) -> None:
    import time

    mtime = time.time() - 3600 + offset
    assert sweep_with(age=3600).mtime_expired(mtime) == django_says_expired(mtime, 3600)


def test_ledger_set_grows_and_round_trips(tmp_path: Path) -> None:
    ledger = sweep_script.Ledger()
    ids = [(i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF or 1 for i in range(1, 5000)]
    for vid in ids:
        ledger.add(vid)
    ledger.add(ids[0])
    assert ledger.count == len(ids) and all(v in ledger for v in ids) and 12345 not in ledger
    with store_fd(tmp_path) as dfd:
        ledger.write(dfd, "json")
        again = sweep_script.Ledger.read(dfd, "json")
        assert again is not None and again.count == len(ids) and all(v in again for v in ids)
        assert sweep_script.Ledger.read(dfd, "pickle") is None  # another serializer: start afresh
        (tmp_path / sweep_script.LEDGER_NAME).write_bytes(b"garbage")
        assert sweep_script.Ledger.read(dfd, "json") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [sweep_script.LEDGER_NAME]  # no temp file left


def test_a_new_version_of_a_file_has_a_new_id() -> None:
    st = SimpleNamespace(st_ino=1, st_size=200, st_mtime_ns=10, st_ctime_ns=10)
    ids = {sweep_script.version_id("sessionidx", st)}
    for change in ({"st_ino": 2}, {"st_size": 201}, {"st_mtime_ns": 11}, {"st_ctime_ns": 11}):
        ids.add(sweep_script.version_id("sessionidx", SimpleNamespace(**{**vars(st), **change})))
    ids.add(sweep_script.version_id("sessionidy", st))
    assert len(ids) == 6


def test_settings_learnt_in_another_venv_mean_the_full_import(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot decodes without omeroweb.settings only for the config.xml and the venv it was learnt
    from: another Django or OMERO.web release (a package installed, upgraded, removed) imports them again."""
    site = tmp_path / "venv" / "lib" / "python3.10" / "site-packages"
    (site / "Django-4.2.16.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sweep_script.sys, "prefix", str(tmp_path / "venv"))
    django = sweep_script.Django(str(tmp_path), config_xml="<icegrid/>")
    learnt = {"engine": sweep_script.FILE_ENGINES[0], "config_digest": django.digest(), "venv": django.venv(),
              "use_tz": True, "time_zone": "UTC", "file_path": str(tmp_path / "store")}
    assert django.snapshot_fits(learnt)
    assert not django.snapshot_fits({**learnt, "config_digest": "0" * 64})
    assert not django.snapshot_fits({k: v for k, v in learnt.items() if k != "venv"})  # from before the venv key

    (site / "Django-4.2.16.dist-info").rename(site / "Django-5.2.1.dist-info")
    upgraded = sweep_script.Django(str(tmp_path), config_xml="<icegrid/>")
    assert upgraded.venv() != django.venv() and not upgraded.snapshot_fits(learnt)

    # The sweep then imports omeroweb.settings (load) before anything else, whatever the snapshot says.
    class Loaded(Exception):
        pass

    def load() -> None:
        raise Loaded
    monkeypatch.setattr(upgraded, "load", load)
    with pytest.raises(Loaded):
        sweep_script.sweep_with({"snapshot": learnt, "store": learnt["file_path"]}, upgraded, time.time(),
                                time.monotonic())
    monkeypatch.setattr(django, "load", load)  # the venv it was learnt in: no import, on to the store
    with pytest.raises(sweep_script.Fatal, match="does not exist"):
        sweep_script.sweep_with({"snapshot": learnt, "store": learnt["file_path"]}, django, time.time(),
                                time.monotonic())
    django.close()
    upgraded.close()


def test_priority_is_lowered_in_the_child() -> None:
    code = ("import os, subprocess, sys; sys.path.insert(0, sys.argv[1]); import session_sweep as s;"
            "notes = s.lower_priority(19, True); print(os.getpriority(os.PRIO_PROCESS, 0), notes);"
            "print(subprocess.run(['ionice', '-p', str(os.getpid())], capture_output=True, text=True).stdout)")
    done = subprocess.run([sys.executable, "-c", code, str(Path(sweep_script.__file__).parent)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    assert first == "19 []" and second.strip() == "idle"


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The nice of a process's autogroup ("/autogroup-123 nice 0"); None where
    there is none: a kernel without autogroups (no file), or a process in the
    kernel's default group (an empty file; CI machines show it)."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            text = f.read()
    except FileNotFoundError:
        return None  # nice and SCHED_IDLE rule alone
    _, found, nice = text.partition(" nice ")
    return int(nice) if found else None


def test_priority_lowers_the_session_group_only_as_its_leader() -> None:
    """With autogroups the sweep's nice only ranks it inside its own session's
    group: as the leader of its own session (as the daemon starts it) it lowers
    that group; in someone else's session (an operator's shell) it leaves it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import session_sweep as s;"
            "print(s.lower_priority(19, False)); print(open('/proc/self/autogroup').read().partition(' nice ')[2].strip() or '-')")
    args = [sys.executable, "-c", code, str(Path(sweep_script.__file__).parent)]
    if autogroup_nice() is None:  # no group to lower: still no note, no error
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, start_new_session=True)
        assert done.returncode == 0 and done.stdout.split()[0] == "[]", done.stderr
        return
    own = subprocess.run(args, capture_output=True, text=True, timeout=60, start_new_session=True)
    assert own.returncode == 0, own.stderr
    assert own.stdout.split() == ["[]", "19"]
    before = autogroup_nice()
    shared = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert shared.returncode == 0, shared.stderr
    assert shared.stdout.split() == ["[]", str(before)] and autogroup_nice() == before


# -- reports -------------------------------------------------------------------------


def target(**settings: object) -> sessions.Target:
    from omerowebd.config import SessionsSettings

    return sessions.Target(engine="django.contrib.sessions.backends.file", kind="file", store=Path("/s"),
                           omerodir=Path("/o"), python=Path("/v/bin/python"), manage=Path("/m"),
                           settings=SessionsSettings(**settings))  # type: ignore[arg-type]


def test_outcome_of_a_good_sweep() -> None:
    report = {"scanned": 10, "deleted": 2, "kept": 8, "errors": 0, "started_at": 100.0, "store": "/s"}
    r = sessions._outcome(target(), False, 0, (json.dumps(report) + "\n").encode(), b"", 1.5, False)
    assert r["deleted"] == 2 and r["duration"] == 1.5 and r["at"] == 100.0 and "error" not in r
    assert status_lines.sweep(r) == "scanned 10, deleted 2, kept 8, errors 0, 1.50s"


def test_outcome_when_locked_out() -> None:
    report = {"busy": True, "holder": "4242", "store": "/s"}
    r = sessions._outcome(target(), False, 0, json.dumps(report).encode(), b"", 0.1, False)
    assert "another sweep holds the lock on /s (pid 4242)" in r["error"]


def test_outcome_of_a_fatal_problem_and_a_crash() -> None:
    r = sessions._outcome(target(), False, 0, b'{"fatal": "the session store /s does not exist"}', b"", 0.1, False)
    assert r["error"] == "the session store /s does not exist"
    r = sessions._outcome(target(), False, 1, b"", b"Traceback...\nImportError: no django\n", 0.1, False)
    assert r["error"] == "the sweep failed (1): ImportError: no django"
    r = sessions._outcome(target(timeout=5), False, -9, b"", b"", 15, True)
    assert "sessions.timeout (5s)" in r["error"]


def test_status_lines() -> None:
    status = {"engine": "django.contrib.sessions.backends.file", "store": "/s", "note": "omerowebd sweeps the file store",
              "sweeper": "omerowebd", "enabled": True, "schedule": "6h", "running": None, "next": 2e9,
              "last": {"at": 1.9e9, "scanned": 5, "deleted": 1, "kept": 4, "errors": 0, "duration": 0.25}}
    text = "\n".join(status_lines.sessions(status))
    assert "sessions:    django.contrib.sessions.backends.file at /s" in text
    assert "scanned 5, deleted 1, kept 4, errors 0, 0.25s" in text and "(schedule 6h)" in text
    cache = {"engine": "django.contrib.sessions.backends.cache", "sweeper": None,
             "note": "django.contrib.sessions.backends.cache expires sessions itself: nothing to sweep"}
    assert status_lines.sessions(cache) == [f"sessions:    {cache['engine']} ({cache['note']})"]


def test_service_before_any_config() -> None:
    import asyncio

    service = sessions.SessionService(SimpleNamespace())
    assert service.status()["engine"] is None
    assert "no config" in asyncio.run(service.sweep_now())["error"]


def test_deleter_unlinks_only_the_version_judged(tmp_path: Path) -> None:
    judged, saved_again, gone = (tmp_path / f"sessionid{c * 32}" for c in "abc")
    for path in (judged, saved_again, gone):
        path.write_text("x")
    stats = {path: os.stat(path) for path in (judged, saved_again, gone)}
    newer = tmp_path / "newer"
    newer.write_text("y")
    os.replace(newer, saved_again)  # a request saved it again after the verdict: a new inode
    gone.unlink()
    job = sweep_with()
    job.dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deleter = sweep_script.Unlinker(job, threads=2)
        for path, st in stats.items():
            deleter.put(path.name, st)
        deleter.close()
    finally:
        os.close(job.dfd)
    assert not judged.exists() and saved_again.read_text() == "y"
    c = job.counts
    assert (c["deleted"], c["changed"], c["kept"], c["vanished"], c["errors"]) == (1, 1, 1, 1, 0)


# -- which store, with which settings -------------------------------------------------


def test_the_command_and_the_daemon_pin_the_same_store() -> None:
    config = parse("", "")
    properties = sessions.pinned_properties(config)
    assert properties == with_session_path(config.properties, config.daemon.state_dir / "sessions")
    target = sessions.target_for(config, properties, info())
    assert target.store == config.daemon.state_dir / "sessions"
    # The child reads OMERO.web's settings from this text (the TOML's), never from the site's config.xml.
    request = json.loads(sessions._request(target, False, None))
    assert request["store"] == str(target.store)
    assert str(target.store) in request["config_xml"] and "SESSION_FILE_PATH" in request["config_xml"]
    assert request["config_xml"] == target.config_xml


def test_database_request_carries_the_tomls_settings_too() -> None:
    config = parse("", '[omero.web]\nsession_engine = "django.contrib.sessions.backends.db"\n')
    request = json.loads(sessions._request(sessions.target_for(config, config.properties, info()), False, None))
    assert "django.contrib.sessions.backends.db" in request["config_xml"]


# -- the store is hostile ------------------------------------------------------------


def test_lock_and_ledger_never_follow_planted_links(tmp_path: Path) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    victims = {}
    for name in (sweep_script.LOCK_NAME, sweep_script.LEDGER_NAME, sweep_script.LEDGER_TMP):
        victim = outside / name
        victim.write_text("precious\n")
        victims[name] = victim
        (store / name).symlink_to(victim)
    with store_fd(store) as dfd:
        lock, holder = sweep_script.take_lock(dfd)
        assert lock is not None and holder is None
        ledger = sweep_script.Ledger()
        ledger.add(42)
        ledger.write(dfd, "json")
        os.close(lock)
    for victim in victims.values():
        assert victim.read_text() == "precious\n"
    for name in (sweep_script.LOCK_NAME, sweep_script.LEDGER_NAME):
        st = os.lstat(store / name)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()
    assert not (store / sweep_script.LEDGER_TMP).exists()


def test_lock_that_is_a_fifo_a_hard_link_or_a_directory_is_replaced(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    for plant in ("fifo", "hardlink", "directory"):
        store = tmp_path / plant
        store.mkdir()
        lock = store / sweep_script.LOCK_NAME
        if plant == "fifo":
            os.mkfifo(lock)
        elif plant == "hardlink":
            os.link(outside, lock)
        else:
            lock.mkdir()
        with store_fd(store) as dfd:
            fd, _ = sweep_script.take_lock(dfd)  # no hang on the FIFO, no write through the link
            assert fd is not None
            os.close(fd)
        assert stat.S_ISREG(os.lstat(lock).st_mode) and os.lstat(lock).st_nlink == 1
    assert outside.read_text() == "precious\n" and os.stat(outside).st_nlink == 1


def test_ledger_that_is_not_our_file_is_not_read(tmp_path: Path) -> None:
    good = sweep_script.Ledger()
    good.add(7)
    with store_fd(tmp_path) as dfd:
        good.write(dfd, "json")
        ledger = tmp_path / sweep_script.LEDGER_NAME
        os.link(ledger, tmp_path / "second-name")  # a hard link: someone else may hold the other name
        assert sweep_script.Ledger.read(dfd, "json") is None
        os.unlink(tmp_path / "second-name")
        assert sweep_script.Ledger.read(dfd, "json") is not None
        ledger.unlink()
        os.mkfifo(ledger)
        assert sweep_script.Ledger.read(dfd, "json") is None  # and no hang


def test_a_store_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "store").symlink_to(tmp_path / "real")
    with pytest.raises(sweep_script.Fatal, match="is a symbolic link"):
        sweep_script.open_store(str(tmp_path / "store"))
    with pytest.raises(sweep_script.Fatal, match="does not exist"):
        sweep_script.open_store(str(tmp_path / "nowhere"))


def test_reports_name_sessions_by_a_hash_of_the_key() -> None:
    key = "sessionid" + "k3y" * 10
    job = sweep_with()
    job.error(key, "cannot open: Permission denied")
    job.error(sweep_script.LEDGER_NAME, "cannot write the ledger")
    sample, ledger = job.error_samples
    assert "k3y" not in sample and sweep_script.name_hash(key) in sample
    assert sweep_script.name_hash(key) == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert ledger.startswith(sweep_script.LEDGER_NAME)


# -- who runs the sweep ----------------------------------------------------------------


NOBODY = 65534


def file_target(store: Path, omerodir: Path) -> sessions.Target:
    return sessions.Target(engine="django.contrib.sessions.backends.file", kind="file", store=store,
                           omerodir=omerodir, python=Path("/v/bin/python"), manage=Path("/m"),
                           settings=config_module.SessionsSettings())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory others can enter (pytest's own is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="omerowebd-runner-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def test_not_root_runs_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runner = sessions.runner_for(file_target(tmp_path / "nowhere", tmp_path))
    assert runner == sessions.Runner() and runner.popen_args() == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="the root side of the rule needs root")
def test_root_runs_the_sweep_as_the_stores_owner(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = shared_dir / "sessions"
    store.mkdir()
    os.chown(store, NOBODY, NOBODY)
    monkeypatch.setenv("PYTHONPATH", "/root/evil")
    monkeypatch.setenv("TMPDIR", "/root/tmp")
    runner = sessions.runner_for(file_target(store, shared_dir))
    nobody = pwd.getpwuid(NOBODY)
    assert (runner.uid, runner.gid) == (NOBODY, nobody.pw_gid)
    assert runner.popen_args() == {"user": NOBODY, "group": nobody.pw_gid, "extra_groups": []}
    env = runner.env()
    assert env["HOME"] == nobody.pw_dir and env["USER"] == nobody.pw_name and env["PYTHONHASHSEED"] == "0"
    assert not {"PYTHONPATH", "TMPDIR"} & set(env)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root side of the rule needs root")
def test_root_refuses_what_it_cannot_trust(shared_dir: Path) -> None:
    real = shared_dir / "real"
    real.mkdir()
    os.chown(real, NOBODY, NOBODY)
    link = shared_dir / "link"
    link.symlink_to(real)
    with pytest.raises(sessions.SweepRefused, match="is a symbolic link"):
        sessions.runner_for(file_target(link, shared_dir))
    with pytest.raises(sessions.SweepRefused, match="does not exist"):
        sessions.runner_for(file_target(shared_dir / "missing", shared_dir))
    # Root's store in a directory the service user can write: it could be swapped for any root directory.
    swappable = shared_dir / "theirs"
    swappable.mkdir()
    os.chown(swappable, NOBODY, NOBODY)
    (swappable / "sessions").mkdir()
    with pytest.raises(sessions.SweepRefused, match="refusing to sweep as root: .*owned by uid 65534"):
        sessions.runner_for(file_target(swappable / "sessions", shared_dir))
    # Root's store, root's all the way, but the secret key (which signs what Django decodes) is theirs.
    (shared_dir / "store").mkdir(mode=0o700)
    (shared_dir / "var").mkdir()
    key = shared_dir / "var" / "django_secret_key"
    key.write_text("k")
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(sessions.SweepRefused, match="secret key"):
        sessions.runner_for(file_target(shared_dir / "store", shared_dir))
    os.chown(key, 0, 0)
    assert sessions.runner_for(file_target(shared_dir / "store", shared_dir)) == sessions.Runner()


@pytest.mark.skipif(os.geteuid() != 0, reason="the root side of the rule needs root")
def test_refusal_is_the_sweeps_outcome_not_a_traceback(shared_dir: Path) -> None:
    link = shared_dir / "link"
    link.symlink_to("/etc")
    result = sessions.sweep_sync(file_target(link, shared_dir))
    assert "is a symbolic link" in result["error"] and result["store"] == str(link)
    assert "symbolic link" in status_lines.sweep(result)


def test_a_reload_that_changes_another_property_keeps_the_schedule() -> None:
    service = sessions.SessionService(SimpleNamespace())
    first = parse("")
    service.update(first, sessions.pinned_properties(first), info())
    service._changed.clear()
    other = parse("", '[omero.web]\nprefix = "/omero"\n')
    service.update(other, sessions.pinned_properties(other), info())
    assert not service._changed.is_set()
    assert service.target is not None and "/omero" in (service.target.config_xml or "")  # next sweep's settings
    moved = parse('schedule = "1h"', "")
    service.update(moved, sessions.pinned_properties(moved), info())
    assert service._changed.is_set()


# -- a store anybody may write -----------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the root side of the rule needs root")
def test_root_never_sweeps_a_store_anybody_may_write(shared_dir: Path) -> None:
    # Root's, sticky, world-writable: nobody can swap it, but anybody can plant sessions in it.
    store = shared_dir / "tmp-like"
    store.mkdir()
    store.chmod(0o1777)
    for where in (store, Path(tempfile.gettempdir())):  # SESSION_FILE_PATH = "/tmp", Django's own default
        with pytest.raises(sessions.SweepRefused, match=rf"refusing to sweep as root: the session store {where} is "
                           r"writable by everyone.*leave SESSION_FILE_PATH unset"):
            sessions.runner_for(file_target(where, shared_dir))
    result = sessions.sweep_sync(file_target(store, shared_dir))
    assert "writable by everyone" in result["error"]


# -- the child's output: bounded in time and size, text made printable ------------------------


def _child(tmp_path: Path, code: str, *, timeout: float = 60.0) -> sessions.Finished:
    return sessions.run_child([sys.executable, "-c", textwrap.dedent(code)], b'{"mode": "sweep"}', timeout=timeout,
                              env={"PATH": "/usr/bin:/bin"}, popen_args={})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][:1] != "Z"


def test_a_detached_grandchild_holding_the_pipes_does_not_hold_the_sweep(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    finished = _child(tmp_path, f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()  # out of the child's process group: the group kill misses it
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            time.sleep(300)  # holds stdout and stderr open
            os._exit(0)
        while not os.path.exists({str(pidfile)!r}) or not open({str(pidfile)!r}).read():
            time.sleep(0.01)
        sys.stdin.read()
        print('{{"scanned": 3, "deleted": 1, "kept": 2, "errors": 0}}')
    """)
    grandchild = int(pidfile.read_text())
    try:
        assert _alive(grandchild)  # still holding the pipes: the sweep did not wait for their end
        assert finished.returncode == 0 and finished.problem is None and not finished.timed_out
        assert json.loads(finished.stdout)["deleted"] == 1
    finally:
        os.kill(grandchild, 9)


def test_a_grandchild_in_the_childs_group_is_killed_with_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    finished = _child(tmp_path, f"""
        import os, sys, time
        if os.fork() == 0:
            open({str(pidfile)!r} + ".tmp", "w").write(str(os.getpid()))
            os.rename({str(pidfile)!r} + ".tmp", {str(pidfile)!r})
            time.sleep(300)
            os._exit(0)
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.01)
        print("{{}}")
    """)
    grandchild = int(pidfile.read_text())
    deadline = datetime.now() + timedelta(seconds=60)
    while _alive(grandchild) and datetime.now() < deadline:  # killed; reaped by init in its own time
        time.sleep(0.01)
    assert not _alive(grandchild) and finished.returncode == 0


def test_a_child_that_writes_without_end_is_cut_off(tmp_path: Path) -> None:
    finished = _child(tmp_path, """
        import sys
        while True:
            sys.stdout.buffer.write(b"x" * 65536)
    """)
    assert finished.problem == "it wrote over 4 MiB where a report of a few KiB belongs"
    assert len(finished.stdout) <= sessions.MAX_STDOUT + 2 * 65536 and finished.returncode == -9
    result = sessions._outcome(target(), False, finished.returncode, finished.stdout, finished.stderr, 1.0,
                               finished.timed_out, finished.problem)
    assert result["error"] == "the sweep was stopped: it wrote over 4 MiB where a report of a few KiB belongs"


def test_stderr_without_end_keeps_only_its_last_part(tmp_path: Path) -> None:
    finished = _child(tmp_path, """
        import sys
        for _ in range(200):
            sys.stderr.buffer.write(b"y" * 65535 + b"\\n")
        sys.stderr.write("the last line\\n")
        sys.exit(3)
    """)
    assert len(finished.stderr) <= sessions.MAX_STDERR and finished.stderr.endswith(b"the last line\n")
    assert finished.returncode == 3 and finished.problem is None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "TERM_GRACE", 0.5)
    finished = _child(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.write('{"scanned": 1}\\n')
        sys.stdout.flush()
        while True:
            time.sleep(1)
    """, timeout=0.5)
    assert finished.timed_out and finished.returncode == -9
    assert json.loads(finished.stdout) == {"scanned": 1}  # what it said before is kept


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202eevil\u2066\u200b\ud800\x9b"


def test_a_report_is_taken_only_in_the_types_the_script_writes() -> None:
    report = {"scanned": "10", "deleted": True, "kept": 8, "errors": 1.5, "started_at": "yesterday", "busy": 1,
              "store": "/etc", "engine": "x", "duration": "long", "error": "forged", "holder": 42,
              "error_samples": [HOSTILE, 5, {"a": 1}, "x" * 5000], "priority_notes": "nice",
              "snapshot": {"file_path": "/s", "nested": {"no": 1}}}
    r = sessions._outcome(target(), False, 0, (json.dumps(report) + "\n").encode(), b"", 1.5, False)
    assert r["store"] == "/s" and r["engine"] == "django.contrib.sessions.backends.file"  # ours, not the child's
    assert r["kept"] == 8 and r["duration"] == 1.5 and "error" not in r
    assert not {"scanned", "deleted", "errors", "started_at", "busy", "holder", "priority_notes", "snapshot"} & set(r)
    assert r["error_samples"] == ["?]0;pwned??[2J?evil????", "x" * sessions.MAX_TEXT + "..."]
    assert status_lines.sweep(r) == "scanned 0, deleted 0, kept 8, errors 0, 1.50s"


def test_hostile_text_from_the_child_never_reaches_a_terminal() -> None:
    fatal = json.dumps({"fatal": HOSTILE}).encode()
    assert sessions._outcome(target(), False, 0, fatal, b"", 0.1, False)["error"] == "?]0;pwned??[2J?evil????"
    crashed = sessions._outcome(target(), False, 1, b"", f"Traceback\n{HOSTILE}\n".encode(errors="surrogatepass"),
                                0.1, False)
    assert crashed["error"].startswith("the sweep failed (1): ?]0;pwned") and "\x1b" not in crashed["error"]
    # A reply of the daemon's (or a fake one's) rendered by omerowebctl: the same.
    from omerowebd.commands import sessions as command

    shown = command.render({"engine": HOSTILE, "store": HOSTILE, "error": HOSTILE, "error_samples": [HOSTILE]})
    assert not any(c in shown for c in "\x1b\x07\u202e\u2066\u200b\x9b\ud800")


@pytest.mark.skipif(os.geteuid() != 0, reason="ptrace by the service user needs a second user")
def test_the_sweep_cannot_be_ptraced_by_another_process_of_its_user(tmp_path: Path) -> None:
    """prctl(PR_SET_DUMPABLE, 0) first thing: the kernel then gives the child's /proc to root and
    refuses ptrace to processes of the same user (this kernel has no Yama to do it)."""
    child = subprocess.Popen([sys.executable, str(Path(sweep_script.__file__))], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=NOBODY, group=NOBODY,
                             extra_groups=[], env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}, cwd="/")
    try:
        deadline = datetime.now() + timedelta(seconds=60)
        while os.stat(f"/proc/{child.pid}/status").st_uid != 0:  # it waits on stdin, not dumpable from its start
            assert datetime.now() < deadline and child.poll() is None, "the sweep stayed dumpable"
            time.sleep(0.01)
        seize = textwrap.dedent(f"""
            import ctypes, os, sys
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.ptrace(0x4206, {child.pid}, None, None)  # PTRACE_SEIZE: attach without stopping it
            sys.exit(0 if ok == 0 else ctypes.get_errno())
        """)
        tried = subprocess.run([sys.executable, "-c", seize], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                               timeout=60)
        assert tried.returncode == 1  # EPERM
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="root's side of the sweep needs root")
def test_roots_sweep_outlives_a_hostile_child(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sessions clear` as root, no daemon: the child runs as the store's owner (nobody here), who may
    ptrace it or own the venv it runs. Whatever it does, root's omerowebctl is back at sessions.timeout
    plus the grace, with a bounded report of printable text; what it left behind holds nothing of root's."""
    monkeypatch.setattr(sessions, "TERM_GRACE", 1.0)
    store = shared_dir / "sessions"
    store.mkdir(mode=0o700)
    os.chown(store, NOBODY, NOBODY)
    python = shared_dir / "python"  # the compromised child: root's file, run as nobody
    python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()  # leaves the group root kills; keeps stdout and stderr open
            open({str(store / "held.tmp")!r}, "w").write(str(os.getpid()))
            os.rename({str(store / "held.tmp")!r}, {str(store / "held")!r})
            time.sleep(300)
            os._exit(0)
        sys.stdout.write(json.dumps({{"fatal": {HOSTILE!r}}}) + "\\n")
        sys.stdout.flush()
        while True:
            sys.stderr.write({HOSTILE!r} * 1000)
            time.sleep(0.01)
    """))
    python.chmod(0o755)
    target = sessions.Target(engine="django.contrib.sessions.backends.file", kind="file", store=store,
                             omerodir=shared_dir, python=python, manage=Path("/m"),
                             settings=config_module.SessionsSettings(timeout=1.0))
    result = sessions.sweep_sync(target)
    held = store / "held"
    try:
        assert result["error"] == "?]0;pwned??[2J?evil????"  # its last word, made printable
        deadline = time.monotonic() + 60
        while not held.exists():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.01)
        grandchild = int(held.read_text())
        assert _alive(grandchild) and os.stat(held).st_uid == NOBODY  # still holding the pipes, as nobody
    finally:
        if held.exists():
            os.kill(int(held.read_text()), 9)


# -- one sweeper per store, across hosts ------------------------------------------------

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[2].encode())
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_elsewhere(store: Path, record: str) -> Iterator[None]:
    """Another process (as another host's sweeper would be, through NFS) holds the POSIX lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store / sweep_script.LOCK_NAME), record],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.kill()
        proc.wait(30)


def test_lock_is_posix_and_names_its_holder(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path, "web-2.example.org 4242\n"):
        with store_fd(tmp_path) as dfd:
            assert sweep_script.take_lock(dfd) == (None, "web-2.example.org 4242")
        assert sessions.lock_state(tmp_path) == {"held": True, "holder": "web-2.example.org 4242"}
    assert sessions.lock_state(tmp_path) == {"held": False, "holder": ""}
    with store_fd(tmp_path) as dfd:
        fd, holder = sweep_script.take_lock(dfd)
        assert fd is not None and holder is None
        record = (tmp_path / sweep_script.LOCK_NAME).read_text()
        assert record.strip() == f"{socket.gethostname()} {os.getpid()}" and len(record) == sweep_script.HOLDER_SIZE
        os.close(fd)


def test_a_shorter_record_leaves_nothing_of_a_longer_one(tmp_path: Path) -> None:
    """A record is written whole over the last holder's, never shortened after
    (a reader between a write and a truncate saw "host 77\n9")."""
    (tmp_path / sweep_script.LOCK_NAME).write_text("web-9 " + "9" * 10 + "\n" + "x" * 200)
    with store_fd(tmp_path) as dfd:
        fd, _ = sweep_script.take_lock(dfd)
        assert fd is not None
        try:
            assert sweep_script.read_holder(fd) == f"{socket.gethostname()} {os.getpid()}"
            assert os.fstat(fd).st_size == sweep_script.HOLDER_SIZE
        finally:
            os.close(fd)


HOLD_THEN_WRITE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
os.write(fd, sys.argv[2].encode())
print("written", flush=True)
sys.stdin.read()
"""


def test_a_holder_between_its_lock_and_its_write_is_still_named(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A new lock file is empty from the holder's lock to its write: a look in
    that moment waits for the record rather than say "unknown"."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_THEN_WRITE, str(tmp_path / sweep_script.LOCK_NAME),
                             "web-2 4242\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    looks = []

    def the_holder_writes_meanwhile(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) == 1:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "written"

    try:
        assert proc.stdout.readline().strip() == "locked"
        monkeypatch.setattr(sweep_script.time, "sleep", the_holder_writes_meanwhile)
        assert sessions.lock_state(tmp_path) == {"held": True, "holder": "web-2 4242"}
        assert len(looks) == 1
    finally:
        proc.kill()
        proc.wait(30)


def test_a_holder_record_that_is_not_host_and_pid_is_not_shown(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path, "\x1b]0;owned\x07 1\n"):
        assert sessions.lock_state(tmp_path) == {"held": True, "holder": ""}
    assert status_lines.sessions({"engine": "e", "sweeper": "omerowebd", "enabled": True, "note": "",
                                   "lock": {"held": True, "holder": ""}})[-2:] == [
        "  last:      none yet", "  lock:      held by an unknown sweeper"]


def test_status_says_who_holds_the_lock() -> None:
    status = {"engine": "e", "sweeper": "omerowebd", "enabled": True, "note": "",
              "lock": {"held": True, "holder": "web-2 77"}}
    assert "  lock:      held by host web-2, pid 77" in status_lines.sessions(status)
    status["lock"] = {"held": False, "holder": ""}
    assert "  lock:      free" in status_lines.sessions(status)


def test_lock_state_never_follows_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host 1\n")
    store = tmp_path / "store"
    store.mkdir()
    (store / sweep_script.LOCK_NAME).symlink_to(secret)
    assert sessions.lock_state(store)["held"] is None  # ELOOP: nothing read through it
    link = tmp_path / "store-link"
    link.symlink_to(store)
    assert sessions.lock_state(link)["held"] is None


def test_a_lock_check_that_hangs_never_starves_the_daemons_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a hung NFS mount the look never returns: each status waits on that one look for at most
    LOCK_CHECK_TIMEOUT after it began (no second one piles up behind it) and every other
    asyncio.to_thread of the daemon still runs."""
    import asyncio
    import threading

    release = threading.Event()
    calls: list[Path] = []

    def hung(store: Path) -> dict[str, object]:
        calls.append(store)
        release.wait()
        return {"held": False, "holder": ""}

    monkeypatch.setattr(sessions, "lock_state", hung)
    monkeypatch.setattr(sessions, "LOCK_FRESH", 0.0)
    monkeypatch.setattr(sessions, "LOCK_CHECK_TIMEOUT", 0.05)
    service = sessions.SessionService(SimpleNamespace())
    config = parse("")
    service.update(config, sessions.pinned_properties(config), info())

    async def main() -> list[int]:
        try:
            for _ in range(40):  # more statuses than the default pool has threads (at most 32)
                await service.refresh_lock()
            assert service.lock is not None and service.lock["held"] is None
            assert "no answer" in service.lock["error"]
            return await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(int, "1") for _ in range(64))), 60)
        finally:
            release.set()  # the stuck look ends (or asyncio.run would wait for it at its end)

    assert asyncio.run(main()) == [1] * 64
    assert len(calls) == 1


def test_the_lock_is_looked_at_when_status_asks_and_never_on_a_clock(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    import asyncio
    import dataclasses
    import threading

    calls: list[Path] = []
    real = sessions.lock_state
    gate = threading.Event()  # a look started before the test asks for one stays in sight

    def counted(store: Path) -> dict[str, object]:
        gate.wait(60)
        calls.append(store)
        return real(store)

    monkeypatch.setattr(sessions, "lock_state", counted)
    service = sessions.SessionService(SimpleNamespace())
    config = parse("at_start = false")
    service.update(config, sessions.pinned_properties(config), info())
    assert service.target is not None and service.target.kind == "file"
    service.target = dataclasses.replace(service.target, store=tmp_path)

    async def main() -> None:
        before = set(threading.enumerate())  # (other tests' kept threads)
        runs = asyncio.create_task(service.run())  # the schedule: nothing due for hours
        try:
            for _ in range(1000):
                if service.next_at is not None:  # the service's loop has run its first step
                    break
                await asyncio.sleep(0.01)
            assert service.next_at is not None
            looks = [t for t in threading.enumerate() if t.name.startswith("omerowebd-") and t not in before]
            assert not looks and not calls, "a look at the lock nobody asked for"
            gate.set()
            await service.refresh_lock()
            assert service.lock is not None and service.lock["held"] is False
            await service.refresh_lock()  # a status flood: one look serves it
            assert len(calls) == 1
            monkeypatch.setattr(sessions, "LOCK_FRESH", 0.0)
            await service.refresh_lock()
            assert len(calls) == 2
        finally:
            runs.cancel()

    asyncio.run(main())


# -- gentleness ---------------------------------------------------------------------------


def test_tcp_ports_of_bind_addresses() -> None:
    assert sessions.tcp_ports(("127.0.0.1:4080", "[::1]:4080", "unix:/run/x.sock", "0.0.0.0:8080")) == (4080, 8080)


def test_pacer_sees_requests_waiting_and_being_served() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        pacer = sweep_script.Pacer([port], check_every=0)
        assert pacer.site_busy() is False
        assert sweep_script.Pacer([]).pace() == 0.0  # no ports known: never pauses
        with socket.create_connection(("127.0.0.1", port)):  # queued, not yet accepted
            assert pacer.site_busy() is True
            conn, _ = listener.accept()  # accepted: a request in progress
            with conn:
                assert pacer.site_busy() is True
                assert pacer.pace() > 0 and pacer.busy
        conn.close()
        assert wait_until(lambda: not pacer.site_busy())


def wait_until(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
