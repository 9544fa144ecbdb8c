"""Settings that break a site served by several hosts: the warnings of ``check``.

``nginx.upstreams`` says other hosts serve this site: a user's requests then
land on any of them, and each must read the session another one saved. That
fails, with no error anywhere but users signed out at random, when

* sessions are kept per host: Django's file store on a local file system (a
  network file system, NFS, CephFS, GlusterFS, CIFS..., is shared); the cache
  engine on a cache that each host, or each process, keeps for itself
  (LocMemCache; a FileBasedCache directory on a local file system); the
  database engine on SQLite in a local file;
* ``omero.web.secret_key`` is unset: OMERO.web then makes a random key of its
  own per OMERODIR (``var/django_secret_key``), and a session signed on one
  host is garbage on the next.

Whatever the hosts, the cache engine on DummyCache (OMERO.web's default
``omero.web.caches``) keeps no session at all: nobody can stay signed in. A
cache LOCATION that the status check cannot read is said too.

The file system is judged by its type in /proc/self/mountinfo: the mount
the directory is on (or will be, once made).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from . import desired, omero_config, store_health
from .config import Config
from .venv import VenvInfo

# Types a file system shared between machines has in /proc/self/mountinfo.
SHARED_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph", "fuse.cephfs", "glusterfs", "fuse.glusterfs",
    "lustre", "gpfs", "beegfs", "ocfs2", "gfs2", "afs", "fuse.juicefs", "fuse.gcsfuse", "fuse.s3fs",
})
REDIS_HINT = ('keep sessions in Redis (omero.web.session_engine = "django.contrib.sessions.backends.cache", '
              'omero.web.caches with django_redis.cache.RedisCache; see the README, "Several hosts")')


def warnings(config: Config, info: VenvInfo) -> list[str]:
    """One line each: what breaks, where it is set, how to fix it."""
    properties = desired.properties_of(config)
    engine = store_health.session_engine(properties, info)
    caches, _ = store_health.caches(properties, info)
    session_cache = next((c for c in caches if c.alias == store_health.session_cache_alias(properties)), None)
    found = [f"{config.where('omero.web.caches')}: cache {c.alias!r}: {c.problem}" for c in caches if c.problem]
    if engine in store_health.CACHE_ENGINES and session_cache is not None and session_cache.kind == "dummy":
        found.append(f"{config.where('omero.web.session_engine')}: {engine} keeps sessions in cache "
                     f"{session_cache.alias!r}, a DummyCache that keeps nothing: nobody can stay signed in; "
                     f"set omero.web.caches (Redis, memcached) or another session engine")
    if not config.nginx.upstreams:
        return found
    hosts = f"{config.path}: nginx.upstreams names other hosts serving this site, but"
    per_host = _per_host(engine, properties, session_cache)
    if per_host:
        found.append(f"{hosts} {per_host}: a user signed in on one host is signed out on the next; {REDIS_HINT}, "
                     "or put the store on storage every host shares")
    if "omero.web.secret_key" not in properties:
        found.append(f"{hosts} omero.web.secret_key is unset: OMERO.web makes a key of its own on each host "
                     "(OMERODIR/var/django_secret_key), so a session signed on one host is refused on the next; "
                     "set omero.web.secret_key, the same on every host")
    return found


def _per_host(engine: str, properties: Mapping[str, str], cache: store_health.Cache | None) -> str | None:
    """Why sessions stay on this host, or None."""
    name = f"omero.web.session_engine {engine}"
    if engine in ("django.contrib.sessions.backends.file", "omeroweb.filesessionstore"):
        where = omero_config.session_file_path(properties) or "/tmp"
        fs = filesystem_type(Path(where))
        if fs not in SHARED_FS:
            return f"{name} keeps sessions in {where}, on a local file system ({fs or 'unknown'})"
        return None
    if engine in store_health.CACHE_ENGINES and cache is not None:
        if cache.kind == "locmem":
            return f"{name} keeps sessions in cache {cache.alias!r}, a LocMemCache (each process's own memory)"
        if cache.kind == "file":
            where = _cache_location(properties, cache.alias)
            fs = filesystem_type(Path(where)) if where else None
            if fs not in SHARED_FS:
                return (f"{name} keeps sessions in cache {cache.alias!r}, a FileBasedCache in {where or '?'}, "
                        f"on a local file system ({fs or 'unknown'})")
        return None
    if engine == "django.contrib.sessions.backends.db":
        sqlite = _sqlite_file(properties)
        if sqlite is not None:
            fs = filesystem_type(Path(sqlite))
            if fs not in SHARED_FS:
                return f"{name} keeps sessions in the SQLite file {sqlite}, on a local file system ({fs or 'unknown'})"
    return None


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system ``path`` is on (or would be, once made): its innermost mount."""
    path = Path(os.path.realpath(path))  # links resolved as far as they exist; the rest is created there
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    best, best_type = -1, None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        point = _unescape(fields[4])
        fs = fields[fields.index("-") + 1]
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the last mount of the longest point wins (mounts over mounts)
            best, best_type = len(point), fs
    return best_type


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _additional(properties: Mapping[str, str]) -> dict[str, object]:
    try:
        pairs = json.loads(properties.get(omero_config.ADDITIONAL_SETTINGS, "[]"))
    except ValueError:
        return {}
    return {p[0]: p[1] for p in pairs if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)} \
        if isinstance(pairs, list) else {}


def _cache_location(properties: Mapping[str, str], alias: str) -> str | None:
    try:
        spec = json.loads(properties.get("omero.web.caches", "{}")).get(alias, {})
    except (ValueError, AttributeError):
        return None
    location = spec.get("LOCATION") if isinstance(spec, dict) else None
    return location if isinstance(location, str) and location.startswith("/") else None


def _sqlite_file(properties: Mapping[str, str]) -> str | None:
    databases = _additional(properties).get("DATABASES")
    default = databases.get("default") if isinstance(databases, dict) else None
    if isinstance(default, dict) and "sqlite3" in str(default.get("ENGINE", "")):
        name = default.get("NAME")
        return name if isinstance(name, str) and name.startswith("/") else None
    return None
