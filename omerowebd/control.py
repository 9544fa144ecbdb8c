"""The control socket's server: RUNTIME_DIR/control.sock, one JSON object per line.

A request is ``{"cmd": "status"}`` (plus arguments); the reply is one JSON
object. The server lives in the daemon's loop; omerowebctl's blocking client
is :mod:`omerowebd.control_client` (it imports none of this: no asyncio).

Whoever connects is judged by the kernel's record of the peer (see
:mod:`omerowebd.access`), and nothing a client sends or fails to send can
hold up another: a request line has a size limit and a deadline, a reply a
write deadline, and the number of clients a cap well below the daemon's file
limit, at which the longest-idle client of the same or a lower standing
makes room for a new one.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from . import access, log
from .access import Level, Peer, Policy

MAX_LINE = 64 << 10  # a request is a few dozen bytes; asyncio buffers at most twice this per client
MAX_CLIENTS = 64
BACKLOG = 64  # connections the kernel queues (without a descriptor of ours) while we admit others
ACCEPT_RETRY = 0.5
CLOSE_GRACE = 2.0  # seconds a reply in progress gets when the daemon stops (the unit's stop timeout is short)
LINE_TIMEOUT = 15.0  # seconds from the last reply (or connect) to a whole request line
WRITE_TIMEOUT = 10.0  # seconds a client may take to read a reply
REFUSALS_LOGGED = 20  # a minute, per uid

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


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
