"""A real redis-server for the tests: 127.0.0.1, a free port, no persistence, a password."""

from __future__ import annotations

import signal
import socket
import subprocess

from conftest import end_process, free_port, wait_for


class Redis:
    """A real redis-server on 127.0.0.1 (no persistence, a password); pause/resume with SIGSTOP/SIGCONT."""

    def __init__(self, directory, password: str) -> None:
        self.port, self.password, self.dir = free_port(), password, directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", self.password, "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, 30, "redis-server to answer")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+", b"-"))
        except OSError:
            return False

    def keys(self) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s, s.makefile("rb") as replies:
            s.sendall(f"AUTH {self.password}\r\nKEYS *\r\n".encode())
            assert replies.readline() == b"+OK\r\n"
            count = int(replies.readline()[1:])  # *N, then N bulk strings: $LEN and the key
            return [replies.readline() and replies.readline().rstrip(b"\r\n") for _ in range(count)]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused one cannot act on TERM
        end_process(self.proc)
