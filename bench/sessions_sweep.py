"""Session sweep benchmark: omerowebd's sweep against Django's clearsessions.

    python bench/sessions_sweep.py [--files 100000] [--expired 0.1] [--cold] [--million] [--no-latency]

One run, printed as a table. The sites use a cookie age of 30 minutes, so
that time can expire sessions within the run:

* a store of FILES sessions written by OMERO.web's own SessionStore.encode:
  EXPIRED of them past the cookie age, as many again due to expire five
  minutes after they were made, the rest live; copied; ``manage.py
  clearsessions`` sweeps one copy, omerowebd's sweep the other; both must
  leave the same files (checked), and the wall times give the ratio
  (target >= 5x). Once as the daemon's very first sweep (the settings not yet
  known), once with the settings known (every sweep after the first);
* the steady state: the next sweep of the store, once the second share has
  expired (the ledger knows what the first sweep read), and once more with
  nothing expired since;
* --cold drops the page cache before each sweep (a store nothing has read
  for hours; needs root); else the store is in the cache, as just written;
* peak memory (max RSS) of each sweeper; with --million also a 1M-file store
  (target < 100 MB);
* request latency of OMERO.web's login page, served by gunicorn on
  127.0.0.1, with no sweep running, during our sweep and during clearsessions.

Needs the OMERO.web venv ($OMEROWEBD_TEST_VENV, default /opt/omero/web/venv3).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omerowebd import sessions  # noqa: E402
from omerowebd.config import SessionsSettings  # noqa: E402
from omerowebd.omero_config import write_config_xml  # noqa: E402
from omerowebd.session_sweep import LEDGER_NAME, LOCK_NAME  # noqa: E402

VENV = Path(os.environ.get("OMEROWEBD_TEST_VENV", "/opt/omero/web/venv3"))
OWN = {LOCK_NAME, LEDGER_NAME}
COOKIE_AGE = 1800
SOON = 300  # seconds after the store is made that another share of it expires

# Runs in the venv: N sessions, each encoded by Django's SessionStore, written
# as the file backend names them; every expired one aged two cookie ages.
MAKE = r"""
import os, sys, time, warnings
from importlib import import_module
from django.conf import settings
from django.utils.crypto import get_random_string
from django.contrib.sessions.backends.base import VALID_KEY_CHARS
warnings.simplefilter("ignore")
store = import_module(settings.SESSION_ENGINE).SessionStore()
path, n, expired = settings.SESSION_FILE_PATH, int(sys.argv[1]), float(sys.argv[2])
SOON = int(sys.argv[3])
now, age = time.time(), settings.SESSION_COOKIE_AGE
every = round(1 / expired) if expired else 0
for i in range(n):
    data = {"_auth_user_id": str(i), "connector": {"server_id": 1, "user_id": i, "is_secure": False,
            "omero_session_key": get_random_string(36), "is_public": False}, "active_group": i % 7}
    name = os.path.join(path, settings.SESSION_COOKIE_NAME + get_random_string(32, VALID_KEY_CHARS))
    with open(name, "w", encoding="ascii") as f:
        f.write(store.encode(data))
    if every and i % every == 0:
        t = now - 2 * age - i % 60          # expired already
    elif every and i % every == 1:
        t = now - age + SOON                # expires SOON seconds from now
    else:
        t = now - age // 3 - i % 60         # live for another two thirds of the cookie age
    os.utime(name, (t, t))
"""


class Site:
    def __init__(self, root: Path, name: str, secret: bytes) -> None:
        self.omerodir = root / f"omerodir-{name}"
        self.store = root / f"store-{name}"
        self.store.mkdir(parents=True)
        (self.omerodir / "var").mkdir(parents=True)
        (self.omerodir / "var" / "django_secret_key").write_bytes(secret)
        write_config_xml(self.omerodir, {
            "omero.web.django_additional_settings": json.dumps([["SESSION_FILE_PATH", str(self.store)]]),
            # Short, so that a share of the store expires between two sweeps of one run.
            "omero.web.session_cookie_age": str(COOKIE_AGE),
        })

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "OMERODIR": str(self.omerodir)}

    def fill(self, n: int, expired: float) -> None:
        env = {**self.env, "DJANGO_SETTINGS_MODULE": "omeroweb.settings"}
        subprocess.run([str(VENV / "bin" / "python"), "-c", MAKE, str(n), str(expired), str(SOON)], env=env,
                       check=True)

    def listing(self) -> set[str]:
        return set(os.listdir(self.store)) - OWN

    def replace_store_with(self, other: Site) -> None:
        shutil.rmtree(self.store)
        subprocess.run(["cp", "-a", str(other.store), str(self.store)], check=True)
        for own in OWN:
            (self.store / own).unlink(missing_ok=True)

    def target(self) -> sessions.Target:
        return sessions.Target(engine="django.contrib.sessions.backends.file", kind="file", store=self.store,
                               omerodir=self.omerodir, python=VENV / "bin" / "python", manage=manage(),
                               settings=SessionsSettings())


def manage() -> Path:
    return next(VENV.glob("lib/python3*/site-packages/omeroweb")) / "manage.py"


COLD = False


def settle() -> None:
    """Writeback of the files just made must not land inside a timed sweep; with --cold,
    each sweeper starts with an empty page cache (needs root)."""
    os.sync()
    if COLD:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_measured(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> tuple[float, float, bytes]:
    started = time.monotonic()
    r, w = os.pipe()
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=w, stderr=subprocess.DEVNULL)
    os.close(w)
    if stdin is not None:
        proc.stdin.write(stdin)  # type: ignore[union-attr]
    proc.stdin.close()  # type: ignore[union-attr]
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{command[:3]} failed with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, b"".join(chunks)


def clearsessions(site: Site) -> tuple[float, float]:
    seconds, rss, _ = run_measured([str(VENV / "bin" / "python"), str(manage()), "clearsessions"], site.env)
    return seconds, rss


def ours(site: Site, snapshot: dict | None = None) -> tuple[float, float, dict]:
    request = json.dumps({"mode": "sweep", "omerodir": str(site.omerodir), "snapshot": snapshot, "ledger": True,
                          "nice": 19, "idle_io": True}).encode()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    seconds, rss, out = run_measured([str(VENV / "bin" / "python"), str(sessions.SCRIPT)], env, request)
    return seconds, rss, json.loads(out)


# -- latency ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    def __init__(self, site: Site) -> None:
        self.port = free_port()
        omeroweb = manage().parent
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
             "omeroweb.wsgi:application"],
            cwd=omeroweb, env=site.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.get() == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("gunicorn did not serve the login page within 120s")

    def get(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/webclient/login/")
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def sample(self, until: threading.Event | None = None, count: int = 200) -> list[float]:
        """Latencies (ms) of requests in a row: ``count`` of them, or until the event is set."""
        times = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if until is None and len(times) >= count:
                break
            if until is not None and until.is_set():
                break
            t = time.perf_counter()
            status = self.get()
            times.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise SystemExit(f"login page answered {status}")
        return times

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


def during(gunicorn: Gunicorn, work: "callable") -> list[float]:
    done = threading.Event()
    result: list[float] = []
    sampler = threading.Thread(target=lambda: result.extend(gunicorn.sample(until=done)))
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return result


def describe_latency(ms: list[float]) -> str:
    if not ms:
        return "no requests"
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"n={len(ms):4d}  p50 {statistics.median(ms):6.1f} ms  p95 {p95:6.1f} ms  max {ms[-1]:6.1f} ms"


# -- main ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--expired", type=float, default=0.1)
    parser.add_argument("--million", action="store_true", help="also measure peak memory on a 1M-file store")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each sweep (root)")
    parser.add_argument("--dir", help="work directory (default: a temp dir, removed at the end)")
    args = parser.parse_args()
    global COLD
    COLD = args.cold
    if not (VENV / "bin" / "python").exists():
        raise SystemExit(f"no OMERO.web venv at {VENV}")
    root = Path(tempfile.mkdtemp(prefix="omerowebd-bench-", dir=args.dir))
    rows: list[tuple[str, str, str, str]] = []
    try:
        secret = os.urandom(32).hex().encode()
        pristine = Site(root, "pristine", secret)
        a, b = Site(root, "ours", secret), Site(root, "django", secret)
        t = time.monotonic()
        pristine.fill(args.files, args.expired)
        made_at = time.time()
        print(f"# made {args.files} sessions ({args.expired:.0%} expired) in {time.monotonic() - t:.0f}s", flush=True)
        cache = "dropped before each sweep" if COLD else "warm (the store was just written)"
        print(f"# clearsessions vs omerowebd's sweep (nice 19, idle I/O class); page cache {cache}", flush=True)

        snapshot = None
        for case in ("first sweep, settings not known yet", "first sweep, settings known"):
            a.replace_store_with(pristine)
            b.replace_store_with(pristine)
            settle()
            django_s, django_mb = clearsessions(b)
            settle()
            ours_s, ours_mb, report = ours(a, snapshot)
            same = a.listing() == b.listing()
            rows.append((f"{case}", f"{django_s:.2f} s / {django_mb:.0f} MB", f"{ours_s:.2f} s / {ours_mb:.0f} MB",
                         f"{django_s / ours_s:.1f}x"))
            print(f"# {case}: deleted {report['deleted']}, read {report['read']}, decoded {report['decoded']}; "
                  f"same files left as clearsessions: {same}", flush=True)
            if not same:
                raise SystemExit("the sweeps disagree: " + repr(sorted(a.listing() ^ b.listing())[:10]))
            snapshot = report["snapshot"]
        shutil.rmtree(pristine.store)

        # The steady state: the next sweep, once another share of the store has expired since.
        wait = made_at + SOON + 3 - time.time()
        if wait > 0:
            print(f"# waiting {wait:.0f}s for the next share of sessions to expire", flush=True)
            time.sleep(wait)
        b.replace_store_with(a)
        settle()
        django2_s, django2_mb = clearsessions(b)
        settle()
        ours2_s, ours2_mb, report2 = ours(a, report["snapshot"])
        rows.append(("next sweep, 10% expired since", f"{django2_s:.2f} s / {django2_mb:.0f} MB",
                     f"{ours2_s:.2f} s / {ours2_mb:.0f} MB", f"{django2_s / ours2_s:.1f}x"))
        print(f"# next sweep: deleted {report2['deleted']}, read {report2['read']} files, "
              f"{report2['ledger_hits']} known from the ledger; same: {a.listing() == b.listing()}", flush=True)
        if a.listing() != b.listing():
            raise SystemExit("the sweeps disagree")
        b.replace_store_with(a)
        settle()
        django3_s, django3_mb = clearsessions(b)
        settle()
        ours3_s, ours3_mb, report3 = ours(a, report["snapshot"])
        rows.append(("next sweep, nothing expired since", f"{django3_s:.2f} s / {django3_mb:.0f} MB",
                     f"{ours3_s:.2f} s / {ours3_mb:.0f} MB", f"{django3_s / ours3_s:.1f}x"))

        latency: list[tuple[str, str]] = []
        if not args.no_latency:
            a.fill(args.files // 10, 1.0)  # something to delete again
            b.replace_store_with(a)
            gunicorn = Gunicorn(a)
            try:
                gunicorn.sample(count=50)  # warm up
                latency.append(("no sweep", describe_latency(gunicorn.sample(count=300))))
                latency.append(("during omerowebd's sweep",
                                describe_latency(during(gunicorn, lambda: ours(a, report["snapshot"])))))
                latency.append(("during clearsessions", describe_latency(during(gunicorn, lambda: clearsessions(b)))))
                latency.append(("no sweep, again", describe_latency(gunicorn.sample(count=300))))
            finally:
                gunicorn.stop()

        if args.million:
            shutil.rmtree(b.store)
            c = Site(root, "million", secret)
            t = time.monotonic()
            c.fill(1_000_000, args.expired)
            print(f"# made 1000000 sessions in {time.monotonic() - t:.0f}s", flush=True)
            settle()
            m_s, m_mb, m_report = ours(c)
            m2_s, m2_mb, _ = ours(c, m_report["snapshot"])
            rows.append(("1M files, first sweep (ours only)", "-", f"{m_s:.2f} s / {m_mb:.0f} MB", "-"))
            rows.append(("1M files, next sweep (ours only)", "-", f"{m2_s:.2f} s / {m2_mb:.0f} MB", "-"))

        print()
        print(f"| {'case':<36} | {'clearsessions':>18} | {'omerowebd':>18} | {'ratio':>6} |")
        print(f"|{'-' * 38}|{'-' * 20}|{'-' * 20}|{'-' * 8}|")
        for case, theirs, mine, ratio in rows:
            print(f"| {case:<36} | {theirs:>18} | {mine:>18} | {ratio:>6} |")
        if latency:
            print()
            print("login page latency (one client in a loop, 127.0.0.1, gunicorn 2 sync workers):")
            for case, text in latency:
                print(f"  {case:<26} {text}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
