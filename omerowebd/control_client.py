"""omerowebctl's side of the control socket (RUNTIME_DIR/control.sock, one JSON object per line).

Blocking, and light to import: every command that talks to the daemon
(status, reload, sessions, rollout, ...) starts here, often as root, and its
start-up is part of what a reload costs. The daemon's side is
:mod:`omerowebd.control`.

Whatever answers on the socket is the service user's process, and the runtime
dir is that user's: it may put a link to any socket there, or its own server.
So the client connects only to a socket (never through a link) made by the
runtime dir's owner and served by that same user, waits a finite time for
everything, reads a bounded reply, and treats the reply as data: printable
text only, fields read with their type checked (printable.py).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, NamedTuple

from . import printable
from .errors import UserError
from .exits import EXIT_NOPERM, EXIT_UNREACHABLE

CONNECT_TIMEOUT = 5.0
# The longest wait a socket can be given is bounded (the kernel's time type), and a config may
# ask for more (daemon.ready_timeout = 1e30 is a number of seconds): no reload takes a year.
MAX_WAIT = 365 * 86400.0
# A reply is one line; status with every worker and sweep fits in far less.
MAX_REPLY = 16 << 20


class DaemonUnreachable(UserError):
    exit_code = EXIT_UNREACHABLE


class PermissionDenied(UserError):
    """The daemon answered, and refused: the peer lacks the standing the command needs."""

    exit_code = EXIT_NOPERM


_NO_PERMISSION = "no permission to use {path}: run as root or as a member of the daemon's group"


class DaemonNotRunning(DaemonUnreachable):
    """No socket at the path, or nobody listening on it."""


class UntrustedSocket(DaemonUnreachable):
    """Something is at the socket path, but not a socket omerowebd can have made; nothing was sent."""


class _Opened(NamedTuple):
    fd: int  # an O_PATH descriptor of the socket itself, never of a link
    owner: int  # uid that made it
    dir_owner: int
    dir_mode: int


def _open_socket_path(path: Path) -> _Opened:
    parent, name = os.path.split(os.path.abspath(path))
    try:
        dfd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DaemonNotRunning(f"omerowebd is not running (no control socket at {path})") from None
    except OSError as e:
        raise DaemonUnreachable(f"cannot reach {path}: {e.strerror}") from None
    try:
        dst = os.fstat(dfd)
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise DaemonNotRunning(f"omerowebd is not running (no control socket at {path})") from None
        except PermissionError:  # the runtime dir is the daemon's user's and group's (0750)
            raise PermissionDenied(_NO_PERMISSION.format(path=path)) from None
        except OSError as e:
            raise DaemonUnreachable(f"cannot reach {path}: {e.strerror}") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode):
        os.close(fd)
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise UntrustedSocket(f"refusing to talk to {path}: it is {what}, not omerowebd's control socket (whoever "
                              f"can write {parent} put it there): remove it, then restart omerowebd")
    return _Opened(fd=fd, owner=st.st_uid, dir_owner=dst.st_uid, dir_mode=dst.st_mode)


def _identity_problem(opened: _Opened, server_uid: int) -> str | None:
    """Why the process serving the socket cannot be the daemon; None when it can be.

    The daemon makes its socket itself, in its runtime dir, which belongs to
    the user it runs as (systemd's RuntimeDirectory=, or whoever made it by
    hand). So in a directory of another user's, only that user's process
    counts, serving a socket it made: not a root service's socket linked in
    (/run/dbus's is anybody's to hard-link), not a socket made by one user
    and served by another. In a directory of root's, whoever root let make
    the socket there counts, but not in one anybody may write (a sticky /tmp).
    """
    if server_uid != 0 and opened.owner != server_uid:
        return f"the process serving it runs as uid {server_uid}, but uid {opened.owner} made it"
    if opened.dir_owner != 0 and server_uid != opened.dir_owner:
        return f"it is served as uid {server_uid}, but its directory belongs to uid {opened.dir_owner}"
    if opened.dir_owner == 0 and opened.dir_mode & stat.S_IWOTH and server_uid not in (0, os.geteuid()):
        return f"it is served as uid {server_uid}, in a directory anybody may write"
    return None


def connect(path: Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A socket connected to the daemon at ``path``, checked as described above; DaemonUnreachable otherwise."""
    opened = _open_socket_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            # Through the descriptor: a link swapped in after the check is never followed.
            target = f"/proc/self/fd/{opened.fd}" if os.path.isdir("/proc/self/fd") else str(path)
            _connect(s, target, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"omerowebd is not running (nobody answers on {path})") from None
        except PermissionError:
            raise PermissionDenied(_NO_PERMISSION.format(path=path)) from None
        except OSError as e:
            raise DaemonUnreachable(f"omerowebd does not answer on {path}: {e.strerror}") from None
        try:
            server_uid = _server_uid(s)
        except OSError as e:
            raise UntrustedSocket(f"refusing to talk to {path}: the kernel does not say who serves it ({e.strerror})"
                                  ) from None
        problem = _identity_problem(opened, server_uid)
        if problem:
            raise UntrustedSocket(f"refusing to talk to {path}: {problem}, so it is not omerowebd's: stop whatever "
                                  "serves it, remove it, then restart omerowebd")
        return s
    except BaseException:
        s.close()
        raise
    finally:
        os.close(opened.fd)


def _server_uid(s: socket.socket) -> int:
    """The uid of the process serving ``s``, as the kernel recorded it when it listened (SO_PEERCRED).

    The same record as the daemon's access.peer_of, without its groups and
    policy (and their imports: this module is every command's start-up)."""
    _, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _connect(s: socket.socket, target: str | Path, timeout: float = CONNECT_TIMEOUT) -> None:
    """connect(), waiting for room while the daemon's queue is full (a flood of clients)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(str(target))
            return
        except BlockingIOError:  # a unix socket says EAGAIN, not "in progress", when the queue is full
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, f"its queue stayed full for {timeout:.0f}s") from None
            time.sleep(0.01)


def request(path: Path, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request, return the reply, all within ``timeout`` seconds (connecting included).

    DaemonUnreachable if nobody answers (or not the daemon, or not in time);
    PermissionDenied if the daemon refuses the caller."""
    if not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"a control request needs a finite timeout, not {timeout!r}")
    timeout = min(timeout, MAX_WAIT)
    deadline = time.monotonic() + timeout
    with connect(path, min(CONNECT_TIMEOUT, timeout)) as s:
        buf = b""
        try:
            try:
                s.settimeout(_left(deadline))
                s.sendall(json.dumps(payload).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may have said why it closed (too busy) before we sent: read that
            chunks: list[bytes] = []
            size = 0
            while True:
                s.settimeout(_left(deadline))  # one deadline for the whole reply, however it trickles in
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
                if size > MAX_REPLY:
                    raise DaemonUnreachable(f"what answers on {path} sent a reply over {MAX_REPLY >> 20} MiB")
            buf = b"".join(chunks)
        except socket.timeout:
            raise DaemonUnreachable(f"omerowebd did not answer within {timeout:.0f}s") from None
        except OSError as e:
            if not buf:
                raise DaemonUnreachable(f"omerowebd closed {path} without answering: {e.strerror}") from None
    if not buf:
        raise DaemonUnreachable(f"omerowebd closed {path} without answering")
    try:
        reply = printable.structure(json.loads(buf))
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise DaemonUnreachable(f"what answers on {path} does not speak omerowebd's protocol")
    if reply.get("refused") == "permission":
        raise PermissionDenied(str(reply.get("error", "permission denied")))
    return reply


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout()
    return left
