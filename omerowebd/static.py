"""Static files: one collected directory per release, switched at cutover.

``omero web start`` collects into STATIC_ROOT at every start, and nginx
serves STATIC_ROOT at STATIC_URL. An upgrade then rewrites the files the old
generation's pages still point at, and collectstatic keeps a copy that is
newer than its source (Django compares times), so the previous release's
stylesheets can stay for good. Here:

* Each release (the venv's packages plus the settings that decide what is
  collected) gets its own directory ``STATIC_ROOT/release-VERSION-KEY``,
  collected from scratch once. A generation's own config.xml (its OMERODIR
  view) points STATIC_ROOT there and STATIC_URL at ``STATIC_URL/release-.../``,
  so every page links its own release's files, whichever generation answers
  while two share the socket.
* nginx's text does not change: its ``location STATIC_URL { alias
  STATIC_ROOT; }`` serves every release below it. Neither the daemon nor
  root's publisher has a new path to render or to trust.
* The unversioned names (``STATIC_URL/webgateway/...``, which hard-coded
  links and old bookmarks use) are symbolic links in STATIC_ROOT into the
  serving release, replaced one by one with a rename when a generation takes
  over: after the cutover they are the new release's files.
* The previous release stays until the next cutover retires it (browser tabs
  opened before an upgrade still load the scripts they ask for later);
  anything older, and any release no live generation uses, is removed once a
  generation has retired.

Everything inside STATIC_ROOT is reached through a directory fd that does not
follow links, so a link planted in it never makes the daemon write or delete
elsewhere. Only names this module makes (release directories, its links, its
temporary names) are ever removed, plus, at the first cutover, what an
earlier collectstatic left at the top (the unversioned names now are links).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits, log
from .errors import UserError
from .exits import EXIT_FAILURE
from .files import write_atomic
from .venv import VenvInfo, effective, probe_env, python_of

TIMEOUT = limits.COLLECTSTATIC_TIMEOUT
# The settings that decide what is collected (besides the venv's packages).
RELEVANT = ("omero.web.static_root", "omero.web.static_url", "omero.web.apps", "omero.web.staticfile_dirs",
            "omero.web.pipeline_staticfile_storage")
RECORD = "collectstatic.json"
RELEASE = re.compile(r"release-(?:[0-9A-Za-z.+]+-)?[0-9a-f]{12}\Z")
LINK_TMP = ".omerowebd-link."  # + name: a link being put in place
ASIDE = ".omerowebd-aside."  # + name: something of an earlier collectstatic, on its way out
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CollectstaticFailed(UserError):
    exit_code = EXIT_FAILURE


@dataclass(frozen=True)
class Release:
    """One collected set of static files, and where it is served."""

    name: str  # the directory under STATIC_ROOT, and the path segment under STATIC_URL
    key: str  # what was collected: packages and settings
    static_root: Path  # the site's STATIC_ROOT (what nginx serves at static_url)
    static_url: str  # the site's STATIC_URL, ending in "/"

    @property
    def directory(self) -> Path:
        return self.static_root / self.name

    @property
    def url(self) -> str:
        return f"{self.static_url}{self.name}/"

    def properties(self) -> dict[str, str]:
        """What the generation's own config.xml says instead of the site's STATIC_ROOT and STATIC_URL."""
        return {"omero.web.static_root": str(self.directory), "omero.web.static_url": self.url}


def static_location(properties: Mapping[str, str], info: VenvInfo, omerodir: Path | str) -> tuple[str, str]:
    """(STATIC_URL, STATIC_ROOT) as OMERO.web derives them: where nginx serves the collected files.

    Each release is a directory below this STATIC_ROOT, served below this STATIC_URL (nginx.py renders them).
    """
    # str_slash: a non-empty value gets a trailing slash.
    static_url = effective(properties, info, "omero.web.static_url", "/static/") or ""
    if static_url and not static_url.endswith("/"):
        static_url += "/"
    # The default depends on OMERODIR, so it is worked out here, not taken from the catalogue.
    static_root = os.path.normpath(properties.get("omero.web.static_root",
                                                  os.path.join(str(omerodir), "var", "static")))
    return static_url, static_root


def release_for(info: VenvInfo, properties: Mapping[str, str], packages: str, omerodir: Path) -> Release:
    """The release a generation of this venv and these properties serves (computed, nothing touched).

    ``packages`` is the venv's fingerprint (venv.fingerprint), which the caller has already taken.
    """
    what = {"venv": str(info.venv), "packages": packages}
    what.update({name: effective(properties, info, name) for name in RELEVANT})
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    url, root = static_location(properties, info, omerodir)
    version = re.sub(r"[^0-9A-Za-z.+]", "", info.versions.get("omero-web", ""))[:32]
    name = f"release-{version}-{key[:12]}" if version else f"release-{key[:12]}"
    # A relative STATIC_ROOT is relative to where OMERO.web runs (gunicorn's and collectstatic's cwd).
    return Release(name=name, key=key, static_root=info.omeroweb_dir / root, static_url=url)


class StaticFiles:
    """The releases in STATIC_ROOT: collect, cut over, prune. The one writer of STATIC_ROOT's top level."""

    def __init__(self, state_dir: Path) -> None:
        self.record_path = state_dir / RECORD
        self.by_generation: dict[int, Release] = {}
        self.current: Release | None = None
        self._lock = asyncio.Lock()

    # -- collect --------------------------------------------------------------

    async def collect(self, generation: int, release: Release, info: VenvInfo, omerodir: Path) -> bool:
        """Make sure ``release`` is collected, for generation number ``generation``; True if collectstatic ran.

        ``omerodir`` is the generation's view, whose config.xml already points
        STATIC_ROOT at the release's directory: collectstatic reads it there.
        """
        async with self._lock:
            in_use = any(r == release for r in self.by_generation.values())
            complete = self._record().get("complete", {}).get(release.name) == release.key
            if (complete or in_use) and release.directory.is_dir():
                self.by_generation[generation] = release
                return False
            # A directory left by an interrupted run is not trusted to be whole: start afresh.
            await asyncio.to_thread(_remove_release, release)
            await _collectstatic(info, omerodir)
            record = self._record()
            record.setdefault("complete", {})[release.name] = release.key
            self._save(record)
            self.by_generation[generation] = release
            return True

    # -- cut over -------------------------------------------------------------

    def cut_over(self, generation: int) -> None:
        """The generation serves now: the unversioned names become its release's files.

        Each top-level name becomes a link into the release, put in place by
        a rename (a request sees the old file or the new one, never none);
        names the release does not have go. Never raises for a file problem:
        the release's own URLs serve regardless, so it is logged instead.
        """
        release = self.by_generation.get(generation)
        if release is None:
            return
        record = self._record()
        try:
            self._link(release)
        except OSError as e:
            log.get().error("cannot point the unversioned static names at the serving release; its own"
                            " URLs serve", release=release.name, path=str(release.static_root), error=_why(e))
            return
        before = record.get("current")
        if before != release.name:
            record["previous"] = before
            record["current"] = release.name
            self._save(record)
            log.get().info("static files switched", release=release.name, previous=before,
                           url=release.url)
        self.current = release

    def _link(self, release: Release) -> None:
        fd = os.open(release.static_root, DIR_FLAGS)
        try:
            rel_fd = os.open(release.name, DIR_FLAGS, dir_fd=fd)
            try:
                names = [n for n in os.listdir(rel_fd) if not n.startswith(".")]
            finally:
                os.close(rel_fd)
            wanted = {n: f"{release.name}/{n}" for n in names if not RELEASE.fullmatch(n)}
            for name, target in sorted(wanted.items()):
                _place_link(fd, name, target)
            for name in os.listdir(fd):
                if name in wanted or name.startswith(".") or RELEASE.fullmatch(name):
                    continue
                # An unversioned name the release has not, or what collectstatic left before releases.
                _remove_entry(fd, name)
            for name in os.listdir(fd):
                if name.startswith((ASIDE, LINK_TMP)):  # this cutover's, or one that died half-way
                    _remove_entry(fd, name)
        finally:
            os.close(fd)

    # -- prune ----------------------------------------------------------------

    async def prune(self, live: Iterable[int]) -> list[str]:
        """Remove the releases nothing needs: not a live generation's, not the serving one, not the previous.

        Returns the names removed. A failure is logged and left for next time.
        """
        async with self._lock:  # never beside a collect, which may be filling a directory pruning would take
            live = set(live)
            for number in [n for n in self.by_generation if n not in live]:
                del self.by_generation[number]
            record = self._record()
            keep = {r.name for r in self.by_generation.values()} | {record.get("current"), record.get("previous")}
            roots = {r.static_root for r in self.by_generation.values()}
            removed = await asyncio.to_thread(_remove_releases, roots, keep)
            if removed:
                record = self._record()
                complete = record.get("complete", {})
                for name in removed:
                    complete.pop(name, None)
                self._save(record)
                log.get().info("old static releases removed", releases=removed)
            return removed

    def status(self) -> dict[str, Any]:
        record = self._record()
        return {"release": record.get("current"), "previous": record.get("previous"),
                "url": self.current.url if self.current else None}

    # -- helpers --------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or not isinstance(record.get("complete", {}), dict):
            return {}
        return record

    def _save(self, record: Mapping[str, Any]) -> None:
        try:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.record_path, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n", mode=0o644)
        except OSError as e:  # the next collect runs again: slower, not wrong
            log.get().warning("cannot write the collectstatic record", path=str(self.record_path), error=_why(e))


def _remove_release(release: Release) -> None:
    release.static_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(release.static_root, DIR_FLAGS)
    try:
        _remove_entry(fd, release.name)
    finally:
        os.close(fd)


def _remove_releases(roots: Iterable[Path], keep: set[str | None]) -> list[str]:
    removed: list[str] = []
    for root in roots:
        try:
            fd = os.open(root, DIR_FLAGS)
        except OSError:
            continue
        try:
            for name in os.listdir(fd):
                # Only releases: a cutover's temporary names are its own to clear (it may be running now).
                if RELEASE.fullmatch(name) and name not in keep:
                    _remove_entry(fd, name)
                    removed.append(name)
        except OSError as e:
            log.get().warning("cannot remove old static releases", path=str(root), error=_why(e))
        finally:
            os.close(fd)
    return removed


def _place_link(dir_fd: int, name: str, target: str) -> None:
    """Make ``name`` a link to ``target`` in one rename (a real directory is moved aside first)."""
    try:
        if os.readlink(name, dir_fd=dir_fd) == target:
            return
    except OSError:  # not there, or not a link
        pass
    tmp = LINK_TMP + name
    _remove_entry(dir_fd, tmp)  # left by a cutover that died half-way
    os.symlink(target, tmp, dir_fd=dir_fd)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        # Left by collectstatic before releases: rename cannot replace a directory with a link.
        aside = f"{ASIDE}{name}.{time.time_ns()}"
        os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` (a link, a file or a whole tree) without following any link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


async def _collectstatic(info: VenvInfo, omerodir: Path) -> None:
    env = probe_env()
    env.update(OMERODIR=str(omerodir), DJANGO_SETTINGS_MODULE="omeroweb.settings")
    log.get().info("collecting static files", venv=str(info.venv))
    proc = await asyncio.create_subprocess_exec(
        str(python_of(info.venv)), str(info.omeroweb_dir / "manage.py"), "collectstatic", "--noinput",
        cwd=info.omeroweb_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise CollectstaticFailed(f"collectstatic took over {TIMEOUT:.0f}s") from None
    except asyncio.CancelledError:
        proc.kill()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise CollectstaticFailed(f"collectstatic failed: {lines[-1] if lines else 'no output'}")
    log.get().info("static files collected", result=lines[-1] if lines else "")
