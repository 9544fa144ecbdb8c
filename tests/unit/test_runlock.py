"""One daemon per runtime directory (omerowebd/runlock.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from omerowebd import runlock
from omerowebd.errors import UserError


def test_the_second_is_refused_naming_the_first_and_a_clean_stop_leaves_nothing_to_report(tmp_path):
    first = runlock.acquire(tmp_path / "run")
    assert first.previous is None
    assert (tmp_path / "run" / "omerowebd.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(runlock.RuntimeDirBusy) as refused:
        runlock.acquire(tmp_path / "run")
    assert refused.value.exit_code == 75
    assert f"another omerowebd (pid {os.getpid()}) is already running on {tmp_path / 'run'}" in str(refused.value)
    first.release()
    assert (tmp_path / "run" / "omerowebd.lock").read_text() == ""
    assert runlock.acquire(tmp_path / "run").previous is None


def test_a_holder_that_died_leaves_its_pid_and_no_lock(tmp_path):
    code = f"from omerowebd import runlock; runlock.acquire(__import__('pathlib').Path({str(tmp_path / 'run')!r})); import os; os._exit(9)"
    dead = subprocess.run([sys.executable, "-c", code], check=False)
    assert dead.returncode == 9
    lock = runlock.acquire(tmp_path / "run")  # the kernel dropped the dead one's lock
    assert lock.previous is not None and lock.previous != os.getpid()


def test_a_planted_hard_link_is_locked_but_never_written(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    os.link(victim, tmp_path / "run" / "omerowebd.lock")
    lock = runlock.acquire(tmp_path / "run")
    lock.release()
    assert victim.read_text() == "precious\n"


def test_a_planted_symbolic_link_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "omerowebd.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError) as refused:
        runlock.acquire(tmp_path / "run")
    assert "cannot open" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "elsewhere").exists()
