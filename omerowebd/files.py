"""Writing files the way every output of the daemon is written.

Temp file in the same directory, fsync, rename, fsync the directory; and only
when the content changed, so that watchers (nginx path units, omero-web
reading config.xml) see a change only when there is one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> bool:
    """Replace ``path`` with ``data`` unless it already holds exactly that.

    ``owner`` (uid, gid) is given to the new file before it takes the name,
    e.g. to keep a root:omero-web config readable by the service.
    Returns whether the file changed. Readers never see a partial file.
    """
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except FileNotFoundError:
        pass
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
