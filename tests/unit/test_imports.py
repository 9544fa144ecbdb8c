"""The package's import graph: no circle, leaf modules import nothing of the package, each module loads alone."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unit.test_control_client import fake_daemon  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "omerowebd"

# Rules both sides use (the daemon, omerowebctl, root's publisher): stdlib and
# tomlkit only, or another leaf. Anything may import them; they import none of the rest.
LEAVES = {"omerowebd.exits", "omerowebd.toml_values", "omerowebd.names", "omerowebd.config_file",
          "omerowebd.nginx_syntax", "omerowebd.procs", "omerowebd.locks",
          "omerowebd.http_probe", "omerowebd.limits"}
# Run by the venv's own Python, apart from the package: they import nothing of it either.
STANDALONE = {"omerowebd.gunicorn_conf", "omerowebd.venv_probe", "omerowebd.session_sweep"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, at the top or inside a function; not those only for types."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m not in (name, "omerowebd")}


GRAPH = {name: imports(name) for name in MODULES}


def test_the_leaves_and_the_standalone_scripts_exist():
    assert LEAVES | STANDALONE <= set(MODULES)


def test_leaf_modules_import_only_other_leaves():
    assert {name: GRAPH[name] - LEAVES for name in LEAVES if GRAPH[name] - LEAVES} == {}


def test_standalone_scripts_import_nothing_of_the_package():
    assert {name: GRAPH[name] for name in STANDALONE if GRAPH[name]} == {}


def test_no_import_circle():
    """Not even through an import inside a function: such a circle only hides until someone moves the import up."""
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name)
    assert [" -> ".join(c) for c in circles] == []


def test_every_module_loads_on_its_own():
    """Each module imported first, in a fresh set of the package's modules: an import-time circle fails here."""
    names = sorted(set(MODULES) - STANDALONE)
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'omerowebd' or m.startswith('omerowebd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# What omerowebctl's commands that only talk to the daemon leave unimported: their start-up is most
# of what a reload costs beyond the daemon's own work. The client blocks (no asyncio), reads three
# values of [daemon] (not config.py, tomlkit or the [omero] tree), and checks who serves the socket
# without the daemon's access policy (or dataclasses, which inspect alone makes a tenth of it).
# The status's text comes from status_lines, apart from the services that make the status.
CLIENT_LEAVES_OUT = ("asyncio", "tomlkit", "dataclasses", "omerowebd.config", "omerowebd.control", "omerowebd.access")


@pytest.mark.parametrize("argv", [["reload"], ["reload", "--json"], ["status", "--json"], ["status"]])
def test_reload_and_status_import_none_of_the_daemons_modules(tmp_path: Path, argv: list[str], fake_daemon) -> None:  # noqa: F811
    """Run for real against a socket that answers (exit 0 says it did), in a fresh interpreter."""
    path, replies = fake_daemon
    reply = {"ok": True, "exit_code": 0, "outcome": "applied", "message": "done", "state": "serving", "serving": True,
             "pid": 1, "uptime": 1.0, "sessions": {"engine": "e", "sweeper": "omerowebd", "enabled": True}}
    replies.append(json.dumps(reply).encode() + b"\n")
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "/o"\nvenv = "/v"\nruntime_dir = "{path.parent}"\n\n[omero.web]\nprefix = "/x"\n')
    script = (
        "import sys\n"
        "from omerowebd import ctl\n"
        f"code = ctl.main(['--config', {str(toml)!r}, *{argv!r}])\n"
        f"print('imported:', *[m for m in {CLIENT_LEAVES_OUT!r} if m in sys.modules], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "imported:"


# What the daemon's early start (spawn_record.py: gunicorn spawned from the remembered spawn) runs without:
# it comes before them, that is its point.
EARLY_LEAVES_OUT = ("asyncio", "tomlkit", "structlog", "dataclasses", "inspect", "omerowebd.config",
                    "omerowebd.supervisor", "omerowebd.log")


def test_the_early_start_imports_none_of_what_the_daemon_loads_after_it(tmp_path: Path) -> None:
    config = tmp_path / "omerowebd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    (tmp_path / "spawn-record.json").write_text('{"format": 1, "key": "another", "bind": [], "spec": {"argv": ["x"]}}')
    (tmp_path / "spawn-record.json").chmod(0o600)
    # _start: the start's own work as any user (start() itself does nothing as root, which runs these tests).
    script = ("import sys\nfrom pathlib import Path\nimport omerowebd.__main__ as m\n"
              "early = m.spawn_record.Early()\n"
              f"m.spawn_record._start(early, Path({str(config)!r}))\n"
              "assert early.master is None and early.note is None, early.note\n"
              f"print(' '.join(n for n in {EARLY_LEAVES_OUT!r} if n in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
