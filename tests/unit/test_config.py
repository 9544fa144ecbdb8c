"""config.py: TOML -> typed settings and dotted OMERO properties."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from omerowebd.config import Config, DaemonSettings, config_path, parse
from omerowebd.errors import ConfigError, ConfigErrors

HEAD = """\
[daemon]
omerodir = "/opt/omero/web/omero-web"
venv = "/opt/omero/web/venv3"
"""


def load(text: str) -> Config:
    return parse(textwrap.dedent(text).encode(), Path("/etc/omerowebd/omerowebd.toml"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(text)
    return e.value.problems if isinstance(e.value, ConfigErrors) else [str(e.value)]


def test_defaults():
    c = load(HEAD)
    assert c.daemon == DaemonSettings(omerodir=Path("/opt/omero/web/omero-web"), venv=Path("/opt/omero/web/venv3"))
    assert c.daemon.runtime_dir == Path("/run/omerowebd") and c.daemon.bind is None
    assert c.properties == {}
    assert len(c.digest) == 64


def test_settings_are_frozen():
    c = load(HEAD)
    with pytest.raises(AttributeError):
        c.daemon.venv = Path("/x")  # type: ignore[misc]


def test_tables_and_dotted_keys_flatten_to_property_names():
    c = load(HEAD + """
        [omero.web]
        prefix = "/omero"
        public.enabled = true
        wsgi_workers = 5
        "application_server.host" = "0.0.0.0"
        application_server = "wsgi-tcp"

        [omero.web.ui]
        top_links = [["Data", "webindex"]]

        [omero.mail]
        port = 25
        """)
    assert c.properties == {
        "omero.web.prefix": "/omero",
        "omero.web.public.enabled": "true",
        "omero.web.wsgi_workers": "5",
        "omero.web.application_server.host": "0.0.0.0",
        "omero.web.application_server": "wsgi-tcp",
        "omero.web.ui.top_links": '[["Data", "webindex"]]',
        "omero.mail.port": "25",
    }


def test_inline_tables_and_arrays_are_json_values():
    c = load(HEAD + """
        [omero.web]
        login_redirect = {redirect = ["webindex"], viewname = "load_template"}
        apps = ["omero_iviewer", "omero_figure"]
        ui.metadata_panes = [{name = "tag", label = "Tags", index = 1}]
        falsey = false
        ratio = 0.5
        """)
    p = c.properties
    assert p["omero.web.login_redirect"] == '{"redirect": ["webindex"], "viewname": "load_template"}'
    assert p["omero.web.apps"] == '["omero_iviewer", "omero_figure"]'
    assert p["omero.web.ui.metadata_panes"] == '[{"name": "tag", "label": "Tags", "index": 1}]'
    assert p["omero.web.falsey"] == "false" and p["omero.web.ratio"] == "0.5"


def test_a_name_set_twice_is_an_error():
    found = problems(HEAD + """
        [omero.web]
        "public.enabled" = true
        [omero.web.public]
        enabled = false
        """)
    assert len(found) == 1 and "omero.web.public.enabled is set twice" in found[0]
    assert found[0].startswith("/etc/omerowebd/omerowebd.toml:8:")


def test_unknown_key_in_a_daemon_table_has_a_suggestion_and_a_line():
    found = problems(HEAD + "grace_timeout = 3\n")
    assert found == ["/etc/omerowebd/omerowebd.toml:4: unknown key daemon.grace_timeout (did you mean 'graceful_timeout'?)"]


def test_unknown_table():
    assert "unknown table [deamon] (did you mean 'daemon'?)" in problems(HEAD + "[deamon]\n")[0]


@pytest.mark.parametrize("line, message", [
    ('ready_timeout = "1m"', "daemon.ready_timeout must be a number of seconds, not a string"),
    ("ready_timeout = 0", "daemon.ready_timeout must be more than 0"),
    ('bind = "127.0.0.1:80"', "daemon.bind must be a list of strings, not a string"),
    ('bind = ["localhost"]', "use HOST:PORT"),
    ("bind = []", "must name at least one address"),
    ('runtime_dir = "run"', "must be an absolute path"),
    ('log_format = "xml"', "must be one of 'auto', 'console', 'json', 'journal'"),
    ("watch_config = 1", "must be true or false"),
    ('health_path = "login"', "must start with '/'"),
])
def test_bad_daemon_values(line, message):
    found = problems(HEAD + line + "\n")
    assert len(found) == 1 and message in found[0] and found[0].startswith("/etc/omerowebd/omerowebd.toml:4:")


def test_good_bind_addresses():
    c = load(HEAD + 'bind = ["127.0.0.1:4080", "[::1]:4080", "unix:/run/omerowebd/web.sock"]\n')
    assert c.daemon.bind == ("127.0.0.1:4080", "[::1]:4080", "unix:/run/omerowebd/web.sock")


def test_missing_required_keys():
    found = problems("[daemon]\n")
    assert any("missing required key daemon.omerodir" in p for p in found)
    assert any("missing required key daemon.venv" in p for p in found)


def test_syntax_error_has_line_and_column():
    found = problems(HEAD + "[omero.web]\nprefix = /omero\n")
    assert found[0].startswith("/etc/omerowebd/omerowebd.toml:5:10: TOML syntax error")


def test_sessions_schedule_is_checked():
    assert "sessions.schedule" in problems(HEAD + '[sessions]\nschedule = "sometimes"\n')[0]


def test_config_path_precedence(monkeypatch):
    monkeypatch.delenv("OMEROWEBD_CONFIG", raising=False)
    assert config_path(None) == Path("/etc/omerowebd/omerowebd.toml")
    monkeypatch.setenv("OMEROWEBD_CONFIG", "/srv/o.toml")
    assert config_path(None) == Path("/srv/o.toml")
    assert config_path("/x.toml") == Path("/x.toml")
