"""One rule for secrets (redact.py): what is a secret, how it is hidden, and that it stays hidden in logs."""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

import pytest
import structlog

from omerowebd import config as config_module
from omerowebd import edit, log, migrate, redact
from omerowebd.redact import ADDITIONAL_SETTINGS, HIDDEN

CANARY = "S3cr3t-canary-7f3a"

MAIL_AND_DB = json.dumps([
    ["EMAIL_HOST", "smtp.example.org"],
    ["EMAIL_HOST_PASSWORD", CANARY + "-mail"],
    ["DATABASES", {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "omero", "USER": "omero",
                               "PASSWORD": CANARY + "-db"}}],
    ["CACHES", {"default": {"BACKEND": "django_redis.cache.RedisCache",
                            "LOCATION": f"redis://:{CANARY}-redis@127.0.0.1:6379/0", "KEY_PREFIX": "omero"}}],
    ["SESSION_FILE_PATH", "/var/lib/omerowebd/sessions"],
])


@pytest.fixture(autouse=True)
def _forget() -> None:
    redact.forget_all()
    yield
    redact.forget_all()


# -- what a secret is -------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "omero.web.secret_key", "omero.mail.password", "omero.web.public.password", "omero.db.pass",
    "omero.web.api_token", "omero.web.public.cache.key", "EMAIL_HOST_PASSWORD", "SECRET_KEY", "PASSWORD",
    "AWS_SECRET_ACCESS_KEY", "apiKey", "APIKey", "api_key", "db_passwd", "mail_pwd", "SENTRY_DSN",
    "OAUTH_CREDENTIALS", "omero.web.sso.client_secret", "refresh_token", "KEY", "LDAP_BIND_PW", "omero.ldap.bind_pw",
    "smtpPw",
])
def test_secret_names(name: str):
    assert redact.is_secret(name)


@pytest.mark.parametrize("name", [
    "omero.web.prefix", "omero.web.public.user", "omero.web.wsgi_workers", "KEY_PREFIX", "KEY_FUNCTION",
    "omero.web.ui.keyboard", "EMAIL_HOST", "EMAIL_HOST_USER", "AWS_ACCESS_KEY_ID", "SESSION_FILE_PATH",
    "omero.web.login_incorrect_credentials_text", "omero.web.django_additional_settings", "",
])
def test_names_that_are_not_secrets(name: str):
    assert not redact.is_secret(name)


def test_edit_and_migrate_use_the_same_rule():
    assert edit.is_secret is redact.is_secret and migrate.is_secret is redact.is_secret
    assert edit.HIDDEN == migrate.HIDDEN == HIDDEN == "********"


# -- values as they are shown ------------------------------------------------------------


def test_a_secret_name_hides_the_whole_value_and_an_empty_one_stays_empty():
    assert redact.value("omero.web.secret_key", CANARY) == HIDDEN
    assert redact.value("omero.web.secret_key", "") == ""
    assert redact.value("omero.web.secret_key", None) is None


def test_additional_settings_keep_their_shape_with_the_passwords_hidden():
    shown = redact.value(ADDITIONAL_SETTINGS, MAIL_AND_DB)
    assert CANARY not in shown
    pairs = dict(json.loads(shown))
    assert pairs["EMAIL_HOST"] == "smtp.example.org"  # the admin still reads what is set
    assert pairs["EMAIL_HOST_PASSWORD"] == HIDDEN
    assert pairs["DATABASES"]["default"] == {"ENGINE": "django.db.backends.postgresql", "NAME": "omero",
                                             "USER": "omero", "PASSWORD": HIDDEN}
    assert pairs["CACHES"]["default"]["LOCATION"] == f"redis://:{HIDDEN}@127.0.0.1:6379/0"
    assert pairs["CACHES"]["default"]["KEY_PREFIX"] == "omero"
    assert pairs["SESSION_FILE_PATH"] == "/var/lib/omerowebd/sessions"


def test_a_value_without_secrets_is_shown_byte_for_byte():
    text = '[ ["SESSION_FILE_PATH",  "/srv/sessions"] ]'  # odd spacing: not re-dumped
    assert redact.value(ADDITIONAL_SETTINGS, text) == text
    assert redact.value("omero.web.apps", '["omero_iviewer"]') == '["omero_iviewer"]'
    assert redact.value("omero.web.prefix", "/omero") == "/omero"
    assert not redact.hides_anything("omero.web.ui.top_links", '[["Figure", "figure_index"]]')


@pytest.mark.parametrize("text", [
    '[["EMAIL_HOST_PASSWORD", "' + CANARY + '"',  # cut short: not JSON
    "EMAIL_HOST_PASSWORD=" + CANARY,               # not JSON at all
    CANARY,
])
def test_additional_settings_that_do_not_parse_are_hidden_whole(text: str):
    assert redact.value(ADDITIONAL_SETTINGS, text) == HIDDEN
    assert redact.for_properties({ADDITIONAL_SETTINGS: text}).scrub(f"not {text!r}") == f"not '{HIDDEN}'"


def test_a_password_in_a_url_is_hidden_in_any_property():
    assert redact.value("omero.web.caches", f"redis://user:{CANARY}@host:6379/1") == f"redis://user:{HIDDEN}@host:6379/1"
    assert redact.value("omero.web.session_cookie_domain", "example.org") == "example.org"
    assert redact.value("omero.web.index_template", "http://example.org:8080/x") == "http://example.org:8080/x"


@pytest.mark.parametrize("url, shown", [
    # A password in the query string (redis-py, django-redis and Celery read it there).
    (f"redis://127.0.0.1:6379/0?password={CANARY}", f"redis://127.0.0.1:6379/0?password={HIDDEN}"),
    (f"redis://h/0?db=1&password={CANARY}&ssl=true", f"redis://h/0?db=1&password={HIDDEN}&ssl=true"),
    (f"https://h/api?access_token={CANARY}#top", f"https://h/api?access_token={HIDDEN}#top"),
    # A key alone before the @ (Sentry's DSN, token URLs).
    ("https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/42", f"https://{HIDDEN}@o1.ingest.sentry.io/42"),
    (f"https://{CANARY}@git.example.org/x.git", f"https://{HIDDEN}@git.example.org/x.git"),
    # A password with an @ in it, as people write it: hidden whole, up to the host.
    (f"redis://:{CANARY}@x@127.0.0.1:6379/0", f"redis://:{HIDDEN}@127.0.0.1:6379/0"),
    (f"postgres://omero:p@ss@{CANARY}@db.example.org/omero", f"postgres://omero:{HIDDEN}@db.example.org/omero"),
    (f"redis://user@example.org:{CANARY}@h", f"redis://user@example.org:{HIDDEN}@h"),
])
def test_every_secret_of_a_url_is_hidden(url: str, shown: str):
    assert redact.value("omero.web.caches", url) == shown
    secret = url.replace(shown.split(HIDDEN)[0], "", 1).replace(shown.split(HIDDEN)[1], "")
    assert redact.secret_values({"omero.web.caches": url}) == {secret}
    # Also inside JSON, in free text and on a command line.
    text = json.dumps([["CACHES", {"default": {"LOCATION": url}}]])
    assert json.loads(redact.value(ADDITIONAL_SETTINGS, text))[0][1]["default"]["LOCATION"] == shown
    assert redact.for_properties({ADDITIONAL_SETTINGS: text}).scrub(f"cannot reach {url}") == f"cannot reach {shown}"
    assert redact.structure({"event": f"cannot reach {url}"}) == {"event": f"cannot reach {shown}"}
    assert secret not in " ".join(redact.argv(["celery", "--broker", url]))


@pytest.mark.parametrize("url", [
    "https://example.org/?q=1&page=2",  # query parameters that are no secrets
    "postgres://omero@localhost/omero",  # a user name alone: no secret, and "omero" must not be blanked out
    "http://example.org:8080/user@home",  # an @ in the path, after the authority
    "redis://127.0.0.1:6379/1",
    "mailto:admin@example.org",
])
def test_urls_without_secrets_are_shown_as_they_are(url: str):
    assert redact.value("omero.web.caches", url) == url
    assert redact.secret_values({"omero.web.caches": url}) == set()


def test_nested_secrets_under_any_json_property():
    text = json.dumps({"default": {"OPTIONS": {"password": CANARY, "db": 1}}})
    assert CANARY not in redact.value("omero.web.caches", text)
    assert json.loads(redact.value("omero.web.caches", text))["default"]["OPTIONS"] == {"password": HIDDEN, "db": 1}
    # A whole table under a secret name: every string in it is a secret.
    assert redact.secret_values({"omero.web.x": json.dumps({"PASSWORDS": {"a": CANARY}})}) >= {CANARY}


def test_shown_hides_unless_asked():
    assert edit.shown(ADDITIONAL_SETTINGS, MAIL_AND_DB, False) == redact.value(ADDITIONAL_SETTINGS, MAIL_AND_DB)
    assert edit.shown(ADDITIONAL_SETTINGS, MAIL_AND_DB, True) == MAIL_AND_DB
    assert edit.shown("omero.web.secret_key", None, False) == "(not set)"


# -- free text ---------------------------------------------------------------------------


def _random_secrets(n: int) -> list[str]:
    rng = random.Random(1234)
    alphabet = string.ascii_letters + string.digits + "\"'\\<>&%$#@!-_=+;:,./ ?" + "éü€☃"
    return [CANARY + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(n)]


@pytest.mark.parametrize("secret", _random_secrets(200), ids=range(200))
def test_a_secret_is_scrubbed_however_a_message_quotes_it(secret: str):
    props = {"omero.web.secret_key": secret,
             ADDITIONAL_SETTINGS: json.dumps([["EMAIL_HOST_PASSWORD", secret]])}
    secrets = redact.for_properties(props)
    whole = props[ADDITIONAL_SETTINGS]
    quoted = [
        secret, repr(secret), json.dumps(secret), json.dumps(secret, ensure_ascii=False),
        f"must be JSON (list), not {whole!r}: Expecting value",  # venv_probe.py's words
        json.dumps({"message": f"refused {secret!r}"}),  # a JSON log line of such a message
        secret.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"),
    ]
    for text in quoted:
        assert secret not in secrets.scrub(text), text
        assert CANARY not in secrets.scrub(text), text


def test_short_values_are_not_searched_for_in_free_text():
    secrets = redact.for_properties({"omero.web.secret_key": "on"})
    assert secrets.scrub("the daemon is on") == "the daemon is on"
    assert redact.value("omero.web.secret_key", "on") == HIDDEN  # by name it is still hidden


def test_a_config_read_is_remembered_for_the_last_line_of_defence(tmp_path: Path):
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "/o"\nvenv = "/v"\n\n[omero.web]\nsecret_key = "{CANARY}"\n'
                    f"django_additional_settings = '{MAIL_AND_DB}'\n")
    assert redact.scrub_known(f"boom {CANARY}") == f"boom {CANARY}"
    config_module.load(toml)
    for leak in (CANARY, CANARY + "-db", CANARY + "-mail", CANARY + "-redis"):
        assert CANARY not in redact.scrub_known(f"gunicorn said {leak!r} and {leak}")


def test_a_broken_config_is_remembered_too(tmp_path: Path):
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "relative"\nvenv = "/v"\n\n[omero.web]\nsecret_key = "{CANARY}"\n')
    with pytest.raises(config_module.ConfigError):
        config_module.load(toml)
    assert CANARY not in redact.scrub_known(CANARY)


def test_structure_hides_under_secret_names_and_property_names():
    redact.remember({"omero.web.secret_key": CANARY})
    event = {"event": f"refused {CANARY}", "password": "hunter2-xyz", "properties": {
        "omero.web.prefix": "/omero", ADDITIONAL_SETTINGS: MAIL_AND_DB, "omero.web.secret_key": "anything"},
        "list": [CANARY, 3, None], "n": 5}
    out = redact.structure(event)
    text = json.dumps(out)
    assert CANARY not in text and "hunter2" not in text and "anything" not in text
    assert out["properties"]["omero.web.prefix"] == "/omero" and out["n"] == 5 and out["list"][1:] == [3, None]


def test_argv_hides_secret_options_and_assignments():
    words = ["python", "-m", "gunicorn", "--env", f"SECRET_KEY={CANARY}", f"--password={CANARY}", "--token", CANARY,
             "--keyfile", "/etc/ssl/key.pem", "-e", "PATH=/usr/bin", "omeroweb.wsgi:application"]
    out = redact.argv(words)
    assert CANARY not in " ".join(out)
    assert out[4] == f"SECRET_KEY={HIDDEN}" and out[5] == f"--password={HIDDEN}" and out[7] == HIDDEN
    assert out[8:12] == ["--keyfile", "/etc/ssl/key.pem", "-e", "PATH=/usr/bin"]


# -- logs --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_log_line_carries_a_secret(fmt: str, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    redact.remember({"omero.web.secret_key": CANARY, ADDITIONAL_SETTINGS: MAIL_AND_DB})
    try:
        log.configure(fmt)
        logger = log.get()
        logger.error("reload", message=f"rejected: must be an integer, not {CANARY!r}", changes=["omero.web.secret_key"])
        logger.info("a careless caller", secret_key=CANARY, properties={ADDITIONAL_SETTINGS: MAIL_AND_DB})
        logger.warning(f"an event text that quotes {CANARY}-db")
        try:
            raise ValueError(f"bad {CANARY}-mail")
        except ValueError:
            logger.exception("failed")
    finally:
        structlog.reset_defaults()
    out = stream.getvalue()
    assert out.count("\n") >= 4 and "omero.web.secret_key" in out and "rejected: must be an integer" in out
    assert CANARY not in out


# -- export ------------------------------------------------------------------------------


def test_export_leaves_out_additional_settings_with_passwords_but_shows_what_is_set():
    props = {ADDITIONAL_SETTINGS: MAIL_AND_DB, "omero.web.prefix": "/omero", "omero.web.secret_key": CANARY}
    text, warnings = migrate.export_text(props, show_secrets=False, source="x")
    assert CANARY not in text
    assert f"# {ADDITIONAL_SETTINGS}=" in text and "smtp.example.org" in text
    assert "omero.web.prefix=/omero" in text.splitlines()
    assert {w.split()[0] for w in warnings} == {ADDITIONAL_SETTINGS, "omero.web.secret_key"}
    full, _ = migrate.export_text(props, show_secrets=True, source="x")
    assert f"{ADDITIONAL_SETTINGS}={MAIL_AND_DB}" in full.splitlines()
    assert f"omero.web.secret_key={CANARY}" in full.splitlines()


# -- errors about the file itself ----------------------------------------------------------


@pytest.mark.parametrize("omero", [
    f'secret_key = "{CANARY}" trailing\n',                      # junk after the value
    f'secret_key = {CANARY}\n',                                 # not quoted
    f'secret_key = "{CANARY}\n',                                # not closed
    f'secret_key = "{CANARY}\x01"\n',                           # a control character
    f'secret_key = "{CANARY}"\nsecret_key = "{CANARY}2"\n',     # set twice
    f'"secret_key" = "{CANARY}"\n[omero.web.secret_key]\nx = 1\n',  # a value and a table
    f"django_additional_settings = '[[\"EMAIL_HOST_PASSWORD\", \"{CANARY}\"]'\nprefix = 7.5e999\n",
])
def test_a_broken_file_is_reported_without_its_secrets(tmp_path: Path, omero: str):
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(f'[daemon]\nomerodir = "/o"\nvenv = "/v"\n\n[omero.web]\n{omero}')
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(toml)
    problems = getattr(caught.value, "problems", None) or [str(caught.value)]
    assert str(toml) in problems[0]
    for problem in [str(caught.value), *problems]:
        assert CANARY not in problem  # as `omerowebctl check` prints it
