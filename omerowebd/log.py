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
# imports this module (through the control socket's) and on most commands logs nothing.


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


def configure(requested: str = "auto", level: int = logging.INFO) -> str:
    """Set up structlog once; returns the format chosen."""
    import structlog

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
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return chosen


def get(name: str = "omerowebd") -> Any:
    import structlog

    return structlog.get_logger(name)
