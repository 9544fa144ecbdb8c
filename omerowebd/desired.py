"""What a config means, and what a change of it requires: pure functions, no I/O.

``derive`` turns a loaded config (with what the venv says about itself) into
everything the running system should be: the properties as written to
config.xml, the gunicorn plan, where gunicorn listens and where nginx
reaches it, the nginx files, the session store. ``decide`` compares what
runs with what is wanted and names the cheapest action that gets there. The
daemon's start and reload, the reload's dry run, ``omerowebctl check``,
``diagnostics``, ``sessions`` and ``nginx --written`` all go through here, so
no two of them can disagree about a config or a change.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config as config_module
from . import nginx, omero_config
from .config import Config
from .generation import GunicornPlan, plan_gunicorn
from .venv import VenvInfo

# Settings that a running daemon cannot take over: they name its own sockets and files.
RESTART_KEYS = ("daemon.runtime_dir", "daemon.state_dir")

# Where the sockets the generations serve on came from.
BOUND = "bound"  # the daemon bound them from daemon.bind (or application_server.host:port)
SYSTEMD = "systemd"  # omerowebd.socket passed them: daemon.bind does not apply


def session_dir(config: Config) -> Path:
    """The session store the daemon pins OMERO.web to, and sweeps."""
    return omero_config.default_session_dir(config.daemon.state_dir)


def properties_of(config: Config) -> dict[str, str]:
    """The properties OMERO.web gets, as written to config.xml: the TOML's, with the session store pinned."""
    return omero_config.with_session_path(config.properties, session_dir(config))


def backends_of(config: Config, listening: Sequence[str] = ()) -> tuple[str, ...]:
    """Where nginx reaches gunicorn: the sockets systemd passed (``listening``), else what the config binds."""
    return tuple(listening) if listening else config.bind_addresses()


def nginx_files(config: Config) -> tuple[Path, ...]:
    """The server file and the location include the daemon writes (none when [nginx] is off)."""
    if not config.nginx.enabled:
        return ()
    directory = nginx.output_dir(config)
    return directory / config.nginx.server_file, directory / config.nginx.location_file


@dataclass(frozen=True)
class Desired:
    """Everything the running system should be for one config and one venv."""

    config: Config
    info: VenvInfo
    packages: str  # the venv's fingerprint
    properties: Mapping[str, str]  # as written to config.xml
    plan: GunicornPlan
    bind: tuple[str, ...]  # what the daemon binds when systemd passes no sockets
    backends: tuple[str, ...]  # where nginx reaches gunicorn
    session_dir: Path
    nginx_files: tuple[Path, ...]


def derive(config: Config, info: VenvInfo, packages: str, *, listening: Sequence[str] = ()) -> Desired:
    """What ``config`` means with this venv. Raises PlanError for values gunicorn would refuse.

    ``listening``: the addresses of the sockets systemd passed, if it did.
    """
    properties = properties_of(config)
    plan = plan_gunicorn(
        properties, info,
        omerodir=config.daemon.omerodir, app=config.daemon.app,
        graceful_timeout=config.daemon.graceful_timeout, health_path=config.daemon.health_path,
        where=config.where,
    )
    return Desired(config=config, info=info, packages=packages, properties=properties, plan=plan,
                   bind=config.bind_addresses(), backends=backends_of(config, listening),
                   session_dir=session_dir(config), nginx_files=nginx_files(config))


class Action(str, enum.Enum):
    """What a reload does, cheapest first; the value is how the dry run says it."""

    NOTHING = "do nothing (the config is unchanged)"
    OUTPUTS = "apply it without a new generation"
    GENERATION = "start a new gunicorn generation"
    REBIND = "bind the new addresses and start a new gunicorn generation"
    RESTART = "not apply it: a restart is required"


@dataclass(frozen=True)
class Decision:
    action: Action
    changes: tuple[str, ...]  # dotted names: daemon.x, nginx.x, sessions.x, omero.… properties
    reasons: tuple[str, ...] = ()  # why this action (and not a cheaper one)
    packages_changed: bool = False
    bind: tuple[str, ...] = ()  # REBIND: the addresses to bind before the new generation starts

    @property
    def new_generation(self) -> bool:
        return self.action in (Action.GENERATION, Action.REBIND)


def changes(old: Config, new: Config) -> tuple[str, ...]:
    """Dotted names of what differs: daemon.x, nginx.x, sessions.x, omero.… properties."""
    changed = []
    for table in config_module.TABLES:
        a, b = dataclasses.asdict(getattr(old, table)), dataclasses.asdict(getattr(new, table))
        changed += [f"{table}.{k}" for k in a if a[k] != b[k]]
    names = set(old.properties) | set(new.properties)
    changed += sorted(n for n in names if old.properties.get(n) != new.properties.get(n))
    return tuple(changed)


def decide_early(running: Desired, config: Config, packages: str, *, serving: bool = True) -> Decision | None:
    """The decisions that need nothing from the venv (so no probe): restart required, or nothing to do.

    None: the venv must be asked (derive) before ``decide`` can say.
    """
    changed = changes(running.config, config)
    restart = [c for c in changed if c in RESTART_KEYS]
    if restart:
        return Decision(Action.RESTART, changed, (f"{', '.join(restart)} changed: run systemctl restart omerowebd",))
    if not changed and packages == running.packages and serving:
        return Decision(Action.NOTHING, changed, ("the config is unchanged",))
    return None


def decide(running: Desired, desired: Desired, sockets_origin: str, *, serving: bool = True) -> Decision:
    """The cheapest action that takes the system from ``running`` to ``desired``.

    ``sockets_origin``: BOUND or SYSTEMD (see above); ``serving``: False
    while no generation serves (after a crash), when any reload brings one back.
    """
    early = decide_early(running, desired.config, desired.packages, serving=serving)
    if early is not None:
        return early
    changed = changes(running.config, desired.config)
    packages_changed = desired.packages != running.packages
    reasons = []
    if desired.properties != running.properties:
        reasons.append("OMERO.web's properties changed")
    if desired.plan != running.plan:
        reasons.append("gunicorn's settings changed")
    if packages_changed:
        reasons.append("the venv's packages changed")
    if desired.config.daemon.omerodir != running.config.daemon.omerodir:
        reasons.append("daemon.omerodir changed")
    if not serving:
        reasons.append("no generation serves: this reload brings one back")
    if sockets_origin == BOUND and desired.bind != running.bind:
        return Decision(Action.REBIND, changed, (f"daemon.bind is now {', '.join(desired.bind)}", *reasons),
                        packages_changed, desired.bind)
    if reasons:
        return Decision(Action.GENERATION, changed, tuple(reasons), packages_changed)
    why = "only nginx, the sweep or the daemon's own settings changed"
    if sockets_origin == SYSTEMD and desired.bind != running.bind:
        why += " (daemon.bind applies only without systemd's sockets)"
    return Decision(Action.OUTPUTS, changed, (why,), packages_changed)
