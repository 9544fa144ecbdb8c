"""Talking to systemd: sd_notify.

systemd-python's ``daemon.notify`` is used where it is installed; the
datagram protocol itself is a single sendto, written out below for the case
where it is not.
"""

from __future__ import annotations

import os
import socket
import time

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the machine
    _sd_daemon = None


class Notifier:
    """Sends state to the service manager; does nothing outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_usec = _int(env.get("WATCHDOG_USEC"))
        watchdog_pid = _int(env.get("WATCHDOG_PID"))
        if watchdog_pid and watchdog_pid != os.getpid():
            self.watchdog_usec = None

    def send(self, **fields: object) -> None:
        """``send(READY=1, STATUS="...")`` -> "READY=1\\nSTATUS=..."."""
        if not self.address:
            return
        text = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        if _sd_daemon is not None and os.environ.get("NOTIFY_SOCKET") == self.address:
            _sd_daemon.notify(text)
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto(text.encode(), address)
            except OSError:
                pass  # the manager is gone; nothing useful to do about it

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self, status: str) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(value: object) -> str:
    return str(value).replace("\n", " ")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
