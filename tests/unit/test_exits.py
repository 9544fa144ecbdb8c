"""exits.py: every exit code in one table, and the documentation says the same."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from omerowebd import ctl, exits

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "omerowebd"


def test_the_table_has_each_code_once_and_every_named_code():
    codes = [code for code, _, _ in exits.TABLE]
    assert len(codes) == len(set(codes))
    named = {value for name, value in vars(exits).items() if name.isupper() and isinstance(value, int)}
    assert named == set(codes)


def test_the_readme_lists_exactly_the_codes_of_the_table():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("Exit codes:"):]
    table = table[: table.index("\n\n", table.index("| code |"))]
    documented = {int(m) for m in re.findall(r"(?m)^\| (\d+) \|", table)}
    assert documented == {code for code, _, _ in exits.TABLE}


def test_omerowebctl_help_names_only_codes_of_the_table():
    epilog = ctl.EPILOG[ctl.EPILOG.index("exit codes:"): ctl.EPILOG.index("examples:")]
    shown = {int(m) for m in re.findall(r"(?m)^\s+(\d+)\s", epilog)}
    assert shown and shown <= {code for code, _, _ in exits.TABLE}


def test_the_man_pages_name_only_codes_of_the_table():
    for page in (ROOT / "packaging" / "man").glob("*.8"):
        text = page.read_text()
        if ".SH EXIT STATUS" not in text:
            continue
        section = text[text.index(".SH EXIT STATUS"):]
        section = section[: section.index("\n.SH ", 1)] if "\n.SH " in section[1:] else section
        codes = {int(m) for m in re.findall(r"(?m)^\.B (\d+)\s*$", section)}
        assert codes and codes <= {code for code, _, _ in exits.TABLE}, page.name


def test_no_module_but_exits_defines_an_exit_code():
    """An exit code is a name from exits.py: a literal number assigned to an EXIT_/RELOAD_ name elsewhere is a second table."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "exits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and type(node.value.value) is int:
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.startswith(("EXIT_", "RELOAD_", "PUBLISH_")):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target.id}")
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant) \
                            and any(isinstance(t, ast.Name) and t.id == "exit_code" for t in item.targets):
                        found.append(f"{path.relative_to(ROOT)}:{item.lineno}: {node.name}.exit_code")
    assert found == []
