"""check's warnings about settings that break a site served by several hosts (omerowebd/multihost.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from omerowebd import multihost
from omerowebd.config import Config, parse

DEFAULTS = {"omero.web.session_engine": "django.contrib.sessions.backends.file",
            "omero.web.caches": '{"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}'}
INFO = type("Info", (), {"default": staticmethod(DEFAULTS.get)})()
REDIS = """
session_engine = "django.contrib.sessions.backends.cache"
caches = {default = {BACKEND = "django_redis.cache.RedisCache", LOCATION = "redis://:pw@10.0.0.5:6379/0"}}
"""


def config(omero: str = "", upstreams: bool = True, state_dir: str = "/var/lib/omerowebd") -> Config:
    text = textwrap.dedent(f"""\
        [daemon]
        omerodir = "/opt/omero/web/omero-web"
        venv = "/opt/omero/web/venv3"
        state_dir = "{state_dir}"
        [nginx]
        upstreams = {'["10.0.0.2:4080"]' if upstreams else '[]'}
        [omero.web]
        """) + textwrap.dedent(omero)
    return parse(text.encode(), Path("/etc/omerowebd/omerowebd.toml"))


def warned(c: Config) -> str:
    return "\n".join(multihost.warnings(c, INFO))


def test_redis_sessions_and_one_secret_key_across_hosts_need_no_warning():
    assert warned(config(REDIS + 'secret_key = "same-on-every-host"')) == ""


def test_secret_key_left_to_each_host():
    text = warned(config(REDIS))
    assert "nginx.upstreams names other hosts" in text and "omero.web.secret_key is unset" in text
    assert "set omero.web.secret_key, the same on every host" in text and len(text.splitlines()) == 1


def test_the_default_file_store_on_a_local_file_system(tmp_path):
    text = warned(config('secret_key = "k"', state_dir=str(tmp_path)))
    fs = multihost.filesystem_type(tmp_path)
    assert fs and fs not in multihost.SHARED_FS
    assert f"keeps sessions in {tmp_path / 'sessions'}, on a local file system ({fs})" in text
    assert "keep sessions in Redis" in text


def test_a_local_memory_cache_and_a_file_cache_are_per_host(tmp_path):
    locmem = '''session_engine = "django.contrib.sessions.backends.cache"
caches = {default = {BACKEND = "django.core.cache.backends.locmem.LocMemCache"}}
secret_key = "k"
'''
    assert "a LocMemCache (each process's own memory)" in warned(config(locmem))
    files = locmem.replace('"django.core.cache.backends.locmem.LocMemCache"',
                           f'"django.core.cache.backends.filebased.FileBasedCache", LOCATION = "{tmp_path}"')
    assert f"a FileBasedCache in {tmp_path}, on a local file system" in warned(config(files))


def test_without_upstreams_only_what_breaks_one_host_too():
    assert warned(config(upstreams=False)) == ""
    dummy = 'session_engine = "django.contrib.sessions.backends.cache"\n'  # omero.web.caches left to DummyCache
    text = warned(config(dummy, upstreams=False))
    assert "a DummyCache that keeps nothing: nobody can stay signed in" in text and "upstreams" not in text
    bad = 'caches = {default = {BACKEND = "django_redis.cache.RedisCache", LOCATION = "http://:pw@h"}}\n'
    text = warned(config(bad, upstreams=False))
    assert "cache 'default': a LOCATION starts with http://" in text and "pw" not in text


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /srv/shared rw,relatime shared:2 - nfs4 filer:/export rw,vers=4.2
41 40 0:41 / /srv/shared/local\040disk rw,relatime shared:3 - xfs /dev/sdb1 rw
42 22 0:42 / /srv/cephfs rw - ceph 10.0.0.1:/ rw
"""


def test_filesystem_type_takes_the_innermost_mount(tmp_path):
    def fs(path: str) -> str | None:
        return multihost.filesystem_type(Path(path), MOUNTINFO)

    assert fs("/srv/shared/omero/sessions") == "nfs4"
    assert fs("/srv/shared/local disk/sessions") == "xfs"
    assert fs("/srv/sharedx") == "ext4" and fs("/srv/cephfs") == "ceph" and fs("/") == "ext4"
