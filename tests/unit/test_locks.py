"""locks.py: an flock waited for up to a deadline."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from omerowebd.locks import flock_within

HOLDER = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"


def test_a_free_lock_is_taken_and_a_held_one_is_not(tmp_path: Path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        fd = os.open(path, os.O_RDWR)
        try:
            assert flock_within(fd, 0.2) is False
            assert holder.stdin is not None
            holder.stdin.close()  # the holder exits: its lock goes with it
            assert holder.wait(timeout=60) == 0
            assert flock_within(fd, 60) is True
            # held now by this fd: another open file description cannot take it
            other = os.open(path, os.O_RDWR)
            try:
                assert flock_within(other, 0) is False
            finally:
                os.close(other)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=60)
