"""migrate.py: import from `omero config get` output or config.xml; export in `omero config load` format.

Real files made by omero-py, and omero-py reading the result, are in
tests/integration/test_config_cli.py; here the formats and the typing rules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit

from omerowebd import config as config_module
from omerowebd import edit, migrate, omero_config
from omerowebd.venv import VenvInfo

from .test_edit import CATALOGUE, FakeVenv, no_venv

HEAD = """\
[daemon]
omerodir = "/srv/omero-web"
venv = "/srv/venv3"

[omero.web]
# Kept: a comment of the admin's.
prefix = "/old"
"""

SITE = {
    "omero.web.prefix": "/omero",
    "omero.web.public.enabled": "true",
    "omero.web.public.user": 'say "hi" to café ☃',
    "omero.web.wsgi_workers": "8",
    "omero.web.apps": '["omero_iviewer", "omero_figure"]',  # as omero config append writes it
    "omero.web.ui.top_links": '[["Data","webindex"]]',  # as a person typed it: no spaces
    "omero.web.caches": '{"default": {"BACKEND": "x", "TIMEOUT": null}}',  # null: TOML has none
    "omero.web.application_server": "wsgi-tcp",
    "omero.web.application_server.host": "0.0.0.0",
    "omero.web.application_server.port": "04080",  # not what an integer gives back
    "omero.web.secret_key": "s3cr=t",
    "omero.web.login_incorrect_credentials_text": "Wrong.\nTry again.",
    "omero.web.debug": "True",  # valid for OMERO.web, but true would give back "true"
}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(HEAD)
    return path


def import_(cfg: Path, source_path: Path, probe=None, **kwargs) -> tuple[edit.Outcome, migrate.Imported]:
    source = migrate.read_source(source_path)
    report = []

    def mutate(doc, knowledge):
        report.append(migrate.import_properties(doc, source, knowledge, **kwargs))
        return report[0].changes

    return edit.edit(cfg, mutate, probe=probe or FakeVenv()), report[0]


def config_get_output(properties: dict[str, str]) -> str:
    """What `omero config get --show-password` prints: sorted KEY=VALUE lines."""
    return "".join(f"{k}={properties[k]}\n" for k in sorted(properties))


def written_properties(cfg: Path) -> dict[str, str]:
    """What omero-py would read from the config.xml the daemon writes (omero-py itself: the integration tests)."""
    xml = cfg.parent / "config.xml"
    xml.write_bytes(omero_config.render_config_xml(config_module.load(cfg).properties))
    return omero_config.read_config_xml(xml)


# -- reading ------------------------------------------------------------------------


def test_config_get_output_with_multi_line_values_and_equals_signs(tmp_path: Path):
    text = config_get_output(SITE)
    assert migrate.parse_config_get(text, tmp_path / "backup.txt") == SITE


def test_a_continuation_line_that_looks_like_a_property_but_sorts_before_stays_in_the_value(tmp_path: Path):
    text = "omero.web.b=first\nomero.web.a=still the value of b\nomero.web.c=3\n"
    assert migrate.parse_config_get(text, tmp_path / "f") == {
        "omero.web.b": "first\nomero.web.a=still the value of b", "omero.web.c": "3"}


def test_trailing_blank_lines_of_a_value_and_comments_before_the_first_property(tmp_path: Path):
    text = "# made on the old host\n\nomero.web.a=x\n\nomero.web.b=y\n"
    assert migrate.parse_config_get(text, tmp_path / "f") == {"omero.web.a": "x\n", "omero.web.b": "y"}


def test_a_backup_made_without_show_password_is_refused(tmp_path: Path):
    with pytest.raises(migrate.MigrationError, match=r"f:2: the value of omero.web.public.password is hidden .*--show-password"):
        migrate.parse_config_get("omero.web.prefix=/x\nomero.web.public.password=********\n", tmp_path / "f")


def test_text_that_is_not_config_get_output_is_refused_with_what_to_give(tmp_path: Path):
    with pytest.raises(migrate.MigrationError, match=r"f:1: not a KEY=VALUE line"):
        migrate.parse_config_get("Usage: omero config get\n", tmp_path / "f")


def test_config_xml_is_read_from_its_active_profile(tmp_path: Path):
    path = tmp_path / "config.xml"
    path.write_text(
        '<icegrid><properties id="__ACTIVE__"><property name="omero.config.profile" value="site"/>'
        '<property name="omero.web.prefix" value="/stale-copy"/></properties>'
        '<properties id="default"><property name="omero.web.prefix" value="/default"/></properties>'
        '<properties id="site"><property name="omero.config.version" value="5.1.0"/>'
        '<property name="omero.web.prefix" value="/site"/>'
        '<property name="omero.web.public.user" value="a &quot;b&quot;&#10;c"/></properties></icegrid>')
    source = migrate.read_source(path)
    assert (source.format, source.profile) == ("config.xml", "site")
    assert source.properties == {"omero.web.prefix": "/site", "omero.web.public.user": 'a "b"\nc'}


@pytest.mark.parametrize("content, reason", [
    ("<icegrid><properties", "not a config.xml omero-py can read"),
    ("<html></html>", "not an OMERO config.xml"),
    ('<icegrid><properties id="__ACTIVE__"><property name="omero.config.profile" value="gone"/></properties></icegrid>',
     "active profile 'gone'"),
    ('<icegrid><properties id="default"><property name="omero.config.version" value="4.2.0"/></properties></icegrid>',
     "written by OMERO 4.2.0"),
])
def test_config_xml_problems_are_one_line(tmp_path: Path, content: str, reason: str):
    path = tmp_path / "config.xml"
    path.write_text(content)
    with pytest.raises(migrate.MigrationError, match=reason):
        migrate.read_source(path)


# -- what root reads: the file the admin named, nothing a link or a FIFO puts there ----------
#
# `check` tells root to import OMERODIR/etc/grid/config.xml, which the service
# user writes. Here that user is `nobody`, owning the directory the file is in.

NOBODY = 65534
ROOT_ONLY = "omero.web.secret_name_of_root=only-root-reads-this\n"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="what root reads needs root")


@pytest.fixture
def grid() -> Iterator[Path]:
    """OMERODIR/etc/grid as a site has it: the service user's directory, on a path root owns."""
    top = Path(tempfile.mkdtemp(prefix="omerowebd-import-"))
    top.chmod(0o755)
    (top / "secret").mkdir(mode=0o700)
    (top / "secret" / "root-only.txt").write_text(ROOT_ONLY)
    (top / "secret" / "root-only.txt").chmod(0o600)
    grid = top / "etc" / "grid"
    grid.mkdir(parents=True)
    os.chown(grid, NOBODY, NOBODY)
    try:
        yield grid
    finally:
        shutil.rmtree(top)


def read_in_time(path: Path) -> migrate.Source:
    """read_source, failing the test (not hanging it) if it blocks."""
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(migrate.read_source(path))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, f"reading {path} blocked"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[return-value]


def _as_nobody(fn) -> None:
    """Run ``fn`` in a child with nobody's uid: what the service user itself can do."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0


@as_root
def test_a_fifo_planted_by_the_service_user_is_refused_at_once(grid: Path):
    _as_nobody(lambda: os.mkfifo(grid / "config.xml"))
    with pytest.raises(migrate.MigrationError, match=r"config.xml: not a regular file"):
        read_in_time(grid / "config.xml")


@as_root
def test_a_link_to_a_file_only_root_reads_is_not_followed(grid: Path):
    secret = grid.parent.parent / "secret" / "root-only.txt"
    _as_nobody(lambda: os.symlink(secret, grid / "config.xml"))
    with pytest.raises(migrate.MigrationError, match=r"a symbolic link, not followed: name the file") as caught:
        read_in_time(grid / "config.xml")
    assert "secret_name_of_root" not in str(caught.value)


@as_root
def test_a_link_to_a_device_is_not_followed_and_a_device_is_not_read(grid: Path):
    _as_nobody(lambda: os.symlink("/dev/zero", grid / "config.xml"))
    with pytest.raises(migrate.MigrationError, match=r"a symbolic link"):
        read_in_time(grid / "config.xml")
    with pytest.raises(migrate.MigrationError, match=r"/dev/zero: not a regular file"):
        read_in_time(Path("/dev/zero"))


@as_root
def test_a_hard_link_to_a_file_only_root_reads_is_refused(grid: Path):
    secret = grid.parent.parent / "secret" / "root-only.txt"
    os.link(secret, grid / "config.xml")  # what nobody could do where hard links are not protected
    with pytest.raises(migrate.MigrationError, match=r"has 2 names \(hard links\)") as caught:
        read_in_time(grid / "config.xml")
    assert "secret_name_of_root" not in str(caught.value)


@as_root
def test_a_directory_link_placed_by_the_service_user_is_refused(grid: Path):
    # OMERODIR/etc is the service user's: it makes etc/grid a link to a directory of root's.
    etc = grid.parent
    os.chown(etc, NOBODY, NOBODY)
    (grid.parent.parent / "secret" / "config.xml").write_text(ROOT_ONLY)
    shutil.rmtree(grid)
    _as_nobody(lambda: os.symlink(etc.parent / "secret", grid))
    with pytest.raises(migrate.MigrationError, match=r"reached through a symbolic link, and directory .* is owned by "
                       r"uid 65534, not root: name the file itself") as caught:
        read_in_time(grid / "config.xml")
    assert "secret_name_of_root" not in str(caught.value)


@as_root
def test_a_directory_link_root_alone_controls_is_followed(grid: Path):
    top = grid.parent.parent
    (top / "omero-web-5.28").mkdir(mode=0o755)
    (top / "omero-web-5.28" / "backup.txt").write_text("omero.web.prefix=/omero\n")
    (top / "OMERO.web").symlink_to(top / "omero-web-5.28")
    assert read_in_time(top / "OMERO.web" / "backup.txt").properties == {"omero.web.prefix": "/omero"}


def test_a_source_over_the_limit_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(migrate, "MAX_SOURCE", 1024)
    path = tmp_path / "backup.txt"
    path.write_text("omero.web.prefix=/" + "x" * 2000 + "\n")
    with pytest.raises(migrate.MigrationError, match=r"backup.txt: over 0 MiB"):
        read_in_time(path)
    assert migrate.MAX_SOURCE == 1024 and omero_config.MAX_CONFIG_XML == 4 << 20


def test_a_config_xml_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "config.xml"
    path.write_text('<icegrid><properties id="default"><property name="omero.web.prefix" value="/a"/>'
                    "</properties></icegrid>")
    monkeypatch.setattr(omero_config, "read_config_xml", None)  # no second read by path (it may have changed)
    assert read_in_time(path).properties == {"omero.web.prefix": "/a"}


# -- importing -------------------------------------------------------------------------


def test_import_loses_nothing_and_types_only_what_comes_back_identical(cfg: Path, tmp_path: Path):
    backup = tmp_path / "backup.txt"
    backup.write_text(config_get_output(SITE))
    outcome, report = import_(cfg, backup)
    assert outcome.written
    assert written_properties(cfg) == SITE
    web = tomlkit.parse(cfg.read_text())["omero"]["web"]
    assert web["public"]["enabled"] is True
    assert isinstance(web["wsgi_workers"], tomlkit.items.Integer)
    assert isinstance(web["apps"], tomlkit.items.Array)
    # Each of these would come back different if typed: kept as text.
    for key in ("ui.top_links", "caches", '"application_server.port"', "debug"):
        value = web[key.strip('"')] if '"' in key else _dotted(web, key)
        assert isinstance(value, str), key
    typed = {c.key for c in report.changes if c.written_as != "text"}
    assert typed == {"omero.web.public.enabled", "omero.web.wsgi_workers", "omero.web.apps"}
    assert "# Kept: a comment of the admin's." in cfg.read_text()


def _dotted(table, dotted: str):
    for part in dotted.split("."):
        table = table[part]
    return table


def test_import_of_unicode_json_keeps_the_text_omero_py_had(cfg: Path, tmp_path: Path):
    escaped = json.dumps(["café"])  # as omero config append writes it: \u00e9
    literal = '["café"]'  # as a person typed it
    backup = tmp_path / "b.txt"
    backup.write_text(config_get_output({"omero.web.apps": escaped, "omero.web.staticfile_dirs": literal}))
    import_(cfg, backup)
    assert written_properties(cfg) == {"omero.web.apps": escaped, "omero.web.staticfile_dirs": literal}


def test_without_the_venv_everything_is_imported_as_text(cfg: Path, tmp_path: Path):
    backup = tmp_path / "b.txt"
    backup.write_text(config_get_output(SITE))
    import_(cfg, backup, probe=no_venv)
    assert written_properties(cfg) == SITE
    assert tomlkit.parse(cfg.read_text())["omero"]["web"]["wsgi_workers"] == "8"


def test_import_replaces_the_tree_unless_merging(cfg: Path, tmp_path: Path):
    backup = tmp_path / "b.txt"
    backup.write_text("omero.web.wsgi_workers=2\n")
    _, report = import_(cfg, tmp_path / "b.txt", merge=True)
    assert written_properties(cfg) == {"omero.web.prefix": "/old", "omero.web.wsgi_workers": "2"}
    assert report.removed == []
    _, report = import_(cfg, backup)
    assert written_properties(cfg) == {"omero.web.wsgi_workers": "2"}
    assert report.removed == ["omero.web.prefix"]


def test_one_import_removes_and_adds_dotted_keys(cfg: Path, tmp_path: Path):
    backup = tmp_path / "b.txt"
    wanted = {"omero.web.public.enabled": "true", "omero.web.public.user": "guest", "omero.web.ui.center_plugins": "[]"}
    backup.write_text(config_get_output({**wanted, "omero.web.wsgi_workers": "4"}))
    cfg.write_text(HEAD + "wsgi_workers = 2\npage_size = 100\n")
    _, report = import_(cfg, backup)
    wanted["omero.web.wsgi_workers"] = "4"
    assert report.removed == ["omero.web.page_size", "omero.web.prefix"]
    assert written_properties(cfg) == wanted
    assert "public.enabled = true" in cfg.read_text()


def test_skip_and_foreign_names(cfg: Path, tmp_path: Path):
    backup = tmp_path / "b.txt"
    backup.write_text("Ice.MessageSizeMax=65536\nomero.db.host=db\nomero.web.prefix=/p\n")
    before = cfg.read_bytes()
    with pytest.raises(migrate.MigrationError, match=r"Ice.MessageSizeMax: not OMERO properties .*--skip"):
        import_(cfg, backup)
    assert cfg.read_bytes() == before
    _, report = import_(cfg, backup, skip=["Ice.*", "omero.db.*"])
    assert report.skipped == ["Ice.MessageSizeMax", "omero.db.host"]
    assert written_properties(cfg) == {"omero.web.prefix": "/p"}


def test_an_import_omero_web_would_refuse_is_refused(cfg: Path, tmp_path: Path):
    fake = FakeVenv()
    fake.refuse["omero.web.apps"] = "app 'gone' cannot be imported from the OMERO.web venv (pip install it there)"
    backup = tmp_path / "b.txt"
    backup.write_text('omero.web.apps=["gone"]\n')
    before = cfg.read_bytes()
    with pytest.raises(edit.EditRefused, match="pip install it there"):
        import_(cfg, backup, probe=fake)
    assert cfg.read_bytes() == before


def test_typing_rules():
    def toml_of(text: str, kind: str | None) -> object:
        return edit.plain_value(edit.property_item("omero.web.x", text, kind, exact=True))

    assert toml_of("true", "bool") is True and toml_of("false", "bool") is False
    assert toml_of("TRUE", "bool") == "TRUE"
    assert toml_of("42", "int") == 42 and toml_of("-3", "int") == -3
    assert toml_of("+3", "int") == "+3" and toml_of(" 3", "int") == " 3"
    assert toml_of("99999999999999999999", "int") == "99999999999999999999"  # past TOML's 64 bits
    assert toml_of('["a", 1, true, 1.5]', "list") == ["a", 1, True, 1.5]
    assert toml_of('{"a": [1, {"b": "c"}]}', "object") == {"a": [1, {"b": "c"}]}
    assert toml_of('{"a": 1}', "list") == '{"a": 1}'  # not what the kind says: text
    assert toml_of("[1.0e5]", "list") == "[1.0e5]"  # comes back as [100000.0]
    assert toml_of("[NaN]", "list") == "[NaN]"
    assert toml_of("8", None) == "8" and toml_of("8", "str") == "8"


# -- exporting -------------------------------------------------------------------------


def test_export_is_the_omero_config_load_format_with_secrets_left_out(tmp_path: Path):
    text, warnings = migrate.export_text(SITE, show_secrets=False, source="/etc/omerowebd/omerowebd.toml")
    lines = text.splitlines()
    assert lines[0].startswith("# OMERO properties exported by omerowebctl from /etc/omerowebd/omerowebd.toml")
    assert "omero.web.prefix=/omero" in lines
    assert "omero.web.apps=" + SITE["omero.web.apps"] in lines
    assert "# omero.web.secret_key=******** (hidden: export with --show-password to carry it)" in lines
    assert "s3cr=t" not in text
    assert any(line.startswith("# omero.web.login_incorrect_credentials_text: left out") for line in lines)
    assert len(warnings) == 2
    # What a load would read back: every line that is not a comment, exactly.
    full, _ = migrate.export_text(SITE, show_secrets=True, source="x")
    back = migrate.parse_config_get(full, tmp_path / "export.txt")
    loadable = {k: v for k, v in SITE.items() if migrate.load_problem(v) is None}
    assert back == loadable and "omero.web.secret_key" in back


@pytest.mark.parametrize("value, problem", [
    ("a\nb", "line breaks"), (" padded", "strip"), ("C:\\dir\\", "continuation"), ("fine = yes", None),
])
def test_what_omero_config_load_cannot_carry(value: str, problem: str | None):
    found = migrate.load_problem(value)
    assert (found is None) if problem is None else (problem in found)


def test_fake_venv_matches_the_catalogue_used_above():
    info = FakeVenv()(Path("/v"), {"omero.web.wsgi_workers": "x"})
    assert isinstance(info, VenvInfo) and "omero.web.wsgi_workers" in info.errors and info.catalogue is CATALOGUE
