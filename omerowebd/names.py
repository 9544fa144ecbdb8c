"""Naming a key in a message, and suggesting the one a person probably meant.

One style everywhere: a suggestion is quoted (``(did you mean 'daemon.venv'?)``),
so that it reads as the exact text to type; a key from the file is named as
written when it is plain, quoted when it holds anything else. A leaf module:
it imports nothing of omerowebd.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PLAIN = re.compile(r"[A-Za-z0-9_.-]+")


def shown(name: str) -> str:
    """A key from the file as a message names it: as written when plain, quoted otherwise (a line break stays one line)."""
    return name if _PLAIN.fullmatch(name) else repr(name)


def closest(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The choice most like ``word``, if any is like it enough."""
    import difflib  # only for a misspelt name: not on every start

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = closest(word, choices, cutoff=cutoff)
    return f" (did you mean {close!r}?)" if close else ""
