"""Who may do what on the control socket.

Two levels. Reading (``status``) is for the daemon's group: whoever may
connect to the socket (0660, the daemon's user and group). Changing state
(``reload``, its dry run, ``sessions_clear``) is for root, the daemon's own
user and the members of ``daemon.admin_group``. The table below is the one
place that says which command needs which; a command missing from it is
refused, so a new ``request_*`` method cannot slip in unguarded.

The peer is known by the kernel's record of who connected (SO_PEERCRED and
SO_PEERGROUPS), never by anything the peer says about itself.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import grp
import os
import pwd
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Level(enum.IntEnum):
    READ = 1
    ADMIN = 2


# The permission table: command -> the level it needs.
COMMANDS: Mapping[str, Level] = {
    "status": Level.READ,
    # Also with dry_run: a dry run reads the root-owned config file and hashes
    # the venv, and reports what changed in it; observing the daemon is what
    # the group is for, preparing a change is the admins'.
    "reload": Level.ADMIN,
    "sessions_clear": Level.ADMIN,
}

# Linux's number on every Debian architecture (asm-generic; only sparc and
# parisc differ); Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_BUF = 1024  # the most Python's getsockopt takes: 256 groups; more goes through libc


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel recorded it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


def peer_of(sock: socket.socket) -> Peer:
    """The peer's credentials; OSError if the kernel has none (not a unix socket).

    Why SO_PEERGROUPS for the supplementary groups, and not /proc/PID/status
    or the group database: the kernel records uid, gid and groups together at
    connect(), so they describe one process at one moment and are the same
    credentials that let it open the 0660 socket. /proc/PID races with the
    peer exiting and its pid being reused, is hidden from the daemon for
    other users' processes under the unit's ProtectProc=invisible, and may
    have changed since connect(); the group database (getgrnam().gr_mem) is
    not what the process holds (a member added after login does not have the
    group yet, primary groups are not listed) and may block the loop on
    LDAP. If the groups cannot be read, the peer counts with its primary
    group alone: less permission, never more.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid=pid, uid=uid, gid=gid, groups=frozenset(_peer_groups(sock)))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUF)
    except OSError as e:
        if e.errno != errno.ERANGE:
            return ()
        raw = _peer_groups_large(sock.fileno())
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _peer_groups_large(fd: int) -> bytes:
    """SO_PEERGROUPS for a peer with more than 256 groups (up to NGROUPS_MAX)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint32(65536 * 4)
    buf = ctypes.create_string_buffer(size.value)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)) != 0:
        return b""
    return buf.raw[: size.value]


@dataclass(frozen=True)
class Policy:
    """The daemon's side: its own user and group, and the admin group if any."""

    uid: int
    gid: int
    admin_gid: int | None = None
    admin_group: str | None = None
    # Names for messages, looked up once (a lookup may go to LDAP).
    user_name: str = ""
    group_name: str = ""

    def level(self, peer: Peer) -> Level | None:
        if peer.uid in (0, self.uid) or (self.admin_gid is not None and peer.in_group(self.admin_gid)):
            return Level.ADMIN
        if peer.in_group(self.gid):
            return Level.READ
        return None

    def who(self, level: Level) -> str:
        """Who may do what needs ``level``, in words (for a refusal)."""
        readers = f"members of group {self.group_name or self.gid!r}"
        admins = f"root, user {self.user_name or self.uid!r}"
        admins += f" or members of group {self.admin_group!r} (daemon.admin_group)" if self.admin_group else (
            " (or members of a group set as daemon.admin_group)"
        )
        return admins if level is Level.ADMIN else f"{readers}, {admins}"


def policy(admin_group: str | None) -> Policy:
    """The policy of this process. A group that does not exist (the config check refuses
    it; it may have been removed since) admits nobody: less permission, never more."""
    try:
        admin_gid = grp.getgrnam(admin_group).gr_gid if admin_group else None
    except (KeyError, ValueError):
        admin_gid = None
    uid, gid = os.getuid(), os.getgid()
    return Policy(uid=uid, gid=gid, admin_gid=admin_gid, admin_group=admin_group,
                  user_name=user_name(uid), group_name=group_name(gid))


def required(request: Mapping[str, Any]) -> Level | None:
    """The level a request needs; None for a command nobody may run (unknown)."""
    cmd = request.get("cmd")
    return COMMANDS.get(cmd) if isinstance(cmd, str) else None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
