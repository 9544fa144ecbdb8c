"""config.py: TOML -> typed settings and dotted OMERO properties."""

from __future__ import annotations

import dataclasses
import textwrap
import xml.parsers.expat
from pathlib import Path

import pytest

from omerowebd.config import Config, DaemonSettings, config_path, parse
from omerowebd.errors import ConfigError, ConfigErrors
from omerowebd.generation import PlanError, plan_gunicorn
from omerowebd.omero_config import read_config_xml, render_config_xml
from omerowebd.venv import VenvInfo

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
    ('runtime_dir = "/run/x\\u0000"', "without a NUL character"),
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


# -- what gunicorn, nginx or OMERO.web would refuse later (issue 10) ------------


def test_a_key_set_twice_is_one_line_with_its_line():
    found = problems(HEAD + 'venv = "/opt/other"\n')
    assert found == ["/etc/omerowebd/omerowebd.toml:4: venv is set twice: keep one (TOML allows each key and table once)"]


def test_a_table_declared_twice_is_one_line_with_its_line():
    found = problems(HEAD + "[omero.web]\nprefix = '/a'\n[omero.web]\ndebug = true\n")
    assert len(found) == 1 and found[0].startswith("/etc/omerowebd/omerowebd.toml:6:")
    assert "table [omero.web] is declared twice" in found[0]


@pytest.mark.parametrize("text", [
    "x = {a = 1, a = 2}\n",  # tomlkit raises these without a position
    "[a]\nb = 1\n[a.b]\nc = 1\n",
    "a = " + "[" * 5000 + "\n",  # deeper than the parser's recursion
    'a = """\n',
    "a = 1\n\x00\n",
])
def test_malformed_toml_is_one_line_never_a_traceback(text):
    found = problems(HEAD + text)
    assert len(found) == 1 and found[0].startswith("/etc/omerowebd/omerowebd.toml")
    assert "\n" not in found[0]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:0", "the port must be a number from 1 to 65535, not '0'"),
    ("127.0.0.1:65536", "not '65536'"),
    ("127.0.0.1:99999", "not '99999'"),
    ("127.0.0.1:80\\n", "not '80\\n'"),
    ("[::g]:80", "is not an IPv6 address"),
    ("::1:80", "use HOST:PORT, [IPV6]:PORT"),
    ("exa mple:80", "is not a host name"),
    ("unix:run/web.sock", "must be absolute"),
    ("unix:/run/" + "s" * 120, "at most 107 bytes"),
])
def test_bad_bind_addresses(address, message):
    found = problems(HEAD + f'bind = ["{address}"]\n')
    assert len(found) == 1 and message in found[0] and "daemon.bind" in found[0], found


@pytest.mark.parametrize("listen", ["80", "8080 default_server", "127.0.0.1:8080", "[::]:443 ssl http2", "*:80",
                                    "[::1]", "localhost", "unix:/run/nginx-omero.sock", "443 ssl backlog=512"])
def test_good_nginx_listen(listen):
    assert load(HEAD + f'[nginx]\nlisten = "{listen}"\n').nginx.listen == listen


def test_nginx_listen_takes_an_integer_port():
    assert load(HEAD + "[nginx]\nlisten = 8080\n").nginx.listen == "8080"
    assert "must be a string" in problems(HEAD + "[nginx]\nlisten = true\n")[0]


@pytest.mark.parametrize("listen, message", [
    ("0", "from 1 to 65535, not '0'"),
    ("70000", "not '70000'"),
    ("-1", "is not a host name"),
    ("8080 sssl", "'sssl' is not a parameter of nginx's listen"),
    ("8080 backlog=", "'backlog=' is not a parameter"),
    ("127.0.0.1:http", "not 'http'"),
    ("[::1:80", "is not an IPv6 address"),
    ("8080\\n", "line break"),
    ("8080;", "ends an nginx directive"),
])
def test_bad_nginx_listen(listen, message):
    found = problems(HEAD + f'[nginx]\nlisten = "{listen}"\n')
    assert len(found) == 1 and message in found[0] and "nginx.listen" in found[0], found


def test_integer_listen_out_of_range():
    found = problems(HEAD + "[nginx]\nlisten = 70000\n")
    assert len(found) == 1 and "nginx.listen" in found[0] and "65535" in found[0]


@pytest.mark.parametrize("line, key", [
    ('max_body_size = "1m\\n"', "nginx.max_body_size"),
    ('server_file = "omero.conf\\n"', "nginx.server_file"),
    ('location_file = "x.include\\n"', "nginx.location_file"),
    ('upstreams = ["127.0.0.1:4080\\n"]', "nginx.upstreams"),
    ('upstreams = ["127.0.0.1:123456"]', "nginx.upstreams"),
])
def test_a_final_newline_or_a_bad_port_is_refused_in_nginx_values(line, key):
    found = problems(HEAD + "[nginx]\n" + line + "\n")
    assert len(found) == 1 and key in found[0], found


@pytest.mark.parametrize("schedule", ["999999999999d", "367d", "1" + "0" * 400 + "s", "6\u0663h"])
def test_schedules_that_overflow_or_are_not_ascii_are_refused(schedule):
    found = problems(HEAD + f'[sessions]\nschedule = "{schedule}"\n')
    assert len(found) == 1 and "sessions.schedule" in found[0]


def test_the_longest_schedule_is_a_leap_year():
    assert load(HEAD + '[sessions]\nschedule = "366d"\n').sessions.schedule == "366d"


@pytest.mark.parametrize("value", ["\\u0001", "a\\u001fb", "\\u000b", "\\uffff", "\\u0000"])
def test_values_config_xml_cannot_hold_are_refused(value):
    found = problems(HEAD + f'[omero.web]\nlogin_logo = "{value}"\n')
    assert len(found) == 1 and "omero.web.login_logo" in found[0] and "config.xml cannot hold" in found[0]
    assert found[0].startswith("/etc/omerowebd/omerowebd.toml:5:")


@pytest.mark.parametrize("key", ['"a\\u0002b"', '"a b"', '"a\\nb"', '"a..b"', '""', '"x="'])
def test_names_omero_config_would_not_take_are_refused(key):
    found = problems(HEAD + f'[omero.web]\n{key} = "x"\n')
    assert len(found) == 1 and "is not an OMERO property name" in found[0] and len(found[0].splitlines()) == 1


def test_tab_newline_and_carriage_return_are_fine_in_values():
    c = load(HEAD + '[omero.web]\nlogin_logo = "a\\tb\\nc\\rd"\n')
    assert c.properties["omero.web.login_logo"] == "a\tb\nc\rd"


def test_config_xml_comment_survives_dashes_and_control_characters_in_the_source_path(tmp_path):
    source = "/etc/omero--web/a---b-\x01.toml"
    props = {"omero.web.prefix": "/omero", "omero.web.x": "tab\tline\ncr\r<&>\"'"}
    data = render_config_xml(props, source)
    xml.parsers.expat.ParserCreate().Parse(data, True)  # raises ExpatError on an invalid document
    assert b"--web" not in data and b"omero-%2Dweb/a-%2D%2Db-\\x01.toml" in data
    (tmp_path / "config.xml").write_bytes(data)
    assert read_config_xml(tmp_path / "config.xml") == props


def test_render_refuses_what_config_xml_cannot_hold():
    with pytest.raises(ConfigError, match="cannot hold"):
        render_config_xml({"omero.web.x": "a\x07b"})


# -- the gunicorn plan: the one derivation check, start and reload share ----------

INFO = VenvInfo(venv=Path("/opt/omero/web/venv3"), versions={"gunicorn": "23.0.0"}, omeroweb_dir=Path("/o"),
                catalogue={"omero.web.wsgi_workers": {"default": 5}})


def plan(properties: dict[str, str], info: VenvInfo = INFO):
    return plan_gunicorn(properties, info, omerodir=Path("/srv/omero"), app="omeroweb.wsgi:application",
                         graceful_timeout=30, health_path=None, where=lambda name: f"/f.toml:{len(name)}")


def plan_problems(properties: dict[str, str], info: VenvInfo = INFO) -> list[str]:
    with pytest.raises(PlanError) as e:
        plan(properties, info)
    return e.value.problems


def test_plan_defaults_are_omero_web_starts():
    p = plan({})
    assert p.settings == {"workers": 5, "worker_class": "sync", "timeout": 60, "max_requests": 0,
                          "graceful_timeout": 30, "threads": 1}
    assert p.args == ()


@pytest.mark.parametrize("name, value, message", [
    ("omero.web.wsgi_workers", "0", "must be at least 1, not 0"),
    ("omero.web.wsgi_workers", "-4", "must be at least 1, not -4"),
    ("omero.web.wsgi_workers", "many", "must be an integer, not 'many'"),
    ("omero.web.wsgi_threads", "0", "must be at least 1"),
    ("omero.web.wsgi_timeout", "-1", "must be at least 0 (0: no timeout)"),
    ("omero.web.application_server.max_requests", "-1", "must be at least 0 (0: never recycle)"),
    ("omero.web.wsgi_worker_class", "eventlet", "must be one of 'sync', 'gevent'"),
    ("omero.web.wsgi_worker_class", "gthread", "must be one of 'sync', 'gevent'"),
    ("omero.web.wsgi_worker_class", "gevent", "which is not installed: run /opt/omero/web/venv3/bin/pip install gevent"),
    ("omero.web.wsgi_args", "--access-logformat '%(h)s", "cannot be split into arguments as a shell would: no closing quotation"),
    ("omero.web.wsgi_args", "--workers 3", "sets --workers, which omerowebd sets itself: remove it (set omero.web.wsgi_workers instead)"),
    ("omero.web.wsgi_args", "--work=3", "'--work=3' (--workers)"),
    ("omero.web.wsgi_args", "-w 3", "(--workers)"),
    ("omero.web.wsgi_args", "-D", "(--daemon)"),
    ("omero.web.wsgi_args", "--bind 0.0.0.0:80", "set daemon.bind instead"),
    ("omero.web.wsgi_args", "-c /tmp/evil.py", "(--config)"),
])
def test_plan_refuses_what_gunicorn_or_omero_web_would(name, value, message):
    found = plan_problems({name: value})
    assert found == [f"/f.toml:{len(name)}: {name} {found[0].split(name + ' ', 1)[1]}"] and message in found[0], found


def test_plan_lists_every_problem():
    found = plan_problems({"omero.web.wsgi_workers": "0", "omero.web.wsgi_threads": "-1", "omero.web.wsgi_args": "'"})
    assert len(found) == 3


def test_gevent_takes_worker_connections_when_installed():
    info = dataclasses.replace(INFO, versions={"gevent": "24.2.1"})
    p = plan({"omero.web.wsgi_worker_class": "gevent", "omero.web.wsgi_worker_connections": "50"}, info)
    assert p.settings["worker_connections"] == 50 and "threads" not in p.settings
    found = plan_problems({"omero.web.wsgi_worker_class": "gevent", "omero.web.wsgi_worker_connections": "0"}, info)
    assert len(found) == 1 and "wsgi_worker_connections must be at least 1" in found[0]


def test_harmless_wsgi_args_pass_through():
    p = plan({"omero.web.wsgi_args": "--log-level debug --access-logfile - --max-requests-jitter 10 --worker-tmp-dir /dev/shm"})
    assert p.args == ("--log-level", "debug", "--access-logfile", "-", "--max-requests-jitter", "10",
                      "--worker-tmp-dir", "/dev/shm")


@pytest.mark.parametrize("line, name, message", [
    ('"application_server.port" = 70000', "port", "not '70000'"),  # getaddrinfo would bind port 4464
    ('"application_server.port" = 0', "port", "not '0'"),
    ('"application_server.host" = "127.0.0.1;"', "host", "'127.0.0.1;' is not a host name"),
    ('"application_server.host" = "' + "a" * 64 + '"', "host", "63 between dots"),  # getaddrinfo: UnicodeError
])
def test_without_daemon_bind_the_address_gunicorn_would_bind_is_checked(line, name, message):
    found = problems(HEAD + "[omero.web]\n" + line + "\n")
    assert len(found) == 1, found
    assert found[0].startswith(f"/etc/omerowebd/omerowebd.toml:5: omero.web.application_server.{name} makes gunicorn bind")
    assert message in found[0] and "set daemon.bind" in found[0]
    assert load(HEAD + 'bind = ["127.0.0.1:4080"]\n[omero.web]\n' + line + "\n").bind_addresses() == ("127.0.0.1:4080",)


def test_bind_addresses_follow_omero_web_start():
    assert load(HEAD).bind_addresses() == ("127.0.0.1:4080",)
    assert load(HEAD + '[omero.web]\n"application_server.host" = "::"\n"application_server.port" = 4090\n'
                ).bind_addresses() == ("[::]:4090",)


@pytest.mark.parametrize("line", ["settle_seconds = inf", "ready_timeout = inf", "graceful_timeout = nan",
                                  "settle_seconds = nan", "ready_timeout = -inf", "settle_seconds = 1" + "0" * 400])
def test_a_time_must_be_finite(line):
    # TOML has inf and nan. settle_seconds = inf got past the checks: a reload's settle step then raised
    # (systemd's timeout extension cannot be infinite) after the new generation had taken over, and the
    # reload was reported as rejected while the new config served, never published to nginx.
    found = problems(HEAD + line + "\n")
    key = line.split()[0]
    assert len(found) == 1 and f"daemon.{key} must be a finite number of seconds" in found[0], found
    assert found[0].startswith("/etc/omerowebd/omerowebd.toml:4:")
