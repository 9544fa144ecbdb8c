"""Two daemons on one shared file store (issue 13): several hosts' sweepers take
turns on the store's lock, and together leave what one sweep would leave.

Each "daemon" is a SessionService with its own runtime and state dirs, driving
the real sweep child in the real OMERO.web venv, as the supervisor does; the
store is one directory, as an NFS export would be on every host. The lock is a
POSIX (fcntl) lock, the kind NFS carries between hosts."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from omerowebd import sessions
from omerowebd.omero_config import with_session_path
from omerowebd.sessions import SessionService

from .test_sessions_service import Log, fill, make_config, venv_info
from .test_sessions_store import Site

pytestmark = pytest.mark.omeroweb

ROUNDS = 3


def test_two_daemons_on_one_shared_store(tmp_path: Path, omero_venv: Path) -> None:
    secret = b"s" * 50
    site = Site(tmp_path, omero_venv, "shared", secret)
    reference = Site(tmp_path, omero_venv, "reference", secret)
    made = site.make(["live", "shorter_custom_fresh", "longer_custom_old"])
    fill(site, made["live"], 6000, old_every=3)
    site.copy_to(reference)
    one_sweep = sessions.sweep_sync(reference.target())
    assert one_sweep.get("error") is None and one_sweep["deleted"] == 2001, one_sweep

    daemons = []
    for name in ("host-a", "host-b"):
        root = tmp_path / name
        root.mkdir()
        service = SessionService(Log())
        config = make_config(site, root, "at_start = false")
        service.update(config, with_session_path(config.properties, site.store), venv_info(site.venv))
        daemons.append(service)

    # Meanwhile, what status would say about the lock, as often as it can look.
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            state = sessions.lock_state(site.store)
            if state.get("held"):
                seen.append(state)

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def rounds() -> list[dict[str, Any]]:
        results = []
        for _ in range(ROUNDS):  # both at once, every round
            results += await asyncio.gather(*(d.sweep_now(trigger="schedule") for d in daemons))
        return results

    try:
        results = asyncio.run(rounds())
    finally:
        stop.set()
        watcher.join()

    swept = [r for r in results if not r.get("busy")]
    kept_out = [r for r in results if r.get("busy")]
    for r in swept:
        assert r.get("error") is None, r
    for r in kept_out:
        assert "another sweep holds the lock" in r["error"] and f"host {socket.gethostname()}, pid " in r["error"]
    # Never two at once: the locked intervals, in order, do not overlap.
    intervals = sorted((r["locked_at"], r["unlocked_at"]) for r in swept)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:])), intervals
    assert len(swept) >= ROUNDS
    # Together they deleted what one sweep deletes, and left what it leaves.
    assert sum(r["deleted"] for r in swept) == one_sweep["deleted"]
    assert site.listing() == reference.listing()
    # Whoever held the lock was named: this host and a sweeper's pid.
    assert seen and all(s["holder"].startswith(socket.gethostname() + " ") for s in seen), seen[:3]
