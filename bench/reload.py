"""Reloading OMERO.web under load, three ways, side by side (issue 3).

The same load (clients looping on the login page) and the same number of
configuration changes (a new login logo each time), applied by:
  * omerowebd:      edit the TOML, `omerowebctl reload`
  * gunicorn HUP:   edit config.xml, `kill -HUP` the master (what a bare gunicorn offers)
  * stop + start:   edit config.xml, stop gunicorn, start it again (`omero web restart`)
Prints failed requests, refused connections and reload latency (from the
change to the page showing it) for each, and the app's own boot time; then
omerowebd's own share of a reload (latency minus the new generation's boot,
spawn to every worker serving) and where it goes: omerowebctl's own start-up
(a Python process importing its commands), the daemon's work before the spawn
and after the new generation serves (the reload's own seconds, less the boot
and the settle watch that follows the cutover), and the rest (the request's
round trip, the page poll). The servers run as the stand-in service user
(nobody) when this runs as root, as in production.
Goals: 0 failed for omerowebd; its own share <= 0.25 s.

    .venv/bin/python bench/reload.py [--reloads 5] [--clients 4] [--workers 2] [--user USER] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import (BareGunicorn, Load, Omerowebd, free_port, give_to, http_get, median, report_args, row, scratch,
                    service_user, table, wait_for, write_report)

SHARE_GOAL = 0.25  # seconds

from omerowebd import omero_config


def shows(port: int, logo: str) -> bool:
    try:
        return logo.encode() in http_get(port, timeout=5)[1]
    except OSError:
        return False


def until_shown(port: int, logo: str) -> float:
    t0 = time.monotonic()
    wait_for(lambda: shows(port, logo), 120, f"the page to show {logo}", interval=0.01)
    return time.monotonic() - t0


def ctl_startup(python: str) -> float:
    """omerowebctl's start-up alone: a process that imports what `reload` needs and exits."""
    t0 = time.monotonic()
    subprocess.run([python, "-m", "omerowebd.ctl", "reload", "--help"], check=True, capture_output=True)
    return time.monotonic() - t0


def bench_omerowebd(root, args, user) -> tuple[Load, list[float], list[float], list[float], list[float]]:
    """(load, latencies, boots, the daemon's own reload seconds less boot and settle, omerowebctl start-ups)."""
    d = Omerowebd(root / "o", free_port(), args.workers, user=user)
    give_to(user, root / "o")
    d.start()
    latencies, boots, inside, clients = [], [], [], []
    try:
        with Load(d.port, clients=args.clients) as load:
            load.wait_requests(20)
            for i in range(args.reloads):
                logo = f"/static/omerowebd-{i}.png"
                d.write(args.workers, logo)
                t0 = time.monotonic()
                # Not waited for: its reply comes only after the settle watch, long after the page changed.
                reload = subprocess.Popen([d.python, "-m", "omerowebd.ctl", "--config", str(d.config), "reload"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                until_shown(d.port, logo)
                latencies.append(time.monotonic() - t0)
                if reload.wait(300) != 0:
                    raise SystemExit(f"omerowebctl reload exited {reload.returncode}: {d.status()['last_reload']}")
                last = d.status()["last_reload"]
                boots.append(last["boot_seconds"])
                inside.append(last["seconds"] - last["boot_seconds"] - ((last.get("settle") or {}).get("seconds") or 0))
                clients.append(ctl_startup(d.python))
                load.wait_requests(20)
    finally:
        d.stop()
    return load, latencies, boots, inside, clients


def bench_bare(root, args, how: str, user) -> tuple[Load, list[float], float]:
    omerodir = root / how.replace(" ", "")
    props = {"omero.web.wsgi_workers": str(args.workers)}
    omero_config.write_config_xml(omerodir, props)
    give_to(user, omerodir)
    g = BareGunicorn(omerodir, free_port(), args.workers, user=user)
    boot = g.start()
    latencies = []
    try:
        with Load(g.port, clients=args.clients) as load:
            load.wait_requests(20)
            for i in range(args.reloads):
                logo = f"/static/{how.replace(' ', '')}-{i}.png"
                omero_config.write_config_xml(omerodir, {**props, "omero.web.login_logo": logo})
                give_to(user, omerodir)  # a 0600 file: the servers' user must still read it
                t0 = time.monotonic()
                if how == "gunicorn HUP":
                    g.hup()
                    if g.proc.poll() is not None:
                        raise SystemExit("gunicorn master died on HUP")
                else:
                    g.stop()
                    g.start()
                until_shown(g.port, logo)
                latencies.append(time.monotonic() - t0)
                load.wait_requests(20)
    finally:
        g.stop()
    return load, latencies, boot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--user", help="run the servers as this user (default: nobody when run as root; 'root')")
    report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.reloads = min(args.reloads, 2)
    user = service_user(args.user)
    rows = []
    boots = []
    measured: dict[str, tuple[Load, list[float]]] = {}
    with scratch() as root:
        give_to(user, root)
        load, lat, gen_boots, inside, clients = bench_omerowebd(root, args, user)
        measured["omerowebd"] = (load, lat)
        rows.append(["omerowebd reload", load.ok, len(load.failed), load.refused, f"{median(lat):.2f}", f"{max(lat):.2f}"])
        overhead = [total - boot for total, boot in zip(lat, gen_boots)]
        for how in ("gunicorn HUP", "stop + start"):
            load, lat, boot = bench_bare(root, args, how, user)
            measured[how] = (load, lat)
            boots.append(boot)
            rows.append([how, load.ok, len(load.failed), load.refused, f"{median(lat):.2f}", f"{max(lat):.2f}"])
    table(f"{args.reloads} reloads under {args.clients} looping clients, {args.workers} sync workers, servers run "
          f"as {user or 'root'}", ["method", "requests ok", "failed", "refused", "latency median (s)",
                                   "latency max (s)"], rows)
    share, client, daemon = median(overhead), median(clients), median(inside)
    table("omerowebd's reload latency against the app's own boot time (medians)", ["measure", "seconds"], [
        ["app boot, bare gunicorn start to first 200, no load", f"{median(boots):.2f}"],
        ["app boot, new generation spawn to all workers serving, under the load", f"{median(gen_boots):.2f}"],
        ["omerowebd's own share of a reload (latency - that boot)", f"{share:.3f}"],
        ["omerowebd's own share of a reload, max", f"{max(overhead):.3f}"],
        ["  of it: omerowebctl's start-up (python -m omerowebd.ctl reload --help)", f"{client:.3f}"],
        ["  of it: the daemon: check, stage, spawn; switch, config.xml (reload seconds - boot - settle)",
         f"{daemon:.3f}"],
        ["  of it: the rest (request round trip, page poll; negative: a new worker answered first)",
         f"{share - client - daemon:.3f}"],
    ])
    print(f"goals: 0 failed for omerowebd; its own share <= {SHARE_GOAL} s")
    ours, (stop_load, stop_lat), (hup_load, hup_lat) = measured["omerowebd"], measured["stop + start"], \
        measured["gunicorn HUP"]
    write_report(args.report, [
        row("failed requests during reloads", len(ours[0].failed), "stop + start", len(stop_load.failed), "requests",
            "0", not ours[0].failed),
        row("refused connections during reloads", ours[0].refused, "stop + start", stop_load.refused, "connections",
            "0", ours[0].refused == 0),
        row("reload latency, change to page showing it", median(ours[1]), "gunicorn HUP", median(hup_lat), "s",
            "(for comparison)", None),
        row("reload latency, change to page showing it", median(ours[1]), "stop + start", median(stop_lat), "s",
            "(for comparison)", None),
        row("omerowebd's own share of a reload (latency - new generation's boot)", share, "new generation's boot",
            median(gen_boots), "s", f"<= {SHARE_GOAL} s", share <= SHARE_GOAL),
        row("  of the share: omerowebctl's start-up", client, "", None, "s", "", None),
        row("  of the share: the daemon's own work", daemon, "", None, "s", "", None),
    ])


if __name__ == "__main__":
    main()
