"""The control socket: RUNTIME_DIR/control.sock, one JSON object per line.

A request is ``{"cmd": "status"}`` (plus arguments); the reply is one JSON
object. The server lives in the daemon's loop; the client is blocking, for
omerowebctl.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import log
from .errors import UserError

EXIT_UNREACHABLE = 3
MAX_LINE = 1 << 20

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class DaemonUnreachable(UserError):
    exit_code = EXIT_UNREACHABLE


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.is_socket():
            self.path.unlink()  # left by a daemon that was killed; the runtime dir is ours
        old = os.umask(0o117)  # the socket is born 0660: no window where others may connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError:
                    reply: dict[str, Any] = {"ok": False, "error": "bad request: one JSON object per line"}
                else:
                    try:
                        reply = await self.handler(request)
                    except Exception as e:  # a bug: keep serving, say so
                        log.get().exception("control request failed", cmd=request.get("cmd"))
                        reply = {"ok": False, "error": f"internal error: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def request(path: Path, payload: dict[str, Any], timeout: float | None = 30.0) -> dict[str, Any]:
    """Send one request, return the reply; DaemonUnreachable if nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise DaemonUnreachable(f"omerowebd is not running (no control socket at {path})") from None
        except PermissionError:
            raise DaemonUnreachable(
                f"no permission to use {path}: run as root or as a member of the daemon's group"
            ) from None
        except OSError as e:
            raise DaemonUnreachable(f"omerowebd does not answer on {path}: {e.strerror}") from None
        s.settimeout(timeout)
        s.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        try:
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise DaemonUnreachable(f"omerowebd did not answer within {timeout:.0f}s") from None
    if not buf:
        raise DaemonUnreachable(f"omerowebd closed {path} without answering")
    return json.loads(buf)
