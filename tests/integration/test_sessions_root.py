"""``omerowebctl sessions clear`` run by root with no daemon, against a store the
service user owns and may have booby-trapped (issue: the service user can never
become root). Played here by ``nobody``: it owns the state dir, the store, the
site's OMERODIR (config.xml, the secret key) and makes the sessions with the
venv's own Django. Root owns the TOML. After each sweep: root's files are
untouched (content, owner, mode, link count), the sweep ran as nobody, and it
swept exactly the store the TOML names, with the TOML's settings."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd.omero_config import with_session_path, write_config_xml
from omerowebd.session_sweep import LEDGER_NAME, LEDGER_TMP, LOCK_NAME, name_hash
from omerowebd.sessions import SessionService, pinned_properties

from .test_sessions_service import Log, venv_info
from .test_sessions_store import DAY, MAKE_SESSIONS, age

pytestmark = [
    pytest.mark.omeroweb,
    pytest.mark.skipif(os.geteuid() != 0, reason="root's side of the sweep needs root"),
]

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Site:
    root: Path  # root's, 0755: what the TOML and root's own files live in
    venv: Path

    @property
    def toml(self) -> Path:
        return self.root / "omerowebd.toml"

    @property
    def omerodir(self) -> Path:
        return self.root / "omerodir"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def store(self) -> Path:
        return self.state / "sessions"

    def as_nobody(self, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
                              env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd="/", capture_output=True, text=True,
                              timeout=300)

    def make(self, names: list[str], store: Path | None = None) -> dict[str, str]:
        """Sessions written by the venv's Django as nobody, into ``store`` (the TOML's by default)."""
        view = Path(tempfile.mkdtemp(prefix="omerowebd-make-", dir=self.root))
        try:
            (view / "var").mkdir()
            shutil.copy(self.omerodir / "var" / "django_secret_key", view / "var" / "django_secret_key")
            write_config_xml(view, with_session_path({}, store or self.store))
            chown_tree(view)
            done = self.as_nobody(str(self.venv / "bin" / "python"), "-c", MAKE_SESSIONS, json.dumps(names),
                                  env={"OMERODIR": str(view), "DJANGO_SETTINGS_MODULE": "omeroweb.settings"})
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)
        finally:
            shutil.rmtree(view)

    def write_site_config_xml(self, properties: dict[str, str]) -> None:
        """config.xml as the service user could write it."""
        write_config_xml(self.omerodir, properties)
        chown_tree(self.omerodir)

    def clear(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(self.toml), "sessions", "clear",
                               *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    def listing(self, store: Path | None = None) -> set[str]:
        return {p.name for p in (store or self.store).iterdir()} - {LOCK_NAME, LEDGER_NAME}


def chown_tree(top: Path) -> None:
    for path in [top, *top.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def snapshot(path: Path) -> tuple[bytes, int, int, int, int]:
    st = os.lstat(path)
    return path.read_bytes(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink


@pytest.fixture
def site(omero_venv: Path) -> Iterator[Site]:
    # Not pytest's tmp_path: that is root's alone (0700), and nobody must reach its files.
    root = Path(tempfile.mkdtemp(prefix="omerowebd-sessions-root-"))
    root.chmod(0o755)
    s = Site(root, omero_venv)
    try:
        s.toml.write_text(textwrap.dedent(f"""\
            [daemon]
            omerodir = "{s.omerodir}"
            venv = "{omero_venv}"
            runtime_dir = "{root / 'run'}"
            state_dir = "{s.state}"
            """))
        (s.omerodir / "var").mkdir(parents=True)
        # OMERO.web makes the secret key itself when it first starts; here, as nobody would.
        (s.omerodir / "var" / "django_secret_key").write_text(os.urandom(24).hex())
        (s.omerodir / "var" / "django_secret_key").chmod(0o600)
        chown_tree(s.omerodir)
        s.store.mkdir(parents=True, mode=0o700)
        chown_tree(s.state)
        yield s
    finally:
        shutil.rmtree(root)


def test_planted_links_and_root_files_are_left_alone_and_the_sweep_runs_as_the_owner(site: Site) -> None:
    made = site.make(["live", "expired", "shorter_custom_fresh", "longer_custom_old"])
    store = site.store
    victims = {}
    for name in ("lock-victim", "ledger-victim", "tmp-victim", "linked-victim"):
        victim = site.root / name
        victim.write_text(f"root's own {name}\n")
        victim.chmod(0o600 if name == "linked-victim" else 0o644)
        victims[name] = victim
    # The service user's traps: our lock, ledger and its temp file as links to root's files ...
    (store / LOCK_NAME).symlink_to(victims["lock-victim"])
    (store / LEDGER_NAME).symlink_to(victims["ledger-victim"])
    (store / LEDGER_TMP).symlink_to(victims["tmp-victim"])
    for name in (LOCK_NAME, LEDGER_NAME, LEDGER_TMP):
        os.chown(store / name, NOBODY, NOBODY, follow_symlinks=False)
    # ... a hard link to a root file under an expired session's name ...
    hardlink = store / ("sessionid" + "h" * 32)
    os.link(victims["linked-victim"], hardlink)
    age(hardlink, 2 * DAY)
    # ... and a root-owned, root-only file in the store that looks expired.
    rootfile = store / ("sessionid" + "r00t" * 8)
    rootfile.write_text("root's session-looking file")
    rootfile.chmod(0o600)
    age(rootfile, 2 * DAY)
    before = {name: snapshot(path) for name, path in victims.items()}
    rootfile_before = snapshot(rootfile)

    done = site.clear("--json")

    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout)
    assert report["store"] == str(store)
    assert report["deleted"] == 2 and not (store / made["expired"]).exists()
    assert (store / made["live"]).exists() and (store / made["longer_custom_old"]).exists()
    # Root's files: not truncated, not written, not chowned, not chmodded.
    assert {name: snapshot(path) for name, path in victims.items()} == before
    # Run as nobody, it could not read root's 0600 files: reported, not deleted.
    assert snapshot(rootfile) == rootfile_before and hardlink.exists()
    assert report["errors"] == 2 and all("Permission denied" in s for s in report["error_samples"])
    # The sweep's own files are new regular files, made by nobody (the sweep ran as the owner).
    for name in (LOCK_NAME, LEDGER_NAME):
        st = os.lstat(store / name)
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid, st.st_nlink) == (NOBODY, NOBODY, 1), name
    assert not os.path.lexists(store / LEDGER_TMP)
    # Session keys never leave: the report names files by a hash.
    for name in site.listing() | set(made.values()) | {hardlink.name, rootfile.name}:
        key = name[len("sessionid"):]
        assert key not in done.stdout and key not in done.stderr
    assert {f"session file sha256:{name_hash(rootfile.name)}: cannot open: Permission denied",
            f"session file sha256:{name_hash(hardlink.name)}: cannot open: Permission denied"} \
        == set(report["error_samples"])

    # A second sweep uses the ledger nobody wrote.
    again = json.loads(site.clear("--json").stdout)
    assert again["deleted"] == 0 and again["ledger_hits"] >= 1


def test_a_config_xml_written_by_the_service_user_is_ignored(site: Site) -> None:
    decoy = site.root / "decoy"
    decoy.mkdir()
    chown_tree(decoy)
    made = site.make(["live", "expired"])
    decoy_made = site.make(["live", "expired"], store=decoy)
    # Points Django at the decoy and makes every session look expired: neither may count.
    site.write_site_config_xml({
        "omero.web.django_additional_settings": json.dumps([["SESSION_FILE_PATH", str(decoy)]]),
        "omero.web.session_cookie_age": "1",
    })
    age(site.store / made["live"], 60)  # live for the TOML's day, long gone for a cookie age of 1s
    decoy_before = site.listing(decoy)

    done = site.clear("--json")

    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout)
    assert report["store"] == str(site.store) and report["deleted"] == 1
    assert site.listing() == {made["live"]}
    assert site.listing(decoy) == decoy_before and set(decoy_made.values()) <= decoy_before


def test_no_daemon_and_no_config_xml_sweeps_the_tomls_store_not_tmp(site: Site) -> None:
    made = site.make(["live", "expired"])
    assert not (site.omerodir / "etc" / "grid" / "config.xml").exists()
    # Django's default store, were the settings read without the daemon's pin: the system temp dir.
    in_tmp = Path(tempfile.gettempdir()) / ("sessionid" + os.urandom(16).hex())
    in_tmp.write_text((site.store / made["expired"]).read_text())
    age(in_tmp, 2 * DAY)
    try:
        done = site.clear("--json")
        assert done.returncode == 0, done.stderr + done.stdout
        report = json.loads(done.stdout)
        assert report["store"] == str(site.store) and report["deleted"] == 1
        assert site.listing() == {made["live"]}
        assert in_tmp.exists()
    finally:
        in_tmp.unlink()


def test_a_store_that_is_a_link_is_refused(site: Site) -> None:
    made = site.make(["expired"])
    elsewhere = site.root / "elsewhere"
    site.store.rename(elsewhere)
    site.store.symlink_to(elsewhere)
    os.chown(site.store, NOBODY, NOBODY, follow_symlinks=False)

    done = site.clear()

    assert done.returncode == 1
    assert "is a symbolic link" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert (elsewhere / made["expired"]).exists()


def test_roots_store_in_a_directory_the_service_user_can_write_is_refused(site: Site) -> None:
    made = site.make(["expired"])
    os.chown(site.store, 0, 0)  # root's store, but nobody owns the state dir: it could swap the store
    for path in site.store.iterdir():
        os.chown(path, 0, 0)
    done = site.clear()
    assert done.returncode == 1 and "refusing to sweep as root" in done.stdout, done.stdout + done.stderr
    assert (site.store / made["expired"]).exists()


def test_a_toml_the_service_user_can_write_is_refused(site: Site) -> None:
    made = site.make(["expired"])
    os.chown(site.toml, NOBODY, NOBODY)
    done = site.clear()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("omerowebctl: refusing to sweep as root:") and len(done.stderr.splitlines()) == 1
    assert (site.store / made["expired"]).exists()


def test_a_missing_store_is_refused_not_created(site: Site) -> None:
    shutil.rmtree(site.store)
    done = site.clear()
    assert done.returncode == 1 and "does not exist" in done.stdout, done.stdout + done.stderr
    assert not site.store.exists()


def test_a_daemon_run_as_root_sweeps_as_the_stores_owner_too(site: Site) -> None:
    """The daemon's own sweeps (SessionService, the async path) follow the same rule."""
    made = site.make(["live", "expired"])
    lock_victim = site.root / "lock-victim"
    lock_victim.write_text("root's\n")
    (site.store / LOCK_NAME).symlink_to(lock_victim)
    config = config_module.load(site.toml)
    service = SessionService(Log())
    service.update(config, pinned_properties(config), venv_info(site.venv))

    result = asyncio.run(service.sweep_now())

    assert result.get("error") is None and result["deleted"] == 1, result
    assert site.listing() == {made["live"]} and lock_victim.read_text() == "root's\n"
    assert os.lstat(site.store / LOCK_NAME).st_uid == NOBODY
    assert os.lstat(site.store / LEDGER_NAME).st_uid == NOBODY


def test_clearsessions_for_a_database_store_runs_as_the_state_dirs_owner(site: Site) -> None:
    """Database stores: Django's clearsessions, as the owner of the state dir, with the TOML's DATABASES."""
    database_dir = site.root / "db"
    database_dir.mkdir()
    database = database_dir / "sessions.sqlite3"
    databases = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}}
    extra = json.dumps(json.dumps([["DATABASES", databases]]))
    with site.toml.open("a") as toml:
        toml.write(f'\n[omero.web]\nsession_engine = "django.contrib.sessions.backends.db"\n'
                   f"django_additional_settings = {extra}\n")
    manage = str(next(site.venv.glob("lib/python3*/site-packages/omeroweb")) / "manage.py")
    view = site.root / "view"
    (view / "var").mkdir(parents=True)
    write_config_xml(view, {"omero.web.session_engine": "django.contrib.sessions.backends.db",
                            "omero.web.django_additional_settings": json.dumps([["DATABASES", databases]])})
    done = subprocess.run([str(site.venv / "bin" / "python"), manage, "migrate", "sessions"], cwd="/",
                          env={"PATH": "/usr/bin:/bin", "OMERODIR": str(view)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    database.chmod(0o644)  # root's database: the user nobody can read it but not write it

    done = site.clear()
    # Run as nobody, clearsessions could not write root's database: proof of who ran it.
    assert done.returncode == 1 and "readonly database" in done.stdout, done.stdout + done.stderr

    chown_tree(database_dir)  # sqlite writes its journal beside the database
    done = site.clear()
    assert done.returncode == 0 and "clearsessions exit 0" in done.stdout, done.stdout + done.stderr
