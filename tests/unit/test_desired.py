"""derive and decide (desired.py): what a config means and what a change requires, without a venv.

The table holds before/after configs and the decision expected; every row
is also run through the daemon's own dry run and its reload (with the
bring-up of a generation recorded instead of run), and all three must agree.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from omerowebd import desired, reloader, sockets
from omerowebd import supervisor as supervisor_module
from omerowebd.desired import Action, decide, derive
from omerowebd.systemd import Notifier
from unit.test_nginx import info, make_config  # noqa: F401 (info is a fixture)

# settle_seconds = 0: the reload under test ends once its generation serves (no settle window to watch).
BASE = {"omero": "wsgi_workers = 2\n", "daemon": 'bind = ["127.0.0.1:4999"]\nwatch_config = false\nsettle_seconds = 0'}

# (name, change to BASE, packages after, sockets origin, serving, expected action)
ROWS: list[tuple[str, dict[str, str], str, str, bool, Action]] = [
    ("unchanged", {}, "A", desired.BOUND, True, Action.NOTHING),
    ("a property", {"omero": "wsgi_workers = 3\n"}, "A", desired.BOUND, True, Action.GENERATION),
    ("the prefix", {"omero": 'wsgi_workers = 2\nprefix = "/omero"\n'}, "A", desired.BOUND, True, Action.GENERATION),
    ("nginx only", {"nginx_table": 'server_name = "omero.example.org"\n'}, "A", desired.BOUND, True, Action.OUTPUTS),
    ("the sweep only", {"extra": '[sessions]\nschedule = "1h"\n'}, "A", desired.BOUND, True, Action.OUTPUTS),
    ("a live daemon setting", {"daemon": BASE["daemon"] + "\nready_timeout = 30"}, "A", desired.BOUND, True,
     Action.OUTPUTS),
    ("gunicorn's grace", {"daemon": BASE["daemon"] + "\ngraceful_timeout = 7"}, "A", desired.BOUND, True,
     Action.GENERATION),
    ("the venv's packages", {}, "B", desired.BOUND, True, Action.GENERATION),
    ("daemon.bind, own sockets", {"daemon": BASE["daemon"].replace("4999", "4998")}, "A",
     desired.BOUND, True, Action.REBIND),
    # The row the dry run and the reload used to disagree on: systemd's sockets, daemon.bind does not apply.
    ("daemon.bind, systemd's sockets", {"daemon": BASE["daemon"].replace("4999", "4998")}, "A",
     desired.SYSTEMD, True, Action.OUTPUTS),
    ("the runtime dir", {"daemon": BASE["daemon"] + '\nruntime_dir = "/run/elsewhere"'}, "A", desired.BOUND, True,
     Action.RESTART),
    ("nothing changed, nothing serves (a crash)", {}, "A", desired.BOUND, False, Action.GENERATION),
]


def write(tmp_path: Path, change: dict[str, str]) -> Any:
    parts = {"nginx_table": "", "extra": "", **BASE, **change}
    extra = parts.pop("extra")
    return make_config(tmp_path, parts["nginx_table"], parts["omero"] + extra, parts["daemon"])


@pytest.mark.parametrize("name, change, packages, origin, serving, expected", ROWS, ids=[r[0] for r in ROWS])
def test_decide(tmp_path, info, name, change, packages, origin, serving, expected) -> None:  # noqa: F811
    listening = ["127.0.0.1:4999"] if origin == desired.SYSTEMD else []
    before = derive(write(tmp_path, {}), info, "A", listening=listening)
    after_config = write(tmp_path, change)
    if expected is Action.RESTART:  # decided before the venv is asked: no derive needed
        decision = desired.decide_early(before, after_config, packages, serving=serving)
    else:
        decision = decide(before, derive(after_config, info, packages, listening=listening), origin, serving=serving)
    assert decision is not None and decision.action is expected, decision
    assert decision.new_generation == (expected in (Action.GENERATION, Action.REBIND))
    assert decision.reasons, "every decision says why"
    if expected is Action.REBIND:
        assert decision.bind == ("127.0.0.1:4998",)


def test_derive_pins_the_session_store_and_says_where_nginx_reaches_gunicorn(tmp_path, info) -> None:  # noqa: F811
    config = write(tmp_path, {})
    wanted = derive(config, info, "A")
    assert str(desired.session_dir(config)) in wanted.properties["omero.web.django_additional_settings"]
    assert wanted.properties == desired.properties_of(config)
    assert wanted.bind == wanted.backends == ("127.0.0.1:4999",)
    assert derive(config, info, "A", listening=["unix:/run/omerowebd/web.sock"]).backends == (
        "unix:/run/omerowebd/web.sock",)
    assert wanted.plan.workers == 2 and wanted.nginx_files[0].name == "omero-web.conf"


def test_backends_default_to_bind_then_application_server(tmp_path: Path) -> None:
    assert desired.backends_of(make_config(tmp_path)) == ("127.0.0.1:4080",)
    assert desired.backends_of(make_config(tmp_path, omero='"application_server.host" = "::1"\n')) == ("[::1]:4080",)
    bound = make_config(tmp_path, daemon='bind = ["127.0.0.1:5000", "unix:/run/w.sock"]')
    assert desired.backends_of(bound) == ("127.0.0.1:5000", "unix:/run/w.sock")


# -- the daemon's dry run and its reload give the same answer, on every row -------------


class _Quiet(Notifier):
    def __init__(self) -> None:
        super().__init__({})

    def send(self, **fields: object) -> None:
        pass


def _daemon_answers(tmp_path: Path, info: Any, change: dict[str, str], packages: str, origin: str,
                    serving: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Action, Action]:
    """(what the dry run says, what the reload does) for one row, in-process, no venv, no gunicorn."""
    before = write(tmp_path, {})
    sup = supervisor_module.Supervisor(before, _Quiet())
    sup.services = {}
    held = [SimpleNamespace(address="127.0.0.1:4999", origin="bound" if origin == desired.BOUND else "systemd")]
    sup.running.sockets = held  # type: ignore[assignment]
    sup.applied = derive(before, info, "A", listening=[] if origin == desired.BOUND else ["127.0.0.1:4999"])
    if serving:
        sup.gens.current = SimpleNamespace(number=1)  # type: ignore[assignment]
    fingerprint = {"now": "A"}
    monkeypatch.setattr(reloader, "fingerprint", lambda venv: fingerprint["now"])

    async def checks_run(config: Any, prober: Any, packages: str | None = None) -> tuple[Any, list[str]]:
        return info, []

    monkeypatch.setattr(reloader.checks, "run", checks_run)
    new_sockets = [SimpleNamespace(address="127.0.0.1:4998", origin="bound")]
    monkeypatch.setattr(sockets, "bind", lambda addresses: new_sockets)
    monkeypatch.setattr(sockets, "release", lambda held: None)
    brought_up: list[Any] = []

    async def bring_up(target: Any, sockets: Any, switches: Any, **options: Any) -> None:
        brought_up.append(sockets)
        sup.applied = target

    monkeypatch.setattr(sup.running, "bring_up", bring_up)
    write(tmp_path, change)
    fingerprint["now"] = packages

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            return await sup.reloader.dry_run(), await sup._reload("test")
        finally:
            sup.running.site_xml.stop()

    dry, real = asyncio.run(both())
    said = next((a for a in Action if dry["message"] == f"would {a.value}"), None)
    if dry["outcome"] == "nothing to do":
        said = Action.NOTHING
    elif dry["outcome"] == "restart required":
        said = Action.RESTART
    if real["outcome"] == "nothing to do":
        done = Action.NOTHING
    elif real["outcome"] == "restart required":
        done = Action.RESTART
    elif brought_up:
        done = Action.REBIND if brought_up[0] is new_sockets else Action.GENERATION
    else:
        assert real["outcome"] == "applied", real
        done = Action.OUTPUTS
    return said, done  # type: ignore[return-value]


@pytest.mark.parametrize("name, change, packages, origin, serving, expected", ROWS, ids=[r[0] for r in ROWS])
def test_the_dry_run_says_what_the_reload_does(tmp_path, info, monkeypatch, name, change, packages, origin,  # noqa: F811
                                               serving, expected) -> None:
    said, done = _daemon_answers(tmp_path, info, change, packages, origin, serving, monkeypatch)
    assert said is expected and done is expected, (said, done)
