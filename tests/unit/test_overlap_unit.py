"""Issue 11 in-process: nginx files are checked before a new generation
starts and switched only after; the site's config.xml knows who else wrote it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from omerowebd import nginx, omero_config
from omerowebd.desired import derive
from omerowebd.errors import UserError

from unit.test_nginx import Log, info, make_config, script  # noqa: F401 (info is a fixture)


def test_stage_checks_the_new_files_and_nginx_keeps_the_old_until_the_switch(tmp_path: Path, info) -> None:
    server = tmp_path / "state" / "nginx" / "omero-web.conf"
    seen = tmp_path / "seen-by-check"
    reloads = tmp_path / "reloads"
    table = (f"validate_command = {script(tmp_path, 'check', f'cat {server} >> {seen}')}\n"
             f"reload_command = {script(tmp_path, 'reload', f'echo x >> {reloads}')}")
    output = nginx.NginxOutput(Log())
    first = make_config(tmp_path, table, omero='prefix = "/a"\n')
    asyncio.run(output.apply(first, first.properties, info))
    old = server.read_bytes()
    second = make_config(tmp_path, table, omero='prefix = "/b"\n')

    async def stage_then_switch() -> None:
        switch = await output.stage(derive(second, info, ""))
        assert switch is not None
        assert "location /b {" in seen.read_text()  # the check saw the new files where nginx includes them
        assert server.read_bytes() == old  # and they are back to what nginx runs
        assert reloads.read_text() == "x\n"  # nginx was not reloaded
        undo = await switch()
        assert b"location /b {" in server.read_bytes() and reloads.read_text() == "x\nx\n"
        await undo()
        assert server.read_bytes() == old and reloads.read_text() == "x\nx\nx\n"

    asyncio.run(stage_then_switch())
    assert asyncio.run(output.stage(derive(first, info, ""))) is None  # nothing differs: no switch


def test_a_refused_stage_changes_nothing(tmp_path: Path, info) -> None:
    server = tmp_path / "state" / "nginx" / "omero-web.conf"
    check = script(tmp_path, "check", f"if grep -q /bad {server}; then echo 'nginx: [emerg] no' >&2; exit 1; fi")
    reloads = tmp_path / "reloads"
    table = f"validate_command = {check}\nreload_command = {script(tmp_path, 'reload', f'echo x >> {reloads}')}"
    output = nginx.NginxOutput(Log())
    good = make_config(tmp_path, table, omero='prefix = "/good"\n')
    asyncio.run(output.apply(good, good.properties, info))
    before = server.read_bytes()
    bad = make_config(tmp_path, table, omero='prefix = "/bad"\n')
    with pytest.raises(UserError, match="nginx rejected the new config"):
        asyncio.run(output.stage(derive(bad, info, "")))
    assert server.read_bytes() == before and reloads.read_text() == "x\n"


# -- the site's config.xml ------------------------------------------------------------

PROPS = {"omero.web.login_logo": "/static/a.png", "omero.web.secret_key": "s3cr3t-value"}


def write(omerodir: Path, state: Path, props: dict[str, str]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    omero_config.write_site_config_xml(omerodir, state, omero_config.render_config_xml(props))


def test_what_omerowebd_wrote_is_not_foreign(tmp_path: Path) -> None:
    omerodir, state = tmp_path / "omerodir", tmp_path / "state"
    assert omero_config.foreign_edits(omerodir, state, PROPS, PROPS) is None  # no file: nothing to lose
    write(omerodir, state, PROPS)
    assert omero_config.foreign_edits(omerodir, state, {}, {}) is None
    assert "s3cr3t-value" not in (state / omero_config.LEDGER).read_text()  # digests, not values
    # The same properties in another layout (omero-py rewrites the whole file): not an edit.
    reordered = dict(reversed(list(PROPS.items())))
    omero_config.write_config_bytes(omero_config.config_xml_path(omerodir),
                                    omero_config.render_config_xml(reordered, "elsewhere"))
    assert omero_config.foreign_edits(omerodir, state, PROPS, PROPS) is None


def test_edits_are_named_and_kept_when_the_new_config_has_them(tmp_path: Path) -> None:
    omerodir, state = tmp_path / "omerodir", tmp_path / "state"
    write(omerodir, state, PROPS)
    edited = {"omero.web.login_logo": "/static/b.png", "omero.web.debug": "true"}  # set two, unset the key
    omero_config.write_config_bytes(omero_config.config_xml_path(omerodir), omero_config.render_config_xml(edited))
    found = omero_config.foreign_edits(omerodir, state, PROPS, PROPS)
    assert found is not None
    assert found.names == ("omero.web.debug", "omero.web.login_logo", "omero.web.secret_key")
    assert "s3cr3t-value" not in found.describe() + found.ways_out("x.toml") + repr(found)
    assert found.lost_by(PROPS, PROPS) == list(found.names)
    assert found.lost_by(edited, edited) == []  # taken over into the TOML
    partly = {**PROPS, "omero.web.debug": "true"}
    assert found.lost_by(partly, partly) == ["omero.web.login_logo", "omero.web.secret_key"]


def test_without_a_record_the_file_is_compared_with_what_would_be_written(tmp_path: Path) -> None:
    omerodir, state = tmp_path / "omerodir", tmp_path / "state"
    omero_config.write_config_xml(omerodir, {"omero.web.login_logo": "/static/old-site.png"})
    found = omero_config.foreign_edits(omerodir, state, PROPS, PROPS)
    assert found is not None and found.names == ("omero.web.login_logo",)
    pinned = omero_config.with_session_path({}, tmp_path / "sessions")  # the daemon's own addition
    omero_config.write_config_xml(omerodir, {})
    assert omero_config.foreign_edits(omerodir, state, pinned, {}) is None


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(b"<icegrid><properties"), "not a config.xml omero-py can read"),
    (lambda p: (p.unlink(), os.symlink("/etc/passwd", p)), "cannot read it"),
    (lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
])
def test_a_file_that_cannot_be_read_is_reported_not_read(tmp_path: Path, damage, why) -> None:
    omerodir, state = tmp_path / "omerodir", tmp_path / "state"
    write(omerodir, state, PROPS)
    damage(omero_config.config_xml_path(omerodir))
    found = omero_config.foreign_edits(omerodir, state, PROPS, PROPS)
    assert found is not None and found.problem is not None and why in found.problem
    assert found.lost_by(PROPS, PROPS) == ["config.xml"]
