"""omerowebd-nginx-publish: what the root-run nginx unit lets through from
the files the unprivileged service writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import OMERO_VENV, REPO

pytestmark = pytest.mark.system

PUBLISH = REPO / "packaging" / "omerowebd-nginx-publish"

GOOD = """\
upstream omeroweb {
    server 127.0.0.1:4080 fail_timeout=0;
}
server {
    listen 80;
    server_name $hostname;
    sendfile on;
    client_max_body_size 0;
    # maintenance page serve from here; a comment with { braces }
    location @maintenance {
        root /var/lib/omerowebd/maintenance;
        try_files $uri /maintainance.html =502;
    }
    location /static { alias /opt/omero/web/omero-web/var/static; }
    location = /omerowebd-redirect { return 307 /webclient/; }
    location / {
        error_page 502 @maintenance;
        proxy_set_header Host $http_host;
        proxy_pass http://omeroweb;
    }
}
"""


def publish(src: Path, dest: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(PUBLISH), "--config", str(config or src / "missing.toml"), "--from", str(src), "--to", str(dest), "--no-test"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def dirs(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    return src, dest


def test_the_daemons_kind_of_file_is_published(dirs):
    src, dest = dirs
    (src / "omero-web.conf").write_text(GOOD)
    (src / ".omero-web.conf.x1y2.tmp").write_text("access_log /etc/half-written;")  # a write in progress
    result = publish(src, dest)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["omero-web.conf"]
    assert (dest / "omero-web.conf").read_text() == GOOD
    # A file the service no longer writes goes from the published copies too.
    (src / "omero-web.conf").unlink()
    assert publish(src, dest).returncode == 0
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    "evil",
    [
        "access_log /etc/cron.d/x;",
        "error_log /etc/cron.d/x;",
        "include /etc/shadow;",
        "load_module /tmp/x.so;",
        "client_body_temp_path /etc/x;",
        "ssl_certificate /etc/shadow;",
        "open_log_file_cache max=1;",
        '"access_log" /etc/x;',  # nginx accepts a quoted directive name
        'return 200 "#"; error_log /etc/x;',  # a '#' inside quotes is no comment
        "# a comment\naccess_log /etc/x;",
        "perl_modules /tmp;",
    ],
)
def test_a_directive_that_acts_on_paths_as_root_is_refused_and_nothing_changes(dirs, evil):
    src, dest = dirs
    (src / "omero-web.conf").write_text(GOOD)
    assert publish(src, dest).returncode == 0
    (src / "omero-web-location.include").write_text(f"location /x {{\n    {evil}\n}}\n")
    result = publish(src, dest)
    assert result.returncode == 1, result.stderr
    assert "omero-web-location.include" in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["omero-web.conf"]


def test_a_symlink_is_refused(dirs):
    src, dest = dirs
    (src / "omero-web.conf").symlink_to("/etc/shadow")
    result = publish(src, dest)
    assert result.returncode == 1 and "symbolic link" in result.stderr
    assert list(dest.iterdir()) == []


def test_the_admins_own_extra_directives_are_trusted(dirs, tmp_path):
    src, dest = dirs
    config = tmp_path / "omerowebd.toml"
    config.write_text('[omero.web]\nnginx_server_extra_config = ["access_log /var/log/nginx/omero.log;"]\n')
    (src / "omero-web.conf").write_text(GOOD.replace("sendfile on;", "sendfile on;\naccess_log /var/log/nginx/omero.log;"))
    result = publish(src, dest, config)
    assert result.returncode == 0, result.stderr


def test_the_published_directory_must_be_the_callers_alone(dirs):
    src, dest = dirs
    (src / "omero-web.conf").write_text(GOOD)
    os.chmod(dest, 0o775)
    result = publish(src, dest)
    assert result.returncode == 2 and "nobody else can write" in result.stderr


def test_omero_webs_own_templates_pass(dirs):
    """The server and location templates of the installed omero-web (the two the
    daemon renders), filled as `omero web config nginx` fills them. (The
    development one is a whole nginx.conf, rightly refused.)"""
    templates = sorted(
        t for name in ("nginx.conf.template", "nginx-location.conf.template")
        for t in OMERO_VENV.glob(f"lib/python3*/site-packages/omeroweb/templates/{name}")
    )
    if not templates:
        pytest.skip(f"no omero-web templates in {OMERO_VENV}")
    src, dest = dirs
    for template in templates:
        values = {"HTTPPORT": "80", "NGINX_SERVER_EXTRA_CONFIG": "", "MAX_BODY_SIZE": "0",
                  "SERVERNAME": "$hostname", "FASTCGI_EXTERNAL": "127.0.0.1:4080", "PREFIX_NAME": ""}
        text = re.sub(r"%\((\w+)\)[sd]", lambda m: values.get(m.group(1), "/x"), template.read_text())
        (src / template.name.replace(".template", "")).write_text(text)
    result = publish(src, dest)
    assert result.returncode == 0, result.stderr
