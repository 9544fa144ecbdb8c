"""What each fault costs a site under steady load (issue 11).

One omerowebd on real OMERO.web, its listening socket held by this script and
passed in as systemd's omerowebd.socket would (LISTEN_FDS), so that killing
the daemon and starting it again is what `Restart=on-failure` does. Clients
loop on the login page throughout. Each fault is injected in turn, then put
right where a person would have to (the venv, the config file, Redis, the
disk); the table says, for each: requests that failed, connections refused,
the time from the fault until the site serves normally again (status serving,
every worker loaded, requests answered), and what the daemon said about it.

    .venv/bin/python bench/faults.py [--clients 4] [--workers 2] [--only WORDS] [--repeat N] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import VENV, Load, free_port, http_get, report_args, row, scratch, table, wait_for, write_report

from conftest import Daemon  # noqa: E402  (common puts tests/ on the path)

SHIM = ("import os, sys; os.dup2(int(os.environ.pop('HELD_FD')), 3); os.environ['LISTEN_FDS'] = '1'; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Site:
    """The daemon, its held socket, Redis for its sessions, and the load."""

    def __init__(self, root: Path, workers: int, clients: int) -> None:
        self.root, self.workers, self.clients = root, workers, clients
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.daemon = Daemon(root=root, venv=root / "venv", port=self.port)
        (root / "venv").symlink_to(VENV)
        self.load: Load | None = None

    # -- parts -------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(self.root)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _connects(self.redis_port), 30, "redis-server")

    def stop_redis(self) -> None:
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(30)

    def write_config(self, extra: str = "") -> None:
        backend = "django.core.cache.backends.redis.RedisCache"
        self.daemon.write_config(workers=self.workers, daemon="watch_config = false\nready_timeout = 60", omero=f'''
            wsgi_timeout = 10
            session_engine = "django.contrib.sessions.backends.cache"
            caches = {{default = {{BACKEND = "{backend}", LOCATION = "redis://127.0.0.1:{self.redis_port}/0"}}}}
            {extra}''')

    def start_daemon(self) -> None:
        """As systemd would: the socket it holds passed as fd 3, LISTEN_PID the daemon's own."""
        self.daemon.extra_env["HELD_FD"] = str(self.listener.fileno())
        cmd = [sys.executable, "-c", SHIM, "-m", "omerowebd", "--config", str(self.daemon.config_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env.update(self.daemon.extra_env, PYTHONUNBUFFERED="1")
        self.daemon.proc = subprocess.Popen(cmd, env=env, stdout=self.daemon.log_path.open("ab"),
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            pass_fds=[self.listener.fileno()], cwd=self.root)

    def normal(self) -> bool:
        """Serving, every worker has loaded the app, and a request is answered."""
        try:
            g = self.daemon.status()["generation"]
            return bool(g and g["state"] == "serving" and g["ready_workers"] == g["workers"] == len(g["worker_pids"])
                        and http_get(self.port, timeout=10)[0] == 200)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def ctl(self, *args: str) -> str:
        out = self.daemon.ctl(*args)
        return (out.stdout + out.stderr).strip()

    def log_since(self, mark: int) -> str:
        return self.daemon.log()[mark:]


class Watch:
    """Polls Site.normal() while a fault runs: how long from the fault until it was normal for good
    (0 when it never stopped being normal)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.t0 = 0.0
        self.abnormal_for = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        was_normal = True
        while not self._stop.is_set():
            normal = self.site.normal()
            if normal and not was_normal:
                self.abnormal_for = time.monotonic() - self.t0  # back, as of now
            was_normal = normal
            self._stop.wait(0.2)
        if not was_normal:
            self.abnormal_for = time.monotonic() - self.t0


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def said(text: str, *needles: str) -> str:
    """The daemon's first line (of its own, not gunicorn's) that mentions one of ``needles``."""
    for line in text.splitlines():
        if line.startswith("[") or line.startswith(" "):
            continue  # gunicorn's and OMERO.web's own lines
        if any(n in line for n in needles):
            return " ".join(re.sub(r"^\S+ \S+ \[[^\]]*\]\s*", "", line).split())
    return "(nothing)"


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else "(nothing)"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / ".filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


def half_upgraded(real: Path, where: Path) -> Path:
    """``real`` in the middle of `pip install -U django`: the dist-info there, the package unusable."""
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "python").symlink_to(os.path.realpath(real / "bin" / "python"))
    (where / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    site = next(real.glob("lib/python3*/site-packages"))
    mine = where / site.relative_to(real)
    mine.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name != "django":
            (mine / entry.name).symlink_to(entry)
    (mine / "django").mkdir()
    (mine / "django" / "__init__.py").write_text("raise ImportError('django is half installed')\n")
    return where


def point_venv_at(site: Site, target: Path) -> None:
    swap = site.root / "venv.swap"
    swap.symlink_to(target)
    os.replace(swap, site.root / "venv")


# -- the faults: each injects, puts right what a person would, returns what the daemon said --


def worker_killed(site: Site) -> str:
    pid = site.daemon.status()["generation"]["worker_pids"][0]
    mark = len(site.daemon.log())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "gunicorn worker" in site.log_since(mark), 60, "the daemon to say so")
    return said(site.log_since(mark), "gunicorn worker")


def worker_hung(site: Site) -> str:
    pid = site.daemon.status()["generation"]["worker_pids"][0]
    mark = len(site.daemon.log())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "gunicorn worker" in site.log_since(mark), 120, "gunicorn's timeout")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    return said(site.log_since(mark), "gunicorn worker")


def master_killed(site: Site) -> str:
    mark = len(site.daemon.log())
    os.kill(site.daemon.status()["generation"]["master_pid"], signal.SIGKILL)
    wait_for(lambda: "serving again" in site.log_since(mark), 180, "a new generation")
    return said(site.log_since(mark), "gunicorn master exited")


def daemon_killed(site: Site) -> str:
    assert site.daemon.proc is not None
    site.daemon.proc.kill()
    site.daemon.proc.wait()
    wait_for(lambda: site.daemon.gunicorn_pids() == [], 60, "its gunicorns to follow it")
    time.sleep(2)  # RestartSec=2 in omerowebd.service
    mark = len(site.daemon.log())
    site.start_daemon()
    wait_for(site.normal, 180, "the restarted daemon to serve")
    return said(site.log_since(mark), "did not stop cleanly")


def second_daemon(site: Site) -> str:
    out = subprocess.run([sys.executable, "-m", "omerowebd", "--config", str(site.daemon.config_path)],
                         capture_output=True, text=True, timeout=60)
    return f"exit {out.returncode}: {first_line(out.stderr)}"


def config_deleted(site: Site) -> str:
    text = site.daemon.config_path.read_text()
    site.daemon.config_path.unlink()
    reply = site.ctl("--socket", str(site.daemon.runtime_dir / "control.sock"), "reload")
    site.daemon.save(text)
    return f"reload: {first_line(reply)}"


def runtime_dir_full(site: Site) -> str:
    filler = fill(site.daemon.runtime_dir)
    try:
        site.write_config('login_logo = "/static/full.png"')
        return f"reload: {first_line(site.ctl('reload'))}"
    finally:
        filler.unlink()


def omerodir_read_only(site: Site) -> str:
    with read_only(site.daemon.omerodir):
        site.write_config('login_logo = "/static/ro.png"')
        return f"reload: {first_line(site.ctl('reload'))}"


def redis_stopped(site: Site) -> str:
    mark = len(site.daemon.log())
    site.stop_redis()
    try:
        wait_for(lambda: "session store unavailable" in site.log_since(mark), 60, "the store check")
        time.sleep(5)  # a while without Redis, under the load
    finally:
        site.start_redis()
    wait_for(lambda: "session store available again" in site.log_since(mark), 60, "the store back")
    return said(site.log_since(mark), "session store unavailable")


def venv_half_upgraded(site: Site) -> str:
    broken = site.root / "venv-half"
    if not broken.exists():
        half_upgraded(VENV, broken)
    mark = len(site.daemon.log())
    point_venv_at(site, broken)
    try:
        os.kill(site.daemon.status()["generation"]["worker_pids"][0], signal.SIGKILL)  # a worker must boot now
        wait_for(lambda: "restart failed" in site.log_since(mark), 180, "the master to halt and a restart to fail")
        time.sleep(5)  # the admin finishes the upgrade a little later
    finally:
        point_venv_at(site, VENV)
    return said(site.log_since(mark), "restart failed")


# Failed requests each fault may cost (README, Faults): the request a lost worker held; a restarted daemon's
# connections wait for OMERO.web to load, and a client that gives up sooner sees one. Never a refused connection.
ALLOWED_FAILURES = {worker_killed: 1, worker_hung: 1, daemon_killed: 1, venv_half_upgraded: 1}
# --quick (bench/report.py): one of each kind, the longest waits left out.
QUICK = (worker_killed, master_killed, daemon_killed, config_deleted, runtime_dir_full)

FAULTS: list[tuple[str, Callable[[Site], str]]] = [
    ("worker killed (kill -9)", worker_killed),
    ("worker hung (SIGSTOP; wsgi_timeout 10 s)", worker_hung),
    ("gunicorn master killed (kill -9)", master_killed),
    ("omerowebd killed (kill -9), restarted after 2 s", daemon_killed),
    ("second omerowebd on the same runtime dir", second_daemon),
    ("config file deleted, reload asked", config_deleted),
    ("runtime dir full during a reload", runtime_dir_full),
    ("OMERODIR read-only during a reload", omerodir_read_only),
    ("Redis (session store) stopped, back after 5 s", redis_stopped),
    ("venv half-upgraded, a worker lost; fixed 5 s later", venv_half_upgraded),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", metavar="WORDS", help="run only the faults whose name contains WORDS")
    parser.add_argument("--repeat", type=int, default=1, help="inject each fault this many times")
    report_args(parser)
    args = parser.parse_args()
    faults = [(n, f) for n, f in FAULTS if (not args.only or args.only in n) and (not args.quick or f in QUICK)]
    faults *= args.repeat
    rows = []
    reported_rows: list[dict[str, object]] = []
    with scratch() as root, contextlib.ExitStack() as stack:
        site = Site(root, args.workers, args.clients)
        stack.callback(site.stop_redis)
        stack.callback(site.daemon.cleanup)
        stack.enter_context(tmpfs(site.daemon.runtime_dir))
        site.start_redis()
        site.write_config()
        site.start_daemon()
        wait_for(site.normal, 300, "the site to serve")
        with Load(site.port, clients=args.clients) as load:
            load.wait_requests(20)
            for name, inject in faults:
                wait_for(site.normal, 300, "the site to serve normally before the next fault")
                load.wait_requests(10, timeout=120)
                ok, failed, refused = load.ok, len(load.failed), load.refused
                with Watch(site) as watch:
                    reported = inject(site)
                    wait_for(site.normal, 300, f"the site to serve normally after: {name}")
                start = load.ok
                wait_for(lambda: load.ok >= start + 5, 120, "requests answered again")
                back = f"{watch.abnormal_for:.1f}" if watch.abnormal_for else "never left"
                rows.append([name, len(load.failed) - failed, load.refused - refused, back,
                             reported.replace(str(root), "…")[:120]])
                allowed = ALLOWED_FAILURES.get(inject, 0)
                reported_rows.append(row(f"fault: {name}", rows[-1][1], "", None, "failed requests",
                                         f"<= {allowed} failed, 0 refused",
                                         rows[-1][1] <= allowed and rows[-1][2] == 0))
                print(f"{name}: {rows[-1][1]} failed {load.failed[failed:]}, {rows[-1][2]} refused, "
                      f"normal again: {rows[-1][3]}", flush=True)
    table(f"Faults under {args.clients} clients looping on the login page, {args.workers} sync workers "
          "(socket held as by omerowebd.socket)",
          ["fault", "failed requests", "refused", "normal again after (s)", "what the daemon said"], rows)
    write_report(args.report, reported_rows)


if __name__ == "__main__":
    main()
