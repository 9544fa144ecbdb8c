"""Logging with structlog: journald fields under systemd, readable text on a
terminal, JSON lines on request.

Every event is one line (or one journal entry) with its fields. Secrets never
reach a log line: property values are not logged, only names; and, as the
last line of defence, every event goes through redact.py on its way out
(values under secret-looking names hidden, known secret values replaced
wherever they appear, e.g. in an error message that quotes one).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from . import redact

# structlog and systemd's journal are imported where they are used: omerowebctl
# imports this module (through the control socket's) and on most commands logs nothing,
# and a daemon's start spawns gunicorn before its first event (structlog costs 25-40 ms).


@functools.cache
def _journal() -> Any:
    """systemd's journal module; None without python3-systemd."""
    try:
        from systemd import journal
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return journal

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def pick_format(requested: str) -> str:
    if requested != "auto":
        return requested if requested != "journal" or _journal() is not None else "console"
    if _journal() is not None and under_journald():
        return "journal"
    return "console"


def _to_journal(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    import structlog

    message = event.pop("event", "")
    level = event.pop("level", method)
    fields = {f"OMEROWEBD_{k.upper()}": str(v) for k, v in event.items() if k != "timestamp"}
    detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("timestamp", "exc_info"))
    _journal().send(f"{message} {detail}".rstrip(), PRIORITY=str(_PRIORITY.get(level, 6)), SYSLOG_IDENTIFIER="omerowebd", **fields)
    raise structlog.DropEvent


def hide_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The last processor before output: no secret leaves, whatever a caller passed."""
    return redact.structure(event)


# What configure() asked for, applied to structlog at the first event that passes the level
# (or at once when structlog is in use already). None: configure() was not called, structlog's defaults.
_pending: tuple[str, int, Any] | None = None
_level = logging.NOTSET  # events below it are dropped without importing structlog


def configure(requested: str = "auto", level: int = logging.INFO) -> None:
    """Set up structlog, with the format pick_format chooses, at the first event that is logged."""
    global _pending, _level
    _pending, _level = (requested, level, sys.stderr), level
    if "structlog" in sys.modules:
        _apply()


def _apply() -> None:
    global _pending
    if _pending is None:
        return
    import structlog

    requested, level, stream = _pending
    _pending = None
    chosen = pick_format(requested)
    processors: list[Any] = [structlog.processors.add_log_level]
    if chosen == "journal":
        processors += [hide_secrets, _to_journal]
    elif chosen == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # a traceback is text to search too
            hide_secrets,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.processors.format_exc_info,  # plain text, so that hide_secrets sees it
            hide_secrets,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
           "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


def _dropped(*_: Any, **__: Any) -> None:
    return None


class _Logger:
    """structlog's logger for ``name``, imported and configured at the first event that passes the level."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if _LEVELS.get(attr, logging.CRITICAL + 1) < _level:
            return _dropped  # as structlog's filtering logger would: nothing to import for it
        import structlog

        _apply()
        return getattr(structlog.get_logger(self._name), attr)


def get(name: str = "omerowebd") -> Any:
    return _Logger(name)
