"""Waiting a while for an flock: the editor's lock beside the TOML, ``omero config``'s beside config.xml.

A blocking ``flock`` would wait forever behind a stuck holder; this polls
up to a deadline and says whether it got the lock, so the caller can name
the holder's file in one line. A leaf module: it imports nothing of omerowebd.
"""

from __future__ import annotations

import fcntl
import time
from typing import IO

POLL = 0.05


def flock_within(fd: int | IO[str] | IO[bytes], timeout: float) -> bool:
    """Take an exclusive flock on ``fd``, waiting up to ``timeout`` seconds; False if another holds it still."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
