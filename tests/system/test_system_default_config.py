"""The packaged /etc/omerowebd/omerowebd.toml: the daemon accepts it as it
is, documents every setting the daemon knows, and every commented default
is what the daemon really uses and parses when uncommented."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import REPO, check

pytestmark = pytest.mark.system

PACKAGED = REPO / "packaging" / "omerowebd.toml"

# Runs on the system python3, as the packaged daemon does (its Debian
# dependencies are there); prints what the daemon makes of a file.
PROBE = r"""
import dataclasses, json, sys
from pathlib import Path
from omerowebd import config

def describe(path):
    try:
        c = config.load(path)
    except config.ConfigError as e:
        return {"error": str(e)}
    tables = {}
    for name in config.TABLES:
        tables[name] = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(getattr(c, name)).items()}
    return {"tables": tables, "properties": dict(c.properties)}

fields = {}
for name, cls in config.TABLES.items():
    fields[name] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        if isinstance(default, Path):
            default = str(default)
        if isinstance(default, tuple):
            default = list(default)
        fields[name][f.name] = default
print(json.dumps({"fields": fields, "files": {p: describe(p) for p in sys.argv[1:]}}))
"""


def probe(*paths) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    out = check(["/usr/bin/python3", "-c", PROBE, *map(str, paths)], "the config probe", env=env, timeout=60).stdout
    return json.loads(out)


def table_keys(text: str) -> dict[str, set[str]]:
    """Keys set or shown commented ("#key = ...") in each [table] of the file."""
    keys: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            table = header.group(1).strip()
            continue
        key = re.match(r'^#?("[^"]+"|[A-Za-z0-9_.-]+) = ', line)
        if key:
            keys.setdefault(table, set()).add(key.group(1))
    return keys


def uncommented(text: str) -> str:
    return re.sub(r'^#(("[^"]+"|[A-Za-z0-9_.-]+) = )', r"\1", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def system_python(system_tools):
    return "/usr/bin/python3"


def test_daemon_accepts_the_packaged_file_as_it_is(system_python):
    result = probe(PACKAGED)["files"][str(PACKAGED)]
    assert "error" not in result, result
    daemon = result["tables"]["daemon"]
    # The walkthrough layout.
    assert daemon["omerodir"] == "/opt/omero/web/omero-web"
    assert daemon["venv"] == "/opt/omero/web/venv3"


def test_every_setting_is_documented(system_python):
    fields = probe()["fields"]
    documented = table_keys(PACKAGED.read_text())
    missing = [f"[{table}] {key}" for table, keys in fields.items() for key in keys if key not in documented.get(table, set()) and not (key == "redirects" and "nginx.redirects" in documented)]
    assert not missing, f"settings the daemon knows but {PACKAGED.name} does not show: {missing}"
    unknown = [f"[{table}] {key}" for table in fields for key in documented.get(table, set()) if key not in fields[table]]
    assert not unknown, f"{PACKAGED.name} shows settings the daemon does not know: {unknown}"


def test_commented_defaults_are_the_real_defaults_and_parse(system_python, tmp_path):
    every = tmp_path / "uncommented.toml"
    every.write_text(uncommented(PACKAGED.read_text()))
    out = probe(every)
    result = out["files"][str(every)]
    assert "error" not in result, f"the packaged file with every example uncommented: {result['error']}"
    shown = table_keys(PACKAGED.read_text())
    wrong = []
    for table, defaults in out["fields"].items():
        for key, default in defaults.items():
            if default in (None, "<required>") or key not in shown.get(table, ()):
                continue  # no default to show, or an example rather than the default
            if result["tables"][table][key] != default:
                wrong.append(f"[{table}] {key}: file shows {result['tables'][table][key]!r}, daemon default {default!r}")
    assert not wrong, "\n".join(wrong)
