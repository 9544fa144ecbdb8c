"""What the site's OMERO.web virtualenv holds, and whether the config suits it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits, redact, spawn_record
from .errors import ConfigError, ConfigErrors
from .names import did_you_mean
from .trust import venv_refusal

if TYPE_CHECKING:  # only a type here: config.py must not need this module to load
    from .config import Config

PROBE = Path(__file__).with_name("venv_probe.py")
PROBE_TIMEOUT = limits.VENV_PROBE_TIMEOUT
PROBE_NICE = 10  # above the daemon's own: about a tenth of a core against a busy worker (probe_nice)


@dataclass(frozen=True)
class VenvInfo:
    venv: Path
    versions: Mapping[str, str]
    omeroweb_dir: Path
    # property name -> {"kind", "default", "description", "setting", ...}
    catalogue: Mapping[str, Mapping[str, Any]]
    # property name -> why OMERO.web would refuse the value
    errors: Mapping[str, str] = field(default_factory=dict)

    def default(self, name: str) -> str | None:
        entry = self.catalogue.get(name)
        if entry is None or entry.get("default") is None:
            return None
        return str(entry["default"])


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> list[Path]:
    return [Path(site) for site in spawn_record.site_dirs(str(venv))]


def layout_problems(venv: Path, packages: str | None = None) -> list[str]:
    """Cheap checks on the venv's files, each one line with the fix.

    ``packages``: the venv's fingerprint if the caller has taken it (it is taken once per start or reload).
    """
    python = python_of(venv)
    if not venv.is_dir():
        return [f"venv {venv} does not exist: point daemon.venv at the OMERO.web virtualenv"]
    if not os.access(python, os.X_OK):
        return [f"venv {venv} has no runnable bin/python: recreate it (python3.10 -m venv {venv})"]
    # Root runs the venv's Python only if root alone controls what it runs
    # (the service user must not be able to plant code root imports).
    refusal = _root_refusal(venv, python, packages)
    if refusal:
        return [refusal]
    sites = site_packages(venv)
    problems = []
    for module, dist in (("omeroweb", "omero-web"), ("gunicorn", "gunicorn")):
        if not any((site / module).is_dir() for site in sites):
            problems.append(f"venv {venv} has no {dist}: run {venv}/bin/pip install {dist}")
    return problems


_TRUSTED: dict[tuple[Path, str], float] = {}
TRUST_TTL = 60.0


def _root_refusal(venv: Path, python: Path, packages: str | None = None) -> str | None:
    """trust.venv_refusal, remembered for a minute per package set: the walk costs most of a second.

    Only root can make a venv root alone controls writable by others; the
    memory is keyed by the package set and the owners and modes of the top
    directories (a `pip install` or a `chown -R`), and forgotten after
    TRUST_TTL so a long-running root daemon does not trust a deeper change
    for long."""
    if os.geteuid() != 0:
        return None
    env = probe_env()
    tops = [venv, *site_packages(venv)]
    key = (venv, (packages or fingerprint(venv)) + "".join(f":{st.st_uid}.{st.st_gid}.{st.st_mode}" for st in map(os.stat, tops))
           + json.dumps([env.get(name) for name in ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD")]))
    now = time.monotonic()
    if now - _TRUSTED.get(key, -TRUST_TTL) < TRUST_TTL:
        return None
    refusal = venv_refusal(venv, f"run {python}", env)
    if refusal is None:
        _TRUSTED[key] = now
    return refusal


def fingerprint(venv: Path) -> str:
    """Changes whenever a package is installed, upgraded or removed in the venv."""
    digest = hashlib.sha256()
    for entry, mtime in spawn_record.package_entries(str(venv)):  # the early start's key takes the same entries
        digest.update(f"{entry}\0{mtime}\n".encode())
    return digest.hexdigest()


def _parse_probe(venv: Path, returncode: int, stdout: bytes, stderr: bytes) -> VenvInfo:
    try:
        result = json.loads(stdout.decode() or "null")
    except ValueError:
        result = None
    if returncode != 0 or not isinstance(result, dict):
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"venv {venv}: asking OMERO.web for its settings failed: {last[0]}")
    if result.get("fatal"):
        raise ConfigError(f"venv {venv}: {result['fatal']}")
    info = _info_from(venv, result)
    if info is None:
        raise ConfigError(f"venv {venv}: asking OMERO.web for its settings failed: the answer lacks what it must hold")
    return info


def _info_from(venv: Path, result: dict[str, Any]) -> VenvInfo | None:
    """The answer as VenvInfo; None if it is not the shape venv_probe.py writes."""
    shape = {"versions": dict, "omeroweb_dir": str, "catalogue": dict, "errors": dict}
    if not all(isinstance(result.get(k), t) for k, t in shape.items()):
        return None
    return VenvInfo(
        venv=venv,
        versions=result["versions"],
        omeroweb_dir=Path(result["omeroweb_dir"]),
        catalogue=result["catalogue"],
        errors=result["errors"],
    )


def _probe_command(venv: Path) -> list[str]:
    # Not `python PROBE`: that would put this package's directory first on
    # sys.path, where venv.py would shadow the standard library's venv. Not -I
    # either: the app must be found where gunicorn finds it (PYTHONPATH).
    return [str(python_of(venv)), "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')", str(PROBE)]


def _probe_input(properties: Mapping[str, str], omerodir: Path | None, number: int = 0) -> bytes:
    return json.dumps({"properties": dict(properties), "omerodir": str(omerodir) if omerodir else None,
                       "id": number}).encode()


def probe_env() -> dict[str, str]:
    """The environment gunicorn gets, less what belongs to the daemon (PYTHONPATH stays: the app sees it too)."""
    return spawn_record.inherited_env()  # one rule for the probe and every generation


def probe_nice() -> int:
    """The kept probe's nice value: PROBE_NICE above the daemon's own (venv_probe.lower_priority)."""
    return min(os.getpriority(os.PRIO_PROCESS, 0) + PROBE_NICE, 19)


class Prober:
    """A probe process kept warm in the venv (``venv_probe.py --serve``).

    Importing omeroweb.settings costs about a second (Ice, Django); a reload
    should not pay it again. The process is replaced when the venv's packages
    change, and exits by itself when the daemon goes (its stdin closes).

    Each question carries a number that the answer must echo, and a process
    that did not answer the last question with one line of the expected JSON
    (it printed something else, answered nothing, took too long, or the asker
    was cancelled while waiting) is killed at once: a late answer to an old
    question can never be read as the answer to a new one. The next question
    starts a fresh process.
    """

    def __init__(self, timeout: float = PROBE_TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._key: tuple[Path, str] | None = None
        self._lock = asyncio.Lock()
        self._reaping: set[asyncio.Task[Any]] = set()
        self._asked = 0  # numbers the questions; the probe echoes the number in its answer
        # Set once the first generation serves: a probe started from then on yields the CPU to its workers. Not
        # before: on a start that asks the venv first, the probe is what the site waits for.
        self.site_serves = False

    async def probe(self, venv: Path, properties: Mapping[str, str], omerodir: Path | None = None,
                    packages: str | None = None) -> VenvInfo:
        """``packages``: the venv's fingerprint, if the caller has taken it already (once per start or reload)."""
        packages = packages or fingerprint(venv)
        problems = layout_problems(venv, packages)
        if problems:
            raise ConfigErrors(problems)
        key = (venv, packages)
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None or self._key != key:
                await self.close()
                self._proc = await asyncio.create_subprocess_exec(
                    *_probe_command(venv), "--serve", *(["--nice", str(probe_nice())] if self.site_serves else []),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                    env=probe_env(), cwd="/", limit=16 << 20,
                    # Its own session, whose group it lowers; it leaves when its stdin closes, not by a terminal's ^C.
                    start_new_session=True,
                )
                self._key = key
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            in_step = False
            try:
                self._asked += 1
                proc.stdin.write(_probe_input(properties, omerodir, self._asked) + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout)
                if not line.endswith(b"\n"):  # it died: say why, from a one-shot run that shows stderr
                    self._discard()
                    return await asyncio.to_thread(probe_sync, venv, properties, omerodir)
                try:
                    result = json.loads(line)
                except (ValueError, RecursionError):
                    result = None
                if not isinstance(result, dict) or result.get("id") != self._asked:
                    result = {}  # not the answer to this question
                info = _info_from(venv, result)
                if result.get("fatal"):
                    # In step, but a fresh process gets to try the import again next time.
                    raise ConfigError(f"venv {venv}: {result['fatal']}")
                if info is None:
                    raise ConfigError(f"venv {venv}: the settings probe answered {len(line)} bytes that are not "
                                      "its answer; it is restarted for the next check")
                in_step = True
                return info
            except asyncio.TimeoutError:
                raise ConfigError(f"venv {venv}: the settings probe did not answer within {self.timeout:.0f}s; "
                                  "it is restarted for the next check") from None
            except (OSError, ValueError) as e:  # a closed pipe, an over-long line
                raise ConfigError(f"venv {venv}: asking OMERO.web for its settings failed: {type(e).__name__}; "
                                  "the probe is restarted for the next check") from None
            finally:
                if not in_step:
                    self._discard()

    def _discard(self) -> None:
        """Kill the process now (no await: this runs on cancellation too); it is reaped in the background."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        task = asyncio.ensure_future(proc.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


def probe_sync(venv: Path, properties: Mapping[str, str], omerodir: Path | None = None) -> VenvInfo:
    """The same, for the command line."""
    problems = layout_problems(venv)
    if problems:
        raise ConfigErrors(problems)
    try:
        done = subprocess.run(
            _probe_command(venv),
            input=_probe_input(properties, omerodir),
            capture_output=True,
            env=probe_env(),
            cwd="/",
            timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"venv {venv}: importing omeroweb.settings took over {PROBE_TIMEOUT:.0f}s") from None
    return _parse_probe(venv, done.returncode, done.stdout, done.stderr)


def property_problems(config: Config, info: VenvInfo) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the [omero] properties, each one line with the place.

    OMERO.web's parsers quote the value they refuse: secrets are taken out
    (redact.py), so a refused password never reaches the journal or a reply.
    """
    secrets = redact.for_properties(config.properties)
    errors = [f"{config.where(name)}: {name}: {redact.scrub_known(secrets.scrub(message))}"
              for name, message in sorted(info.errors.items())]
    warnings = []
    known = list(info.catalogue)
    for name in sorted(config.properties):
        if name.startswith("omero.web.") and name not in info.catalogue:
            hint = did_you_mean(name, known, cutoff=0.8) or " (fine if an app defines it)"
            warnings.append(f"{config.where(name)}: unknown property {name}{hint}")
        elif info.catalogue.get(name, {}).get("deprecated"):
            warnings.append(f"{config.where(name)}: {name} is deprecated in this OMERO.web")
    return errors, warnings


def effective(properties: Mapping[str, str], info: VenvInfo, name: str, fallback: str | None = None) -> str | None:
    """A property's value as OMERO.web will see it: set, else its default."""
    if name in properties:
        return properties[name]
    default = info.default(name)
    return default if default is not None else fallback


