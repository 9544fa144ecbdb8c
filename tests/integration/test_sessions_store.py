"""The sweep against Django itself: stores made with OMERO.web's own SessionStore
in the real venv; after our sweep the store holds exactly what Django's
``manage.py clearsessions`` leaves on a copy of it."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from omerowebd import sessions
from omerowebd.config import SessionsSettings
from omerowebd.omero_config import write_config_xml
from omerowebd.session_sweep import LEDGER_NAME, LOCK_NAME

pytestmark = pytest.mark.omeroweb

DAY = 86400

# Runs in the OMERO.web venv: every session here is written by Django's own
# SessionStore (set_expiry, save), then aged with utime where the case needs it.
MAKE_SESSIONS = r"""
import json, os, sys, time, warnings
from datetime import timedelta
from importlib import import_module
from django.conf import settings
from django.utils import timezone

warnings.simplefilter("ignore")
if not settings.SESSION_ENGINE.endswith(("file", "filesessionstore")):
    import django
    django.setup()  # the database engines need the app registry
Store = import_module(settings.SESSION_ENGINE).SessionStore
now = time.time()
made = {}

def make(name, expiry="unset", age=0, data=None, raw_expiry=None):
    s = Store()
    s.update(data or {"_auth_user_id": "1", "connector": {"server_id": 1, "user_id": 2}})
    if expiry != "unset":
        s.set_expiry(expiry)
    if raw_expiry is not None:
        s["_session_expiry"] = raw_expiry
    s.save()
    if not hasattr(s, "_key_to_file"):  # a database engine
        made[name] = s.session_key
        return
    path = s._key_to_file()
    if age:
        os.utime(path, (now - age, now - age))
    made[name] = os.path.basename(path)

spec = json.loads(sys.argv[1])
day = 86400
for name in spec:
    if name == "live":
        make(name)
    elif name == "expired":
        make(name, age=2 * day)
    elif name == "just_expired":
        make(name, age=day + 5)
    elif name == "nearly_expired":
        make(name, age=day - 60)
    elif name == "longer_custom_old":       # a date 30 days on: live although mtime + cookie age has passed
        make(name, expiry=timedelta(days=30), age=2 * day)
    elif name == "shorter_custom_fresh":    # a date already past: expired although the file is new
        make(name, expiry=timezone.now() - timedelta(minutes=5))
    elif name == "shorter_custom_live":     # five minutes to go: live
        make(name, expiry=timedelta(minutes=5))
    elif name == "int_expiry_old":          # Django's file backend never expires a positive integer
        make(name, expiry=3600, age=10 * day)
    elif name == "negative_int_expiry":     # ... and always a negative one
        make(name, expiry=-10)
    elif name == "zero_expiry_old":         # 0 means "browser close": falls back to mtime + cookie age
        make(name, expiry=0, age=2 * day)
    elif name == "compressed_short":        # zlib payload with its own expiry
        make(name, expiry=timezone.now() - timedelta(minutes=1), data={"blob": "x" * 5000})
    elif name == "compressed_plain_old":
        make(name, age=2 * day, data={"blob": "y" * 5000})
    elif name == "unicode_old":             # \\u escapes in the JSON: decoded by Django
        make(name, age=2 * day, data={"user": "J\u00fcrgen \u5f20"})
    elif name == "unicode_fresh":
        make(name, data={"user": "J\u00fcrgen"})
    elif name == "mentions_key_fresh":      # the key's name inside a value, no expiry of its own
        make(name, data={"note": "_session_expiry"})
    elif name == "naive_date":              # Django cannot compare it: clearsessions stops there
        make(name, raw_expiry="2020-01-01T00:00:00")
    elif name.startswith("bulk_live_"):
        make(name, age=int(name.rsplit("_", 1)[1]) % day)
    elif name.startswith("bulk_old_"):
        make(name, age=day + 10 + int(name.rsplit("_", 1)[1]))
print(json.dumps(made))
"""

CASES = [
    "live", "expired", "just_expired", "nearly_expired", "longer_custom_old", "shorter_custom_fresh",
    "shorter_custom_live", "int_expiry_old", "negative_int_expiry", "zero_expiry_old", "compressed_short",
    "compressed_plain_old", "unicode_old", "unicode_fresh", "mentions_key_fresh",
]
# What Django decides for each, so a change in Django shows up as a clear failure here too.
DJANGO_DELETES = {"expired", "just_expired", "shorter_custom_fresh", "negative_int_expiry", "zero_expiry_old",
                  "compressed_short", "compressed_plain_old", "unicode_old", "forged_expiry_old", "garbage_old",
                  "truncated_old"}


class Site:
    """An OMERODIR whose config.xml points Django's file store at ``store``."""

    def __init__(self, root: Path, venv: Path, name: str, secret: bytes | None = None) -> None:
        self.venv = venv
        self.omerodir = root / f"omerodir-{name}"
        self.store = root / f"store-{name}"
        self.store.mkdir(mode=0o700)
        (self.omerodir / "var").mkdir(parents=True)
        if secret is not None:
            (self.omerodir / "var" / "django_secret_key").write_bytes(secret)
        write_config_xml(self.omerodir, {
            "omero.web.django_additional_settings": json.dumps([["SESSION_FILE_PATH", str(self.store)]]),
        })

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "OMERODIR": str(self.omerodir), "DJANGO_SETTINGS_MODULE": "omeroweb.settings"}

    def make(self, names: list[str]) -> dict[str, str]:
        done = subprocess.run([str(self.venv / "bin" / "python"), "-c", MAKE_SESSIONS, json.dumps(names)],
                              env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def clearsessions(self) -> subprocess.CompletedProcess[str]:
        manage = omeroweb_dir(self.venv) / "manage.py"
        return subprocess.run([str(self.venv / "bin" / "python"), str(manage), "clearsessions"],
                              env={**os.environ, "OMERODIR": str(self.omerodir)}, capture_output=True, text=True,
                              timeout=600)

    def target(self, **settings: object) -> sessions.Target:
        return sessions.Target(
            engine="django.contrib.sessions.backends.file", kind="file", store=self.store, omerodir=self.omerodir,
            python=self.venv / "bin" / "python", manage=omeroweb_dir(self.venv) / "manage.py",
            settings=SessionsSettings(**settings),  # type: ignore[arg-type]
        )

    def copy_to(self, other: Site) -> None:
        shutil.rmtree(other.store)
        shutil.copytree(self.store, other.store, symlinks=True, copy_function=shutil.copy2)

    def listing(self) -> set[str]:
        return set(os.listdir(self.store)) - {LOCK_NAME, LEDGER_NAME}


def omeroweb_dir(venv: Path) -> Path:
    return next(venv.glob("lib/python3*/site-packages/omeroweb"))


@pytest.fixture
def sites(tmp_path: Path, omero_venv: Path) -> tuple[Site, Site]:
    """Two sites with the same secret key: one for us, one for Django's clearsessions."""
    secret = base64.b64encode(os.urandom(40))
    return Site(tmp_path, omero_venv, "ours", secret), Site(tmp_path, omero_venv, "django", secret)


def forge(text: str, payload: dict) -> str:
    """A session-shaped string with a payload of our choosing and a signature that cannot be right."""
    raw = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    _, timestamp, signature = text.rsplit(":", 2)
    return f"{raw}:{timestamp}:{signature[::-1]}"


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def add_odd_entries(site: Site, made: dict[str, str], outside: Path) -> dict[str, str]:
    """Corrupt, forged, empty and foreign entries: the things a real store collects."""
    store = site.store
    sample = (store / made["live"]).read_text()
    odd: dict[str, str] = {}

    def put(name: str, filename: str, text: str, old: bool) -> None:
        (store / filename).write_text(text)
        if old:
            age(store / filename, 2 * DAY)
        odd[name] = filename

    put("forged_expiry_old", "sessionid" + "f" * 32, forge(sample, {"_session_expiry": "2999-01-01T00:00:00+00:00"}), True)
    put("forged_expired_fresh", "sessionid" + "e" * 32, forge(sample, {"_session_expiry": -100}), False)
    put("garbage_old", "sessionid" + "a1" * 16, "this is not a session", True)
    put("garbage_fresh", "sessionid" + "b2" * 16, "nor is this", False)
    put("truncated_old", "sessionid" + "c3" * 16, sample[: len(sample) // 2], True)
    put("empty_old", "sessionid" + "d4" * 16, "", True)
    put("foreign_old", "notes.txt", "hello", True)
    put("short_key_old", "sessionidabc", sample, True)
    put("upper_key_old", "sessionid" + "ABCDEFGHIJKL", sample, True)
    put("django_temp_old", made["expired"] + "_out_x1y2z3", sample, True)
    (store / ("sessionid" + "9" * 32)).mkdir()
    age(store / ("sessionid" + "9" * 32), 2 * DAY)
    odd["directory"] = "sessionid" + "9" * 32
    target = outside / "fresh-target"
    target.write_text("not a session")
    (store / ("sessionid" + "8" * 32)).symlink_to(target)
    odd["symlink"] = "sessionid" + "8" * 32
    (store / ("sessionid" + "7" * 32)).symlink_to(outside / "nowhere")
    odd["dangling_symlink"] = "sessionid" + "7" * 32
    return odd


@pytest.mark.parametrize("settings_known", [False, True], ids=["first-sweep", "settings-known"])
def test_sweep_deletes_exactly_what_clearsessions_deletes(sites: tuple[Site, Site], tmp_path: Path,
                                                          settings_known: bool) -> None:
    ours, theirs = sites
    made = ours.make(CASES)
    entries = {**made, **add_odd_entries(ours, made, tmp_path)}
    ours.copy_to(theirs)
    assert ours.listing() == theirs.listing()

    done = theirs.clearsessions()
    assert done.returncode == 0, done.stderr
    # The daemon's later sweeps: Django decodes with the settings an earlier sweep learnt, without
    # importing omeroweb.settings again (the secret key checked against what that sweep saw).
    snapshot = sessions.sweep_sync(ours.target(), dry_run=True)["snapshot"] if settings_known else None
    result = sessions.sweep_sync(ours.target(), snapshot=snapshot)

    assert result.get("error") is None, result
    assert result["django_settings"] == ("snapshot" if settings_known else "omeroweb.settings")
    assert ours.listing() == theirs.listing()
    deleted = {name for name, filename in entries.items() if filename not in ours.listing()}
    assert deleted == DJANGO_DELETES
    assert result["deleted"] == len(DJANGO_DELETES)
    assert result["errors"] == 0
    # Only what carries its own expiry (or might) went through Django's decode.
    assert 0 < result["decoded"] < result["read"]


def test_second_sweep_reads_only_what_changed(sites: tuple[Site, Site]) -> None:
    ours, _ = sites
    made = ours.make(["live", "nearly_expired", "shorter_custom_live", "expired"])
    first = sessions.sweep_sync(ours.target())
    assert first["deleted"] == 1 and first["read"] == 4

    second = sessions.sweep_sync(ours.target(), snapshot=first["snapshot"])
    # Plain sessions are decided from their stat alone; the one with its own expiry is read again.
    assert second["read"] == 1 and second["ledger_hits"] == 2 and second["deleted"] == 0

    # A request saves the plain session again, now with an expiry of its own (Django's way: a temp
    # file renamed over it): the new version is read, the untouched plain one still is not.
    saved = ours.store / made["live"]
    tmp = ours.store / (made["live"] + "_out_tmp")
    tmp.write_text((ours.store / made["shorter_custom_live"]).read_text())
    os.replace(tmp, saved)
    third = sessions.sweep_sync(ours.target(), snapshot=first["snapshot"])
    assert third["read"] == 2 and third["ledger_hits"] == 1


def test_a_new_secret_key_means_the_full_settings_again(sites: tuple[Site, Site]) -> None:
    ours, theirs = sites
    ours.make(["live", "shorter_custom_fresh", "longer_custom_old", "expired"])
    snapshot = sessions.sweep_sync(ours.target(), dry_run=True)["snapshot"]
    for site in sites:  # the key changes (the old sessions' signatures fail now, in Django too)
        (site.omerodir / "var" / "django_secret_key").write_bytes(base64.b64encode(os.urandom(40)))
    ours.copy_to(theirs)
    assert theirs.clearsessions().returncode == 0
    result = sessions.sweep_sync(ours.target(), snapshot=snapshot)
    assert result.get("error") is None and result["django_settings"] == "omeroweb.settings", result
    assert ours.listing() == theirs.listing()


def test_dry_run_deletes_nothing(sites: tuple[Site, Site]) -> None:
    ours, _ = sites
    ours.make(["live", "expired", "shorter_custom_fresh"])
    before = ours.listing()
    result = sessions.sweep_sync(ours.target(), dry_run=True)
    assert result["dry_run"] and result["deleted"] == 2
    assert ours.listing() == before


def test_files_django_cannot_load_are_reported_and_left(sites: tuple[Site, Site]) -> None:
    ours, theirs = sites
    made = ours.make(["naive_date", "expired"])
    binary = ours.store / ("sessionid" + "0" * 32)
    binary.write_bytes(b"\xff\xfe not ascii")
    age(binary, 2 * DAY)
    fifo = ours.store / ("sessionid" + "1" * 32)
    os.mkfifo(fifo)  # Django's clearsessions would block on it for ever

    result = sessions.sweep_sync(ours.target())

    assert result["deleted"] == 1 and result["errors"] == 2
    assert binary.exists() and fifo.exists() and (ours.store / made["naive_date"]).exists()
    samples = "\n".join(result["error_samples"])
    assert "not ASCII" in samples and "cannot compute its expiry" in samples
    # Django itself stops on these files (a traceback); that is why they are reported, not decided.
    os.unlink(fifo)
    ours.copy_to(theirs)
    assert theirs.clearsessions().returncode != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the sweep as another user")
def test_unreadable_file_is_reported_and_left(omero_venv: Path) -> None:
    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="omerowebd-sessions-"))  # pytest's tmp dirs are root's alone
    try:
        root.chmod(0o755)
        ours = Site(root, omero_venv, "ours")
        ours.make(["live"])
        first = sessions.sweep_sync(ours.target())  # learns the settings as root
        for path in [root, *root.rglob("*")]:
            os.chown(path, nobody, nobody, follow_symlinks=False)
        locked = ours.store / ("sessionid" + "5" * 32)
        locked.write_text("secret")  # root's, 0600 below
        locked.chmod(0o600)
        age(locked, 2 * DAY)
        request = json.dumps({"mode": "sweep", "omerodir": str(ours.omerodir), "snapshot": first["snapshot"],
                              "nice": 0, "idle_io": False})
        done = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                               str(ours.venv / "bin" / "python"), str(sessions.SCRIPT)],
                              input=request, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout, done.stderr
        result = json.loads(done.stdout)
        assert result["errors"] == 1 and "Permission denied" in result["error_samples"][0], result
        assert locked.exists()
    finally:
        shutil.rmtree(root)


def test_lock_keeps_a_second_sweeper_out(sites: tuple[Site, Site]) -> None:
    ours, _ = sites
    made = ours.make(["expired"])
    with open(ours.store / LOCK_NAME, "a+") as holder:
        fcntl.lockf(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX lock, as NFS carries it between hosts
        holder.write("web-2.example.org 4242\n")
        holder.flush()
        result = sessions.sweep_sync(ours.target())
        assert result["busy"] and "host web-2.example.org, pid 4242" in result["error"]
        assert (ours.store / made["expired"]).exists()
    result = sessions.sweep_sync(ours.target())
    assert result.get("error") is None and result["deleted"] == 1


def test_timeout_stops_the_sweep(sites: tuple[Site, Site]) -> None:
    ours, _ = sites
    ours.make(["expired"])
    result = sessions.sweep_sync(ours.target(timeout=0.05))
    assert "sessions.timeout" in result["error"]
