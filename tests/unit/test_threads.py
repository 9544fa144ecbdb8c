"""A blocking call in a kept thread of its own (omerowebd/threads.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omerowebd import threads


def test_calls_answer_in_turn_and_an_error_is_an_answer() -> None:
    worker: threads.OwnThread[object] = threads.OwnThread("test")

    def fails() -> object:
        raise OSError(5, "Input/output error")

    async def main() -> list[object]:
        return [await worker.run(int, "7", on_error=repr), await worker.run(fails, on_error=lambda e: e.strerror)]

    assert asyncio.run(main()) == [7, "Input/output error"]


def test_the_thread_ends_when_idle_and_the_next_call_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "IDLE_EXIT", 0.05)
    worker: threads.OwnThread[threading.Thread] = threads.OwnThread("test")

    async def one() -> threading.Thread:
        return await worker.run(threading.current_thread, on_error=lambda e: None)  # type: ignore[arg-type,return-value]

    first = asyncio.run(one())
    deadline = time.monotonic() + 30
    while first.is_alive() and time.monotonic() < deadline:  # idle: it ends on its own
        first.join(0.05)
    assert not first.is_alive() and worker._thread is None
    second = asyncio.run(one())  # and a later call still gets an answer
    assert second is not first and second.daemon


def test_a_thread_that_cannot_start_is_tried_again_at_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit's task limit refuses a thread once: that call fails, the next one starts a thread and answers."""
    worker: threads.OwnThread[int] = threads.OwnThread("test")
    real_start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def main() -> int:
        monkeypatch.setattr(threading.Thread, "start", refused)
        with pytest.raises(RuntimeError):
            worker.run(int, "1", on_error=lambda e: -1)
        assert worker._thread is None
        monkeypatch.setattr(threading.Thread, "start", real_start)
        return await asyncio.wait_for(worker.run(int, "7", on_error=lambda e: -1), 30)

    assert asyncio.run(main()) == 7


def test_a_look_that_hangs_is_waited_on_again_never_joined_by_a_second() -> None:
    """A hung NFS store: every caller gets NoAnswer within its wait, counted from when the look
    began; one look runs at a time per thing; another thing is looked at in its own thread."""
    release = threading.Event()
    calls: list[str] = []

    def look(thing: str) -> str:
        calls.append(thing)
        if thing == "hung":
            release.wait(60)
        return thing.upper()

    looks: threads.Looks[str, str] = threads.Looks("test", look, on_error=repr)

    async def main() -> list[object]:
        answers: list[object] = []
        try:
            for _ in range(5):
                with pytest.raises(threads.NoAnswer) as caught:
                    await looks.answer("hung", within=0.05)
                answers.append(caught.value.seconds >= 0.05)
            answers.append(await asyncio.wait_for(looks.answer("fine", within=30), 60))
        finally:
            release.set()
        answers.append(await looks.answer("hung", within=30))  # the same look, now done
        return answers

    assert asyncio.run(main()) == [True] * 5 + ["FINE", "HUNG"]
    assert calls == ["hung", "fine"]


def test_a_recent_answer_is_given_again_and_an_old_one_looked_at_anew() -> None:
    calls: list[int] = []

    def look(thing: int) -> int:
        calls.append(thing)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return len(calls)

    looks: threads.Looks[int, object] = threads.Looks("test", look, on_error=lambda e: e.strerror)

    async def main() -> list[object]:
        first = await looks.answer(7, within=30, max_age=3600)
        again = await looks.answer(7, within=30, max_age=3600)  # a status flood: one look
        anew = await looks.answer(7, within=30, max_age=0)
        failed = await looks.answer(7, within=30, max_age=0)
        return [first, again, anew, failed]

    assert asyncio.run(main()) == [1, 1, 2, "Input/output error"]
    assert calls == [7, 7, 7]
