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


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel stores it: what `setfacl -m u:nobody:rw` leaves, without needing setfacl."""
    import struct
    anyone = 0xFFFFFFFF
    body = sorted([(0x01, 6, anyone), *entries, (0x04, 4, anyone), (0x10, 6, anyone), (0x20, 4, anyone)])
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in body)


def test_a_file_the_service_user_may_write_through_an_acl_is_refused(root_dir: Path) -> None:
    """`root:root 0664` with an ACL entry for nobody: the mode alone looks harmless."""
    venv = fake_venv(root_dir)
    settings = venv / "lib/python3.10/site-packages/omeroweb/settings.py"
    os.setxattr(settings, "system.posix_acl_access", _acl((0x02, 6, NOBODY)))
    problems = trust.venv_problems(venv)
    assert problems and "through an ACL" in problems[0] and f"uid {NOBODY}" in problems[0]


def test_a_default_acl_on_a_directory_is_refused_and_a_read_only_entry_passes(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    site = venv / "lib/python3.10/site-packages"
    os.setxattr(site, "system.posix_acl_access", _acl((0x02, 5, NOBODY)))  # r-x for nobody: fine
    assert trust.venv_problems(venv) == []
    os.setxattr(site, "system.posix_acl_default", _acl((0x08, 7, NOBODY)))
    assert "through an ACL" in trust.venv_problems(venv)[0]


def test_a_link_in_the_venv_through_a_link_the_service_user_owns_is_refused(root_dir: Path) -> None:
    """site-packages/app -> hostile/link/app, where hostile/link is nobody's link to a root directory:
    where it leads today is root's, but nobody can re-point it."""
    venv = fake_venv(root_dir)
    real = root_dir / "real" / "app"
    real.mkdir(parents=True)
    hostile = root_dir / "hostile"
    hostile.mkdir()
    os.chown(hostile, NOBODY, -1)
    (hostile / "link").symlink_to(real.parent)
    (venv / "lib/python3.10/site-packages/app").symlink_to(hostile / "link" / "app")
    problems = trust.venv_problems(venv)
    assert problems and str(hostile) in problems[0]


def test_a_pth_entry_that_does_not_exist_yet_is_judged_where_it_would_be_created(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    pth = venv / "lib/python3.10/site-packages/site.pth"
    hostile = root_dir / "omerodir"
    hostile.mkdir()
    os.chown(hostile, NOBODY, -1)
    pth.write_text(f"{hostile / 'lib' / 'python'}\n")
    problems = trust.venv_problems(venv)
    assert problems and str(hostile) in problems[0]
    safe = root_dir / "later"
    pth.write_text(f"{safe / 'lib'}\n")
    assert trust.venv_problems(venv) == []
    sticky = root_dir / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    pth.write_text(f"{sticky / 'python'}\n")
    assert "writable by everyone" in trust.venv_problems(venv)[0]


def test_an_editable_install_mapping_to_a_hostile_checkout_is_refused(root_dir: Path) -> None:
    """setuptools >= 64 editable installs: the .pth imports a finder whose MAPPING names the source tree."""
    venv = fake_venv(root_dir)
    site = venv / "lib/python3.10/site-packages"
    checkout = root_dir / "src" / "omero_devapp"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("")
    os.chown(checkout / "__init__.py", NOBODY, -1)
    (site / "__editable__.omero_devapp-0.1.pth").write_text("import __editable___omero_devapp_0_1_finder; "
                                                          "__editable___omero_devapp_0_1_finder.install()\n")
    (site / "__editable___omero_devapp_0_1_finder.py").write_text(
        f"import sys\nMAPPING = {{'omero_devapp': {str(checkout)!r}}}\nNAMESPACES = {{}}\n")
    problems = trust.venv_problems(venv)
    assert problems and "__init__.py" in problems[0]
    os.chown(checkout / "__init__.py", 0, -1)
    assert trust.venv_problems(venv) == []


@pytest.mark.parametrize("variable", ["PYTHONPATH", "LD_LIBRARY_PATH", "PYTHONHOME"])
def test_search_paths_from_the_environment_must_be_roots_too(root_dir: Path, variable: str) -> None:
    venv = fake_venv(root_dir)
    hostile = root_dir / "lib-python"
    hostile.mkdir()
    os.chown(hostile, NOBODY, -1)
    safe = root_dir / "lib-safe"
    safe.mkdir()
    refusal = trust.venv_refusal(venv, "ask the venv", {variable: f"{safe}:{hostile}"})
    assert refusal is not None and str(hostile) in refusal
    assert trust.venv_refusal(venv, "ask the venv", {variable: f"{safe}"}) is None


def test_ld_preload_of_a_file_the_service_user_owns_is_refused(root_dir: Path) -> None:
    venv = fake_venv(root_dir)
    lib = root_dir / "evil.so"
    lib.write_bytes(b"")
    os.chown(lib, NOBODY, -1)
    assert trust.venv_refusal(venv, "ask the venv", {"LD_PRELOAD": f"{lib}"})
