"""Two omerowebd hosts behind one nginx (issue 13): what several hosts buy and cost.

Hosts A (127.0.0.2) and B (127.0.0.3) run real OMERO.web on the same port,
each host's nginx.upstreams naming the other; a real nginx in front serves
host A's rendered files (the test suite's own fixture, tests/integration/
multihost.py). Under clients looping on the login page through nginx:

  * requests/s with one host (host A's nginx.upstreams emptied and reloaded:
    nginx sends everything to A) and with two (upstreams back);
  * failed requests during `omerowebctl rollout --socket A --socket B` of a
    change the login page shows (a host-by-host `omerowebctl reload` when the
    rollout command is missing, and the table says so);
  * failed requests while host A is killed (daemon and gunicorn, SIGKILL), and
    the time until nginx stops sending to it (nginx's access log names every
    server a request was tried on).

Both hosts share this machine's cores: the two-host rate measures nginx
spreading the load, not more hardware, and is printed as it comes.

    .venv/bin/python bench/scaleout.py [--seconds 20] [--clients 8] [--workers 2] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import REPO, VENV, scratch, table, wait_for

from integration.multihost import Traffic, TwoHosts  # noqa: E402 (tests/ is on the path: common.py)

FAIL_TIMEOUT = 10.0  # nginx.fail_timeout's default: how long nginx leaves a failed host out


def ctl(host, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(host.config_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def reload(host) -> None:
    done = ctl(host, "reload")
    if done.returncode != 0:
        raise SystemExit(f"host {host.name}: omerowebctl reload exited {done.returncode}: {done.stdout}{done.stderr}")


def rate(pair: TwoHosts, clients: int, seconds: float) -> tuple[float, int]:
    """Successful requests per second through nginx over ``seconds``, after a warm-up; and the failures."""
    with Traffic(pair.front.port, clients=clients) as load:
        load.wait_ok(2 * clients)
        t0 = time.monotonic()
        time.sleep(seconds)  # a measuring window, not a wait for an event
        t1 = time.monotonic()
        return load.rate(t0, t1), len(load.failures())


def served_by(pair: TwoHosts, since: float) -> dict[str, int]:
    """Requests nginx logged since ``since`` (time.time()), by the host that answered them."""
    names = {host.backend: host.name for host in pair.hosts}
    return dict(Counter(names.get(r.upstreams[-1], r.upstreams[-1])
                        for r in pair.front.logged() if r.at >= since and r.upstreams))


def throughput(pair: TwoHosts, args: argparse.Namespace) -> tuple[float, float, dict[str, int]]:
    # One host: A renders an upstream block of itself alone; nginx reloads with it.
    pair.write(workers=args.workers, upstreams=[], only=pair.a)
    reload(pair.a)
    one, failed_one = rate(pair, args.clients, args.seconds)
    pair.write(workers=args.workers, only=pair.a)
    reload(pair.a)
    since = time.time()
    two, failed_two = rate(pair, args.clients, args.seconds)
    if failed_one or failed_two:
        print(f"# failed requests while measuring: one host {failed_one}, two hosts {failed_two}")
    return one, two, served_by(pair, since)


def rollout(pair: TwoHosts, args: argparse.Namespace) -> tuple[int, str, float]:
    """A change the login page shows, applied to both hosts under load; (failed requests, how, seconds)."""
    logo = "/static/scaleout-rollout.png"
    for host in pair.hosts:
        pair.write(workers=args.workers, omero=f'login_logo = "{logo}"\n', only=host)
    with Traffic(pair.front.port, clients=args.clients) as load:
        load.wait_ok(2 * args.clients)
        t0 = time.monotonic()
        sockets = [a for host in pair.hosts for a in ("--socket", str(host.runtime_dir / "control.sock"))]
        done = ctl(pair.a, "rollout", *sockets, "--timeout", "300")
        how = "omerowebctl rollout --socket A --socket B"
        if done.returncode != 0 and "invalid choice" in done.stderr:
            how = "omerowebctl reload on A, then on B (no rollout command)"
            for host in pair.hosts:
                reload(host)
        elif done.returncode != 0:
            raise SystemExit(f"rollout exited {done.returncode}: {done.stdout}{done.stderr}")
        seconds = time.monotonic() - t0
        for host in pair.hosts:
            wait_for(lambda h=host: logo.encode() in h.get()[1], 60, f"host {host.name} to show the new logo")
        load.wait_ok(2 * args.clients)
    return len(load.failures()), how, seconds


def kill(pair: TwoHosts, args: argparse.Namespace) -> tuple[int, float, int, dict[str, int]]:
    """Kill host A under load: (failed requests, seconds from the last SIGKILL until nginx stops trying A,
    requests that tried A meanwhile, outcomes)."""
    a = pair.a
    with Traffic(pair.front.port, clients=args.clients) as load:
        load.wait_ok(2 * args.clients)
        a.kill()
        killed = a.killed_at or time.time()
        wait_for(lambda: pair.front.disabled(a.backend), 60, "nginx to leave host A out")
        load.wait_ok(4 * args.clients)
    tried = sorted(r.at for r in pair.front.tried(a.backend, killed))
    # The requests that met dead A before nginx took it out; a try fail_timeout later is nginx looking again.
    burst = [t for t in tried if t < killed + FAIL_TIMEOUT / 2]
    stopped = (burst[-1] - killed) if burst else 0.0
    return len(load.failures()), stopped, len(burst), dict(load.counts())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="each throughput window")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per host")
    parser.add_argument("--quick", action="store_true", help="short windows, for bench/report.py")
    parser.add_argument("--report", type=Path, help="also write the rows as JSON (bench/report.py)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 6.0)

    with scratch() as root, TwoHosts(root / "pair", VENV) as pair:
        pair.write(workers=args.workers)
        pair.start()
        one, two, shares = throughput(pair, args)
        failed_rollout, how, rollout_s = rollout(pair, args)
        failed_kill, stopped, tries, outcomes = kill(pair, args)

    gain = (two / one - 1) * 100 if one else float("nan")
    table(f"Two hosts behind nginx: {args.clients} clients on the login page, {args.workers} sync workers per host,"
          f" {args.seconds:.0f} s windows",
          ["measure", "value"], [
              ["requests/s through nginx, one host", f"{one:.1f}"],
              ["requests/s through nginx, two hosts", f"{two:.1f} ({gain:+.0f}%; served by {shares})"],
              [f"failed requests during {how} ({rollout_s:.1f} s)", failed_rollout],
              [f"failed requests while host A is killed (outcomes {outcomes})", failed_kill],
              [f"seconds until nginx stops sending to dead A ({tries} requests tried it, each retried on B)",
               f"{stopped:.3f}"],
          ])
    print("both hosts share this machine's cores: the two-host rate is nginx spreading the load, not more hardware")
    print("goal: 0 failed requests during the rollout and the kill; nginx leaves the dead host out within 1 s")

    if args.report:
        rows = [
            {"measure": "requests/s through nginx, two hosts (anchor: one host)", "omerowebd": round(two, 1),
             "anchor_name": "one host", "anchor": round(one, 1), "unit": "requests/s",
             "goal": "informational: both hosts share this machine's cores", "met": None},
            {"measure": f"failed requests during {how}", "omerowebd": float(failed_rollout),
             "anchor_name": "none", "anchor": None, "unit": "requests", "goal": "0", "met": failed_rollout == 0},
            {"measure": "failed requests while a host is killed (SIGKILL)", "omerowebd": float(failed_kill),
             "anchor_name": "none", "anchor": None, "unit": "requests", "goal": "0", "met": failed_kill == 0},
            {"measure": "time until nginx stops sending to the dead host", "omerowebd": round(stopped, 3),
             "anchor_name": "none", "anchor": None, "unit": "s", "goal": "<= 1", "met": stopped <= 1.0},
        ]
        args.report.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
