"""Sweep Django's file session store. Run as ``VENV/bin/python session_sweep.py``.

A standalone script: it runs on the OMERO.web venv's Python (3.10 for
zeroc-ice), imports nothing of omerowebd, and imports Django only when it
must (to learn the settings, or to check the signature of a session that
carries its own expiry).

stdin:  {"mode": "sweep", "omerodir": ..., "dry_run": bool, "nice": int, "idle_io": bool,
         "snapshot": {...} or null, "ledger": bool, "store": path, "config_xml": text}
        {"mode": "clearsessions", "omerodir": ..., "manage": path, "nice": int, "idle_io": bool,
         "config_xml": text}
stdout: one JSON object (the result, or {"fatal": message})

``config_xml`` is the config.xml omerowebd derives from its own TOML; OMERO.web's
settings are read from a private copy of it (see View), never from the site's
``etc/grid/config.xml``, which the service user can write. ``store`` is the
store that same TOML names: it is swept whatever the settings say.

It runs as the user who owns the store (omerowebd starts it so, see
sessions.py), and trusts nothing in the store: the store is opened once with
O_NOFOLLOW|O_DIRECTORY and everything in it is reached through that fd,
without following links; what it creates there (the lock, the ledger and its
temp file) is created with O_EXCL|O_NOFOLLOW. It never changes an owner.
Session keys are secrets (a key is a login): reports name a session file by a
hash of its name (see name_hash), never by the name.

What it deletes is exactly what ``manage.py clearsessions`` deletes on the
same store (``django.contrib.sessions.backends.file.SessionStore.clear_expired``
and its ``load()``), worked out from that code:

* Django lists the store and considers a name only if it is the cookie name
  followed by a key of 8 or more characters from [a-z0-9]; everything else
  (its own ``_out_`` temp files, other files) is left alone. So are we.
* Django opens the file; a file it cannot open (gone, unreadable, a
  directory) is left alone, and so is an empty one (the placeholder
  ``save(must_create=True)`` writes first). So are they here; unreadable ones
  are reported.
* The file's text is decoded with the secret key; a bad signature or a bad
  payload reads as an empty session. The expiry is then
  ``session["_session_expiry"] or mtime + SESSION_COOKIE_AGE``, and the
  session goes when ``get_expiry_age(expiry=that)`` (whole seconds left) is
  <= 0. A positive integer ``_session_expiry`` is returned as the age itself,
  so Django's file backend never expires such a session; a negative one
  expires at once; a date string is compared with now.
* So the file's mtime alone decides every session that has no
  ``_session_expiry`` -- whatever its signature says -- and nothing bounds a
  session that has one (``set_expiry(timedelta(minutes=5))`` expires long
  before mtime + cookie age). Whether the key is there can be seen without
  the secret: with the JSON serializer the key can only appear in the signed
  payload's JSON as the bytes ``_session_expiry`` (``json.dumps`` escapes
  nothing in it), so a payload without those bytes (and without ``\\u``
  escapes) is an mtime session, signed or not. Only the few with the key go
  through Django's own ``decode()`` and ``get_expiry_age()``.
* What a file version holds never changes (Django writes a temp file and
  renames it over the old one), so once read, a version (name, inode, size,
  mtime, ctime) is remembered in a ledger in the store; the next sweep
  decides it from a single lstat(). That is the "reads only what it must".

Where we deliberately differ, for safety: a symlink or any non-regular file
with a session name is never followed nor deleted (Django would follow it
and could unlink it); a file that is not ASCII is reported and kept (Django's
``clearsessions`` stops with a traceback on it, deleting nothing after it);
a session whose expiry Django cannot compute (a naive date, a list) is
reported and kept (``clearsessions`` stops there too).

A file is deleted only if it is still the version that was judged: a
session that a request saved again in the meantime stays (see Unlinker).
"""

import array
import base64
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import mmap
import os
import platform
import queue
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone

LOCK_NAME = ".omerowebd-sweep.lock"
LEDGER_NAME = ".omerowebd-sweep.ledger"
LEDGER_TMP = LEDGER_NAME + ".tmp"
OWN_FILES = (LOCK_NAME, LEDGER_NAME, LEDGER_TMP)
LEDGER_MAGIC = b"OMWDSWL1"
JSON_SERIALIZERS = (
    "django.contrib.sessions.serializers.JSONSerializer",
    "django.core.signing.JSONSerializer",
)
MAX_PAYLOAD = 1 << 20  # decompressed bytes looked at without the signature checked
MAX_ERROR_SAMPLES = 20
MAX_SECRET_KEY = 1 << 16  # bytes of OMERO.web's secret key file read (it writes 50)
SECRET_KEY_FILE = ("var", "django_secret_key")  # below OMERODIR, where omeroweb.settings keeps it
READ_BATCH = 128  # files opened ahead of reading (well under any RLIMIT_NOFILE)
DELETE_THREADS = 4
PREFETCH_AHEAD = 2048  # files the Prefetcher opens ahead of the sweep at most
DELETE_QUEUE = 1024  # verdicts the unlink helper holds besides those in its pipe
NOWAIT_READ = 65536  # bytes read at once from the page cache; a bigger file is read as before
WINDOW = 65536  # session files sorted by inode number at a time (bounded memory on a 1M-file store)
PACE_CHECK = 0.05  # seconds between two looks at the site's load
BUSY_DUTY = 0.25  # share of the time the sweep works while the site serves requests
MAX_PAUSE = 0.25  # longest pause between two batches
FILE_ENGINES = ("django.contrib.sessions.backends.file", "omeroweb.filesessionstore")
# ioprio_set(2) by architecture (there is no libc wrapper).
IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30, "riscv64": 30, "i386": 289, "i686": 289, "armv7l": 314,
                  "ppc64le": 273, "ppc64": 273, "s390x": 283}
IOPRIO_CLASS_IDLE = 3
FLOCK_FORMAT = "@hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class Fatal(Exception):
    """The sweep cannot run at all; the message says why and what to do."""


# -- priority --------------------------------------------------------------------


def lower_priority(nice, idle_io):
    """Lower our own CPU and I/O priority; returns what could not be done."""
    notes = []
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as e:
        notes.append("nice: %s" % e.strerror)
    if nice >= 19 and hasattr(os, "SCHED_IDLE"):
        # Below nice 19: the CPU only when nothing else wants it, so a request's
        # worker never waits behind the sweep (the sweep's threads inherit it).
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:
            notes.append("SCHED_IDLE: %s" % e.strerror)
        # With the kernel's autogroups (sched_autogroup_enabled, no cgroup CPU
        # controller) nice and SCHED_IDLE only rank us inside our own session's
        # group, which competes with gunicorn's session as an equal: measured,
        # the sweep took the same CPU share as a worker. Lowering our session's
        # group is the only way down that needs no privilege.
        # Only as our own session's leader (the daemon starts sweeps so): the
        # group is the whole session's, an operator's shell's too. An extra, not
        # a setting, so never a note: it matters only where no cgroup CPU
        # controller groups us (a unit under systemd's CPU accounting is ranked
        # by its cgroup, where nice and SCHED_IDLE rule), and there the kernel
        # may refuse it (no autogroups; a non-dumpable or namespaced /proc).
        if os.getsid(0) == os.getpid():
            for attempt in range(3):
                try:
                    with open("/proc/self/autogroup", "w") as f:
                        f.write("19")
                    break
                except OSError as e:
                    if e.errno != errno.EAGAIN:
                        break
                    time.sleep(0.11)  # the kernel takes one such write per 0.1 s, machine-wide
    if idle_io:
        number = IOPRIO_SYSCALL.get(platform.machine())
        if number is None:
            notes.append("idle I/O class: unknown architecture %s" % platform.machine())
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            # IOPRIO_WHO_PROCESS = 1, who = 0 (this process)
            if libc.syscall(number, 1, 0, IOPRIO_CLASS_IDLE << 13) != 0:
                notes.append("idle I/O class: %s" % os.strerror(ctypes.get_errno()))
    return notes


# -- settings --------------------------------------------------------------------


def config_digest(omerodir, config_xml=None):
    """What a settings snapshot is valid for: the config.xml the settings are read from."""
    digest = hashlib.sha256()
    if config_xml is not None:
        digest.update(config_xml.encode())
        return digest.hexdigest()
    try:
        with open(os.path.join(omerodir, "etc", "grid", "config.xml"), "rb") as f:
            digest.update(f.read())
    except OSError:
        digest.update(b"-")
    return digest.hexdigest()


def venv_fingerprint():
    """What a settings snapshot is valid for besides the config: the packages of the venv this
    Python runs from (the names and mtimes of their metadata, the rule of omerowebd's
    venv.fingerprint). Another Django or OMERO.web release, with other settings or serializer
    defaults, means the full import again, whether or not the daemon was reloaded since."""
    digest = hashlib.sha256()
    for site in sorted(glob.glob(os.path.join(glob.escape(sys.prefix), "lib", "python3*", "site-packages"))):
        try:
            entries = sorted(e for e in os.listdir(site)
                             if e.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")))
        except OSError:
            continue
        for entry in entries:
            try:
                mtime = os.stat(os.path.join(site, entry)).st_mtime_ns
            except OSError:
                continue
            digest.update(("%s\0%d\n" % (entry, mtime)).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class View:
    """A private OMERODIR for importing omeroweb.settings: the config.xml omerowebd
    derived from its TOML, and (for the file store) a copy of the site's secret key,
    which signs the sessions. Nothing else of the site is read."""

    def __init__(self, site_omerodir, config_xml, with_secret_key=True):
        self.path = tempfile.mkdtemp(prefix="omerowebd-sweep-")
        try:
            grid = os.path.join(self.path, "etc", "grid")
            os.makedirs(grid, mode=0o700)
            write_new(os.path.join(grid, "config.xml"), config_xml.encode())
            os.mkdir(os.path.join(self.path, "var"), 0o700)
            key = read_secret_key(site_omerodir) if with_secret_key else None
            if key is not None:
                write_new(os.path.join(self.path, *SECRET_KEY_FILE), key)
        except BaseException:
            self.close()
            raise

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


def write_new(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_secret_key(site_omerodir):
    """The site's secret key file, or None when there is none (OMERO.web then makes one)."""
    path = os.path.join(site_omerodir, *SECRET_KEY_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Fatal("cannot read OMERO.web's secret key %s: %s (the sweep needs it to check sessions that "
                    "carry their own expiry)" % (path, e.strerror))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Fatal("OMERO.web's secret key %s is not a regular file; replace it with the key itself" % path)
        return os.read(fd, MAX_SECRET_KEY)
    finally:
        os.close(fd)


class Django:
    """Django, imported on first need, with the settings clearsessions would see."""

    def __init__(self, omerodir, config_xml=None, with_secret_key=True):
        self.omerodir = omerodir
        self.config_xml = config_xml
        self.with_secret_key = with_secret_key
        self.view = None
        self._store = None
        self.settings = None
        self.configured_by = None  # how Django got its settings, if it was needed
        self.known = None  # settings an earlier sweep learnt, valid for this config (see configure_from)
        self.known_store = None
        self._venv = None

    def digest(self):
        return config_digest(self.omerodir, self.config_xml)

    def venv(self):
        if self._venv is None:
            self._venv = venv_fingerprint()
        return self._venv

    def snapshot_fits(self, snapshot):
        """Was ``snapshot`` learnt from this config.xml and this venv?"""
        return bool(snapshot) and snapshot.get("config_digest") == self.digest() and snapshot.get("venv") == self.venv()

    def environ(self):
        """OMERODIR for omeroweb.settings: the private view when omerowebd gave us its config."""
        if self.config_xml is None:
            return self.omerodir
        if self.view is None:
            self.view = View(self.omerodir, self.config_xml, self.with_secret_key)
        return self.view.path

    def close(self):
        if self.view is not None:
            self.view.close()

    def load(self):
        if self.settings is None:
            os.environ["OMERODIR"] = self.environ()
            os.environ["DJANGO_SETTINGS_MODULE"] = "omeroweb.settings"
            import importlib
            import tempfile

            import django
            from django.conf import settings
            from django.contrib.sessions.backends import base

            engine = settings.SESSION_ENGINE
            self.settings = settings
            self.configured_by = "omeroweb.settings"
            self.engine_module = importlib.import_module(engine)
            self.snapshot = {
                "engine": engine,
                "file_path": getattr(settings, "SESSION_FILE_PATH", None) or tempfile.gettempdir(),
                "cookie_name": settings.SESSION_COOKIE_NAME,
                "cookie_age": settings.SESSION_COOKIE_AGE,
                "use_tz": bool(settings.USE_TZ),
                "time_zone": settings.TIME_ZONE,
                "serializer": settings.SESSION_SERIALIZER,
                "valid_key_chars": base.VALID_KEY_CHARS,
                "django_version": django.get_version(),
                "config_digest": self.digest(),
                "venv": self.venv(),
                # What the next sweep checks before it decodes without omeroweb.settings (see configure_from).
                "secret_key_sha256": key_digest(settings.SECRET_KEY),
                "secret_key_fallbacks": len(list(getattr(settings, "SECRET_KEY_FALLBACKS", None) or ())),
            }
        return self

    def configure_from(self, snapshot, store):
        """Django's settings for decoding a session, without importing omeroweb.settings (which
        imports Ice: over a second): only from settings omeroweb.settings gave an earlier sweep
        (same config digest, same venv), and only while the secret key on disk is the one it read then
        (a key from a property, fallback keys: the full import, as before)."""
        if (not snapshot or snapshot.get("secret_key_fallbacks") != 0 or not snapshot.get("secret_key_sha256")
                or snapshot.get("engine") not in FILE_ENGINES or self.settings is not None):
            return False
        try:
            key = read_secret_key(self.omerodir)
        except Fatal:
            return False
        try:
            key = key.decode("utf-8").strip() if key is not None else None
        except UnicodeDecodeError:
            return False
        if key is None or key_digest(key) != snapshot["secret_key_sha256"]:
            return False
        import importlib

        from django.conf import settings

        settings.configure(
            SECRET_KEY=key, SECRET_KEY_FALLBACKS=[], USE_TZ=snapshot["use_tz"], TIME_ZONE=snapshot["time_zone"],
            SESSION_SERIALIZER=snapshot["serializer"], SESSION_COOKIE_AGE=snapshot["cookie_age"],
            SESSION_COOKIE_NAME=snapshot["cookie_name"], SESSION_FILE_PATH=store,
            SESSION_ENGINE="django.contrib.sessions.backends.file")
        self.settings = settings
        self.configured_by = "snapshot"
        # omeroweb.filesessionstore is this class with a deprecation warning: same salt, same decode.
        self.engine_module = importlib.import_module("django.contrib.sessions.backends.file")
        return True

    def store(self):
        if self._store is None:
            import warnings

            if not self.configure_from(self.known, self.known_store):
                self.load()
            with warnings.catch_warnings():  # omeroweb.filesessionstore warns that it is deprecated
                warnings.simplefilter("ignore")
                self._store = self.engine_module.SessionStore()
        return self._store


def key_digest(key):
    return hashlib.sha256(str(key).encode("utf-8", "surrogateescape")).hexdigest()


def set_time_zone(name):
    """What Django's settings do at import (``Settings.__init__``); naive times depend on it."""
    if name and hasattr(time, "tzset"):
        os.environ["TZ"] = name
        time.tzset()


# -- the ledger ---------------------------------------------------------------------


def version_id(name, st):
    """One stored version of one session file (Django renames a new file over the old)."""
    return hash((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)) & 0xFFFFFFFFFFFFFFFF or 1


class Ledger:
    """An open-addressing set of 64-bit version ids in one flat array: 16 bytes per
    entry at half load, nothing per entry in Python objects."""

    def __init__(self, capacity=1024):
        size = 1024
        while size < capacity:
            size *= 2
        self.table = array.array("Q", bytes(8 * size))
        self.mask = size - 1
        self.count = 0

    def __contains__(self, vid):
        table, mask = self.table, self.mask
        i = vid & mask
        while True:
            v = table[i]
            if v == vid:
                return True
            if v == 0:
                return False
            i = (i + 1) & mask

    def add(self, vid):
        if (self.count + 1) * 2 > len(self.table):
            self._grow()
        table, mask = self.table, self.mask
        i = vid & mask
        while True:
            v = table[i]
            if v == vid:
                return
            if v == 0:
                table[i] = vid
                self.count += 1
                return
            i = (i + 1) & mask

    def _grow(self):
        old = self.table
        self.table = array.array("Q", bytes(16 * len(old)))
        self.mask = len(self.table) - 1
        self.count = 0
        for v in old:
            if v:
                self.add(v)

    @staticmethod
    def header(serializer):
        # The ids are Python's hash(): only valid for the same hash function and seed.
        probe = hash(("omerowebd", 1, 2)) & 0xFFFFFFFFFFFFFFFF
        tag = hashlib.sha256(("%s\0%s\0%d" % (serializer, sys.version, probe)).encode()).digest()[:16]
        return LEDGER_MAGIC + tag

    @classmethod
    def read(cls, dfd, serializer):
        """The ledger in the store open as ``dfd``; None when there is none we wrote."""
        try:
            fd = os.open(LEDGER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                return None  # not ours: a FIFO would block, someone else's file is not our record
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        except OSError:
            return None
        finally:
            os.close(fd)
        head = cls.header(serializer)
        body = data[len(head):]
        if not data.startswith(head) or not body or len(body) % 8:
            return None
        ledger = cls.__new__(cls)
        ledger.table = array.array("Q")
        ledger.table.frombytes(body)
        size = len(ledger.table)
        if size & (size - 1):
            return None
        ledger.mask = size - 1
        ledger.count = size - ledger.table.count(0)
        return ledger

    def write(self, dfd, serializer):
        """A new file beside the old, renamed over it; under the store's lock, so the temp name is ours."""
        fd = create_new(dfd, LEDGER_TMP)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.header(serializer))
                self.table.tofile(f)
            # rename() replaces the entry itself, whatever it is (a planted link included).
            os.replace(LEDGER_TMP, LEDGER_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(LEDGER_TMP, dir_fd=dfd)
            except OSError:
                pass
            raise


def create_new(dfd, name):
    """A file we create in the store, never one that was there: whatever had the name goes first.

    O_EXCL|O_NOFOLLOW: a link planted under the name is never followed, so a
    sweep cannot be made to truncate or write a file elsewhere."""
    for _ in range(3):
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dfd)
        except FileExistsError:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
    raise OSError(errno.EEXIST, "%s keeps reappearing" % name)


# -- the sweep ------------------------------------------------------------------------


class Sweep:
    """One pass over the store.

    Where the time goes (bench/sessions_sweep.py prints it): on a first sweep
    every session file must be read -- only its content says whether it
    carries ``_session_expiry`` -- so the cost is the reads (cold cache) and
    the per-file work (warm). The listing is taken a window at a time and
    sorted by inode number: files made one after another sit side by side on
    disk, so the reads go out in disk order, a batch at a time, with a
    readahead hint. Each file is opened once (O_NOATIME: a sweep must not
    turn every read into an inode write) and judged from that fd's fstat and
    content: the version read is the version judged. Two helper processes
    take what would otherwise wait in line with the judging: the unlinks
    (Unlinker) and, once the page cache misses, the cold opens (Prefetcher).
    A later sweep knows from the ledger what needs no reading, and pays one
    lstat per file."""

    def __init__(self, dfd, snapshot, django, dry_run, use_ledger, pacer=None):
        self.dfd = dfd  # the store, opened once; every name below is looked up in it
        self.s = snapshot
        self.django = django
        self.dry_run = dry_run
        self.use_ledger = use_ledger
        self.pacer = pacer or Pacer(())
        self.tz = timezone.utc if snapshot["use_tz"] else None
        self.age = snapshot["cookie_age"]
        # How far mtime + age may be from now and still need Django's exact
        # arithmetic: its whole-second rounding, and for naive local times
        # (USE_TZ = False) a daylight-saving shift.
        self.margin = 2.0 if self.tz else 2 * 3600 + 2.0
        self.fast_decode = snapshot["serializer"] in JSON_SERIALIZERS
        self.counts = dict(scanned=0, sessions=0, deleted=0, kept=0, ignored=0, errors=0, vanished=0,
                           changed=0, read=0, decoded=0, ledger_hits=0)
        self.phases = dict(list=0.0, read=0.0, judge=0.0, django=0.0, delete_wait=0.0, paused=0.0)
        self.error_samples = []
        self.stopping = False
        self.open_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
        self.nowait = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")
        self.buffer = bytearray(NOWAIT_READ)
        self.prefetch = True

    def error(self, name, message):
        self.counts["errors"] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append("%s: %s" % (shown_name(name), message))

    def run(self):
        old = Ledger.read(self.dfd, self.s["serializer"]) if self.use_ledger else None
        self.ledger = Ledger(2 * old.count if old else 1024)
        self.deleter = None if self.dry_run else Unlinker(self)
        prefetcher = None
        try:
            for window in self.windows():
                for i in range(0, len(window), READ_BATCH):
                    if self.stopping:
                        break
                    self.phases["paused"] += self.pacer.pace()
                    if prefetcher is not None:
                        prefetcher.set(i)
                    if self.process(window[i:i + READ_BATCH], old) and prefetcher is None and self.prefetch:
                        prefetcher = Prefetcher(self, window, i + READ_BATCH)
                    if self.deleter is not None:
                        self.deleter.flush(self.pacer.busy)
                if prefetcher is not None:
                    prefetcher.close()
                    prefetcher = None
        finally:
            if prefetcher is not None:
                prefetcher.close()
            if self.deleter is not None:
                t = time.monotonic()
                self.deleter.close()
                self.phases["delete_wait"] += time.monotonic() - t
        if self.use_ledger and not self.stopping:
            try:
                self.ledger.write(self.dfd, self.s["serializer"])
            except OSError as e:
                self.error(LEDGER_NAME, "cannot write the ledger: %s" % e.strerror)
        self.counts["ledger_entries"] = self.ledger.count
        return self.counts

    def windows(self):
        """The session files' (inode, name), WINDOW at a time, each window in inode order."""
        c = self.counts
        prefix = self.s["cookie_name"]
        valid = "".join(sorted(set(self.s["valid_key_chars"])))
        window = []
        t = time.monotonic()
        with os.scandir(self.dfd) as entries:
            for entry in entries:
                if self.stopping:
                    break
                name = entry.name
                if name in OWN_FILES:
                    continue
                c["scanned"] += 1
                # d_type: no syscall; a link or anything but a regular file is never opened.
                if not is_session_name(name, prefix, valid) or not entry.is_file(follow_symlinks=False):
                    c["ignored"] += 1
                    continue
                c["sessions"] += 1
                window.append((entry.inode(), name))
                if len(window) >= WINDOW:
                    window.sort()
                    self.phases["list"] += time.monotonic() - t
                    yield window
                    window = []
                    t = time.monotonic()
        window.sort()
        self.phases["list"] += time.monotonic() - t
        yield window

    def process(self, batch, old):
        """Open a batch (with a readahead hint each), then read and judge it; True when the page
        cache did not hold all of it."""
        c = self.counts
        t = time.monotonic()
        opened = []
        missed = False
        for _, name in batch:
            if old is not None:
                try:
                    st = os.stat(name, dir_fd=self.dfd, follow_symlinks=False)
                except FileNotFoundError:
                    c["vanished"] += 1
                    continue
                except OSError as e:
                    self.error(name, e.strerror)
                    continue
                vid = version_id(name, st)
                if stat.S_ISREG(st.st_mode) and st.st_size and vid in old:
                    c["ledger_hits"] += 1
                    self.decide(name, st, self.mtime_expired(st.st_mtime), vid)
                    continue
            fd = self.open(name)
            if fd is not None:
                # What the page cache holds is read at once; only the rest is asked for
                # (a readahead hint costs as much as the open on a warm store).
                data = self.cached(fd)
                missed = missed or data is None
                opened.append((name, fd, data))
        t1 = time.monotonic()
        self.phases["read"] += t1 - t
        for name, fd, data in opened:
            verdict = self.judge(name, fd, data)
            if verdict is not None:
                st, expired, plain = verdict
                self.decide(name, st, expired, version_id(name, st) if plain else 0)
        self.phases["judge"] += time.monotonic() - t1
        return missed

    def decide(self, name, st, expired, vid):
        if expired:
            self.delete(name, st)
        else:
            self.counts["kept"] += 1
            if vid:  # its content is known to carry no expiry of its own
                self.ledger.add(vid)

    def mtime_expired(self, mtime):
        """Django's verdict for a session without ``_session_expiry``."""
        left = mtime + self.age - time.time()
        if left > self.margin:
            return False
        if left < -self.margin:
            return True
        # Exactly as FileSessionStore._expiry_date + get_expiry_age compute it.
        expiry = datetime.fromtimestamp(mtime, tz=self.tz) + timedelta(seconds=self.age)
        delta = expiry - datetime.now(tz=self.tz)
        return delta.days * 86400 + delta.seconds <= 0

    def open(self, name):
        """An fd to read, with the kernel told to fetch it now; None when it cannot be opened."""
        try:
            return os.open(name, self.open_flags, dir_fd=self.dfd)
        except FileNotFoundError:
            self.counts["vanished"] += 1
            return None
        except PermissionError as e:
            if not self.open_flags & getattr(os, "O_NOATIME", 0):
                self.error(name, "cannot open: %s" % e.strerror)
                return None
            # O_NOATIME is only for the file's owner: a file someone else made
            self.open_flags &= ~os.O_NOATIME
            return self.open(name)
        except OSError as e:
            self.error(name, "cannot open: %s" % e.strerror)
            return None

    def cached(self, fd):
        """The file's bytes if the page cache has them all (RWF_NOWAIT), else None, with the
        kernel told to fetch them now (the batch's reads then overlap on the disk)."""
        if self.nowait:
            try:
                n = os.preadv(fd, [self.buffer], 0, os.RWF_NOWAIT)
                if n < len(self.buffer):
                    return bytes(self.buffer[:n])
            except BlockingIOError:
                pass
            except OSError:  # not on this file system (or kernel): hint every file
                self.nowait = False
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        return None

    def judge(self, name, fd, data=None):
        """Read one open file: (its stat, expired, decided by mtime alone) or None when it is left alone."""
        c = self.counts
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped for something else since the listing
                c["ignored"] += 1
                return None
            # Bytes from the page cache count only if they are the whole file (RWF_NOWAIT
            # may stop where the cache does); else read it, from offset 0 (preadv moved nothing).
            if data is not None and len(data) != st.st_size:
                data = None
            # One read() is the whole file unless it grew since the fstat: a
            # short read of a regular file is its end.
            if data is None:
                data = os.read(fd, st.st_size + 1) if st.st_size else b""
            if len(data) > st.st_size:
                chunks = [data]
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                data = b"".join(chunks)
        except OSError as e:
            self.error(name, "cannot read: %s" % e.strerror)
            return None
        finally:
            os.close(fd)
        if not data:
            c["kept"] += 1  # Django's placeholder: clearsessions never deletes it
            return None
        c["read"] += 1
        if not data.isascii():
            self.error(name, "not ASCII: Django cannot load it (its clearsessions stops here); left alone")
            return None
        if self.fast_decode and not self.may_carry_expiry(data):
            return st, self.mtime_expired(st.st_mtime), True
        text = data.decode("ascii")
        if "\r" in text:  # Django reads in text mode: universal newlines
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        t = time.monotonic()
        try:
            verdict = self.judge_with_django(name, st, text)
        finally:
            self.phases["django"] += time.monotonic() - t
        return None if verdict is None else (st,) + verdict

    @staticmethod
    def may_carry_expiry(data):
        """False only when no signature could make Django see ``_session_expiry`` here.

        Mirrors ``TimestampSigner.unsign_object``: value:timestamp:signature,
        a leading '.' meaning zlib. Whatever fails to decode here fails in
        Django too, and a failed decode is an empty session. ``data`` is
        ASCII (the caller checked)."""
        if isinstance(data, str):
            data = data.encode("ascii")
        parts = data.rsplit(b":", 2)
        if len(parts) < 3:
            return False
        b64 = parts[0]
        if b"\r" in b64 or b"\n" in b64:  # Django's text mode would change these: let it decide
            return True
        compressed = b64[:1] == b"."
        if compressed:
            b64 = b64[1:]
        try:
            raw = base64.urlsafe_b64decode(b64 + b"=" * (-len(b64) % 4))
            if compressed:
                inflater = zlib.decompressobj()
                raw = inflater.decompress(raw, MAX_PAYLOAD)
                if inflater.unconsumed_tail:
                    return True  # too big to look at unsigned: let Django check the signature first
        except Exception:
            return False
        return b"_session_expiry" in raw or b"\\u" in raw

    def judge_with_django(self, name, st, text):
        c = self.counts
        store = self.django.store()
        c["decoded"] += 1
        session = store.decode(text)
        try:
            expiry = session.get("_session_expiry")
        except AttributeError:
            self.error(name, "signed payload is not a session dictionary; left alone")
            return None
        if not expiry:
            return self.mtime_expired(st.st_mtime), True
        try:
            age = store.get_expiry_age(expiry=expiry)
            expired = age <= 0
        except Exception as e:  # Django raises here too: clearsessions stops, requests fail
            self.error(name, "Django cannot compute its expiry (%s: %s); left alone" % (type(e).__name__, e))
            return None
        return expired, False

    def delete(self, name, st):
        c = self.counts
        if self.dry_run:
            c["deleted"] += 1
        else:
            self.deleter.put(name, st)


class Pacer:
    """Gentleness: the sweep works flat out while the site is idle, and only a
    share of the time (BUSY_DUTY) while requests are waiting or being served.

    Busy means: a connection waits in the accept queue of one of the site's TCP
    ports, or one is established to it (a request in progress), as the kernel
    shows them in /proc/net/tcp and tcp6. That is the site's real load, whatever
    serves it (gunicorn's sync workers, nginx in front), and costs no
    round trip. A unix socket's queue is not shown there: with only unix
    sockets the sweep relies on its CPU and I/O priority alone."""

    def __init__(self, ports, check_every=PACE_CHECK):
        self.ports = frozenset("%04X" % int(p) for p in ports)
        self.check_every = check_every
        self.busy = False
        self.busy_checks = 0
        self.checks = 0
        self.checked_at = 0.0
        self.slice_started = time.monotonic()

    def pace(self):
        """Called between batches: the seconds it paused."""
        now = time.monotonic()
        worked = now - self.slice_started
        paused = 0.0
        if self.ports and now - self.checked_at >= self.check_every:
            self.checked_at = now
            self.checks += 1
            self.busy = self.site_busy()
            self.busy_checks += self.busy
        if self.busy:
            paused = min(MAX_PAUSE, max(0.002, worked * (1 / BUSY_DUTY - 1)))
            time.sleep(paused)
        self.slice_started = time.monotonic()
        return paused

    def site_busy(self):
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table, "rb") as f:
                    lines = f.read().split(b"\n")[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 5:
                    continue
                port = fields[1].rpartition(b":")[2].decode()
                if port not in self.ports:
                    continue
                state = fields[3]
                if state == b"01":  # ESTABLISHED on our port: a request being served
                    return True
                if state == b"0A" and int(fields[4].partition(b":")[2], 16):  # LISTEN with a backlog
                    return True
        return False


class Unlinker:
    """Unlinks in a helper process forked from the sweep, fed the verdicts over a pipe.

    Why a process: the unlinks are slow where the store's file system discards
    freed blocks (0.66 ms each measured on such a disk); on threads of the sweep
    they fought the scan for the GIL, which made the judging slower by as much
    as the unlinks overlapped. The helper is a fork of the sweep: the same
    user, the same lowered priority (nice, SCHED_IDLE, the idle I/O class, the
    session's autogroup), not dumpable; it uses only the store's fd and the
    two pipes, and does nothing but what the sweep sends it. Inside, a few
    threads unlink at once: the kernel frees a deleted inode after it has let
    go of the directory's lock, so several unlinks overlap (2-4x faster here
    than one at a time). While the site is busy (the Pacer says so, through a
    byte of shared memory) only one of them unlinks.

    A file is unlinked only if it is still the version that was judged: the
    helper looks again (lstat) just before it unlinks, and a session that a
    request saved again in the meantime stays. The check and the unlink are
    two calls; a save landing in the microseconds between them is the one
    race left (clearsessions leaves the whole read-decode-unlink time open).

    It ends with the sweep: the pipe's end (the sweep closes it, or dies) makes
    it finish what it was given and report; should the sweep be killed, the
    kernel kills the helper too (PR_SET_PDEATHSIG), and a kill of the sweep's
    process group (omerowebd's timeout) reaches it anyway. Its report (the
    counts and the first errors) comes back over a second pipe: the sweep's
    counts stay exact; a helper that dies without one is counted as errors."""

    RECORD = struct.Struct("=QQqH")  # st_ino, st_size, st_mtime_ns, length of the name that follows

    def __init__(self, sweep, threads=DELETE_THREADS):
        self.sweep = sweep
        self.pending = bytearray()
        self.sent = 0  # records sent, to account for a helper that dies without its report
        self.busy = mmap.mmap(-1, 1)  # MAP_SHARED|MAP_ANONYMOUS: the helper sees the byte we write
        work_r, self.work_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            # Bounded: the sweep waits for the unlinks rather than piling up work (about 3000 verdicts).
            fcntl.fcntl(self.work_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 18)
        except OSError:
            pass  # the kernel's default (64 KiB) bounds it all the same
        parent = os.getpid()
        try:
            self.pid = os.fork()
        except OSError as e:
            for fd in (work_r, self.work_w, report_r, report_w):
                os.close(fd)
            raise Fatal("cannot start the sweep's unlink helper: %s" % e.strerror)
        if self.pid == 0:
            status = 1
            try:
                os.close(self.work_w)
                os.close(report_r)
                status = helper_main(parent, sweep.dfd, work_r, report_w, self.busy, threads)
            finally:
                os._exit(status)
        os.close(work_r)
        os.close(report_w)
        self.report_r = report_r

    def put(self, name, st):
        encoded = os.fsencode(name)
        self.pending += self.RECORD.pack(*version(st), len(encoded)) + encoded
        self.sent += 1
        if len(self.pending) >= 16384:
            self._send()  # mid-batch: the pacing stays what the last batch found

    def flush(self, busy=False):
        """Send what was decided (the sweep calls this after every batch), and whether the site is busy."""
        self.busy[0] = 1 if busy else 0
        self._send()

    def _send(self):
        if self.pending and self.work_w is not None:
            try:
                view = memoryview(self.pending)
                while view:
                    view = view[os.write(self.work_w, view):]
            except OSError:  # the helper is gone: close() accounts for it
                os.close(self.work_w)
                self.work_w = None
        self.pending = bytearray()

    def close(self):
        self.busy[0] = 0  # no more pacing: every thread helps finish
        self.flush()
        if self.work_w is not None:
            os.close(self.work_w)  # the helper's end of work
            self.work_w = None
        chunks = []
        while True:
            chunk = os.read(self.report_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self.report_r)
        _, status = os.waitpid(self.pid, 0)
        try:
            report = json.loads(b"".join(chunks).decode())
        except ValueError:
            how = ("signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
                   else "exit status %d" % os.WEXITSTATUS(status))
            self.problem(max(1, self.sent), "the unlink helper ended (%s) without its report: %d expired sessions "
                         "handed to it are not accounted for" % (how, self.sent))
            return
        for key, n in report["counts"].items():
            self.sweep.counts[key] += n
        self.sweep.counts["errors"] += report["errors"] - len(report["samples"])
        for name, message in report["samples"]:
            if name is None:
                self.problem(1, message)
            else:
                self.sweep.error(name, message)

    def problem(self, count, message):
        """Errors that name no session file."""
        self.sweep.counts["errors"] += count
        if len(self.sweep.error_samples) < MAX_ERROR_SAMPLES:
            self.sweep.error_samples.append(message)


def become_helper(parent):
    """First thing in a process forked from the sweep: False when the sweep is gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1: die with the sweep
    except (OSError, AttributeError):
        pass  # the pipe's end (Unlinker) or the sweep's kill (Prefetcher) stops it all the same
    if os.getppid() != parent:  # the sweep died before the line above
        return False
    # Only the sweep decides when to stop; a kill reaches us through the group or the sweep.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # the daemon reads the sweep's stdout and stderr to their end: we must not hold them
    os.close(null)
    return True


def helper_main(parent, dfd, work, report, busy, threads):
    """The unlink helper (see Unlinker): returns its exit status."""
    if not become_helper(parent):
        return 1
    items = queue.Queue(maxsize=DELETE_QUEUE)
    counts = dict(deleted=0, changed=0, kept=0, vanished=0)
    errors = []
    lock = threading.Lock()
    closing = []

    def unlink(index):
        mine = dict.fromkeys(counts, 0)
        failed = []
        while True:
            while index and busy[0] and not closing:
                time.sleep(PACE_CHECK)  # the site is busy: thread 0 alone unlinks
            item = items.get()
            if item is None:
                break
            name, judged = item
            try:
                if version(os.stat(name, dir_fd=dfd, follow_symlinks=False)) == judged:
                    os.unlink(name, dir_fd=dfd)
                    mine["deleted"] += 1
                else:
                    mine["changed"] += 1
                    mine["kept"] += 1
            except FileNotFoundError:
                mine["vanished"] += 1
            except OSError as e:
                failed.append((name, "cannot delete: %s" % e.strerror))
        with lock:
            for key, n in mine.items():
                counts[key] += n
            errors.extend(failed)

    workers = [threading.Thread(target=unlink, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    record = Unlinker.RECORD
    buffered = b""
    while True:
        chunk = os.read(work, 65536)
        if not chunk:
            break
        buffered += chunk
        at = 0
        while len(buffered) - at >= record.size:
            ino, size, mtime_ns, length = record.unpack_from(buffered, at)
            end = at + record.size + length
            if end > len(buffered):
                break
            items.put((os.fsdecode(buffered[at + record.size:end]), (ino, size, mtime_ns)))
            at = end
        buffered = buffered[at:]
    closing.append(True)
    for _ in workers:
        items.put(None)
    for t in workers:
        t.join()
    text = json.dumps({"counts": counts, "errors": len(errors) + (1 if buffered else 0),
                       "samples": errors[:MAX_ERROR_SAMPLES]
                       + ([(None, "the unlink helper got a cut record")] if buffered else [])})
    data = text.encode()
    while data:
        data = data[os.write(report, data):]
    return 0


class Prefetcher:
    """Cold page cache: a process forked from the sweep opens the window's files ahead of
    it (up to PREFETCH_AHEAD), each with a readahead hint, and closes them. Opening a
    file whose inode is not cached waits for the disk, one at a time in the sweep;
    here those waits overlap with the sweep's judging, and the hints keep the disk's
    queue full. It only warms the cache: the sweep still opens, reads and judges
    every file itself. Started only once a batch missed the cache (on a warm store
    it would only cost CPU); the same user and priority as the sweep (a fork),
    killed when the window is done, or with the sweep."""

    def __init__(self, sweep, window, start):
        self.progress = mmap.mmap(-1, 8)  # the sweep's position in the window, shared
        self.set(start)
        parent = os.getpid()
        try:
            self.pid = os.fork()
        except OSError:
            self.pid = None  # only a speed-up: the sweep reads on without it
            return
        if self.pid == 0:
            status = 1
            try:
                if become_helper(parent):
                    self.warm(sweep.dfd, sweep.open_flags, window, start)
                    status = 0
            finally:
                os._exit(status)

    def set(self, position):
        struct.pack_into("=q", self.progress, 0, position)

    def warm(self, dfd, flags, window, start):
        for i in range(start, len(window)):
            while i - struct.unpack_from("=q", self.progress, 0)[0] > PREFETCH_AHEAD:
                time.sleep(0.005)
            try:
                fd = os.open(window[i][1], flags, dir_fd=dfd)
            except OSError:
                continue  # the sweep will see why
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            os.close(fd)

    def close(self):
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = None


def name_hash(name):
    """How a report names a session file: its name holds the session key, a login. To find
    the file: ``for f in *; do printf %s "$f" | sha256sum | grep -q ^HASH && echo "$f"; done``."""
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def shown_name(name):
    return name if name in OWN_FILES else "session file sha256:%s" % name_hash(name)


def is_session_name(name, prefix, valid):
    """Django's own test: the cookie name, then a key it would accept (8+ chars of [a-z0-9])."""
    if not name.startswith(prefix):
        return False
    key = name[len(prefix):]
    # strip() removes every character of the set: nothing left means every character is one of them.
    return len(key) >= 8 and not key.strip(valid if isinstance(valid, str) else "".join(valid))


def version(st):
    """What tells one save of a session file from another: a save writes a new file under the name."""
    return st.st_ino, st.st_size, st.st_mtime_ns


# -- lock and entry points ------------------------------------------------------------


def open_store(store):
    """The store's directory fd; the store itself must not be a link (who owns its target?)."""
    try:
        return os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Fatal("the session store %s does not exist (omerowebd creates it when it starts)" % store)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(store):
            raise Fatal("the session store %s is a symbolic link: point SESSION_FILE_PATH at the directory "
                        "itself" % store)
        raise Fatal("cannot open the session store %s: %s" % (store, e.strerror))


def take_lock(dfd):
    """One sweeper per store, on this host or any other sharing it: (fd, None), or (None, holder).

    A POSIX record lock (fcntl F_SETLK) on a file in the store, because that
    is the lock NFS carries between hosts (natively in NFSv4, through lockd in
    v3); flock() is emulated with it on Linux NFS clients but stays local with
    ``local_lock=flock`` or ``all``, and on other systems. The holder writes
    "host pid" into the file for status and for whoever is kept out. A POSIX
    lock goes with any close of the file in this process: nothing else here
    opens it. The lock file is never removed, so two sweepers always lock
    the same inode."""
    for _ in range(3):
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            try:
                fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
            except FileExistsError:
                continue  # another sweeper made it first: open theirs
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM):
                raise
            replace_foreign(dfd, LOCK_NAME)  # a link, a socket, a directory, a file we may not write
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            holder = lock_holder(fd) if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None
            os.close(fd)
            if holder is not None:  # another host's user, whose uid differs from ours: its sweep runs
                return None, holder
            replace_foreign(dfd, LOCK_NAME)  # a FIFO, a hard link, someone else's stale file: not our lock
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = read_holder(fd)
            os.close(fd)
            return None, holder
        os.pwrite(fd, holder_record(), 0)
        if st.st_size > HOLDER_SIZE:  # an older sweeper's longer file
            os.ftruncate(fd, HOLDER_SIZE)
        os.fsync(fd)  # on NFS, the other hosts read the record from the server, not from this host's cache
        return fd, None
    raise OSError(errno.EAGAIN, "the lock file %s keeps changing under us" % LOCK_NAME)


HOLDER_SIZE = 80  # "host pid" (host at most 64, pid at most 10), padded: written whole, in one pwrite
HOLDER_LOOKS = 10  # a holder writes its record just after it locks: look again, 5 ms apart, before "unknown"


def holder_record():
    """This sweeper's "host pid", padded to HOLDER_SIZE so that a shorter
    record never leaves the end of a longer one behind it."""
    return ("%s %d" % (socket.gethostname(), os.getpid())).ljust(HOLDER_SIZE - 1).encode() + b"\n"


def read_holder(fd):
    """The "host pid" a holder wrote, or "" when it is not that.

    A new lock file is empty between the holder's lock and its write: a
    reader in that moment looks again, briefly, rather than say "unknown"."""
    for look in range(HOLDER_LOOKS):
        try:
            text = os.pread(fd, 128, 0).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""
        if is_holder(text):
            return text
        if text:  # not a record a sweeper writes: looking again will not help
            return ""
        if look + 1 < HOLDER_LOOKS:
            time.sleep(0.005)
    return ""


def is_holder(text):
    host, _, pid = text.partition(" ")
    return (0 < len(host) <= 64 and all(ch.isalnum() or ch in "-._" for ch in host) and host.isascii()
            and pid.isdigit() and len(pid) <= 10)


def lock_holder(fd):
    """Who holds a lock on the open file: "host pid" (or "" unknown), None when nobody does (F_GETLK)."""
    probe = struct.pack(FLOCK_FORMAT, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return None
    if struct.unpack(FLOCK_FORMAT, answer)[0] == fcntl.F_UNLCK:
        return None
    return read_holder(fd)


def replace_foreign(dfd, name):
    """Remove an entry with our file's name that we did not make (we own the store: we may)."""
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(name, dir_fd=dfd)


def sweep(request):
    started = time.time()
    t0 = time.monotonic()
    django = Django(request["omerodir"], request.get("config_xml"))
    try:
        return sweep_with(request, django, started, t0)
    finally:
        django.close()


def sweep_with(request, django, started, t0):
    snapshot = request.get("snapshot")
    t_settings = time.monotonic()
    if not django.snapshot_fits(snapshot):
        snapshot = django.load().snapshot
    else:
        if not snapshot["use_tz"]:
            set_time_zone(snapshot["time_zone"])
        django.known = snapshot
    t_settings = time.monotonic() - t_settings
    # The store omerowebd derived from its own config, whatever the settings say.
    store = request.get("store") or snapshot["file_path"]
    django.known_store = store
    result = {"engine": snapshot["engine"], "store": store, "dry_run": bool(request.get("dry_run")),
              "started_at": started, "snapshot": snapshot}
    if snapshot["engine"] not in FILE_ENGINES:
        raise Fatal("the session engine is %s, not a file store" % snapshot["engine"])
    dfd = open_store(store)
    try:
        try:
            lock, holder = take_lock(dfd)
        except OSError as e:
            raise Fatal("cannot lock the session store %s: %s" % (store, e.strerror))
        if lock is None:
            result.update(busy=True, holder=holder, duration=round(time.monotonic() - t0, 3))
            return result
        result["locked_at"] = time.time()
        try:
            pacer = Pacer([p for p in request.get("ports") or () if isinstance(p, int) and 0 < p < 65536])
            job = Sweep(dfd, snapshot, django, result["dry_run"], request.get("ledger", True), pacer)
            signal.signal(signal.SIGTERM, lambda *_: setattr(job, "stopping", True))
            result.update(job.run())
            result["error_samples"] = job.error_samples
            result["interrupted"] = job.stopping
            result["django_settings"] = django.configured_by
            result["phases"] = {k: round(v, 3) for k, v in dict(job.phases, settings=t_settings).items()}
            result["busy_share"] = round(pacer.busy_checks / pacer.checks, 3) if pacer.checks else None
        finally:
            result["unlocked_at"] = time.time()  # just before: the lock goes with the close
            os.close(lock)
    finally:
        os.close(dfd)
    result["duration"] = round(time.monotonic() - t0, 3)
    return result


def run_clearsessions(request):
    """Django's own clearsessions (database engines), at our priority; its exit status is ours."""
    # No secret key: clearsessions deletes by a database column, it decodes nothing.
    django = Django(request["omerodir"], request.get("config_xml"), with_secret_key=False)
    try:
        env = dict(os.environ, OMERODIR=django.environ())
        return subprocess.call([sys.executable, request["manage"], "clearsessions"], env=env)
    finally:
        django.close()


def not_dumpable():
    """prctl(PR_SET_DUMPABLE, 0): no other process of our user may ptrace us (or read our memory in /proc).

    We run as the service user, which must be assumed compromised; another of
    its processes attached to us could forge our report to root. exec() makes
    a process dumpable again, so this is done first thing in every exec."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def main():
    not_dumpable()
    # The ledger's ids are hash() values: they need the same seed in every sweep.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, PYTHONHASHSEED="0"))
    request = json.loads(sys.stdin.read() or "{}")
    notes = lower_priority(int(request.get("nice", 19)), bool(request.get("idle_io", True)))
    if request.get("mode") == "clearsessions":
        try:
            return run_clearsessions(request)
        except Fatal as e:
            sys.stderr.write("%s\n" % e)  # the daemon reports clearsessions' last line of stderr
            return 1
    try:
        result = sweep(request)
        result["priority_notes"] = notes
    except Fatal as e:
        result = {"fatal": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
