"""Errors a person can fix, and the exit codes that go with them."""

from __future__ import annotations

# Exit codes of `omerowebd`. 78 is EX_CONFIG from sysexits.h; the unit sets
# RestartPreventExitStatus=78 so that a config a person must fix fails once,
# with one line in the journal, instead of restarting in a loop.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


class UserError(Exception):
    """Something a person can fix: printed as one line, never a traceback."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """The TOML file is missing, unreadable, malformed or has a bad value."""


class ConfigErrors(ConfigError):
    """Several problems found in one pass (``omerowebctl check`` prints all)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
        self.problems = problems
