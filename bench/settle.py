#!/usr/bin/env python3
"""What settle-and-revert buys: a reload whose workers crash-loop once they take traffic, under load.

Twice on real OMERO.web, each from a fresh omerowebd: with the settle window (daemon.settle_seconds, the
default 5) and with it off (settle_seconds = 0: what gunicorn, uvicorn, granian and circus do, which forget
the old config once they cut over). The new config adds an app whose workers die after every response
once armed (tests/integration/apps/omerowebd_crash_after_response), armed as soon as its generation
serves. Printed: failed requests, the reload's outcome, seconds from the crash loop's start until the
previous config serves, and requests/s in the window after the reload answered.

    .venv/bin/python bench/settle.py [--window 30] [--quick] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (REPO, VENV, Load, first_200, free_port, report_args, row, scratch, table,  # noqa: E402
                    wait_for, write_report)

APP = "omerowebd_crash_after_response"


def config(root: Path, port: int, settle: float, with_app: bool) -> str:
    text = textwrap.dedent(f"""\
        [daemon]
        omerodir = "{root / 'omerodir'}"
        venv = "{VENV}"
        runtime_dir = "{root / 'run'}"
        state_dir = "{root / 'state'}"
        bind = ["127.0.0.1:{port}"]
        watch_config = false
        graceful_timeout = 10
        settle_seconds = {settle}

        [nginx]
        enabled = false

        [omero.web]
        wsgi_workers = 2
        """)
    return text + (f'apps = ["{APP}"]\n' if with_app else "")


def status(python: str, path: Path) -> dict:
    out = subprocess.run([python, "-m", "omerowebd.ctl", "--config", str(path), "status", "--json"],
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def run(settle: float, window: float) -> dict[str, object]:
    with scratch() as root:
        port = free_port()
        apps = root / "apps"
        shutil.copytree(REPO / "tests" / "integration" / "apps" / APP, apps / APP)
        path = root / "omerowebd.toml"
        path.write_text(config(root, port, settle, with_app=False))
        env = {"PYTHONPATH": str(apps)}
        daemon = subprocess.Popen([sys.executable, "-m", "omerowebd", "--config", str(path)],
                                  env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            first_200(port, timeout=180)
            wait_for(lambda: status(sys.executable, path).get("serving"), 120, "omerowebd to serve")
            with Load(port, clients=4, timeout=120) as load:
                load.wait_requests(20, timeout=120)
                path.write_text(config(root, port, settle, with_app=True))
                reply: dict[str, subprocess.CompletedProcess[str]] = {}
                asking = threading.Thread(target=lambda: reply.setdefault("out", subprocess.run(
                    [sys.executable, "-m", "omerowebd.ctl", "--config", str(path), "reload"],
                    capture_output=True, text=True)))
                asking.start()
                wait_for(lambda: (status(sys.executable, path).get("generation") or {}).get("number") == 2, 300,
                         "the new generation to serve")
                (apps / APP / "armed").touch()
                armed = time.monotonic()
                back = None
                while asking.is_alive() or back is None:
                    gen = (status(sys.executable, path).get("generation") or {})
                    if back is None and gen.get("number") == 3 and gen.get("state") == "serving":
                        back = time.monotonic() - armed
                    if not asking.is_alive() and back is None:
                        break
                    time.sleep(0.2)
                asking.join()
                ok_before = load.ok
                time.sleep(window)  # the throughput after the reload answered: a measurement window, not a wait
                rate = (load.ok - ok_before) / window
            out = reply["out"]
            return {"outcome": out.stdout.split(":", 1)[0] or f"exit {out.returncode}", "exit": out.returncode,
                    "failed": len(load.failed) + load.refused, "back": back, "rate": rate, "ok": load.ok}
        finally:
            daemon.terminate()
            daemon.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of load measured after the reload")
    report_args(parser)
    args = parser.parse_args()
    window = 10.0 if args.quick else args.window
    on, off = run(5, window), run(0, window)
    table("A reload whose workers crash-loop once they take traffic (2 sync workers, 4 clients)",
          ["", "settle 5 s (omerowebd)", "settle off (any peer)"],
          [["reload's outcome", f"{on['outcome']} (exit {on['exit']})", f"{off['outcome']} (exit {off['exit']})"],
           ["failed requests (all)", on["failed"], off["failed"]],
           ["crash loop -> previous config serving (s)",
            f"{on['back']:.1f}" if on["back"] is not None else "never", "never"],
           [f"requests/s in the {window:.0f} s after the reload answered", f"{on['rate']:.1f}", f"{off['rate']:.1f}"]])
    write_report(args.report, [
        row("failed requests during a crash-looping reload", float(on["failed"]), "settle off", float(off["failed"]),
            "requests", "0", on["failed"] == 0),
        row("crash loop until the previous config serves", float(on["back"] or float("nan")), "settle off", None, "s",
            "reverted by itself", on["exit"] == 5),
        row(f"requests/s after a crash-looping reload ({window:.0f} s)", float(on["rate"]), "settle off",
            float(off["rate"]), "req/s", "the site's normal rate again", None),
    ])


if __name__ == "__main__":
    main()
