"""The reload after its cutover (reloader.Reloader.apply), with a stand-in of what runs: a step that fails once the
new config serves is reported as what serves, published, never "rejected"."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from omerowebd import reloader
from omerowebd.desired import Action, Decision
from omerowebd.exits import RELOAD_APPLIED


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, level: str):  # info, warning, error, exception, debug
        return lambda event, **kw: self.events.append((level, event))


def desired(name: str, settle_seconds: float = 0) -> SimpleNamespace:
    config = SimpleNamespace(name=name, daemon=SimpleNamespace(settle_seconds=settle_seconds, settle_worker_deaths=0))
    return SimpleNamespace(name=name, config=config, packages="A", info=None)


class Running:
    """What the reloader needs of running.py; the cutover always goes through."""

    def __init__(self, old: SimpleNamespace) -> None:
        self.applied = old
        self.sockets = ["held"]
        self.gens = SimpleNamespace(current=SimpleNamespace(number=1, worker_faults=0, exit_status=None, alive=True),
                                    last_boot_seconds=0.5)
        self.site_xml = SimpleNamespace(refusal=lambda config: None)

    def target(self) -> SimpleNamespace:
        return self.applied

    async def stage(self, target: Any, *, discard: bool = False) -> list[str]:
        return ["switch"]

    async def bring_up(self, target: Any, held: Any, switches: Any, *, publish: bool = True) -> None:
        self.applied = target
        self.gens.current = SimpleNamespace(number=self.gens.current.number + 1, worker_faults=0, exit_status=None,
                                            alive=True)

    async def apply_outputs(self, target: Any, switches: Any) -> None:
        self.applied = target


def reload(monkeypatch: pytest.MonkeyPatch, action: Action, *, after: Any = None, settle_watch: Any = None,
           settle_seconds: float = 0) -> tuple[dict[str, Any], list[Any], Running, SimpleNamespace]:
    old, new = desired("old"), desired("new", settle_seconds)
    running = Running(old)
    published: list[Any] = []
    monkeypatch.setattr(reloader, "mark_applied", lambda config, log: published.append(config))
    if settle_watch is not None:
        monkeypatch.setattr(reloader.settle, "watch", settle_watch)
        monkeypatch.setattr(reloader.settle, "probe_of", lambda generation: None)
    notifier = SimpleNamespace(status=lambda text: None, extend_timeout=lambda seconds: None)
    r = reloader.Reloader(Log(), running, config_path=None, prober=None, verdicts=SimpleNamespace(remember=None),
                          notifier=notifier, load=lambda: new.config, set_state=lambda state: None,
                          after=after or (lambda old, new: None), spawn_task=lambda coro: coro.close())

    async def propose(config: Any) -> tuple[Decision, Any]:
        return Decision(action, ("omero.web.apps",)), new

    monkeypatch.setattr(r, "_propose", propose)
    return asyncio.run(r.apply("test")), published, running, new


def broken_after(old: Any, new: Any) -> None:
    raise RuntimeError("a bug in a service's update")


def test_a_failure_after_a_new_generation_took_over_says_it_serves_and_publishes_it(monkeypatch) -> None:
    reply, published, running, new = reload(monkeypatch, Action.GENERATION, after=broken_after)
    assert running.applied is new
    assert reply["exit_code"] == RELOAD_APPLIED and reply["outcome"] == "applied", reply
    assert reply["generation"] == 2 and "a bug in a service's update" in reply["warning"]
    assert reply["message"].startswith("new generation serving, with a warning")
    assert published == [new.config]


def test_a_settle_watch_that_fails_unexpectedly_is_no_rejection(monkeypatch) -> None:
    async def watch(generation: Any, rule: Any, probe: Any) -> None:
        raise ValueError("the probe's answer could not be read")

    reply, published, running, new = reload(monkeypatch, Action.GENERATION, settle_watch=watch, settle_seconds=5)
    assert reply["exit_code"] == RELOAD_APPLIED and reply["outcome"] == "applied", reply
    assert "the probe's answer could not be read" in reply["message"]
    assert published == [new.config]  # what serves is published, even unwatched


def test_a_failure_after_the_outputs_switched_says_applied(monkeypatch) -> None:
    reply, published, running, new = reload(monkeypatch, Action.OUTPUTS, after=broken_after)
    assert running.applied is new
    assert reply["exit_code"] == RELOAD_APPLIED and reply["outcome"] == "applied", reply
    assert reply["message"].startswith("applied without a new generation, with a warning")
    assert published == [new.config]
