"""omero_config.py: config.xml written the way omero-py reads it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import VENV

from omerowebd import omero_config as oc

PROPS = {
    "omero.web.prefix": "/omero",
    "omero.web.ui.top_links": '[["Data", "webindex", {"title": "Browse \\"data\\""}]]',
    "omero.web.login_logo": "/static/ünïcødé & <logo>.png",
    "omero.web.public.enabled": "true",
}


def test_round_trip_through_our_reader(tmp_path):
    assert oc.write_config_xml(tmp_path, PROPS, "/etc/omerowebd/omerowebd.toml")
    path = oc.config_xml_path(tmp_path)
    assert oc.read_config_xml(path) == PROPS
    assert path.stat().st_mode & 0o777 == 0o600
    assert not oc.write_config_xml(tmp_path, PROPS, "/etc/omerowebd/omerowebd.toml")  # unchanged: not rewritten
    assert not Path(f"{path}.lock").exists()


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs the OMERO.web venv")
def test_omero_py_reads_what_we_write(tmp_path):
    oc.write_config_xml(tmp_path, PROPS)
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c",
         "import json, sys, omero.config\n"
         "c = omero.config.ConfigXml(sys.argv[1], read_only=True)\n"
         "print(json.dumps({'map': c.as_map(), 'default': c.default()}))\nc.close()",
         str(oc.config_xml_path(tmp_path))],
        capture_output=True, text=True, check=True,
    )
    got = json.loads(out.stdout)
    assert got["default"] == "default"
    assert {k: v for k, v in got["map"].items() if k != "omero.config.version"} == PROPS


def test_session_path_is_pinned_unless_the_site_chose_one():
    pinned = oc.with_session_path({}, Path("/var/lib/omerowebd/sessions"))
    assert json.loads(pinned[oc.ADDITIONAL_SETTINGS]) == [["SESSION_FILE_PATH", "/var/lib/omerowebd/sessions"]]
    assert oc.session_file_path(pinned) == "/var/lib/omerowebd/sessions"

    theirs = {oc.ADDITIONAL_SETTINGS: '[["SESSION_FILE_PATH", "/srv/sessions"], ["X", 1]]'}
    assert oc.with_session_path(theirs, Path("/var/lib/x")) == theirs

    other = {oc.ADDITIONAL_SETTINGS: '[["CSRF_COOKIE_NAME", "c"]]'}
    assert json.loads(oc.with_session_path(other, Path("/s"))[oc.ADDITIONAL_SETTINGS]) == [
        ["CSRF_COOKIE_NAME", "c"], ["SESSION_FILE_PATH", "/s"]]


def test_reads_the_active_profile(tmp_path):
    path = tmp_path / "config.xml"
    path.write_text(
        '<icegrid><properties id="__ACTIVE__"><property name="omero.config.profile" value="prod"/></properties>'
        '<properties id="default"><property name="a" value="1"/></properties>'
        '<properties id="prod"><property name="omero.config.version" value="5.1.0"/><property name="b" value="2"/></properties>'
        "</icegrid>"
    )
    assert oc.read_config_xml(path) == {"b": "2"}


def test_encode_value():
    assert oc.encode_value(True) == "true" and oc.encode_value(3) == "3"
    assert oc.encode_value(["a", {"b": 1}]) == '["a", {"b": 1}]'
    with pytest.raises(ValueError):
        oc.encode_value(float("nan"))
