"""The settle verdict (omerowebd/settle.py) on a stand-in generation and scripted probes, no venv."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from omerowebd.settle import Rule, watch


@dataclass
class Gen:
    number: int = 2
    worker_faults: int = 0
    exit_status: int | None = None

    @property
    def alive(self) -> bool:
        return self.exit_status is None


class Probes:
    """Answers in turn from ``answers`` (an int status, None for no answer, "hang" to never answer); then 200."""

    def __init__(self, answers: Iterable[int | None | str] = ()) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def __call__(self) -> int | None:
        self.asked += 1
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await asyncio.sleep(3600)
        return answer  # type: ignore[return-value]


FAST = dict(probe_interval=0.05, probe_timeout=0.3)


def run(gen: Gen, rule: Rule, probes: Probes, during=None):
    async def main():
        task = asyncio.create_task(during(gen)) if during else None
        try:
            return await watch(gen, rule, probes)
        finally:
            if task:
                task.cancel()
    return asyncio.run(main())


def test_a_quiet_generation_settles_after_the_window_and_was_probed():
    probes = Probes()
    verdict = run(Gen(), Rule(seconds=0.4, worker_deaths=2, **FAST), probes)
    assert verdict.settled and verdict.reason == ""
    assert verdict.seconds >= 0.4
    assert verdict.probes >= 3 and verdict.failed_probes == 0 and probes.asked == verdict.probes


def test_a_crash_loop_ends_the_watch_at_once_with_the_count_in_the_reason():
    async def deaths(gen):
        for _ in range(3):
            await asyncio.sleep(0.05)
            gen.worker_faults += 1

    verdict = run(Gen(worker_faults=7), Rule(seconds=30, worker_deaths=2, **FAST), Probes(), deaths)
    assert not verdict.settled
    assert verdict.worker_deaths == 3  # deaths before the cutover are not this generation's settle's
    assert "3 gunicorn workers died" in verdict.reason and "daemon.settle_worker_deaths = 2" in verdict.reason
    assert verdict.seconds < 5  # not the whole window


def test_up_to_the_tolerated_number_of_deaths_settles():
    async def deaths(gen):
        await asyncio.sleep(0.05)
        gen.worker_faults += 2

    verdict = run(Gen(), Rule(seconds=0.4, worker_deaths=2, **FAST), Probes(), deaths)
    assert verdict.settled and verdict.worker_deaths == 2


def test_zero_tolerated_deaths_reverts_on_the_first():
    async def death(gen):
        await asyncio.sleep(0.05)
        gen.worker_faults += 1

    verdict = run(Gen(), Rule(seconds=30, worker_deaths=0, **FAST), Probes(), death)
    assert not verdict.settled and "1 gunicorn workers died" in verdict.reason


def test_the_master_exiting_is_a_verdict_against_it():
    async def exits(gen):
        await asyncio.sleep(0.1)
        gen.exit_status = 3

    verdict = run(Gen(), Rule(seconds=30, worker_deaths=2, **FAST), Probes(), exits)
    assert not verdict.settled and "master exited (status 3)" in verdict.reason


def test_two_failed_probes_in_a_row_are_a_verdict_against_it():
    verdict = run(Gen(), Rule(seconds=30, worker_deaths=2, **FAST), Probes([200, 502, None]))
    assert not verdict.settled
    assert "health probe failed 2 times in a row (last: no answer)" in verdict.reason
    assert verdict.probes == 3 and verdict.failed_probes == 2


def test_a_probe_that_never_answers_counts_as_failed():
    verdict = run(Gen(), Rule(seconds=30, worker_deaths=2, **FAST), Probes(["hang", "hang"]))
    assert not verdict.settled and "no answer" in verdict.reason


def test_one_failed_probe_between_good_ones_is_not_a_verdict():
    verdict = run(Gen(), Rule(seconds=0.5, worker_deaths=2, **FAST), Probes([200, 503, 200]))
    assert verdict.settled and verdict.failed_probes == 1


def test_the_window_never_ends_on_a_failed_probe_one_more_decides():
    # One probe within the window (interval = the window), which fails: the next one decides.
    rule = Rule(seconds=0.2, worker_deaths=2, probe_interval=0.2, probe_timeout=0.3)
    good = run(Gen(), rule, Probes([500, 200]))
    assert good.settled and good.probes == 2 and good.failed_probes == 1
    bad = run(Gen(), rule, Probes([500, 500]))
    assert not bad.settled and "HTTP 500" in bad.reason


def test_off_when_zero_seconds():
    assert not Rule(seconds=0, worker_deaths=2).enabled
    assert Rule(seconds=0.1, worker_deaths=2).enabled


def test_reload_progress_says_the_new_generation_is_settling():
    from omerowebd.commands.reload import describe

    line = describe({"state": "settling", "generation": {"number": 4}, "generations": []})
    assert line == "reloading: generation 4 serves; watching that it stays up (daemon.settle_seconds)"


# -- the reload's side (reloader.Reloader._settle) with a stand-in of what runs ---------------------------


class Running:
    """What reloader needs of running.py: the serving generation, staging and the one bring-up."""

    def __init__(self, generation: Gen, *, bring_up_fails: str | None = None, stage_fails: bool = False) -> None:
        self.gens = type("Gens", (), {"current": generation})()
        self.sockets = ["held"]
        self.brought_up: list[tuple[object, object, bool]] = []
        self.bring_up_fails, self.stage_fails = bring_up_fails, stage_fails

    async def stage(self, target):
        if self.stage_fails:
            raise OSError(28, "No space left on device")
        return [f"switch to {target.name}"]

    async def bring_up(self, target, held, switches, *, publish=True):
        self.brought_up.append((target, held, publish))
        if self.bring_up_fails:
            return self.bring_up_fails
        self.gens.current = Gen(number=self.gens.current.number + 1)
        return None


def desired(name: str, seconds: float = 0.3, deaths: int = 0):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, config=SimpleNamespace(
        daemon=SimpleNamespace(settle_seconds=seconds, settle_worker_deaths=deaths)))


def settle_with(monkeypatch, running: Running, during=None):
    from omerowebd import reloader

    published, states, said = [], [], []
    monkeypatch.setattr(reloader, "mark_applied", lambda config, log: published.append(config))
    monkeypatch.setattr(reloader.settle, "probe_of", lambda generation: Probes())
    notifier = type("N", (), {"status": lambda self, text: said.append(text),
                              "extend_timeout": lambda self, seconds: None})()
    log = type("L", (), {"error": lambda self, *a, **k: None})()
    r = reloader.Reloader(log, running, config_path=None, prober=None, verdicts=None, notifier=notifier,
                          load=None, set_state=states.append, after=None, spawn_task=None)
    old, new = desired("old"), desired("new")

    async def main():
        task = asyncio.create_task(during(running.gens.current)) if during else None
        try:
            return await r._settle(old, new, ["omero.web.apps"])
        finally:
            if task:
                task.cancel()

    verdict, reply = asyncio.run(main())
    return verdict, reply, published, states, old, new


async def one_death(gen):
    await asyncio.sleep(0.05)
    gen.worker_faults += 1


def test_a_generation_that_settles_is_published_only_then(monkeypatch):
    running = Running(Gen(number=2))
    verdict, reply, published, states, old, new = settle_with(monkeypatch, running)
    assert verdict.settled and reply is None
    assert published == [new.config] and running.brought_up == []
    assert states == ["settling", "reloading"]


def test_one_that_does_not_is_replaced_by_the_previous_config_through_the_same_bring_up(monkeypatch):
    running = Running(Gen(number=2))
    verdict, reply, published, _, old, _ = settle_with(monkeypatch, running, one_death)
    assert not verdict.settled
    assert running.brought_up == [(old, ["held"], False)]  # the previous target, on the held sockets, unpublished
    assert published == []  # root's nginx never hears of the config that did not settle
    assert reply["exit_code"] == 5 and reply["outcome"] == "reverted" and reply["generation"] == 3
    assert "1 gunicorn workers died" in reply["message"] and "previous config serves again" in reply["message"]
    assert reply["changes"] == ["omero.web.apps"] and reply["settle"]["settled"] is False


def test_a_revert_that_cannot_come_up_says_the_new_config_serves_on(monkeypatch):
    running = Running(Gen(number=2), bring_up_fails="a worker exited before it had loaded the app")
    _, reply, published, _, _, _ = settle_with(monkeypatch, running, one_death)
    assert reply["exit_code"] == 5 and reply["outcome"] == "revert failed"
    assert "failed too (a worker exited before it had loaded the app): the new config serves on" in reply["message"]
    assert published == []
    running = Running(Gen(number=2), stage_fails=True)
    _, reply, _, _, _, _ = settle_with(monkeypatch, running, one_death)
    assert reply["outcome"] == "revert failed" and "No space left on device" in reply["message"]
