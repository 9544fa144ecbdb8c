"""Errors a person can fix, each with the exit code that goes with it (exits.py)."""

from __future__ import annotations

# The codes live in exits.py; EXIT_FAILURE and EXIT_USAGE stay importable from
# here for code written before exits.py (import them from exits).
from .exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_USAGE

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_USAGE", "ConfigError", "ConfigErrors", "UserError"]


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


def one_line(error: BaseException) -> str:
    """An unforeseen exception as one line: its type and its words (never a traceback in a reply)."""
    words = " ".join(str(error).split())
    return f"{type(error).__name__}: {words}" if words else type(error).__name__


def os_error_text(error: OSError) -> str:
    """What the system said, and about which file: "No such file or directory: /path"
    (str() gives "[Errno 2] ...: PosixPath('/path')")."""
    if error.strerror and error.filename is not None:
        names = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
        return f"{error.strerror}: {' -> '.join(str(n) for n in names)}"
    return " ".join(str(error).split()) or type(error).__name__
