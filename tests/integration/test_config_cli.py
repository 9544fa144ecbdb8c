"""omerowebctl config against real files: a site made with the real `omero config set`, read back by
omero-py, the OMERO.web venv's verdict on values, and --reload against a running daemon (issue 7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit

from omerowebd import config as config_module
from omerowebd import omero_config

pytestmark = pytest.mark.omeroweb

MULTI_LINE = "omero.web.login_incorrect_credentials_text"

# Each through the real CLI, the way admins do it: (verb, key, value).
SITE_COMMANDS = [
    ("set", "omero.web.prefix", "/omero"),
    ("set", "omero.web.public.enabled", "true"),
    ("set", "omero.web.public.user", 'the "public" guest, café ☃'),
    ("set", "omero.web.public.password", "p@ss=word with spaces"),
    ("set", "omero.web.secret_key", "k3y'with\"quotes"),
    ("set", "omero.web.wsgi_workers", "4"),
    ("set", "omero.web.application_server.port", "4090"),
    ("set", "omero.web.application_server.host", "0.0.0.0"),
    ("set", "omero.web.use_x_forwarded_host", "True"),  # OMERO.web takes it; true would not give it back
    ("set", "omero.web.allowed_hosts", '["web.example.org","127.0.0.1"]'),  # typed without spaces
    ("append", "omero.web.ui.top_links", '["Figure", "figure_index", {"title": "Make figures"}]'),
    ("set", "omero.web.admins", '[["Admin", "admin@example.org"]]'),
    ("set", "omero.web.admins.email_subject_prefix", "[web] "),
    ("set", "omero.web.login_redirect",
     '{"redirect": ["webindex"], "viewname": "load_template", "args": ["userdata"], "query_string": "experimenter=-1"}'),
    ("set", "omero.web.caches", '{"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "TIMEOUT": null}}'),
    ("append", "omero.web.django_additional_settings", '["SESSION_COOKIE_AGE", 1209600]'),
    ("set", "omero.web.session_cookie_age", "1209600"),
    ("set", "omero.web.time_zone", "Europe/Berlin"),
    ("set", MULTI_LINE, "Wrong name or password.\nAsk the admin: ☎ 1234"),
    ("set", "omero.mail.host", "smtp.example.org"),
    ("set", "omero.mail.port", "25"),
]


class OmeroSite:
    """A site directory made by the real `omero` CLI (as nobody: it refuses root)."""

    def __init__(self, venv: Path, omerodir: Path) -> None:
        self.venv, self.omerodir = venv, omerodir

    def omero(self, *args: str, omerodir: Path | None = None) -> subprocess.CompletedProcess[str]:
        where = omerodir or self.omerodir
        env = {"PATH": "/usr/bin:/bin", "OMERODIR": str(where), "HOME": str(where), "LC_ALL": "C.UTF-8"}
        command = [str(self.venv / "bin" / "omero"), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
        done = subprocess.run(command, env=None if os.geteuid() == 0 else env, cwd=where,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"omero {' '.join(args)}: {done.stderr}"
        return done

    @property
    def config_xml(self) -> Path:
        return omero_config.config_xml_path(self.omerodir)


def as_map(venv: Path, config_xml: Path) -> dict[str, str]:
    """The property map omero-py reads (what omeroweb.settings gets), less omero-py's own bookkeeping."""
    code = ("import json, sys, omero.config\n"
            "c = omero.config.ConfigXml(sys.argv[1], exclusive=False, read_only=True)\n"
            "print(json.dumps(c.as_map())); c.close()")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code, str(config_xml)],
                          capture_output=True, text=True, timeout=60, check=True)
    found = json.loads(done.stdout)
    for ignored in (omero_config.VERSION_KEY, omero_config.PROFILE_KEY):
        found.pop(ignored, None)
    return found


def make_dir(path: Path, owner: str | None = None) -> Path:
    path.mkdir(parents=True)
    if owner and os.geteuid() == 0:
        shutil.chown(path, owner)
    return path


@pytest.fixture(scope="module")
def site(omero_venv: Path) -> Iterator[OmeroSite]:
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.fail("running as root needs runuser to run the omero CLI as nobody")
    base = Path(tempfile.mkdtemp(prefix="omerowebd-config-cli-"))  # not pytest's tmp_path: nobody cannot enter it
    base.chmod(0o755)
    try:
        s = OmeroSite(omero_venv, make_dir(base / "omerodir", "nobody"))
        for verb, key, value in SITE_COMMANDS:
            s.omero("config", verb, key, value)
        (base / "backup.txt").write_text(s.omero("config", "get", "--show-password").stdout)
        yield s
    finally:
        shutil.rmtree(base)


@pytest.fixture
def toml(tmp_path: Path, omero_venv: Path) -> Path:
    path = tmp_path / "etc" / "omerowebd.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(f"""\
        # The site's own comment.
        [daemon]
        omerodir = "{tmp_path / 'omerodir'}"
        venv = "{omero_venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{tmp_path / 'state'}"

        [nginx]
        enabled = false

        [omero.web]
        # Below a path, e.g.:
        #prefix = "/omero"
        wsgi_workers = 2
        page_size = 100
        """))
    return path


def ctl(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180, input=stdin)


def daemon_would_write(toml_path: Path, tmp_path: Path) -> Path:
    """The config.xml the daemon writes from the TOML (less its session-path pin, which is its own)."""
    xml = tmp_path / "written" / "config.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_bytes(omero_config.render_config_xml(config_module.load(toml_path).properties))
    return xml


# -- import ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["backup.txt", "config.xml"])
def test_import_then_the_daemons_config_xml_is_what_omero_py_read_from_the_original(site, toml, tmp_path, source):
    original = as_map(site.venv, site.config_xml)
    assert len(original) == len(SITE_COMMANDS)
    path = site.omerodir.parent / "backup.txt" if source == "backup.txt" else site.config_xml
    out = ctl(toml, "config", "import", str(path))
    assert out.returncode == 0, out.stderr
    assert f"importing {len(SITE_COMMANDS)} properties from {path}" in out.stdout
    assert "removed 1" in out.stdout  # page_size was the TOML's, not the site's
    # Nothing lost, nothing changed: omero-py reads the same map from what the daemon writes.
    assert as_map(site.venv, daemon_would_write(toml, tmp_path)) == original
    # Typed where that gives back the same text; the site's own comments still there.
    text = toml.read_text()
    web = tomlkit.parse(text)["omero"]["web"]
    assert web["public"]["enabled"] is True
    assert isinstance(web["wsgi_workers"], tomlkit.items.Integer) and web["wsgi_workers"] == 4
    assert isinstance(web["ui"]["top_links"], tomlkit.items.Array)
    assert isinstance(web["login_redirect"], tomlkit.items.InlineTable)
    assert web["allowed_hosts"] == '["web.example.org","127.0.0.1"]'  # text: typed, it would gain spaces
    assert web["use_x_forwarded_host"] == "True"
    assert isinstance(web["caches"], str)  # null inside
    assert '"application_server.host" = "0.0.0.0"' in text and '"admins.email_subject_prefix" = "[web] "' in text
    assert "# The site's own comment." in text and '#prefix = "/omero"' in text
    # The report names properties, never secret values.
    assert "p@ss=word" not in out.stdout + out.stderr and "k3y" not in out.stdout + out.stderr
    # And the daemon accepts the result.
    check = ctl(toml, "check")
    assert check.returncode == 0, check.stdout


def test_import_dry_run_writes_nothing(site, toml):
    before = toml.read_bytes()
    out = ctl(toml, "config", "import", str(site.config_xml), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "dry run" in out.stdout and "omero.web.prefix" in out.stdout
    assert toml.read_bytes() == before


def test_export_loads_back_with_omero_config_load(site, toml, tmp_path):
    assert ctl(toml, "config", "import", str(site.config_xml)).returncode == 0
    exported = site.omerodir.parent / f"export-{tmp_path.name}.txt"
    out = ctl(toml, "config", "export", "--show-password", "-o", str(exported))
    assert out.returncode == 0, out.stderr
    # `omero config load` cannot carry line breaks, and strips spaces around a value: said, and left out.
    assert f"{MULTI_LINE} left out" in out.stderr
    assert "omero.web.admins.email_subject_prefix left out" in out.stderr
    assert oct(exported.stat().st_mode & 0o777) == "0o600"
    exported.chmod(0o644)  # for nobody
    fresh = make_dir(site.omerodir.parent / f"fresh-{tmp_path.name}", "nobody")
    site.omero("config", "load", str(exported), omerodir=fresh)
    loaded = as_map(site.venv, omero_config.config_xml_path(fresh))
    original = as_map(site.venv, site.config_xml)
    assert loaded == {k: v for k, v in original.items() if k not in (MULTI_LINE, "omero.web.admins.email_subject_prefix")}


def test_export_hides_secrets_unless_asked(site, toml):
    assert ctl(toml, "config", "import", str(site.config_xml)).returncode == 0
    out = ctl(toml, "config", "export")
    assert out.returncode == 0
    assert "p@ss=word" not in out.stdout and "# omero.web.public.password=********" in out.stdout
    assert "omero.web.prefix=/omero" in out.stdout.splitlines()


# -- set / get against the real venv --------------------------------------------------------


def test_omero_web_refuses_a_bad_value_and_the_file_stays_byte_identical(toml):
    before = toml.read_bytes()
    for args, reason in ((("omero.web.wsgi_workers", "many"), "must be an integer"),
                         (("omero.web.apps", '["no_such_app"]'), "pip install it there"),
                         (("omero.web.time_zone", "Mars/Olympus_Mons"), "time_zone")):
        out = ctl(toml, "config", "set", *args)
        assert out.returncode == 1, out.stdout
        assert reason in out.stderr and "unchanged" in out.stderr and "Traceback" not in out.stderr
        assert toml.read_bytes() == before


def test_set_get_unset_with_the_real_catalogue(toml):
    out = ctl(toml, "config", "set", "omero.web.public.enabled", "true")
    assert out.returncode == 0 and "boolean" in out.stdout
    assert "public.enabled = true" in toml.read_text()
    assert ctl(toml, "config", "set", "omero.web.application_server.host", "127.0.0.1").returncode == 0
    assert '"application_server.host" = "127.0.0.1"' in toml.read_text()
    assert ctl(toml, "config", "set", "omero.web.secret_key", "--file", "-", stdin="s3cret\n").returncode == 0
    got = ctl(toml, "config", "get")
    assert "omero.web.secret_key=********" in got.stdout.splitlines() and "s3cret" not in got.stdout
    assert ctl(toml, "config", "get", "omero.web.secret_key", "--show-password").stdout == "s3cret\n"
    assert ctl(toml, "config", "get", "omero.web.public.enabled").stdout == "true\n"
    missing = ctl(toml, "config", "get", "omero.web.thumbnails_batch")
    assert missing.returncode == 1 and "OMERO.web's default: 50" in missing.stderr
    assert json.loads(ctl(toml, "config", "get", "omero.web.public", "--json").stdout) == {
        "omero.web.public.enabled": "true"}
    assert ctl(toml, "config", "get", "daemon").stdout.count("daemon.") >= 10
    assert ctl(toml, "config", "unset", "omero.web.public.enabled").returncode == 0
    assert "public.enabled" not in toml.read_text() and "#prefix" in toml.read_text()


def test_append_starts_from_the_real_default(toml):
    out = ctl(toml, "config", "append", "omero.web.ui.top_links", '["Figure", "figure_index"]')
    assert out.returncode == 0, out.stderr
    links = json.loads(ctl(toml, "config", "get", "omero.web.ui.top_links").stdout)
    assert links[0][0] == "Data" and links[-1] == ["Figure", "figure_index"]


def test_usage_errors_exit_2_with_one_line(toml):
    for args in (("config", "set", "daemon.vnev", "/x"), ("config", "set", "web.prefix", "/x"),
                 ("config", "set", "omero.web.prefix")):
        out = ctl(toml, *args)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_missing_config_file_exits_78(tmp_path):
    out = ctl(tmp_path / "none.toml", "config", "set", "omero.web.prefix", "/x")
    assert out.returncode == 78 and "config file not found" in out.stderr
    assert not (tmp_path / "none.toml").exists()


# -- --reload --------------------------------------------------------------------------------


def test_reload_applies_the_edit_and_reports_the_outcome(daemon):
    daemon.write_config(workers=2, daemon="watch_config = false")
    daemon.start()
    first = daemon.status()["generation"]["number"]
    out = daemon.ctl("config", "set", "omero.web.wsgi_workers", "3", "--reload")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reload: applied" in out.stdout and f"the daemon runs {daemon.config_path}" in out.stdout
    status = daemon.status()
    assert status["generation"]["number"] > first and len(status["generation"]["worker_pids"]) == 3
    # Written with the venv check skipped, refused by the daemon: the old generation keeps serving.
    out = daemon.ctl("config", "set", "omero.web.apps", '["no_such_app"]', "--skip-venv-check", "--reload")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "reload: rejected" in out.stdout and "no_such_app" in out.stdout
    assert daemon.status()["generation"]["number"] == status["generation"]["number"]


def test_reload_without_a_daemon_says_the_edit_is_written_but_not_applied(toml):
    out = ctl(toml, "config", "set", "omero.web.prefix", "/omero", "--reload")
    assert out.returncode == 3
    assert "not applied: omerowebd is not running" in out.stderr
    assert 'prefix = "/omero"' in toml.read_text()
