"""Fixtures for the system tests: the packages built from this tree, the
Debian tools, the cached container rootfs and the OMERO.web virtualenv."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    BUILD_ENV,
    OMERO_VENV,
    RELEASES,
    REPO,
    check,
    copy_tree,
    in_ci,
    need_root,
    releases,
    run,
    venv_problem,
)


@pytest.fixture(scope="session")
def system_tools() -> None:
    """Debian's packaging tools, systemd-nspawn, debootstrap (installed if missing)."""
    need_root()
    check(["bash", str(REPO / "scripts" / "system-deps.sh")], "scripts/system-deps.sh", timeout=900)


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


@pytest.fixture(scope="session", params=releases(), ids=lambda suite: RELEASES[suite])
def rootfs(request, system_tools) -> Path:
    """The cached rootfs of a Debian release with systemd (built on first use: a minute or
    two for Debian 12, several for Debian 13); every test that boots a container runs on each
    release in $OMEROWEBD_TEST_RELEASES (default: all of RELEASES)."""
    suite = request.param
    out = check(["bash", str(REPO / "scripts" / "system-rootfs.sh"), suite], f"scripts/system-rootfs.sh {suite}",
                timeout=2400).stdout
    path = Path(out.strip().splitlines()[-1])
    assert (path / ".complete").exists(), path
    # The tests of a release must boot that release, not whatever the script had cached.
    release = dict(line.split("=", 1) for line in (path / "etc" / "os-release").read_text().split("\n") if "=" in line)
    assert release.get("VERSION_CODENAME") == suite, f"{path} is {release.get('PRETTY_NAME')}, not {suite}"
    return path


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
