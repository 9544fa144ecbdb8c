"""omerowebd against bare gunicorn on the same OMERO.web (issues 2 and 14).

Prints, side by side from one run: time to first 200 from start (the config
and venv unchanged since the last successful start, so the daemon starts on
the venv's remembered answer; and with nothing remembered, when it asks the
venv first), requests/s through each (wrk on the login page), the daemon's
own RSS and its idle CPU. Both servers run as the stand-in service user
(nobody) when this runs as root, as the daemon does in production (--user
root measures a root daemon, which first checks that root alone controls the
venv). Goals: first 200 within 0.2 s of bare gunicorn, requests/s ratio >=
0.98, RSS < 40 MB, idle CPU < 0.5 %.

Each requests/s round starts omerowebd and bare gunicorn fresh, side by side,
waits for what the daemon's start leaves running after READY (the first
session sweep), loads each for a second, then times windows: each server
alone, in turn (A B, or A B B A; not in --quick), and then both loaded at
once, wrk against each. On these 2 shared cores a window loaded alone moves by
about 10 % with the machine's drift (one round's ratio went from 0.85 to 1.17
in this bench's runs of 2026-11-29); loaded at once, both servers meet the
same moments of it, and the kernel gives each server's session an equal share
of the CPU, so their ratio is that of what a request costs each. One process's
own speed also differs by a few % from the next one's (two bare gunicorns side
by side: 0.95 to 1.02, now and then 0.90 or 1.14), hence fresh servers each
round. Every step of a round (start, warm-up, windows, whose wrk starts first)
goes in one order, omerowebd first in even rounds and bare gunicorn first in
odd ones, because the order shows: loaded at once, the server that went first
served up to 3 % less (one 16-round run of 2026-11-30: 0.936 to 0.973 with
omerowebd first, 0.971 to 1.042 with bare first, the first one's workers
spending more CPU per request in all 16 rounds; the three reports of that day:
1 to 2 % each way in two, none in the third; two bare gunicorns by hand: about
1 %, the same way). The ratio judged is therefore per pair of rounds, one each
way, the geometric mean of the two, from which the order's share cancels out
as long as going first costs either server the same share; the verdict is the
median over the pairs (8 pairs in --quick). It still moves by about 1 % from
run to run (0.983 to 1.004 in six runs of 2026-11-30). Beside requests/s: the
workers' CPU per request, and what the server's other processes (omerowebd:
the daemon, its venv probe, the gunicorn master) and the rest of the machine
took meanwhile.
Loaded at once, the daemon's own CPU would come out of both servers' shares
alike and never show in the ratio, so it is judged on its own: under 0.5 % of
a core while its site is loaded, as when idle. The daemon's idle CPU is
measured before any load (no request's tail in it), over --idle seconds (20,
in --quick too, once), with systemd's watchdog on as under the unit
(WatchdogSec=30: the daemon asks the site every 10 s).

Each start is timed from the Popen of the process (omerowebd's Python, or
bare gunicorn's) to the first 200 on its port. The starts are measured in
pairs, one omerowebd and one bare gunicorn back to back (which goes first
alternates), before the requests/s rounds; the gap is the median of the
pairs' differences, so load that comes and goes on the machine hits both
sides of a pair alike. Where omerowebd's start goes: its own Python up to
gunicorn's spawn (the master's fork time less the daemon's, from /proc, to
the clock tick), and gunicorn from there to the first 200.

    .venv/bin/python bench/daemon.py [--rounds 4] [--starts 11] [--seconds 10] [--workers 2] [--user USER] [--quick] [--report FILE]
    .venv/bin/python bench/daemon.py --rate-only --quick [--rounds 16]   # requests/s only, as the report judges it
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import (BareGunicorn, Omerowebd, free_port, give_to, installed_python, median, report_args, row, scratch,
                    service_user, table, wait_for, write_report)

from omerowebd.spawn_record import NAME as SPAWN_RECORD
from omerowebd.verdicts import NAME

START_GOAL = 0.2  # seconds over bare gunicorn


WARM_UP = 1  # seconds of load before each timed window: a worker's first requests load what Django loads lazily
WATCHDOG_SEC = 30  # units/omerowebd.service's WatchdogSec: the idle daemon probes the site every third of it


def wrk(port: int, seconds: int) -> tuple[float, int]:
    """(requests/s, requests) of the login page over ``seconds``."""
    return wrk_result(port, wrk_start(port, seconds))


def wrk_start(port: int, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", "-t2", "-c8", f"-d{seconds}s", "--timeout", "30s",
                             f"http://127.0.0.1:{port}/webclient/login/"], stdout=subprocess.PIPE, text=True)


def wrk_result(port: int, proc: subprocess.Popen[str]) -> tuple[float, int]:
    out = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(f"wrk failed on port {port} (exit {proc.returncode}):\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        raise SystemExit(f"wrk saw errors on port {port}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), int(re.search(r"(\d+) requests in", out).group(1))


@dataclass(frozen=True)
class Window:
    """One timed window on one server."""

    rate: float  # requests/s
    per_request: float  # the workers' CPU milliseconds per request
    workers: float  # the workers' CPU, % of one core
    server: float  # the server's other processes' CPU, % of one core (omerowebd: the daemon, its probe, the master)
    machine: float  # every other process on the machine (wrk included), % of one core; loaded together: the same


@dataclass(frozen=True)
class Server:
    """What a window loads: the port, the process all of the server descends from, and the gunicorn master."""

    port: int
    top: int
    master: int


def serve(servers: list[Server], seconds: int) -> list[Window]:
    """One window of load on each of ``servers``, all at once (wrk against each). The CPU a request
    costs moves less with the machine's other load than requests/s; what the rest of each server and of
    the machine took meanwhile says why a window is low."""
    before = [looks(server) for server in servers]
    before_all = machine_cpu()
    started = time.monotonic()
    loads = [wrk_start(server.port, seconds) for server in servers]
    results = [wrk_result(server.port, load) for server, load in zip(servers, loads)]
    elapsed = time.monotonic() - started
    after = [looks(server) for server in servers]
    spent = [(spent_since(a[0], b[0]), spent_since(a[1], b[1])) for a, b in zip(before, after)]
    machine = machine_cpu() - before_all - sum(mine + rest for mine, rest in spent)
    return [Window(rate, mine / max(requests, 1) * 1000, mine / elapsed * 100, rest / elapsed * 100,
                   machine / elapsed * 100) for (rate, requests), (mine, rest) in zip(results, spent)]


def looks(server: Server) -> tuple[dict[int, float], dict[int, float]]:
    """The CPU seconds so far of the server's workers, and of its other processes, by pid."""
    workers = children(server.master)
    return cpu_by_pid(workers), cpu_by_pid([pid for pid in descendants(server.top) if pid not in workers])


def spent_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two looks: by each process seen both times, and all of one started meanwhile. One
    that left meanwhile is left out (its CPU can no longer be read), so the figure is a floor."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    found, queue = [], [pid]
    while queue:
        found.append(queue.pop())
        try:
            queue += children(found[-1])
        except OSError:  # gone meanwhile
            pass
    return found


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds(pid)
        except OSError:  # gone meanwhile
            pass
    return found


def machine_cpu() -> float:
    """CPU seconds the whole machine's processes have had (/proc/stat: every state but idle, iowait and
    steal, the time the hypervisor gave this machine's cores to others)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def balanced(ratios: list[float]) -> list[float]:
    """Per pair of rounds (the first with omerowebd first, the second with bare gunicorn first), the geometric mean
    of their ratios: what going first costs a server comes out of one and into the other, so it cancels out."""
    return [(a * b) ** 0.5 for a, b in zip(ratios[::2], ratios[1::2])]


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def settled(daemon: Omerowebd) -> None:
    """Wait for what a start leaves running after READY (the first session sweep, timed by
    bench/sessions_sweep.py): the requests/s and the idle CPU here are the steady state's."""
    def done() -> bool:
        sessions = daemon.status().get("sessions") or {}
        return not sessions.get("running") and (bool(sessions.get("last")) or not sessions.get("enabled"))

    wait_for(done, 120, "the start's session sweep to end")


def idle_percent(pid: int, seconds: int) -> float:
    """The daemon's CPU over ``seconds`` of nothing to do, in % of one core (to the clock tick: 0.05 % in 20 s)."""
    before = cpu_seconds(pid)
    time.sleep(seconds)  # the quantity measured is idle time itself
    return (cpu_seconds(pid) - before) / seconds * 100


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
    parser.add_argument("--rounds", type=int, default=4,
                        help="requests/s rounds, in pairs (one each way; an odd number gets one more); without "
                             "--quick, also the idle windows and the starts that ask the venv first")
    parser.add_argument("--starts", type=int, default=11, help="pairs of starts (omerowebd, bare gunicorn)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=int, default=20, help="seconds of idle to measure the daemon's CPU")
    parser.add_argument("--user", help="run both servers as this user (default: nobody when run as root; 'root')")
    parser.add_argument("--windows", type=int, default=2,
                        help="timed requests/s windows per server, round and way (alone: A B, A B B A; at once)")
    parser.add_argument("--start-only", action="store_true",
                        help="time to first 200 only: the pairs of starts, no requests/s rounds")
    parser.add_argument("--rate-only", action="store_true",
                        help="only the requests/s rounds (no timed starts, no idle window): to compare quickly")
    report_args(parser)
    args = parser.parse_args()
    if args.quick:
        # 5 s windows: at 3 s one window's requests/s moves by 15 % here. The idle window stays 20 s (taken once).
        # 11 pairs of starts: one pair's gap moves by +-0.3 s here (each side's two workers booting on 2 shared
        # cores); the median of 5 moved by +-0.1 s from run to run, half the goal.
        args.seconds, args.starts = min(args.seconds, 5), min(args.starts, 11)
        # Loaded at once, one pair of rounds' ratio moves by about 3 % here, now and then 10 % (a fresh server's own
        # speed): eight pairs, their median. One window loaded at once a round and none alone: 16 rounds take
        # about as long as 8 did with them (4 minutes).
        args.rounds, args.windows = max(args.rounds, 16), 1
    args.rounds += args.rounds % 2  # whole pairs: one round each way
    if args.rounds < 2 and not args.start_only:
        parser.error("--rounds must be at least 2 (one pair of rounds, one each way)")
    if args.rate_only:
        args.starts = 0
    if args.start_only:
        args.rounds = 0
    user = service_user(args.user)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)

    remembered, asked, bare_name = "omerowebd, venv's answer remembered", "omerowebd, venv asked first", "bare gunicorn"
    starts: dict[str, list[float]] = {remembered: [], asked: [], bare_name: []}
    gaps: list[float] = []  # per pair: omerowebd (remembered) - bare gunicorn
    spawns: list[float] = []  # per omerowebd start: its own Python up to gunicorn's spawn
    alone: dict[str, list[Window]] = {remembered: [], bare_name: []}  # one server loaded at a time
    together: dict[str, list[Window]] = {remembered: [], bare_name: []}  # both loaded at once
    idle: list[float] = []
    paired: list[float] = []  # per round, each loaded alone: omerowebd's requests/s over bare's, its windows summed
    paired_together: list[float] = []  # per round, both loaded at once: the same
    rss = 0.0
    with scratch() as root:
        # As a package install leaves it (dh_python3, %py_byte_compile): the daemon's modules compiled, no
        # editable-install hook at the interpreter's start (common.installed_python).
        python = installed_python(root)
        verdict = root / "state" / NAME
        spawn_record = root / "state" / SPAWN_RECORD
        # One port for every start of the daemon: "the config unchanged since the last successful start" is its
        # bytes too (the spawn record is keyed by them), and a new port each time would make every start a changed one.
        port = free_port()
        daemon = Omerowebd(root, port, args.workers, python=python, user=user)
        give_to(user, root)
        daemon.start()  # the first start collects static files and remembers the venv's answer: not timed
        wait_for(verdict.exists, 60, "the venv's answer to be remembered")
        daemon.stop()
        remembers_spawn = spawn_record.exists()  # an omerowebd that keeps one (else: before it did)

        def remembered_start() -> float:
            if not verdict.exists() or remembers_spawn and not spawn_record.exists():
                raise SystemExit("no remembered venv answer or spawn: this start would not be the one timed here")
            daemon = Omerowebd(root, port, args.workers, python=python, user=user)
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
                spawn_record.unlink(missing_ok=True)
                daemon = Omerowebd(root, port, args.workers, python=python, user=user)
                starts[asked].append(daemon.start())
                wait_for(verdict.exists, 60, "the venv's answer to be remembered")  # else the next start asks too
                if remembers_spawn:
                    wait_for(spawn_record.exists, 60, "the spawn to be remembered")
                daemon.stop()

        def rate_round(round_: int) -> None:
            """Both servers fresh and up side by side, every step in the round's order (omerowebd first in even
            rounds): each alone in turn (A B, or A B B A; not in --quick), then both loaded at once (the same
            moments of the machine for both)."""
            nonlocal rss
            daemon = Omerowebd(root, free_port(), args.workers, python=python, user=user)
            bare = BareGunicorn(root / "omerodir", free_port(), args.workers, user=user)
            try:
                # The round's order (the module's docstring): the server started first serves a few % less.
                if round_ % 2:
                    bare.start()
                os.environ["WATCHDOG_USEC"] = str(WATCHDOG_SEC * 1_000_000)  # as under the unit: its probe counts
                try:
                    daemon.start()
                finally:
                    del os.environ["WATCHDOG_USEC"]
                settled(daemon)
                if round_ % 2 == 0:
                    bare.start()
                assert daemon.proc is not None and bare.proc is not None
                # Before any load (no request's tail in it), with both up: the first server's lead is then the
                # same in both rounds of a pair.
                if (round_ == 0 or not args.quick) and not args.rate_only:
                    idle.append(idle_percent(daemon.proc.pid, args.idle))
                servers = {remembered: Server(daemon.port, daemon.proc.pid, daemon.status()["generation"]["master_pid"]),
                           bare_name: Server(bare.port, bare.proc.pid, bare.proc.pid)}
                first, second = (remembered, bare_name) if round_ % 2 == 0 else (bare_name, remembered)
                for name in (first, second):
                    wrk(servers[name].port, WARM_UP)
                if not args.quick:
                    served = {name: 0.0 for name in servers}
                    for name in ([first, second, second, first] * args.windows)[:2 * args.windows]:
                        window, = serve([servers[name]], args.seconds)
                        alone[name].append(window)
                        served[name] += window.rate
                    paired.append(served[remembered] / served[bare_name])
                served = {name: 0.0 for name in servers}
                for _ in range(args.windows):  # the first's wrk starts first
                    for name, window in zip((first, second), serve([servers[first], servers[second]], args.seconds)):
                        together[name].append(window)
                        served[name] += window.rate
                paired_together.append(served[remembered] / served[bare_name])
                rss = max(rss, rss_mb(daemon.proc.pid))
            finally:
                bare.stop()
                daemon.stop()

        for round_ in range(args.rounds):
            rate_round(round_)

    def each(windows: dict[str, list[Window]], pick: str, form: str) -> str:
        return " ".join(f"{form.format(getattr(a, pick))}/{form.format(getattr(b, pick))}"
                        for a, b in zip(windows[remembered], windows[bare_name]))

    def loaded_cpu() -> float:
        """The daemon's processes' CPU while its site is loaded, % of a core: the median of every window."""
        return median([w.server for w in together[remembered] + alone[remembered]])

    def rate_rows() -> list[list[str]]:
        """What the requests/s rounds measured: the verdict's windows (both loaded at once), then each alone."""
        rows = []
        for how, windows, ratios in [("both loaded at once", together, paired_together),
                                     ("each loaded alone, in turn", alone, paired)]:
            if not ratios:
                continue
            first, second = ratios[::2], ratios[1::2]
            rows += [
                [f"requests/s ratio omerowebd / bare, {how}: median over the pairs of rounds (one each way) of "
                 "their geometric mean", f"{median(balanced(ratios)):.3f}",
                 ">= 0.98" if windows is together else "(for comparison)"],
                ["  each pair's geometric mean", " ".join(f"{r:.3f}" for r in balanced(ratios)), "-"],
                ["  each pair's rounds: omerowebd first / bare first (fresh servers; a round's windows summed)",
                 " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(first, second)), "-"],
                ["  median of the rounds, omerowebd first / bare first", f"{median(first):.3f}/{median(second):.3f}",
                 "-"],
                ["  its windows, omerowebd / bare (requests/s)", each(windows, "rate", "{:.0f}"), "-"],
                ["  the workers' CPU per request, omerowebd / bare (ms)", each(windows, "per_request", "{:.2f}"), "-"],
                ["  the workers' CPU, omerowebd / bare (% of a core)", each(windows, "workers", "{:.0f}"), "-"],
                ["  the server's other processes' CPU, omerowebd / bare (% of a core)", each(windows, "server", "{:.1f}"),
                 "-"],
                ["  the rest of the machine's CPU, wrk's included (% of a core)",
                 " ".join(f"{w.machine:.0f}" for w in windows[bare_name]) if windows is together
                 else each(windows, "machine", "{:.0f}"), "-"],
            ]
        rows.append(["omerowebd's other processes' CPU while its site is loaded (the daemon, its venv probe, the "
                     "gunicorn master; median of every window)", f"{loaded_cpu():.2f} %", "< 0.5 %"])
        return rows

    if args.rate_only:
        table(f"requests/s, login page, {args.workers} sync workers, {args.rounds} rounds, {args.windows} windows "
              f"of {args.seconds} s per server and way (load average now: {os.getloadavg()[0]:.2f})",
              ["measure", "value", "goal"], rate_rows())
        return

    if args.start_only:
        print(f"\nfirst 200 after start, {args.workers} sync workers, {len(gaps)} pairs "
              f"(load average now: {os.getloadavg()[0]:.2f})")
        print(f"  omerowebd (answer remembered) - bare gunicorn, median: {median(gaps):+.2f} s; "
              f"pairs: {' '.join(f'{g:+.2f}' for g in gaps)}")
        print(f"  omerowebd {median(starts[remembered]):.2f} s (its own Python up to the spawn "
              f"{median(spawns):.2f} s), bare {median(starts[bare_name]):.2f} s")
        print(f"  each start, omerowebd / bare (s): "
              f"{' '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(starts[remembered], starts[bare_name]))}; "
              f"omerowebd's spawns: {' '.join(f'{x:.2f}' for x in spawns)}")
        return

    who = f"as {user}" if user else "as root"
    rows = [[name, f"{median(starts[name]):.2f}", len(starts[name]),
             f"{median([w.rate for w in together[name]]):.1f}" if name in together else "-"] for name in starts]
    table(f"OMERO.web login page, {args.workers} sync workers (medians), servers run {who}",
          ["server", "first 200 after start (s)", "starts", f"requests/s, both loaded at once (wrk -t2 -c8 "
           f"-d{args.seconds} on each, {len(together[bare_name])} windows)"], rows)
    # The verdict: both servers loaded at once, the median over the pairs of rounds of the pair's geometric mean
    # (the module's docstring says why).
    ratio = median(balanced(paired_together))
    loaded = loaded_cpu()
    idle_cpu = median(idle)
    over = median(gaps)
    spawn = median(spawns)
    table("omerowebd itself", ["measure", "value", "goal"], [
        [f"first 200: omerowebd (answer remembered) - bare gunicorn, median of {len(gaps)} pairs", f"{over:+.2f} s",
         f"<= {START_GOAL} s"],
        ["  its pairs", " ".join(f"{g:+.2f}" for g in gaps), "-"],
        ["  of omerowebd's start: its own Python, up to gunicorn's spawn", f"{spawn:.2f} s", "-"],
        ["  each start's, in the pairs' order", " ".join(f"{x:.2f}" for x in spawns), "-"],
        ["  of omerowebd's start: gunicorn, from its spawn to the first 200",
         f"{median(starts[remembered]) - spawn:.2f} s", f"bare: {median(starts[bare_name]):.2f} s"],
        ["first 200: omerowebd (venv asked first) - bare gunicorn",
         f"{median(starts[asked]) - median(starts[bare_name]):+.2f} s", "-"],
        *rate_rows(),
        ["daemon RSS (MB)", f"{rss:.1f}", "< 40"],
        [f"daemon CPU while idle ({args.idle} s, {len(idle)} windows, systemd's watchdog on)",
         f"{idle_cpu:.2f} %", "< 0.5 %"],
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
        row("requests/s, login page, both loaded at once", median([w.rate for w in together[remembered]]), bare_name,
            median([w.rate for w in together[bare_name]]), "requests/s",
            f">= 0.98 x anchor (median of {len(paired_together) // 2} pairs of rounds, one each way: {ratio:.3f})",
            ratio >= 0.98),
        *([row("  each loaded alone, in turn", median([w.rate for w in alone[remembered]]), bare_name,
               median([w.rate for w in alone[bare_name]]), "requests/s",
               f"(for comparison; median of the pairs of rounds: {median(balanced(paired)):.3f})", None)]
          if alone[remembered] else []),
        row("  the workers' CPU per request, both loaded at once", median([w.per_request for w in together[remembered]]),
            bare_name, median([w.per_request for w in together[bare_name]]), "ms", "(for comparison)", None),
        # Both loaded at once, each server's session has an equal share of the CPU, so the daemon's own CPU would
        # not show in the ratio: it is judged here, against the same goal as when idle.
        row("daemon CPU while its site is loaded (the daemon, its venv probe, the gunicorn master)", loaded, "",
            None, "%", "< 0.5 %", loaded < 0.5),
        row("daemon RSS", rss, "", None, "MB", "< 40 MB", rss < 40),
        row("daemon CPU while idle", idle_cpu, "", None, "%", "< 0.5 %", idle_cpu < 0.5),
    ])


if __name__ == "__main__":
    main()
