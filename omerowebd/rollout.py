"""One config change across several hosts, one host at a time (``omerowebctl rollout``).

Each host applies its own TOML with its own ``reload``: the daemon there
brings up the new generation and retires the old one only once the new one
serves, so a host that refuses or rolls back is still serving its previous
config. The rollout adds the order: a host is reloaded only once the one
before it has succeeded, and the first failure stops it, with that host's
reload exit code. ``--canary N`` adds a wait after the first N hosts,
watching their status before the others are touched.

A host is a daemon's control socket on this machine (the hardened client of
:mod:`omerowebd.control_client`), or another machine reached with the system's
``ssh``, where ``omerowebctl reload --json`` runs: no protocol or port of our
own. What comes back over ssh is another machine's word, read like a
control reply: bounded, parsed with limits, fields by type, printable text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import control_client, printable
from .errors import UserError
from .exits import EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, ROLLOUT_CANARY_UNHEALTHY
from .sessions import run_child  # the sweep's bounded child runner: a deadline, byte caps, the group killed

# A reload outcome that leaves a host on the change (or on what it already ran); every other
# outcome (rejected, rolled back, reverted, restart required, cancelled, one this version does
# not know) stops the rollout.
SUCCESS = frozenset({"applied", "nothing to do"})
DRY_RUN_SUCCESS = frozenset({"dry run", "nothing to do"})

# A canary that reloaded fine but did not stay healthy has a code of its own, so that a script
# tells it from the reload codes (which the daemon's own answer carries).
EXIT_CANARY_UNHEALTHY = ROLLOUT_CANARY_UNHEALTHY

SSH = "ssh"
SSH_CONNECT_TIMEOUT = 15  # seconds ssh may take to reach a host (it waits for the TCP timeout otherwise)
SSH_SLACK = 60.0  # on top of the reload's own wait: the connection, the remote interpreter's start
STATUS_TIMEOUT = 15.0
MAX_REMOTE_REPLY = 1 << 20  # a reload reply is a few hundred bytes, a status a few KiB
MAX_MESSAGE = 400  # characters of a host's message shown in the table

# [USER@]HOST as ssh takes it on its command line: a name from DNS or ssh_config, an IPv4 or a
# bare IPv6 address. No character a shell, an ssh option or a ProxyCommand's %h could use.
_USER = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)"
_SSH_TARGET = re.compile(rf"(?:{_USER}@)?{_HOST}")


class Unreachable(UserError):
    exit_code = EXIT_UNREACHABLE


def ssh_target_problem(value: str) -> str | None:
    """Why ``value`` cannot be an ssh [USER@]HOST; None when it can."""
    if value.startswith("-"):
        return f"{value!r} starts with '-': ssh would take it as an option"
    if not _SSH_TARGET.fullmatch(value):
        return (f"{value!r} is not [USER@]HOST (letters, digits, '.', '-', '_', an IPv6 address's ':'; "
                "set ports and keys in an ssh config file, --ssh-config)")
    return None


@dataclass(frozen=True)
class Reply:
    """What one host said to a reload (or what stood in for it when it could not say)."""

    outcome: str
    exit_code: int
    message: str = ""
    generation: int | None = None
    changes: tuple[str, ...] = ()

    def succeeded(self, dry_run: bool = False) -> bool:
        return self.exit_code == EXIT_OK and self.outcome in (DRY_RUN_SUCCESS if dry_run else SUCCESS)


class Host(Protocol):
    name: str

    def reload(self, dry_run: bool) -> Reply:
        """Run one reload there and wait for its outcome. Never raises for the host's own failures."""

    def status(self) -> dict[str, Any]:
        """The daemon's status there. Raises Unreachable."""


def reply_from(data: Any, returncode: int | None = None) -> Reply:
    """A reload reply (a control reply, or what ``reload --json`` printed) read field by field.

    The reply comes from the service user's daemon, and over ssh from another
    machine: a field of another type is missing, text is made printable and
    short, an exit code outside 0-255 is 1. ``returncode`` is the exit status of
    the command that printed it, when there was one: a reply that claims
    success from a command that failed is a failure."""
    try:
        data = printable.structure(data)
    except RecursionError:  # nested deeper than printable.structure goes (the parser goes further): no reply
        data = None
    code = printable.field(data, "exit_code", int)
    outcome = printable.field(data, "outcome", str)
    message = printable.field(data, "message", str) or printable.field(data, "error", str) or ""
    if code is None or not 0 <= code <= 255:
        code = returncode if returncode else EXIT_FAILURE
        outcome = outcome or "error"
        message = message or "the reply has no exit code"
    if returncode and code == EXIT_OK:
        code = returncode
    return Reply(
        outcome=_short(outcome or "?", 40),
        exit_code=code,
        message=_short(message, MAX_MESSAGE),
        generation=printable.field(data, "generation", int),
        changes=tuple(_short(c, 200) for c in printable.strings(data, "changes")[:100]),
    )


def parse_remote(stdout: bytes) -> Any:
    """The JSON object a remote omerowebctl printed; None if there is none (or too much)."""
    if len(stdout) > MAX_REMOTE_REPLY:
        return None
    text = stdout.decode("utf-8", errors="replace").strip()
    for candidate in (text, text.rsplit("\n", 1)[-1]):  # a login banner may come before it
        try:
            # Made printable here, where a nesting too deep for that is still just "no reply".
            value = printable.structure(json.loads(candidate))
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the hosts -------------------------------------------------------------------------


@dataclass
class SocketHost:
    """A daemon on this machine, through its control socket."""

    path: Path
    reload_timeout: float

    @property
    def name(self) -> str:
        return str(self.path)

    def reload(self, dry_run: bool) -> Reply:
        try:
            reply = control_client.request(self.path, {"cmd": "reload", "wait": True, "dry_run": dry_run},
                                           timeout=self.reload_timeout)
        except UserError as e:
            outcome = "unreachable" if isinstance(e, control_client.DaemonUnreachable) else "refused"
            return Reply(outcome, e.exit_code, _short(str(e), MAX_MESSAGE))
        return reply_from(reply)

    def status(self) -> dict[str, Any]:
        try:
            return control_client.request(self.path, {"cmd": "status"}, timeout=STATUS_TIMEOUT)
        except UserError as e:
            raise Unreachable(str(e)) from None


Runner = Callable[[list[str], float], tuple[int | None, bytes, bytes, str | None]]


def _run_bounded(argv: list[str], timeout: float) -> tuple[int | None, bytes, bytes, str | None]:
    """ssh run to its end or to the deadline, its output read with a cap (never "until EOF")."""
    finished = run_child(argv, b"", timeout=timeout, env=os.environ, popen_args={})
    return None if finished.timed_out else finished.returncode, finished.stdout, finished.stderr, finished.problem


@dataclass
class SshHost:
    """omerowebd on another machine: its omerowebctl, run there by the system's ssh."""

    target: str
    reload_timeout: float
    ssh_config: Path | None = None
    run: Runner = _run_bounded  # a test gives its own

    def __post_init__(self) -> None:
        problem = ssh_target_problem(self.target)
        if problem:
            raise UserError(f"--ssh {problem}", exit_code=EXIT_USAGE)

    @property
    def name(self) -> str:
        return self.target

    def argv(self, *command: str) -> list[str]:
        """ssh's command line: options first, ``--``, then the host, which can never be an option."""
        argv = [SSH, "-n", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.ssh_config is not None:
            argv += ["-F", str(self.ssh_config)]
        return [*argv, "--", self.target, "omerowebctl", *command]

    def _call(self, command: Sequence[str], timeout: float) -> tuple[int | None, Any, str]:
        returncode, stdout, stderr, problem = self.run(self.argv(*command), timeout)
        if problem:
            raise Unreachable(f"its output over ssh: {problem}")
        if returncode is None:
            raise Unreachable(f"no answer over ssh within {timeout:.0f}s")
        last = _last_line(stderr)
        if returncode == 255:  # ssh's own failure: no connection, no key, host key changed
            raise Unreachable(f"ssh failed: {last or 'exit status 255'}")
        return returncode, parse_remote(stdout), last

    def reload(self, dry_run: bool) -> Reply:
        command = ["reload", "--json", *(["--dry-run"] if dry_run else [])]
        try:
            returncode, data, last = self._call(command, self.reload_timeout + SSH_SLACK)
        except Unreachable as e:
            return Reply("unreachable", EXIT_UNREACHABLE, _short(str(e), MAX_MESSAGE))
        if data is None:
            why = f": {last}" if last else ""
            return Reply("error", returncode or EXIT_FAILURE,
                         _short(f"omerowebctl there printed no reload reply (exit status {returncode}){why}",
                                MAX_MESSAGE))
        return reply_from(data, returncode)

    def status(self) -> dict[str, Any]:
        returncode, data, last = self._call(["status", "--json"], STATUS_TIMEOUT + SSH_SLACK)
        if data is None:
            raise Unreachable(f"omerowebctl status there printed no status (exit status {returncode})"
                              + (f": {last}" if last else ""))
        return data  # made printable by parse_remote


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return _short(printable.text(lines[-1]), MAX_MESSAGE) if lines else ""


# -- the rollout -----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    host: str
    outcome: str  # the reload's, or "unhealthy" (a canary during the settle time), or "not reached"
    exit_code: int | None  # None: not reached
    message: str = ""
    generation: int | None = None
    seconds: float | None = None
    changes: tuple[str, ...] = ()
    canary: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "outcome": self.outcome, "exit_code": self.exit_code, "message": self.message,
                "generation": self.generation, "seconds": self.seconds, "changes": list(self.changes),
                "canary": self.canary}


@dataclass(frozen=True)
class Result:
    steps: tuple[Step, ...]
    exit_code: int
    stopped_at: str | None  # the host the rollout stopped at; None when every host succeeded
    dry_run: bool = False
    settle: dict[str, Any] | None = None  # what the canary wait saw

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.exit_code == EXIT_OK, "exit_code": self.exit_code, "dry_run": self.dry_run,
                "stopped_at": self.stopped_at, "settle": self.settle, "hosts": [s.as_dict() for s in self.steps]}


@dataclass
class Clock:
    """Time, for the settle wait; a test gives its own."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class _Baseline:
    """A canary as it was: crashes before its reload, the generation its reload left serving."""

    crashes: int | None
    generation: int | None = None
    worker_faults: int | None = None


def health_problem(status: dict[str, Any], baseline: _Baseline) -> str | None:
    """Why a reloaded canary is not healthy now; None when it is.

    Healthy: serving, still the generation its reload left serving (no crash
    restart, no revert since), no crash counted since before the reload, and no
    worker lost since the reload. (The health probe itself is the daemon's: its
    settle time after the cutover probes it, and a failure there reverts the
    reload, which the canary's reply already says.)"""
    if printable.field(status, "serving", bool) is not True:
        return f"not serving (state {printable.field(status, 'state', str, '?')})"
    crashes = printable.field(status, "crashes", int)
    if baseline.crashes is not None and crashes is not None and crashes > baseline.crashes:
        return f"its gunicorn master crashed {crashes - baseline.crashes} time(s) since the reload"
    generation = printable.field(status, "generation", dict, {})
    number = printable.field(generation, "number", int)
    if baseline.generation is not None and number != baseline.generation:
        return f"generation {number} serves, not generation {baseline.generation} that the reload started"
    faults = printable.field(generation, "worker_faults", int)
    if baseline.worker_faults is not None and faults is not None and faults > baseline.worker_faults:
        return f"{faults - baseline.worker_faults} worker(s) died since the reload"
    last = printable.field(status, "last_reload", dict, {})
    if printable.field(last, "outcome", str) not in (None, *SUCCESS):
        return f"its last reload was {printable.field(last, 'outcome', str)}: {printable.field(last, 'message', str, '')}"
    return None


def _baseline_after(status: dict[str, Any], before: _Baseline, reply: Reply) -> _Baseline:
    generation = printable.field(status, "generation", dict, {})
    return _Baseline(crashes=before.crashes,
                     generation=reply.generation or printable.field(generation, "number", int),
                     worker_faults=printable.field(generation, "worker_faults", int))


def run(hosts: Sequence[Host], *, dry_run: bool = False, canary: int = 0, settle: float = 10.0,
        interval: float = 1.0, clock: Clock | None = None,
        on_step: Callable[[Step], None] = lambda step: None,
        on_settle: Callable[[Sequence[str], float], None] = lambda canaries, seconds: None) -> Result:
    """Reload each host in turn; stop at the first that does not succeed (see the module's doc)."""
    clock = clock or Clock()
    canary = 0 if dry_run else min(max(canary, 0), len(hosts))
    steps: list[Step] = []
    baselines: dict[int, _Baseline] = {}
    settle_report: dict[str, Any] | None = None

    def stop(at: int, step: Step, code: int) -> Result:
        steps.append(step)
        on_step(step)
        for host in hosts[at + 1:]:
            steps.append(Step(host.name, "not reached", None))
        return Result(tuple(steps), code, step.host, dry_run, settle_report)

    for i, host in enumerate(hosts):
        is_canary = i < canary
        if is_canary:
            try:  # the crash count before: a crash during the reload counts against it too
                baselines[i] = _Baseline(crashes=printable.field(host.status(), "crashes", int))
            except Unreachable as e:
                return stop(i, Step(host.name, "unreachable", EXIT_UNREACHABLE, _short(str(e), MAX_MESSAGE),
                                    canary=True), EXIT_UNREACHABLE)
        started = clock.monotonic()
        reply = host.reload(dry_run)
        step = Step(host.name, reply.outcome, reply.exit_code, reply.message, reply.generation,
                    round(clock.monotonic() - started, 1), reply.changes, is_canary)
        if not reply.succeeded(dry_run):
            code = reply.exit_code or EXIT_FAILURE  # "accepted", or an outcome unknown here, with a 0
            return stop(i, dataclasses.replace(step, exit_code=code), code)
        steps.append(step)
        on_step(step)
        if is_canary:
            try:
                baselines[i] = _baseline_after(host.status(), baselines[i], reply)
            except Unreachable as e:
                return stop(i, Step(host.name, "unreachable", EXIT_UNREACHABLE, _short(str(e), MAX_MESSAGE),
                                    canary=True), EXIT_UNREACHABLE)
        if canary and i == canary - 1 and i < len(hosts) - 1:
            on_settle([h.name for h in hosts[:canary]], settle)
            failed = _settle(hosts[:canary], baselines, settle, interval, clock)
            settle_report = {"seconds": settle, "canaries": [h.name for h in hosts[:canary]],
                             "healthy": failed is None}
            if failed is not None:
                at, step, code = failed
                steps[at] = step  # the canary's row says why the rollout stopped there
                on_step(step)
                for host in hosts[canary:]:
                    steps.append(Step(host.name, "not reached", None))
                return Result(tuple(steps), code, step.host, dry_run, settle_report)
    return Result(tuple(steps), EXIT_OK, None, dry_run, settle_report)


def _settle(canaries: Sequence[Host], baselines: dict[int, _Baseline], seconds: float, interval: float,
            clock: Clock) -> tuple[int, Step, int] | None:
    """Watch the canaries for ``seconds``; the first that turns unhealthy (index, its row, the exit code)."""
    deadline = clock.monotonic() + seconds
    while True:
        for i, host in enumerate(canaries):
            try:
                problem = health_problem(host.status(), baselines[i])
            except Unreachable as e:
                return i, Step(host.name, "unreachable", EXIT_UNREACHABLE, _short(str(e), MAX_MESSAGE),
                               baselines[i].generation, canary=True), EXIT_UNREACHABLE
            if problem:
                return i, Step(host.name, "unhealthy", EXIT_CANARY_UNHEALTHY,
                               _short(f"during the settle time: {problem}", MAX_MESSAGE), baselines[i].generation,
                               canary=True), EXIT_CANARY_UNHEALTHY
        left = deadline - clock.monotonic()
        if left <= 0:
            return None
        clock.sleep(min(interval, left))


# -- what a person reads ---------------------------------------------------------------

COLUMNS = ("host", "outcome", "generation", "seconds", "message")


def width(hosts: Iterable[str]) -> int:
    """The host column's width for these host names."""
    return max([len("host"), *(len(h) for h in hosts)])


def header(width: int) -> str:
    return _row(COLUMNS, width)


def row(step: Step, width: int) -> str:
    generation = str(step.generation) if step.generation is not None else "-"
    seconds = f"{step.seconds:.1f}" if step.seconds is not None else "-"
    outcome = step.outcome + (" (canary)" if step.canary else "")
    return _row((step.host, outcome, generation, seconds, step.message), width)


def _row(cells: tuple[str, str, str, str, str], width: int) -> str:
    host, outcome, generation, seconds, message = cells
    return f"{host:<{width}}  {outcome:<22}  {generation:>10}  {seconds:>7}  {message}".rstrip()


def summary(result: Result) -> str:
    done = sum(1 for s in result.steps if s.exit_code == EXIT_OK)
    if result.stopped_at is None:
        verb = "would apply on" if result.dry_run else "applied on"
        return f"rollout: {verb} all {done} host(s)"
    stopped = next(s for s in result.steps if s.host == result.stopped_at and s.exit_code not in (None, EXIT_OK))
    left = sum(1 for s in result.steps if s.exit_code is None)
    return (f"rollout stopped at {stopped.host}: {stopped.outcome} (exit {result.exit_code}); "
            f"{done} host(s) done before it, {left} not reached")
