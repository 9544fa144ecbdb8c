"""toml_values.py: a value read by tomlkit or tomllib means the same."""

from __future__ import annotations

import tomllib

import tomlkit

from omerowebd.toml_values import is_namespace, plain

TEXT = """\
flag = true
n = 3
x = 1.5
words = ["a", "b"]
inline = {a = 1}
dotted.key = "v"

[table]
k = "v"
"""


def test_plain_values_are_the_same_from_either_parser():
    kit, std = tomlkit.parse(TEXT), tomllib.loads(TEXT)
    for key in ("flag", "n", "x", "words", "inline"):
        value = plain(kit[key])
        assert value == std[key] and type(value) is type(std[key]), key
    assert plain(kit["table"]) == {"k": "v"} and type(plain(kit["table"])) is dict


def test_plain_python_values_pass_through():
    for value in (True, 3, "s", [1], {"a": 1}, None):
        assert plain(value) is value


def test_tables_and_dotted_keys_are_namespaces_inline_tables_are_values():
    kit = tomlkit.parse(TEXT)
    assert is_namespace(kit["table"]) and is_namespace(kit["dotted"])
    assert not is_namespace(kit["inline"])
    assert not any(is_namespace(kit[k]) for k in ("flag", "n", "words"))
    assert is_namespace({"a": 1})  # a plain mapping (tomllib's tables) is a namespace
