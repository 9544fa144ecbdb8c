"""The listening sockets, held by the daemon for its whole life.

Either systemd passed them (socket activation: LISTEN_FDS/LISTEN_PID/
LISTEN_FDNAMES) or the daemon binds ``daemon.bind`` once at start. Every
gunicorn generation gets duplicates of the same sockets, so replacing a
master never closes the listening socket: connections wait in its backlog.

The sd_listen_fds protocol is read here by hand: it is three environment
variables, and the names (LISTEN_FDNAMES) are needed as well as the fds.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from .errors import UserError

# typing.TYPE_CHECKING without importing typing (about 5 ms): the early start imports this module before gunicorn's
# spawn, and tomllib, which imports typing too, only when the record is not where systemd keeps state.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

SD_LISTEN_FDS_START = 3
BACKLOG = 2048


class HeldSocket:
    # A plain class, not a dataclass: the early start (spawn_record.py) imports this module before gunicorn's
    # spawn, and dataclasses would bring inspect with it.
    __slots__ = ("sock", "address", "origin", "name")

    def __init__(self, sock: socket.socket, address: str, origin: Literal["systemd", "bound"], name: str = "") -> None:
        self.sock = sock
        self.address = address  # "127.0.0.1:4080", "[::1]:4080" or "unix:/run/omerowebd/web.sock"
        self.origin = origin
        self.name = name  # systemd's FileDescriptorName=, if any

    def __repr__(self) -> str:
        return f"HeldSocket({self.address!r}, {self.origin!r}, name={self.name!r})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def probe_target(self) -> tuple[int, str | tuple[str, int]]:
        """Where a client on this host connects to reach this socket."""
        family = self.sock.family
        if family == socket.AF_UNIX:
            return family, self.sock.getsockname()
        host, port = self.sock.getsockname()[:2]
        if family == socket.AF_INET6:
            return family, ("::1" if host == "::" else host, port)
        return family, ("127.0.0.1" if host == "0.0.0.0" else host, port)

    def describe(self) -> dict[str, str]:
        return {"address": self.address, "origin": self.origin, "name": self.name}

    def record(self) -> dict[str, Any]:
        """How to bind it again without resolving anything (spawn_record.py; bind_recorded)."""
        return {"address": self.address, "origin": self.origin, "family": int(self.sock.family),
                "sockaddr": self.sock.getsockname()}


def from_systemd(environ: dict[str, str] | None = None) -> list[HeldSocket]:
    """The sockets systemd passed to this process, or [] if none; clears the variables."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    held = []
    wrapped: list[socket.socket] = []
    try:
        for i in range(count):
            fd = SD_LISTEN_FDS_START + i
            mode = os.fstat(fd).st_mode
            if not stat.S_ISSOCK(mode):
                raise UserError(f"systemd passed fd {fd}, which is not a socket: check the .socket unit")
            sock = socket.socket(fileno=fd)
            wrapped.append(sock)
            os.set_inheritable(fd, False)
            if sock.type != socket.SOCK_STREAM:
                raise UserError(f"systemd passed a non-stream socket (fd {fd}): use ListenStream= in the .socket unit")
            held.append(HeldSocket(sock, _address_of(sock), "systemd", names[i] if i < len(names) else ""))
    except BaseException:
        # The descriptors stay open as systemd passed them: a collected socket object would close them (the
        # early start's attempt fails here, then the normal start reads them again and says what is wrong).
        for sock in wrapped:
            sock.detach()
        raise
    return held


def _address_of(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (name if isinstance(name, str) else name.decode(errors="replace"))
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def bind(addresses: tuple[str, ...]) -> list[HeldSocket]:
    held: list[HeldSocket] = []
    try:
        for address in addresses:
            held.append(_bind_one(address))
    except BaseException:
        release(held)
        raise
    return held


def bind_recorded(entries: list[dict[str, Any]]) -> list[HeldSocket]:
    """Bind again what HeldSocket.record() said (the early start): the same checks as bind, nothing resolved."""
    held: list[HeldSocket] = []
    try:
        for entry in entries:
            address = entry["address"]
            if entry["origin"] != "bound":
                raise UserError(f"{address} came from systemd, which passed no sockets this time")
            if address.startswith("unix:"):
                held.append(_bind_unix(Path(address[5:])))
            else:
                held.append(_bind_inet(address, socket.AddressFamily(entry["family"]), socket.SOCK_STREAM, 0,
                                       tuple(entry["sockaddr"])))
    except BaseException:
        release(held)
        raise
    return held


def _bind_one(address: str) -> HeldSocket:
    if address.startswith("unix:"):
        return _bind_unix(Path(address[5:]))
    from .nginx_syntax import host_and_port  # here: its ipaddress import would delay the early start

    host, port = host_and_port(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot bind {address}: {e.strerror}: fix daemon.bind") from None
    family, kind, proto, _, sockaddr = infos[0]
    return _bind_inet(address, family, kind, proto, sockaddr)


def _bind_inet(address: str, family: socket.AddressFamily, kind: socket.SocketKind | int, proto: int,
               sockaddr: Any) -> HeldSocket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise _bind_error(address, e) from None
    return HeldSocket(sock, _address_of(sock), "bound")


def _bind_unix(path: Path) -> HeldSocket:
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise UserError(f"cannot bind unix:{path}: a file that is not a socket is in the way")
        if _unix_in_use(path):
            raise _bind_error(f"unix:{path}", OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))
        path.unlink()  # a stale socket left by a crash: nobody answers on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)  # the web server's group reaches it; nobody else
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise _bind_error(f"unix:{path}", e) from None
    return HeldSocket(sock, f"unix:{path}", "bound")


def _unix_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _bind_error(address: str, e: OSError) -> UserError:
    if e.errno == errno.EADDRINUSE:
        return UserError(
            f"cannot bind {address}: address already in use (is another OMERO.web running?"
            " stop it, or change daemon.bind)"
        )
    if e.errno == errno.EACCES:
        return UserError(f"cannot bind {address}: permission denied (use a port above 1023, or socket activation)")
    return UserError(f"cannot bind {address}: {e.strerror}")


def release(held: list[HeldSocket]) -> None:
    """Close sockets; remove the paths of unix sockets this process bound itself."""
    for h in held:
        path = h.address[5:] if h.address.startswith("unix:") and h.origin == "bound" else None
        h.sock.close()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
