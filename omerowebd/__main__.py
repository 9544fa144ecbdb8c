"""omerowebd: the daemon's command line. Always in the foreground, systemd style."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__, log, redact, runlock
from . import config as config_module
from .errors import ConfigErrors, UserError
from .exits import EXIT_FAILURE
from .supervisor import Supervisor
from .systemd import Notifier


def main(argv: list[str] | None = None) -> int:
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
    try:
        # Before anything touches the runtime dir: a second daemon would take
        # over the first one's control and event sockets.
        lock = runlock.acquire(config.daemon.runtime_dir)
    except UserError as e:
        return _fail(e, notifier)
    if lock.previous:
        log.get().warning("the previous omerowebd did not stop cleanly; taking over its runtime directory",
                          pid=lock.previous, runtime_dir=str(config.daemon.runtime_dir))
    try:
        return asyncio.run(Supervisor(config, notifier).run())
    except UserError as e:
        return _fail(e, notifier)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    finally:
        lock.release()


def _fail(error: UserError, notifier: Notifier) -> int:
    problems = error.problems if isinstance(error, ConfigErrors) else [str(error)]
    problems = [redact.scrub_known(p) for p in problems]  # to the journal and STATUS=: no secret
    for problem in problems:
        print(f"omerowebd: {problem}", file=sys.stderr, flush=True)
    notifier.status(f"failed: {problems[0]}")
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
