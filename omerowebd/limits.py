"""How long each step of a reload may take, and the defaults of the settings that bound one.

The daemon keeps these deadlines (venv.py, static.py, nginx.py and settle.py
take them from here; config.py takes the defaults) and omerowebctl waits for
them: `reload` must wait longer than any reload can take, yet a finite time,
since whatever answers on the control socket is the service user's process.
A leaf module, so that omerowebctl reads them without importing the daemon's
modules (asyncio, the venv probe, nginx's renderer): its start-up is part of
every reload.
"""

from __future__ import annotations

VENV_PROBE_TIMEOUT = 120.0  # importing omeroweb.settings (and every property's parser) in the venv
COLLECTSTATIC_TIMEOUT = 900.0
NGINX_COMMAND_TIMEOUT = 60.0  # nginx.validate_command, nginx.reload_command: each
SETTLE_PROBE_TIMEOUT = 10.0  # one health probe of a generation in its settle window

# The defaults of daemon.ready_timeout and daemon.settle_seconds.
READY_TIMEOUT = 120.0
SETTLE_SECONDS = 5.0


def reload_wait(ready_timeout: float, settle_seconds: float) -> float:
    """The longest a reload can take, with a minute to spare: the venv probe, collectstatic,
    nginx's check and reload, and the new generation's ready_timeout; twice, since a reload
    that does not settle brings the previous config back (a second generation to wait for)."""
    one = VENV_PROBE_TIMEOUT + COLLECTSTATIC_TIMEOUT + 2 * NGINX_COMMAND_TIMEOUT + ready_timeout
    return 2 * one + settle_seconds + 2 * SETTLE_PROBE_TIMEOUT + 60.0
