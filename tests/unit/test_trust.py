"""omerowebd.trust: root runs or reads only what root alone controls.

Run as root: the hostile variants are files and directories owned by
``nobody``, writable by a group or by everyone, and links leading to them."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import pytest

from omerowebd import trust

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root to make root- and nobody-owned files")

NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """A root-owned 0755 directory whose ancestors are root's too (pytest's tmp dirs are root's 0700)."""
    d = tmp_path / "safe"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def fake_venv(where: Path) -> Path:
    venv = where / "venv"
    site = venv / "lib" / "python3.10" / "site-packages"
    (site / "omeroweb").mkdir(parents=True)
    (site / "omeroweb" / "settings.py").write_text("")
    (venv / "bin").mkdir()
    os.symlink(sys.executable, venv / "bin" / "python")
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\n")
    for path in [venv, *venv.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return venv


def test_root_owned_file_passes(root_dir: Path) -> None:
    f = root_dir / "omerowebd.toml"
    f.write_text("")
    os.chmod(f, 0o640)
    assert trust.file_problems(f) == []


@pytest.mark.parametrize("change, expected", [
    (lambda p: os.chown(p, NOBODY, -1), "owned by uid"),
    (lambda p: os.chmod(p, 0o666), "writable by everyone"),
    (lambda p: (os.chown(p, -1, NOBODY), os.chmod(p, 0o664)), "writable by group"),
])
def test_hostile_file_is_refused(root_dir: Path, change, expected: str) -> None:
    f = root_dir / "omerowebd.toml"
    f.write_text("")
    change(f)
    problems = trust.file_problems(f)
    assert problems and expected in problems[0]


def test_a_parent_the_service_user_owns_is_refused(root_dir: Path) -> None:
    parent = root_dir / "etc"
    parent.mkdir()
    os.chown(parent, NOBODY, -1)
    f = parent / "omerowebd.toml"
    f.write_text("")
    problems = trust.file_problems(f)
    assert problems and str(parent) in problems[0] and "owned by uid" in problems[0]


def test_a_link_to_a_hostile_file_is_refused_and_to_a_safe_one_passes(root_dir: Path) -> None:
    hostile_dir = root_dir / "hostile"
    hostile_dir.mkdir()
    os.chown(hostile_dir, NOBODY, -1)
    (hostile_dir / "f").write_text("")
    safe = root_dir / "safe.toml"
    safe.write_text("")
    (root_dir / "to-hostile").symlink_to(hostile_dir / "f")
    (root_dir / "to-safe").symlink_to("safe.toml")
    assert trust.file_problems(root_dir / "to-safe") == []
    assert trust.file_problems(root_dir / "to-hostile")


def test_link_loop_is_a_problem_not_a_hang(root_dir: Path) -> None:
    (root_dir / "a").symlink_to("b")
    (root_dir / "b").symlink_to("a")
    assert trust.file_problems(root_dir / "a")


def test_missing_file_is_a_problem(root_dir: Path) -> None:
    problems = trust.file_problems(root_dir / "nope")
    assert problems and "does not exist" in problems[0]


def test_sticky_world_writable_directory_is_passed_through(root_dir: Path) -> None:
    tmp = root_dir / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    f = tmp / "f"
    f.write_text("")
    assert trust.file_problems(f) == []
    os.chmod(tmp, 0o777)
    assert "writable by everyone" in trust.file_problems(f)[0]


def test_root_owned_venv_passes(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    assert trust.venv_problems(venv) == []
    assert trust.venv_refusal(venv, "ask the venv") is None


@pytest.mark.parametrize("hostile", [
    "lib/python3.10/site-packages",
    "lib/python3.10/site-packages/omeroweb/settings.py",
    "bin",
])
def test_venv_with_a_part_the_service_user_owns_is_refused(root_dir: Path, hostile: str) -> None:
    venv = fake_venv(root_dir)
    os.chown(venv / hostile, NOBODY, -1)
    problems = trust.venv_problems(venv)
    assert problems and str(venv / hostile) in problems[0]
    refusal = trust.venv_refusal(venv, "ask the venv")
    assert refusal is not None and "\n" not in refusal and "chown -R root:root" in refusal


def test_venv_file_writable_by_everyone_is_refused(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    os.chmod(venv / "lib/python3.10/site-packages/omeroweb/settings.py", 0o666)
    assert "writable by everyone" in trust.venv_problems(venv)[0]


def test_pth_file_pointing_at_a_hostile_directory_is_refused(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    hostile = root_dir / "src"
    hostile.mkdir()
    (hostile / "app.py").write_text("")
    os.chown(hostile / "app.py", NOBODY, -1)
    (venv / "lib/python3.10/site-packages/editable.pth").write_text(f"{hostile}\nimport os\n")
    problems = trust.venv_problems(venv)
    assert problems and "app.py" in problems[0]


def test_symlink_inside_the_venv_leading_out_is_checked(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    hostile = root_dir / "elsewhere"
    hostile.mkdir()
    os.chown(hostile, NOBODY, -1)
    (venv / "lib/python3.10/site-packages/app").symlink_to(hostile)
    assert trust.venv_problems(venv)


def test_interpreter_the_service_user_owns_is_refused(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    base = root_dir / "python"
    (base / "bin").mkdir(parents=True)
    (base / "lib" / "python3.10").mkdir(parents=True)
    interpreter = base / "bin" / "python3.10"
    interpreter.write_text("")
    os.chown(interpreter, NOBODY, -1)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(interpreter)
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\n")
    problems = trust.venv_problems(venv)
    assert problems and "interpreter" in problems[0]
    os.chown(interpreter, 0, -1)
    (base / "lib" / "python3.10" / "os.py").write_text("")
    os.chown(base / "lib" / "python3.10" / "os.py", NOBODY, -1)
    problems = trust.venv_problems(venv)
    assert problems and "standard library" in problems[0]


def test_not_root_means_no_refusal(root_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = fake_venv(root_dir)
    os.chown(venv, NOBODY, -1)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert trust.venv_refusal(venv, "probe") is None


def test_sticky_world_writable_directory_inside_a_venv_is_refused(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    os.chmod(venv / "lib/python3.10/site-packages", 0o1777)
    assert "writable by everyone" in trust.venv_problems(venv)[0]
