"""One daemon per runtime directory.

The runtime directory holds the daemon's control socket, the socket its
gunicorn generations report to and their per-generation files. A second
daemon on the same directory would take those over (replace the sockets,
delete them when it stops) and leave the first one deaf and unreachable, so
it is refused before it touches anything: an flock on
``RUNTIME_DIR/omerowebd.lock``, held for the daemon's life. The kernel drops
it when the process dies, however it dies, so a daemon killed with SIGKILL
never blocks the next one.

The file holds the holder's pid while it runs and is emptied at a clean
stop: a pid found there by the next daemon means the previous one did not
stop cleanly, which is worth a line in the journal.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from .errors import UserError
from .exits import EXIT_LOCKED

LOCK_NAME = "omerowebd.lock"


class RuntimeDirBusy(UserError):
    """Another omerowebd holds the runtime directory."""

    exit_code = EXIT_LOCKED


class RuntimeLock:
    """The flock on ``RUNTIME_DIR/omerowebd.lock``; ``previous`` is the pid an unclean stop left, if any."""

    def __init__(self, path: Path, fd: int, previous: int | None, writable: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self.previous = previous
        self._writable = writable

    def release(self) -> None:
        """A clean stop: empty the file (no unclean stop to report next time), then drop the lock."""
        if self._fd is None:
            return
        if self._writable:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # the next daemon reports an unclean stop: harmless
        os.close(self._fd)
        self._fd = None


def acquire(runtime_dir: Path) -> RuntimeLock:
    """Take the runtime directory, or raise RuntimeDirBusy naming the daemon that has it.

    Creates the directory if needed (mode 0750, as the daemon would). The
    lock file is opened without following a link and is never inherited by
    gunicorn (O_CLOEXEC): an orphaned gunicorn must not keep the next daemon out.
    """
    path = runtime_dir / LOCK_NAME
    try:
        runtime_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o640)
    except OSError as e:
        raise UserError(f"cannot open {path}: {e.strerror}: daemon.runtime_dir must be a directory the daemon's "
                        "user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"omerowebd (pid {holder})" if holder else "omerowebd"
        raise RuntimeDirBusy(f"another {who} is already running on {runtime_dir}: stop it first "
                             "(systemctl stop omerowebd), or give this one its own daemon.runtime_dir") from None
    # The runtime dir is the service user's: a daemon run as root writes the
    # pid only into a plain file of its own, never into one planted there (a
    # hard link to a root file would be truncated). The lock works either way.
    st = os.fstat(fd)
    writable = stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()
    previous = _read_pid(fd) if stat.S_ISREG(st.st_mode) else None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RuntimeLock(path, fd, previous if previous != os.getpid() else None, writable)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
