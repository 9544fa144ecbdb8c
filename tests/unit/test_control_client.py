"""omerowebctl's side of the control socket: whatever answers there is the
service user's process, so a reply is data, never a way to act on root's
terminal or memory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from omerowebd import commands, control_client, limits
from omerowebd import config as config_module
from omerowebd.commands import check as check_command
from omerowebd.commands import reload as reload_command
from omerowebd.commands import sessions as sessions_command
from omerowebd.errors import ConfigError


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
                if not replies:
                    continue  # no reply left: the connection closes unanswered
                try:
                    conn.sendall(replies.pop(0))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, replies
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
    server.close()
    thread.join(5)


def test_terminal_escapes_in_a_reply_are_neutralised(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b'{"ok": true, "state": "serving\\u001b]0;pwned\\u0007\\u009b2J", "\\u001bkey": ["a\\u0000b"]}\n')
    reply = control_client.request(path, {"cmd": "status"})
    assert reply["state"] == "serving?]0;pwned??2J"
    assert reply["?key"] == ["a?b"]


def test_newlines_and_tabs_survive(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b'{"ok": true, "message": "line one\\nline\\ttwo"}\n')
    assert control_client.request(path, {"cmd": "status"})["message"] == "line one\nline\ttwo"


def test_a_reply_without_end_is_cut_off_not_buffered_forever(fake_daemon) -> None:
    path, replies = fake_daemon
    replies.append(b"[" * (control_client.MAX_REPLY + (1 << 20)))
    with pytest.raises(control_client.DaemonUnreachable, match="over"):
        control_client.request(path, {"cmd": "status"})


@pytest.mark.parametrize("reply", [b"[" * 100000 + b"\n", b"not json\n", b"[1, 2]\n", b'"text"\n'])
def test_nested_or_foreign_replies_are_one_clear_error(fake_daemon, reply: bytes) -> None:
    path, replies = fake_daemon
    replies.append(reply)
    with pytest.raises(control_client.DaemonUnreachable, match="protocol"):
        control_client.request(path, {"cmd": "status"})


def test_bidi_and_other_format_characters_are_neutralised(fake_daemon) -> None:
    path, replies = fake_daemon
    # U+202E right-to-left override, U+2066 isolate, a zero-width space, a lone surrogate, U+2028 line separator.
    replies.append(b'{"ok": true, "message": "ok \\u202eexe.txt \\u2066x\\u2069 a\\u200bb \\ud800 l\\u2028m",'
                   b' "name": "caf\\u00e9 \\u00a0\\u3000\\u2603 \\ud83d\\ude00"}\n')
    reply = control_client.request(path, {"cmd": "status"})
    assert reply["message"] == "ok ?exe.txt ?x? a?b ? l?m"
    assert reply["name"] == "café \u00a0\u3000☃ 😀"  # letters, spaces of other scripts and emoji stay
    print(reply["message"])  # printable: a lone surrogate would raise UnicodeEncodeError here


# -- whom the client talks to -------------------------------------------------------------

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the owners of the runtime dir and the socket need root")


class Listener:
    """A unix socket server in a thread that records what it receives and answers one line."""

    def __init__(self, path: Path, reply: bytes = b'{"ok": true, "state": "serving"}\n') -> None:
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A runtime dir others can enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="omerowebd-client-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_link_at_the_socket_path_is_never_followed(runtime_dir: Path) -> None:
    other = Listener(runtime_dir / "other-service.sock")
    try:
        (runtime_dir / "control.sock").symlink_to(runtime_dir / "other-service.sock")
        with pytest.raises(control_client.UntrustedSocket, match=r"control.sock: it is a symbolic link, not omerowebd's"):
            control_client.request(runtime_dir / "control.sock", {"cmd": "reload"})
        # Neither connected to nor sent anything: the other service never saw us.
        assert control_client.request(runtime_dir / "other-service.sock", {"cmd": "status"})["state"] == "serving"
        assert other.received == [b'{"cmd": "status"}\n']
    finally:
        other.close()


@pytest.mark.parametrize("kind", ["fifo", "file", "directory"])
def test_what_is_not_a_socket_is_refused_at_once(runtime_dir: Path, kind: str) -> None:
    path = runtime_dir / "control.sock"
    {"fifo": os.mkfifo, "file": lambda p: p.write_text("x"), "directory": os.mkdir}[kind](path)
    with pytest.raises(control_client.UntrustedSocket, match=r"it is not a socket"):
        control_client.request(path, {"cmd": "status"}, timeout=60)


def test_no_socket_means_not_running(runtime_dir: Path) -> None:
    with pytest.raises(control_client.DaemonNotRunning, match="omerowebd is not running"):
        control_client.request(runtime_dir / "control.sock", {"cmd": "status"})


def _serve_as(uid: int, path: Path, ready: Path, chown_to: int | None = None) -> subprocess.Popen[bytes]:
    """A server process running as ``uid`` on ``path`` (made by root and given to ``chown_to`` if set)."""
    code = textwrap.dedent(f"""
        import os, socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind({str(path)!r})
        if {chown_to!r} is not None:
            os.chown({str(path)!r}, {chown_to!r}, {chown_to!r})
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
        s.listen(4)  # the kernel records the server's credentials here
        open({str(ready)!r}, "w").close()
        while True:
            c, _ = s.accept()
            c.recv(65536)
            c.sendall(b'{{"ok": true, "state": "serving"}}\\n')
            c.close()
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd="/")


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)


@as_root
def test_the_runtime_dirs_owner_serving_its_own_socket_is_the_daemon(runtime_dir: Path) -> None:
    os.chown(runtime_dir, NOBODY, NOBODY)
    proc = _serve_as(NOBODY, runtime_dir / "control.sock", runtime_dir.parent / f"{runtime_dir.name}.ready",
                     chown_to=NOBODY)
    try:
        _wait_for(runtime_dir.parent / f"{runtime_dir.name}.ready", proc)
        assert control_client.request(runtime_dir / "control.sock", {"cmd": "status"})["state"] == "serving"
    finally:
        proc.kill()
        proc.wait()
        (runtime_dir.parent / f"{runtime_dir.name}.ready").unlink()


@as_root
def test_a_root_service_socket_in_the_service_users_runtime_dir_is_refused(runtime_dir: Path) -> None:
    # /run/dbus's socket is anybody's to hard-link into a directory of theirs; here root serves it.
    os.chown(runtime_dir, NOBODY, NOBODY)
    other = Listener(runtime_dir / "control.sock")
    try:
        with pytest.raises(control_client.UntrustedSocket, match=r"it is served as uid 0, but its directory belongs to uid "
                           r"65534, so it is not omerowebd's"):
            control_client.request(runtime_dir / "control.sock", {"cmd": "reload"})
        assert not any(other.received)  # nothing sent (the connect itself may show, as an empty read)
    finally:
        other.close()


@as_root
def test_a_socket_one_user_made_and_another_serves_is_refused(runtime_dir: Path) -> None:
    os.chown(runtime_dir, NOBODY, NOBODY)
    ready = runtime_dir.parent / f"{runtime_dir.name}.ready"
    proc = _serve_as(4242, runtime_dir / "control.sock", ready, chown_to=NOBODY)
    try:
        _wait_for(ready, proc)
        with pytest.raises(control_client.UntrustedSocket, match=r"the process serving it runs as uid 4242, but uid 65534 "
                           r"made it"):
            control_client.request(runtime_dir / "control.sock", {"cmd": "reload"})
    finally:
        proc.kill()
        proc.wait()
        ready.unlink()


# -- waiting: always finite -------------------------------------------------------------------


@pytest.fixture
def trickler(tmp_path: Path) -> Iterator[Path]:
    """A fake daemon that answers a byte at a time, never ending the line, for up to a minute."""
    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for _ in range(600):
                if stop.wait(0.1):
                    break
                try:
                    conn.sendall(b" ")
                except OSError:
                    break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(10)


def test_a_reply_that_trickles_in_forever_meets_one_deadline(trickler: Path) -> None:
    # Each byte comes well within the timeout: only a deadline for the whole reply ends the wait.
    with pytest.raises(control_client.DaemonUnreachable, match=r"omerowebd did not answer within 2s"):
        control_client.request(trickler, {"cmd": "reload"}, timeout=2)


@pytest.mark.parametrize("timeout", [None, float("inf"), 0])
def test_an_endless_wait_is_a_bug_not_an_option(tmp_path: Path, timeout: object) -> None:
    with pytest.raises(ValueError, match="finite timeout"):
        control_client.request(tmp_path / "control.sock", {"cmd": "reload"}, timeout=timeout)  # type: ignore[arg-type]


def test_reload_and_sessions_clear_wait_long_but_not_forever(tmp_path: Path) -> None:
    toml = tmp_path / "omerowebd.toml"
    toml.write_text('[daemon]\nomerodir = "/o"\nvenv = "/v"\nready_timeout = 600\n\n[sessions]\ntimeout = 7200\n')
    args = argparse.Namespace(config=str(toml), socket=None)
    assert 2 * (600 + 900) < reload_command.wait_limit(args) < 4 * 3600
    assert 2 * 7200 < sessions_command.wait_limit(args) < 5 * 3600
    broken = argparse.Namespace(config=str(tmp_path / "missing.toml"), socket=None)
    assert 0 < reload_command.wait_limit(broken) < float("inf") and 0 < sessions_command.wait_limit(broken) < float("inf")


VALID_DAEMON_TABLES = [
    "",
    'runtime_dir = "/srv/omerowebd/run"',
    'runtime_dir = "/srv/run"\nready_timeout = 600\nsettle_seconds = 0',
    "ready_timeout = 7.5\nsettle_seconds = 30",
]


@pytest.mark.parametrize("table", VALID_DAEMON_TABLES)
def test_omerowebctl_finds_the_daemon_where_the_config_puts_it(tmp_path: Path, table: str) -> None:
    """What omerowebctl reads of a valid file (without config.py) is what config.load says, defaults too."""
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "/o"\nvenv = "/v"\n{table}\n\n[omero.web]\nprefix = "/omero"\n')
    settings = config_module.load(toml).daemon
    found = commands.daemon(argparse.Namespace(config=str(toml), socket=None))
    assert found == (settings.runtime_dir / "control.sock", settings.ready_timeout, settings.settle_seconds)
    assert commands.daemon(argparse.Namespace(config=str(toml), socket="/elsewhere.sock"))[0] == Path("/elsewhere.sock")


@pytest.mark.parametrize("text", [
    '[daemon]\nruntime_dir = "/srv/run"\nready_timeout = inf\nsettle_seconds = -1\nbogus = 1\n',  # rejected by load
    '[daemon]\nruntime_dir = "/srv/run"\nready_timeout = true\nsettle_seconds = "5"\n[nonsense]\n',
    '[daemon]\nruntime_dir = "/srv/run"\nready_timeout = 1e999\nready_timeout = 3\n',  # not even TOML
])
def test_a_file_the_daemon_would_reject_still_names_where_it_runs(tmp_path: Path, text: str) -> None:
    """`reload` must reach the daemon to be told what is wrong; its wait stays finite."""
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError):
        config_module.load(toml)
    found = commands.daemon(argparse.Namespace(config=str(toml), socket=None))
    assert found == (Path("/srv/run/control.sock"), limits.READY_TIMEOUT, limits.SETTLE_SECONDS)


def test_without_a_readable_config_omerowebctl_looks_in_the_packaged_runtime_dir(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.toml", tmp_path):  # missing; a directory
        found = commands.daemon(argparse.Namespace(config=str(path), socket=None))
        assert found == (Path("/run/omerowebd/control.sock"), limits.READY_TIMEOUT, limits.SETTLE_SECONDS)
    odd = tmp_path / "odd.toml"
    odd.write_text('[daemon]\nruntime_dir = "/srv/run\\u0000"\n')  # no path holds a NUL
    assert commands.daemon(argparse.Namespace(config=str(odd), socket=None))[0] == Path("/run/omerowebd/control.sock")


def test_a_file_that_is_not_utf8_still_names_where_the_daemon_runs(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[daemon]\nruntime_dir = "/srv/run"\n\xff\n')
    assert commands.daemon(argparse.Namespace(config=str(binary), socket=None))[0] == Path("/srv/run/control.sock")


def test_a_wait_longer_than_a_socket_takes_is_a_long_wait_not_a_traceback(fake_daemon, tmp_path: Path) -> None:
    path, replies = fake_daemon
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "/o"\nvenv = "/v"\nruntime_dir = "{path.parent}"\nready_timeout = {10 ** 41}\n')
    assert config_module.load(toml).daemon.ready_timeout == 1e41  # a number of seconds, as far as the file goes
    replies.append(b'{"ok": true, "exit_code": 0, "outcome": "applied", "message": "done"}\n')
    args = argparse.Namespace(config=str(toml), socket=None, no_wait=False, dry_run=False, discard_foreign_edits=False,
                              json=False)
    assert reload_command.run(args) == 0


# -- replies of the wrong shape: one line, never a traceback ------------------------------------

ODD_REPLIES = [
    b'{"ok": true, "exit_code": "0", "outcome": ["x"], "message": {"a": 1}, "changes": "abc"}\n',
    b'{"ok": true, "exit_code": 1e999, "outcome": null}\n',
    b'{"ok": true, "exit_code": true, "changes": [1, null, "omero.web.prefix"]}\n',
    b'{"ok": true, "exit_code": 2, "changes": [{"a": 1}, "omero.web.prefix"]}\n',
    b'{"ok": true, "config_xml": {"foreign_edits": {"message": 5, "fix": ["x"]}}, "sessions": "x", '
    b'"state": 7, "generation": [], "generations": {"a": 1}}\n',
    b'{"ok": true, "config_xml": {"foreign_edits": "edited"}, "sessions": {"engine": "e", "sweeper": "omerowebd", '
    b'"enabled": true, "running": {"since": "now", "trigger": 5}, "last": {"at": "x", "duration": "y", '
    b'"scanned": {}}, "next": "z"}}\n',
    b'{"ok": true, "config_xml": [], "engine": ["x"], "store": 5, "dry_run": "yes", "error_samples": "abc", '
    b'"skipped": 3, "duration": "1", "error": 7}\n',
]


@pytest.mark.parametrize("reply", ODD_REPLIES, ids=range(len(ODD_REPLIES)))
def test_commands_read_odd_replies_without_a_traceback(fake_daemon, tmp_path: Path, reply: bytes, capsys) -> None:
    path, replies = fake_daemon
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "{tmp_path / "o"}"\nvenv = "/v"\nruntime_dir = "{path.parent}"\n')
    args = argparse.Namespace(config=str(toml), socket=str(path), no_wait=False, dry_run=False,
                              discard_foreign_edits=False, json=False)
    replies.extend([reply] * 4)
    code = reload_command.run(args)
    assert isinstance(code, int) and 0 <= code <= 255
    assert check_command._foreign_edits_from_daemon(config_module.load(toml))[0] == []
    sessions_command.run_status(args)
    print(sessions_command.render(control_client.request(path, {"cmd": "sessions_clear"})))
    reload_command.describe(json.loads(reply))  # the progress line, from a status of any shape
    assert capsys.readouterr().out.count("\n") >= 3  # the reload's line, the sessions status, the report


@pytest.mark.parametrize("reply", [b'{"state": 5}\n', b'{"ok": true, "state": "serving", "pid": [], "uptime": "x"}\n',
                                   b'{"ok": true, "state": "s", "pid": 1, "uptime": 1, "generation": 7}\n'])
def test_status_of_an_odd_shape_is_one_line_not_a_traceback(fake_daemon, reply: bytes, capsys) -> None:
    from omerowebd import ctl

    path, replies = fake_daemon
    replies.append(reply)
    code = ctl.main(["--socket", str(path), "status"])
    err = capsys.readouterr().err
    assert code == control_client.EXIT_UNREACHABLE and "status --json" in err and "Traceback" not in err
