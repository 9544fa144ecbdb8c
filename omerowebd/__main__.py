"""omerowebd: the daemon's command line. Always in the foreground, systemd style."""

from __future__ import annotations

import sys

from . import spawn_record

# typing.TYPE_CHECKING without importing typing (about 5 ms) before the early start's spawn.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .errors import UserError
    from .systemd import Notifier

# The rest of the daemon is imported in _main, after the early start: that is the point of it.


def main(argv: list[str] | None = None) -> int:
    # Before the daemon's own imports (asyncio, the logging library, the config code): gunicorn from the
    # remembered spawn, when it is what this config ran last time (spawn_record.py); the start adopts it or stops it.
    early = spawn_record.start(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv, early)
    finally:
        if early is not None:  # neither adopted nor stopped in order (the daemon failed before): never left behind
            early.kill()
            early.close()


def _main(argv: list[str] | None, early: spawn_record.Early | None) -> int:
    import argparse
    import asyncio

    from . import __version__, log, runlock
    from . import config as config_module
    from .errors import UserError
    from .exits import EXIT_FAILURE
    from .supervisor import Supervisor
    from .systemd import Notifier

    parser = argparse.ArgumentParser(
        prog="omerowebd",
        description="Run OMERO.web under gunicorn, supervised: zero-downtime reloads, systemd notify, "
        "nginx includes, session sweeping. Runs in the foreground; drive it with systemctl or omerowebctl.",
        epilog="exit codes: 0 stopped cleanly, 1 failed, 75 another omerowebd runs on the same runtime_dir, "
        "78 the config must be fixed (nothing was started)",
    )
    parser.add_argument("--version", action="version", version=f"omerowebd {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the TOML file (default: $OMEROWEBD_CONFIG, else /etc/omerowebd/omerowebd.toml)")
    args = parser.parse_args(argv)

    notifier = Notifier()
    try:
        config = config_module.load(config_module.config_path(args.config))
    except UserError as e:
        return _fail(e, notifier)
    log.configure(config.daemon.log_format)
    if early is not None and early.note:
        log.get().info(early.note)
    lock = None
    if early is not None and early.lock is not None:
        if early.lock.path == config.daemon.runtime_dir / runlock.LOCK_NAME:
            lock, early.lock = early.lock, None  # taken before the early spawn, on this config's runtime dir
        else:
            early.let_go()  # systemd's sockets stay, for the normal start (Running.open)
    try:
        # Before anything touches the runtime dir: a second daemon would take
        # over the first one's control and event sockets.
        lock = lock or runlock.acquire(config.daemon.runtime_dir)
    except UserError as e:
        return _fail(e, notifier)
    if lock.previous:
        log.get().warning("the previous omerowebd did not stop cleanly; taking over its runtime directory",
                          pid=lock.previous, runtime_dir=str(config.daemon.runtime_dir))
    try:
        supervisor = Supervisor(config, notifier)
        supervisor.running.early = early  # its sockets, events socket and master: adopted or dropped by the start
        return asyncio.run(supervisor.run())
    except UserError as e:
        return _fail(e, notifier)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    finally:
        lock.release()


def _fail(error: UserError, notifier: Notifier) -> int:
    from . import redact
    from .errors import ConfigErrors

    problems = error.problems if isinstance(error, ConfigErrors) else [str(error)]
    problems = [redact.scrub_known(p) for p in problems]  # to the journal and STATUS=: no secret
    for problem in problems:
        print(f"omerowebd: {problem}", file=sys.stderr, flush=True)
    notifier.status(f"failed: {problems[0]}")
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
