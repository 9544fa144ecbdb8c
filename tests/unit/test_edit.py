"""edit.py: config set/append/unset on the TOML file -- layout kept, every edit checked, locked, atomic.

The venv is stood in for by a probe that knows a few properties the way
OMERO.web's catalogue describes them; the real one is in the integration tests.
"""

from __future__ import annotations

import json
import os
import re
import pwd
import threading
import time
from pathlib import Path

import pytest
import tomlkit

from omerowebd import config as config_module
from omerowebd import edit
from omerowebd.errors import ConfigError, UserError
from omerowebd.venv import VenvInfo

CATALOGUE = {
    "omero.web.prefix": {"kind": "str", "default": None},
    "omero.web.public.enabled": {"kind": "bool", "default": "false"},
    "omero.web.public.user": {"kind": "str", "default": None},
    "omero.web.wsgi_workers": {"kind": "int", "default": 5},
    "omero.web.apps": {"kind": "list", "default": "[]"},
    "omero.web.ui.top_links": {"kind": "list", "default": '[["Data", "webindex"]]'},
    "omero.web.caches": {"kind": "object", "default": "{}"},
    "omero.web.application_server": {"kind": "str", "default": "wsgi-tcp"},
    "omero.web.application_server.host": {"kind": "str", "default": "127.0.0.1"},
    "omero.web.application_server.port": {"kind": "int", "default": 4080},
    "omero.web.secret_key": {"kind": "str", "default": None},
}


class FakeVenv:
    """Answers like venv.probe_sync: the catalogue, and OMERO.web's verdict on each value."""

    def __init__(self) -> None:
        self.calls = 0
        self.refuse: dict[str, str] = {}  # name -> message, for any value

    def __call__(self, venv: Path, properties: dict[str, str], omerodir: Path | None = None) -> VenvInfo:
        self.calls += 1
        errors = {}
        for name, value in properties.items():
            kind = CATALOGUE.get(name, {}).get("kind")
            if kind == "int" and not value.strip().lstrip("-").isdigit():
                errors[name] = f"must be an integer, not {value!r}"
            if kind == "list" and not isinstance(_json(value), list):
                errors[name] = f"must be a JSON list, not {value!r}"
            if name in self.refuse:
                errors[name] = self.refuse[name]
        return VenvInfo(venv=venv, versions={}, omeroweb_dir=venv, catalogue=CATALOGUE, errors=errors)


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def no_venv(venv: Path, properties: dict[str, str], omerodir: Path | None = None) -> VenvInfo:
    raise ConfigError(f"venv {venv} does not exist: point daemon.venv at the OMERO.web virtualenv")


BASE = """\
# The site's config. Keep this comment.
[daemon]
omerodir = "/srv/omero-web"   # the OMERODIR
venv = "/srv/venv3"

# How long a generation may take.
#ready_timeout = 120

[nginx]
enabled = false

[omero.web]
# Serve below a path.
#prefix = "/omero"

# Workers.
wsgi_workers = 3  # three is plenty

# Apps, for example:
#apps = ["omero_iviewer"]
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(BASE)
    return path


@pytest.fixture
def fake() -> FakeVenv:
    return FakeVenv()


def run(path: Path, verb, key: str, *args, probe=None, **kwargs) -> edit.Outcome:
    parsed = edit.parse_key(key)
    return edit.edit(path, lambda doc, knowledge: [verb(doc, parsed, *args, knowledge, **kwargs)],
                     probe=probe or FakeVenv())


def set_(path: Path, key: str, value: str, probe=None, **kwargs) -> edit.Outcome:
    return run(path, edit.set_key, key, value, probe=probe, **kwargs)


def append(path: Path, key: str, value: str, probe=None, **kwargs) -> edit.Outcome:
    return run(path, edit.append_key, key, value, probe=probe, **kwargs)


def unset(path: Path, key: str, probe=None) -> edit.Outcome:
    parsed = edit.parse_key(key)
    return edit.edit(path, lambda doc, knowledge: [edit.unset_key(doc, parsed)], probe=probe or FakeVenv())


def properties(path: Path) -> dict[str, str]:
    return dict(config_module.load(path).properties)


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#") or "#" in line]


# -- layout ---------------------------------------------------------------------


def test_comments_and_layout_survive_set_append_unset(cfg: Path):
    set_(cfg, "omero.web.prefix", "/omero")
    append(cfg, "omero.web.apps", '"omero_iviewer"')
    set_(cfg, "omero.web.wsgi_workers", "4")
    unset(cfg, "omero.web.prefix")
    unset(cfg, "omero.web.apps")
    text = cfg.read_text()
    # Every comment is still there, in order; the changed line keeps its own comment.
    assert [c for c in comments(text) if "wsgi_workers" not in c] == [c for c in comments(BASE) if "wsgi_workers" not in c]
    assert "wsgi_workers = 4  # three is plenty" in text
    # Back to the original, but for the one value still changed.
    assert text == BASE.replace("wsgi_workers = 3", "wsgi_workers = 4")


def test_a_new_key_goes_below_its_commented_out_example(cfg: Path):
    set_(cfg, "omero.web.prefix", "/omero")
    set_(cfg, "daemon.ready_timeout", "300")
    lines = cfg.read_text().splitlines()
    assert lines[lines.index('#prefix = "/omero"') + 1] == 'prefix = "/omero"'
    assert lines[lines.index("#ready_timeout = 120") + 1] == "ready_timeout = 300"
    assert properties(cfg)["omero.web.prefix"] == "/omero"
    assert config_module.load(cfg).daemon.ready_timeout == 300


def test_names_that_are_values_and_prefixes_get_quoted_keys(cfg: Path):
    set_(cfg, "omero.web.application_server.host", "0.0.0.0")
    set_(cfg, "omero.web.application_server", "wsgi-tcp")
    set_(cfg, "omero.web.public.enabled", "true")
    set_(cfg, "omero.web.public.user", "guest")
    text = cfg.read_text()
    assert '"application_server.host" = "0.0.0.0"' in text
    assert 'application_server = "wsgi-tcp"' in text
    assert "public.enabled = true" in text and 'public.user = "guest"' in text
    assert properties(cfg) == {
        "omero.web.wsgi_workers": "3",
        "omero.web.application_server.host": "0.0.0.0",
        "omero.web.application_server": "wsgi-tcp",
        "omero.web.public.enabled": "true",
        "omero.web.public.user": "guest",
    }


def test_a_name_below_a_value_is_quoted_even_when_the_venv_does_not_know_it(cfg: Path):
    set_(cfg, "omero.web.myapp", "on", probe=no_venv)
    set_(cfg, "omero.web.myapp.colour", "red", probe=no_venv)
    assert '"myapp.colour" = "red"' in cfg.read_text()
    assert properties(cfg)["omero.web.myapp.colour"] == "red"


def test_setting_a_name_that_is_a_table_in_the_file_is_refused_with_the_fix(cfg: Path):
    cfg.write_text(BASE + 'myapp.colour = "red"\n')
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match=r'omero.web.myapp is a table .* "myapp.NAME"'):
        set_(cfg, "omero.web.myapp", "on", probe=no_venv)
    assert cfg.read_bytes() == before


def test_properties_outside_omero_web_get_their_own_table(cfg: Path):
    set_(cfg, "omero.mail.host", "smtp.example.org")
    set_(cfg, "omero.mail.smtp.starttls.enable", "true")
    text = cfg.read_text()
    # (tomlkit 0.11 puts a blank line before a dotted key it appends; newer ones do not)
    assert re.search(r'\[omero.mail\]\nhost = "smtp.example.org"\n\n?smtp.starttls.enable = "true"\n', text)
    assert properties(cfg)["omero.mail.smtp.starttls.enable"] == "true"


def test_a_file_with_no_omero_table_gets_one(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nomerodir = "/srv/o"\nvenv = "/srv/v"\n')
    set_(path, "omero.web.public.enabled", "false")
    assert properties(path) == {"omero.web.public.enabled": "false"}
    assert "[omero.web]\npublic.enabled = false" in path.read_text()


def test_tables_split_across_the_file_are_edited_in_place(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[omero.web]\nprefix = "/a"\n\n[daemon]\nomerodir = "/srv/o"\nvenv = "/srv/v"\n\n'
                    "[omero.web.public]\nenabled = true\n")
    set_(path, "omero.web.prefix", "/b")
    set_(path, "omero.web.public.enabled", "false")
    unset(path, "omero.web.prefix")
    assert properties(path) == {"omero.web.public.enabled": "false"}
    assert "[omero.web.public]\nenabled = false" in path.read_text()


# -- types -------------------------------------------------------------------------


def test_values_get_the_type_omero_web_parses_them_as(cfg: Path):
    set_(cfg, "omero.web.public.enabled", "True")
    set_(cfg, "omero.web.wsgi_workers", "8")
    set_(cfg, "omero.web.apps", '["omero_iviewer","omero_figure"]')
    set_(cfg, "omero.web.caches", '{"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache"}}')
    set_(cfg, "omero.web.prefix", "1234")
    doc = tomlkit.parse(cfg.read_text())["omero"]["web"]
    assert doc["public"]["enabled"] is True
    assert isinstance(doc["wsgi_workers"], tomlkit.items.Integer) and doc["wsgi_workers"] == 8
    assert isinstance(doc["apps"], tomlkit.items.Array)
    assert isinstance(doc["caches"], tomlkit.items.InlineTable)
    assert isinstance(doc["prefix"], tomlkit.items.String)  # a str property stays text, digits or not
    # Stored as omero config would: booleans lower case, JSON re-encoded.
    props = properties(cfg)
    assert props["omero.web.public.enabled"] == "true"
    assert props["omero.web.apps"] == '["omero_iviewer", "omero_figure"]'
    assert json.loads(props["omero.web.caches"]) == {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache"}}


def test_without_the_venv_values_are_text_unless_the_file_already_typed_them(cfg: Path):
    set_(cfg, "omero.web.public.enabled", "true", probe=no_venv)
    set_(cfg, "omero.web.wsgi_workers", "6", probe=no_venv)  # an integer in the file already
    doc = tomlkit.parse(cfg.read_text())["omero"]["web"]
    assert doc["public"]["enabled"] == "true"
    assert isinstance(doc["wsgi_workers"], tomlkit.items.Integer)


def test_json_that_toml_cannot_hold_stays_text(cfg: Path):
    set_(cfg, "omero.web.caches", '{"default": {"TIMEOUT": null}}')
    assert properties(cfg)["omero.web.caches"] == '{"default": {"TIMEOUT": null}}'
    assert isinstance(tomlkit.parse(cfg.read_text())["omero"]["web"]["caches"], tomlkit.items.String)


def test_text_flag_and_awkward_strings(cfg: Path):
    awkward = 'say "hi"\n\tcafé ☃ \\ end'
    set_(cfg, "omero.web.wsgi_workers", "5", as_text=True)
    set_(cfg, "omero.web.login_incorrect_credentials_text", awkward)
    props = properties(cfg)
    assert props["omero.web.wsgi_workers"] == "5"
    assert isinstance(tomlkit.parse(cfg.read_text())["omero"]["web"]["wsgi_workers"], tomlkit.items.String)
    assert props["omero.web.login_incorrect_credentials_text"] == awkward


def test_long_lists_are_written_one_element_a_line(cfg: Path):
    links = [["Data", "webindex", {"title": "Browse Data via Projects, Tags etc"}], ["History", "history"]]
    set_(cfg, "omero.web.ui.top_links", json.dumps(links))
    text = cfg.read_text()
    assert 'ui.top_links = [\n    ["Data", "webindex", {title = "Browse Data via Projects, Tags etc"}],\n' in text
    assert json.loads(properties(cfg)["omero.web.ui.top_links"]) == links


# -- append and unset --------------------------------------------------------------


def test_append_starts_from_omero_webs_default_like_omero_config(cfg: Path):
    outcome = append(cfg, "omero.web.ui.top_links", '["Figure", "figure_index"]')
    assert json.loads(properties(cfg)["omero.web.ui.top_links"]) == [["Data", "webindex"], ["Figure", "figure_index"]]
    assert "OMERO.web's default" in outcome.changes[0].note
    append(cfg, "omero.web.ui.top_links", '["Figure", "figure_index"]', unique=True)
    assert len(json.loads(properties(cfg)["omero.web.ui.top_links"])) == 2
    append(cfg, "omero.web.ui.top_links", '["Figure", "figure_index"]')
    assert len(json.loads(properties(cfg)["omero.web.ui.top_links"])) == 3


def test_append_a_bare_word_is_text_but_broken_json_is_refused(cfg: Path):
    append(cfg, "omero.web.apps", "omero_iviewer")
    assert properties(cfg)["omero.web.apps"] == '["omero_iviewer"]'
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match="not valid JSON"):
        append(cfg, "omero.web.apps", '["unclosed"')
    assert cfg.read_bytes() == before


def test_append_to_a_value_that_is_not_a_list_is_refused(cfg: Path):
    set_(cfg, "omero.web.prefix", "/omero")
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match="not JSON"):
        append(cfg, "omero.web.prefix", '"x"')
    assert cfg.read_bytes() == before


def test_append_to_an_unset_list_needs_the_venv_for_its_default(cfg: Path):
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match="cannot be asked for its default"):
        append(cfg, "omero.web.ui.top_links", '["Figure", "figure_index"]', probe=no_venv)
    assert cfg.read_bytes() == before


def test_unset_what_is_not_set_changes_nothing(cfg: Path):
    before = cfg.read_bytes(), cfg.stat().st_mtime_ns
    outcome = unset(cfg, "omero.web.prefix")
    assert not outcome.written and outcome.changes[0].before is None
    assert (cfg.read_bytes(), cfg.stat().st_mtime_ns) == before


# -- daemon settings ------------------------------------------------------------------


def test_daemon_settings_are_typed_from_config_py(cfg: Path):
    set_(cfg, "daemon.bind", "127.0.0.1:4090")
    set_(cfg, "nginx.validate_command", "nginx -t -c /etc/nginx/nginx.conf")
    set_(cfg, "nginx.enabled", "yes")
    set_(cfg, "sessions.nice", "5")
    set_(cfg, "nginx.redirects", '{"/": "/webclient/"}')
    append(cfg, "nginx.upstreams", '"127.0.0.1:4091"')
    append(cfg, "nginx.upstreams", "127.0.0.1:4092")
    c = config_module.load(cfg)
    assert c.daemon.bind == ("127.0.0.1:4090",)
    assert c.nginx.validate_command == ("nginx", "-t", "-c", "/etc/nginx/nginx.conf")
    assert c.nginx.enabled is True and c.sessions.nice == 5
    assert c.nginx.redirects == {"/": "/webclient/"}
    assert c.nginx.upstreams == ("127.0.0.1:4091", "127.0.0.1:4092")


def test_unknown_keys_are_usage_errors_with_a_suggestion():
    with pytest.raises(UserError, match=r"unknown setting daemon\.vnev \(did you mean 'daemon\.venv'\?\)") as e:
        edit.parse_key("daemon.vnev")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="use an OMERO property"):
        edit.parse_key("web.prefix")
    with pytest.raises(UserError, match="not an OMERO property name"):
        edit.parse_key("omero.web..prefix")


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("verb, key, value, reason", [
    (set_, "omero.web.wsgi_workers", "many", "must be an integer"),  # OMERO.web's verdict
    (set_, "daemon.ready_timeout", "-1", "must be more than 0"),  # the daemon's parser
    (set_, "sessions.schedule", "sometimes", "schedule"),
    (set_, "daemon.log_format", "xml", "must be one of"),
    (set_, "nginx.enabled", "perhaps", "must be true or false"),
    (unset, "daemon.venv", None, "missing required key daemon.venv"),
])
def test_a_refused_edit_leaves_the_file_byte_identical(cfg: Path, verb, key, value, reason):
    before = cfg.read_bytes(), cfg.stat().st_mtime_ns, cfg.stat().st_ino
    with pytest.raises(edit.EditRefused, match=reason) as e:
        verb(cfg, key) if value is None else verb(cfg, key, value)
    assert e.value.exit_code == 1
    assert (cfg.read_bytes(), cfg.stat().st_mtime_ns, cfg.stat().st_ino) == before


def test_the_venv_refuses_only_what_the_edit_breaks(cfg: Path, fake: FakeVenv):
    fake.refuse["omero.web.apps"] = "app 'nope' cannot be imported from the OMERO.web venv (pip install it there)"
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match="cannot be imported"):
        set_(cfg, "omero.web.apps", '["nope"]', probe=fake)
    assert cfg.read_bytes() == before
    # Already broken before the edit: an unrelated edit goes through, with a warning.
    cfg.write_text(BASE + 'apps = ["nope"]\n')
    outcome = set_(cfg, "omero.web.prefix", "/omero", probe=fake)
    assert outcome.written and any("cannot be imported" in w for w in outcome.warnings)
    assert fake.calls == 4  # each edit: the catalogue, then the verdict on the new values


def test_skipping_the_venv_check_writes_and_says_so(cfg: Path, fake: FakeVenv):
    parsed = edit.parse_key("omero.web.wsgi_workers")
    outcome = edit.edit(cfg, lambda doc, k: [edit.set_key(doc, parsed, "many", k)], probe=fake, venv_check=False)
    assert outcome.written and properties(cfg)["omero.web.wsgi_workers"] == "many"
    assert any("not asked" in w for w in outcome.warnings)


def test_a_file_that_is_not_toml_is_not_touched(cfg: Path):
    cfg.write_text(BASE + "broken = [\n")
    before = cfg.read_bytes()
    with pytest.raises(ConfigError, match=r"omerowebd.toml:\d+:\d+: TOML syntax error.*fix it by hand") as e:
        set_(cfg, "omero.web.prefix", "/omero")
    assert e.value.exit_code == 78
    assert cfg.read_bytes() == before


# -- the write ------------------------------------------------------------------------


def test_the_file_keeps_its_mode_and_owner_and_is_replaced_atomically(cfg: Path):
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    nobody = pwd.getpwnam("nobody")
    os.chown(cfg, 0, nobody.pw_gid)
    cfg.chmod(0o640)
    inode = cfg.stat().st_ino
    set_(cfg, "omero.web.prefix", "/omero")
    st = cfg.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, nobody.pw_gid, 0o640)
    assert st.st_ino != inode  # a new file renamed over the old one: readers never see half of it
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["omerowebd.toml", "omerowebd.toml.lock"]


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path, cfg: Path):
    link = tmp_path / "link.toml"
    link.symlink_to(cfg)
    set_(link, "omero.web.prefix", "/omero")
    assert link.is_symlink() and properties(cfg)["omero.web.prefix"] == "/omero"


def _open_fds_on(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def test_two_editors_take_turns_and_the_second_sees_the_first(cfg: Path):
    lock = cfg.with_name(cfg.name + ".lock")
    result: dict[str, object] = {}
    with edit._locked(cfg):
        editor = threading.Thread(target=lambda: result.update(outcome=set_(cfg, "omero.web.prefix", "/omero")))
        editor.start()
        deadline = time.monotonic() + 30
        while _open_fds_on(lock) < 2:  # the other editor is at the lock
            assert time.monotonic() < deadline, "the editor never reached the lock"
            time.sleep(0.01)
        assert "outcome" not in result
        # Meanwhile, this editor (holding the lock) changes the file.
        cfg.write_text(cfg.read_text().replace("wsgi_workers = 3", "wsgi_workers = 7"))
    editor.join(30)
    assert properties(cfg) == {"omero.web.wsgi_workers": "7", "omero.web.prefix": "/omero"}


def test_an_editor_that_cannot_get_the_lock_gives_up_cleanly(cfg: Path, monkeypatch):
    monkeypatch.setattr(edit, "LOCK_TIMEOUT", 0.2)
    before = cfg.read_bytes()
    with edit._locked(cfg):
        with pytest.raises(UserError, match="another edit holds"):
            set_(cfg, "omero.web.prefix", "/omero")
    assert cfg.read_bytes() == before


# -- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, secret", [
    ("omero.web.secret_key", True), ("omero.mail.password", True), ("omero.web.public.password", True),
    ("omero.db.pass", True), ("omero.web.api_token", True), ("omero.web.public.cache.key", True),
    ("omero.web.prefix", False), ("omero.web.public.user", False), ("omero.web.wsgi_workers", False),
])
def test_secrets_are_named_like_omero_config_hides_them(name: str, secret: bool):
    assert edit.is_secret(name) is secret
    assert (edit.shown(name, "s3cret", False) == "********") is secret
    assert edit.shown(name, "s3cret", True) == "s3cret"
