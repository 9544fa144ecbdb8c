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
Django only when it needs it (the first sweep after a config change, and the
rare session with its own expiry); the rest is stat(), read() and base64.

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
import json
import os
import pwd
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from . import omero_config, trust
from .config import Config, SessionsSettings
from .schedule import Schedule, parse_schedule
from .venv import VenvInfo, effective, probe_env, python_of

SCRIPT = Path(__file__).with_name("session_sweep.py")
DEFAULT_ENGINE = "django.contrib.sessions.backends.file"
FILE_ENGINES = ("django.contrib.sessions.backends.file", "omeroweb.filesessionstore")
DB_ENGINES = ("django.contrib.sessions.backends.db", "django.contrib.sessions.backends.cached_db")
SELF_EXPIRING = ("django.contrib.sessions.backends.cache", "django.contrib.sessions.backends.signed_cookies")
TERM_GRACE = 10.0  # seconds a sweep told to stop has to report what it did
COUNTS = ("scanned", "deleted", "kept", "errors")


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
    )


def pinned_properties(config: Config) -> dict[str, str]:
    """The properties the daemon writes to config.xml: the session store pinned under its state dir."""
    return omero_config.with_session_path(config.properties, omero_config.default_session_dir(config.daemon.state_dir))


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
                       store=str(target.store) if target.store else None)
    return json.dumps(request).encode()


def _refused(target: Target, dry_run: bool, message: str) -> dict[str, Any]:
    return {"engine": target.engine, "store": str(target.store) if target.store else None, "dry_run": dry_run,
            "sweeper": target.sweeper, "duration": 0.0, "at": time.time(), "error": message}


def _outcome(target: Target, dry_run: bool, returncode: int | None, stdout: bytes, stderr: bytes,
             duration: float, timed_out: bool) -> dict[str, Any]:
    """The script's report, or what went wrong, in one shape."""
    base: dict[str, Any] = {"engine": target.engine, "store": str(target.store) if target.store else None,
                            "dry_run": dry_run, "duration": round(duration, 3), "at": time.time() - duration}
    if target.kind == "db":
        base.update(sweeper="clearsessions", exit_status=returncode)
        if timed_out:
            base["error"] = f"clearsessions ran over sessions.timeout ({target.settings.timeout:.0f}s) and was stopped"
        elif returncode != 0:
            base["error"] = f"clearsessions failed ({returncode}): {_last_line(stderr)}"
        return base
    base["sweeper"] = "omerowebd"
    report = None
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            report = json.loads(line)
            break
        except ValueError:
            continue
    if isinstance(report, dict) and "fatal" not in report:
        base.update(report)
        base["duration"] = round(duration, 3)
        base["at"] = report.get("started_at", base["at"])
        if timed_out:
            base["error"] = f"the sweep ran over sessions.timeout ({target.settings.timeout:.0f}s); stopped part way"
        elif report.get("busy"):
            holder = f" (pid {report['holder']})" if report.get("holder") else ""
            base["error"] = f"another sweep holds the lock on {report.get('store')}{holder}; not run"
        return base
    if isinstance(report, dict):
        base["error"] = report["fatal"]
    elif timed_out:
        base["error"] = f"the sweep ran over sessions.timeout ({target.settings.timeout:.0f}s) and was killed"
    else:
        base["error"] = f"the sweep failed ({returncode}): {_last_line(stderr)}"
    return base


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


async def sweep(target: Target, dry_run: bool = False, snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One sweep in a child process; never blocks the loop. Cancelling it stops the child."""
    try:
        runner = runner_for(target)
    except SweepRefused as e:
        return _refused(target, dry_run, str(e))
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *_command(target), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=runner.env(), start_new_session=True, cwd="/", **runner.popen_args(),
    )
    communicate = asyncio.ensure_future(proc.communicate(_request(target, dry_run, snapshot)))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(asyncio.shield(communicate), target.settings.timeout)
        except asyncio.TimeoutError:
            timed_out = True
            _signal(proc.pid, signal.SIGTERM)  # the script stops between files and reports
            try:
                await asyncio.wait_for(asyncio.shield(communicate), TERM_GRACE)
            except asyncio.TimeoutError:
                _signal(proc.pid, signal.SIGKILL)
        stdout, stderr = await communicate
    except asyncio.CancelledError:
        _signal(proc.pid, signal.SIGKILL)
        communicate.cancel()
        await proc.wait()
        raise
    return _outcome(target, dry_run, proc.returncode, stdout, stderr, time.monotonic() - started, timed_out)


def sweep_sync(target: Target, dry_run: bool = False, snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The same, for omerowebctl when no daemon runs."""
    try:
        runner = runner_for(target)
    except SweepRefused as e:
        return _refused(target, dry_run, str(e))
    started = time.monotonic()
    proc = subprocess.Popen(_command(target), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=runner.env(), start_new_session=True, cwd="/", **runner.popen_args())
    timed_out = False
    try:
        stdout, stderr = proc.communicate(_request(target, dry_run, snapshot), timeout=target.settings.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=TERM_GRACE)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    except BaseException:
        _signal(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return _outcome(target, dry_run, proc.returncode, stdout, stderr, time.monotonic() - started, timed_out)


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # its own session: clearsessions' children go too
    except (ProcessLookupError, PermissionError):
        pass


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
            try:
                result = await sweep(target, dry_run, self._snapshot)
            finally:
                self.running = None
            result["trigger"] = trigger
            if isinstance(result.get("snapshot"), dict):
                self._snapshot = result["snapshot"]
            self.sweeps += 1
            if not dry_run:
                self.last = summary(result)
            self._log(result)
            return {k: v for k, v in result.items() if k != "snapshot"}

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
        }


def render_status(s: Mapping[str, Any] | None) -> list[str]:
    """Lines for ``omerowebctl status`` and ``omerowebctl sessions status``."""
    if not s or not s.get("engine"):
        return ["sessions:    not known yet"]
    lines = [f"sessions:    {s['engine']}" + (f" at {s['store']}" if s.get("store") else "") + f" ({s['note']})"]
    if not s.get("sweeper"):
        return lines
    if not s.get("enabled"):
        lines.append("  sweeping:  disabled (sessions.enabled = false)")
        return lines
    last = s.get("last")
    if s.get("running"):
        lines.append(f"  running:   since {_when(s['running']['since'])} ({s['running']['trigger']})")
    if last:
        lines.append(f"  last:      {_when(last['at'])}, {describe(last)}")
    else:
        lines.append("  last:      none yet")
    if s.get("next"):
        lines.append(f"  next:      {_when(s['next'])} (schedule {s['schedule']})")
    return lines


def describe(r: Mapping[str, Any]) -> str:
    """One line: counts and duration, or what went wrong."""
    if r.get("skipped"):
        return str(r["skipped"])
    parts = []
    if r.get("sweeper") == "clearsessions":
        parts.append(f"clearsessions exit {r.get('exit_status')}")
    else:
        verb = "would delete" if r.get("dry_run") else "deleted"
        parts.append(f"scanned {r.get('scanned', 0)}, {verb} {r.get('deleted', 0)}, kept {r.get('kept', 0)}, "
                     f"errors {r.get('errors', 0)}")
    parts.append(f"{r.get('duration', 0):.2f}s")
    text = ", ".join(parts)
    if r.get("error"):
        text += f"; {r['error']}"
    return text


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
