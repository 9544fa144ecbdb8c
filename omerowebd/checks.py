"""Every check the daemon makes before it starts anything, in one place.

The daemon runs them at start and on reload; ``omerowebctl check`` runs the
same ones and prints them, so the two can never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import desired, multihost, nginx, venv
from . import metrics
from .config import Config
from .errors import ConfigErrors, UserError
from .generation import PlanError
from .venv import VenvInfo


def path_problems(config: Config) -> list[str]:
    d = config.daemon
    problems = []
    for what, path in (("daemon.omerodir", d.omerodir), ("daemon.state_dir", d.state_dir), ("daemon.runtime_dir", d.runtime_dir)):
        problem = _writable_dir_problem(path)
        if problem:
            problems.append(f"{config.path}: {what} {path}: {problem}")
    return problems


def _writable_dir_problem(path: Path) -> str | None:
    """Can this process write in ``path`` (or create it)?"""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        if os.statvfs(probe).f_flag & os.ST_RDONLY:  # no chown helps: a read-only mount, ProtectSystem=
            where = "is" if probe == path else f"cannot be created: {probe} is"
            return f"{where} on a read-only file system (under systemd: list it in ReadWritePaths=)"
        who = f"uid {os.getuid()}"
        if probe == path:
            return f"not writable by {who} (chown it to the service user)"
        return f"cannot be created: {probe} is not writable by {who}"
    return None


def run_sync(config: Config) -> tuple[list[str], list[str], VenvInfo | None]:
    """(problems, warnings, venv info): for the command line."""
    try:
        info, error = venv.probe_sync(config.daemon.venv, config.properties, config.daemon.omerodir), None
    except UserError as e:
        info, error = None, e
    return (*_judge(config, info, error), info)


async def run(config: Config, prober: venv.Prober, packages: str | None = None,
              known: VenvInfo | None = None) -> tuple[VenvInfo, list[str]]:
    """The daemon's version: raise ConfigErrors listing every problem; return (info, warnings).

    ``packages``: the venv's fingerprint, taken once by the caller. ``known``:
    the venv's answer as remembered from an earlier start (verdicts.py), judged
    without asking the venv; its files are still checked.
    """
    try:
        if known is not None:
            layout = venv.layout_problems(config.daemon.venv, packages)
            if layout:
                raise ConfigErrors(layout)
            info, error = known, None
        else:
            info, error = await prober.probe(config.daemon.venv, config.properties, config.daemon.omerodir,
                                             packages), None
    except UserError as e:
        info, error = None, e
    problems, warnings = _judge(config, info, error)
    if problems:
        raise ConfigErrors(problems)
    assert info is not None
    return info, warnings


def _judge(config: Config, info: VenvInfo | None, error: UserError | None) -> tuple[list[str], list[str]]:
    problems = path_problems(config)
    if error is not None:
        problems += error.problems if isinstance(error, ConfigErrors) else [str(error)]
    warnings: list[str] = []
    if info is not None:
        errors, warnings = venv.property_problems(config, info)
        problems += errors
        problems += plan_problems(config, info)
        problems += nginx.config_problems(config, info, desired.backends_of(config))
        warnings += multihost.warnings(config, info)  # sessions several hosts cannot share
    metrics_problems, metrics_warnings = metrics.config_problems(config)
    return problems + metrics_problems, warnings + metrics_warnings


def plan_problems(config: Config, info: VenvInfo) -> list[str]:
    """What gunicorn would refuse: the daemon's own plan is built, and its refusals reported.

    A property OMERO.web itself refused (info.errors) is reported once, by the venv.
    """
    try:
        desired.derive(config, info, "")  # the daemon's own derivation; the packages do not change the plan
    except PlanError as e:
        return [p for p, name in zip(e.problems, e.names) if name not in info.errors]
    return []
