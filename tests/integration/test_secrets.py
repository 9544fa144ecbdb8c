"""Secrets never leave (issue 10): a canary secret in omero.web.secret_key, in the passwords inside
omero.web.django_additional_settings, and in values OMERO.web refuses, never appears in what
omerowebctl prints, in status, diagnostics, reload results, the daemon's log or its sd_notify STATUS."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_for

from omerowebd import ctl as ctl_module
from omerowebd import redact

pytestmark = pytest.mark.omeroweb

CANARY = "S3cr3t-canary-51d2"
KEY, MAIL, DB, TOKEN, BROKEN = (f"{CANARY}-{what}" for what in ("key", "mail", "db", "token", "broken"))


def additional(mail: str = MAIL, db: str = DB) -> str:
    return json.dumps([
        ["EMAIL_HOST", "smtp.example.org"],
        ["EMAIL_HOST_PASSWORD", mail],
        ["DATABASES", {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "PASSWORD": db}}],
    ])


def omero_tree(key: str = KEY, extra: str = "", **kwargs: str) -> str:
    return textwrap.dedent(f"""\
        secret_key = "{key}"
        django_additional_settings = '{additional(**kwargs)}'
        """) + extra


# A property OMERO.web refuses, with the secret in it: an app's token whose parser quotes what it refuses,
# and django_additional_settings that is not JSON (OMERO.web's own parser; venv_probe.py quotes it whole).
REFUSED_TOKEN = 'apps = ["secret_app"]\n"secret_app.api_token" = "' + TOKEN + '"\n'
REFUSED_JSON = "django_additional_settings = '[[\"EMAIL_HOST_PASSWORD\", \"" + BROKEN + "\"]'\n"


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    """An OMERO.web app with a property whose parser refuses a value and says which (as many do)."""
    root = tmp_path / "apps"
    (root / "secret_app").mkdir(parents=True)
    (root / "secret_app" / "__init__.py").write_text("")
    (root / "secret_app" / "settings.py").write_text(textwrap.dedent("""\
        def parse_token(value):
            if not value.startswith("tok-"):
                raise ValueError("%r is not a token: it must start with tok-" % value)
            return value

        CUSTOM_SETTINGS_MAPPINGS = {
            "omero.web.secret_app.api_token": ["SECRET_APP_TOKEN", "tok-none", parse_token, "the app's token"],
        }
        """))
    return root


def write_toml(tmp_path: Path, venv: Path, omero: str, daemon: str = "") -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{tmp_path / 'omerodir'}"
        venv = "{venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{tmp_path / 'state'}"
        {daemon}

        [nginx]
        enabled = false

        [omero.web]
        wsgi_workers = 2
        """) + omero)
    path.chmod(0o640)
    return path


def ctl(config: Path, *args: str, apps: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if apps is not None:
        env["PYTHONPATH"] = str(apps)
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), *args], input=stdin,
                          capture_output=True, text=True, timeout=180, env=env)


def no_canary(*texts: str) -> None:
    for text in texts:
        assert CANARY not in text, text


@pytest.fixture(autouse=True)
def _forget() -> None:
    redact.forget_all()  # what an in-process run learnt stays out of the next test
    yield
    redact.forget_all()


# -- the command line, no daemon ------------------------------------------------------------------


def test_config_get_and_export_hide_secrets_unless_asked(tmp_path, omero_venv):
    toml = write_toml(tmp_path, omero_venv, omero_tree())
    every = ctl(toml, "config", "get")
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert "omero.web.secret_key=********" in lines
    shown = next(line for line in lines if line.startswith("omero.web.django_additional_settings="))
    pairs = dict(json.loads(shown.split("=", 1)[1]))
    assert pairs["EMAIL_HOST"] == "smtp.example.org" and pairs["EMAIL_HOST_PASSWORD"] == "********"
    assert pairs["DATABASES"]["default"]["PASSWORD"] == "********" and pairs["DATABASES"]["default"]["NAME"] == ":memory:"
    one = ctl(toml, "config", "get", "omero.web.secret_key")
    group = ctl(toml, "config", "get", "omero.web", "--json")
    exported = ctl(toml, "config", "export")
    to_file = ctl(toml, "config", "export", "-o", str(tmp_path / "backup.txt"))
    assert one.stdout == "********\n" and json.loads(group.stdout)["omero.web.secret_key"] == "********"
    assert "# omero.web.django_additional_settings=" in exported.stdout and "smtp.example.org" in exported.stdout
    no_canary(every.stdout, every.stderr, one.stdout, group.stdout, exported.stdout, exported.stderr,
              to_file.stdout, to_file.stderr, (tmp_path / "backup.txt").read_text())
    # Asked for, they are there: what a backup needs.
    assert ctl(toml, "config", "get", "omero.web.secret_key", "--show-password").stdout == f"{KEY}\n"
    full = ctl(toml, "config", "export", "--show-password").stdout.splitlines()
    assert f"omero.web.secret_key={KEY}" in full
    assert f"omero.web.django_additional_settings={additional()}" in full


def test_check_and_diagnostics_never_print_a_secret(tmp_path, omero_venv):
    wsgi_args = f'wsgi_args = "--env SECRET_KEY={KEY} --env DJANGO_DB_PASSWORD={DB}"\n'
    toml = write_toml(tmp_path, omero_venv, omero_tree(extra=wsgi_args))
    check = ctl(toml, "check")
    assert check.returncode == 0, check.stdout
    as_json = ctl(toml, "diagnostics", "--json")
    text = ctl(toml, "diagnostics")
    assert as_json.returncode == 0, as_json.stdout
    report = json.loads(as_json.stdout)
    command = shlex.split(report["gunicorn"]["command"])
    assert command[command.index("--env") + 1] == "SECRET_KEY=********"  # the admin still sees it is set
    assert "gunicorn (a new generation):" in text.stdout
    no_canary(check.stdout, check.stderr, as_json.stdout, as_json.stderr, text.stdout, text.stderr)


@pytest.mark.parametrize("refused, name", [(REFUSED_TOKEN, "omero.web.secret_app.api_token"),
                                           (REFUSED_JSON, "omero.web.django_additional_settings")])
def test_a_refused_secret_is_named_never_quoted(tmp_path, omero_venv, apps, refused, name):
    tree = omero_tree() if refused is REFUSED_TOKEN else f'secret_key = "{KEY}"\n'
    toml = write_toml(tmp_path, omero_venv, tree + refused)
    check = ctl(toml, "check", apps=apps)
    assert check.returncode == 1 and f"{name}: " in check.stdout, check.stdout
    diagnostics = ctl(toml, "diagnostics", apps=apps)
    assert diagnostics.returncode == 1 and name in diagnostics.stdout
    no_canary(check.stdout, check.stderr, diagnostics.stdout, diagnostics.stderr)
    # The problem is still said: the parser's own words, with the value hidden.
    if refused is REFUSED_TOKEN:
        assert "'********' is not a token: it must start with tok-" in check.stdout


def test_an_edit_refused_for_a_secret_does_not_quote_it(tmp_path, omero_venv, apps):
    toml = write_toml(tmp_path, omero_venv, omero_tree(extra='apps = ["secret_app"]\n'))
    before = toml.read_bytes()
    token = ctl(toml, "config", "set", "omero.web.secret_app.api_token", "--stdin", apps=apps, stdin=TOKEN + "\n")
    assert token.returncode == 1 and "is not a token" in token.stderr and "unchanged" in token.stderr
    broken = ctl(toml, "config", "set", "omero.web.django_additional_settings", "--stdin", apps=apps,
                 stdin='[["EMAIL_HOST_PASSWORD", "' + BROKEN + '"]\n')
    assert broken.returncode == 1 and "must be JSON" in broken.stderr
    no_canary(token.stdout, token.stderr, broken.stdout, broken.stderr)
    assert toml.read_bytes() == before


def test_in_process_omerowebctl_prints_no_secret(tmp_path, omero_venv, apps, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(apps))
    toml = write_toml(tmp_path, omero_venv, omero_tree(extra=REFUSED_TOKEN.replace(TOKEN, "tok-ok")))
    runs = [
        (["config", "get"], 0), (["config", "get", "--json"], 0), (["config", "export"], 0), (["check"], 0),
        (["diagnostics", "--json"], 0),
        (["config", "set", "omero.web.secret_app.api_token", "--file", str(tmp_path / "token")], 1),
    ]
    (tmp_path / "token").write_text(TOKEN + "\n")
    for argv, code in runs:
        assert ctl_module.main(["--config", str(toml), *argv]) == code, argv
        out = capsys.readouterr()
        no_canary(out.out, out.err)
    assert CANARY in toml.read_text()  # the file itself holds them, 0640 as it was
    assert toml.stat().st_mode & 0o777 == 0o640


def test_config_set_takes_a_secret_from_stdin_or_a_file_and_warns_about_argv(tmp_path, omero_venv):
    toml = write_toml(tmp_path, omero_venv, "prefix = \"/omero\"\n")
    if os.geteuid() == 0:
        os.chown(toml, 0, 65534)  # root:group, as packaged (nogroup stands in for omero-web)
    piped = ctl(toml, "config", "set", "omero.web.secret_key", "--stdin", stdin=KEY + "\n")
    assert piped.returncode == 0, piped.stderr
    assert "omero.web.secret_key: (not set) -> ********" in piped.stdout and "warning" not in piped.stderr
    assert ctl(toml, "config", "get", "omero.web.secret_key", "--show-password").stdout == f"{KEY}\n"
    (tmp_path / "mail.json").write_text(additional(mail=MAIL + "2") + "\n")
    from_file = ctl(toml, "config", "set", "omero.web.django_additional_settings", "--file", str(tmp_path / "mail.json"))
    assert from_file.returncode == 0, from_file.stderr
    no_canary(piped.stdout, piped.stderr, from_file.stdout, from_file.stderr)
    assert "EMAIL_HOST_PASSWORD" in from_file.stdout  # the report still says what was set
    stat = toml.stat()
    assert stat.st_mode & 0o777 == 0o640 and (os.geteuid() != 0 or (stat.st_uid, stat.st_gid) == (0, 65534))
    # On the command line it works, with a warning that says what to use instead.
    argv = ctl(toml, "config", "set", "omero.web.secret_key", KEY + "2")
    assert argv.returncode == 0 and "use --stdin" in argv.stderr and len(argv.stderr.splitlines()) == 1
    appended = ctl(toml, "config", "append", "omero.web.django_additional_settings", '["AWS_SECRET_ACCESS_KEY", "x1234"]')
    assert appended.returncode == 0 and "use --stdin" in appended.stderr
    no_canary(argv.stdout, argv.stderr)
    plain = ctl(toml, "config", "set", "omero.web.prefix", "/web")
    assert plain.returncode == 0 and "warning" not in plain.stderr
    both = ctl(toml, "config", "set", "omero.web.secret_key", "x", "--stdin", stdin="y\n")
    assert both.returncode == 2 and "give VALUE, --stdin or --file" in both.stderr


# -- the daemon ------------------------------------------------------------------------------------


def _reload(daemon) -> subprocess.CompletedProcess[str]:
    return daemon.ctl("reload")


def test_status_reloads_log_and_notify_never_carry_a_secret(daemon, apps):
    daemon.extra_env["PYTHONPATH"] = str(apps)
    json_log = 'watch_config = false\nlog_format = "json"'
    daemon.write_config(daemon=json_log, omero=omero_tree())
    daemon.start()
    outputs = [daemon.ctl("status").stdout, daemon.ctl("status", "--json").stdout,
               daemon.ctl("diagnostics", "--json").stdout]

    # An accepted reload that changes every secret: named in the result, never shown.
    daemon.write_config(daemon=json_log, omero=omero_tree(key=KEY + "2", mail=MAIL + "2", db=DB + "2"))
    applied = _reload(daemon)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    last = daemon.status()["last_reload"]
    assert {"omero.web.secret_key", "omero.web.django_additional_settings"} <= set(last["changes"])
    outputs += [applied.stdout, applied.stderr, daemon.ctl("status").stdout]

    # Rejected reloads whose refusal would quote the secret.
    serving = daemon.status()["generation"]["master_pid"]
    for refused in (REFUSED_TOKEN, REFUSED_JSON):
        tree = omero_tree(key=KEY + "3") if refused is REFUSED_TOKEN else f'secret_key = "{KEY}3"\n'
        daemon.write_config(daemon=json_log, omero=tree + refused)
        rejected = _reload(daemon)
        assert rejected.returncode == 1 and "rejected" in rejected.stdout + rejected.stderr, rejected.stdout
        status = daemon.status()
        assert status["generation"]["master_pid"] == serving and status["last_reload"]["outcome"] == "rejected"
        assert "api_token" in status["last_reload"]["message"] or "django_additional_settings" in status["last_reload"]["message"]
        outputs += [rejected.stdout, rejected.stderr, json.dumps(status), daemon.ctl("status").stdout,
                    daemon.ctl("diagnostics", "--json").stdout]
    no_canary(*outputs)

    assert daemon.stop() == 0
    log = daemon.log()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "reload" and e.get("outcome") == "rejected" for e in events), log
    assert any(e.get("event") == "reload" and e.get("outcome") == "applied" for e in events), log
    no_canary(log)
    statuses = [fields.get("STATUS", "") for _, fields in daemon.notify.messages]
    assert any("last reload: rejected" in s for s in statuses)
    no_canary(*statuses)


def test_a_daemon_that_cannot_start_names_the_property_not_its_value(daemon, apps):
    daemon.extra_env["PYTHONPATH"] = str(apps)
    daemon.write_config(daemon='log_format = "json"', omero=omero_tree() + REFUSED_TOKEN)
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(120) == 78
    log = daemon.log()
    assert "omero.web.secret_app.api_token" in log, log
    failed = wait_for(lambda: next((f["STATUS"] for _, f in daemon.notify.messages
                                    if f.get("STATUS", "").startswith("failed")), None), 10, "STATUS=failed")
    assert "api_token" in failed
    no_canary(log, *(f.get("STATUS", "") for _, f in daemon.notify.messages))
