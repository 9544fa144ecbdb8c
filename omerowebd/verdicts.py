"""The venv's answer about the config, remembered from the last start or reload that passed its checks.

Asking the venv (venv_probe.py: importing Ice and Django, every property
through OMERO.web's parsers) takes a second or two, and nothing could be
spawned before it answered. After a host reboot or a plain restart the config
and the venv are almost always what they were at the last successful start:
the daemon then judges the config on the remembered answer, spawns gunicorn at
once, and asks the venv afresh once the first generation serves, before it
tells systemd it is ready and before it publishes anything (config.xml, the
nginx switch, the root publisher's go-ahead):

* the venv agrees: nothing more happens;
* the venv refuses the config now: the start fails as a start without a
  remembered answer would have (exit 78, every problem in one line each);
  nothing that served before the daemon started was touched;
* the venv accepts it but answers otherwise: the daemon says so in the log
  and brings up a generation derived from the fresh answer through a reload,
  which retires the first one only once the new one serves.

The key is everything the answer depends on: the venv's fingerprint (its
packages), its interpreter, the probe script, the properties asked about, the
OMERODIR, and the environment variables that change what Python imports.

Who may trust the file: the daemon reads it with the rights it runs with and
only if that same user owns it and nobody else may write it (a link, another
user's file, a group- or world-writable one is ignored and said so). Run as
the service user, the daemon gains nothing from a forged answer it could not
already do (it runs OMERO.web's code). Root trusts only what root alone
controls: a daemon run as root reads and writes the file only when it and
every directory on the way are root's and writable by root only (trust.py),
never in a state dir the service user can write. Nothing else reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import checks, log, spawn_record, trust
from .config import Config
from .errors import ConfigErrors
from .files import write_atomic
from .venv import PROBE, Prober, VenvInfo, _info_from, probe_env, python_of

NAME = "venv-verdict.json"
FORMAT = 1  # bump when the file's shape or the key's recipe changes
MAX_BYTES = 16 << 20  # the probe's own answer is capped the same way (Prober's line limit)
# Environment variables that change what the venv's Python imports or how Ice and Django load.
ENV_PREFIXES = spawn_record.ENV_PREFIXES
# What a reload compares packages against, for a generation started on an answer the venv has since contradicted:
# it differs from every fingerprint, so the reload brings up a generation derived from the fresh answer.
UNCONFIRMED = "unconfirmed"

_probe_digest: str | None = None


def key(venv: Path, properties: Mapping[str, str], omerodir: Path, packages: str) -> str:
    """What the venv's answer depends on, as one digest."""
    global _probe_digest
    if _probe_digest is None:
        _probe_digest = hashlib.sha256(PROBE.read_bytes()).hexdigest()
    python = python_of(venv)
    try:
        st = os.stat(python)
        interpreter: list[Any] | None = [os.path.realpath(python), st.st_size, st.st_mtime_ns]
    except OSError:
        interpreter = None
    env = sorted((k, v) for k, v in probe_env().items() if k.startswith(ENV_PREFIXES))
    recipe = {"format": FORMAT, "venv": str(venv), "packages": packages, "python": interpreter,
              "probe": _probe_digest, "properties": sorted(properties.items()), "omerodir": str(omerodir), "env": env}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _answer(info: VenvInfo) -> dict[str, Any]:
    return {"versions": dict(info.versions), "omeroweb_dir": str(info.omeroweb_dir),
            "catalogue": dict(info.catalogue), "errors": dict(info.errors)}


class Verdicts:
    """The remembered answer for one state dir: recall before a start, confirm once it serves, remember after."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / NAME
        self.log = log.get()
        self.recalled: VenvInfo | None = None  # the start runs on this until confirm() has asked the venv
        self.hits = 0  # starts that used a remembered answer (status, tests)

    # -- the start -----------------------------------------------------------

    async def check(self, config: Config, prober: Prober, packages: str) -> tuple[VenvInfo, list[str]]:
        """checks.run, on the remembered answer when there is one for exactly this config and venv."""
        self.recalled = self.recall(config, packages)
        if self.recalled is None:
            return await checks.run(config, prober, packages)
        self.hits += 1
        # Said by confirm(), once gunicorn serves: a first event now would import the logging library before the spawn.
        return await checks.run(config, prober, packages, known=self.recalled)

    async def confirm(self, config: Config, prober: Prober, packages: str) -> VenvInfo | None:
        """Ask the venv now if the start ran on a remembered answer.

        None: nothing to do (it agrees, or it was asked before the start).
        Raises ConfigErrors if the venv refuses the config now. Otherwise the
        fresh answer, which differs from the remembered one: the caller
        brings up a generation derived from it.
        """
        recalled, self.recalled = self.recalled, None
        if recalled is None:
            return None
        self.log.info("gunicorn was started on the venv's remembered answer; asking the venv again now that it serves",
                      path=str(self.path))
        try:
            fresh, _ = await checks.run(config, prober, packages)
        except ConfigErrors as e:
            self.forget()
            self.log.error("the venv refuses the config that its remembered answer let start; stopping", path=str(self.path),
                           problems=len(e.problems))
            raise
        if fresh == recalled:
            self.log.debug("the venv's answer is what was remembered")
            return None
        self.forget()
        self.log.error("the venv's answer differs from the remembered one that this start ran on (changed without a"
                       " package change?); a generation derived from the fresh answer replaces the first one",
                       path=str(self.path), differs=_differences(recalled, fresh))
        return fresh

    # -- the file --------------------------------------------------------------

    def recall(self, config: Config, packages: str) -> VenvInfo | None:
        """The remembered answer for this config and venv, or None (none, another key, or not to be trusted)."""
        data, why = trust.read_own_file(self.path, MAX_BYTES)
        if data is None:
            if why:
                self.log.warning(f"ignoring the remembered venv answer {self.path}: {why}; the venv is asked instead")
            return None
        try:
            record = json.loads(data)
        except (ValueError, RecursionError):
            record = None
        answer = record.get("answer") if isinstance(record, dict) else None
        info = _info_from(config.daemon.venv, answer) if isinstance(answer, dict) else None
        if info is None:
            self.log.warning(f"ignoring the remembered venv answer {self.path}: not what omerowebd writes; the venv"
                             " is asked instead")
            return None
        wanted = key(config.daemon.venv, config.properties, config.daemon.omerodir, packages)
        if record.get("key") != wanted or info.errors:
            self.log.debug("no remembered venv answer for this config and venv", path=str(self.path))
            return None
        return info

    def remember(self, config: Config, packages: str, info: VenvInfo) -> bool:
        """Keep the venv's answer about a config that passed its checks and serves (a write: call it in a thread).

        Whether it is kept: only then may the first generation's spawn be (spawn_record.py)."""
        if info.errors or packages == UNCONFIRMED or not trust.root_may_keep_in(self.path.parent):
            return False
        record = {"key": key(config.daemon.venv, config.properties, config.daemon.omerodir, packages),
                  "answer": _answer(info)}
        try:
            write_atomic(self.path, json.dumps(record, sort_keys=True).encode(), mode=0o600)
        except OSError as e:  # a full disk: the next start asks the venv, that is all
            self.log.warning("cannot remember the venv's answer; the next start asks it", error=str(e))
            return False
        return True

    def forget(self) -> None:
        # The spawn goes with the answer: a config the venv refused is never spawned from the record again.
        spawn_record.forget(self.path.parent)
        try:
            if trust.root_may_keep_in(self.path.parent):
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warning("cannot remove the remembered venv answer", path=str(self.path), error=e.strerror)


def _differences(old: VenvInfo, new: VenvInfo) -> list[str]:
    """Which parts of the answer differ, named (never the values: a default may be a secret)."""
    names = [part for part in ("versions", "omeroweb_dir", "errors") if getattr(old, part) != getattr(new, part)]
    changed = sorted(n for n in set(old.catalogue) | set(new.catalogue) if old.catalogue.get(n) != new.catalogue.get(n))
    if changed:
        names.append("catalogue: " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    return names
