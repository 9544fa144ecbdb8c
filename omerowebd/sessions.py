"""Who sweeps the session store: the engine decides, the schedule says when.

* Django's file backend (and ``omeroweb.filesessionstore``, the same thing):
  swept by ``session_sweep.py`` in the OMERO.web venv. It deletes exactly
  what ``manage.py clearsessions`` would, and reads only the files whose
  content it has not seen (see that file for the rule and why).
* The database backends (``db``, ``cached_db``): Django's own
  ``clearsessions`` in the venv.
* Cache backends (and signed cookies): the cache expires entries itself;
  there is nothing to sweep, and status says so.

Why the sweep runs in the venv and not here: deciding a session that carries
its own expiry means checking its signature with OMERO.web's SECRET_KEY and
decoding it with the configured serializer, in the format of the installed
Django; and the settings themselves (cookie name and age, USE_TZ, the store,
``django_additional_settings`` overrides) are what ``omeroweb.settings``
computes. The venv has all of that and the daemon has none of it; a copy here
would drift with every omero-web and Django upgrade. The script imports
Django only when it needs it (the first sweep after a config or venv change,
and the rare session with its own expiry); the rest is stat(), read() and base64.

Each sweep is a child process at low CPU and I/O priority, so the daemon's
loop never waits on the disk; an flock in the store keeps a second sweeper
(another daemon on a shared store, omerowebctl by hand) out.

Who the child runs as (see ``runner_for``). The store belongs to the service
user, who must be assumed hostile: whatever it planted there (links, FIFOs,
hard links, forged sessions, a config.xml naming another store) must not make
a root process write, delete, decode or import anything. So a sweep started
by root (``omerowebctl sessions clear`` with no daemon, or a daemon run as
root) runs as the user who owns the directory it works in: the store for the
file engines, the state directory for the database engines. That user could
do all the sweep does by hand; nothing more. Root itself sweeps only a store
that root alone controls all the way down (trust.path_problems). Neither side
reads OMERO.web's settings from the site's config.xml: the child is given the
config.xml omerowebd derives from its own TOML, and the store that TOML names.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pwd
import selectors
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from . import desired, omero_config, printable, sweep_settings, trust
from .config import Config, SessionsSettings
from .errors import one_line
from .nginx_syntax import host_and_port
from .procs import signal_group as _signal  # the sweep's own session: clearsessions' children go too
from .schedule import Schedule, parse_schedule
from .status_lines import COUNTS, holder_text
from .threads import Looks, NoAnswer
from .venv import VenvInfo, effective, probe_env, python_of

SCRIPT = Path(__file__).with_name("session_sweep.py")
DEFAULT_ENGINE = "django.contrib.sessions.backends.file"
FILE_ENGINES = ("django.contrib.sessions.backends.file", "omeroweb.filesessionstore")
DB_ENGINES = ("django.contrib.sessions.backends.db", "django.contrib.sessions.backends.cached_db")
SELF_EXPIRING = ("django.contrib.sessions.backends.cache", "django.contrib.sessions.backends.signed_cookies")
TERM_GRACE = 10.0  # seconds a sweep told to stop has to report what it did


@dataclass(frozen=True)
class Target:
    """What a sweep works on, derived from the config and the venv."""

    engine: str
    kind: str  # "file", "db", "cache" or "unknown"
    store: Path | None  # the file store's directory
    omerodir: Path
    python: Path
    manage: Path
    settings: SessionsSettings
    # The config.xml text omerowebd derives from its TOML: the child reads OMERO.web's
    # settings from a private copy of it. None: the site's own (tests that made one).
    config_xml: str | None = None
    state_dir: Path | None = None  # whose owner runs clearsessions for root
    # The site's TCP ports: the sweep slows down while requests wait or run on them (session_sweep.Pacer).
    ports: tuple[int, ...] = ()

    @property
    def sweeper(self) -> str | None:
        return {"file": "omerowebd", "db": "clearsessions"}.get(self.kind)

    @property
    def note(self) -> str:
        if self.kind == "cache":
            return f"{self.engine} expires sessions itself: nothing to sweep"
        if self.kind == "unknown":
            return f"unknown session engine {self.engine}: not swept"
        if self.kind == "db":
            return "Django's clearsessions runs in the OMERO.web venv"
        return "omerowebd sweeps the file store"


def classify(engine: str) -> str:
    if engine in FILE_ENGINES:
        return "file"
    if engine in DB_ENGINES:
        return "db"
    if engine in SELF_EXPIRING:
        return "cache"
    return "unknown"


def target_for(config: Config, properties: Mapping[str, str], info: VenvInfo) -> Target:
    """``properties`` as written to config.xml (the session path already pinned)."""
    engine = effective(properties, info, "omero.web.session_engine", DEFAULT_ENGINE) or DEFAULT_ENGINE
    kind = classify(engine)
    store = None
    if kind == "file":
        # Django's own fallback when SESSION_FILE_PATH is unset; the daemon
        # pins it, so this is only for a config.xml written by someone else.
        store = Path(omero_config.session_file_path(properties) or tempfile.gettempdir())
    return Target(
        engine=engine, kind=kind, store=store, omerodir=config.daemon.omerodir,
        python=python_of(config.daemon.venv), manage=info.omeroweb_dir / "manage.py", settings=config.sessions,
        config_xml=omero_config.render_config_xml(properties).decode(), state_dir=config.daemon.state_dir,
        ports=tcp_ports(config.bind_addresses()),
    )


def tcp_ports(addresses: tuple[str, ...]) -> tuple[int, ...]:
    """The ports of "host:port" and "[v6]:port" addresses (unix sockets have none)."""
    ports = []
    for address in addresses:
        if address.startswith("unix:"):
            continue
        try:
            port = host_and_port(address)[1]
        except ValueError:
            continue
        if 0 < port < 65536:
            ports.append(port)
    return tuple(sorted(set(ports)))


def pinned_properties(config: Config) -> dict[str, str]:
    """The properties the daemon writes to config.xml: the session store pinned under its state dir."""
    return desired.properties_of(config)


# -- who runs it ----------------------------------------------------------------------


class SweepRefused(Exception):
    """Root will not sweep here; the message says why and what to change."""


@dataclass(frozen=True)
class Runner:
    """The user a sweep runs as; all None: as this process."""

    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    home: str | None = None

    def popen_args(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        # extra_groups=[]: none of root's supplementary groups go with it.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        # Fixed hash seed: the ledger stores hash() values (the script re-execs without it).
        if self.uid is None:
            return {**probe_env(), "PYTHONHASHSEED": "0"}
        # A clean environment: nothing of root's (its HOME, TMPDIR, PYTHON* variables) reaches the child.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.home or "/", "USER": self.name or "",
               "LOGNAME": self.name or "", "PYTHONHASHSEED": "0"}
        env.update({k: os.environ[k] for k in ("LANG", "LC_ALL", "TZ") if k in os.environ})
        return env


def runner_for(target: Target) -> Runner:
    """As root: the owner of the directory the sweep works in (see the module's doc); else ourselves."""
    if os.geteuid() != 0:
        return Runner()
    if target.kind == "file":
        where, what = target.store, "session store"
    else:
        where, what = target.state_dir, "state directory"
    if where is None:
        raise SweepRefused(f"no {what} to sweep as")
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        raise SweepRefused(f"the {what} {where} does not exist: start omerowebd once (it creates it), "
                           "or create it owned by the service user") from None
    except OSError as e:
        raise SweepRefused(f"cannot look at the {what} {where}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise SweepRefused(f"the {what} {where} is a symbolic link: name the directory itself"
                           + (" in SESSION_FILE_PATH" if target.kind == "file" else ""))
    if not stat.S_ISDIR(st.st_mode):
        raise SweepRefused(f"the {what} {where} is not a directory")
    if st.st_uid == 0:
        # Every directory on the way may be a sticky /tmp (nobody can swap root's entry), but
        # not the store itself: there anybody may plant what root would then read and delete.
        if st.st_mode & stat.S_IWOTH:
            raise SweepRefused(f"refusing to sweep as root: the {what} {where} is writable by everyone, so anybody "
                               "could plant files there for root to read, decode and delete. Give OMERO.web a store "
                               "of its own (leave SESSION_FILE_PATH unset: omerowebd pins STATE_DIR/sessions)")
        problems = trust.path_problems(where, what)
        key = target.omerodir / "var" / "django_secret_key"
        if not problems and target.kind == "file" and os.path.lexists(key):
            problems = trust.file_problems(key, "OMERO.web's secret key")
        if problems:
            raise SweepRefused(f"refusing to sweep as root: {problems[0]}; whoever can write there could steer what "
                               f"root deletes and decodes. Give the {what} to the service user "
                               f"(chown -R omero-web: {where}): the sweep then runs as that user")
        return Runner()
    try:
        user = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise SweepRefused(f"the {what} {where} is owned by uid {st.st_uid}, which has no user name: "
                           "chown it to the service user") from None
    if user.pw_gid == 0:
        raise SweepRefused(f"the {what} {where} belongs to {user.pw_name}, whose group is root: "
                           "refusing to run the sweep with group root")
    return Runner(uid=user.pw_uid, gid=user.pw_gid, name=user.pw_name, home=user.pw_dir)


# -- one sweep ----------------------------------------------------------------------


def _command(target: Target) -> list[str]:
    # Not `python SCRIPT`: that puts this package's directory first on sys.path,
    # where our modules would shadow the standard library's for Django.
    return [str(target.python), "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
            str(SCRIPT)]


def _request(target: Target, dry_run: bool, snapshot: Mapping[str, Any] | None) -> bytes:
    s = target.settings
    request: dict[str, Any] = {"omerodir": str(target.omerodir), "nice": s.nice, "idle_io": s.ionice_idle,
                               "config_xml": target.config_xml}
    if target.kind == "db":
        request.update(mode="clearsessions", manage=str(target.manage))
    else:
        request.update(mode="sweep", dry_run=dry_run, snapshot=dict(snapshot) if snapshot else None, ledger=True,
                       ports=list(target.ports),
                       store=str(target.store) if target.store else None)
    return json.dumps(request).encode()


def _refused(target: Target, dry_run: bool, message: str) -> dict[str, Any]:
    return {"engine": target.engine, "store": str(target.store) if target.store else None, "dry_run": dry_run,
            "sweeper": target.sweeper, "duration": 0.0, "at": time.time(), "error": message}


# -- what the child says ---------------------------------------------------------------
#
# The child runs as the store's owner, the service user, which must be assumed
# compromised (it may ptrace the child, or be the one who wrote the venv's
# Django): its report is data of the types the script writes, or nothing, and
# its text is shown only through printable.py.

MAX_TEXT = 1000  # characters of one error sample, message or stderr line kept
_REPORT_TYPES: dict[str, tuple[type, ...]] = {
    **{name: (int,) for name in (*COUNTS, "sessions", "ignored", "vanished", "changed", "read", "decoded",
                                 "ledger_hits", "ledger_entries")},
    "busy": (bool,), "interrupted": (bool,), "started_at": (int, float), "holder": (str,), "fatal": (str,),
    "busy_share": (int, float), "django_settings": (str,), "locked_at": (int, float), "unlocked_at": (int, float),
}
_TEXT_LISTS = {"error_samples": 20, "priority_notes": 5}
_SNAPSHOT_VALUES = (str, int, float, bool, type(None))
# Where a sweep's time went (session_sweep.Sweep.phases), in seconds.
PHASES = ("settings", "list", "read", "judge", "django", "delete_wait", "paused")


def _text(value: str) -> str:
    value = printable.text(value)
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "..."


def checked_report(report: Any) -> dict[str, Any] | None:
    """The fields of the script's report that have the type it writes (text made printable); None if not a dict."""
    if not isinstance(report, dict):
        return None
    out: dict[str, Any] = {}
    for name, types in _REPORT_TYPES.items():
        value = report.get(name)
        if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
            out[name] = _text(value) if isinstance(value, str) else value
    for name, limit in _TEXT_LISTS.items():
        value = report.get(name)
        if isinstance(value, list):
            out[name] = [_text(v) for v in value if isinstance(v, str)][:limit]
    phases = report.get("phases")
    if isinstance(phases, dict):
        out["phases"] = {k: v for k, v in phases.items() if k in PHASES and isinstance(v, (int, float))
                         and not isinstance(v, bool)}
    snapshot = report.get("snapshot")
    if isinstance(snapshot, dict) and all(isinstance(k, str) and isinstance(v, _SNAPSHOT_VALUES)
                                          for k, v in snapshot.items()):
        out["snapshot"] = snapshot  # handed to the next sweep, which runs as the same user
    return out


def _outcome(target: Target, dry_run: bool, returncode: int | None, stdout: bytes, stderr: bytes,
             duration: float, timed_out: bool, problem: str | None = None) -> dict[str, Any]:
    """The script's report, or what went wrong, in one shape."""
    base: dict[str, Any] = {"engine": target.engine, "store": str(target.store) if target.store else None,
                            "dry_run": dry_run, "duration": round(duration, 3), "at": time.time() - duration}
    if target.kind == "db":
        base.update(sweeper="clearsessions", exit_status=returncode)
        if problem:
            base["error"] = f"clearsessions stopped: {problem}"
        elif timed_out:
            base["error"] = f"clearsessions ran over sessions.timeout ({target.settings.timeout:.0f}s) and was stopped"
        elif returncode != 0:
            base["error"] = f"clearsessions failed ({returncode}): {_last_line(stderr)}"
        return base
    base["sweeper"] = "omerowebd"
    if problem:
        base["error"] = f"the sweep was stopped: {problem}"
        return base
    report = None
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            report = checked_report(json.loads(line))
            break
        except (ValueError, RecursionError):
            continue
    if report is not None and "fatal" not in report:
        base.update(report)  # engine and store stay ours: the TOML's, whatever the child says
        base["at"] = report.get("started_at", base["at"])
        if timed_out:
            base["error"] = f"the sweep ran over sessions.timeout ({target.settings.timeout:.0f}s); stopped part way"
        elif report.get("busy"):
            holder = f" ({holder_text(report['holder'])})" if report.get("holder") else ""
            base["error"] = f"another sweep holds the lock on {base['store']}{holder}; not run"
        return base
    if report is not None:
        base["error"] = report["fatal"]
    elif timed_out:
        base["error"] = f"the sweep ran over sessions.timeout ({target.settings.timeout:.0f}s) and was killed"
    else:
        base["error"] = f"the sweep failed ({returncode}): {_last_line(stderr)}"
    return base


# -- who holds the store's lock, right now ---------------------------------------------

LOCK_NAME = ".omerowebd-sweep.lock"  # session_sweep.LOCK_NAME (that script imports nothing of ours)
LOCK_FRESH = 1.0  # seconds a look at the lock is shown again instead of looking anew (a status flood)
LOCK_CHECK_TIMEOUT = 3.0  # a store on a hung NFS server must not hang status


def lock_state(store: Path) -> dict[str, Any]:
    """{"held": bool, "holder": "host pid" or ""} for the store's sweep lock, without taking it.

    Run by the daemon, maybe as root, on the service user's store: the store is
    opened without following a link, the lock file likewise and only if it is
    a regular file with one name; only a "host pid" record is shown."""
    from . import session_sweep as script  # the holder rules, one copy

    try:
        dfd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return {"held": None, "error": e.strerror or str(e)}
    try:
        try:
            fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return {"held": False, "holder": ""}
        except OSError as e:
            return {"held": None, "error": e.strerror or str(e)}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return {"held": False, "holder": ""}  # not a lock file a sweeper made: the next sweep replaces it
            holder = script.lock_holder(fd)
            return {"held": holder is not None, "holder": holder or ""}
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return _text(lines[-1]) if lines else "no output"


# -- running the child -----------------------------------------------------------------
#
# Read with a deadline and a cap, never "until EOF": a process of the service
# user may hold the child's pipes open after the child is gone (a detached
# grandchild), or write without end. Once sessions.timeout and the grace after
# SIGTERM have passed, or the child has exited and its output is drained, the
# pipes are closed whoever else holds them, and the child's process group is
# killed (before the child is reaped, so the group id cannot have been reused).

MAX_STDOUT = 4 << 20  # the report: counts, 20 samples and the settings snapshot are a few KiB
MAX_STDERR = 64 << 10  # of stderr only the end is kept (its last line says why)
# Seconds to read what is left once the child has exited: it is in the pipes already, and EOF
# follows at once unless a process outside the child's group holds them.
EXIT_DRAIN = 2.0
KILL_WAIT = 10.0
POLL = 0.5  # how often a sweep checks whether it was asked to stop


@dataclass
class Finished:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    problem: str | None = None  # why the output was cut short


def run_child(command: list[str], request: bytes, *, timeout: float, env: Mapping[str, str],
              popen_args: Mapping[str, Any], stop: threading.Event | None = None) -> Finished:
    """Run the sweep's child to the end or to its deadline; blocking (the daemon calls it in a thread)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env), start_new_session=True, cwd="/", **popen_args)
    finished = Finished(None, b"", b"")
    try:
        _collect(proc, request, timeout, stop, finished)
        return finished
    finally:
        _signal(proc.pid, signal.SIGKILL)  # the group, stragglers and all; the child is not reaped yet
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            finished.returncode = proc.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:  # stuck in the kernel: reaped by a later wait, if ever
            pass


def _collect(proc: subprocess.Popen[bytes], request: bytes, timeout: float, stop: threading.Event | None,
             result: Finished) -> None:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    pending = memoryview(request)
    sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    deadline = time.monotonic() + timeout
    terminated = exited = False
    try:
        while sel.get_map():
            now = time.monotonic()
            if stop is not None and stop.is_set():
                result.problem = "the daemon is stopping"
                break
            if not exited and _has_exited(proc.pid):
                exited = True
                _signal(proc.pid, signal.SIGKILL)  # whatever it left in its group, holding the pipes or not
                deadline = min(deadline, now + EXIT_DRAIN)
            if now >= deadline:
                if exited or terminated:
                    break  # timeout and grace are over, or the exited child's pipes are held by someone else
                result.timed_out = terminated = True
                _signal(proc.pid, signal.SIGTERM)  # the script stops between files and reports
                deadline = now + TERM_GRACE
                continue
            for key, _ in sel.select(min(deadline - now, POLL)):
                if key.data is None:  # stdin
                    try:
                        written = os.write(key.fd, pending[:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # it closed its end: it will say why, or not
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                if not _read_into(key, sel):
                    continue
                if len(out) > MAX_STDOUT:
                    result.problem = f"it wrote over {MAX_STDOUT >> 20} MiB where a report of a few KiB belongs"
                    return
                if len(err) > MAX_STDERR:
                    del err[: len(err) - MAX_STDERR]
    finally:
        sel.close()
        result.stdout, result.stderr = bytes(out), bytes(err)
    # What it wrote just before the deadline or its exit: already in the pipes, read without waiting.
    _signal(proc.pid, signal.SIGKILL)
    for pipe, buf, cap in ((proc.stdout, out, MAX_STDOUT), (proc.stderr, err, MAX_STDERR)):
        while len(buf) <= cap:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except (BlockingIOError, OSError, ValueError):
                break
            if not chunk:
                break
            buf += chunk
    if len(out) > MAX_STDOUT:
        result.problem = f"it wrote over {MAX_STDOUT >> 20} MiB where a report of a few KiB belongs"
    result.stdout, result.stderr = bytes(out), bytes(err[-MAX_STDERR:])


def _read_into(key: selectors.SelectorKey, sel: selectors.BaseSelector) -> bool:
    """Read what is there; False at EOF (the pipe is then no longer watched)."""
    try:
        chunk = os.read(key.fd, 65536)
    except BlockingIOError:
        return True
    except OSError:
        chunk = b""
    if not chunk:
        sel.unregister(key.fileobj)
        return False
    key.data.extend(chunk)
    return True


def _has_exited(pid: int) -> bool:
    """Has the child exited? Without reaping it: its pid, the group's id, stays ours until we do."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


async def sweep(target: Target, dry_run: bool = False, snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One sweep in a child process; never blocks the loop. Cancelling it stops the child."""
    try:
        runner = runner_for(target)
    except SweepRefused as e:
        return _refused(target, dry_run, str(e))
    started = time.monotonic()
    stop = threading.Event()
    job = asyncio.get_running_loop().run_in_executor(None, functools.partial(
        run_child, _command(target), _request(target, dry_run, snapshot), timeout=target.settings.timeout,
        env=runner.env(), popen_args=runner.popen_args(), stop=stop))
    try:
        finished = await asyncio.shield(job)
    except asyncio.CancelledError:
        stop.set()  # the thread kills the child within POLL seconds
        await asyncio.wait({job}, timeout=POLL + KILL_WAIT + 5)
        raise
    return _outcome(target, dry_run, finished.returncode, finished.stdout, finished.stderr,
                    time.monotonic() - started, finished.timed_out, finished.problem)


def sweep_sync(target: Target, dry_run: bool = False, snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The same, for omerowebctl when no daemon runs."""
    try:
        runner = runner_for(target)
    except SweepRefused as e:
        return _refused(target, dry_run, str(e))
    started = time.monotonic()
    finished = run_child(_command(target), _request(target, dry_run, snapshot), timeout=target.settings.timeout,
                         env=runner.env(), popen_args=runner.popen_args())
    return _outcome(target, dry_run, finished.returncode, finished.stdout, finished.stderr,
                    time.monotonic() - started, finished.timed_out, finished.problem)


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What status and the log keep of a sweep (no samples, no snapshot)."""
    keep = ("at", "engine", "store", "sweeper", "dry_run", "duration", *COUNTS, "sessions", "ignored", "vanished",
            "changed", "read", "decoded", "ledger_hits", "interrupted", "busy", "exit_status", "error", "trigger")
    return {k: result[k] for k in keep if k in result}


# -- the service ----------------------------------------------------------------------


class SessionService:
    """Sweeps on the schedule in ``[sessions]``; the supervisor feeds it every applied config."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.target: Target | None = None
        self.schedule: Schedule | None = None
        self.last: dict[str, Any] | None = None
        self.next_at: float | None = None
        self.running: dict[str, Any] | None = None
        self.sweeps = 0
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_uid: int | None = None  # the user whose sweep learnt _snapshot
        self.lock: dict[str, Any] | None = None  # the store's sweep lock, as last seen
        self._lock_looks: Looks[Path, dict[str, Any]] = Looks(
            "sweep-lock", lambda store: lock_state(store), on_error=lambda e: {"held": None, "error": one_line(e)})
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    def update(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> None:
        target, old = target_for(config, properties, info), self.target
        self.target = target  # the newest settings for the next sweep, whatever changed
        # Only what decides when and where to sweep restarts the schedule: a reload that
        # changes some other property must not push the next sweep further out.
        if old is None or replace(old, config_xml=None) != replace(target, config_xml=None):
            self.schedule = parse_schedule(target.settings.schedule)
            self._changed.set()  # the schedule loop works out the next sweep again

    async def run(self) -> None:
        """The schedule loop: started once the daemon is READY, cancelled on stop."""
        await self._schedule_loop()

    async def refresh_lock(self) -> None:
        """Who holds the file store's sweep lock (this daemon, another host on a shared store), for status.

        Looked at when status asks (at most once per LOCK_FRESH seconds), never on a clock: an
        idle daemon does nothing for it. On a hung NFS mount a look never returns: threads.Looks
        keeps it out of the loop's pool (which reloads and crash restarts wait on), starts no
        second look beside it, and lets a status wait for it only up to LOCK_CHECK_TIMEOUT after
        it began."""
        target = self.target
        if target is None or target.kind != "file" or target.store is None:
            self.lock = None
            return
        try:
            state = await self._lock_looks.answer(target.store, within=LOCK_CHECK_TIMEOUT, max_age=LOCK_FRESH)
        except NoAnswer as e:
            state = {"held": None, "error": str(e)}
        self.lock = {**state, "checked_at": time.time()}

    async def _schedule_loop(self) -> None:
        first = True
        while True:
            target = self.target
            if target is None or not target.settings.enabled or target.sweeper is None:
                self.next_at = None
                await self._wait_for_change()
                continue
            if first and target.settings.at_start:
                first = False
                await self._scheduled("start")
                continue
            first = False
            assert self.schedule is not None
            self.next_at = self.schedule.next_after(datetime.now().astimezone()).timestamp()
            if await self._sleep_until(self.next_at):
                await self._scheduled("schedule")

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def _sleep_until(self, when: float) -> bool:
        """True when the time came; False when the config changed first."""
        self._changed.clear()
        while (left := when - time.time()) > 0:
            try:
                # At most a minute at a time: the wall clock may jump (suspend, NTP).
                await asyncio.wait_for(self._changed.wait(), min(left, 60.0))
            except asyncio.TimeoutError:
                continue
            self._changed.clear()
            return False
        return True

    async def _scheduled(self, trigger: str) -> None:
        try:
            await self.sweep_now(trigger=trigger)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in one sweep must not end the schedule
            self.log.exception("session sweep failed", error=str(e))

    async def sweep_now(self, dry_run: bool = False, trigger: str = "omerowebctl") -> dict[str, Any]:
        """Run a sweep now (after the one in progress, if any) and return its report."""
        async with self._lock:
            target = self.target
            if target is None:
                return {"error": "the daemon has no config applied yet", "dry_run": dry_run}
            if target.sweeper is None:
                return {"engine": target.engine, "store": None, "sweeper": None, "dry_run": dry_run,
                        "skipped": target.note}
            self.running = {"since": time.time(), "trigger": trigger, "dry_run": dry_run}
            uid = await asyncio.to_thread(sweep_uid, target)
            if uid != self._snapshot_uid:
                # Settings learnt by one user's sweep never go to another's (a store chowned to root
                # since: root's sweep would import the serializer a service user's sweep named).
                self._snapshot, self._snapshot_uid = None, uid
            if self._snapshot is None and uid is not None:
                self._snapshot = await asyncio.to_thread(self._recall, target, uid)
            try:
                result = await sweep(target, dry_run, self._snapshot)
            finally:
                self.running = None
            result["trigger"] = trigger
            if isinstance(result.get("snapshot"), dict):
                if result["snapshot"] != self._snapshot and uid is not None:
                    await self._remember(target, uid, result["snapshot"])
                self._snapshot = result["snapshot"]
            self.sweeps += 1
            if not dry_run:
                self.last = summary(result)
            self._log(result)
            return {k: v for k, v in result.items() if k != "snapshot"}

    def _recall(self, target: Target, uid: int) -> dict[str, Any] | None:
        """The settings a sweep as ``uid`` learnt before this daemon started (sweep_settings.py), if they fit
        (a read: call it in a thread)."""
        if target.state_dir is None:
            return None
        snapshot, why = sweep_settings.recall(target.state_dir, _settings_key(target, uid))
        if why:
            self.log.warning(f"ignoring the remembered sweep settings {target.state_dir / sweep_settings.NAME}: "
                             f"{why}; the sweep imports OMERO.web's settings instead")
        return snapshot

    async def _remember(self, target: Target, uid: int, snapshot: Mapping[str, Any]) -> None:
        if target.state_dir is None:
            return
        try:
            await asyncio.to_thread(sweep_settings.remember, target.state_dir, _settings_key(target, uid), snapshot)
        except OSError as e:  # a full disk: the next start's first sweep imports the settings, that is all
            self.log.warning("cannot remember the sweep's settings; the first sweep after a restart imports them",
                             error=one_line(e))

    def _log(self, result: Mapping[str, Any]) -> None:
        fields = summary(result)
        if result.get("error_samples"):
            fields["error_samples"] = result["error_samples"][:5]
        event = "sessions swept" if not result.get("dry_run") else "sessions sweep (dry run)"
        if result.get("error") or result.get("errors"):
            self.log.warning(event, **fields)
        else:
            self.log.info(event, **fields)

    def status(self) -> dict[str, Any]:
        t = self.target
        if t is None:
            return {"engine": None, "note": "no config applied yet"}
        snapshot_store = (self._snapshot or {}).get("file_path")
        return {
            "engine": t.engine,
            "kind": t.kind,
            "store": snapshot_store or (str(t.store) if t.store else None),
            "sweeper": t.sweeper,
            "note": t.note,
            "enabled": t.settings.enabled,
            "schedule": t.settings.schedule,
            "running": self.running,
            "last": self.last,
            "next": self.next_at,
            "sweeps": self.sweeps,
            "lock": self.lock,
        }


def _settings_key(target: Target, uid: int) -> str:
    return sweep_settings.key(config_xml=target.config_xml, store=target.store, engine=target.engine,
                              omerodir=target.omerodir, python=target.python, uid=uid)


def sweep_uid(target: Target) -> int | None:
    """The user a sweep of ``target`` runs as (runner_for's rule, without its checks: those come with the
    sweep); None when that cannot be told now."""
    if os.geteuid() != 0:
        return os.geteuid()
    where = target.store if target.kind == "file" else target.state_dir
    if where is None:
        return None
    try:
        return os.lstat(where).st_uid
    except OSError:
        return None
