"""Links below STATIC_ROOT, through a real nginx: the service user writes
STATIC_ROOT, nginx's workers serve it. A link that user plants there, to a
file or a directory someone else owns, is not followed (403/404); the
daemon's own release links (the service user's, to its own files) and plain
files still answer 200. The same location as `omero web config nginx-location`
renders it, without omerowebd's addition, serves the planted link: that is
the hole the addition closes.

nginx's templates and settings come from the real omero-web in the venv; no
OMERO.web needs to run (only the static location answers here)."""

from __future__ import annotations

import os
import pwd
import textwrap
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd import nginx, venv
from omerowebd.venv import VenvInfo

from conftest import free_port

from .test_nginx_serving import Nginx, get

pytestmark = pytest.mark.omeroweb

if os.geteuid() != 0:
    pytest.skip("planting links owned by another user needs root (lchown)", allow_module_level=True)

NOBODY = pwd.getpwnam("nobody")  # stands in for the service user
SECRET = b"root's file, readable by nginx's workers\n"
CSS = b"body { color: black; }\n"


@pytest.fixture(scope="module")
def info(omero_venv: Path) -> VenvInfo:
    return venv.probe_sync(omero_venv, {})


def _theirs(*paths: Path) -> None:
    for path in paths:
        os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)


def _static_root(tmp_path: Path) -> Path:
    """STATIC_ROOT as the daemon leaves it: a release directory and links into it, all the service user's;
    then what that user plants: links to root's file and root's directory."""
    root = tmp_path / "static"
    release = root / "release-5.29.0-0123456789ab"
    (release / "webgateway" / "css").mkdir(parents=True)
    (release / "webgateway" / "css" / "ome.body.css").write_bytes(CSS)
    (root / "plain.css").write_bytes(CSS)
    (root / "webgateway").symlink_to(release.name + "/webgateway")  # the daemon's unversioned name
    secrets = tmp_path / "roots"  # root's, world-readable: what www-data could read anyway
    secrets.mkdir(mode=0o755)
    (secrets / "secret.txt").write_bytes(SECRET)
    os.chmod(secrets / "secret.txt", 0o644)
    (root / "secret.txt").symlink_to(secrets / "secret.txt")
    (root / "rootsdir").symlink_to(secrets)
    (release / "webgateway" / "css" / "deep.txt").symlink_to(secrets / "secret.txt")
    for dirpath, dirnames, filenames in os.walk(root):
        _theirs(Path(dirpath), *(Path(dirpath) / n for n in dirnames + filenames))
    return root


def _location_files(tmp_path: Path, omero_venv: Path, info: VenvInfo, static_root: Path) -> tuple[Path, Path]:
    """The daemon's location include, and omero-web's own rendering of the same settings."""
    toml = tmp_path / "omerowebd.toml"
    toml.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{tmp_path / 'omerodir'}"
        venv = "{omero_venv}"
        state_dir = "{tmp_path / 'state'}"
        bind = ["127.0.0.1:9"]

        [omero.web]
        static_root = "{static_root}"
        """))
    config = config_module.load(toml)
    out = nginx.render_outputs(config, config.properties, info, ["127.0.0.1:9"])
    ours = tmp_path / "ours.include"
    ours.write_bytes(out.files[out.location])
    assert b"disable_symlinks if_not_owner;" in out.files[out.location]
    plain = tmp_path / "plain.include"
    web = nginx.web_settings(config.properties, info, config.daemon.omerodir)
    plain.write_text(nginx.render("location", web, info))
    assert "disable_symlinks" not in plain.read_text()
    return ours, plain


def test_links_planted_in_static_root_are_not_followed(tmp_path: Path, omero_venv: Path, info: VenvInfo) -> None:
    static_root = _static_root(tmp_path)
    ours, plain = _location_files(tmp_path, omero_venv, info, static_root)
    servers = tmp_path / "servers.conf"
    front = Nginx(tmp_path / "nginx", f"include {servers};")
    other_port = free_port()
    servers.write_text(f"server {{ listen 127.0.0.1:{front.port}; include {ours}; }}\n"
                       f"server {{ listen 127.0.0.1:{other_port}; include {plain}; }}\n")
    checked = front.test()
    assert checked.returncode == 0, checked.stderr
    try:
        front.start()
        # What the daemon serves: files and its own links.
        for path in ("/static/plain.css", "/static/webgateway/css/ome.body.css",
                     "/static/release-5.29.0-0123456789ab/webgateway/css/ome.body.css"):
            r = get(front.port, path)
            assert (r.status, r.body) == (200, CSS), path
        # What the service user planted: a link to root's file, to root's directory, one deep inside a release.
        planted = ("/static/secret.txt", "/static/rootsdir/secret.txt", "/static/webgateway/css/deep.txt",
                   "/static/release-5.29.0-0123456789ab/webgateway/css/deep.txt")
        for path in planted:
            r = get(front.port, path)
            assert r.status in (403, 404) and SECRET not in r.body, (path, r.status)
        # omero-web's own text follows them: the hole the addition closes.
        for path in planted:
            r = get(other_port, path)
            assert (r.status, r.body) == (200, SECRET), (path, r.status)
    finally:
        front.stop()
