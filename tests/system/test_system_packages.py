"""The Debian package and the RPM, built from this tree: what they hold,
what their maintainer scripts do, and lintian's verdict on the .deb."""

from __future__ import annotations

import re
import subprocess

import pytest

from .helpers import REPO, check

pytestmark = pytest.mark.system

UNITS = ["omerowebd.service", "omerowebd.socket", "omerowebd-nginx.path", "omerowebd-nginx.service"]
DEBIAN_DEPENDS = ["python3-systemd", "python3-watchdog", "python3-tomlkit", "python3-structlog"]


def deb_files(deb) -> list[str]:
    out = check(["dpkg-deb", "--contents", str(deb)], "dpkg-deb --contents").stdout
    return [line.split()[-1].lstrip(".") for line in out.splitlines() if not line.startswith("d")]


def deb_control(deb, tmp_path) -> dict[str, str]:
    target = tmp_path / "DEBIAN"
    check(["dpkg-deb", "--control", str(deb), str(target)], "dpkg-deb --control")
    return {p.name: p.read_text() for p in target.iterdir()}


# -- Debian ------------------------------------------------------------------


def test_deb_holds_daemon_units_config_users_and_manuals(built_deb):
    files = deb_files(built_deb.deb)
    print("\n".join(files))
    for name in UNITS:
        assert f"/lib/systemd/system/{name}" in files
    for path in (
        "/usr/bin/omerowebd",
        "/usr/bin/omerowebctl",
        "/usr/libexec/omerowebd-nginx-publish",
        "/etc/omerowebd/omerowebd.toml",
        "/usr/lib/sysusers.d/omerowebd.conf",
        "/usr/lib/tmpfiles.d/omerowebd.conf",
        "/usr/share/man/man8/omerowebd.8.gz",
        "/usr/share/man/man8/omerowebctl.8.gz",
        "/usr/share/doc/omerowebd/README.md.gz",
        "/usr/lib/python3/dist-packages/omerowebd/__init__.py",
        "/usr/lib/python3/dist-packages/omerowebd/__main__.py",
        "/usr/lib/python3/dist-packages/omerowebd/config.py",
    ):
        assert path in files, path
    # Everything the source tree has of the package is in the .deb.
    sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "omerowebd").rglob("*.py"))
    for source in sources:
        assert f"/usr/lib/python3/dist-packages/{source}" in files, source


def test_every_manual_the_units_name_is_shipped(built_deb):
    files = deb_files(built_deb.deb)
    named = set()
    for unit in (REPO / "units").iterdir():
        named |= set(re.findall(r"man:([\w.-]+)\((\d)\)", unit.read_text()))
    assert named
    for page, section in named:
        assert f"/usr/share/man/man{section}/{page}.{section}.gz" in files, f"{page}({section})"


def test_deb_depends_on_debians_python_packages(built_deb):
    fields = check(["dpkg-deb", "--field", str(built_deb.deb), "Depends"], "dpkg-deb --field").stdout
    depends = {d.strip().split()[0] for d in fields.split(",")}
    for package in DEBIAN_DEPENDS:
        assert package in depends, fields


def test_deb_config_is_a_conffile_and_scripts_manage_users_units_and_purge(built_deb, tmp_path):
    control = deb_control(built_deb.deb, tmp_path)
    assert control["conffiles"].split() == ["/etc/omerowebd/omerowebd.toml"]
    postinst, prerm, postrm = control["postinst"], control["prerm"], control["postrm"]
    assert "systemd-sysusers" in postinst and "omerowebd.conf" in postinst
    assert "systemd-tmpfiles" in postinst
    for name in ("omerowebd.service", "omerowebd.socket", "omerowebd-nginx.path"):
        assert f"deb-systemd-helper enable '{name}'" in postinst, name
    # Started on install, where systemd runs.
    start = re.search(r"deb-systemd-invoke (\S+) (.*) >/dev/null", postinst)
    assert start and "omerowebd.service" in start.group(2) and "omerowebd.socket" in start.group(2)
    # The socket survives upgrades; only the daemon is restarted.
    assert "deb-systemd-invoke try-restart omerowebd.service" in postinst
    assert "omerowebd.socket" not in (control.get("preinst") or "")
    assert "deb-systemd-invoke stop" in prerm and "omerowebd.service" in prerm
    # purge: state and the units' enablement go.
    assert "deb-systemd-helper purge" in postrm
    assert re.search(r'"\$1" = purge.*rm -rf /var/lib/omerowebd /var/lib/omerowebd-nginx', postrm, re.DOTALL)


def test_lintian_finds_no_error_or_warning(built_deb):
    # --pedantic and info tags shown: anything left must be overridden with a reason.
    result = subprocess.run(
        ["lintian", "--info", "--display-info", "--pedantic", "--fail-on", "none", str(built_deb.changes)],
        capture_output=True, text=True, timeout=600,
    )
    print(result.stdout, result.stderr)
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert not tags, "lintian:\n" + "\n".join(tags)
    overrides = (REPO / "debian" / "omerowebd.lintian-overrides").read_text().splitlines()
    for index, line in enumerate(overrides):
        if line.strip() and not line.startswith("#"):
            assert index > 0 and overrides[index - 1].startswith("#"), f"override without a reason above it: {line}"


# -- RPM ---------------------------------------------------------------------


def rpm_query(rpm, *args: str) -> str:
    return check(["rpm", "-qp", *args, str(rpm)], f"rpm -qp {' '.join(args)}").stdout


def test_rpm_files(built_rpm):
    listing = rpm_query(built_rpm.rpm, "--qf", "[%{FILEFLAGS:fflags}\t%{FILEMODES:perms}\t%{FILEUSERNAME}:%{FILEGROUPNAME}\t%{FILENAMES}\n]")
    print(listing)
    rows = {line.split("\t")[3]: line.split("\t")[:3] for line in listing.splitlines()}
    for name in UNITS:
        assert f"/usr/lib/systemd/system/{name}" in rows
    for path in ("/usr/bin/omerowebd", "/usr/bin/omerowebctl", "/usr/libexec/omerowebd-nginx-publish",
                 "/usr/lib/sysusers.d/omerowebd.conf", "/usr/lib/tmpfiles.d/omerowebd.conf"):
        assert path in rows, path
    assert any(p.endswith("/omerowebd/__main__.py") for p in rows)
    flags, perms, owner = rows["/etc/omerowebd/omerowebd.toml"]
    assert "c" in flags and "n" in flags, f"config(noreplace) expected, flags {flags!r}"
    assert (perms, owner) == ("-rw-r-----", "root:omero-web")
    assert rows["/var/lib/omerowebd"][2] == "omero-web:omero-web"
    assert rows["/var/lib/omerowebd-nginx"][2] == "root:root"


def test_rpm_scriptlets_create_the_user_and_manage_the_units(built_rpm):
    scripts = rpm_query(built_rpm.rpm, "--scripts")
    print(scripts)
    parts = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.DOTALL | re.MULTILINE))
    assert "systemd-sysusers" in parts["preinstall"] and "u omero-web" in parts["preinstall"]
    assert re.search(r"\$1 -eq 1 .*systemctl --no-reload preset omerowebd.service omerowebd.socket omerowebd-nginx.path", parts["postinstall"])
    assert "systemd-tmpfiles --create omerowebd.conf" in parts["postinstall"]
    assert re.search(r"\$1 -eq 0 .*disable --now omerowebd.service omerowebd.socket", parts["preuninstall"])
    # Upgrades restart the daemon, not its socket.
    restart = re.findall(r"try-restart ([^|]*)\|\|", parts["postuninstall"])
    assert [r.split() for r in restart] == [["omerowebd.service"]]


def test_rpm_requires_the_daemons_python_packages(built_rpm):
    requires = rpm_query(built_rpm.rpm, "--requires").split("\n")
    for package in DEBIAN_DEPENDS:  # the same names in Fedora
        assert package in [r.strip() for r in requires], requires


def test_rpm_scriptlets_work_under_systemd(built_rpm, rootfs):
    """Install and erase the RPM in a container with systemd as PID 1 (rpm on
    Debian, so --nodeps): the user, the presets and tmpfiles on install, the
    units disabled and gone on erase."""
    from .nspawn import Container

    with Container(rootfs, binds_ro=[(str(built_rpm.rpm.parent), "/srv/rpms")]) as c:
        c.run(["rpm", "--initdb"])
        # Debian 12's rpm wants --force-debian to install on a dpkg system; Debian 13's knows no such option.
        force = ["--force-debian"] if "--force-debian" in c.run(["rpm", "--help"], check=False).stdout else []
        c.run(["rpm", "-i", "--nodeps", *force, f"/srv/rpms/{built_rpm.rpm.name}"])
        assert c.run(["getent", "passwd", "omero-web"]).stdout.strip().endswith(":/var/lib/omerowebd:/usr/sbin/nologin")
        c.systemctl("daemon-reload")
        for unit in ("omerowebd.service", "omerowebd.socket", "omerowebd-nginx.path"):
            assert c.systemctl("is-enabled", unit, check=False).stdout.strip() == "enabled", unit
        assert c.run(["stat", "-c", "%a %U", "/var/lib/omerowebd/sessions"]).stdout.split() == ["700", "omero-web"]
        assert c.run(["stat", "-c", "%a %U:%G", "/etc/omerowebd/omerowebd.toml"]).stdout.split() == ["640", "root:omero-web"]
        assert "omerowebd" in c.run(["omerowebd", "--version"]).stdout
        c.run(["rpm", "-e", "--nodeps", "omerowebd"])
        left = c.sh("ls /usr/lib/systemd/system/omerowebd* /etc/systemd/system/*/omerowebd* /usr/bin/omerowebd 2>/dev/null", check=False).stdout
        assert left.strip() == "", left
