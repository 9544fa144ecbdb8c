"""Signalling a child process, or the process group it leads.

The daemon starts gunicorn masters and sweeps in sessions of their own
(``start_new_session``), so one ``killpg`` reaches what they forked too.
A process that is gone already, or that changed its user (a sweep dropped
to the store's owner), is no error: whoever signals only wants it gone. A
leaf module: it imports nothing of omerowebd.
"""

from __future__ import annotations

import os


def signal_group(pid: int | None, sig: int, *, group: bool = True) -> None:
    """Send ``sig`` to the group ``pid`` leads (``group=False``: to ``pid`` alone); no pid, nothing."""
    if not pid:
        return
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
