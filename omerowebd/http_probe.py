"""One HTTP GET through a socket: is a generation (or the site) answering, and with what status.

The daemon's boot probe, the settle watch and the metrics' health probe all
ask this way. A leaf module: it imports nothing of omerowebd, so any of them
may use it without an import circle.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any


async def http_probe(target: tuple[int, Any], path: str, host: str, *, timeout: float) -> int | None:
    """GET ``path``; the HTTP status, or None when nothing sensible came back."""
    family, address = target

    async def ask() -> int | None:
        if family == socket.AF_UNIX:
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address[:2])
        try:
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: omerowebd-probe\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        parts = line.decode("latin-1").split()
        if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
            return int(parts[1])
        return None

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
