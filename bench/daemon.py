"""omerowebd against bare gunicorn on the same OMERO.web (issues 2 and 14).

Prints, side by side from one run: time to first 200 from start (the config
and venv unchanged since the last successful start, so the daemon starts on
the venv's remembered answer; and with nothing remembered, when it asks the
venv first), requests/s through each (wrk on the login page), the daemon's
own RSS and its idle CPU. Both servers run as the stand-in service user
(nobody) when this runs as root, as the daemon does in production (--user
root measures a root daemon, which first checks that root alone controls the
venv). Goals: first 200 within 0.2 s of bare gunicorn, requests/s ratio >=
0.98, RSS < 40 MB.

Each start is timed from the Popen of the process (omerowebd's Python, or
bare gunicorn's) to the first 200 on its port. The starts are measured in
pairs, one omerowebd and one bare gunicorn back to back (which goes first
alternates), before the requests/s rounds; the gap is the median of the
pairs' differences, so load that comes and goes on the machine hits both
sides of a pair alike. Where omerowebd's start goes: its own Python up to
gunicorn's spawn (the master's fork time less the daemon's, from /proc, to
the clock tick), and gunicorn from there to the first 200.

    .venv/bin/python bench/daemon.py [--rounds 3] [--starts 7] [--seconds 10] [--workers 2] [--user USER] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (BareGunicorn, Omerowebd, free_port, give_to, median, report_args, row, scratch, service_user,
                    table, wait_for, write_report)

import omerowebd
from omerowebd.verdicts import NAME

START_GOAL = 0.2  # seconds over bare gunicorn


def wrk(port: int, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", "-c8", f"-d{seconds}s", "--timeout", "30s", f"http://127.0.0.1:{port}/webclient/login/"],
                         capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        raise SystemExit(f"wrk saw errors on port {port}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forked_at(pid: int) -> float:
    """Seconds since boot at which process ``pid`` was forked (/proc/PID/stat's starttime, to the clock tick)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def spawn_offset(daemon: Omerowebd) -> float:
    """How long after the daemon's own fork its first gunicorn master was forked."""
    assert daemon.proc is not None
    generation = daemon.status()["generation"]
    return forked_at(generation["master_pid"]) - forked_at(daemon.proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="requests/s and idle rounds")
    parser.add_argument("--starts", type=int, default=7, help="pairs of starts (omerowebd, bare gunicorn)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=int, default=20, help="seconds of idle to measure the daemon's CPU")
    parser.add_argument("--user", help="run both servers as this user (default: nobody when run as root; 'root')")
    report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.idle, args.starts = min(args.seconds, 3), min(args.idle, 5), min(args.starts, 5)
    user = service_user(args.user)
    # As a package install leaves it (dh_python3, %py_byte_compile): the daemon's modules compiled. Else each start
    # compiles every module edited since its bytecode was last written, in memory (the service user cannot write it).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(omerowebd.__file__).parent)], check=False)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)

    remembered, asked, bare_name = "omerowebd, venv's answer remembered", "omerowebd, venv asked first", "bare gunicorn"
    starts: dict[str, list[float]] = {remembered: [], asked: [], bare_name: []}
    gaps: list[float] = []  # per pair: omerowebd (remembered) - bare gunicorn
    spawns: list[float] = []  # per omerowebd start: its own Python up to gunicorn's spawn
    rates: dict[str, list[float]] = {remembered: [], bare_name: []}
    rss = idle_cpu = 0.0
    with scratch() as root:
        verdict = root / "state" / NAME
        daemon = Omerowebd(root, free_port(), args.workers, user=user)
        give_to(user, root)
        daemon.start()  # the first start collects static files and remembers the venv's answer: not timed
        wait_for(verdict.exists, 60, "the venv's answer to be remembered")
        daemon.stop()

        def remembered_start() -> float:
            if not verdict.exists():
                raise SystemExit("no remembered venv answer: this start would ask the venv")
            daemon = Omerowebd(root, free_port(), args.workers, user=user)
            elapsed = daemon.start()
            spawns.append(spawn_offset(daemon))
            daemon.stop()
            return elapsed

        def bare_start() -> float:
            bare = BareGunicorn(root / "omerodir", free_port(), args.workers, user=user)
            elapsed = bare.start()
            bare.stop()
            return elapsed

        for pair in range(args.starts):  # which goes first alternates: a slow spell hits both alike
            if pair % 2:
                bare_time, daemon_time = bare_start(), remembered_start()
            else:
                daemon_time, bare_time = remembered_start(), bare_start()
            starts[remembered].append(daemon_time)
            starts[bare_name].append(bare_time)
            gaps.append(daemon_time - bare_time)
            if pair < (1 if args.quick else args.rounds):  # the old way, for comparison
                verdict.unlink()  # as after an upgrade of omerowebd or a changed config
                daemon = Omerowebd(root, free_port(), args.workers, user=user)
                starts[asked].append(daemon.start())
                wait_for(verdict.exists, 60, "the venv's answer to be remembered")  # else the next start asks too
                daemon.stop()

        for round_ in range(args.rounds):  # alternate, so drift on the machine hits all alike
            daemon = Omerowebd(root, free_port(), args.workers, user=user)
            daemon.start()
            rates[remembered].append(wrk(daemon.port, args.seconds))
            rss = max(rss, rss_mb(daemon.proc.pid))
            before = cpu_seconds(daemon.proc.pid)
            time.sleep(args.idle)  # the quantity measured is idle time itself
            idle_cpu = (cpu_seconds(daemon.proc.pid) - before) / args.idle * 100
            daemon.stop()

            bare = BareGunicorn(daemon.omerodir, free_port(), args.workers, user=user)
            bare.start()
            rates[bare_name].append(wrk(bare.port, args.seconds))
            bare.stop()

    who = f"as {user}" if user else "as root"
    rows = [[name, f"{median(starts[name]):.2f}", len(starts[name]),
             f"{median(rates[name]):.1f}" if name in rates else "-"] for name in starts]
    table(f"OMERO.web login page, {args.workers} sync workers (medians), servers run {who}",
          ["server", "first 200 after start (s)", "starts", f"requests/s (wrk -t2 -c8 -d{args.seconds}, "
           f"{args.rounds} rounds)"], rows)
    ratio = median(rates[remembered]) / median(rates[bare_name])
    over = median(gaps)
    spawn = median(spawns)
    table("omerowebd itself", ["measure", "value", "goal"], [
        [f"first 200: omerowebd (answer remembered) - bare gunicorn, median of {len(gaps)} pairs", f"{over:+.2f} s",
         f"<= {START_GOAL} s"],
        ["  its pairs", " ".join(f"{g:+.2f}" for g in gaps), "-"],
        ["  of omerowebd's start: its own Python, up to gunicorn's spawn", f"{spawn:.2f} s", "-"],
        ["  of omerowebd's start: gunicorn, from its spawn to the first 200",
         f"{median(starts[remembered]) - spawn:.2f} s", f"bare: {median(starts[bare_name]):.2f} s"],
        ["first 200: omerowebd (venv asked first) - bare gunicorn",
         f"{median(starts[asked]) - median(starts[bare_name]):+.2f} s", "-"],
        ["requests/s ratio omerowebd / bare", f"{ratio:.3f}", ">= 0.98"],
        ["daemon RSS (MB)", f"{rss:.1f}", "< 40"],
        [f"daemon CPU while idle ({args.idle}s)", f"{idle_cpu:.2f} %", "~0"],
    ])
    bare_start = median(starts[bare_name])
    write_report(args.report, [
        row("first 200 after start, config and venv unchanged", median(starts[remembered]), bare_name, bare_start,
            "s", f"<= anchor + {START_GOAL} s (median of paired gaps: {over:+.2f} s)", over <= START_GOAL),
        row("  of the start: omerowebd's own Python, up to gunicorn's spawn", spawn, "", None, "s"),
        row("  of the start: gunicorn, from its spawn to the first 200", median(starts[remembered]) - spawn,
            bare_name, bare_start, "s"),
        row("first 200 after start, nothing remembered (venv asked first)", median(starts[asked]), bare_name,
            bare_start, "s", "(for comparison)", None),
        row("requests/s, login page", median(rates[remembered]), bare_name, median(rates[bare_name]), "requests/s",
            ">= 0.98 x anchor", ratio >= 0.98),
        row("daemon RSS", rss, "", None, "MB", "< 40 MB", rss < 40),
        row("daemon CPU while idle", idle_cpu, "", None, "%", "< 0.5 %", idle_cpu < 0.5),
    ])


if __name__ == "__main__":
    main()
