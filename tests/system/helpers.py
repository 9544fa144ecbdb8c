"""Shared by the system tests: paths, the build environment, running commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The OMERO.web venv of the walkthrough layout, built by scripts/setup-omero-web.sh
# on a copy of Python 3.10 that lives under /opt/omero too, so one read-only
# bind mount of /opt/omero gives the container a venv that runs.
OMERO_ROOT = Path("/opt/omero")
OMERO_VENV = OMERO_ROOT / "web" / "venv3"

# The system python and nothing of the test runner's environment: pyenv's
# python3 would otherwise build the .deb and pick the wrong interpreter.
BUILD_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "SOURCE_DATE_EPOCH": "1795000000",
}


# The Debian releases the .deb is tested on, booted in containers: suite -> test id.
# The .deb is built once, on the machine's own release (Debian 12), and installed
# on each (one source package, depends both satisfy).
RELEASES = {"bookworm": "debian12", "trixie": "debian13"}


def releases() -> list[str]:
    """$OMEROWEBD_TEST_RELEASES (suites or test ids, space or comma separated), else every release."""
    wanted = os.environ.get("OMEROWEBD_TEST_RELEASES", "").replace(",", " ").split()
    if not wanted:
        return list(RELEASES)
    by_id = {v: k for k, v in RELEASES.items()}
    unknown = [w for w in wanted if w not in RELEASES and w not in by_id]
    if unknown:
        raise pytest.UsageError(f"OMEROWEBD_TEST_RELEASES: unknown release {unknown[0]!r} (known: "
                                f"{', '.join(f'{k} or {v}' for k, v in RELEASES.items())})")
    return [by_id.get(w, w) for w in wanted]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests need root (package builds, mounts, systemd-nspawn)")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv, **kwargs)


def check(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    result = run(argv, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result

def source_files() -> list[str]:
    """The files of this tree a release would hold: tracked and new, not ignored."""
    if (REPO / ".git").exists():
        out = check(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"], "git ls-files").stdout
        names = [n for n in out.split("\0") if n]
    else:  # an exported tree: take everything but caches
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    skip = (".git/", ".ci/", ".pytest_cache/", "build/", "dist/")
    return sorted(n for n in names if not n.startswith(skip) and (REPO / n).is_file())

def copy_tree(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in source_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)
    return dest

def venv_problem() -> str | None:
    """Why the OMERO.web venv cannot serve inside the container, or None."""
    python = OMERO_VENV / "bin" / "python"
    if not python.exists():
        return f"{OMERO_VENV} does not exist (scripts/setup-omero-web.sh builds it)"
    real = python.resolve()
    if OMERO_ROOT not in real.parents:
        return f"{python} runs {real}, outside {OMERO_ROOT}: the container (and a service user) cannot reach it; rebuild with scripts/setup-omero-web.sh"
    probe = run([str(python), "-c", "import omeroweb, gunicorn"], timeout=120)
    if probe.returncode != 0:
        return f"{python} cannot import omeroweb and gunicorn: {probe.stderr.strip()[-300:]}"
    return None
