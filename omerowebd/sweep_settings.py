"""The Django settings the session sweep learnt, remembered across daemon restarts.

The sweep (session_sweep.py) learns OMERO.web's session settings by importing
``omeroweb.settings`` (Ice and all: over a second) and reports them as a
snapshot; the daemon hands that snapshot to every later sweep, which then
starts without Django. Kept in memory only, it was lost with every restart,
so the first sweep after a start (``[sessions] at_start``) paid the import
again. This file keeps it in the state dir.

The key is what the snapshot was learnt for on the daemon's side: the
config.xml text the daemon derives from its TOML, the store, the engine, the
OMERODIR and the venv's interpreter. The sweep checks again what only it can
see (the config digest and its own venv's packages, see
``session_sweep.Django.snapshot_fits``), so a snapshot from another config or
an upgraded venv means the full import, as before.

Who may trust the file: the rules of the remembered venv answer
(verdicts.py). The daemon reads it with the rights it runs with and only if
that same user owns it, nobody else may write it, and it is not a link.
A daemon run as root reads and writes it only where root alone controls the
state dir (trust.py), never in one the service user can write. What the file
holds only ever goes to a sweep, which runs as the store's owner and checks
it again; a forged one can do nothing that user cannot do by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import trust
from .files import write_atomic

NAME = "sweep-settings.json"
FORMAT = 2  # bump when the file's shape or the key's recipe changes
MAX_BYTES = 64 << 10  # a snapshot is a few hundred bytes
VALUES = (str, int, float, bool, type(None))  # what a snapshot's values may be (sessions.checked_report's rule)


def key(*, config_xml: str | None, store: Path | None, engine: str, omerodir: Path, python: Path,
        uid: int | None) -> str:
    """What a remembered snapshot was learnt for, as one digest."""
    try:
        st = os.stat(python)
        interpreter: list[Any] | None = [os.path.realpath(python), st.st_size, st.st_mtime_ns]
    except OSError:
        interpreter = None
    recipe = {"format": FORMAT, "config_xml": config_xml, "store": str(store) if store else None, "engine": engine,
              "omerodir": str(omerodir), "python": interpreter, "uid": uid}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def is_snapshot(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, VALUES) for k, v in value.items()))


def recall(state_dir: Path, wanted: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the snapshot remembered for ``wanted``, None), (None, None) if there is none for it, or
    (None, why the file is not to be trusted)."""
    data, why = trust.read_own_file(state_dir / NAME, MAX_BYTES)
    if data is None:
        return None, why
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None, "not what omerowebd writes"
    if not isinstance(record, dict) or not is_snapshot(record.get("snapshot")):
        return None, "not what omerowebd writes"
    if record.get("key") != wanted:
        return None, None
    return record["snapshot"], None


def remember(state_dir: Path, wanted: str, snapshot: Mapping[str, Any]) -> bool:
    """Keep ``snapshot`` for ``wanted`` (a write: call it in a thread). False where root may not write it."""
    if not trust.root_may_keep_in(state_dir):
        return False
    record = {"format": FORMAT, "key": wanted, "snapshot": dict(snapshot)}
    write_atomic(state_dir / NAME, json.dumps(record, sort_keys=True).encode(), mode=0o600)
    return True
