"""config_file.py: one way to read and parse the config file, one error format wherever it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from omerowebd import config, config_file, ctl, migrate
from omerowebd.errors import ConfigError
from omerowebd.exits import EXIT_CONFIG

HEAD = """\
[daemon]
omerodir = "/opt/omero/web/omero-web"
venv = "/opt/omero/web/venv3"
[omero.web]
prefix = /omero
"""


def problem(text: str, path: str = "/etc/omerowebd/omerowebd.toml") -> str:
    with pytest.raises(config_file.Problem) as e:
        config_file.parse(text, path)
    return str(e.value)


def test_a_syntax_error_names_line_and_column_counted_from_one():
    assert problem(HEAD) == "/etc/omerowebd/omerowebd.toml:5:10: TOML syntax error: Invalid value"


def test_an_error_at_the_end_names_the_end_of_the_last_line():
    assert problem('[daemon]\nlist = [\n').startswith("/etc/omerowebd/omerowebd.toml:2:9: TOML syntax error")


def test_a_key_set_twice_is_named_on_its_line():
    assert problem("[daemon]\nvenv = 'a'\nvenv = 'b'\n") == (
        "/etc/omerowebd/omerowebd.toml:3: venv is set twice: keep one (TOML allows each key and table once)")
    assert problem("[daemon]\n[daemon]\n") == (
        "/etc/omerowebd/omerowebd.toml:2: table [daemon] is declared twice: merge the two into one")


def test_a_document_keeps_its_layout():
    text = "# a comment\n[daemon]  # here\nvenv = 'a'\n"
    assert config_file.parse(text, "x").as_string() == text


def test_reading_and_decoding_say_what_is_wrong_in_one_line(tmp_path: Path):
    with pytest.raises(config_file.Problem, match=r"config file not found \(pass --config or set \$OMEROWEBD_CONFIG\)"):
        config_file.read(tmp_path / "missing.toml")
    with pytest.raises(config_file.Problem, match=r"x.toml: not UTF-8 text \(byte 2\)"):
        config_file.decode(b"ab\xff", "x.toml")


def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = ctl.main(list(argv))
    return code, capsys.readouterr().err


def test_the_same_broken_file_gives_the_same_line_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The daemon's load, `config set` and `config import` name the same file:line:column with the same words."""
    path = tmp_path / "omerowebd.toml"
    path.write_text(HEAD)
    expected = f"{path}:5:10: TOML syntax error: Invalid value"

    with pytest.raises(ConfigError) as loaded:
        config.load(path)
    assert str(loaded.value) == expected

    code, err = run_ctl(capsys, "--config", str(path), "config", "set", "omero.web.wsgi_workers", "3",
                        "--skip-venv-check")
    assert code == EXIT_CONFIG and f"omerowebctl: {expected}; fix it by hand first" in err

    backup = tmp_path / "backup.txt"
    backup.write_text("omero.web.prefix=/omero\n")
    code, err = run_ctl(capsys, "--config", str(path), "config", "import", str(backup), "--skip-venv-check")
    assert code == EXIT_CONFIG and f"omerowebctl: {expected}; fix it by hand first" in err
    assert path.read_text() == HEAD  # nothing written


def test_text_that_is_not_utf8_is_named_alike_in_the_config_and_an_import_source(tmp_path: Path):
    path = tmp_path / "omerowebd.toml"
    path.write_bytes(b"[daemon]\nvenv = '\xff'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text \(byte 17\)$"):
        config.load(path)
    source = tmp_path / "backup.txt"
    source.write_bytes(b"omero.web.prefix=\xff\n")
    with pytest.raises(migrate.MigrationError, match=rf"^{source}: not UTF-8 text \(byte 17\)$"):
        migrate.read_source(source)
