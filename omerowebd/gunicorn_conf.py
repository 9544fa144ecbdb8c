"""Gunicorn config file for one omerowebd generation: ``gunicorn -c gunicorn_conf.py``.

A standalone file run by the OMERO.web venv's gunicorn (any version from
20.1 on, on the venv's Python): it imports nothing of omerowebd and reads the
snapshot the daemon wrote for this generation ($OMEROWEBD_SNAPSHOT, JSON).

What it does in the gunicorn master, before gunicorn creates its listeners:
* moves the inherited sockets to fds 3.. and sets LISTEN_FDS/LISTEN_PID to
  this process, so gunicorn takes them in its "systemd" mode (and never
  unlinks a unix socket path when it stops: the next generation serves on it);
* asks the kernel to TERM this master if the daemon dies (no gunicorn may
  outlive the daemon, even after SIGKILL);
* reports each worker that has loaded the app back to the daemon over a
  datagram socket, which is how the daemon knows a generation is ready.
"""

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1

with open(os.environ["OMEROWEBD_SNAPSHOT"]) as _f:
    _snapshot = json.load(_f)

# Gunicorn settings (workers, worker_class, timeout, control_socket, ...).
# Gunicorn versions that do not know a name ignore it.
globals().update(_snapshot["settings"])

_generation = _snapshot["generation"]
_events = _snapshot["events"]


def _tell_daemon(event, **fields):
    message = dict(fields, gen=_generation, event=event)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(json.dumps(message).encode(), _events)
        except OSError:
            pass  # the daemon watches the process too; a lost report only delays it


def _die_with_daemon():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(os.environ["OMEROWEBD_PID"]):
        sys.exit("omerowebd went away before this gunicorn master started")


def _take_sockets():
    fds = [int(fd) for fd in os.environ.pop("OMEROWEBD_FDS").split(",")]
    # Move them out of the way first, then down to 3.., whatever order they came in.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())


# Gunicorn reads this file again on HUP; the sockets are taken only once.
if "OMEROWEBD_FDS" in os.environ:
    _die_with_daemon()
    _take_sockets()


def post_fork(server, worker):
    # In the new worker, before it loads the app: the daemon times its boot from here.
    _tell_daemon("worker_booting", pid=os.getpid())


def post_worker_init(worker):
    _tell_daemon("worker_ready", pid=os.getpid())


def worker_exit(server, worker):
    # In the worker, as it leaves on its own (max_requests, a graceful stop,
    # the master's timeout abort): a worker killed outright never gets here.
    _tell_daemon("worker_leaving", pid=os.getpid())


def child_exit(server, worker):
    # In the master, once the worker is gone; ``aborted``: gunicorn killed it for hanging past its timeout.
    _tell_daemon("worker_exit", pid=worker.pid, timeout=bool(getattr(worker, "aborted", False)))
