"""Writing files the way every output of the daemon is written.

Temp file in the same directory, fsync, rename, fsync the directory; and only
when the content changed, so that watchers (nginx path units, omero-web
reading config.xml) see a change only when there is one.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_regular(path: Path) -> tuple[bytes, int] | None:
    """The bytes and permission bits of ``path`` if it is a regular file (not a link); else None.

    Never blocks: a FIFO put where an output goes (by mistake, or by the user whose
    directory it is) would hold an open for reading until someone writes to it, and
    a reload with it. Missing, a link, a FIFO, a device, unreadable: None, and the
    caller replaces it (the write says what is wrong, if anything)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(), st.st_mode & 0o777
    except OSError:
        return None
    finally:
        os.close(fd)


def holds(path: Path, data: bytes, mode: int) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly ``data``, with ``mode``."""
    return read_regular(path) == (data, mode)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> bool:
    """Replace ``path`` with ``data`` unless it already holds exactly that.

    ``owner`` (uid, gid) is given to the new file before it takes the name,
    e.g. to keep a root:omero-web config readable by the service.
    Returns whether the file changed. Readers never see a partial file.
    """
    if holds(path, data, mode):
        return False
    try:
        fd, tmp = _temporary(path)
    except OSError as e:
        raise WriteError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)  # after fchown, which clears set-id bits
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here at the latest, before the rename
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)
    return True


def _temporary(path: Path) -> tuple[int, str]:
    """A new, empty file beside ``path`` (O_EXCL, not through a link, 0600), as tempfile.mkstemp makes one.

    Not tempfile itself: it imports shutil and random (about 8 ms), which the
    early start would pay before gunicorn's spawn (spawn_record.py writes the
    first generation's config.xml with write_atomic)."""
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp"))
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(path))


class WriteError(OSError):
    """An output could not be written (disk full, read-only, no permission); the old file is untouched.

    Its text names the file and says so, because it reaches status and the
    log as it is: "[Errno 28] No space left on device" alone says neither.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (the previous file is kept whole)"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
