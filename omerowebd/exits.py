"""Every exit code of omerowebd, omerowebctl and omerowebd-nginx-publish, and what it means.

The codes are documented (README, the man pages) and scripts test them, so
they stay as they were first published. Two of them mean different things
to different commands, each written down below: 2 is a usage error
everywhere (argparse exits 2 on bad arguments before any of our code runs),
and also ``reload``'s "rolled back" and the publisher's "refused"; 1 is the
plain failure, and ``reload``'s "rejected", ``config get``'s "not set".
Every module takes its codes from here; nothing else defines one.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # the daemon's control socket does not answer
EXIT_RESTART_REQUIRED = 4
EXIT_LOCKED = 75  # EX_TEMPFAIL (sysexits.h): another omerowebd may stop; trying again later may work
EXIT_NOPERM = 77  # EX_NOPERM (sysexits.h)
# EX_CONFIG (sysexits.h): the unit sets RestartPreventExitStatus=78, so a config a
# person must fix fails once, with one line in the journal, instead of restarting in a loop.
EXIT_CONFIG = 78

# `omerowebctl reload` (and `config --reload`): the daemon's verdict, sent in the reply.
RELOAD_APPLIED = EXIT_OK
RELOAD_REJECTED = EXIT_FAILURE
RELOAD_ROLLED_BACK = 2
RELOAD_RESTART_REQUIRED = EXIT_RESTART_REQUIRED
# The new generation served, but did not settle (daemon.settle_seconds): the previous config serves again.
RELOAD_REVERTED = 5

# `omerowebctl rollout`: the code of the host it stopped at (its reload's, or EXIT_UNREACHABLE), or this:
# a canary reloaded fine but did not stay healthy for the settle time.
ROLLOUT_CANARY_UNHEALTHY = 6

# `omerowebd-nginx-publish`
PUBLISH_FAILED = EXIT_FAILURE  # nginx refused the files, its reload failed, or the inputs kept changing
PUBLISH_REFUSED = 2  # usage, or an input root cannot trust or read

# (code, who exits with it, meaning): what the README's and the man pages' tables say.
TABLE: tuple[tuple[int, str, str], ...] = (
    (EXIT_OK, "every command", "done; status: serving; reload: applied, or nothing to do; "
              "omerowebd-nginx-publish: published, up to date, or nothing to publish"),
    (EXIT_FAILURE, "every command", "failed; reload: the config was rejected (nothing changed); status: not serving; "
                   "config: edit refused (nothing written) or key not set; sessions clear: the sweep failed; "
                   "omerowebd-nginx-publish: nginx refused the files or its reload failed"),
    (EXIT_USAGE, "every command", "usage error; reload: the new generation failed and was rolled back; "
                 "omerowebd-nginx-publish: an input root cannot trust or read"),
    (EXIT_UNREACHABLE, "omerowebctl", "the daemon is not reachable (config --reload: written, not applied)"),
    (EXIT_RESTART_REQUIRED, "omerowebctl reload", "the change needs a restart (daemon.runtime_dir, daemon.state_dir)"),
    (RELOAD_REVERTED, "omerowebctl reload", "the new generation served but did not settle (its workers crash-looped "
                      "or its health probe failed within daemon.settle_seconds): the previous config serves again"),
    (ROLLOUT_CANARY_UNHEALTHY, "omerowebctl rollout", "a canary did not stay healthy for --settle seconds (otherwise "
                                "rollout exits with the code of the host it stopped at)"),
    (EXIT_LOCKED, "omerowebd", "another omerowebd already runs on the same daemon.runtime_dir"),
    (EXIT_NOPERM, "omerowebctl", "the daemon (or the control socket's mode) refused the caller"),
    (EXIT_CONFIG, "omerowebd, omerowebctl", "the config must be fixed; nothing was started"),
)
