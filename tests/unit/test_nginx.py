"""nginx.py without a venv: value checks, OMERO.web's parsing rules, the
daemon's additions, write/validate/reload/undo. The templates here are small
stand-ins written for these tests (omero-web's own are compared against the
real `omero web config` in tests/integration/test_nginx_render.py)."""

from __future__ import annotations

import asyncio
import stat
import textwrap
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd import nginx
from omerowebd.errors import ConfigError, UserError
from omerowebd.venv import VenvInfo

# Stand-ins with the placeholders and the shapes the layering relies on.
SERVER = """\
upstream web%(PREFIX_NAME)s {
    server %(FASTCGI_EXTERNAL)s fail_timeout=0;
}

server {
    listen %(HTTPPORT)d;
    server_name %(SERVERNAME)s;
    client_max_body_size %(MAX_BODY_SIZE)s;

%(NGINX_SERVER_EXTRA_CONFIG)s

    location @maintenance%(PREFIX_NAME)s {
        root %(ROOT)s/etc/templates/error;
        try_files $uri /sorry.html =502;
    }

    location %(STATIC_URL)s {
        alias %(STATIC_ROOT)s;
    }

    location @proxy_to_app%(PREFIX_NAME)s {
        proxy_pass http://web%(PREFIX_NAME)s;
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
    try_files $uri /sorry.html =502;
}

location %(STATIC_URL)s {
    alias %(STATIC_ROOT)s;
}

location @proxy_to_app%(PREFIX_NAME)s {
    proxy_pass http://%(FASTCGI_EXTERNAL)s;
}

location %(FORCE_SCRIPT_NAME)s {
    error_page 502 @maintenance%(PREFIX_NAME)s;
    try_files $uri @proxy_to_app%(PREFIX_NAME)s;
}
"""
DEVELOPMENT = "pid %(ROOT)s/var/pid;\nlisten %(HTTPPORT)d;\n"


@pytest.fixture
def info(tmp_path: Path) -> VenvInfo:
    web = tmp_path / "site-packages" / "omeroweb"
    (web / "templates").mkdir(parents=True)
    for kind, text in (("nginx", SERVER), ("nginx-location", LOCATION), ("nginx-development", DEVELOPMENT)):
        (web / "templates" / f"{kind}.conf.template").write_text(text)
    catalogue = {
        "omero.web.application_server": {"default": "wsgi-tcp"},
        "omero.web.application_server.host": {"default": "127.0.0.1"},
        "omero.web.application_server.port": {"default": 4080},
        "omero.web.static_url": {"default": "/static/"},
        "omero.web.nginx_server_extra_config": {"default": "[]"},
        "omero.web.prefix": {"default": None},
    }
    return VenvInfo(venv=tmp_path / "venv", versions={}, omeroweb_dir=web, catalogue=catalogue)


def make_config(tmp_path: Path, nginx_table: str = "", omero: str = "", daemon: str = "") -> config_module.Config:
    text = textwrap.dedent(f"""\
        [daemon]
        omerodir = "{tmp_path / 'omerodir'}"
        venv = "{tmp_path / 'venv'}"
        state_dir = "{tmp_path / 'state'}"
        {daemon}
        [nginx]
        """) + textwrap.dedent(nginx_table) + "\n[omero.web]\n" + textwrap.dedent(omero)
    path = tmp_path / "omerowebd.toml"
    path.write_text(text)
    return config_module.load(path)


# -- values that go into nginx text ------------------------------------------------


@pytest.mark.parametrize("value, words, expected", [
    ("/omero;", False, "';'"),
    ("/omero{", False, "'{'"),
    ("/omero}", False, "'}'"),
    ('/om"ero', False, "quote"),
    ("/om'ero", False, "quote"),
    ("/omero\nlisten 1", False, "line break"),
    ("/omero\r", False, "line break"),
    ("/om\tero", False, "control character"),
    ("/om ero", False, "space"),
    ("#/omero", False, "comment"),
    ("80 #x", True, "comment"),
    ("/omero\\", False, "backslash"),
    ("", False, "empty"),
    ("  ", True, "empty"),
])
def test_value_problem_refuses_what_ends_a_directive_or_block(value: str, words: bool, expected: str) -> None:
    problem = nginx.value_problem(value, words=words)
    assert problem is not None and expected in problem


@pytest.mark.parametrize("value, how", [
    ("/omero", {}),
    ("/pub/a#b", {}),  # a '#' inside a word is not a comment
    ("/webclient/?show=project-27936&x=$arg_y", {}),
    ("$hostname", {"words": True}),
    ("omero.example.org www.example.org", {"words": True}),
    ("443 ssl http2", {"words": True}),
    (r"~^(www\.)?(?<domain>.+)$", {"words": True, "backslash": True}),
])
def test_value_problem_accepts_ordinary_nginx_values(value: str, how: dict[str, bool]) -> None:
    assert nginx.value_problem(value, **how) is None


def test_regex_server_name_may_not_end_in_a_backslash() -> None:
    assert "backslash" in (nginx.value_problem("a\\", words=True, backslash=True) or "")


@pytest.mark.parametrize("table, key, fragment", [
    ('server_name = "a; evil"', "nginx.server_name", "';'"),
    ('listen = "80;"', "nginx.listen", "';'"),
    ('max_body_size = "10 m"', "nginx.max_body_size", "nginx size"),
    ('max_body_size = "10q"', "nginx.max_body_size", "nginx size"),
    ('server_file = "../x.conf"', "nginx.server_file", "plain file name"),
    ('location_file = "omero-web.conf"', "nginx.location_file", "must differ"),
    ('upstreams = ["10.0.0.2:4080; evil"]', "nginx.upstreams", "HOST:PORT"),
    ('upstreams = ["no-port"]', "nginx.upstreams", "HOST:PORT"),
    ('max_fails = -1', "nginx.max_fails", "from 0"),
    ('fail_timeout = "10s; evil"', "nginx.fail_timeout", "nginx time in seconds"),
    ('fail_timeout = "500ms"', "nginx.fail_timeout", "nginx time in seconds"),
    ('fail_timeout = "10s\\n"', "nginx.fail_timeout", "nginx time in seconds"),
    ('connect_timeout = "0"', "nginx.connect_timeout", "above 0"),
    ('connect_timeout = "5 s"', "nginx.connect_timeout", "nginx time"),
    ('validate_command = []', "nginx.validate_command", "must name a program"),
    ('redirects = { "pub/x" = "/webclient/" }', "nginx.redirects", "must start with '/'"),
    ('redirects = { "/pub/x" = "/webclient/ }" }', "nginx.redirects", "'}'"),
    ('redirects = { "/pub/x" = "webclient" }', "nginx.redirects", "http://"),
    ('redirects = { "/pub/x y" = "/webclient/" }', "nginx.redirects", "space"),
])
def test_bad_nginx_settings_are_one_line_naming_the_key_and_line(tmp_path: Path, table: str, key: str,
                                                                   fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, table)
    message = str(e.value)
    assert "\n" not in message
    assert f"omerowebd.toml:7: {key}" in message  # line 7 is the key's line in make_config's file
    assert fragment in message


def test_good_nginx_settings_load(tmp_path: Path) -> None:
    config = make_config(tmp_path, """\
        listen = "127.0.0.1:8080"
        server_name = "omero.example.org $hostname"
        max_body_size = "100m"
        upstreams = ["10.0.0.2:4080", "[::1]:4081", "unix:/run/web.sock"]
        validate_command = ["nginx", "-t"]
        [nginx.redirects]
        "/" = "/webclient/"
        "/pub/schleicher-et-al-2017" = "/webclient/?show=project-27936"
        """)
    assert config.nginx.redirects["/pub/schleicher-et-al-2017"] == "/webclient/?show=project-27936"
    assert config.nginx.validate_command == ("nginx", "-t")


# -- OMERO.web's parsing of the settings the templates use ------------------------


def test_web_settings_defaults_follow_omeroweb_settings(info: VenvInfo) -> None:
    web = nginx.web_settings({}, info, "/opt/omero/web/omero-web")
    assert web.prefix is None
    assert web.static_url == "/static/"
    assert web.static_root == "/opt/omero/web/omero-web/var/static"
    assert (web.host, web.port, web.application_server) == ("127.0.0.1", 4080, "wsgi-tcp")
    assert web.extra_config == ()


def test_web_settings_parse_like_omeroweb(info: VenvInfo) -> None:
    web = nginx.web_settings({
        "omero.web.static_url": "/assets",  # str_slash adds the slash
        "omero.web.static_root": "/srv/a/../static/",  # normpath
        "omero.web.application_server.port": " 4090 ",  # int()
        "omero.web.force_script_name": "/legacy",  # the deprecated name counts when prefix is unset
        "omero.web.nginx_server_extra_config": '["a;", "b;"]',
    }, info, "/o")
    assert (web.static_url, web.static_root, web.port, web.prefix) == ("/assets/", "/srv/static", 4090, "/legacy")
    assert web.prefix_property == "omero.web.force_script_name"
    assert web.extra_config == ("a;", "b;")
    both = nginx.web_settings({"omero.web.prefix": "/new", "omero.web.force_script_name": "/old"}, info, "/o")
    assert both.prefix == "/new"


@pytest.mark.parametrize("prefix, script_name, prefix_name", [
    (None, "/", ""),
    ("/omero", "/omero", "_omero"),
    ("/omero/", "/omero", "_omero"),
    ("/my-site/omero_web", "/my-site/omero_web", "_mysiteomero_web"),
])
def test_prefix_gives_location_and_upstream_names(info: VenvInfo, prefix: str | None, script_name: str,
                                                  prefix_name: str) -> None:
    props = {} if prefix is None else {"omero.web.prefix": prefix}
    values = nginx.template_values(nginx.web_settings(props, info, "/o"), listen="80", servername="s",
                                   max_body_size="0", omeroweb_dir=info.omeroweb_dir)
    assert (values["FORCE_SCRIPT_NAME"], values["PREFIX_NAME"]) == (script_name, prefix_name)


def test_extra_config_lines_are_framed_and_kept_raw(info: VenvInfo) -> None:
    web = nginx.web_settings({"omero.web.nginx_server_extra_config": '["location /x { return 204; }"]'}, info, "/o")
    text = nginx.render("server", web, info)
    assert ("# <<<<< omero.web.nginx_server_extra_config\nlocation /x { return 204; }\n"
            "# omero.web.nginx_server_extra_config >>>>>\n") in text


# -- checks on the OMERO properties -------------------------------------------------


@pytest.mark.parametrize("omero, name, fragment", [
    ('prefix = "/omero;"', "omero.web.prefix", "';'"),
    ('prefix = "/"', "omero.web.prefix", "must start with '/'"),
    ('prefix = "omero"', "omero.web.prefix", "must start with '/'"),
    ('static_url = "/static/ x"', "omero.web.static_url", "space"),
    ('static_url = "/"', "omero.web.static_url", "empty nginx location"),
    ('static_root = "/srv/{x}"', "omero.web.static_root", "'{'"),
    # a host with ';' is refused before this, by config.py (tests/unit/test_config.py)
    ('nginx_server_extra_config = ["a;\\nb;"]', "omero.web.nginx_server_extra_config", "no line breaks"),
    ('nginx_server_extra_config = "not json"', "omero.web.nginx_server_extra_config", "JSON list"),
])
def test_bad_properties_are_refused_naming_file_line_and_key(tmp_path: Path, info: VenvInfo, omero: str,
                                                             name: str, fragment: str) -> None:
    config = make_config(tmp_path, omero=omero)
    with pytest.raises(UserError) as e:
        nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{config.path}:9: {name}")  # line 9: the first key under [omero.web]
    assert fragment in message


# -- render, as `omero web config` ---------------------------------------------------


def test_render_fills_the_template_and_ends_with_a_newline(info: VenvInfo) -> None:
    web = nginx.web_settings({"omero.web.prefix": "/omero"}, info, "/srv/omero")
    text = nginx.render("server", web, info, http=8081, servername="a b", max_body_size="5m")
    assert text == (SERVER.replace("%(HTTPPORT)d", "8081") % {
        "PREFIX_NAME": "_omero", "FASTCGI_EXTERNAL": "127.0.0.1:4080", "SERVERNAME": "a b", "MAX_BODY_SIZE": "5m",
        "NGINX_SERVER_EXTRA_CONFIG": "", "ROOT": "/srv/omero", "STATIC_URL": "/static",
        "STATIC_ROOT": "/srv/omero/var/static", "FORCE_SCRIPT_NAME": "/omero"}) + "\n"


@pytest.mark.parametrize("kind, http, port", [("server", None, 80), ("location", 0, 80), ("development", None, 8080),
                                              ("server", 8000, 8000)])
def test_port_conflict_is_refused_like_omero_web_config(info: VenvInfo, kind: str, http: int | None,
                                                        port: int) -> None:
    web = nginx.web_settings({"omero.web.application_server.port": str(port)}, info, "/o")
    with pytest.raises(nginx.PortConflict, match=rf"^Port conflict: HTTP\({port}\) and wsgi\({port}\)\."):
        nginx.render(kind, web, info, http=http)
    assert nginx.PortConflict("x").exit_code == 1


def test_development_listens_on_8080_by_default(info: VenvInfo) -> None:
    assert "listen 8080;" in nginx.render("development", nginx.web_settings({}, info, "/o"), info)


@pytest.mark.parametrize("server_type", ["wsgi", "development"])
def test_other_application_servers_are_refused(info: VenvInfo, server_type: str) -> None:
    web = nginx.web_settings({"omero.web.application_server": server_type}, info, "/o")
    with pytest.raises(UserError, match="cannot be used with nginx"):
        nginx.render("server", web, info)


def test_a_template_with_an_unknown_name_is_a_clear_error(info: VenvInfo) -> None:
    (info.omeroweb_dir / "templates" / "nginx.conf.template").write_text("x %(NEW_THING)s\n")
    with pytest.raises(UserError, match=r"uses %\(NEW_THING\)s.*upgrade omerowebd"):
        nginx.render("server", nginx.web_settings({}, info, "/o"), info)


# -- what the daemon writes ---------------------------------------------------------


def test_written_files_are_the_rendered_text_plus_marked_additions(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, """\
        listen = "8081"
        upstreams = ["10.0.0.2:4080"]
        [nginx.redirects]
        "/" = "/webclient/"
        "/pub/schleicher-et-al-2017" = "/webclient/?show=project-27936"
        """, omero='prefix = "/omero"\n')
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4090"])
    server = out.files[out.server].decode()
    location = out.files[out.location].decode()
    page_dir = tmp_path / "state" / "maintenance"
    assert out.server == tmp_path / "state" / "nginx" / "omero-web.conf"
    assert out.location == tmp_path / "state" / "nginx" / "omero-web-location.include"
    assert out.maintenance == page_dir / "sorry.html"  # the name the template's try_files asks for

    web = nginx.web_settings(config.properties, info, config.daemon.omerodir)
    plain = nginx.render("server", web, info, http=8081).replace("127.0.0.1:4080", "127.0.0.1:4090")
    # Remove the additions: what is left is exactly `omero web config nginx`.
    stripped = _strip_additions(server, config, page_dir)
    # With several backends the upstream block's server lines are all the daemon's.
    assert stripped == plain.replace("    server 127.0.0.1:4090 fail_timeout=0;\n", "")

    assert server.startswith(f"# Written by omerowebd from omero-web's nginx.conf.template; edit {config.path},")
    assert ("    server 127.0.0.1:4090 max_fails=1 fail_timeout=10s;\n"
            "    server 10.0.0.2:4080 max_fails=1 fail_timeout=10s;\n}") in server
    assert "fail_timeout=0" not in server
    assert "    location = / { return 307 /webclient/; }\n" in server
    assert ("    location = /pub/schleicher-et-al-2017 { return 307 /webclient/?show=project-27936; }\n"
            "\n}\n") in server  # inside the server block, before its closing brace
    assert f"        root {page_dir};\n" in server
    assert ("    location @proxy_to_app_omero {\n"
            "        # omerowebd: nginx.upstreams: a request that meets a dead backend goes to the next;"
            " never a POST that reached one\n"
            "        proxy_next_upstream error timeout http_502 http_503;\n"
            "        proxy_connect_timeout 5s;\n"
            "        # omerowebd: the upstream's 502 goes to the maintenance page from here too\n"
            "        error_page 502 @maintenance_omero;\n"
            "        proxy_pass") in server
    assert "location @proxy_to_app_omero {\n    # omerowebd:" in location
    # Links below STATIC_ROOT (the service user's) lead only to what their owner owns, in both files.
    static_root = f"{config.daemon.omerodir}/var/static"
    assert (f"    location /static {{\n        # omerowebd: follow a link below STATIC_ROOT only to a file of the"
            f" link's owner\n        disable_symlinks if_not_owner;\n        alias {static_root};\n    }}") in server
    assert f"    disable_symlinks if_not_owner;\n    alias {static_root};\n}}" in location
    assert "    error_page 502 @maintenance_omero;\n    proxy_pass http://127.0.0.1:4090;" in location
    assert "etc/templates/error" not in server
    assert "location = / { return 307 /webclient/; }\n" in location
    assert "proxy_pass http://127.0.0.1:4090;" in location
    assert any("proxies to 127.0.0.1:4090 only" in w for w in out.warnings)


def test_several_backends_share_the_timing_settings_and_one_backend_keeps_omero_webs_line(
        tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, """\
        upstreams = ["10.0.0.3:4080", "unix:/run/other.sock"]
        max_fails = 3
        fail_timeout = "1m30s"
        connect_timeout = "750ms"
        """)
    server = _server_text(nginx.render_outputs(config, config.properties, info, ["10.0.0.2:4080"]))
    assert ("upstream web {\n"
            "    # omerowebd: nginx.upstreams and further daemon.bind addresses; each is left out for"
            " nginx.fail_timeout after nginx.max_fails failures\n"
            "    server 10.0.0.2:4080 max_fails=3 fail_timeout=1m30s;\n"
            "    server 10.0.0.3:4080 max_fails=3 fail_timeout=1m30s;\n"
            "    server unix:/run/other.sock max_fails=3 fail_timeout=1m30s;\n}") in server
    assert "        proxy_next_upstream error timeout http_502 http_503;\n" in server
    assert "        proxy_connect_timeout 750ms;\n" in server
    assert "non_idempotent" not in server  # a POST that reached a host is never sent to another
    # The local address listed in nginx.upstreams too (the same TOML on every host) is one server.
    same = make_config(tmp_path, 'upstreams = ["10.0.0.2:4080", "10.0.0.3:4080"]')
    server = _server_text(nginx.render_outputs(same, same.properties, info, ["10.0.0.2:4080"]))
    assert server.count("server 10.0.0.2:4080 ") == 1 and server.count("server 10.0.0.3:4080 ") == 1

    alone = make_config(tmp_path, "max_fails = 3")
    server = _server_text(nginx.render_outputs(alone, alone.properties, info, ["10.0.0.2:4080"]))
    assert "    server 10.0.0.2:4080 fail_timeout=0;\n}" in server
    assert "proxy_next_upstream" not in server and "proxy_connect_timeout" not in server


def _server_text(out: nginx.Rendered) -> str:
    return out.files[out.server].decode()


def _strip_additions(text: str, config: config_module.Config, page_dir: Path) -> str:
    lines = text.splitlines(keepends=True)[2:]  # the header
    kept = []
    skip_block = False
    for line in lines:
        if "# omerowebd:" in line:
            skip_block = "redirects" in line or "upstreams" in line or "502" in line or "link" in line
            if kept and kept[-1] == "\n" and "redirects" in line:
                kept.pop()
            continue
        if skip_block and (line.strip().startswith(("server ", "location = ", "error_page 502 ",
                                                    "disable_symlinks ", "proxy_next_upstream ",
                                                    "proxy_connect_timeout "))):
            continue
        skip_block = False
        kept.append(line.replace(f"root {page_dir};", f"root {config.daemon.omerodir}/etc/templates/error;"))
    return "".join(kept)


def test_proxy_errors_are_routed_once(tmp_path: Path, info: VenvInfo) -> None:
    """A template that already routes the named location's 502 is left as it is."""
    fixed = SERVER.replace("        proxy_pass http://web", "        error_page 502 @maintenance%(PREFIX_NAME)s;\n"
                           "        proxy_pass http://web")
    (info.omeroweb_dir / "templates" / "nginx.conf.template").write_text(fixed)
    config = make_config(tmp_path)
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    server = out.files[out.server].decode()
    assert server.count("error_page 502 @maintenance;") == 2
    assert "goes to the maintenance page" not in server


def test_listen_on_the_gunicorn_address_is_a_port_conflict(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, 'listen = "4080"')
    with pytest.raises(nginx.PortConflict, match="nginx.listen '4080' is where gunicorn listens"):
        nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    other_host = make_config(tmp_path, 'listen = "10.0.0.1:4080"')
    nginx.render_outputs(other_host, other_host.properties, info, ["127.0.0.1:4080"])


def test_maintenance_page_says_the_service_will_be_back(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, omero='prefix = "/omero"\n')
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    page = out.files[out.maintenance].decode()
    assert "<!DOCTYPE html>" in page and "restart" in page and "back" in page
    assert 'href="/omero/webclient/"' in page
    assert "$webclient_url" not in page


def test_custom_maintenance_template(tmp_path: Path, info: VenvInfo) -> None:
    template = tmp_path / "page.html"
    template.write_text("<p>Back soon at ${webclient_url}, costs $5</p>\n")
    config = make_config(tmp_path, f'maintenance_template = "{template}"')
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    assert out.files[out.maintenance] == b"<p>Back soon at /webclient/, costs $5</p>\n"
    template.unlink()
    with pytest.raises(UserError, match="nginx.maintenance_template .*cannot read it"):
        nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])


# -- write, validate, reload, undo --------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, object]]] = []

    def __getattr__(self, level: str):  # info, warning, error
        return lambda event, **kw: self.events.append((level, event, kw))


def script(tmp_path: Path, name: str, body: str) -> str:
    """A TOML argument list running a small sh script (a stand-in for nginx -t or a reload)."""
    path = tmp_path / name
    path.write_text(body + "\n")
    return f'["sh", "{path}"]'


def run(coro):
    return asyncio.run(coro)


def test_apply_writes_changed_files_0644_and_only_on_change(tmp_path: Path, info: VenvInfo) -> None:
    marker = tmp_path / "reloads"
    config = make_config(tmp_path, f"reload_command = {script(tmp_path, 'reload', f'echo x >> {marker}')}")
    output = nginx.NginxOutput(Log())
    undo = run(output.apply(config, config.properties, info))
    assert undo is not None
    server = tmp_path / "state" / "nginx" / "omero-web.conf"
    for path in (server, server.with_name("omero-web-location.include"), tmp_path / "state/maintenance/sorry.html"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert marker.read_text() == "x\n"
    before = server.stat().st_mtime_ns, server.stat().st_ino
    assert run(output.apply(config, config.properties, info)) is None  # nothing changed: no write, no reload
    assert (server.stat().st_mtime_ns, server.stat().st_ino) == before
    assert marker.read_text() == "x\n"
    status = output.status()
    assert status["files"]["server"] == str(server)
    assert status["reload"]["ok"] is True and status["written_at"] is not None


def test_undo_restores_the_previous_files_and_reloads_again(tmp_path: Path, info: VenvInfo) -> None:
    marker = tmp_path / "reloads"
    output = nginx.NginxOutput(Log())
    reload = f"reload_command = {script(tmp_path, 'reload', f'echo x >> {marker}')}"
    first = make_config(tmp_path, reload, omero='prefix = "/a"\n')
    run(output.apply(first, first.properties, info))
    server = tmp_path / "state" / "nginx" / "omero-web.conf"
    old = server.read_bytes()
    second = make_config(tmp_path, reload, omero='prefix = "/b"\n')
    undo = run(output.apply(second, second.properties, info))
    assert b"location /b {" in server.read_bytes()
    assert undo is not None
    run(undo())
    assert server.read_bytes() == old
    assert marker.read_text() == "x\nx\nx\n"


def test_rejected_config_puts_the_previous_files_back(tmp_path: Path, info: VenvInfo) -> None:
    # Stands in for `nginx -t`: it rejects a server file that mentions /bad.
    check = script(tmp_path, "check", f"""\
if grep -q /bad {tmp_path / 'state/nginx/omero-web.conf'}; then
    echo 'nginx: [alert] could not open error log file' >&2
    echo 'nginx: [emerg] unknown directive "bad" in omero-web.conf:12' >&2
    echo 'nginx: configuration file test failed' >&2
    exit 1
fi""")
    marker = tmp_path / "reloads"
    table = f"validate_command = {check}\nreload_command = {script(tmp_path, 'reload', f'echo x >> {marker}')}"
    output = nginx.NginxOutput(Log())
    good = make_config(tmp_path, table, omero='prefix = "/good"\n')
    run(output.apply(good, good.properties, info))
    files = sorted((tmp_path / "state").rglob("*"))
    before = {p: p.read_bytes() for p in files if p.is_file()}
    bad = make_config(tmp_path, table, omero='prefix = "/bad"\n')
    with pytest.raises(UserError) as e:
        run(output.apply(bad, bad.properties, info))
    assert str(e.value) == 'nginx rejected the new config: [emerg] unknown directive "bad" in omero-web.conf:12'
    assert e.value.exit_code == 1
    assert {p: p.read_bytes() for p in files if p.is_file()} == before
    assert sorted((tmp_path / "state").rglob("*")) == files  # no temp files left
    assert marker.read_text() == "x\n"  # no reload for the rejected files
    assert output.status()["validation"]["ok"] is False


def test_a_file_that_did_not_exist_is_removed_by_undo(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path)
    undo = run(nginx.NginxOutput(Log()).apply(config, config.properties, info))
    run(undo())
    assert not (tmp_path / "state" / "nginx" / "omero-web.conf").exists()


def test_failed_reload_command_is_reported_not_fatal(tmp_path: Path, info: VenvInfo) -> None:
    log = Log()
    reload = script(tmp_path, "reload", "echo nginx is not running >&2; exit 3")
    config = make_config(tmp_path, f"reload_command = {reload}")
    output = nginx.NginxOutput(log)
    assert run(output.apply(config, config.properties, info)) is not None
    assert output.status()["reload"] == {"ok": False, "message": "nginx is not running",
                                         "at": output.status()["reload"]["at"]}
    assert ("error", "nginx reload command failed") in [(lvl, ev) for lvl, ev, _ in log.events]


def test_missing_command_is_a_rejection(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, 'validate_command = ["/nonexistent/nginx", "-t"]')
    with pytest.raises(UserError, match="nginx rejected the new config: cannot run /nonexistent/nginx"):
        run(nginx.NginxOutput(Log()).apply(config, config.properties, info))
    assert not (tmp_path / "state" / "nginx" / "omero-web.conf").exists()


def test_disabled_writes_nothing(tmp_path: Path, info: VenvInfo) -> None:
    config = make_config(tmp_path, "enabled = false")
    output = nginx.NginxOutput(Log())
    assert run(output.apply(config, config.properties, info)) is None
    assert not (tmp_path / "state").exists()
    assert output.status()["enabled"] is False


def test_unwritable_output_dir_is_one_line(tmp_path: Path, info: VenvInfo) -> None:
    (tmp_path / "a-file").write_text("")  # a directory cannot be made below it, not even by root
    config = make_config(tmp_path, f'output_dir = "{tmp_path / "a-file" / "nginx"}"')
    with pytest.raises(UserError) as e:
        run(nginx.NginxOutput(Log()).apply(config, config.properties, info))
    assert str(e.value).startswith(f"cannot write the nginx file {tmp_path / 'a-file' / 'nginx'}/")
    assert "Not a directory" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "state" / "maintenance" / "sorry.html").exists()  # what was written is taken back


@pytest.mark.parametrize("lines, expected", [
    (["nginx: [alert] could not open error log", "nginx: [emerg] bad thing in f:1", "test failed"],
     "[emerg] bad thing in f:1"),
    (["something odd"], "something odd"),
    ([], None),
])
def test_first_error_prefers_emerg(lines: list[str], expected: str | None) -> None:
    assert nginx.first_error(lines) == expected


def test_omerodir_that_would_break_the_maintenance_root_is_refused(tmp_path: Path, info: VenvInfo) -> None:
    web = nginx.web_settings({}, info, "/srv/omero web")
    with pytest.raises(UserError, match=r"^daemon.omerodir '/srv/omero web' contains a space"):
        nginx.check_web_settings(web)


def test_config_problems_for_omerowebctl_check(tmp_path: Path, info: VenvInfo) -> None:
    assert nginx.config_problems(make_config(tmp_path), info) == []
    bad = make_config(tmp_path, omero='prefix = "/a b"\n')
    assert nginx.config_problems(bad, info) == [f"{bad.path}:9: omero.web.prefix '/a b' contains a space:"
                                                " nginx would read two values"]
    disabled = make_config(tmp_path, "enabled = false", omero='prefix = "/a b"\n')
    assert nginx.config_problems(disabled, info) == []


def test_a_link_policy_the_admin_chose_is_kept(tmp_path: Path, info: VenvInfo) -> None:
    """A stricter (or any) choice already in the text is not overridden by the static location's addition."""
    config = make_config(tmp_path, omero='nginx_server_extra_config = ["disable_symlinks on;"]\n')
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:4080"])
    server = out.files[out.server].decode()
    assert "if_not_owner" not in server and server.count("disable_symlinks on;") == 1
    # The location include has no extra config: it gets the addition.
    assert "disable_symlinks if_not_owner;" in out.files[out.location].decode()
    assert not any("STATIC_ROOT" in w for w in out.warnings)
