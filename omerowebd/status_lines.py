"""The text of what the daemon reports: lines for `omerowebctl status` and `sessions status`.

Pure and light (the standard library and printable only): `omerowebctl status`
imports this, not the daemon's modules (asyncio, the config, the venv probe).
What it reads comes from the daemon, the service user's process: every field
is read with its type checked, so an odd one is shown as missing, never a
traceback in root's terminal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from . import printable

COUNTS = ("scanned", "deleted", "kept", "errors")  # a sweep's counts, in the order shown
ANSWERS = "answers"  # a store endpoint's state when it answers (store_health's other states: its own words)


def holder_text(holder: str) -> str:
    """"host pid" (what the sweep lock's holder writes) for a person."""
    host, _, pid = holder.partition(" ")
    return f"host {host}, pid {pid}" if pid else f"pid {host}"


def sessions(s: Any) -> list[str]:
    """Lines for ``omerowebctl status`` and ``omerowebctl sessions status``.

    ``s`` comes from the daemon, the service user's process: every field is
    read with its type checked, so an odd one is shown as missing, never a traceback."""
    field = printable.field
    engine = field(s, "engine", str)
    if not engine:
        return ["sessions:    not known yet"]
    store = field(s, "store", str)
    lines = [f"sessions:    {engine}" + (f" at {store}" if store else "") + f" ({field(s, 'note', str, '')})"]
    if not s.get("sweeper"):
        return lines
    if not s.get("enabled"):
        lines.append("  sweeping:  disabled (sessions.enabled = false)")
        return lines
    last = field(s, "last", dict)
    running = field(s, "running", dict)
    if running:
        lines.append(f"  running:   since {_when(field(running, 'since', (int, float)))} "
                     f"({field(running, 'trigger', str, '?')})")
    if last:
        lines.append(f"  last:      {_when(field(last, 'at', (int, float)))}, {sweep(last)}")
    else:
        lines.append("  last:      none yet")
    lock = field(s, "lock", dict)
    if lock:
        holder = field(lock, "holder", str, "")
        if lock.get("held") is True:
            lines.append("  lock:      held by " + (holder_text(holder) if holder else "an unknown sweeper"))
        elif lock.get("held") is False:
            lines.append("  lock:      free")
        else:
            lines.append(f"  lock:      not known ({field(lock, 'error', str, '?')})")
    next_at = field(s, "next", (int, float))
    if next_at:
        lines.append(f"  next:      {_when(next_at)} (schedule {field(s, 'schedule', str, '?')})")
    return lines


def sweep(r: Mapping[str, Any]) -> str:
    """One line: counts and duration, or what went wrong."""
    field = printable.field
    skipped = field(r, "skipped", str)
    if skipped:
        return skipped
    parts = []
    if r.get("sweeper") == "clearsessions":
        parts.append(f"clearsessions exit {field(r, 'exit_status', int)}")
    else:
        verb = "would delete" if r.get("dry_run") is True else "deleted"
        count = {name: field(r, name, int, 0) for name in COUNTS}
        parts.append(f"scanned {count['scanned']}, {verb} {count['deleted']}, kept {count['kept']}, "
                     f"errors {count['errors']}")
    parts.append(f"{field(r, 'duration', (int, float), 0):.2f}s")
    text = ", ".join(parts)
    error = field(r, "error", str)
    if error:
        text += f"; {error}"
    return text


def _when(ts: float | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts if ts is not None else float("nan")))
    except (OverflowError, ValueError, OSError):
        return "(unknown time)"


def store_health(s: Any) -> list[str]:
    """Lines for ``omerowebctl status``; ``s`` is the daemon's (the service user's) words, read by type."""
    f = printable.field
    engine = f(s, "engine", str)
    if not engine:
        return []
    default = " (OMERO.web's default)" if f(s, "engine_default", bool) else ""
    session_cache = f(s, "session_cache", str)
    lines = [f"session engine: {engine}{default}" + (f", in cache {session_cache!r}" if session_cache else "")]
    if f(s, "problem", str):
        lines.append(f"caches:      {f(s, 'problem', str)}")
    for i, c in enumerate(f(s, "caches", list, []) or []):
        alias, backend = f(c, "alias", str, "?"), f(c, "backend", str, "?")
        head = f"{'caches:' if i == 0 else '':13}{alias!r} {backend}"
        endpoints = [e for e in f(c, "endpoints", list, []) or [] if isinstance(e, dict)]
        if not endpoints:
            problem = f(c, "problem", str)
            lines.append(f"{head} ({problem or f(c, 'note', str, 'not checked')})")
            continue
        lines.append(head)
        lines += [f"{'':15}{f(e, 'where', str, '?')}: {endpoint(e)}" for e in endpoints]
        if f(c, "problem", str):
            lines.append(f"{'':15}not checked: {f(c, 'problem', str)}")
    return lines


def answered(s: Any, where: str) -> bool:
    """Has the live check (status ``s``) asked ``where``? Then it says more than the watch's last verdict."""
    return any(printable.field(e, "where", str) == where and printable.field(e, "state", str)
               for c in printable.field(s, "caches", list, []) or []
               for e in printable.field(c, "endpoints", list, []) or [])


def endpoint(e: Any) -> str:
    f = printable.field
    state = f(e, "state", str)
    if state == ANSWERS:
        ms = f(e, "ms", (int, float))
        return f"answers, {ms:.1f} ms" if ms is not None else "answers"
    if state is None:
        return "not asked yet"
    return f"{state.upper()} ({f(e, 'why', str, '?')})"
