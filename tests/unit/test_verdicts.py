"""verdicts.py: the venv's answer remembered across starts, used only for exactly the config and venv it was
given for, and only from a file the daemon's own user wrote; confirmed (or contradicted) once gunicorn serves.

A fake prober stands in for the venv: it counts the questions and answers what the test sets.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sys
import textwrap
from pathlib import Path

import pytest

from omerowebd import venv as venv_module
from omerowebd.config import Config, parse
from omerowebd.errors import ConfigError, ConfigErrors
from omerowebd.venv import VenvInfo, fingerprint
from omerowebd.verdicts import NAME, Verdicts

NOBODY = pwd.getpwnam("nobody")


class FakeProber:
    def __init__(self, info: VenvInfo) -> None:
        self.info = info
        self.asked = 0
        self.refuse: str | None = None

    async def probe(self, venv: Path, properties: object, omerodir: object = None, packages: object = None) -> VenvInfo:
        self.asked += 1
        if self.refuse:
            raise ConfigError(self.refuse)
        return self.info


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv that passes layout_problems, and the dirs a config names; the root walk is trust.py's to test."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    packages = venv / "lib" / "python3.10" / "site-packages"
    for package in ("omeroweb", "gunicorn", "Django-4.2.dist-info"):
        (packages / package).mkdir(parents=True)
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(venv_module, "_root_refusal", lambda *a: None)
    return tmp_path


def config_for(root: Path, logo: str = "/static/a.png") -> Config:
    text = textwrap.dedent(f"""\
        [daemon]
        omerodir = "{root / 'omerodir'}"
        venv = "{root / 'venv'}"
        state_dir = "{root / 'state'}"
        runtime_dir = "{root / 'run'}"

        [nginx]
        enabled = false

        [omero.web]
        login_logo = "{logo}"
        """)
    return parse(text.encode(), root / "omerowebd.toml")


def info_for(root: Path, version: str = "5.29.0") -> VenvInfo:
    return VenvInfo(venv=root / "venv", versions={"omero-web": version}, omeroweb_dir=root / "venv" / "omeroweb",
                    catalogue={"omero.web.login_logo": {"kind": "str", "default": None}}, errors={})


def test_a_remembered_answer_is_used_for_the_same_config_and_venv(site):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    path = site / "state" / NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert Verdicts(config.daemon.state_dir).recall(config, packages) == info


def test_a_changed_config_misses(site):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    assert Verdicts(config.daemon.state_dir).recall(config_for(site, "/static/b.png"), packages) is None


def test_a_changed_venv_misses(site):
    config, info = config_for(site), info_for(site)
    before = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, before, info)
    # pip install -U django: the dist-info is new.
    packages = site / "venv" / "lib" / "python3.10" / "site-packages"
    (packages / "Django-4.2.dist-info").rename(packages / "Django-5.0.dist-info")
    after = fingerprint(config.daemon.venv)
    assert after != before
    assert Verdicts(config.daemon.state_dir).recall(config, after) is None


def test_an_answer_with_refused_properties_is_never_remembered(site):
    config = config_for(site)
    packages = fingerprint(config.daemon.venv)
    refused = VenvInfo(**{**info_for(site).__dict__, "errors": {"omero.web.login_logo": "no"}})
    Verdicts(config.daemon.state_dir).remember(config, packages, refused)
    assert not (site / "state" / NAME).exists()


@pytest.mark.parametrize("damage", ["garbage", "wrong shape", "group writable", "link", "directory"])
def test_a_damaged_file_is_ignored_and_said(site, damage, capsys):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    path = site / "state" / NAME
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "wrong shape":
        record = json.loads(path.read_text())
        record["answer"]["catalogue"] = ["not", "a", "table"]
        path.write_text(json.dumps(record))
    elif damage == "group writable":
        os.chmod(path, 0o620)
    elif damage == "link":
        real = site / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    assert Verdicts(config.daemon.state_dir).recall(config, packages) is None
    assert "ignoring the remembered venv answer" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_a_file_of_another_user_is_ignored(site, capsys):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    os.chown(site / "state" / NAME, NOBODY.pw_uid, NOBODY.pw_gid)
    assert Verdicts(config.daemon.state_dir).recall(config, packages) is None
    assert "owned by uid" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="the root rules apply to a daemon run as root")
def test_root_neither_reads_nor_writes_it_in_a_state_dir_the_service_user_controls(site, capsys):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    state = site / "state"
    Verdicts(state).remember(config, packages, info)  # root's file, in a dir root alone controls: used
    assert Verdicts(state).recall(config, packages) == info
    os.chown(state, NOBODY.pw_uid, NOBODY.pw_gid)  # the service user could now swap the file at will
    assert Verdicts(state).recall(config, packages) is None
    assert "root trusts only what root alone controls" in capsys.readouterr().out
    (state / NAME).unlink()
    Verdicts(state).remember(config, packages, info)
    assert not (state / NAME).exists()


def test_a_start_on_a_remembered_answer_asks_the_venv_once_it_serves(site):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    prober = FakeProber(info)

    async def scenario() -> None:
        first = Verdicts(config.daemon.state_dir)
        assert (await first.check(config, prober, packages))[0] == info  # nothing remembered: asked
        assert prober.asked == 1 and first.hits == 0
        assert await first.confirm(config, prober, packages) is None  # asked already: nothing more
        assert prober.asked == 1
        first.remember(config, packages, info)

        second = Verdicts(config.daemon.state_dir)
        assert (await second.check(config, prober, packages))[0] == info
        assert prober.asked == 1 and second.hits == 1  # not asked before the start
        assert await second.confirm(config, prober, packages) is None  # asked now, and it agrees
        assert prober.asked == 2
        assert (site / "state" / NAME).exists()

    asyncio.run(scenario())


def test_the_venv_answering_otherwise_is_returned_and_the_file_forgotten(site):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    fresh = info_for(site, "5.29.1")  # an in-place change no package fingerprint saw
    prober = FakeProber(fresh)

    async def scenario() -> None:
        verdicts = Verdicts(config.daemon.state_dir)
        await verdicts.check(config, prober, packages)
        assert await verdicts.confirm(config, prober, packages) == fresh
        assert not (site / "state" / NAME).exists()

    asyncio.run(scenario())


def test_the_venv_refusing_now_fails_the_start(site):
    config, info = config_for(site), info_for(site)
    packages = fingerprint(config.daemon.venv)
    Verdicts(config.daemon.state_dir).remember(config, packages, info)
    prober = FakeProber(info)
    prober.refuse = "venv: cannot import omeroweb.settings: ImportError: half installed"

    async def scenario() -> None:
        verdicts = Verdicts(config.daemon.state_dir)
        await verdicts.check(config, prober, packages)
        with pytest.raises(ConfigErrors, match="half installed"):
            await verdicts.confirm(config, prober, packages)
        assert not (site / "state" / NAME).exists()

    asyncio.run(scenario())


def test_what_misses_the_remembered_answer_misses_the_remembered_spawn_too(site):
    # The early start's key (spawn_record.key, before the daemon's imports) must see every venv change the
    # remembered answer's key sees, else gunicorn is spawned early on a venv whose answer is then asked again.
    from omerowebd import spawn_record
    venv = str(site / "venv")
    packages = site / "venv" / "lib" / "python3.10" / "site-packages"
    dist_info = packages / "Django-4.2.dist-info"
    before = (fingerprint(Path(venv)), spawn_record.key("digest", venv))
    directory = os.stat(packages)
    os.utime(dist_info, ns=(1, 1))  # reinstalled in place: the entry's mtime moves, the directory's does not
    os.utime(packages, ns=(directory.st_atime_ns, directory.st_mtime_ns))
    after = (fingerprint(Path(venv)), spawn_record.key("digest", venv))
    assert after[0] != before[0], "the remembered answer misses"
    assert after[1] != before[1], "so the remembered spawn misses too"
