"""What a start imports before gunicorn is spawned: nothing only needed later (each costs the first 200 time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imported where they are used, after READY or on a rare path: the metrics endpoint's
# WSGI server (http.server, email), the config watcher's watchdog, a misspelt name's difflib.
LATER = ["wsgiref.simple_server", "http.server", "watchdog.observers", "difflib"]


def test_the_daemon_module_leaves_what_comes_later_unimported():
    script = ("import sys\nimport omerowebd.supervisor\n"
              f"print(' '.join(m for m in {LATER!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
