"""The control socket: who may do what, and no client can hold up another.

A real ControlServer on a real unix socket, in a loop of its own thread, with
a fake handler (no daemon, no venv). Peers of other standing are real
processes run as ``nobody`` with chosen groups; floods of clients run in a
child process, so that this process's file descriptors are the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from omerowebd import access, control, control_client
from omerowebd.access import Level, Policy
from omerowebd.control import ControlServer

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # runnable by nobody, unlike a venv under root's home
NOBODY, NOGROUP = 65534, 65534
# The daemon's stand-in identity: a user that is not root or nobody, the daemon's group, an admin group.
DAEMON_UID, DAEMON_GID, ADMIN_GID = 4242, 100, 4343


class Recorder:
    """Stands in for the structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.lines.append((level, event, fields))


class Running:
    """A ControlServer in a loop of its own thread; blocking tests talk to it as clients do."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.release = threading.Event()  # lets a blocked "reload" finish
        self.handled: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(path, self.handle, **kwargs)
        self.server.log = self.log = Recorder()
        self.call(self.server.start())

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.handled.append(request)
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, "state": "serving", "pad": "x" * int(request.get("pad", 0))}
        if cmd == "reload":
            while not self.release.is_set():  # an admin's reload that takes its time
                await asyncio.sleep(0.01)
            return {"ok": True, "exit_code": 0, "outcome": "applied", "message": "done"}
        if cmd == "sessions_clear":
            raise RuntimeError("a bug in the handler")
        raise AssertionError(f"the server passed on {cmd!r}")

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.release.set()
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory nobody may enter (unlike pytest's tmp_path under root's 0700 home)."""
    path = Path(tempfile.mkdtemp(prefix="omerowebd-control-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


@pytest.fixture
def make_server(sock_dir: Path) -> Iterator[Any]:
    running: list[Running] = []

    def make(**kwargs: Any) -> Running:
        kwargs.setdefault("policy", Policy(uid=DAEMON_UID, gid=DAEMON_GID, admin_gid=ADMIN_GID, admin_group="staffers",
                                           user_name="omero-web", group_name="omero-web"))
        r = Running(sock_dir / "control.sock", **kwargs)
        running.append(r)
        os.chown(sock_dir / "control.sock", DAEMON_UID, DAEMON_GID)  # 0660, the daemon's user and group
        return r

    yield make
    for r in running:
        r.close()


class Client:
    """A blocking client that sends raw bytes and reads reply lines."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        control_client._connect(self.sock, path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line; b"" once the server has closed the connection."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def ask(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return json.loads(self.line())

    def closed(self) -> bool:
        """True once the server has closed its end (EOF or reset)."""
        try:
            return self.line() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- who may do what ---------------------------------------------------------

AS_PEER = textwrap.dedent(
    """\
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    for request in sys.argv[2:]:
        try:
            f.write(request.encode() + b"\\n"); f.flush()
        except BrokenPipeError:
            pass  # turned away before it spoke: the reason is waiting to be read
        print(f.readline().decode().strip(), flush=True)
    """
)


def as_peer(path: Path, *requests: dict[str, Any], group: int = NOGROUP, groups: list[int] | None = None,
            uid: int = NOBODY) -> list[dict[str, Any]]:
    """Send requests from a process of that uid, primary group and supplementary groups."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", AS_PEER, str(path), *(json.dumps(r) for r in requests)],
        user=uid, group=group, extra_groups=groups or [], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_table_names_every_command_and_an_unlisted_one_is_nobodys():
    assert access.COMMANDS == {"status": Level.READ, "reload": Level.ADMIN, "sessions_clear": Level.ADMIN}
    assert access.required({"cmd": "reload", "dry_run": True}) is Level.ADMIN
    assert access.required({"cmd": "request_status"}) is None and access.required({"cmd": ["status"]}) is None


def test_a_peer_outside_the_daemons_group_may_do_nothing(make_server, sock_dir):
    r = make_server()
    os.chmod(sock_dir / "control.sock", 0o666)  # as if an admin had loosened it: the daemon still refuses
    status, reload = as_peer(sock_dir / "control.sock", {"cmd": "status"}, {"cmd": "reload"})
    for reply in (status, reload):
        assert reply["ok"] is False and reply["refused"] == "permission"
        assert "you are uid 65534" in reply["error"]
    assert "'status' is for members of group 'omero-web', root, user 'omero-web'" in status["error"]
    assert r.handled == []
    refusals = [(event, f) for level, event, f in r.log.lines if level == "warning"]
    assert [e for e, _ in refusals] == ["control request refused"] * 2
    assert all(f["uid"] == NOBODY and f["pid"] > 0 for _, f in refusals)


def test_a_caller_looping_on_refusals_does_not_flood_the_log(make_server, sock_dir):
    r = make_server()
    replies = as_peer(sock_dir / "control.sock", *[{"cmd": "reload"}] * 50, group=DAEMON_GID)
    assert all(reply["refused"] == "permission" for reply in replies) and len(replies) == 50
    logged = [event for level, event, _ in r.log.lines if level == "warning"]
    assert logged == ["control request refused"] * control.REFUSALS_LOGGED + [
        "control requests refused; more from this uid are not logged for a minute"]


def test_the_daemons_group_reads_but_does_not_change(make_server, sock_dir):
    r = make_server()
    for how in ({"group": DAEMON_GID}, {"groups": [DAEMON_GID]}):  # primary, or supplementary
        status, reload, dry, sweep = as_peer(
            sock_dir / "control.sock",
            {"cmd": "status"}, {"cmd": "reload"}, {"cmd": "reload", "dry_run": True}, {"cmd": "sessions_clear"},
            **how,
        )
        assert status == {"ok": True, "state": "serving", "pad": ""}
        for reply, cmd in ((reload, "reload"), (dry, "reload"), (sweep, "sessions_clear")):
            assert reply["refused"] == "permission"
            assert reply["error"] == (f"permission denied: {cmd!r} is for root, user 'omero-web' or members of "
                                      "group 'staffers' (daemon.admin_group); you are uid 65534")
    assert [h["cmd"] for h in r.handled] == ["status", "status"]


def test_the_admin_group_and_the_daemons_user_may_reload(make_server, sock_dir):
    r = make_server()
    r.release.set()
    # Admins reach the socket as members of the daemon's group too.
    (reply,) = as_peer(sock_dir / "control.sock", {"cmd": "reload"}, groups=[DAEMON_GID, ADMIN_GID])
    assert reply["outcome"] == "applied"
    (reply,) = as_peer(sock_dir / "control.sock", {"cmd": "reload"}, uid=DAEMON_UID, group=NOGROUP)
    assert reply["outcome"] == "applied"
    # Over 256 groups: beyond what one getsockopt call of Python returns, the admin group last.
    (reply,) = as_peer(sock_dir / "control.sock", {"cmd": "reload"}, groups=[DAEMON_GID, *range(20000, 20400), ADMIN_GID])
    assert reply["outcome"] == "applied"
    audit = [f for level, event, f in r.log.lines if event == "control request"]
    assert [f["uid"] for f in audit] == [NOBODY, DAEMON_UID, NOBODY]


def test_no_admin_group_means_root_and_the_daemons_user_only(make_server, sock_dir):
    make_server(policy=Policy(uid=DAEMON_UID, gid=DAEMON_GID, user_name="omero-web", group_name="omero-web"))
    (reply,) = as_peer(sock_dir / "control.sock", {"cmd": "reload"}, groups=[DAEMON_GID, ADMIN_GID])
    assert reply["error"] == ("permission denied: 'reload' is for root, user 'omero-web' (or members of a group "
                              "set as daemon.admin_group); you are uid 65534")
    # Root is always admitted.
    client = Client(sock_dir / "control.sock")
    assert client.ask({"cmd": "status"})["ok"] is True
    client.close()


def test_a_policy_names_this_process_and_an_unknown_group_admits_nobody():
    p = access.policy("no-such-group-here")
    assert (p.uid, p.gid, p.admin_gid) == (os.getuid(), os.getgid(), None)
    assert access.policy("users").admin_gid == 100


def test_omerowebctl_says_it_was_refused_for_permission(make_server, sock_dir):
    make_server()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [SYSTEM_PYTHON, "-m", "omerowebd.ctl", "--socket", str(sock_dir / "control.sock"), "reload"],
        user=NOBODY, group=DAEMON_GID, extra_groups=[], env=env, capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert done.returncode == control_client.EXIT_NOPERM == 77
    assert done.stderr.strip() == ("omerowebctl: permission denied: 'reload' is for root, user 'omero-web' or "
                                   "members of group 'staffers' (daemon.admin_group); you are uid 65534")
    # The socket's own mode refuses before the daemon is asked: the same exit code, a line that says so.
    done = subprocess.run(
        [SYSTEM_PYTHON, "-m", "omerowebd.ctl", "--socket", str(sock_dir / "control.sock"), "status"],
        user=NOBODY, group=NOGROUP, extra_groups=[], env=env, capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert done.returncode == 77 and "no permission to use" in done.stderr, done.stderr


# -- hostile input -----------------------------------------------------------

HOSTILE = [
    (b"not json\n", "bad request: one JSON object per line"),
    (b"\xff\xfe\x00garbage\n", "bad request: one JSON object per line"),
    (b"[1, 2]\n", "bad request: one JSON object per line"),
    (b'"status"\n', "bad request: one JSON object per line"),
    (b"null\n", "bad request: one JSON object per line"),
    (b"[" * 60000 + b"\n", "bad request: JSON nested too deeply"),
    (b'{"cmd": {"cmd": "status"}}\n', "unknown command {'cmd': 'status'}"),
    (b'{"cmd": 5}\n', "unknown command 5"),
    (b'{"cmd": "request_status"}\n', "unknown command 'request_status'"),
    (b'{"cmd": "' + b"x" * 1000 + b'"}\n', "unknown command 'xxxxxxxx"),
    (b'{"n": ' + b"9" * 50000 + b"}\n", "bad request: one JSON object per line"),  # int too long to parse
    (b'{"cmd": "status", "cmd": "reload"}\n', None),  # the last key wins, as a reload by root
]


def test_hostile_lines_get_an_error_and_the_connection_stays_usable(make_server, sock_dir):
    r = make_server()
    r.release.set()
    client = Client(sock_dir / "control.sock")
    for data, error in HOSTILE:
        reply = client.ask(data)
        if error is None:
            assert reply["ok"] is True
        else:
            assert reply["ok"] is False and reply["error"].startswith(error), (data[:40], reply)
            assert len(reply["error"]) < 200
        assert client.ask({"cmd": "status"})["ok"] is True
    # A bug in a handler is an error reply and a logged traceback, never a dead server.
    assert client.ask({"cmd": "sessions_clear"}) == {"ok": False, "error": "internal error: see the daemon's log"}
    assert client.ask({"cmd": "status"})["ok"] is True
    assert ("exception", "control request failed", {"cmd": "'sessions_clear'"}) in r.log.lines
    client.close()


def test_a_line_over_the_limit_gets_an_error_and_a_clean_close(make_server, sock_dir):
    make_server()
    client = Client(sock_dir / "control.sock")
    client.send(b'{"cmd": "status", "pad": "' + b"x" * (control.MAX_LINE + 10) + b'"}\n')
    assert json.loads(client.line()) == {"ok": False, "error": f"bad request: a line is at most {control.MAX_LINE} bytes"}
    assert client.closed()  # the rest of that line is never taken for a request
    client.close()
    fresh = Client(sock_dir / "control.sock")
    assert fresh.ask({"cmd": "status"})["ok"] is True
    fresh.close()


def test_pipelined_requests_are_answered_in_order(make_server, sock_dir):
    make_server()
    client = Client(sock_dir / "control.sock")
    client.send(b"".join(json.dumps({"cmd": "status", "pad": n}).encode() + b"\n" for n in range(50)))
    assert [len(json.loads(client.line())["pad"]) for _ in range(50)] == list(range(50))
    client.close()


# -- timeouts ----------------------------------------------------------------


def test_an_idle_client_is_closed_after_the_line_timeout(make_server, sock_dir):
    r = make_server(line_timeout=0.5)
    client = Client(sock_dir / "control.sock")
    assert client.ask({"cmd": "status"})["ok"] is True
    started = time.monotonic()
    assert client.closed()
    assert 0.4 <= time.monotonic() - started < 5
    wait_for(lambda: r.server.clients == 0, 5, "the server to forget the client")
    client.close()


def test_a_client_trickling_a_byte_at_a_time_gets_no_longer(make_server, sock_dir):
    make_server(line_timeout=0.5)
    client = Client(sock_dir / "control.sock")
    started = time.monotonic()
    request = b'{"cmd": "status"}\n'
    sent = 0
    try:
        for byte in request:  # a slowloris: each byte resets no clock
            client.send(bytes([byte]))
            sent += 1
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert client.closed()
    assert sent < len(request) and time.monotonic() - started < 3
    client.close()


def test_a_client_that_never_reads_is_dropped_and_holds_up_nobody(make_server, sock_dir):
    r = make_server(write_timeout=0.5)
    hog = Client(sock_dir / "control.sock")
    # Replies of 100 kB each, never read: the socket and the transport's buffer fill up.
    hog.sock.setblocking(False)
    request = b'{"cmd": "status", "pad": 100000}\n'
    for _ in range(200):
        try:
            hog.sock.send(request)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
    other = Client(sock_dir / "control.sock")
    started = time.monotonic()
    assert other.ask({"cmd": "status"})["ok"] is True
    assert time.monotonic() - started < 1
    wait_for(lambda: r.server.clients == 1, 10, "the server to drop the client that does not read")
    hog.close()
    other.close()


# -- the cap -----------------------------------------------------------------


def test_the_longest_idle_client_makes_room_and_busy_ones_are_never_dropped(make_server, sock_dir):
    r = make_server(max_clients=4)
    path = sock_dir / "control.sock"
    idle = [Client(path) for _ in range(3)]
    for c in idle:
        assert c.ask({"cmd": "status"})["ok"] is True  # admitted, in order
    busy = Client(path)
    busy.send(b'{"cmd": "reload"}\n')  # held by the handler until release
    wait_for(lambda: len(r.handled) == 4, 5, "the reload to reach the handler")
    newcomer = Client(path)
    assert newcomer.ask({"cmd": "status"})["ok"] is True
    assert idle[0].closed()  # the oldest idle one made room
    assert idle[1].ask({"cmd": "status"})["ok"] is True
    # Everyone else busy: a newcomer is told so, and the busy ones carry on.
    for c in (idle[1], idle[2], newcomer):
        c.send(b'{"cmd": "reload"}\n')
    wait_for(lambda: sum(h["cmd"] == "reload" for h in r.handled) == 4, 5, "four reloads in the handler")
    late = Client(path)
    assert json.loads(late.line()) == {"ok": False, "error": "omerowebd is busy: 4 control clients connected; try again"}
    assert late.closed()
    r.release.set()
    for c in (busy, idle[1], idle[2], newcomer):
        assert json.loads(c.line())["outcome"] == "applied"
    for c in (*idle, busy, newcomer, late):
        c.close()


def test_readers_cannot_push_out_an_admin(make_server, sock_dir):
    r = make_server(max_clients=2)
    path = sock_dir / "control.sock"
    root = [Client(path), Client(path)]
    for c in root:
        assert c.ask({"cmd": "status"})["ok"] is True
    (reply,) = as_peer(path, {"cmd": "status"}, group=DAEMON_GID)
    assert reply["error"].startswith("omerowebd is busy")
    for c in root:
        assert c.ask({"cmd": "status"})["ok"] is True
    assert [e for level, e, _ in r.log.lines if level == "warning"] == ["control client turned away"]
    for c in root:
        c.close()


FLOOD = textwrap.dedent(
    """\
    import socket, sys, time
    path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if mode == "slow":
            s.send(b'{"cmd": ')  # a request begun and never finished
        held.append(s)
    print("ready", flush=True)
    sys.stdin.read()  # hold them until told
    """
)


@pytest.mark.parametrize("mode", ["idle", "slow"])
def test_hundreds_of_idle_or_slow_clients_neither_delay_status_nor_eat_descriptors(make_server, sock_dir, mode):
    budget = control.fd_budget()
    before = fds()
    r = make_server(line_timeout=30)
    path = sock_dir / "control.sock"
    listening = fds() - before
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:  # the descriptors held while the flood comes in, not only after
        while not sampling.is_set():
            samples.append(fds() - before - listening)

    sampler = threading.Thread(target=sample)
    flood = subprocess.Popen([SYSTEM_PYTHON, "-c", FLOOD, str(path), "300", mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler.start()
    try:
        assert flood.stdout.readline() == "ready\n"
        sampling.set()
        sampler.join()
        peak = max(samples)
        for _ in range(20):
            c = Client(path)
            started = time.monotonic()
            assert c.ask({"cmd": "status"})["ok"] is True
            assert time.monotonic() - started < 1.0
            c.close()
        assert r.server.clients <= r.server.max_clients == min(control.MAX_CLIENTS, budget)
        pipes = 2  # this process's ends of the flood's stdin and stdout
        wait_for(lambda: fds() - before - listening - pipes <= r.server.max_clients, 10,
                 f"evicted clients' fds to close ({r.server.clients} clients, {fds() - before - listening} fds)")
        assert peak <= r.server.max_clients + 8  # the cap, the pipes to the flood, one being admitted
    finally:
        sampling.set()
        flood.stdin.close()
        flood.wait(30)
        flood.stdout.close()
    wait_for(lambda: r.server.clients == 0, 10, "the flood's connections to go")
    wait_for(lambda: fds() - before == listening, 10, "every client descriptor to be closed")


def test_the_cap_stays_well_below_the_file_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 1024))
    assert control.fd_budget() == 8
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    assert control.fd_budget() == 128


def test_close_ends_idle_clients_and_lets_a_busy_one_finish(make_server, sock_dir):
    r = make_server()
    path = sock_dir / "control.sock"
    idle, busy = Client(path), Client(path)
    busy.send(b'{"cmd": "reload"}\n')
    wait_for(lambda: len(r.handled) == 1, 5, "the reload to reach the handler")
    closing = asyncio.run_coroutine_threadsafe(r.server.close(), r.loop)
    assert idle.closed()
    r.release.set()
    assert json.loads(busy.line())["outcome"] == "applied"
    assert busy.closed()
    closing.result(10)
    assert not path.exists()
    idle.close()
    busy.close()


def test_the_client_reports_a_server_that_speaks_something_else(sock_dir):
    path = sock_dir / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n\n")
            conn.close()

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(control_client.DaemonUnreachable, match="does not speak omerowebd's protocol"):
            control_client.request(path, {"cmd": "status"})
        t.join()


def test_admin_group_must_name_a_group(tmp_path):
    from omerowebd import config as config_module
    from omerowebd.errors import ConfigError

    def parse(group: str) -> Any:
        text = f'[daemon]\nomerodir = "/srv/o"\nvenv = "/srv/v"\nadmin_group = {json.dumps(group)}\n'
        return config_module.parse(text.encode(), tmp_path / "omerowebd.toml")

    assert parse("users").daemon.admin_group == "users"
    for bad in ("no-such-group-here", "a\u0000b", ""):
        with pytest.raises(ConfigError) as e:
            parse(bad)
        assert str(e.value).startswith(f"{tmp_path / 'omerowebd.toml'}:4: daemon.admin_group names no group")
        assert "\n" not in str(e.value)
