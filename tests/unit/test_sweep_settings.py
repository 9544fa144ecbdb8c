"""The sweep's Django settings, remembered across daemon restarts: trusted only as the venv answer is."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from omerowebd import sessions, sweep_settings
from omerowebd.config import SessionsSettings

SNAPSHOT = {"engine": "django.contrib.sessions.backends.file", "cookie_name": "sessionid", "cookie_age": 1800,
            "use_tz": True, "time_zone": "UTC", "config_digest": "ab" * 32, "venv": "cd" * 32}


def target(tmp_path: Path, config_xml: str = "<icegrid/>") -> sessions.Target:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (tmp_path / "store").mkdir(exist_ok=True)  # a root daemon sweeps as its owner
    return sessions.Target(engine="django.contrib.sessions.backends.file", kind="file", store=tmp_path / "store",
                           omerodir=tmp_path / "omerodir", python=Path("/usr/bin/python3"), manage=tmp_path / "m.py",
                           settings=SessionsSettings(), config_xml=config_xml, state_dir=state)


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append(event)

    def info(self, event: str, **fields: Any) -> None:
        pass


def sweep_twice(monkeypatch: pytest.MonkeyPatch, services: list[sessions.SessionService],
                t: sessions.Target) -> list[Any]:
    """One sweep in each service (each a daemon's life); what each handed its child as the snapshot."""
    given: list[Any] = []

    async def child(target: sessions.Target, dry_run: bool = False, snapshot: Any = None) -> dict[str, Any]:
        given.append(snapshot)
        return {"snapshot": dict(SNAPSHOT), "engine": target.engine}
    monkeypatch.setattr(sessions, "sweep", child)
    for service in services:
        service.target = t
        asyncio.run(service.sweep_now())
    return given


def test_a_restarted_daemon_hands_its_first_sweep_the_settings_learnt_before(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    t = target(tmp_path)
    given = sweep_twice(monkeypatch, [sessions.SessionService(Log()), sessions.SessionService(Log())], t)
    assert given == [None, SNAPSHOT]  # the second daemon's first sweep needs no import of omeroweb.settings
    path = t.state_dir / sweep_settings.NAME
    assert (path.stat().st_mode & 0o777) == 0o600 and path.stat().st_uid == os.geteuid()


def test_another_config_means_no_remembered_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep_twice(monkeypatch, [sessions.SessionService(Log())], target(tmp_path))
    given = sweep_twice(monkeypatch, [sessions.SessionService(Log())], target(tmp_path, "<icegrid> </icegrid>"))
    assert given == [None]


def remembered(tmp_path: Path) -> tuple[Path, str]:
    t = target(tmp_path)
    wanted = sessions._settings_key(t, os.geteuid())
    assert sweep_settings.remember(t.state_dir, wanted, SNAPSHOT)
    assert sweep_settings.recall(t.state_dir, wanted) == (SNAPSHOT, None)
    return t.state_dir / sweep_settings.NAME, wanted


def test_a_link_is_never_followed(tmp_path: Path) -> None:
    path, wanted = remembered(tmp_path)
    real = tmp_path / "elsewhere.json"
    path.rename(real)
    path.symlink_to(real)
    snapshot, why = sweep_settings.recall(path.parent, wanted)
    assert snapshot is None and why and "link" in why


def test_a_file_others_may_write_is_ignored(tmp_path: Path) -> None:
    path, wanted = remembered(tmp_path)
    for mode in (0o620, 0o602):
        path.chmod(mode)
        snapshot, why = sweep_settings.recall(path.parent, wanted)
        assert snapshot is None and why and ("others may write" in why or "writable by" in why)


def test_anything_but_what_omerowebd_writes_is_ignored(tmp_path: Path) -> None:
    path, wanted = remembered(tmp_path)
    for text in ("not json", json.dumps({"key": wanted, "snapshot": {"nested": {"a": 1}}}), json.dumps([1])):
        path.write_text(text)
        snapshot, why = sweep_settings.recall(path.parent, wanted)
        assert snapshot is None and why == "not what omerowebd writes"
    path.unlink()
    path.mkdir()
    assert sweep_settings.recall(path.parent, wanted)[0] is None


def test_the_wrong_key_is_no_snapshot_and_no_complaint(tmp_path: Path) -> None:
    path, wanted = remembered(tmp_path)
    assert sweep_settings.recall(path.parent, "0" * 64) == (None, None)
    assert sweep_settings.recall(tmp_path / "nowhere", wanted) == (None, None)


def test_the_key_follows_config_store_engine_interpreter_and_user(tmp_path: Path) -> None:
    base = {"config_xml": "<icegrid/>", "store": tmp_path / "s", "engine": "e", "omerodir": tmp_path,
            "python": Path("/usr/bin/python3"), "uid": 0}
    keys = {sweep_settings.key(**base)}
    for change in ({"config_xml": "<x/>"}, {"store": tmp_path / "t"}, {"engine": "f"}, {"omerodir": tmp_path / "o"},
                   {"python": Path("/bin/sh")}, {"uid": 998}):
        keys.add(sweep_settings.key(**{**base, **change}))
    assert len(keys) == 7 and sweep_settings.key(**base) in keys


def test_a_file_another_user_owns_is_ignored(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path, wanted = remembered(tmp_path)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    snapshot, why = sweep_settings.recall(path.parent, wanted)
    assert snapshot is None and why


def test_root_never_trusts_nor_writes_a_state_dir_the_service_user_can_write(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root rule needs root")
    path, wanted = remembered(tmp_path)  # root's file, mode 0600
    nobody = pwd.getpwnam("nobody")
    os.chown(path.parent, nobody.pw_uid, nobody.pw_gid)  # the service user's state dir
    snapshot, why = sweep_settings.recall(path.parent, wanted)
    assert snapshot is None and why and "root trusts only what root alone controls" in why
    path.unlink()
    assert not sweep_settings.remember(path.parent, wanted, SNAPSHOT) and not path.exists()
    # And the daemon's first sweep then starts without one, saying why only when a file was there.
    log = Log()
    given = sweep_twice(monkeypatch, [sessions.SessionService(log)], target(tmp_path))
    assert given == [None] and not path.exists() and log.warnings == []


def test_settings_learnt_by_one_user_never_go_to_another_users_sweep(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A root daemon sweeps as the store's owner: once the store is chowned (to root, say), the settings a
    service user's sweep learnt (its serializer is an import path) go neither from memory nor from the file."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the store away")
    t = target(tmp_path)
    nobody = pwd.getpwnam("nobody")
    os.chown(t.store, nobody.pw_uid, nobody.pw_gid)
    service = sessions.SessionService(Log())
    assert sweep_twice(monkeypatch, [service, service], t) == [None, SNAPSHOT]  # nobody's, twice
    os.chown(t.store, 0, 0)
    assert sweep_twice(monkeypatch, [service], t) == [None]  # root's sweep: not from memory
    assert sweep_twice(monkeypatch, [sessions.SessionService(Log())], t) == [SNAPSHOT]  # root's own, remembered
    os.chown(t.store, nobody.pw_uid, nobody.pw_gid)
    assert sweep_twice(monkeypatch, [sessions.SessionService(Log())], t) == [None]  # not root's for nobody
