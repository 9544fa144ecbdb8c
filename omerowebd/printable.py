"""Text and fields from the service user's processes, made safe for root to print and use.

What the daemon answers on the control socket and what a session sweep
reports come from processes running as the service user, which must be
assumed compromised. Printed raw, they could carry escape sequences that
rewrite what the admin sees (or, on some terminals, answer back as typed
input), or bidirectional controls that make a line read differently from
what it is. So control characters (but newline and tab), format characters
(Unicode category Cf: U+202E and the other bidi controls, zero-width
characters), lone surrogates (which cannot even be printed) and the Unicode
line and paragraph separators all become "?".

Their replies are read field by field with the type expected (:func:`field`):
a field of another type counts as missing, never as a reason for a traceback.

Leaf module: no imports from the package, so the control client and the
sweep's parent can both use it.
"""

from __future__ import annotations

import unicodedata
from typing import Any, TypeVar

UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
REPLACEMENT = "?"


def text(value: str) -> str:
    if value.isprintable():  # the common case: nothing of Cc, Cf, Cs, Z* but the space
        return value
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) not in UNSAFE_CATEGORIES else REPLACEMENT for c in value)


def structure(value: Any) -> Any:
    """``value`` (parsed JSON) with every string, keys too, through :func:`text`."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {structure(k): structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structure(v) for v in value]
    return value


_T = TypeVar("_T")


def field(reply: Any, name: str, kind: type[_T] | tuple[type, ...], default: _T | None = None) -> _T | None:
    """``reply[name]`` if ``reply`` is a dict and the value is of ``kind``, else ``default``.

    Replies come from a process root does not trust: a field of another type
    than expected is treated as missing, never as a reason for a traceback.
    ``bool`` is not taken for ``int``.
    """
    if not isinstance(reply, dict):
        return default
    value = reply.get(name)
    if value is None or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        return default
    return value if isinstance(value, kind) else default  # type: ignore[return-value]


def strings(reply: Any, name: str) -> list[str]:
    """A list-of-text field: the texts in it, whatever else it holds."""
    return [v for v in field(reply, name, list, []) or [] if isinstance(v, str)]
