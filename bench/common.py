"""What the benchmarks share: the OMERO.web venv, a bare gunicorn, an omerowebd.

The HTTP load and the polling helpers are the test suite's own (tests/conftest.py),
so the benchmarks measure with exactly what the tests assert with.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import Load, free_port, http_get, wait_for  # noqa: E402

VENV = Path(os.environ.get("OMEROWEBD_TEST_VENV", "/opt/omero/web/venv3"))
OMEROWEB = next(VENV.glob("lib/python3*/site-packages/omeroweb"))

__all__ = ["Load", "free_port", "http_get", "wait_for", "BareGunicorn", "Omerowebd", "median", "table", "row",
           "report_args", "write_report", "service_user", "as_user", "installed_python"]

# The user the daemon runs as in production is the service user, not root: as root it would also walk the
# whole venv to check that root alone controls it (trust.py) before it runs anything from it.
SERVICE_USER = "nobody"


def service_user(choice: str | None) -> str | None:
    """The user to run the servers as: ``choice``, else the stand-in service user when this runs as root."""
    if choice == "root":
        return None
    return choice or (SERVICE_USER if os.geteuid() == 0 else None)


def as_user(user: str | None) -> dict[str, object]:
    """Popen's arguments that run the child as ``user`` (its own pid, unlike runuser's)."""
    if not user:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def installed_python(root: Path) -> str:
    """A Python that runs omerowebd as a package install leaves it (the .deb's dist-packages, the .rpm's
    site-packages): the package copied into a venv's site-packages, its bytecode compiled, and no
    editable-install hook. The development venv's hook (a .pth that imports a finder, pathlib and re with it)
    runs at every start of its Python, about 25 ms before anything of the daemon's, which no installed
    daemon pays. The libraries are the development venv's, on the path without their .pth files."""
    target = root / "installed"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = next(target.glob("lib/python3*/site-packages"))
    shutil.copytree(REPO / "omerowebd", site / "omerowebd", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "development-libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(target / "bin" / "python")
    subprocess.run([python, "-m", "compileall", "-q", str(site / "omerowebd")], check=True)
    where = subprocess.run([python, "-c", "import omerowebd; print(omerowebd.__file__)"], capture_output=True,
                           text=True, check=True, cwd="/").stdout.strip()
    if not where.startswith(str(site)):
        raise SystemExit(f"the installed copy is not what imports: {where}")
    return python


def give_to(user: str | None, path: Path) -> None:
    """Let ``user`` own ``path`` and everything below it (the scratch dirs the servers write)."""
    if user:
        subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)
        subprocess.run(["chmod", "0755", str(path)], check=True)


def row(measure: str, omerowebd: float, anchor_name: str = "", anchor: float | None = None, unit: str = "",
        goal: str = "", met: bool | None = None, note: str = "") -> dict[str, object]:
    """One row of the report (bench/report.py): what omerowebd measured against what it is compared with.
    ``note``: why ``met`` is None where a goal was set (no sound measurement)."""
    out: dict[str, object] = {"measure": measure, "omerowebd": round(float(omerowebd), 4), "anchor_name": anchor_name,
                              "anchor": None if anchor is None else round(float(anchor), 4), "unit": unit,
                              "goal": goal, "met": met}
    if note:
        out["note"] = note
    return out


def report_args(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("--quick", action="store_true", help="a shorter run, for bench/report.py")
    parser.add_argument("--report", type=Path, metavar="FILE", help="also write the rows as JSON (bench/report.py)")


def write_report(path: Path | None, rows: list[dict[str, object]]) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=1) + "\n")


def first_200(port: int, timeout: float = 120) -> None:
    # One request may wait as long as it takes: on a socket held before gunicorn runs (omerowebd's), a request
    # waits in the listen queue until a worker takes it; one given up after a few seconds would still be served
    # first by the worker, ahead of its retry, and count against the server being timed.
    def ok() -> bool:
        try:
            return http_get(port, timeout=timeout)[0] == 200
        except OSError:
            return False

    wait_for(ok, timeout, f"a 200 on port {port}", interval=0.01)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


class BareGunicorn:
    """gunicorn the way `omero web start` runs it (minus -D), on OMERODIR's config.xml."""

    def __init__(self, omerodir: Path, port: int, workers: int, user: str | None = None) -> None:
        self.omerodir, self.port, self.workers, self.user = omerodir, port, workers, user
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        env = dict(os.environ, OMERODIR=str(self.omerodir))
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(self.workers), "--timeout", "60", "omeroweb.wsgi:application"], **as_user(self.user),
            cwd=OMEROWEB, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        first_200(self.port)
        return time.monotonic() - t0

    def hup(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


class Omerowebd:
    def __init__(self, root: Path, port: int, workers: int, python: str = sys.executable,
                 user: str | None = None) -> None:
        self.root, self.port, self.workers, self.python, self.user = root, port, workers, python, user
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "omerowebd.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write(workers)

    @property
    def omerodir(self) -> Path:
        return self.root / "omerodir"

    def write(self, workers: int, logo: str = "") -> None:
        text = textwrap.dedent(f"""\
            [daemon]
            omerodir = "{self.omerodir}"
            venv = "{VENV}"
            runtime_dir = "{self.root / 'run'}"
            state_dir = "{self.root / 'state'}"
            bind = ["127.0.0.1:{self.port}"]
            watch_config = false
            graceful_timeout = 10

            [nginx]
            enabled = false

            [omero.web]
            wsgi_workers = {workers}
            """)
        if logo:
            text += f'login_logo = "{logo}"\n'
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def start(self) -> float:
        t0 = time.monotonic()
        # As the unit starts it: from / ("-m" puts the working directory first on the path, the checkout's
        # package), with $STATE_DIRECTORY (StateDirectory=) naming the state_dir, as the packaged config's does.
        self.proc = subprocess.Popen([self.python, "-m", "omerowebd", "--config", str(self.config)], cwd="/",
                                     env=dict(os.environ, STATE_DIRECTORY=str(self.root / "state")),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_user(self.user))
        first_200(self.port)
        elapsed = time.monotonic() - t0
        # Its gunicorn may serve before the daemon has loaded (the early start): status may not answer yet.
        wait_for(lambda: self.status(quiet=True).get("serving"), 60, "omerowebd to report serving")
        return elapsed

    def reload(self) -> int:
        return subprocess.run([self.python, "-m", "omerowebd.ctl", "--config", str(self.config), "reload"],
                              capture_output=True, cwd="/").returncode

    def status(self, quiet: bool = False) -> dict:
        """``quiet``: {} while the daemon does not answer yet, rather than raise."""
        out = subprocess.run([self.python, "-m", "omerowebd.ctl", "--config", str(self.config), "status", "--json"],
                             capture_output=True, text=True, cwd="/")
        if quiet and out.returncode != 0 and not out.stdout.strip():
            return {}
        return json.loads(out.stdout)

    def stop(self) -> None:
        """Stop the daemon; return once every process it started is gone too (the venv probe, a sweep): one
        left running would load whatever the bench times next."""
        if self.proc and self.proc.poll() is None:
            children = _children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 60,
                     "the daemon's processes to exit")


def _children(pid: int) -> set[int]:
    """Every thread's children of process ``pid`` (asyncio starts some from its threads)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return found


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="omerowebd-bench-") as d:
        yield Path(d)
