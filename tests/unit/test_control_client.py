"""omerowebctl's side of the control socket: whatever answers there is the
service user's process, so a reply is data, never a way to act on root's
terminal or memory."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from omerowebd import control


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A unix socket that answers every connection with the next canned reply."""
    path = tmp_path / "control.sock"
    replies: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(replies.pop(0))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, replies
    server.close()
    thread.join(5)


def test_terminal_escapes_in_a_reply_are_neutralised(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b'{"ok": true, "state": "serving\\u001b]0;pwned\\u0007\\u009b2J", "\\u001bkey": ["a\\u0000b"]}\n')
    reply = control.request(path, {"cmd": "status"})
    assert reply["state"] == "serving?]0;pwned??2J"
    assert reply["?key"] == ["a?b"]


def test_newlines_and_tabs_survive(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b'{"ok": true, "message": "line one\\nline\\ttwo"}\n')
    assert control.request(path, {"cmd": "status"})["message"] == "line one\nline\ttwo"


def test_a_reply_without_end_is_cut_off_not_buffered_forever(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b"[" * (control.MAX_REPLY + (1 << 20)))
    with pytest.raises(control.DaemonUnreachable, match="over"):
        control.request(path, {"cmd": "status"})


@pytest.mark.parametrize("reply", [b"[" * 100000 + b"\n", b"not json\n", b"[1, 2]\n", b'"text"\n'])
def test_nested_or_foreign_replies_are_one_clear_error(fake_daemon, reply: bytes) -> None:
    path, replies = fake_daemon
    replies.append(reply)
    with pytest.raises(control.DaemonUnreachable, match="protocol"):
        control.request(path, {"cmd": "status"})
