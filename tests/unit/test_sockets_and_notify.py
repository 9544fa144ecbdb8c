"""sockets.py and systemd.py, with real sockets."""

from __future__ import annotations

import os
import socket

import pytest
from conftest import NotifyListener

from omerowebd import sockets
from omerowebd.errors import UserError
from omerowebd.systemd import Notifier


def test_bind_tcp_and_unix_and_release(tmp_path):
    path = tmp_path / "web.sock"
    held = sockets.bind(("127.0.0.1:0", f"unix:{path}"))
    try:
        assert held[0].origin == "bound" and held[0].address.startswith("127.0.0.1:")
        assert held[1].address == f"unix:{path}" and path.is_socket()
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        assert held[0].probe_target()[1][0] == "127.0.0.1"
    finally:
        sockets.release(held)
    assert not path.exists()


def test_address_in_use_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=r"cannot bind 127.0.0.1:\d+: address already in use"):
            sockets.bind((f"127.0.0.1:{port}",))


def test_stale_unix_socket_is_replaced_live_one_is_not(tmp_path):
    path = tmp_path / "web.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # file left behind, nobody listening
    held = sockets.bind((f"unix:{path}",))
    try:
        with pytest.raises(UserError, match="already in use"):
            sockets.bind((f"unix:{path}",))
    finally:
        sockets.release(held)


def test_wildcard_probe_target_is_loopback():
    held = sockets.bind(("0.0.0.0:0",))
    try:
        assert held[0].probe_target()[1][0] == "127.0.0.1"
    finally:
        sockets.release(held)


def test_from_systemd_ignores_other_pids():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert sockets.from_systemd(env) == []
    assert "LISTEN_FDS" not in env  # cleared either way: never passed on


# In a process of its own: systemd's descriptors are 3 and up, which pytest's own files may hold here.
PASSED_BADLY = """if True:
    import gc, os, socket, sys
    from omerowebd import sockets
    from omerowebd.errors import UserError
    stream = socket.socket(); stream.bind(("127.0.0.1", 0)); stream.listen()
    last = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if sys.argv[1] == "dgram" else open(os.devnull, "rb")
    moved = [os.dup2(stream.fileno(), 20), os.dup2(last.fileno(), 21)]  # out of the way, then down to 3 and 4
    stream.close(); last.close()
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=False)
    said = []
    for attempt in ("early", "normal"):
        try:
            sockets.from_systemd({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"})
        except (UserError, OSError) as e:
            said.append(str(e))
        gc.collect()  # a socket object the failed attempt made and dropped would close its descriptor now
    print(said[0] == said[1], socket.socket(fileno=os.dup(3)).type == socket.SOCK_STREAM, said[1])
"""


@pytest.mark.parametrize("last", ["dgram", "file"])
def test_from_systemd_refusing_leaves_the_descriptors_as_systemd_passed_them(last):
    # The early start reads systemd's sockets first; when it refuses them, the normal start reads them again
    # and must say the same thing, not "bad file descriptor" (or misread a descriptor reused meanwhile).
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-c", PASSED_BADLY, last], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    same, stream_kept, said = done.stdout.strip().split(" ", 2)
    assert (same, stream_kept) == ("True", "True"), said
    assert ("non-stream socket (fd 4)" if last == "dgram" else "fd 4, which is not a socket") in said


def test_notifier_sends_datagrams(tmp_path):
    listener = NotifyListener(tmp_path / "n.sock")
    try:
        n = Notifier({"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_usec == 2000000
        n.reloading("reloading (test)")
        n.ready("serving\nnow")
        got = listener.wait("READY", "1", timeout=5)
        assert got["STATUS"] == "serving now"
        reloading = listener.wait("RELOADING", "1", timeout=5)
        assert int(reloading["MONOTONIC_USEC"]) > 0
    finally:
        listener.close()


def test_notifier_without_systemd_is_silent():
    n = Notifier({})
    assert n.address is None
    n.ready("x")  # nothing to send to, nothing raised
