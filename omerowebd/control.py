"""The control socket: RUNTIME_DIR/control.sock, one JSON object per line.

A request is ``{"cmd": "status"}`` (plus arguments); the reply is one JSON
object. The server lives in the daemon's loop; the client is blocking, for
omerowebctl.

Whoever connects is judged by the kernel's record of the peer (see
:mod:`omerowebd.access`), and nothing a client sends or fails to send can
hold up another: a request line has a size limit and a deadline, a reply a
write deadline, and the number of clients a cap well below the daemon's file
limit, at which the longest-idle client of the same or a lower standing
makes room for a new one.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from . import access, log, printable
from .access import Level, Peer, Policy
from .errors import UserError
from .exits import EXIT_NOPERM, EXIT_UNREACHABLE

MAX_LINE = 64 << 10  # a request is a few dozen bytes; asyncio buffers at most twice this per client
MAX_CLIENTS = 64
BACKLOG = 64  # connections the kernel queues (without a descriptor of ours) while we admit others
ACCEPT_RETRY = 0.5
CONNECT_TIMEOUT = 5.0
CLOSE_GRACE = 2.0  # seconds a reply in progress gets when the daemon stops (the unit's stop timeout is short)
LINE_TIMEOUT = 15.0  # seconds from the last reply (or connect) to a whole request line
WRITE_TIMEOUT = 10.0  # seconds a client may take to read a reply
REFUSALS_LOGGED = 20  # a minute, per uid

# A reply is one line; status with every worker and sweep fits in far less.
MAX_REPLY = 16 << 20

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class DaemonUnreachable(UserError):
    exit_code = EXIT_UNREACHABLE


class PermissionDenied(UserError):
    """The daemon answered, and refused: the peer lacks the standing the command needs."""

    exit_code = EXIT_NOPERM


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    peer: Peer
    level: Level | None
    writer: asyncio.StreamWriter | None = None  # once its streams are set up
    busy: bool = False  # a request is being answered: never evicted then
    evicted: bool = False
    since: float = dataclass_field(default_factory=time.monotonic)

    def drop(self) -> None:
        """Close the connection now, dropping whatever it has not read."""
        if self.writer is not None:
            self.writer.transport.abort()
        else:
            self.evicted = True  # its task closes the socket as soon as it runs


def fd_budget() -> int:
    """Clients the daemon can afford: an eighth of its file limit, for everything else it holds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(4, soft // 8) if soft != resource.RLIM_INFINITY else MAX_CLIENTS


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, policy: Policy | None = None,
                 max_clients: int = MAX_CLIENTS, line_timeout: float = LINE_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.path = path
        self.handler = handler
        self.policy = policy or access.policy(None)  # replaced when daemon.admin_group changes
        self.max_clients = min(max_clients, fd_budget())
        self.line_timeout = line_timeout
        self.write_timeout = write_timeout
        self.log = log.get()
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._closing = False
        self._refusals: dict[int, tuple[float, int]] = {}  # uid -> (start of the minute, refusals in it)

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        if self.path.is_socket():
            self.path.unlink()  # left by a daemon that was killed; the runtime dir is ours
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket is born 0660: no window where others may connect
        try:
            listener.bind(str(self.path))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)  # a default ACL on the directory would have overridden the umask
        listener.listen(BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept_loop())

    async def close(self) -> None:
        """Stop listening; idle clients go now, busy ones after their reply (or after CLOSE_GRACE)."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        for client in list(self._clients):
            if not client.busy:
                client.drop()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- admission ---------------------------------------------------------

    async def _accept_loop(self) -> None:
        """One connection at a time, each admitted (or turned away) before the next is taken:
        the descriptors the daemon holds for clients stay at the cap, whatever floods in."""
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as e:
                # Out of descriptors or memory, say: the queue waits in the kernel; try again shortly.
                self.log.warning("control socket cannot accept", error=e.strerror or repr(e))
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            self._admit(conn)
            # sock_accept returns at once while the queue is full: let the evicted close first.
            await asyncio.sleep(0)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = access.peer_of(conn)
        except OSError:
            conn.close()
            return
        level = self.policy.level(peer)
        if len(self._clients) >= self.max_clients and not self._evict(level):
            # Every slot is busy answering, or held by peers of higher standing: say so, never wait.
            try:
                conn.send(_encode({"ok": False, "error": f"omerowebd is busy: {self.max_clients} control clients "
                                   "connected; try again"}), socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            self.log.warning("control client turned away", uid=peer.uid, pid=peer.pid, clients=len(self._clients))
            return
        client = _Client(sock=conn, peer=peer, level=level)
        self._clients.add(client)
        task = asyncio.ensure_future(self._serve(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _evict(self, level: Level | None) -> bool:
        """Close the longest-idle client of at most ``level``'s standing; False if there is none."""
        rank = int(level or 0)
        idle = [c for c in self._clients if not c.busy and int(c.level or 0) <= rank]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (int(c.level or 0), c.since))
        self._clients.discard(victim)
        victim.drop()  # its readline sees EOF and its task ends
        return True

    # -- one client --------------------------------------------------------

    async def _serve(self, client: _Client) -> None:
        try:
            if client.evicted:
                return
            reader, writer = await asyncio.open_unix_connection(sock=client.sock, limit=MAX_LINE)
            client.writer = writer
            if client.evicted:
                return
            while True:
                client.busy, client.since = False, time.monotonic()
                try:
                    # One deadline for the whole line: a client trickling a byte at a time gets no longer.
                    line = await asyncio.wait_for(reader.readline(), self.line_timeout)
                except asyncio.TimeoutError:
                    break
                except ValueError:  # over MAX_LINE: asyncio dropped part of it, the stream is out of step
                    await self._reply(client, {"ok": False, "error": f"bad request: a line is at most {MAX_LINE} bytes"})
                    break
                if not line:
                    break
                client.busy = True
                if not await self._reply(client, await self._answer(client, line)) or self._closing:
                    break
        except ConnectionError:
            pass
        finally:
            self._clients.discard(client)
            if client.writer is not None:
                if client.evicted:
                    client.writer.transport.abort()
                else:
                    client.writer.close()
            else:
                client.sock.close()

    async def _answer(self, client: _Client, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except RecursionError:
            return {"ok": False, "error": "bad request: JSON nested too deeply"}
        except ValueError:  # also UnicodeDecodeError
            return {"ok": False, "error": "bad request: one JSON object per line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: one JSON object per line"}
        cmd = request.get("cmd")
        shown = repr(cmd)[:60]  # as the log and the reply show it: quoted, escaped, short
        peer = client.peer
        need = access.required(request)
        level = self.policy.level(peer)
        if level is None or (need is not None and level < need):
            self._log_refusal(shown, peer)
            who = self.policy.who(need or Level.READ)
            return {"ok": False, "refused": "permission",
                    "error": f"permission denied: {'the control socket' if need is None else shown} is for {who}; "
                             f"you are uid {peer.uid}"}
        if need is None:
            return {"ok": False, "error": f"unknown command {shown}"}
        if need is Level.ADMIN:
            self.log.info("control request", cmd=shown, uid=peer.uid, pid=peer.pid)
        try:
            return await self.handler(request)
        except Exception:  # a bug: keep serving, say so
            self.log.exception("control request failed", cmd=shown)
            return {"ok": False, "error": "internal error: see the daemon's log"}

    def _log_refusal(self, shown: str, peer: Peer) -> None:
        """One line per refusal, but no more than REFUSALS_LOGGED a minute per uid: a caller
        looping on a refused command must not flood the journal."""
        now = time.monotonic()
        if len(self._refusals) > 1024:  # only group members can connect: a bound that is never reached
            self._refusals.clear()
        start, count = self._refusals.get(peer.uid, (now, 0))
        if now - start > 60:
            start, count = now, 0
        self._refusals[peer.uid] = (start, count + 1)
        if count < REFUSALS_LOGGED:
            self.log.warning("control request refused", cmd=shown, uid=peer.uid, pid=peer.pid)
        elif count == REFUSALS_LOGGED:
            self.log.warning("control requests refused; more from this uid are not logged for a minute",
                             uid=peer.uid, pid=peer.pid)

    async def _reply(self, client: _Client, reply: dict[str, Any]) -> bool:
        writer = client.writer
        assert writer is not None
        try:
            data = _encode(reply)
        except (TypeError, ValueError):
            self.log.exception("control reply cannot be encoded")
            data = _encode({"ok": False, "error": "internal error: see the daemon's log"})
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except asyncio.TimeoutError:  # it does not read: drop it and what it did not read
            writer.transport.abort()
            return False
        except ConnectionError:
            return False
        return True


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


# -- the client: omerowebctl, often root ------------------------------------------
#
# Whatever answers on the socket is the service user's process, and the runtime
# dir is that user's: it may put a link to any socket there, or its own server.
# So the client connects only to a socket (never through a link) made by the
# runtime dir's owner and served by that same user, waits a finite time for
# everything, reads a bounded reply, and treats the reply as data: printable
# text only, fields read with their type checked (printable.py).


_NO_PERMISSION = "no permission to use {path}: run as root or as a member of the daemon's group"


class DaemonNotRunning(DaemonUnreachable):
    """No socket at the path, or nobody listening on it."""


class UntrustedSocket(DaemonUnreachable):
    """Something is at the socket path, but not a socket omerowebd can have made; nothing was sent."""


@dataclass(frozen=True)
class _Opened:
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
            server_uid = access.peer_of(s).uid
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
