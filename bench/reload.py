"""Reloading OMERO.web under load, three ways, side by side (issue 3).

The same load (clients looping on the login page) and the same number of
configuration changes (a new login logo each time), applied by:
  * omerowebd:      edit the TOML, `omerowebctl reload`
  * gunicorn HUP:   edit config.xml, `kill -HUP` the master (what a bare gunicorn offers)
  * stop + start:   edit config.xml, stop gunicorn, start it again (`omero web restart`)
Prints failed requests, refused connections and reload latency (from the
change to the page showing it) for each, and the app's own boot time.
Target: 0 failed for omerowebd; latency within 1 s of the boot time.

    .venv/bin/python bench/reload.py [--reloads 5] [--clients 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import time

from common import BareGunicorn, Load, Omerowebd, free_port, http_get, median, scratch, table, wait_for

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


def bench_omerowebd(root, args) -> tuple[Load, list[float], list[float]]:
    d = Omerowebd(root / "o", free_port(), args.workers)
    d.start()
    latencies, boots = [], []
    try:
        with Load(d.port, clients=args.clients) as load:
            load.wait_requests(20)
            for i in range(args.reloads):
                logo = f"/static/omerowebd-{i}.png"
                d.write(args.workers, logo)
                t0 = time.monotonic()
                assert d.reload() == 0
                until_shown(d.port, logo)
                latencies.append(time.monotonic() - t0)
                boots.append(d.status()["last_reload"]["boot_seconds"])
                load.wait_requests(20)
    finally:
        d.stop()
    return load, latencies, boots


def bench_bare(root, args, how: str) -> tuple[Load, list[float], float]:
    omerodir = root / how.replace(" ", "")
    props = {"omero.web.wsgi_workers": str(args.workers)}
    omero_config.write_config_xml(omerodir, props)
    g = BareGunicorn(omerodir, free_port(), args.workers)
    boot = g.start()
    latencies = []
    try:
        with Load(g.port, clients=args.clients) as load:
            load.wait_requests(20)
            for i in range(args.reloads):
                logo = f"/static/{how.replace(' ', '')}-{i}.png"
                omero_config.write_config_xml(omerodir, {**props, "omero.web.login_logo": logo})
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
    args = parser.parse_args()
    rows = []
    boots = []
    with scratch() as root:
        load, lat, gen_boots = bench_omerowebd(root, args)
        rows.append(["omerowebd reload", load.ok, len(load.failed), load.refused, f"{median(lat):.2f}", f"{max(lat):.2f}"])
        overhead = [total - boot for total, boot in zip(lat, gen_boots)]
        for how in ("gunicorn HUP", "stop + start"):
            load, lat, boot = bench_bare(root, args, how)
            boots.append(boot)
            rows.append([how, load.ok, len(load.failed), load.refused, f"{median(lat):.2f}", f"{max(lat):.2f}"])
    table(f"{args.reloads} reloads under {args.clients} looping clients, {args.workers} sync workers",
          ["method", "requests ok", "failed", "refused", "latency median (s)", "latency max (s)"], rows)
    table("omerowebd's reload latency against the app's own boot time", ["measure", "seconds"], [
        ["app boot, bare gunicorn start to first 200, idle machine", f"{median(boots):.2f}"],
        ["app boot, new generation spawn to all workers serving, under the load", f"{median(gen_boots):.2f}"],
        ["omerowebd's own share of a reload (latency - that boot), median", f"{median(overhead):.2f}"],
        ["omerowebd's own share of a reload, max", f"{max(overhead):.2f}"],
    ])
    print("target: 0 failed for omerowebd; its own share within 1 s")


if __name__ == "__main__":
    main()
