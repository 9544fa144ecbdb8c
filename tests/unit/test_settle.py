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
