"""Fixtures for the system tests: the packages built from this tree, the
Debian tools, the cached container rootfs and the OMERO.web virtualenv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

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


@pytest.fixture(scope="session")
def system_tools() -> None:
    """Debian's packaging tools, systemd-nspawn, debootstrap (installed if missing)."""
    need_root()
    check(["bash", str(REPO / "scripts" / "system-deps.sh")], "scripts/system-deps.sh", timeout=900)


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


@dataclass(frozen=True)
class Deb:
    deb: Path
    changes: Path
    build_log: str


@pytest.fixture(scope="session")
def built_deb(system_tools, tmp_path_factory) -> Deb:
    """The .deb, built from this tree with dpkg-buildpackage like a Debian builder would."""
    out = tmp_path_factory.mktemp("deb")
    src = copy_tree(out / "omerowebd")
    result = check(["dpkg-buildpackage", "-us", "-uc", "-b"], "dpkg-buildpackage", cwd=src, env=BUILD_ENV, timeout=600)
    debs = sorted(out.glob("omerowebd_*_all.deb"))
    changes = sorted(out.glob("omerowebd_*.changes"))
    assert len(debs) == 1 and len(changes) == 1, f"expected one .deb and one .changes in {sorted(out.iterdir())}"
    return Deb(debs[0], changes[0], result.stdout + result.stderr)


@dataclass(frozen=True)
class Rpm:
    rpm: Path
    build_log: str


@pytest.fixture(scope="session")
def built_rpm(system_tools, tmp_path_factory) -> Rpm:
    """The RPM, built from packaging/omerowebd.spec with the CI macros file."""
    top = tmp_path_factory.mktemp("rpm")
    version = check(
        [sys.executable, "-c", "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['project']['version'])", str(REPO / "pyproject.toml")],
        "reading the version",
    ).stdout.strip()
    sources = top / "SOURCES"
    sources.mkdir()
    tree = copy_tree(top / "tree" / f"omerowebd-{version}")
    check(["tar", "-czf", str(sources / f"omerowebd-{version}.tar.gz"), "-C", str(tree.parent), tree.name], "tar")
    shutil.copy2(REPO / "packaging" / "omerowebd.sysusers", sources)
    result = check(
        [
            "rpmbuild", "--nodeps", "--define", f"_topdir {top}",
            "--load", str(REPO / "packaging" / "rpm-macros.ci"),
            "-bb", str(REPO / "packaging" / "omerowebd.spec"),
        ],
        "rpmbuild",
        env=BUILD_ENV,
        timeout=600,
    )
    rpms = sorted((top / "RPMS").rglob("omerowebd-*.rpm"))
    assert len(rpms) == 1, f"expected one RPM, found {rpms}"
    return Rpm(rpms[0], result.stdout + result.stderr)


@pytest.fixture(scope="session")
def rootfs(system_tools) -> Path:
    """The cached Debian 12 rootfs with systemd (built on first use, about a minute)."""
    out = check(["bash", str(REPO / "scripts" / "system-rootfs.sh")], "scripts/system-rootfs.sh", timeout=1200).stdout
    path = Path(out.strip().splitlines()[-1])
    assert (path / ".complete").exists(), path
    return path


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


@pytest.fixture(scope="session")
def omero_venv() -> Path:
    """The OMERO.web venv under /opt/omero, usable by any user."""
    problem = venv_problem()
    if problem and in_ci():
        setup = run(["bash", str(REPO / "scripts" / "setup-omero-web.sh")], timeout=1800)
        problem = venv_problem() if setup.returncode == 0 else f"setup-omero-web.sh failed: {setup.stderr[-2000:]}"
        if problem:
            pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    return OMERO_VENV
