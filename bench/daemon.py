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

    .venv/bin/python bench/daemon.py [--rounds 3] [--seconds 10] [--workers 2] [--user USER] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time

from common import (BareGunicorn, Omerowebd, free_port, give_to, median, report_args, row, scratch, service_user,
                    table, write_report)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=int, default=20, help="seconds of idle to measure the daemon's CPU")
    parser.add_argument("--user", help="run both servers as this user (default: nobody when run as root; 'root')")
    report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.idle = min(args.seconds, 3), min(args.idle, 5)
    user = service_user(args.user)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)

    remembered, asked, bare_name = "omerowebd, venv's answer remembered", "omerowebd, venv asked first", "bare gunicorn"
    starts: dict[str, list[float]] = {remembered: [], asked: [], bare_name: []}
    rates: dict[str, list[float]] = {remembered: [], bare_name: []}
    rss = idle_cpu = 0.0
    with scratch() as root:
        daemon = Omerowebd(root, free_port(), args.workers, user=user)
        give_to(user, root)
        daemon.start()  # the first start collects static files and remembers the venv's answer: not timed
        daemon.stop()
        if not (root / "state" / NAME).exists():
            raise SystemExit("the first start left no remembered venv answer: every start below would ask the venv")
        for round_ in range(args.rounds):  # alternate, so drift on the machine hits all alike
            daemon = Omerowebd(root, free_port(), args.workers, user=user)
            starts[remembered].append(daemon.start())
            rates[remembered].append(wrk(daemon.port, args.seconds))
            rss = max(rss, rss_mb(daemon.proc.pid))
            before = cpu_seconds(daemon.proc.pid)
            time.sleep(args.idle)  # the quantity measured is idle time itself
            idle_cpu = (cpu_seconds(daemon.proc.pid) - before) / args.idle * 100
            daemon.stop()

            bare = BareGunicorn(daemon.omerodir, free_port(), args.workers, user=user)
            starts[bare_name].append(bare.start())
            rates[bare_name].append(wrk(bare.port, args.seconds))
            bare.stop()

            if args.quick and round_:
                continue  # --quick: the old way once, for comparison
            (root / "state" / NAME).unlink()  # as after an upgrade of omerowebd or a changed config
            daemon = Omerowebd(root, free_port(), args.workers, user=user)
            starts[asked].append(daemon.start())
            daemon.stop()

    who = f"as {user}" if user else "as root"
    rows = [[name, f"{median(starts[name]):.2f}", f"{median(rates[name]):.1f}" if name in rates else "-"]
            for name in starts]
    table(f"OMERO.web login page, {args.workers} sync workers, {args.rounds} rounds (medians), servers run {who}",
          ["server", "first 200 after start (s)", f"requests/s (wrk -t2 -c8 -d{args.seconds})"], rows)
    ratio = median(rates[remembered]) / median(rates[bare_name])
    over = median(starts[remembered]) - median(starts[bare_name])
    table("omerowebd itself", ["measure", "value", "goal"], [
        ["first 200: omerowebd (answer remembered) - bare gunicorn", f"{over:+.2f} s", f"<= {START_GOAL} s"],
        ["first 200: omerowebd (venv asked first) - bare gunicorn",
         f"{median(starts[asked]) - median(starts[bare_name]):+.2f} s", "-"],
        ["requests/s ratio omerowebd / bare", f"{ratio:.3f}", ">= 0.98"],
        ["daemon RSS (MB)", f"{rss:.1f}", "< 40"],
        [f"daemon CPU while idle ({args.idle}s)", f"{idle_cpu:.2f} %", "~0"],
    ])
    bare_start = median(starts[bare_name])
    write_report(args.report, [
        row("first 200 after start, config and venv unchanged", median(starts[remembered]), bare_name, bare_start,
            "s", f"<= anchor + {START_GOAL} s", over <= START_GOAL),
        row("first 200 after start, nothing remembered (venv asked first)", median(starts[asked]), bare_name,
            bare_start, "s", "(for comparison)", None),
        row("requests/s, login page", median(rates[remembered]), bare_name, median(rates[bare_name]), "requests/s",
            ">= 0.98 x anchor", ratio >= 0.98),
        row("daemon RSS", rss, "", None, "MB", "< 40 MB", rss < 40),
        row("daemon CPU while idle", idle_cpu, "", None, "%", "< 0.5 %", idle_cpu < 0.5),
    ])


if __name__ == "__main__":
    main()
