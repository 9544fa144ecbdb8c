"""The root publisher of nginx's files (omerowebd.nginx_publish), run as root
against a TOML and a venv the test makes root's, a state directory owned by
an unprivileged user (nobody, standing in for omero-web), and hostile
variants of everything that user can touch.

The venv is a real one (the system Python's ``venv --without-pip``) holding a
small stand-in omeroweb package with its own stand-in templates: the real
omero-web is used in tests/integration/test_nginx_publish.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd import nginx, nginx_publish
from omerowebd.errors import ConfigError
from omerowebd.nginx_publish import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, Options

if os.geteuid() != 0:
    pytest.skip("the publisher runs as root: these tests chown files to nobody", allow_module_level=True)

NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"

# Stand-ins with the shapes the daemon's layering relies on (not omero-web's text).
SERVER = """\
upstream omeroweb%(PREFIX_NAME)s {
    server %(FASTCGI_EXTERNAL)s fail_timeout=0;
}

server {
    listen %(HTTPPORT)d;
    server_name %(SERVERNAME)s;
    client_max_body_size %(MAX_BODY_SIZE)s;

%(NGINX_SERVER_EXTRA_CONFIG)s

    location @maintenance%(PREFIX_NAME)s {
        root %(ROOT)s/etc/templates/error;
        try_files $uri /maintainance.html =502;
    }

    location %(STATIC_URL)s {
        alias %(STATIC_ROOT)s;
    }

    location @proxy_to_app%(PREFIX_NAME)s {
        proxy_pass http://omeroweb%(PREFIX_NAME)s;
    }

    location %(FORCE_SCRIPT_NAME)s {
        error_page 502 @maintenance%(PREFIX_NAME)s;
        try_files $uri @proxy_to_app%(PREFIX_NAME)s;
    }
}
"""
LOCATION = """\
location @maintenance%(PREFIX_NAME)s {
    root %(ROOT)s/etc/templates/error;
    try_files $uri /maintainance.html =502;
}

location %(STATIC_URL)s {
    alias %(STATIC_ROOT)s;
}

location @proxy_to_app%(PREFIX_NAME)s {
    proxy_pass http://%(FASTCGI_EXTERNAL)s;
}
"""
SETTINGS = """\
CUSTOM_SETTINGS_MAPPINGS = {
    "omero.web.application_server.port": ["APPLICATION_SERVER_PORT", 4080, int, "port"],
    "omero.web.static_url": ["STATIC_URL", "/static/", str, "static"],
}
"""


def make_venv(path: Path) -> Path:
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    (site,) = path.glob("lib/python3*/site-packages")
    web = site / "omeroweb"
    (web / "templates").mkdir(parents=True)
    (web / "__init__.py").write_text("")
    (web / "settings.py").write_text(SETTINGS)
    (web / "utils.py").write_text("class LeaveUnset(Exception):\n    pass\n")
    (web / "templates" / "nginx.conf.template").write_text(SERVER)
    (web / "templates" / "nginx-location.conf.template").write_text(LOCATION)
    (site / "gunicorn").mkdir()
    (site / "gunicorn" / "__init__.py").write_text("")
    return path


def chown_nobody(*paths: Path) -> None:
    for path in paths:
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid, follow_symlinks=False)


@dataclass
class Site:
    """A root-owned TOML and venv, the service user's state dir, root's destination."""

    root: Path
    calls: list[str]

    @property
    def toml(self) -> Path:
        return self.root / "etc" / "omerowebd.toml"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def marker(self) -> Path:
        return self.state / "nginx" / nginx.APPLIED_MARKER

    @property
    def dest(self) -> Path:
        return self.root / "published"

    def options(self, **kw) -> Options:
        record = self.root / "reloads"
        # No settle time: the tests that are about it set one (and count the sleeps).
        defaults = dict(config=self.toml, dest=self.dest, socket_unit=None, test_command=None,
                        reload_command=("sh", "-c", f"echo reload >> {record}"), settle=0.0)
        defaults.update(kw)
        return Options(**defaults)

    def reloads(self) -> int:
        path = self.root / "reloads"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def write_toml(self, nginx_table: str = "", omero: str = "") -> config_module.Config:
        text = textwrap.dedent(f"""\
            [daemon]
            omerodir = "{self.root / 'omerodir'}"
            venv = "{self.venv}"
            state_dir = "{self.state}"
            bind = ["127.0.0.1:4091"]

            [nginx]
            listen = "127.0.0.1:8089"
            """) + textwrap.dedent(nginx_table) + "\n[omero.web]\n" + textwrap.dedent(omero)
        tmp = self.toml.with_name(".omerowebd.toml.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o640)
        os.replace(tmp, self.toml)
        return config_module.load(self.toml)

    def apply(self, config: config_module.Config | None = None) -> None:
        """What the daemon does once a generation serves: its marker, as the service user's file."""
        nginx.mark_applied(config or config_module.load(self.toml), _NullLog())
        chown_nobody(self.marker.parent, self.marker)

    def published(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.dest)): p.read_bytes()
                for p in sorted(self.dest.rglob("*")) if p.is_file() and not p.name.startswith(".")}


class _NullLog:
    def __getattr__(self, level: str):
        return lambda *a, **k: None


@pytest.fixture(scope="module")
def venv_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("venv") / "venv")


@pytest.fixture
def site(tmp_path: Path, venv_template: Path) -> Site:
    s = Site(tmp_path, [])
    s.toml.parent.mkdir()
    shutil.copytree(venv_template, s.venv, symlinks=True)
    s.state.mkdir()
    chown_nobody(s.state)
    s.write_toml()
    return s


def run(options: Options) -> tuple[int, str, str]:
    """main()'s exit status and output, in-process, with a watchdog: a hostile input must never hang it."""
    out, err = io.StringIO(), io.StringIO()

    def hung(*_: object) -> None:
        raise AssertionError("the publisher hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _options(options):
            code = nginx_publish.main([])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _options(options: Options) -> Iterator[None]:
    """main() with these options (its command line covers only the admin's few)."""
    original = nginx_publish.parse_args
    nginx_publish.parse_args = lambda argv: options
    try:
        yield
    finally:
        nginx_publish.parse_args = original


# -- what gets published ------------------------------------------------------------


def test_root_publishes_its_own_rendering_of_the_toml_the_daemon_applied(site: Site) -> None:
    site.apply()
    code, out, err = run(site.options())
    assert code == EXIT_OK, err
    assert "published maintenance/maintainance.html, omero-web-location.include, omero-web.conf to" in out
    files = site.published()
    assert sorted(files) == ["maintenance/maintainance.html", "omero-web-location.include", "omero-web.conf"]
    server = files["omero-web.conf"].decode()
    assert "server 127.0.0.1:4091 fail_timeout=0;" in server  # daemon.bind from the TOML
    assert f"root {site.dest / 'maintenance'};" in server  # root's page, not the service user's
    assert str(site.state) not in server
    # The daemon's own code renders it: the same text, with root's directories.
    config = config_module.load(site.toml)
    info = nginx_publish.probe(config)
    expected = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4091"],
                                    directory=site.dest, page_dir=site.dest / "maintenance")
    assert {str(p.relative_to(site.dest)): d for p, d in expected.files.items()} == files
    # Modes: config for nginx's master (root) only; the page for the workers.
    for name in ("omero-web.conf", "omero-web-location.include"):
        st = os.lstat(site.dest / name)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
    assert stat.S_IMODE(os.lstat(site.dest / "maintenance" / "maintainance.html").st_mode) == 0o644
    for directory in (site.dest, site.dest / "maintenance"):
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(site.dest / nginx_publish.RECORD).st_mode) == 0o600
    assert site.reloads() == 1


def test_root_renders_the_other_hosts_from_its_own_toml(site: Site) -> None:
    """nginx.upstreams and its timing reach root's files as the daemon renders them, and only from root's TOML."""
    site.write_toml('upstreams = ["127.0.0.3:4091"]\nmax_fails = 2\nfail_timeout = "30s"\n')
    site.apply()
    code, _, err = run(site.options())
    assert code == EXIT_OK, err
    server = site.published()["omero-web.conf"].decode()
    assert ("    server 127.0.0.1:4091 max_fails=2 fail_timeout=30s;\n"
            "    server 127.0.0.3:4091 max_fails=2 fail_timeout=30s;\n") in server
    assert "        proxy_next_upstream error timeout http_502 http_503;\n" in server
    # A value that could end a directive never gets as far as rendering: the TOML is refused.
    with pytest.raises(ConfigError, match="nginx.fail_timeout"):
        site.write_toml('upstreams = ["127.0.0.3:4091"]\nfail_timeout = "30s; include /tmp/x"\n')
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED and err.count("\n") == 1 and "nginx.fail_timeout" in err, err
    assert site.published()["omero-web.conf"].decode() == server


def test_what_the_service_user_writes_in_its_nginx_dir_is_never_published(site: Site) -> None:
    site.apply()
    hostile = "access_log /etc/cron.d/pwned;\ninclude /etc/shadow;\nload_module /tmp/x.so;\n"
    own = site.state / "nginx"
    for name in ("omero-web.conf", "omero-web-location.include", "extra.conf"):
        (own / name).write_text(hostile)
        chown_nobody(own / name)
    code, _, err = run(site.options())
    assert code == EXIT_OK, err
    files = site.published()
    assert "extra.conf" not in files
    for data in files.values():
        assert b"access_log" not in data and b"/etc/shadow" not in data and b"load_module" not in data


def test_nothing_is_published_until_the_daemon_applied_the_toml(site: Site) -> None:
    code, out, _ = run(site.options())  # no marker at all
    assert code == EXIT_OK and "does not serve" in out
    assert not site.dest.exists() and site.reloads() == 0
    site.apply()
    site.write_toml(omero='prefix = "/omero"\n')  # the admin edits; the daemon has not reloaded yet
    code, out, _ = run(site.options())
    assert code == EXIT_OK and "does not serve" in out
    assert not site.dest.exists()
    site.apply()  # the daemon reloaded
    code, _, err = run(site.options())
    assert code == EXIT_OK, err
    assert b"location /omero {" in site.published()["omero-web.conf"]


def _write_as_nobody(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    chown_nobody(path)


HOSTILE_MARKERS = {
    "wrong digest": lambda site, digest: _write_as_nobody(site.marker, json.dumps({"digest": "0" * 64}).encode()),
    "garbage": lambda site, digest: _write_as_nobody(site.marker, b"\xff\xfe{{{" + digest.encode()),
    "not an object": lambda site, digest: _write_as_nobody(site.marker, json.dumps([digest]).encode()),
    "digest not a string": lambda site, digest: _write_as_nobody(site.marker, b'{"digest": 1e999}'),
    "deeply nested": lambda site, digest: _write_as_nobody(site.marker, b"[" * 2000 + b"]" * 2000),
    "huge": lambda site, digest: _write_as_nobody(
        site.marker, json.dumps({"digest": digest, "pad": "x" * (1 << 24)}).encode()),
    "symlink to a good marker": lambda site, digest: (
        _write_as_nobody(site.root / "elsewhere.json", json.dumps({"digest": digest}).encode()),
        site.marker.symlink_to(site.root / "elsewhere.json")),
    "fifo": lambda site, digest: os.mkfifo(site.marker),
    "directory": lambda site, digest: site.marker.mkdir(),
    "unix socket": lambda site, digest: _bind_unix(site.marker),
}


def _bind_unix(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.mark.parametrize("kind", HOSTILE_MARKERS)
def test_a_hostile_marker_publishes_nothing_and_never_fails(site: Site, kind: str) -> None:
    config = config_module.load(site.toml)
    site.marker.parent.mkdir()
    chown_nobody(site.marker.parent)
    HOSTILE_MARKERS[kind](site, config.digest)
    code, out, err = run(site.options())
    assert code == EXIT_OK, err
    assert "does not serve" in out
    assert not site.dest.exists() and site.reloads() == 0


def test_a_symlinked_nginx_dir_is_not_followed(site: Site) -> None:
    """The service user swaps its nginx dir for a link to a directory with a good marker."""
    config = config_module.load(site.toml)
    elsewhere = site.root / "planted"
    elsewhere.mkdir()
    (elsewhere / nginx.APPLIED_MARKER).write_text(json.dumps({"digest": config.digest}))
    (site.state / "nginx").symlink_to(elsewhere)
    code, out, _ = run(site.options())
    assert code == EXIT_OK and "does not serve" in out
    assert not site.dest.exists()


def test_a_marker_the_service_user_rewrites_does_not_change_what_is_published(site: Site) -> None:
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    before = site.published()
    for kind in ("wrong digest", "garbage", "fifo"):
        site.marker.unlink()
        HOSTILE_MARKERS[kind](site, "")
        assert run(site.options())[0] == EXIT_OK
        assert site.published() == before
    assert site.reloads() == 1


# -- inputs root does not trust ---------------------------------------------------------


def _toml_owned_by_nobody(site: Site) -> None:
    chown_nobody(site.toml)


def _toml_group_writable(site: Site) -> None:
    os.chown(site.toml, 0, NOBODY.pw_gid)
    os.chmod(site.toml, 0o660)


def _toml_world_writable(site: Site) -> None:
    os.chmod(site.toml, 0o646)


def _toml_dir_owned_by_nobody(site: Site) -> None:
    chown_nobody(site.toml.parent)


def _toml_symlink_into_nobodys_dir(site: Site) -> None:
    theirs = site.state / "omerowebd.toml"
    shutil.copy(site.toml, theirs)
    site.toml.unlink()
    site.toml.symlink_to(theirs)


@pytest.mark.parametrize("spoil", [_toml_owned_by_nobody, _toml_group_writable, _toml_world_writable,
                                   _toml_dir_owned_by_nobody, _toml_symlink_into_nobodys_dir])
def test_a_toml_root_does_not_alone_control_is_refused(site: Site, spoil) -> None:
    site.apply()
    spoil(site)
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED
    assert err.count("\n") == 1 and "root alone can change" in err, err
    assert not site.dest.exists() and site.reloads() == 0


def _venv_owned_by_nobody(site: Site) -> None:
    chown_nobody(site.venv)


def _site_packages_nobodys(site: Site) -> None:
    (site_packages,) = site.venv.glob("lib/python3*/site-packages")
    chown_nobody(site_packages)


def _template_nobodys(site: Site) -> None:
    (template,) = site.venv.glob("lib/python3*/site-packages/omeroweb/templates/nginx.conf.template")
    chown_nobody(template)


def _pth_to_nobodys_dir(site: Site) -> None:
    (site_packages,) = site.venv.glob("lib/python3*/site-packages")
    (site_packages / "evil.pth").write_text(f"{site.state}\n")


@pytest.mark.parametrize("spoil", [_venv_owned_by_nobody, _site_packages_nobodys, _template_nobodys,
                                   _pth_to_nobodys_dir])
def test_a_venv_root_does_not_alone_control_is_never_run(site: Site, spoil, monkeypatch) -> None:
    site.apply()
    spoil(site)
    ran = []
    monkeypatch.setattr(nginx_publish.subprocess, "run", lambda *a, **k: ran.append(a) or pytest.fail("ran something"))
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED and "root runs only a venv root alone can change" in err, err
    assert ran == [] and not (site.dest / "omero-web.conf").exists()


def test_a_maintenance_template_the_service_user_owns_is_refused(site: Site) -> None:
    template = site.state / "page.html"
    template.write_text("<html>theirs</html>")
    chown_nobody(template)
    site.write_toml(nginx_table=f'maintenance_template = "{template}"\n')
    site.apply()
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED and "maintenance_template" in err
    assert not site.dest.exists()
    # Root's own template is used, and a change of it is published.
    ours = site.root / "etc" / "page.html"
    ours.write_text("<html>ours $prefix</html>")
    site.write_toml(nginx_table=f'maintenance_template = "{ours}"\n')
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    assert site.published()["maintenance/maintainance.html"] == b"<html>ours </html>"
    ours.write_text("<html>changed</html>")
    assert run(site.options())[0] == EXIT_OK
    assert site.published()["maintenance/maintainance.html"] == b"<html>changed</html>"


# -- the destination ----------------------------------------------------------------------


def _dest_symlink(site: Site) -> None:
    target = site.root / "target"
    target.mkdir()
    site.dest.symlink_to(target)


def _dest_nobodys(site: Site) -> None:
    site.dest.mkdir()
    chown_nobody(site.dest)


def _dest_group_writable(site: Site) -> None:
    site.dest.mkdir()
    os.chmod(site.dest, 0o775)


def _maintenance_symlink(site: Site) -> None:
    site.dest.mkdir()
    (site.dest / "maintenance").symlink_to(site.state)


def _dest_parent_nobodys(site: Site) -> None:
    parent = site.root / "theirs"
    parent.mkdir()
    chown_nobody(parent)
    site.dest.symlink_to(parent / "published")  # lands in their directory


@pytest.mark.parametrize("spoil", [_dest_symlink, _dest_nobodys, _dest_group_writable, _maintenance_symlink,
                                   _dest_parent_nobodys])
def test_a_destination_root_does_not_alone_control_is_refused(site: Site, spoil) -> None:
    site.apply()
    spoil(site)
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED, err
    assert err.count("\n") == 1
    for planted in (site.root / "target", site.state, site.root / "theirs"):
        assert not planted.exists() or not any(p.name.endswith((".conf", ".include", ".html"))
                                               for p in planted.rglob("*"))
    assert site.reloads() == 0


# -- nginx -t, the reload, the record -----------------------------------------------------


def _nginx_t(site: Site, ok: bool) -> tuple[str, ...]:
    script = site.root / ("nginx-t-ok" if ok else "nginx-t-refuses")
    script.write_text(
        "#!/bin/sh\n" + ("exit 0\n" if ok else
                         "echo 'nginx: [warn] something minor' >&2\n"
                         "echo 'nginx: [emerg] unknown directive \"x\" in /etc/nginx/a.conf:3' >&2\n"
                         "echo 'SECRET-LINE-FROM-A-FILE' >&2\nexit 1\n"))
    script.chmod(0o755)
    return (str(script),)


def test_nginx_refusing_puts_the_previous_files_back_and_says_only_its_first_error(site: Site) -> None:
    site.apply()
    assert run(site.options(test_command=_nginx_t(site, True)))[0] == EXIT_OK
    before = site.published()
    site.write_toml(omero='prefix = "/omero"\n')
    site.apply()
    code, _, err = run(site.options(test_command=_nginx_t(site, False)))
    assert code == EXIT_FAILED
    assert "[emerg] unknown directive" in err and "SECRET" not in err and "minor" not in err
    assert err.count("\n") == 1
    assert site.published() == before
    assert site.reloads() == 1
    # nginx fixed: the next run publishes (a refusal is not recorded as done).
    code, _, err = run(site.options(test_command=_nginx_t(site, True)))
    assert code == EXIT_OK, err
    assert b"location /omero {" in site.published()["omero-web.conf"]
    assert site.reloads() == 2


def test_a_failed_reload_keeps_the_tested_files_and_is_tried_again(site: Site) -> None:
    site.apply()
    code, _, err = run(site.options(reload_command=("false",)))
    assert code == EXIT_FAILED and "reloading nginx failed" in err
    assert "omero-web.conf" in site.published()
    code, out, err = run(site.options())
    assert code == EXIT_OK and "published" in out, err
    assert site.reloads() == 1
    assert run(site.options())[0] == EXIT_OK
    assert site.reloads() == 1


def test_a_flood_of_events_costs_a_comparison_not_a_probe(site: Site, monkeypatch) -> None:
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    probes = []
    monkeypatch.setattr(nginx_publish, "probe", lambda config: probes.append(config) or pytest.fail("probed"))
    for _ in range(50):
        site.apply()  # the daemon (or the service user) touches its marker
        code, out, _ = run(site.options())
        assert code == EXIT_OK and "up to date" in out
    assert probes == [] and site.reloads() == 1


def test_a_new_venv_or_socket_address_republishes_under_the_same_toml(site: Site, monkeypatch) -> None:
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    # The socket unit now listens elsewhere (systemctl show's answer).
    monkeypatch.setattr(nginx_publish, "socket_addresses", lambda unit: ["127.0.0.1:4555"])
    code, _, err = run(site.options(socket_unit="omerowebd.socket"))
    assert code == EXIT_OK, err
    assert b"server 127.0.0.1:4555 fail_timeout=0;" in site.published()["omero-web.conf"]
    assert site.reloads() == 2
    # A package installed in the venv: probed again; same text, so no reload.
    (site_packages,) = site.venv.glob("lib/python3*/site-packages")
    (site_packages / "newapp-1.0.dist-info").mkdir()
    code, out, err = run(site.options(socket_unit="omerowebd.socket"))
    assert code == EXIT_OK and "nothing to reload" in out, err
    assert site.reloads() == 2


def test_a_renamed_file_leaves_no_stale_copy(site: Site) -> None:
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    site.write_toml(nginx_table='server_file = "omero.conf"\n')
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    assert sorted(site.published()) == ["maintenance/maintainance.html", "omero-web-location.include", "omero.conf"]


def test_a_change_that_arrives_while_publishing_is_picked_up(site: Site, monkeypatch) -> None:
    site.apply()
    real = nginx_publish.run_command
    edits = iter([lambda: (site.write_toml(omero='prefix = "/late"\n'), site.apply())])

    def reload_then_edit(argv):
        result = real(argv)
        for edit in edits:  # the first reload only: the admin's edit and the daemon's reload land now
            edit()
            break
        return result

    monkeypatch.setattr(nginx_publish, "run_command", reload_then_edit)
    code, out, err = run(site.options())
    assert code == EXIT_OK, err
    assert [line.split()[0] for line in out.splitlines()] == ["published", "published"]
    assert b"location /late {" in site.published()["omero-web.conf"]
    assert site.reloads() == 2


def test_inputs_that_never_settle_stop_after_a_few_rounds(site: Site, monkeypatch) -> None:
    site.apply()
    real = nginx_publish.run_command
    count = iter(range(1000))

    def reload_then_edit(argv):
        result = real(argv)
        site.write_toml(omero=f'prefix = "/p{next(count)}"\n')
        site.apply()
        return result

    monkeypatch.setattr(nginx_publish, "run_command", reload_then_edit)
    code, _, err = run(site.options())
    assert code == EXIT_FAILED and "kept changing" in err
    assert site.reloads() == nginx_publish.ROUNDS


class Settle:
    """Stands in for the publisher's pause: records each settle, and runs what lands during it."""

    def __init__(self, *during) -> None:
        self.during = list(during)
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.during:
            self.during.pop(0)()


@pytest.mark.parametrize("case", ["published", "up to date", "not applied", "refused", "no nginx"])
def test_every_run_settles_then_looks_again_whatever_it_found(site: Site, monkeypatch, case: str) -> None:
    """Each run lasts at least the settle time: a flood of path events starts at most one run a second,
    and systemd's start limits are never needed."""
    if case != "not applied":
        site.apply()
    if case == "up to date":
        assert run(site.options())[0] == EXIT_OK
    if case == "refused":
        os.chmod(site.toml, 0o646)
    options = site.options(settle=1.0, test_command=("/nonexistent/nginx", "-t") if case == "no nginx" else None)
    looks = []
    real_look = nginx_publish.look
    monkeypatch.setattr(nginx_publish, "look", lambda o: looks.append(1) or real_look(o))
    settle = Settle()
    monkeypatch.setattr(nginx_publish, "pause", settle)
    code, out, err = run(options)
    assert settle.slept == [1.0] and len(looks) == 2, (out, err)
    expected = {"published": (EXIT_OK, "published"), "up to date": (EXIT_OK, "up to date"),
                "not applied": (EXIT_OK, "does not serve"), "refused": (EXIT_REFUSED, "root alone can change"),
                "no nginx": (EXIT_OK, "nginx is not installed (/nonexistent/nginx is missing)")}[case]
    assert code == expected[0] and expected[1] in out + err, (out, err)
    assert (out + err).count("\n") == 1


def test_a_marker_that_lands_while_a_run_settles_is_published_by_that_run(site: Site, monkeypatch) -> None:
    """systemd's path unit does not watch while the publisher runs: the look after the settle is what sees it."""
    site.write_toml(omero='prefix = "/late"\n')  # the admin's edit starts a run; the daemon has not reloaded yet
    settle = Settle(site.apply)  # the daemon's reload lands during the settle
    monkeypatch.setattr(nginx_publish, "pause", settle)
    code, out, err = run(site.options(settle=1.0))
    assert code == EXIT_OK, err
    assert [line.split()[0] for line in out.splitlines()] == ["the", "published"], out
    assert b"location /late {" in site.published()["omero-web.conf"]
    assert len(settle.slept) == 2 and site.reloads() == 1


def test_a_marker_flipping_during_a_run_costs_looks_not_publishes(site: Site, monkeypatch) -> None:
    site.apply()
    assert run(site.options())[0] == EXIT_OK
    good = site.marker.read_bytes()
    probes = []
    monkeypatch.setattr(nginx_publish, "probe", lambda config: probes.append(config) or pytest.fail("probed"))

    def flip(data: bytes):
        return lambda: _write_as_nobody(site.marker, data)

    flips = [flip(b"garbage") if i % 2 == 0 else flip(good) for i in range(20)]
    settle = Settle(*flips)
    monkeypatch.setattr(nginx_publish, "pause", settle)
    code, out, err = run(site.options(settle=1.0))
    assert code == EXIT_OK, err
    assert len(settle.slept) == 21 and probes == [] and site.reloads() == 1
    assert sorted(out.splitlines()) == sorted({line for line in out.splitlines()})  # each line once


def test_nginx_disabled_publishes_nothing(site: Site) -> None:
    site.write_toml(nginx_table="enabled = false\n")
    code, out, _ = run(site.options())
    assert code == EXIT_OK and "nginx.enabled is false" in out
    assert not site.dest.exists()


def test_an_invalid_toml_is_one_line(site: Site) -> None:
    site.toml.write_text("[daemon\n")
    code, _, err = run(site.options())
    assert code == EXIT_REFUSED and err.count("\n") == 1 and "TOML" in err


def test_the_command_line_refuses_what_it_does_not_know(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        nginx_publish.parse_args(["--from", "/somewhere"])
    assert e.value.code == 2


@pytest.mark.parametrize("text, expected", [
    ("LoadState=loaded\nListen=127.0.0.1:4080 (Stream)\n", ["127.0.0.1:4080"]),
    ("LoadState=loaded\nListen=[::]:4080 (Stream)\nListen=/run/omerowebd/web.sock (Stream)\n",
     ["[::]:4080", "unix:/run/omerowebd/web.sock"]),
    ("LoadState=loaded\nListen=@abstract (Stream)\nListen=127.0.0.1:53 (Datagram)\n", None),
    ("LoadState=not-found\nListen=\n", None),
    ("LoadState=masked\nListen=127.0.0.1:4080 (Stream)\n", None),
])
def test_socket_unit_listen_lines(text: str, expected: list[str] | None) -> None:
    assert nginx_publish.parse_listen(text) == expected


def test_options_are_frozen() -> None:
    with pytest.raises(Exception):
        Options().force = True  # type: ignore[misc]
    assert replace(Options(), force=True).force
