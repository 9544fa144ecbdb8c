"""What a value read from a TOML file is, whichever parser read it.

tomlkit hands out wrapped items (``Integer``, ``Array``, ``Table``...);
tomllib and plain dicts hand out Python values. The rules here answer the
same for both. A leaf module: it imports nothing of omerowebd.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit.items


def plain(item: Any) -> Any:
    """The plain Python value of ``item`` (tables hand out booleans unwrapped already)."""
    unwrap = getattr(item, "unwrap", None)
    return unwrap() if unwrap else item


def is_namespace(item: Any) -> bool:
    """A table (``[omero.web]``) or a dotted key's group: its keys join the name with dots.

    An inline table (``{...}``) is a value, not a namespace: it is stored as JSON.
    """
    return isinstance(item, Mapping) and not isinstance(item, tomlkit.items.InlineTable)
