"""The first generation's spawn, remembered, so the next start can spawn gunicorn before the daemon's own imports.

A start with the config and venv unchanged since the last successful one
spawns what it spawned then. Its own Python (asyncio, the logging library,
the config code: about 0.15 s) used to come before gunicorn's; this module is
what runs first instead, and imports little (os, json, socket, hashlib,
tomllib, subprocess, and the package's light modules) so gunicorn's own
start overlaps the daemon's.

The record is written where the venv's remembered answer is (verdicts.py),
when that is, with the same trust rules: read only when it is the daemon's
user's own file that nobody else may write. It says what to run, so it is
never taken from anywhere another user can write. A daemon run as root
neither writes nor uses one: before root runs the venv's Python it walks the
whole venv (trust.venv_refusal), which no cheap key can stand in for.

The early start is a guess, checked twice:

* before the spawn, cheaply: the config file's bytes, the daemon's version,
  the user, the interpreter, the site-packages directories' stat and their
  package entries' mtimes (what venv.fingerprint hashes, so the venv's
  remembered answer is not missed while this hits) must be what the record was
  written for; the run lock is taken and the sockets bound (or taken from
  systemd) as the daemon would (bound only where daemon.bind names unix
  paths and literal IPs: a host name may resolve elsewhere now);
* after the daemon has loaded, fully: the daemon derives its plan the normal
  way and adopts the early master as generation 1 only if what it would
  spawn (argv, cwd, environment, the view's config.xml, the snapshot, the
  sockets) equals what was spawned. Anything else: the early master is
  stopped before anything else is started, and the start goes on as it would
  have without the record.

Every failure here falls back to the normal start with at most one info
line (said once logging is set up), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from . import __version__, trust
from .errors import UserError
from .files import write_atomic

# typing.TYPE_CHECKING without importing typing (about 5 ms): the early start imports this module before gunicorn's
# spawn, and tomllib, which imports typing too, only when the record is not where systemd keeps state.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NAME = "spawn-record.json"
FORMAT = 1  # bump when the record's shape or the key's recipe changes
MAX_BYTES = 4 << 20
DEFAULT_CONFIG = "/etc/omerowebd/omerowebd.toml"  # config_file.DEFAULT_CONFIG, without its imports
DEFAULT_STATE_DIR = "/var/lib/omerowebd"  # config.DaemonSettings.state_dir's default
# The daemon's own variables, which no venv process gets (probe_env and every generation).
DAEMON_ONLY = ("NOTIFY_", "LISTEN_", "WATCHDOG_", "OMERO")
# Environment variables that change what the venv's Python imports or how Ice and Django load (verdicts.py's too).
ENV_PREFIXES = ("PYTHON", "DJANGO", "LD_", "ICE")


def inherited_env() -> dict[str, str]:
    """The environment every venv process gets: the daemon's, less what belongs to the daemon."""
    return {k: v for k, v in os.environ.items() if not k.startswith(DAEMON_ONLY)}


def child_env(extra: dict[str, str], fds: list[int]) -> dict[str, str]:
    """A generation's master's environment: ``extra`` is its own part (Generation.spec's "env")."""
    env = inherited_env()
    env.pop("SCRIPT_NAME", None)  # set from omero.web.prefix, or not at all
    env.update(extra)
    env.update(OMEROWEBD_FDS=",".join(map(str, fds)), OMEROWEBD_PID=str(os.getpid()))
    return env


def prepare_view(view: Path, site: Path, config_xml: bytes) -> None:
    """A generation's OMERODIR: its own etc/grid/config.xml, the site's var/ (Generation.prepare_view says why)."""
    (site / "var").mkdir(parents=True, exist_ok=True)  # else OMERO.web's makedirs(var/log) fails on the link
    grid = view / "etc" / "grid"
    grid.mkdir(mode=0o750, parents=True, exist_ok=True)
    write_atomic(grid / "config.xml", config_xml, mode=0o600)
    var = view / "var"
    if not var.is_symlink():
        var.symlink_to(site / "var", target_is_directory=True)


def bind_probe(path: Path) -> socket.socket:
    """The socket only this generation listens on, for the health probe."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.exists() or path.is_symlink():
            path.unlink()
        probe.bind(str(path))
        probe.listen(64)
    except BaseException:
        probe.close()
        raise
    return probe


def bind_events(path: Path) -> socket.socket:
    """The datagram socket the generations' gunicorn hooks report to (Generations.listen takes it over)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if path.is_socket():
            path.unlink()
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def spawn(spec: dict[str, Any], fds: list[int]) -> subprocess.Popen[bytes]:
    """The master, as Generation.start spawns it (asyncio's subprocess is this Popen underneath)."""
    return subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=child_env(spec["env"], fds), pass_fds=fds,
                            stdin=subprocess.DEVNULL, start_new_session=True)


# -- the key ------------------------------------------------------------------


def site_dirs(venv: str) -> list[str]:
    """The venv's VENV/lib/python3*/site-packages directories, in order (venv.site_packages; without glob)."""
    lib = os.path.join(venv, "lib")
    try:
        names = sorted(n for n in os.listdir(lib) if n.startswith("python3"))
    except OSError:
        return []
    return [site for name in names if os.path.isdir(site := os.path.join(lib, name, "site-packages"))]


def package_entries(venv: str) -> list[tuple[str, int]]:
    """Each site-packages' package entries (.dist-info, .pth ...) with their mtime, what venv.fingerprint hashes:
    an install, upgrade or removal changes one, even where the directory's own mtime does not show it."""
    entries: list[tuple[str, int]] = []
    for site in site_dirs(venv):
        try:
            found = sorted(e for e in os.listdir(site) if e.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")))
        except OSError:
            continue
        for entry in found:
            try:
                entries.append((entry, os.stat(os.path.join(site, entry)).st_mtime_ns))
            except OSError:
                continue
    return entries


def key(config_digest: str, venv: str) -> str:
    """What the early spawn depends on and can check before loading anything: stat-level, cheap."""
    python = os.path.join(venv, "bin", "python")
    stamps: list[Any] = []
    try:
        st = os.stat(python)
        stamps.append([os.path.realpath(python), st.st_size, st.st_mtime_ns])
    except OSError:
        stamps.append(None)
    for site in site_dirs(venv):
        try:
            st = os.stat(site)
            stamps.append([site, st.st_mtime_ns, st.st_ino])
        except OSError:
            continue
    # What else the venv's remembered answer is keyed by (verdicts.key), so that one is not missed while this hits:
    # the probe script and gunicorn's config file (an upgrade of omerowebd), the variables that change imports.
    here = Path(__file__).parent
    scripts = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in ("venv_probe.py", "gunicorn_conf.py")]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    recipe = {"format": FORMAT, "version": __version__, "uid": os.geteuid(), "daemon": sys.executable,
              "config": config_digest, "venv": stamps, "packages": package_entries(venv), "scripts": scripts,
              "env": env}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# -- writing ------------------------------------------------------------------


def remember(state_dir: Path, config_digest: str, venv: Path, bind: list[str], spec: dict[str, Any]) -> None:
    """Keep generation 1's spawn for the next start (a write: call it in a thread). Raises OSError.

    ``config_digest``: of the bytes the config was loaded from (Config.digest), not of the file now."""
    if os.geteuid() == 0 or not trust.root_may_keep_in(state_dir):
        return  # root never spawns early (start says why): nothing to keep
    record = {"format": FORMAT, "key": key(config_digest, str(venv)), "bind": bind, "spec": spec}
    write_atomic(state_dir / NAME, json.dumps(record, sort_keys=True).encode(), mode=0o600)


def forget(state_dir: Path) -> None:
    try:
        if trust.root_may_keep_in(state_dir):
            (state_dir / NAME).unlink()
    except OSError:
        pass  # the next start compares it with what it derives anyway


# -- the early start ----------------------------------------------------------


class Early:
    """What the early start holds: the run lock, the sockets, the events socket, and the master, if spawned."""

    def __init__(self) -> None:
        self.note: str | None = None  # one info line for the log, once it is set up
        self.lock: Any = None  # runlock.RuntimeLock
        self.sockets: list[Any] = []  # sockets.HeldSocket
        self.systemd = False  # the sockets came from systemd (LISTEN_FDS): they were read, and cleared
        self.bind: list[str] = []  # the config's daemon.bind the sockets were bound for
        self.events: socket.socket | None = None
        self.events_path: Path | None = None
        self.spec: dict[str, Any] | None = None
        self.master: subprocess.Popen[bytes] | None = None
        self.adopted = False
        self.before_asyncio = False  # spawned before the daemon imported asyncio (what the early start is for)
        self.heard: list[bytes] = []  # the workers' reports read while waiting for the boot (Generations.listen)
        self.held: list[int] = []  # SIGTERM, SIGHUP that came before the daemon's loop took them (hold)
        self.waited: float | None = None  # seconds the daemon's own loading waited for gunicorn's boot

    def hold(self, signum: int, frame: Any) -> None:
        """SIGTERM's and SIGHUP's handler from the early spawn until the daemon's loop takes them over: each is
        kept for it (Supervisor.run), so a stop takes the master and its view in order and a reload comes right
        after the start, rather than Python ending outright (their default) with the view left behind."""
        if signum not in self.held:
            self.held.append(signum)

    def kill(self) -> None:
        """Sync, last resort (the daemon exits without having adopted or stopped it): no gunicorn is left behind,
        nor its view (a config.xml with the site's secrets)."""
        if self.adopted:
            return
        if self.master is not None and self.master.returncode is None:  # unreaped: the pid is still its own
            try:
                os.killpg(self.master.pid, 9)
            except OSError:
                pass
            self.master.wait()
        _drop_files(self)
        self.spec = None

    def let_go(self) -> None:
        """Taken for another runtime dir than the config's: the master killed, the rest released, but systemd's
        sockets, which cannot be had again (LISTEN_* were read and cleared): the daemon's start takes those."""
        self.kill()
        self.master = None
        kept, self.sockets = (self.sockets, []) if self.systemd else ([], self.sockets)
        self.close()
        self.sockets = kept

    def close(self) -> None:
        """Drop what the daemon did not take over (the master is stopped by then)."""
        from . import sockets as sockets_module
        if self.events is not None:
            self.events.close()
            if self.events_path is not None:
                try:
                    self.events_path.unlink()
                except OSError:
                    pass
            self.events = None
        sockets_module.release(self.sockets)
        self.sockets = []
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def config_path(argv: list[str]) -> str | None:
    """The config file, from a command line the early start understands (else None: argparse has its say first)."""
    if not argv:
        return os.environ.get("OMEROWEBD_CONFIG") or DEFAULT_CONFIG
    if len(argv) == 2 and argv[0] == "--config":
        return argv[1]
    if len(argv) == 1 and argv[0].startswith("--config="):
        return argv[0].split("=", 1)[1]
    return None


def start(argv: list[str]) -> Early | None:
    """Spawn gunicorn from the record if it fits; None when there is nothing to do (no record, another command line)."""
    path = config_path(argv)
    if not path or os.geteuid() == 0:
        # Root runs the venv's Python only once it has walked the venv and found it root's alone (venv.py's
        # layout_problems, most of a second): a stat-level key cannot see a file made writable deep in the
        # tree, so a root daemon never spawns early. It runs as the service user under the unit.
        return None
    early = Early()
    try:
        _start(early, Path(path))
    except Exception as e:  # anything: the normal start does it all again, and reports what is wrong
        early.note = f"gunicorn was not spawned early: {type(e).__name__}: {e}"
        early.kill()  # the master, if spawned, and its view
        early.master = None
        # The lock and the sockets stay: the daemon takes them if they are what its config needs (systemd's
        # sockets cannot be had twice), else it releases them.
        if early.events is not None:
            early.events.close()
            early.events = None
    except BaseException:  # Ctrl-C (KeyboardInterrupt) before the wait took SIGINT: nothing left behind
        early.kill()
        early.close()
        raise
    return early


def _start(early: Early, path: Path) -> None:
    from . import runlock
    from . import sockets as sockets_module

    try:
        # Not blocking on a FIFO with no writer yet; anything but a regular file (a FIFO, /dev/stdin, a process
        # substitution) is left unread: it can be read once only, and that read is the normal start's.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return  # the normal start says it in its words
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        config_bytes = file.read()
    digest = hashlib.sha256(config_bytes).hexdigest()
    # Where the record most likely is, tried before the TOML parser is imported (about 10 ms before the spawn):
    # systemd's StateDirectory= and the default, which a config that says nothing else uses. A record there
    # whose key holds this config's digest was written for exactly these bytes, whose state_dir it is in.
    likely = [d for d in os.environ.get("STATE_DIRECTORY", "").split(":") if os.path.isabs(d)] + [DEFAULT_STATE_DIR]
    looked: dict[str, str | None] = {}  # state dir -> why its record was not trusted, if that was why
    for state_dir in dict.fromkeys(likely):
        record, looked[state_dir] = _matching(state_dir, digest)
        if record is not None:
            break
    else:
        import tomllib
        try:
            daemon = tomllib.loads(config_bytes.decode()).get("daemon", {})
        except (ValueError, UnicodeDecodeError):
            return
        state_dir = daemon.get("state_dir", DEFAULT_STATE_DIR) if isinstance(daemon, dict) else None
        if not isinstance(state_dir, str) or not os.path.isabs(state_dir):
            return
        record, why = (None, looked[state_dir]) if state_dir in looked else _matching(state_dir, digest)
        if record is None:
            if why:  # said only of the config's own state dir
                early.note = f"ignoring the remembered spawn {os.path.join(state_dir, NAME)}: {why}"
            return
    spec = record["spec"]
    runtime_dir = Path(spec["runtime_dir"])
    directory = Path(spec["directory"])
    if directory.parent != runtime_dir:
        return
    try:
        early.lock = runlock.acquire(runtime_dir)
    except UserError:
        return  # another daemon runs (the normal start says so), or the directory cannot be made
    # The sockets: systemd's, else bound as the record says (already resolved: no getaddrinfo).
    held = sockets_module.from_systemd(dict(os.environ))  # a copy: if it raises, the normal start says so
    if held:
        early.sockets, early.systemd = held, True
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # taken: as from_systemd leaves them
            os.environ.pop(name, None)
    else:
        if not all(map(_resolves_to_itself, record["bind"])):
            return  # a host name: the record holds what it resolved to last time, the normal start resolves it now
        early.bind = list(record["bind"])
        early.sockets = sockets_module.bind_recorded(spec["sockets"])
    if [s.address for s in early.sockets] != [s["address"] for s in spec["sockets"]]:
        return  # the sockets are kept for the normal start; the master is not spawned on others
    early.events_path = Path(spec["events"])
    early.events = bind_events(early.events_path)
    early.spec = spec  # from here on, its directory (the view: config.xml) is the early start's to remove
    _hold_signals(early)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    if spec["config_xml"] is not None:
        prepare_view(Path(spec["env"]["OMERODIR"]), Path(spec["site_omerodir"]), spec["config_xml"].encode())
    snapshot = directory / "snapshot.json"
    snapshot.write_text(spec["snapshot"])
    probe = bind_probe(directory / "probe.sock")
    try:
        early.master = spawn(spec, [s.fileno() for s in early.sockets] + [probe.fileno()])
        early.before_asyncio = "asyncio" not in sys.modules
    finally:
        probe.close()  # the master holds it now
    wait_for_boot(early, json.loads(spec["snapshot"]))


# -- waiting for the boot -------------------------------------------------------

BOOT_WAIT = 10.0  # at most: then the daemon loads anyway, and its own ready wait (daemon.ready_timeout) goes on
HEARD_MAX = 256  # reports kept for the daemon (Generations.PENDING_MAX): a flood is cut, the wait ends


class _Stopped(BaseException):
    """SIGTERM or SIGINT while the daemon waited for gunicorn's boot."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def wait_for_boot(early: Early, snapshot: dict[str, Any], limit: float = BOOT_WAIT) -> None:
    """Load nothing more until gunicorn's workers have loaded the app.

    On 2 cores the daemon's own loading (asyncio, the config, its checks:
    about 0.2 s of CPU) took a core from the workers loading OMERO.web, and
    the site's first answer came that much later. It waits instead: nothing
    it does before the adoption serves a request, and READY comes after
    the workers' reports either way. The reports read here are the
    daemon's (Early.heard, replayed by Generations.listen), unchanged.

    The wait ends when every worker has said worker_ready, when one exits
    (a failed boot: the daemon's own wait says so), when the master exits,
    or after ``limit`` seconds. SIGTERM or SIGINT meanwhile (or a SIGTERM held
    since the spawn) stops the master at once, as no worker serves yet, and
    takes its view and what the start held away, then ends the daemon by
    that signal."""
    assert early.master is not None and early.events is not None
    import select
    import signal
    import time

    workers = snapshot.get("settings", {}).get("workers")
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    number = snapshot.get("generation")
    started = time.monotonic()
    ready: set[Any] = set()

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    previous: dict[int, Any] = {}
    try:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # one ignored (nohup, a shell's &) stays ignored
                    previous[sig] = signal.signal(sig, stop)
            if signal.SIGTERM in early.held:  # came during the spawn (Early.hold)
                raise _Stopped(signal.SIGTERM)
            poller = select.poll()
            poller.register(early.events.fileno(), select.POLLIN)
            try:
                pidfd = os.pidfd_open(early.master.pid)
            except (AttributeError, OSError):  # no pidfd (an old kernel): the master is polled every 50 ms
                pidfd = None
            else:
                poller.register(pidfd, select.POLLIN)
            try:
                while len(ready) < workers and early.master.poll() is None and len(early.heard) < HEARD_MAX:
                    left = limit - (time.monotonic() - started)
                    if left <= 0:
                        break
                    poller.poll(min(left, 0.05 if pidfd is None else left) * 1000)
                    if _read_reports(early, number, ready) == "failed":
                        break
            except OSError:
                pass  # the wait is a courtesy to the workers: the daemon's own start watches them from here
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except _Stopped as stopped:
        for sig in previous:  # a second signal (a double Ctrl-C) must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            early.kill()  # nothing served yet: no worker had loaded the app
            early.close()
        finally:
            signal.signal(stopped.signum, signal.SIG_DFL)
            os.kill(os.getpid(), stopped.signum)
        raise SystemExit(128 + stopped.signum) from None  # not reached: the default action ends the process
    early.waited = round(time.monotonic() - started, 3)


def _read_reports(early: Early, number: Any, ready: set[Any]) -> str | None:
    """Read what is queued on the events socket into ``early.heard``; "failed" when a worker of ``number`` exited."""
    assert early.events is not None
    while len(early.heard) < HEARD_MAX:
        try:
            data = early.events.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None  # read all that was queued
        early.heard.append(data)
        try:
            report = json.loads(data)
        except (ValueError, RecursionError):
            continue
        if not isinstance(report, dict) or report.get("gen") != number:
            continue
        if report.get("event") == "worker_ready":
            pid = report.get("pid")
            if isinstance(pid, int):
                ready.add(pid)
        elif report.get("event") == "worker_exit":
            return "failed"
    return None


def _matching(state_dir: str, digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the record in ``state_dir``, None) if it was written for a config with this digest and for the venv as it
    is now; else (None, why it may not be trusted, or None when it is just not there or not for this)."""
    data, why = trust.read_own_file(os.path.join(state_dir, NAME), MAX_BYTES)
    if data is None:
        return None, why
    try:
        record = json.loads(data)
        spec = record.get("spec") if isinstance(record, dict) else None
        if not isinstance(spec, dict) or record.get("format") != FORMAT:
            return None, None
        venv = Path(spec["argv"][0]).parent.parent  # VENV/bin/python
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        return None, None  # not a record this daemon wrote whole: the next place, or the normal start, rewrites it
    if record.get("key") != key(digest, str(venv)):
        return None, None  # another config or venv: the normal start
    return record, None


def _hold_signals(early: Early) -> None:
    """SIGTERM and SIGHUP kept for the daemon's loop (Early.hold) from the spawn until it takes them over;
    one ignored where the daemon was started stays ignored."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, early.hold)


def _resolves_to_itself(address: str) -> bool:
    """A unix path or a literal IP (or none: every address), which getaddrinfo gives back as it is, each start."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")  # as sockets.bind reads it (nginx_syntax.host_and_port)
    if not host:
        return True
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _drop_files(early: Early) -> None:
    if early.spec is not None:
        import shutil
        shutil.rmtree(early.spec["directory"], ignore_errors=True)
