"""collectstatic, run only when what it collects may have changed.

``omero web start`` runs it at every start, which is seconds of downtime;
here it runs when the venv's installed packages (or the settings that decide
what is collected and where) differ from the last successful run, recorded
in STATE_DIR/collectstatic.json.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from . import log
from .errors import UserError
from .files import write_atomic
from .venv import VenvInfo, effective, probe_env, python_of

TIMEOUT = 900.0
RELEVANT = ("omero.web.static_root", "omero.web.static_url", "omero.web.apps", "omero.web.staticfile_dirs")


class CollectstaticFailed(UserError):
    exit_code = 1


def static_key(info: VenvInfo, properties: Mapping[str, str], packages: str) -> str:
    what = {"venv": str(info.venv), "packages": packages}
    what.update({name: effective(properties, info, name) for name in RELEVANT})
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


async def ensure_collected(
    info: VenvInfo, properties: Mapping[str, str], packages: str, omerodir: Path, state_dir: Path
) -> bool:
    """Run collectstatic if needed (config.xml must already hold ``properties``); True if it ran.

    ``packages`` is the venv's fingerprint (venv.fingerprint), which the caller has already taken.
    """
    record = state_dir / "collectstatic.json"
    key = static_key(info, properties, packages)
    try:
        if json.loads(record.read_text()).get("key") == key:
            return False
    except (OSError, ValueError, AttributeError):
        pass
    env = probe_env()
    env.update(OMERODIR=str(omerodir), DJANGO_SETTINGS_MODULE="omeroweb.settings")
    log.get().info("collecting static files", venv=str(info.venv))
    proc = await asyncio.create_subprocess_exec(
        str(python_of(info.venv)), str(info.omeroweb_dir / "manage.py"), "collectstatic", "--noinput",
        cwd=info.omeroweb_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise CollectstaticFailed(f"collectstatic took over {TIMEOUT:.0f}s") from None
    except asyncio.CancelledError:
        proc.kill()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise CollectstaticFailed(f"collectstatic failed: {lines[-1] if lines else 'no output'}")
    log.get().info("static files collected", result=lines[-1] if lines else "")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps({"key": key}).encode() + b"\n", mode=0o644)
    return True


