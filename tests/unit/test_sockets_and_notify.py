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
