"""omerowebctl status: what the daemon is doing."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .. import control_client, status_lines
from ..exits import EXIT_FAILURE, EXIT_OK
from . import socket_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the daemon's state (exit 0 when serving)",
                       description="Show state, generation, master and worker pids, sockets, uptime.")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    status = control_client.request(path, {"cmd": "status"})
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        try:
            text = render(status)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError):
            # What answers there runs as the service user: a reply of another shape is its
            # problem to report, never a traceback in root's terminal.
            raise control_client.DaemonUnreachable(
                f"the status that {path} sent is not one this omerowebctl can show (try status --json)") from None
        print(text)
    return EXIT_OK if status.get("serving") is True else EXIT_FAILURE


def render(s: dict[str, Any]) -> str:
    lines = [f"state:       {s['state']} (pid {s['pid']}, up {_duration(s['uptime'])})"]
    g = s.get("generation")
    if g:
        lines.append(f"generation:  {g['number']} ({g['state']}), master {g['master_pid']}, "
                     f"workers {' '.join(map(str, g['worker_pids'])) or 'none'}")
        fault = g.get("last_worker_fault")
        if fault:
            lines.append(f"             {g['worker_faults']} worker(s) lost and replaced; last {_when(fault['at'])}: "
                         f"pid {fault['pid']} {fault['why']}")
    else:
        lines.append("generation:  none serving")
    for sock in s.get("sockets", []):
        name = f" name={sock['name']}" if sock.get("name") else ""
        lines.append(f"socket:      {sock['address']} (from {sock['origin']}{name})")
    cfg = s.get("config") or {}
    lines.append(f"config:      {cfg.get('path')} sha256:{(cfg.get('digest') or '')[:12]}")
    foreign = (s.get("config_xml") or {}).get("foreign_edits")
    if foreign:
        lines.append(f"config.xml:  {foreign['message']} (since {_when(foreign.get('since'))}); the running"
                     " generations do not read it; a reload stops until you")
        lines.append(f"             {foreign['fix']}")
    if cfg.get("problem"):
        lines.append(f"             the file is {cfg['problem']}: the running config keeps serving until it is back")
    r = s.get("last_reload")
    if r:
        lines.append(f"last reload: {_when(r['at'])} {r['outcome']} ({r['source']}, {r['seconds']}s): {r['message']}")
        lines += [f"             changed {change}" for change in r.get("changes") or []]
    nginx = s.get("nginx") or {}
    if nginx.get("enabled"):
        validation = nginx.get("validation")
        checked = "not run" if not validation else "ok" if validation["ok"] else f"FAILED: {validation['message']}"
        lines.append(f"nginx:       {' '.join(nginx.get('files', {}).values())} "
                     f"(written {_when(nginx.get('written_at'))}, validation {checked})")
    metrics = s.get("metrics") or {}
    if metrics.get("address"):
        problem = f" (not served: {metrics['problem']})" if metrics.get("problem") else ""
        lines.append(f"metrics:     http://{metrics['address']}/metrics{problem}")
    if "sessions" in s:
        lines += status_lines.sessions(s["sessions"])
    lines += status_lines.store_health(s.get("store_health"))
    store = s.get("session_store") or {}
    if store.get("available") is False:
        problems = "; ".join(f"{where}: {why}" for where, why in store["problems"].items())
        lines.append(f"session store: UNAVAILABLE since {_when(store['unavailable_since'])} ({problems}): "
                     "signed-in users get errors until it is back")
    elif store.get("available") and not all(status_lines.answered(s.get("store_health"), w) for w in store["checked"]):
        lines.append(f"session store: available ({', '.join(store['checked'])}, checked {_when(store['checked_at'])})")
    crash = s.get("last_crash")
    if crash:
        lines.append(f"crashes:     {s['crashes']} since start; last {_when(crash['at'])}: generation {crash['generation']} "
                     f"exited with status {crash['exit_status']}, restart {crash['restart']}")
    versions = s.get("versions") or {}
    if versions:
        lines.append("versions:    " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines)


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "never"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"
