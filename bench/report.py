"""Every benchmark in one go, and one table of what they measured (issue 14).

Runs each bench script with --quick --report FILE, one after the other (they
would only disturb each other side by side), and prints one table: the
measure, omerowebd's value, the anchor it is compared with (bare gunicorn,
gunicorn HUP, stop + start, Django's clear_expired, ...), their ratio, the
goal, and whether it was met. A bench that is missing or fails is a row that
says so, never a silent gap; a value that cannot be right (not a number, a
duration below zero) is no measurement, never a goal met or missed, and its
row says so in the note column (as does a bench's own note). The header names the date and the machine (CPU,
cores, memory, load), not the host.

    .venv/bin/python bench/report.py [--only NAME] [--markdown] [--timeout 600]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["daemon.py", "reload.py", "faults.py", "sessions_sweep.py", "scaleout.py"]
FIELDS = ("measure", "omerowebd", "anchor_name", "anchor", "unit", "goal", "met")  # and "note", if any
DURATIONS = ("s", "ms")


def machine() -> str:
    """What the numbers were measured on, without naming the host."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " ".join(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    system = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system()) \
        if hasattr(platform, "freedesktop_os_release") else platform.system()
    return f"{os.cpu_count()} cores ({model}){memory}, {system}, Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(bench: str, timeout: float) -> tuple[list[dict[str, object]], str, float]:
    """(its rows, a line on what went wrong or "", seconds); its own output goes to stderr as it comes."""
    path = HERE / bench
    if not path.exists():
        return [], "missing (not in bench/)", 0.0
    with tempfile.TemporaryDirectory(prefix="omerowebd-report-") as d:
        out = Path(d) / "rows.json"
        t0 = time.monotonic()
        try:
            done = subprocess.run([sys.executable, str(path), "--quick", "--report", str(out)], cwd=HERE.parent,
                                  stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], f"did not finish within {timeout:.0f} s", time.monotonic() - t0
        seconds = time.monotonic() - t0
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [], f"failed (exit {done.returncode}): {last[:150]}", seconds
        try:
            rows = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            return [], f"wrote no report ({type(e).__name__})", seconds
    good = [sound(r) for r in rows if isinstance(r, dict) and all(k in r for k in FIELDS)]
    problem = "" if len(good) == len(rows) else f"{len(rows) - len(good)} rows of the wrong shape left out"
    return good, problem, seconds


def sound(r: dict[str, object]) -> dict[str, object]:
    """The row, or, when its value cannot be right, the row as no measurement (met None, with a note)."""
    value = r["omerowebd"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        why = "no measurement: the bench got no number"
    elif value < 0 and r["unit"] in DURATIONS:
        why = "no measurement: a duration below zero"
    else:
        return r
    return {**r, "met": None, "note": "; ".join(filter(None, [str(r.get("note") or ""), why]))}


def number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def cells(r: dict[str, object]) -> list[str]:
    ours, anchor = r["omerowebd"], r["anchor"]
    ratio = f"{ours / anchor:.2f}" if isinstance(ours, (int, float)) and isinstance(anchor, (int, float)) and anchor \
        else "-"
    met = {True: "yes", False: "NO"}.get(r["met"], "-")  # type: ignore[arg-type]
    unit = f" {r['unit']}" if r["unit"] else ""
    return [str(r["measure"]), number(ours) + unit, str(r["anchor_name"] or "-"),
            (number(anchor) + unit) if anchor is not None else "-", ratio, str(r["goal"] or "-"), met,
            str(r.get("note") or "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this bench (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each bench may take")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    args = parser.parse_args()
    benches = [b for b in BENCHES if not args.only or b in args.only or b.removesuffix(".py") in args.only]
    started, load_before, t0 = datetime.date.today().isoformat(), load(), time.monotonic()
    table: list[list[str]] = []
    for bench in benches:
        print(f"# {bench} --quick ...", file=sys.stderr, flush=True)
        rows, problem, seconds = run(bench, args.timeout)
        print(f"# {bench}: {seconds:.0f} s{': ' + problem if problem else ''}", file=sys.stderr, flush=True)
        table += [[bench.removesuffix(".py"), *cells(r)] for r in rows]
        if problem:
            table.append([bench.removesuffix(".py"), problem, "-", "-", "-", "-", "-", "NO", ""])
    header = ["bench", "measure", "omerowebd", "anchor", "anchor value", "ratio", "goal", "met", "note"]
    if not any(line[-1] for line in table):
        header, table = header[:-1], [line[:-1] for line in table]
    total = time.monotonic() - t0
    title = (f"omerowebd benchmark report, {started}: {machine()}; load average {load_before} at the start, "
             f"{load()} at the end; {total / 60:.1f} minutes (each bench --quick)")
    print(title)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        for line in table:
            print("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


if __name__ == "__main__":
    main()
