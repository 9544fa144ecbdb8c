"""omerowebd against bare gunicorn on the same OMERO.web (issue 2).

Prints, side by side from one run: time to first 200 from start, requests/s
through each (wrk on the login page), the daemon's own RSS and its idle CPU.
Targets: requests/s ratio >= 0.98, RSS < 40 MB.

    .venv/bin/python bench/daemon.py [--rounds 3] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time

from common import BareGunicorn, Omerowebd, free_port, median, scratch, table


def wrk(port: int, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{port}/webclient/login/"],
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
    args = parser.parse_args()
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)

    starts: dict[str, list[float]] = {"omerowebd": [], "bare gunicorn": []}
    rates: dict[str, list[float]] = {"omerowebd": [], "bare gunicorn": []}
    rss = idle_cpu = 0.0
    with scratch() as root:
        daemon = Omerowebd(root, free_port(), args.workers)
        daemon.start()  # the first start collects static files: not a fair start time
        daemon.stop()
        for _ in range(args.rounds):  # alternate, so drift on the machine hits both alike
            daemon = Omerowebd(root, free_port(), args.workers)
            starts["omerowebd"].append(daemon.start())
            rates["omerowebd"].append(wrk(daemon.port, args.seconds))
            rss = max(rss, rss_mb(daemon.proc.pid))
            before = cpu_seconds(daemon.proc.pid)
            time.sleep(args.idle)  # the quantity measured is idle time itself
            idle_cpu = (cpu_seconds(daemon.proc.pid) - before) / args.idle * 100
            daemon.stop()

            bare = BareGunicorn(daemon.omerodir, free_port(), args.workers)
            starts["bare gunicorn"].append(bare.start())
            rates["bare gunicorn"].append(wrk(bare.port, args.seconds))
            bare.stop()

    rows = [[name, f"{median(starts[name]):.2f}", f"{median(rates[name]):.1f}"] for name in starts]
    table(f"OMERO.web login page, {args.workers} sync workers, {args.rounds} rounds (medians)",
          ["server", "first 200 after start (s)", "requests/s (wrk -t2 -c8)"], rows)
    ratio = median(rates["omerowebd"]) / median(rates["bare gunicorn"])
    table("omerowebd itself", ["measure", "value", "target"], [
        ["requests/s ratio omerowebd / bare", f"{ratio:.3f}", ">= 0.98"],
        ["daemon RSS (MB)", f"{rss:.1f}", "< 40"],
        [f"daemon CPU while idle ({args.idle}s)", f"{idle_cpu:.2f} %", "~0"],
    ])


if __name__ == "__main__":
    main()
