"""A Debian 12 container booted with real systemd, for the system tests.

The cached rootfs (scripts/system-rootfs.sh) is never written to: each
container boots an overlay on top of it, thrown away at the end. The
container shares the host's network namespace, so a service inside that
listens on 127.0.0.1:PORT is reached from the test at 127.0.0.1:PORT.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ContainerError(AssertionError):
    pass


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Poll probe() until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as e:  # a probe may fail while the thing comes up
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise ContainerError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


WORK_PREFIX = "omerowebd-nspawn-"
WORK_PARENT = Path("/var/tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> None:
    """Clean up after a test run that was killed before it could: its
    container, its overlay mount, its directory. Another run's live
    container (its owner still running) is left alone."""
    for workdir in WORK_PARENT.glob(WORK_PREFIX + "*"):
        try:
            owner, nspawn, pid1 = (int(x) for x in (workdir / "pids").read_text().split())
        except (OSError, ValueError):
            owner = nspawn = pid1 = 0
        if owner and _alive(owner):
            continue
        for pid in (pid1, nspawn):
            if pid and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        root = workdir / "root"
        if os.path.ismount(root):
            subprocess.run(["umount", "--lazy", str(root)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], capture_output=True, check=False)


class Container:
    def __init__(self, rootfs: Path, binds: Sequence[tuple[str, str]] = (), binds_ro: Sequence[tuple[str, str]] = ()):
        self.rootfs = rootfs
        self.binds = list(binds)
        self.binds_ro = list(binds_ro)
        reap_stale()
        self.workdir = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=WORK_PARENT))
        (self.workdir / "pids").write_text(f"{os.getpid()} 0 0\n")
        self.root = self.workdir / "root"
        self.log_path = self.workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self._mounted = False

    # -- lifecycle -------------------------------------------------------

    def boot(self, timeout: float = 60) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.root)],
            check=True,
        )
        self._mounted = True
        name = f"omerowebd-test-{os.getpid()}"
        argv = ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit", "--console=pipe", f"--machine={name}"]
        argv += [f"--bind={src}:{dst}" for src, dst in self.binds]
        argv += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = wait_for("the container's init", self._find_pid1, timeout)
        (self.workdir / "pids").write_text(f"{os.getpid()} {self.proc.pid} {self.pid1}\n")
        # is-system-running --wait returns once boot is over: running or degraded.
        wait_for("systemd in the container to answer", lambda: self.sh("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip() in ("running", "degraded"), timeout)

    def _find_pid1(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console()}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return None

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Power off, or kill: never leave the container or its mounts behind."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid1:
                subprocess.run(self._enter(["systemctl", "poweroff", "--no-block"]), capture_output=True, timeout=20)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is None:
            # SIGKILL of a PID namespace's init takes every process in it along.
            if self.pid1:
                try:
                    os.kill(self.pid1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if self._mounted:
            wait_for(
                "the overlay to unmount",
                lambda: subprocess.run(["umount", str(self.root)], capture_output=True).returncode == 0 or not os.path.ismount(self.root),
                30,
            )
            self._mounted = False
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running things inside ------------------------------------------

    def _enter(self, argv: Sequence[str]) -> list[str]:
        # A clean environment: nothing of the test runner's leaks inside.
        return ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._enter(argv), capture_output=True, text=True, timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise ContainerError(f"in the container, {shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kwargs)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod {mode:o} "$1"', "sh", path], input=text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", *args], check=False).stdout

    def processes(self) -> list[tuple[int, str, str, str]]:
        """(pid, user, command line, control group's last part: its unit) of every process in the container,
        read in one pass, so a process is never told by a unit it has left since."""
        script = r"""
import os, pwd
for pid in os.listdir('/proc'):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        uid = os.stat(f'/proc/{pid}').st_uid
        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\0', b' ').replace(b'\n', b' ').decode(errors='replace').strip()
        group = open(f'/proc/{pid}/cgroup').read().strip().splitlines()[-1].rpartition('/')[2]
    except (OSError, IndexError):
        continue
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    print(pid, user, group, cmd, sep='\t')
"""
        out = self.run(["python3", "-c", script]).stdout
        rows = []
        for line in out.splitlines():
            pid, user, group, cmd = (line.split("\t") + ["", "", ""])[:4]
            rows.append((int(pid), user, cmd, group))
        return rows
